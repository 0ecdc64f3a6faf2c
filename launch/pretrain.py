"""MAE self pre-training on Ray Train workers running DeepSpeed.

    ray job submit --working-dir . -- python launch/pretrain.py --config configs/pretrain_debug.yaml [key=value ...]
    python launch/pretrain.py --config configs/pretrain_debug.yaml        # no cluster: starts a local Ray

Re-running with the same run.name resumes from the last checkpoint. The encoder is exported at the end as
<run.output_dir>/<run.name>/encoder.safetensors, ready for launch/finetune.py --pretrained; the last lines printed
are the commands that fine-tune from it and apply the result. Ray's routine lines stay off the console (its log
files keep everything: <ray session>/logs/, /tmp/ray/session_latest on the head).

In a `ray job submit --working-dir` job, relative paths resolve in Ray's copy of the working directory, which holds
neither what .gitignore hides nor more than 100 MiB: give data and outputs as absolute paths or URLs there.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `ray job submit --working-dir .` runs from a copy

from medmae.config import load_config, to_dict  # noqa: E402
from medmae.distributed import run_ray  # noqa: E402
from medmae.distributed.console import quiet_ray_console  # noqa: E402
from medmae.io import is_url  # noqa: E402
from medmae.tasks import task_class  # noqa: E402
from medmae.training.cli import absolute_paths, load_job, parser  # noqa: E402
from medmae.training.config import JobConfig  # noqa: E402
from medmae.training.logs import setup_logging  # noqa: E402
from medmae.training.trainer import run_dir_of, train_worker  # noqa: E402

log = logging.getLogger("medmae.launch")


def in_job_working_dir() -> bool:
    """Whether this is the driver of a `ray job submit --working-dir` job, running in Ray's copy of that folder
    (Ray's job supervisor hands the driver its runtime environment in RAY_JOB_CONFIG_JSON_ENV_VAR)."""
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    return bool((job.get("runtime_env") or {}).get("working_dir"))


def check_job_paths(cfg: JobConfig) -> None:
    """A job's relative paths resolve in its uploaded copy: say so for a missing data path and for outputs."""
    if not in_job_working_dir():
        return
    paths = {
        "data.path": cfg.data.path,
        "run.output_dir": cfg.run.output_dir,
        "dist.storage_path": cfg.dist.storage_path,
    }
    for key, path in paths.items():
        if not path or is_url(path) or Path(path).expanduser().is_absolute():
            continue
        if key != "data.path":
            log.warning(
                "%s: %r is relative, so this Ray job writes into its uploaded copy of the working "
                "directory (%s), which Ray deletes when it cleans up; give an absolute path or a URL to keep "
                "the results",
                key,
                path,
                Path.cwd() / path,
            )
        elif not Path(path).exists():
            raise SystemExit(
                f"config error: data.path: {path!r} is relative, so this Ray job looks for it in its uploaded copy "
                f"of the working directory ({Path.cwd()}), and it is not there: `ray job submit --working-dir` "
                "uploads neither what .gitignore hides nor more than 100 MiB. Give data.path as an absolute path "
                "that the cluster's machines can read (with the Ray head on this machine: "
                f"data.path=$PWD/{path}) or as a URL (s3://...)."
            )


def _tool(name: str) -> str:
    """How to call ``name`` (python, tensorboard) from the environment running this script, as a user types it."""
    exe = Path(sys.executable).parent / name
    if not exe.is_file() or shutil.which(name) == str(exe):
        return name
    return str(exe.relative_to(Path.cwd())) if exe.is_relative_to(Path.cwd()) else str(exe)  # .venv/bin/python


def _finetune_target(config_path: str | None) -> tuple[str, str, str]:
    """(config, run directory, task) of the fine-tuning that matches ``configs/pretrain_X.yaml``: finetune_X.yaml."""
    name = Path(config_path or "").name
    path = Path(config_path or "").with_name(name.replace("pretrain", "finetune")) if "pretrain" in name else None
    if path is None or not path.is_file():
        return "FINETUNE.yaml", "FINETUNE_RUN_DIR", "segment"
    ft = load_config(JobConfig, path)
    return str(path), str(Path(ft.run.output_dir) / ft.run.name), ft.task  # as written: relative to the user's cwd


def _sample_image(cfg: JobConfig) -> str:
    """A real volume of the dataset to try prediction on: its validation volume, else the first, when local."""
    if not is_url(cfg.data.path):
        from medmae.data import read_manifest

        try:
            samples = sorted(read_manifest(cfg.data.path)["samples"], key=lambda s: s.get("split") == "train")
        except ValueError:  # e.g. storage only the workers mount
            samples = []
        for s in samples:
            image = (s.get("source") or {}).get("image") or [""]
            if Path(image[0]).is_file():
                return image[0]
    return "IMAGE.nii.gz"


def next_steps(cfg: JobConfig, config_path: str | None, metrics: dict | None) -> str:
    """The closing lines: what was written, then the TensorBoard, fine-tuning and prediction commands for it."""
    run_dir, metrics = run_dir_of(cfg), metrics or {}
    encoder = run_dir / "encoder.safetensors"
    ft_config, ft_run, task = _finetune_target(config_path)
    image = _sample_image(cfg)
    table = task_class(task).writes_table
    output = f"{ft_run}/predictions.csv" if table else f"{ft_run}/predictions/{Path(image).name}"
    python = _tool("python")
    return "\n".join(
        [
            f"pretraining done at step {metrics['step']}, loss {metrics['loss']:.4g}"
            if "loss" in metrics
            else "pretraining done",
            f"run directory: {run_dir}",
            f"encoder: {encoder}",
            "next:",
            f"  curves     {_tool('tensorboard')} --logdir {run_dir / 'tensorboard'}",
            f"  fine-tune  {python} launch/finetune.py --config {ft_config} --pretrained {encoder}",
            f"  predict    {python} tools/predict.py --checkpoint {ft_run} {image} {output}",
        ]
    )


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, JobConfig]:
    """The command line (flags and key=value overrides in any order) -> (arguments, job config)."""
    args = parser(__doc__).parse_args(argv)
    cfg = load_job(args)
    if cfg.task != "pretrain":  # this launcher is MAE pretraining's (it exports and names the encoder)
        raise SystemExit(f"config error: task: launch/pretrain.py runs task 'pretrain', the config says {cfg.task!r}")
    return args, cfg


def main() -> None:
    args, cfg = parse()
    setup_logging(rank=0)
    check_job_paths(cfg)
    cfg = absolute_paths(cfg)
    quiet_ray_console()
    result = run_ray(
        train_worker, {"config": to_dict(cfg)}, cfg.dist, run_name=cfg.run.name, keep_checkpoints=cfg.run.keep_last
    )
    print(next_steps(cfg, args.config, result.metrics), flush=True)


if __name__ == "__main__":
    main()
