"""Counting a training step's host work on any device: every aten op it dispatches and every host sync.

On a GPU a host sync (``.item()``, ``float(t)``, ``bool(t)``, ``assert t > 0``, ``.tolist()``, ``.cpu()``, a
data-dependent shape) makes the CPU wait for the GPU queue to drain, which starves the GPU; a CPU run has no queue,
but dispatches the same ops, so counting them here tells the GPU's story without a GPU. Used by the step's tests
and ``bench/bench_step.py``. DeepSpeed's ``get_accelerator().synchronize()`` calls are not aten ops; on the CPU
accelerator DeepSpeed skips them, so they are found by reading its source (docs/performance.md lists them).
"""

from __future__ import annotations

import collections
import sys
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["StepCounter"]

# aten ops that read device data on the host, or whose output shape depends on device data
SYNC_OPS = {
    "aten._local_scalar_dense.default",  # .item(), float(t), int(t), bool(t), assert t
    "aten.is_nonzero.default",
    "aten.nonzero.default",
    "aten.masked_select.default",
    "aten.equal.default",
    "aten._unique2.default",
    "aten.unique_consecutive.default",
}
# Tensor methods that copy to the host without reaching the dispatcher on a CPU tensor
HOST_READS = {"tolist", "cpu", "numpy"}


def _caller() -> str:
    f: Any = sys._getframe(2)
    while f is not None and f.f_code.co_filename.endswith(
        ("counters.py", "_python_dispatch.py", "overrides.py", "torch/_tensor.py", "_ops.py", "_contextlib.py")
    ):
        f = f.f_back
    if f is None:
        return "?"
    name = f.f_code.co_filename
    for marker in ("site-packages/", "/medmae/"):
        if marker in name:
            name = ("medmae/" if marker == "/medmae/" else "") + name.split(marker, 1)[1]
            break
    return f"{name}:{f.f_lineno}"


class _Dispatch(TorchDispatchMode):
    def __init__(self, owner: StepCounter) -> None:
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = str(func)
        self.owner.ops[name] += 1
        if name in SYNC_OPS:
            self.owner.syncs[f"{name} @ {_caller()}"] += 1
        return func(*args, **(kwargs or {}))


class _Function(TorchFunctionMode):
    def __init__(self, owner: StepCounter) -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if getattr(func, "__name__", "") in HOST_READS and args and isinstance(args[0], torch.Tensor):
            self.owner.syncs[f"Tensor.{func.__name__} @ {_caller()}"] += 1
        return func(*args, **(kwargs or {}))


class StepCounter:
    """``with StepCounter() as c: step()`` -> ``c.total_ops``, ``c.sync_count``, ``c.syncs`` (where each was)."""

    def __init__(self) -> None:
        self.ops: collections.Counter[str] = collections.Counter()
        self.syncs: collections.Counter[str] = collections.Counter()
        self._modes = (_Function(self), _Dispatch(self))

    def __enter__(self) -> StepCounter:
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        for m in reversed(self._modes):
            m.__exit__(*exc)

    @property
    def total_ops(self) -> int:
        return sum(self.ops.values())

    @property
    def sync_count(self) -> int:
        return sum(self.syncs.values())
