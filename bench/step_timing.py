"""Timing helpers shared by bench/gpu_check.py and bench/gpu_engine.py: a median step time, the FLOPs torch counts,
and the ViT-B/16 MAE the GPU check times (``--cpu``: a tiny one)."""

from __future__ import annotations

import functools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_model import step_fn  # noqa: E402

from medmae.models import create_model  # noqa: E402


def timed(fn, steps: int, warmup: int, device: torch.device) -> float:
    """Median seconds of ``fn()`` over ``steps`` after ``warmup``; CUDA events on GPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def train_flops(model, x) -> float:
    """FLOPs of one forward + backward, counted by torch (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        loss = model(x)[0]
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def train_step(model, x, autocast_dtype, loss_fn=None):
    """A no-argument training step of ``model`` on ``x`` (loss: MAE's own unless ``loss_fn``): bench_model's step,
    so that both benches time the same thing."""
    step = step_fn(model, loss_fn or (lambda v: model(v)[0]), x.device, autocast_dtype or torch.float32)
    return functools.partial(step, x)


def vit_b(args, device):
    """(batch, ViT-B/16 MAE in bf16 weights, input) at the largest batch asked for."""
    b = args.batch[-1]
    torch.manual_seed(0)
    model = create_model("mae_vit_base_patch16_3d", **model_kwargs(args)).to(device, torch.bfloat16)
    return b, model, torch.randn(b, 1, *model.cfg.img_size, device=device, dtype=torch.bfloat16)


def model_kwargs(args):
    kw = {"img_size": (args.size,) * 3}
    if args.tiny:
        kw.update(embed_dim=96, depth=2, num_heads=3, decoder_embed_dim=48, decoder_depth=1, decoder_num_heads=3)
    return kw
