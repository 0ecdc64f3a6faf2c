"""``manifest.json`` and ``errors.jsonl`` names, reading a manifest (local path or fsspec URL), and ``verify``, which
reads every stored sample back and checks it against the manifest."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from tqdm import tqdm

from medmae.io import is_url

__all__ = ["MANIFEST", "ERRORS", "read_manifest", "verify", "join_url"]

MANIFEST = "manifest.json"
ERRORS = "errors.jsonl"
log = logging.getLogger(__name__)


def join_url(base: str, name: str) -> str:
    """``base/name`` for local paths and URLs alike."""
    return f"{base.rstrip('/')}/{name}" if is_url(base) else str(Path(base) / name)


def read_manifest(path: str | os.PathLike, storage_options: dict | None = None) -> dict:
    """The manifest of a converted dataset; ``path`` is its folder (or the manifest file), local or an fsspec URL."""
    path = str(path)
    url = path if path.endswith(".json") else join_url(path, MANIFEST)
    try:
        if is_url(url):
            import fsspec

            with fsspec.open(url, "rt", **(storage_options or {})) as f:
                manifest = json.load(f)
        else:
            with open(url) as f:
                manifest = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"data.path: no {MANIFEST} at {url}; convert the data with tools/to_wds.py first") from None
    if manifest.get("medmae_dataset") != 1:
        raise ValueError(f"data.path: {url} is not a medmae dataset manifest")
    return manifest


def verify(out: str | Path, storage_options: dict | None = None) -> list[str]:
    """Read every sample back, recompute its checksum, compare with the manifest; returns the problems found.

    ``out`` is a folder or an fsspec URL (read with ``storage_options``).
    """
    import fsspec

    from medmae.data.convert.preprocess import checksum  # the converter's readers: not needed to read a manifest
    from medmae.data.storage import iter_shard_samples, open_zarr, read_zarr_sample

    out = str(out)
    storage_options = storage_options or {}
    manifest = read_manifest(out, storage_options)
    expected = {s["key"]: s for s in manifest["samples"]}
    seen: set[str] = set()
    problems: list[str] = []

    def check(sample: dict, where: str) -> None:
        key = sample["key"]
        if key not in expected:
            problems.append(f"{where}: sample '{key}' is not in the manifest")
        elif key in seen:
            problems.append(f"{where}: sample '{key}' stored twice")
        elif checksum(sample["image"], sample.get("label")) != expected[key]["checksum"]:
            problems.append(f"{where}: sample '{key}' checksum mismatch")
        seen.add(key)

    if manifest["format"] == "wds":
        for shard in tqdm(manifest["shards"], desc="verify", unit="shard"):
            try:
                with fsspec.open(join_url(out, shard["name"]), "rb", **storage_options) as f:
                    for sample in iter_shard_samples(f):
                        check(sample, shard["name"])
            except Exception as e:  # a damaged shard is a finding, not a crash of the verifier
                problems.append(f"{shard['name']}: unreadable ({type(e).__name__}: {e})")
    else:
        root = open_zarr(out, storage_options)
        for s in tqdm(manifest["samples"], desc="verify", unit="sample"):
            try:
                check(read_zarr_sample(root, s["split"], s["key"]), f"{s['split']}/{s['key']}")
            except Exception as e:
                problems.append(f"{s['split']}/{s['key']}: unreadable ({type(e).__name__}: {e})")
    for key in sorted(set(expected) - seen):
        problems.append(f"sample '{key}' listed in the manifest was not found")
    for p in problems:
        log.error("verify: %s", p)
    return problems
