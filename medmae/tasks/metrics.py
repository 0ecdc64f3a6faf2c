"""Validation on whole volumes: sliding-window segmentation (Dice, HD95 per class) and multi-label AUC.

Each rank evaluates its own share of the validation set (the loader splits it); sums are reduced over ranks so
every rank returns the same numbers.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from medmae.distributed import all_gather_objects, all_reduce_sum

logger = logging.getLogger(__name__)


@torch.no_grad()
def segment_volume(
    model: torch.nn.Module,
    image: torch.Tensor,
    roi: tuple[int, ...],
    *,
    sw_batch: int,
    overlap: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``(1, C, *S)`` -> logits ``(1, K, *S)`` in fp32, Gaussian-weighted windows of ``roi``."""
    from monai.inferers import sliding_window_inference  # MONAI is imported where it is used (1.3 s)

    def predict(x: torch.Tensor) -> torch.Tensor:
        return model(x.to(dtype)).float()

    return sliding_window_inference(image, roi, sw_batch, predict, overlap=overlap, mode="gaussian")


EMPTY_RULES = ("reference", "brats")
BRATS_HD95_MISS = 373.13
"""mm: the diagonal of the BraTS challenge grid (240 × 240 × 155 at 1 mm), the HD95 its tables give a miss"""


def miss_distance(hd95_miss: float | str, dims: tuple[int, ...], spacing: list[float]) -> float:
    """The HD95 (mm) a miss or a false positive costs: a fixed value, or ``"diagonal"`` of the evaluated grid."""
    if hd95_miss == "diagonal":
        return float(np.sqrt(sum((n * s) ** 2 for n, s in zip(dims, spacing))))
    return float(hd95_miss)


def _per_class_scores(
    pred: torch.Tensor,
    target: torch.Tensor,
    spacing: list[float],
    *,
    rule: str = "reference",
    hd95_miss: float | str = BRATS_HD95_MISS,
) -> list[tuple[float, float] | None]:
    """Binary ``(K, *S)`` masks of one volume -> per class ``(dice, hd95_mm)``, or None where the rule skips it.

    Both rules agree when the ground truth holds the class: a miss (empty prediction) scores Dice 0 and the miss
    HD95. They differ where the ground truth lacks it:

    - ``reference`` (SelfMedMAE's MONAI ``compute_meandice``, which gives NaN there and averages the rest): the
      class is skipped for this volume, whatever was predicted, so a false positive there costs nothing;
    - ``brats`` (the BraTS challenge): an empty prediction is right (Dice 1, HD95 0), a false positive is a miss
      (Dice 0, the miss HD95).

    ``hd95_miss``: the miss HD95 in mm (BraTS 373.13), or ``"diagonal"`` of this volume's evaluated grid (then it
    differs per volume, and with the foreground crop).
    """
    from monai.metrics import compute_hausdorff_distance

    if rule not in EMPTY_RULES:
        raise ValueError(f"empty_rule: {rule!r} is not one of {list(EMPTY_RULES)}")
    miss = miss_distance(hd95_miss, tuple(pred.shape[1:]), spacing)
    out: list[tuple[float, float] | None] = []
    both = []
    for c in range(pred.shape[0]):
        p, t = pred[c].bool(), target[c].bool()
        p_any, t_any = bool(p.any()), bool(t.any())
        if not t_any:
            out.append(None if rule == "reference" else (0.0, miss) if p_any else (1.0, 0.0))
            continue
        inter = (p & t).sum().item()
        out.append((2.0 * inter / (p.sum().item() + t.sum().item()), miss))
        if p_any:
            both.append(c)
    if both:
        hd = compute_hausdorff_distance(
            pred[both][None].float(),
            target[both][None].float(),
            include_background=True,
            percentile=95,
            spacing=list(spacing),
        )[0]
        for c, v in zip(both, hd.tolist()):
            dice_c = out[c]
            assert dice_c is not None  # both masks are non-empty here
            out[c] = (dice_c[0], float(v))
    return out


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
    score_classes: list[int] | None = None,
    empty_rule: str = "reference",
    hd95_miss: float | str = BRATS_HD95_MISS,
) -> dict[str, Any]:
    """Per-class Dice and HD95 (mm) over whole validation volumes, their means, and the validation score.

    ``regions``: sigmoid outputs vs BraTS WT/TC/ET targets; otherwise softmax classes, background excluded (class i
    of the results is label i + 1). ``score_classes`` (indices into the results' classes) chooses the classes whose
    mean Dice is the score that selects the best model; None = all. A class is averaged over the volumes the
    ``empty_rule`` scores it on (see :func:`_per_class_scores`); ``absent`` counts, per class, the volumes whose
    ground truth lacks it. Under ``reference`` a class absent from every volume is reported as None, never as 0.
    """
    from medmae.data.labels import BRATS_REGIONS, brats_regions

    n = 3 if regions else num_classes - 1
    names = list(BRATS_REGIONS) if regions else (class_names or [f"class{i}" for i in range(1, num_classes)])
    # rows: Dice sum, volumes scored, HD95 sum, volumes scored, volumes whose ground truth lacks the class
    acc = torch.zeros(5, n, dtype=torch.float64)
    volumes = torch.zeros(1, dtype=torch.float64)
    was_training = model.training
    model.eval()
    for batch in loader:
        image = batch["image"].to(device)
        label = batch["label"].to(device)
        if image.ndim == len(roi) + 1:
            image, label = image[None], label[None]
        spacing = list(batch.get("meta", {}).get("spacing") or [1.0] * len(roi))
        logits = segment_volume(model, image, roi, sw_batch=sw_batch, overlap=overlap, dtype=dtype)
        if regions:
            pred = (logits[0] > 0).float()
            target = brats_regions(label)[0]
        else:
            k = logits.shape[1]
            pred = torch.nn.functional.one_hot(logits[0].argmax(0), k).movedim(-1, 0)[1:]
            target = torch.nn.functional.one_hot(label[0, 0].long(), k).movedim(-1, 0)[1:]
        pred, target = pred.cpu(), target.cpu()
        scores = _per_class_scores(pred, target, spacing, rule=empty_rule, hd95_miss=hd95_miss)
        for c, sc in enumerate(scores):
            acc[4, c] += not bool(target[c].any())
            if sc is not None:
                acc[:4, c] += torch.tensor([sc[0], 1.0, sc[1], 1.0], dtype=torch.float64)
        volumes += 1
    model.train(was_training)
    acc = all_reduce_sum(acc.to(device)).cpu()
    volumes = int(all_reduce_sum(volumes.to(device)).item())
    dice = [float(acc[0, c] / acc[1, c]) if acc[1, c] else None for c in range(n)]
    hd95 = [float(acc[2, c] / acc[3, c]) if acc[3, c] else None for c in range(n)]

    def mean(values: list[float | None], idx: list[int]) -> float:
        vals = [values[i] for i in idx if values[i] is not None]
        return float(np.mean(vals)) if vals else float("nan")

    everything = list(range(n))
    chosen = list(score_classes) if score_classes is not None else everything
    out = {
        "score": mean(dice, chosen),
        "mean_dice": mean(dice, everything),
        "mean_hd95": mean(hd95, everything),
        "dice": dict(zip(names, dice)),
        "hd95": dict(zip(names, hd95)),
        "absent": {names[c]: int(acc[4, c]) for c in range(n) if acc[4, c]},
        "volumes": volumes,
        "scoring": {"empty_rule": empty_rule, "hd95_miss": hd95_miss},
    }
    if score_classes is not None:
        out["score_classes"] = [names[c] for c in chosen]
        out["mean_dice_score_classes"] = out["score"]
        out["mean_hd95_score_classes"] = mean(hd95, chosen)
    return out


def evaluate_classification(
    model: torch.nn.Module,
    loader: Any,
    *,
    roi: tuple[int, ...],
    num_classes: int,
    device: torch.device,
    dtype: torch.dtype,
    class_names: list[str] | None = None,
) -> dict[str, Any]:
    """AUC per label and its mean over labels that have both classes in the validation set.

    Whole images are resized to the model's input size ``roi`` (training sees random resized crops of that size).
    """
    from monai.metrics import compute_roc_auc

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
                image = torch.nn.functional.interpolate(
                    image.float(), size=roi, mode=mode, align_corners=False, antialias=len(roi) == 2
                )
            scores.append(model(image.to(dtype)).float().sigmoid().reshape(-1, num_classes).cpu())
            labels.append(batch["label"].float().reshape(-1, num_classes).cpu())
    model.train(was_training)
    local = (
        torch.cat(scores) if scores else torch.zeros(0, num_classes),
        torch.cat(labels) if labels else torch.zeros(0, num_classes),
    )
    gathered = all_gather_objects((local[0].numpy(), local[1].numpy()))
    y_score = np.concatenate([g[0] for g in gathered])
    y_true = np.concatenate([g[1] for g in gathered])
    aucs = {}
    for i, name in enumerate(names):
        t = y_true[:, i]
        aucs[name] = (
            float(compute_roc_auc(torch.from_numpy(y_score[:, i]), torch.from_numpy(t)))
            if 0 < t.sum() < len(t)
            else float("nan")
        )
    defined = [v for v in aucs.values() if np.isfinite(v)]
    mean = float(np.mean(defined)) if defined else float("nan")
    return {"score": mean, "mean_auc": mean, "auc": aucs, "images": int(len(y_true))}
