"""Pretraining throughput: the real launcher path (Ray Train + DeepSpeed) with 1 worker vs 2, side by side.

    python bench/bench_pretrain.py                        # CPU: debug-width MAE on 64³, 1 vs 2 workers
    python bench/bench_pretrain.py --model mae_vit_base_patch16_3d --size 96 --gpu   # GPU: ViT-B/16 96³, MFU

Each worker processes the same micro-batch, so perfect scaling doubles volumes/s; the scaling efficiency printed is
(volumes/s with N workers) / (N × volumes/s with 1). Steps after the first --skip are timed from the trainer's own
metrics.jsonl. With --gpu the trainer logs MFU (model FLOPs / peak bf16 FLOP/s of the GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medmae.config import load_config, to_dict  # noqa: E402
from medmae.data.convert.options import ConvertOptions  # noqa: E402
from medmae.data.convert.run import convert  # noqa: E402
from medmae.data.synthetic import write_phantom_dataset  # noqa: E402
from medmae.training.config import JobConfig  # noqa: E402


def run(workers: int, args, data: Path, out: Path, stage: int) -> dict:
    from medmae.distributed import run_ray
    from medmae.training.trainer import train_worker

    cfg = load_config(
        JobConfig,
        None,
        [
            f"model.name={args.model}",
            f"data.path={data}",
            f"data.roi_size=[{args.size},{args.size},{args.size}]",
            "data.num_workers=1",
            f"train.max_steps={args.steps}",
            f"train.micro_batch={args.batch}",
            "run.log_every=1",
            "run.image_every=0",
            f"run.checkpoint_every={args.steps}",
            f"run.output_dir={out}",
            f"run.name=w{workers}-z{stage}",
            f"dist.storage_path={out / 'ray'}",
            f"dist.num_workers={workers}",
            f"dist.zero_stage={stage}",
            f"dist.precision={args.precision}",
            f"dist.use_gpu={'yes' if args.gpu else 'no'}",
        ],
    )
    run_ray(train_worker, {"config": to_dict(cfg)}, cfg.dist, run_name=cfg.run.name)
    lines = [json.loads(x) for x in (out / cfg.run.name / "metrics.jsonl").read_text().splitlines()]
    timed = lines[args.skip :]
    step = statistics.median(m["train/step_time_s"] for m in timed)
    mfu = [m["train/mfu"] for m in timed if "train/mfu" in m]
    return {
        "workers": workers,
        "stage": stage,
        "step_s": step,
        "volumes_s": args.batch * workers / step,
        "mfu": statistics.median(mfu) if mfu else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mae_vit_3d_debug")
    ap.add_argument("--size", type=int, default=64, help="cubic crop edge")
    ap.add_argument("--batch", type=int, default=4, help="micro-batch per worker")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--skip", type=int, default=5, help="warm-up steps not timed")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--stages", type=int, nargs="+", default=[2], help="ZeRO stages to compare")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--gpu", action="store_true", help="one GPU per worker (reports MFU)")
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with tempfile.TemporaryDirectory(prefix="medmae-bench-") as folder:
        tmp = Path(folder)
        datalist = write_phantom_dataset(tmp / "raw", n=6, shape=(args.size + 16,) * 3, seed=0)
        convert(datalist, tmp / "wds", ConvertOptions(preset="ct", workers=0, shard_size_mb=0.5), progress=False)
        rows = [run(w, args, tmp / "wds", tmp / "runs", s) for s in args.stages for w in args.workers]
    import ray

    ray.shutdown()  # its teardown logs would otherwise interleave with the table
    base = {r["stage"]: r for r in rows if r["workers"] == args.workers[0]}
    print(f"\n{args.model} at {args.size}³, micro-batch {args.batch}/worker, {args.precision}")
    print(f"{'workers':>8} {'ZeRO':>5} {'s/step':>8} {'volumes/s':>10} {'scaling eff.':>13} {'MFU':>6}")
    for r in rows:
        b = base[r["stage"]]
        eff = r["volumes_s"] / (r["workers"] / b["workers"] * b["volumes_s"])
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        print(f"{r['workers']:>8} {r['stage']:>5} {r['step_s']:>8.3f} {r['volumes_s']:>10.1f} {eff:>13.2f} {mfu:>6}")


if __name__ == "__main__":
    main()
