"""``bench/gpu_check.sh mfu``: where the training step stands against the GPU's peak, row by row (issue 17).

Rows, ViT-B/16 MAE on 96³ crops, bf16 (autocast over fp32 parameters, as the trainer runs it):
- ``model eager`` / ``model compiled``: forward + backward + fused AdamW of the model alone, batch 256;
- ``engine zero0/1/2``: the same step in our DeepSpeed engine with FlatAdamW;
- ``trainer b128|b256 eager|compiled``: the real trainer's step (resident crops from generated shards, the engine,
  device metrics read every 10 steps), one process.
Per row: step time, crops/s, MFU (FLOPs from ``medmae/models/flops.py``, the trainer's count), and on CUDA the
profiler's kernels, device syncs and GPU-busy fraction per step. ``--cpu``: tiny sizes, no compiled rows (their
compile takes minutes on 2 cores; tests/test_step.py checks the compiled forward on CPU).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from gpu_engine import _profile_steps, engine_step
from step_timing import model_kwargs, timed

from medmae.models import create_model, train_flops_per_sample

REPO = Path(__file__).resolve().parents[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _row(step, b: int, flops_per_sample: float, args, device: torch.device, peak: float | None) -> dict:
    t = timed(step, args.steps, args.warmup, device)
    row = {"batch": b, "step_s": t, "crops_per_s": b / t}
    if peak:
        row["mfu"] = flops_per_sample * b / t / peak
    if device.type == "cuda":
        prof = _profile_steps(step, device)
        row.update({k: prof[k] for k in ("kernels_per_step", "syncs_per_step", "gpu_busy_fraction")})
    else:
        from medmae.training.counters import StepCounter

        with StepCounter() as c:
            step()
        row.update(ops_per_step=c.total_ops, syncs_per_step=c.sync_count)
    return row


def _model_step(args, device, b: int, compiled: bool):
    from medmae.training.compile import compile_training_forward

    torch.manual_seed(0)
    model = create_model("mae_vit_base_patch16_3d", **model_kwargs(args)).to(device)
    if compiled:
        compile_training_forward(model, "default")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randn(b, 1, *model.cfg.img_size, device=device, dtype=torch.bfloat16)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, model.cfg


def _trainer_step(args, device, shards: Path, out: Path, b: int, compiled: bool):
    from medmae.config import load_config
    from medmae.training.config import JobConfig
    from medmae.training.trainer import Trainer

    overrides = [
        f"data.path={shards}",
        f"run.output_dir={out}",
        f"run.name=mfu_b{b}_{int(compiled)}",
        f"train.micro_batch={b}",
        "train.max_steps=100000",
        "run.image_every=0",
        "dist.num_workers=1",
        "dist.zero_stage=0",
        "dist.precision=bf16",
        f"train.compile={'default' if compiled else 'off'}",
        f"data.num_workers={2 if args.tiny else 8}",
    ]
    if not args.tiny:
        overrides += ["model.name=mae_vit_base_patch16_3d", "data.roi_size=96"]
    else:
        overrides += ["data.roi_size=32"]
    t = Trainer(load_config(JobConfig, REPO / "configs/pretrain_debug.yaml", overrides))
    count = [0]

    def step():
        t.train_step(t.data)
        count[0] += 1
        if count[0] % 10 == 0:  # the trainer's log cadence: one read of the device metrics
            t.read_metrics(1e-4, time.perf_counter())

    return step, t


def section_mfu(args, device):
    from bench_data import make_sources

    from medmae.data.convert import ConvertOptions, convert
    from medmae.training.logs import peak_flops

    cuda = device.type == "cuda"
    peak = peak_flops(device, torch.bfloat16) if cuda else None
    big = 256 if cuda else 2
    out: dict = {"peak_bf16_tflops": (peak or 0) / 1e12, "rows": {}}
    rows = out["rows"]
    compiled_rows = (False, True) if cuda else (False,)
    for compiled in compiled_rows:
        step, cfg = _model_step(args, device, big, compiled)
        fps = train_flops_per_sample("mae_vit_base_patch16_3d", cfg)
        t0 = time.perf_counter()
        step()
        _sync(device)
        first = time.perf_counter() - t0
        rows[f"model {'compiled' if compiled else 'eager'}"] = {
            **_row(step, big, fps, args, device, peak),
            "first_s": first,
        }
        print(f"  {list(rows)[-1]}: {rows[list(rows)[-1]]}", flush=True)
        del step
    for stage in (0, 1, 2):
        step = engine_step(args, device, big, stage=stage)
        rows[f"engine zero{stage}"] = _row(step, big, fps, args, device, peak)
        print(f"  engine zero{stage}: {rows[f'engine zero{stage}']}", flush=True)
        del step
        if cuda:
            torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shape, n = ((48, 48, 48), 4) if args.tiny else ((192, 192, 160), 16)
        dl = make_sources(root / "src", n, shape, (1.5, 1.5, 2.0), ext=".nii")
        convert(dl, root / "wds", ConvertOptions(preset="ct", workers=min(8, n), shard_size_mb=64), progress=False)
        for b in (128, 256) if cuda else (2,):
            for compiled in compiled_rows:
                step, trainer = _trainer_step(args, device, root / "wds", root / "runs", b, compiled)
                t0 = time.perf_counter()
                step()
                _sync(device)
                first = time.perf_counter() - t0
                fps = trainer.flops / trainer.derived.global_batch
                name = f"trainer b{b} {'compiled' if compiled else 'eager'}"
                rows[name] = {**_row(step, b, fps, args, device, peak), "first_s": first}
                print(f"  {name}: {rows[name]}", flush=True)
                trainer.data.close()
                del step, trainer
                if cuda:
                    torch.cuda.empty_cache()
    best = max((r.get("mfu", 0.0), k) for k, r in rows.items() if k.startswith("trainer"))
    out["best_trainer"] = {"row": best[1], "mfu": best[0], "crops_per_s": rows[best[1]]["crops_per_s"]}
    return out
