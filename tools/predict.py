#!/usr/bin/env python
"""Apply a fine-tuned medmae model to image files, writing label volumes in each input's original geometry.

The preprocessing recorded with the model (orientation, spacing, intensity preset, foreground crop) is applied
as the converter applied it for training; predictions are then mapped back to the input's own grid (shape,
affine, orientation) and written in its format family: NIfTI in -> NIfTI out with the input's header, NRRD/MHA in
-> the same format, a DICOM series -> <name>.nii.gz. Labels are uint8. BraTS-style region models (WT/TC/ET)
write MSD labels (1 edema, 2 non-enhancing tumour, 3 enhancing tumour). Multi-channel inputs must be single
files holding every channel (4D NIfTI, as MSD ships BraTS).

Classification models write one table of per-label probabilities: OUTPUT ending in .csv or .json, otherwise
OUTPUT/predictions.csv.

INPUT is one image file / DICOM series folder, or a folder of them. OUTPUT is a file for a single input file,
else a folder. Inputs are never overwritten. Exit status: 0 all predicted, 1 some inputs failed (the others are
written), 2 bad arguments or model.

--ray spreads the inputs over Ray workers (this machine's local Ray, or the cluster it joins): one model per worker
(one GPU each when the cluster has GPUs), reading and writing on the worker. OUTPUT is a folder; an input whose
output exists is skipped, so a re-run resumes; failures go to OUTPUT/errors.jsonl and the rest go on; INPUT,
OUTPUT and --checkpoint may be object-store URLs (s3://bucket/prefix). Segmentation models only.

--tta mirrors every window over all flips of its spatial axes and averages the probabilities (8 forward passes
per window in 3D: 8x the time), as nnU-Net does by default; off by default.

Examples:
    python tools/predict.py --checkpoint runs/finetune_btcv data/new_scans/ predictions/
    python tools/predict.py --ray --checkpoint s3://bucket/models/btcv.safetensors s3://bucket/scans/ s3://bucket/pred/
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from tqdm import tqdm  # noqa: E402

from medmae.inference import Predictor, predict_paths  # noqa: E402
from medmae.inference.jobs import predict_many  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--checkpoint",
        required=True,
        help="model file written by fine-tuning, or its run directory (best_model.safetensors, else model.safetensors)",
    )
    p.add_argument("input", help="image file (.nii/.nii.gz/.nrrd/.mha/...), DICOM series folder, or folder of them")
    p.add_argument("output", help="output file (single input file) or folder; classification: .csv/.json table")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap in [0, 1)")
    p.add_argument(
        "--sw-batch", type=int, default=None, help="windows per forward pass (default 16 on a GPU, 2 on the CPU)"
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--tta", action="store_true", help="test-time mirroring: mean probabilities over all axis flips")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("--ray: many inputs on Ray workers")
    g.add_argument("--ray", action="store_true", help="spread the inputs over Ray workers (resumable)")
    g.add_argument("--workers", type=int, help="default: one per GPU of the cluster, else one per --cpus-per-worker")
    g.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs (torch threads) per worker")
    g.add_argument("--gpus-per-worker", type=float, help="default 1 when the cluster has GPUs, else 0")
    g.add_argument(
        "--storage-options",
        type=json.loads,
        default={},
        help="fsspec options for URLs as JSON (default: the environment, AWS_ENDPOINT_URL, ...)",
    )
    return p.parse_args(argv)


def run_ray(a: argparse.Namespace) -> int:
    predictor = {"overlap": a.overlap, "sw_batch": a.sw_batch, "device": a.device, "tta": a.tta}
    result = predict_many(
        a.checkpoint,
        a.input,
        a.output,
        workers=a.workers,
        cpus_per_worker=a.cpus_per_worker,
        gpus_per_worker=a.gpus_per_worker,
        predictor=predictor,
        storage_options=a.storage_options,
        progress=not a.quiet,
    )
    print(
        f"{len(result.written)} written, {result.skipped} already there, {len(result.errors)} failed "
        f"(of {result.jobs}) on {result.workers} worker(s) in {result.seconds:.1f} s "
        f"(+{result.startup_seconds:.1f} s start): {result.volumes_per_second:.3f} volumes/s"
        + (f"; {result.worker_deaths} worker death(s) retried" if result.worker_deaths else "")
    )
    for e in result.errors:
        path, message = e["path"], e["error"]
        print(f"  {message if path in message else f'{path}: {message}'}", file=sys.stderr)
    if result.errors:
        print(f"failures listed in {a.output.rstrip('/')}/errors.jsonl; re-run to resume", file=sys.stderr)
    return 0 if result.ok else 1


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if a.ray:
            return run_ray(a)
        predictor = Predictor.from_checkpoint(
            a.checkpoint, overlap=a.overlap, sw_batch=a.sw_batch, device=a.device, tta=a.tta
        )
        result = predict_paths(
            predictor, a.input, a.output, progress=lambda xs: tqdm(xs, desc="predict", unit="image", disable=a.quiet)
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(result.written)} file(s) written, {len(result.errors)} input(s) failed")
    for src, message in result.errors:
        print(f"  {message if src in message else f'{src}: {message}'}", file=sys.stderr)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
