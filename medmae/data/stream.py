"""The trainer's data: one endless, persistent, checkpointable stream of training batches on the model's device.

Usage (one per rank, built once; it runs across epochs and never restarts its workers)::

    stream = build_train_stream(cfg.data, batch_size=4, rank=rank, world_size=world, seed=cfg.run.seed,
                                with_labels=False, device=torch.device("cuda", local_rank))
    if resumed:
        stream.load_state_dict(saved["data"])       # before the first batch
    for step in range(max_steps):
        batch = next(stream)                        # {"image": (B, C, *roi) float32 on device, ["label"]}
        ...
        if checkpoint_now:
            saved["data"] = stream.state_dict()     # JSON-safe; save one per rank
        if log_now:
            board.scalars(stream.stats(), step, prefix="data/")
    stream.close()

Two crop paths behind the same interface (``data.loader``): ``resident`` (``ResidentStream``: loader workers
decode whole volumes into a resident set on the device, cropped and augmented there in batch) and ``stream``
(``CropStream``: today's per-crop CPU path, run in the workers). ``auto`` takes ``resolve_loader``'s rule.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from medmae.data.config import DataConfig
from medmae.data.pipeline import SkipCounters
from medmae.data.sources import Source, VolumeSource, resolve_sources

__all__ = ["TrainStream", "build_train_stream", "resolve_loader", "resident_budget_bytes"]
log = logging.getLogger(__name__)
STATE_VERSION = 1


def resolve_loader(cfg: DataConfig, device: torch.device) -> str:
    """``data.loader`` with ``auto`` decided: resident, the faster path in every case bench/bench_data.py measured
    (2-core CPU, 2 workers: 96^3 crops of CT volumes 14x today's crops per CPU second; 224^2 random resized crops
    of x-rays 4x, and twice the crops/s on one core that the per-crop path gets from two)."""
    return "resident" if cfg.loader == "auto" else cfg.loader


def resident_budget_bytes(cfg: DataConfig, device: torch.device, local_world_size: int) -> int:
    """``data.resident_gib``, or the default: 25% of the CUDA device's memory (each rank has its own device; the
    model and its activations keep the rest), or on a CPU 25% of the machine's RAM shared by its local ranks."""
    if cfg.resident_gib > 0:
        return int(cfg.resident_gib * 2**30)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 4
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram // 4 // max(1, local_world_size)


def _name(path: str) -> str:
    return PurePosixPath(path.rstrip("/")).name or path


class TrainStream:
    """Endless iterator of batches on ``device``; ``state_dict`` / ``load_state_dict`` / ``stats`` / ``close``.

    Shared machinery: one DataLoader over a ``VolumeSource``-based dataset, created at the first batch (so a
    restored position reaches the workers) and kept for the whole run; items are consumed in a fixed round-robin
    over the workers (tracked here, not left to the DataLoader), which makes the sequence a function of the
    seed and of the per-worker positions saved in ``state_dict``.
    """

    mode = ""

    def __init__(
        self,
        cfg: DataConfig,
        sources: list[Source],
        dataset,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        device: torch.device,
        counters: SkipCounters,
    ):
        self.cfg, self.sources, self.dataset, self.batch_size = cfg, sources, dataset, batch_size
        self.rank, self.world_size, self.seed, self.device, self.counters = rank, world_size, seed, device, counters
        self.num_workers = max(1, cfg.num_workers)
        self.names = self._names()
        self.batches = 0
        self.phase = 0
        self.positions: dict[int, dict] = {}
        self.crops = np.zeros(len(sources), dtype=np.int64)
        self.wait_s = 0.0
        self._it: Any = None
        self.started = False
        self._pending: dict[int, deque] = {w: deque() for w in range(self.num_workers)}
        self._restore: dict | None = None

    def _names(self) -> list[str]:
        names = [_name(s.path) for s in self.sources]
        return [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]

    # ---- items from the workers
    def _start_loader(self) -> None:
        w = self.cfg.num_workers
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=w,
            prefetch_factor=self.cfg.prefetch_factor if w else None,
            pin_memory=self.device.type == "cuda",
            # Its own generator: starting the iterator draws a base seed, which from the global generator would
            # shift the trainer's stream (MAE masks) differently in a resumed run than in an uninterrupted one.
            generator=torch.Generator().manual_seed(self.seed),
        )
        self._it = iter(loader)

    def _pull(self) -> dict:
        t = time.perf_counter()
        assert self._it is not None, "the loader starts at the first batch"
        item = next(self._it)
        self.wait_s += time.perf_counter() - t
        return item

    def _next_item(self) -> dict:
        """The next item in round-robin worker order, buffering what other workers delivered first."""
        w = self.phase
        while not self._pending[w]:
            item = self._pull()
            self._pending[int(item["worker"])].append(item)
        self.phase = (w + 1) % self.num_workers
        item = self._pending[w].popleft()
        self.positions[w] = item["pos"]
        return item

    # ---- checkpoint
    def _common_state(self) -> dict:
        return {
            "version": STATE_VERSION,
            "mode": self.mode,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "batch_size": self.batch_size,
            "datasets": [s.path for s in self.sources],
            "batches": self.batches,
            "phase": self.phase,
            "positions": {str(w): p for w, p in sorted(self.positions.items())},
            "crops": self.crops.tolist(),
        }

    def state_dict(self) -> dict:
        raise NotImplementedError

    def _exact(self, state: dict) -> bool:
        """Whether ``state`` can be continued exactly here (same data, split, mode and batch)."""
        same = all(state[k] == getattr(self, k) for k in ("seed", "rank", "world_size", "num_workers"))
        return same and state["mode"] == self.mode and state["batch_size"] == self.batch_size

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (``state_dict()`` of this rank); must come before the first batch.

        Same datasets and split (seed, rank, world size, workers): each worker continues its shard order where it
        was, exactly so with the same mode and batch size. Another split (an elastic resize): every worker starts
        the epoch after the last one begun. Other datasets: fresh streams. The last two are logged."""
        if self.started:
            raise RuntimeError("load_state_dict: the stream has already started; restore before the first batch")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data state: version {state.get('version')}, this code reads {STATE_VERSION}")
        self.batches = int(state["batches"])
        paths = [s.path for s in self.sources]
        if state["datasets"] != paths:
            log.warning("data state saved for datasets %s, this run reads %s: fresh streams", state["datasets"], paths)
            self._load_extra(state, False)
            return
        self.crops = np.asarray(state["crops"], dtype=np.int64)
        positions = {int(w): p for w, p in state["positions"].items()}
        same_split = all(state[k] == getattr(self, k) for k in ("seed", "rank", "world_size", "num_workers"))
        if same_split:  # the workers read the same shards: each continues where it was
            self.positions, self.phase = positions, int(state["phase"])
            self.dataset.source.start = dict(positions)
        else:
            epochs = [
                max((p["datasets"][d][0] for p in positions.values()), default=-1) + 1 for d in range(len(self.sources))
            ]
            log.warning(
                "data state saved with seed/rank/world_size/num_workers %s; now %s: starting epochs %s",
                [state[k] for k in ("seed", "rank", "world_size", "num_workers")],
                [self.seed, self.rank, self.world_size, self.num_workers],
                epochs,
            )
            self.dataset.source.start = {
                w: {"n": 0, "datasets": [[e, 0, 0] for e in epochs]} for w in range(self.num_workers)
            }
        exact = self._exact(state)
        self._restore = state if exact else None
        self._load_extra(state, exact)

    def _load_extra(self, state: dict, exact: bool) -> None:
        pass

    # ---- reporting
    def stats(self) -> dict[str, float]:
        """Counters for the log and TensorBoard: crops per dataset, skips, time waiting for the workers."""
        out = {f"crops/{n}": float(c) for n, c in zip(self.names, self.crops)}
        out.update({k: float(v) for k, v in self.counters.as_dict().items()})
        out.update(batches=float(self.batches), wait_s=self.wait_s)
        for d, n in enumerate(self.names):
            epochs = [p["datasets"][d][0] for p in self.positions.values()]
            if epochs:
                out[f"epoch/{n}"] = float(max(epochs))
        return out

    def __next__(self) -> dict[str, torch.Tensor]:  # the two crop paths define it
        raise NotImplementedError

    def __iter__(self) -> TrainStream:
        return self

    def close(self) -> None:
        """Stop the loader workers."""
        self._it = None  # the iterator's destructor shuts its workers down

    def __del__(self) -> None:
        self._it = None


def build_train_stream(
    cfg: DataConfig,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    with_labels: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    local_world_size: int | None = None,
) -> TrainStream:
    """The training stream of one rank (see the module docstring). ``image`` arrives as ``dtype`` (float32 by
    default; pass the model's bf16 to save its cast), ``label`` as (B, 1, *roi) int64 (segmentation) or (B, K)
    float32 (classification) when ``with_labels``; all on ``device`` (default: CUDA when present, else CPU)."""
    from medmae.data.crop_stream import CropStream, WorkerCrops
    from medmae.data.resident_stream import build_resident_stream

    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: must be in [0, world_size={world_size}), got {rank}")
    where = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if where.type == "cuda" and where.index is None:
        where = torch.device("cuda", torch.cuda.current_device())
    sources = resolve_sources(cfg, with_labels)
    mode = resolve_loader(cfg, where)
    first = sources[0].manifest
    task = first["task"]
    if with_labels and cfg.crop == "resized" and task == "segmentation":
        raise ValueError("data.crop: 'resized' crops carry no segmentation labels; use random or pos_neg")
    image_dtype = first["preprocessing"].get("image_dtype") or "float16"
    counters = SkipCounters()
    common: dict[str, Any] = dict(
        rank=rank, world_size=world_size, seed=seed, with_labels=with_labels, counters=counters
    )
    kw: dict[str, Any] = dict(
        batch_size=batch_size, rank=rank, world_size=world_size, seed=seed, device=where, counters=counters
    )
    stream: TrainStream
    if mode == "stream":
        source = VolumeSource(cfg, sources, image_dtype=image_dtype, pad=False, **common)
        stream = CropStream(cfg, sources, WorkerCrops(source, cfg, task, batch_size), dtype=dtype, **kw)
    else:
        source = VolumeSource(cfg, sources, image_dtype=image_dtype, pad=cfg.crop != "resized", **common)
        lws = local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        budget = resident_budget_bytes(cfg, where, lws)
        stream = build_resident_stream(cfg, sources, source, budget=budget, with_labels=with_labels, dtype=dtype, **kw)
    log.info(
        "train stream (%s) on %s: %s, batch %d, %d workers",
        mode,
        device,
        ", ".join(f"{n} ({len(s.keys)} volumes, weight {s.weight:g})" for n, s in zip(stream.names, sources)),
        batch_size,
        cfg.num_workers,
    )
    return stream
