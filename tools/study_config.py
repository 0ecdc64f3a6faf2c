"""``StudyConfig``: the pre-registered label-efficiency study (docs/study/PROTOCOL.md) as one typed config, read from
``configs/study.yaml`` by ``tools/study.py`` and ``tools/study_pair.py``. Plain dataclasses: no torch import."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from medmae.config import Range, check_ranges  # noqa: E402

ARMS = ("scratch", "mae")


@dataclass
class ArmConfig:
    """One arm's own fine-tuning settings (the rest is the shared fine-tuning config)."""

    lr: Annotated[float, Range(gt=0)] = 1e-3
    """absolute peak lr (optim.lr)"""
    layer_decay: Annotated[float, Range(gt=0, le=1)] = 1.0
    """optim.layer_decay; 1.0 = none"""

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass
class PilotConfig:
    """The pilot that chooses each arm's lr and layer decay on the tuning subjects (PROTOCOL.md)."""

    subjects: list[int] = field(default_factory=lambda: [12, 13, 14, 15])
    """pool subjects labelled in the pilot pairs: none of them labels a confirmatory pair"""
    seed_offset: Annotated[int, Range(ge=0)] = 1000
    """pilot pair seed = offset + subject, so no pilot run repeats a confirmatory one"""
    lr: Annotated[list[float], Range(gt=0)] = field(default_factory=lambda: [1e-3, 3e-3])
    layer_decay: Annotated[list[float], Range(gt=0, le=1)] = field(default_factory=lambda: [1.0, 0.75])

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass
class ProbeConfig:
    """The secondary endpoint: a linear probe on the frozen encoder's tokens (PROTOCOL.md)."""

    stride: Annotated[int, Range(ge=1)] = 16
    """voxels between the windows the tokens are taken from"""
    l2: Annotated[float, Range(ge=0)] = 1e-4
    """L2 penalty on the probe's weights"""
    iterations: Annotated[int, Range(ge=1)] = 100
    """full-batch L-BFGS iterations"""

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass
class StudyConfig:
    pretrain_config: str = "configs/pretrain_study.yaml"
    """MAE self pre-training on the pool (its data.path and output are set by tools/study.py)"""
    finetune_config: str = "configs/finetune_study.yaml"
    """the fine-tuning both arms share"""
    pairs: list[int] = field(default_factory=lambda: list(range(12)))
    """confirmatory pairs: pair k labels pool subject k and uses run.seed k"""
    scratch: ArmConfig = field(default_factory=ArmConfig)
    mae: ArmConfig = field(default_factory=ArmConfig)
    pilot: PilotConfig = field(default_factory=PilotConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    parallel: Annotated[int, Range(ge=1)] = 2
    """pair processes at once (one thread each)"""
    overrides: dict[str, Any] = field(default_factory=dict)
    """fine-tuning config values for every run, nested like the fine-tuning YAML (a smoke run shortens it)"""

    def __post_init__(self) -> None:
        check_ranges(self)
        for name in ("pairs", "pilot.subjects"):
            values = self.pairs if name == "pairs" else self.pilot.subjects
            if len(set(values)) != len(values) or not all(0 <= v < 16 for v in values):
                raise ValueError(f"{name}: distinct pool subjects 0-15, got {values}")
        both = set(self.pairs) & set(self.pilot.subjects)
        if both:
            raise ValueError(f"pilot.subjects: {sorted(both)} also label confirmatory pairs")

    def arm(self, name: str) -> ArmConfig:
        return self.scratch if name == "scratch" else self.mae
