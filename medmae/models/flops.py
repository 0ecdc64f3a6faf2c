"""Training FLOPs of a model, counted by PyTorch's flop counter on the meta device: exact for whatever the model
does (encoder, MAE decoder, UNETR's convolutions), and free (shapes only, no memory, well under a second)."""

from __future__ import annotations

import functools
import json
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from medmae.config import to_dict

__all__ = ["train_flops_per_sample"]


def train_flops_per_sample(model_name: str, model_config: Any) -> float:
    """FLOPs of one forward + backward of one sample (matmuls, convolutions, attention)."""
    return _count(model_name, json.dumps(to_dict(model_config), sort_keys=True))


@functools.lru_cache(maxsize=32)
def _count(model_name: str, config_json: str) -> float:
    from medmae.models.registry import create_model

    with torch.device("meta"):
        model = create_model(model_name, **json.loads(config_json))
        x = torch.empty(1, model.cfg.in_chans, *model.cfg.img_size)
    with FlopCounterMode(display=False) as counter:
        out = model(x)
        loss = out[0] if isinstance(out, tuple) else out  # MAE returns (loss, pred, ids_shuffle)
        loss.float().sum().backward()
    return float(counter.get_total_flops())
