"""Masked autoencoder (He et al. 2022) for 2D and 3D images, as self pre-trained by Zhou et al. (ISBI 2023).

The encoder embeds and sees only the visible patches; a light decoder adds a mask token for each hidden patch and
predicts its voxels. Every shape is static and nothing in the step's backward scatters: the masking is a gather of
input rows, and the decoder runs in the shuffled order (attention is order-free), scoring only the hidden tokens.
Free tensors (cls token, mask token, position tables) live in small modules so ZeRO-3 gathers them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

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


class MAEOutput(NamedTuple):
    """What the MAE returns; only ``loss`` carries gradients (DeepSpeed hooks every output that does)."""

    loss: torch.Tensor
    """scalar: mean squared error over the masked patches"""
    pred: torch.Tensor
    """``(B, L_mask, prod(p)·C)`` predictions of the masked patches, in ``ids_shuffle[:, L_keep:]`` order, detached"""
    ids_shuffle: torch.Tensor
    """``(B, L)`` a permutation of the patches per sample: the first ``L_keep`` were visible"""


class MaskToken(nn.Module):
    """The learnable token that stands for every hidden patch; a module of its own so ZeRO-3 gathers it on call."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, batch: int, count: int, dtype: torch.dtype) -> torch.Tensor:
        """-> ``(batch, count, D)``."""
        return self.token.to(dtype).expand(batch, count, -1)


class MAEDecoder(nn.Module):
    """Latent ``(B, prefix + L_keep, D_enc)`` -> predictions of the masked patches ``(B, L_mask, prod(p)·C)``.

    Runs in shuffled order: the visible tokens, then one mask token per hidden patch, each with the position of the
    patch it stands for. Attention does not care about token order, so this equals MAE's un-shuffle to patch order
    (a gather whose backward is an atomic scatter) exactly, while every shape stays static.
    """

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

    def forward(self, latent: torch.Tensor, ids_shuffle: torch.Tensor) -> torch.Tensor:
        b, n = ids_shuffle.shape
        x = self.embed(latent)  # (B, prefix + L_keep, D_dec)
        prefix, visible = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens :]
        n_keep = visible.shape[1]
        x = torch.cat([visible, self.mask_token(b, n - n_keep, x.dtype)], dim=1)  # (B, L, D_dec), shuffled order
        x = self.pos_embed(x, ids_shuffle)
        x = torch.cat([prefix, x], dim=1)
        for blk in self.blocks:
            use_ckpt = self.grad_checkpointing and torch.is_grad_enabled()
            x = checkpoint(blk, x, use_reentrant=False) if use_ckpt else blk(x)
        x = x[:, self.num_prefix_tokens + n_keep :]  # the hidden patches only: nothing else is scored
        return self.pred(self.norm(x))  # (B, L_mask, prod(p)·C)


def gather_rows(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``x`` (B, L, D), ``ids`` (B, K) -> ``x[b, ids[b]]`` (B, K, D)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


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

    def num_kept(self, mask_ratio: float | None = None) -> int:
        """Visible patches per sample: ``round(L·(1 - ratio))``, a Python int, so every shape is static."""
        ratio = self.cfg.mask_ratio if mask_ratio is None else mask_ratio
        return int(round(self.cfg.num_patches * (1 - ratio)))

    def random_shuffle(self, imgs: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, L)`` per-sample permutation of the patches (argsort of uniform noise, drawn on ``imgs``' device:
        no host sync); the first ``num_kept()`` are visible."""
        if noise is None:
            noise = torch.rand(imgs.shape[0], self.cfg.num_patches, device=imgs.device)
        return torch.argsort(noise, dim=1)

    def forward_encoder(self, imgs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S)``, visible patch ids ``(B, L_keep)`` -> latent ``(B, prefix + L_keep, D)``.

        Only the visible patches are embedded: the rows are gathered from the input (which needs no gradient), so
        no backward scatters into the full grid."""
        enc = self.encoder
        rows = gather_rows(enc.patch_embed.rows(imgs), keep)  # (B, L_keep, C·prod(p))
        x = enc.pos_embed(enc.patch_embed.proj(rows), keep)  # (B, L_keep, D)
        return enc.norm(enc.forward_blocks(enc.add_prefix(x)))

    def forward_decoder(self, latent: torch.Tensor, ids_shuffle: torch.Tensor) -> torch.Tensor:
        """-> ``(B, L_mask, prod(p)·C)``, the hidden patches in ``ids_shuffle[:, L_keep:]`` order."""
        return self.decoder(latent, ids_shuffle)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Mean squared error between ``pred`` and the hidden patches ``hidden`` (B, L_mask) of ``imgs``, in fp32;
        the visible patches never enter it."""
        target = gather_rows(self.patchify(imgs), hidden).float()  # (B, L_mask, prod(p)·C)
        if self.cfg.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return ((pred.float() - target) ** 2).mean()

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float | None = None, noise: torch.Tensor | None = None
    ) -> MAEOutput:
        """``(B, C, *S)`` -> :class:`MAEOutput`; ``noise`` (B, L) fixes the masking (else drawn here)."""
        ids_shuffle = self.random_shuffle(imgs, noise)
        n_keep = self.num_kept(mask_ratio)
        latent = self.forward_encoder(imgs, ids_shuffle[:, :n_keep])
        pred = self.forward_decoder(latent, ids_shuffle)
        loss = self.forward_loss(imgs, pred, ids_shuffle[:, n_keep:])
        return MAEOutput(loss, pred.detach(), ids_shuffle)

    def prediction_in_patch_order(self, out: MAEOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """For pictures and tests, not the step: ``(pred (B, L, prod(p)·C) with zeros at visible patches,
        mask (B, L) with 1 = hidden)``."""
        b, n = out.ids_shuffle.shape
        hidden = out.ids_shuffle[:, n - out.pred.shape[1] :]
        full = out.pred.new_zeros(b, n, out.pred.shape[-1]).scatter(
            1, hidden.unsqueeze(-1).expand_as(out.pred), out.pred
        )
        mask = torch.zeros(b, n, device=full.device).scatter(1, hidden, 1.0)
        return full, mask
