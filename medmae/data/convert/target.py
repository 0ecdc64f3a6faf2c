"""Where a conversion goes: a local folder, or an object store URL (``s3://bucket/prefix``) through fsspec.

Local: writers rename complete files into place (``medmae.io``), and a resume scans what the final names hold.

Object store: there is no rename, but a PUT of a whole object is atomic in S3 (a reader sees the old object or the
new one, never part of it; a multipart upload appears only once completed). So a shard or Zarr sample is first
written complete in a local staging folder, then uploaded as whole objects, and only after its upload does a
manifest name it: the manifest is written last, and during a run it is rewritten now and then naming only what is
already uploaded. A resume trusts the remote manifest and deletes the shards and Zarr groups no manifest names
(uploaded after the last manifest write of a killed run, perhaps half of a sample's chunks).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from medmae.data.convert.manifest import MANIFEST, read_manifest
from medmae.data.convert.splits import SPLITS
from medmae.data.convert.writers import SHARD_RE, scan_shards, scan_zarr
from medmae.io import is_url, write_json_atomic

__all__ = ["Output"]
log = logging.getLogger(__name__)


class Output:
    """The converter's OUTPUT. ``local`` is where writers write: the folder itself, or the staging folder of a URL.

    Construction checks that the destination can be written (backend installed, bucket there, credentials good) by
    writing and deleting a probe object, so a bad URL fails before any conversion work.
    """

    def __init__(self, output: str | os.PathLike, storage_options: dict | None = None):
        self.name = str(output)
        self.remote = is_url(output)
        if not self.remote:
            self.local = Path(output)  # created by open(), once the input is known to be usable
            return
        self.storage_options = storage_options or {}
        self._fs, self.root = _connect(self.name, self.storage_options)
        self._pid = os.getpid()
        self.local = Path(tempfile.mkdtemp(prefix="medmae-convert-"))

    @property
    def fs(self):
        """This process's filesystem: async fsspec filesystems (s3fs) refuse use in a forked converter worker."""
        if self._pid != os.getpid():
            import fsspec

            self._fs = fsspec.core.url_to_fs(self.name, **self.storage_options)[0]
            self._pid = os.getpid()
        return self._fs

    def open(self) -> None:
        if not self.remote:
            try:
                self.local.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ValueError(f"OUTPUT {self.local}: cannot create it ({e.strerror or e})") from None

    def url(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def read_manifest(self) -> dict | None:
        """The manifest a previous run left, or None."""
        if not self.remote:
            return read_manifest(self.local) if (self.local / MANIFEST).is_file() else None
        self.fs.invalidate_cache()  # another process may have written since this filesystem listed the bucket
        if not self.fs.exists(self.url(MANIFEST)):
            return None
        manifest = json.loads(self.fs.cat_file(self.url(MANIFEST)))
        if manifest.get("medmae_dataset") != 1:
            raise ValueError(f"OUTPUT {self.name} holds a {MANIFEST} that is not a medmae dataset manifest")
        return manifest

    def existing(self, fmt: str, prefix: str) -> tuple[list[dict], list[dict]]:
        """Complete shards and samples of earlier runs: local ones by scanning, remote ones from the manifest."""
        if not self.remote:
            return scan_shards(self.local, prefix) if fmt == "wds" else ([], scan_zarr(self.local))
        manifest = self.read_manifest() or {"shards": [], "samples": []}
        shards, samples = list(manifest["shards"]), list(manifest["samples"])
        self._remove_orphans(fmt, prefix, {s["name"] for s in shards}, {(s["split"], s["key"]) for s in samples})
        return shards, samples

    def _remove_orphans(self, fmt: str, prefix: str, shards: set[str], samples: set[tuple[str, str]]) -> None:
        """Delete what a killed run uploaded after its last manifest: no reader can know of it."""
        orphans = []
        if fmt == "wds":
            for path in self.fs.ls(self.root, detail=False) if self.fs.isdir(self.root) else []:
                name = path.rstrip("/").rsplit("/", 1)[-1]
                m = SHARD_RE.match(name)
                if m and m["prefix"] == prefix and name not in shards:
                    orphans.append(path)
        else:
            for split in SPLITS:
                if self.fs.isdir(self.url(split)):
                    for path in self.fs.ls(self.url(split), detail=False):
                        key = path.rstrip("/").rsplit("/", 1)[-1]
                        if (split, key) not in samples and key != "zarr.json":
                            orphans.append(path)
        for path in orphans:
            log.warning("removing %s: uploaded by an interrupted run after its last manifest", path)
            self.fs.rm(path, recursive=True)

    def write_json(self, name: str, payload, lines: bool = False) -> None:
        """A JSON (or JSON Lines) file: renamed into place locally, one whole-object PUT remotely."""
        if not self.remote:
            write_json_atomic(self.local / name, payload, lines=lines)
            return
        text = "".join(json.dumps(p) + "\n" for p in payload) if lines else json.dumps(payload, indent=1)
        self.fs.pipe_file(self.url(name), text.encode())

    def publish(self, path: Path) -> None:
        """Upload a complete shard file or Zarr folder from staging, then free its staging space (remote only)."""
        if not self.remote:
            return
        rel = path.relative_to(self.local).as_posix()
        if path.is_dir():
            if self.fs.exists(self.url(rel)):  # leftovers of an earlier attempt: no mixing of two versions' chunks
                self.fs.rm(self.url(rel), recursive=True)
            for f in sorted(p for p in path.rglob("*") if p.is_file()):
                self.fs.put_file(str(f), self.url(f.relative_to(self.local).as_posix()))
            shutil.rmtree(path)
        else:
            self.fs.put_file(str(path), self.url(rel))
            path.unlink()

    def publish_metadata(self) -> None:
        """The Zarr group's own metadata files (root and split groups), small and rewritten whole."""
        if not self.remote:
            return
        for f in [self.local / "zarr.json", *(self.local / s / "zarr.json" for s in SPLITS)]:
            if f.is_file():
                self.fs.put_file(str(f), self.url(f.relative_to(self.local).as_posix()))

    def close(self) -> None:
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)

    def __str__(self) -> str:
        return self.name


def _connect(url: str, storage_options: dict):
    import fsspec

    protocol = url.split("://", 1)[0]
    try:
        fs, root = fsspec.core.url_to_fs(url, **storage_options)
    except ImportError as e:
        extra = " (pip install 'medmae[s3]')" if protocol in ("s3", "s3a") else ""
        raise ValueError(f"OUTPUT {url}: no filesystem for '{protocol}://' is installed{extra}: {e}") from None
    except ValueError as e:
        raise ValueError(f"OUTPUT {url}: {e}") from None
    probe = f"{root.rstrip('/')}/.medmae-write-probe-{uuid.uuid4().hex}"
    try:
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except Exception as e:  # botocore, aiohttp and fsspec raise many kinds; all mean the same to the user
        detail = (str(e).strip().splitlines() or [""])[0][:300]
        raise ValueError(
            f"OUTPUT {url}: cannot write there ({type(e).__name__}: {detail}); check that the bucket exists, the "
            "endpoint (AWS_ENDPOINT_URL or storage_options endpoint_url) and the credentials "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE)"
        ) from None
    return fs, root
