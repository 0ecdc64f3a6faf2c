"""The data plan an encoder travels with: how its pretraining data was made, and the check fine-tuning runs on it.

Pretraining writes the plan into ``encoder.safetensors`` (metadata ``medmae_data_plan``) from its datasets'
manifests and its own config; fine-tuning compares it with its own dataset's manifest. A different voxel spacing,
orientation or intensity preset (and window) means the encoder sees other images than it learned from: a warning
naming both values, or an error with ``finetune.strict_plan: true``. nnssl stores such a plan in its checkpoints for
the same reason (nnU-Net issues #1477, #2368: pretraining and fine-tuning preprocessing that silently differ).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from typing import Any

from medmae.data import read_manifest

__all__ = ["PLAN_VERSION", "COMPARED", "data_plan", "manifest_checksum", "plan_differences", "check_plan"]

logger = logging.getLogger(__name__)

PLAN_VERSION = 1
COMPARED = ("spacing", "orientation", "preset", "ct_window")
"""Manifest ``preprocessing`` keys that must agree between pretraining and fine-tuning data."""


def manifest_checksum(manifest: dict[str, Any]) -> str:
    """SHA-256 of the manifest's content as canonical JSON (sorted keys, no spaces): the same dataset gives the
    same sum whether read from a folder or a bucket, whatever the file's formatting."""
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def _dataset_name(path: str) -> str:
    """The dataset's folder name, the last part of its path or URL."""
    return path.rstrip("/").rsplit("/", 1)[-1] or path


def data_plan(cfg: Any, resolved: Any, steps: int) -> dict[str, Any]:
    """The plan of a pretraining job (``cfg`` a ``JobConfig``, ``resolved`` its MAE config) after ``steps`` steps.

    Never raises for an unreadable manifest: the export at the end of a run must not be lost for it; the dataset's
    entry then says why it has no checksum.
    """
    paths = [cfg.data.path] if cfg.data.path else [d.path for d in cfg.data.datasets]
    datasets, pres = [], []
    for path in paths:
        entry: dict[str, Any] = {"name": _dataset_name(path), "path": path}
        try:
            manifest = read_manifest(path, cfg.data.storage_options)
        except (ValueError, OSError) as e:
            logger.warning("data plan: cannot read the manifest of %s (%s); the plan lists it without one", path, e)
            entry["error"] = str(e)
        else:
            pre = manifest["preprocessing"]
            pres.append(pre)
            entry.update(sha256=manifest_checksum(manifest), spacing=pre.get("spacing"), samples=manifest["counts"])
        datasets.append(entry)
    first = pres[0] if pres else {}
    spacings = {json.dumps(p.get("spacing")) for p in pres}
    return {
        "version": PLAN_VERSION,
        "spatial_dims": cfg.data.spatial_dims,
        "spacing": first.get("spacing") if len(spacings) <= 1 else "mixed",
        "orientation": first.get("orientation"),
        "preset": first.get("preset"),
        "ct_window": first.get("ct_window"),
        "channels": first.get("channels", resolved.in_chans),
        "crop_size": list(cfg.data.roi_size),
        "mask_ratio": getattr(resolved, "mask_ratio", None),
        "steps": int(steps),
        "datasets": datasets,
    }


def _same(key: str, a: Any, b: Any) -> bool:
    if key == "spacing" and isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-3) for x, y in zip(a, b))
    return a == b


def plan_differences(plan: dict[str, Any], preprocessing: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, pretraining value, fine-tuning value)`` for each compared key that differs. A plan of several
    datasets at different spacings (``"mixed"``) agrees with any one of them."""
    out: list[tuple[str, Any, Any]] = []
    for key in COMPARED:
        a, b = plan.get(key), preprocessing.get(key)
        if key == "spacing" and a == "mixed":
            options = [d.get("spacing") for d in plan.get("datasets", [])]
            if not any(_same(key, o, b) for o in options):
                out.append((key, options, b))
        elif not _same(key, a, b):
            out.append((key, a, b))
    return out


def check_plan(
    plan: dict[str, Any] | None, manifest: dict[str, Any], *, encoder: str, data: str, strict: bool
) -> list[str]:
    """Compare an encoder's plan with the fine-tuning dataset's manifest; returns the differences as messages
    (logged as warnings), or raises ``ValueError`` with all of them when ``strict``. A plan of None (an encoder
    written before plans existed, or imported from MONAI) is noted and passes."""
    if plan is None:
        logger.info("%s carries no data plan (an older or imported encoder): its preprocessing is not checked", encoder)
        return []
    names = ", ".join(d["name"] for d in plan.get("datasets", [])) or "?"
    diffs = [
        f"{key}: the encoder was pretrained on {a!r} ({names}), the fine-tuning data has {b!r} ({data})"
        for key, a, b in plan_differences(plan, manifest["preprocessing"])
    ]
    if diffs and strict:
        raise ValueError(
            "finetune.strict_plan: the fine-tuning data is not prepared like the encoder's pretraining data: "
            + "; ".join(diffs)
            + ". Convert it with the same tools/to_wds.py options, or set finetune.strict_plan=false to go on"
        )
    for d in diffs:
        logger.warning("data plan differs: %s", d)
    return diffs
