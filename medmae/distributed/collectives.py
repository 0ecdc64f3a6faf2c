"""The few collectives the trainer and validation use, as no-ops in a world of one (no process group needed)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["all_gather_objects", "all_reduce_sum", "barrier", "broadcast_", "mean_over_ranks", "world_size"]


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In place: the sum of ``t`` over ranks (returned for chaining)."""
    if world_size() > 1:
        dist.all_reduce(t)
    return t


def mean_over_ranks(value: torch.Tensor) -> float:
    """The mean of a scalar tensor over ranks, as a Python float (one host sync)."""
    value = all_reduce_sum(value.detach().clone().float())
    return float(value) / world_size()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable by torch.distributed only in transit, never stored), in rank order."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In place: rank ``src``'s ``t`` on every rank."""
    if world_size() > 1:
        dist.broadcast(t, src)
    return t


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
