"""The label-efficiency sweep: config and grid, the report, and real Ray Tune sweeps of tiny UNETR trials (CPU).

One local Ray (2 CPUs) serves the module. Trials use configs/sweep_debug.yaml on generated phantoms: 1 worker × 1 CPU
each, a few steps, so two run at once.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml

from medmae.config import load_config
from medmae.distributed.ray_launch import _HOST
from medmae.models import create_model, save_encoder
from medmae.sweep import SweepConfig, expand_grid, trial_job
from medmae.sweep.report import write_report

REPO = Path(__file__).resolve().parents[1]
DEBUG = REPO / "configs/sweep_debug.yaml"


@pytest.fixture(scope="module")
def assets(tmp_path_factory, seg_shards) -> dict[str, Path]:
    """The session's eight labelled phantoms, and a debug MAE encoder unlike any seed-0 init."""
    root = tmp_path_factory.mktemp("sweep_data")
    torch.manual_seed(123)
    mae = create_model("mae_vit_3d_debug")
    encoder = save_encoder(mae.state_dict(), mae.cfg.encoder_dict(), root / "encoder.safetensors")
    return {"shards": seg_shards, "encoder": Path(encoder)}


def _sweep_cfg(tmp_path: Path, assets: dict[str, Path], *overrides: str) -> SweepConfig:
    return load_config(
        SweepConfig,
        DEBUG,
        [
            f"storage_path={tmp_path / 'sweeps'}",
            f"pretrained={assets['encoder']}",
            f"finetune_config={REPO / 'configs/finetune_debug.yaml'}",
            f"overrides.data.path={assets['shards']}",
            "overrides.train.max_steps=8",
            "overrides.run.val_every=4",
            "overrides.run.checkpoint_every=4",
            "overrides.run.log_every=1",
            *overrides,
        ],
    )


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


# ---- no Ray ---------------------------------------------------------------------------------------------------------
def test_grid_names_and_trial_configs(tmp_path, assets):
    cfg = _sweep_cfg(
        tmp_path,
        assets,
        "grid.lr=[1e-3, 1.5e-4]",
        "grid.seeds=[0, 2]",
        "grid.lr_key=base_lr",
        "resources.workers=2",
        "resources.min_workers=1",
    )
    specs = expand_grid(cfg)
    assert len(specs) == 2 * 2 * 2 * 2 and len({s.name for s in specs}) == 16
    assert {"scratch-f0.5-lr1e-3-s0", "mae-f1-lr1.5e-4-s2"} <= {s.name for s in specs}
    mae = next(s for s in specs if s.name == "mae-f0.5-lr1.5e-4-s2")
    job = trial_job(cfg, mae)
    root = tmp_path / "sweeps" / "sweep_debug"
    assert (job.run.name, job.run.output_dir, job.run.seed) == (mae.name, str(root / "trials"), 2)
    assert (job.data.train_fraction, job.data.subset_seed, job.data.path) == (0.5, 2, str(assets["shards"]))
    assert job.optim.base_lr == 1.5e-4 and job.optim.lr is None
    assert job.finetune.pretrained == str(assets["encoder"])
    assert (job.dist.num_workers, job.dist.min_workers, job.dist.max_failures) == (2, 1, 1)
    assert job.dist.storage_path == str(root / "checkpoints")
    assert job.train.max_steps == 8  # the sweep's overrides reach every trial
    scratch = next(s for s in specs if s.init == "scratch")
    assert trial_job(cfg, scratch).finetune.pretrained == ""


@pytest.mark.parametrize(
    "override, match",
    [
        ("grid.init=[scratch, imagenet]", "init: 'imagenet'"),
        ("grid.train_fraction=[0, 0.5]", "train_fraction"),
        ("pretrained=''", "pretrained"),
        ("overrides.optim.lrr=1", "unknown config key 'optim.lrr'"),
        ("storage_path=s3://bucket/sweeps", "storage_path"),
        ("asha.reduction_factor=1", "reduction_factor"),
        ("overrides.data.select_count=null", "selection: checkpoint .* set overrides.data.select_count"),
        ("overrides.run.val_every=0", "selection: checkpoint needs run.val_every"),
        (("asha.enabled=true", "selection=final"), "asha.enabled"),
        (("selection=final", "overrides.data.select_count=null", "grid.lr=[1e-3,1e-2]"), "grid.lr: 2 learning rates"),
    ],
)
def test_bad_sweep_configs_name_the_key(tmp_path, assets, override, match):
    with pytest.raises(ValueError, match=match):
        from medmae.sweep.grid import trial_jobs

        trial_jobs(_sweep_cfg(tmp_path, assets, *(override if isinstance(override, tuple) else (override,))))


def _entry(step: int, score: float, split: str) -> dict:
    return {"step": step, "split": split, "score": score, "mean_dice": score, "dice": {"liver": score}, "hd95": {}}


@pytest.mark.parametrize("selection", ["checkpoint", "final"])
def test_report_picks_on_the_selection_split_and_reports_the_validation_split(tmp_path, assets, selection):
    """The selection split favours lr 1e-3, the validation split lr 1e-2: the report must choose 1e-3 and show its
    validation scores, of the checkpoint the selection split picked (step 4) or of the final model (step 8)."""
    cfg = _sweep_cfg(tmp_path, assets, "grid.seeds=[0, 1]", "grid.lr=[1e-3, 1e-2]", "grid.train_fraction=[0.5]")
    root = tmp_path / "report"
    for spec in expand_grid(cfg):
        base = {"scratch": 0.5, "mae": 0.7}[spec.init] + 0.1 * spec.seed
        sel = base + (0.05 if spec.lr == 1e-3 else 0.0)  # the selection split prefers lr 1e-3
        val = base - 0.2 + (0.15 if spec.lr == 1e-2 else 0.0)  # the validation split would prefer lr 1e-2
        history = [_entry(4, sel, "selection"), _entry(8, sel - 0.01, "selection")]
        picked = history[0] if selection == "checkpoint" else history[1]
        test = _entry(picked["step"], val if selection == "checkpoint" else val - 0.03, "validation")
        run = root / "trials" / spec.name
        run.mkdir(parents=True)
        results = {"task": "segment", "best": history[0], "history": history, "test": test}
        (run / "results.json").write_text(json.dumps(results))
        (run / "trial.json").write_text(json.dumps({"status": "done", "wall_time_s": 1.5}))
    paths = write_report(root, expand_grid(cfg), "unit", selection)
    rows = _rows(paths["csv"])
    assert len(rows) == 8 and {r["status"] for r in rows} == {"done"} and {r["split"] for r in rows} == {"validation"}
    assert {r["step"] for r in rows} == {"4" if selection == "checkpoint" else "8"}
    summary = paths["summary"].read_text()
    # lr 1e-3, validation scores over seeds 0 and 1: scratch 0.3 + 0.05, mae 0.5 + 0.05 (final: 0.03 lower)
    shift = 0.0 if selection == "checkpoint" else 0.03
    scratch, mae = 0.35 - shift, 0.55 - shift
    assert f"| 0.5 | {scratch:.3f} ± 0.071 (lr 1e-3) | {mae:.3f} ± 0.071 (lr 1e-3) | +0.200 |" in summary, summary
    assert "best mean selection-split score" in summary and f"(selection: {selection})" in summary
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_refuses_to_choose_an_lr_on_the_reported_volumes(tmp_path, assets):
    from medmae.sweep.report import aggregate, collect_rows

    cfg = _sweep_cfg(tmp_path, assets, "grid.seeds=[0]", "grid.lr=[1e-3, 1e-2]", "grid.train_fraction=[0.5]")
    for spec in expand_grid(cfg):  # a single-run style trial: validated on the reported split, no selection split
        run = tmp_path / "trials" / spec.name
        run.mkdir(parents=True)
        entry = _entry(8, 0.5, "validation")
        (run / "results.json").write_text(json.dumps({"task": "segment", "best": entry, "history": [entry]}))
    with pytest.raises(ValueError, match="lr would be chosen on the reported volumes"):
        aggregate(collect_rows(tmp_path / "trials", expand_grid(cfg), "final"))


def test_report_takes_the_metric_groups_a_task_declares(tmp_path, assets):
    """A task's own per-class metric group (here 'iou', which no report code names) reaches results.csv and the
    aggregate, because the trial's results.json carries the task spec's metric_groups."""
    from medmae.sweep.report import aggregate, collect_rows

    cfg = _sweep_cfg(tmp_path, assets, "grid.seeds=[0]", "grid.lr=[1e-3]", "grid.train_fraction=[0.5]")
    root = tmp_path / "report"
    for spec in expand_grid(cfg):
        run = root / "trials" / spec.name
        run.mkdir(parents=True)
        best = {"step": 8, "score": 0.5, "mean_iou": 0.5, "iou": {"liver": 0.5}}
        results = {"task": "volumetry", "metric": "IoU", "metric_groups": ["iou"], "best": best, "history": [best]}
        (run / "results.json").write_text(json.dumps(results))
    rows = collect_rows(root / "trials", expand_grid(cfg))
    assert rows[0]["iou/liver"] == 0.5 and rows[0]["mean_iou"] == 0.5 and rows[0]["metric"] == "IoU"
    assert all("iou/liver" in entry["stats"] for entry in aggregate(rows).values())


# ---- real Ray Tune --------------------------------------------------------------------------------------------------
ray = pytest.importorskip("ray")


def test_asha_stops_a_trial_behind_at_a_rung_and_records_it(tmp_path, assets):
    from types import SimpleNamespace

    from medmae.sweep.tune import EarlyStopping

    cfg = _sweep_cfg(tmp_path, assets, "asha.enabled=true", "asha.grace_period=4", "asha.reduction_factor=2")
    sched = EarlyStopping(cfg, max_steps=8, trials_dir=tmp_path)
    good, bad = (SimpleNamespace(trial_id=n, config={"trial": n}) for n in ("good", "bad"))
    for t in (good, bad):
        sched.on_trial_add(None, t)
    assert sched.on_trial_result(None, good, {"step": 4, "val_score": 0.9}) == sched.CONTINUE
    assert sched.on_trial_result(None, bad, {"step": 4, "val_score": 0.1}) == sched.STOP
    assert json.loads((tmp_path / "bad" / "trial.json").read_text())["status"] == "stopped"
    assert sched.on_trial_result(None, good, {"step": 8, "val_score": 0.2}) == sched.CONTINUE  # final: never cut
    assert not (tmp_path / "good" / "trial.json").exists()


def _run(cfg: SweepConfig) -> dict[str, Path]:
    from medmae.sweep import run_sweep

    return run_sweep(cfg)


@pytest.mark.slow
def test_killed_driver_rerun_skips_finished_trials_and_writes_the_report(ray_session, tmp_path, assets, monkeypatch):
    """The sweep driver is killed (SIGKILL) after its first trial; the re-run runs only the other, whose worker dies
    at step 6 and restarts from its step-4 checkpoint within the trial (clearing the checkpoint folder a rank killed
    mid-save left behind), then reports both."""
    args = [
        f"storage_path={tmp_path / 'sweeps'}",
        f"pretrained={assets['encoder']}",
        "name=killed",
        f"overrides.data.path={assets['shards']}",
        "overrides.train.max_steps=8",
        "overrides.run.val_every=4",
        "overrides.run.checkpoint_every=4",
        "overrides.run.log_every=1",
        "grid.train_fraction=[1.0]",
        "max_concurrent_trials=1",
        f"finetune_config={REPO / 'configs/finetune_debug.yaml'}",
    ]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token"}
    trials = tmp_path / "sweeps" / "killed" / "trials"
    with open(tmp_path / "driver.log", "w") as log:
        driver = subprocess.Popen(
            [sys.executable, str(REPO / "launch/sweep.py"), "--config", str(DEBUG), *args],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 180
            while not list(trials.glob("*/trial.json")):
                assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no trial finished in time"
                time.sleep(0.5)
        finally:
            driver.send_signal(signal.SIGKILL)
            driver.wait()
    [done] = [p.parent for p in trials.glob("*/trial.json")]
    assert json.loads((done / "trial.json").read_text())["status"] == "done"
    before = {f: (done / f).stat().st_mtime_ns for f in ("trial.json", "results.json", "trial_starts.jsonl")}
    assert not (trials.parent / "results.csv").exists() or len(_rows(trials.parent / "results.csv")) == 2

    monkeypatch.setenv("MEDMAE_TEST_FAIL_AT_STEP", "6")  # the sweep forwards MEDMAE_* to every trial's workers
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = Path(tempfile.gettempdir()) / f"medmae-ckpt-{dead.pid}-{_HOST}-step-00000004-test"  # a killed rank's
    (orphan / "step-00000004").mkdir(parents=True)
    cfg = load_config(SweepConfig, DEBUG, args)
    assert cfg.resources.max_failures == 1
    paths = _run(cfg)
    assert not orphan.exists()
    rows = {r["trial"]: r for r in _rows(paths["csv"])}
    assert set(rows) == {"scratch-f1-lr3e-3-s0", "mae-f1-lr3e-3-s0"}
    assert {r["status"] for r in rows.values()} == {"done"}
    # the finished trial was not run again: its files are untouched and its driver function started once
    assert {f: (done / f).stat().st_mtime_ns for f in before} == before
    assert len((done / "trial_starts.jsonl").read_text().splitlines()) == 1
    other = trials / (set(rows) - {done.name}).pop()
    assert json.loads((other / "results.json").read_text())["best"]["step"] in (4, 8)
    assert (other / ".fail_injected").read_text() == "6"
    lines = map(json.loads, (other / "metrics.jsonl").read_text().splitlines())
    steps = [m["step"] for m in lines if "train/loss" in m]
    # steps 1-6 ran, the worker died before step 7; the restarted worker group resumed from the step-4 checkpoint
    assert steps == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8]
    assert len((other / "trial_starts.jsonl").read_text().splitlines()) == 1  # Tune did not restart the trial

    # the report: each trial's checkpoint picked on the selection split, scored once on the validation volumes
    for r in rows.values():
        assert r["step"] in ("4", "8") and r["split"] == "validation" and r["metric"] == "Dice"
        for key in ("score", "select_score", "dice/class1", "dice/class2", "wall_time_s"):
            assert math.isfinite(float(r[key])), (r["trial"], key)
    # the mae trial starts from the encoder (seeded unlike any trial), so it differs from scratch
    assert rows["mae-f1-lr3e-3-s0"]["score"] != rows["scratch-f1-lr3e-3-s0"]["score"]
    trial_cfg = yaml.safe_load((trials / "mae-f1-lr3e-3-s0/config.yaml").read_text())
    assert trial_cfg["data"]["train_fraction"] == 1.0 and trial_cfg["finetune"]["pretrained"] == str(assets["encoder"])
    summary = paths["summary"].read_text()
    assert "| train fraction | scratch Dice | mae Dice |" in summary and "| 1 |" in summary
    assert "(selection: checkpoint)" in summary, summary
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["plot"].stat().st_size > 5000
