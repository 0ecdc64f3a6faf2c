"""Per-rank random streams: two real ranks (torchrun, gloo, DeepSpeed) draw different MAE masks in the same step,
and a run resumed from a checkpoint continues each rank's stream exactly where the uninterrupted run is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# Records a hash of every micro-batch's MAE mask, per rank, while the real trainer runs three jobs in one process
# group: "a" 4 steps uninterrupted; "b" 2 steps, then "b" again to 4 steps (a resume from the step-2 checkpoint).
_SCRIPT = """
import hashlib, json, os, sys
from medmae.config import load_config
from medmae.tasks.pretrain import PretrainTask
from medmae.training.config import JobConfig
from medmae.training.trainer import Trainer

repo, shards, out_dir = sys.argv[1:4]
rank = int(os.environ["RANK"])
original = PretrainTask.loss

def loss(self, model, batch):
    value, out = original(self, model, batch)
    digest = hashlib.sha1(out.ids_shuffle.cpu().numpy().tobytes()).hexdigest()
    with open(f"{out_dir}/masks.{rank}.jsonl", "a") as f:
        f.write(json.dumps({"run": self.cfg.run.name, "mask": digest}) + "\\n")
    return value, out

PretrainTask.loss = loss

def job(name, steps):
    return load_config(JobConfig, f"{repo}/configs/pretrain_debug.yaml", [
        f"data.path={shards}", f"run.output_dir={out_dir}/runs", "data.num_workers=0",
        f"run.name={name}", f"train.max_steps={steps}", "run.checkpoint_every=2", "run.image_every=0",
        "dist.zero_stage=1", "train.micro_batch=2", "train.global_batch=8"])

for name, steps in (("a", 4), ("b", 2), ("b", 4)):
    Trainer(job(name, steps)).train()
"""


def test_ranks_draw_their_own_masks_and_resume_continues_each_stream(tmp_path, shards):
    script = tmp_path / "masks.py"
    script.write_text(_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            str(REPO),
            str(shards),
            str(tmp_path),
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    masks = {}
    for rank in (0, 1):
        lines = [json.loads(x) for x in (tmp_path / f"masks.{rank}.jsonl").read_text().splitlines()]
        masks[rank] = {run: [x["mask"] for x in lines if x["run"] == run] for run in ("a", "b")}
    accum = 8 // (2 * 2)
    for rank in (0, 1):
        a, b = masks[rank]["a"], masks[rank]["b"]
        assert len(a) == len(b) == 4 * accum
        assert b == a, f"rank {rank}: the resumed run drew other masks than the uninterrupted one"
    # the two ranks never draw the same mask in the same micro-step
    assert all(m0 != m1 for m0, m1 in zip(masks[0]["a"], masks[1]["a"]))
    saved = sorted((tmp_path / "runs" / "b" / "checkpoints").glob("step-*/step-*/rank_state_*.json"))
    assert [p.name for p in saved if "step-00000002" in str(p)] == ["rank_state_00000.json", "rank_state_00001.json"]
