#!/usr/bin/env python
"""The pre-registered label-efficiency study (docs/study/PROTOCOL.md): does MAE self pre-training beat training from
scratch with one labelled volume? One command, on the CPU, through the real tools:

    python tools/study.py                       # or: make study  (the confirmatory run: held-out subjects 24-31)
    python tools/study.py --publish docs/study  # also copy the report there
    python tools/study.py --pilot               # the pilot on the tuning subjects 16-23 (runs/study_pilot/pilot.md)
    python tools/study.py --smoke               # every stage on a tiny budget, tuning subjects (runs/study_smoke/)

Stages (each is skipped or resumed when a re-run finds it done, so an interrupted study continues):
  1. data      tools/study_data.py     the real ICBM152 brain (nilearn) under synthetic warps: pool 0-15 and the
                                       held-out subjects 24-31 (the pilot: tuning subjects 16-23)    -> data/study/raw
  2. convert   tools/to_wds.py         WebDataset shards, mri preset, foreground crop                 -> data/study/wds
  3. colin27   tools/study_colin27.py  Colin27 + AAL from Debian's mricron-data (apt-get download, cached); when it
                                       cannot be had, the summary says so and the study goes on
  4. pretrain  launch/pretrain.py      MAE on the 16 pool volumes, labels unused (configs/pretrain_study.yaml)
  5. pairs     tools/study_pair.py     per pair, one process: scratch and MAE fine-tuned back to back on the pair's
                                       labelled subject, same seed and crops; the probe; Colin27 (configs/study.yaml)
  6. report    summary.md: per endpoint MAE - baseline, mean ± SD, 95 % CI, one-sided p (t-test, exact sign-flip),
               per pair, and the wall time of each stage

Everything is written under runs/study/ (data under data/study/). Delete runs/study/ to start over.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a clone without installing
sys.path.insert(0, str(ROOT / "tools"))

from study_config import ARMS, StudyConfig  # noqa: E402
from study_report import read_pairs, write_pilot, write_summary  # noqa: E402

from medmae.config import load_config  # noqa: E402

# Lines of the launchers' output worth showing live; everything goes to <output>/logs/<stage>.log.
SHOW = re.compile(
    r"medmae\.progress|subject \d+|converted|config error|Traceback|Error|error:|exported .*encoder|colin27|wrote"
)
# Ray Train's placement-group cleaner polls the state API, which fails when several Ray instances run on one machine
# (other users'): harmless, and it would flood the screen.
NOISE = re.compile(r"PlacementGroupCleaner|Failed to query Ray Train Controller")
TAIL_ON_FAILURE = 60
SMOKE = {"train": {"max_steps": 4}, "optim": {"warmup_steps": 1}}  # a smoke run's fine-tuning


class LoadSampler(threading.Thread):
    """Samples the 1-minute load average every ``period`` s: the evidence of how busy the machine was (other
    processes included) while each stage ran; on a 2-core machine a load above 2 means the study waited for CPU."""

    def __init__(self, period: float = 5.0) -> None:
        super().__init__(daemon=True)
        self.period, self.stopped = period, threading.Event()
        self.samples: list[float] = []

    def run(self) -> None:
        while not self.stopped.wait(self.period):
            self.samples.append(os.getloadavg()[0])

    def take(self) -> list[float]:
        out, self.samples = self.samples, []
        return out


def run_stage(name: str, cmd: list[str], log_dir: Path, env: dict[str, str], ok: tuple[int, ...] = (0,)) -> int:
    """Run ``cmd`` from the repository root, its output into ``log_dir/<name>.log``; show the lines that say how
    far it got. Exits with the command's status (and the log's tail) when it is not in ``ok``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    print(f"    $ {' '.join(cmd)}\n    (full output: {log_path})", flush=True)
    with open(log_path, "a", buffering=1) as log:  # line-buffered: the log is current while the stage runs
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        assert proc.stdout is not None  # stdout=PIPE
        for line in proc.stdout:
            log.write(line)
            if SHOW.search(line) and not NOISE.search(line):
                print("    " + line.rstrip()[:200], flush=True)
        status = proc.wait()
    if status not in ok:
        tail = log_path.read_text().splitlines()[-TAIL_ON_FAILURE:]
        print(
            "\n".join(["", f"stage {name} failed (exit {status}); last lines of {log_path}:", *tail]), file=sys.stderr
        )
        raise SystemExit(status)
    return status


def run_pairs(jobs: list[Path], parallel: int, log_dir: Path, env: dict[str, str]) -> list[str]:
    """Run ``tools/study_pair.py`` on each job whose ``pair.json`` is missing, ``parallel`` at a time; returns the
    names of the pairs that failed (a re-run of the study retries them)."""
    todo = [j for j in jobs if not (j.parent / "pair.json").is_file()]
    print(f"    {len(jobs) - len(todo)} of {len(jobs)} pairs already done, {len(todo)} to run, {parallel} at a time")
    log_dir.mkdir(parents=True, exist_ok=True)
    running: list[tuple[subprocess.Popen, Path, Any]] = []
    failed = []
    while todo or running:
        while todo and len(running) < parallel:
            job = todo.pop(0)
            log = open(log_dir / f"{job.parent.name}.log", "a", buffering=1)
            cmd = [sys.executable, "tools/study_pair.py", str(job)]
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            running.append((proc, job, log))
        time.sleep(0.5)
        for item in list(running):
            proc, job, log = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            lines = (log_dir / f"{job.parent.name}.log").read_text().splitlines()
            shown = [line for line in lines if re.match(rf"{job.parent.name} ", line)]
            for line in shown:
                print("    " + line, flush=True)
            if proc.returncode:
                failed.append(job.parent.name)
                print(f"    {job.parent.name} failed (exit {proc.returncode}); log: {log.name}", flush=True)
    return failed


def units(cfg: StudyConfig, pilot: bool) -> list[tuple[str, int, int]]:
    """(name, labelled pool subject, seed) of each pair (confirmatory) or pilot pair."""
    if pilot:
        return [(f"pilot{s:02d}", s, cfg.pilot.seed_offset + s) for s in cfg.pilot.subjects]
    return [(f"pair{k:02d}", k, k) for k in cfg.pairs]


def pair_jobs(cfg: StudyConfig, pilot: bool, paths: dict[str, Path], colin27: dict | None) -> list[Path]:
    """Write one job file per pair (confirmatory) or per pilot pair; returns their paths."""
    if pilot:
        runs = [
            {"name": f"{arm}-lr{lr:g}-ld{ld:g}", "arm": arm, "lr": lr, "layer_decay": ld}
            for arm in ARMS
            for lr in cfg.pilot.lr
            for ld in cfg.pilot.layer_decay
        ]
    else:
        runs = [{"name": arm, "arm": arm, **vars(cfg.arm(arm))} for arm in ARMS]
    jobs = []
    for name, subject, seed in units(cfg, pilot):
        job = {
            "name": name,
            "subject": subject,
            "seed": seed,
            "data": str(paths["wds"]),
            "output": str(paths["out"] / "pairs" / name),
            "finetune_config": str(ROOT / cfg.finetune_config),
            "encoder": str(paths["encoder"]),
            "overrides": cfg.overrides,
            "runs": runs,
            "probe": None if pilot else vars(cfg.probe),
            "colin27": colin27,
        }
        path = paths["out"] / "pairs" / name / "job.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(job, indent=2))
        jobs.append(path)
    return jobs


def pretrain_loss(run_dir: Path, steps: tuple[int, ...] = (300, 500)) -> dict[int, float]:
    """The MAE's training loss at ``steps`` and at its last logged step, from its metrics.jsonl."""
    try:
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    except (OSError, ValueError):
        return {}
    loss = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    if not loss:
        return {}
    return {s: loss[s] for s in (*steps, max(loss)) if s in loss}


def _manifest_complete(folder: Path) -> bool:
    try:
        return bool(json.loads((folder / "manifest.json").read_text()).get("complete"))
    except (OSError, ValueError):
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/study.yaml")
    ap.add_argument("--data", default="data/study", help="folder for the generated volumes and shards")
    ap.add_argument("--output", help="default runs/study (runs/study_pilot, runs/study_smoke)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--pilot", action="store_true", help="the pilot on the tuning subjects 16-23")
    mode.add_argument(
        "--smoke", action="store_true", help="every stage, 2 pairs of a few steps, on the tuning subjects (a check)"
    )
    ap.add_argument("--publish", metavar="DIR", help="copy the report, pair results and timings to DIR")
    args = ap.parse_args()

    cfg = load_config(StudyConfig, ROOT / args.config)
    name = "study_pilot" if args.pilot else "study_smoke" if args.smoke else "study"
    out = ROOT / (args.output or f"runs/{name}")
    pretrain_overrides = []
    if args.smoke:
        cfg.pairs = cfg.pairs[:2]
        cfg.overrides = {**cfg.overrides, **SMOKE}
        pretrain_overrides = ["train.max_steps=4", "optim.warmup_steps=1", "run.log_every=1"]
    pre = yaml.safe_load((ROOT / cfg.pretrain_config).read_text())
    # The held-out subjects are made and scored by the confirmatory run alone; a pilot or a smoke run uses the
    # tuning subjects (the smoke run's models are too short to tell anything).
    tuning = args.pilot or args.smoke
    data = ROOT / args.data
    raw, wds = data / "raw", data / ("wds_tuning" if tuning else "wds")
    datalist = raw / ("dataset_tuning.json" if tuning else "dataset.json")
    datalist_role = "tuning" if tuning else "held_out"
    encoder = out / pre["run"]["name"] / "encoder.safetensors"
    paths = {"out": out, "wds": wds, "encoder": encoder}

    env = dict(os.environ)
    # Ray workers import this checkout; a private local Ray for the pretraining, never another user's cluster.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["RAY_ADDRESS"] = "local"
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    pair_env = {**env, "MEDMAE_STUDY_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    py = sys.executable
    colin_dir = data / "colin27"
    colin_status = {"text": "not part of the pilot" if args.pilot else "not run"}

    def colin27() -> None:
        status = run_stage("colin27", [py, "tools/study_colin27.py", str(colin_dir)], out / "logs", env, ok=(0, 3))
        if status:
            last = (out / "logs" / "colin27.log").read_text().strip().splitlines()[-1]
            colin_status["text"] = f"not available ({last})"

    stages: list[tuple[str, Any, Any]] = [  # name, action (command or function), "already done?"
        ("data", [py, "tools/study_data.py", str(raw), "--evaluate", datalist_role], datalist.is_file),
        (
            "convert",
            [py, "tools/to_wds.py", str(datalist), str(wds), "--format", "wds", "--preset", "mri"]
            + ["--crop-foreground", "--quiet"],
            lambda: _manifest_complete(wds),
        ),
    ]
    if not args.pilot:
        stages.append(("colin27", colin27, (colin_dir / "source.json").is_file))
    stages.append(
        (
            "pretrain",
            [py, "launch/pretrain.py", "--config", cfg.pretrain_config, f"data.path={wds}", f"run.output_dir={out}"]
            + [f"dist.storage_path={out / 'ray'}", *pretrain_overrides],
            encoder.is_file,
        )
    )
    names = [u[0] for u in units(cfg, args.pilot)]
    failed: list[str] = []

    def pairs() -> None:
        colin = None
        if (colin_dir / "source.json").is_file() and not args.pilot:
            colin = {"image": str(colin_dir / "colin27.nii.gz"), "label": str(colin_dir / "colin27_aal.nii.gz")}
        jobs = pair_jobs(cfg, args.pilot, paths, colin)
        failed.extend(run_pairs(jobs, cfg.parallel, out / "logs" / "pairs", pair_env))

    stages.append(("pairs", pairs, lambda: all((out / "pairs" / n / "pair.json").is_file() for n in names)))

    timings_path = out / "timings.json"
    # Per stage, the run that did the work: a later run that finds a stage done keeps that stage's record.
    timings: dict[str, dict] = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    sampler = LoadSampler()
    sampler.start()
    t_start = time.perf_counter()
    for i, (stage, action, done) in enumerate(stages, 1):
        if done():
            print(f"[{i}/{len(stages)}] {stage}: already done", flush=True)
            timings.setdefault(stage, {"wall_s": None, "load": None})
            continue
        print(f"[{i}/{len(stages)}] {stage} (elapsed {time.perf_counter() - t_start:.0f} s)", flush=True)
        t0 = time.perf_counter()
        sampler.take()
        if callable(action):
            action()
        else:
            run_stage(stage, action, out / "logs", env)
        load = sampler.take()
        timings[stage] = {
            "wall_s": round(time.perf_counter() - t0, 1),
            "load": round(float(np.mean(load)), 2) if load else os.getloadavg()[0],
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        out.mkdir(parents=True, exist_ok=True)
        timings_path.write_text(json.dumps(timings, indent=2))
    sampler.stopped.set()
    if (colin_dir / "source.json").is_file() and not args.pilot:
        source = json.loads((colin_dir / "source.json").read_text())
        colin_status["text"] = f"from {source['package']} (sha256 {source['sha256'][:12]}…)"

    results = read_pairs(out / "pairs", names)
    if args.pilot:
        report = out / "pilot.md"
        chosen = write_pilot(report, results, timings)
        print(f"\n{report.read_text()}\nchosen: {chosen}")
    else:
        report = out / "summary.md"
        command = "make study (= python tools/study.py)" + (" --smoke" if args.smoke else "")
        scored = "tuning subjects 16–23 (a smoke run: not a result)" if args.smoke else "held-out subjects 24–31"
        write_summary(report, results, timings, pretrain_loss(encoder.parent), colin_status["text"], command, scored)
        print(f"\n{report.read_text()}")
    print(f"report: {report}")
    if args.publish:
        dest = ROOT / args.publish
        (dest / "pairs").mkdir(parents=True, exist_ok=True)
        shutil.copy2(report, dest / report.name)
        shutil.copy2(timings_path, dest / "timings.json")
        for n in names:
            if (out / "pairs" / n / "pair.json").is_file():
                shutil.copy2(out / "pairs" / n / "pair.json", dest / "pairs" / f"{n}.json")
        print(f"published to {dest}")
    if failed:
        raise SystemExit(f"{len(failed)} pair(s) failed ({', '.join(failed)}); re-run to retry them")


if __name__ == "__main__":
    main()
