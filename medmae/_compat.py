"""Environment workarounds, each active only when the problem it fixes is present.

torchvision wheels built for CUDA fail to load their C extension on CPU-only machines, and registering their fake
kernels then raises ``operator torchvision::nms does not exist`` on ``import torchvision`` (so on ``import timm``).
Defining the two op schemas torchvision attaches fakes to lets the pure-Python parts (all timm needs) import.
Where the extension loads (any GPU machine, or a CPU build of torchvision) it registers those schemas itself, and
defining them as well would abort the process, so they are defined only when the extension cannot load.

The probe loads the extension library itself (under a millisecond) instead of importing torchvision (1.4 s: its
``models`` import ``torch._dynamo``), so ``import medmae`` stays cheap; timm and torchvision are imported where a
model or an optimizer is built.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

import torch

_LIB = None


def patch_torchvision_ops() -> None:
    """Declare ``torchvision::nms``/``qnms`` when torchvision is installed but its C extension cannot load here."""
    global _LIB
    if _LIB is not None or "torchvision" in sys.modules:
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return  # not installed: nothing imports it
    libs = glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.so"))
    if not libs:
        return
    try:
        torch.ops.load_library(libs[0])  # what torchvision's own import does first; it registers the schemas
        return
    except OSError:
        pass
    _LIB = torch.library.Library("torchvision", "FRAGMENT")  # kept alive: the schemas live as long as it does
    _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
