"""Train / validation / test splits: the input's own split, official list files, and patient-wise hold-outs.

ChestX-ray14 ships ``train_val_list.txt`` and ``test_list.txt`` (a patient-wise split) and has several images per
patient; a random split by image puts most validation patients into training as well, so a CSV with a patient
column is only split by patient.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import numpy as np

from medmae.data.convert.options import ConvertOptions

__all__ = ["SPLITS", "patient_column", "read_list", "apply_lists", "hold_out", "split_settings"]

SPLITS = ("train", "validation", "test")
log = logging.getLogger(__name__)
_PATIENT_NAMES = {"patientid", "patient", "subjectid", "subject", "participantid"}


def patient_column(columns: list[str]) -> str | None:
    """The CSV column that names patients ('Patient ID', 'patient_id', 'subject', ...), if there is one."""
    return next((c for c in columns if re.sub(r"[^a-z]", "", c.lower()) in _PATIENT_NAMES), None)


def read_list(path: str, what: str) -> set[str]:
    """Image names of a split list file, one per line (blank lines ignored)."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ValueError(f"{what}: cannot read {path}: {e.strerror or e}") from None
    names = {line.strip() for line in text.splitlines() if line.strip()}
    if not names:
        raise ValueError(f"{what}: {path} names no images")
    return names


def apply_lists(names: list[str], opts: ConvertOptions) -> tuple[list[str | None], set[str]]:
    """Split of each image name from ``opts.train_list`` / ``opts.test_list``: ``'train'``, ``'test'`` or None for an
    image neither list names (when a train list is given); also the listed names no row matched.

    A name matches an image by its full CSV value or its file name (the NIH lists hold bare file names).
    """
    train = read_list(opts.train_list, "train_list") if opts.train_list else None
    test = read_list(opts.test_list, "test_list") if opts.test_list else set()
    both = (train or set()) & test
    if both:
        raise ValueError(f"train_list and test_list both name {len(both)} image(s), e.g. {sorted(both)[:3]}")
    splits: list[str | None] = []
    matched: set[str] = set()
    for name in names:
        forms = {name, Path(name).name}
        if forms & test:
            splits.append("test")
        elif train is None or forms & train:
            splits.append("train")
        else:
            splits.append(None)
        matched |= forms
    return splits, ((train or set()) | test) - matched


def hold_out(keys: list[str], groups: list[str] | None, fraction: float, seed: int) -> set[int]:
    """Indices of ``keys`` put in validation: ``fraction`` of the groups (patients) when given, else of the keys.

    Seeded and independent of input order: groups (or keys) are sorted before the permutation.
    """
    units = sorted(set(groups)) if groups is not None else sorted(set(keys))
    order = np.random.default_rng(seed).permutation(len(units))
    chosen = {units[i] for i in order[: max(1, round(len(units) * fraction))]}
    ids = groups if groups is not None else keys
    return {i for i, u in enumerate(ids) if u in chosen}


def _digest(path: str | None) -> str | None:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16] if path else None


def split_settings(opts: ConvertOptions) -> dict:
    """What decided the splits; recorded in the manifest and compared on resume."""
    return {
        "val_fraction": opts.val_fraction,
        "seed": opts.seed,
        "group_col": opts.group_col,
        "train_list": Path(opts.train_list).name if opts.train_list else None,
        "train_list_sha256": _digest(opts.train_list),
        "test_list": Path(opts.test_list).name if opts.test_list else None,
        "test_list_sha256": _digest(opts.test_list),
    }
