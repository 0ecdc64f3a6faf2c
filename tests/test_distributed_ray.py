"""Ray Train + DeepSpeed for real: 2 gloo workers on CPU, ZeRO-3 shards merged into one checkpoint, resume by run name
(same and different worker count). (The real trainer on Ray, ZeRO 1/2/3 and a worker killed mid-run:
test_pretrain.py; ``ray job submit`` of the real launcher: test_readme_path.py.)

One local Ray session serves the module; every run is a few optimizer steps of a tiny MLP.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from medmae.distributed import DistributedConfig

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow
# Workers cannot import this test module (tests/ is not a package on their path): ship toy_train by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
REPO = Path(__file__).resolve().parents[1]


def toy_train(config: dict) -> None:
    """Ray train function: regression with a 2-layer MLP, checkpoints every 2 steps, one JSON line per step."""
    from torch import nn

    from medmae.distributed import (
        DistributedConfig,
        checkpoint_candidates,
        checkpoint_dir,
        create_engine,
        report,
        world_info,
    )

    rank, _, world = world_info()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    micro = 4
    accum = 8 // (micro * world)
    engine = create_engine(
        model,
        torch.optim.AdamW(model.parameters(), lr=3e-2),
        DistributedConfig(zero_stage=config["zero_stage"], precision="fp32"),
        micro_batch=micro,
        grad_accum=accum,
        grad_clip=1.0,
    )
    start = 0
    ckpt = next(checkpoint_candidates(), None)
    if ckpt is not None:
        start = engine.load(ckpt)["step"]
    w_true = torch.linspace(-1, 1, 8)
    for step in range(start, config["steps"]):
        losses = []
        for a in range(accum):
            gen = torch.Generator().manual_seed(step * 1000 + a * world + rank)
            x = torch.randn(micro, 8, generator=gen)
            loss = engine(x).squeeze(1).sub(x @ w_true).pow(2).mean()
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        metrics = {
            "step": step + 1,
            "loss": sum(losses) / len(losses),
            "start": start,
            "world": world,
            "t": time.time(),
        }
        if rank == 0:
            with open(config["log"], "a") as f:
                f.write(json.dumps(metrics) + "\n")
        if (step + 1) % 2 == 0 or step + 1 == config["steps"]:
            with checkpoint_dir(config["log"], f"step-{step + 1:08d}") as d:
                engine.save(d, f"step-{step + 1:08d}", {"step": step + 1})
                report(metrics, d)
        else:
            report(metrics)


def _run(
    tmp_path: Path,
    name: str,
    steps: int,
    *,
    workers: int = 2,
    stage: int = 2,
    max_failures: int = 0,
    keep: int | None = None,
    **extra,
):
    from medmae.distributed import run_ray

    cfg = DistributedConfig(
        num_workers=workers,
        zero_stage=stage,
        max_failures=max_failures,
        storage_path=str(tmp_path / "storage"),
        precision="fp32",
    )
    log = tmp_path / f"{name}.jsonl"
    result = run_ray(
        toy_train,
        {"zero_stage": stage, "steps": steps, "log": str(log), **extra},
        cfg,
        run_name=name,
        keep_checkpoints=keep,
    )
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    return result, lines


def _checkpoints(tmp_path: Path, name: str) -> list[Path]:
    return sorted(p for p in (tmp_path / "storage" / name).iterdir() if p.is_dir() and p.name.startswith("check"))


@pytest.mark.parametrize("stage", [3])  # ZeRO-1 and 2: the real trainer's runs in test_pretrain.py
def test_two_workers_train_and_checkpoint(ray_session, tmp_path, stage):
    result, log = _run(tmp_path, f"zero{stage}", steps=6, stage=stage, keep=2)
    assert result.error is None
    assert [m["step"] for m in log] == list(range(1, 7)) and all(m["world"] == 2 for m in log)
    assert sum(m["loss"] for m in log[-2:]) < 0.6 * sum(m["loss"] for m in log[:2])
    ckpts = _checkpoints(tmp_path, f"zero{stage}")
    assert len(ckpts) == 2  # steps 4 and 6 kept, step 2 deleted by keep_checkpoints=2
    files = {p.name for p in (ckpts[-1] / "step-00000006").iterdir()}
    # Both ranks' shards were merged into the one reported checkpoint.
    shard = "zero_pp_rank_{}_mp_rank_00_optim_states.pt" if stage < 3 else "zero_pp_rank_{}_mp_rank_00_model_states.pt"
    assert {shard.format(0), shard.format(1), "medmae_dist.json"} <= files
    assert result.checkpoint is not None and result.metrics["step"] == 6


def test_rerun_with_same_name_resumes_also_on_fewer_workers(ray_session, tmp_path):
    """ZeRO-2: 2 workers to step 4, same name again on 2 workers to step 6, then on 1 worker to step 8."""
    _, first = _run(tmp_path, "resume", steps=4)
    assert [m["step"] for m in first] == [1, 2, 3, 4]
    _, second = _run(tmp_path, "resume", steps=6)
    assert [(m["step"], m["start"], m["world"]) for m in second[4:]] == [(5, 4, 2), (6, 4, 2)]
    result, third = _run(tmp_path, "resume", steps=8, workers=1)
    assert result.error is None
    assert [(m["step"], m["start"], m["world"]) for m in third[6:]] == [(7, 6, 1), (8, 6, 1)]
    # Same global batch and continued optimizer state: the loss keeps its level instead of jumping back up.
    assert third[-1]["loss"] < 0.6 * first[0]["loss"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_orphaned_checkpoint_folders_of_this_hosts_dead_processes_are_removed(tmp_path):
    from medmae.distributed.ray_launch import _HOST, remove_orphaned_checkpoint_dirs

    dead = _dead_pid()
    names = {
        f"medmae-ckpt-{dead}-{_HOST}-step-00000004-x1": False,  # a killed rank's: removed
        f"medmae-ckpt-{os.getpid()}-{_HOST}-step-00000004-x2": True,  # a live process's: kept
        f"medmae-ckpt-{dead}-0123abcd-step-00000004-x3": True,  # another host's, in a shared folder: kept
        "medmae-ckpt-odd": True,
        "unrelated": True,
    }
    for name in names:
        (tmp_path / name / "step-00000004").mkdir(parents=True)
    removed = remove_orphaned_checkpoint_dirs(tmp_path)
    assert {p.name for p in removed} == {n for n, kept in names.items() if not kept}
    assert {p.name for p in tmp_path.iterdir()} == {n for n, kept in names.items() if kept}
