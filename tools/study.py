#!/usr/bin/env python
"""The label-efficiency study (issue 9 §2): does MAE self pre-training beat training from scratch when only a
few labelled volumes exist? One command, on the CPU, through the real tools:

    python tools/study.py                     # or: make study
    python tools/study.py --publish docs/study   # also copy the report there

Stages (each is skipped or resumed when a re-run finds it done, so an interrupted study continues):
  1. data      tools/study_data.py   24 subjects: the real ICBM152 brain (nilearn) under synthetic warps, GM/WM
                                     labels per hemisphere; 16 form the training pool, 8 held out   -> data/study/raw
  2. convert   tools/to_wds.py       WebDataset shards, mri preset, foreground crop                 -> data/study/wds
  3. pretrain  launch/pretrain.py    MAE on the 16 pool volumes, labels unused (configs/pretrain_study.yaml)
  4. sweep     launch/sweep.py       UNETR, scratch vs MAE x 1/2/4 labelled volumes x seeds (configs/sweep_study.yaml)
  5. report    summary.md: MAE - scratch per label budget, paired by seed (both inits of a seed train on the same
               volumes), mean ± std; plus the sweep's results.csv and label_efficiency.png, and the wall times.

Everything is written under runs/study/ (and data/study/). Delete runs/study/ to start over: the pretraining stage
is skipped whenever its encoder.safetensors exists, also after a config change.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a clone without installing

from medmae.config import load_config  # noqa: E402
from medmae.sweep import SweepConfig, expand_grid  # noqa: E402  (no Ray import: grid and report helpers only)
from medmae.sweep.report import read_trial_status  # noqa: E402

# Lines of the launchers' output worth showing live; everything goes to runs/study/logs/<stage>.log.
SHOW = re.compile(
    r"medmae\.progress|validation at step|subject \d+|converted|sweep .* trials|ASHA|config error|"
    r"Traceback|Error|error:|exported .*encoder"
)
# Ray Train's placement-group cleaner polls the state API, which fails when several Ray instances run on one machine
# (other users'): harmless, and it would flood the screen.
NOISE = re.compile(r"PlacementGroupCleaner|Failed to query Ray Train Controller")
TAIL_ON_FAILURE = 60


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


def run_stage(name: str, cmd: list[str], log_dir: Path, env: dict[str, str]) -> None:
    """Run ``cmd`` from the repository root, its output into ``log_dir/<name>.log``; show the lines that say how
    far it got. Exits with the command's status (and the log's tail) when it fails."""
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
    if status:
        tail = log_path.read_text().splitlines()[-TAIL_ON_FAILURE:]
        print(
            "\n".join(["", f"stage {name} failed (exit {status}); last lines of {log_path}:", *tail]), file=sys.stderr
        )
        raise SystemExit(status)


def paired_table(rows: list[dict], pool: int) -> tuple[list[str], dict]:
    """Markdown rows: per label budget, scratch and MAE mean ± std and the per-seed MAE - scratch difference.

    Rows of ``results.csv`` with a score pair up by (fraction, lr, seed); a budget's difference uses only the seeds
    where both inits finished.
    """
    by = {}
    for r in rows:
        if r.get("score") not in ("", None):
            by[(float(r["train_fraction"]), r["init"], float(r["lr"]), int(r["seed"]))] = float(r["score"])
    lines, stats = [], {}
    for frac in sorted({k[0] for k in by}):
        seeds = sorted(
            {k[3] for k in by if k[0] == frac and k[1] == "mae"}
            & {k[3] for k in by if k[0] == frac and k[1] == "scratch"}
        )
        lrs = sorted({k[2] for k in by if k[0] == frac})
        for lr in lrs:
            pairs = [
                (by[(frac, "scratch", lr, s)], by[(frac, "mae", lr, s)])
                for s in seeds
                if (frac, "scratch", lr, s) in by and (frac, "mae", lr, s) in by
            ]
            if not pairs:
                continue
            a = np.asarray(pairs)
            d = a[:, 1] - a[:, 0]
            n = len(d)

            def ms(x: np.ndarray) -> str:
                return f"{x.mean():.3f} ± {x.std(ddof=1):.3f}" if len(x) > 1 else f"{x.mean():.3f}"

            wins = int((d > 0).sum())
            budget = round(frac * pool)
            stats[(budget, lr)] = {
                "n": n,
                "delta_mean": float(d.mean()),
                "delta_std": float(d.std(ddof=1)) if n > 1 else 0.0,
                "wins": wins,
            }
            lines.append(
                f"| {budget} | {lr:g} | {ms(a[:, 0])} | {ms(a[:, 1])} | **{d.mean():+.3f} ± "
                f"{d.std(ddof=1) if n > 1 else 0.0:.3f}** | {wins}/{n} | {n} |"
            )
    return lines, stats


def _manifest_complete(folder: Path) -> bool:
    try:
        return bool(json.loads((folder / "manifest.json").read_text()).get("complete"))
    except (OSError, ValueError):
        return False


def _sweep_finished(cfg: SweepConfig, sweep_dir: Path) -> bool:
    """Every trial of the grid done (or stopped by ASHA): the statuses launch/sweep.py does not repeat."""
    return all(
        read_trial_status(sweep_dir / "trials" / spec.name)["status"] in ("done", "stopped")
        for spec in expand_grid(cfg)
    )


def _timing_row(stage: str, t: dict) -> str:
    if t["wall_s"] is None:
        return f"| {stage} | (done before timings were kept) | |"
    return f"| {stage} | {t['wall_s']:.0f} | {t['load']:.1f} |"


def write_summary(out: Path, sweep_dir: Path, pool: int, held_out: int, timings: dict, command: str) -> Path:
    rows = list(csv.DictReader(open(sweep_dir / "results.csv")))
    table, stats = paired_table(rows, pool)
    budgets = " and ".join(str(b) for b in sorted({budget for budget, _ in stats}))
    total = sum(t["wall_s"] or 0.0 for t in timings.values())
    status: dict[str, int] = {}
    for r in rows:
        status[r["status"]] = status.get(r["status"], 0) + 1
    lines = [
        "# Label-efficiency study: MAE self pre-training vs scratch, on a laptop CPU",
        "",
        f"Command: `{command}` — wall time {total / 60:.1f} min on this machine (stages below). "
        f"Trials: {len(rows)} ({', '.join(f'{n} {s}' for s, n in sorted(status.items()))}).",
        "",
        "Task: grey and white matter of each hemisphere (4 classes, FreeSurfer aseg style; Dice, mean of the four) "
        f"on {held_out} held-out subjects, "
        f"fine-tuning UNETR with {budgets} of the {pool} training-pool volumes labelled. The MAE encoder was "
        f"self pre-trained on all {pool} pool volumes without their labels. Both inits of a seed fine-tune on the "
        "same labelled volumes with the same steps and learning rate, so the difference is paired by seed.",
        "",
        "| labelled volumes | lr | scratch Dice | MAE Dice | MAE − scratch (mean ± std over seeds) | MAE better | "
        "seeds |",
        "|---|---|---|---|---|---|---|",
        *table,
        "",
        "Std is the sample standard deviation over seeds (ddof 1). Per trial: `results.csv`; per class and the "
        "figure: `sweep_summary.md`, `label_efficiency.png` (x axis: fraction of the "
        f"{pool} pool volumes).",
        "",
        "## What is real and what is synthetic",
        "",
        "Real: the T1 intensities and the anatomy of the ICBM152 2009a symmetric template (an average of 152 adults, "
        "shipped inside nilearn) and its grey/white-matter probability maps, from which the labels come (> 0.5, the "
        "larger wins; CSF and the rest are background), split at the template's midline (MNI x = 0). Synthetic: "
        "every difference between the 24 'subjects' — each "
        "is that one anatomy under a random affine (±10° per axis, ±10 % scale, ±4 mm), a smooth displacement "
        "field (peak 4–6 mm), a gamma contrast change (0.7–1.4), a ±20 % bias field and 1–3 % noise "
        "(`tools/study_data.py`). So the held-out test measures robustness to those changes on a known anatomy, "
        "not generalisation to new people.",
        "",
        "## Wall time",
        "",
        "| stage | wall (s) | mean 1-min load (2 cores) |",
        "|---|---|---|",
        *[_timing_row(k, v) for k, v in timings.items()],
        f"| total | {total:.0f} | |",
        "",
    ]
    path = out / "summary.md"
    path.write_text("\n".join(lines))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/study", help="folder for the generated volumes and shards")
    ap.add_argument("--pretrain-config", default="configs/pretrain_study.yaml")
    ap.add_argument("--sweep-config", default="configs/sweep_study.yaml")
    ap.add_argument("--publish", metavar="DIR", help="copy summary.md, results.csv, label_efficiency.png to DIR")
    args = ap.parse_args()

    py = sys.executable
    pre = yaml.safe_load((ROOT / args.pretrain_config).read_text())
    sweep = yaml.safe_load((ROOT / args.sweep_config).read_text())
    out = ROOT / pre["run"]["output_dir"]
    encoder = out / pre["run"]["name"] / "encoder.safetensors"
    sweep_dir = ROOT / sweep["storage_path"] / sweep["name"]
    raw, wds = Path(args.data) / "raw", Path(args.data) / "wds"
    finetune = yaml.safe_load((ROOT / sweep["finetune_config"]).read_text())
    sweep_data = sweep.get("overrides", {}).get("data", {}).get("path", finetune["data"]["path"])
    for what, path in (("pretraining", pre["data"]["path"]), ("sweep", sweep_data)):
        if Path(path) != wds:
            raise SystemExit(f"config error: the {what} config reads {path}, but --data puts the shards in {wds}")
    if ROOT / sweep["pretrained"] != encoder:
        raise SystemExit(
            f"config error: {args.sweep_config} pretrained: {sweep['pretrained']} is not the encoder "
            f"{args.pretrain_config} writes ({encoder.relative_to(ROOT)})"
        )

    env = dict(os.environ)
    # Ray workers import this checkout; a private local Ray for each launcher, never another user's cluster.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["RAY_ADDRESS"] = "local"
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    sweep_cfg = load_config(SweepConfig, ROOT / args.sweep_config)
    stages = [  # name, command, "already done?"
        ("data", [py, "tools/study_data.py", str(raw)], lambda: (ROOT / raw / "dataset.json").is_file()),
        (
            "convert",
            [
                py,
                "tools/to_wds.py",
                str(raw / "dataset.json"),
                str(wds),
                "--format",
                "wds",
                "--preset",
                "mri",
                "--crop-foreground",
                "--quiet",
            ],
            lambda: _manifest_complete(ROOT / wds),
        ),
        ("pretrain", [py, "launch/pretrain.py", "--config", args.pretrain_config], encoder.is_file),
        (
            "sweep",
            [py, "launch/sweep.py", "--config", args.sweep_config],
            lambda: _sweep_finished(sweep_cfg, sweep_dir),
        ),
    ]
    timings_path = out / "timings.json"
    # Per stage, the run that did the work: a later run that finds a stage done keeps that stage's record.
    timings: dict[str, dict] = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    sampler = LoadSampler()
    sampler.start()
    t_start = time.perf_counter()
    for i, (name, cmd, done) in enumerate(stages, 1):
        if done():
            print(f"[{i}/{len(stages)}] {name}: already done", flush=True)
            timings.setdefault(name, {"wall_s": None, "load": None})
            continue
        print(f"[{i}/{len(stages)}] {name} (elapsed {time.perf_counter() - t_start:.0f} s)", flush=True)
        t0 = time.perf_counter()
        sampler.take()
        run_stage(name, cmd, out / "logs", env)
        load = sampler.take()
        timings[name] = {
            "wall_s": round(time.perf_counter() - t0, 1),
            "load": round(float(np.mean(load)), 2) if load else os.getloadavg()[0],
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        out.mkdir(parents=True, exist_ok=True)
        timings_path.write_text(json.dumps(timings, indent=2))
    sampler.stopped.set()
    pool = json.loads((ROOT / wds / "manifest.json").read_text())["counts"]
    summary = write_summary(
        out, sweep_dir, pool["train"], pool["validation"], timings, "make study (= python tools/study.py)"
    )
    shutil.copy2(sweep_dir / "summary.md", out / "sweep_summary.md")
    print(f"\n{summary.read_text()}\nreport: {summary}\nsweep: {sweep_dir}")
    if args.publish:
        dest = ROOT / args.publish
        dest.mkdir(parents=True, exist_ok=True)
        for src in (
            summary,
            out / "sweep_summary.md",
            sweep_dir / "results.csv",
            sweep_dir / "label_efficiency.png",
            timings_path,
        ):
            shutil.copy2(src, dest / src.name)
        print(f"published to {dest}")


if __name__ == "__main__":
    main()
