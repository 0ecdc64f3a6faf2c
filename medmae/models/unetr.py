"""UNETR (Hatamizadeh et al. 2022): a ViT encoder with a convolutional decoder fed by skips from chosen blocks.

The decoder is assembled from MONAI's UNETR blocks. Unlike MONAI's UNETR (skips hard-coded at blocks 3/6/9 and patch
16), the skip blocks are configurable and the number of decoder stages follows the patch size: a patch of 2^n voxels
needs n upsamplings, so n - 1 skips plus the final tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from medmae.models.vit import EncoderModel, VisionTransformer, ViTConfig


@dataclass
class UNETRConfig(ViTConfig):
    num_classes: int = 14
    """output channels: classes including background (softmax) or regions (sigmoid)"""
    skip_indices: tuple[int, ...] = (3, 6, 9)
    """0-based encoder blocks feeding the skips, shallow to deep (the last block always feeds the bottom)"""
    feature_size: int = 16
    """decoder width at full resolution; doubles at each level down"""
    norm_name: Literal["instance", "batch", "group"] = "instance"
    """decoder normalisation"""
    res_block: bool = True
    """residual conv blocks in the decoder"""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.skip_indices = tuple(self.skip_indices)
        levels = math.log2(self.patch_size)
        if levels != int(levels) or levels < 2:
            raise ValueError(f"patch_size: UNETR needs a power of two >= 4, got {self.patch_size}")
        if len(self.skip_indices) != int(levels) - 1:
            raise ValueError(
                f"skip_indices: patch_size {self.patch_size} needs {int(levels) - 1} skips, got {self.skip_indices}"
            )
        if list(self.skip_indices) != sorted(set(self.skip_indices)) or not all(
            0 <= i < self.depth - 1 for i in self.skip_indices
        ):
            raise ValueError(
                f"skip_indices: must be increasing block indices below the last block ({self.depth - 1}), "
                f"got {self.skip_indices}"
            )
        if self.num_classes <= 0 or self.feature_size <= 0:
            raise ValueError("num_classes/feature_size: must be positive")


class UNETR(EncoderModel):
    def __init__(self, cfg: UNETRConfig) -> None:
        # MONAI (1.3 s to import) is imported where a UNETR is built, not by every process that imports medmae
        from monai.networks.blocks.dynunet_block import UnetOutBlock
        from monai.networks.blocks.unetr_block import UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock

        super().__init__()
        self.cfg = cfg
        self.encoder = VisionTransformer(cfg)
        nd, fs, hidden = cfg.spatial_dims, cfg.feature_size, cfg.embed_dim
        levels = len(cfg.skip_indices) + 1
        common = dict(spatial_dims=nd, norm_name=cfg.norm_name, res_block=cfg.res_block)
        self.stem = UnetrBasicBlock(in_channels=cfg.in_chans, out_channels=fs, kernel_size=3, stride=1, **common)
        # skip k (1-based) comes back to 1/2^k of the input size: levels - k upsamplings of the token grid.
        self.skips = nn.ModuleList(
            UnetrPrUpBlock(
                in_channels=hidden,
                out_channels=fs * 2**k,
                num_layer=levels - k - 1,
                kernel_size=3,
                stride=1,
                upsample_kernel_size=2,
                conv_block=True,
                **common,
            )
            for k in range(1, levels)
        )
        # ups[j] brings level levels-j to levels-j-1, deepest first.
        chans = [hidden] + [fs * 2 ** (levels - 1 - j) for j in range(levels)]
        self.ups = nn.ModuleList(
            UnetrUpBlock(
                in_channels=chans[j], out_channels=chans[j + 1], kernel_size=3, upsample_kernel_size=2, **common
            )
            for j in range(levels)
        )
        self.head = UnetOutBlock(spatial_dims=nd, in_channels=fs, out_channels=cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S)`` -> logits ``(B, K, *S)``."""
        last, hidden = self.encoder.forward_intermediates(x, self.cfg.skip_indices)  # maps (B, D, *grid)
        feats = [self.stem(x)] + [blk(h) for blk, h in zip(self.skips, hidden)]  # full res, 1/2, 1/4, ...
        y = self.encoder.tokens_to_output(last, "NCHW")  # (B, D, *grid): 1/2^levels
        for up, skip in zip(self.ups, reversed(feats)):
            y = up(y, skip)
        return self.head(y)
