"""A trained model as a self-describing folder for others: ``config.json``, ``model.safetensors`` and a model card.

``hf`` (default): the layout the Hugging Face Hub and timm's ``pretrained_cfg`` readers expect — ``config.json``
with ``architecture``, ``num_classes``, ``num_features``, ``model_args``, ``label_names`` and ``pretrained_cfg``
(``input_size``, ``license``, ...) plus our own ``medmae`` section (task, preprocessing, data plan);
``model.safetensors`` is the medmae file itself, so ``tools/predict.py --checkpoint FOLDER/model.safetensors`` and
``finetune.pretrained=FOLDER/model.safetensors`` read it as they read the original; ``README.md`` is the model
card with its YAML header (licence, tags), written by timm's card writer.

``monai``: the same model in MONAI's own layout (``medmae.models.monai_interop``): ``model.safetensors`` holds a
``monai.networks.nets.UNETR`` / ``ViT`` state dict and ``config.json`` the constructor arguments.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from medmae import __version__
from medmae.io import atomic_write_bytes
from medmae.models import VisionTransformer, ViTConfig, open_encoder
from medmae.models.monai_interop import to_monai
from medmae.tasks.model_file import load_finetuned, read_finetuned_meta, resolve_checkpoint

__all__ = ["ExportSource", "read_source", "export_folder"]

_PIPELINE = {
    "segment": "image-segmentation",
    "segment_regions": "image-segmentation",
    "classify": "image-classification",
}
_MONAI_USAGE = """```python
import json

import torch
from monai.networks import nets
from safetensors.torch import load_file

cfg = json.load(open("config.json"))["monai"]
net = getattr(nets, cfg["network"])(**cfg["kwargs"])
net.load_state_dict(load_file("model.safetensors"), strict=True)
for m in net.modules():  # MONAI's constructors fix LayerNorm eps at 1e-5; the model was trained with norm_eps
    if isinstance(m, torch.nn.LayerNorm):
        m.eps = cfg["norm_eps"]
```"""


@dataclass
class ExportSource:
    """A fine-tuned model file (with its run's ``results.json`` when found) or a pretrained encoder."""

    path: Path
    kind: Literal["finetuned", "encoder"]
    meta: dict[str, Any]
    """fine-tuned: the model file's metadata; encoder: ``{"config": ..., "plan": ...}``"""
    results: dict[str, Any] | None


def read_source(path: str | os.PathLike) -> ExportSource:
    """A run directory (fine-tuning: best_model/model.safetensors; pretraining: encoder.safetensors) or a model file;
    ``ValueError`` naming the path otherwise."""
    path = Path(path)
    if path.is_dir() and (path / "encoder.safetensors").is_file() and not (path / "model.safetensors").is_file():
        path = path / "encoder.safetensors"
    elif path.is_dir():
        path = resolve_checkpoint(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such model file or run directory")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    results_file = path.parent / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else None
    if "medmae_finetuned" in raw:
        return ExportSource(path, "finetuned", read_finetuned_meta(path), results)
    enc = open_encoder(path)
    return ExportSource(path, "encoder", {"config": enc.config, "plan": enc.plan}, None)


def _config_json(src: ExportSource, license: str) -> dict[str, Any]:
    """timm's ``config.json`` (architecture, model_args, pretrained_cfg) plus a ``medmae`` section."""
    if src.kind == "finetuned":
        m = src.meta
        args, name, classes, labels = m["model_config"], m["model_name"], m["num_classes"], m["label_names"]
        medmae = {k: m[k] for k in ("task", "roi_size", "preprocessing")}
        medmae["data_plan"] = (m["extra"].get("encoder") or {}).get("plan")
        medmae["encoder"] = {k: v for k, v in (m["extra"].get("encoder") or {}).items() if k != "plan"}
    else:
        args, name, classes, labels = src.meta["config"], "medmae_vit_encoder", 0, None
        medmae = {"task": "encoder", "data_plan": src.meta["plan"]}
    medmae.update(format="medmae", version=__version__)
    return {
        "architecture": name,
        "num_classes": classes,
        "num_features": args["embed_dim"],
        "model_args": args,
        "label_names": labels,
        "pretrained_cfg": {
            "input_size": [args["in_chans"], *args["img_size"]],
            "fixed_input_size": True,
            "license": license,
            "num_classes": classes,
        },
        "medmae": medmae,
    }


def _metrics_section(results: dict[str, Any] | None) -> str:
    """A markdown table of the best model's validation scores (and its test scores when the dataset has a test
    split), from the run's ``results.json``."""
    if not results or not results.get("best"):
        return "\n## Metrics\nNo results.json beside the model file: no validation scores to report.\n"
    best, test = results["best"], results.get("test")
    rows = [k for k, v in best.items() if k != "step" and isinstance(v, (int, float))]
    groups = [(g, k) for g in results.get("metric_groups", []) for k in best.get(g, {})]
    head = f"| metric | validation, best (step {best['step']}) |" + (" test |" if test else "")
    lines = [head, "|---|---|" + ("---|" if test else "")]

    def cell(res: dict[str, Any] | None, group: str | None, key: str) -> str:
        v = (res or {}).get(group, {}).get(key) if group else (res or {}).get(key)
        return f"{v:.4f}" if isinstance(v, float) else str(v) if v is not None else ""

    for key in rows:
        label = f"{key} ({results.get('metric')})" if key == "score" and results.get("metric") else key
        lines.append(f"| {label} | {cell(best, None, key)} |" + (f" {cell(test, None, key)} |" if test else ""))
    for group, key in groups:
        lines.append(f"| {group}/{key} | {cell(best, group, key)} |" + (f" {cell(test, group, key)} |" if test else ""))
    return "\n## Metrics\n" + "\n".join(lines) + "\n"


def _card(src: ExportSource, config: dict[str, Any], fmt: str, license: str, name: str) -> str:
    from timm.models._hub import generate_readme  # timm's model-card writer (what its push_to_hf_hub uses)

    m, args = config["medmae"], config["model_args"]
    details: dict[str, Any] = {
        "Architecture": f"{config['architecture']}: ViT ({args['depth']} blocks, width {args['embed_dim']}, "
        f"{args['num_heads']} heads, patch {args['patch_size']}) on {len(args['img_size'])}D input "
        f"{args['in_chans']} x {' x '.join(map(str, args['img_size']))}",
        "Task": m["task"],
        "Licence": license,
        "Format": "MONAI state dict (see config.json for the network)" if fmt == "monai" else "medmae safetensors",
    }
    if config["label_names"]:
        details["Outputs"] = config["label_names"]
    if m.get("preprocessing"):
        details["Preprocessing (fine-tuning data)"] = m["preprocessing"]
    plan = m.get("data_plan")
    if plan:
        details["Data plan (pretraining)"] = {k: v for k, v in plan.items() if k != "datasets"}
        details["Pretraining datasets"] = [f"{d['name']} ({d.get('sha256', d.get('error'))})" for d in plan["datasets"]]
        details["Pretraining steps"] = plan["steps"]
    if m.get("encoder"):
        details["Initialised from"] = m["encoder"]
    if src.results and src.results.get("history"):
        details["Fine-tuning steps"] = src.results["history"][-1]["step"]
    if fmt == "monai":
        usage = _MONAI_USAGE
    elif src.kind == "finetuned":
        usage = f"```bash\npython tools/predict.py --checkpoint {name}/model.safetensors INPUT OUTPUT\n```"
    else:
        usage = f"```bash\npython launch/finetune.py --config FINETUNE.yaml --pretrained {name}/model.safetensors\n```"
    card: dict[str, Any] = {"license": license, "library_name": "medmae", "details": details, "usage": usage}
    card["tags"] = ["medmae", "medical-imaging", "vision-transformer"]
    text = generate_readme(card, name, task_name=_PIPELINE.get(m["task"], "image-feature-extraction"))
    return text + (_metrics_section(src.results) if src.kind == "finetuned" else "")


def _model(src: ExportSource) -> Any:
    if src.kind == "finetuned":
        return load_finetuned(src.path)[0]
    enc = open_encoder(src.path)
    model = VisionTransformer(ViTConfig(**{**enc.config, "img_size": tuple(enc.config["img_size"])}))
    model.load_state_dict(enc.weights, strict=True)
    return model


def export_folder(
    source: str | os.PathLike, out: str | os.PathLike, fmt: Literal["hf", "monai"] = "hf", license: str = "other"
) -> list[Path]:
    """Write ``config.json``, ``model.safetensors`` and ``README.md`` into ``out``; returns their paths.
    ``ValueError`` naming the setting when ``fmt="monai"`` and MONAI's networks cannot express the model."""
    src = read_source(source)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = _config_json(src, license)
    if fmt == "monai":
        model = _model(src)
        state, network, kwargs = to_monai(model)
        eps = (model.encoder if hasattr(model, "encoder") else model).cfg.norm_eps
        config["monai"] = {"network": network, "kwargs": kwargs, "norm_eps": eps}
        weights = save(state, metadata={"format": "pt"})
    elif fmt == "hf":
        weights = src.path.read_bytes()
    else:
        raise ValueError(f"--format: {fmt!r} is not one of hf, monai")
    paths = [
        atomic_write_bytes(out / "model.safetensors", weights),
        atomic_write_bytes(out / "config.json", (json.dumps(config, indent=2) + "\n").encode()),
        atomic_write_bytes(out / "README.md", _card(src, config, fmt, license, out.name).encode()),
    ]
    return paths
