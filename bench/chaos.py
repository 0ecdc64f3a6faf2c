#!/usr/bin/env python
"""Chaos bench (issue 20; not in make test): real runs on a local multi-node Ray cluster with faults injected at
random steps, and a check that nothing reported was lost.

    python bench/chaos.py                 # ~10 min on 2 cores; --seed picks other steps
    python bench/chaos.py --out bench/results/chaos.json

Pretraining (2 Ray Train workers on 2 one-CPU nodes, checkpoints every 10 steps), faults in random order and steps:
- ``worker kill``: the last rank exits hard at a step (``MEDMAE_TEST_FAIL_AT_STEP``);
- ``node loss``: a node's raylet and every process on it are killed; a replacement node joins;
- ``SIGTERM``: a training worker process gets SIGTERM;
- ``corrupt checkpoint``: the newest checkpoint in storage is truncated, then a worker is killed so the run resumes.
A sweep (2 trials of 20 steps) then runs with a worker kill in each trial. Printed: the faults injected, those
survived (a restart happened and the run finished), and whether any reported step or trial was lost (goal: none).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]


def lines(path: Path) -> list[dict]:
    try:
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    except FileNotFoundError:
        return []


def train_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "ray::RayTrainWorker"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def newest_checkpoint(storage: Path) -> Path | None:
    found = sorted(p for p in storage.glob("*/checkpoint_2*") if p.is_dir())  # checkpoint_<date>, not the snapshot
    return found[-1] if found else None


def pretrain_with_faults(args, shards: Path, root: Path, cluster) -> dict:
    from medmae.config import load_config, to_dict
    from medmae.distributed import run_ray
    from medmae.training.config import JobConfig
    from medmae.training.trainer import train_worker

    rng = random.Random(args.seed)
    steps = args.steps
    kinds = ["node loss", "SIGTERM", "corrupt checkpoint"]
    rng.shuffle(kinds)
    at = sorted(rng.sample(range(15, steps - 15, 5), len(kinds) + 1))
    kill_at = at[0]  # the fault hook's worker kill comes first: it is armed before the run starts
    schedule = list(zip(at[1:], kinds))
    os.environ["MEDMAE_TEST_FAIL_AT_STEP"] = str(kill_at)
    storage = root / "storage"
    cfg = load_config(
        JobConfig,
        REPO / "configs/pretrain_debug.yaml",
        [
            f"data.path={shards}",
            f"run.output_dir={root / 'runs'}",
            f"dist.storage_path={storage}",
            "run.name=chaos",
            "data.num_workers=0",
            "run.log_every=1",
            "run.image_every=0",
            "run.checkpoint_every=10",
            f"train.max_steps={steps}",
            "dist.num_workers=2",
            "dist.max_failures=10",
            "dist.zero_stage=1",
        ],
    )
    run_dir = root / "runs/chaos"
    injected: list[dict] = [{"fault": "worker kill", "step": kill_at, "starts_before": 0}]
    result: dict = {}

    def run() -> None:
        try:
            result["value"] = run_ray(train_worker, {"config": to_dict(cfg)}, cfg.dist, run_name="chaos")
        except BaseException as e:  # noqa: BLE001 - reported below
            result["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    nodes = list(cluster.worker_nodes)
    for step, kind in schedule:
        deadline = time.monotonic() + 900
        while max((m["step"] for m in lines(run_dir / "metrics.jsonl") if "train/loss" in m), default=0) < step:
            if not thread.is_alive() or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        starts_before = len(lines(run_dir / "starts.jsonl"))
        if kind == "node loss":
            cluster.remove_node(nodes.pop(0), allow_graceful=False)
            nodes.append(cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20))
        elif kind == "SIGTERM":
            pids = train_pids()
            if pids:
                os.kill(pids[-1], signal.SIGTERM)
        else:
            ckpt = newest_checkpoint(storage)
            shard = next(iter(sorted(ckpt.glob("step-*/*optim_states.pt"))), None) if ckpt else None
            if shard is not None:
                shard.write_bytes(shard.read_bytes()[:1000])
            pids = train_pids()
            if pids:
                os.kill(pids[0], signal.SIGKILL)
            kind = f"corrupt checkpoint ({shard.relative_to(storage) if shard else 'none yet'}) + worker kill"
        injected.append({"fault": kind, "step": step, "starts_before": starts_before})
        print(f"  injected {kind} at step {step}", flush=True)
    thread.join(timeout=1800)
    os.environ.pop("MEDMAE_TEST_FAIL_AT_STEP", None)
    starts = lines(run_dir / "starts.jsonl")
    logged = {m["step"] for m in lines(run_dir / "metrics.jsonl") if "train/loss" in m}
    out = result.get("value")
    finished = out is not None and out.error is None and out.metrics.get("step") == steps
    for f in injected:
        # survived: the run restarted after it (one more start than before) and still finished
        f["survived"] = finished and len(starts) > int(f["starts_before"])
    return {
        "steps": steps,
        "faults": injected,
        "restarts": [s["step"] for s in starts],
        "finished": finished,
        "error": repr(result.get("error") or (out.error if out is not None else None)),
        "steps_lost": sorted(set(range(1, steps + 1)) - logged),
        "encoder_exported": (run_dir / "encoder.safetensors").is_file(),
    }


def sweep_with_faults(args, shards: Path, encoder: Path, root: Path) -> dict[str, Any]:
    from medmae.config import load_config
    from medmae.sweep import SweepConfig, expand_grid, run_sweep

    os.environ["MEDMAE_TEST_FAIL_AT_STEP"] = "6"  # forwarded to every trial's workers: each trial loses one once
    cfg = load_config(
        SweepConfig,
        REPO / "configs/sweep_debug.yaml",
        [
            f"storage_path={root / 'sweeps'}",
            f"pretrained={encoder}",
            f"finetune_config={REPO / 'configs/finetune_debug.yaml'}",
            f"overrides.data.path={shards}",
            "grid.train_fraction=[1.0]",
            "overrides.train.max_steps=12",
            "overrides.run.checkpoint_every=4",
            "overrides.run.val_every=0",
            "resources.max_failures=2",
        ],
    )
    try:
        paths = run_sweep(cfg)
    finally:
        os.environ.pop("MEDMAE_TEST_FAIL_AT_STEP", None)
    import csv

    rows = list(csv.DictReader(open(paths["csv"])))
    trials = root / "sweeps" / cfg.name / "trials"
    hit = {s.name for s in expand_grid(cfg) if (trials / s.name / ".fail_injected").is_file()}
    return {
        "trials": len(rows),
        "faults_injected": len(hit),
        "faults_survived": sum(r["status"] == "done" and r["trial"] in hit for r in rows),
        "trials_lost": [r["trial"] for r in rows if r["status"] != "done"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--out", help="write the figures here as JSON")
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.25"
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "5"
    import ray
    from ray.cluster_utils import Cluster

    from medmae.data.convert import ConvertOptions, convert
    from medmae.data.synthetic import write_phantom_dataset

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="chaos-", dir="/tmp") as tmp:
        root = Path(tmp)
        os.makedirs(root / "ray", exist_ok=True)
        os.environ["RAY_TMPDIR"] = str(root)
        data = write_phantom_dataset(root / "raw", n=8, shape=(40, 40, 40), num_classes=3, seed=5)
        convert(data, root / "wds", ConvertOptions(preset="ct", workers=0, shard_size_mb=0.1), progress=False)
        cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 0, "object_store_memory": 80 * 2**20, "include_dashboard": False},
        )
        for _ in range(2):
            cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20)
        ray.init(address=cluster.address)
        try:
            pre = pretrain_with_faults(args, root / "wds", root, cluster)
            print(json.dumps(pre, indent=1), flush=True)
            encoder = root / "runs/chaos/encoder.safetensors"
            sweep: dict[str, Any] = {"skipped": "no encoder"}
            if encoder.is_file():
                sweep = sweep_with_faults(args, root / "wds", encoder, root)
        finally:
            ray.shutdown()
            cluster.shutdown()
    survived = sum(f["survived"] for f in pre["faults"]) + sweep.get("faults_survived", 0)
    injected = len(pre["faults"]) + sweep.get("faults_injected", 0)
    report = {
        "seed": args.seed,
        "wall_s": round(time.perf_counter() - t0, 1),
        "pretraining": pre,
        "sweep": sweep,
        "faults_injected": injected,
        "faults_survived": survived,
        "reported_steps_lost": len(pre["steps_lost"]),
        "trials_lost": len(sweep.get("trials_lost", [])),
    }
    print(
        f"\nfaults injected {injected}, survived {survived}; reported steps lost {report['reported_steps_lost']}, "
        f"trials lost {report['trials_lost']} ({report['wall_s']:.0f} s)"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
