"""Segmentation with UNETR: softmax classes, or sigmoid BraTS regions WT/TC/ET derived from the MSD labels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
import torch
from torch import nn

from medmae.config import Range, check_ranges
from medmae.data.labels import BRATS_REGIONS, brats_regions, regions_to_brats
from medmae.models import UNETR
from medmae.tasks.base import EvalContext, register_task
from medmae.tasks.finetune import FinetuneOptions, FinetuneTask
from medmae.tasks.metrics import BRATS_HD95_MISS, evaluate_segmentation


class RegionLoss(nn.Module):
    """Loss for overlapping sigmoid regions (BraTS WT ⊃ TC ⊃ ET): soft Dice per region plus, by default, BCE on the
    logits per voxel and region. Each region's term depends on its own channel only; a softmax cross-entropy over
    the channels (MONAI's DiceCELoss) would treat the nested regions as exclusive classes, so that no logits, not even
    perfect ones, bring it near zero."""

    def __init__(self, bce: bool = True) -> None:
        from monai.losses import DiceLoss  # MONAI where it is used (1.3 s)

        super().__init__()
        self.dice = DiceLoss(sigmoid=True, smooth_nr=0.0, smooth_dr=1e-5, squared_pred=True)
        self.bce = nn.BCEWithLogitsLoss() if bce else None

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``logits`` and binary ``target`` ``(B, R, *S)``."""
        loss = self.dice(logits, target)
        return loss + self.bce(logits, target) if self.bce is not None else loss


@dataclass
class SegmentOptions(FinetuneOptions):
    labels: Literal["classes", "brats_regions"] = "classes"
    """segmentation targets: softmax classes, or sigmoid BraTS regions WT/TC/ET from MSD labels 1/2/3"""
    sw_overlap: Annotated[float, Range(ge=0, lt=1)] = 0.5
    """sliding-window overlap for whole-volume validation"""
    sw_batch: Annotated[int, Range(ge=1)] = 4
    """windows per forward during validation"""
    score_classes: tuple[int | str, ...] = ()
    """classes whose mean Dice is the validation score (best model, sweep reports), by label value (1 = first
    foreground class; BraTS regions 1-3 = WT, TC, ET) or by name; empty = all. BTCV's papers use 8 of its 13 organs"""
    region_loss: Literal["dice_bce", "dice"] = "dice_bce"
    """BraTS regions: per-region soft Dice plus per-region BCE on the logits, or Dice alone (the reference code).
    Dice alone gives no gradient on a crop where a region is absent, so false positives there cost nothing"""
    empty_rule: Literal["reference", "brats"] = "reference"
    """scoring of a class the ground truth of a volume lacks: reference = skipped for that volume, so a false
    positive there costs nothing (SelfMedMAE, MONAI's NaN-skip); brats = an empty prediction scores Dice 1 and
    HD95 0, a false positive Dice 0 and HD95 hd95_miss (the BraTS challenge). A miss of a present class scores
    Dice 0 and HD95 hd95_miss under both"""
    hd95_miss: Literal["diagonal"] | float = BRATS_HD95_MISS
    """HD95 in mm of a miss or a false positive: a fixed value (default 373.13, the BraTS challenge's: the diagonal
    of its 240 x 240 x 155 1 mm grid, so mean HD95 compares with challenge tables and between volumes), or diagonal
    = the diagonal of each evaluated (foreground-cropped, resampled) grid, which differs per volume"""

    def __post_init__(self) -> None:
        self.score_classes = tuple(self.score_classes)
        check_ranges(self)
        if not isinstance(self.hd95_miss, str) and not self.hd95_miss > 0:
            raise ValueError(f"hd95_miss: must be 'diagonal' or a distance > 0 in mm, got {self.hd95_miss!r}")
        if any(isinstance(c, int) and c < 1 for c in self.score_classes):
            raise ValueError(f"score_classes: label values start at 1 (0 is background), got {self.score_classes}")


@register_task
class SegmentTask(FinetuneTask):
    name = "segment"
    default_model = "unetr_vit_3d_debug"
    model_classes = (UNETR,)
    options = SegmentOptions
    metric = "Dice"
    metric_groups = ("dice", "hd95")
    file_kinds = ("segment", "segment_regions")

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.regions = self.opts.labels == "brats_regions"
        if self.regions:
            self.loss_fn = RegionLoss(bce=self.opts.region_loss == "dice_bce")
        else:
            from monai.losses import DiceCELoss

            self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, smooth_nr=0.0, smooth_dr=1e-5, squared_pred=True)

    def file_kind(self) -> str:
        return "segment_regions" if self.regions else "segment"

    def label_names(self, resolved: Any) -> list[str]:
        return list(BRATS_REGIONS) if self.regions else super().label_names(resolved)

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        logits = model(batch["image"]).float()
        target = brats_regions(batch["label"]) if self.regions else batch["label"]
        return self.loss_fn(logits, target), logits

    def validate(self, ctx: EvalContext, split: str = "validation") -> dict[str, Any]:
        resolved = ctx.resolved
        if self.regions and resolved.num_classes != 3:
            raise ValueError(
                f"model.num_classes: BraTS regions need 3 outputs (WT, TC, ET), got {resolved.num_classes}"
            )
        names = self.label_names(resolved)
        evaluated = names if self.regions else names[1:]  # background is not scored
        return evaluate_segmentation(
            ctx.model,
            self.val_loader(ctx.rank, ctx.world_size, split),
            roi=tuple(self.cfg.data.roi_size),
            num_classes=resolved.num_classes,
            regions=self.regions,
            device=ctx.device,
            dtype=ctx.dtype,
            sw_batch=self.opts.sw_batch,
            overlap=self.opts.sw_overlap,
            class_names=None if self.regions else evaluated,
            score_classes=self.score_indices(evaluated),
            empty_rule=self.opts.empty_rule,
            hd95_miss=self.opts.hd95_miss,
        )

    def score_indices(self, evaluated: list[str]) -> list[int] | None:
        """``finetune.score_classes`` as indices into the evaluated classes; ``ValueError`` naming a bad entry."""
        if not self.opts.score_classes:
            return None
        out = []
        for c in self.opts.score_classes:
            i = c - 1 if isinstance(c, int) else (evaluated.index(c) if c in evaluated else -1)
            if not 0 <= i < len(evaluated):
                raise ValueError(
                    f"finetune.score_classes: {c!r} is not an evaluated class of this model; classes "
                    f"1..{len(evaluated)}: {', '.join(evaluated)}"
                )
            out.append(i)
        return out

    @classmethod
    def check_file(cls, kind: str, meta: dict[str, Any], where: str) -> None:
        k = meta["num_classes"]
        if kind == "segment_regions" and k != 3:
            raise ValueError(f"{where}: num_classes: segment_regions predicts the 3 regions WT/TC/ET, got {k}")
        if kind == "segment" and not 1 <= k <= 256:
            raise ValueError(f"{where}: num_classes: label volumes are uint8, so 1..256 classes, got {k}")

    @classmethod
    def labels_from_logits(cls, kind: str, logits: torch.Tensor) -> np.ndarray:
        """argmax for ``segment``; for ``segment_regions`` sigmoid > 0.5 (logit > 0) per WT/TC/ET region, mapped
        back to MSD BraTS labels (3 in ET, else 2 in TC, else 1 in WT)."""
        if kind == "segment_regions":
            return regions_to_brats((logits > 0).cpu().numpy())
        return logits.argmax(dim=0).to(torch.uint8).cpu().numpy()

    @classmethod
    def probabilities(cls, kind: str, logits: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Softmax over the classes (``dim``) for ``segment``, sigmoid per region for ``segment_regions``."""
        return torch.sigmoid(logits) if kind == "segment_regions" else torch.softmax(logits, dim=dim)

    @classmethod
    def labels_from_probabilities(cls, kind: str, probs: torch.Tensor) -> np.ndarray:
        """``labels_from_logits`` on ``(K, *S)`` probabilities: argmax, or regions above 0.5."""
        if kind == "segment_regions":
            return regions_to_brats((probs > 0.5).cpu().numpy())
        return probs.argmax(dim=0).to(torch.uint8).cpu().numpy()
