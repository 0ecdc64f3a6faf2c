"""Fine-tune a (self pre-trained) ViT: UNETR segmentation or multi-label classification, with DeepSpeed.

    python launch/finetune.py --config configs/finetune_debug.yaml [--pretrained P]   # one process
    deepspeed --num_gpus 8 launch/finetune.py --config ...                            # one node, 8 GPUs
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/finetune.py --config ...         # 2 CPU processes (gloo)
    torchrun --nnodes N --node-rank R --master-addr HOST --nproc-per-node 8 launch/finetune.py --config ...
    python launch/finetune.py --ray --config ...     # dist.num_workers Ray Train workers, on any Ray cluster

Several nodes: either ``--ray`` (the same launch as pretraining, from the cluster image: no ssh needed) or
``torchrun`` started on every node. ``deepspeed --hostfile`` needs pdsh and sshd, which the image does not ship.
Validates on whole volumes (sliding window) every run.val_every steps and at the end, keeps the best model as
<run>/best_model.safetensors, the last as <run>/model.safetensors, and all metrics in <run>/results.json.
Re-running with the same run.name resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medmae.config import to_dict  # noqa: E402
from medmae.training.cli import absolute_paths, load_job, parser  # noqa: E402
from medmae.training.config import JobConfig  # noqa: E402
from medmae.training.preemption import Preempted  # noqa: E402
from medmae.training.trainer import Trainer, run_dir_of, train_worker  # noqa: E402


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, JobConfig]:
    """The command line (flags and key=value overrides in any order) -> (arguments, job config)."""
    ap = parser(__doc__)
    ap.add_argument("--pretrained", help="encoder.safetensors from launch/pretrain.py (same as finetune.pretrained=)")
    ap.add_argument("--ray", action="store_true", help="run dist.num_workers Ray Train workers (local Ray or cluster)")
    ap.add_argument(
        "--local_rank",
        "--local-rank",
        type=int,
        default=None,
        help="set by the deepspeed launcher (the rank also comes from LOCAL_RANK)",
    )
    args = ap.parse_args(argv)
    if args.pretrained:
        args.overrides.append(f"finetune.pretrained={args.pretrained}")
    cfg = absolute_paths(load_job(args))
    if cfg.task == "pretrain":  # the one unlabelled task has its own launcher (launch/pretrain.py)
        raise SystemExit(
            "config error: task: launch/finetune.py fine-tunes (segment or classify); "
            "pretraining runs through launch/pretrain.py"
        )
    return args, cfg


def main() -> None:
    args, cfg = parse()
    if args.ray:
        from medmae.distributed import run_ray

        run_ray(
            train_worker, {"config": to_dict(cfg)}, cfg.dist, run_name=cfg.run.name, keep_checkpoints=cfg.run.keep_last
        )
    else:
        trainer = Trainer(cfg)
        try:
            trainer.train()
        except Preempted as e:  # a scheduler's SIGTERM: the checkpoint is written; exit as a terminated job does
            print(f"preempted: {e}", file=sys.stderr)
            raise SystemExit(Preempted.exit_code) from None
        if trainer.rank != 0:
            return
    best = json.loads((run_dir_of(cfg) / "results.json").read_text())["best"]
    print(
        json.dumps(
            {"run_dir": str(run_dir_of(cfg)), "best_step": best and best["step"], "best_score": best and best["score"]}
        )
    )


if __name__ == "__main__":
    main()
