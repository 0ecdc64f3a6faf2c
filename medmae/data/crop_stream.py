"""``data.loader: stream``: today's per-crop CPU path (MONAI transforms per crop, in the loader workers) fed by the
same checkpointable ``VolumeSource`` as the resident path, behind the same ``TrainStream`` interface."""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from medmae.data.config import DataConfig
from medmae.data.pipeline import Cropper, WorkerRng, batches
from medmae.data.sources import VolumeSource
from medmae.data.stream import TrainStream

__all__ = ["CropStream", "WorkerCrops"]


class WorkerCrops(IterableDataset):
    """Per worker: whole volumes -> ``crops_per_volume`` augmented crops each -> crop shuffle -> batches. Each batch
    carries the worker's source position after the newest volume it has read, and the dataset of each crop."""

    def __init__(self, source: VolumeSource, cfg: DataConfig, task: str, batch_size: int):
        super().__init__()
        self.source, self.cfg, self.task, self.batch_size = source, cfg, task, batch_size
        self.restart = 0
        """Batches already trained on when restored: the crop draws after a restart are fresh, not repeated."""

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        src = self.source
        ss = np.random.SeedSequence([src.seed, src.rank, worker, self.restart, 3])
        sub = int(ss.generate_state(1)[0])
        rng = WorkerRng(worker, nw, np.random.default_rng(ss), random.Random(sub), sub)
        cropper = Cropper(self.cfg, self.task, src.with_labels, rng)
        last: dict = {}

        def crops() -> Iterator[dict]:
            for item in src:
                last["pos"] = item["pos"]
                for c in cropper(item["image"], item.get("label"), {"fg_points": item["fg"]}):
                    c["dataset"] = torch.tensor(item["dataset"])
                    yield c

        shuffle = wds.shuffle(self.cfg.crop_shuffle_buffer, initial=self.cfg.crop_shuffle_buffer, rng=rng.py)
        for batch in batches(shuffle(crops()), self.batch_size):
            yield {**batch, "worker": worker, "pos": last["pos"]}


class CropStream(TrainStream):
    """Batches cut in the workers, moved to the device here (pinned, non-blocking on CUDA). A restart continues
    each worker's volume stream where it was; the crops of the volumes in flight then are drawn afresh."""

    mode = "stream"

    def __init__(self, *args, dtype: torch.dtype, **kw):
        super().__init__(*args, **kw)
        self.dtype = dtype

    def __next__(self) -> dict[str, torch.Tensor]:
        if not self.started:
            self.started = True
            self._start_loader()
        item = self._next_item()
        self.crops += np.bincount(item["dataset"].numpy(), minlength=len(self.sources))
        batch = {"image": item["image"].to(self.device, self.dtype, non_blocking=True)}
        if "label" in item:
            batch["label"] = item["label"].to(self.device, non_blocking=True)
        self.batches += 1
        return batch

    def state_dict(self) -> dict:
        return self._common_state()

    def _load_extra(self, state: dict, exact: bool) -> None:
        self.dataset.restart = self.batches
