"""Turn the converter's INPUT (folder, MSD-style datalist JSON, or CSV of 2D images) into a list of samples.

A DICOM folder becomes one sample per series (a Siemens mosaic series: one per volume), so nothing a folder holds is
dropped without a sample or an error line.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from medmae.data.convert import dicom
from medmae.data.convert.options import ConvertOptions
from medmae.data.convert.splits import apply_lists, hold_out, patient_column

__all__ = ["SampleSpec", "discover", "IMAGE_SUFFIXES"]
log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (
    ".nii.gz",
    ".nii",
    ".mgz",
    ".mgh",
    ".nrrd",
    ".nhdr",
    ".mha",
    ".mhd",
    ".dcm",
    ".png",
    ".jpg",
    ".jpeg",
    ".tif",
    ".tiff",
)
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
    """'train', 'validation' or 'test'."""
    target: list[float] | None = None
    """Multi-label classification target (CSV input)."""
    error: tuple[str, str] | None = None
    """(reason, message) when discovery already knows the sample is bad."""
    files: list[str] | None = None
    """DICOM series: its slice files in order (``images[0]`` is the folder), as discovery grouped them."""
    series: str | None = None
    """DICOM series identifier, recorded in the sample's source."""
    group: str | None = None
    """Patient (CSV group_col): the validation split keeps each group on one side."""


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

    images_dir, labels_dir = sub(opts.images_dir, "imagesTr", root) or root, sub(opts.labels_dir, "labelsTr", None)
    files = sorted(p for p in images_dir.iterdir() if _is_image(p) and p != labels_dir)
    if any(p.suffix.lower() == ".dcm" for p in files):  # loose slices: the folder itself is a DICOM folder
        files = [images_dir] + [p for p in files if p.suffix.lower() != ".dcm"]
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
        if p.is_dir():
            specs += _dicom_specs(p, label_of)
            continue
        key = make_key(str(p))
        specs.append(SampleSpec(key, [str(p)], str(label_of[key]) if key in label_of else None, "train"))
    return specs


def _dicom_specs(folder: Path, label_of: dict[str, Path]) -> list[SampleSpec]:
    """One spec per series in ``folder``; a mosaic series gives one per file, each file being a whole volume."""
    key = make_key(str(folder))
    try:
        series = dicom.scan_folder(folder)
    except Exception as e:  # GDCM on unreadable files: a property of the input, reported like any bad sample
        series, problem = [], f"{type(e).__name__}: {e}"
    else:
        problem = "no DICOM series in it"
    if not series:
        return [SampleSpec(key, [str(folder)], None, "train", error=("unreadable", f"{folder}: {problem}"))]
    specs = []
    for s, skey in zip(series, dicom.series_keys(key, series)):
        volumes = s.files if s.mosaic else [None]
        for i, f in enumerate(volumes):
            k = skey if len(volumes) == 1 else f"{skey}_v{i:04d}"
            label = str(label_of[k]) if k in label_of else None
            if f is None:
                specs.append(SampleSpec(k, [str(folder)], label, "train", files=s.files, series=s.uid))
            else:
                specs.append(SampleSpec(k, [f], label, "train", series=s.uid))
    return specs


def _label_names(labels, path: Path) -> list[str]:
    """Class names by label value, background included: MSD's ``{"0": "background", ...}`` or nnU-Net v2's
    ``{"background": 0, ...}``."""
    if not isinstance(labels, dict) or not labels:
        raise ValueError(f"{path}: 'labels' must map label values to names, got {labels!r}")
    names: dict[int, str] = {}
    for k, v in labels.items():
        if str(k).strip().isdigit() and isinstance(v, str):
            value, name = int(k), v
        elif isinstance(v, int) and not isinstance(v, bool):
            value, name = v, str(k)
        else:
            raise ValueError(
                f"{path}: 'labels' entry {k!r}: {v!r} is neither value: name (MSD) nor name: value (nnU-Net); "
                "region labels (lists of values) are not supported"
            )
        if value in names:
            raise ValueError(f"{path}: 'labels' names value {value} twice ({names[value]!r}, {name!r})")
        names[value] = name
    missing = sorted(set(range(max(names) + 1)) - set(names))
    if missing or min(names) < 0:
        raise ValueError(f"{path}: 'labels' must name every value from 0 to {max(names)}; missing {missing}")
    return [names[i] for i in range(len(names))]


def _from_datalist(path: Path) -> tuple[list[SampleSpec], list[str] | None]:
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
    return specs, _label_names(data["labels"], path) if "labels" in data else None


def _from_csv(path: Path, opts: ConvertOptions) -> tuple[list[SampleSpec], list[str]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: CSV has no rows")
    columns = list(rows[0])
    if opts.image_col not in rows[0]:
        raise ValueError(f"{path}: no column '{opts.image_col}' (columns: {columns}); set --image-col")
    if opts.group_col is not None and opts.group_col not in rows[0]:
        raise ValueError(f"{path}: no column '{opts.group_col}' for group_col (columns: {columns})")
    patients = patient_column(columns)
    if opts.val_fraction > 0 and opts.group_col is None and patients is not None:
        raise ValueError(
            f"{path}: has a patient column '{patients}', so a random split by image would put images of one patient "
            "in both training and validation, and validation would score patients the model has seen; "
            f"pass --group-col '{patients}' to hold out whole patients"
        )
    base = path.parent / opts.images_dir if opts.images_dir else path.parent
    if opts.label_col is not None:
        if opts.label_col not in rows[0]:
            raise ValueError(f"{path}: no column '{opts.label_col}' (columns: {columns})")
        split_names = [[n.strip() for n in (r[opts.label_col] or "").split(opts.label_sep)] for r in rows]
        names = sorted({n for ns in split_names for n in ns if n and n.lower() != "no finding"})
        targets = [[float(n in set(ns)) for n in names] for ns in split_names]
    else:
        meta_cols = {opts.image_col, opts.group_col, patients}
        names = opts.label_cols or [c for c in columns if c not in meta_cols]
        targets = []
        for i, r in enumerate(rows):
            try:
                targets.append([float(r[c]) if (r[c] or "").strip() else 0.0 for c in names])
            except (KeyError, ValueError) as e:
                raise ValueError(f"{path}: row {i + 2}: label columns {names} must be numbers ({e})") from None
    specs = []
    for i, (r, t) in enumerate(zip(rows, targets)):
        spec = SampleSpec(make_key(r[opts.image_col]), [str(base / r[opts.image_col])], None, "train", t)
        if opts.group_col is not None:
            spec.group = (r[opts.group_col] or "").strip()
            if not spec.group:
                spec.error = ("missing_group", f"{path}: row {i + 2} has no '{opts.group_col}'")
        specs.append(spec)
    if opts.train_list or opts.test_list:
        splits, unmatched = apply_lists([r[opts.image_col] for r in rows], opts)
        lists = " nor ".join(x for x in (opts.train_list, opts.test_list) if x)
        for spec, split in zip(specs, splits):
            if split is None:
                spec.error = ("not_in_split_lists", f"{spec.images[0]}: named by neither {lists}")
            else:
                spec.split = split
        for name in sorted(unmatched):
            error = ("missing_from_csv", f"{name}: named by {lists} but not a row of {path}")
            specs.append(SampleSpec(make_key(name), [str(base / name)], None, "train", error=error))
    return specs, names


def _check_patient_overlap(specs: list[SampleSpec]) -> None:
    test = {s.group for s in specs if s.split == "test" and s.group}
    shared = test & {s.group for s in specs if s.split != "test" and s.group}
    if shared:
        log.warning(
            "%d patient(s) have images in both the test list and train/validation (e.g. %s): the test score will "
            "include patients seen in training",
            len(shared),
            sorted(shared)[:3],
        )


def discover(input_path: str | Path, opts: ConvertOptions) -> tuple[list[SampleSpec], list[str] | None]:
    """Samples named by ``input_path`` (with their split), and the label names (a datalist's ``labels``, background
    first, or a CSV's classes).

    Duplicate keys keep the first occurrence; later ones carry a ``duplicate_key`` error. When the input names no
    validation set, ``val_fraction`` of the training samples (of their patients with ``group_col``) go to validation
    (seeded, independent of input order). A CSV's ``test_list`` images form the ``test`` split.
    """
    path = Path(input_path)
    is_csv = path.suffix.lower() == ".csv" and not path.is_dir()
    if not is_csv and (opts.group_col or opts.train_list or opts.test_list):
        raise ValueError("group_col, train_list and test_list apply to a CSV input only")
    if path.is_dir() and (path / "dataset.json").is_file() and not opts.images_dir:
        specs, label_names = _from_datalist(path / "dataset.json")
    elif path.is_dir():
        specs, label_names = _from_folder(path, opts), None
    elif path.suffix.lower() == ".json":
        specs, label_names = _from_datalist(path)
    elif is_csv:
        specs, label_names = _from_csv(path, opts)
    else:
        raise ValueError(f"INPUT {path}: expected a folder, a datalist .json or a .csv")
    seen: dict[str, SampleSpec] = {}
    for s in specs:
        if s.key in seen and s.error is None:
            s.error = ("duplicate_key", f"key '{s.key}' already used by {seen[s.key].images[0]}")
        seen.setdefault(s.key, s)
    pool = [s for s in specs if s.split == "train" and s.error is None]
    if opts.val_fraction > 0 and pool and not any(s.split == "validation" for s in specs):
        groups = [str(s.group) for s in pool] if opts.group_col else None
        for i in hold_out([s.key for s in pool], groups, opts.val_fraction, opts.seed):
            pool[i].split = "validation"
    _check_patient_overlap(specs)
    return specs, label_names
