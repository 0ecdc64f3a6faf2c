"""Preemption: a SIGTERM (spot and preemptible nodes get one some seconds before they go, as do jobs a scheduler
stops) or Ray's drain of a node, turned into a checkpoint before the work since the last one is lost.

The signal only sets a flag. Ranks agree on it at the next log step, inside the one metrics read that step already
does (``StepMetrics.read``), so every rank saves at the same step with no extra host sync; the grace period needed
is therefore up to ``run.log_every`` steps plus one checkpoint write (docs/faults.md has the figures). Then the run
stops with :class:`Preempted`, and re-running it (or Ray's restart) resumes from that checkpoint. Under Ray, a
drain of one of the run's nodes (``ray.train.get_preemption_info``) is checked at the same steps; the run saves a
just-in-time checkpoint and trains on, as Ray advises: when the node goes, Ray restarts the group from it.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

__all__ = ["Preempted", "SigtermFlag"]

logger = logging.getLogger(__name__)


class Preempted(RuntimeError):
    """The run saved a checkpoint on a SIGTERM and stopped; re-running resumes from it."""

    exit_code = 128 + signal.SIGTERM  # what a process killed by SIGTERM reports: schedulers requeue it


class SigtermFlag:
    """Set by SIGTERM once :meth:`install` ran (in the main thread only: Python delivers signals there; a Ray worker
    runs the training function in another thread and gets Ray's drain notice instead)."""

    def __init__(self) -> None:
        self.raised = False
        self._previous: Any = None

    def install(self) -> bool:
        if threading.current_thread() is not threading.main_thread():
            return False
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return True

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.raised:
            logger.warning("SIGTERM: finishing the step, then saving a checkpoint at the next log step")
        self.raised = True

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
