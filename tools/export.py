#!/usr/bin/env python
"""Package a trained model as a self-describing folder: config.json, model.safetensors and a model card README.md.

SOURCE is a fine-tuning run directory (its best_model.safetensors, else model.safetensors, and results.json), a
pretraining run directory (its encoder.safetensors), or one of those files.

    --format hf     (default) the layout the Hugging Face Hub and timm's pretrained_cfg readers expect; the weights
                    file is the medmae file itself (tools/predict.py and finetune.pretrained read it)
    --format monai  a monai.networks.nets.UNETR / ViT state dict and its constructor arguments; models MONAI's
                    networks cannot express (patch other than 16, other skip blocks, a cls token in UNETR, ...)
                    are refused, naming the setting

Example:
    python tools/export.py runs/finetune_btcv exported/unetr_btcv --license cc-by-4.0
    python tools/export.py runs/finetune_btcv exported/unetr_btcv_monai --format monai
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from medmae.inference.export import export_folder  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="run directory or model file (fine-tuned model or encoder.safetensors)")
    p.add_argument("out", help="output folder (created; its files are replaced)")
    p.add_argument("--format", choices=("hf", "monai"), default="hf", help="hf (default) or monai")
    p.add_argument(
        "--license",
        default="other",
        help="licence of the weights for the model card (e.g. apache-2.0, cc-by-4.0; they usually inherit the "
        "training data's terms); default: other",
    )
    a = p.parse_args(argv)
    try:
        paths = export_folder(a.source, a.out, fmt=a.format, license=a.license)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(str(x) for x in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
