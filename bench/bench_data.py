#!/usr/bin/env python
"""Data-path benchmark: random crops/s of the training stream (wds shards and Zarr) vs MONAI's LoadImaged pipeline
on the same sources, converter throughput vs plain nibabel decode, and the training stream against the model's own
rate.

    python bench/bench_data.py --quick        # small generated volumes, < 1 min
    python bench/bench_data.py                # CT-sized volumes (384x384x128 int16 -> 1.5x1.5x2 mm), 96^3 crops
    python bench/bench_data.py --resident-only   # only the loader vs model table (skips converter and MONAI rows)

Sources are synthetic CT phantoms written as .nii.gz (int16 HU, like scanner exports). Both pipelines use the same
worker count, crop size and augmentations; MONAI's pipeline decodes and resamples every volume it crops (4 crops a
volume), as an uncached MONAI training loop does, or holds them all in RAM with ``--cache`` (CacheDataset, the
analogue of our resident set).

The last table: crops/s of the training stream (resident crops) on the CPU (and on the GPU when present), next to
the crops/s of a full training step (forward, backward, AdamW; bf16) of the debug MAE and of ViT-B/16 on the same
device, and the ratio loader / model. "Per CPU-s" divides by the CPU seconds the loader's processes (main +
workers) spent.
``measure_loader(device, tiny)`` is the same measurement for ``bench/gpu_check.py``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medmae.data import DataConfig, build_train_stream, read_manifest  # noqa: E402
from medmae.data.convert import ConvertOptions, convert  # noqa: E402
from medmae.data.synthetic import make_phantom  # noqa: E402


def make_sources(folder: Path, n: int, shape: tuple[int, ...], spacing: tuple[float, ...], ext=".nii.gz") -> Path:
    import nibabel as nib

    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    entries = []
    base_img, base_lab = make_phantom(shape, num_classes=3, seed=0)
    affine = np.diag([*spacing, 1.0])
    for i in range(n):  # cheap variety: rolled copies of one phantom plus fresh noise
        shift = (i * 7) % shape[0]
        img = np.roll(base_img[0], shift, axis=0) + np.random.default_rng(i).normal(0, 5, shape).astype(np.float32)
        nib.save(nib.Nifti1Image(np.round(img).astype(np.int16), affine), folder / "imagesTr" / f"ct_{i:03d}{ext}")
        nib.save(nib.Nifti1Image(np.roll(base_lab, shift, axis=0), affine), folder / "labelsTr" / f"ct_{i:03d}{ext}")
        entries.append({"image": f"imagesTr/ct_{i:03d}{ext}", "label": f"labelsTr/ct_{i:03d}{ext}"})
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
        RandSpatialCropSamplesd(keys, roi_size=args.roi, num_samples=MONAI_CROPS, random_size=False),
        *[RandFlipd(keys, prob=0.1, spatial_axis=d) for d in range(3)],
        RandRotate90d(keys, prob=0.1, max_k=3),
        RandShiftIntensityd("image", offsets=0.1, prob=0.5),
        RandScaleIntensityd("image", factors=0.1, prob=0.5),
    ]
    if cache:  # deterministic part cached: decoded, resampled, scaled volumes held in RAM
        ds = CacheDataset(files, Compose(det + rand), num_workers=args.workers, progress=False)
    else:
        ds = Dataset(files, Compose(det + rand))
    bs = max(1, args.batch_size // MONAI_CROPS)  # each item yields MONAI_CROPS crops
    sampler = RandomSampler(ds, replacement=True, num_samples=10**6)
    loader = DataLoader(ds, batch_size=bs, sampler=sampler, num_workers=args.workers, collate_fn=list_data_collate)
    return loader, bs * MONAI_CROPS


RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
MONAI_CROPS = 4  # crops MONAI cuts from each decoded volume (the reference's num_samples)


# ---- the training stream vs the model ---------------------------------------------------------------------------
def cpu_seconds() -> float:
    """CPU seconds used so far by this process and its children (the loaders' worker processes)."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loader_rate(batches, batch: int, device: torch.device, min_s: float, warmup: int = 2) -> dict:
    """Crops/s after ``warmup`` batches (worker start, first fill), over at least ``min_s`` seconds of both wall
    time and CPU time (the CPU clock ticks at 10 ms), and crops per CPU second of all the loader's processes."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    _sync(device)
    c0, t0, n = cpu_seconds(), time.perf_counter(), 0
    while n < 3 or min(time.perf_counter() - t0, cpu_seconds() - c0) < min_s:
        next(it)
        n += 1
    _sync(device)
    dt, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    return {"crops_per_s": n * batch / dt, "crops_per_cpu_s": n * batch / max(cpu, 1e-9), "cores_busy": cpu / dt}


def crop_kernel_rate(stream, n: int, device: torch.device) -> float:
    """Crops/s of the resident set's batched crop + augmentation alone (no refill): the ceiling of the path."""
    r, b = stream.resident, stream.batch_size
    draw = lambda: stream.sampler.draw(b, r.live(), r.shape, r.fg, r.nfg, stream.probs)  # noqa: E731
    r.crop(draw(), stream.dtype)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        r.crop(draw(), stream.dtype)
    _sync(device)
    return n * b / (time.perf_counter() - t0)


def model_rate(name: str, roi: tuple[int, ...], batch: int, device: torch.device, steps: int = 3) -> dict:
    """Crops/s of full bf16 training steps (forward, backward, AdamW) on ``device``, and on a CPU also crops per
    CPU second of the process (all its threads): bf16 weights on CUDA as DeepSpeed's bf16 mode trains, bf16
    autocast on a CPU (bench/bench_model.py measures both)."""
    from bench_model import step_fn

    from medmae.models import create_model

    torch.manual_seed(0)
    model = create_model(name, img_size=roi, in_chans=1).to(device)
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(torch.bfloat16)
    x = torch.randn(batch, 1, *roi, device=device, dtype=torch.bfloat16 if cuda else torch.float32)
    step = step_fn(model, lambda v: model(v)[0], device, torch.float32 if cuda else torch.bfloat16)
    step(x)
    _sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(steps):
        step(x)
    _sync(device)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"crops_per_s": steps * batch / dt, "crops_per_cpu_s": steps * batch / cpu, "batch": batch}


CT_MODELS = [("mae_vit_3d_debug", 8), ("mae_vit_base_patch16_3d", 2)]  # (model, CPU batch); GPU batch 128
XRAY_MODELS = [("mae_vit_2d_debug", 32), ("mae_vit_base_patch16_2d", 8)]


def resident_table(
    path: Path,
    roi,
    workers: int,
    quick: bool = False,
    device: torch.device | None = None,
    crop: str = "random",
    models=CT_MODELS,
) -> dict:
    """Loader vs model over a converted dataset: the training stream on the CPU (float32 and float16 out) and the
    GPU if present, and the models' training rates on each device. On a CPU the ratio loader / model compares crops
    per CPU second (both would share the cores; other load on the machine does not distort it); on a GPU it compares
    crops/s."""
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    devices = [device] if device is not None else devices
    dims = len(roi)
    common: dict[str, Any] = dict(
        path=str(path),
        spatial_dims=dims,
        roi_size=tuple(roi),
        num_workers=workers,
        crop=crop,
    )
    rows: dict[str, dict] = {}
    out: dict[str, Any] = {"roi": list(roi), "workers": workers, "volumes": len(read_manifest(path)["samples"])}
    out["rows"] = rows
    min_s = 1.5 if quick else 4.0
    for dev in devices:
        cuda = dev.type == "cuda"
        batch = (128 if dims == 3 else 256) if cuda else 8
        variants = [torch.float32] + ([torch.float16] if not cuda and not quick else [])
        for dtype in variants:
            stream = build_train_stream(DataConfig(**common), batch_size=batch, device=dev, dtype=dtype)
            row = loader_rate(stream, batch, dev, min_s)
            row["crop_kernel_per_s"] = crop_kernel_rate(stream, 4 if quick else 10, dev)
            if cuda:  # the other gather, and the model's bf16 straight out of the kernel
                stream.resident.gather = "slices"
                row["crop_kernel_slices_per_s"] = crop_kernel_rate(stream, 10, dev)
                stream.resident.gather, stream.dtype = "index", torch.bfloat16
                row["crop_kernel_bf16_per_s"] = crop_kernel_rate(stream, 10, dev)
            row.update(wait_s=stream.stats()["wait_s"], resident_volumes=len(stream.resident))
            stream.close()
            name = f"resident, {dev.type}" + (", float16 out" if dtype == torch.float16 else "")
            rows[name] = row
        # the data not fitting the budget (half of it does): the workers' decoding at resident_reuse paces it
        half = sum(np.prod(x["shape"]) * 2 for x in read_manifest(path)["samples"]) / 2 / 2**30
        stream = build_train_stream(DataConfig(**common, resident_gib=half), batch_size=batch, device=dev)
        srow = loader_rate(stream, batch, dev, min_s)
        srow.update(wait_s=stream.stats()["wait_s"], resident_volumes=len(stream.resident))
        stream.close()
        rows[f"resident, {dev.type}, streaming half the data"] = srow
        row = rows[f"resident, {dev.type}"]
        key = "crops_per_s" if cuda else "crops_per_cpu_s"
        for name, b in models:
            if quick and not cuda and "base" in name:
                continue
            m = model_rate(name, tuple(roi), (128 if dims == 3 else 256) if cuda else b, dev, steps=2 if quick else 3)
            rows[f"{name}, {dev.type}"] = {"model": m, "ratio": row[key] / m[key]}
    return out


def make_xrays(folder: Path, n: int, shape=(1024, 1024)) -> Path:
    """``n`` chest-x-ray-sized 8-bit images and the CSV the converter reads (two findings per image). Written as
    2D NIfTI (nibabel) rather than PNG so that the bench needs no ITK."""
    import nibabel as nib

    folder.mkdir(parents=True, exist_ok=True)
    base = (make_phantom(shape, 2, seed=0, kind="xray")[0][0] * 255).astype(np.uint8)
    rows = ["image,effusion,mass"]
    for i in range(n):
        img = np.roll(base, i * 37, axis=1)
        nib.save(nib.Nifti1Image(img, np.eye(4)), folder / f"x{i:03d}.nii")
        rows.append(f"x{i:03d}.nii,{i % 2},{int(i % 3 == 0)}")
    (folder / "x.csv").write_text("\n".join(rows) + "\n")
    return folder / "x.csv"


def print_table(res: dict) -> None:
    rows = res["rows"]
    what = "random resized crops" if len(res["roi"]) == 2 else "crops"
    print(f"\n{tuple(res['roi'])} {what}, {res['workers']} loader workers: the training stream vs the model")
    for name, r in rows.items():
        if "model" in r:
            m = r["model"]
            cpu = f"{m['crops_per_cpu_s']:8.1f} per CPU-s" if "cpu" in name else " " * 17
            print(
                f"  {'train step ' + name:36s} {m['crops_per_s']:9.1f} crops/s {cpu}   loader/model {r['ratio']:7.2f}"
            )
            continue
        kern = f", crop kernel alone {r['crop_kernel_per_s']:.0f}/s" if "crop_kernel_per_s" in r else ""
        if "crop_kernel_slices_per_s" in r:
            kern += (
                f" (slices gather {r['crop_kernel_slices_per_s']:.0f}/s, bf16 out {r['crop_kernel_bf16_per_s']:.0f}/s)"
            )
        print(
            f"  {name:36s} {r['crops_per_s']:9.1f} crops/s {r['crops_per_cpu_s']:8.1f} per CPU-s "
            f"({r['cores_busy']:.1f} cores busy){kern}"
        )


def measure_loader(device: torch.device | str, tiny: bool = False) -> dict:
    """The loader-vs-model figures on ``device``, on a dataset generated here (for bench/gpu_check.py):
    CT-sized volumes (256x256x160 after resampling, 96^3 crops), or with ``tiny`` small ones (96x96x64, 48^3
    crops; < 30 s on a 2-core CPU)."""
    import os
    import tempfile

    device = torch.device(device)
    shape, roi, n = ((96, 96, 64), (48,) * 3, 4) if tiny else ((256, 256, 160), (96,) * 3, 8)
    workers = 2 if tiny or device.type != "cuda" else max(2, min(8, (os.cpu_count() or 4) - 2))
    with tempfile.TemporaryDirectory() as tmp:
        dl = make_sources(Path(tmp) / "src", n, shape, (1.5, 1.5, 2.0), ext=".nii")
        opts = ConvertOptions(preset="ct", workers=min(workers, n), shard_size_mb=64)
        t_conv = bench_convert(dl, Path(tmp) / "wds", opts)
        res = resident_table(Path(tmp) / "wds", roi, workers, quick=tiny, device=device)
        res.update(device=str(device), volume_shape=list(shape), convert_s=t_conv)
        if not tiny:
            csv = make_xrays(Path(tmp) / "xray", 16)
            bench_convert(csv, Path(tmp) / "xray_wds", ConvertOptions(preset="xray", workers=min(workers, 8)))
            res["xray"] = resident_table(
                Path(tmp) / "xray_wds", (224, 224), workers, device=device, crop="resized", models=XRAY_MODELS
            )
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small volumes and 48^3 crops (< 1 min)")
    p.add_argument("--workdir", default="/tmp/medmae_bench")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--volumes", type=int)
    p.add_argument("--batches", type=int, help="timed batches per loader")
    p.add_argument("--cache", action="store_true", help="also time MONAI CacheDataset (holds every volume in RAM)")
    p.add_argument("--resident-only", action="store_true", help="only the loader vs model table")
    args = p.parse_args()
    src_shape, src_spacing, spacing = (384, 384, 128), (1.0, 1.0, 2.5), (1.5, 1.5, 2.0)
    args.roi, args.batch_size = (96, 96, 96), 4
    n, batches = args.volumes or 8, args.batches or 10
    if args.quick:
        src_shape, args.roi = (128, 128, 64), (48, 48, 48)
        n, batches = args.volumes or 4, args.batches or 6
    work = Path(args.workdir)
    opts = dict(preset="ct", workers=args.workers, shard_size_mb=64)
    if args.resident_only:
        if not (work / "wds" / "manifest.json").exists():
            dl = make_sources(work / "src", n, src_shape, src_spacing)
            bench_convert(dl, work / "wds", ConvertOptions(**opts, spacing=spacing))
        print_table(resident_table(work / "wds", args.roi, args.workers, quick=args.quick))
        if not args.quick:
            if not (work / "xray_wds" / "manifest.json").exists():
                bench_convert(make_xrays(work / "xray", 16), work / "xray_wds", ConvertOptions(preset="xray"))
            xr = resident_table(work / "xray_wds", (224, 224), args.workers, crop="resized", models=XRAY_MODELS)
            print_table(xr)
        return
    dl = make_sources(work / "src", n, src_shape, src_spacing)

    print(
        f"sources: {n} x {src_shape} int16 .nii.gz, {args.workers} workers, crops {args.roi}, batch {args.batch_size}"
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

    speeds = {}
    for fmt in ("wds", "zarr"):
        cfg = DataConfig(path=str(work / fmt), format=fmt, roi_size=args.roi, num_workers=args.workers)
        stream = build_train_stream(cfg, batch_size=args.batch_size, with_labels=True, device="cpu")
        speeds[fmt] = crops_per_second(stream, batches, args.batch_size)
        stream.close()
    loader, per_batch = monai_loader(dl, args, spacing, cache=False)
    speeds["monai"] = crops_per_second(loader, max(2, batches // 3), per_batch)
    if args.cache:
        loader, per_batch = monai_loader(dl, args, spacing, cache=True)
        speeds["monai_cache"] = crops_per_second(loader, batches, per_batch)
    print(f"\nrandom {args.roi} crops/s with labels, {args.workers} workers")
    names = {
        "wds": "training stream, wds shards",
        "zarr": "training stream, Zarr",
        "monai": "MONAI LoadImaged (uncached)",
        "monai_cache": "MONAI CacheDataset (all in RAM)",
    }
    for k, v in speeds.items():
        print(f"  {names[k]:32s} {v:8.1f} crops/s   {v / speeds['monai']:6.1f}x MONAI uncached")
    print_table(resident_table(work / "wds", args.roi, args.workers, quick=args.quick))


if __name__ == "__main__":
    main()
