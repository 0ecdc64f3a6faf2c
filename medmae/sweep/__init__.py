"""The label-efficiency sweep: Ray Tune over fine-tuning trials (init × train fraction × lr × seed) and its report.

- ``config``: :class:`SweepConfig` (plain dataclasses, no heavy imports).
- ``grid``: :func:`expand_grid` -> :class:`TrialSpec` (deterministic trial names), :func:`trial_job` -> ``JobConfig``.
- ``tune``: :func:`run_sweep` (the Tune driver; resumes a sweep of the same name) and :func:`run_trial`.
- ``report``: :func:`write_report` -> ``results.csv``, ``summary.md``, ``label_efficiency.png``.

Names are re-exported lazily, so ``import medmae.sweep`` does not import Ray.
"""

from __future__ import annotations

import importlib
from typing import Any

from medmae.sweep.config import AshaConfig, GridConfig, SweepConfig, TrialResources

_LAZY = {
    "TrialSpec": "grid",
    "expand_grid": "grid",
    "sweep_dir": "grid",
    "trial_job": "grid",
    "write_report": "report",
    "run_sweep": "tune",
    "run_trial": "tune",
}

__all__ = ["AshaConfig", "GridConfig", "SweepConfig", "TrialResources", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"medmae.sweep.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'medmae.sweep' has no attribute {name!r}")
