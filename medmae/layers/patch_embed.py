"""Patch embedding and the patchify/unpatchify pair for 2D and 3D images."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def patchify(imgs: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    """``(B, C, *S)`` -> ``(B, L, prod(p)·C)``; each row lists one patch's voxels in (p..., C) order."""
    b, c, *spatial = imgs.shape
    n = len(spatial)
    grid = [s // p for s, p in zip(spatial, patch_size)]
    # (B, C, g0, p0, g1, p1, ...) -> (B, g0, g1, ..., p0, p1, ..., C)
    x = imgs.reshape(b, c, *[d for g, p in zip(grid, patch_size) for d in (g, p)])
    perm = [0] + [2 + 2 * i for i in range(n)] + [3 + 2 * i for i in range(n)] + [1]
    x = x.permute(*perm)
    return x.reshape(b, -1, math.prod(patch_size) * c)


def unpatchify(x: torch.Tensor, patch_size: Sequence[int], grid_size: Sequence[int], channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``(B, L, prod(p)·C)`` -> ``(B, C, *S)``."""
    b = x.shape[0]
    n = len(grid_size)
    x = x.reshape(b, *grid_size, *patch_size, channels)
    # (B, g0.., p0.., C) -> (B, C, g0, p0, g1, p1, ...)
    perm = [0, 1 + 2 * n] + [d for i in range(n) for d in (1 + i, 1 + n + i)]
    x = x.permute(*perm)
    return x.reshape(b, channels, *[g * p for g, p in zip(grid_size, patch_size)])


class PatchProjection(nn.Module):
    """The patch embedding's weights in a strided conv's layout ``(D, C, *patch)`` (checkpoints and MONAI/timm
    conversions keep working), applied as one matmul to patches already laid out as rows.

    A module of its own, called in forward, so DeepSpeed ZeRO-3 gathers its partitioned weight through its hooks
    rather than through the external-parameter path that reading a child's weight from the parent relies on.
    """

    def __init__(self, in_chans: int, embed_dim: int, patch_size: Sequence[int]) -> None:
        super().__init__()
        self.out_channels = embed_dim
        conv = {2: nn.Conv2d, 3: nn.Conv3d}[len(patch_size)](in_chans, embed_dim, patch_size, stride=patch_size)
        self.weight = nn.Parameter(conv.weight.detach().clone())  # conv's default init until init_weights runs
        self.bias = nn.Parameter(conv.bias.detach().clone())

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """``(B, L, C·prod(p))`` in ``(C, *patch)`` order -> ``(B, L, D)``."""
        return F.linear(rows, self.weight.reshape(self.out_channels, -1), self.bias)


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens: a conv with kernel = stride = patch, for 2D or 3D input.

    ``(B, C, *img_size)`` -> ``(B, L, D)`` with ``L = prod(img_size / patch_size)``. The weight keeps the conv layout
    ``(D, C, *patch)``, but the product runs as one matmul over patchified voxels: identical maths, and on CPU the
    bf16 Conv3d backward alone took over half of a ViT-B/16 96³ training step.
    """

    def __init__(self, img_size: Sequence[int], patch_size: Sequence[int], in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.spatial_dims = len(img_size)
        self.img_size = tuple(img_size)
        self.patch_size = tuple(patch_size)
        for s, p in zip(self.img_size, self.patch_size):
            if s % p:
                raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        self.grid_size = tuple(s // p for s, p in zip(self.img_size, self.patch_size))
        self.num_patches = math.prod(self.grid_size)
        self.proj = PatchProjection(in_chans, embed_dim, self.patch_size)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *img_size)`` -> ``(B, L, C·prod(p))``, each patch a row in the conv weight's (C, *patch) order."""
        if tuple(x.shape[2:]) != self.img_size:
            raise ValueError(f"input spatial size {tuple(x.shape[2:])} does not match the model's {self.img_size}")
        b, c = x.shape[:2]
        n = self.spatial_dims
        # (B, C, g0, p0, g1, p1, ...) -> (B, g0, g1, ..., C, p0, p1, ...)
        x = x.reshape(b, c, *[d for g, p in zip(self.grid_size, self.patch_size) for d in (g, p)])
        x = x.permute(0, *[2 + 2 * i for i in range(n)], 1, *[3 + 2 * i for i in range(n)])
        return x.reshape(b, self.num_patches, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.rows(x))
