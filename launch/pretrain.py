"""MAE self pre-training on Ray Train workers running DeepSpeed.

    ray job submit --working-dir . -- python launch/pretrain.py --config configs/pretrain_debug.yaml [key=value ...]
    python launch/pretrain.py --config configs/pretrain_debug.yaml        # no cluster: starts a local Ray

Re-running with the same run.name resumes from the last checkpoint. The encoder is exported at the end as
<run.output_dir>/<run.name>/encoder.safetensors, ready for launch/finetune.py --pretrained.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `ray job submit --working-dir .` runs from a copy

from medmae.config import to_dict  # noqa: E402
from medmae.distributed import run_ray  # noqa: E402
from medmae.training.cli import absolute_paths, load_job, parser  # noqa: E402
from medmae.training.logs import setup_logging  # noqa: E402
from medmae.training.trainer import run_dir_of, train_worker  # noqa: E402


def main() -> None:
    args = parser(__doc__).parse_args()
    cfg = absolute_paths(load_job(args))
    if cfg.task != "pretrain":
        raise SystemExit(f"config error: task: launch/pretrain.py runs task 'pretrain', the config says {cfg.task!r}")
    setup_logging(rank=0)
    result = run_ray(train_worker, {"config": to_dict(cfg)}, cfg.dist, run_name=cfg.run.name,
                     keep_checkpoints=cfg.run.keep_last)
    print(f"done: {result.metrics}\nrun directory: {run_dir_of(cfg)}\ncheckpoint: {result.checkpoint}")


if __name__ == "__main__":
    main()
