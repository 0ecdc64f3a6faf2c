"""Multi-label classification (chest X-rays): a ViT with a linear head, BCE, and per-label AUC."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from medmae.models import ViTClassifier
from medmae.tasks.base import EvalContext, register_task
from medmae.tasks.finetune import FinetuneTask
from medmae.tasks.metrics import evaluate_classification


@register_task
class ClassifyTask(FinetuneTask):
    name = "classify"
    default_model = "vit_2d_cls_debug"
    model_classes = (ViTClassifier,)
    metric = "AUC"
    metric_groups = ("auc",)
    file_kinds = ("classify",)
    writes_table = True

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.loss_fn = nn.BCEWithLogitsLoss()

    def label_names(self, resolved: Any) -> list[str]:
        names = self.manifest.get("label_names")
        return list(names) if names else [f"label{i}" for i in range(resolved.num_classes)]

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        logits = model(batch["image"]).float()
        return self.loss_fn(logits, batch["label"].float().reshape(logits.shape)), logits

    def validate(self, ctx: EvalContext, split: str = "validation") -> dict[str, Any]:
        return evaluate_classification(
            ctx.model,
            self.val_loader(ctx.rank, ctx.world_size, split),
            roi=tuple(self.cfg.data.roi_size),
            num_classes=ctx.resolved.num_classes,
            device=ctx.device,
            dtype=ctx.dtype,
            class_names=self.label_names(ctx.resolved),
        )
