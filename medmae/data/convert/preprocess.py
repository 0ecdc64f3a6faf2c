"""Check one sample read by ``readers.read_image`` and preprocess it for storage.

Every problem a user's data can have raises ``SampleError`` with a reason code; anything else is a bug.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass

import numpy as np
from nibabel.orientations import (
    aff2axcodes,
    apply_orientation,
    axcodes2ornt,
    inv_ornt_aff,
    io_orientation,
    ornt_transform,
)

from medmae.data.convert.options import ConvertOptions, SampleError
from medmae.data.convert.readers import read_image
from medmae.data.convert.sources import SampleSpec

__all__ = [
    "Geometry",
    "Prepared",
    "check_image",
    "checksum",
    "foreground_box",
    "prepare",
    "read_image",
    "read_sample",
    "transform",
]


@dataclass
class Prepared:
    key: str
    image: np.ndarray
    """(C, *S) in the storage dtype."""
    label: np.ndarray | None
    """(*S) uint8/uint16 segmentation, or (K,) float32 classification target."""
    meta: dict
    """Everything written next to the arrays (sample .json / Zarr attributes)."""


@dataclass
class Geometry:
    """How ``transform`` moved an image off its source grid; prediction uses it to put labels back on that grid."""

    source_shape: tuple[int, ...]
    source_affine: np.ndarray
    reoriented: bool
    """Axes were flipped/permuted to RAS (the ornt follows from ``source_affine``)."""
    oriented_shape: tuple[int, ...]
    oriented_affine: np.ndarray
    """After reorientation, before resampling."""
    resampled_shape: tuple[int, ...]
    resampled_affine: np.ndarray
    """After resampling, before the foreground crop (equal to the oriented grid without resampling)."""
    box: tuple[slice, ...] | None
    """Foreground crop inside the resampled grid."""


def checksum(image: np.ndarray, label: np.ndarray | None) -> str:
    """sha256 of the array values in Fortran (first-axis-fastest) order, whatever the memory layout.

    NIfTI and ITK volumes arrive Fortran-ordered and are stored that way (``.npy`` records the order), so hashing
    them costs no copy; Zarr reads come back C-ordered and pay a copy, at ``--verify`` time only.
    """
    h = hashlib.sha256()
    for a in (image, label):
        if a is not None:
            h.update(np.ravel(a, order="F").view(np.uint8).data)
    return h.hexdigest()


def _check_finite_nonempty(image: np.ndarray, where: str) -> None:
    if image.size == 0 or min(image.shape) == 0:
        raise SampleError("empty", f"{where}: empty volume, shape {image.shape}")
    if image.dtype.kind in "fc" and not np.isfinite(image).all():  # integers are always finite
        raise SampleError("non_finite", f"{where}: {int(np.size(image) - np.isfinite(image).sum())} NaN/inf voxels")
    if image.min() == image.max():
        raise SampleError("empty", f"{where}: every voxel equals {image.flat[0]} (no content)")


def _geometry_close(a: np.ndarray, b: np.ndarray) -> bool:
    tol = 1e-3 * max(1.0, float(np.abs(a[:-1, :-1]).max()))
    return a.shape == b.shape and bool(np.allclose(a, b, atol=max(tol, 1e-3)))


def _read_label(
    spec: SampleSpec, image_shape: tuple, image_affine: np.ndarray, spatial_dims: int, num_labels: int | None
) -> np.ndarray:
    assert spec.label is not None, "called for labelled samples only"
    label, affine = read_image(spec.label, spatial_dims)
    if label.shape[0] != 1:
        raise SampleError("label_mismatch", f"{spec.label}: label has {label.shape[0]} channels, expected 1")
    label = label[0]
    if label.shape != tuple(image_shape):
        raise SampleError(
            "label_mismatch", f"{spec.label}: label shape {label.shape} != image shape {tuple(image_shape)}"
        )
    if not _geometry_close(affine, image_affine):
        raise SampleError(
            "label_mismatch",
            f"{spec.label}: label affine differs from the image's "
            f"(label {np.round(affine, 3).tolist()}, image {np.round(image_affine, 3).tolist()})",
        )
    if label.dtype.kind == "f" and (not np.isfinite(label).all() or not np.array_equal(label, np.round(label))):
        raise SampleError("label_not_integer", f"{spec.label}: label holds non-integer values")
    if label.min() < 0 or label.max() > 65535:
        raise SampleError(
            "label_not_integer", f"{spec.label}: label values must be in 0..65535, got {label.min()}..{label.max()}"
        )
    if num_labels is not None and label.max() >= num_labels:
        raise SampleError(
            "label_out_of_range",
            f"{spec.label}: label value {int(label.max())} has no name "
            f"(the datalist's 'labels' name 0..{num_labels - 1})",
        )
    return label


def _reorient(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(C, *S)`` array to RAS axis order with flips and transposes (views, no copy), and its new affine.

    The same nibabel orientation arithmetic MONAI's ``Orientation`` uses, without a float copy of the volume.
    """
    ornt = ornt_transform(io_orientation(affine), axcodes2ornt("RAS"))
    if (ornt == [[0, 1], [1, 1], [2, 1]]).all():
        return array, affine
    moved = apply_orientation(np.moveaxis(array, 0, -1), ornt)
    return np.moveaxis(moved, -1, 0), affine @ inv_ornt_aff(ornt, array.shape[1:])


def _resample(image: np.ndarray, label: np.ndarray | None, affine: np.ndarray, spacing: tuple[float, ...]):
    """Resampling to ``spacing`` with MONAI (image linear, label nearest); returns arrays and the new affine."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Spacing

    def run(arr: np.ndarray, mode: str) -> MetaTensor:
        t = MetaTensor(torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)), affine=torch.from_numpy(affine))
        return Spacing(pixdim=spacing, mode=mode, dtype=torch.float32)(t)

    img_t = run(image, "bilinear")
    new_affine = img_t.affine.numpy().astype(np.float64)
    lab = None
    if label is not None:
        lab = np.rint(run(label[None], "nearest").numpy()[0])
        assert lab.shape == img_t.shape[1:], "image and label resampled to different grids"
    return img_t.numpy(), lab, new_affine


def _intensity(image: np.ndarray, opts: ConvertOptions) -> np.ndarray:
    if opts.preset == "ct":  # in place: the float32 image is already this function's own copy
        lo, hi = opts.ct_window
        np.clip(image, lo, hi, out=image)
        image -= lo
        image *= 1.0 / (hi - lo)
        return image
    if opts.preset == "mri":
        out = image.copy()
        for c in range(image.shape[0]):
            nz = image[c] != 0
            if nz.any():
                mean, std = image[c][nz].mean(), image[c][nz].std()
                out[c][nz] = (image[c][nz] - mean) / (std if std > 0 else 1.0)
        return out
    if opts.preset == "xray":
        lo, hi = image.min(), image.max()
        return (image - lo) / (hi - lo)
    return image


def _to_storage_dtype(image: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float16":  # torch converts with F16C, twice numpy's speed; both keep the memory order
        import torch

        return torch.from_numpy(image).to(torch.float16).numpy()
    return image.astype(dtype, order="K", copy=False)


def foreground_box(image: np.ndarray, margin: int, floor: float | None) -> tuple[slice, ...] | None:
    """Box around the voxels above each channel's background level, on raw (not yet normalised) intensities.

    The background is the channel minimum, or ``floor`` when higher (the ct preset's window low: air inside the
    field of view is background there, as it is once clipped). Normalisation cannot serve: the mri z-score makes
    dark tissue more negative than the zero background, so the minimum no longer marks the background.
    """
    level = image.min(axis=tuple(range(1, image.ndim)), keepdims=True)
    if floor is not None:
        level = np.maximum(level, floor)
    fg = (image > level).any(axis=0)
    if not fg.any():
        return None
    box = []
    for d in range(fg.ndim):
        nz = np.flatnonzero(fg.any(axis=tuple(i for i in range(fg.ndim) if i != d)))
        box.append(slice(max(0, nz[0] - margin), min(fg.shape[d], nz[-1] + 1 + margin)))
    return tuple(box)


def _fg_points(label: np.ndarray, n: int, key: str, seed: int) -> list[list[int]]:
    fortran = label.flags.f_contiguous and not label.flags.c_contiguous
    src = label.T if fortran else label  # a C-ordered view: flatnonzero then needs no copy
    idx = np.flatnonzero(src)
    if idx.size == 0 or n == 0:
        return []
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    pick = idx[np.sort(rng.choice(idx.size, size=min(n, idx.size), replace=False))]
    coords = np.unravel_index(pick, src.shape)
    return np.stack(coords[::-1] if fortran else coords, axis=1).tolist()


def check_image(image: np.ndarray, channels: int, where: str) -> None:
    """``SampleError`` unless ``image`` ``(C, *S)`` has ``channels`` channels, no spatial size of 1 (a slice is not a
    volume: random 3-D crops of it are padding), content and only finite values."""
    if image.shape[0] != channels:
        raise SampleError("wrong_channels", f"{where}: {image.shape[0]} channel(s), expected {channels}")
    if 1 in image.shape[1:]:
        raise SampleError("degenerate_shape", f"{where}: spatial shape {list(image.shape[1:])} has a size of 1")
    _check_finite_nonempty(image, where)


def transform(
    image: np.ndarray,
    affine: np.ndarray,
    opts: ConvertOptions,
    spatial_dims: int,
    label: np.ndarray | None = None,
    where: str = "",
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, Geometry]:
    """Reorient, resample, intensity preset, crop and cast a checked ``(C, *S)`` image (and its ``(*S)`` label).

    The one definition of the stored voxels: the converter and prediction both call it. Returns the image in the
    storage dtype, the label (nearest-resampled), the final affine and the ``Geometry`` to undo it.
    """
    source_shape, source_affine = tuple(image.shape[1:]), affine
    reoriented = spatial_dims == 3 and opts.reorient
    if reoriented:
        image, new_affine = _reorient(image, affine)
        label = _reorient(label[None], affine)[0][0] if label is not None else None
        affine = new_affine
    oriented_shape, oriented_affine = tuple(image.shape[1:]), affine
    # Memory order is kept as read (Fortran for NIfTI/ITK): a transposing copy would cost more than the decode.
    image = image.astype(np.float32, order="K")
    if spatial_dims == 3 and opts.spacing is not None:
        image, label, affine = _resample(image, label, affine, opts.spacing)
    resampled_shape, resampled_affine = tuple(image.shape[1:]), affine
    box = None
    if opts.crop_foreground:
        box = foreground_box(image, opts.fg_margin, opts.ct_window[0] if opts.preset == "ct" else None)
        if box is None:
            raise SampleError("empty", f"{where}: no voxel above the background level, nothing to crop to")
    # Normalised over the whole grid, then cropped: the presets' statistics do not depend on the crop.
    image = _intensity(image, opts)
    if box is not None:
        image = image[(slice(None), *box)]
        label = label[box] if label is not None else None
        affine = affine.copy()
        affine[:-1, -1] += affine[:-1, :-1] @ np.array([s.start for s in box], dtype=np.float64)
    peak = max(float(image.max()), -float(image.min())) if opts.preset in ("none", "mri") else 1.0
    if opts.image_dtype == "float16" and peak > 65000:
        raise SampleError(
            "float16_overflow",
            f"{where}: values up to {peak:.0f} overflow float16; use an intensity preset or --image-dtype float32",
        )
    image = _to_storage_dtype(image, opts.image_dtype)
    geometry = Geometry(
        source_shape, source_affine, reoriented, oriented_shape, oriented_affine, resampled_shape, resampled_affine, box
    )
    return image, label, affine, geometry


def read_sample(
    spec: SampleSpec, spatial_dims: int, channels: int, num_labels: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Read and check ``spec``'s channels and label -> (``(C, *S)`` image in the source dtype, its RAS affine,
    ``(*S)`` label or None); ``SampleError`` for bad input. What the converter and the planner both read.

    ``num_labels``: the number of named label values (the datalist's ``labels``); a larger value is an error.
    """
    if spec.error is not None:
        raise SampleError(*spec.error)
    parts = [read_image(p, spatial_dims, spec.files) for p in spec.images]
    affine = parts[0][1]
    for p, (arr, aff) in zip(spec.images[1:], parts[1:]):
        if arr.shape[1:] != parts[0][0].shape[1:] or not _geometry_close(aff, affine):
            raise SampleError("channel_mismatch", f"{p}: channel geometry differs from {spec.images[0]}")
    image = np.concatenate([a for a, _ in parts]) if len(parts) > 1 else parts[0][0]  # source dtype until checked
    check_image(image, channels, spec.images[0])
    label = _read_label(spec, image.shape[1:], affine, spatial_dims, num_labels) if spec.label else None
    return image, affine, label


def prepare(
    spec: SampleSpec, opts: ConvertOptions, spatial_dims: int, channels: int, num_labels: int | None = None
) -> Prepared:
    """Read, check and preprocess ``spec``; raise ``SampleError`` for bad input (see ``read_sample``)."""
    image, affine, label = read_sample(spec, spatial_dims, channels, num_labels)
    original_shape, original_affine = list(image.shape[1:]), affine
    image, label, affine, _ = transform(image, affine, opts, spatial_dims, label, spec.images[0])
    if min(image.shape[1:]) < opts.min_size:
        raise SampleError(
            "degenerate_shape",
            f"{spec.images[0]}: spatial shape {list(image.shape[1:])} after preprocessing (source {original_shape}) "
            f"is under --min-size {opts.min_size}",
        )
    fg: list = []
    if label is not None:
        label = label.astype(np.uint8 if label.max() < 256 else np.uint16, order="K", copy=False)
        fg = _fg_points(label, opts.fg_points, spec.key, opts.seed)
    elif spec.target is not None:
        label = np.asarray(spec.target, dtype=np.float32)
    spacing = np.sqrt((affine[:-1, :-1] ** 2).sum(axis=0))
    meta = {
        "key": spec.key,
        "split": spec.split,
        **({"group": spec.group} if spec.group else {}),  # the patient: selection splits keep patients whole
        "shape": list(image.shape),
        "dtype": str(image.dtype),
        "label_shape": list(label.shape) if label is not None else None,
        "label_dtype": str(label.dtype) if label is not None else None,
        "label_max": int(label.max()) if label is not None and label.ndim > 1 else None,
        "spacing": [round(float(s), 6) for s in spacing],
        "affine": np.round(affine, 6).tolist(),
        "orientation": "".join(aff2axcodes(affine)) if spatial_dims == 3 else None,
        "original_shape": original_shape,
        "original_spacing": [round(float(s), 6) for s in np.sqrt((original_affine[:-1, :-1] ** 2).sum(axis=0))],
        "original_affine": np.round(original_affine, 6).tolist(),
        "source": {"image": spec.images, "label": spec.label, **({"series": spec.series} if spec.series else {})},
        "checksum": checksum(image, label),
        "fg_points": fg,
    }
    return Prepared(spec.key, image, label, meta)
