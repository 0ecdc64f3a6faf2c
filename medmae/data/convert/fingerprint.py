"""A dataset's fingerprint, read with the converter's own discovery and readers: per-case spacing and shape (in the
RAS axis order the converter resamples in), the foreground box, modality evidence and a sample of foreground
intensities. ``medmae.data.convert.plan`` turns it into preprocessing choices (``tools/plan.py``).

Every case the converter would read is read the same way here, so a case the converter would refuse is refused
here too, with the same reason.
"""

from __future__ import annotations

import functools
import json
import logging
import multiprocessing as mp
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from medmae.data.convert import dicom
from medmae.data.convert.options import ConvertOptions, SampleError
from medmae.data.convert.preprocess import foreground_box, read_sample, transform
from medmae.data.convert.run import infer_channels
from medmae.data.convert.sources import SampleSpec, discover

__all__ = ["CaseStats", "Fingerprint", "collect", "modality_family"]
log = logging.getLogger(__name__)

FG_SAMPLES_TOTAL = 1_000_000
"""Foreground voxels sampled over the whole dataset (per channel), split evenly between the cases."""
AIR_HU = (-1100.0, -900.0)
"""CT evidence: air, -1000 HU, give or take noise and calibration."""
AIR_FRACTION = 0.01
"""... in at least this share of a case's voxels."""
ABOVE_AIR_HU = -500.0
"""An unlabelled CT case's foreground: voxels above this (soft tissue, fluid, bone; not air or most of the lung)."""

_MR_NAMES = re.compile(r"^(MR|MRI|T1|T2|FLAIR|DWI|ADC|PD|SWI|DIXON|BOLD)")


def modality_family(name: str | None) -> str | None:
    """A modality name from a header or a datalist (CT, MR, MRI, T1w, FLAIR, CR, DX, PT, ...) -> CT, MR, X-ray,
    PET or other; None for no name."""
    if not name or not str(name).strip():
        return None
    n = str(name).strip().upper().replace("-", "").replace(" ", "")
    if n == "CT":
        return "CT"
    if _MR_NAMES.match(n):
        return "MR"
    if n in ("CR", "DX", "DR", "XRAY", "RADIOGRAPH"):
        return "X-ray"
    if n in ("PT", "PET"):
        return "PET"
    return "other"


@dataclass
class CaseStats:
    key: str
    spacing: list[float]
    """Voxel spacing in mm per axis, RAS axis order (the order ``--spacing`` is given in)."""
    shape: list[int]
    """Spatial shape, RAS axis order."""
    box_shape: list[int]
    """Shape of the foreground box (the converter's crop rule, with the floor described in ``mask``)."""
    labelled: bool
    header: str | None
    """Modality family from the image file's own header (DICOM Modality, NIfTI descrip), None without one."""
    intensity: str
    """Modality evidence from the voxels: ``CT`` (air at -1000 HU), ``non-negative`` (MRI-like) or ``other``."""
    mask: str
    """Which voxels the intensity sample comes from: ``label`` (label > 0), ``above-air`` (> -500 HU) or
    ``above-background`` (above each channel's minimum, i.e. nonzero for a zero background)."""
    samples: np.ndarray = field(repr=False)
    """``(C, n)`` float32 foreground intensities, drawn with replacement (empty when the mask is)."""

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "samples"}


@dataclass
class Fingerprint:
    input: str
    spatial_dims: int
    channels: int
    cases: list[CaseStats]
    errors: list[dict]
    """Cases that could not be read: key, source, reason, message (as the converter's errors.jsonl)."""
    datalist_modality: list[str | None] | None
    """Per-channel modality family named by a datalist's ``modality`` (MSD) or ``channel_names`` (nnU-Net v2)."""

    def samples(self, channel: int) -> np.ndarray:
        parts = [c.samples[channel] for c in self.cases if c.samples.size]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


def _header_modality(spec: SampleSpec) -> str | None:
    path = spec.images[0]
    if spec.files:  # a DICOM series as discovery grouped it
        return modality_family(dicom.modality(spec.files[0]))
    if Path(path).is_dir():  # a series folder read whole
        first = next((p for p in sorted(Path(path).iterdir()) if p.is_file() and not p.name.startswith(".")), None)
        return modality_family(dicom.modality(str(first))) if first else None
    low = path.lower()
    if low.endswith(".dcm") or not Path(path).suffix:  # a mosaic volume or a 2D DICOM image
        return modality_family(dicom.modality(path))
    if low.endswith((".nii", ".nii.gz")):  # NIfTI has no modality field; converters write one into descrip
        import nibabel as nib

        try:
            descrip = nib.load(path).header["descrip"].item().decode("latin-1")
        except Exception:  # the reader already accepted the file; a header without descrip is no evidence
            return None
        if re.search(r"\bCT\b", descrip):
            return "CT"
        if re.search(r"\bMRI?\b|\bTE=", descrip):  # dcm2niix writes the echo time of MR series as TE=
            return "MR"
    return None


def _intensity_evidence(image: np.ndarray) -> str:
    if image.min() < ABOVE_AIR_HU and np.mean((image >= AIR_HU[0]) & (image <= AIR_HU[1])) >= AIR_FRACTION:
        return "CT"
    return "non-negative" if image.min() >= 0 else "other"


def _case(spec: SampleSpec, spatial_dims: int, channels: int, num_labels: int | None, per_case: int) -> CaseStats:
    image, affine, label = read_sample(spec, spatial_dims, channels, num_labels)
    # the converter's reorientation (and nothing else): spacing and shape in the axis order --spacing is given in
    opts = ConvertOptions(preset="none", image_dtype="float32", spatial_dims=spatial_dims)
    image, label, affine, _ = transform(image, affine, opts, spatial_dims, label, spec.images[0])
    spacing = np.sqrt((affine[:-1, :-1] ** 2).sum(axis=0))
    evidence = _intensity_evidence(image)
    floor = ABOVE_AIR_HU if evidence == "CT" else None
    if label is not None:
        fg, mask = label > 0, "label"
    elif floor is not None:
        fg, mask = (image > floor).any(axis=0), "above-air"
    else:
        fg, mask = (image > image.min(axis=tuple(range(1, image.ndim)), keepdims=True)).any(axis=0), "above-background"
    box = foreground_box(image, ConvertOptions.fg_margin, floor)
    box_shape = [s.stop - s.start for s in box] if box is not None else list(image.shape[1:])
    samples = np.zeros((image.shape[0], 0), dtype=np.float32)
    idx = np.flatnonzero(fg)
    if idx.size:
        rng = np.random.default_rng([0, zlib.crc32(spec.key.encode())])  # the same sample whatever the worker order
        pick = rng.choice(idx, size=per_case, replace=True)  # as nnU-Net: small cases are not under-represented
        samples = image.reshape(image.shape[0], -1)[:, pick].astype(np.float32)
    return CaseStats(
        key=spec.key,
        spacing=[round(float(s), 6) for s in spacing],
        shape=[int(s) for s in image.shape[1:]],
        box_shape=[int(s) for s in box_shape],
        labelled=label is not None,
        header=_header_modality(spec),
        intensity=evidence,
        mask=mask,
        samples=samples,
    )


def _work(spec: SampleSpec, **kw: Any) -> tuple[SampleSpec, CaseStats | tuple[str, str]]:
    try:
        return spec, _case(spec, **kw)
    except SampleError as e:
        return spec, (e.reason, e.message)
    except Exception as e:  # a reader bug on odd input must not end a fingerprint of thousands
        log.exception("internal error on %s", spec.key)
        return spec, ("internal_error", f"{type(e).__name__}: {e}")


def _datalist_modality(input_path: Path, channels: int) -> list[str | None] | None:
    path = input_path / "dataset.json" if input_path.is_dir() else input_path
    if path.suffix.lower() != ".json" or not path.is_file():
        return None
    data = json.loads(path.read_text())
    names = data.get("channel_names") or data.get("modality")
    if not isinstance(names, dict):
        return None
    return [modality_family(names.get(str(c))) for c in range(channels)]


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)  # one process per core already


def collect(
    input_path: str | os.PathLike, opts: ConvertOptions, workers: int = 2, progress: bool = True
) -> Fingerprint:
    """Read every training and validation case of ``input_path`` (as ``discover`` finds them with ``opts``; the
    test split is left out, as from every statistic a model is tuned on) with ``workers`` processes."""
    input_path = Path(input_path)
    specs, label_names = discover(input_path, opts)
    is_csv = input_path.suffix.lower() == ".csv" and not input_path.is_dir()
    spatial_dims = opts.spatial_dims or (2 if is_csv else 3)
    specs = [s for s in specs if s.split != "test"]
    errors = [{"key": s.key, "source": s.images, "reason": s.error[0], "message": s.error[1]} for s in specs if s.error]
    todo = [s for s in specs if s.error is None]
    if not todo:
        raise ValueError(f"INPUT {input_path}: no readable cases to plan from")
    channels = infer_channels(todo, opts, spatial_dims)
    num_labels = len(label_names) if label_names and not is_csv else None
    fn = functools.partial(
        _work,
        spatial_dims=spatial_dims,
        channels=channels,
        num_labels=num_labels,
        per_case=max(1, FG_SAMPLES_TOTAL // len(todo)),
    )
    cases: list[CaseStats] = []

    def handle(spec: SampleSpec, res: CaseStats | tuple[str, str]) -> None:
        if isinstance(res, CaseStats):
            cases.append(res)
        else:
            errors.append({"key": spec.key, "source": spec.images, "reason": res[0], "message": res[1]})
            log.warning("skipped %s: %s: %s", spec.key, *res)
        bar.update()

    with tqdm(total=len(todo), desc="fingerprint", unit="case", disable=not progress) as bar:
        if workers == 0:
            for spec in todo:
                handle(*fn(spec))
        else:
            # fork, as the converter's workers: they start in milliseconds and inherit the imported readers
            ctx: Any = mp.get_context("fork" if os.name == "posix" else "spawn")
            with ctx.Pool(min(workers, len(todo)), initializer=_init_worker) as pool:
                for spec, res in pool.imap_unordered(fn, todo):
                    handle(spec, res)
    if not cases:
        raise ValueError(f"INPUT {input_path}: none of the {len(todo)} cases could be read (first: {errors[0]})")
    cases.sort(key=lambda c: c.key)
    return Fingerprint(
        input=str(input_path),
        spatial_dims=spatial_dims,
        channels=channels,
        cases=cases,
        errors=errors,
        datalist_modality=_datalist_modality(input_path, channels),
    )
