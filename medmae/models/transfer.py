"""Pretrain -> finetune transfer of the ViT encoder.

An MAE run exports ``encoder.safetensors``: the encoder's fp32 weights (no ``encoder.`` prefix) with the encoder
config as JSON metadata. ``load_encoder`` puts such weights (or a whole MAE state dict) into any model with an
``encoder``: it remaps prefixes, interpolates learned position tables to the new grid, and insists that every
encoder weight is transferred — the sets of missing and unexpected keys must both be empty.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import fsspec
import torch
from safetensors import safe_open
from safetensors.torch import load, save
from torch import nn

from medmae.io import atomic_write_bytes, is_url
from medmae.layers import interpolate_pos_embed

ENCODER_PREFIX = "encoder."
POS_KEY = "pos_embed.weight"


def encoder_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Encoder-only view of a full model state dict (``encoder.`` keys, prefix stripped) or an encoder state dict."""
    if any(k.startswith(ENCODER_PREFIX) for k in state):
        return {k[len(ENCODER_PREFIX) :]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
    return dict(state)


def save_encoder(state: dict[str, torch.Tensor], encoder_config: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write encoder weights as consolidated fp32 safetensors with the config as metadata, atomically."""
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in encoder_weights(state).items()}
    metadata = {"format": "pt", "medmae_encoder_config": json.dumps(encoder_config)}
    return atomic_write_bytes(path, save(tensors, metadata=metadata))


def read_encoder(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """-> (weights, encoder config) from an ``encoder.safetensors`` file: a local path or an fsspec URL
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
    if "medmae_encoder_config" not in meta:
        raise ValueError(f"{path} has no medmae encoder config in its metadata; was it written by save_encoder?")
    config = json.loads(meta["medmae_encoder_config"])
    config.pop("grad_checkpointing", None)  # a runtime switch that files before 0.2 recorded as architecture
    return weights, config


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


def load_encoder(
    model: nn.Module, state: dict[str, torch.Tensor], source_cfg: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Load encoder weights into ``model.encoder`` with an exact key check. Returns what was done.

    Raises ``ValueError`` naming the keys when any encoder weight would be left at its initial value, any source
    weight would be dropped, or a shape cannot be reconciled (e.g. a different ``in_chans`` or patch size).
    """
    encoder = model.encoder
    weights = encoder_weights(state)
    target = encoder.state_dict()
    report: dict[str, Any] = {"interpolated": []}
    if POS_KEY in weights and POS_KEY in target and weights[POS_KEY].shape != target[POS_KEY].shape:
        new_grid = encoder.patch_embed.grid_size
        old_grid = _source_grid(weights, source_cfg, len(new_grid))
        weights[POS_KEY] = interpolate_pos_embed(weights[POS_KEY], old_grid, new_grid)
        report["interpolated"].append(f"{POS_KEY}: grid {old_grid} -> {new_grid}")
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
