"""A preprocessing plan from a dataset fingerprint (``tools/plan.py``): target spacing, intensity preset and CT
window, foreground cropping, and the crop size and micro-batch a model fits in a GPU, each with its rule.

The rules are nnU-Net's where they fit our pipeline; docs/plan.md puts them side by side and says where and why
ours differ. ``tools/to_wds.py --plan plan.json`` applies the ``convert`` block (``convert_options``).
"""

from __future__ import annotations

import datetime
import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np

from medmae.config import Range, check_ranges
from medmae.data.convert.fingerprint import Fingerprint

__all__ = ["PlanOptions", "convert_options", "make_plan", "read_plan", "summary", "target_spacing"]

PLAN_VERSION = 1
ANISOTROPY = 3.0
"""nnU-Net's ANISO_THRESHOLD: an axis whose median spacing is this many times the others' is the low-resolution
axis (when it also has this many times fewer voxels)."""
CROP_WHEN = 0.75
"""Crop to the foreground when the median case's foreground box holds at most this share of its voxels (nnU-Net
switches to its nonzero-mask normalisation at the same 3/4)."""
RESIDENT_SHARE = 0.25
"""Share of the GPU the training stream keeps for resident volumes (``data.resident_gib``'s default)."""
STATIC_BYTES_PER_PARAM = 20
"""DeepSpeed bf16 on one GPU: bf16 weights and gradients (2 + 2), fp32 master weights and gradients (4 + 4),
Adam's two fp32 moments (8)."""
HEADROOM = 1.35
"""Activations counted x this: the backward's gradient buffers, kernel workspaces and fragmentation, which the count
leaves out (docs/plan.md: the count against the peak measured on an H200)."""
MIN_MICRO_BATCH = 2
MAX_MICRO_BATCH = 64
DEFAULT_MODEL = {3: "unetr_vit_base_patch16_3d", 2: "vit_base_patch16_2d_cls"}
DEFAULT_MAX_ROI = {3: 96, 2: 224}
"""The paper's 96³ crop (and 224² for 2D): the size the recipes' position tables, lr and schedule were tuned at."""
CONVERT_KEYS = ("preset", "spacing", "ct_window", "crop_foreground")


@dataclass
class PlanOptions:
    model: str | None = None
    """Model the crop size and micro-batch are sized for; None = UNETR ViT-B/16 (3D) or the ViT-B/16 classifier
    (2D), the fine-tuning models, whose activations are larger than the MAE's at the same crop."""
    gpu_gib: Annotated[float, Range(gt=0)] = 80.0
    """Memory of one training GPU in GiB."""
    max_roi: Annotated[int | None, Range(ge=16)] = None
    """Largest crop edge in voxels; None = 96 (3D) or 224 (2D)."""

    def __post_init__(self) -> None:
        check_ranges(self)


def _stats(values: np.ndarray) -> dict[str, list[float]]:
    return {
        "median": np.percentile(values, 50, axis=0).round(4).tolist(),
        "min": values.min(axis=0).round(4).tolist(),
        "p10": np.percentile(values, 10, axis=0).round(4).tolist(),
        "p90": np.percentile(values, 90, axis=0).round(4).tolist(),
        "max": values.max(axis=0).round(4).tolist(),
    }


def target_spacing(spacings: np.ndarray, shapes: np.ndarray) -> tuple[list[float], str]:
    """nnU-Net's target spacing: the median per axis; when one axis is over ``ANISOTROPY`` times coarser than the
    others *and* has over ``ANISOTROPY`` times fewer voxels, that axis takes the 10th percentile of its spacings
    instead (finer: fewer interpolated slices), but never finer than the other axes."""
    target = np.percentile(spacings, 50, axis=0)
    size = np.percentile(shapes, 50, axis=0)
    worst = int(np.argmax(target))
    others = [i for i in range(len(target)) if i != worst]
    ratio = target[worst] / max(target[i] for i in others)
    aniso_spacing = target[worst] > ANISOTROPY * max(target[i] for i in others)
    aniso_voxels = size[worst] * ANISOTROPY < min(size[i] for i in others)
    rule = f"median spacing per axis; the coarsest axis ({worst}) is {ratio:.2f}x the next"
    if aniso_spacing and aniso_voxels:
        low = float(np.percentile(spacings[:, worst], 10))
        if low < max(target[i] for i in others):
            low = max(max(target[i] for i in others), low) + 1e-5
        target[worst] = low
        rule += (
            f" (> {ANISOTROPY:g}) with {size[worst]:.0f} voxels against {min(size[i] for i in others):.0f} "
            f"(< 1/{ANISOTROPY:g}): anisotropic, so axis {worst} takes the 10th percentile of its spacings"
        )
    elif aniso_spacing:
        rule += f" (> {ANISOTROPY:g}), but its voxel count is not {ANISOTROPY:g}x smaller: the median stays"
    else:
        rule += f" (<= {ANISOTROPY:g}): the median stays"
    return [round(float(t), 6) for t in target], rule


def _modality(fp: Fingerprint) -> tuple[str, dict[str, Any], str]:
    """(modality family, the evidence counted, rule): the datalist's declaration, else the files' headers, else
    the intensities (air at -1000 HU is CT)."""
    header = Counter(c.header for c in fp.cases if c.header)
    intensity = Counter(c.intensity for c in fp.cases)
    evidence: dict[str, Any] = {"header": dict(header), "intensity": dict(intensity)}
    declared = [m for m in (fp.datalist_modality or []) if m]
    if declared:
        evidence["datalist"] = fp.datalist_modality
        chosen = "CT" if all(m == "CT" for m in declared) else Counter(declared).most_common(1)[0][0]
        return chosen, evidence, "the datalist's modality / channel_names"
    if header:
        return header.most_common(1)[0][0], evidence, "the image headers (DICOM Modality, NIfTI descrip), majority"
    if fp.spatial_dims == 2:
        return "X-ray", evidence, "2D images without a header naming a modality: radiographs"
    top = intensity.most_common(1)[0][0]
    rule = (
        "no header names a modality: intensities, majority (air near -1000 HU in >= 1 % of the voxels: CT; "
        "no negative values: MRI-like)"
    )
    return {"CT": "CT", "non-negative": "MR"}.get(top, "other"), evidence, rule


def _intensity(fp: Fingerprint) -> list[dict[str, float | int]]:
    out: list[dict[str, float | int]] = []
    for c in range(fp.channels):
        v = fp.samples(c).astype(np.float64)
        if not v.size:
            out.append({"samples": 0})
            continue
        p005, p50, p995 = np.percentile(v, [0.5, 50.0, 99.5])
        out.append(
            {
                "samples": int(v.size),
                "mean": round(float(v.mean()), 4),
                "sd": round(float(v.std()), 4),
                "p00_5": round(float(p005), 4),
                "median": round(float(p50), 4),
                "p99_5": round(float(p995), 4),
                "min": round(float(v.min()), 4),
                "max": round(float(v.max()), 4),
            }
        )
    return out


def _micro_batch(model: str, roi: list[int], channels: int, gpu_gib: float) -> tuple[int, float, float]:
    """(largest micro-batch that fits, GiB per sample, GiB fixed)."""
    from medmae.models.memory import train_memory

    mem = train_memory(model, img_size=list(roi), in_chans=channels)
    usable = gpu_gib * 2**30 * (1 - RESIDENT_SHARE)
    fixed = mem.parameters * STATIC_BYTES_PER_PARAM
    per = mem.activation_bytes * HEADROOM
    return max(0, math.floor((usable - fixed) / per)), per / 2**30, fixed / 2**30


def _roi(median: list[float], model: str, channels: int, popts: PlanOptions, dims: int) -> dict[str, Any]:
    from medmae.models.registry import model_config

    cfg = model_config(model)
    if len(cfg.img_size) != dims:
        raise ValueError(f"model: {model} is a {len(cfg.img_size)}D model and the data is {dims}D")
    patch = cfg.patch_size
    cap = (popts.max_roi or DEFAULT_MAX_ROI[dims]) // patch * patch
    roi = [max(patch, min(cap, int(m) // patch * patch)) for m in median]
    start = list(roi)
    while True:
        micro, per, fixed = _micro_batch(model, roi, channels, popts.gpu_gib)
        if micro >= MIN_MICRO_BATCH:
            break
        shrinkable = [a for a in range(dims) if roi[a] > patch]
        if not shrinkable:
            raise ValueError(
                f"gpu_gib: {model} does not fit {MIN_MICRO_BATCH} samples of the smallest crop {roi} in "
                f"{popts.gpu_gib:g} GiB (fixed {fixed:.1f} GiB, {per:.2f} GiB per sample)"
            )
        axis = max(shrinkable, key=lambda a: (roi[a] / median[a], roi[a], -a))  # nnU-Net: the largest vs the median
        roi[axis] -= patch
    micro = min(micro, MAX_MICRO_BATCH)
    rule = (
        f"each axis the largest multiple of the patch ({patch}) within the median resampled shape "
        f"{[round(m) for m in median]} and {cap}: {start}"
    )
    if roi != start:
        rule += f"; shrunk by {patch} on the axis largest against the median shape until {MIN_MICRO_BATCH} fit"
    return {
        "roi_size": roi,
        "roi_rule": rule,
        "micro_batch": micro,
        "micro_rule": (
            f"{model}: {per:.3f} GiB per sample (activations saved for the backward, counted on the meta device in "
            f"bf16, x{HEADROOM}) and {fixed:.2f} GiB fixed ({STATIC_BYTES_PER_PARAM} B per parameter) in "
            f"{1 - RESIDENT_SHARE:.0%} of {popts.gpu_gib:g} GiB (the rest holds resident volumes): the largest "
            f"micro-batch that fits, at most {MAX_MICRO_BATCH}"
        ),
        "estimate_gib": round(fixed + micro * per, 2),
    }


def make_plan(fp: Fingerprint, popts: PlanOptions) -> dict[str, Any]:
    """The plan as ``plan.json`` holds it: the fingerprint's statistics, each choice with its rule, the
    ``convert`` options ``tools/to_wds.py --plan`` applies and the ``train`` overrides for the launchers."""
    dims = fp.spatial_dims
    spacings = np.array([c.spacing for c in fp.cases], dtype=np.float64)
    shapes = np.array([c.shape for c in fp.cases], dtype=np.float64)
    boxes = np.array([c.box_shape for c in fp.cases], dtype=np.float64)
    fraction = boxes.prod(axis=1) / shapes.prod(axis=1)
    choices: dict[str, dict[str, Any]] = {}

    crop = bool(np.median(fraction) <= CROP_WHEN)
    choices["crop_foreground"] = {
        "value": crop,
        "rule": f"the median case's foreground box holds {np.median(fraction):.0%} of its voxels "
        f"({'<=' if crop else '>'} {CROP_WHEN:.0%}: {'crop' if crop else 'keep the whole volume'})",
    }
    stored = boxes if crop else shapes
    if dims == 3:
        spacing, rule = target_spacing(spacings, stored)
        choices["spacing"] = {"value": spacing, "rule": rule}
        resampled = stored * spacings / np.asarray(spacing)
    else:
        choices["spacing"] = {"value": None, "rule": "2D images keep their pixel grid (the converter resamples 3D)"}
        resampled = stored
    modality, evidence, modality_rule = _modality(fp)
    intensity = _intensity(fp)
    if dims == 2:
        preset, preset_rule = "xray", "2D images: scaled to [0, 1] per image"
    elif modality == "CT":
        preset, preset_rule = "ct", "CT: clip to a HU window, scale to [0, 1] (the window below)"
    else:
        preset, preset_rule = "mri", f"{modality}: per-channel z-score on the nonzero voxels of each image"
    choices["preset"] = {"value": preset, "rule": preset_rule}
    if preset == "ct":
        lows = [s["p00_5"] for s in intensity if s["samples"]]
        highs = [s["p99_5"] for s in intensity if s["samples"]]
        if lows:
            window = [round(float(min(lows)), 1), round(float(max(highs)), 1)]
            rule = "the 0.5th and 99.5th percentiles of the foreground intensities"
        else:
            window, rule = [-175.0, 250.0], "no foreground voxels to measure: the converter's default window"
        choices["ct_window"] = {"value": window, "rule": rule}
    median = np.percentile(resampled, 50, axis=0).tolist()
    roi = _roi(median, popts.model or DEFAULT_MODEL[dims], fp.channels, popts, dims)
    choices["roi_size"] = {"value": roi["roi_size"], "rule": roi["roi_rule"]}
    choices["micro_batch"] = {
        "value": roi["micro_batch"],
        "rule": roi["micro_rule"],
        "model": popts.model or DEFAULT_MODEL[dims],
        "gpu_gib": popts.gpu_gib,
        "estimate_gib": roi["estimate_gib"],
    }
    from medmae import __version__

    convert = {k: choices[k]["value"] for k in CONVERT_KEYS if k in choices}
    return {
        "medmae_plan": PLAN_VERSION,
        "tool": "tools/plan.py",
        "version": __version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "input": fp.input,
        "cases": len(fp.cases),
        "errors": fp.errors,
        "spatial_dims": dims,
        "channels": fp.channels,
        "fingerprint": {
            "spacing": _stats(spacings),
            "shape": _stats(shapes),
            "foreground_box_shape": _stats(boxes),
            "foreground_box_fraction": round(float(np.median(fraction)), 4),
            "resampled_shape": _stats(np.asarray(resampled)),
            "modality": {"value": modality, "rule": modality_rule, "evidence": evidence},
            "labelled_cases": sum(c.labelled for c in fp.cases),
            "intensity_mask": dict(Counter(c.mask for c in fp.cases)),
            "foreground_intensity": intensity,
        },
        "choices": choices,
        "convert": convert,
        "train": {"data.roi_size": roi["roi_size"], "train.micro_batch": roi["micro_batch"]},
        "cases_detail": [c.summary() for c in fp.cases],
    }


def _fmt(values: list[float]) -> str:
    return " ".join(f"{v:g}" for v in values)


def summary(plan: dict[str, Any], plan_path: str = "plan.json") -> str:
    """A short human summary: what the data looks like, each choice with its rule, the next command."""
    f, ch = plan["fingerprint"], plan["choices"]
    lines = [
        f"{plan['input']}: {plan['cases']} case(s) read, {len(plan['errors'])} unreadable; "
        f"{plan['spatial_dims']}D, {plan['channels']} channel(s), {f['labelled_cases']} labelled",
        f"  spacing mm   median {_fmt(f['spacing']['median'])}   min {_fmt(f['spacing']['min'])}   "
        f"max {_fmt(f['spacing']['max'])}",
        f"  shape        median {_fmt(f['shape']['median'])}   min {_fmt(f['shape']['min'])}   "
        f"max {_fmt(f['shape']['max'])}",
        f"  modality     {f['modality']['value']} (from {f['modality']['rule'].split(':')[0]}; "
        f"evidence {f['modality']['evidence']})",
    ]
    for c, s in enumerate(f["foreground_intensity"]):
        if s["samples"]:
            lines.append(
                f"  foreground   channel {c}: p0.5 {s['p00_5']:g}  p99.5 {s['p99_5']:g}  mean {s['mean']:g}  "
                f"sd {s['sd']:g}  ({s['samples']} voxels; mask {f['intensity_mask']})"
            )
    lines.append("choices:")
    for key in ("spacing", "preset", "ct_window", "crop_foreground", "roi_size", "micro_batch"):
        if key in ch:
            value = ch[key]["value"]
            shown = _fmt(value) if isinstance(value, list) else value
            lines.append(f"  {key:<16} {shown}   <- {ch[key]['rule']}")
    roi = ",".join(map(str, plan["train"]["data.roi_size"]))
    lines += [
        "next:",
        f"  python tools/to_wds.py {plan['input']} OUTPUT --plan {plan_path}",
        f"  then train with data.roi_size=[{roi}] train.micro_batch={plan['train']['train.micro_batch']}",
    ]
    if plan["errors"]:
        lines.append(f"unreadable ({len(plan['errors'])}):")
        lines += [f"  {e['reason']}: {e['key']}: {e['message']}" for e in plan["errors"][:10]]
    return "\n".join(lines)


def read_plan(path: str | os.PathLike) -> dict[str, Any]:
    """A ``plan.json``; ``ValueError`` naming the file when it is not one this version can apply."""
    try:
        with open(path) as f:
            plan = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--plan {path}: cannot read a plan: {e}") from None
    if not isinstance(plan, dict) or plan.get("medmae_plan") != PLAN_VERSION:
        raise ValueError(f"--plan {path}: not a medmae plan (version {PLAN_VERSION}); write one with tools/plan.py")
    unknown = sorted(set(plan.get("convert") or {}) - set(CONVERT_KEYS))
    if unknown or not isinstance(plan.get("convert"), dict):
        raise ValueError(f"--plan {path}: 'convert' must hold only {list(CONVERT_KEYS)}; unknown {unknown}")
    return plan


def convert_options(plan: dict[str, Any]) -> dict[str, Any]:
    """The ``ConvertOptions`` fields the plan sets (preset, spacing, ct_window, crop_foreground)."""
    out = dict(plan["convert"])
    for key in ("spacing", "ct_window"):
        if out.get(key) is not None:
            out[key] = tuple(out[key])
    return {k: v for k, v in out.items() if v is not None}
