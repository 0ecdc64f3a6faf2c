"""Typed configuration of the distributed layer: workers, failures, storage, ZeRO stage, precision, backend.

Plain dataclass with no Ray or DeepSpeed import, so ``medmae.config`` can build and validate it anywhere. What the
fields resolve to on a concrete device (``auto`` precision, backend, GPU use) is decided in ``deepspeed_config``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from medmae.config import Range, check_ranges

__all__ = ["DistributedConfig"]

_USE_GPU = ("auto", "yes", "no")
_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_BACKENDS = ("auto", "gloo", "nccl")


@dataclass
class DistributedConfig:
    """How many workers run, where checkpoints go, and how DeepSpeed shards and casts the model."""

    num_workers: Annotated[int, Range(ge=1)] = 2
    """Number of training workers (processes); the maximum when ``min_workers`` is set."""
    min_workers: Annotated[int | None, Range(ge=1)] = None
    """When set, the run is elastic: Ray Train runs with any count in ``[min_workers, num_workers]``."""
    resize_interval_s: Annotated[float, Range(gt=0)] = 60.0
    """Elastic runs: seconds between Ray Train's checks for room to grow; growing restarts every worker from the
    last checkpoint, so the steps since it are redone (shrinking after a lost node needs no check)."""
    use_gpu: Literal["auto", "yes", "no"] = "auto"
    """One GPU per worker: ``auto`` uses GPUs when the Ray cluster has any, ``yes`` requires them."""
    cpus_per_worker: Annotated[float, Range(gt=0)] = 1.0
    """CPUs Ray reserves for each worker."""
    max_failures: Annotated[int, Range(ge=-1)] = 0
    """Worker-group failures Ray Train recovers from (restart from the latest checkpoint); -1 is unlimited."""
    storage_path: str = "runs"
    """Where Ray Train persists checkpoints and results: a local folder or a URL such as ``s3://bucket/runs``."""
    zero_stage: Annotated[int, Range(ge=0, le=3)] = 0
    """DeepSpeed ZeRO stage: 0 (plain data parallel), 1 (optimizer), 2 (+gradients), 3 (+parameters). Stage 0 does
    the least host work per step (bf16: 29 ops outside the model at any depth on one GPU, no host sync; stage 1
    ~9 and stage 2 ~17 ops per parameter tensor; docs/performance.md); 1-3 save memory, not time."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Compute precision: ``auto`` is bf16 where the device supports it, else fp32; fp16 needs a GPU."""
    offload_optimizer: bool = False
    """Keep the optimizer state and step on the CPU (ZeRO-Offload; needs ``zero_stage`` >= 1)."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Collective backend: ``auto`` is nccl on CUDA and gloo on CPU."""

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.min_workers is not None and not 1 <= self.min_workers <= self.num_workers:
            raise ValueError(
                f"min_workers: must be between 1 and num_workers={self.num_workers}, got {self.min_workers}"
            )
        if self.use_gpu not in _USE_GPU:
            raise ValueError(f"use_gpu: {self.use_gpu!r} is not one of {list(_USE_GPU)}")
        if not self.storage_path:
            raise ValueError("storage_path: must not be empty")
        if self.precision not in _PRECISIONS:
            raise ValueError(f"precision: {self.precision!r} is not one of {list(_PRECISIONS)}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer: needs zero_stage >= 1 (ZeRO-Offload partitions the optimizer state)")
        if self.backend not in _BACKENDS:
            raise ValueError(f"backend: {self.backend!r} is not one of {list(_BACKENDS)}")

    @property
    def elastic(self) -> bool:
        """True when the worker count may vary between ``min_workers`` and ``num_workers``."""
        return self.min_workers is not None and self.min_workers < self.num_workers
