"""DICOM folders: the series they hold, and Siemens mosaics un-tiled into their real 3-D volume.

Series are grouped the way ITK reads them (GDCM's series identifiers: SeriesInstanceUID, split further where the
geometry differs), so a series found here is exactly what the reader loads. A Siemens mosaic stores a whole volume
as one tiled 2-D image per file; the number of tiles is only in the private CSA header, which nibabel reads.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medmae.data.convert.options import SampleError

__all__ = ["Series", "scan_folder", "describe", "series_keys", "is_mosaic_file", "modality", "read_mosaic"]

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass
class Series:
    uid: str
    """GDCM's series identifier (SeriesInstanceUID and the details it splits on)."""
    files: list[str]
    """Slice files in the order GDCM sorts them (by position along the slice normal)."""
    number: int | None
    """SeriesNumber."""
    description: str
    """SeriesDescription ('' when absent)."""
    mosaic: bool
    """Siemens mosaic: every file is a whole volume."""


def _header(path: str):
    import pydicom

    return pydicom.dcmread(path, stop_before_pixels=True, force=True)


def _is_mosaic(ds) -> bool:
    return "MOSAIC" in [str(v).upper() for v in (ds.get("ImageType") or [])]


def is_mosaic_file(path: str) -> bool:
    """A single DICOM file (``.dcm`` or no suffix) whose ImageType says MOSAIC."""
    if Path(path).suffix.lower() not in ("", ".dcm"):
        return False
    try:
        return _is_mosaic(_header(path))
    except Exception:  # not a DICOM file: the ITK reader reports it
        return False


def modality(path: str) -> str | None:
    """The file's Modality tag (CT, MR, PT, CR, DX, ...), None when it has none or is not DICOM."""
    try:
        value = _header(path).get("Modality")
    except Exception:  # not a DICOM file: no evidence either way
        return None
    return str(value).strip().upper() or None if value else None


def scan_folder(folder: str | Path) -> list[Series]:
    """The DICOM series directly inside ``folder``, sorted by series number and description."""
    import itk

    names = itk.GDCMSeriesFileNames.New()
    # The same settings as MONAI's ITKReader, so a series here is one ITK would read as a volume.
    names.SetUseSeriesDetails(True)
    names.AddSeriesRestriction("0008|0021")  # Series Date
    names.SetDirectory(str(folder))
    found = []
    for uid in names.GetSeriesUIDs():
        files = [str(f) for f in names.GetFileNames(uid)]
        ds = _header(files[0])
        number = ds.get("SeriesNumber")
        found.append(
            Series(
                uid,
                files,
                int(number) if number not in (None, "") else None,
                str(ds.get("SeriesDescription") or ""),
                _is_mosaic(ds),
            )
        )
    return sorted(found, key=lambda s: (s.number if s.number is not None else -1, s.description, s.uid))


def describe(series: list[Series]) -> str:
    return "; ".join(f"#{s.number} '{s.description}' {len(s.files)} file(s) uid {s.uid}" for s in series)


def series_keys(folder_key: str, series: list[Series]) -> list[str]:
    """A key per series: the folder's own key for a lone series, else ``<folder>_<number>_<description>``, with a
    counter where two series would share one."""
    if len(series) == 1:
        return [folder_key]
    keys: list[str] = []
    for s in series:
        parts = [folder_key] + ([str(s.number)] if s.number is not None else []) + [s.description or "series"]
        key = _UNSAFE.sub("_", "_".join(parts)).strip("_")
        base, n = key, 2
        while key in keys:
            key, n = f"{base}_{n}", n + 1
        keys.append(key)
    return keys


def read_mosaic(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Un-tile one Siemens mosaic file -> ``(rows, columns, slices)`` array (rescaled) and its RAS affine."""
    import pydicom

    with warnings.catch_warnings():  # nibabel.nicom warns at import that its readers are experimental
        warnings.simplefilter("ignore")
        from nibabel.nicom import csareader, dicomwrappers

    ds = pydicom.dcmread(path, force=True)
    try:
        csa = csareader.get_csa_header(ds)
        n_tiles = csareader.get_n_mosaic(csa) if csa else None
    except (csareader.CSAReadError, KeyError):
        n_tiles = None
    if not n_tiles:
        raise SampleError(
            "mosaic_without_csa",
            f"{path}: a Siemens mosaic without the slice count (NumberOfImagesInMosaic in the CSA header (0029,1010); "
            "anonymisers often strip it), so it cannot be un-tiled; keep private tags, or convert with dcm2niix",
        )
    wrapper = dicomwrappers.MosaicWrapper(ds, csa, n_tiles)
    if ds.Rows % wrapper.mosaic_size or ds.Columns % wrapper.mosaic_size:
        raise SampleError(
            "unreadable",
            f"{path}: a {ds.Rows}x{ds.Columns} mosaic cannot hold {n_tiles} equal tiles "
            f"({wrapper.mosaic_size} per row)",
        )
    data = wrapper.get_data()  # (row, column, slice): the axes nibabel's affine maps
    return data, _LPS_TO_RAS @ wrapper.affine  # DICOM patient space is LPS
