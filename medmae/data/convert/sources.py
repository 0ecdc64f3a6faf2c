"""Turn the converter's INPUT (folder, MSD-style datalist JSON, or CSV of 2D images) into a list of samples."""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medmae.data.convert.options import ConvertOptions

__all__ = ["SampleSpec", "discover", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm", ".png", ".jpg", ".jpeg", ".tif", ".tiff")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


@dataclass
class SampleSpec:
    key: str
    """Sample key: the first image's file name without extension, reduced to [A-Za-z0-9_-] (tar keys hold no dots)."""
    images: list[str]
    """One path per channel file (a 4D NIfTI is one path holding every channel); a folder is a DICOM series."""
    label: str | None
    """Segmentation label path."""
    split: str
    """'train' or 'validation'."""
    target: list[float] | None = None
    """Multi-label classification target (CSV input)."""
    error: tuple[str, str] | None = None
    """(reason, message) when discovery already knows the sample is bad."""


def _strip_suffix(name: str) -> str:
    low = name.lower()
    for suf in IMAGE_SUFFIXES:
        if low.endswith(suf):
            return name[: -len(suf)]
    return name


def make_key(path: str) -> str:
    return _UNSAFE.sub("_", _strip_suffix(Path(path.rstrip("/")).name))


def _is_image(p: Path) -> bool:
    if p.name.startswith("."):  # macOS '._x.nii.gz' resource forks ship inside the MSD tarballs
        return False
    if p.is_dir():
        return any(q.is_file() and not q.name.startswith(".") for q in p.iterdir())  # a DICOM series folder
    return p.name.lower().endswith(IMAGE_SUFFIXES)


def _from_folder(root: Path, opts: ConvertOptions) -> list[SampleSpec]:
    def sub(name: str | None, default: str, fallback: Path | None) -> Path | None:
        if name:
            return root / name
        return root / default if (root / default).is_dir() else fallback

    images_dir, labels_dir = sub(opts.images_dir, "imagesTr", root), sub(opts.labels_dir, "labelsTr", None)
    files = sorted(p for p in images_dir.iterdir() if _is_image(p) and p != labels_dir)
    label_of: dict[str, Path] = {}
    if labels_dir is not None:
        label_of = {make_key(str(p)): p for p in labels_dir.iterdir() if _is_image(p)}
    elif opts.label_suffix:
        for p in files:
            stem = _strip_suffix(p.name)
            if stem.endswith(opts.label_suffix):
                label_of[make_key(stem[: -len(opts.label_suffix)])] = p
        files = [p for p in files if not _strip_suffix(p.name).endswith(opts.label_suffix)]
    specs: list[SampleSpec] = []
    if opts.channel_suffixes:
        groups: dict[str, dict[str, Path]] = {}
        for p in files:
            stem = _strip_suffix(p.name)
            for suf in opts.channel_suffixes:
                if stem.endswith(f"_{suf}"):
                    groups.setdefault(stem[: -len(suf) - 1], {})[suf] = p
                    break
        for base, chans in sorted(groups.items()):
            key = make_key(base)
            missing = [s for s in opts.channel_suffixes if s not in chans]
            spec = SampleSpec(
                key,
                [str(chans[s]) for s in opts.channel_suffixes if s in chans],
                str(label_of[key]) if key in label_of else None,
                "train",
            )
            if missing:
                spec.error = ("wrong_channels", f"missing channel file(s) {missing} for {base}")
            specs.append(spec)
        return specs
    for p in files:
        key = make_key(str(p))
        specs.append(SampleSpec(key, [str(p)], str(label_of[key]) if key in label_of else None, "train"))
    return specs


def _from_datalist(path: Path) -> list[SampleSpec]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("training", data.get("validation")), list):
        raise ValueError(f"{path}: a datalist needs a 'training' (and optionally 'validation') list")
    specs = []
    for section, split in (("training", "train"), ("validation", "validation")):
        for entry in data.get(section, []):
            if isinstance(entry, str):
                entry = {"image": entry}
            images = entry.get("image")
            images = [images] if isinstance(images, str) else list(images or [])
            if not images:
                raise ValueError(f"{path}: an entry of '{section}' has no 'image': {entry}")
            images = [str((path.parent / p).resolve()) for p in images]
            label = entry.get("label")
            label = str((path.parent / label).resolve()) if isinstance(label, str) else None
            specs.append(SampleSpec(make_key(images[0]), images, label, split))
    return specs


def _from_csv(path: Path, opts: ConvertOptions) -> tuple[list[SampleSpec], list[str]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: CSV has no rows")
    if opts.image_col not in rows[0]:
        raise ValueError(f"{path}: no column '{opts.image_col}' (columns: {list(rows[0])}); set --image-col")
    base = path.parent / opts.images_dir if opts.images_dir else path.parent
    if opts.label_col is not None:
        if opts.label_col not in rows[0]:
            raise ValueError(f"{path}: no column '{opts.label_col}' (columns: {list(rows[0])})")
        split_names = [[n.strip() for n in (r[opts.label_col] or "").split(opts.label_sep)] for r in rows]
        names = sorted({n for ns in split_names for n in ns if n and n.lower() != "no finding"})
        targets = [[float(n in set(ns)) for n in names] for ns in split_names]
    else:
        names = opts.label_cols or [c for c in rows[0] if c != opts.image_col]
        targets = []
        for i, r in enumerate(rows):
            try:
                targets.append([float(r[c]) if (r[c] or "").strip() else 0.0 for c in names])
            except (KeyError, ValueError) as e:
                raise ValueError(f"{path}: row {i + 2}: label columns {names} must be numbers ({e})") from None
    specs = [
        SampleSpec(make_key(r[opts.image_col]), [str(base / r[opts.image_col])], None, "train", t)
        for r, t in zip(rows, targets)
    ]
    return specs, names


def discover(input_path: str | Path, opts: ConvertOptions) -> tuple[list[SampleSpec], list[str] | None]:
    """Samples named by ``input_path`` (with their split), and the class names of a CSV input.

    Duplicate keys keep the first occurrence; later ones carry a ``duplicate_key`` error. Samples without a
    datalist split go to validation with probability ``val_fraction`` (seeded, independent of input order).
    """
    path = Path(input_path)
    label_names = None
    if path.is_dir() and (path / "dataset.json").is_file() and not opts.images_dir:
        specs = _from_datalist(path / "dataset.json")
    elif path.is_dir():
        specs = _from_folder(path, opts)
    elif path.suffix.lower() == ".json":
        specs = _from_datalist(path)
    elif path.suffix.lower() == ".csv":
        specs, label_names = _from_csv(path, opts)
    else:
        raise ValueError(f"INPUT {path}: expected a folder, a datalist .json or a .csv")
    seen: dict[str, SampleSpec] = {}
    for s in specs:
        if s.key in seen and s.error is None:
            s.error = ("duplicate_key", f"key '{s.key}' already used by {seen[s.key].images[0]}")
        seen.setdefault(s.key, s)
    if opts.val_fraction > 0 and not any(s.split == "validation" for s in specs):
        keys = sorted(seen)
        order = np.random.default_rng(opts.seed).permutation(len(keys))
        n_val = max(1, round(len(keys) * opts.val_fraction))
        val = {keys[i] for i in order[:n_val]}
        for s in specs:
            if s.key in val:
                s.split = "validation"
    return specs, label_names
