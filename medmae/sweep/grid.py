"""The trial grid: init × train_fraction × lr × seed, each trial a fully resolved fine-tuning ``JobConfig``."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from medmae.config import apply_overrides, from_dict, to_dict
from medmae.io import resolve_local
from medmae.sweep.config import SweepConfig

if TYPE_CHECKING:  # importing it registers every model (timm, MONAI): seconds the Tune trial actors need not spend
    from medmae.training.config import JobConfig

__all__ = ["TrialSpec", "expand_grid", "format_lr", "sweep_dir", "trial_job"]


def format_lr(lr: float) -> str:
    """Short, exact lr text for names: 1e-3, 1.5e-4, 3e-2."""
    mantissa, exponent = f"{lr:.6e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


@dataclass(frozen=True)
class TrialSpec:
    init: str
    train_fraction: float
    lr: float
    seed: int

    @property
    def name(self) -> str:
        """Deterministic run name, e.g. ``mae-f0.25-lr1e-3-s0``: the trial's run directory and Ray Train run."""
        return f"{self.init}-f{self.train_fraction:g}-lr{format_lr(self.lr)}-s{self.seed}"

    def params(self) -> dict[str, Any]:
        return {"init": self.init, "train_fraction": self.train_fraction, "lr": self.lr, "seed": self.seed}


def expand_grid(cfg: SweepConfig) -> list[TrialSpec]:
    """Every combination, ordered so that early trials already cover both inits at every fraction."""
    g = cfg.grid
    return [
        TrialSpec(init, frac, lr, seed)
        for seed, frac, lr, init in itertools.product(g.seeds, g.train_fraction, g.lr, g.init)
    ]


def sweep_dir(cfg: SweepConfig) -> Path:
    return Path(cfg.storage_path).expanduser().resolve() / cfg.name


def trial_job(cfg: SweepConfig, spec: TrialSpec) -> JobConfig:
    """Fine-tuning YAML <- sweep overrides <- the trial's parameters, output and resources; paths made absolute."""
    from medmae.training.config import JobConfig

    path = Path(cfg.finetune_config)
    if not path.is_file():
        raise ValueError(f"finetune_config: {path} does not exist")
    base = yaml.safe_load(path.read_text()) or {}
    root = sweep_dir(cfg)
    res = cfg.resources
    storage = str(root / "checkpoints")
    if cfg.checkpoint_storage:
        storage = f"{resolve_local(cfg.checkpoint_storage).rstrip('/')}/{cfg.name}"
    trial: dict[str, dict[str, Any]] = {
        "run": {"name": spec.name, "output_dir": str(root / "trials"), "seed": spec.seed},
        "data": {"train_fraction": spec.train_fraction, "subset_seed": spec.seed},
        "optim": {cfg.grid.lr_key: spec.lr},
        "finetune": {"pretrained": resolve_local(cfg.pretrained) if spec.init == "mae" else ""},
        "dist": {
            "num_workers": res.workers,
            "min_workers": res.min_workers,
            "cpus_per_worker": res.cpus_per_worker,
            "max_failures": res.max_failures,
            "storage_path": str(storage),
        },
    }
    if cfg.grid.lr_key == "base_lr":
        trial["optim"]["lr"] = None  # an absolute lr in the fine-tuning config would silently win over base_lr
    if cfg.selection == "final":
        trial["run"]["val_every"] = 0  # one validation, of the final model: nothing to pick among
    data = apply_overrides(apply_overrides(base, cfg.overrides), trial)
    try:
        job = from_dict(JobConfig, data)
    except ValueError as e:
        raise ValueError(f"trial {spec.name} ({path} + overrides): {e}") from None
    from medmae.tasks import task_class

    if not task_class(job.task).with_labels:  # the sweep's grid is over labelled fractions: unlabelled tasks have none
        raise ValueError(
            f"finetune_config: {path} has task '{job.task}'; a sweep fine-tunes on labels (segment, classify)"
        )
    cfg.check_trial(job, spec.name)
    job.data.path = resolve_local(job.data.path)
    return job


def trial_jobs(cfg: SweepConfig) -> dict[str, dict[str, Any]]:
    """Trial name -> resolved config as plain data (what ``train_worker`` receives), validated up front."""
    return {spec.name: to_dict(trial_job(cfg, spec)) for spec in expand_grid(cfg)}
