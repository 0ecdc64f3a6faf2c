"""Volumes (NIfTI, FreeSurfer MGZ, NRRD, MHA, DICOM series and Siemens mosaics, 2D images from a CSV) → WebDataset
tar shards or a Zarr v3 group, in a folder or an object store.

``convert`` is what ``tools/to_wds.py`` runs; ``verify`` re-reads a converted dataset against its manifest. Names are
re-exported lazily: conversion imports MONAI and the image readers, which training processes never need.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "read_manifest": "manifest",
    "verify": "manifest",
    "ConvertOptions": "options",
    "SampleError": "options",
    "ConvertResult": "run",
    "convert": "run",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"medmae.data.convert.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'medmae.data.convert' has no attribute {name!r}")
