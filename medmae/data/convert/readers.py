"""Read one image (file, DICOM series or Siemens mosaic) into ``(C, *S)`` and its RAS affine, with the reader its
format needs.

- NIfTI and FreeSurfer MGH/MGZ: nibabel (through MONAI's ``NibabelReader``); ITK cannot open MGZ.
- NRRD: pynrrd. ITK Python is not wrapped for multi-component NRRD pixels (a DWI with a measurement frame), and
  pynrrd reads every NRRD type; the space directions and origin give the affine.
- DICOM series (a folder, or the slice files discovery grouped by series): ITK (through MONAI's ``ITKReader``).
- Siemens mosaic DICOM: ``medmae.data.convert.dicom`` un-tiles it (ITK would return one huge 2-D slice).
- Anything else (MHA/MHD, 2D PNG/JPEG/TIFF/DICOM): ITK.

Axes past the spatial ones are channels: a 4-D NIfTI is channels last, and singleton axes there (a template stored as
``(X, Y, Z, 1)``, or NIfTI's 5-D vector layout ``(X, Y, Z, 1, C)``) are dropped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medmae.data.convert.options import SampleError

__all__ = ["read_image", "NIBABEL_SUFFIXES", "NRRD_SUFFIXES"]

NIBABEL_SUFFIXES = (".nii", ".nii.gz", ".mgz", ".mgh")
NRRD_SUFFIXES = (".nrrd", ".nhdr")
# NRRD world spaces we can place in RAS: the flips from that space to RAS (the time variants share the axes)
_NRRD_SPACE_FLIPS = {
    "right-anterior-superior": (1, 1),
    "left-anterior-superior": (-1, 1),
    "left-posterior-superior": (-1, -1),
    "right-anterior-superior-time": (1, 1),
    "left-anterior-superior-time": (-1, 1),
    "left-posterior-superior-time": (-1, -1),
}


def _read_monai(path: str, reader_cls, **kwargs) -> tuple[np.ndarray, np.ndarray, int]:
    reader = reader_cls(**kwargs)
    array, meta = reader.get_data(reader.read(path))
    return np.asarray(array), np.asarray(meta["affine"], dtype=np.float64), len(meta["spatial_shape"])


def _read_itk_files(files: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
    """A DICOM series from its slice files in the order discovery sorted them (no second directory scan)."""
    import itk
    from monai.data import ITKReader

    reader = ITKReader()
    array, meta = reader.get_data(itk.imread(files))
    return np.asarray(array), np.asarray(meta["affine"], dtype=np.float64), len(meta["spatial_shape"])


def _read_nrrd(path: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Spatial axes first, then the non-spatial ones (a DWI's gradient list); RAS affine from the header.

    The measurement frame only rotates vector and tensor *values* (gradient directions); the intensities stored as
    channels are scalars, so it does not change what we store.
    """
    import nrrd

    data, header = nrrd.read(path, index_order="F")
    space = header.get("space")
    directions = header.get("space directions")
    if directions is None:  # no world space: ITK's convention for such files, axis-aligned LPS
        spacings = np.asarray(header.get("spacings", [1.0] * data.ndim), dtype=np.float64)
        spatial = [i for i in range(data.ndim) if np.isfinite(spacings[i])]
        matrix = np.diag(spacings[spatial][:3])
        origin, flips = np.zeros(3), (-1, -1)
    else:
        if space not in _NRRD_SPACE_FLIPS:
            raise SampleError("unreadable", f"{path}: NRRD space {space!r} cannot be placed in RAS")
        directions = np.asarray(directions, dtype=np.float64)
        spatial = [i for i in range(data.ndim) if np.isfinite(directions[i]).all()]
        matrix = directions[spatial].T
        origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)
        flips = _NRRD_SPACE_FLIPS[space]
    n_spatial = len(spatial)
    if n_spatial not in (2, 3):
        raise SampleError("wrong_ndim", f"{path}: NRRD with {n_spatial} spatial axes")
    extra = [i for i in range(data.ndim) if i not in spatial]
    data = np.transpose(data, spatial + extra)
    affine = np.eye(n_spatial + 1)  # 3D: 4x4; 2D: 3x3, as MONAI's readers give them
    affine[:n_spatial, :n_spatial] = matrix[:n_spatial, :n_spatial]
    affine[:n_spatial, n_spatial] = origin[:n_spatial]
    affine[0] *= flips[0]
    affine[1] *= flips[1]
    return data, affine, n_spatial


def _read_any(path: str, files: list[str] | None) -> tuple[np.ndarray, np.ndarray, int]:
    from monai.data import ITKReader, NibabelReader

    from medmae.data.convert import dicom

    low = path.lower()
    if files:
        return _read_itk_files(files)
    if low.endswith(NIBABEL_SUFFIXES):
        return _read_monai(path, NibabelReader)
    if low.endswith(NRRD_SUFFIXES):
        return _read_nrrd(path)
    if Path(path).is_dir():
        series = dicom.scan_folder(path)
        if len(series) > 1:
            raise SampleError(
                "multiple_series",
                f"{path}: holds {len(series)} DICOM series ({dicom.describe(series)}); give one series per folder, "
                "or convert the folder as INPUT to make each series its own sample",
            )
        if series and series[0].mosaic:
            if len(series[0].files) > 1:
                raise SampleError(
                    "mosaic_series",
                    f"{path}: a Siemens mosaic series of {len(series[0].files)} volumes; convert the folder as INPUT "
                    "to make each volume its own sample",
                )
            array, affine = dicom.read_mosaic(series[0].files[0])
            return array, affine, 3
        if series:
            return _read_itk_files(series[0].files)
    elif dicom.is_mosaic_file(path):
        array, affine = dicom.read_mosaic(path)
        return array, affine, 3
    return _read_monai(path, ITKReader)


def read_image(path: str, spatial_dims: int, files: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Array with channels first ``(C, *S)`` and its RAS affine; ``files`` are a DICOM series' slices in order."""
    if not Path(path).exists():
        raise SampleError("unreadable", f"{path}: file not found")
    try:
        array, affine, n_spatial = _read_any(path, files)
    except SampleError:
        raise
    # any reader failure is a property of the file: nibabel, ITK, pynrrd, pydicom and zlib raise many kinds
    except Exception as e:
        detail = (str(e).strip().splitlines() or [""])[-1][:300]
        raise SampleError("unreadable", f"{path}: {type(e).__name__}: {detail}") from None
    if spatial_dims == 2 and n_spatial == 3 and array.shape[2] == 1:  # a 2D image stored as one slice
        array, affine, n_spatial = array[:, :, 0], affine[[0, 1, 3]][:, [0, 1, 3]], 2
    extra = array.shape[n_spatial:]
    channels = [s for s in extra if s != 1]
    if n_spatial != spatial_dims or array.ndim < spatial_dims or len(channels) > 1:
        raise SampleError("wrong_ndim", f"{path}: expected a {spatial_dims}D image, got shape {array.shape}")
    array = array.reshape(*array.shape[:n_spatial], -1, order="A")  # the channel axis, singletons gone
    return np.moveaxis(array, -1, 0), affine
