"""``SweepConfig``: the fine-tuning config every trial starts from, the grid, resources, early stopping, output."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from medmae.config import Range, check_ranges
from medmae.io import is_url

__all__ = ["AshaConfig", "GridConfig", "SweepConfig", "TrialResources"]

INITS = ("scratch", "mae")


@dataclass
class GridConfig:
    init: list[str] = field(default_factory=lambda: list(INITS))
    """initialisations: scratch (random) and/or mae (the pretrained encoder)"""
    train_fraction: Annotated[list[float], Range(gt=0, le=1)] = field(default_factory=lambda: [0.1, 0.25, 0.5, 1.0])
    """fractions of the training volumes (data.train_fraction; the subset is drawn with data.subset_seed = seed)"""
    lr: Annotated[list[float], Range(gt=0)] = field(default_factory=lambda: [1e-3])
    """learning rates, written to optim.<lr_key>"""
    lr_key: Literal["base_lr", "lr"] = "base_lr"
    """base_lr (scaled by global batch / 256) or lr (absolute peak)"""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """run.seed and data.subset_seed of each repeat"""

    def __post_init__(self) -> None:
        for name in ("init", "train_fraction", "lr", "seeds"):
            values = getattr(self, name)
            if not values:
                raise ValueError(f"{name}: must list at least one value")
            if len(set(values)) != len(values):
                raise ValueError(f"{name}: has duplicates: {values}")
        bad = [i for i in self.init if i not in INITS]
        if bad:
            raise ValueError(f"init: {bad[0]!r} is not one of {list(INITS)}")
        check_ranges(self)


@dataclass
class TrialResources:
    workers: Annotated[int, Range(ge=1)] = 1
    """Ray Train workers per trial (dist.num_workers)"""
    min_workers: int | None = None
    """set -> elastic trials using any worker count in [min_workers, workers] (dist.min_workers)"""
    cpus_per_worker: Annotated[float, Range(gt=0)] = 1.0
    """CPUs reserved per worker (dist.cpus_per_worker)"""
    driver_cpus: Annotated[float, Range(ge=0)] = 0.0
    """CPUs reserved for the trial's driver function (it only waits on its TorchTrainer; the workers get theirs)"""
    driver_memory_mb: Annotated[int, Range(ge=1)] = 256
    """memory reserved for the trial's driver function (Tune needs a non-empty request per trial)"""
    driver_on_head: bool = True
    """run trial drivers (and so their Ray Train controllers) on the head node: a node that dies takes the trial
    drivers on it along, failing their trials, while worker nodes come and go without stopping a trial"""
    max_failures: Annotated[int, Range(ge=-1)] = 1
    """worker-group failures a trial recovers from by restarting at its checkpoint (dist.max_failures; -1 = any)"""

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.min_workers is not None and not 1 <= self.min_workers <= self.workers:
            raise ValueError(f"min_workers: must be in [1, workers={self.workers}], got {self.min_workers}")


@dataclass
class AshaConfig:
    enabled: bool = False
    """stop trials whose val_score falls behind at the rungs (ASHA, mode max); needs run.val_every in the trials"""
    grace_period: Annotated[int, Range(ge=1)] = 100
    """steps every trial runs before it can be stopped"""
    reduction_factor: Annotated[float, Range(gt=1)] = 2.0
    """keep the top 1/reduction_factor of trials at each rung"""

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass
class SweepConfig:
    name: str = "sweep"
    """sweep name: the sweep directory under storage_path; re-running the same name resumes it"""
    storage_path: str = "runs/sweeps"
    """parent of the sweep directory (a shared filesystem path on a multi-node cluster)"""
    checkpoint_storage: str = ""
    """where trials' Ray Train checkpoints go: "" = <sweep>/checkpoints, or a folder/URL (s3://...) + /<name>"""
    finetune_config: str = "configs/finetune_debug.yaml"
    """the fine-tuning YAML every trial starts from"""
    overrides: dict[str, Any] = field(default_factory=dict)
    """fine-tuning config values applied to every trial, nested like the fine-tuning YAML (data: {path: ...})"""
    pretrained: str = ""
    """encoder.safetensors used by the mae trials (finetune.pretrained): a path or a URL (s3://...)"""
    grid: GridConfig = field(default_factory=GridConfig)
    resources: TrialResources = field(default_factory=TrialResources)
    max_concurrent_trials: Annotated[int, Range(ge=-1)] = 0
    """0 = as many as the cluster's free CPUs/GPUs hold at start; -1 = no limit (extra trials wait for nodes)"""
    asha: AshaConfig = field(default_factory=AshaConfig)
    selection: Literal["final", "checkpoint"] = "final"
    """what a trial reports, never picked on the volumes it is scored on. final: its last model (the trials validate
    only at the end: run.val_every is set to 0). checkpoint: the checkpoint with the best score on the selection
    split (data.select_count / select_fraction: training volumes carved out, patient-wise where recorded), scored
    once on the validation split. Either way the lr of each init x fraction is chosen by the mean selection-split
    score, so a grid with several lrs needs a selection split"""

    def __post_init__(self) -> None:
        check_ranges(self)
        if not self.name or "/" in self.name:
            raise ValueError(f"name: must be a non-empty name without '/', got {self.name!r}")
        if is_url(self.storage_path):
            raise ValueError(
                "storage_path: must be a filesystem path (shared on a cluster): trials write their "
                "results.json there and the report reads them"
            )
        if "mae" in self.grid.init and not self.pretrained:
            raise ValueError("pretrained: the grid has init 'mae', so an encoder.safetensors path is required")
        if self.asha.enabled and self.selection != "checkpoint":
            raise ValueError(
                "asha.enabled: ASHA stops trials on intermediate validation scores; with selection: final the trials "
                "validate only at the end (use selection: checkpoint and a data.select_count split)"
            )

    def check_trial(self, job: Any, name: str) -> None:
        """``ValueError`` naming the key when a trial's config would let the sweep pick on what it reports."""
        selects = job.data.selects
        if self.selection == "checkpoint":
            if not selects:
                raise ValueError(
                    f"trial {name}: selection: checkpoint picks each trial's checkpoint on a selection split carved "
                    "from the training volumes; set overrides.data.select_count (or select_fraction)"
                )
            if not job.run.val_every:
                raise ValueError(f"trial {name}: selection: checkpoint needs run.val_every > 0 (checkpoints to pick)")
        if len(self.grid.lr) > 1 and not selects:
            raise ValueError(
                f"grid.lr: {len(self.grid.lr)} learning rates, but no selection split to choose among them (the "
                "validation volumes are the reported ones); set overrides.data.select_count (or select_fraction)"
            )
