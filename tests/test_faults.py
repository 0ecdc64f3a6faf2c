"""Runs that never end silently wrong, with the real trainer, DeepSpeed engine and files: a diverging run stops and
keeps its last good checkpoint and encoder; a truncated newest checkpoint is skipped for the previous one; a full
disk keeps the previous checkpoint and says so; a SIGTERM leaves a checkpoint the re-run resumes from."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medmae.config import load_config
from medmae.training.checkpoint import CheckpointError
from medmae.training.config import JobConfig

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def overrides(shards: Path, out: Path, name: str, *extra: str) -> list[str]:
    """A one-process debug MAE pretraining: 16³ crops, a log line every 2 steps, a checkpoint every 4."""
    return [
        f"data.path={shards}",
        "data.roi_size=16",
        "data.num_workers=0",
        f"run.output_dir={out}",
        f"run.name={name}",
        "run.log_every=2",
        "run.image_every=0",
        "run.checkpoint_every=4",
        "train.max_steps=8",
        "train.micro_batch=2",
        "dist.num_workers=1",
        *extra,
    ]


def job(shards: Path, out: Path, name: str, *extra: str) -> JobConfig:
    return load_config(JobConfig, REPO / "configs/pretrain_debug.yaml", overrides(shards, out, name, *extra))


def train(cfg: JobConfig) -> dict:
    from medmae.training.trainer import Trainer

    return Trainer(cfg).train()


def steps_on_disk(run: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint_and_encoder(shards, tmp_path):
    from medmae.training.trainer import DivergedError

    train(job(shards, tmp_path, "div"))
    run = tmp_path / "div"
    encoder, kept = digest(run / "encoder.safetensors"), steps_on_disk(run)
    assert kept == [4, 8]
    # the same run, continued with an lr that sends the loss to inf within a few steps (issue 20's reproduction)
    with pytest.raises(DivergedError, match=r"step \d+: non-finite or exploding loss .*step-00000008"):
        train(job(shards, tmp_path, "div", "train.max_steps=40", "optim.base_lr=1e4", "optim.warmup_steps=0"))
    assert steps_on_disk(run) == kept  # nothing written after the divergence, the last good one not pruned
    assert digest(run / "encoder.safetensors") == encoder
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["train/bad_steps"] > 0  # the count reached metrics.jsonl (and TensorBoard)


def test_a_truncated_newest_checkpoint_is_skipped_and_the_run_resumes_from_the_previous(shards, tmp_path, capfd):
    train(job(shards, tmp_path, "cut"))
    run = tmp_path / "cut"
    shard = next((run / "checkpoints/step-00000008/step-00000008").glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:1000])  # a partial copy or upload
    capfd.readouterr()
    train(job(shards, tmp_path, "cut", "train.max_steps=10"))
    warning = f"WARNING medmae.training.checkpoint: skipping checkpoint {run / 'checkpoints/step-00000008'}: {shard}"
    assert f"{warning}: 1000 bytes" in capfd.readouterr().err
    starts = [json.loads(x)["step"] for x in (run / "starts.jsonl").read_text().splitlines()]
    assert starts == [0, 4]  # resumed from step 4, the newest that verifies
    assert steps_on_disk(run) == [8, 10]  # step 8 written anew, whole


def test_no_checkpoint_that_verifies_is_a_clear_error(shards, tmp_path):
    train(job(shards, tmp_path, "none", "train.max_steps=4", "run.keep_last=1"))
    model = next((tmp_path / "none/checkpoints/step-00000004/step-00000004").glob("mp_rank_*model_states.pt"))
    model.write_bytes(b"\0" * model.stat().st_size)  # same size, other bytes: only the checksum tells
    with pytest.raises(CheckpointError, match=r"no checkpoint of .* passes verification"):
        train(job(shards, tmp_path, "none", "train.max_steps=6"))


@pytest.fixture
def small_disk(tmp_path):
    """A real full file system: a 4 MiB tmpfs (root only; CI runs as root)."""
    where = tmp_path / "disk"
    where.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here: {proc.stderr.decode().strip() or proc.returncode}")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_disk_keeps_the_previous_checkpoint_and_names_the_path(shards, small_disk):
    # the debug MAE's checkpoints (~1.3 MiB each, keep_last 2) fill the 4 MiB disk within a few
    with pytest.raises(CheckpointError) as err:
        train(job(shards, small_disk, "full", "train.max_steps=40", "run.checkpoint_every=4", "run.keep_last=3"))
    run = small_disk / "full"
    msg, kept = str(err.value), steps_on_disk(run)
    newest = run / f"checkpoints/step-{kept[-1]:08d}"
    assert "No space left on device" in msg and str(run / "checkpoints") in msg and "MiB free" in msg
    assert f"previous checkpoint {newest} is intact" in msg
    assert not list((run / "checkpoints").glob(".partial-*/rank-*/*"))  # no half-written files left behind
    from medmae.training.checkpoint import verify_checkpoint

    assert kept[-1] < 40 and all(verify_checkpoint(run / f"checkpoints/step-{s:08d}") is None for s in kept)


SIGTERM_SCRIPT = """
import sys
from medmae.config import load_config
from medmae.training.config import JobConfig
from medmae.training.preemption import Preempted
from medmae.training.trainer import Trainer
cfg = load_config(JobConfig, sys.argv[1], sys.argv[2:])
try:
    Trainer(cfg).train()
except Preempted as e:
    print("PREEMPTED", e, flush=True)
    sys.exit(Preempted.exit_code)
"""


def test_sigterm_saves_a_checkpoint_that_the_rerun_resumes_from(shards, tmp_path):
    long_run = overrides(shards, tmp_path, "term", "train.max_steps=400", "run.checkpoint_every=1000")
    (tmp_path / "t.py").write_text(SIGTERM_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [sys.executable, str(tmp_path / "t.py"), str(REPO / "configs/pretrain_debug.yaml"), *long_run]
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "term/metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    (saved,) = steps_on_disk(tmp_path / "term")
    assert 2 <= saved < 400 and f"PREEMPTED stopped at step {saved} on SIGTERM" in out
    train(job(shards, tmp_path, "term", f"train.max_steps={saved + 2}"))
    starts = [json.loads(x)["step"] for x in (tmp_path / "term/starts.jsonl").read_text().splitlines()]
    assert starts == [0, saved]


def test_a_checkpoint_from_before_a_new_model_key_resumes_only_at_that_keys_default():
    """``norm_eps`` came after some checkpoints were written: their saved model config lacks it. They ran at its
    default, so a run that keeps the default resumes them; one that changes it is a different architecture."""
    from medmae.config import to_dict
    from medmae.models import MAEConfig
    from medmae.training.checkpoint import same_architecture_as

    defaults = to_dict(MAEConfig())
    current = to_dict(MAEConfig(depth=2))
    old = {k: v for k, v in current.items() if k != "norm_eps"}
    assert same_architecture_as(old, current, defaults) == current
    other_eps = to_dict(MAEConfig(depth=2, norm_eps=1e-5))
    assert same_architecture_as(old, other_eps, defaults) != other_eps
    assert same_architecture_as(old, current, {}) != current  # without defaults: refused, as before
