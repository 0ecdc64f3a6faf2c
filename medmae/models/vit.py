"""Vision Transformer encoder for 2D and 3D images, with timm's encoder interface.

Stages: ``embed`` (patches + position) -> ``PrefixTokens`` (cls) -> ``forward_blocks`` -> ``norm``. MAE runs the same
stages with masking between embed and prefix; UNETR takes skips through ``forward_intermediates``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from medmae.config import Range, check_ranges
from medmae.layers import Block, PatchEmbed, PosEmbed, PrefixTokens


@dataclass
class ViTConfig:
    img_size: tuple[int, ...] = (96, 96, 96)
    """input spatial size; its length sets 2D or 3D (create_model and model.img_size also take one size: a cube)"""
    patch_size: Annotated[int, Range(ge=1)] = 16
    """cubic/square patch edge in voxels"""
    in_chans: Annotated[int, Range(ge=1)] = 1
    """input channels (CT 1, BraTS MRI 4, X-ray 1 or 3)"""
    embed_dim: Annotated[int, Range(ge=1)] = 768
    """token width"""
    depth: Annotated[int, Range(ge=1)] = 12
    """number of transformer blocks"""
    num_heads: Annotated[int, Range(ge=1)] = 12
    """attention heads per block"""
    mlp_ratio: Annotated[float, Range(gt=0)] = 4.0
    """MLP hidden width / embed_dim"""
    qkv_bias: bool = True
    """bias on the qkv projection"""
    drop_path_rate: Annotated[float, Range(ge=0, lt=1)] = 0.0
    """stochastic depth, linearly increasing to this value over the blocks"""
    pos_embed: Literal["sincos", "learned"] = "sincos"
    """fixed sin-cos (MAE) or learned position embeddings"""
    cls_token: bool = True
    """prepend a learnable cls token"""
    norm_eps: Annotated[float, Range(gt=0)] = 1e-6
    """LayerNorm epsilon of the encoder: 1e-6 as in MAE and timm; weights imported from MONAI (PyTorch's default
    1e-5) keep theirs, so the encoder computes exactly what MONAI's did"""

    def __post_init__(self) -> None:
        check_ranges(self)
        if isinstance(self.img_size, int) or len(self.img_size) == 1:
            # Only the registered flavour knows its dims: create_model / model.img_size broadcast one size.
            raise ValueError(
                f"img_size: one size ({self.img_size}) needs the model's spatial dims; give one per "
                "dim, e.g. (96, 96, 96), or pass it to create_model, which broadcasts it"
            )
        self.img_size = tuple(self.img_size)
        if len(self.img_size) not in (2, 3) or min(self.img_size) < 1:
            raise ValueError(f"img_size: expected 2 or 3 positive sizes, got {self.img_size}")
        if any(s % self.patch_size for s in self.img_size):
            raise ValueError(f"img_size: {self.img_size} is not divisible by patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim: {self.embed_dim} is not divisible by num_heads {self.num_heads}")

    @property
    def spatial_dims(self) -> int:
        return len(self.img_size)

    @property
    def patch(self) -> tuple[int, ...]:
        return (self.patch_size,) * self.spatial_dims  # timm's to_ntuple for an int, without importing timm here

    @property
    def grid_size(self) -> tuple[int, ...]:
        return tuple(s // self.patch_size for s in self.img_size)

    @property
    def num_patches(self) -> int:
        """Patch tokens per sample (prefix tokens not counted)."""
        return math.prod(self.grid_size)

    def encoder_dict(self) -> dict:
        """Only the encoder's fields: what a model built on this encoder must agree on to take its weights."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(ViTConfig)}


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_dim = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch, cfg.in_chans, cfg.embed_dim)
        self.pos_embed = PosEmbed(cfg.embed_dim, self.patch_embed.grid_size, learnable=cfg.pos_embed == "learned")
        self.num_prefix_tokens = 1 if cfg.cls_token else 0
        self.cls_token = PrefixTokens(1, cfg.embed_dim) if cfg.cls_token else None
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # no tensor: meta-safe
        self.blocks = nn.ModuleList(
            Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, drop_path=dpr[i], norm_eps=cfg.norm_eps)
            for i in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.grad_checkpointing = False  # a runtime switch (set_grad_checkpointing), not part of the architecture
        self.init_weights()

    # ---- initialisation -------------------------------------------------------------------------------------------
    def init_weights(self) -> None:
        """MAE's init: xavier-uniform linears and patch projection, N(0, .02) tokens, sin-cos table recomputed.

        Explicit so it can be re-run after meta-device construction or ZeRO-3 partitioning."""
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        self.pos_embed.reset_parameters()  # learned tables start from sin-cos too
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token.tokens, std=0.02)
        self.blocks.apply(init_linear_and_norm)
        init_linear_and_norm(self.norm)

    # ---- timm encoder interface -----------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Token and position parameters (norms and biases are excluded by the optimizer's 1-D rule)."""
        names = {n for n, _ in self.named_parameters()}
        return names & {"pos_embed.weight", "cls_token.tokens"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False, prefix: str = "") -> dict:
        r"""Parameter-name regexes -> layer ids for layer-wise lr decay (timm's ``param_groups_layer_decay``).

        ``prefix`` (e.g. ``r"encoder\."``) matches the encoder's parameters inside a larger model, whose own
        ``group_matcher`` delegates here; unmatched parameters (decoder, heads) form the last group.
        """
        p = f"^{prefix}"
        return {
            "stem": rf"{p}cls_token|{p}pos_embed|{p}patch_embed",
            "blocks": rf"{p}blocks\.(\d+)" if coarse else [(rf"{p}blocks\.(\d+)", None), (rf"{p}norm", (99999,))],
        }

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    # ---- stages ---------------------------------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S)`` -> ``(B, L, D)`` patch tokens with position, no prefix tokens."""
        return self.pos_embed(self.patch_embed(x))

    def add_prefix(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L, D)`` -> ``(B, prefix + L, D)``."""
        return self.cls_token(x) if self.cls_token is not None else x

    def run_block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        blk = self.blocks[i]
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(blk, x, use_reentrant=False)
        return blk(x)

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(len(self.blocks)):
            x = self.run_block(i, x)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S)`` -> normed tokens ``(B, prefix + L, D)``."""
        return self.norm(self.forward_blocks(self.add_prefix(self.embed(x))))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        output_fmt: Literal["NCHW", "NLC"] = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Outputs of the blocks at ``indices`` (0-based; an int n means the last n), prefix tokens dropped.

        ``output_fmt="NCHW"`` gives spatial maps ``(B, D, *grid)`` (NCDHW in 3D), ``"NLC"`` tokens ``(B, L, D)``.
        Returns the intermediates, or ``(final normed tokens (B, prefix + L, D), intermediates)``.
        """
        depth = len(self.blocks)
        if indices is None:
            take = list(range(depth))
        elif isinstance(indices, int):
            take = list(range(depth - indices, depth))
        else:
            take = [i if i >= 0 else depth + i for i in indices]
        if any(not 0 <= i < depth for i in take):
            raise ValueError(f"indices {indices} out of range for an encoder of depth {depth}")
        x = self.add_prefix(self.embed(x))
        last = depth if not intermediates_only else max(take) + 1
        out = []
        for i in range(last):
            x = self.run_block(i, x)
            if i in take:
                y = self.norm(x) if norm else x
                out.append(self.tokens_to_output(y, output_fmt))
        if intermediates_only:
            return out
        return self.norm(x), out

    def tokens_to_output(self, x: torch.Tensor, output_fmt: str) -> torch.Tensor:
        """Drop prefix tokens; ``(B, L, D)`` or ``(B, D, *grid)``."""
        x = x[:, self.num_prefix_tokens :]
        if output_fmt == "NLC":
            return x
        return x.transpose(1, 2).reshape(x.shape[0], self.embed_dim, *self.patch_embed.grid_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


class EncoderModel(nn.Module):
    """A model built around ``self.encoder`` (MAE, UNETR, classifier): the timm optimizer/checkpointing interface
    delegates to the encoder, whose layers drive layer-wise lr decay; everything else is the last layer."""

    encoder: VisionTransformer

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()}

    def group_matcher(self, coarse: bool = False) -> dict:
        # Always the coarse form: the encoder's final norm then shares the heads' full lr, as in MAE's fine-tuning.
        return self.encoder.group_matcher(coarse=True, prefix=r"encoder\.")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)


def init_linear_and_norm(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
