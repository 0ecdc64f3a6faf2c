"""Distributed glue: the only part of medmae that imports Ray and DeepSpeed.

- ``config``: :class:`DistributedConfig` (plain dataclass, no heavy imports).
- ``deepspeed_config``: the DeepSpeed JSON generated from it, batch arithmetic, device/precision resolution.
- ``engine``: :class:`Engine` / :func:`create_engine` around ``deepspeed.initialize``; checkpoints that resume on any
  worker count.
- ``ray_launch``: :func:`run_ray` (Ray Train v2 ``TorchTrainer``) and the per-rank helpers used by a train function.

Names are re-exported lazily, so ``import medmae.distributed`` stays cheap until Ray or DeepSpeed is actually used.
"""

from __future__ import annotations

import importlib
from typing import Any

from medmae.distributed.config import DistributedConfig

_LAZY = {
    "adamw_kwargs": "deepspeed_config",
    "build_deepspeed_config": "deepspeed_config",
    "grad_accum_for": "deepspeed_config",
    "resolve_device": "deepspeed_config",
    "resolve_precision": "deepspeed_config",
    "Engine": "engine",
    "create_engine": "engine",
    "init_process_group": "engine",
    "checkpoint_dir": "ray_launch",
    "ensure_ray": "ray_launch",
    "in_ray_worker": "ray_launch",
    "latest_checkpoint_dir": "ray_launch",
    "report": "ray_launch",
    "run_ray": "ray_launch",
    "world_info": "ray_launch",
}

__all__ = ["DistributedConfig", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"medmae.distributed.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'medmae.distributed' has no attribute {name!r}")
