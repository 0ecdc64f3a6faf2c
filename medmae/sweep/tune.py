"""The sweep driver: Ray Tune over fine-tuning trials, each trial a driver function that fits its own TorchTrainer.

Ray 2.60 pattern (Train v2): the Tune trial is a light function (``driver_cpus``, default 0) that builds a
``TorchTrainer`` through :func:`medmae.distributed.run_ray`; the Train controller and workers are separate actors
with their own placement group, and a ``TuneReportCallback`` forwards the workers' validation reports to Tune, where
ASHA can stop a trial.

Fault tolerance, from the inside out:
- a worker that dies restarts the trial's worker group from its last checkpoint (``dist.max_failures``);
- a killed driver: each trial writes ``trial.json`` into its run directory when its TorchTrainer returns. A re-run
  with the same sweep name skips trials whose ``trial.json`` says done (or stopped by ASHA) and starts a fresh Tuner
  over the rest; an interrupted trial keeps its Ray Train run name and storage path, so it resumes from its last
  checkpoint instead of starting over.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from medmae.config import from_dict, save_config
from medmae.distributed import DistributedConfig, ensure_ray, forwarded_env, run_ray
from medmae.io import write_json_atomic
from medmae.sweep.config import SweepConfig
from medmae.sweep.grid import expand_grid, sweep_dir, trial_jobs
from medmae.sweep.report import TRIAL_FILE, read_trial_status, write_report
from medmae.sweep.worker import train_worker

__all__ = ["EarlyStopping", "ReportOnTrialEnd", "ValidationToTune", "run_sweep", "run_trial"]

logger = logging.getLogger(__name__)

FINISHED = ("done", "stopped")  # statuses a re-run does not repeat
START_LOG = "trial_starts.jsonl"  # one line per time the sweep started this trial's driver function
HEAD_RESOURCE = "node:__internal_head__"  # a resource only the head node has


class ValidationToTune(TuneReportCallback):
    """Forwards the workers' validation reports (those carrying ``val_score``) to Tune.

    Checkpoint-only reports have no validation metric; ASHA would reject them.
    """

    def after_report(self, run_context, metrics, checkpoint) -> None:  # noqa: ANN001 - Ray's signature
        if metrics and "val_score" in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


def run_trial(config: dict[str, Any], jobs: dict[str, dict[str, Any]], env: dict[str, str] | None = None) -> None:
    """Tune function trainable: fine-tune trial ``config["trial"]`` on its own Ray Train workers.

    ``env``: the sweep driver's forwarded variables (NCCL, EFA, medmae's own): the trial actor does not inherit the
    driver's shell, so they travel with the trial and on to its workers."""
    name = config["trial"]
    job = jobs[name]
    run_dir = Path(job["run"]["output_dir"]) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / START_LOG, "a") as f:
        f.write(json.dumps({"time": time.time(), "pid": os.getpid()}) + "\n")
    t0 = time.perf_counter()
    status: dict[str, Any] = {"trial": name, "status": "done"}
    try:
        run_ray(
            train_worker,
            {"config": job},
            from_dict(DistributedConfig, job["dist"]),
            run_name=name,
            keep_checkpoints=job["run"]["keep_last"],
            callbacks=[ValidationToTune()],
            env=env,
        )
    except Exception as e:
        status = {"trial": name, "status": "failed", "error": f"{type(e).__name__}: {e}"[:4000]}
        raise
    finally:
        status["wall_time_s"] = round(time.perf_counter() - t0, 2)
        write_json_atomic(run_dir / TRIAL_FILE, status)


def _trial_name(trial: Any) -> str:
    return trial.config["trial"]


def _concurrency(cfg: SweepConfig, jobs: dict[str, dict[str, Any]]) -> int | None:
    """Trials the cluster's resources hold right now (0 in the config), or the configured limit (-1: none)."""
    if cfg.max_concurrent_trials == -1:
        return None
    if cfg.max_concurrent_trials > 0:
        return cfg.max_concurrent_trials
    import ray

    available = ray.cluster_resources()
    res = cfg.resources
    fits = math.floor(available.get("CPU", 0) / (res.workers * res.cpus_per_worker + res.driver_cpus) + 1e-9)
    use_gpu = next(iter(jobs.values()))["dist"]["use_gpu"]
    if available.get("GPU", 0) > 0 and use_gpu != "no":
        fits = min(fits, int(available["GPU"]) // res.workers)
    return max(1, fits)


class EarlyStopping(ASHAScheduler):
    """ASHA on ``val_score`` over training steps that records each stop in the trial's ``trial.json``.

    Tune ends a stopped trial by killing its actor, so the trial cannot write its own status; a trial Tune ends for
    another reason (driver interrupted) keeps none and is resumed by the next run. The final report is never cut.
    """

    def __init__(self, cfg: SweepConfig, max_steps: int, trials_dir: Path) -> None:
        super().__init__(
            time_attr="step",
            metric="val_score",
            mode="max",
            max_t=max_steps,
            grace_period=min(cfg.asha.grace_period, max_steps),
            reduction_factor=cfg.asha.reduction_factor,
            stop_last_trials=False,
        )
        self.trials_dir = trials_dir

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:  # noqa: ANN001 - Tune's signature
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision != self.STOP or result.get("step", 0) >= self._max_t:
            return self.CONTINUE if decision == self.STOP else decision
        name = trial.config["trial"]
        logger.info("ASHA stops trial %s at step %s (val_score %.4f)", name, result["step"], result["val_score"])
        write_json_atomic(
            self.trials_dir / name / TRIAL_FILE, {"trial": name, "status": "stopped", "step": result["step"]}
        )
        return decision


class ReportOnTrialEnd(Callback):
    """Regenerates the report whenever a trial ends, so it is current while the sweep runs."""

    def __init__(self, root: Path, specs: list, title: str, selection: str) -> None:
        self.root, self.specs, self.title, self.selection = root, specs, title, selection

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:  # noqa: ANN001 - Tune's signature
        write_report(self.root, self.specs, self.title, self.selection)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:  # noqa: ANN001 - Tune's signature
        write_report(self.root, self.specs, self.title, self.selection)


def run_sweep(cfg: SweepConfig, ray_init_kwargs: dict[str, Any] | None = None) -> dict[str, Path]:
    """Run (or resume) the sweep; returns the report paths (``csv``, ``summary``, ``plot``) in the sweep directory."""
    specs = expand_grid(cfg)
    jobs = trial_jobs(cfg)  # every trial's config is validated before anything starts
    root = sweep_dir(cfg)
    trials_dir = root / "trials"
    save_config(cfg, root / "sweep.yaml")
    finished = [s.name for s in specs if read_trial_status(trials_dir / s.name)["status"] in FINISHED]
    todo = [s.name for s in specs if s.name not in finished]
    logger.info("sweep %s: %d trials, %d already finished, %d to run", root, len(specs), len(finished), len(todo))
    if todo:
        ensure_ray(**(ray_init_kwargs or {}))
        concurrency = _concurrency(cfg, jobs)
        logger.info(
            "running up to %s trials at once, each %d worker(s) × %g CPU",
            concurrency or "all",
            cfg.resources.workers,
            cfg.resources.cpus_per_worker,
        )
        max_steps = max(j["train"]["max_steps"] for j in jobs.values())
        scheduler = EarlyStopping(cfg, max_steps, trials_dir) if cfg.asha.enabled else None
        driver = {"cpu": cfg.resources.driver_cpus, "memory": cfg.resources.driver_memory_mb * 2**20}
        if cfg.resources.driver_on_head:
            driver[HEAD_RESOURCE] = 0.001  # Ray gives the head node 1 of this; 1000 trial drivers fit
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, jobs={n: jobs[n] for n in todo}, env=forwarded_env()), driver
        )
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search(todo)},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=concurrency,
                scheduler=scheduler,
                trial_name_creator=_trial_name,
                trial_dirname_creator=_trial_name,
            ),
            run_config=tune.RunConfig(
                name="tune",
                storage_path=str(root),
                verbose=1,
                callbacks=[ReportOnTrialEnd(root, specs, cfg.name, cfg.selection)],
            ),
        )
        grid = tuner.fit()
        for result in grid:  # an actor that died with the trial wrote no status; ASHA's stops have theirs
            run_dir = trials_dir / result.config["trial"]
            if result.error is not None and not (run_dir / TRIAL_FILE).is_file():
                write_json_atomic(
                    run_dir / TRIAL_FILE, {"trial": run_dir.name, "status": "failed", "error": str(result.error)[:4000]}
                )
        errors = sum(r.error is not None for r in grid)
        if errors:
            logger.warning("%d trial(s) failed; re-running the sweep retries them (see %s)", errors, trials_dir)
    return write_report(root, specs, cfg.name, cfg.selection)
