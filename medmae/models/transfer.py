"""Pretrain -> finetune transfer of the ViT encoder.

An MAE run exports ``encoder.safetensors``: the encoder's fp32 weights (no ``encoder.`` prefix) with the encoder
config as JSON metadata, and the data plan it was pretrained on (``medmae_data_plan``: spacing, orientation,
intensity preset, crop size, channels, the datasets' manifests, mask ratio, steps; see ``medmae.tasks.plan``).
``load_encoder`` puts such weights (or a whole MAE state dict) into any model with an ``encoder``: it remaps prefixes,
interpolates learned position tables to the new grid, adapts the patch embedding to another input channel count
(timm's ``adapt_input_conv`` rule), and insists that every encoder weight is transferred — the sets of missing and
unexpected keys must both be empty.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import torch
from safetensors import safe_open
from safetensors.torch import load, save
from torch import nn

from medmae.io import atomic_write_bytes, is_url
from medmae.layers import interpolate_pos_embed

logger = logging.getLogger(__name__)

ENCODER_PREFIX = "encoder."
POS_KEY = "pos_embed.weight"
PATCH_KEY = "patch_embed.proj.weight"
CONFIG_META = "medmae_encoder_config"
PLAN_META = "medmae_data_plan"


@dataclass
class EncoderFile:
    """What an ``encoder.safetensors`` holds."""

    weights: dict[str, torch.Tensor]
    config: dict[str, Any]
    """the encoder's architecture (``ViTConfig`` fields)"""
    plan: dict[str, Any] | None
    """the pretraining data plan, or None for files written before it was recorded (or imported from MONAI)"""


def encoder_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Encoder-only view of a full model state dict (``encoder.`` keys, prefix stripped) or an encoder state dict."""
    if any(k.startswith(ENCODER_PREFIX) for k in state):
        return {k[len(ENCODER_PREFIX) :]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
    return dict(state)


def save_encoder(
    state: dict[str, torch.Tensor],
    encoder_config: dict[str, Any],
    path: str | os.PathLike,
    plan: dict[str, Any] | None = None,
) -> Path:
    """Write encoder weights as consolidated fp32 safetensors with the config (and the data plan, when given) as
    metadata, atomically."""
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in encoder_weights(state).items()}
    metadata = {"format": "pt", CONFIG_META: json.dumps(encoder_config)}
    if plan is not None:
        metadata[PLAN_META] = json.dumps(plan)
    return atomic_write_bytes(path, save(tensors, metadata=metadata))


def read_encoder(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """-> (weights, encoder config) of an ``encoder.safetensors`` file (see :func:`open_encoder`)."""
    f = open_encoder(path)
    return f.weights, f.config


def open_encoder(path: str | os.PathLike) -> EncoderFile:
    """Weights, encoder config and data plan of an ``encoder.safetensors`` file: a local path or an fsspec URL
    (``s3://bucket/runs/pretrain/checkpoint_…/encoder.safetensors``; endpoint and credentials from the environment,
    ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, …)."""
    path = str(path)
    if is_url(path):
        try:
            with fsspec.open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise ValueError(f"pretrained encoder {path} does not exist") from None
        weights = load(data)
        meta = _metadata(data)
    else:
        if not Path(path).is_file():
            raise ValueError(f"pretrained encoder {path} does not exist")
        with safe_open(path, framework="pt") as f:  # memory-mapped: nothing read twice
            meta = f.metadata() or {}
            weights = {k: f.get_tensor(k) for k in f.keys()}
    if CONFIG_META not in meta:
        raise ValueError(
            f"{path} has no medmae encoder config in its metadata; was it written by save_encoder? (MONAI weights: "
            "convert them with tools/import_monai.py)"
        )
    config = json.loads(meta[CONFIG_META])
    config.pop("grad_checkpointing", None)  # a runtime switch that files before 0.2 recorded as architecture
    plan = json.loads(meta[PLAN_META]) if PLAN_META in meta else None
    return EncoderFile(weights, config, plan)


def _metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes (the safetensors package reads it only from files): the format is an
    8-byte little-endian header length, then that many bytes of JSON."""
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + size]).get("__metadata__") or {}


def _source_grid(weights: dict[str, torch.Tensor], source_cfg: dict[str, Any] | None, ndim: int) -> tuple[int, ...]:
    if source_cfg is not None:
        return tuple(s // source_cfg["patch_size"] for s in source_cfg["img_size"])
    n = weights[POS_KEY].shape[1]
    side = round(n ** (1 / ndim))
    if side**ndim != n:
        raise ValueError(f"cannot infer the source grid of a {n}-token position table; pass the source config")
    return (side,) * ndim


def adapt_input_channels(weight: torch.Tensor, in_chans: int) -> tuple[torch.Tensor, str]:
    """A patch embedding's weight ``(D, C, *patch)`` for ``in_chans`` input channels, and the rule applied in words.

    timm's ``adapt_input_conv`` rule: C -> 1 sums the channels' weights; C -> N repeats them cyclically up to N and
    scales by C / N (1 -> N: every channel gets the weight / N). Either way an image repeated in every channel gives
    the original patch tokens when the source had one channel or the target has one.
    """
    from timm.models import adapt_input_conv  # timm (with torchvision, 1.4 s) only where a transfer needs it

    d, c, *patch = weight.shape
    if in_chans == c:
        return weight, "unchanged"
    # timm's function takes a 4-D conv weight (O, I, H, W) and only touches dim 1: a 3-D kernel (D, C, p0, p1, p2)
    # folded to (D, C, p0, p1·p2) is such a weight, unfolded again afterwards (a 2-D kernel folds to itself).
    adapted = adapt_input_conv(in_chans, weight.reshape(d, c, patch[0], -1), base_chans=c)
    if in_chans == 1:
        rule = f"sum of the {c} channels' weights"
    elif in_chans % c == 0:
        rule = f"the {c}-channel weights repeated {in_chans // c}x, scaled by {c}/{in_chans}"
    else:
        rule = f"the {c}-channel weights repeated cyclically to {in_chans} channels, scaled by {c}/{in_chans}"
    return adapted.reshape(d, in_chans, *patch), rule


def load_encoder(
    model: nn.Module, state: dict[str, torch.Tensor], source_cfg: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Load encoder weights into ``model.encoder`` with an exact key check. Returns what was done:
    ``{"loaded": n, "interpolated": [...], "channels": {"from", "to", "rule"}}`` (``channels`` only when adapted).

    A different input channel count adapts the patch embedding (:func:`adapt_input_channels`). Raises
    ``ValueError`` naming the keys when any encoder weight would be left at its initial value, any source weight
    would be dropped, or a shape cannot be reconciled (e.g. a different patch size or width).
    """
    encoder = model.encoder
    weights = encoder_weights(state)
    target = encoder.state_dict()
    report: dict[str, Any] = {"interpolated": []}
    src, dst = weights.get(PATCH_KEY), target.get(PATCH_KEY)
    if src is not None and dst is not None and src.shape[1] != dst.shape[1]:
        if src.shape[0] == dst.shape[0] and src.shape[2:] == dst.shape[2:]:  # only the channels differ
            weights[PATCH_KEY], rule = adapt_input_channels(src, dst.shape[1])
            report["channels"] = {"from": int(src.shape[1]), "to": int(dst.shape[1]), "rule": rule}
            logger.info("input channels %d -> %d: patch embedding adapted (%s)", src.shape[1], dst.shape[1], rule)
    if POS_KEY in weights and POS_KEY in target and weights[POS_KEY].shape != target[POS_KEY].shape:
        new_grid = encoder.patch_embed.grid_size
        old_grid = _source_grid(weights, source_cfg, len(new_grid))
        weights[POS_KEY] = interpolate_pos_embed(weights[POS_KEY], old_grid, new_grid)
        report["interpolated"].append(f"{POS_KEY}: grid {old_grid} -> {new_grid}")
    eps = (source_cfg or {}).get("norm_eps", 1e-6)  # files before norm_eps existed were all 1e-6
    if source_cfg is not None and eps != encoder.cfg.norm_eps:
        logger.warning(
            "the encoder was trained with LayerNorm eps %g, this model uses %g: set model.norm_eps=%g to compute "
            "exactly what it computed",
            eps,
            encoder.cfg.norm_eps,
            eps,
        )
        report["norm_eps"] = {"from": eps, "to": encoder.cfg.norm_eps}
    missing = sorted(set(target) - set(weights))
    unexpected = sorted(set(weights) - set(target))
    if missing or unexpected:
        raise ValueError(
            f"encoder transfer is not exact: missing {missing or 'none'}, unexpected {unexpected or 'none'} "
            "(fixed sin-cos tables are recomputed, never stored; a learned table needs pos_embed: learned on both)"
        )
    bad = [
        f"{k}: source {tuple(v.shape)} vs model {tuple(target[k].shape)}"
        for k, v in weights.items()
        if v.shape != target[k].shape
    ]
    if bad:
        raise ValueError("encoder transfer shape mismatch: " + "; ".join(bad))
    encoder.load_state_dict(weights, strict=True)
    report["loaded"] = len(weights)
    return report
