"""What a launcher's console shows of Ray: our workers' lines and every warning or error, not the lines that Ray
Train, Ray Core and DeepSpeed print on every healthy run.

Ray forwards each line its worker processes print to the driver (``log_to_driver``) and keeps all of them in its
log files either way: ``<session>/logs/worker-*.out|.err`` per process and Ray Train's own under ``logs/train/``,
where ``<session>`` is ``/tmp/ray/session_latest`` on the machine running the Ray head (a local Ray's is this
machine). Only what the driver prints is filtered here, and only lines known to be routine: an unknown line shows.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from medmae.distributed.ray_launch import ensure_ray

__all__ = ["is_routine", "quiet_ray_console"]

# (actor name or None for any process, pattern) of the lines every healthy run prints (Ray 2.60, DeepSpeed 0.19).
ROUTINE: list[tuple[str | None, re.Pattern[str]]] = [
    # Ray Train's placement-group cleaner polls the State API, which needs the dashboard (a local Ray runs without
    # it) and a single Ray per machine: it warns every few seconds or dies with a traceback; training is unaffected.
    ("PlacementGroupCleaner", re.compile("")),
    # Ray Core's error-level note on every Ray Train 2.60 run: its preemption watcher is a restartable actor whose
    # constructor arguments sit in the object store.
    (None, re.compile(r"core_worker\.cc.*'PreemptionWatcher'.*max_restarts")),
    # Ray Train's INFO lines about starting the worker group and persisting each checkpoint.
    (
        None,
        re.compile(
            r"^(Requesting resources: |Attempting to start training worker group |Started training "
            r"worker group of size |- \(ip=\S+, pid=\d+\) world_rank=|Setting up process group for: |"
            r"Checkpoint successfully created at: |Reporting training result \d+: )"
        ),
    ),
    # DeepSpeed prints this on every rank each time it loads its (already built) CPU communication op.
    (None, re.compile(r"^DeepSpeed \S+ built successfully$")),
]
# Driver-side Ray loggers: "Started a local Ray instance" / "Connected to Ray cluster" (INFO), and the note that
# token authentication is on (Ray's default since 2.60, about Ray's security, not this run).
DRIVER_LOGGERS = {
    "ray._private.worker": logging.WARNING,
    "ray._private.authentication.authentication_token_setup": logging.ERROR,
}
_PRINTER = "ray_print_logs"  # the name under which ray.init registers the printer of forwarded lines


def is_routine(actor_name: str | None, line: str) -> bool:
    """Whether a line forwarded from a Ray worker process is one of the :data:`ROUTINE` lines."""
    return any((actor is None or actor == actor_name) and pattern.search(line) for actor, pattern in ROUTINE)


def quiet_ray_console(**init_kwargs: Any) -> None:
    """Join or start Ray (:func:`ensure_ray`, which takes ``init_kwargs``) and keep routine lines off the console.

    Filtering wraps the printer that ``ray.init`` registers with Ray's internal dispatcher of forwarded lines
    (Ray offers no public hook short of ``log_to_driver=False``, which would hide our progress lines too). A Ray
    without that printer leaves the console unfiltered rather than failing the run.
    """
    for name, level in DRIVER_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    ensure_ray(**init_kwargs)
    try:
        from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    printers = [handler for name, handler in list(dispatcher.handlers) if name == _PRINTER]
    if len(printers) != 1 or getattr(printers[0], "hides_routine", False):
        return  # log_to_driver is off, Ray changed, or this ran already
    dispatcher.remove_handler(_PRINTER)
    dispatcher.add_handler(_PRINTER, _without_routine(printers[0]))


def _without_routine(printer: Callable[[dict], None]) -> Callable[[dict], None]:
    def print_lines(data: dict) -> None:
        lines = [line for line in data.get("lines", []) if not is_routine(data.get("actor_name"), line)]
        if lines:
            printer({**data, "lines": lines})

    print_lines.hides_routine = True  # type: ignore[attr-defined]
    return print_lines
