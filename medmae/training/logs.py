"""One logger with a rank prefix, TensorBoard on rank 0 only, and a console progress line with ETA."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

_FORMAT = "%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s"


def setup_logging(rank: int, level: int = logging.INFO) -> None:
    """Route medmae's loggers to stderr with the rank in every line (idempotent per process).

    Ranks other than 0 log only warnings and errors: their INFO lines repeat rank 0's on every console.
    """
    root = logging.getLogger("medmae")
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT.format(rank=rank), datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level if rank == 0 else max(level, logging.WARNING))
    root.propagate = False
    # DeepSpeed 0.19 gathers through this deprecated torch alias; the warning is about its code, not ours.
    warnings.filterwarnings(
        "ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated", category=FutureWarning
    )


class Board:
    """TensorBoard writer plus ``metrics.jsonl`` (one line per logged step) on rank 0; no-ops elsewhere."""

    def __init__(self, run_dir: str | os.PathLike, rank: int) -> None:
        self.writer = self.jsonl = None
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            Path(run_dir).mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            self.jsonl = open(Path(run_dir) / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 - closed in close()

    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        if self.writer is None or self.jsonl is None:
            return
        for k, v in values.items():
            if v is not None:
                self.writer.add_scalar(f"{prefix}{k}", v, step)
        self.jsonl.write(json.dumps({"step": step, **{f"{prefix}{k}": v for k, v in values.items()}}) + "\n")

    def image(self, tag: str, img: np.ndarray, step: int) -> None:
        """``img`` (H, W) or (3, H, W) in [0, 1]."""
        if self.writer is None:
            return
        self.writer.add_image(tag, img if img.ndim == 3 else img[None], step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()


class Progress:
    """A console line every ``log_every`` steps: step, loss, rate and ETA."""

    def __init__(self, total: int, start: int) -> None:
        self.total, self.start, self.t0 = total, start, time.perf_counter()
        self.log = logging.getLogger("medmae.progress")

    def update(self, step: int, values: dict[str, Any]) -> None:
        done = step + 1 - self.start
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(done, 1) * (self.total - step - 1)
        shown = " ".join(f"{k} {v:.4g}" for k, v in values.items() if isinstance(v, (int, float)))
        self.log.info("step %d/%d %s | eta %s", step + 1, self.total, shown, _hms(eta))


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def memory_gib(device: torch.device) -> float:
    """Peak accelerator memory, or this process's resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except OSError:
        return float("nan")


# Dense (no sparsity) peak FLOP/s per GPU from the vendors' datasheets, keyed on the exact name CUDA reports: the
# H100 comes as SXM (989 bf16), PCIe (756) and NVL (835), and "L4" is a prefix of "L40", so no substring matching.
_TF = 1e12
_PEAKS: dict[str, dict[str, float]] = {
    "NVIDIA H100 80GB HBM3": {"bf16": 989 * _TF, "fp16": 989 * _TF, "tf32": 495 * _TF, "fp32": 67 * _TF},
    "NVIDIA H100 PCIe": {"bf16": 756 * _TF, "fp16": 756 * _TF, "tf32": 378 * _TF, "fp32": 51 * _TF},
    "NVIDIA H100 NVL": {"bf16": 835 * _TF, "fp16": 835 * _TF, "tf32": 418 * _TF, "fp32": 60 * _TF},
    "NVIDIA H200": {"bf16": 989 * _TF, "fp16": 989 * _TF, "tf32": 495 * _TF, "fp32": 67 * _TF},
    "NVIDIA H200 NVL": {"bf16": 835 * _TF, "fp16": 835 * _TF, "tf32": 418 * _TF, "fp32": 60 * _TF},
    "NVIDIA A100-SXM4-80GB": {"bf16": 312 * _TF, "fp16": 312 * _TF, "tf32": 156 * _TF, "fp32": 19.5 * _TF},
    "NVIDIA A100-SXM4-40GB": {"bf16": 312 * _TF, "fp16": 312 * _TF, "tf32": 156 * _TF, "fp32": 19.5 * _TF},
    "NVIDIA A100 80GB PCIe": {"bf16": 312 * _TF, "fp16": 312 * _TF, "tf32": 156 * _TF, "fp32": 19.5 * _TF},
    "NVIDIA A100-PCIE-40GB": {"bf16": 312 * _TF, "fp16": 312 * _TF, "tf32": 156 * _TF, "fp32": 19.5 * _TF},
    "NVIDIA L40S": {"bf16": 362 * _TF, "fp16": 362 * _TF, "tf32": 183 * _TF, "fp32": 91.6 * _TF},
    "NVIDIA L40": {"bf16": 181 * _TF, "fp16": 181 * _TF, "tf32": 90.5 * _TF, "fp32": 90.5 * _TF},
    "NVIDIA L4": {"bf16": 121 * _TF, "fp16": 121 * _TF, "tf32": 60 * _TF, "fp32": 30.3 * _TF},
    "Tesla V100-SXM2-32GB": {"fp16": 125 * _TF, "fp32": 15.7 * _TF},
    "Tesla V100-SXM2-16GB": {"fp16": 125 * _TF, "fp32": 15.7 * _TF},
    "Tesla T4": {"fp16": 65 * _TF, "fp32": 8.1 * _TF},
}


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Dense peak FLOP/s of ``device`` computing in ``dtype`` (fp32 counts TF32 when PyTorch's float32 matmul
    precision allows it); None for CPUs and for GPUs not in the table, so no MFU is reported rather than a wrong
    one."""
    if device.type != "cuda":
        return None
    peaks = _PEAKS.get(torch.cuda.get_device_name(device).strip())
    if peaks is None:
        return None
    key = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    if key == "fp32" and torch.get_float32_matmul_precision() != "highest":
        key = "tf32"
    return peaks.get(key)
