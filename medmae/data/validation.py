"""Validation (and test) volumes, whole: ``build_val_loader`` over a converted dataset, every volume once across
ranks, read through the same storage readers as training (``medmae.data.storage``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from medmae.data.config import SELECTION_SPLIT, DataConfig
from medmae.data.convert.manifest import join_url, read_manifest
from medmae.data.sources import selection_keys
from medmae.data.storage import decode_sample, open_url, open_zarr, read_wds_sample, read_zarr_sample

__all__ = ["build_val_loader", "read_dataset_manifest"]


def read_dataset_manifest(cfg: DataConfig) -> dict:
    """The manifest of ``data.path``, checked against the format and dimensionality the config expects."""
    if not cfg.path:
        raise ValueError("data.path: not set; point it at a dataset converted by tools/to_wds.py")
    manifest = read_manifest(cfg.path, cfg.storage_options)
    cfg.check_manifest(cfg.path, manifest)
    return manifest


class ValDataset(Dataset):
    """Whole volumes of one rank, in manifest order; random access into shards or Zarr."""

    def __init__(self, cfg: DataConfig, manifest: dict, samples: list[dict]):
        self.cfg, self.samples, self.task = cfg, samples, manifest["task"]
        self._root: Any = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        if self.cfg.format == "wds":
            with open_url(join_url(self.cfg.path, s["shard"]), self.cfg.storage_options) as f:
                sample = decode_sample(s["key"], read_wds_sample(f, s["key"], s["members"]))
        else:
            if self._root is None:  # opened lazily, inside the worker process
                self._root = open_zarr(self.cfg.path, self.cfg.storage_options)
            sample = read_zarr_sample(self._root, s["split"], s["key"])
        meta = sample["meta"]
        meta.pop("fg_points", None)
        out = {
            "image": torch.from_numpy(np.array(sample["image"], dtype=np.float32))[None],
            "key": s["key"],
            "meta": meta,
        }
        label = sample.get("label")
        if label is not None:
            if self.task == "segmentation":
                out["label"] = torch.from_numpy(np.array(label, dtype=np.int64))[None, None]
            else:
                out["label"] = torch.from_numpy(np.array(label, dtype=np.float32))[None]
        return out


def build_val_loader(cfg: DataConfig, *, rank: int = 0, world_size: int = 1, split: str = "validation") -> DataLoader:
    """Every volume of ``split`` exactly once across ranks (rank r takes volumes r, r + world_size, ...), whole,
    batch size 1: ``{"image": (1, C, *S), "label": (1, 1, *S) int64 if present, "key": str, "meta": dict}``.

    ``split``: ``validation``, ``test`` (a dataset with an official test list), or ``selection``: the training
    volumes ``data.select_count`` / ``select_fraction`` carve out (and training leaves alone)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: must be in [0, world_size={world_size}), got {rank}")
    manifest = read_dataset_manifest(cfg)
    if split == SELECTION_SPLIT:
        if not cfg.selects:
            raise ValueError("data.select_count: the selection split is empty (set select_count or select_fraction)")
        chosen = set(selection_keys(cfg, cfg.path, manifest))
        samples = [s for s in manifest["samples"] if s["split"] == "train" and s["key"] in chosen]
    else:
        samples = [s for s in manifest["samples"] if s["split"] == split]
    val = sorted(samples, key=lambda s: s["key"])
    mine = val[rank::world_size]
    workers = min(cfg.num_workers, len(mine))
    return DataLoader(ValDataset(cfg, manifest, mine), batch_size=None, shuffle=False, num_workers=workers)
