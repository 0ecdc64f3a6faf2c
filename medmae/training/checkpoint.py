"""Step checkpoints of one run and the run's results, beside the trainer's loop (torchtitan's ``CheckpointManager``).

Layout: ``<run_dir>/checkpoints/step-NNNNNNNN/`` (under Ray the run's storage, ``checkpoint_<time>/``) holds
DeepSpeed's files for tag ``step-NNNNNNNN`` (model, optimizer, schedule, our client state), each rank's random and
data-stream state (``rank_state_<r>.json``), ``medmae_dist.json`` (world size, stage, precision) and, written last by
each rank, ``medmae_files_<r>.json``: the size and CRC-32 of every file that rank wrote. A checkpoint is complete
when every rank's list is there, and sound when every listed file has its size and checksum. CRC-32 (zlib) runs at
~2 GB/s on one core here, so checking a ViT-B MAE rank's ~1.5 GB costs about a second at save and at resume.

Resuming takes the newest checkpoint that verifies on every rank, warning with the file that failed for each one
it skips; a checkpoint written for another architecture is refused. ``results.json`` (validation history, best,
test) and ``best_model.safetensors`` are the run's results, written by rank 0.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from medmae.distributed import all_reduce_sum, broadcast_, checkpoint_candidates, checkpoint_dir, report
from medmae.io import write_json_atomic
from medmae.training.rng import RankState, rank_seed, seed_everything

__all__ = ["CheckpointManager", "CheckpointError", "verify_checkpoint", "STEP_PREFIX"]

logger = logging.getLogger(__name__)

STEP_PREFIX = "step-"
FILES = "medmae_files_{:05d}.json"
CHUNK = 8 << 20


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the path and what to do."""


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def file_list(folder: Path) -> dict[str, list[int]]:
    """``{relative path: [size, crc32]}`` of every file under ``folder``."""
    return {str(p.relative_to(folder)): [p.stat().st_size, _crc32(p)] for p in sorted(folder.rglob("*")) if p.is_file()}


def verify_checkpoint(ckpt: Path) -> str | None:
    """None when ``ckpt`` is complete and every file has the size and CRC-32 its writer recorded, else the first
    problem, naming the file. A checkpoint written before the lists existed is taken as it is."""
    lists = sorted(ckpt.rglob("medmae_files_*.json"))
    metas = list(ckpt.glob(f"{STEP_PREFIX}*/medmae_dist.json"))
    if not metas:
        return f"{ckpt}: no medmae_dist.json (an incomplete checkpoint)"
    if not lists:
        logger.debug("%s has no file lists (written by an older medmae): not verified", ckpt)
        return None
    world = json.loads(metas[0].read_text())["world_size"]
    if len(lists) != world:
        return f"{ckpt}: file lists of {len(lists)} of its {world} ranks (an incomplete checkpoint)"
    for listing in lists:
        try:
            files = json.loads(listing.read_text())
        except ValueError as e:
            return f"{listing}: unreadable ({e})"
        for rel, (size, crc) in files.items():
            path = ckpt / rel
            if not path.is_file():
                return f"{path}: missing"
            if path.stat().st_size != size:
                return f"{path}: {path.stat().st_size} bytes, {size} written"
            if _crc32(path) != crc:
                return f"{path}: checksum differs from the one written"
    return None


def same_architecture_as(saved: dict[str, Any], current: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``saved`` (a checkpoint's model config) as this version would write it, to compare with ``current``: a key
    added to the model config after the checkpoint was written ran at its default (a new key's default keeps the old
    behaviour), so it takes that default; ``grad_checkpointing`` changes memory, not the architecture."""
    filled = {k: defaults[k] for k in current.keys() - saved.keys() if k in defaults}
    return {k: v for k, v in {**filled, **saved}.items() if k != "grad_checkpointing"}


class CheckpointManager:
    """Save, verify, resume and prune a run's checkpoints; keep its ``results.json`` and best model.

    ``identity`` (the model's name and resolved config) is stored in every checkpoint and compared on resume.
    """

    def __init__(
        self,
        run_dir: Path,
        engine: Any,
        *,
        identity: dict[str, Any],
        keep_last: int,
        results: dict[str, Any],
        model_defaults: dict[str, Any] | None = None,
    ) -> None:
        self.run_dir, self.root, self.engine = run_dir, run_dir / "checkpoints", engine
        self.identity, self.keep_last = identity, keep_last
        self.model_defaults = model_defaults or {}
        self.rank, self.world_size = engine.rank, engine.world_size
        self.results = results
        self.best_state: dict[str, torch.Tensor] = {}
        self.last_good: Path | None = None

    # ---- resume ------------------------------------------------------------------------------------------------
    def _any_rank(self, flag: bool) -> bool:
        return bool(all_reduce_sum(torch.tensor(float(flag), device=self.engine.device)).item() > 0)

    def resume(self, seed: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Collective: load the newest checkpoint that verifies on every rank. Returns ``(client state, this rank's
        saved record)`` (``({"step": 0}, None)`` without one); restores this rank's random streams, or gives a rank
        the checkpoint did not have a fresh stream from ``(seed, rank, step)``."""
        skipped = []
        for ckpt in checkpoint_candidates(self.root):
            problem = verify_checkpoint(ckpt)
            if self._any_rank(problem is not None):
                skipped.append(str(ckpt))
                logger.warning("skipping checkpoint %s: %s", ckpt, problem or "it failed on another rank")
                continue
            state = self.engine.load(ckpt)
            self._check_identity(ckpt, state)
            step = int(state["step"])
            self.results.update(state.get("results") or {})
            self.last_good = ckpt
            record = RankState.load(ckpt / f"{STEP_PREFIX}{step:08d}", self.rank)
            if record is None:  # a worker the checkpoint did not have (the run grew)
                seed_everything(rank_seed(seed, self.rank, step))
                logger.info("no saved random state for rank %d: a fresh stream from (seed, rank, step)", self.rank)
            logger.info(
                "resumed from %s at step %d (written with global batch %s)", ckpt, step, state.get("global_batch")
            )
            return state, record
        if skipped:
            raise CheckpointError(
                f"no checkpoint of {self.run_dir} passes verification (skipped {skipped}); move them away to start "
                "the run afresh, or use a new run.name"
            )
        return {"step": 0}, None

    def _check_identity(self, ckpt: Path, state: dict[str, Any]) -> None:
        saved = same_architecture_as(state.get("model") or {}, self.identity["model"], self.model_defaults)
        if saved != self.identity["model"] or state.get("model_name") != self.identity["model_name"]:
            raise ValueError(
                f"checkpoint {ckpt} was written for model {state.get('model_name')} {saved}; this run builds "
                f"{self.identity['model_name']} {self.identity['model']}: refusing to resume into a different "
                "architecture (use a new run.name)"
            )

    # ---- save --------------------------------------------------------------------------------------------------
    def save(
        self,
        step: int,
        *,
        client_state: dict[str, Any],
        rank_record: dict[str, Any],
        metrics: dict[str, float],
        extra: Callable[[Path], Any] | None = None,
    ) -> None:
        """Collective: every rank writes its shard, its random state and ``rank_record``, then ``extra(folder)``
        (the final export), then the list of what it wrote; under Ray the folders become the reported checkpoint.
        A rank that cannot write (a full disk) leaves the previous checkpoints as they are, and every rank stops
        with an error naming the path."""
        name = f"{STEP_PREFIX}{step:08d}"
        state = {**client_state, **self.identity, "step": step, "results": self.results}
        with checkpoint_dir(self.root, name) as d:
            error = None
            try:
                RankState.save(d / name, self.rank, extra=rank_record)
                self.engine.save(d, tag=name, client_state=state)
                if extra is not None:
                    extra(d)
                write_json_atomic(d / name / FILES.format(self.rank), file_list(d))
            except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
                error = e
            if self._any_rank(error is not None):
                raise self._write_error(d, error)
            report({**metrics, "step": step}, d)
        self.last_good = self.root / name
        self.prune()

    def _write_error(self, folder: Path, error: Exception | None) -> CheckpointError:
        shutil.rmtree(folder, ignore_errors=True)  # the partial files; the checkpoints before it stay
        if error is None:
            return CheckpointError(f"another rank could not write its part of the checkpoint in {folder.parent}")
        free = shutil.disk_usage(self.root if self.root.exists() else self.run_dir).free
        need = self._last_size()
        full = getattr(error, "errno", None) == errno.ENOSPC or free < max(need, 1 << 20)
        what = "No space left on device" if full else str(getattr(error, "strerror", None) or error)
        return CheckpointError(
            f"cannot write checkpoint files to {folder} ({what}; {free / 2**20:.1f} MiB free, the previous checkpoint "
            f"took {need / 2**20:.1f} MiB); the previous checkpoint {self.last_good or '(none)'} is intact: free "
            "space and re-run to resume from it"
        )

    def _last_size(self) -> int:
        if self.last_good is None or not self.last_good.is_dir():
            return 0
        return sum(p.stat().st_size for p in self.last_good.rglob("*") if p.is_file())

    def prune(self) -> None:
        """Keep the newest ``keep_last`` complete checkpoints on disk (rank 0; Ray prunes its own storage)."""
        if self.rank != 0 or not self.root.is_dir():
            return
        steps = sorted(p for p in self.root.iterdir() if p.name.startswith(STEP_PREFIX))
        for old in steps[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    # ---- results -----------------------------------------------------------------------------------------------
    def record_validation(self, res: dict[str, Any]) -> bool:
        """Add a validation result to the history; True when it is the new best (the caller exports it)."""
        self.results["history"].append(res)
        best = self.results["best"]
        is_best = best is None or (math.isfinite(res["score"]) and not res["score"] <= best["score"])
        if is_best:
            self.results["best"] = res
        return is_best

    def write_results(self) -> None:
        if self.rank == 0:
            write_json_atomic(self.run_dir / "results.json", self.results)

    def load_best_into(self, module: torch.nn.Module) -> None:
        """Collective: the best model's weights (kept on rank 0 at export, else read from its file) into every
        rank's ``module``."""
        best = self.best_state if self.rank == 0 else {}
        if self.rank == 0 and not best:  # a resumed run: the best weights are only on disk
            from safetensors.torch import load_file

            best = load_file(str(self.run_dir / "best_model.safetensors"))
        with torch.no_grad():
            for name, value in module.state_dict().items():
                incoming = best[name].to(value.device, value.dtype) if self.rank == 0 else torch.empty_like(value)
                value.copy_(broadcast_(incoming))
