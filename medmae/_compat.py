"""Environment workarounds, each active only when the problem it fixes is present.

torchvision wheels built for CUDA fail to load their C extension on CPU-only machines, and registering their fake
kernels then raises ``operator torchvision::nms does not exist`` on ``import torchvision`` (so on ``import timm``).
Defining the two op schemas torchvision attaches fakes to lets the pure-Python parts (all timm needs) import.
Where the extension loads (any GPU machine, or a CPU build of torchvision) it registers those schemas itself, and
defining them first would abort the process, so the schemas are only added after an import has failed that way.
"""

from __future__ import annotations

import sys

import torch

_LIB = None


def patch_torchvision_ops() -> None:
    """Import torchvision; if its C extension could not register ``torchvision::nms``, declare the schemas and retry."""
    global _LIB
    if _LIB is not None:
        return
    try:
        import torchvision  # noqa: F401 - the import itself is the probe

        return
    except ImportError:
        return  # not installed: nothing imports it
    except RuntimeError as e:
        if "torchvision::nms" not in str(e):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]  # the half-imported package; the retry starts clean
    _LIB = torch.library.Library("torchvision", "FRAGMENT")  # kept alive: the schemas live as long as it does
    _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401
