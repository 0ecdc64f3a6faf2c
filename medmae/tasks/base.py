"""The task spec: everything the one trainer, the sweep report and prediction need to know about a task.

A task (MAE pretraining, segmentation, classification, ...) is one subclass of :class:`Task` registered with
:func:`register_task`. It owns its options (the job config's ``finetune:`` section), the model classes it trains,
its loss, its validation metrics and their names, the model files it exports and how prediction turns a model's
output into what it writes. Nothing outside ``medmae/tasks/`` branches on a task's name: adding a task is one new
module here plus its registration in ``medmae/tasks/__init__.py``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from medmae.config import from_dict
from medmae.models import create_model, get_entry

__all__ = [
    "EvalContext",
    "Task",
    "NoOptions",
    "register_task",
    "task_class",
    "task_names",
    "task_for_file_kind",
    "file_kinds",
]


@dataclass
class NoOptions:
    """A task without options: its ``finetune:`` section must stay empty."""


@dataclass
class EvalContext:
    """What a validation needs from the trainer."""

    model: nn.Module
    """the unwrapped model, in its training dtype"""
    resolved: Any
    """the model's resolved config (``num_classes``, ``img_size``, ...)"""
    rank: int
    world_size: int
    device: torch.device
    dtype: torch.dtype
    """the compute dtype (autocast for the windows)"""


class Task:
    """Base of every task spec. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str]
    """the value of the job config's ``task`` key"""
    default_model: ClassVar[str]
    """registered model used when the config names none (a tiny debug flavour)"""
    model_classes: ClassVar[tuple[type[nn.Module], ...]]
    """model classes this task can train; ``model.name`` must register one of them"""
    options: ClassVar[type] = NoOptions
    """dataclass of the task's options (the ``finetune:`` section of the job config)"""
    with_labels: ClassVar[bool] = False
    """whether training batches carry labels"""
    metric: ClassVar[str] = ""
    """name of the validation score shown in reports (the score itself is ``results["score"]``)"""
    metric_groups: ClassVar[tuple[str, ...]] = ()
    """per-class metric dicts a validation result holds (e.g. ``dice``), logged as ``val/<group>/<name>``"""
    file_kinds: ClassVar[tuple[str, ...]] = ()
    """the ``task`` values of the model files this task writes (prediction finds the task back from them)"""
    same_forwards_on_every_rank: ClassVar[bool] = True
    """whether every rank always runs the same forward passes; ZeRO-3 gathers each layer's parameters collectively
    inside forward, so it needs this (whole-volume validation gives ranks different volumes: fine-tuning cannot)"""
    writes_table: ClassVar[bool] = False
    """prediction writes one table of scores for all inputs (classification) instead of one volume per input"""

    def __init__(self, cfg: Any) -> None:  # the job config (medmae.training.config.JobConfig, a layer above)
        self.cfg = cfg
        self.opts = cfg.finetune

    # ---- configuration ---------------------------------------------------------------------------------------
    @classmethod
    def parse_options(cls, value: Any) -> Any:
        """The typed options from the ``finetune:`` section (a mapping, or already the dataclass)."""
        if isinstance(value, cls.options):
            return value
        if value is None:
            value = {}
        if cls.options is NoOptions and value:
            raise ValueError(f"finetune: task '{cls.name}' takes no options, got {sorted(value)}")
        return from_dict(cls.options, value, prefix="finetune.")

    @classmethod
    def check_model(cls, name: str) -> None:
        """``ValueError`` naming ``model.name`` when the registered model is not one this task trains."""
        entry = get_entry(name)
        if not issubclass(entry.model_cls, cls.model_classes):
            wanted = ", ".join(c.__name__ for c in cls.model_classes)
            raise ValueError(
                f"model.name: task '{cls.name}' trains {wanted} models, '{name}' is a {entry.model_cls.__name__}"
            )

    # ---- training ---------------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        model_cfg = self.cfg.model
        return create_model(model_cfg["name"], **{k: v for k, v in model_cfg.items() if k != "name"})

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def image(self, model: nn.Module, batch: dict[str, torch.Tensor], out: Any) -> np.ndarray | None:
        """An (H, W) or (3, H, W) picture of the last batch for TensorBoard, or None."""
        return None

    def validate(self, ctx: EvalContext, split: str = "validation") -> dict[str, Any] | None:
        """Whole-split evaluation on this rank's share, reduced over ranks; ``{"score": ..., ...}`` or None."""
        return None

    def has_split(self, split: str) -> bool:
        """Whether the dataset holds samples of ``split``."""
        return False

    def selection_split(self) -> str:
        """The split the periodic validation scores, whose best score picks the best model."""
        return "validation"

    def report_split(self) -> str | None:
        """The split the picked model is scored on once, at the end (``results.json`` -> ``test``), or None: a
        split never used to choose anything."""
        return None

    def export(
        self, state: dict[str, torch.Tensor], resolved: Any, directory: Path, filename: str | None = None
    ) -> list[Path]:
        """Write the consolidated fp32 ``state`` as this task's model file(s) into ``directory``."""
        raise NotImplementedError

    # ---- model files and prediction ---------------------------------------------------------------------------
    @classmethod
    def check_file(cls, kind: str, meta: dict[str, Any], where: str) -> None:
        """Extra checks of a model file's metadata for ``kind``; ``ValueError`` naming the field."""

    @classmethod
    def labels_from_logits(cls, kind: str, logits: torch.Tensor) -> np.ndarray:
        """``(K, *S)`` logits -> the uint8 label volume prediction writes."""
        raise ValueError(f"task {kind!r} has no label volume")

    @classmethod
    def probabilities(cls, kind: str, logits: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Logits -> the probabilities test-time mirroring averages (``dim``: the class axis)."""
        raise ValueError(f"task {kind!r} has no label volume to average probabilities for")

    @classmethod
    def labels_from_probabilities(cls, kind: str, probs: torch.Tensor) -> np.ndarray:
        """``(K, *S)`` probabilities -> the uint8 label volume prediction writes."""
        raise ValueError(f"task {kind!r} has no label volume")


_TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make ``cls`` available as ``task: <cls.name>``."""
    if cls.name in _TASKS:
        raise ValueError(f"task '{cls.name}' is registered twice")
    if not dataclasses.is_dataclass(cls.options):
        raise TypeError(f"{cls.__name__}.options must be a dataclass")
    _TASKS[cls.name] = cls
    return cls


def task_names() -> list[str]:
    return sorted(_TASKS)


def task_class(name: str) -> type[Task]:
    if name not in _TASKS:
        raise ValueError(f"task: {name!r} is not one of the registered tasks {task_names()}")
    return _TASKS[name]


def file_kinds() -> list[str]:
    return sorted(k for cls in _TASKS.values() for k in cls.file_kinds)


def task_for_file_kind(kind: str, where: str = "model file") -> type[Task]:
    """The task that writes model files of ``kind``; ``ValueError`` listing the known kinds otherwise."""
    for cls in _TASKS.values():
        if kind in cls.file_kinds:
            return cls
    raise ValueError(f"{where}: task {kind!r} is not one of {file_kinds()}")
