#!/usr/bin/env python
"""Data-path benchmark: random crops/s from wds shards and Zarr vs MONAI LoadImaged on the same sources, and
converter throughput vs plain nibabel decode.

    python bench/bench_data.py --quick        # small generated volumes, < 1 min
    python bench/bench_data.py                # CT-sized volumes (384x384x128 int16 -> 1.5x1.5x2 mm), 96^3 crops

Sources are synthetic CT phantoms written as .nii.gz (int16 HU, like scanner exports). All loaders use the same
worker count, crop size, crops per volume and augmentations; MONAI's pipeline decodes and resamples every volume it
crops, as an uncached MONAI training loop does.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medmae.data import DataConfig, build_train_loader  # noqa: E402
from medmae.data.convert import ConvertOptions, convert  # noqa: E402
from medmae.data.synthetic import make_phantom  # noqa: E402


def make_sources(folder: Path, n: int, shape: tuple[int, ...], spacing: tuple[float, ...]) -> Path:
    import nibabel as nib

    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    entries = []
    base_img, base_lab = make_phantom(shape, num_classes=3, seed=0)
    affine = np.diag([*spacing, 1.0])
    for i in range(n):  # cheap variety: rolled copies of one phantom plus fresh noise
        shift = (i * 7) % shape[0]
        img = np.roll(base_img[0], shift, axis=0) + np.random.default_rng(i).normal(0, 5, shape).astype(np.float32)
        nib.save(nib.Nifti1Image(np.round(img).astype(np.int16), affine), folder / "imagesTr" / f"ct_{i:03d}.nii.gz")
        nib.save(nib.Nifti1Image(np.roll(base_lab, shift, axis=0), affine), folder / "labelsTr" / f"ct_{i:03d}.nii.gz")
        entries.append({"image": f"imagesTr/ct_{i:03d}.nii.gz", "label": f"labelsTr/ct_{i:03d}.nii.gz"})
    dl = folder / "dataset.json"
    dl.write_text(json.dumps({"training": entries}))
    return dl


def bench_decode(dl: Path, keys: tuple[str, ...]) -> tuple[float, float]:
    """Plain nibabel decode of the ``keys`` files of every sample in one process: (MB of image voxels, seconds)."""
    import nibabel as nib

    entries = json.loads(dl.read_text())["training"]
    t, mb = time.perf_counter(), 0.0
    for e in entries:
        for k in keys:
            nbytes = np.asanyarray(nib.load(dl.parent / e[k]).dataobj).nbytes
            mb += nbytes / 1e6 if k == "image" else 0.0
    return mb, time.perf_counter() - t


def bench_convert(dl: Path, out: Path, opts: ConvertOptions) -> float:
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    res = convert(dl, out, opts, progress=False)
    assert res.ok, res.errors
    return time.perf_counter() - t


def crops_per_second(batches, n_batches: int, batch_size: int) -> float:
    it = iter(batches)
    next(it)  # worker start and first buffer fill are not throughput
    t = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    return n_batches * batch_size / (time.perf_counter() - t)


def monai_loader(dl: Path, args, spacing, cache: bool):
    from monai.data import CacheDataset, DataLoader, Dataset, list_data_collate
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        LoadImaged,
        Orientationd,
        RandFlipd,
        RandRotate90d,
        RandScaleIntensityd,
        RandShiftIntensityd,
        RandSpatialCropSamplesd,
        ScaleIntensityRanged,
        Spacingd,
    )
    from torch.utils.data import RandomSampler

    keys = ["image", "label"]
    files = [{k: str(dl.parent / e[k]) for k in keys} for e in json.loads(dl.read_text())["training"]]
    det = [
        LoadImaged(keys),
        EnsureChannelFirstd(keys),
        Orientationd(keys, axcodes="RAS", labels=RAS_LABELS),
        Spacingd(keys, pixdim=spacing, mode=("bilinear", "nearest")),
        ScaleIntensityRanged("image", a_min=-175, a_max=250, b_min=0.0, b_max=1.0, clip=True),
    ]
    rand = [
        RandSpatialCropSamplesd(keys, roi_size=args.roi, num_samples=args.crops_per_volume, random_size=False),
        *[RandFlipd(keys, prob=0.1, spatial_axis=d) for d in range(3)],
        RandRotate90d(keys, prob=0.1, max_k=3),
        RandShiftIntensityd("image", offsets=0.1, prob=0.5),
        RandScaleIntensityd("image", factors=0.1, prob=0.5),
    ]
    if cache:  # deterministic part cached: decoded, resampled, scaled volumes held in RAM
        ds = CacheDataset(files, Compose(det + rand), num_workers=args.workers, progress=False)
    else:
        ds = Dataset(files, Compose(det + rand))
    bs = max(1, args.batch_size // args.crops_per_volume)  # each item yields crops_per_volume crops
    sampler = RandomSampler(ds, replacement=True, num_samples=10**6)
    loader = DataLoader(ds, batch_size=bs, sampler=sampler, num_workers=args.workers, collate_fn=list_data_collate)
    return loader, bs * args.crops_per_volume


RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small volumes and 48^3 crops (< 1 min)")
    p.add_argument("--workdir", default="/tmp/medmae_bench")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--volumes", type=int)
    p.add_argument("--batches", type=int, help="timed batches per loader")
    p.add_argument("--cache", action="store_true", help="also time MONAI CacheDataset (holds every volume in RAM)")
    args = p.parse_args()
    src_shape, src_spacing, spacing = (384, 384, 128), (1.0, 1.0, 2.5), (1.5, 1.5, 2.0)
    args.roi, args.crops_per_volume, args.batch_size = (96, 96, 96), 4, 4
    n, batches = args.volumes or 8, args.batches or 10
    if args.quick:
        src_shape, args.roi = (128, 128, 64), (48, 48, 48)
        n, batches = args.volumes or 4, args.batches or 6
    work = Path(args.workdir)
    dl = make_sources(work / "src", n, src_shape, src_spacing)
    opts = dict(preset="ct", workers=args.workers, shard_size_mb=64)

    print(
        f"sources: {n} x {src_shape} int16 .nii.gz, {args.workers} workers, crops {args.roi}, "
        f"{args.crops_per_volume} crops/volume, batch {args.batch_size}"
    )
    import monai.transforms  # noqa: F401 - one-time import cost is not throughput

    mb, t_dec = bench_decode(dl, ("image",))
    rows = [("nibabel decode, images (1 process)", mb / t_dec)]
    _, t_both = bench_decode(dl, ("image", "label"))
    rows.append(("nibabel decode, images + labels (1 process)", mb / t_both))
    for w in sorted({1, args.workers}):
        t = bench_convert(dl, work / "conv_norsmp", ConvertOptions(**{**opts, "workers": w}))
        rows.append((f"to_wds --preset ct, {w} worker(s)", mb / t))
    t = bench_convert(dl, work / "wds", ConvertOptions(**opts, spacing=spacing))
    rows.append((f"to_wds + resample to {spacing}, {args.workers} workers", mb / t))
    t = bench_convert(dl, work / "zarr", ConvertOptions(**opts, spacing=spacing, format="zarr"))
    rows.append((f"to_zarr + resample, {args.workers} workers", mb / t))
    print("\nconverter throughput (MB of source image voxels / s; the converter also reads the labels)")
    for name, v in rows:
        print(f"  {name:48s} {v:8.1f} MB/s   {v / rows[0][1]:5.2f}x decode")

    common = dict(
        roi_size=args.roi,
        crops_per_volume=args.crops_per_volume,
        num_workers=args.workers,
        samples_per_epoch=10**6,
        shuffle_buffer=4,
        crop_shuffle_buffer=8,
    )
    speeds = {}
    for fmt in ("wds", "zarr"):
        loader = build_train_loader(
            DataConfig(path=str(work / fmt), format=fmt, **common), batch_size=args.batch_size, with_labels=True
        )
        speeds[fmt] = crops_per_second(loader, batches, args.batch_size)
    loader, per_batch = monai_loader(dl, args, spacing, cache=False)
    speeds["monai"] = crops_per_second(loader, max(2, batches // 3), per_batch)
    if args.cache:
        loader, per_batch = monai_loader(dl, args, spacing, cache=True)
        speeds["monai_cache"] = crops_per_second(loader, batches, per_batch)
    print(f"\nrandom {args.roi} crops/s with labels, {args.workers} workers")
    names = {
        "wds": "wds shards",
        "zarr": "Zarr",
        "monai": "MONAI LoadImaged (uncached)",
        "monai_cache": "MONAI CacheDataset (all in RAM)",
    }
    for k, v in speeds.items():
        print(f"  {names[k]:32s} {v:8.1f} crops/s   {v / speeds['monai']:6.1f}x MONAI uncached")


if __name__ == "__main__":
    main()
