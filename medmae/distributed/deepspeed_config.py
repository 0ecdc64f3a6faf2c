"""The DeepSpeed JSON, generated from ``DistributedConfig`` plus the batch arithmetic; never written by hand.

Batch size, accumulation, ZeRO stage and precision are decided here, in one place, and validated together. This
module imports torch only (device probing), not DeepSpeed, so the arithmetic is testable without starting anything.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from medmae.distributed.config import DistributedConfig

__all__ = [
    "build_deepspeed_config",
    "optimizer_layout",
    "resolve_backend",
    "resolve_device",
    "resolve_precision",
]

logger = logging.getLogger(__name__)

BUCKET_ELEMENTS = 50_000_000


def resolve_device() -> torch.device:
    """CUDA device of this process's local rank when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _bf16_supported(device_type: str) -> bool:
    if device_type == "cuda":  # emulated bf16 (T4, V100) counts as supported by default, and is slow
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device_type == "cpu":
        # Emulated bf16 on a CPU without native instructions is slower than fp32, so auto picks it only with them.
        probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
        return bool(probe and probe())
    return False


def resolve_precision(precision: str, device_type: str) -> str:
    """``auto`` -> ``bf16`` where the device computes it natively, else ``fp32``; fp16 only on CUDA."""
    if precision == "auto":
        return "bf16" if _bf16_supported(device_type) else "fp32"
    if precision == "fp16" and device_type != "cuda":
        raise ValueError(
            f"precision: fp16 needs a CUDA device (DeepSpeed refuses fp16 on {device_type}); use bf16 or fp32"
        )
    return precision


def resolve_backend(backend: str, device_type: str) -> str:
    """``auto`` -> nccl on CUDA, gloo elsewhere; nccl on a CPU device is refused."""
    if backend == "auto":
        return "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl" and device_type != "cuda":
        raise ValueError(f"backend: nccl needs CUDA devices, this worker runs on {device_type}; use gloo or auto")
    return backend


def optimizer_layout(cfg: DistributedConfig, device_type: str) -> str:
    """Which client optimizer the engine gets: ``flat`` (``FlatAdamW``, one class per param group: ZeRO-0),
    ``flat_single`` (``FlatAdamW`` showing DeepSpeed one group: ZeRO-1/2), or ``torch`` (torch AdamW, with
    DeepSpeed's own clipping: ZeRO-3, whose partitions have no fragment map, fp16, whose loss scaler wraps the step,
    and the CPU offload, which steps on the host)."""
    precision = resolve_precision(cfg.precision, device_type)
    if cfg.zero_stage == 3 or precision == "fp16" or cfg.offload_optimizer:
        return "torch"
    return "flat" if cfg.zero_stage == 0 else "flat_single"


def build_deepspeed_config(
    cfg: DistributedConfig,
    *,
    micro_batch: int,
    grad_accum: int,
    world_size: int,
    grad_clip: float,
    device_type: str,
    layout: str | None = None,
) -> dict[str, Any]:
    """DeepSpeed config dict for a client AdamW whose learning rate our own schedule sets every step.

    With ``FlatAdamW`` (``optimizer_layout``) DeepSpeed does no per-parameter optimizer work: bf16 runs in its
    torch-autocast mode (fp32 parameters, the forward in bf16: no wrapper optimizer, no loss scaler, fp32 gradients
    that accumulate exactly), and the gradient norm, clipping and overflow check are FlatAdamW's, on the device."""
    for name, value in (("micro_batch", micro_batch), ("grad_accum", grad_accum), ("world_size", world_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")
    if grad_clip < 0:
        raise ValueError(f"grad_clip: must be >= 0 (0 disables clipping), got {grad_clip}")
    precision = resolve_precision(cfg.precision, device_type)
    if cfg.offload_optimizer and device_type == "cpu":
        logger.warning("offload_optimizer: the model already lives on the CPU, offloading only adds copies")

    layout = layout or optimizer_layout(cfg, device_type)
    flat = layout != "torch"
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage in (1, 2):
        # Buckets of 5e7 elements (DeepSpeed's default 5e8 holds a whole ViT-B, so nothing would overlap). Stage 2
        # reduces bucket by bucket on a side stream while backward runs when there is someone to reduce with; it
        # costs a device-wide synchronize at the end of backward, so not in a world of one. Stage 1 reduces after
        # backward. The norm is FlatAdamW's.
        zero.update(
            overlap_comm=cfg.zero_stage == 2 and world_size > 1,
            contiguous_gradients=cfg.zero_stage == 2,
            reduce_bucket_size=BUCKET_ELEMENTS,
            allgather_bucket_size=BUCKET_ELEMENTS,
        )
        if flat:
            zero["compute_grad_norm"] = False
    elif cfg.zero_stage == 3:
        zero.update(reduce_bucket_size=BUCKET_ELEMENTS, stage3_prefetch_bucket_size=BUCKET_ELEMENTS)
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    train_batch = micro_batch * grad_accum * world_size
    ds: dict[str, Any] = {
        "train_batch_size": train_batch,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": 0.0 if flat else float(grad_clip),  # FlatAdamW clips inside its fused step
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16" and not flat},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # Sum gradients over ranks in fp32: a bf16 all-reduce rounds every partial sum to 8 mantissa bits.
        "communication_data_type": "fp32",
        # DeepSpeed's throughput timer calls cuda.synchronize() at the start and end of every micro-step; we time
        # steps ourselves, so it only costs two host syncs per micro-batch.
        "timers": {"throughput": {"enabled": False}},
        # The optimizer is our torch AdamW (no compiled op); ZeRO accepts it with this flag, Offload needs the second.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        # We log ourselves; DeepSpeed's own step prints would interleave with the progress line.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if precision == "bf16" and flat:
        # fp32 parameters and gradients, bf16 matmuls. The empty list keeps DeepSpeed from tagging Linear/Conv
        # gradients for a bf16 reduction, which at ZeRO-1/2 would override communication_data_type.
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    # The identity DeepSpeed re-checks at initialize; inputs were validated above, so this is an internal invariant.
    assert train_batch == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world_size
    return ds
