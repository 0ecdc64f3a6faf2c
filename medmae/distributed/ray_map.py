"""Map a function over many items with Ray actors: each worker builds its function once (a model per worker, on a
GPU when asked) and then takes items one at a time, so a slow item never holds others back and a worker that dies
costs only the item it was on.

    stats = map_items(functools.partial(Worker, model_bytes), jobs, workers=8, num_gpus=1, on_result=record)

``make(shared)`` runs in each worker and returns the callable applied to each item; ``shared`` (e.g. the model
file's bytes) goes into Ray's object store once, not once per worker. An exception from the callable is that
item's error and the others go on. A worker that dies (killed, out of memory, its node lost) is restarted by Ray
and its item is tried again, up to ``max_attempts`` times in all; the callable should therefore be idempotent (the
predictor skips an output that already exists). An error in ``make`` itself stops the run: it would fail every
item the same way.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from medmae.distributed.ray_launch import ensure_ray, forwarded_env

__all__ = ["ItemResult", "MapStats", "cluster_resources", "map_items"]
log = logging.getLogger(__name__)

RESTART_POLL_S = 0.25
"""How often a worker Ray is restarting is asked whether it is back."""
RESTART_WAIT_S = 300.0
"""How long a restarting worker may take (a new process, imports, ``make``) before it counts as lost."""


@dataclass
class ItemResult:
    item: Any
    value: Any = None
    error: str | None = None
    """The message of the exception the callable raised, or why the item's workers died; None on success."""
    seconds: float = 0.0
    """Time the worker spent on the item (its last attempt)."""
    worker: str = ""
    """``host:pid`` of the worker that finished it."""
    attempts: int = 1


@dataclass
class MapStats:
    items: int
    errors: int
    seconds: float
    """Wall time from the first item sent (a worker was up) to the last result."""
    startup_seconds: float
    """From the call to the first item sent: Ray, the workers' processes and ``make``."""
    workers: int
    worker_deaths: int

    @property
    def per_second(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else 0.0


def cluster_resources() -> dict[str, float]:
    """Total resources (``CPU``, ``GPU``, ...) of the Ray this process joins, or starts (:func:`ensure_ray`)."""
    import ray

    ensure_ray()
    return dict(ray.cluster_resources())


class _Worker:
    """The actor. ``setup`` builds the callable once (again after Ray restarted the process); ``run`` does one item.

    The shared value comes through ``setup`` rather than the constructor: Ray re-runs a constructor on restart
    with arguments it must still hold, while ``setup`` is simply called again by the driver, which holds them."""

    def __init__(self, make: Callable[[Any], Callable[[Any], Any]]) -> None:
        self.where = f"{socket.gethostname()}:{os.getpid()}"
        self.make = make
        self.fn: Callable[[Any], Any] | None = None

    def setup(self, shared: Any) -> str:
        if self.fn is None:
            self.fn = self.make(shared)
        return self.where

    def run(self, item: Any) -> tuple[Any, str | None, float, str]:
        assert self.fn is not None, "run before setup"
        start = time.perf_counter()
        try:
            value, error = self.fn(item), None
        except Exception as e:  # the item's own failure (bad input): recorded, the worker goes on
            value, error = None, str(e) or type(e).__name__
        return value, error, time.perf_counter() - start, self.where


def map_items(
    make: Callable[[Any], Callable[[Any], Any]],
    items: Sequence[Any],
    *,
    shared: Any = None,
    workers: int = 2,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    max_attempts: int = 3,
    on_result: Callable[[ItemResult], None] | None = None,
    progress: bool = True,
    desc: str = "map",
    unit: str = "item",
    env: dict[str, str] | None = None,
) -> MapStats:
    """Apply ``make(shared)`` (built once per worker) to every item on ``workers`` Ray actors; ``on_result`` gets
    each :class:`ItemResult` as it arrives, in completion order. A progress bar shows the rate and the time left.

    ``num_cpus`` / ``num_gpus``: Ray resources per worker (a fraction of a GPU shares one). ``env``: variables for
    the workers on top of :func:`forwarded_env`. Raises ``RuntimeError`` when a worker cannot start (``make``
    failed) or every worker is lost.
    """
    import ray
    from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

    called = time.perf_counter()
    if workers < 1 or max_attempts < 1:
        raise ValueError(f"workers and max_attempts must be >= 1, got {workers} and {max_attempts}")
    ensure_ray()
    stats = MapStats(items=len(items), errors=0, seconds=0.0, startup_seconds=0.0, workers=workers, worker_deaths=0)
    if not items:
        return stats
    actor_cls = ray.remote(_Worker).options(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        max_restarts=max(4, max_attempts * 2),
        max_task_retries=0,  # we retry, elsewhere if need be, and count the attempts
        runtime_env={"env_vars": {**forwarded_env(), **(env or {})}},
    )
    shared_ref = ray.put(shared)  # once in the object store, whatever the number of workers
    actors = [actor_cls.remote(make) for _ in range(min(workers, len(items)))]
    # ref -> (kind, actor, item, attempts): "setup" builds a (re)started worker's callable, "run" runs an item
    inflight: dict[Any, tuple[str, Any, Any, int]] = {a.setup.remote(shared_ref): ("setup", a, None, 0) for a in actors}
    started: set[int] = set()
    restarting: dict[int, tuple[float, float, Any]] = {}  # id(actor) -> (first refused, retry at, actor)
    queue = collections.deque((item, 0) for item in items)
    idle: list[Any] = []
    done = 0
    start: float | None = None
    bar = tqdm(total=len(items), desc=desc, unit=unit, disable=not progress, smoothing=0.1)
    try:
        while done < len(items):
            while idle and queue:
                actor = idle.pop()
                item, attempts = queue.popleft()
                if start is None:
                    start = time.perf_counter()
                    stats.startup_seconds = start - called
                inflight[actor.run.remote(item)] = ("run", actor, item, attempts + 1)
            now = time.perf_counter()
            for key, (first, at, actor) in list(restarting.items()):
                if at <= now:
                    inflight[actor.setup.remote(shared_ref)] = ("setup", actor, None, 0)
                    restarting[key] = (first, float("inf"), actor)
            if not inflight and not restarting:
                raise RuntimeError(f"every {desc} worker was lost; {len(items) - done} item(s) not done")
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=RESTART_POLL_S if restarting else None)
            if not ready:
                continue
            ref = ready[0]
            kind, actor, item, attempts = inflight.pop(ref)
            try:
                out = ray.get(ref)
            except RayTaskError as e:
                if kind == "setup":  # make() raised: it would for every item
                    raise RuntimeError(f"a {desc} worker could not start: {e.cause or e}") from None
                out = (None, f"{type(e.cause).__name__}: {e.cause}", 0.0, "")  # e.g. a result Ray cannot pickle
            except RayActorError as e:
                if kind == "setup":
                    first = restarting.get(id(actor), (time.perf_counter(),))[0]
                    if isinstance(e, ActorUnavailableError) and time.perf_counter() - first < RESTART_WAIT_S:
                        # Ray is restarting it (calls are refused meanwhile): ask again shortly
                        restarting[id(actor)] = (first, time.perf_counter() + RESTART_POLL_S, actor)
                        continue
                    if id(actor) not in started:
                        raise RuntimeError(f"a {desc} worker could not start: {e}") from None
                    restarting.pop(id(actor), None)
                    log.warning("a %s worker is gone for good: %s", desc, str(e).splitlines()[0])
                    continue
                stats.worker_deaths += 1
                log.warning("a %s worker died on %r (attempt %d of %d)", desc, item, attempts, max_attempts)
                if attempts < max_attempts:
                    queue.appendleft((item, attempts))
                else:
                    result = ItemResult(item, error=f"its worker died {attempts} times: {str(e).splitlines()[0]}")
                    result.attempts = attempts
                    done += 1
                    stats.errors += 1
                    bar.update()
                    if on_result is not None:
                        on_result(result)
                inflight[actor.setup.remote(shared_ref)] = ("setup", actor, None, 0)  # idle again once restarted
                continue
            if kind == "setup":
                started.add(id(actor))
                restarting.pop(id(actor), None)
                idle.append(actor)
                continue
            value, error, seconds, where = out
            done += 1
            stats.errors += error is not None
            bar.update()
            idle.append(actor)
            if on_result is not None:
                on_result(ItemResult(item, value, error, seconds, where, attempts))
    finally:
        bar.close()
        stats.seconds = time.perf_counter() - (start if start is not None else called)
        for actor in actors:
            ray.kill(actor, no_restart=True)
    return stats
