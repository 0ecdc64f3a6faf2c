"""MAE self pre-training: the model returns an ``MAEOutput`` (loss, the hidden patches' predictions, the shuffle);
the encoder is exported for fine-tuning, with the data plan it was pretrained on (``medmae.tasks.plan``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medmae.models import MaskedAutoencoderViT, save_encoder
from medmae.tasks.base import Task, register_task
from medmae.tasks.plan import data_plan


@register_task
class PretrainTask(Task):
    name = "pretrain"
    default_model = "mae_vit_3d_debug"
    model_classes = (MaskedAutoencoderViT,)

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        out = model(batch["image"])
        return out.loss, out

    def image(self, model: nn.Module, batch: dict[str, torch.Tensor], out: Any) -> np.ndarray:
        pred, mask = model.prediction_in_patch_order(out)
        imgs = batch["image"][:1].float()
        pred = pred[:1].float()
        if model.cfg.norm_pix_loss:  # undo the per-patch normalisation with the true patch statistics
            target = model.patchify(imgs)
            pred = pred * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
        patch_voxels = math.prod(model.cfg.patch) * model.cfg.in_chans
        mask_imgs = model.unpatchify(mask[:1].detach().float().unsqueeze(-1).expand(-1, -1, patch_voxels))
        return reconstruction_panel(imgs[0], model.unpatchify(pred)[0], mask_imgs[0])

    def export(
        self, state: dict[str, torch.Tensor], resolved: Any, directory: Path, filename: str | None = None
    ) -> list[Path]:
        # The trainer exports once the run has reached train.max_steps (at the end, or when re-run after it).
        plan = data_plan(self.cfg, resolved, steps=self.cfg.train.max_steps)
        return [save_encoder(state, resolved.encoder_dict(), directory / (filename or "encoder.safetensors"), plan)]


def reconstruction_panel(imgs: torch.Tensor, pred_imgs: torch.Tensor, mask_imgs: torch.Tensor) -> np.ndarray:
    """Middle slice of the first sample: input | masked input | reconstruction (visible patches pasted back).

    All three ``(C, *S)`` tensors of one sample; ``mask_imgs`` is 1 where hidden. Returns (H, 3W) in [0, 1].
    """

    def mid(t: torch.Tensor) -> np.ndarray:
        t = t[0].float()  # first channel
        return (t[t.shape[0] // 2] if t.ndim == 3 else t).cpu().numpy()

    x, m, p = mid(imgs), mid(mask_imgs), mid(pred_imgs)
    lo, hi = float(x.min()), float(x.max())
    scale = (lambda a: np.clip((a - lo) / (hi - lo), 0, 1)) if hi > lo else (lambda a: np.zeros_like(a))
    masked = scale(x) * (1 - m)
    recon = scale(x) * (1 - m) + scale(p) * m
    return np.concatenate([scale(x), masked, recon], axis=1).astype(np.float32)
