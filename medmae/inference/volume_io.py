"""Finding prediction inputs and writing label volumes in the format family and geometry of their source."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from medmae.data.convert.sources import IMAGE_SUFFIXES
from medmae.io import atomic_path

__all__ = ["list_inputs", "output_name", "write_label", "is_image_path"]

log = logging.getLogger(__name__)

_NIFTI = (".nii.gz", ".nii")
_ITK_OUT = (".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".tif", ".tiff")
_LPS = np.array([-1.0, -1.0, 1.0])  # RAS <-> LPS (ITK's world frame) flips x and y


def _suffix(name: str) -> str:
    low = name.lower()
    return next((s for s in IMAGE_SUFFIXES if low.endswith(s)), "")


def is_image_path(path: Path) -> bool:
    """An image file by suffix, or a folder of files (a DICOM series, as the converter reads it)."""
    if path.name.startswith("."):
        return False
    if path.is_dir():
        return any(q.is_file() and not q.name.startswith(".") for q in path.iterdir())
    return bool(_suffix(path.name))


def list_inputs(path: str | os.PathLike) -> list[Path]:
    """``path`` itself if it is an image (or DICOM series folder of files only), else the images inside it, sorted."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"INPUT {path}: no such file or directory")
    if path.is_file():
        return [path]
    entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    if entries and all(p.is_file() and _suffix(p.name) in ("", ".dcm") for p in entries):
        return [path]  # a DICOM series: slice files, with or without .dcm
    found = [p for p in entries if is_image_path(p)]
    if not found:
        raise ValueError(f"INPUT {path}: no image files ({', '.join(IMAGE_SUFFIXES)}) or DICOM series folders in it")
    return found


def output_name(source: Path) -> str:
    """The output file name for ``source``: its own name in the same format, or ``<name>.nii.gz`` for DICOM
    (slices or a series folder) and formats labels cannot be stored in (JPEG)."""
    suffix = _suffix(source.name)
    if suffix in _NIFTI or suffix in _ITK_OUT:
        return source.name
    stem = source.name[: -len(suffix)] if suffix else source.name
    return f"{stem}.nii.gz"


def write_label(label: np.ndarray, affine: np.ndarray, source: Path, out: Path) -> Path:
    """Write a uint8 label volume (indexed like ``read_image`` returns the source) to ``out``, atomically.

    NIfTI out of a NIfTI source keeps the source's header and affine; other formats get the geometry from the
    source's RAS ``affine`` (ITK for NRRD/MHA/..., nibabel for NIfTI).
    """
    if not out.name.lower().endswith(_NIFTI) and _suffix(out.name) not in _ITK_OUT:
        raise ValueError(f"{out}: cannot write labels as {_suffix(out.name) or 'a file without a known suffix'}")
    with atomic_path(out) as tmp:  # keeps the suffix: both writers pick the format by it
        if out.name.lower().endswith(_NIFTI):
            _write_nifti(label, affine, source, tmp)
        else:
            _write_itk(label, affine, tmp)
    return out


def _write_nifti(label: np.ndarray, affine: np.ndarray, source: Path, tmp: Path) -> None:
    import nibabel as nib

    if source.is_file() and source.name.lower().endswith(_NIFTI):
        src = nib.load(str(source))
        if label.ndim == 2 and len(src.shape) >= 3:  # a 2D image stored as one slice
            label = label[:, :, None]
        img = nib.Nifti1Image(label, src.affine, header=src.header.copy())
    else:
        if label.ndim == 2:
            label, affine = label[:, :, None], _affine_2d_to_3d(affine)
        img = nib.Nifti1Image(label, affine)
    img.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["cal_min"], img.header["cal_max"] = 0, int(label.max())
    nib.save(img, str(tmp))


def _affine_2d_to_3d(affine: np.ndarray) -> np.ndarray:
    out = np.eye(4)
    out[:2, :2], out[:2, 3] = affine[:2, :2], affine[:2, 2]
    return out


def _write_itk(label: np.ndarray, affine: np.ndarray, tmp: Path) -> None:
    import itk

    nd = label.ndim
    flip = _LPS[:nd] if nd == 3 else _LPS[:2]
    linear = flip[:, None] * affine[:nd, :nd]
    spacing = np.sqrt((linear**2).sum(axis=0))
    img = itk.image_from_array(np.ascontiguousarray(label.transpose()))  # ITK arrays are indexed (z, y, x)
    img.SetSpacing(spacing.tolist())
    img.SetOrigin((flip * affine[:nd, nd]).tolist())
    img.SetDirection(itk.matrix_from_array(np.ascontiguousarray(linear / spacing)))
    itk.imwrite(img, str(tmp), compression=True)
