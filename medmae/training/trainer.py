"""One trainer for pretraining and fine-tuning: ``Trainer(cfg).train()`` in every worker process.

The same code runs in a Ray Train worker, under the ``deepspeed`` launcher or ``torchrun``, and as a single process;
``medmae.distributed`` hides which. The task spec (``medmae.tasks``) supplies the model, its loss, its validation and
its export; ``CheckpointManager`` owns checkpoints and results; ``StepMetrics`` keeps the step's numbers on the
device until a log step reads them. The trainer is the loop.

Randomness: the model is initialised from ``run.seed`` alone, so every rank builds the same weights; then each rank
switches to its own stream derived from ``(run.seed, rank)`` for MAE masks, drop-path and augmentation. Every rank
writes its generator states (CPU, CUDA, NumPy) into the checkpoint and restores its own on resume.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from medmae.config import from_dict, save_config, to_dict
from medmae.data import TrainStream, build_train_stream
from medmae.distributed import (
    create_engine,
    init_process_group,
    optimizer_layout,
    preemption_pending,
    report,
    resolve_device,
)
from medmae.models import train_flops_per_sample
from medmae.tasks import EvalContext, get_task
from medmae.training import faults
from medmae.training.checkpoint import CheckpointManager
from medmae.training.compile import compile_training_forward
from medmae.training.config import JobConfig, derive
from medmae.training.logs import Board, Progress, memory_gib, peak_flops, setup_logging
from medmae.training.metrics import StepMetrics
from medmae.training.optim import build_optimizer, lr_at
from medmae.training.preemption import Preempted, SigtermFlag
from medmae.training.probe import Probe
from medmae.training.rng import rank_seed, seed_everything

logger = logging.getLogger(__name__)

STARTS_FILE = "starts.jsonl"  # run directory: step resumed from, worker count and batch arithmetic of each start


class DivergedError(RuntimeError):
    """Training produced non-finite losses or gradients for more steps in a row than ``train.max_bad_steps``."""


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
        device_type = resolve_device().type
        optimizer = build_optimizer(
            model, cfg.optim, self.derived.lr, device_type, layout=optimizer_layout(cfg.dist, device_type)
        )
        self.engine = create_engine(
            model,
            optimizer,
            cfg.dist,
            micro_batch=self.derived.micro_batch,
            grad_accum=self.derived.grad_accum,
            grad_clip=cfg.optim.grad_clip,
        )
        self.device = self.engine.device
        if cfg.train.compile != "off":
            compile_training_forward(self.engine.module, cfg.train.compile)
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
        self.sigterm, self.stop_requested, self.bad_now = SigtermFlag(), False, False
        self.board = Board(self.run_dir, self.rank)
        self.metrics = StepMetrics(self.device, cfg.train.loss_spike)
        self.flops = train_flops_per_sample(cfg.model["name"], self.model_cfg) * self.derived.global_batch
        self.peak = peak_flops(self.device, self.engine.dtype)
        results = {
            "task": cfg.task,
            "metric": self.task.metric,
            "metric_groups": list(self.task.metric_groups),
            "best": None,
            "history": [],
        }
        identity = {"model_name": cfg.model["name"], "model": to_dict(self.model_cfg)}
        self.ckpt = CheckpointManager(
            self.run_dir,
            self.engine,
            identity=identity,
            keep_last=cfg.run.keep_last,
            results=results,
            model_defaults=to_dict(type(self.model_cfg)()),
        )
        if self.rank == 0:
            save_config(
                cfg,
                self.run_dir / "config.yaml",
                extra={"derived": self.derived.as_dict(), "model_resolved": to_dict(self.model_cfg)},
            )
            logger.info("run %s: %s", self.run_dir, self.derived.as_dict())
        self.resume()
        self.probe = Probe.create(cfg, self.run_dir, self.rank, self.model_cfg, self.step)  # rank 0, when on
        if self.rank == 0:  # one line per (re)start: where an elastic run resized or restarted, at what batch split
            with open(self.run_dir / STARTS_FILE, "a") as f:
                f.write(json.dumps({"step": self.step, "time": time.time(), **self.derived.as_dict()}) + "\n")

    # ---- checkpoints ------------------------------------------------------------------------------------------------
    def resume(self) -> None:
        state, record = self.ckpt.resume(self.cfg.run.seed)
        self.step = int(state["step"])
        self.metrics.mean.fill_(float(state.get("loss_mean", 0.0)))  # the spike rule's baseline carries over
        if record and record.get("data"):
            self.data.load_state_dict(record["data"])  # the stream continues its epoch where it was

    def save_checkpoint(self, metrics: dict[str, float], final: bool = False) -> None:
        """Every rank writes its shard and its random state; under Ray the files become the reported checkpoint."""
        self.ckpt.save(
            self.step,
            client_state={"global_batch": self.derived.global_batch, "loss_mean": float(self.metrics.mean)},
            rank_record={"data": self.data.state_dict()},
            metrics=metrics,
            extra=self.export if final else None,
        )

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
    def eval_context(self) -> EvalContext:
        return EvalContext(
            self.engine.module, self.model_cfg, self.rank, self.world_size, self.device, self.engine.dtype
        )

    def validate(self) -> dict[str, Any] | None:
        """Whole-volume validation of the task's selection split on every rank's share; logs, updates results.json
        and the best model."""
        split = self.task.selection_split()
        with self.engine.autocast_context():
            res = self.task.validate(self.eval_context(), split=split)
        if res is None:
            return None
        res = {"step": self.step, "split": split, **res}
        flat = {k: v for k, v in res.items() if isinstance(v, float)}
        for group in self.task.metric_groups:
            flat.update({f"{group}/{k}": v for k, v in res.get(group, {}).items()})
        self.board.scalars(flat, self.step, prefix="val/")
        if self.ckpt.record_validation(res):
            best_state = self.export(filename="best_model.safetensors")  # collective
            if self.task.report_split():  # kept (rank 0, CPU) to score the best model on the report split at the end
                self.ckpt.best_state = best_state
        self.ckpt.write_results()
        best = self.ckpt.results["best"]
        logger.info(
            "validation at step %d: score %.4f (best %.4f at step %d)",
            self.step,
            res["score"],
            best["score"],
            best["step"],
        )
        return res

    def test(self) -> dict[str, Any] | None:
        """The best model by selection score, scored once on the task's report split (ChestX-ray14's official test
        list, or the validation split when a selection split was carved from training): the number to report,
        never used to select anything. Runs after the final checkpoint, since it loads the best weights into the
        model."""
        best = self.ckpt.results["best"]
        split = self.task.report_split()
        if best is None or split is None:
            return None
        self.ckpt.load_best_into(self.engine.module)
        with self.engine.autocast_context():
            res = self.task.validate(self.eval_context(), split=split)
        if res is None:
            return None
        res = {"step": best["step"], "split": split, **res}
        self.board.scalars({k: v for k, v in res.items() if isinstance(v, float)}, self.step, prefix="test/")
        self.ckpt.results["test"] = res
        self.ckpt.write_results()
        logger.info("%s split, best model (step %d): score %.4f", split, res["step"], res["score"])
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
        self.metrics.update(total / self.derived.grad_accum, self.engine.grad_norm_tensor())
        return {"lr": lr, "batch": batch, "out": out}

    def read_metrics(self, lr: float, t0: float) -> dict[str, float]:
        """Collective: the interval's numbers, read from the device once; stops a diverged run (no checkpoint,
        no export of its state)."""
        steps = self.metrics.steps
        m = self.metrics.read(self.world_size, stop=self.sigterm.raised)
        self.stop_requested = m["stop"] > 0
        dt = (time.perf_counter() - t0) / max(1, steps)  # after the read: the step's work is done
        self.metrics.reset()
        self.bad_now = m["bad_now"] > 0  # the step just taken was bad: its state is not saved
        last = self.step == self.cfg.train.max_steps
        if max(m["bad_run"], m["bad_now"]) > self.cfg.train.max_bad_steps or (last and self.bad_now):
            raise DivergedError(
                f"step {self.step}: non-finite or exploding loss or gradient norm in {int(m['bad_steps'])} of the "
                f"last {steps} steps ({int(max(m['bad_run'], m['bad_now']))} in a row, train.max_bad_steps="
                f"{self.cfg.train.max_bad_steps}); the run stops without saving this state. The last good checkpoint "
                f"is {self.ckpt.last_good or '(none)'}: lower optim.base_lr or add optim.grad_clip, then re-run"
            )
        out = {
            "loss": m["loss"],
            "lr": lr,
            "grad_norm": m["grad_norm"],
            "bad_steps": m["bad_steps"],
            "step_time_s": dt,
            "volumes_per_s": self.derived.global_batch / dt,
            "tokens_per_s": self.derived.global_batch * self.model_cfg.num_patches / dt,
            "memory_gib": memory_gib(self.device),
        }
        if self.peak:
            out["mfu"] = self.flops / dt / (self.peak * self.world_size)
        return out

    def train(self) -> dict[str, float]:
        """The run: steps to ``train.max_steps`` (logging, validating and checkpointing on their cadences), then a
        final validation, checkpoint and export; raises :class:`Preempted` after saving on a SIGTERM."""
        cfg = self.cfg
        progress = Progress(cfg.train.max_steps, self.step)
        metrics: dict[str, float] = {}
        if self.step >= cfg.train.max_steps:
            logger.info(
                "run already complete at step %d (train.max_steps=%d): exporting only", self.step, cfg.train.max_steps
            )
            self.export()
            self.data.close()
            self.board.close()
            return metrics
        self.sigterm.install()
        try:
            metrics = self._loop(progress)
        finally:
            self.sigterm.uninstall()
        final = self.validate()
        if final is not None:
            metrics = {**metrics, "val_score": final["score"]}
        self.save_checkpoint(metrics, final=True)
        self.data.close()
        self.test()
        self.board.close()
        return metrics

    def _loop(self, progress: Progress) -> dict[str, float]:
        cfg, data, drained = self.cfg, self.data, False
        metrics: dict[str, float] = {}
        t0 = time.perf_counter()
        while self.step < cfg.train.max_steps:
            faults.before_step(self.step, self.rank, self.world_size, self.run_dir)
            out = self.train_step(data)
            last = self.step == cfg.train.max_steps
            checkpoint_now = self.step % cfg.run.checkpoint_every == 0 and not last
            validate_now = bool(cfg.run.val_every) and self.step % cfg.run.val_every == 0 and not last
            # every step that saves or validates reads the metrics first: a non-finite state is never kept
            log_now = self.step % cfg.run.log_every == 0 or self.step == 1 or last or checkpoint_now or validate_now
            if log_now:
                metrics = self.read_metrics(out["lr"], t0)
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
            if cfg.run.image_every and self.step % cfg.run.image_every == 0 and self.rank == 0:
                img = self.task.image(self.engine.module, out["batch"], out["out"])
                if img is not None:
                    self.board.image("train/input|masked|reconstruction", img, self.step)
            if validate_now:
                res = self.validate()
                if res is not None:
                    metrics = {**metrics, "val_score": res["score"]}
                    if not checkpoint_now:  # Ray Tune schedulers (ASHA) decide on these reports
                        report({**metrics, "step": self.step})
            if self.stop_requested and not last:  # SIGTERM on some rank: save here, stop, resume on re-run
                self.save_checkpoint(metrics)
                self.data.close()
                self.board.close()
                raise Preempted(f"stopped at step {self.step} on SIGTERM; {self.ckpt.last_good} resumes the run")
            if log_now and not drained and preemption_pending():  # Ray drains a node: save now, go on
                drained = checkpoint_now = True
                logger.warning("a node of this run is being drained: saving a checkpoint at step %d", self.step)
            if checkpoint_now and self.bad_now:
                logger.warning("step %d was a bad step: no checkpoint of its state", self.step)
            elif checkpoint_now:
                self.save_checkpoint(metrics)
            if self.probe is not None:
                self.probe.after_step(self.step, self.engine, self.board)
        return metrics


def train_worker(job: dict[str, Any]) -> None:
    """Entry point of every worker process: ``job["config"]`` is the resolved config as plain data."""
    cfg = from_dict(JobConfig, job["config"])
    Trainer(cfg).train()
