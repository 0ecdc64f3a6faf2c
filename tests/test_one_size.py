"""One size for a cube (a square in 2D): ``img_size`` and ``roi_size`` take an int or a one-item list wherever a user
types them — Python, YAML, the command line — as timm and MONAI do."""

from __future__ import annotations

import pytest
import torch

from medmae.config import load_config
from medmae.data.config import DataConfig
from medmae.models import create_model, model_config
from medmae.models.vit import ViTConfig
from medmae.training.config import JobConfig


@pytest.mark.parametrize("size", [96, (96,), [96]], ids=["int", "1-tuple", "1-list"])
def test_one_img_size_becomes_the_flavours_dims(size):
    assert model_config("mae_vit_base_patch16_3d", img_size=size).img_size == (96, 96, 96)
    assert model_config("mae_vit_base_patch16_2d", img_size=size).img_size == (96, 96)
    assert model_config("unetr_vit_base_patch16_3d", img_size=size).grid_size == (6, 6, 6)


def test_the_issue_call_builds_a_model_that_runs():
    model = create_model("mae_vit_base_patch16_3d", img_size=96, depth=1, decoder_depth=1)
    assert model.cfg.img_size == (96, 96, 96) and model.cfg.num_patches == 216
    small = create_model("mae_vit_3d_debug", img_size=16)  # patch 8: 2³ tokens
    loss, pred, ids = small(torch.randn(2, 1, 16, 16, 16))
    assert pred.shape[:2] == (2, 8 - small.num_kept()) and ids.shape == (2, 8) and torch.isfinite(loss)


def test_yaml_and_command_line_take_one_size(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  name: mae_vit_3d_debug\n  img_size: 48\ndata:\n  roi_size: 48\n")
    cfg = load_config(JobConfig, f)
    assert cfg.model_config().img_size == (48, 48, 48) and cfg.data.roi_size == (48, 48, 48)
    cfg = load_config(
        JobConfig,
        None,
        [
            "task=segment",
            "model.name=unetr_vit_2d_debug",
            "model.img_size=[64]",
            "data.spatial_dims=2",
            "data.roi_size=[64]",
        ],
    )
    assert cfg.model_config().img_size == (64, 64) and cfg.data.roi_size == (64, 64)
    # Full tuples still work, and the job's model is the one the trainer builds.
    cfg = load_config(JobConfig, None, ["model.name=mae_vit_3d_debug", "data.roi_size=[32,32,16]"])
    assert cfg.model_config().img_size == (32, 32, 16)


def test_the_model_size_follows_the_crop_size():
    """One number, one key: data.roi_size sizes the model; a different model.img_size is refused naming both."""
    cfg = load_config(JobConfig, None, ["model.name=mae_vit_3d_debug", "data.roi_size=48"])
    assert cfg.model_config().img_size == (48, 48, 48) and cfg.model["img_size"] == [48, 48, 48]
    with pytest.raises(ValueError, match=r"model\.img_size: \[32, 32, 32\] differs from data\.roi_size \[48, 48, 48\]"):
        load_config(JobConfig, None, ["model.name=mae_vit_3d_debug", "model.img_size=32", "data.roi_size=48"])
    with pytest.raises(ValueError, match=r"data\.roi_size \(the model's img_size\): \(36, 36, 36\) is not divisible"):
        load_config(JobConfig, None, ["model.name=mae_vit_3d_debug", "data.roi_size=36"])
    with pytest.raises(ValueError, match=r"model\.name: mae_vit_2d_debug is a 2D model but data\.spatial_dims is 3"):
        load_config(JobConfig, None, ["model.name=mae_vit_2d_debug"])


def test_python_data_config_takes_one_size():
    assert DataConfig(roi_size=64).roi_size == (64, 64, 64)
    assert DataConfig(roi_size=[64], spatial_dims=2, crop="resized").roi_size == (64, 64)
    assert DataConfig(roi_size=[64, 64, 32]).roi_size == (64, 64, 32)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["data.roi_size=abc"], r"data\.roi_size: expected a list \(or a single int\), got 'abc'"),
        (["data.roi_size=[32,32]"], r"data\.roi_size: expected 3 positive sizes"),
        (["data.roi_size=0"], r"data\.roi_size: expected 3 positive sizes, got \(0, 0, 0\)"),
        (["model.img_size=abc"], r"model\.img_size: expected a list \(or a single int\)"),
        (["model.img_size=true"], r"model\.img_size: expected a list \(or a single int\), got True"),
        (["model.img_size=0"], r"model\.img_size: expected 2 or 3 positive sizes"),
        (["model.img_size=30"], r"model\.img_size: \(30, 30, 30\) is not divisible by patch_size 8"),
        (["model.img_size=16"], r"model\.img_size: \[16, 16, 16\] differs from data\.roi_size \[32, 32, 32\]"),
        (["optim.betas=0.9"], r"optim\.betas: expected a list"),  # fixed-length tuples still need every item
    ],
)
def test_bad_sizes_name_the_key(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(JobConfig, None, ["model.name=mae_vit_3d_debug", "data.roi_size=32", *overrides])


@pytest.mark.parametrize("size", [96, (96,)])
def test_a_bare_vit_config_cannot_guess_the_dims(size):
    with pytest.raises(ValueError, match=r"img_size: one size .* needs the model's spatial dims"):
        ViTConfig(img_size=size)
