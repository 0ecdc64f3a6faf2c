"""ViT classifier: encoder + pooled features + linear head (multi-label logits for chest X-ray style tasks)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from medmae.models.vit import EncoderModel, VisionTransformer, ViTConfig


@dataclass
class ClassifierConfig(ViTConfig):
    num_classes: int = 14
    """output logits (one per label for multi-label tasks)"""
    global_pool: Literal["token", "avg"] = "avg"
    """cls token or mean of patch tokens (MAE fine-tuning uses avg)"""
    head_drop: float = 0.0
    """dropout before the head"""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_classes <= 0:
            raise ValueError(f"num_classes: must be positive, got {self.num_classes}")
        if self.global_pool == "token" and not self.cls_token:
            raise ValueError("global_pool: 'token' needs cls_token: true")


class ViTClassifier(EncoderModel):
    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = VisionTransformer(cfg)
        self.fc_norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6) if cfg.global_pool == "avg" else nn.Identity()
        self.head_drop = nn.Dropout(cfg.head_drop)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # MAE fine-tuning: a near-zero head keeps early steps calm
        nn.init.zeros_(self.head.bias)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens ``(B, prefix + L, D)`` -> logits ``(B, K)``."""
        if self.cfg.global_pool == "avg":
            x = self.fc_norm(x[:, self.encoder.num_prefix_tokens :].mean(dim=1))
        else:
            x = x[:, 0]
        return self.head(self.head_drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S)`` -> logits ``(B, K)``."""
        return self.forward_head(self.encoder.forward_features(x))
