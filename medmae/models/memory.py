"""Training memory of a model per sample, counted on the meta device: the bytes of the tensors autograd keeps for
the backward pass (the activations), which is what grows with the crop size and the micro-batch.

The count is exact for what the model saves, whatever it is (encoder, MAE decoder, UNETR's convolutions), and free
(shapes only, well under a second per size once the model code is imported). What it leaves out is transient:
the gradient buffers of the backward pass, kernel workspaces and allocator fragmentation; ``tools/plan.py``
covers them with a stated headroom factor (docs/plan.md).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["TrainMemory", "train_memory"]


@dataclass(frozen=True)
class TrainMemory:
    parameters: int
    """Trainable parameters."""
    activation_bytes: int
    """Bytes saved for the backward pass per sample, with bf16 weights and inputs (DeepSpeed's bf16 mode)."""


def train_memory(model_name: str, **overrides: Any) -> TrainMemory:
    """Parameters and per-sample activation bytes of ``create_model(model_name, **overrides)`` in bf16."""
    return _count(model_name, json.dumps(overrides, sort_keys=True))


@functools.lru_cache(maxsize=64)
def _count(model_name: str, overrides_json: str) -> TrainMemory:
    from medmae.models.registry import create_model

    saved: dict[int, int] = {}
    keep: list[torch.Tensor] = []  # ids stay unique only while the tensors live

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        # weights (and their transposed views) are the parameters' memory, counted apart; a tensor saved by two
        # operations, or through two views, is one allocation
        if not isinstance(base, nn.Parameter) and id(base) not in saved:
            saved[id(base)] = base.untyped_storage().nbytes()
            keep.append(base)
        return t

    with torch.device("meta"):
        model = create_model(model_name, **json.loads(overrides_json)).to(torch.bfloat16)
        x = torch.empty(1, model.cfg.in_chans, *model.cfg.img_size, dtype=torch.bfloat16)
    # one sample: the count is exactly linear in the batch (no saved tensor is shared between samples)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return TrainMemory(parameters=params, activation_bytes=sum(saved.values()))
