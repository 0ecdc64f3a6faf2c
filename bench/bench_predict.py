#!/usr/bin/env python
"""Prediction throughput on the CPU: the single-process path, then ``predict.py --ray`` on 1 and on 2 local Ray
workers (1 CPU and 1 torch thread each), over the same generated CT volumes, side by side.

    python bench/bench_predict.py                       # 8 volumes 96x96x64, debug UNETR on 32³ windows
    python bench/bench_predict.py --out bench/results/$(date +%F)_cpu_bench_predict.txt

Volumes/s counts from the first volume sent to the last written (the workers' start, model load included, is the
"start" column); the ratio is 2 workers over 1. "Worker s/vol" is the median time a worker spent on one volume
(read, predict, write): equal for 1 and 2 workers when each has a core of its own, so a machine with fewer free
cores than workers (other jobs; the load average is printed) shows up there, apart from any overhead of Ray's.
Each Ray run writes into a fresh folder, so nothing is skipped.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medmae.data.convert import ConvertOptions  # noqa: E402
from medmae.data.synthetic import write_phantom_dataset  # noqa: E402
from medmae.inference import Predictor, predict_paths  # noqa: E402
from medmae.inference.jobs import predict_many  # noqa: E402
from medmae.models import create_model  # noqa: E402
from medmae.models.registry import config_dict  # noqa: E402
from medmae.tasks.model_file import save_finetuned  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--volumes", type=int, default=8)
    ap.add_argument("--shape", type=int, nargs=3, default=[96, 96, 64])
    ap.add_argument("--model", default="unetr_vit_3d_debug")
    ap.add_argument("--out", help="also write the table to this file")
    args = ap.parse_args()
    os.environ.setdefault("RAY_ADDRESS", "local")  # a private Ray with this machine's CPUs, never a shared one
    lines = [
        f"# python bench/bench_predict.py --volumes {args.volumes} --shape {' '.join(map(str, args.shape))} "
        f"--model {args.model}",
        f"# {time.strftime('%Y-%m-%d %H:%M')}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, load average before {os.getloadavg()[0]:.2f}",
    ]
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        root = Path(tmp)
        src = write_phantom_dataset(root / "raw", n=args.volumes, shape=tuple(args.shape), num_classes=3).parent
        inputs = src / "imagesTr"
        torch.manual_seed(0)
        model = create_model(args.model, num_classes=3)
        pre = {**ConvertOptions(preset="ct").preprocessing(), "spatial_dims": 3, "channels": 1}
        ckpt = save_finetuned(root / "model.safetensors", model.state_dict(), model_name=args.model,
                              model_config=config_dict(model.cfg), task="segment", preprocessing=pre,
                              num_classes=3)  # fmt: skip
        roi = "x".join(map(str, model.cfg.img_size))
        lines.append(f"# {args.volumes} CT phantoms {'x'.join(map(str, args.shape))}, {args.model} on {roi} windows, "
                     "overlap 0.5, sw-batch 2")  # fmt: skip
        lines.append(f"{'path':<26}{'volumes/s':>10}{'worker s/vol':>14}{'start s':>9}{'vs 1 worker':>13}")

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        predictor = Predictor.from_checkpoint(ckpt, sw_batch=2)
        predict_paths(predictor, inputs / "case_000.nii.gz", root / "warm.nii.gz")  # imports and first-call costs
        t0 = time.perf_counter()
        single = predict_paths(predictor, inputs, root / "single")
        single_s = time.perf_counter() - t0
        torch.set_num_threads(threads)
        assert single.ok and len(single.written) == args.volumes
        rate = {"single process, 1 thread": (args.volumes / single_s, single_s / args.volumes, 0.0)}
        for workers in (1, 2):
            r = predict_many(
                str(ckpt), str(inputs), str(root / f"ray{workers}"), workers=workers, predictor={"sw_batch": 2}
            )
            assert r.ok and len(r.written) == args.volumes, r.errors
            per_volume = statistics.median(r.volume_seconds)
            rate[f"--ray, {workers} worker(s)"] = (r.volumes_per_second, per_volume, r.startup_seconds)
        one = rate["--ray, 1 worker(s)"][0]
        for name, (vps, per_volume, start) in rate.items():
            lines.append(f"{name:<26}{vps:>10.3f}{per_volume:>14.2f}{start:>9.1f}{vps / one:>12.2f}x")
    lines.append(f"# load average after {os.getloadavg()[0]:.2f}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
