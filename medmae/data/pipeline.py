"""The part of the training pipeline both storage formats share: crops of a volume, MONAI augmentation, batching,
per-worker seeding, and the skip counters."""

from __future__ import annotations

import multiprocessing as mp
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from medmae.data.config import DataConfig
from medmae.data.crops import crop_starts, random_resized_crop, read_crop

__all__ = ["SkipCounters", "WorkerRng", "worker_rng", "Cropper", "batches"]


class SkipCounters:
    """Counts of corrupt shards and samples skipped, shared by all DataLoader workers of one loader."""

    def __init__(self) -> None:
        ctx = mp.get_context()
        self._shards = ctx.Value("l", 0)
        self._samples = ctx.Value("l", 0)

    def add(self, shards: int = 0, samples: int = 0) -> None:
        with self._shards.get_lock():
            self._shards.value += shards
            self._samples.value += samples

    def as_dict(self) -> dict[str, int]:
        return {"corrupt_shards": self._shards.value, "corrupt_samples": self._samples.value}


@dataclass
class WorkerRng:
    worker: int
    num_workers: int
    np: np.random.Generator
    py: random.Random
    seed: int


def worker_rng(seed: int, epoch: int, rank: int) -> WorkerRng:
    """Generators for this DataLoader worker, distinct per (seed, epoch, rank, worker) and reproducible."""
    info = torch.utils.data.get_worker_info()
    wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
    ss = np.random.SeedSequence([seed, epoch, rank, wid])
    sub = int(ss.generate_state(1)[0])
    return WorkerRng(wid, nw, np.random.default_rng(ss), random.Random(sub), sub)


def build_augment(cfg: DataConfig, spatial_label: bool, seed: int):
    """MONAI dictionary transforms applied to each crop (label follows the spatial ones); None when all are off."""
    from monai.transforms import Compose, RandFlipd, RandRotate90d, RandScaleIntensityd, RandShiftIntensityd

    keys = ["image", "label"] if spatial_label else ["image"]
    ts = []
    if cfg.flip_prob > 0:
        ts += [RandFlipd(keys, prob=cfg.flip_prob, spatial_axis=d) for d in range(cfg.spatial_dims)]
    if cfg.rot90_prob > 0 and cfg.roi_size[0] == cfg.roi_size[1]:
        ts.append(RandRotate90d(keys, prob=cfg.rot90_prob, max_k=3, spatial_axes=(0, 1)))
    if cfg.intensity_shift > 0:
        ts.append(RandShiftIntensityd("image", offsets=cfg.intensity_shift, prob=cfg.intensity_prob))
    if cfg.intensity_scale > 0:
        ts.append(RandScaleIntensityd("image", factors=cfg.intensity_scale, prob=cfg.intensity_prob))
    if not ts:
        return None
    return Compose(ts).set_random_state(seed=seed % 2**32)


def _plain(x) -> torch.Tensor:
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


class Cropper:
    """Cuts ``crops_per_volume`` crops (+ labels) from one volume, in memory or on disk, and augments them."""

    def __init__(self, cfg: DataConfig, task: str, with_labels: bool, rng: WorkerRng):
        self.cfg, self.rng = cfg, rng
        self.with_labels = with_labels
        self.segmentation = task == "segmentation"
        self.augment = build_augment(cfg, with_labels and self.segmentation, rng.seed)

    def __call__(self, image, label, meta: dict) -> Iterator[dict]:
        """``image`` (C, *S) and ``label`` (*S) or (K,) may be ndarrays or zarr arrays; yields tensor dicts."""
        cfg = self.cfg
        if cfg.crop == "resized":
            crops = [
                {"image": random_resized_crop(np.asarray(image), cfg.roi_size, self.rng.np, cfg.resized_min_scale)}
                for _ in range(cfg.crops_per_volume)
            ]
            if self.with_labels:
                for c in crops:
                    c["label"] = torch.as_tensor(np.asarray(label), dtype=torch.float32)
        else:
            fg = meta.get("fg_points") if cfg.crop == "pos_neg" else None
            starts = crop_starts(image.shape[1:], cfg.roi_size, cfg.crops_per_volume, self.rng.np, fg, cfg.pos_fraction)
            crops = []
            for start in starts:
                c = {"image": torch.from_numpy(read_crop(image, start, cfg.roi_size).astype(np.float32))}
                if self.with_labels:
                    if self.segmentation:
                        lab = read_crop(label, start, cfg.roi_size, lead=0)
                        c["label"] = torch.from_numpy(lab.astype(np.int64))[None]
                    else:
                        c["label"] = torch.as_tensor(np.asarray(label), dtype=torch.float32)
                crops.append(c)
        for c in crops:
            if self.augment is not None:
                c = {k: _plain(v) for k, v in self.augment(c).items()}
            yield c


def batches(samples: Iterable[dict], batch_size: int) -> Iterator[dict]:
    """Stack consecutive crops into ``{"image": (B, C, *roi), "label": ...}``; a trailing partial batch is dropped."""
    buf = []
    for s in samples:
        buf.append(s)
        if len(buf) == batch_size:
            yield {k: torch.stack([b[k] for b in buf]) for k in buf[0]}
            buf = []
