"""MAE self pre-training: the model returns (loss, pred, mask); the encoder is exported for fine-tuning."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medmae.models import MaskedAutoencoderViT, save_encoder
from medmae.tasks.base import Task, register_task
from medmae.training.logs import reconstruction_panel


@register_task
class PretrainTask(Task):
    name = "pretrain"
    default_model = "mae_vit_3d_debug"
    model_classes = (MaskedAutoencoderViT,)

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        loss, pred, mask = model(batch["image"])
        return loss, (pred, mask)

    def image(self, model: nn.Module, batch: dict[str, torch.Tensor], out: Any) -> np.ndarray:
        pred, mask = out
        imgs = batch["image"][:1].float()
        pred = pred[:1].detach().float()
        if model.cfg.norm_pix_loss:  # undo the per-patch normalisation with the true patch statistics
            target = model.patchify(imgs)
            pred = pred * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
        patch_voxels = math.prod(model.cfg.patch) * model.cfg.in_chans
        mask_imgs = model.unpatchify(mask[:1].detach().float().unsqueeze(-1).expand(-1, -1, patch_voxels))
        return reconstruction_panel(imgs[0], model.unpatchify(pred)[0], mask_imgs[0])

    def export(
        self, state: dict[str, torch.Tensor], resolved: Any, directory: Path, filename: str | None = None
    ) -> list[Path]:
        return [save_encoder(state, resolved.encoder_dict(), directory / (filename or "encoder.safetensors"))]
