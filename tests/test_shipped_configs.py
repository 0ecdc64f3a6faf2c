"""Every job config shipped in configs/ loads and validates, so a user never starts from a broken file."""

from __future__ import annotations

from pathlib import Path

import pytest

from medmae.config import load_config
from medmae.training.config import JobConfig, derive

CONFIGS = sorted(  # sweeps below; configs/study.yaml is the study's own config (tests/test_study.py)
    p
    for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")
    if not p.name.startswith("sweep_") and p.name != "study.yaml"
)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_job_config_validates(path):
    cfg = load_config(JobConfig, path)
    cfg.model_config()
    d = derive(cfg, cfg.dist.num_workers)
    assert d.global_batch == cfg.train.micro_batch * d.grad_accum * cfg.dist.num_workers
    if cfg.task != "pretrain":
        assert cfg.model_config().num_classes >= 1
    assert tuple(cfg.data.roi_size) == tuple(cfg.model_config().img_size)


SWEEPS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("sweep_*.yaml"))


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_shipped_sweep_config_validates_and_every_trial_config_builds(path, monkeypatch):
    from medmae.sweep import SweepConfig, expand_grid, trial_job

    monkeypatch.chdir(path.parents[1])  # sweeps name their fine-tuning config relative to the repo root
    cfg = load_config(SweepConfig, path)
    specs = expand_grid(cfg)
    assert specs and len({s.name for s in specs}) == len(specs)
    for spec in specs:
        job = trial_job(cfg, spec)
        assert job.run.seed == spec.seed and job.data.train_fraction == spec.train_fraction
