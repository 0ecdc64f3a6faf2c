"""Segmentation with UNETR: softmax classes, or sigmoid BraTS regions WT/TC/ET derived from the MSD labels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from monai.losses import DiceCELoss
from torch import nn

from medmae.data.labels import BRATS_REGIONS, brats_regions, regions_to_brats
from medmae.models import UNETR
from medmae.tasks.base import register_task
from medmae.tasks.finetune import FinetuneOptions, FinetuneTask
from medmae.training.evaluate import evaluate_segmentation


@dataclass
class SegmentOptions(FinetuneOptions):
    labels: Literal["classes", "brats_regions"] = "classes"
    """segmentation targets: softmax classes, or sigmoid BraTS regions WT/TC/ET from MSD labels 1/2/3"""
    sw_overlap: float = 0.5
    """sliding-window overlap for whole-volume validation"""
    sw_batch: int = 2
    """windows per forward during validation"""

    def __post_init__(self) -> None:
        if not 0.0 <= self.sw_overlap < 1.0:
            raise ValueError(f"sw_overlap: must be in [0, 1), got {self.sw_overlap}")
        if self.sw_batch < 1:
            raise ValueError(f"sw_batch: must be >= 1, got {self.sw_batch}")


@register_task
class SegmentTask(FinetuneTask):
    name = "segment"
    default_model = "unetr_vit_3d_debug"
    model_classes = (UNETR,)
    options = SegmentOptions
    metric = "Dice"
    metric_groups = ("dice", "hd95")
    file_kinds = ("segment", "segment_regions")

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.regions = self.opts.labels == "brats_regions"
        if self.regions:
            self.loss_fn = DiceCELoss(sigmoid=True, smooth_nr=0.0, smooth_dr=1e-5, squared_pred=True)
        else:
            self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, smooth_nr=0.0, smooth_dr=1e-5,
                                      squared_pred=True)

    def file_kind(self) -> str:
        return "segment_regions" if self.regions else "segment"

    def label_names(self, resolved: Any) -> list[str]:
        return list(BRATS_REGIONS) if self.regions else super().label_names(resolved)

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        logits = model(batch["image"]).float()
        target = brats_regions(batch["label"]) if self.regions else batch["label"]
        return self.loss_fn(logits, target), logits

    def validate(self, model: nn.Module, resolved: Any, rank: int, world_size: int, device: torch.device,
                 dtype: torch.dtype) -> dict[str, Any]:
        if self.regions and resolved.num_classes != 3:
            raise ValueError(f"model.num_classes: BraTS regions need 3 outputs (WT, TC, ET), "
                             f"got {resolved.num_classes}")
        names = self.label_names(resolved)
        return evaluate_segmentation(
            model, self.val_loader(rank, world_size), roi=tuple(self.cfg.data.roi_size),
            num_classes=resolved.num_classes, regions=self.regions, device=device, dtype=dtype,
            sw_batch=self.opts.sw_batch, overlap=self.opts.sw_overlap,
            class_names=None if self.regions else names[1:],
        )

    @classmethod
    def check_file(cls, kind: str, meta: dict[str, Any], where: str) -> None:
        k = meta["num_classes"]
        if kind == "segment_regions" and k != 3:
            raise ValueError(f"{where}: num_classes: segment_regions predicts the 3 regions WT/TC/ET, got {k}")
        if kind == "segment" and not 1 <= k <= 256:
            raise ValueError(f"{where}: num_classes: label volumes are uint8, so 1..256 classes, got {k}")

    @classmethod
    def labels_from_logits(cls, kind: str, logits: torch.Tensor) -> np.ndarray:
        """argmax for ``segment``; for ``segment_regions`` sigmoid > 0.5 (logit > 0) per WT/TC/ET region, mapped
        back to MSD BraTS labels (3 in ET, else 2 in TC, else 1 in WT)."""
        if kind == "segment_regions":
            return regions_to_brats((logits > 0).cpu().numpy())
        return logits.argmax(dim=0).to(torch.uint8).cpu().numpy()
