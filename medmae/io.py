"""Atomic file writes: a temporary name in the same folder, then ``os.replace``, so no reader ever sees half a file
and a crash leaves the previous version in place."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, payload: Any, lines: bool = False) -> Path:
    """``payload`` as indented JSON, or with ``lines`` one JSON document per item (JSON Lines)."""
    text = "".join(json.dumps(p) + "\n" for p in payload) if lines else json.dumps(payload, indent=1)
    return atomic_write_bytes(path, text.encode())
