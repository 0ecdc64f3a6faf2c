#!/usr/bin/env python
"""Convert medical images to WebDataset tar shards or a Zarr v3 group for medmae's streaming loaders.

INPUT is a folder (imagesTr/ + labelsTr/, <key>_seg label files, DICOM series subfolders, or a dataset.json),
an MSD-style datalist JSON, or a CSV of 2D images with labels. OUTPUT is a folder or an object store URL
(s3://bucket/prefix, with medmae[s3] installed). Bad samples are listed in OUTPUT/errors.jsonl and skipped; the exit
status is 1 when there were any, unless --allow-errors; 2 for unusable arguments or an OUTPUT that cannot be written.
Re-running resumes.

Examples:
    python tools/to_wds.py data/Task09_Spleen/dataset.json shards/spleen --format wds --preset ct --spacing 1.5 1.5 2
    python tools/plan.py data/Task09_Spleen/dataset.json --output plan.json      # or choose them by rule
    python tools/to_wds.py data/Task09_Spleen/dataset.json shards/spleen --plan plan.json
    python tools/to_wds.py Data_Entry_2017.csv s3://bucket/cxr14 --preset xray --image-col "Image Index" \
        --label-col "Finding Labels" --images-dir images --train-list train_val_list.txt --test-list test_list.txt \
        --group-col "Patient ID" --val-fraction 0.1
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from medmae.data.convert import ConvertOptions, convert  # noqa: E402


def add_input_arguments(p: argparse.ArgumentParser, d: ConvertOptions) -> None:
    """How INPUT is read (shared with tools/plan.py, which must find the same samples)."""
    g = p.add_argument_group("inputs")
    g.add_argument("--spatial-dims", type=int, choices=[2, 3], help="default: 2 for a CSV input, else 3")
    g.add_argument("--images-dir", help="folder input: images subfolder (default imagesTr if present)")
    g.add_argument("--labels-dir", help="folder input: labels subfolder (default labelsTr if present)")
    g.add_argument("--label-suffix", default=d.label_suffix, help="folder input: <key><suffix>.<ext> is a label")
    g.add_argument("--channel-suffixes", default="", help="folder input: e.g. t1,t1ce,t2,flair for <key>_t1.nii.gz...")
    g.add_argument("--image-col", default=d.image_col, help="CSV: image path column")
    g.add_argument("--label-cols", default="", help="CSV: comma-separated 0/1 label columns")
    g.add_argument("--label-col", help="CSV: one column of label names joined by --label-sep")
    g.add_argument("--label-sep", default=d.label_sep)
    g.add_argument("--group-col", help="CSV: patient column; --val-fraction then holds out whole patients")
    g.add_argument("--train-list", help="CSV: file of image names that may be trained on (train_val_list.txt)")
    g.add_argument("--test-list", help="CSV: file of image names of the test split (test_list.txt)")


def input_options(a: argparse.Namespace) -> dict:
    """The ``ConvertOptions`` fields of ``add_input_arguments``."""

    def csv_list(s: str) -> list[str]:
        return [x.strip() for x in s.split(",") if x.strip()]

    return dict(
        spatial_dims=a.spatial_dims,
        images_dir=a.images_dir,
        labels_dir=a.labels_dir,
        label_suffix=a.label_suffix,
        channel_suffixes=csv_list(a.channel_suffixes),
        image_col=a.image_col,
        label_cols=csv_list(a.label_cols),
        label_col=a.label_col,
        label_sep=a.label_sep,
        group_col=a.group_col,
        train_list=a.train_list,
        test_list=a.test_list,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = ConvertOptions()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="folder, datalist .json, or .csv of 2D images")
    p.add_argument("output", help="output folder or URL such as s3://bucket/prefix (created; a re-run resumes)")
    p.add_argument("--format", choices=["wds", "zarr"], default=d.format)
    g = p.add_argument_group("preprocessing (recorded in the manifest)")
    g.add_argument(
        "--plan",
        help="plan.json written by tools/plan.py: sets --preset, --spacing, --ct-window and --crop-foreground "
        "(give none of them with it) and is recorded in the manifest",
    )
    g.add_argument(
        "--preset",
        choices=["ct", "mri", "xray", "none"],
        help=f"ct: clip to --ct-window, scale to [0,1]; mri: per-channel z-score on non-zero voxels; "
        f"xray: scale to [0,1] (default {d.preset})",
    )
    g.add_argument(
        "--ct-window", type=float, nargs=2, metavar=("LOW", "HIGH"), help=f"default {' '.join(map(str, d.ct_window))}"
    )
    g.add_argument("--spacing", type=float, nargs="+", help="target spacing in mm (image linear, label nearest)")
    g.add_argument("--no-reorient", action="store_true", help="keep the source orientation instead of RAS")
    g.add_argument("--crop-foreground", action="store_true", default=None, help="crop to the foreground box")
    g.add_argument("--fg-margin", type=int, default=d.fg_margin)
    g.add_argument("--image-dtype", choices=["float16", "float32"], default=d.image_dtype)
    g.add_argument("--channels", type=int, help="expected channels (default: from the first sample)")
    g.add_argument(
        "--min-size",
        type=int,
        default=d.min_size,
        help="refuse samples (degenerate_shape) smaller than this along any axis after preprocessing",
    )
    add_input_arguments(p, d)
    g = p.add_argument_group("output")
    g.add_argument(
        "--val-fraction",
        type=float,
        default=d.val_fraction,
        help="validation share (of patients with --group-col) when the input names no validation set",
    )
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--shard-size-mb", type=float, default=d.shard_size_mb)
    g.add_argument("--prefix", default=d.prefix, help="shard name prefix")
    g.add_argument("--zarr-chunk", type=int, default=d.zarr_chunk)
    g.add_argument("--zarr-shard", type=int, default=d.zarr_shard, help="0 = no Zarr sharding")
    g.add_argument("--workers", type=int, default=d.workers)
    g.add_argument(
        "--storage-options",
        type=json.loads,
        default={},
        help='OUTPUT URL: fsspec options as JSON, e.g. \'{"endpoint_url": "http://minio:9000"}\' '
        "(default: the backend's environment variables, AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)",
    )
    g.add_argument("--verify", action="store_true", help="read everything back and check checksums")
    g.add_argument("--allow-errors", action="store_true", help="exit 0 even when samples were skipped")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def _planned(a: argparse.Namespace) -> tuple[dict, dict | None]:
    """The preprocessing flags, from the command line or from ``--plan`` (never both), and the plan's record."""
    given = {
        "preset": a.preset,
        "ct_window": tuple(a.ct_window) if a.ct_window else None,
        "spacing": tuple(a.spacing) if a.spacing else None,
        "crop_foreground": a.crop_foreground,
    }
    given = {k: v for k, v in given.items() if v is not None}
    if not a.plan:
        return given, None
    from medmae.data.convert.plan import convert_options, read_plan

    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise ValueError(f"--plan {a.plan} sets the preprocessing: drop {flags} (or edit the plan's 'convert')")
    plan = read_plan(a.plan)
    record = {
        "file": str(Path(a.plan).resolve()),
        **{k: plan.get(k) for k in ("created", "convert", "choices", "train")},
    }
    return convert_options(plan), record


def options_from_args(a: argparse.Namespace) -> ConvertOptions:
    preprocessing, plan = _planned(a)
    return ConvertOptions(
        format=a.format,
        **preprocessing,
        reorient=not a.no_reorient,
        fg_margin=a.fg_margin,
        image_dtype=a.image_dtype,
        channels=a.channels,
        val_fraction=a.val_fraction,
        seed=a.seed,
        shard_size_mb=a.shard_size_mb,
        zarr_chunk=a.zarr_chunk,
        zarr_shard=a.zarr_shard,
        workers=a.workers,
        prefix=a.prefix,
        **input_options(a),
        min_size=a.min_size,
        storage_options=a.storage_options,
        plan=plan,
    )


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        opts = options_from_args(a)
        result = convert(a.input, a.output, opts, run_verify=a.verify, progress=not a.quiet)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"{result.output}: {result.converted} converted ({result.megabytes:.1f} MB), "
        f"{result.skipped} already done, {len(result.errors)} error(s)"
    )
    for err in result.errors:
        print(f"  {err['reason']}: {err['key']}: {err['message']}")
    if a.verify:
        print(f"verify: {'ok' if not result.problems else f'{len(result.problems)} problem(s)'}")
        for p in result.problems:
            print(f"  {p}")
    if result.problems or (result.errors and not a.allow_errors):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
