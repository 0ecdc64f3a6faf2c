"""MAE pretraining end to end: the real trainer on 2 Ray Train workers running DeepSpeed (gloo, CPU): ZeRO 1 and 3,
checkpoints merged from both ranks' shards and pruned in Ray's storage, a rerun of the same name on fewer workers.
(A worker killed mid-run: test_sweep.py's trial; a killed driver: test_object_store.py; a lost node:
test_multinode.py.)

The local Ray of the session serves the module; each run is a few dozen steps of the debug MAE on generated volumes.
"""

from __future__ import annotations

import dataclasses
import json
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
    """What launch/pretrain.py runs."""
    from medmae.distributed import run_ray
    from medmae.training.trainer import train_worker

    return run_ray(
        train_worker, {"config": to_dict(cfg)}, cfg.dist, run_name=cfg.run.name, keep_checkpoints=cfg.run.keep_last
    )


def _starts(cfg: JobConfig) -> list[tuple[int, int, int]]:
    """(step resumed from, workers, global batch) of each start of the run."""
    path = Path(cfg.run.output_dir) / cfg.run.name / "starts.jsonl"
    return [(s["step"], s["world_size"], s["global_batch"]) for s in map(json.loads, path.read_text().splitlines())]


def _metrics(cfg: JobConfig) -> list[dict]:
    path = Path(cfg.run.output_dir) / cfg.run.name / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _events(cfg: JobConfig):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(cfg.run.output_dir) / cfg.run.name / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    return acc


# ZeRO-2 (the debug default): test_readme_path.py, and the trials of test_sweep.py (a worker killed mid-run there)
@pytest.mark.parametrize("stage", [1, 3])
def test_two_workers_pretrain_loss_falls_and_writes_everything(ray_session, tmp_path, shards, stage):
    """24 steps on 2 workers with a checkpoint every 8 (Ray keeps the newest 2 in storage); ZeRO-1 then resumes the
    same run name on 1 worker for 4 more steps, at the same global batch."""
    cfg = _config(
        tmp_path,
        shards,
        f"run.name=zero{stage}",
        f"dist.zero_stage={stage}",
        "train.max_steps=24",
        "train.global_batch=8",  # 4 crops x 2 workers; kept when the rerun has 1 worker
        "run.checkpoint_every=8",
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
    # Ray persisted the checkpoints of steps 16 and 24 (8 pruned), both ranks' shards merged in one folder, and the
    # export.
    ckpts = _ray_checkpoints(tmp_path, cfg)
    assert [c.name for c in ckpts] == ["step-00000016", "step-00000024"]
    shard = "zero_pp_rank_{}_mp_rank_00_" + ("model_states.pt" if stage == 3 else "optim_states.pt")
    assert {shard.format(0), shard.format(1), "medmae_dist.json"} <= {p.name for p in ckpts[-1].iterdir()}
    assert (ckpts[-1].parent / "encoder.safetensors").is_file()
    # The exported encoder loads into UNETR with every weight transferred.
    weights, enc_cfg = read_encoder(Path(cfg.run.output_dir) / cfg.run.name / "encoder.safetensors")
    assert enc_cfg["depth"] == 4 and enc_cfg["img_size"] == [32, 32, 32]
    unetr = create_model("unetr_vit_3d_debug")
    assert load_encoder(unetr, weights, enc_cfg)["loaded"] == len(unetr.encoder.state_dict())
    assert all(torch.isfinite(v).all() for v in weights.values())
    if stage == 3:
        return
    # The same name again, on 1 worker: it resumes from step 24 with twice the accumulation; the loss keeps its level.
    more = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=28))
    more = dataclasses.replace(more, dist=dataclasses.replace(cfg.dist, num_workers=1))
    result = _pretrain(more)
    assert result.error is None and result.metrics["step"] == 28
    assert _starts(cfg) == [(0, 2, 8), (24, 1, 8)]
    resumed = [m["train/loss"] for m in _metrics(cfg)[24:]]
    assert len(resumed) == 4 and max(resumed) < 0.7 * sum(losses[:4]) / 4, resumed


def _ray_checkpoints(tmp_path: Path, cfg: JobConfig) -> list[Path]:
    """The step folders of the checkpoints Ray holds in storage for the run, oldest first."""
    run_storage = tmp_path / "ray" / cfg.run.name
    return sorted(p for p in run_storage.glob("checkpoint_*/step-*") if p.is_dir())
