"""Write the label-efficiency study's dataset: 24 "subjects" made from the real ICBM152 2009a template and its
grey/white-matter maps (both ship inside nilearn, read offline), each under its own smooth random warp and contrast.

    python tools/study_data.py data/study [--evaluate held_out|tuning] [--spacing 4]

Writes ``imagesTr/``, ``labelsTr/`` (0 rest incl. CSF; 1/2 left grey/white matter, 3/4 right) and an MSD-style
datalist: the training pool, subjects 0-15 (``training``), and the subjects scored (``validation``): the held-out
subjects 24-31 (``dataset.json``) or the tuning subjects 16-23 (``dataset_tuning.json``, for pilots); see
docs/study/PROTOCOL.md. Deterministic: subject i is drawn from seed i alone, so any subject can be rebuilt.

What is real and what is not: the intensities, the anatomy (an average of 152 adults) and the tissue maps are real;
every difference between two subjects is synthetic — an affine (±10° per axis, ±10 % scale, ±4 mm shift), a smooth
displacement field (peak ~5 mm), a gamma contrast change, a smooth bias field and noise. Labels are the template's
probability maps pushed through the same warp and then thresholded, so they stay aligned with the image; the
hemisphere is the side of the template's midline (x = 0 in MNI space) each voxel came from.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sample_data import load_template  # noqa: E402  (the one place that reads nilearn's files)

# FreeSurfer's aseg convention: tissue × hemisphere. Grey and white matter alone is an intensity problem (a lookup
# table on one volume's z-scored intensities scores 0.86 mean Dice on the held-out subjects, above what UNETR reached),
# which leaves the encoder, and so its initialisation, nothing to do. Telling the hemispheres apart in a symmetric
# template needs the context of a crop (where the midline or the brain's outer surface lies), as organs do in CT.
LABELS = {
    "0": "background",
    "1": "left grey matter",
    "2": "left white matter",
    "3": "right grey matter",
    "4": "right white matter",
}


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], control: int, sigma: float) -> np.ndarray:
    """Zero-mean smooth noise on ``shape``, scaled to peak |value| 1: Gaussian-filtered noise on a coarse grid of
    ``control`` points per axis, upsampled linearly (filtering at full resolution costs ~100× more, a cubic
    upsampling ~10×; with a few voxels per control cell the linear kinks are far below the field's scale)."""
    coarse = ndimage.gaussian_filter(rng.standard_normal((control,) * len(shape)), sigma, mode="wrap")
    field = ndimage.zoom(coarse, [s / control for s in shape], order=1, mode="nearest", grid_mode=True)
    field = field[tuple(slice(0, s) for s in shape)]
    field -= field.mean()
    return field / max(float(np.abs(field).max()), 1e-8)


def _rotation(angles: np.ndarray) -> np.ndarray:
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def make_subject(
    template: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray], seed: int, spacing: float = 4.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Subject ``seed``: (image float32, label uint8, affine) on a ``spacing`` mm grid covering the template.

    ``template`` is (t1, gm, wm, affine, centre): the 1 mm template arrays, their affine and the brain's centre in
    voxels. Subject 0 is the template itself, only resampled, as a reference point.
    """
    t1, gm, wm, affine, centre = template
    step = spacing / np.abs(np.diag(affine)[:3])  # template voxels per output voxel
    out_shape = tuple(int(np.ceil(s / k)) for s, k in zip(t1.shape, step))
    out_affine = affine.copy()
    out_affine[:3, :3] = affine[:3, :3] * step
    grid = np.stack(
        np.meshgrid(*[np.arange(n, dtype=np.float32) * k for n, k in zip(out_shape, step)], indexing="ij")
    )  # (3, *out): template voxel coordinates of each output voxel
    rng = np.random.default_rng(seed)
    if seed:
        # source point = A (y - c) + c + t + d(y): pull-back sampling, so every output voxel gets one value
        a = _rotation(np.deg2rad(rng.uniform(-10, 10, 3))) @ np.diag(rng.uniform(0.9, 1.1, 3))
        shift = rng.uniform(-4, 4, 3)  # mm = template voxels (1 mm)
        rel = grid.reshape(3, -1) - centre[:, None]
        src = (a @ rel + centre[:, None] + shift[:, None]).reshape(grid.shape).astype(np.float32)
        peak = rng.uniform(4, 6)  # mm: the displacement field's largest excursion
        for d in range(3):
            src[d] += peak * _smooth_field(rng, out_shape, control=24, sigma=3.0).astype(np.float32)
        grid = src
    image = ndimage.map_coordinates(t1, grid, order=1, mode="constant", cval=0.0)
    gm_w = ndimage.map_coordinates(gm, grid, order=1, mode="constant", cval=0.0)
    wm_w = ndimage.map_coordinates(wm, grid, order=1, mode="constant", cval=0.0)
    label = np.zeros(out_shape, dtype=np.uint8)  # the template's rule (tools/sample_data.py), after the warp
    label[(gm_w > 0.5) & (gm_w >= wm_w)] = 1
    label[(wm_w > 0.5) & (wm_w > gm_w)] = 2
    # Hemisphere from the template position each voxel was sampled from: world x > 0 is right (RAS); the symmetric
    # template's midline is x = 0, so the split follows the warped midline.
    right = (affine[0, 0] * grid[0] + affine[0, 3]) > 0
    label[(label > 0) & right] += 2
    brain = image > 0
    image = image / max(float(image.max()), 1e-8)
    if seed:
        image = image ** rng.uniform(0.7, 1.4)  # contrast between tissues changes, as between scanners
        image *= np.exp(0.2 * _smooth_field(rng, out_shape, control=12, sigma=2.0))  # ±20 % bias field
        image += rng.normal(0.0, rng.uniform(0.01, 0.03), out_shape)  # 1-3 % of the range
    # The background stays exactly 0: the converter's foreground crop and the mri z-score both key on it.
    image = np.where(brain, np.clip(image, 1e-3, None), 0.0).astype(np.float32)
    return image, label, out_affine


def load_study_template() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(t1, gm, wm) as float32 in [0, 1] on the 1 mm template grid, its affine, and the brain's centre (voxels)."""
    from nilearn import datasets

    image, _, affine = load_template()
    gm = np.asarray(nib.load(datasets.GM_MNI152_FILE_PATH).dataobj, dtype=np.float32) / 255.0
    wm = np.asarray(nib.load(datasets.WM_MNI152_FILE_PATH).dataobj, dtype=np.float32) / 255.0
    centre = np.asarray(ndimage.center_of_mass(image > 0), dtype=np.float32)
    return image.astype(np.float32), gm, wm, affine, centre


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.nii.gz")
    nib.save(nib.Nifti1Image(array, affine), tmp)
    os.replace(tmp, path)


# The study's subjects by role (docs/study/PROTOCOL.md): the pool is pre-trained on (images) and labels one pair
# each; the tuning subjects scored every design choice; the held-out subjects score the confirmatory run only.
POOL = range(0, 16)
TUNING = range(16, 24)
HELD_OUT = range(24, 32)
DATASETS = {"held_out": ("dataset.json", HELD_OUT), "tuning": ("dataset_tuning.json", TUNING)}


def write(out: Path, evaluate: str = "held_out", spacing: float = 4.0) -> Path:
    """Write the pool subjects and the subjects of ``evaluate`` (``held_out``: 24-31, ``tuning``: 16-23), skipping
    those already on disk, and their MSD-style datalist: the pool as ``training``, the others as ``validation``.
    Only the subjects the datalist names are made, so a pilot on the tuning subjects never generates the held-out
    ones. Returns the datalist's path (``dataset.json`` or ``dataset_tuning.json``)."""
    if evaluate not in DATASETS:
        raise ValueError(f"evaluate: must be one of {sorted(DATASETS)}, got {evaluate!r}")
    filename, scored = DATASETS[evaluate]
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    template = None
    entries = {}
    for i in [*POOL, *scored]:
        name = f"subject_{i:02d}.nii.gz"
        img_path, lab_path = out / "imagesTr" / name, out / "labelsTr" / name
        if not (img_path.is_file() and lab_path.is_file()):
            template = template or load_study_template()
            t0 = time.perf_counter()
            image, label, affine = make_subject(template, i, spacing)
            _save(image, affine, img_path)
            _save(label, affine, lab_path)
            print(
                f"  subject {i:02d}: {image.shape}, GM {np.isin(label, (1, 3)).mean():.3f}, "
                f"WM {np.isin(label, (2, 4)).mean():.3f}"
                f" of the grid ({time.perf_counter() - t0:.1f} s)",
                flush=True,
            )
        entries[i] = {"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"}
    datalist = {
        "name": "ICBM152 warped subjects",
        "description": "nilearn's ICBM152 2009a (symmetric) T1 and GM/WM maps under synthetic warps and contrasts; "
        "labels GM/WM from the warped maps (> 0.5, larger wins), split at the template's midline",
        "modality": {"0": "T1"},
        "labels": LABELS,
        "numTraining": len(POOL),
        "training": [entries[i] for i in POOL],
        "validation": [entries[i] for i in scored],
    }
    path = out / filename  # written last, and atomically: tools/study.py takes it as "data stage done"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(datalist, indent=2))
    os.replace(tmp, path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("output", type=Path, help="folder to write (a re-run keeps the subjects already there)")
    ap.add_argument(
        "--evaluate",
        choices=sorted(DATASETS),
        default="held_out",
        help="which subjects the datalist validates on: held_out (24-31, dataset.json: the confirmatory run) or "
        "tuning (16-23, dataset_tuning.json: pilots)",
    )
    ap.add_argument(
        "--spacing",
        type=float,
        default=4.0,
        help="output grid spacing in mm (4: a 32-voxel crop spans 128 mm, most of a hemisphere pair)",
    )
    args = ap.parse_args()
    print(f"wrote {write(args.output, args.evaluate, args.spacing)}")


if __name__ == "__main__":
    main()
