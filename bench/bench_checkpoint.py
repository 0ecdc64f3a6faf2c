"""Checkpoint size, save and verify time per ZeRO stage: the real engine and the trainer's ``CheckpointManager`` (the
DeepSpeed files, each rank's size + CRC-32 list, the merge into place) on N ranks.

    torchrun --nproc_per_node 2 bench/bench_checkpoint.py                                   # debug MAE, CPU
    torchrun --nproc_per_node 2 bench/bench_checkpoint.py --model mae_vit_base_patch16_3d   # ViT-B/16 MAE

Each stage builds the model, takes one optimizer step (Adam allocates its moments lazily) and saves twice into a
temporary folder; rank 0 prints one JSON line per stage: parameters, bytes on disk (total and the largest rank's
files), file count, the second save's wall time (what a preempted run needs after its last step: docs/faults.md),
the time a resume spends verifying it (``verify_checkpoint``: every file's size and CRC-32), and the time of the
conversion that a run resumed on another worker count starts with (``ds_to_universal``, by each node's first rank).
The crop is tiny (``--size``): parameter count and hence the checkpoint do not depend on it (position tables are
recomputed, not stored).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from medmae.config import from_dict  # noqa: E402
from medmae.distributed import DistributedConfig, create_engine  # noqa: E402
from medmae.models import create_model  # noqa: E402
from medmae.training.checkpoint import CheckpointManager, verify_checkpoint  # noqa: E402
from medmae.training.config import OptimConfig  # noqa: E402
from medmae.training.optim import build_optimizer  # noqa: E402


def measure(model_name: str, size: int, stage: int, precision: str, out: Path) -> dict:
    torch.manual_seed(0)
    model = create_model(model_name, img_size=[size] * 3)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cfg = from_dict(DistributedConfig, {"zero_stage": stage, "precision": precision})
    engine = create_engine(
        model,
        build_optimizer(model, from_dict(OptimConfig, {}), 1e-4, "cpu"),
        cfg,
        micro_batch=1,
        grad_accum=1,
        grad_clip=0.0,
    )
    x = torch.randn(1, model.cfg.in_chans, size, size, size, dtype=engine.dtype, device=engine.device)
    loss, _, _ = engine(x)
    engine.backward(loss)
    engine.step()
    identity = {"model_name": model_name, "model": {}}
    manager = CheckpointManager(out / f"s{stage}", engine, identity=identity, keep_last=2, results={"history": []})
    times = []
    for i in range(2):  # the first save also pays for creating folders and warming the page cache
        dist.barrier()
        t0 = time.perf_counter()
        manager.save(i + 1, client_state={}, rank_record={}, metrics={})
        dist.barrier()
        times.append(time.perf_counter() - t0)
    ckpt = out / f"s{stage}" / "checkpoints" / "step-00000002"
    t0 = time.perf_counter()
    assert verify_checkpoint(ckpt) is None
    verify_s = round(time.perf_counter() - t0, 3)
    universal_s = None
    if stage > 0:  # what a resumed run on another worker count does first (Engine.load): ds_to_universal, timed
        dist.barrier()
        t0 = time.perf_counter()
        folder = engine._to_universal(ckpt, "step-00000002")
        universal_s = round(time.perf_counter() - t0, 3)
        if dist.get_rank() == 0:
            shutil.rmtree(folder, ignore_errors=True)
    files = [p for p in (ckpt / "step-00000002").iterdir() if p.is_file()]
    per_rank: dict[int, int] = {}
    for p in files:  # ..._zero_pp_rank_<r>_... is rank r's shard; mp_rank_00_model_states.pt and metadata: rank 0
        match = re.search(r"zero_pp_rank_(\d+)_", p.name)
        rank = int(match.group(1)) if match else 0
        per_rank[rank] = per_rank.get(rank, 0) + p.stat().st_size
    return {
        "model": model_name,
        "params": params,
        "stage": stage,
        "precision": precision,
        "world_size": dist.get_world_size(),
        "bytes": sum(p.stat().st_size for p in files),
        "largest_rank_bytes": max(per_rank.values()),
        "files": len(files),
        "save_s": round(times[-1], 3),
        "verify_s": verify_s,
        "to_universal_s": universal_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mae_vit_3d_debug")
    ap.add_argument("--size", type=int, default=32, help="cubic crop edge of the one training step")
    ap.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--precision", default="bf16")
    args = ap.parse_args()
    # one folder for all ranks (torchrun on one machine): named after the rendezvous port every rank shares
    out = Path(tempfile.gettempdir()) / f"medmae-bench-checkpoint-{os.environ.get('MASTER_PORT', '0')}"
    for stage in args.stages:
        row = measure(args.model, args.size, stage, args.precision, out)
        if dist.get_rank() == 0:
            print(json.dumps(row), flush=True)
            shutil.rmtree(out / f"s{stage}", ignore_errors=True)
        dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
