"""Colin27 with its AAL grey-matter regions, from Debian's ``mricron-data``: the study's extra held-out person
(docs/study/PROTOCOL.md), on the study's grid.

    python tools/study_colin27.py data/study/colin27 [--cache ~/.cache/medmae] [--spacing 4]

The package (16 MB) is fetched once with ``apt-get download mricron-data`` into the cache folder (or a copy already
there is used) and read with Python alone: a ``.deb`` is an ``ar`` archive whose ``data.tar.xz`` holds
``usr/share/mricron/templates/{ch2bet,aal}.nii.gz`` and ``aal.nii.txt`` (index, region name, code). Writes:

- ``colin27.nii.gz``: the skull-stripped T1 (``ch2bet``), resampled to ``--spacing`` mm (trilinear), scaled to
  [0, 1] with the background exactly 0, as the study's subjects;
- ``colin27_aal.nii.gz``: on the same grid (nearest), 1 = an AAL region of the left hemisphere (``*_L``), 3 = of the
  right (``*_R``), 255 = the midline vermis regions (left out of the score), 0 = the rest. This AAL volume covers
  most of the white matter as well as the grey (PROTOCOL.md, amendment 1): it gives each voxel's side, which the
  study scores against the model's tissue of that side;
- ``source.json``: the package file, its SHA-256 and the members read.

Exits with status 3 and one line saying why when the package cannot be had (no apt, no network, no cache): the study
then reports Colin27 as not available.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

PACKAGE = "mricron-data"
TEMPLATES = "usr/share/mricron/templates/"
MEMBERS = ("ch2bet.nii.gz", "aal.nii.gz", "aal.nii.txt")
IGNORE = 255
UNAVAILABLE = 3  # exit status: the package could not be had


def fetch_deb(cache: Path, timeout: float = 300.0) -> Path:
    """The cached ``mricron-data_*.deb``, downloaded with ``apt-get download`` when there is none yet.
    ``RuntimeError`` saying why when it cannot be had."""
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob(f"{PACKAGE}_*.deb"))
    if found:
        return found[-1]
    if shutil.which("apt-get") is None:
        raise RuntimeError(f"no cached {PACKAGE}_*.deb in {cache} and no apt-get to download one")
    tmp = cache / f".download-{os.getpid()}"
    tmp.mkdir()
    try:
        proc = subprocess.run(
            ["apt-get", "download", PACKAGE], cwd=tmp, capture_output=True, text=True, timeout=timeout
        )
        debs = sorted(tmp.glob(f"{PACKAGE}_*.deb"))
        if proc.returncode or not debs:
            last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"apt-get download {PACKAGE} failed (exit {proc.returncode}): {last[0]}")
        return Path(shutil.move(str(debs[0]), cache / debs[0].name))
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"apt-get download {PACKAGE} took more than {timeout:.0f} s") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_deb_members(deb: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    """Files under ``usr/share/mricron/templates/`` from a ``.deb`` (an ``ar`` archive holding ``data.tar.*``)."""
    raw = deb.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise ValueError(f"{deb}: not a Debian package (no ar header)")
    pos, data = 8, None
    while pos + 60 <= len(raw):
        header = raw[pos : pos + 60]
        name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58].decode().strip())
        if name.startswith("data.tar"):
            data = raw[pos + 60 : pos + 60 + size]
            break
        pos += 60 + size + (size % 2)  # members are 2-byte aligned
    if data is None:
        raise ValueError(f"{deb}: no data.tar member")
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        for member in tar.getmembers():
            short = member.name.removeprefix("./").removeprefix(TEMPLATES)
            if member.isfile() and short in names and member.name.removeprefix("./").startswith(TEMPLATES):
                out[short] = tar.extractfile(member).read()  # type: ignore[union-attr]  # a regular file
    missing = sorted(set(names) - set(out))
    if missing:
        raise ValueError(f"{deb}: {TEMPLATES} lacks {missing}")
    return out


def _nifti(data: bytes) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(data))


def side_labels(aal: np.ndarray, table: str) -> np.ndarray:
    """AAL region indices -> 1 (``*_L``), 3 (``*_R``), 255 (any other region: the vermis), 0 (no region)."""
    lut = np.zeros(int(aal.max()) + 1, dtype=np.uint8)
    for line in table.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit() and int(parts[0]) < len(lut):
            lut[int(parts[0])] = 1 if parts[1].endswith("_L") else 3 if parts[1].endswith("_R") else IGNORE
    return lut[aal]


def resample(volume: np.ndarray, affine: np.ndarray, spacing: float, order: int) -> tuple[np.ndarray, np.ndarray]:
    """``volume`` on a ``spacing`` mm grid covering it (the study subjects' construction): sample points every
    ``spacing / voxel size`` voxels from the first voxel."""
    step = spacing / np.abs(np.diag(affine)[:3])
    shape = tuple(int(np.ceil(s / k)) for s, k in zip(volume.shape, step))
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) * k for n, k in zip(shape, step)], indexing="ij"))
    out_affine = affine.copy()
    out_affine[:3, :3] = affine[:3, :3] * step
    return ndimage.map_coordinates(volume, grid, order=order, mode="constant", cval=0.0), out_affine


def write(out: Path, cache: Path, spacing: float = 4.0) -> Path:
    """Write ``colin27.nii.gz``, ``colin27_aal.nii.gz`` and ``source.json`` into ``out``; returns ``source.json``."""
    deb = fetch_deb(cache)
    files = read_deb_members(deb, MEMBERS)
    t1, aal = _nifti(files["ch2bet.nii.gz"]), _nifti(files["aal.nii.gz"])
    if not np.allclose(t1.affine, aal.affine) or t1.shape != aal.shape:
        raise ValueError(f"{deb}: ch2bet and aal are not on one grid ({t1.shape} vs {aal.shape})")
    image, affine = resample(np.asarray(t1.dataobj, dtype=np.float32), t1.affine, spacing, order=1)
    sides = side_labels(np.asarray(aal.dataobj).astype(np.int64), files["aal.nii.txt"].decode("latin-1"))
    label, _ = resample(sides.astype(np.float32), aal.affine, spacing, order=0)
    brain = image > 0
    image = np.where(brain, np.clip(image / max(float(image.max()), 1e-8), 1e-3, None), 0.0).astype(np.float32)
    out.mkdir(parents=True, exist_ok=True)
    for name, array in (("colin27.nii.gz", image), ("colin27_aal.nii.gz", label.astype(np.uint8))):
        tmp = out / f".{name}.tmp.nii.gz"
        nib.save(nib.Nifti1Image(array, affine), tmp)
        os.replace(tmp, out / name)
    source = {
        "package": deb.name,
        "sha256": hashlib.sha256(deb.read_bytes()).hexdigest(),
        "members": [TEMPLATES + m for m in MEMBERS],
        "spacing_mm": spacing,
        "shape": list(image.shape),
        "left_voxels": int((label == 1).sum()),
        "right_voxels": int((label == 3).sum()),
    }
    path = out / "source.json"  # written last: tools/study.py takes it as "colin27 stage done"
    path.write_text(json.dumps(source, indent=2))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("output", type=Path)
    ap.add_argument("--cache", type=Path, default=Path("~/.cache/medmae").expanduser(), help="where the .deb is kept")
    ap.add_argument("--spacing", type=float, default=4.0)
    args = ap.parse_args()
    try:
        path = write(args.output, args.cache, args.spacing)
    except (RuntimeError, ValueError, OSError) as e:
        print(f"colin27 not available: {e}", file=sys.stderr)
        raise SystemExit(UNAVAILABLE) from None
    print(f"wrote {path.parent}: {json.loads(path.read_text())}")


if __name__ == "__main__":
    main()
