"""The trainer's data: one endless, persistent, checkpointable stream of training batches on the model's device.

Usage (one per rank, built once; it runs across epochs and never restarts its workers)::

    stream = build_train_stream(cfg.data, batch_size=4, rank=rank, world_size=world, seed=cfg.run.seed,
                                with_labels=False, device=torch.device("cuda", local_rank))
    if resumed:
        stream.load_state_dict(saved["data"])       # before the first batch
    for step in range(max_steps):
        batch = next(stream)                        # {"image": (B, C, *roi) on device, ["label"]}
        ...
        if checkpoint_now:
            saved["data"] = stream.state_dict()     # JSON-safe; save one per rank
        if log_now:
            board.scalars(stream.stats(), step, prefix="data/")
    stream.close()

How a crop reaches the model: loader workers read whole volumes of this rank's share (``sources.VolumeSource``,
through the one reader per storage format in ``storage``) and hand them over; the stream inserts them into a
``resident.ResidentSet`` on the device; ``sampling.CropSampler`` draws each batch's crop and augmentation
parameters on the host; the set cuts the batch in one batched operation on the device.

Two regimes, chosen by size: when every training volume of the run fits the budget (``data.resident_gib``), each
rank loads them all once (random access, spread over the loader workers) and never refills, as MONAI's
CacheDataset does; datasets are then weighted when a crop picks its volume. Otherwise the rank streams its share of
the shards through the set as a FIFO, swapping in ``batch / resident_reuse`` volumes per batch.
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
from medmae.data.resident import ResidentSet, default_gather
from medmae.data.sampling import CropSampler
from medmae.data.sources import SkipCounters, Source, VolumeSource, resolve_sources

__all__ = ["TrainStream", "build_train_stream", "resident_budget_bytes"]
log = logging.getLogger(__name__)
STATE_VERSION = 1
MAX_SLOTS = 4096  # resident volumes per rank; bounds the host tables (foreground points: 4096 x 1024 x 3 int32)


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

    The loader workers run one ``VolumeSource``; their items are consumed in a fixed round-robin over the workers
    (tracked here, not left to the DataLoader), which makes the volume sequence a function of the seed and of the
    per-worker positions saved in ``state_dict``. Streaming: each batch first swaps in ``batch / resident_reuse``
    volumes (a running fraction), so a volume yields ``resident_reuse`` crops on average; the first batch waits
    until the set is full or holds the rank's share of the data. Whole (``whole`` lists every training volume): all
    are loaded before the first batch and the workers stop.
    """

    def __init__(
        self,
        cfg: DataConfig,
        sources: list[Source],
        source: VolumeSource,
        *,
        resident: ResidentSet,
        sampler: CropSampler,
        fill_target: int,
        whole: list[tuple[int, str]] | None,
        batch_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.cfg, self.sources, self.source, self.batch_size = cfg, sources, source, batch_size
        self.rank, self.world_size, self.seed = source.rank, source.world_size, source.seed
        self.resident, self.sampler, self.fill_target, self.whole = resident, sampler, fill_target, whole
        self.dtype, self.device, self.counters = dtype, device, source.counters
        self.num_workers = max(1, cfg.num_workers)
        self.names = self._names()
        self.batches = 0
        self.phase = 0
        self.credit = 0.0
        self.probs: np.ndarray | None = None
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

    # ---- volumes from the workers ----------------------------------------------------------------------------
    def _start_loader(self) -> None:
        w = self.cfg.num_workers
        loader = DataLoader(
            self.source,
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
        """The next volume in round-robin worker order, buffering what other workers delivered first."""
        w = self.phase
        while not self._pending[w]:
            item = self._pull()
            self._pending[int(item["worker"])].append(item)
        self.phase = (w + 1) % self.num_workers
        item = self._pending[w].popleft()
        self.positions[w] = item["pos"]
        return item

    def _fill(self) -> None:
        r = self.resident
        while len(r) < self.fill_target:
            item = self._next_item()
            full = r.would_evict(int(np.prod(item["image"].shape[1:])))
            r.insert(item)
            if full:
                break

    def _preload(self, volumes: list) -> None:
        """Read ``volumes`` ([dataset, key, offset, slot]; offset/slot None = next free place) by key, spread over
        the workers, and insert them in this order; stream items that arrive meanwhile wait their turn."""
        self.source.preload = [(d, k) for d, k, _, _ in volumes]
        self._start_loader()
        placed: dict[int, dict] = {}
        while len(placed) < len(volumes):
            item = self._pull()
            if "preload" in item:
                placed[int(item["preload"])] = item
            else:
                self._pending[int(item["worker"])].append(item)
        for i, (_, _, offset, slot) in enumerate(volumes):
            if not placed[i].get("corrupt"):
                self.resident.insert(placed.pop(i), slot=slot, offset=offset)
        if not len(self.resident):
            raise RuntimeError(f"no readable training volume in {[s.path for s in self.sources]}")

    def _start(self) -> None:
        state = self._restore
        if self.whole is not None:
            self.source.stream = False
            self._preload(state["resident"]["volumes"] if state else [[d, k, None, None] for d, k in self.whole])
            self._it = None  # all resident: the workers are done
            if len(self.sources) > 1:  # weights act here, per crop: w_d / (volumes of d) for each volume of d
                d = self.resident.dataset[self.resident.live()]
                w = np.asarray([s.weight for s in self.sources])[d] / np.bincount(d)[d]
                self.probs = w / w.sum()
        elif state is not None:
            self._preload(state["resident"]["volumes"])
            self.resident.head = int(state["resident"]["head"])
        else:
            self._start_loader()
            self._fill()
        r = self.resident
        log.info(
            "resident set (%s): %d volumes, %.2f of %.2f GiB on %s",
            "all" if self.whole else "streaming",
            len(r),
            r.used_bytes() / 2**30,
            r.nbytes / 2**30,
            self.device,
        )

    # ---- batches ------------------------------------------------------------------------------------------------
    def __next__(self) -> dict[str, torch.Tensor]:
        if not self.started:
            self.started = True
            self._start()
        if self.whole is None:
            self.credit += self.batch_size / self.cfg.resident_reuse
            while self.credit >= 1.0:
                self.resident.insert(self._next_item())
                self.credit -= 1.0
        r = self.resident
        p = self.sampler.draw(self.batch_size, r.live(), r.shape, r.fg, r.nfg, self.probs)
        batch = r.crop(p, self.dtype)
        self.crops += np.bincount(r.dataset[p.slot], minlength=len(self.sources))
        self.batches += 1
        return batch

    def __iter__(self) -> TrainStream:
        return self

    # ---- checkpoint ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        if not self.started and self._restore is not None:
            return self._restore  # restored but not yet started: the position is still the saved one
        r = self.resident
        return {
            "version": STATE_VERSION,
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
            "whole": self.whole is not None,
            "credit": self.credit,
            "sampler": self.sampler.state_dict(),
            "resident": {
                "head": r.head,
                "volumes": [[int(r.dataset[s]), r.keys[s], int(r.offset[s]), int(s)] for s in r.fifo],
                "inserted": r.inserted,
                "evicted": r.evicted,
            },
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (``state_dict()`` of this rank); must come before the first batch.

        Same datasets and split (seed, rank, world size, workers): each worker continues its shard order where it
        was, exactly so with the same batch size and regime. Another split (an elastic resize): every worker starts
        the epoch after the last one begun. Other datasets: fresh streams. The last two are logged."""
        if self.started:
            raise RuntimeError("load_state_dict: the stream has already started; restore before the first batch")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data state: version {state.get('version')}, this code reads {STATE_VERSION}")
        self.batches = int(state["batches"])
        paths = [s.path for s in self.sources]
        if state["datasets"] != paths:
            log.warning("data state saved for datasets %s, this run reads %s: fresh streams", state["datasets"], paths)
            self._fresh_draws()
            return
        self.crops = np.asarray(state["crops"], dtype=np.int64)
        positions = {int(w): p for w, p in state["positions"].items()}
        split = ("seed", "rank", "world_size", "num_workers")
        if all(state[k] == getattr(self, k) for k in split):  # the workers read the same shards: continue each
            self.positions, self.phase = positions, int(state["phase"])
            self.source.start = dict(positions)
        else:
            epochs = [
                max((p["datasets"][d][0] for p in positions.values()), default=-1) + 1 for d in range(len(self.sources))
            ]
            log.warning(
                "data state saved with seed/rank/world_size/num_workers %s; now %s: starting epochs %s",
                [state[k] for k in split],
                [getattr(self, k) for k in split],
                epochs,
            )
            self.source.start = {w: {"n": 0, "datasets": [[e, 0, 0] for e in epochs]} for w in range(self.num_workers)}
        exact = all(state[k] == getattr(self, k) for k in split) and state["batch_size"] == self.batch_size
        if exact and "resident" in state and state["whole"] == (self.whole is not None):
            self._restore = state
            self.credit = float(state["credit"])
            self.sampler.load_state_dict(state["sampler"])
            self.resident.inserted = int(state["resident"]["inserted"]) - len(state["resident"]["volumes"])
            self.resident.evicted = int(state["resident"]["evicted"])
        else:
            self._fresh_draws()

    def _fresh_draws(self) -> None:
        """Crop draws for the part after a restart that cannot continue exactly: still a function of the seed."""
        self.sampler.rng = np.random.default_rng([self.seed, self.rank, 2, self.batches])

    # ---- reporting ----------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        """Counters for the log and TensorBoard: crops per dataset, skips, time waiting for the workers, the set."""
        out = {f"crops/{n}": float(c) for n, c in zip(self.names, self.crops)}
        out.update({k: float(v) for k, v in self.counters.as_dict().items()})
        out.update(batches=float(self.batches), wait_s=self.wait_s)
        for d, n in enumerate(self.names):
            epochs = [p["datasets"][d][0] for p in self.positions.values()]
            if epochs:
                out[f"epoch/{n}"] = float(max(epochs))
        r = self.resident
        out.update(
            resident_volumes=float(len(r)),
            resident_gib=r.used_bytes() / 2**30,
            resident_capacity_gib=r.nbytes / 2**30,
            refills=float(r.inserted),
            evictions=float(r.evicted),
        )
        return out

    def close(self) -> None:
        """Stop the loader workers."""
        self._it = None  # the iterator's destructor shuts its workers down

    def __del__(self) -> None:
        self._it = None


def _padded_vox(sample: dict, roi, pad: bool) -> int:
    return int(np.prod([max(s, r) if pad else s for s, r in zip(sample["shape"][1:], roi)]))


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
    float32 (classification) when ``with_labels``; all on ``device`` (default: CUDA when present, else CPU).

    The resident set is sized from the budget and the data: all volumes when they fit, else the rank's share of
    them with room for one epoch of it at most."""
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: must be in [0, world_size={world_size}), got {rank}")
    where = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if where.type == "cuda" and where.index is None:
        where = torch.device("cuda", torch.cuda.current_device())
    sources = resolve_sources(cfg, with_labels)
    first = sources[0].manifest
    label = first["task"] if with_labels else None
    if label == "segmentation" and cfg.crop == "resized":
        raise ValueError("data.crop: 'resized' crops carry no segmentation labels; use random or pos_neg")
    pad = cfg.crop != "resized"
    source = VolumeSource(
        cfg,
        sources,
        rank=rank,
        world_size=world_size,
        seed=seed,
        with_labels=with_labels,
        image_dtype=first["preprocessing"].get("image_dtype") or "float16",
        pad=pad,
        counters=SkipCounters(),
    )
    budget = resident_budget_bytes(cfg, where, local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    per_vox = first["channels"] * source.image_dtype.itemsize + (1 if label == "segmentation" else 0)
    vox = {(d, k): _padded_vox(s.samples[k], cfg.roi_size, pad) for d, s in enumerate(sources) for k in s.keys}
    largest, total = max(vox.values()), sum(vox.values())
    fit = budget // per_vox
    if fit < largest:
        raise ValueError(
            f"data.resident_gib: {budget / 2**30:.3g} GiB holds no volume of the data; the largest "
            f"needs {largest * per_vox / 2**30:.3g} GiB"
        )
    whole = None
    if total <= fit and len(vox) <= MAX_SLOTS:
        whole, capacity, fill = sorted(vox), total, len(vox)
    else:
        nw = max(1, cfg.num_workers)
        readers, fill = world_size * nw, 0
        sizes = sorted(vox.values(), reverse=True)
        share = sum(sizes[: -(-len(sizes) // world_size)]) if all(len(s.units) >= readers for s in sources) else total
        capacity = min(fit, share + 2 * largest)  # slack: the ring leaves at most one volume's room unused
        for d, s in enumerate(sources):  # the distinct volumes this rank's workers read in their first epoch
            units = {u for w in range(nw) for u in source.unit_order(d, 0, w, nw)}
            fill += sum(len(s.units[u][1]) for u in units)
    max_slots = int(min(MAX_SLOTS, capacity // min(vox.values()) + 1))
    num_targets = 0
    if label == "classification":
        num_targets = int(sources[0].samples[sources[0].keys[0]]["label_shape"][0])
    resident = ResidentSet(
        capacity=int(capacity),
        channels=first["channels"],
        spatial_dims=cfg.spatial_dims,
        roi=cfg.roi_size,
        device=where,
        label=label,
        num_targets=num_targets,
        max_slots=max_slots,
        max_fg=1024 if cfg.crop == "pos_neg" else 0,
        image_dtype=getattr(torch, source.image_dtype.name),
        gather=default_gather(where),
        resized=not pad,
    )
    stream = TrainStream(
        cfg,
        sources,
        source,
        resident=resident,
        sampler=CropSampler(cfg, seed, rank),
        fill_target=min(fill, max_slots),
        whole=whole,
        batch_size=batch_size,
        dtype=dtype,
        device=where,
    )
    log.info(
        "train stream on %s: %s, batch %d, %d workers",
        where,
        ", ".join(f"{n} ({len(s.keys)} volumes, weight {s.weight:g})" for n, s in zip(stream.names, sources)),
        batch_size,
        cfg.num_workers,
    )
    return stream
