"""Synthetic phantoms for tests and smoke runs: volumes whose labelled structures are visible in the image.

``make_phantom`` gives arrays; ``write_phantom_dataset`` writes them as NIfTI/NRRD files with an MSD-style
``dataset.json``; ``write_dicom_series`` writes a CT volume as a real DICOM series (one file per slice).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

__all__ = ["make_phantom", "write_phantom_dataset", "write_dicom_series"]

_KINDS = ("ct", "mri", "xray")


def _ellipsoid(grid: list[np.ndarray], center: np.ndarray, radii: np.ndarray) -> np.ndarray:
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1.0


def make_phantom(
    shape: tuple[int, ...] = (32, 32, 32),
    num_classes: int = 2,
    channels: int = 1,
    seed: int = 0,
    kind: str = "ct",
) -> tuple[np.ndarray, np.ndarray]:
    """A body ellipsoid holding ``num_classes - 1`` labelled blobs (spheres and boxes), 2D or 3D.

    Returns ``image`` float32 ``(channels, *shape)`` and ``label`` uint8 ``shape``. ``kind="ct"`` gives HU values
    (air -1000, soft tissue ~40, labelled organs 100..240 inside the [-175, 250] window, a bone rod at 900 outside
    it); ``kind="mri"`` gives positive intensities with an exactly-zero background; ``kind="xray"`` values in [0, 1].
    Each channel maps the classes to different contrasts, like MRI sequences.
    """
    if kind not in _KINDS:
        raise ValueError(f"kind: {kind!r} is not one of {list(_KINDS)}")
    if len(shape) not in (2, 3) or min(shape) < 8:
        raise ValueError(f"shape: expected 2 or 3 sizes >= 8, got {shape}")
    if num_classes < 1 or num_classes > 255:
        raise ValueError(f"num_classes: expected 1..255, got {num_classes}")
    rng = np.random.default_rng(seed)
    size = np.asarray(shape, dtype=np.float64)
    grid = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    body = _ellipsoid(grid, size / 2 - 0.5 + rng.uniform(-1, 1, len(shape)), size * rng.uniform(0.40, 0.46, len(shape)))
    label = np.zeros(shape, dtype=np.uint8)
    for cls in range(1, num_classes):
        for _ in range(100):  # place each structure inside the body, away from earlier ones where possible
            radii = size * rng.uniform(0.08, 0.16, len(shape))
            center = rng.uniform(size * 0.3, size * 0.7)
            if cls % 2:
                region = _ellipsoid(grid, center, radii)
            else:
                region = np.ones(shape, dtype=bool)
                for g, c, r in zip(grid, center, radii):
                    region &= np.abs(g - c) <= r
            region &= body
            if region.sum() >= 8 and not (label[region] > 0).mean() > 0.5:
                break
        label[region] = cls
    if num_classes > 1:
        assert all((label == c).any() for c in range(1, num_classes)), "phantom lost a class; use a larger shape"

    images = []
    for ch in range(channels):
        contrast = 1.0 + 0.35 * ch
        if kind == "ct":
            img = np.full(shape, -1000.0, dtype=np.float32)
            img[body] = 40.0
            rod = np.ones(shape, dtype=bool)
            for d, g in enumerate(grid[:-1]):
                rod &= np.abs(g - (size[d] * (0.3 if d == 0 else 0.7))) <= max(1.0, size[d] * 0.04)
            img[rod & body & (label == 0)] = 900.0  # bone: clipped by the CT window
            levels = np.linspace(100.0, 240.0, max(num_classes - 1, 1))
            for cls in range(1, num_classes):
                img[label == cls] = levels[(cls - 1 + ch) % len(levels)]
            img += rng.normal(0.0, 12.0, shape).astype(np.float32) * body
        elif kind == "mri":
            img = np.zeros(shape, dtype=np.float32)
            img[body] = 300.0 * contrast
            for cls in range(1, num_classes):
                level = 500.0 + 450.0 * cls / max(num_classes - 1, 1)
                img[label == cls] = level * (contrast if cls % 2 else 1 / contrast)
            img += np.abs(rng.normal(0.0, 15.0, shape)).astype(np.float32) * body
        else:
            img = np.zeros(shape, dtype=np.float32)
            img[body] = 0.3
            for cls in range(1, num_classes):
                img[label == cls] = 0.5 + 0.4 * cls / max(num_classes - 1, 1)
            img = np.clip(img + rng.normal(0.0, 0.02, shape).astype(np.float32), 0.0, 1.0)
        images.append(img)
    return np.stack(images).astype(np.float32), label


def _affine(spacing: tuple[float, ...], origin: float = -20.0) -> np.ndarray:
    affine = np.diag([*spacing, 1.0]).astype(np.float64)
    affine[:3, 3] = origin
    return affine


def write_phantom_dataset(
    folder: str | Path,
    n: int = 4,
    shape: tuple[int, ...] = (32, 32, 32),
    num_classes: int = 2,
    channels: int = 1,
    spacing: tuple[float, ...] = (1.5, 1.5, 2.0),
    seed: int = 0,
    fmt: str = "nifti",
    kind: str = "ct",
) -> Path:
    """Write ``n`` phantoms as ``imagesTr/``, ``labelsTr/`` and an MSD-style ``dataset.json``; return its path.

    ``fmt`` is ``"nifti"`` (.nii.gz, multi-channel as a 4D file like MSD BraTS) or ``"nrrd"``. CT images are stored
    as int16 HU like scanners do. The last ``n // 4`` cases go to ``"validation"``, the rest to ``"training"``.
    """
    import nibabel as nib

    if fmt not in ("nifti", "nrrd"):
        raise ValueError(f"fmt: {fmt!r} is not one of ['nifti', 'nrrd']")
    if len(shape) != 3:
        raise ValueError(f"shape: volumes are 3D, got {shape}")
    folder = Path(folder)
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    ext = ".nii.gz" if fmt == "nifti" else ".nrrd"
    entries = []
    for i in range(n):
        image, label = make_phantom(shape, num_classes, channels, seed=seed + i, kind=kind)
        data = np.moveaxis(image, 0, -1) if channels > 1 else image[0]  # channels last, as NIfTI stores them
        if kind == "ct":
            data = np.round(data).astype(np.int16)
        name = f"case_{i:03d}{ext}"
        if fmt == "nifti":
            nib.save(nib.Nifti1Image(data, _affine(spacing)), folder / "imagesTr" / name)
            nib.save(nib.Nifti1Image(label, _affine(spacing)), folder / "labelsTr" / name)
        else:
            if channels > 1:
                raise ValueError("channels: the NRRD writer here stores single-channel volumes only")
            _write_nrrd(folder / "imagesTr" / name, data, spacing)
            _write_nrrd(folder / "labelsTr" / name, label, spacing)
        entries.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    n_val = n // 4
    datalist = {
        "name": "phantom",
        "modality": {str(c): kind.upper() for c in range(channels)},
        "labels": {str(c): "background" if c == 0 else f"class{c}" for c in range(num_classes)},
        "numTraining": n - n_val,
        "training": entries[: n - n_val],
        "validation": entries[n - n_val :],
    }
    path = folder / "dataset.json"
    path.write_text(json.dumps(datalist, indent=2))
    return path


def _write_nrrd(path: Path, data: np.ndarray, spacing: tuple[float, ...]) -> None:
    """NRRD in RAS world coordinates (NRRD's 'space' makes the orientation explicit)."""
    import nrrd

    header = {
        "space": "right-anterior-superior",
        "space directions": np.diag(np.asarray(spacing, dtype=np.float64)),
        "space origin": np.full(3, -20.0),
    }
    nrrd.write(str(path), data, header)


def write_dicom_series(
    folder: str | Path,
    volume: np.ndarray,
    spacing: tuple[float, float, float] = (0.8, 0.8, 2.5),
    series_number: int = 1,
    description: str = "phantom",
    prefix: str = "slice",
) -> Path:
    """Write an int16 HU volume indexed ``(x, y, z)`` as a CT DICOM series, one file per z slice
    (``<prefix>_NNNN.dcm``; several series may share a folder).

    Slices are stored with the standard orientation (rows along +y, columns along +x in LPS patient space) and
    ``RescaleIntercept=-1024``, so readers must apply the rescale to get HU back.
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid, study_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    for z in range(volume.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"{prefix}_{z:04d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality, ds.PatientName, ds.PatientID = "CT", "Phantom^Test", "phantom"
        ds.SeriesDate = ds.StudyDate = "20260101"
        ds.InstanceNumber = z + 1
        ds.SeriesNumber, ds.SeriesDescription = series_number, description
        ds.ImagePositionPatient = [0.0, 0.0, float(z * spacing[2])]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # row spacing (y), column spacing (x)
        ds.SliceThickness = float(spacing[2])
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        stored = (volume[:, :, z].T.astype(np.int32) + 1024).astype(np.int16)  # rows = y, columns = x
        ds.PixelData = np.ascontiguousarray(stored).tobytes()
        ds.save_as(folder / f"{prefix}_{z:04d}.dcm", enforce_file_format=True)
    return folder
