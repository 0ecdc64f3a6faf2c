"""Every launcher takes flags and key=value overrides in any order: a real mixed command line, parsed into the config
the launcher would run (the case of the issue: overrides after --pretrained were "unrecognized arguments")."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import load_script

REPO = Path(__file__).resolve().parents[1]


def _launcher(name: str):
    return load_script(f"launch/{name}.py")


def test_finetune_takes_overrides_before_between_and_after_flags(tmp_path):
    encoder = tmp_path / "encoder.safetensors"
    argv = [
        "train.max_steps=7",
        "--config",
        str(REPO / "configs/finetune_debug.yaml"),
        "optim.base_lr=0.5",
        "--pretrained",
        str(encoder),
        "finetune.sw_batch=2",
        "--local_rank=0",
        "run.name=mixed",
    ]
    args, cfg = _launcher("finetune").parse(argv)
    assert cfg.train.max_steps == 7 and cfg.optim.base_lr == 0.5 and cfg.finetune.sw_batch == 2
    assert cfg.run.name == "mixed" and cfg.finetune.pretrained == str(encoder) and args.local_rank == 0


def test_pretrain_takes_overrides_in_any_order():
    argv = ["run.probe_every=5", "--config", str(REPO / "configs/pretrain_debug.yaml"), "train.max_steps=9"]
    _, cfg = _launcher("pretrain").parse(argv)
    assert cfg.run.probe_every == 5 and cfg.train.max_steps == 9 and cfg.run.name == "pretrain_debug"


def test_sweep_takes_overrides_in_any_order(tmp_path):
    argv = [
        "grid.seeds=[3,4]",
        "--config",
        str(REPO / "configs/sweep_debug.yaml"),
        f"storage_path={tmp_path}",
        "overrides.train.max_steps=5",
    ]
    cfg = _launcher("sweep").parse(argv)
    assert list(cfg.grid.seeds) == [3, 4] and cfg.storage_path == str(tmp_path)
    assert cfg.overrides["train"]["max_steps"] == 5


def test_a_bad_key_anywhere_is_still_a_one_line_config_error(capsys):
    with pytest.raises(SystemExit) as e:
        _launcher("pretrain").parse(["--config", str(REPO / "configs/pretrain_debug.yaml"), "train.max_stepz=3"])
    assert e.value.code == 2 and "max_stepz" in capsys.readouterr().err
