#!/usr/bin/env python
"""Turn MONAI ViT or UNETR weights into a medmae encoder.safetensors to fine-tune from.

MODEL is a state dict: a MONAI bundle's models/model.pt (read with torch.load(weights_only=True): tensors only, no
code runs) or a .safetensors file; a dict holding it under "state_dict" or "model" works too. A UNETR's decoder is
left behind. Prints the model overrides that make a medmae UNETR or classifier take these weights exactly.

Example:
    python tools/import_monai.py swin_unetr_btcv/models/model.pt runs/monai/encoder.safetensors --num-heads 12
    python launch/finetune.py --config configs/finetune_btcv.yaml --pretrained runs/monai/encoder.safetensors \\
        model.patch_size=16 model.pos_embed=learned model.cls_token=false model.norm_eps=1e-5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

import torch  # noqa: E402

from medmae.models import save_encoder  # noqa: E402
from medmae.models.monai_interop import encoder_from_monai  # noqa: E402


def read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return state


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="MONAI ViT/UNETR weights (.pt/.pth state dict or .safetensors)")
    p.add_argument("out", type=Path, help="encoder.safetensors to write")
    p.add_argument("--num-heads", type=int, default=12, help="attention heads (weights do not say; MONAI's default)")
    p.add_argument("--img-size", type=int, nargs="+", help="input size the weights were trained on (default: a cube)")
    a = p.parse_args(argv)
    try:
        weights, config = encoder_from_monai(
            read_state(a.model), num_heads=a.num_heads, img_size=tuple(a.img_size) if a.img_size else None
        )
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {a.model}: {e}", file=sys.stderr)
        return 2
    save_encoder(weights, config, a.out)
    keep = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "pos_embed", "cls_token")
    overrides = " ".join(f"model.{k}={json.dumps(config[k])}" for k in keep)
    print(f"wrote {a.out}: {config['depth']} blocks, width {config['embed_dim']}, {config['in_chans']} channel(s)")
    print(f"fine-tune with: --pretrained {a.out} {overrides} model.norm_eps={config['norm_eps']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
