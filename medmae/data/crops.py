"""Crop placement and extraction, shared by the WebDataset (in-memory volume) and Zarr (on-disk array) pipelines.

Placement is decided from the shape and metadata alone, so a Zarr crop reads only the chunks it touches.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["crop_starts", "read_crop", "random_resized_crop"]


def _start_for(size: int, roi: int, rng: np.random.Generator, center: int | None) -> int:
    if size <= roi:  # smaller than the ROI: centre it and pad both sides
        return (size - roi) // 2
    if center is None:
        return int(rng.integers(0, size - roi + 1))
    return int(np.clip(center - roi // 2, 0, size - roi))  # like MONAI's correct_crop_centers


def crop_starts(
    spatial_shape: Sequence[int],
    roi: Sequence[int],
    n: int,
    rng: np.random.Generator,
    fg_points: Sequence[Sequence[int]] | None = None,
    pos_fraction: float = 0.0,
) -> list[tuple[int, ...]]:
    """``n`` crop origins: uniform, or centred on a foreground point with probability ``pos_fraction``.

    ``fg_points`` are foreground voxel coordinates (the converter stores a uniform sample of them); without any,
    every crop is uniform. Negative crops are uniform over the volume, which lands on background for the small
    structures of medical labels (MONAI samples background voxels exactly; the difference is the rare overlap).
    """
    starts = []
    for _ in range(n):
        center = None
        if fg_points is not None and len(fg_points) and rng.random() < pos_fraction:
            center = fg_points[int(rng.integers(len(fg_points)))]
        starts.append(
            tuple(
                _start_for(s, r, rng, None if center is None else int(center[d]))
                for d, (s, r) in enumerate(zip(spatial_shape, roi))
            )
        )
    return starts


def read_crop(array, start: Sequence[int], roi: Sequence[int], lead: int = 1, pad_value: float = 0.0) -> np.ndarray:
    """``array[..., start:start+roi]`` over the last ``len(roi)`` dims, zero-padded where the box leaves the array.

    ``array`` is anything sliceable with numpy semantics (ndarray, zarr.Array); only the box is read.
    """
    spatial = array.shape[lead:]
    read, pad = [], []
    for s, r, size in zip(start, roi, spatial):
        lo, hi = max(s, 0), min(s + r, size)
        read.append(slice(lo, hi))
        pad.append((lo - s, s + r - hi))
    out = np.asarray(array[(slice(None),) * lead + tuple(read)])
    if any(p != (0, 0) for p in pad):
        out = np.pad(out, [(0, 0)] * lead + pad, constant_values=pad_value)
    return out


def random_resized_crop(
    image: np.ndarray, roi: Sequence[int], rng: np.random.Generator, min_scale: float, ratio=(3 / 4, 4 / 3)
) -> torch.Tensor:
    """torchvision-style RandomResizedCrop of a ``(C, H, W)`` image to ``roi``: area in [min_scale, 1] of the
    image, log-uniform aspect ratio; bilinear with antialiasing. Returns float32 ``(C, *roi)``."""
    _, h, w = image.shape
    area = h * w
    box = (0, 0, h, w)
    for _ in range(10):
        target = area * rng.uniform(min_scale, 1.0)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        ch, cw = int(round(np.sqrt(target / aspect))), int(round(np.sqrt(target * aspect)))
        if 0 < ch <= h and 0 < cw <= w:
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            box = (top, left, ch, cw)
            break
    top, left, ch, cw = box
    patch = torch.from_numpy(np.ascontiguousarray(image[:, top : top + ch, left : left + cw], dtype=np.float32))
    return F.interpolate(patch[None], size=tuple(roi), mode="bilinear", antialias=True, align_corners=False)[0]
