"""Fine-tuning task specs: UNETR segmentation (classes or BraTS regions) and ViT multi-label classification."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss
from torch import nn

from medmae.data import build_val_loader, read_manifest
from medmae.data.labels import BRATS_REGIONS, brats_regions
from medmae.models import create_model, load_encoder, read_encoder
from medmae.training.evaluate import evaluate_classification, evaluate_segmentation
from medmae.training.tasks import transformer_flops

logger = logging.getLogger(__name__)


class FinetuneTask:
    """Shared parts: build (from scratch or from an exported MAE encoder), validation plumbing, export."""

    name = ""
    family = ""
    with_labels = True

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self._manifest: dict | None = None

    @property
    def manifest(self) -> dict:
        if self._manifest is None:
            self._manifest = read_manifest(self.cfg.data.path, self.cfg.data.storage_options)
        return self._manifest

    def build_model(self, model_cfg: dict[str, Any], resolved: Any) -> nn.Module:
        name = model_cfg["name"]
        if not name.startswith(self.family):
            raise ValueError(f"model.name: task '{self.name}' needs a {self.family}* model, got {name!r}")
        model = create_model(name, **{k: v for k, v in model_cfg.items() if k != "name"})
        path = self.cfg.finetune.pretrained
        if path:
            weights, source_cfg = read_encoder(path)
            report = load_encoder(model, weights, source_cfg)
            logger.info("initialised the encoder from %s: %d tensors%s", path, report["loaded"],
                        f", {report['interpolated']}" if report["interpolated"] else "")
        return model

    def image(self, model: nn.Module, batch: dict, out: Any) -> np.ndarray | None:
        return None

    def flops_per_sample(self, resolved: Any) -> float:
        tokens = int(np.prod(resolved.grid_size)) + 1
        return 3.0 * transformer_flops(resolved.embed_dim, resolved.depth, resolved.mlp_ratio, tokens)

    def val_loader(self, rank: int, world_size: int) -> Any:
        return build_val_loader(self.cfg.data, rank=rank, world_size=world_size)

    def export(self, state: dict[str, torch.Tensor], resolved: Any, directory: Path,
               filename: str = "model.safetensors") -> list[Path]:
        from medmae.config import to_dict
        from medmae.inference.export import save_finetuned

        path = save_finetuned(
            directory / filename, state, model_name=self.cfg.model["name"], model_config=to_dict(resolved),
            task=self.export_task, preprocessing=self.manifest["preprocessing"], num_classes=resolved.num_classes,
            label_names=self.label_names(resolved), roi_size=list(self.cfg.data.roi_size),
        )
        return [path]


class SegmentTask(FinetuneTask):
    name = "segment"
    family = "unetr_"

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.regions = cfg.finetune.labels == "brats_regions"
        if self.regions:
            self.loss_fn = DiceCELoss(sigmoid=True, smooth_nr=0.0, smooth_dr=1e-5, squared_pred=True)
        else:
            self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, smooth_nr=0.0, smooth_dr=1e-5,
                                      squared_pred=True)

    @property
    def export_task(self) -> str:
        return "segment_regions" if self.regions else "segment"

    def label_names(self, resolved: Any) -> list[str]:
        if self.regions:
            return list(BRATS_REGIONS)
        names = self.manifest.get("label_names")
        return list(names) if names else [f"class{i}" for i in range(resolved.num_classes)]

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
            sw_batch=self.cfg.finetune.sw_batch, overlap=self.cfg.finetune.sw_overlap,
            class_names=None if self.regions else names[1:],
        )


class ClassifyTask(FinetuneTask):
    name = "classify"
    family = "vit_"
    export_task = "classify"

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.loss_fn = nn.BCEWithLogitsLoss()

    def label_names(self, resolved: Any) -> list[str]:
        names = self.manifest.get("label_names")
        return list(names) if names else [f"label{i}" for i in range(resolved.num_classes)]

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        logits = model(batch["image"]).float()
        return self.loss_fn(logits, batch["label"].float().reshape(logits.shape)), logits

    def validate(self, model: nn.Module, resolved: Any, rank: int, world_size: int, device: torch.device,
                 dtype: torch.dtype) -> dict[str, Any]:
        return evaluate_classification(model, self.val_loader(rank, world_size), roi=tuple(self.cfg.data.roi_size),
                                       num_classes=resolved.num_classes, device=device, dtype=dtype,
                                       class_names=self.label_names(resolved))
