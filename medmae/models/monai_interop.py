"""Our models in MONAI's own layout, and MONAI's ViT/UNETR weights as our encoder.

Key maps (ours -> ``monai.networks.nets.ViT``): ``patch_embed.proj`` -> ``patch_embedding.patch_embeddings`` (both a
conv kernel ``(D, C, *patch)``, tokens in the same grid order), the position table -> ``patch_embedding.
position_embeddings`` (a fixed sin-cos table is written into MONAI's learnable one: same numbers, same outputs),
``cls_token.tokens`` -> ``cls_token``, ``blocks.i.attn.proj`` -> ``blocks.i.attn.out_proj``, ``blocks.i.mlp.fc1/fc2``
-> ``blocks.i.mlp.linear1/linear2``; norms and ``attn.qkv`` keep their names (MONAI splits qkv as ``(qkv l d)``, our
layout too). MONAI's ``TransformerBlock`` always holds an unused ``norm_cross_attn``: exported as the identity
LayerNorm, dropped on import. UNETR's decoder is built from MONAI's own blocks, so only their prefixes move:
``stem`` -> ``encoder1``, ``skips.k`` -> ``encoder{k+2}``, ``ups.j`` -> ``decoder{5-j}``, ``head`` -> ``out``.

MONAI's UNETR is narrower than ours: 12 blocks, patch 16, skips from blocks 3/6/9, no cls token; its ViT has a cls
token only with its classification head (``x[:, 0]`` after the final norm: our ``global_pool: token``). Models
outside that are refused, naming the setting.

LayerNorm epsilon is the one constant a state dict cannot carry, and MONAI's constructors fix it at PyTorch's 1e-5
where our encoders default to 1e-6 (``norm_eps``). A model with ``norm_eps: 1e-5`` (any encoder imported from MONAI)
gives MONAI's network exactly; for the others ``build_monai(..., norm_eps=...)`` sets their epsilon on the MONAI
network's norms, without which outputs move by ~1e-5 relative (measured in the tests).
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn

from medmae.models.classifier import ViTClassifier
from medmae.models.unetr import UNETR
from medmae.models.vit import VisionTransformer

__all__ = ["monai_layout", "to_monai", "build_monai", "encoder_from_monai"]

_BLOCK_RENAMES = (("attn.proj.", "attn.out_proj."), ("mlp.fc1.", "mlp.linear1."), ("mlp.fc2.", "mlp.linear2."))
_UNETR_PREFIXES = {"stem.": "encoder1.", "head.": "out."}
_UNETR_PREFIXES.update({f"skips.{k}.": f"encoder{k + 2}." for k in range(3)})
_UNETR_PREFIXES.update({f"ups.{j}.": f"decoder{5 - j}." for j in range(4)})


def _refuse(what: str, value: Any, why: str) -> ValueError:
    return ValueError(f"{what}: {value!r} has no MONAI equivalent ({why}); this model cannot be exported to MONAI")


def _vit_kwargs(encoder: VisionTransformer) -> dict[str, Any]:
    cfg = encoder.cfg
    mlp_dim = cfg.embed_dim * cfg.mlp_ratio
    if mlp_dim != int(mlp_dim):
        raise _refuse("mlp_ratio", cfg.mlp_ratio, "MONAI takes an integer mlp_dim")
    return {
        "in_channels": cfg.in_chans,
        "img_size": list(cfg.img_size),
        "hidden_size": cfg.embed_dim,
        "mlp_dim": int(mlp_dim),
        "num_heads": cfg.num_heads,
        "qkv_bias": cfg.qkv_bias,
        "spatial_dims": cfg.spatial_dims,
        "dropout_rate": 0.0,
    }


def monai_layout(model: nn.Module) -> tuple[str, dict[str, Any]]:
    """``(MONAI class name, constructor kwargs)`` of the MONAI network equal to ``model`` (a UNETR, a classifier
    or a bare encoder); ``ValueError`` naming the setting where MONAI's network cannot express ours."""
    if isinstance(model, UNETR):
        cfg = model.cfg
        for key, value, wanted, why in (
            ("patch_size", cfg.patch_size, 16, "MONAI's UNETR fixes patch 16"),
            ("depth", cfg.depth, 12, "MONAI's UNETR fixes 12 blocks"),
            ("skip_indices", tuple(cfg.skip_indices), (3, 6, 9), "MONAI's UNETR takes its skips from blocks 3, 6, 9"),
            ("cls_token", cfg.cls_token, False, "MONAI's UNETR has no cls token"),
        ):
            if value != wanted:
                raise _refuse(f"model.{key}", value, why)
        kw = _vit_kwargs(model.encoder)
        kw.update(out_channels=cfg.num_classes, feature_size=cfg.feature_size, norm_name=cfg.norm_name)
        kw.update(res_block=cfg.res_block, conv_block=True, proj_type="conv")
        return "UNETR", kw
    if isinstance(model, ViTClassifier):
        ccfg = model.cfg
        if ccfg.global_pool != "token":
            raise _refuse("model.global_pool", ccfg.global_pool, "MONAI's ViT classifies from the cls token only")
        kw = _vit_kwargs(model.encoder)
        kw.update(patch_size=ccfg.patch_size, num_layers=ccfg.depth, classification=True, num_classes=ccfg.num_classes)
        kw.update(post_activation="none", proj_type="conv", pos_embed_type="learnable")
        return "ViT", kw
    encoder = model if isinstance(model, VisionTransformer) else getattr(model, "encoder", None)
    if not isinstance(encoder, VisionTransformer):
        raise ValueError(f"{type(model).__name__}: not a medmae UNETR, classifier or ViT encoder")
    if encoder.cfg.cls_token:
        raise _refuse("cls_token", True, "MONAI's ViT has a cls token only together with its classification head")
    kw = _vit_kwargs(encoder)
    kw.update(patch_size=encoder.cfg.patch_size, num_layers=encoder.cfg.depth, classification=False)
    kw.update(proj_type="conv", pos_embed_type="learnable")
    return "ViT", kw


def _encoder_to_monai(encoder: VisionTransformer, prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in encoder.state_dict().items():
        if k == "patch_embed.proj.weight":
            k = "patch_embedding.patch_embeddings.weight"
        elif k == "patch_embed.proj.bias":
            k = "patch_embedding.patch_embeddings.bias"
        elif k == "pos_embed.weight":
            continue  # below, also when it is a non-persistent sin-cos buffer
        elif k == "cls_token.tokens":
            k = "cls_token"
        elif k.startswith("blocks."):
            for a, b in _BLOCK_RENAMES:
                k = k.replace(a, b)
        out[prefix + k] = v
    out[prefix + "patch_embedding.position_embeddings"] = encoder.pos_embed.weight
    d = encoder.embed_dim
    for i in range(len(encoder.blocks)):  # MONAI's always-built, never-used cross-attention norm
        out[f"{prefix}blocks.{i}.norm_cross_attn.weight"] = torch.ones(d)
        out[f"{prefix}blocks.{i}.norm_cross_attn.bias"] = torch.zeros(d)
    return out


def to_monai(model: nn.Module) -> tuple[dict[str, torch.Tensor], str, dict[str, Any]]:
    """``(state dict, MONAI class name, kwargs)``: ``getattr(monai.networks.nets, name)(**kwargs)`` loads the
    state dict with ``strict=True`` and computes what ``model`` computes (see :func:`build_monai`)."""
    name, kwargs = monai_layout(model)
    if isinstance(model, UNETR):
        state = _encoder_to_monai(model.encoder, "vit.")
        for k, v in model.state_dict().items():
            for a, b in _UNETR_PREFIXES.items():
                if k.startswith(a):
                    state[b + k[len(a) :]] = v
    elif isinstance(model, ViTClassifier):
        state = _encoder_to_monai(model.encoder, "")
        state["classification_head.weight"] = model.head.weight
        state["classification_head.bias"] = model.head.bias
    else:
        encoder = model if isinstance(model, VisionTransformer) else model.encoder
        state = _encoder_to_monai(encoder, "")
    return {k: v.detach().float().cpu().contiguous().clone() for k, v in state.items()}, name, kwargs


def build_monai(
    name: str, kwargs: dict[str, Any], state: dict[str, torch.Tensor] | None = None, norm_eps: float | None = None
) -> nn.Module:
    """The MONAI network ``name`` (``UNETR`` or ``ViT``) from :func:`to_monai`'s kwargs, with ``state`` loaded
    strictly when given, and ``norm_eps`` (the exported model's ``cfg.norm_eps``) set on its LayerNorms."""
    from monai.networks import nets  # MONAI (1.3 s to import) only where a MONAI network is built

    if name not in ("UNETR", "ViT"):
        raise ValueError(f"MONAI network {name!r}: expected UNETR or ViT")
    net = getattr(nets, name)(**kwargs)
    if state is not None:
        net.load_state_dict(state, strict=True)
    if norm_eps is not None:
        for m in net.modules():
            if isinstance(m, nn.LayerNorm):
                m.eps = norm_eps
    return net


def encoder_from_monai(
    state: dict[str, torch.Tensor], *, num_heads: int = 12, img_size: tuple[int, ...] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """MONAI ``ViT`` or ``UNETR`` weights (a state dict, e.g. a MONAI bundle's ``models/model.pt`` read with
    ``torch.load(..., weights_only=True)``) -> ``(encoder weights, encoder config)`` for :func:`save_encoder` and
    :func:`load_encoder`.

    The state dict fixes every size but two: ``num_heads`` (MONAI's default 12) and, for a non-cubic input,
    ``img_size`` (else a cube is inferred from the position table). Its learnable position table becomes
    ``pos_embed: learned``, MONAI's LayerNorm epsilon ``norm_eps: 1e-5``; a UNETR's decoder is left behind.
    """
    state = {k.removeprefix("module."): v for k, v in state.items()}  # DataParallel / DDP saves
    if any(k.startswith("vit.") for k in state):  # a UNETR (or a model wrapping a ViT as .vit)
        state = {k[4:]: v for k, v in state.items() if k.startswith("vit.")}
    key = "patch_embedding.patch_embeddings.weight"
    if key not in state:
        raise ValueError(
            f"not a MONAI ViT/UNETR state dict: no {key} (the perceptron patch embedding is not supported); "
            f"keys start {sorted(state)[:5]}"
        )
    patch_w = state[key]
    embed_dim, in_chans, *patch = patch_w.shape
    if len(set(patch)) != 1:
        raise ValueError(f"{key}: patch {patch} is not cubic/square; medmae's ViT takes one patch edge")
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    grid_tokens = state["patch_embedding.position_embeddings"].shape[1]
    if img_size is None:
        side = round(grid_tokens ** (1 / len(patch)))
        if side ** len(patch) != grid_tokens:
            raise ValueError(f"a {grid_tokens}-token position table is not a cube or square: pass img_size")
        img_size = (side * patch[0],) * len(patch)
    img_size = tuple(img_size) * len(patch) if len(img_size) == 1 else tuple(img_size)  # one size: a cube
    if len(img_size) != len(patch):
        raise ValueError(f"img_size {list(img_size)}: the weights are {len(patch)}D")
    if math.prod(s // patch[0] for s in img_size) != grid_tokens:
        raise ValueError(f"img_size {list(img_size)} with patch {patch[0]} does not give {grid_tokens} tokens")
    cls = "cls_token" in state
    config = {
        "img_size": list(img_size),
        "patch_size": patch[0],
        "in_chans": in_chans,
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": num_heads,
        "mlp_ratio": state["blocks.0.mlp.linear1.weight"].shape[0] / embed_dim,
        "qkv_bias": "blocks.0.attn.qkv.bias" in state,
        "drop_path_rate": 0.0,
        "pos_embed": "learned",
        "cls_token": cls,
        "norm_eps": 1e-5,  # MONAI's LayerNorms take PyTorch's default
    }
    weights: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k == key:
            weights["patch_embed.proj.weight"] = v
        elif k == "patch_embedding.patch_embeddings.bias":
            weights["patch_embed.proj.bias"] = v
        elif k == "patch_embedding.position_embeddings":
            weights["pos_embed.weight"] = v
        elif k == "cls_token":
            weights["cls_token.tokens"] = v
        elif k.startswith("norm."):
            weights[k] = v
        elif k.startswith("blocks.") and ".norm_cross_attn." not in k:
            for a, b in _BLOCK_RENAMES:
                k = k.replace(b, a)
            weights[k] = v
        # classification_head.*: MONAI's classifier head is not part of the encoder
    return weights, config
