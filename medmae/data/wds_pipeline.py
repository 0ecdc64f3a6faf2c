"""WebDataset streams: the resampled, node/worker-split training stream and random access for validation.

Training stream per DataLoader worker: resampled shards of this (rank, worker) → tar members grouped into samples
→ shuffle of still-encoded samples (memory ~ ``shuffle_buffer`` volumes) → ``.npy`` decode with
``allow_pickle=False`` → several crops per volume → crop shuffle → batches. A shard that cannot be read, or is
truncated, ends with a warning and a count; the stream goes on with the next shard.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import webdataset as wds
from torch.utils.data import IterableDataset
from webdataset.handlers import reraise_exception
from webdataset.tariterators import group_by_keys, tar_file_expander

from medmae.data.config import DataConfig
from medmae.data.convert.manifest import join_url
from medmae.data.convert.writers import decode_npy
from medmae.data.pipeline import Cropper, SkipCounters, WorkerRng, batches, worker_rng
from medmae.io import is_url

__all__ = ["WdsTrainStream", "open_url", "read_members"]
log = logging.getLogger(__name__)


def open_url(url: str, storage_options: dict | None = None):
    """Binary file object for a local path or an fsspec URL."""
    if is_url(url) and not url.startswith("file://"):
        import fsspec

        return fsspec.open(url, "rb", **(storage_options or {})).open()
    return open(url.removeprefix("file://"), "rb")


def read_members(url: str, members: dict, storage_options: dict | None = None) -> dict:
    """Random access to one sample of a shard through the offsets the manifest records (no scan of the tar)."""
    out = {}
    with open_url(url, storage_options) as f:
        for suffix, (offset, size) in members.items():
            f.seek(offset)
            out[suffix] = f.read(size)
            if len(out[suffix]) != size:
                raise OSError(f"{url}: truncated at member {suffix}")
    return out


class WdsTrainStream(IterableDataset):
    """Infinite stream of training batches for one rank; ``epoch`` (set by the loader) re-seeds every worker."""

    def __init__(
        self,
        cfg: DataConfig,
        manifest: dict,
        keys: set[str],
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        with_labels: bool,
        counters: SkipCounters,
    ):
        super().__init__()
        self.cfg, self.keys, self.batch_size = cfg, keys, batch_size
        self.rank, self.world_size, self.seed, self.with_labels = rank, world_size, seed, with_labels
        self.task = manifest["task"]
        self.counters = counters
        wanted = {s["shard"] for s in manifest["samples"] if s["key"] in keys}
        self.urls = [join_url(cfg.path, s["name"]) for s in manifest["shards"] if s["name"] in wanted]
        self.epoch = 0

    def _my_shards(self, rng: WorkerRng) -> list[str]:
        """Split by node, then by worker; with fewer shards than readers, every reader resamples all of them."""
        if len(self.urls) >= self.world_size * rng.num_workers:
            return self.urls[self.rank :: self.world_size][rng.worker :: rng.num_workers]
        if self.rank == 0 and rng.worker == 0 and self.epoch == 0:
            log.warning(
                "%d shards for %d ranks x %d workers: every reader resamples all shards with its own seed; "
                "convert with a smaller --shard-size-mb for disjoint reads",
                len(self.urls),
                self.world_size,
                rng.num_workers,
            )
        return self.urls

    def _resampled(self, urls: list[str], rng: WorkerRng) -> Iterator[dict]:
        while True:
            yield {"url": urls[rng.py.randrange(len(urls))]}

    def _read(self, src: Iterator[dict]) -> Iterator[dict]:
        failures = 0  # consecutive shards that gave nothing: all of them broken must stop, not spin
        for item in src:
            url = item["url"]
            try:
                with open_url(url, self.cfg.storage_options) as stream:
                    files = tar_file_expander([{"url": url, "stream": stream}], handler=reraise_exception)
                    for sample in group_by_keys(files, handler=reraise_exception):
                        failures = 0
                        yield sample
            except Exception as e:  # truncated or corrupt: skip the rest of this shard, keep streaming
                failures += 1
                self.counters.add(shards=1)
                log.warning(
                    "skipping the rest of shard %s: %s: %s (%s so far)",
                    url,
                    type(e).__name__,
                    e,
                    self.counters.as_dict(),
                )
                if failures > 3 * len(self.urls) + 10:
                    raise RuntimeError(
                        f"no readable sample in {failures} consecutive shard reads; "
                        f"check the shards under {self.cfg.path}"
                    ) from e

    def _decode(self, src: Iterator[dict]) -> Iterator[tuple]:
        for s in src:
            try:
                meta = json.loads(s["json"])
                image = decode_npy(s["image.npy"])
                label = decode_npy(s["label.npy"]) if self.with_labels else None
                if image.ndim != self.cfg.spatial_dims + 1:
                    raise ValueError(f"image shape {image.shape} is not {self.cfg.spatial_dims}D with channels")
            except Exception as e:
                self.counters.add(samples=1)
                log.warning("skipping sample %s of %s: %s: %s", s.get("__key__"), s.get("__url__"), type(e).__name__, e)
                continue
            yield image, label, meta

    def __iter__(self) -> Iterator[dict]:
        rng = worker_rng(self.seed, self.epoch, self.rank)
        cropper = Cropper(self.cfg, self.task, self.with_labels, rng)
        urls = self._my_shards(rng)
        pipeline = wds.DataPipeline(
            lambda: self._resampled(urls, rng),
            self._read,
            wds.select(lambda s: s["__key__"] in self.keys),
            wds.shuffle(self.cfg.shuffle_buffer, initial=self.cfg.shuffle_buffer, rng=rng.py),
            self._decode,
            lambda src: (crop for image, label, meta in src for crop in cropper(image, label, meta)),
            wds.shuffle(self.cfg.crop_shuffle_buffer, initial=self.cfg.crop_shuffle_buffer, rng=rng.py),
        )
        yield from batches(pipeline, self.batch_size)
