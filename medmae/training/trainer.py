"""One trainer for pretraining and fine-tuning: ``Trainer(cfg).train()`` in every worker process.

The same code runs in a Ray Train worker, under the ``deepspeed`` launcher or ``torchrun``, and as a single process;
``medmae.distributed`` hides which. The task spec (``medmae.tasks``) supplies the model, its loss, its validation and
its export.

Randomness: the model is initialised from ``run.seed`` alone, so every rank builds the same weights; then each rank
switches to its own stream derived from ``(run.seed, rank)`` for MAE masks, drop-path and augmentation. Every rank
writes its generator states (CPU, CUDA, NumPy) into the checkpoint and restores its own on resume.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medmae.config import from_dict, save_config, to_dict
from medmae.data import TrainStream, build_train_stream
from medmae.distributed import (
    broadcast_,
    checkpoint_dir,
    create_engine,
    init_process_group,
    latest_checkpoint_dir,
    mean_over_ranks,
    report,
    resolve_device,
)
from medmae.io import write_json_atomic
from medmae.models import train_flops_per_sample
from medmae.tasks import get_task
from medmae.training.config import JobConfig, derive
from medmae.training.logs import Board, Progress, memory_gib, peak_flops, setup_logging
from medmae.training.optim import build_optimizer, lr_at
from medmae.training.rng import RankState, rank_seed, seed_everything

logger = logging.getLogger(__name__)

STEP_PREFIX = "step-"
STARTS_FILE = "starts.jsonl"  # run directory: step resumed from, worker count and batch arithmetic of each start
FAIL_AT_STEP_ENV = "MEDMAE_TEST_FAIL_AT_STEP"  # test hook, not a user setting: the last rank dies once at this step


def run_dir_of(cfg: JobConfig) -> Path:
    return Path(cfg.run.output_dir).expanduser().resolve() / cfg.run.name


class Trainer:
    def __init__(self, cfg: JobConfig) -> None:
        self.cfg = cfg
        self.task = get_task(cfg)
        self.rank, self.world_size = init_process_group(cfg.dist.backend)
        setup_logging(self.rank)
        self.run_dir = run_dir_of(cfg)
        self.derived = derive(cfg, self.world_size)
        if self.derived.micro_batch != cfg.train.micro_batch and self.rank == 0:
            logger.warning(
                "train.micro_batch %d does not divide global batch %d over %d workers: using %d x %d accumulation",
                cfg.train.micro_batch,
                self.derived.global_batch,
                self.world_size,
                self.derived.micro_batch,
                self.derived.grad_accum,
            )
        self.model_cfg = cfg.model_config()
        seed_everything(cfg.run.seed)  # identical initial weights on every rank
        model = self.task.build_model()
        model.set_grad_checkpointing(cfg.train.grad_checkpointing)
        optimizer = build_optimizer(model, cfg.optim, self.derived.lr, resolve_device().type)
        self.engine = create_engine(
            model,
            optimizer,
            cfg.dist,
            micro_batch=self.derived.micro_batch,
            grad_accum=self.derived.grad_accum,
            grad_clip=cfg.optim.grad_clip,
        )
        self.device = self.engine.device
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed crop and window sizes: UNETR's 3-D convolutions tune once
            torch.set_float32_matmul_precision("high")  # fp32 runs use TF32 tensor cores (peak_flops counts it)
        seed_everything(rank_seed(cfg.run.seed, self.rank))  # from here on every rank draws its own numbers
        # Built once: its workers and resident volumes live for the whole run. On CUDA the crops come out in the
        # compute dtype straight from the crop kernel; on a CPU that cast costs more there than in the model.
        self.data = build_train_stream(
            cfg.data,
            batch_size=self.derived.micro_batch,
            rank=self.rank,
            world_size=self.world_size,
            seed=cfg.run.seed,
            with_labels=self.task.with_labels,
            device=self.device,
            dtype=self.engine.dtype if self.device.type == "cuda" else torch.float32,
        )
        self.step = 0
        self._best_state: dict[str, torch.Tensor] = {}
        self.board = Board(self.run_dir, self.rank)
        self.results: dict[str, Any] = {
            "task": cfg.task,
            "metric": self.task.metric,
            "metric_groups": list(self.task.metric_groups),
            "best": None,
            "history": [],
        }
        if self.rank == 0:
            save_config(
                cfg,
                self.run_dir / "config.yaml",
                extra={"derived": self.derived.as_dict(), "model_resolved": to_dict(self.model_cfg)},
            )
            logger.info("run %s: %s", self.run_dir, self.derived.as_dict())
        self.resume()
        if self.rank == 0:  # one line per (re)start: where an elastic run resized or restarted, at what batch split
            with open(self.run_dir / STARTS_FILE, "a") as f:
                f.write(json.dumps({"step": self.step, "time": time.time(), **self.derived.as_dict()}) + "\n")

    # ---- checkpoints ------------------------------------------------------------------------------------------------
    def client_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "model_name": self.cfg.model["name"],
            "model": to_dict(self.model_cfg),
            "global_batch": self.derived.global_batch,
            "results": self.results,
        }

    def resume(self) -> None:
        ckpt = latest_checkpoint_dir(self.run_dir / "checkpoints")
        if ckpt is None:
            return
        state = self.engine.load(ckpt)
        saved_model = {k: v for k, v in (state.get("model") or {}).items() if k != "grad_checkpointing"}
        if saved_model != to_dict(self.model_cfg) or state.get("model_name") != self.cfg.model["name"]:
            raise ValueError(
                f"checkpoint {ckpt} was written for model {state.get('model_name')} {saved_model}; "
                f"this run builds {self.cfg.model['name']} {to_dict(self.model_cfg)}: refusing to resume into a "
                "different architecture (use a new run.name)"
            )
        self.step = int(state["step"])
        self.results = state.get("results", self.results)
        tag = f"{STEP_PREFIX}{self.step:08d}"
        record = RankState.load(ckpt / tag, self.rank)
        if record is None:  # a worker the checkpoint did not have (the run grew)
            seed_everything(rank_seed(self.cfg.run.seed, self.rank, self.step))
            logger.info("no saved random state for rank %d: a fresh stream from (seed, rank, step)", self.rank)
        elif record.get("data"):
            self.data.load_state_dict(record["data"])  # the stream continues its epoch where it was
        logger.info(
            "resumed from %s at step %d (written with global batch %s, now %d)",
            ckpt,
            self.step,
            state.get("global_batch"),
            self.derived.global_batch,
        )

    def save_checkpoint(self, metrics: dict[str, float], final: bool = False) -> None:
        """Every rank writes its shard and its random state; under Ray the files become the reported checkpoint."""
        name = f"{STEP_PREFIX}{self.step:08d}"
        with checkpoint_dir(self.run_dir / "checkpoints", name) as d:
            # before the engine's marker file, which says "complete"
            RankState.save(d / name, self.rank, extra={"data": self.data.state_dict()})
            self.engine.save(d, tag=name, client_state=self.client_state())
            if final:
                self.export(Path(d))
            report({**metrics, "step": self.step}, d)
        self.prune_checkpoints()

    def prune_checkpoints(self) -> None:
        root = self.run_dir / "checkpoints"
        if self.rank != 0 or not root.is_dir():
            return
        steps = sorted(p for p in root.iterdir() if p.name.startswith(STEP_PREFIX))
        for old in steps[: -self.cfg.run.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def export(self, extra_dir: Path | None = None, filename: str | None = None) -> dict[str, torch.Tensor]:
        """Consolidated fp32 weights through the task (MAE: ``encoder.safetensors``) into the run directory; returns
        them on rank 0 (``{}`` elsewhere)."""
        state = self.engine.consolidated_state_dict()  # collective
        if self.rank != 0:
            return state
        for path in self.task.export(state, self.model_cfg, self.run_dir, filename=filename):
            logger.info("exported %s", path)
            if extra_dir is not None:
                shutil.copy2(path, extra_dir / path.name)
        return state

    # ---- validation -------------------------------------------------------------------------------------------------
    def validate(self) -> dict[str, Any] | None:
        """Whole-volume validation on every rank's share; logs, updates results.json and the best model."""
        res = self.task.validate(
            self.engine.module, self.model_cfg, self.rank, self.world_size, self.device, self.engine.dtype
        )
        if res is None:
            return None
        res = {"step": self.step, **res}
        flat = {k: v for k, v in res.items() if isinstance(v, float)}
        for group in self.task.metric_groups:
            flat.update({f"{group}/{k}": v for k, v in res.get(group, {}).items()})
        self.board.scalars(flat, self.step, prefix="val/")
        self.results["history"].append(res)
        best = self.results["best"]
        if best is None or (np.isfinite(res["score"]) and not res["score"] <= best["score"]):
            self.results["best"] = res
            best_state = self.export(filename="best_model.safetensors")  # collective
            if self.task.has_split("test"):  # kept (rank 0, CPU) to score the best model on the test split at the end
                self._best_state = best_state
        if self.rank == 0:
            write_json_atomic(self.run_dir / "results.json", self.results)
            logger.info(
                "validation at step %d: score %.4f (best %.4f at step %d)",
                self.step,
                res["score"],
                self.results["best"]["score"],
                self.results["best"]["step"],
            )
        return res

    def test(self) -> dict[str, Any] | None:
        """The best model by validation score, scored once on the dataset's test split (ChestX-ray14's official
        test list): the number to report, never used to select anything. Runs after the final checkpoint, since it
        loads the best weights into the model."""
        if self.results["best"] is None or not self.task.has_split("test"):
            return None
        best = self._best_state if self.rank == 0 else {}
        if self.rank == 0 and not best:  # a resumed run: the best weights are only on disk
            from safetensors.torch import load_file

            best = load_file(str(self.run_dir / "best_model.safetensors"))
        with torch.no_grad():
            for name, value in self.engine.module.state_dict().items():
                incoming = best[name].to(value.device, value.dtype) if self.rank == 0 else torch.empty_like(value)
                value.copy_(broadcast_(incoming))
        res = self.task.validate(
            self.engine.module, self.model_cfg, self.rank, self.world_size, self.device, self.engine.dtype, split="test"
        )
        if res is None:
            return None
        res = {"step": self.results["best"]["step"], **res}
        self.board.scalars({k: v for k, v in res.items() if isinstance(v, float)}, self.step, prefix="test/")
        self.results["test"] = res
        if self.rank == 0:
            write_json_atomic(self.run_dir / "results.json", self.results)
            logger.info("test split, best model (step %d): score %.4f", res["step"], res["score"])
        return res

    # ---- training ---------------------------------------------------------------------------------------------------
    def train_step(self, data: TrainStream) -> dict[str, Any]:
        """One optimizer step over ``grad_accum`` micro-batches. Returns the last micro-batch and its outputs too."""
        lr = lr_at(
            self.step,
            peak=self.derived.lr,
            warmup=self.cfg.optim.warmup_steps,
            total=self.cfg.train.max_steps,
            floor=self.cfg.optim.min_lr,
        )
        self.engine.set_lr(lr)
        total = torch.zeros((), device=self.device)
        for _ in range(self.derived.grad_accum):
            batch = next(data)
            batch["image"] = batch["image"].to(self.engine.dtype)
            loss, out = self.task.loss(self.engine, batch)
            self.engine.backward(loss)
            self.engine.step()
            total += loss.detach().float()
        self.step += 1
        return {"loss": total / self.derived.grad_accum, "lr": lr, "batch": batch, "out": out}

    def maybe_fail(self) -> None:
        """Test hook (``MEDMAE_TEST_FAIL_AT_STEP``): the last rank kills its own process once at that step."""
        fail_at = int(os.environ.get(FAIL_AT_STEP_ENV, "-1"))
        if self.step != fail_at or self.rank != self.world_size - 1:
            return
        marker = self.run_dir / ".fail_injected"
        if not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(str(self.step))
            logger.warning("%s: killing this worker at step %d", FAIL_AT_STEP_ENV, self.step)
            # Ray's controller collects reports by polling; a worker that dies right after reporting can take its
            # latest checkpoint with it. Waiting a few poll intervals makes the injected failure deterministic.
            time.sleep(3.0)
            os._exit(13)

    def train(self) -> dict[str, float]:
        cfg = self.cfg
        data = self.data
        progress = Progress(cfg.train.max_steps, self.step)
        flops = train_flops_per_sample(cfg.model["name"], self.model_cfg) * self.derived.global_batch
        peak = peak_flops(self.device, self.engine.dtype)
        metrics: dict[str, float] = {}
        if self.step >= cfg.train.max_steps:
            logger.info(
                "run already complete at step %d (train.max_steps=%d): exporting only", self.step, cfg.train.max_steps
            )
            self.export()
            self.data.close()
            self.board.close()
            return metrics
        t0 = time.perf_counter()
        loss_sum, steps_in_interval = torch.zeros((), device=self.device), 0
        while self.step < cfg.train.max_steps:
            self.maybe_fail()
            out = self.train_step(data)
            loss_sum += out["loss"]  # stays on the device: no host sync until the log line
            steps_in_interval += 1
            if self.step % cfg.run.log_every == 0 or self.step in (1, cfg.train.max_steps):
                dt = (time.perf_counter() - t0) / steps_in_interval
                metrics = {
                    "loss": mean_over_ranks(loss_sum / steps_in_interval),
                    "lr": out["lr"],
                    "grad_norm": self.engine.grad_norm(),
                    "step_time_s": dt,
                    "volumes_per_s": self.derived.global_batch / dt,
                    "tokens_per_s": self.derived.global_batch * self.model_cfg.num_patches / dt,
                    "memory_gib": memory_gib(self.device),
                }
                if peak:
                    metrics["mfu"] = flops / dt / (peak * self.world_size)
                # one metrics.jsonl line per logged step: the step's training scalars and the data stream's counters
                self.board.scalars(
                    {
                        **{f"train/{k}": v for k, v in metrics.items()},
                        **{f"data/{k}": v for k, v in self.data.stats().items()},
                    },
                    self.step,
                )
                if self.rank == 0:
                    progress.update(self.step - 1, metrics)
                t0 = time.perf_counter()
                loss_sum, steps_in_interval = torch.zeros((), device=self.device), 0
            if cfg.run.image_every and self.step % cfg.run.image_every == 0 and self.rank == 0:
                img = self.task.image(self.engine.module, out["batch"], out["out"])
                if img is not None:
                    self.board.image("train/input|masked|reconstruction", img, self.step)
            checkpoint_now = self.step % cfg.run.checkpoint_every == 0 and self.step < cfg.train.max_steps
            if cfg.run.val_every and self.step % cfg.run.val_every == 0 and self.step < cfg.train.max_steps:
                res = self.validate()
                if res is not None:
                    metrics = {**metrics, "val_score": res["score"]}
                    if not checkpoint_now:  # Ray Tune schedulers (ASHA) decide on these reports
                        report({**metrics, "step": self.step})
            if checkpoint_now:
                self.save_checkpoint(metrics)
        final = self.validate()
        if final is not None:
            metrics = {**metrics, "val_score": final["score"]}
        self.save_checkpoint(metrics, final=True)
        self.data.close()
        self.test()
        self.board.close()
        return metrics


def train_worker(job: dict[str, Any]) -> None:
    """Entry point of every worker process: ``job["config"]`` is the resolved config as plain data."""
    cfg = from_dict(JobConfig, job["config"])
    Trainer(cfg).train()
