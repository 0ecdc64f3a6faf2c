#!/usr/bin/env python
"""The training step's host overhead on a CPU, side by side in one run: the real trainer's step (resident crops,
DeepSpeed engine with FlatAdamW, device metrics) against the bare model's step (forward, backward, fused AdamW) of
the same small MAE, eager and compiled; aten ops and host syncs per step for each.

    python bench/bench_step.py                 # debug MAE (4 blocks), 32³ crops, batch 8; ~3 min with compile
    python bench/bench_step.py --no-compile    # eager rows only

Issue 17's CPU target: trainer / bare model <= 1.2. The numbers are CPU numbers: they measure the host work the
trainer adds around the model, which is what starves a GPU; GPU figures come from ``bench/gpu_check.sh mfu``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_timing import timed  # noqa: E402

from medmae.config import load_config  # noqa: E402
from medmae.models import create_model  # noqa: E402
from medmae.training.compile import compile_training_forward  # noqa: E402
from medmae.training.config import JobConfig  # noqa: E402
from medmae.training.counters import StepCounter  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def op_counts(step, count: bool) -> dict:
    step()  # compile, lazy state
    if not count:  # a dispatch mode cannot wrap compiled code: counted on the eager rows only
        return {"ops": None, "syncs": None}
    with StepCounter() as c:
        step()
    return {"ops": c.total_ops, "syncs": c.sync_count}


def interleaved_ms(steps: dict, n: int, rounds: int = 5) -> dict:
    """Median step time of each function, timed in alternating blocks (a shared machine's load, caches and clock
    drift hit both sides alike), the best round's median kept."""
    best = {k: float("inf") for k in steps}
    for _ in range(rounds):
        for k, f in steps.items():
            best[k] = min(best[k], timed(f, n, 1, torch.device("cpu")))
    return {k: round(v * 1e3, 2) for k, v in best.items()}


def bare(args, compiled: bool):
    torch.manual_seed(0)
    model = create_model(args.model, img_size=args.size)
    if compiled:
        compile_training_forward(model, "default")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randn(args.batch, 1, args.size, args.size, args.size)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def trainer(args, shards: Path, out: Path, compiled: bool):
    from medmae.training.trainer import Trainer

    cfg = load_config(
        JobConfig,
        REPO / "configs/pretrain_debug.yaml",
        [
            f"model.name={args.model}",
            f"data.path={shards}",
            f"data.roi_size={args.size}",
            "data.num_workers=0",
            f"run.output_dir={out}",
            f"run.name=c{int(compiled)}",
            f"train.micro_batch={args.batch}",
            "train.max_steps=100000",
            "dist.num_workers=1",
            "dist.zero_stage=0",
            "dist.precision=bf16",
            f"train.compile={'default' if compiled else 'off'}",
        ],
    )
    t = Trainer(cfg)
    n = [0]

    def step():
        t.train_step(t.data)
        n[0] += 1
        if n[0] % 10 == 0:
            t.read_metrics(1e-4, time.perf_counter())

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mae_vit_3d_debug")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    from medmae.data.convert import ConvertOptions, convert
    from medmae.data.synthetic import write_phantom_dataset

    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dl = write_phantom_dataset(root / "raw", n=4, shape=(args.size + 16,) * 3, seed=0)
        convert(dl, root / "wds", ConvertOptions(preset="ct", workers=0), progress=False)
        for compiled in (False,) if args.no_compile else (False, True):
            kind = "compiled" if compiled else "eager"
            fns = {f"bare model, {kind}": bare(args, compiled)}
            fns[f"trainer, {kind}"] = trainer(args, root / "wds", root / "runs", compiled)
            for name, f in fns.items():
                rows[name] = op_counts(f, not compiled)
            for name, ms in interleaved_ms(fns, args.steps).items():
                rows[name]["step_ms"] = ms
            rows[f"trainer, {kind}"]["over_bare"] = round(
                rows[f"trainer, {kind}"]["step_ms"] / rows[f"bare model, {kind}"]["step_ms"], 3
            )
    print(f"{args.model}, {args.size}³ crops, batch {args.batch}, bf16 autocast, 1 process, CPU")
    for name, r in rows.items():
        extra = f"  trainer / bare {r['over_bare']:.2f}" if "over_bare" in r else ""
        counts = f"{r['ops']:5d} aten ops  {r['syncs']} syncs" if r["ops"] is not None else "(compiled: not counted)"
        print(f"  {name:24s} {r['step_ms']:8.2f} ms  {counts}{extra}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
