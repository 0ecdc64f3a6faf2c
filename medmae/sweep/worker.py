"""The per-worker entry of a sweep trial, in a module light enough for the trial's driver function to import.

Tune's trial actor only builds the ``TorchTrainer``; importing the trainer (torch, DeepSpeed, MONAI, every model)
there would cost seconds of CPU per trial for nothing, so the import happens on the Train worker.
"""

from __future__ import annotations

from typing import Any


def train_worker(job: dict[str, Any]) -> None:
    from medmae.training.trainer import train_worker as run

    run(job)
