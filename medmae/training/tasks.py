"""Task specs: how a model family plugs into the one trainer (build, loss, logging extras, export).

The trainer never imports a particular model; it asks the task. Fine-tuning tasks register here the same way.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from medmae.models import create_model, save_encoder
from medmae.training.logs import reconstruction_panel


class Task(Protocol):
    name: str
    with_labels: bool

    def build_model(self, model_cfg: dict[str, Any], resolved: Any) -> nn.Module: ...

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]: ...

    def image(self, model: nn.Module, batch: dict[str, torch.Tensor], out: Any) -> np.ndarray | None: ...

    def flops_per_sample(self, resolved: Any) -> float: ...

    def validate(self, model: nn.Module, resolved: Any, rank: int, world_size: int, device: torch.device,
                 dtype: torch.dtype) -> dict[str, Any] | None: ...

    def export(self, state: dict[str, torch.Tensor], resolved: Any, directory: Path) -> list[Path]: ...


class PretrainTask:
    """MAE pretraining: the model returns (loss, pred, mask); the encoder is exported for fine-tuning."""

    name = "pretrain"
    with_labels = False

    def __init__(self, cfg: Any = None) -> None:
        self.cfg = cfg

    def validate(self, *args: Any, **kwargs: Any) -> None:
        return None  # pretraining has no validation metric; the reconstruction images show progress

    def build_model(self, model_cfg: dict[str, Any], resolved: Any) -> nn.Module:
        name = model_cfg["name"]
        if not name.startswith("mae_"):
            raise ValueError(f"model.name: task 'pretrain' needs an MAE model (mae_*), got {name!r}")
        return create_model(name, **{k: v for k, v in model_cfg.items() if k != "name"})

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

    def flops_per_sample(self, resolved: Any) -> float:
        """Training FLOPs (forward + backward = 3 × forward) of one sample: matmuls of encoder and decoder."""
        n = math.prod(resolved.grid_size)
        n_vis = round(n * (1 - resolved.mask_ratio)) + 1
        enc = transformer_flops(resolved.embed_dim, resolved.depth, resolved.mlp_ratio, n_vis)
        dec = transformer_flops(resolved.decoder_embed_dim, resolved.decoder_depth, resolved.mlp_ratio, n + 1)
        embed = 2 * n * math.prod(resolved.patch) * resolved.in_chans * resolved.embed_dim
        head = 2 * n * resolved.decoder_embed_dim * math.prod(resolved.patch) * resolved.in_chans
        return 3.0 * (enc + dec + embed + head)

    def export(self, state: dict[str, torch.Tensor], resolved: Any, directory: Path) -> list[Path]:
        return [save_encoder(state, resolved.encoder_dict(), directory / "encoder.safetensors")]


def transformer_flops(dim: int, depth: int, mlp_ratio: float, tokens: int) -> float:
    """Forward FLOPs: qkv + proj (8·N·D²), MLP (4·r·N·D²), attention scores and values (4·N²·D) per block."""
    per_block = 8 * tokens * dim**2 + 4 * mlp_ratio * tokens * dim**2 + 4 * tokens**2 * dim
    return depth * per_block


def get_task(cfg: Any) -> Task:
    """The spec for ``cfg.task``, bound to the job config."""
    from medmae.training.finetune import ClassifyTask, SegmentTask

    tasks = {"pretrain": PretrainTask, "segment": SegmentTask, "classify": ClassifyTask}
    if cfg.task not in tasks:
        raise ValueError(f"task: {cfg.task!r} is not implemented; available: {', '.join(sorted(tasks))}")
    return tasks[cfg.task](cfg)
