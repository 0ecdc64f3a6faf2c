"""Zarr streams: random-access training crops that read only the chunks a crop touches.

Each worker picks volumes of its rank's share at random, places ``crops_per_volume`` crops from the stored shape
and foreground points (no voxel read), and slices each crop out of the on-disk array. Local paths and fsspec URLs
(``s3://``, ``gs://``, ... when the matching fsspec backend is installed) both work.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import IterableDataset

from medmae.data.config import DataConfig
from medmae.data.pipeline import Cropper, batches, worker_rng
from medmae.io import is_url

__all__ = ["ZarrTrainStream", "open_zarr"]


def open_zarr(path: str, storage_options: dict | None = None):
    """The dataset's root Zarr group, read-only."""
    import zarr

    if is_url(path):
        return zarr.open_group(path, mode="r", storage_options=storage_options or None)
    return zarr.open_group(path, mode="r")


class ZarrTrainStream(IterableDataset):
    """Infinite stream of training batches for one rank; ``epoch`` (set by the loader) re-seeds every worker."""

    def __init__(
        self,
        cfg: DataConfig,
        manifest: dict,
        keys: list[str],
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        with_labels: bool,
    ):
        super().__init__()
        self.cfg, self.batch_size, self.with_labels = cfg, batch_size, with_labels
        self.rank, self.seed, self.task = rank, seed, manifest["task"]
        keys = sorted(keys)
        # disjoint volumes per rank when there are enough; each worker then samples its rank's share at random
        self.keys = keys[rank::world_size] if len(keys) >= world_size else keys
        self.epoch = 0

    def __iter__(self) -> Iterator[dict]:
        import webdataset as wds

        rng = worker_rng(self.seed, self.epoch, self.rank)
        cropper = Cropper(self.cfg, self.task, self.with_labels, rng)
        root = open_zarr(self.cfg.path, self.cfg.storage_options)
        opened: dict[str, tuple] = {}  # array handles and attributes: metadata only, no voxels

        def crops() -> Iterator[dict]:
            while True:
                key = self.keys[rng.py.randrange(len(self.keys))]
                if key not in opened:
                    group = root[f"train/{key}"]
                    opened[key] = (group["image"], group["label"] if self.with_labels else None, dict(group.attrs))
                yield from cropper(*opened[key])

        shuffled = wds.shuffle(self.cfg.crop_shuffle_buffer, initial=self.cfg.crop_shuffle_buffer, rng=rng.py)
        yield from batches(shuffled(crops()), self.batch_size)
