"""Storage writers: WebDataset tar shards and a Zarr v3 group, both written atomically.

A tar shard is written under a hidden temporary name and renamed when it closes; a Zarr sample is written as a
standalone group under ``OUTPUT/.tmp/`` and renamed into ``OUTPUT/<split>/<key>``. So a final name always holds
complete data, and a re-run rebuilds its state from what the final names hold. Reading is
``medmae.data.storage``'s.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from medmae.data.convert.preprocess import Prepared

__all__ = [
    "encode_npy",
    "ShardWriter",
    "scan_shards",
    "write_zarr_sample",
    "scan_zarr",
    "remove_temporaries",
    "SHARD_RE",
]

SHARD_RE = re.compile(r"^(?P<prefix>.*?)(?P<split>train|validation|test)-(?P<index>\d{6})\.tar$")


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def sample_members(p: Prepared) -> list[tuple[str, bytes]]:
    """Tar members of one sample, in the order the loaders expect: ``<key>.image.npy``, ``.label.npy``, ``.json``."""
    members = [(f"{p.key}.image.npy", encode_npy(p.image))]
    if p.label is not None:
        members.append((f"{p.key}.label.npy", encode_npy(p.label)))
    members.append((f"{p.key}.json", json.dumps(p.meta).encode()))
    return members


class ShardWriter:
    """Writes ``<prefix><split>-NNNNNN.tar`` shards of about ``max_bytes``, each renamed into place when full.

    Every converter worker owns one per split; ``allocate()`` hands out shard numbers shared by all of them.
    ``on_close(path, info)`` runs once a shard is complete under its final name (the upload to an object store).
    """

    def __init__(
        self,
        out: Path,
        split: str,
        prefix: str,
        max_bytes: int,
        allocate: Callable[[], int],
        on_close: Callable[[Path, dict], None] | None = None,
    ):
        self.out, self.split, self.prefix, self.max_bytes = out, split, prefix, max_bytes
        self.allocate, self.on_close = allocate, on_close
        self.index = -1
        self.tar: tarfile.TarFile | None = None
        self.count = 0
        self.finished: list[dict] = []

    @property
    def name(self) -> str:
        return f"{self.prefix}{self.split}-{self.index:06d}.tar"

    def _tmp(self) -> Path:
        return self.out / f".{self.name}.tmp-{os.getpid()}"

    def add(self, members: list[tuple[str, bytes]]) -> dict:
        """Append one sample; returns where it went: ``{"shard": name, "members": {suffix: [offset, size]}}``."""
        if self.tar is None:
            self.index = self.allocate()
            self.tar = tarfile.open(self._tmp(), "w", format=tarfile.PAX_FORMAT)
        where = {}
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self.tar.addfile(info, io.BytesIO(data))
            # data ends the padded block run that addfile just wrote
            offset = self.tar.offset - ((len(data) + tarfile.BLOCKSIZE - 1) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            where[name.split(".", 1)[1]] = [offset, len(data)]
        self.count += 1
        placed = {"shard": self.name, "members": where}
        if self.tar.offset >= self.max_bytes:
            self.close()
        return placed

    def close(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        tmp = self._tmp()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        final = self.out / self.name
        os.replace(tmp, final)
        info = {"name": self.name, "split": self.split, "samples": self.count, "bytes": final.stat().st_size}
        if self.on_close is not None:
            self.on_close(final, info)
        self.finished.append(info)
        self.tar, self.count = None, 0


def scan_shards(out: Path, prefix: str) -> tuple[list[dict], list[dict]]:
    """Shards already complete under ``out`` and the samples they hold (meta + placement), for resuming."""
    shards, samples = [], []
    for path in sorted(out.glob(f"{prefix}*.tar")):
        m = SHARD_RE.match(path.name)
        if not m or m["prefix"] != prefix:
            continue
        members: dict[str, dict] = {}
        with tarfile.open(path, "r:") as tf:
            for info in tf:
                key, suffix = info.name.split(".", 1)
                members.setdefault(key, {})[suffix] = [info.offset_data, info.size]
                if suffix == "json":
                    meta = json.loads(_member(tf, info))
                    samples.append({**meta, "shard": path.name, "members": members[key]})
        shards.append({"name": path.name, "split": m["split"], "samples": len(members), "bytes": path.stat().st_size})
    return shards, samples


def _member(tf: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    f = tf.extractfile(info)
    if f is None:  # a link or folder: our shards hold regular files only
        raise OSError(f"{tf.name!s}: member {info.name} is not a regular file")
    return f.read()


def _zarr_codecs():
    from zarr.codecs import BloscCodec

    return [BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")]


def _chunking(shape: tuple[int, ...], chunk: int, shard: int, lead: tuple[int, ...]) -> tuple[tuple, tuple | None]:
    spatial = shape[len(lead) :]
    if len(spatial) == 2:  # x-rays are read whole
        return lead + tuple(spatial), None
    chunks = tuple(min(chunk, s) for s in spatial)
    if not shard:
        return lead + chunks, None
    shards = tuple(c * -(-min(shard, s) // c) for c, s in zip(chunks, spatial))
    return lead + chunks, lead + shards


def write_zarr_sample(out: Path, p: Prepared, chunk: int, shard: int) -> None:
    """Write one sample as group ``<split>/<key>`` (arrays ``image`` and ``label``, meta as attributes)."""
    import zarr

    tmp = out / ".tmp" / f"{p.meta['split']}-{p.key}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    group = zarr.open_group(str(tmp), mode="w", attributes=p.meta)
    chunks, shards = _chunking(p.image.shape, chunk, shard, (p.image.shape[0],))
    group.create_array("image", data=p.image, chunks=chunks, shards=shards, compressors=_zarr_codecs())
    if p.label is not None:
        if p.label.ndim == 1:
            group.create_array("label", data=p.label, chunks=p.label.shape, compressors=None)
        else:
            chunks, shards = _chunking(p.label.shape, chunk, shard, ())
            group.create_array("label", data=p.label, chunks=chunks, shards=shards, compressors=_zarr_codecs())
    os.replace(tmp, out / p.meta["split"] / p.key)


def scan_zarr(out: Path) -> list[dict]:
    """Metadata of the samples already complete in the Zarr group at ``out``."""
    samples = []
    for split in ("train", "validation", "test"):
        if not (out / split).is_dir():
            continue
        for d in sorted((out / split).iterdir()):
            meta_file = d / "zarr.json"
            if d.is_dir() and meta_file.is_file():
                meta = json.loads(meta_file.read_text()).get("attributes", {})
                if "checksum" in meta:
                    samples.append(meta)
    return samples


def remove_temporaries(out: Path) -> None:
    """Delete what an interrupted run left under temporary names (never a final name)."""
    for tmp in out.glob(".*.tmp-*"):
        tmp.unlink()
    shutil.rmtree(out / ".tmp", ignore_errors=True)
