"""MAE pretraining end to end: the real trainer on 2 Ray Train workers running DeepSpeed (gloo, CPU).

One local Ray session serves the module; each run is a few dozen steps of the debug MAE on generated volumes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from medmae.config import load_config, to_dict
from medmae.models import create_model, load_encoder, read_encoder
from medmae.training.config import JobConfig

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path, shards: Path, *overrides: str) -> JobConfig:
    return load_config(
        JobConfig,
        REPO / "configs/pretrain_debug.yaml",
        [
            f"data.path={shards}",
            f"run.output_dir={tmp_path / 'runs'}",
            f"dist.storage_path={tmp_path / 'ray'}",
            "data.num_workers=0",
            "run.log_every=1",
        ]
        + list(overrides),
    )


def _pretrain(cfg: JobConfig):
    from medmae.distributed import run_ray
    from medmae.training.trainer import train_worker

    return run_ray(train_worker, {"config": to_dict(cfg)}, cfg.dist, run_name=cfg.run.name)


def _metrics(cfg: JobConfig) -> list[dict]:
    path = Path(cfg.run.output_dir) / cfg.run.name / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _events(cfg: JobConfig):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(cfg.run.output_dir) / cfg.run.name / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    return acc


# ZeRO-2 (the debug default): test_killed_worker_restarts_from_checkpoint below and test_readme_path.py
@pytest.mark.parametrize("stage", [1, 3])
def test_two_workers_pretrain_loss_falls_and_writes_everything(ray_session, tmp_path, shards, stage):
    cfg = _config(
        tmp_path,
        shards,
        f"run.name=zero{stage}",
        f"dist.zero_stage={stage}",
        "train.max_steps=24",
        "run.checkpoint_every=12",
        "run.image_every=12",
        "model.norm_pix_loss=false",
        "optim.base_lr=0.05",
        "optim.warmup_steps=2",
    )
    result = _pretrain(cfg)
    assert result.error is None and result.metrics["step"] == 24
    losses = [m["train/loss"] for m in _metrics(cfg)]
    assert len(losses) == 24
    assert sum(losses[-4:]) / 4 < 0.7 * sum(losses[:4]) / 4, losses
    # TensorBoard: the loss scalar at every step and the reconstruction image.
    acc = _events(cfg)
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 25))
    assert {"train/lr", "train/volumes_per_s", "train/grad_norm"} <= set(acc.Tags()["scalars"])
    assert len(acc.Images("train/input|masked|reconstruction")) == 2
    # Ray persisted the checkpoints (both ranks' shards in one folder) and the export.
    run_storage = tmp_path / "ray" / cfg.run.name
    ckpts = sorted(p for p in run_storage.iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))
    assert len(ckpts) == 2
    final = ckpts[-1]
    assert (final / "step-00000024" / "medmae_dist.json").is_file()
    assert (final / "encoder.safetensors").is_file()
    # The exported encoder loads into UNETR with every weight transferred.
    weights, enc_cfg = read_encoder(Path(cfg.run.output_dir) / cfg.run.name / "encoder.safetensors")
    assert enc_cfg["depth"] == 4 and enc_cfg["img_size"] == [32, 32, 32]
    unetr = create_model("unetr_vit_3d_debug")
    assert load_encoder(unetr, weights, enc_cfg)["loaded"] == len(unetr.encoder.state_dict())
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_killed_worker_restarts_from_checkpoint(ray_session, tmp_path, shards, monkeypatch):
    """Rank 1 dies hard after step 6: the restarted worker group resumes from the step-4 checkpoint and clears the
    checkpoint folder a rank killed mid-save left behind. (A finished run name re-run with more steps resumes:
    test_faults.py and test_distributed_ray.py.)"""
    from medmae.distributed.ray_launch import _HOST

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = Path(tempfile.gettempdir()) / f"medmae-ckpt-{dead.pid}-{_HOST}-step-00000004-test"
    (orphan / "step-00000004").mkdir(parents=True)
    cfg = _config(
        tmp_path,
        shards,
        "run.name=fault",
        "train.max_steps=10",
        "run.checkpoint_every=4",
        "dist.max_failures=1",
        "run.image_every=0",
    )
    monkeypatch.setenv("MEDMAE_TEST_FAIL_AT_STEP", "6")  # forwarded to the Ray workers like NCCL_* settings
    result = _pretrain(cfg)
    monkeypatch.delenv("MEDMAE_TEST_FAIL_AT_STEP")
    assert result.error is None and result.metrics["step"] == 10
    assert (Path(cfg.run.output_dir) / "fault" / ".fail_injected").read_text() == "6"
    steps = [m["step"] for m in _metrics(cfg)]
    # Steps 1-6 ran, the worker died before step 7; the restarted group resumed from the step-4 checkpoint.
    assert steps == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8, 9, 10]
    assert not orphan.exists()
