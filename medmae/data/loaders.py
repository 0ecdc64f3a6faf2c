"""The loaders the trainer calls: ``build_train_loader`` and ``build_val_loader`` over a converted dataset."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from medmae.data.config import DataConfig
from medmae.data.convert.manifest import join_url, read_manifest
from medmae.data.convert.writers import decode_npy
from medmae.data.pipeline import SkipCounters
from medmae.data.wds_pipeline import WdsTrainStream, read_members
from medmae.data.zarr_pipeline import ZarrTrainStream, open_zarr

__all__ = ["TrainLoader", "build_train_loader", "build_val_loader", "train_keys"]
log = logging.getLogger(__name__)


def _load_manifest(cfg: DataConfig) -> dict:
    if not cfg.path:
        raise ValueError("data.path: not set; point it at a dataset converted by tools/to_wds.py")
    manifest = read_manifest(cfg.path, cfg.storage_options)
    if manifest["format"] != cfg.format:
        raise ValueError(f"data.format: '{cfg.format}' but {cfg.path} holds a '{manifest['format']}' dataset")
    if manifest["spatial_dims"] != cfg.spatial_dims:
        raise ValueError(
            f"data.spatial_dims: {cfg.spatial_dims} but {cfg.path} holds {manifest['spatial_dims']}D samples"
        )
    return manifest


def train_keys(cfg: DataConfig, manifest: dict) -> list[str]:
    """The training volumes used: all, or a ``subset_seed``-chosen subset of ``train_count`` / ``train_fraction``."""
    keys = sorted(s["key"] for s in manifest["samples"] if s["split"] == "train")
    if not keys:
        raise ValueError(f"data.path: {cfg.path} has no training samples")
    n = cfg.train_count if cfg.train_count is not None else max(1, round(cfg.train_fraction * len(keys)))
    if n > len(keys):
        raise ValueError(f"data.train_count: {n} requested but {cfg.path} has {len(keys)} training volumes")
    if n == len(keys):
        return keys
    order = np.random.default_rng(cfg.subset_seed).permutation(len(keys))
    return sorted(keys[i] for i in order[:n])


class TrainLoader:
    """One epoch per ``iter()``: ``len(self)`` batches per rank; each epoch re-seeds the workers (seed, epoch)."""

    def __init__(self, dataset, cfg: DataConfig, num_batches: int, counters: SkipCounters | None):
        self.dataset, self.cfg, self.num_batches, self.counters = dataset, cfg, num_batches, counters
        self.epoch = 0

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        """Start the next ``iter()`` at this epoch (after a resume)."""
        self.epoch = epoch

    @property
    def stats(self) -> dict[str, int]:
        """Corrupt shards and samples skipped so far, over all workers."""
        return self.counters.as_dict() if self.counters else {"corrupt_shards": 0, "corrupt_samples": 0}

    def __iter__(self) -> Iterator[dict]:
        self.dataset.epoch = self.epoch  # copied into the workers, which start with each iter()
        self.epoch += 1  # counted at the start: an epoch cut short still moves the next one to fresh streams
        workers = self.cfg.num_workers
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=workers,
            prefetch_factor=self.cfg.prefetch_factor if workers else None,
            # Its own generator: starting an iterator draws a base seed, which from the global generator would shift
            # the trainer's stream (MAE masks) differently in a resumed run than in an uninterrupted one.
            generator=torch.Generator().manual_seed(self.dataset.seed),
        )
        it = iter(loader)
        try:
            for _ in range(self.num_batches):
                yield next(it)
        finally:
            del it  # shuts the workers down; the next epoch starts fresh streams


def build_train_loader(
    cfg: DataConfig, *, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0, with_labels: bool = False
) -> TrainLoader:
    """Training batches ``{"image": (B, C, *roi) float32, "label": (B, 1, *roi) int64 | (B, K) float32}``."""
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: must be in [0, world_size={world_size}), got {rank}")
    manifest = _load_manifest(cfg)
    keys = train_keys(cfg, manifest)
    num_batches = cfg.samples_per_epoch // (batch_size * world_size)
    if num_batches < 1:
        raise ValueError(
            f"data.samples_per_epoch: {cfg.samples_per_epoch} is less than one batch per rank "
            f"({batch_size} x {world_size} ranks)"
        )
    if with_labels:
        unlabelled = [s["key"] for s in manifest["samples"] if s["key"] in set(keys) and not s.get("label_shape")]
        if unlabelled:
            raise ValueError(
                f"data.path: with_labels but {len(unlabelled)} training samples have no label (e.g. {unlabelled[0]})"
            )
    if cfg.crop == "pos_neg" and manifest["task"] != "segmentation":
        raise ValueError(f"data.crop: 'pos_neg' needs a segmentation dataset, {cfg.path} is '{manifest['task']}'")
    common: dict[str, Any] = dict(
        batch_size=batch_size, rank=rank, world_size=world_size, seed=seed, with_labels=with_labels
    )
    if cfg.format == "wds":
        counters = SkipCounters()
        dataset = WdsTrainStream(cfg, manifest, set(keys), counters=counters, **common)
    else:
        counters = None
        dataset = ZarrTrainStream(cfg, manifest, keys, **common)
    log.info(
        "train loader: %s, %d volumes, %d batches of %d per rank and epoch, %d workers",
        cfg.format,
        len(keys),
        num_batches,
        batch_size,
        cfg.num_workers,
    )
    return TrainLoader(dataset, cfg, num_batches, counters)


class ValDataset(Dataset):
    """Whole validation volumes of one rank, in manifest order; random access into shards or Zarr."""

    def __init__(self, cfg: DataConfig, manifest: dict, samples: list[dict]):
        self.cfg, self.samples, self.task = cfg, samples, manifest["task"]
        self._root: Any = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        if self.cfg.format == "wds":
            raw = read_members(join_url(self.cfg.path, s["shard"]), s["members"], self.cfg.storage_options)
            image = decode_npy(raw["image.npy"])
            label = decode_npy(raw["label.npy"]) if "label.npy" in raw else None
            meta = json.loads(raw["json"])
        else:
            if self._root is None:  # opened lazily, inside the worker process
                self._root = open_zarr(self.cfg.path, self.cfg.storage_options)
            group = self._root[f"{s['split']}/{s['key']}"]
            image = group["image"][...]
            label = group["label"][...] if "label" in group else None
            meta = dict(group.attrs)
        meta.pop("fg_points", None)
        out = {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None],
            "key": s["key"],
            "meta": meta,
        }
        if label is not None:
            if self.task == "segmentation":
                out["label"] = torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64))[None, None]
            else:
                out["label"] = torch.from_numpy(label.astype(np.float32))[None]
        return out


def build_val_loader(cfg: DataConfig, *, rank: int = 0, world_size: int = 1, split: str = "validation") -> DataLoader:
    """Every volume of ``split`` (``validation``, or ``test`` when the dataset has an official test list) exactly once
    across ranks (rank r takes volumes r, r + world_size, ...), whole, batch size 1:
    ``{"image": (1, C, *S), "label": (1, 1, *S) int64 if present, "key": str, "meta": dict}``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: must be in [0, world_size={world_size}), got {rank}")
    manifest = _load_manifest(cfg)
    val = sorted((s for s in manifest["samples"] if s["split"] == split), key=lambda s: s["key"])
    mine = val[rank::world_size]
    workers = min(cfg.num_workers, len(mine))
    return DataLoader(ValDataset(cfg, manifest, mine), batch_size=None, shuffle=False, num_workers=workers)
