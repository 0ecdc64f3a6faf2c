"""Crop and augmentation parameters of a batch, drawn on the host with one numpy generator per rank.

Drawing on the host keeps the device free of synchronisation (the GPU never has to tell the host which crops flip)
and makes the crops a function of the seed alone: the CPU and CUDA paths cut identical batches, and the generator
state in the checkpoint restores the sequence. The distributions are those of the per-crop path:

- positions as ``crops.crop_starts`` (uniform start; with ``pos_neg`` centred on a stored foreground point with
  probability ``pos_fraction``, clipped into the volume); volumes smaller than the ROI are already padded so that
  the only start is the centring one;
- augmentation as ``pipeline.build_augment``'s MONAI transforms: ``RandFlipd`` per spatial axis with ``flip_prob``,
  ``RandRotate90d(max_k=3)`` (k uniform in {1, 2, 3}) in the plane of axes (0, 1) with ``rot90_prob`` when that
  plane of the ROI is square, ``RandShiftIntensityd`` (offset uniform in [-s, s]) then ``RandScaleIntensityd``
  (v * (1 + f), f uniform in [-c, c]), each with ``intensity_prob``;
- ``crop: resized`` boxes as ``crops.random_resized_crop`` (torchvision's 10 tries, else the whole image).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medmae.data.config import DataConfig

__all__ = ["CropParams", "CropSampler", "rng_state", "set_rng_state"]


@dataclass
class CropParams:
    """One batch: the resident slot each crop comes from, where, and how it is augmented (internal 3 axes;
    2D data has a last axis of size 1)."""

    slot: np.ndarray
    """(B,) resident slot of each crop."""
    start: np.ndarray
    """(B, 3) crop origin in the (padded) volume; for ``resized`` the box origin (top, left, 0)."""
    size: np.ndarray | None
    """(B, 2) box height and width for ``resized``; None otherwise."""
    flip: np.ndarray
    """(B, 3) flip along each axis."""
    rot: np.ndarray
    """(B,) quarter turns in the plane of axes (0, 1), 0..3."""
    scale: np.ndarray
    """(B,) intensity: out = image * scale + offset."""
    offset: np.ndarray


def rng_state(rng: np.random.Generator) -> dict:
    """JSON-safe state of a PCG64 generator (its 128-bit integers as hex strings)."""
    st = rng.bit_generator.state
    return {
        "bit_generator": st["bit_generator"],
        "state": hex(st["state"]["state"]),
        "inc": hex(st["state"]["inc"]),
        "has_uint32": st["has_uint32"],
        "uinteger": st["uinteger"],
    }


def set_rng_state(rng: np.random.Generator, state: dict) -> None:
    if state.get("bit_generator") != rng.bit_generator.state["bit_generator"]:
        raise ValueError(f"generator state of a {state.get('bit_generator')}, expected PCG64")
    rng.bit_generator.state = {
        "bit_generator": state["bit_generator"],
        "state": {"state": int(state["state"], 16), "inc": int(state["inc"], 16)},
        "has_uint32": int(state["has_uint32"]),
        "uinteger": int(state["uinteger"]),
    }


class CropSampler:
    """Draws ``CropParams`` for a batch from the resident set's host-side metadata."""

    def __init__(self, cfg: DataConfig, seed: int, rank: int):
        self.cfg = cfg
        self.rng = np.random.default_rng([seed, rank, 2])  # 2: apart from the volume stream's seeds
        roi = list(cfg.roi_size) + [1] * (3 - cfg.spatial_dims)
        self.roi = np.asarray(roi, dtype=np.int64)
        self.rotate = cfg.rot90_prob > 0 and roi[0] == roi[1]

    def _starts(self, shapes: np.ndarray, fg: np.ndarray, nfg: np.ndarray) -> np.ndarray:
        """(B, 3) origins inside volumes of ``shapes`` (B, 3), already padded to at least the ROI."""
        hi = shapes - self.roi
        assert (hi >= 0).all(), "resident volumes are padded to the ROI"
        start = self.rng.integers(0, hi + 1)
        if self.cfg.crop == "pos_neg":
            pos = (self.rng.random(len(shapes)) < self.cfg.pos_fraction) & (nfg > 0)
            j = (self.rng.random(len(shapes)) * nfg).astype(np.int64)
            center = fg[np.arange(len(shapes)), np.minimum(j, np.maximum(nfg - 1, 0))]
            start = np.where(pos[:, None], np.clip(center - self.roi // 2, 0, hi), start)
        return start

    def _boxes(self, shapes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Random resized crop boxes in (H, W) images: area fraction in [min_scale, 1], log-uniform aspect ratio
        in [3/4, 4/3], first of 10 tries that fits, else the whole image."""
        b, tries = len(shapes), 10
        h, w = shapes[:, 0:1].astype(np.float64), shapes[:, 1:2].astype(np.float64)
        target = h * w * self.rng.uniform(self.cfg.resized_min_scale, 1.0, (b, tries))
        aspect = np.exp(self.rng.uniform(np.log(3 / 4), np.log(4 / 3), (b, tries)))
        ch, cw = np.round(np.sqrt(target / aspect)), np.round(np.sqrt(target * aspect))
        ok = (ch > 0) & (ch <= h) & (cw > 0) & (cw <= w)
        first = ok.argmax(axis=1)
        rows = np.arange(b)
        found = ok[rows, first]
        ch = np.where(found, ch[rows, first], h[:, 0]).astype(np.int64)
        cw = np.where(found, cw[rows, first], w[:, 0]).astype(np.int64)
        top = self.rng.integers(0, shapes[:, 0] - ch + 1)
        left = self.rng.integers(0, shapes[:, 1] - cw + 1)
        return np.stack([top, left, np.zeros(b, np.int64)], 1), np.stack([ch, cw], 1)

    def draw(
        self,
        batch: int,
        live: np.ndarray,
        shapes: np.ndarray,
        fg: np.ndarray,
        nfg: np.ndarray,
        probs: np.ndarray | None = None,
    ) -> CropParams:
        """Parameters of ``batch`` crops from the slots ``live`` (uniform over them, or by ``probs``); ``shapes``
        (S, 3), ``fg`` (S, F, 3) and ``nfg`` (S,) are the per-slot tables."""
        cfg, rng = self.cfg, self.rng
        pick = rng.integers(0, len(live), batch) if probs is None else rng.choice(len(live), batch, p=probs)
        slot = live[pick]
        if cfg.crop == "resized":
            start, size = self._boxes(shapes[slot])
        else:
            start, size = self._starts(shapes[slot], fg[slot], nfg[slot]), None
        flip = np.zeros((batch, 3), dtype=bool)
        if cfg.flip_prob > 0:
            flip[:, : cfg.spatial_dims] = rng.random((batch, cfg.spatial_dims)) < cfg.flip_prob
        rot = np.zeros(batch, dtype=np.int64)
        if self.rotate:
            rot = np.where(rng.random(batch) < cfg.rot90_prob, rng.integers(1, 4, batch), 0)
        shift = np.zeros(batch)
        if cfg.intensity_shift > 0:
            on = rng.random(batch) < cfg.intensity_prob
            shift = np.where(on, rng.uniform(-cfg.intensity_shift, cfg.intensity_shift, batch), 0.0)
        factor = np.zeros(batch)
        if cfg.intensity_scale > 0:
            on = rng.random(batch) < cfg.intensity_prob
            factor = np.where(on, rng.uniform(-cfg.intensity_scale, cfg.intensity_scale, batch), 0.0)
        scale = 1.0 + factor  # (v + shift) * (1 + factor), in the order MONAI applies them
        return CropParams(slot, start, size, flip, rot, scale.astype(np.float32), (shift * scale).astype(np.float32))

    def state_dict(self) -> dict:
        return rng_state(self.rng)

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(self.rng, state)
