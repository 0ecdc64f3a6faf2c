"""Building blocks shared by every model: patch embedding, position embeddings, attention, transformer blocks."""

from medmae.layers.attention import Attention
from medmae.layers.block import Block, PrefixTokens
from medmae.layers.patch_embed import PatchEmbed, patchify, unpatchify
from medmae.layers.pos_embed import PosEmbed, interpolate_pos_embed, sincos_pos_embed

__all__ = [
    "Attention",
    "Block",
    "PatchEmbed",
    "PosEmbed",
    "PrefixTokens",
    "interpolate_pos_embed",
    "patchify",
    "sincos_pos_embed",
    "unpatchify",
]
