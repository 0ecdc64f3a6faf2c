"""An online linear probe during pretraining: which checkpoint's encoder to fine-tune, answered as it trains.

Every ``run.probe_every`` steps, rank 0 embeds a fixed set of labelled crops with the frozen encoder (mean of the
patch tokens after the final norm), fits a ridge regression on the crops of 3/4 of the volumes and scores it on the
crops of the others (split by volume, so no volume is on both sides). The other ranks go on training and wait for
rank 0 at their next collective; ``run.probe_crops`` bounds how long (a few seconds on a GPU).

Target of a crop: for segmentation labels, the fraction of its voxels in each foreground class (defined for every
crop, also where a class is absent or everywhere, unlike presence, and it asks what a segmentation decoder needs:
where the organs are); for classification labels, the image's label vector. Score: out-of-sample R² on the held-out
crops, against the fitting crops' mean target (mean over the targets): 1 = the pooled features predict the targets
exactly, 0 = no better than that mean. Measured against the fitting mean rather than the held-out one, it stays
defined when a held-out volume's crops all share one target (an organ inside every crop). The ridge penalty is
chosen on the fitting crops alone, leaving one of their volumes out at a time.

The score goes to TensorBoard and ``metrics.jsonl`` (``probe/r2``); ``best_probe.json`` in the run directory keeps
every score and the best step, and ``best_probe_encoder.safetensors`` the encoder at that step (rank 0's weights,
in the training dtype) with its data plan, ready for ``finetune.pretrained``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medmae.data import read_manifest
from medmae.data.sources import pad_to_roi
from medmae.data.validation import ValDataset
from medmae.io import write_json_atomic
from medmae.models import save_encoder
from medmae.tasks.plan import data_plan

__all__ = ["Probe", "ridge_r2", "BEST_FILE", "ENCODER_FILE"]

logger = logging.getLogger(__name__)

BEST_FILE = "best_probe.json"
ENCODER_FILE = "best_probe_encoder.safetensors"
MAX_VOLUMES = 64  # volumes read to cut the crops from, once per run


def _ridge(x: torch.Tensor, y: torch.Tensor, lams: list[float]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(weights (D, T), intercept (T,))`` of the ridge regression of ``y`` on ``x`` for each penalty."""
    y_mean = y.mean(0)
    u, s, vt = torch.linalg.svd(x, full_matrices=False)
    uty = u.T @ (y - y_mean)
    return [(vt.T @ ((s / (s**2 + lam))[:, None] * uty), y_mean) for lam in lams]


def _gcv(x: torch.Tensor, y: torch.Tensor, lams: list[float]) -> list[float]:
    """Generalized cross-validation error of each penalty (rows taken as independent)."""
    n, y_c = x.shape[0], y - y.mean(0)
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    uty = u.T @ y_c
    out = []
    for lam in lams:
        shrink = s**2 / (s**2 + lam)  # eigenvalues of the hat matrix
        rss = ((y_c - u @ (shrink[:, None] * uty)) ** 2).sum().item()
        out.append(n * rss / max(n - shrink.sum().item(), 1e-6) ** 2)
    return out


def ridge_r2(
    x_fit: torch.Tensor,
    y_fit: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    groups: torch.Tensor | None = None,
) -> float:
    """Ridge regression of ``y`` (N, T) on standardised ``x`` (N, D); held-out R² against the fitting mean,
    averaged over the targets (those the mean does not already predict exactly; NaN when none is left).

    The penalty is chosen on the fitting rows alone: by leaving out one group at a time when ``groups`` (N,) names
    at least 3 (crops of one volume are alike, so a volume left out is what the held-out set is), else by
    generalized cross-validation."""
    x_fit, y_fit, x_test, y_test = (t.double() for t in (x_fit, y_fit, x_test, y_test))
    mu, sd = x_fit.mean(0), x_fit.std(0) + 1e-8
    x_fit, x_test = (x_fit - mu) / sd, (x_test - mu) / sd
    lams = [x_fit.shape[0] * 10.0**k for k in range(-4, 5)]
    if groups is not None and len(ids := groups.unique()) >= 3:
        err = [0.0] * len(lams)
        for g in ids:
            out = groups == g
            for i, (w, b) in enumerate(_ridge(x_fit[~out], y_fit[~out], lams)):
                err[i] += ((x_fit[out] @ w + b - y_fit[out]) ** 2).sum().item()
    else:
        err = _gcv(x_fit, y_fit, lams)
    lam = lams[min(range(len(lams)), key=err.__getitem__)]
    ((w, y_mean),) = _ridge(x_fit, y_fit, [lam])
    pred = x_test @ w + y_mean
    sst = ((y_test - y_mean) ** 2).sum(0)
    varies = sst > 1e-12
    if not varies.any():
        return float("nan")
    r2 = 1 - ((y_test - pred) ** 2).sum(0)[varies] / sst[varies]
    return float(r2.mean())


def _labelled_path(cfg: Any) -> str | None:
    """The probe's dataset: ``run.probe_data``, else the training dataset (the first of several) that has labels."""
    if cfg.run.probe_data:
        return cfg.run.probe_data
    for path in [cfg.data.path] if cfg.data.path else [d.path for d in cfg.data.datasets]:
        if read_manifest(path, cfg.data.storage_options)["task"] != "image":
            return path
    return None


def _targets(label: np.ndarray, task: str, num_classes: int) -> np.ndarray:
    if task == "classification":
        return np.asarray(label, dtype=np.float64).reshape(-1)
    counts = np.bincount(label.reshape(-1).astype(np.int64), minlength=num_classes)[1:num_classes]
    return counts / label.size


def build_crops(cfg: Any, path: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(crops (N, C, *roi) fp16, targets (N, T), volume of each crop (N,), held-out mask (N,))`` from the labelled
    volumes of ``path`` (every split), seeded by ``run.seed``; None when fewer than 2 volumes have labels."""
    manifest = read_manifest(path, cfg.data.storage_options)
    task = manifest["task"]
    samples = sorted(manifest["samples"], key=lambda s: (s["split"], s["key"]))
    rng = np.random.default_rng([cfg.run.seed, 0x9B0BE])
    if len(samples) > MAX_VOLUMES:
        samples = [samples[i] for i in sorted(rng.choice(len(samples), MAX_VOLUMES, replace=False))]
    data_cfg = dataclasses.replace(cfg.data, path=path, datasets=[], format=manifest["format"])
    volumes = ValDataset(data_cfg, manifest, samples)
    roi = tuple(cfg.data.roi_size)
    per_volume = -(-cfg.run.probe_crops // max(len(samples), 1))
    crops, targets, group = [], [], []
    for v in range(len(samples)):
        item = volumes[v]
        if "label" not in item:
            continue
        image = item["image"][0].numpy()
        label = item["label"].reshape(item["label"].shape[-len(roi) :]).numpy() if task != "classification" else None
        image, label, _ = pad_to_roi(image, label, np.zeros((0, len(roi)), np.int32), roi)
        for _ in range(per_volume):
            start = [int(rng.integers(0, s - r + 1)) for s, r in zip(image.shape[1:], roi)]
            box = tuple(slice(a, a + r) for a, r in zip(start, roi))
            crops.append(torch.from_numpy(np.ascontiguousarray(image[(slice(None), *box)])).half())
            whole = item["label"].numpy() if label is None else label[box]
            targets.append(_targets(whole, task, manifest["num_classes"]))
            group.append(v)
    volumes_used = sorted(set(group))
    if len(volumes_used) < 2:
        return None
    held = set(volumes_used[3::4]) or {volumes_used[-1]}  # every 4th volume scores, the rest fit
    mask = torch.tensor([g in held for g in group])
    return torch.stack(crops), torch.from_numpy(np.stack(targets)), torch.tensor(group), mask


class Probe:
    """The probe of one run, on rank 0 (:meth:`create` gives None elsewhere and when ``run.probe_every`` is 0)."""

    def __init__(self, cfg: Any, run_dir: Path, model_cfg: Any, step: int) -> None:
        if cfg.run.probe_data:  # a wrong path stops the run now, not at its first probe
            try:
                read_manifest(cfg.run.probe_data, cfg.data.storage_options)
            except ValueError as e:
                raise ValueError(f"run.probe_data: {e}") from None
        self.cfg, self.run_dir, self.model_cfg = cfg, run_dir, model_cfg
        self.every = cfg.run.probe_every
        self._data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._off = False
        record = json.loads((run_dir / BEST_FILE).read_text()) if (run_dir / BEST_FILE).is_file() else {}
        # A resumed run forgets the scores of the steps it trains again; a best among them is forgotten too (the
        # encoder file is its), so the next probe writes a fresh one.
        self.history = [h for h in record.get("history", []) if h["step"] <= step]
        best = record.get("best")
        self.best: dict[str, Any] | None = best if best and best["step"] <= step else None

    @classmethod
    def create(cls, cfg: Any, run_dir: Path, rank: int, model_cfg: Any, step: int) -> Probe | None:
        return cls(cfg, run_dir, model_cfg, step) if cfg.run.probe_every and rank == 0 else None

    def after_step(self, step: int, engine: Any, board: Any) -> dict[str, Any] | None:
        """Probe the encoder when ``step`` is due; returns ``{"step", "score", "seconds"}`` or None."""
        if step % self.every or self._off:
            return None
        t0 = time.perf_counter()
        if self._data is None:
            path = _labelled_path(self.cfg)
            try:
                self._data = build_crops(self.cfg, path) if path else None
                why = f"{path}: fewer than 2 labelled volumes"
            except (ValueError, OSError) as e:  # a probe never stops the training it watches
                why = f"{path}: {e}"
            if self._data is None:
                self._off = True
                logger.warning(
                    "run.probe_every: the probe is off (%s); name a small labelled dataset with run.probe_data",
                    why if path else "the training data has no labels",
                )
                return None
        crops, targets, volume, held = self._data
        with engine.autocast_context():  # the forward the engine runs (bf16 autocast over fp32 parameters)
            feats = self._features(engine.module, crops, engine.device, engine.dtype)
        score = ridge_r2(feats[~held], targets[~held], feats[held], targets[held], groups=volume[~held])
        res = {"step": step, "score": score, "seconds": time.perf_counter() - t0}
        board.scalars({"probe/r2": score, "probe/seconds": res["seconds"]}, step)
        self._record(res, engine.module)
        logger.info(
            "probe at step %d: R² %.4f on %d held-out crops (best %.4f at step %d), %.1f s",
            step,
            score,
            int(held.sum()),
            self.best["score"] if self.best else float("nan"),
            self.best["step"] if self.best else -1,
            res["seconds"],
        )
        return res

    def _features(self, model: Any, crops: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Mean-pooled final tokens ``(N, D)`` of the frozen encoder (eval mode: no drop-path), on the CPU."""
        encoder = model.encoder
        was_training = model.training
        model.eval()
        out = []
        try:
            with torch.no_grad():
                for batch in crops.split(self.cfg.train.micro_batch):
                    tokens = encoder.forward_features(batch.to(device=device, dtype=dtype))
                    out.append(tokens[:, encoder.num_prefix_tokens :].float().mean(1).cpu())
        finally:
            model.train(was_training)
        return torch.cat(out)

    def _record(self, res: dict[str, Any], model: Any) -> None:
        entry = {"step": res["step"], "score": res["score"]}
        self.history.append(entry)
        if np.isfinite(res["score"]) and (self.best is None or res["score"] > self.best["score"]):
            self.best = entry
            plan = data_plan(self.cfg, self.model_cfg, steps=res["step"])
            save_encoder(model.state_dict(), self.model_cfg.encoder_dict(), self.run_dir / ENCODER_FILE, plan)
        write_json_atomic(
            self.run_dir / BEST_FILE,
            {
                "metric": "probe/r2",
                "best": self.best,
                "encoder": ENCODER_FILE if self.best else None,
                "history": self.history,
            },
        )
