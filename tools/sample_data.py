"""Write the demo's sample dataset: the real ICBM152 2009 T1 template (bundled with nilearn, offline) and variants.

    python tools/sample_data.py ~/.cache/medmae/sample [--count 6]      # what `make demo` runs

Writes ``imagesTr/``, ``labelsTr/`` (0 background, 1 grey matter, 2 white matter, from nilearn's tissue maps) and an
MSD-style ``dataset.json`` (the last volume is the validation split). One real brain is not a training set, so the
other volumes are deterministic variants of it: a shift of a few voxels, a left-right flip, a smooth bias field
and intensity scaling — enough to exercise the whole pipeline on real anatomy.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np


def load_template() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> T1 (float32), label (uint8: 0/1 GM/2 WM), affine — all from files that ship inside nilearn."""
    from nilearn import datasets

    t1 = nib.load(datasets.MNI152_FILE_PATH)
    gm = np.asarray(nib.load(datasets.GM_MNI152_FILE_PATH).dataobj, dtype=np.float32)
    wm = np.asarray(nib.load(datasets.WM_MNI152_FILE_PATH).dataobj, dtype=np.float32)
    image = np.asarray(t1.dataobj, dtype=np.float32)
    label = np.zeros(image.shape, dtype=np.uint8)
    label[(gm > 0.5) & (gm >= wm)] = 1
    label[(wm > 0.5) & (wm > gm)] = 2
    return image, label, t1.affine


def variant(image: np.ndarray, label: np.ndarray, i: int) -> tuple[np.ndarray, np.ndarray]:
    if i == 0:
        return image, label
    rng = np.random.default_rng(i)
    shift = tuple(int(s) for s in rng.integers(-6, 7, size=3))
    image, label = np.roll(image, shift, axis=(0, 1, 2)), np.roll(label, shift, axis=(0, 1, 2))
    if i % 2:
        image, label = image[::-1].copy(), label[::-1].copy()
    grid = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in image.shape], indexing="ij")
    bias = 1.0 + 0.15 * sum(float(rng.uniform(-1, 1)) * g for g in grid)
    return (image * bias * float(rng.uniform(0.8, 1.2))).astype(np.float32), label


def write(out: Path, count: int) -> Path:
    image, label, affine = load_template()
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(count):
        img, lab = variant(image, label, i)
        name = f"icbm152_{i:02d}.nii.gz"
        for sub, arr in (("imagesTr", img), ("labelsTr", lab)):
            tmp = out / sub / f".{name}.tmp.nii.gz"
            nib.save(nib.Nifti1Image(arr, affine), tmp)
            os.replace(tmp, out / sub / name)
        entries.append({"image": f"imagesTr/{name}", "label": f"labelsTr/{name}"})
    datalist = {
        "name": "ICBM152 sample",
        "description": "ICBM152 2009c T1 template (nilearn) and deterministic variants; labels GM/WM",
        "labels": {"0": "background", "1": "grey matter", "2": "white matter"},
        "training": entries[:-1],
        "validation": entries[-1:],
    }
    path = out / "dataset.json"
    path.write_text(json.dumps(datalist, indent=2))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("output", type=Path, help="folder to write")
    ap.add_argument("--count", type=int, default=6, help="volumes to write, the last one for validation (>= 2)")
    args = ap.parse_args()
    if args.count < 2:
        ap.error("--count must be >= 2 (one training and one validation volume at least)")
    print(f"wrote {write(args.output, args.count)}")


if __name__ == "__main__":
    main()
