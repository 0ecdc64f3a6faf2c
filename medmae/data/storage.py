"""The one reader of each storage format a converted dataset uses, shared by training, validation and ``verify``.

- WebDataset tar shards: a sample is read by random access at the member offsets the manifest records
  (:func:`read_wds_sample`), or a whole shard is scanned in stored order (:func:`iter_shard_samples`, for ``verify``).
- ``.npy`` members: :func:`npy_view` views the bytes as an array (never pickle).
- Zarr v3 groups: :func:`open_zarr` and :func:`read_zarr_sample` (``<split>/<key>`` with ``image``, ``label`` and the
  metadata as attributes).

Paths are local folders or fsspec URLs (``s3://``, ``file://``, ...) alike.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from typing import Any, BinaryIO

import numpy as np

from medmae.io import is_url

__all__ = [
    "open_url",
    "npy_view",
    "read_wds_sample",
    "decode_sample",
    "iter_shard_samples",
    "open_zarr",
    "read_zarr_sample",
]

WDS_MEMBERS = ("image.npy", "label.npy", "json")


def open_url(url: str, storage_options: dict | None = None) -> BinaryIO:
    """Binary file object for a local path or an fsspec URL."""
    if is_url(url) and not url.startswith("file://"):
        import fsspec

        return fsspec.open(url, "rb", **(storage_options or {})).open()
    return open(url.removeprefix("file://"), "rb")


def npy_view(data: np.ndarray | bytes) -> np.ndarray:
    """``.npy`` bytes as an array viewing them (``np.load`` would copy every volume once more); object arrays, the
    only kind that needs pickle, are refused."""
    if isinstance(data, bytes | bytearray):
        data = np.frombuffer(data, dtype=np.uint8)
    buf = io.BytesIO(data[: 10 + 65535].tobytes())  # the header only: a version-1 header is at most 64 KiB
    major, _ = np.lib.format.read_magic(buf)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(buf)
    if dtype.hasobject:
        raise ValueError("object arrays are not volumes (and would need pickle)")
    count = int(np.prod(shape))
    if data.size < buf.tell() + count * dtype.itemsize:
        raise ValueError(f"truncated .npy member: {data.size} bytes for an array of shape {shape}")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=buf.tell())
    return arr.reshape(shape, order="F" if fortran else "C")


def read_wds_sample(f: BinaryIO, key: str, members: dict[str, Any], suffixes=WDS_MEMBERS) -> dict[str, np.ndarray]:
    """The raw bytes of ``key``'s members named in ``suffixes`` (those it has), one seek + read each at the offsets
    the manifest records; Python's tarfile reads big members in 16 KiB pieces (28 of 34 ms per CT volume)."""
    raw = {}
    for suffix in suffixes:
        if suffix not in members:
            continue
        offset, size = members[suffix]
        f.seek(offset)
        raw[suffix] = buf = np.empty(size, dtype=np.uint8)  # writable and not zero-filled: viewed, not copied
        if f.readinto(buf) != size:  # type: ignore[attr-defined]
            raise OSError(f"truncated at member {key}.{suffix}")
    return raw


def decode_sample(key: str, raw: dict[str, np.ndarray]) -> dict[str, Any]:
    """Raw members -> ``{"key", "image", "label"?, "meta"}`` (arrays view the raw bytes)."""
    out: dict[str, Any] = {"key": key, "image": npy_view(raw["image.npy"]), "meta": json.loads(raw["json"].tobytes())}
    if "label.npy" in raw:
        out["label"] = npy_view(raw["label.npy"])
    return out


def iter_shard_samples(path: str | BinaryIO) -> Iterator[dict[str, Any]]:
    """Every sample of one shard in stored order, decoded as :func:`decode_sample` does (``verify`` scans shards
    this way: it must also find samples the manifest does not list)."""
    raw: dict[str, np.ndarray] = {}
    current = None
    opened: dict[str, Any] = {"fileobj": path} if hasattr(path, "read") else {"name": path}
    with tarfile.open(mode="r:", **opened) as tf:
        for info in tf:
            key, suffix = info.name.split(".", 1)
            if current is not None and current != key:
                yield decode_sample(current, raw)
                raw = {}
            current = key
            member = tf.extractfile(info)
            if member is None:  # a link or folder: our shards hold regular files only
                raise OSError(f"{tf.name!s}: member {info.name} is not a regular file")
            raw[suffix] = np.frombuffer(member.read(), dtype=np.uint8)
    if current is not None:
        yield decode_sample(current, raw)


def open_zarr(path: str, storage_options: dict | None = None):
    """The dataset's root Zarr group, read-only."""
    import zarr

    if is_url(path):
        return zarr.open_group(path, mode="r", storage_options=storage_options or None)
    return zarr.open_group(path, mode="r")


def read_zarr_sample(root, split: str, key: str, label: bool = True) -> dict[str, Any]:
    """One Zarr sample whole: ``{"key", "image", "label"?, "meta"}``; ``root`` is an open group."""
    group = root[f"{split}/{key}"]
    out = {"key": key, "image": group["image"][...], "meta": dict(group.attrs)}
    if label and "label" in group:
        out["label"] = group["label"][...]
    return out
