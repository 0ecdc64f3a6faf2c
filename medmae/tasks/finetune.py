"""What every fine-tuning task shares: options with the pretrained encoder, building from it (channel adaptation,
the data-plan check), the dataset's manifest and label names, and export of the fine-tuned model file."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medmae.config import to_dict
from medmae.data import SELECTION_SPLIT, build_val_loader, read_manifest
from medmae.models import load_encoder, open_encoder
from medmae.tasks.base import Task
from medmae.tasks.model_file import save_finetuned
from medmae.tasks.plan import check_plan

logger = logging.getLogger(__name__)


@dataclass
class FinetuneOptions:
    pretrained: str = ""
    """encoder.safetensors exported by pretraining (a path or URL); empty trains from scratch"""
    strict_plan: bool = False
    """stop when the encoder's pretraining data differs from this dataset in spacing, orientation or intensity
    preset (by default a warning naming both values)"""


class FinetuneTask(Task):
    """Build (from scratch or from an exported MAE encoder), read the manifest, export ``model.safetensors``."""

    options = FinetuneOptions
    with_labels = True
    same_forwards_on_every_rank = False  # each rank validates its own volumes

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self._manifest: dict | None = None
        self.encoder_record: dict[str, Any] = {}
        """how the encoder was initialised (source, channel adaptation, plan differences): the model file's
        ``extra["encoder"]``"""

    @property
    def manifest(self) -> dict:
        if self._manifest is None:
            if not self.cfg.data.path:
                raise ValueError(
                    "data.path: fine-tuning reads one labelled dataset (its validation split, label names "
                    "and preprocessing); data.datasets mixes datasets for pretraining"
                )
            self._manifest = read_manifest(self.cfg.data.path, self.cfg.data.storage_options)
        return self._manifest

    def build_model(self) -> nn.Module:
        model = super().build_model()
        path = self.opts.pretrained
        if path:
            enc = open_encoder(path)
            diffs = check_plan(
                enc.plan, self.manifest, encoder=path, data=self.cfg.data.path, strict=self.opts.strict_plan
            )
            report = load_encoder(model, enc.weights, enc.config)
            logger.info(
                "initialised the encoder from %s: %d tensors%s",
                path,
                report["loaded"],
                f", {report['interpolated']}" if report["interpolated"] else "",
            )
            self.encoder_record = {"pretrained": path, "plan": enc.plan, "plan_differences": diffs, **report}
        return model

    def val_loader(self, rank: int, world_size: int, split: str = "validation") -> Any:
        return build_val_loader(self.cfg.data, rank=rank, world_size=world_size, split=split)

    def has_split(self, split: str) -> bool:
        return any(s["split"] == split for s in self.manifest["samples"])

    def selection_split(self) -> str:
        """``selection`` (volumes carved from training, ``data.select_*``) when set, else ``validation``: the
        paper's single-run protocol, which picks and reports on the same volumes."""
        return SELECTION_SPLIT if self.cfg.data.selects else "validation"

    def report_split(self) -> str | None:
        """``test`` where the dataset has one (ChestX-ray14's official list); else ``validation`` when the model is
        picked on the selection split; else None (picked on validation: nothing is left to report on)."""
        if self.has_split("test"):
            return "test"
        return "validation" if self.cfg.data.selects else None

    def label_names(self, resolved: Any) -> list[str]:
        """Names of the model's output channels, from the dataset manifest when it has them."""
        names = self.manifest.get("label_names")
        return list(names) if names else [f"class{i}" for i in range(resolved.num_classes)]

    def file_kind(self) -> str:
        return self.file_kinds[0]

    def export(
        self, state: dict[str, torch.Tensor], resolved: Any, directory: Path, filename: str | None = None
    ) -> list[Path]:
        path = save_finetuned(
            directory / (filename or "model.safetensors"),
            state,
            model_name=self.cfg.model["name"],
            model_config=to_dict(resolved),
            task=self.file_kind(),
            preprocessing=self.manifest["preprocessing"],
            num_classes=resolved.num_classes,
            label_names=self.label_names(resolved),
            roi_size=list(self.cfg.data.roi_size),
            extra={"encoder": self.encoder_record} if self.encoder_record else None,
        )
        return [path]
