"""``data.loader: resident``: the ``TrainStream`` that keeps whole volumes on the device and cuts batches there.

Two regimes, chosen by size: when every training volume of the run fits the budget, each rank loads them all once
(random access, spread over the loader workers) and never refills, as MONAI's CacheDataset does, so no decoding
competes with training; datasets are then weighted when a crop picks its volume. Otherwise the rank streams its
share of the shards through a FIFO resident set, swapping in ``batch / resident_reuse`` volumes per batch.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from medmae.data.config import DataConfig
from medmae.data.resident import ResidentSet, default_gather
from medmae.data.sampling import CropSampler
from medmae.data.sources import Source, VolumeSource
from medmae.data.stream import TrainStream

__all__ = ["ResidentStream", "build_resident_stream"]
log = logging.getLogger(__name__)
MAX_SLOTS = 4096  # resident volumes per rank; bounds the host tables (foreground points: 4096 x 1024 x 3 int32)


class ResidentStream(TrainStream):
    """Volumes decoded by the workers into a ``ResidentSet`` on the device; batches cut there.

    Streaming: each batch first swaps in ``batch / resident_reuse`` volumes (a running fraction), so a volume
    yields ``resident_reuse`` crops on average; the first batch waits until the set is full or holds the rank's
    share of the data. Whole (``whole`` lists every training volume): all are loaded before the first batch and
    the workers stop. Crop and augmentation parameters come from a per-rank ``CropSampler``.
    """

    mode = "resident"

    def __init__(
        self,
        *args,
        resident: ResidentSet,
        sampler: CropSampler,
        fill_target: int,
        dtype: torch.dtype,
        whole: list[tuple[int, str]] | None,
        **kw,
    ):
        super().__init__(*args, **kw)
        self.resident, self.sampler, self.fill_target, self.dtype = resident, sampler, fill_target, dtype
        self.whole = whole
        self.credit = 0.0
        self.probs: np.ndarray | None = None

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
        self.dataset.source.preload = [(d, k) for d, k, _, _ in volumes]
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
            self.dataset.source.stream = False
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

    def state_dict(self) -> dict:
        if not self.started and self._restore is not None:
            return self._restore  # restored but not yet started: the position is still the saved one
        r = self.resident
        volumes = [[int(r.dataset[s]), r.keys[s], int(r.offset[s]), int(s)] for s in r.fifo]
        return {
            **self._common_state(),
            "whole": self.whole is not None,
            "credit": self.credit,
            "sampler": self.sampler.state_dict(),
            "resident": {"head": r.head, "volumes": volumes, "inserted": r.inserted, "evicted": r.evicted},
        }

    def _exact(self, state: dict) -> bool:
        return super()._exact(state) and state.get("whole") == (self.whole is not None)

    def _load_extra(self, state: dict, exact: bool) -> None:
        if exact:
            self.credit = float(state["credit"])
            self.sampler.load_state_dict(state["sampler"])
            self.resident.inserted = int(state["resident"]["inserted"]) - len(state["resident"]["volumes"])
            self.resident.evicted = int(state["resident"]["evicted"])
        else:  # fresh draws for the part after the restart, still a function of the seed
            self.sampler.rng = np.random.default_rng([self.seed, self.rank, 2, self.batches])

    def stats(self) -> dict[str, float]:
        r = self.resident
        return {
            **super().stats(),
            "resident_volumes": float(len(r)),
            "resident_gib": r.used_bytes() / 2**30,
            "resident_capacity_gib": r.nbytes / 2**30,
            "refills": float(r.inserted),
            "evictions": float(r.evicted),
        }


class _Volumes(torch.utils.data.IterableDataset):
    """The DataLoader dataset of the resident path: the volume source itself (``.source`` as ``WorkerCrops``)."""

    def __init__(self, source: VolumeSource):
        super().__init__()
        self.source = source

    def __iter__(self):
        return iter(self.source)


def _padded_vox(sample: dict, roi, pad: bool) -> int:
    return int(np.prod([max(s, r) if pad else s for s, r in zip(sample["shape"][1:], roi)]))


def build_resident_stream(
    cfg: DataConfig,
    sources: list[Source],
    source: VolumeSource,
    *,
    budget: int,
    with_labels: bool,
    dtype: torch.dtype,
    **kw,
) -> ResidentStream:
    """Size the resident set from the ``budget`` (bytes on ``kw['device']``) and the data: all volumes when they
    fit, else the rank's share of them with room for one epoch of it at most."""
    first, world = sources[0].manifest, kw["world_size"]
    pad = cfg.crop != "resized"
    label = first["task"] if with_labels else None
    image_dtype = source.image_dtype
    per_vox = first["channels"] * image_dtype.itemsize + (1 if label == "segmentation" else 0)
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
        readers, fill = world * nw, 0
        sizes = sorted(vox.values(), reverse=True)
        share = sum(sizes[: -(-len(sizes) // world)]) if all(len(s.units) >= readers for s in sources) else total
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
        device=kw["device"],
        label=label,
        num_targets=num_targets,
        max_slots=max_slots,
        max_fg=1024 if cfg.crop == "pos_neg" else 0,
        image_dtype=getattr(torch, image_dtype.name),
        gather=default_gather(kw["device"]),
        resized=not pad,
    )
    return ResidentStream(
        cfg,
        sources,
        _Volumes(source),
        resident=resident,
        sampler=CropSampler(cfg, kw["seed"], kw["rank"]),
        fill_target=min(fill, max_slots),
        dtype=dtype,
        whole=whole,
        **kw,
    )
