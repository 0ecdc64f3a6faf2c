"""Several Ray nodes on one machine (``ray_cluster``: real raylets, real Ray Train + DeepSpeed gloo workers): an
elastic pretraining run grows onto a node that joins and goes on after losing one, and a sweep's trials wait for
nodes and survive losing one. Each worker node offers one CPU, i.e. one training worker, like a 1-GPU node.

Checkpoints go to the session's S3 server (``dist.storage_path: s3://…``): nodes share no disk for them, as on a
cloud cluster. The run directory (``run.output_dir``) is a local folder that every simulated node sees, as a shared
filesystem would be.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import committed_step

from medmae.config import load_config, to_dict
from medmae.training.config import JobConfig

pytest.importorskip("ray")
pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _wait(condition: Callable[[], bool], what: str, timeout: float, run: Background) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if not run.alive():
            run.result(0)  # raises what ended it
            raise AssertionError(f"the run ended while waiting for: {what}")
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for: {what}"
        time.sleep(0.2)


def _lines(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


class Background:
    """``fn()`` in a thread; ``result()`` joins it and returns its value or raises its exception."""

    def __init__(self, fn: Callable[[], object]) -> None:
        self.out: dict = {}
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn) -> None:
        try:
            self.out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            self.out["error"] = e

    def alive(self) -> bool:
        return self.thread.is_alive()

    def result(self, timeout: float):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"still running after {timeout:.0f} s"
        if "error" in self.out:
            raise self.out["error"]
        return self.out["value"]


def test_elastic_pretraining_grows_onto_a_new_node_and_survives_losing_one(ray_cluster, tmp_path, shards, s3_bucket):
    """1 node -> a second joins: the run restarts on 2 workers from its last checkpoint -> that node's raylet is
    killed: it goes on with 1 worker from the last checkpoint. Global batch 8 throughout (4 x 2 accumulation on one
    worker, 4 x 1 on two)."""
    from medmae.distributed import run_ray
    from medmae.distributed.ray_launch import resume_folder
    from medmae.training.trainer import train_worker

    storage = f"{s3_bucket}/checkpoints"
    cfg = load_config(
        JobConfig,
        REPO / "configs/pretrain_debug.yaml",
        [
            f"data.path={shards}",
            f"run.output_dir={tmp_path / 'runs'}",
            f"dist.storage_path={storage}",
            "run.name=elastic",
            "data.num_workers=0",
            "run.log_every=1",
            "run.image_every=0",
            "dist.min_workers=1",
            "dist.num_workers=2",
            "train.global_batch=8",
            "dist.resize_interval_s=1",
            "dist.max_failures=1",
            "run.checkpoint_every=5",
            "train.max_steps=60",
            "model.norm_pix_loss=false",
            "optim.base_lr=0.05",
            "optim.warmup_steps=2",
        ],
    )
    run_dir = tmp_path / "runs" / "elastic"
    starts = lambda: _lines(run_dir / "starts.jsonl")  # noqa: E731 - one line per worker group the run started
    losses = lambda: [m for m in _lines(run_dir / "metrics.jsonl") if "train/loss" in m]  # noqa: E731

    ray_cluster.add()
    run = Background(
        lambda: run_ray(
            train_worker, {"config": to_dict(cfg)}, cfg.dist, run_name="elastic", keep_checkpoints=cfg.run.keep_last
        )
    )
    _wait(lambda: any(m["step"] > 5 for m in losses()), "step 6 on one worker", 180, run)
    second = ray_cluster.add()
    _wait(lambda: len(starts()) == 2, "the restart on 2 workers", 120, run)
    grown = starts()[1]["step"]
    # a checkpoint of the 2-worker group, then lose the node of one of its workers
    _wait(lambda: (committed_step(f"{storage}/elastic") or 0) > grown, "a 2-worker checkpoint", 120, run)
    reported = committed_step(f"{storage}/elastic")
    ray_cluster.kill(second)
    result = run.result(timeout=240)

    assert result.error is None and result.metrics["step"] == 60
    groups = starts()
    assert [g["world_size"] for g in groups] == [1, 2, 1], groups
    # the configured global batch and lr at every size; accumulation absorbs the worker count
    assert [(g["global_batch"], g["micro_batch"], g["grad_accum"]) for g in groups] == [(8, 4, 2), (8, 4, 1), (8, 4, 2)]
    assert len({g["lr"] for g in groups}) == 1
    # each group starts from a checkpoint; the one after the loss from the newest committed before the kill (or one
    # committed between that look and the kill): nothing reported was lost
    begun = [g["step"] for g in groups]
    assert begun[0] == 0 and begun[1] % 5 == 0 and begun[1] >= 5
    assert begun[2] % 5 == 0 and begun[2] >= reported > begun[1]
    # the loss curve as finally recorded (the last value logged for each step) continues across both restarts; a
    # restart from scratch would be back near step 1's loss
    curve = {m["step"]: m["train/loss"] for m in losses()}
    assert sorted(curve) == list(range(1, 61))
    first = sum(curve[s] for s in (1, 2, 3)) / 3
    for b in begun[1:]:
        assert sum(curve[s] for s in range(b + 1, b + 4)) / 3 < 0.85 * first, curve
    assert sum(curve[s] for s in range(56, 61)) / 5 < 0.7 * first, curve
    assert committed_step(f"{storage}/elastic") == 60
    # both resumes downloaded their checkpoint from the bucket; the node disk (one /tmp here) keeps only the newest
    downloads = resume_folder(f"{storage.removeprefix('s3://')}/elastic")
    assert len([p for p in downloads.iterdir() if p.is_dir()]) == 1
    shutil.rmtree(downloads)


def test_sweep_trials_wait_for_nodes_and_a_lost_node_restarts_only_its_trial(ray_cluster, tmp_path, seg_shards):
    """Two 1-worker trials, no worker node: both wait. Two nodes join: both run. One node is killed mid-trial: its
    trial restarts from its checkpoint on a replacement node while the other goes on undisturbed."""
    from medmae.sweep import SweepConfig, expand_grid, run_sweep

    cfg = load_config(
        SweepConfig,
        REPO / "configs/sweep_debug.yaml",
        [
            f"storage_path={tmp_path / 'sweeps'}",
            f"finetune_config={REPO / 'configs/finetune_debug.yaml'}",
            f"overrides.data.path={seg_shards}",
            "grid.init=[scratch]",
            "max_concurrent_trials=-1",
            "overrides.train.max_steps=24",
            "overrides.run.checkpoint_every=4",
            "overrides.run.val_every=0",  # about nodes, not selection: each trial reports its last model
            "selection=final",
            "overrides.run.log_every=1",
            "resources.max_failures=1",
        ],
    )
    trials = tmp_path / "sweeps" / cfg.name / "trials"
    names = [s.name for s in expand_grid(cfg)]
    steps = {
        n: (lambda n=n: [m["step"] for m in _lines(trials / n / "metrics.jsonl") if "train/loss" in m]) for n in names
    }
    sweep = Background(lambda: run_sweep(cfg))
    # Both trial drivers are up (on the head) and keep waiting for a worker, across the controller's retries of a
    # worker group that cannot be placed (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, 5 s here).
    _wait(lambda: all((trials / n / "trial_starts.jsonl").is_file() for n in names), "both trial drivers", 60, sweep)
    time.sleep(6)
    assert all(not (trials / n / "metrics.jsonl").exists() for n in names)
    first, _ = ray_cluster.add(), ray_cluster.add()
    committed = lambda n: committed_step(str(tmp_path / "sweeps" / cfg.name / "checkpoints" / n)) or 0  # noqa: E731
    _wait(lambda: all(committed(n) >= 4 for n in names), "both trials past their first checkpoint", 180, sweep)
    assert all(not (trials / n / "trial.json").exists() for n in names), "a trial ended before the node loss"
    ray_cluster.kill(first)  # takes the worker of one of the two trials
    ray_cluster.add()  # its replacement, as a cluster's autoscaler would bring
    paths = sweep.result(timeout=240)

    begun = {n: [g["step"] for g in _lines(trials / n / "starts.jsonl")] for n in names}
    [lost] = [n for n in names if len(begun[n]) > 1]
    [kept] = [n for n in names if n != lost]
    assert begun[kept] == [0] and steps[kept]() == list(range(1, 25))  # the other trial went on undisturbed
    # the lost trial's workers restarted once, from a checkpoint, and finished the schedule
    assert len(begun[lost]) == 2 and begun[lost][1] >= 4 and begun[lost][1] % 4 == 0, begun
    assert steps[lost]()[-(24 - begun[lost][1]) :] == list(range(begun[lost][1] + 1, 25))
    for n in names:  # Ray Train restarted the worker group; Tune did not restart the trial
        assert len((trials / n / "trial_starts.jsonl").read_text().splitlines()) == 1
        assert json.loads((trials / n / "trial.json").read_text())["status"] == "done"
    assert paths["csv"].is_file()
