"""AdamW parameter groups (weight-decay rule, layer-wise lr decay) and the warmup + cosine schedule."""

from __future__ import annotations

import math
import re
from typing import Any

from torch import nn


def _layer_id(name: str, matcher: dict, num_layers: int) -> int:
    """Encoder parameter -> layer index: stem 0, block i -> i + 1, final norm -> num_layers - 1."""
    if re.match(matcher["stem"], name):
        return 0
    for pattern, fixed in matcher["blocks"]:
        m = re.match(pattern, name)
        if m:
            return num_layers - 1 if fixed is not None else int(m.group(1)) + 1
    return num_layers - 1


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict[str, Any]]:
    """Optimizer groups with ``lr_scale``: no decay on 1-D tensors (norms, biases) and the model's
    ``no_weight_decay`` names (tokens, position tables); with ``layer_decay < 1`` encoder layer i gets
    ``layer_decay ** (depth + 1 - i)`` and everything outside the encoder (decoder, head) the full lr.
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    encoder = getattr(model, "encoder", None)
    matcher = encoder.group_matcher() if encoder is not None and layer_decay < 1.0 else None
    num_layers = len(encoder.blocks) + 2 if encoder is not None else 1
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim > 1 and name not in skip
        layer = num_layers - 1
        if matcher is not None and name.startswith("encoder."):
            layer = _layer_id(name[len("encoder.") :], matcher, num_layers)
        key = (layer, decay)
        if key not in groups:
            scale = layer_decay ** (num_layers - 1 - layer) if matcher is not None else 1.0
            groups[key] = {"params": [], "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale}
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def lr_at(step: int, *, peak: float, warmup: int, total: int, floor: float = 0.0) -> float:
    """Linear warmup from 0 to ``peak`` over ``warmup`` steps, then half-cosine to ``floor`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
