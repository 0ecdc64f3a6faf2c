"""Atomic file writes: a temporary name in the same folder, then ``os.replace``, so no reader ever sees half a file
and a crash leaves the previous version in place. Every file medmae produces goes through here."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "atomic_write_bytes", "is_url", "resolve_local", "write_json_atomic"]


def is_url(path: str | os.PathLike) -> bool:
    """``s3://bucket/x``, ``gs://...``, ``file:///...``: an fsspec URL rather than a local path."""
    return "://" in str(path)


def resolve_local(path: str) -> str:
    """A local path made absolute against the launching directory (Ray workers and trials start elsewhere);
    URLs and ``""`` (unset) unchanged."""
    return path if not path or is_url(path) else str(Path(path).expanduser().resolve())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` (same suffix, for writers that pick the format by it) that replaces ``path``
    when the block ends without an error; removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:])  # .nii.gz keeps both parts
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are meant to be shared
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def write_json_atomic(path: str | os.PathLike, payload: Any, lines: bool = False) -> Path:
    """``payload`` as indented JSON, or with ``lines`` one JSON document per item (JSON Lines)."""
    text = "".join(json.dumps(p) + "\n" for p in payload) if lines else json.dumps(payload, indent=1)
    return atomic_write_bytes(path, text.encode())
