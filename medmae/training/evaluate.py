"""Validation on whole volumes: sliding-window segmentation (Dice, HD95 per class) and multi-label AUC.

Each rank evaluates its own share of the validation set (the loader splits it); sums are reduced over ranks so
every rank returns the same numbers.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.metrics import DiceMetric, HausdorffDistanceMetric, compute_roc_auc

from medmae.distributed import all_gather_objects, all_reduce_sum

logger = logging.getLogger(__name__)


@torch.no_grad()
def segment_volume(model: torch.nn.Module, image: torch.Tensor, roi: tuple[int, ...], *, sw_batch: int,
                   overlap: float, dtype: torch.dtype) -> torch.Tensor:
    """``(1, C, *S)`` -> logits ``(1, K, *S)`` in fp32, Gaussian-weighted windows of ``roi``."""
    def predict(x: torch.Tensor) -> torch.Tensor:
        return model(x.to(dtype)).float()

    return sliding_window_inference(image, roi, sw_batch, predict, overlap=overlap, mode="gaussian")


def evaluate_segmentation(
    model: torch.nn.Module,
    loader: Any,
    *,
    roi: tuple[int, ...],
    num_classes: int,
    regions: bool,
    device: torch.device,
    dtype: torch.dtype,
    sw_batch: int = 2,
    overlap: float = 0.5,
    class_names: list[str] | None = None,
) -> dict[str, Any]:
    """Mean and per-class Dice and HD95 (voxels of the resampled grid) over whole validation volumes.

    ``regions``: sigmoid outputs vs BraTS WT/TC/ET targets; otherwise softmax classes, background excluded.
    """
    from medmae.data.labels import BRATS_REGIONS, brats_regions

    n = 3 if regions else num_classes - 1
    names = list(BRATS_REGIONS) if regions else (class_names or [f"class{i}" for i in range(1, num_classes)])
    # sums of Dice and HD95 per class, and how many volumes each was defined on
    acc = torch.zeros(5, n, dtype=torch.float64)  # row 4, column 0: volumes evaluated
    dice_fn = DiceMetric(include_background=True, reduction="none", ignore_empty=True)
    hd_fn = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
    was_training = model.training
    model.eval()
    for batch in loader:
        image = batch["image"].to(device)
        label = batch["label"].to(device)
        if image.ndim == len(roi) + 1:
            image, label = image[None], label[None]
        logits = segment_volume(model, image, roi, sw_batch=sw_batch, overlap=overlap, dtype=dtype)
        if regions:
            pred = (logits.sigmoid() > 0.5).float()
            target = brats_regions(label)
        else:
            k = logits.shape[1]
            pred = torch.nn.functional.one_hot(logits.argmax(1), k).movedim(-1, 1).float()[:, 1:]
            target = torch.nn.functional.one_hot(label[:, 0].long(), k).movedim(-1, 1).float()[:, 1:]
        dice = dice_fn(pred, target)[0].cpu().double()  # (n,), NaN where the class is absent from the target
        hd = hd_fn(pred, target)[0].cpu().double()
        acc[4, 0] += 1
        for row, values in ((0, dice), (2, hd)):
            ok = torch.isfinite(values)
            acc[row][ok] += values[ok]
            acc[row + 1][ok] += 1
    model.train(was_training)
    acc = all_reduce_sum(acc.to(device)).cpu()
    dice = (acc[0] / acc[1].clamp_min(1)).tolist()
    hd95 = (acc[2] / acc[3].clamp_min(1)).tolist()
    seen = acc[1] > 0
    mean_dice = float((acc[0] / acc[1].clamp_min(1))[seen].mean()) if seen.any() else float("nan")
    seen_hd = acc[3] > 0
    mean_hd = float((acc[2] / acc[3].clamp_min(1))[seen_hd].mean()) if seen_hd.any() else float("nan")
    return {
        "score": mean_dice,
        "mean_dice": mean_dice,
        "mean_hd95": mean_hd,
        "dice": dict(zip(names, dice)),
        "hd95": dict(zip(names, hd95)),
        "volumes": int(acc[4, 0]),
    }


def evaluate_classification(
    model: torch.nn.Module, loader: Any, *, roi: tuple[int, ...], num_classes: int, device: torch.device,
    dtype: torch.dtype, class_names: list[str] | None = None,
) -> dict[str, Any]:
    """AUC per label and its mean over labels that have both classes in the validation set.

    Whole images are resized to the model's input size ``roi`` (training sees random resized crops of that size).
    """
    names = class_names or [f"label{i}" for i in range(num_classes)]
    scores, labels = [], []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in loader:
            image = batch["image"].to(device)
            if image.ndim == len(roi) + 1:  # one (C, *S) image
                image = image[None]
            if tuple(image.shape[2:]) != tuple(roi):
                mode = "bilinear" if len(roi) == 2 else "trilinear"
                # the same resize prediction applies (medmae.inference), so validation scores what users get
                image = torch.nn.functional.interpolate(image.float(), size=roi, mode=mode, align_corners=False,
                                                        antialias=len(roi) == 2)
            scores.append(model(image.to(dtype)).float().sigmoid().reshape(-1, num_classes).cpu())
            labels.append(batch["label"].float().reshape(-1, num_classes).cpu())
    model.train(was_training)
    local = (torch.cat(scores) if scores else torch.zeros(0, num_classes),
             torch.cat(labels) if labels else torch.zeros(0, num_classes))
    gathered = all_gather_objects((local[0].numpy(), local[1].numpy()))
    y_score = np.concatenate([g[0] for g in gathered])
    y_true = np.concatenate([g[1] for g in gathered])
    aucs = {}
    for i, name in enumerate(names):
        t = y_true[:, i]
        aucs[name] = (float(compute_roc_auc(torch.from_numpy(y_score[:, i]), torch.from_numpy(t)))
                      if 0 < t.sum() < len(t) else float("nan"))
    defined = [v for v in aucs.values() if np.isfinite(v)]
    mean = float(np.mean(defined)) if defined else float("nan")
    return {"score": mean, "mean_auc": mean, "auc": aucs, "images": int(len(y_true))}
