"""``train.compile``: the model's training forward (and the loss it computes) as one compiled graph.

Only ``model.forward`` is compiled, not the DeepSpeed engine (``engine.compile()`` would trace its hooks, which read
the step counter) nor the model in eval mode: validation and visualisation call the same module with other shapes
and no grad, and would recompile it. The graph is full (a break is an error, not a silent fallback) and static
(``dynamic=False``: the crop and batch shapes never change during training).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["compile_training_forward"]


def compile_training_forward(model: nn.Module, mode: str) -> nn.Module:
    """Route ``model``'s forward through ``torch.compile`` while it trains with gradients; eager otherwise.
    ``mode``: ``default``, ``reduce-overhead`` (CUDA graphs of forward and backward) or
    ``max-autotune-no-cudagraphs``; returns ``model`` (its state dict keys are unchanged)."""
    eager = model.forward
    compiled = torch.compile(eager, fullgraph=True, dynamic=False, mode=None if mode == "default" else mode)

    def forward(*args: Any, **kwargs: Any) -> Any:
        if model.training and torch.is_grad_enabled():
            return compiled(*args, **kwargs)
        return eager(*args, **kwargs)

    model.forward = forward
    return model
