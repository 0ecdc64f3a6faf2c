"""Environment workarounds, each active only when the problem it fixes is present.

torchvision wheels built for CUDA fail to load their C extension on CPU-only machines, and registering their fake
kernels then raises ``operator torchvision::nms does not exist`` on ``import torchvision`` (so on ``import timm``).
Defining the two op schemas torchvision attaches fakes to lets the pure-Python parts (all timm needs) import.
"""

from __future__ import annotations

import torch

_LIB = None


def patch_torchvision_ops() -> None:
    """Declare ``torchvision::nms``/``qnms`` schemas when torchvision's own extension did not register them."""
    global _LIB
    if _LIB is not None:
        return
    try:
        torch.ops.torchvision.nms  # noqa: B018 - probing for the registered op
        return
    except (AttributeError, RuntimeError):
        pass
    _LIB = torch.library.Library("torchvision", "FRAGMENT")  # kept alive: the schemas live as long as it does
    _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
