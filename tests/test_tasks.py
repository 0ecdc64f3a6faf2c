"""Task specs: the BraTS region loss, segmentation metrics (Dice, HD95 in mm, empty cases, the score's classes),
and a new task added as one spec plus its registration, trained by the real trainer."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss

from medmae.config import load_config
from medmae.data.convert.options import ConvertOptions
from medmae.data.convert.run import convert
from medmae.data.synthetic import write_phantom_dataset
from medmae.models import ViTClassifier
from medmae.tasks import Task, register_task, task_class
from medmae.tasks.finetune import FinetuneOptions, FinetuneTask
from medmae.tasks.metrics import _per_class_scores, evaluate_segmentation
from medmae.tasks.segment import RegionLoss
from medmae.training.config import JobConfig

REPO = Path(__file__).resolve().parents[1]


def _nested_regions(shape=(2, 3, 12, 12, 12), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = (torch.rand(shape, generator=g) > 0.4).float()
    t[:, 1] *= t[:, 0]  # TC inside WT
    t[:, 2] *= t[:, 1]  # ET inside TC
    return t


@pytest.mark.parametrize("bce", [True, False])
def test_region_loss_is_zero_for_perfect_logits_and_each_region_learns_alone(bce):
    target = _nested_regions()
    perfect = (target * 2 - 1) * 30
    loss_fn = RegionLoss(bce=bce)
    assert loss_fn(perfect, target).item() < 1e-4
    # the old loss (softmax cross-entropy over overlapping channels) cannot reach zero at all
    old = DiceCELoss(sigmoid=True, smooth_nr=0.0, smooth_dr=1e-5, squared_pred=True)(perfect, target)
    assert old.item() > 0.3
    # region independence: changing the ET logits does not change the gradient of the WT logits
    logits = torch.randn_like(target, requires_grad=True)
    (g1,) = torch.autograd.grad(loss_fn(logits, target), logits)
    moved = logits.detach().clone()
    moved[:, 2] += torch.randn_like(moved[:, 2])
    moved.requires_grad_(True)
    (g2,) = torch.autograd.grad(loss_fn(moved, target), moved)
    torch.testing.assert_close(g1[:, :2], g2[:, :2])
    assert not torch.allclose(g1[:, 2], g2[:, 2])


def _four_cases(shape=(20, 20, 20)) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0 predicted 2 voxels off along the first axis, class 1 missed, class 2 a false positive on a ground
    truth without it, class 3 empty in both."""
    pred, target = torch.zeros(4, *shape), torch.zeros(4, *shape)
    target[0, 5:10, 5:10, 5:10] = 1
    pred[0, 7:12, 5:10, 5:10] = 1
    target[1, 2:6, 2:6, 2:6] = 1
    pred[2, 2:6, 2:6, 2:6] = 1
    return pred, target


def test_dice_and_hd95_in_mm_of_a_present_class_and_of_a_miss():
    pred, target = _four_cases()
    iso = _per_class_scores(pred, target, [1.0, 1.0, 1.0])
    aniso = _per_class_scores(pred, target, [3.0, 1.0, 1.0])
    assert iso[0][0] == pytest.approx(2 * 75 / 250) and iso[0][1] == pytest.approx(2.0)
    assert aniso[0][1] == pytest.approx(6.0)  # the offset axis has 3 mm voxels: distances are in mm
    assert iso[1] == (0.0, pytest.approx(373.13))  # a miss: Dice 0 and the BraTS miss distance, by default
    diagonal = _per_class_scores(pred, target, [3.0, 1.0, 1.0], hd95_miss="diagonal")
    assert diagonal[1] == (0.0, pytest.approx(np.sqrt(60**2 + 20**2 + 20**2)))  # this grid's diagonal, in mm
    assert _per_class_scores(pred, target, [1.0] * 3, hd95_miss=50.0)[1] == (0.0, 50.0)


def test_reference_rule_skips_a_class_the_ground_truth_lacks_whatever_was_predicted():
    pred, target = _four_cases()
    scores = _per_class_scores(pred, target, [1.0, 1.0, 1.0], rule="reference")
    assert scores[2] is None  # the false positive costs nothing (MONAI compute_meandice: NaN, skipped)
    assert scores[3] is None  # and a correct empty prediction earns nothing
    assert scores[1] == (0.0, pytest.approx(373.13))  # a miss of a present class still counts


def test_brats_rule_rewards_a_correct_empty_prediction_and_charges_a_false_positive():
    pred, target = _four_cases()
    scores = _per_class_scores(pred, target, [1.0, 1.0, 1.0], rule="brats")
    assert scores[2] == (0.0, pytest.approx(373.13))  # false positive: Dice 0, the miss distance
    assert scores[3] == (1.0, 0.0)  # correct empty prediction: Dice 1, HD95 0
    assert scores[1] == (0.0, pytest.approx(373.13))
    assert scores[0][0] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="empty_rule"):
        _per_class_scores(pred, target, [1.0] * 3, rule="hybrid")


def test_bad_scoring_options_name_the_key():
    with pytest.raises(ValueError, match="finetune.empty_rule"):
        load_config(JobConfig, REPO / "configs/finetune_debug.yaml", ["finetune.empty_rule=nan_skip"])
    with pytest.raises(ValueError, match="hd95_miss"):
        load_config(JobConfig, REPO / "configs/finetune_debug.yaml", ["finetune.hd95_miss=-1"])
    cfg = load_config(JobConfig, REPO / "configs/finetune_debug.yaml", ["finetune.hd95_miss=diagonal"])
    assert cfg.finetune.hd95_miss == "diagonal"


@pytest.mark.parametrize(("config", "rule"), [("finetune_brats.yaml", "brats"), ("finetune_btcv.yaml", "reference")])
def test_segmentation_recipes_name_their_empty_rule(config, rule):
    assert f"empty_rule: {rule}" in (REPO / "configs" / config).read_text()  # stated in the file, not defaulted
    assert load_config(JobConfig, REPO / "configs" / config).finetune.empty_rule == rule


class _Volumes(torch.utils.data.Dataset):
    """Validation volumes with a known prediction: the image is the predicted label volume, which the 'model' below
    returns as one-hot logits; a plain label array is predicted perfectly."""

    def __init__(self, volumes: list) -> None:
        self.volumes = [v if isinstance(v, tuple) else (v, v) for v in volumes]

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, i: int) -> dict:
        pred, lab = (torch.from_numpy(v) for v in self.volumes[i])
        meta = {"spacing": [2.0, 2.0, 2.0]}
        return {"image": pred[None, None].float(), "label": lab[None, None].long(), "meta": meta}


class _Oracle(torch.nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(x[:, 0].round().long(), self.k).movedim(-1, 1).float() * 10


def test_segmentation_results_report_absent_classes_and_score_the_chosen_ones():
    a = np.zeros((16, 16, 16), np.int64)
    a[2:8, 2:8, 2:8] = 1
    a[9:14, 9:14, 9:14] = 2
    b = np.zeros_like(a)
    b[3:9, 3:9, 3:9] = 1  # class 2 absent, class 3 never occurs anywhere
    loader = torch.utils.data.DataLoader(_Volumes([a, b]), batch_size=None)
    res = evaluate_segmentation(
        _Oracle(4),
        loader,
        roi=(16, 16, 16),
        num_classes=4,
        regions=False,
        device=torch.device("cpu"),
        dtype=torch.float32,
        class_names=["x", "y", "z"],
        score_classes=[0, 1],
    )
    assert res["dice"] == {"x": 1.0, "y": 1.0, "z": None} and res["hd95"]["z"] is None
    assert res["absent"] == {"y": 1, "z": 2} and res["volumes"] == 2
    assert res["score"] == 1.0 and res["score_classes"] == ["x", "y"] and res["mean_dice"] == 1.0
    json.dumps(res)  # results.json holds it as is: None becomes null, never 0.0


@pytest.mark.parametrize("rule", ["reference", "brats"])
def test_validation_means_follow_the_empty_rule(rule):
    """Three volumes, two classes, worked by hand. A: x right, y a false positive (y absent from the truth);
    B: x missed, y absent from both; C: x absent from both, y right."""
    box = (slice(2, 6),) * 3
    other = (slice(10, 13),) * 3
    gt_a, pred_a = np.zeros((16, 16, 16), np.int64), np.zeros((16, 16, 16), np.int64)
    gt_a[box] = pred_a[box] = 1
    pred_a[other] = 2
    gt_b, pred_b = np.zeros_like(gt_a), np.zeros_like(gt_a)
    gt_b[box] = 1
    gt_c = np.zeros_like(gt_a)
    gt_c[other] = 2
    loader = torch.utils.data.DataLoader(_Volumes([(pred_a, gt_a), (pred_b, gt_b), gt_c]), batch_size=None)
    res = evaluate_segmentation(
        _Oracle(3),
        loader,
        roi=(16, 16, 16),
        num_classes=3,
        regions=False,
        device=torch.device("cpu"),
        dtype=torch.float32,
        class_names=["x", "y"],
        empty_rule=rule,
        hd95_miss="diagonal",
    )
    miss = float(np.sqrt(3) * 32)  # 16 voxels of 2 mm per axis
    if rule == "reference":  # x over A, B; y over C only (A's false positive is skipped)
        expect_dice, expect_hd = {"x": 0.5, "y": 1.0}, {"x": miss / 2, "y": 0.0}
    else:  # every volume counts: x = (1 + 0 + 1) / 3, y = (0 + 1 + 1) / 3
        expect_dice, expect_hd = {"x": 2 / 3, "y": 2 / 3}, {"x": miss / 3, "y": miss / 3}
    assert res["dice"] == pytest.approx(expect_dice) and res["hd95"] == pytest.approx(expect_hd)
    assert res["score"] == pytest.approx(np.mean(list(expect_dice.values())))
    assert res["absent"] == {"x": 1, "y": 2}  # ground truths without the class, under either rule
    assert res["scoring"] == {"empty_rule": rule, "hd95_miss": "diagonal"}


@dataclass
class _ForegroundOptions(FinetuneOptions):
    threshold: float = 0.0
    """voxels above it count as foreground"""


class _ForegroundFraction(FinetuneTask):
    """A new task in a few lines: regress the fraction of foreground voxels of a crop with a ViT."""

    name = "foreground_fraction"
    default_model = "vit_3d_cls_debug"
    model_classes = (ViTClassifier,)
    options = _ForegroundOptions
    metric = "MSE"
    file_kinds = ()

    def loss(self, model, batch):
        pred = model(batch["image"]).float()[:, 0]
        target = (batch["label"] > self.opts.threshold).float().flatten(1).mean(1)
        return torch.nn.functional.mse_loss(pred, target), pred

    def export(self, state, resolved, directory, filename=None):
        return []


@pytest.fixture
def foreground_task():
    """The task registered for one test only (the registry is process-wide: --help would list it elsewhere)."""
    from medmae.tasks import base

    register_task(_ForegroundFraction)
    yield _ForegroundFraction
    base._TASKS.pop(_ForegroundFraction.name)


def test_a_new_task_is_one_spec_and_its_registration(tmp_path, foreground_task):
    root = tmp_path / "data"
    datalist = write_phantom_dataset(root / "raw", n=3, shape=(24, 24, 24), num_classes=2, seed=1)
    convert(datalist, root / "wds", ConvertOptions(format="wds", preset="ct", workers=0), progress=False)
    assert task_class("foreground_fraction") is foreground_task
    cfg = load_config(
        JobConfig,
        None,
        [
            "task=foreground_fraction",
            "model.num_classes=1",
            "model.img_size=[16,16,16]",
            "model.patch_size=8",
            f"data.path={root / 'wds'}",
            "data.roi_size=[16,16,16]",
            "data.num_workers=0",
            f"run.output_dir={tmp_path / 'runs'}",
            "run.name=fg",
            "train.max_steps=3",
            "dist.num_workers=1",
            "finetune.threshold=0.5",
            "run.log_every=1",
        ],
    )
    from medmae.training.trainer import Trainer

    Trainer(cfg).train()
    lines = [json.loads(x) for x in (tmp_path / "runs" / "fg" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3] and all(np.isfinite(x["train/loss"]) for x in lines)
    assert issubclass(_ForegroundFraction, Task)
