"""tools/export.py and tools/import_monai.py on a real fine-tuning run: a self-describing folder timm's config reader
and the Hugging Face card format accept, a MONAI UNETR that loads it strictly and computes the same, and the way back
from MONAI's layout to an encoder we fine-tune from."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medmae.config import load_config
from medmae.models import open_encoder
from medmae.models.monai_interop import build_monai
from medmae.tasks import get_task
from medmae.tasks.model_file import load_finetuned
from medmae.training.config import JobConfig

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import export as export_tool  # noqa: E402
import import_monai  # noqa: E402

# MONAI's UNETR geometry at the debug width (patch 16, 12 blocks, skips 3/6/9, no cls token) on 32³ crops.
GEOMETRY = ["model.patch_size=16", "model.depth=12", "model.cls_token=false"]


def _job(root: Path, data: Path, *overrides: str) -> JobConfig:
    base = [f"data.path={data}", "data.roi_size=[32,32,32]", "data.num_workers=0", f"run.output_dir={root / 'runs'}"]
    return load_config(JobConfig, None, [*base, "dist.num_workers=1", *overrides])


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, phantom_sets) -> Path:
    """A UNETR fine-tuned for 2 steps from an encoder pretrained (exported by the pretrain task) on the same data."""
    from medmae.training.trainer import Trainer

    root = tmp_path_factory.mktemp("export")
    pre = _job(root, phantom_sets["ct"], "task=pretrain", "train.max_steps=3", *GEOMETRY)
    task = get_task(pre)
    (encoder,) = task.export(task.build_model().state_dict(), pre.model_config(), root)
    cfg = _job(
        root,
        phantom_sets["ct"],
        "task=segment",
        "run.name=ft",
        "model.num_classes=3",
        "model.skip_indices=[3,6,9]",
        *GEOMETRY,
        "train.max_steps=2",
        f"finetune.pretrained={encoder}",
    )
    Trainer(cfg).train()
    return root / "runs" / "ft"


def test_hf_folder_is_read_by_timms_config_reader_and_the_card_tells_the_story(tmp_path, finetuned):
    from timm.models._hub import load_model_config_from_path

    out = tmp_path / "unetr_ct"
    assert export_tool.main([str(finetuned), str(out), "--license", "cc-by-4.0"]) == 0
    pretrained_cfg, name, model_args = load_model_config_from_path(out)
    assert name == "unetr_vit_3d_debug" and model_args["depth"] == 12
    assert tuple(pretrained_cfg["input_size"]) == (1, 32, 32, 32) and pretrained_cfg["license"] == "cc-by-4.0"
    assert pretrained_cfg["label_names"] and len(pretrained_cfg["label_names"]) == pretrained_cfg["num_classes"] == 3
    config = json.loads((out / "config.json").read_text())
    assert config["medmae"]["data_plan"]["steps"] == 3 and config["medmae"]["preprocessing"]["preset"] == "ct"
    # the weights file is the medmae model file itself: prediction reads it as it reads the run's
    model, meta = load_finetuned(out / "model.safetensors")
    assert meta["extra"]["encoder"]["plan"] == config["medmae"]["data_plan"]
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "license: cc-by-4.0" in card and "library_name: medmae" in card
    results = json.loads((finetuned / "results.json").read_text())
    for text in ("Architecture", "Data plan (pretraining)", "Pretraining steps:** 3", "Fine-tuning steps:** 2"):
        assert text in card, text
    assert f"| mean_dice | {results['best']['mean_dice']:.4f} |" in card and "| dice/class1 |" in card


def test_monai_folder_loads_strictly_into_monais_unetr_with_the_same_outputs(tmp_path, finetuned):
    out = tmp_path / "monai"
    assert export_tool.main([str(finetuned), str(out), "--format", "monai"]) == 0
    cfg = json.loads((out / "config.json").read_text())["monai"]
    assert cfg["network"] == "UNETR" and cfg["kwargs"]["img_size"] == [32, 32, 32]
    net = build_monai(cfg["network"], cfg["kwargs"], load_file(out / "model.safetensors"), cfg["norm_eps"]).eval()
    ours = load_finetuned(finetuned / "best_model.safetensors")[0]
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ours(x), atol=1e-5, rtol=0)
    # and back: MONAI's layout -> a medmae encoder equal to the fine-tuned model's
    encoder = tmp_path / "from_monai.safetensors"
    assert import_monai.main([str(out / "model.safetensors"), str(encoder), "--num-heads", "4"]) == 0
    enc = open_encoder(encoder)
    assert enc.config["norm_eps"] == 1e-5 and enc.plan is None
    for k, v in ours.encoder.state_dict().items():
        if k != "pos_embed.weight":  # sin-cos here, a learned table from MONAI: the same numbers
            assert torch.equal(enc.weights[k], v), k
    torch.testing.assert_close(enc.weights["pos_embed.weight"], ours.encoder.pos_embed.weight)


def test_export_refuses_what_monai_cannot_express_naming_the_setting(tmp_path, finetuned, capsys, phantom_sets):
    pre = _job(tmp_path, phantom_sets["ct"], "task=pretrain")  # the debug MAE: cls token, patch 8
    task = get_task(pre)
    (encoder,) = task.export(task.build_model().state_dict(), pre.model_config(), tmp_path)
    assert export_tool.main([str(encoder), str(tmp_path / "hf")]) == 0  # any encoder packs as a folder
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architecture"] == "medmae_vit_encoder"
    assert export_tool.main([str(encoder), str(tmp_path / "monai"), "--format", "monai"]) == 2
    assert "cls_token: True has no MONAI equivalent" in capsys.readouterr().err
