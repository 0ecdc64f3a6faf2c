"""The DeepSpeed-engine sections of bench/gpu_check.py: our engine's step with and without DeepSpeed's throughput
timer (``engine``), ZeRO stages 0-2 (``zero``), and where a step's time goes, model alone and in the engine
(``profile``)."""

from __future__ import annotations

import time

import torch
from step_timing import model_kwargs, timed, train_step, vit_b

from medmae.models import create_model


def engine_step(args, device, b: int, stage: int = 2, timers: bool = False):
    """A ViT-B/16 MAE train step in our DeepSpeed engine (one process), on a fixed random batch of ``b`` crops.

    ``timers`` puts DeepSpeed's synchronised throughput timer back (its default, which our JSON switches off)."""
    from medmae.distributed import DistributedConfig, create_engine, optimizer_layout
    from medmae.distributed import engine as engine_mod
    from medmae.training.config import OptimConfig
    from medmae.training.optim import build_optimizer

    build = engine_mod.build_deepspeed_config

    def with_timer(*a, **k):
        ds = build(*a, **k)
        ds.pop("timers", None)
        return ds

    engine_mod.build_deepspeed_config = with_timer if timers else build
    try:
        torch.manual_seed(0)
        model = create_model("mae_vit_base_patch16_3d", **model_kwargs(args))
        cfg = DistributedConfig(num_workers=1, zero_stage=stage, precision="bf16" if device.type == "cuda" else "auto")
        eng = create_engine(
            model,
            build_optimizer(model, OptimConfig(), 1e-4, device.type, layout=optimizer_layout(cfg, device.type)),
            cfg,
            micro_batch=b,
            grad_accum=1,
            grad_clip=1.0,
        )
    finally:
        engine_mod.build_deepspeed_config = build
    x = torch.randn(b, 1, *model.cfg.img_size, device=device, dtype=torch.bfloat16)

    def step():
        loss = eng(x)[0]
        eng.backward(loss)
        eng.step()

    return step


def _engine_run(args, device, b, timers: bool):
    step = engine_step(args, device, b, timers=timers)
    t = timed(step, args.steps, args.warmup, device)
    syncs = None
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                step()
        torch.cuda.synchronize()
        syncs = sum(e.count for e in prof.key_averages() if e.key in ("cudaDeviceSynchronize",)) / 3
    return {"step_s": t, "crops_per_s": b / t, "device_syncs_per_step": syncs}


def section_engine(args, device):
    b = args.batch[-1]
    ours = _engine_run(args, device, b, timers=False)
    old = _engine_run(args, device, b, timers=True)
    return {
        "batch": b,
        "zero": 2,
        "ours": ours,
        "with_throughput_timer": old,
        "timer_cost": old["step_s"] / ours["step_s"],
    }


def _profile_steps(step, device, n: int = 3) -> dict:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / n
    events = prof.key_averages()

    def self_device(e):
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)

    gpu = [e for e in events if e.device_type.name == "CUDA"]
    busy = sum(self_device(e) for e in gpu) / n / 1e6
    cpu = sorted((e for e in events if e.device_type.name == "CPU"), key=lambda e: e.self_cpu_time_total, reverse=True)
    return {
        "wall_ms": wall * 1e3,
        "gpu_busy_ms": busy * 1e3,
        "gpu_busy_fraction": busy / wall,
        "kernels_per_step": sum(e.count for e in gpu) / n,
        "syncs_per_step": sum(e.count for e in events if "Synchronize" in e.key) / n,
        "top_host_ops_ms": {e.key[:60]: round(e.self_cpu_time_total / n / 1e3, 2) for e in cpu[:10]},
        "top_kernels_ms": {
            e.key[:60]: round(self_device(e) / n / 1e3, 2) for e in sorted(gpu, key=self_device, reverse=True)[:6]
        },
    }


def section_profile(args, device):
    if device.type != "cuda":
        return {"skipped": "no CUDA"}
    b, model, x = vit_b(args, device)
    out = {"batch": b, "model_alone": _profile_steps(train_step(model, x, None), device)}
    del model
    step = engine_step(args, device, b, stage=2)
    out["deepspeed_zero2"] = _profile_steps(step, device)
    return out


def section_zero(args, device):
    b = args.batch[-1]
    out: dict = {"batch": b}
    for stage in (0, 1, 2):
        step = engine_step(args, device, b, stage=stage)
        row = {"step_s": timed(step, args.steps, args.warmup, device)}
        if device.type == "cuda":
            prof = _profile_steps(step, device)
            row.update({k: prof[k] for k in ("gpu_busy_fraction", "kernels_per_step", "syncs_per_step")})
        row["crops_per_s"] = b / row["step_s"]
        out[f"zero{stage}"] = row
        print(f"  zero {stage}: {row}", flush=True)
        del step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out
