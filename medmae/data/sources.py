"""The training datasets of a run and the stream of whole decoded volumes the loader workers read from them.

``resolve_sources`` turns ``data.path`` or ``data.datasets`` into checked ``Source``s (manifests that agree on what
the model needs). ``VolumeSource`` is the DataLoader dataset of the training stream: each worker reads its share of
every dataset's shards in a per-epoch order, picks the dataset of each next volume by weight, and yields the
decoded volume together with its own position, so that a restart continues where the consumer stopped.

Position (per worker, per dataset): ``[epoch, unit, done]`` = the unit (a wds shard or a Zarr volume) of this
epoch's order being read and the wanted samples of it already yielded; plus ``n``, volumes yielded in all.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from medmae.data.config import DataConfig, DatasetSource
from medmae.data.convert.manifest import join_url, read_manifest
from medmae.data.storage import npy_view, open_url, open_zarr, read_wds_sample, read_zarr_sample

__all__ = ["Source", "SkipCounters", "resolve_sources", "selection_keys", "train_keys", "VolumeSource", "pad_to_roi"]
log = logging.getLogger(__name__)

# Fields every dataset of a run must share: what the model's input means. Spacing is checked separately.
_AGREE = (("channels", "channels"), ("spatial_dims", "spatial_dims"))
_AGREE_PRE = ("preset", "ct_window", "orientation")


@dataclass
class Source:
    """One training dataset: its manifest, the training keys used and the units (shards or volumes) holding them."""

    path: str
    weight: float
    manifest: dict
    keys: list[str]
    units: list[tuple[str, list[str]]]
    """(wds shard name, its wanted keys in stored order) or (Zarr key, [key])."""
    samples: dict[str, dict]
    """key -> manifest sample entry (shape, shard, member offsets) for random access."""


def _check_agree(cfg: DataConfig, first: Source, other: Source, with_labels: bool) -> None:
    """Datasets mixed in one run must mean the same input; name both and the field when they do not."""
    a, b = first.manifest, other.manifest
    pairs = [(f, a.get(k), b.get(k)) for f, k in _AGREE]
    pairs += [(f"preprocessing.{k}", a["preprocessing"].get(k), b["preprocessing"].get(k)) for k in _AGREE_PRE]
    if not cfg.allow_mixed_spacing:
        k = "spacing"
        pairs.append((f"preprocessing.{k}", a["preprocessing"].get(k), b["preprocessing"].get(k)))
    if with_labels:
        pairs += [("task", a["task"], b["task"]), ("num_classes", a["num_classes"], b["num_classes"])]
        pairs.append(("label_names", a.get("label_names"), b.get("label_names")))
    for name, va, vb in pairs:
        if va != vb:
            hint = " (set data.allow_mixed_spacing: true to accept it)" if name.endswith("spacing") else ""
            raise ValueError(f"data.datasets: {first.path} and {other.path} differ in {name}: {va!r} vs {vb!r}{hint}")


class SkipCounters:
    """Counts of corrupt shards and samples skipped, shared by all DataLoader workers of one stream."""

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


def selection_keys(cfg: DataConfig, path: str, manifest: dict) -> list[str]:
    """The training volumes carved out as the selection split (``select_count`` / ``select_fraction``), [] when
    none. Patient-wise where the manifest records each sample's ``group`` (a CSV's patient column): a patient's
    volumes are all selection or all training. Drawn with ``select_seed`` from the sorted groups, so the split
    depends neither on manifest order nor on the labelled subset."""
    if not cfg.selects:
        return []
    train = [s for s in manifest["samples"] if s["split"] == "train"]
    group_of = {s["key"]: str(s.get("group") or s["key"]) for s in train}
    units = sorted(set(group_of.values()))
    n = cfg.select_count if cfg.select_count is not None else max(1, round(cfg.select_fraction * len(units)))
    what = "patients" if any(s.get("group") for s in train) else "volumes"
    if n >= len(units):
        raise ValueError(
            f"data.select_count: {n} {what} for the selection split would leave none of the {len(units)} training "
            f"{what} of {path} to train on"
        )
    order = np.random.default_rng(cfg.select_seed).permutation(len(units))
    chosen = {units[i] for i in order[:n]}
    return sorted(k for k, g in group_of.items() if g in chosen)


def train_keys(cfg: DataConfig, path: str, manifest: dict) -> list[str]:
    """The training volumes of ``path`` used: all outside the selection split, or a subset of them: the keys
    ``train_subset`` names, or a ``subset_seed``-chosen ``train_count`` / ``train_fraction`` (the one rule for
    label-efficiency subsets)."""
    held = set(selection_keys(cfg, path, manifest))
    keys = sorted(s["key"] for s in manifest["samples"] if s["split"] == "train" and s["key"] not in held)
    if not keys:
        raise ValueError(f"data.path: {path} has no training samples")
    if cfg.train_subset:
        for k in cfg.train_subset:
            if k not in keys:
                where = "is in the selection split" if k in held else "is not a training sample"
                raise ValueError(f"data.train_subset: {k!r} {where} of {path}")
        return sorted(cfg.train_subset)
    n = cfg.train_count if cfg.train_count is not None else max(1, round(cfg.train_fraction * len(keys)))
    if n > len(keys):
        raise ValueError(f"data.train_count: {n} requested but {path} has {len(keys)} training volumes")
    if n == len(keys):
        return keys
    order = np.random.default_rng(cfg.subset_seed).permutation(len(keys))
    return sorted(keys[i] for i in order[:n])


def resolve_sources(cfg: DataConfig, with_labels: bool) -> list[Source]:
    """The run's training datasets, checked against ``cfg`` and against each other."""
    specs = cfg.datasets or ([DatasetSource(cfg.path)] if cfg.path else [])
    if not specs:
        raise ValueError("data.path: not set; point it (or data.datasets) at data converted by tools/to_wds.py")
    sources = []
    for spec in specs:
        manifest = read_manifest(spec.path, cfg.storage_options)
        cfg.check_manifest(spec.path, manifest)
        keys = train_keys(cfg, spec.path, manifest)
        wanted = set(keys)
        samples = {s["key"]: s for s in manifest["samples"] if s["key"] in wanted}
        if with_labels:
            missing = [k for k in keys if not samples[k].get("label_shape")]
            if missing:
                raise ValueError(
                    f"data.path: with_labels but {spec.path} has {len(missing)} training samples "
                    f"without a label (e.g. {missing[0]})"
                )
        if cfg.crop == "pos_neg" and manifest["task"] != "segmentation":
            raise ValueError(f"data.crop: 'pos_neg' needs a segmentation dataset, {spec.path} is '{manifest['task']}'")
        if cfg.format == "wds":
            by_shard: dict[str, list[dict]] = {}
            for s in manifest["samples"]:  # manifest order within a shard is not stored order: sort by offset
                if s["key"] in wanted:
                    by_shard.setdefault(s["shard"], []).append(s)
            units = [
                (name, [s["key"] for s in sorted(v, key=lambda s: min(o for o, _ in s["members"].values()))])
                for name, v in sorted(by_shard.items())
            ]
        else:
            units = [(k, [k]) for k in keys]
        sources.append(Source(spec.path, spec.weight, manifest, keys, units, samples))
    for other in sources[1:]:
        _check_agree(cfg, sources[0], other, with_labels)
    return sources


def pad_to_roi(image: np.ndarray, label: np.ndarray | None, fg: np.ndarray, roi) -> tuple:
    """Zero-pad spatial dims smaller than ``roi``, centred: ``(roi - size) - (roi - size) // 2`` before, the rest
    after, so the only crop start is the centring one. Foreground points move along."""
    spatial = image.shape[1:]
    pads = []
    for s, r in zip(spatial, roi):
        lo = -((s - r) // 2) if s < r else 0
        pads.append((lo, r - s - lo) if s < r else (0, 0))
    if not any(p != (0, 0) for p in pads):
        return image, label, fg
    image = np.pad(image, [(0, 0), *pads])
    if label is not None and label.ndim == len(spatial):
        label = np.pad(label, pads)
    if len(fg):
        fg = fg + np.asarray([lo for lo, _ in pads], dtype=fg.dtype)
    return image, label, fg


class VolumeSource(IterableDataset):
    """Endless whole decoded volumes for one rank; each item carries the producing worker's position after it.

    Item: ``image`` (C, *S) ``image_dtype``, padded to the ROI unless ``pad`` is False; ``label`` uint8 (*S) for
    segmentation or float32 (K,) targets (only ``with_labels``); ``fg`` int32 (N, D) foreground points; ``dataset``,
    ``key``, ``worker`` and ``pos``. With ``preload`` (a restored resident set, or all volumes when they all fit),
    every worker first reads its share of those (dataset, key) pairs by random access, tagged ``preload`` = their
    index.
    """

    def __init__(
        self,
        cfg: DataConfig,
        sources: list[Source],
        *,
        rank: int,
        world_size: int,
        seed: int,
        with_labels: bool,
        image_dtype: str = "float16",
        pad: bool = True,
        counters: SkipCounters,
    ):
        super().__init__()
        self.cfg, self.sources, self.rank, self.world_size, self.seed = cfg, sources, rank, world_size, seed
        self.with_labels, self.image_dtype, self.pad, self.counters = with_labels, np.dtype(image_dtype), pad, counters
        self.weights = np.asarray([s.weight for s in sources], dtype=np.float64)
        self.weights /= self.weights.sum()
        self.start: dict[int, dict] = {}  # worker id -> position to resume from (set before the workers start)
        self.preload: list[tuple[int, str]] = []
        self.stream = True  # False: the workers stop after the preload (every volume resident, no refill)
        self._roots: dict[int, Any] = {}

    # ---- order ----------------------------------------------------------------------------------------------------
    def unit_order(self, d: int, epoch: int, worker: int, num_workers: int) -> list[int]:
        """Units of dataset ``d`` this reader takes in ``epoch``: one permutation shared by all ranks, split across
        the ranks x workers readers; with fewer units than readers, every reader takes all in its own order."""
        n, readers = len(self.sources[d].units), self.world_size * num_workers
        if n >= readers:
            perm = np.random.default_rng([self.seed, d, epoch]).permutation(n)
            return perm[self.rank + self.world_size * worker :: readers].tolist()
        if self.rank == 0 and worker == 0 and epoch == 0:
            log.warning(
                "%s: %d shards for %d ranks x %d workers: every reader reads all of them in its own order; "
                "convert with a smaller --shard-size-mb for disjoint reads",
                self.sources[d].path,
                n,
                self.world_size,
                num_workers,
            )
        return np.random.default_rng([self.seed, d, epoch, self.rank, worker]).permutation(n).tolist()

    def choose(self, worker: int, n: int) -> int:
        """Dataset of a worker's ``n``-th volume: counter-based, so a position alone restores the sequence."""
        if len(self.sources) == 1:
            return 0
        u = np.random.default_rng([self.seed, self.rank, worker, n, 1]).random()
        return int(min(np.searchsorted(np.cumsum(self.weights), u, side="right"), len(self.sources) - 1))

    # ---- reading ----------------------------------------------------------------------------------------------------
    def _prepare(self, d: int, key: str, image: np.ndarray, label, meta: dict) -> dict:
        cfg = self.cfg
        if image.ndim != cfg.spatial_dims + 1:
            raise ValueError(f"image shape {image.shape} is not {cfg.spatial_dims}D with channels")
        image = np.asarray(image, dtype=self.image_dtype)
        fg = np.asarray(meta.get("fg_points") or np.zeros((0, cfg.spatial_dims)), dtype=np.int32)
        fg = fg.reshape(-1, cfg.spatial_dims)
        if label is not None:
            if label.ndim == cfg.spatial_dims:
                if label.dtype.itemsize > 1 and label.size and label.max() > 255:
                    raise ValueError(f"label values up to {label.max()} do not fit the resident uint8 labels")
                label = np.asarray(label, dtype=np.uint8)
            else:
                label = np.asarray(label, dtype=np.float32)
        if self.pad:
            image, label, fg = pad_to_roi(image, label, fg, cfg.roi_size)
        out = {"image": np.ascontiguousarray(image), "fg": fg, "dataset": d, "key": key}
        if label is not None:
            out["label"] = np.ascontiguousarray(label)
        return out

    def _decode_wds(self, d: int, key: str, raw: dict) -> dict:
        label = npy_view(raw["label.npy"]) if self.with_labels else None
        return self._prepare(d, key, npy_view(raw["image.npy"]), label, json.loads(raw["json"].tobytes()))

    def _read_sample(self, f, d: int, key: str) -> dict:
        """The members a volume needs (the label only when used), by the offsets the manifest records."""
        members = self.sources[d].samples[key]["members"]
        return read_wds_sample(f, key, members, ("image.npy", "json", "label.npy")[: 3 if self.with_labels else 2])

    def _read_zarr(self, d: int, key: str) -> dict:
        if d not in self._roots:  # opened lazily, inside the worker process
            self._roots[d] = open_zarr(self.sources[d].path, self.cfg.storage_options)
        s = read_zarr_sample(self._roots[d], "train", key, label=self.with_labels)
        return self._prepare(d, key, s["image"], s.get("label"), s["meta"])

    def read_key(self, d: int, key: str) -> dict:
        """One training volume by random access (restoring a resident set)."""
        src = self.sources[d]
        if self.cfg.format == "zarr":
            return self._read_zarr(d, key)
        with open_url(join_url(src.path, src.samples[key]["shard"]), self.cfg.storage_options) as f:
            return self._decode_wds(d, key, self._read_sample(f, d, key))

    def _unit(self, d: int, unit: int, skip: int) -> Iterator[dict]:
        """The wanted samples of one unit after the first ``skip``; a broken shard ends early, counted."""
        name, keys = self.sources[d].units[unit]
        if self.cfg.format == "zarr":
            if skip == 0:
                try:
                    yield self._read_zarr(d, name)
                except Exception as e:  # noqa: BLE001 - a bad volume is skipped and counted, not fatal
                    self.counters.add(samples=1)
                    log.warning("skipping volume %s of %s: %s: %s", name, self.sources[d].path, type(e).__name__, e)
            return
        url = join_url(self.sources[d].path, name)
        try:
            with open_url(url, self.cfg.storage_options) as f:
                for key in keys[skip:]:  # stored order; resuming inside a shard reads nothing before it
                    raw = self._read_sample(f, d, key)
                    try:
                        item = self._decode_wds(d, key, raw)
                    except Exception as e:  # noqa: BLE001
                        self.counters.add(samples=1)
                        log.warning("skipping sample %s of %s: %s: %s", key, url, type(e).__name__, e)
                        item = {"corrupt": True}
                    yield item
        except Exception as e:  # noqa: BLE001 - truncated or unreadable: skip the rest of this shard
            self.counters.add(shards=1)
            log.warning(
                "skipping the rest of shard %s: %s: %s (%s so far)", url, type(e).__name__, e, self.counters.as_dict()
            )

    def _dataset_stream(self, d: int, worker: int, nw: int, pos: list[int]) -> Iterator[dict]:
        """Volumes of dataset ``d`` for this worker, forever; ``pos`` ([epoch, unit, done]) is updated in place."""
        empty = 0  # consecutive units that gave nothing: all of them broken must stop, not spin
        while True:
            epoch, unit, done = pos
            order = self.unit_order(d, epoch, worker, nw)
            for i in range(unit, len(order)):
                count, got = (done if i == unit else 0), False
                for item in self._unit(d, order[i], count):
                    count += 1
                    pos[:] = [epoch, i, count]
                    if not item.get("corrupt"):
                        got = True
                        yield item
                pos[:] = [epoch, i + 1, 0]
                empty = 0 if got else empty + 1
                if empty > 3 * len(self.sources[d].units) + 10:
                    raise RuntimeError(
                        f"no readable training volume in {empty} consecutive shard reads; "
                        f"check the data under {self.sources[d].path}"
                    )
            pos[:] = [epoch + 1, 0, 0]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for i in range(worker, len(self.preload), nw):
            d, key = self.preload[i]
            try:
                yield {**self.read_key(d, key), "worker": worker, "preload": i}
            except Exception as e:  # noqa: BLE001 - skipped and counted like a broken sample of the stream
                self.counters.add(samples=1)
                log.warning("skipping volume %s of %s: %s: %s", key, self.sources[d].path, type(e).__name__, e)
                yield {"worker": worker, "preload": i, "corrupt": True}
        if not self.stream:
            return
        start = self.start.get(worker) or {"n": 0, "datasets": [[0, 0, 0] for _ in self.sources]}
        n, positions = start["n"], [list(p) for p in start["datasets"]]
        streams = [self._dataset_stream(d, worker, nw, positions[d]) for d in range(len(self.sources))]
        while True:
            d = self.choose(worker, n)
            item = next(streams[d])
            n += 1
            yield {**item, "worker": worker, "pos": {"n": n, "datasets": [list(p) for p in positions]}}
