"""Position embeddings: fixed sin-cos over a 2D/3D grid, learnable, and interpolation to a new grid."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """``dim`` even; ``pos`` (M,) -> (M, dim) as [sin | cos] with MAE's 1/10000^(2i/dim) frequencies."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.double()[:, None] * omega[None]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_pos_embed(embed_dim: int, grid_size: Sequence[int], num_prefix_tokens: int = 0) -> torch.Tensor:
    """Fixed sin-cos table ``(1, prefix + prod(grid), D)``; prefix tokens get zeros.

    Each axis gets an even share ``2·⌊D / 2n⌋`` of the channels; any remainder (D not divisible by 2n) is zero so
    every embed_dim works.
    """
    n = len(grid_size)
    axis_dim = 2 * (embed_dim // (2 * n))
    if axis_dim == 0:
        raise ValueError(f"embed_dim {embed_dim} is too small for a {n}D sin-cos embedding")
    coords = torch.meshgrid(*[torch.arange(g) for g in grid_size], indexing="ij")
    parts = [_sincos_1d(axis_dim, c.reshape(-1)) for c in coords]
    emb = torch.cat(parts, dim=1)
    emb = F.pad(emb, (0, embed_dim - emb.shape[1]))
    emb = torch.cat([torch.zeros(num_prefix_tokens, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float().unsqueeze(0)


def interpolate_pos_embed(
    pos_embed: torch.Tensor, old_grid: Sequence[int], new_grid: Sequence[int], num_prefix_tokens: int = 0
) -> torch.Tensor:
    """Resample a ``(1, prefix + prod(old_grid), D)`` table to ``new_grid`` (bicubic 2D / trilinear 3D)."""
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if old_grid == new_grid:
        return pos_embed
    if len(old_grid) != len(new_grid):
        raise ValueError(f"cannot interpolate a {len(old_grid)}D position embedding to {len(new_grid)}D")
    prefix, grid_tokens = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    d = pos_embed.shape[-1]
    x = grid_tokens.reshape(1, *old_grid, d).movedim(-1, 1).float()  # (1, D, *old_grid)
    mode = "bicubic" if len(old_grid) == 2 else "trilinear"
    x = F.interpolate(x, size=new_grid, mode=mode, align_corners=False)
    x = x.movedim(1, -1).reshape(1, -1, d).to(pos_embed.dtype)
    return torch.cat([prefix, x], dim=1)


class PosEmbed(nn.Module):
    """Adds position embeddings to ``(B, L, D)`` patch tokens; prefix (cls) tokens carry no position.

    Owning the table in its own module keeps it ZeRO-3 safe: DeepSpeed gathers a partitioned parameter when the
    module holding it is called. Fixed sin-cos tables are non-persistent buffers, so checkpoints never carry them
    and a model built for another grid recomputes its own exactly.
    """

    def __init__(self, embed_dim: int, grid_size: Sequence[int], learnable: bool) -> None:
        super().__init__()
        self.grid_size = tuple(grid_size)
        self.learnable = learnable
        table = sincos_pos_embed(embed_dim, grid_size)
        if learnable:
            self.weight = nn.Parameter(table)
        else:
            self.register_buffer("weight", table, persistent=False)

    def reset_parameters(self) -> None:
        table = sincos_pos_embed(self.weight.shape[-1], self.grid_size)
        with torch.no_grad():
            self.weight.copy_(table)

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, L, D)`` -> same shape; with ``ids`` (B, K) the tokens ``x`` (B, K, D) stand for those patches."""
        table = self.weight.to(x.dtype)  # under bf16 autocast an fp32 table would upcast every token
        if ids is None:
            return x + table
        return x + torch.gather(table.expand(x.shape[0], -1, -1), 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
