#!/usr/bin/env python
"""Choose the preprocessing of a dataset by rule: read it as tools/to_wds.py would, write plan.json and print why.

The fingerprint (per-axis spacing and shape, modality from headers or intensities, foreground intensity
percentiles) becomes, by nnU-Net's rules where they fit ours (docs/plan.md): the target spacing, the intensity
preset and CT window, foreground cropping, and data.roi_size and train.micro_batch for --model on a --gpu-gib GPU.
INPUT and the input options are those of tools/to_wds.py. Exit status: 0 planned, 2 unusable input or options.

Examples:
    python tools/plan.py data/Task09_Spleen/dataset.json --output plan.json
    python tools/plan.py scans/ --gpu-gib 40 --model mae_vit_base_patch16_3d --output plan.json
    python tools/to_wds.py scans/ shards/ --plan plan.json
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from to_wds import add_input_arguments, input_options  # noqa: E402

from medmae.data.convert.fingerprint import collect  # noqa: E402
from medmae.data.convert.options import ConvertOptions  # noqa: E402
from medmae.data.convert.plan import PlanOptions, make_plan, summary  # noqa: E402
from medmae.io import write_json_atomic  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d, pd = ConvertOptions(), PlanOptions()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="folder, datalist .json, or .csv of 2D images (as tools/to_wds.py reads it)")
    p.add_argument("--output", "-o", default="plan.json", help="plan file to write (default plan.json)")
    p.add_argument("--model", help="model to size crops and micro-batch for (default: the fine-tuning ViT-B/16)")
    p.add_argument("--gpu-gib", type=float, default=pd.gpu_gib, help="memory of one training GPU in GiB")
    p.add_argument("--max-roi", type=int, help="largest crop edge in voxels (default 96 in 3D, 224 in 2D)")
    p.add_argument("--workers", type=int, default=d.workers, help="reader processes (0 = this process)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_input_arguments(p, d)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        popts = PlanOptions(model=a.model, gpu_gib=a.gpu_gib, max_roi=a.max_roi)
        fingerprint = collect(a.input, ConvertOptions(**input_options(a)), workers=a.workers, progress=not a.quiet)
        plan = make_plan(fingerprint, popts)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_json_atomic(a.output, plan)
    print(summary(plan, a.output))
    print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
