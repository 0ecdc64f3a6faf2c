"""Apply a fine-tuned model to image files: the recorded preprocessing, sliding-window inference, and label volumes
written back in each input's own geometry and format (``tools/predict.py`` is the command line)."""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medmae.data.convert.options import SampleError
from medmae.inference.geometry import load_and_preprocess, options_from_preprocessing, restore_geometry
from medmae.inference.volume_io import list_inputs, output_name, write_label
from medmae.io import atomic_write_bytes
from medmae.tasks import task_for_file_kind
from medmae.tasks.model_file import load_finetuned, resolve_checkpoint

__all__ = ["Predictor", "PredictResult", "logits_to_labels", "predict_paths"]

log = logging.getLogger(__name__)


def logits_to_labels(logits: torch.Tensor, task: str) -> np.ndarray:
    """``(K, *S)`` logits -> the uint8 ``(*S)`` label volume the model file's task writes (see its task spec)."""
    return task_for_file_kind(task).labels_from_logits(task, logits)


class Predictor:
    """A fine-tuned model with what it needs to be applied to a raw image file."""

    def __init__(
        self,
        model: nn.Module,
        meta: dict[str, Any],
        *,
        overlap: float = 0.5,
        sw_batch: int | None = None,
        device: str = "auto",
        tta: bool = False,
    ) -> None:
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap: must be in [0, 1), got {overlap}")
        if sw_batch is None:  # a large GPU is idle with a couple of 96³ windows; a CPU gains nothing from more
            sw_batch = 16 if (device == "auto" and torch.cuda.is_available()) or str(device).startswith("cuda") else 2
        if sw_batch < 1:
            raise ValueError(f"sw_batch: must be >= 1, got {sw_batch}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.device = torch.device(device)
        except RuntimeError:
            raise ValueError(f"device: {device!r} is not a torch device (auto, cpu, cuda, cuda:1, ...)") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} requested but CUDA is not available")
        self.model = model.to(self.device).eval()
        self.meta = meta
        self.task: str = meta["task"]
        self.spec = task_for_file_kind(self.task)
        self.opts = options_from_preprocessing(meta["preprocessing"])
        self.channels: int = meta["model_config"]["in_chans"]
        self.roi_size = tuple(meta["roi_size"])
        self.overlap, self.sw_batch = overlap, sw_batch
        if tta and self.spec.writes_table:
            raise ValueError(f"tta: test-time mirroring applies to segmentation models, not to a {self.task} model")
        self.tta = tta

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, **kwargs: Any) -> Predictor:
        """From a model file or a run directory (``best_model.safetensors``, else ``model.safetensors``)."""
        file = resolve_checkpoint(path)
        model, meta = load_finetuned(file)
        log.info("model %s (task %s, %d classes) from %s", meta["model_name"], meta["task"], meta["num_classes"], file)
        return cls(model, meta, **kwargs)

    def _autocast(self):
        # bf16 on CUDA: the precision the model was fine-tuned in; CPU autocast would only slow the convolutions.
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    @torch.no_grad()
    def logits(self, image: np.ndarray) -> torch.Tensor:
        """Preprocessed ``(C, *S)`` image -> float32 ``(K, *S)`` logits by Gaussian-weighted sliding windows."""
        from monai.inferers import sliding_window_inference

        x = torch.from_numpy(np.ascontiguousarray(image))[None].to(self.device)
        with self._autocast():  # windows run in bf16 on CUDA; fp32 outputs keep the Gaussian blending in fp32
            out = sliding_window_inference(
                x, self.roi_size, self.sw_batch, lambda w: self.model(w).float(), overlap=self.overlap, mode="gaussian"
            )
        return out[0]

    def _mirrored(self, windows: torch.Tensor, mirror: bool) -> torch.Tensor:
        """Probabilities of a batch of windows ``(B, C, *S)``; with ``mirror``, the mean over every combination of
        spatial-axis flips (8 in 3D, 4 in 2D), each flipped back, in probability space."""
        axes = range(2, windows.ndim)
        combos = [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)] if mirror else [()]
        total: torch.Tensor | None = None
        for dims in combos:
            out = self.model(windows.flip(dims) if dims else windows).float()
            probs = self.spec.probabilities(self.task, out, dim=1)
            probs = probs.flip(dims) if dims else probs
            total = probs if total is None else total + probs
        assert total is not None
        return total / len(combos)

    @torch.no_grad()
    def probabilities(self, image: np.ndarray, tta: bool | None = None) -> torch.Tensor:
        """Preprocessed ``(C, *S)`` image -> float32 ``(K, *S)`` probabilities (softmax classes or sigmoid regions),
        Gaussian-blended over sliding windows; ``tta`` (default: the predictor's) mirrors every window over all
        flips of its spatial axes and averages the probabilities: 2^dims forward passes per window."""
        from monai.inferers import sliding_window_inference

        mirror = self.tta if tta is None else tta
        x = torch.from_numpy(np.ascontiguousarray(image))[None].to(self.device)
        with self._autocast():
            out = sliding_window_inference(
                x, self.roi_size, self.sw_batch, lambda w: self._mirrored(w, mirror), overlap=self.overlap,
                mode="gaussian",
            )  # fmt: skip
        return out[0]

    def predict_file(self, path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
        """An image file -> (uint8 label volume on the file's own grid, the file's RAS affine)."""
        if self.spec.writes_table:
            raise ValueError(f"a {self.task} model gives one score per label: use predict_probabilities")
        image, geometry, affine = load_and_preprocess(str(path), self.opts, self.channels)
        if self.tta:
            labels = self.spec.labels_from_probabilities(self.task, self.probabilities(image))
        else:  # one pass: blending logits, as the trainer's validation does
            labels = logits_to_labels(self.logits(image), self.task)
        return restore_geometry(labels, geometry), affine

    @torch.no_grad()
    def predict_probabilities(self, path: str | os.PathLike) -> np.ndarray:
        """An image file -> ``(K,)`` sigmoid probabilities: the whole image resized to ``roi_size``, as the
        classification validation sees it (bilinear with antialiasing in 2D)."""
        image, _, _ = load_and_preprocess(str(path), self.opts, self.channels)
        x = torch.from_numpy(np.ascontiguousarray(image))[None].to(self.device)
        two_d = x.ndim == 4
        x = F.interpolate(
            x, size=self.roi_size, mode="bilinear" if two_d else "trilinear", antialias=two_d, align_corners=False
        )
        with self._autocast():
            return torch.sigmoid(self.model(x)[0].float()).cpu().numpy()


@dataclass
class PredictResult:
    written: list[Path] = field(default_factory=list)
    """Label volumes (or the one probability table) written."""
    errors: list[tuple[str, str]] = field(default_factory=list)
    """(input, message) for every input that could not be predicted."""

    @property
    def ok(self) -> bool:
        return not self.errors


def _refuse_inputs(outputs: list[Path], inputs: list[Path]) -> None:
    sources = {p.resolve() for p in inputs}
    for out in outputs:
        if out.resolve() in sources or (out.exists() and any(os.path.samefile(out, p) for p in inputs)):
            raise ValueError(f"OUTPUT {out} is an input file: refusing to overwrite it; choose another OUTPUT")


def _plan(inputs: list[Path], output: Path, single: bool) -> list[tuple[Path, Path]]:
    """(input, output file) pairs; a single input goes to OUTPUT itself when OUTPUT names an image file."""
    if single and output_name(output) == output.name and not output.is_dir():
        pairs = [(inputs[0], output)]
    else:
        pairs = [(p, output / output_name(p)) for p in inputs]
    _refuse_inputs([out for _, out in pairs], inputs)
    return pairs


def _write_table(rows: dict[str, np.ndarray], names: list[str], out: Path) -> Path:
    """Per-input probabilities as JSON (``{input: {label: p}}``) when ``out`` ends in .json, else CSV."""
    if out.suffix.lower() == ".json":
        text = json.dumps({k: dict(zip(names, map(float, v))) for k, v in rows.items()}, indent=1)
    else:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["input", *names])
        w.writerows([k, *(f"{p:.6f}" for p in v)] for k, v in rows.items())
        text = buf.getvalue()
    return atomic_write_bytes(out, text.encode())


def predict_paths(
    predictor: Predictor,
    input_path: str | os.PathLike,
    output: str | os.PathLike,
    progress: Callable[[Iterable], Iterable] = iter,
) -> PredictResult:
    """Predict one image file or every image in a folder; a bad input is recorded and the others still run.

    Segmentation writes one label volume per input (``output`` is a file for a single input, else a folder).
    Classification writes one table of probabilities: ``output`` ending in .json or .csv, else
    ``output/predictions.csv``.
    """
    inputs, output = list_inputs(input_path), Path(output)
    result = PredictResult()
    if predictor.spec.writes_table:
        table = output if output.suffix.lower() in (".csv", ".json") else output / "predictions.csv"
        _refuse_inputs([table], inputs)
        names = predictor.meta["label_names"] or [f"class_{i}" for i in range(predictor.meta["num_classes"])]
        rows = {}
        for src in progress(inputs):
            try:
                rows[str(src)] = predictor.predict_probabilities(src)
            except SampleError as e:
                result.errors.append((str(src), e.message))
                log.error("%s", e.message)
        if rows:
            result.written.append(_write_table(rows, names, table))
        return result
    single = len(inputs) == 1 and inputs[0] == Path(input_path)
    for src, out in progress(_plan(inputs, output, single)):
        try:
            labels, affine = predictor.predict_file(src)
            result.written.append(write_label(labels, affine, src, out))
        except SampleError as e:
            result.errors.append((str(src), e.message))
            log.error("%s", e.message)
        except OSError as e:  # e.g. a read-only or full output disk: the next input may still fit elsewhere
            result.errors.append((str(src), f"{out}: cannot write: {e}"))
            log.error("%s: cannot write: %s", out, e)
    return result
