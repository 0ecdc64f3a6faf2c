"""Distributed glue: the only part of medmae that imports Ray and DeepSpeed.

- ``config``: :class:`DistributedConfig` (plain dataclass, no heavy imports).
- ``collectives``: sum / mean / gather over ranks, no-ops in a world of one (torch only).
- ``deepspeed_config``: the DeepSpeed JSON generated from it, batch arithmetic, device/precision resolution.
- ``engine``: :class:`Engine` / :func:`create_engine` around ``deepspeed.initialize``; checkpoints that resume on any
  worker count.
- ``ray_launch``: :func:`run_ray` (Ray Train v2 ``TorchTrainer``) and the per-rank helpers used by a train function.
- ``ray_map``: :func:`map_items`, a function over many items on Ray actors (one model per worker), retried when a
  worker dies, with progress and throughput (prediction at scale).

Names are re-exported lazily, so ``import medmae.distributed`` stays cheap until Ray or DeepSpeed is actually used.
"""

from __future__ import annotations

import importlib
from typing import Any

from medmae.distributed.collectives import all_gather_objects, all_reduce_sum, barrier, broadcast_, mean_over_ranks
from medmae.distributed.config import DistributedConfig

_LAZY = {
    "build_deepspeed_config": "deepspeed_config",
    "optimizer_layout": "deepspeed_config",
    "resolve_device": "deepspeed_config",
    "resolve_precision": "deepspeed_config",
    "Engine": "engine",
    "create_engine": "engine",
    "init_process_group": "engine",
    "checkpoint_candidates": "ray_launch",
    "checkpoint_dir": "ray_launch",
    "ensure_ray": "ray_launch",
    "forwarded_env": "ray_launch",
    "in_ray_worker": "ray_launch",
    "preemption_pending": "ray_launch",
    "report": "ray_launch",
    "run_ray": "ray_launch",
    "world_info": "ray_launch",
    "cluster_resources": "ray_map",
    "map_items": "ray_map",
}

__all__ = [
    "DistributedConfig",
    "all_gather_objects",
    "all_reduce_sum",
    "barrier",
    "broadcast_",
    "mean_over_ranks",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"medmae.distributed.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'medmae.distributed' has no attribute {name!r}")
