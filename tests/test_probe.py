"""The online linear probe: the ridge probe itself, and a short single-process pretraining run that writes probe scores
to TensorBoard and metrics.jsonl, best_probe.json and the best step's encoder (with the encoder's data plan)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medmae.config import load_config
from medmae.data import read_manifest
from medmae.models import create_model, load_encoder, open_encoder
from medmae.tasks.plan import manifest_checksum
from medmae.training.config import JobConfig
from medmae.training.probe import ridge_r2

REPO = Path(__file__).resolve().parents[1]


def test_ridge_probe_finds_a_linear_signal_and_none_in_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 32, generator=g)
    y = torch.stack([x[:, 0] - 2 * x[:, 3], x[:, 5]], dim=1) + 0.01 * torch.randn(200, 2, generator=g)
    assert ridge_r2(x[:150], y[:150], x[150:], y[150:]) > 0.99
    volumes = torch.arange(150) // 30  # the penalty chosen leaving one "volume" out at a time
    assert ridge_r2(x[:150], y[:150], x[150:], y[150:], groups=volumes) > 0.99
    noise = torch.randn(200, 2, generator=g)
    assert ridge_r2(x[:150], noise[:150], x[150:], noise[150:]) < 0.1
    ones = torch.ones(200, 2)  # nothing to predict: the fitting mean is already exact
    assert torch.isnan(torch.tensor(ridge_r2(x[:150], ones[:150], x[150:], ones[150:])))


def test_probe_refuses_zero3():
    with pytest.raises(ValueError, match="run.probe_every.*ZeRO-3"):
        load_config(JobConfig, None, ["run.probe_every=10", "dist.zero_stage=3"])


def test_pretraining_writes_probe_scores_and_marks_the_best_probe_step(tmp_path, shards):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from medmae.training.trainer import Trainer

    cfg = load_config(
        JobConfig,
        REPO / "configs/pretrain_debug.yaml",
        [
            f"data.path={shards}",
            f"run.output_dir={tmp_path / 'runs'}",
            "run.name=probe",
            "data.num_workers=0",
            "dist.num_workers=1",
            "train.max_steps=4",
            "run.log_every=1",
            "run.probe_every=2",
            "run.probe_crops=32",
        ],
    )
    Trainer(cfg).train()
    run = tmp_path / "runs" / "probe"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    probes = [(m["step"], m["probe/r2"]) for m in lines if "probe/r2" in m]
    assert [s for s, _ in probes] == [2, 4]
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("probe/r2")] == [2, 4]
    best = json.loads((run / "best_probe.json").read_text())
    assert [h["step"] for h in best["history"]] == [2, 4] and best["metric"] == "probe/r2"
    assert best["best"]["score"] == max(r for _, r in probes)
    enc = open_encoder(run / best["encoder"])
    assert enc.plan["steps"] == best["best"]["step"]  # the encoder of the best probe step, with its plan
    load_encoder(create_model("unetr_vit_3d_debug"), enc.weights, enc.config)
    # the run's own export carries the plan of its data
    plan = open_encoder(run / "encoder.safetensors").plan
    manifest = read_manifest(shards)
    assert plan["steps"] == 4 and plan["crop_size"] == [32, 32, 32] and plan["mask_ratio"] == 0.75
    assert plan["datasets"][0]["sha256"] == manifest_checksum(manifest) and plan["preset"] == "ct"


def test_a_wrong_probe_dataset_stops_the_run_at_start_naming_the_key(tmp_path):
    from medmae.training.probe import Probe

    cfg = load_config(JobConfig, None, ["run.probe_every=10", f"run.probe_data={tmp_path / 'nowhere'}"])
    with pytest.raises(ValueError, match=r"^run.probe_data: .*nowhere"):
        Probe.create(cfg, tmp_path, 0, cfg.model_config(), step=0)
    assert Probe.create(cfg, tmp_path, 1, cfg.model_config(), step=0) is None  # other ranks never probe
