"""Masked autoencoder (He et al. 2022) for 2D and 3D images, as self pre-trained by Zhou et al. (ISBI 2023).

The encoder sees only the visible patches; a light decoder fills in mask tokens and predicts every masked patch's
voxels. Free tensors (cls token, mask token, position tables) live in small modules so ZeRO-3 gathers them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from medmae.layers import Block, PosEmbed, patchify, unpatchify
from medmae.models.vit import EncoderModel, VisionTransformer, ViTConfig, init_linear_and_norm


@dataclass
class MAEConfig(ViTConfig):
    decoder_embed_dim: int = 384
    """decoder token width"""
    decoder_depth: int = 8
    """decoder blocks"""
    decoder_num_heads: int = 12
    """decoder attention heads"""
    mask_ratio: float = 0.75
    """fraction of patches hidden from the encoder"""
    norm_pix_loss: bool = True
    """regress per-patch normalised voxels (mean 0, var 1 within each patch)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio: must be in [0, 1), got {self.mask_ratio}")
        if self.decoder_embed_dim % self.decoder_num_heads:
            raise ValueError(
                f"decoder_embed_dim: {self.decoder_embed_dim} is not divisible by decoder_num_heads "
                f"{self.decoder_num_heads}"
            )
        if self.decoder_depth <= 0:
            raise ValueError(f"decoder_depth: must be positive, got {self.decoder_depth}")


class MaskToken(nn.Module):
    """Fills the masked places of a sequence with one learnable token and restores the original patch order."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, visible: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """``visible`` (B, L_keep, D), ``ids_restore`` (B, L) -> ``(B, L, D)`` in patch order."""
        b, n_keep, d = visible.shape
        fill = self.token.to(visible.dtype).expand(b, ids_restore.shape[1] - n_keep, -1)
        x = torch.cat([visible, fill], dim=1)  # (B, L, D) in shuffled order
        return torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, d))


class MAEDecoder(nn.Module):
    """Latent ``(B, prefix + L_keep, D_enc)`` -> per-patch voxel prediction ``(B, L, prod(p)·C)``."""

    def __init__(self, cfg: MAEConfig, num_prefix_tokens: int) -> None:
        super().__init__()
        dim = cfg.decoder_embed_dim
        self.num_prefix_tokens = num_prefix_tokens
        self.embed = nn.Linear(cfg.embed_dim, dim)
        self.mask_token = MaskToken(dim)
        self.pos_embed = PosEmbed(dim, cfg.grid_size, learnable=False)
        self.blocks = nn.ModuleList(
            Block(dim, cfg.decoder_num_heads, cfg.mlp_ratio, cfg.qkv_bias) for _ in range(cfg.decoder_depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, math.prod(cfg.patch) * cfg.in_chans)
        self.grad_checkpointing = False

    def init_weights(self) -> None:
        self.pos_embed.reset_parameters()
        nn.init.normal_(self.mask_token.token, std=0.02)
        self.apply(init_linear_and_norm)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.embed(latent)  # (B, prefix + L_keep, D_dec)
        prefix, visible = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens :]
        x = self.pos_embed(self.mask_token(visible, ids_restore))  # (B, L, D_dec)
        x = torch.cat([prefix, x], dim=1)
        for blk in self.blocks:
            use_ckpt = self.grad_checkpointing and torch.is_grad_enabled()
            x = checkpoint(blk, x, use_reentrant=False) if use_ckpt else blk(x)
        x = self.pred(self.norm(x))
        return x[:, self.num_prefix_tokens :]  # (B, L, prod(p)·C)


class MaskedAutoencoderViT(EncoderModel):
    def __init__(self, cfg: MAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = VisionTransformer(cfg)
        self.decoder = MAEDecoder(cfg, self.encoder.num_prefix_tokens)
        self.decoder.init_weights()

    def init_weights(self) -> None:
        self.encoder.init_weights()
        self.decoder.init_weights()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        super().set_grad_checkpointing(enable)
        self.decoder.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"decoder.mask_token.token"}

    # ---- stages ---------------------------------------------------------------------------------------------------
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S)`` -> ``(B, L, prod(p)·C)``."""
        return patchify(imgs, self.cfg.patch)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L, prod(p)·C)`` -> ``(B, C, *S)``."""
        return unpatchify(x, self.cfg.patch, self.cfg.grid_size, self.cfg.in_chans)

    @staticmethod
    def random_masking(x: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep a random ``round(L·(1-ratio))`` tokens of each sample, drawn on ``x``'s device (no host sync).

        ``x`` (B, L, D) -> visible ``(B, L_keep, D)``, mask ``(B, L)`` with 1 = hidden, ids_restore ``(B, L)``.
        """
        b, n, d = x.shape
        n_keep = int(round(n * (1 - mask_ratio)))
        noise = torch.rand(b, n, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: the first n_keep are kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :n_keep]
        visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
        mask = torch.ones(b, n, device=x.device, dtype=x.dtype)
        mask[:, :n_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return visible, mask, ids_restore

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(B, C, *S)`` -> latent ``(B, prefix + L_keep, D)``, mask ``(B, L)``, ids_restore ``(B, L)``."""
        enc = self.encoder
        x = enc.embed(imgs)  # (B, L, D)
        x, mask, ids_restore = self.random_masking(x, mask_ratio)
        x = enc.norm(enc.forward_blocks(enc.add_prefix(x)))
        return x, mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """-> ``(B, L, prod(p)·C)``."""
        return self.decoder(latent, ids_restore)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the masked patches only; visible patches do not contribute."""
        target = self.patchify(imgs).float()
        if self.cfg.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        loss = ((pred.float() - target) ** 2).mean(dim=-1)  # (B, L) per-patch loss
        mask = mask.float()
        return (loss * mask).sum() / mask.sum().clamp_min(1.0)

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> loss (scalar), pred ``(B, L, prod(p)·C)``, mask ``(B, L)``."""
        ratio = self.cfg.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(imgs, ratio)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask
