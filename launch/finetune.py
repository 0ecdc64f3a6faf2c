"""Fine-tune a (self pre-trained) ViT: UNETR segmentation or multi-label classification, with DeepSpeed.

    deepspeed [--num_gpus N | --hostfile F] launch/finetune.py --config configs/finetune_debug.yaml [--pretrained P]
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/finetune.py --config ...     # 2 CPU processes (gloo)
    python launch/finetune.py --config configs/finetune_debug.yaml                # one process

Validates on whole volumes (sliding window) every run.val_every steps and at the end, keeps the best model as
<run>/best_model.safetensors, the last as <run>/model.safetensors, and all metrics in <run>/results.json.
Re-running with the same run.name resumes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medmae.training.cli import absolute_paths, load_job, parser  # noqa: E402
from medmae.training.trainer import Trainer, run_dir_of  # noqa: E402


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--pretrained", help="encoder.safetensors from launch/pretrain.py (same as finetune.pretrained=)")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None,
                    help="set by the deepspeed launcher (the rank also comes from LOCAL_RANK)")
    args = ap.parse_args()
    if args.pretrained:
        args.overrides.append(f"finetune.pretrained={args.pretrained}")
    cfg = absolute_paths(load_job(args))
    if cfg.task == "pretrain":
        raise SystemExit("config error: task: launch/finetune.py fine-tunes (segment or classify); "
                         "pretraining runs through launch/pretrain.py")
    trainer = Trainer(cfg)
    trainer.train()
    if trainer.rank == 0:
        best = trainer.results["best"]
        print(json.dumps({"run_dir": str(run_dir_of(cfg)), "best_step": best and best["step"],
                          "best_score": best and best["score"]}))


if __name__ == "__main__":
    main()
