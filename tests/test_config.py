"""Typed configs: YAML deltas, dotted overrides, strict errors naming keys, derived values, saved resolved config."""

from __future__ import annotations

import pytest
import yaml

from medmae.config import from_dict, load_config, parse_overrides, save_config, to_dict
from medmae.training.config import JobConfig, derive


def test_defaults_are_valid_and_round_trip(tmp_path):
    cfg = JobConfig()
    save_config(cfg, tmp_path / "config.yaml")
    again = from_dict(JobConfig, yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert to_dict(again) == to_dict(cfg)
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_yaml_deltas_then_dotted_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  name: mae_vit_3d_debug\n  depth: 2\noptim:\n  base_lr: 1.0e-3\n")
    cfg = load_config(JobConfig, f, ["model.depth=3", "optim.betas=[0.9,0.99]", "train.max_steps=7"])
    assert cfg.model == {"name": "mae_vit_3d_debug", "depth": 3, "img_size": [96, 96, 96]}  # sized by data.roi_size
    assert cfg.model_config().depth == 3
    assert cfg.optim.base_lr == 1e-3 and cfg.optim.betas == (0.9, 0.99) and cfg.train.max_steps == 7


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["optim.lrr=1"], r"optim\.lrr.*valid keys under 'optim'.*base_lr"),
        (["nosuch.x=1"], r"unknown config key 'nosuch'.*valid keys"),
        (["train.max_steps=abc"], r"train\.max_steps: expected an integer"),
        (["train.max_steps=0"], r"train\.max_steps"),
        (["optim.layer_decay=1.5"], r"optim\.layer_decay"),
        (["task=detect"], r"task: 'detect' is not one of"),
        (["model.depht=2"], r"unknown config key 'model.depht'.*depth"),
        (["model.mask_ratio=1.2"], r"model\.mask_ratio"),
        (["model.name=nosuch"], r"unknown model 'nosuch'"),
        (["dist.zero_stage=5"], r"dist\.zero_stage"),
        (["optim.betas=[0.9]"], r"optim\.betas: expected 2 items"),
        (["train"], r"must look like section\.key=value"),
    ],
)
def test_bad_config_errors_name_the_key(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(JobConfig, None, overrides)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(JobConfig, tmp_path / "nope.yaml")


def test_derived_batch_and_lr():
    cfg = load_config(JobConfig, None, ["train.micro_batch=4", "train.global_batch=32", "optim.base_lr=1.6e-3"])
    d = derive(cfg, world_size=2)
    assert (d.grad_accum, d.global_batch) == (4, 32)
    assert d.lr == pytest.approx(1.6e-3 * 32 / 256)
    # same global batch on 4 workers: accumulation halves, lr unchanged
    d4 = derive(cfg, world_size=4)
    assert (d4.grad_accum, d4.lr) == (2, d.lr)
    with pytest.raises(ValueError, match="global_batch"):
        derive(cfg, world_size=3)
    assert derive(load_config(JobConfig, None, ["optim.lr=0.01"]), 2).lr == 0.01
    assert derive(load_config(JobConfig, None, ["optim.lr=1e-4"]), 2).lr == 1e-4  # YAML 1.1 reads this as a string
    assert load_config(JobConfig, None, ["dist.use_gpu=no"]).dist.use_gpu == "no"  # ... and this as False


def test_parse_overrides_nests_and_parses_yaml_values():
    assert parse_overrides(["a.b.c=1", "a.b.d=[1, 2]", "e=true", "f=null"]) == {
        "a": {"b": {"c": 1, "d": [1, 2]}},
        "e": True,
        "f": None,
    }


def test_elastic_ranges_must_keep_the_global_batch_at_every_worker_count():
    # Ray Train may start any count in [min_workers, num_workers]: 16 crops cannot be split over 3 workers
    with pytest.raises(ValueError, match=r"train\.global_batch: 16 cannot be split over 3 workers"):
        load_config(
            JobConfig,
            None,
            ["dist.num_workers=4", "dist.min_workers=2", "train.micro_batch=2", "train.global_batch=16"],
        )
    cfg = load_config(
        JobConfig, None, ["dist.num_workers=4", "dist.min_workers=2", "train.micro_batch=2", "train.global_batch=24"]
    )
    # every size keeps 24 samples per step and the same lr; 3 workers take micro-batch 2 × 4 accumulation steps
    plans = {n: derive(cfg, n) for n in (2, 3, 4)}
    assert {d.global_batch for d in plans.values()} == {24} and len({d.lr for d in plans.values()}) == 1
    assert [(d.micro_batch, d.grad_accum) for d in plans.values()] == [(2, 6), (2, 4), (2, 3)]
    # a micro-batch that does not divide is lowered, never the global batch changed
    odd = load_config(JobConfig, None, ["train.micro_batch=4", "train.global_batch=12"])
    assert (derive(odd, 2).micro_batch, derive(odd, 2).grad_accum) == (3, 2)


def test_task_options_are_typed_by_the_task():
    cfg = load_config(JobConfig, None, ["task=segment", "finetune.sw_overlap=0.25", "finetune.score_classes=[1, 3]"])
    assert cfg.finetune.sw_overlap == 0.25 and cfg.finetune.score_classes == (1, 3)
    with pytest.raises(ValueError, match=r"unknown config key 'finetune\.labelz'.*labels"):
        load_config(JobConfig, None, ["task=segment", "finetune.labelz=classes"])
    with pytest.raises(ValueError, match=r"finetune: task 'pretrain' takes no options"):
        load_config(JobConfig, None, ["finetune.pretrained=x.safetensors"])
    with pytest.raises(ValueError, match=r"model\.name: task 'segment' trains UNETR models"):
        load_config(JobConfig, None, ["task=segment", "model.name=mae_vit_3d_debug"])
    # round trip through plain data, as the config travels to Ray workers
    assert to_dict(from_dict(JobConfig, to_dict(cfg))) == to_dict(cfg)
