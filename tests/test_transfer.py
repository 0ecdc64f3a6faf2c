"""Moving an encoder to the next job: another input channel count, and the pretraining data plan it carries."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from medmae.config import load_config
from medmae.data import read_manifest
from medmae.models import create_model, load_encoder, open_encoder, save_encoder
from medmae.tasks import get_task
from medmae.tasks.plan import manifest_checksum
from medmae.training.config import JobConfig


def _features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.encoder.forward_features(x)


@pytest.mark.parametrize(("source", "target"), [(1, 4), (4, 1)])
def test_channel_adaptation_keeps_the_features_of_an_image_repeated_in_every_channel(tmp_path, source, target):
    torch.manual_seed(0)
    mae = create_model("mae_vit_3d_debug", in_chans=source).eval()
    path = save_encoder(mae.state_dict(), mae.cfg.encoder_dict(), tmp_path / "encoder.safetensors")
    enc = open_encoder(path)
    model = create_model("unetr_vit_3d_debug", in_chans=target).eval()
    report = load_encoder(model, enc.weights, enc.config)
    assert report["channels"]["from"] == source and report["channels"]["to"] == target
    assert ("sum" in report["channels"]["rule"]) == (target == 1)
    image = torch.rand(2, 1, 32, 32, 32)
    original = _features(mae, image.expand(-1, source, -1, -1, -1))
    adapted = _features(model, image.expand(-1, target, -1, -1, -1))
    torch.testing.assert_close(adapted, original, atol=1e-5, rtol=0)
    # every other weight moved unchanged
    for k, v in mae.encoder.state_dict().items():
        if k != "patch_embed.proj.weight":
            assert torch.equal(model.encoder.state_dict()[k], v), k


def test_channel_rule_for_counts_that_do_not_divide_is_timms_cyclic_repeat():
    torch.manual_seed(0)
    mae = create_model("mae_vit_2d_debug", in_chans=2)
    model = create_model("vit_2d_cls_debug", in_chans=3)
    report = load_encoder(model, mae.state_dict())
    w = mae.encoder.patch_embed.proj.weight.detach()
    expected = torch.cat([w, w[:, :1]], dim=1) * 2 / 3
    torch.testing.assert_close(model.encoder.patch_embed.proj.weight.detach(), expected)
    assert "cyclically" in report["channels"]["rule"]
    # no rule reconciles another patch size: still refused, naming the key
    with pytest.raises(ValueError, match="patch_embed.proj.weight"):
        load_encoder(create_model("vit_2d_cls_debug", in_chans=3, patch_size=4), mae.state_dict())


def _job(*overrides: str) -> JobConfig:
    return load_config(JobConfig, None, ["data.roi_size=[16,16,16]", "data.num_workers=0", *overrides])


def _pretrained_on(data: Path, out: Path) -> Path:
    """The encoder a pretraining job on ``data`` exports, written by the pretrain task itself."""
    cfg = _job("task=pretrain", f"data.path={data}", "train.max_steps=7", "model.mask_ratio=0.6")
    task = get_task(cfg)
    model = task.build_model()
    (path,) = task.export(model.state_dict(), cfg.model_config(), out)
    return path


def test_the_encoder_carries_its_data_plan_and_finetuning_checks_it(tmp_path, phantom_sets, caplog):
    encoder = _pretrained_on(phantom_sets["ct"], tmp_path)
    plan = open_encoder(encoder).plan
    manifest = read_manifest(phantom_sets["ct"])
    pre = manifest["preprocessing"]
    assert {k: plan[k] for k in ("spacing", "orientation", "preset", "ct_window", "channels")} == {
        k: pre[k] for k in ("spacing", "orientation", "preset", "ct_window", "channels")
    }
    assert plan["crop_size"] == [16, 16, 16] and plan["mask_ratio"] == 0.6 and plan["steps"] == 7
    assert plan["datasets"] == [
        {
            "name": "ct",
            "path": str(phantom_sets["ct"]),
            "sha256": manifest_checksum(manifest),
            "spacing": pre["spacing"],
            "samples": manifest["counts"],
        }
    ]

    def finetune(data: Path, *extra: str):
        cfg = _job("task=segment", "model.num_classes=3", f"data.path={data}", f"finetune.pretrained={encoder}", *extra)
        task = get_task(cfg)
        task.build_model()
        return task

    caplog.set_level(logging.INFO, logger="medmae")
    assert finetune(phantom_sets["ct2"]).encoder_record["plan_differences"] == []  # prepared alike: no word
    assert "data plan differs" not in caplog.text
    other = read_manifest(phantom_sets["ct2_spacing"])["preprocessing"]["spacing"]
    task = finetune(phantom_sets["ct2_spacing"])  # 2 mm data under an encoder pretrained at native spacing
    (diff,) = task.encoder_record["plan_differences"]
    assert diff.startswith("spacing:") and repr(pre["spacing"]) in diff and repr(other) in diff
    assert "data plan differs: spacing" in caplog.text
    with pytest.raises(ValueError, match=r"finetune.strict_plan.*spacing.*\[2\.0, 2\.0, 2\.0\]"):
        finetune(phantom_sets["ct2_spacing"], "finetune.strict_plan=true")
    with pytest.raises(ValueError, match=r"preset: the encoder was pretrained on 'ct'.*'mri'"):
        finetune(phantom_sets["mri2"], "model.in_chans=2", "finetune.strict_plan=true")


def test_an_encoder_without_a_plan_still_loads_with_a_note(tmp_path, phantom_sets, caplog):
    mae = create_model("mae_vit_3d_debug", img_size=16)
    path = save_encoder(mae.state_dict(), mae.cfg.encoder_dict(), tmp_path / "old.safetensors")  # as before plans
    caplog.set_level(logging.INFO, logger="medmae")
    cfg = _job(
        "task=segment",
        "model.num_classes=3",
        f"data.path={phantom_sets['ct2_spacing']}",
        f"finetune.pretrained={path}",
        "finetune.strict_plan=true",
    )
    task = get_task(cfg)
    task.build_model()
    assert task.encoder_record["plan"] is None and "carries no data plan" in caplog.text
