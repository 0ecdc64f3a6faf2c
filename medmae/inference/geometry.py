"""Prediction's preprocessing and its inverse.

Forward: the converter's own reader, checks and ``transform`` with the options recorded in the model file, so a
prediction sees exactly what training saw. Inverse: a label volume on the stored grid goes back onto the source
grid — uncrop into the resampled grid, nearest-neighbour resampling onto the reoriented source grid, then the
inverse flips/transposes of the RAS reorientation.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

from medmae.data.convert.options import ConvertOptions
from medmae.data.convert.preprocess import Geometry, check_image, read_image, transform

__all__ = ["options_from_preprocessing", "load_and_preprocess", "restore_geometry"]

log = logging.getLogger(__name__)


def options_from_preprocessing(pre: dict[str, Any]) -> ConvertOptions:
    """The ``ConvertOptions`` that produced a manifest's ``preprocessing`` dict.

    A key this version does not know (a model from a newer converter) is an error: ignoring it would silently feed
    the model other voxels than it was trained on.
    """
    opts = ConvertOptions(
        spatial_dims=pre["spatial_dims"],
        preset=pre["preset"],
        ct_window=tuple(pre.get("ct_window") or ConvertOptions.ct_window),
        spacing=tuple(pre["spacing"]) if pre.get("spacing") else None,
        reorient=pre.get("orientation") == "RAS",
        crop_foreground=bool(pre["crop_foreground"]),
        fg_margin=pre.get("fg_margin") or 0,
        image_dtype=pre["image_dtype"],
        channels=pre.get("channels"),
    )
    unknown = sorted(set(pre) - set(opts.preprocessing()))
    if unknown:
        raise ValueError(f"preprocessing: unknown keys {unknown}; this medmae cannot repeat that preprocessing")
    if pre.get("orientation") not in (None, "RAS"):
        raise ValueError(f"preprocessing: orientation {pre['orientation']!r} is not supported (RAS or none)")
    return opts


def load_and_preprocess(path: str, opts: ConvertOptions, channels: int) -> tuple[np.ndarray, Geometry, np.ndarray]:
    """Read ``path`` and preprocess it as the converter did -> (float32 ``(C, *S)`` image, geometry, source affine).

    Raises ``SampleError`` naming the file for unreadable inputs, a wrong channel count or empty / non-finite data.
    """
    spatial_dims = opts.spatial_dims
    assert spatial_dims is not None, "options_from_preprocessing always sets spatial_dims"
    image, affine = read_image(path, spatial_dims)
    check_image(image, channels, path)
    image, _, _, geometry = transform(image, affine, opts, spatial_dims, where=path)
    # The stored dtype (float16 by default) is what training read; going through it reproduces its rounding.
    return image.astype(np.float32), geometry, affine


def _resample_nearest(
    label: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray, dst_shape: tuple
) -> np.ndarray:
    """Nearest-neighbour resampling of a label volume between two grids given by their affines (MONAI, as the
    converter's forward ``Spacing``, so both directions share one convention)."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    t = MetaTensor(
        torch.from_numpy(np.ascontiguousarray(label[None], dtype=np.float32)), affine=torch.from_numpy(src_affine)
    )
    out = SpatialResample(mode="nearest", padding_mode="border", dtype=torch.float32)(
        t, dst_affine=torch.from_numpy(dst_affine), spatial_size=dst_shape
    )
    return np.rint(out.numpy()[0]).astype(label.dtype)


def restore_geometry(label: np.ndarray, geometry: Geometry) -> np.ndarray:
    """A label volume on the stored grid ``(*S)`` -> the same labels on the source grid ``geometry.source_shape``."""
    g = geometry
    if g.box is not None:
        full = np.zeros(g.resampled_shape, dtype=label.dtype)
        full[g.box] = label
        label = full
    if label.shape != tuple(g.resampled_shape):
        raise AssertionError(f"label shape {label.shape} does not match the stored grid {g.resampled_shape}")
    if g.resampled_shape != g.oriented_shape or not np.allclose(g.resampled_affine, g.oriented_affine):
        label = _resample_nearest(label, g.resampled_affine, g.oriented_affine, g.oriented_shape)
    if g.reoriented:
        back = ornt_transform(axcodes2ornt("RAS"), io_orientation(g.source_affine))
        label = apply_orientation(label, back)
    assert label.shape == tuple(g.source_shape), f"restored {label.shape}, source {g.source_shape}"
    return np.ascontiguousarray(label)
