"""Faults injected on purpose, for the tests and ``bench/chaos.py``; never a user setting.

They are switched on by environment variables, which the launchers forward to every Ray worker (``MEDMAE_*``), so a
test can reach the workers of a run it starts through Ray. The trainer calls :func:`before_step` once per step.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

logger = logging.getLogger(__name__)

FAIL_AT_STEP_ENV = "MEDMAE_TEST_FAIL_AT_STEP"
"""The last rank kills its own process once at this step (a marker in the run directory makes it once per run)."""


def before_step(step: int, rank: int, world_size: int, run_dir: Path) -> None:
    fail_at = int(os.environ.get(FAIL_AT_STEP_ENV, "-1"))
    if step != fail_at or rank != world_size - 1:
        return
    marker = run_dir / ".fail_injected"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(step))
    logger.warning("%s: killing this worker at step %d", FAIL_AT_STEP_ENV, step)
    # Ray's controller collects reports by polling; a worker that dies right after reporting can take its latest
    # checkpoint with it. Waiting a few poll intervals makes the injected failure deterministic.
    time.sleep(3.0)
    os._exit(13)
