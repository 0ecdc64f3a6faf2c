"""The fine-tuned model file: consolidated fp32 safetensors whose metadata says how to rebuild and feed the model.

Metadata keys (each a JSON string): ``medmae_finetuned`` (format version), ``model_name``, ``model_config`` (the
model's full resolved config, so ``create_model(model_name, **model_config)`` rebuilds it), ``task``,
``num_classes``, ``label_names``, ``roi_size``, ``preprocessing`` (the dataset manifest's ``preprocessing``: what the
converter did to the training images, which prediction repeats) and ``extra`` (free-form: metrics, step, source;
fine-tuning from a pretrained encoder records ``extra["encoder"]``: its path, data plan, the plan's differences from
this data, the channel adaptation and position-table interpolation applied).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import nn

from medmae.io import atomic_write_bytes
from medmae.models.registry import create_model
from medmae.models.registry import model_config as validated_config
from medmae.tasks.base import task_for_file_kind

__all__ = ["FORMAT_VERSION", "save_finetuned", "load_finetuned", "read_finetuned_meta", "resolve_checkpoint"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_KEYS = ("model_name", "model_config", "task", "num_classes", "label_names", "roi_size", "preprocessing", "extra")
_PREPROCESSING_KEYS = ("spatial_dims", "preset", "spacing", "orientation", "crop_foreground", "image_dtype")


def _check_meta(meta: dict[str, Any], where: str) -> None:
    """``ValueError`` naming the field when the metadata cannot describe a usable model."""
    task = task_for_file_kind(meta["task"], where)
    cfg = validated_config(meta["model_name"], **meta["model_config"])  # raises naming an unknown/bad key
    pre = meta["preprocessing"]
    missing = [k for k in _PREPROCESSING_KEYS if k not in pre]
    if missing:
        raise ValueError(f"{where}: preprocessing lacks {missing}; pass the dataset manifest's 'preprocessing' dict")
    if pre["spatial_dims"] != cfg.spatial_dims:
        raise ValueError(f"{where}: preprocessing is {pre['spatial_dims']}D but the model is {cfg.spatial_dims}D")
    if pre.get("channels") not in (None, cfg.in_chans):
        raise ValueError(f"{where}: preprocessing has {pre['channels']} channel(s), the model takes {cfg.in_chans}")
    k = meta["num_classes"]
    if k != getattr(cfg, "num_classes", k):
        raise ValueError(f"{where}: num_classes {k} != the model's {cfg.num_classes}")
    task.check_file(meta["task"], meta, where)
    if meta["label_names"] is not None and len(meta["label_names"]) != k:
        raise ValueError(f"{where}: label_names has {len(meta['label_names'])} names for {k} classes")
    if tuple(meta["roi_size"]) != tuple(cfg.img_size):  # the patch embedding takes exactly img_size
        raise ValueError(f"{where}: roi_size {meta['roi_size']} must equal the model's img_size {list(cfg.img_size)}")


def save_finetuned(
    path: str | os.PathLike,
    state: dict[str, torch.Tensor],
    *,
    model_name: str,
    model_config: dict[str, Any],
    task: str,
    preprocessing: dict[str, Any],
    num_classes: int,
    label_names: list[str] | None = None,
    roi_size: list[int] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a fine-tuned model atomically; ``roi_size`` defaults to the model's ``img_size``.

    Checks the metadata and that ``state`` matches the model's keys and shapes exactly, so a file that cannot be
    loaded is never written.
    """
    path = Path(path)
    model_config = json.loads(json.dumps(model_config))  # tuples -> lists, and proof that it serialises
    model_config.pop("grad_checkpointing", None)  # a runtime switch, not architecture (files before 0.2 had it)
    meta = {
        "model_name": model_name,
        "model_config": model_config,
        "task": task,
        "num_classes": int(num_classes),
        "label_names": list(label_names) if label_names is not None else None,
        "roi_size": [int(r) for r in (roi_size if roi_size is not None else model_config["img_size"])],
        "preprocessing": dict(preprocessing),
        "extra": extra or {},
    }
    _check_meta(meta, str(path))
    with torch.device("meta"):  # shapes only: no memory, no init time
        expected = create_model(model_name, **model_config).state_dict()
    _check_state(state, expected, str(path))
    # Floats become fp32 (bf16/fp16 training copies), integer buffers keep their type; clone() unties shared storage.
    tensors = {
        k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous().clone()
        for k, v in state.items()
    }
    metadata = {"format": "pt", "medmae_finetuned": str(FORMAT_VERSION)}
    metadata.update({k: json.dumps(meta[k]) for k in _KEYS})
    atomic_write_bytes(path, save(tensors, metadata=metadata))
    log.info("saved %s (%s, task %s, %d tensors)", path, model_name, task, len(tensors))
    return path


def _check_state(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], where: str) -> None:
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    bad = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or bad:
        raise ValueError(
            f"{where}: weights do not match the model: missing {missing or 'none'}, unexpected {unexpected or 'none'}, "
            f"shape mismatches {bad or 'none'}"
        )


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A model file, or a run directory's ``best_model.safetensors`` (else its ``model.safetensors``)."""
    path = Path(path)
    if path.is_dir():
        for name in ("best_model.safetensors", "model.safetensors"):
            if (path / name).is_file():
                return path / name
        raise ValueError(f"--checkpoint {path}: a run directory without best_model.safetensors or model.safetensors")
    if not path.is_file():
        raise ValueError(f"--checkpoint {path}: no such file or directory")
    return path


def read_finetuned_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a fine-tuned model file, checked; reads no weights."""
    return _open(Path(path), weights=False)[1]


def _open(path: Path, weights: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if not path.is_file():
        raise ValueError(f"{path}: no such model file")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()} if weights else {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    if "medmae_finetuned" not in raw:
        hint = " (it is a pretrained encoder: fine-tune it first)" if "medmae_encoder_config" in raw else ""
        raise ValueError(f"{path}: not a medmae fine-tuned model; write it with save_finetuned{hint}")
    if int(raw["medmae_finetuned"]) > FORMAT_VERSION:
        raise ValueError(f"{path}: format version {raw['medmae_finetuned']} is newer than this medmae reads")
    try:
        meta = {k: json.loads(raw[k]) for k in _KEYS}
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: damaged metadata ({type(e).__name__}: {e})") from None
    meta["model_config"].pop("grad_checkpointing", None)  # written by versions that kept it in the architecture
    _check_meta(meta, str(path))
    return tensors, meta


def load_finetuned(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """-> (model in eval mode on CPU with the weights loaded strictly, metadata dict)."""
    path = Path(path)
    tensors, meta = _open(path, weights=True)
    model = create_model(meta["model_name"], **meta["model_config"])
    _check_state(tensors, model.state_dict(), str(path))
    model.load_state_dict(tensors, strict=True)
    return model.eval(), meta
