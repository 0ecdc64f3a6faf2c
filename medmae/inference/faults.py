"""Faults injected on purpose into prediction workers, for the tests; never a user setting.

Switched on by environment variables, which ``medmae.distributed.map_items`` forwards to every Ray worker
(``MEDMAE_*``), as ``medmae/training/faults.py`` does for training.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

logger = logging.getLogger(__name__)

TRACE_ENV = "MEDMAE_TEST_PREDICT_TRACE"
"""A folder: every output a worker writes appends ``<output name> <pid>`` to ``written.log`` there."""
KILL_ENV = "MEDMAE_TEST_PREDICT_KILL"
"""``<output name>:before`` or ``:after`` (comma-separated): the worker SIGKILLs itself once, just before writing that
output or just after (a marker in the trace folder makes it once)."""


def _kill_once(name: str, when: str) -> None:
    wanted = {tuple(x.rsplit(":", 1)) for x in os.environ.get(KILL_ENV, "").split(",") if ":" in x}
    trace = os.environ.get(TRACE_ENV)
    if (name, when) not in wanted or not trace:
        return
    marker = Path(trace) / f".killed-{name}-{when}"
    if marker.exists():
        return
    marker.write_text(str(os.getpid()))
    logger.warning("%s: killing this worker %s writing %s", KILL_ENV, when, name)
    os.kill(os.getpid(), signal.SIGKILL)


def before_write(name: str) -> None:
    _kill_once(name, "before")


def after_write(name: str) -> None:
    trace = os.environ.get(TRACE_ENV)
    if trace:
        with open(Path(trace) / "written.log", "a") as f:  # one short O_APPEND write: whole lines across processes
            f.write(f"{name} {os.getpid()}\n")
    _kill_once(name, "after")
