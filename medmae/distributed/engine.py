"""A DeepSpeed engine behind a small interface: forward, backward, step, lr, checkpoints, consolidated weights.

The same code runs inside a Ray Train worker (Ray has already started the process group; DeepSpeed reuses it), under
``deepspeed``/``torchrun`` (environment variables name rank and world), and as one plain process (world size 1).

Checkpoints are DeepSpeed's own ``save_checkpoint`` layout plus ``medmae_dist.json`` (world size, stage,
precision). Loading into a different world size converts the checkpoint to DeepSpeed's *universal* format
(``ds_to_universal``) and loads that, so parameters and Adam moments carry over exactly whatever the worker count.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from medmae.distributed.config import DistributedConfig
from medmae.distributed.deepspeed_config import (
    build_deepspeed_config,
    optimizer_layout,
    resolve_backend,
    resolve_device,
    resolve_precision,
)
from medmae.distributed.flat_adamw import FlatAdamW

__all__ = ["Engine", "create_engine", "import_deepspeed", "init_process_group"]

logger = logging.getLogger(__name__)

META_FILE = "medmae_dist.json"  # rank 0 writes it last: a step folder holding it is a complete checkpoint


def import_deepspeed():
    """Import DeepSpeed with its CPU accelerator selected on machines without CUDA (it probes at import time)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    return deepspeed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _end_own_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def init_process_group(backend: str = "auto") -> tuple[int, int]:
    """Reuse an existing process group (Ray Train), or start one from launcher variables or as a world of one.

    Returns ``(rank, world_size)``.
    """
    deepspeed = import_deepspeed()
    # DeepSpeed's CPU backend JIT-builds a shared-memory all-reduce op at init (~30 s of C++ compile on a fresh
    # machine, then a file lock every process takes), used only by its inference_all_reduce, which we never call.
    # Marking it incompatible is how DeepSpeed itself skips an op (the dict is cached for exactly such edits).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {}
        if "WORLD_SIZE" not in os.environ:
            # A plain single process: a world of one on a private port, passed as arguments rather than written
            # into os.environ, where every child process (tests, tools, launchers) would inherit a port we hold.
            kwargs = dict(init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        os.environ.setdefault("LOCAL_RANK", os.environ.get("RANK", "0"))
        deepspeed.init_distributed(
            dist_backend=resolve_backend(backend, resolve_device().type),
            auto_mpi_discovery=False,
            verbose=False,
            **kwargs,
        )
        # A group we started is ours to end. Left alive until interpreter teardown, gloo's threads meet their
        # destructors in no fixed order and the process aborts ("terminate called without an active exception")
        # after all its work is done: seen in about 1 of 4 two-process torchrun exits. Ray ends its own groups.
        atexit.register(_end_own_process_group)
    else:
        # DeepSpeed insists on LOCAL_RANK; Ray sets it, a hand-made single-node group may not.
        os.environ.setdefault("LOCAL_RANK", str(dist.get_rank()))
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False)
    return dist.get_rank(), dist.get_world_size()


class Engine:
    """Thin wrapper over a ``deepspeed.DeepSpeedEngine``; build it with :func:`create_engine`."""

    def __init__(
        self, ds_engine: Any, cfg: DistributedConfig, precision: str, device: torch.device, layout: str
    ) -> None:
        self._ds = ds_engine
        self.cfg = cfg
        self.precision = precision
        self.device = device
        self.layout = layout
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.autocast = precision == "bf16" and layout != "torch"  # DeepSpeed's torch-autocast mode

    @property
    def module(self) -> nn.Module:
        """The unwrapped model (under ZeRO-3 its parameters are partitioned outside forward)."""
        return self._ds.module

    @property
    def ds_engine(self) -> Any:
        """The underlying ``DeepSpeedEngine``, for what this wrapper does not cover."""
        return self._ds

    @property
    def dtype(self) -> torch.dtype:
        """Dtype the model computes in; inputs should be cast to it."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._ds(*args, **kwargs)

    forward = __call__

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch loss (DeepSpeed scales it by 1/grad_accum)."""
        self._ds.backward(loss)

    def step(self) -> bool:
        """Count one micro-batch; at an accumulation boundary also clip and step the optimizer. True at boundaries."""
        boundary = bool(self._ds.is_gradient_accumulation_boundary())
        self._ds.step()
        return boundary

    def autocast_context(self) -> Any:
        """What the engine's forward runs under, for forwards outside it (validation): bf16 autocast in the
        torch-autocast mode, else nothing (the parameters are in the compute dtype already)."""
        if self.autocast:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @property
    def client_optimizer(self) -> torch.optim.Optimizer:
        return self._ds.client_optimizer if getattr(self._ds, "client_optimizer", None) else self._ds.optimizer

    def set_lr(self, lr: float) -> None:
        """Set every param group's lr, times its ``lr_scale`` (layer-wise decay) when the group has one."""
        for group in self._ds.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def grad_norm_tensor(self) -> torch.Tensor | float | None:
        """Global gradient norm of the last optimizer step (before clipping): FlatAdamW's device tensor, or what
        DeepSpeed keeps (a tensor or a float); reading it is the caller's sync."""
        opt = self.client_optimizer
        if isinstance(opt, FlatAdamW):
            return opt.grad_norm
        return self._ds.get_global_grad_norm()

    # -- checkpoints ---------------------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike, tag: str, client_state: dict[str, Any]) -> None:
        """Collective: every rank writes its shard of ``directory/tag``; rank 0 adds the world-size metadata."""
        from deepspeed.checkpoint.constants import (
            UNIVERSAL_CHECKPOINT_INFO,
            UNIVERSAL_CHECKPOINT_VERSION_KEY,
            UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        )

        if UNIVERSAL_CHECKPOINT_INFO in client_state:
            raise ValueError(f"client_state: key {UNIVERSAL_CHECKPOINT_INFO!r} is reserved")
        # ds_to_universal requires this marker (Megatron-DeepSpeed writes it); it enables resuming on other sizes.
        state = {
            **client_state,
            UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE},
        }
        directory = Path(directory)
        self._ds.save_checkpoint(str(directory), tag=tag, client_state=state, save_latest=True)
        if self.rank == 0:
            meta = {
                "world_size": self.world_size,
                "zero_stage": self.cfg.zero_stage,
                "precision": self.precision,
                "layout": self.layout,
            }
            (directory / tag / META_FILE).write_text(json.dumps(meta))

    def load(self, directory: str | os.PathLike, tag: str | None = None) -> dict[str, Any]:
        """Collective: restore model, optimizer and step from ``directory/tag`` (``tag`` None: DeepSpeed's latest).

        Returns the client state given to :meth:`save`. A checkpoint written by a different number of workers is
        converted to the universal format first (once per node, in a temporary folder). Load into a freshly built
        engine: under ZeRO-3 DeepSpeed cannot load into an engine that has already saved.
        """
        directory = Path(directory)
        if tag is None:
            tag = (directory / "latest").read_text().strip()
        meta_path = directory / tag / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} missing: {directory / tag} is not a checkpoint of Engine.save")
        meta = json.loads(meta_path.read_text())
        written = meta.get("layout", "legacy")
        if written != self.layout:
            raise ValueError(
                f"checkpoint {directory / tag} holds optimizer layout '{written}' (written by an older medmae, whose "
                f"bf16 kept bf16 parameters); this run uses '{self.layout}': finish that run with the version that "
                "wrote it, or start a new run.name (its encoder.safetensors fine-tunes as before)"
            )
        if meta["zero_stage"] != self.cfg.zero_stage or meta["precision"] != self.precision:
            # Universal checkpoints could bridge this, but a silent change of numerics on resume is a config error.
            raise ValueError(
                f"checkpoint {directory / tag} was written with zero_stage={meta['zero_stage']}, "
                f"precision={meta['precision']}; this run uses zero_stage={self.cfg.zero_stage}, "
                f"precision={self.precision}"
            )
        if meta["world_size"] == self.world_size or not self._partitioned_optimizer():
            path, client_state = self._ds.load_checkpoint(str(directory), tag=tag)
        else:
            logger.info(
                "checkpoint from %d workers, resuming on %d: loading through a universal checkpoint",
                meta["world_size"],
                self.world_size,
            )
            universal = self._to_universal(directory, tag)
            self._ds._config.load_universal_checkpoint = True  # read only inside load_checkpoint
            try:
                path, client_state = self._ds.load_checkpoint(str(universal), tag=tag)
            finally:
                self._ds._config.load_universal_checkpoint = False
                dist.barrier()
                if int(os.environ.get("LOCAL_RANK", "0")) == 0:
                    shutil.rmtree(universal, ignore_errors=True)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed could not load {directory / tag}")
        client_state = dict(client_state or {})
        client_state.pop("universal_checkpoint_info", None)
        return client_state

    def _partitioned_optimizer(self) -> bool:
        # Without ZeRO every rank holds the whole optimizer state (fp32 masters included, with bf16/fp16) and
        # DeepSpeed saves it with the model on rank 0, which loads into any world size as it is.
        return self.cfg.zero_stage > 0

    def _to_universal(self, directory: Path, tag: str) -> Path:
        """Convert ``directory/tag`` into a node-local universal checkpoint (local rank 0 converts, all wait)."""
        from deepspeed.checkpoint import ds_to_universal

        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        # The node's first global rank names the folder: nodes that share one /tmp (several Ray nodes on one
        # machine, as in the multi-node tests) would otherwise convert into, and delete, each other's copy.
        node_leader = self.rank - local_rank
        key = hashlib.sha1(f"{directory.resolve()}/{tag}".encode()).hexdigest()[:16]
        out = Path(tempfile.gettempdir()) / f"medmae-universal-{key}-{node_leader}"
        if local_rank == 0:
            shutil.rmtree(out, ignore_errors=True)
            args = _UniversalArgs(input_folder=str(directory / tag), output_folder=str(out / tag))
            with contextlib.redirect_stdout(io.StringIO()) as captured, contextlib.redirect_stderr(captured):
                ds_to_universal.main(args)
            logger.debug("ds_to_universal:\n%s", captured.getvalue())
            (out / "latest_universal").write_text(tag)
        dist.barrier()
        return out

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: the full fp32 state dict (master weights, buffers) on rank 0, ``{}`` on other ranks.

        Uses the fp32 master copy where the optimizer keeps one (bf16/fp16, any ZeRO stage), so nothing is lost to
        the 16-bit compute copy.
        """
        from deepspeed.utils import safe_get_full_fp32_param

        deepspeed = import_deepspeed()
        stage0_masters = self._stage0_fp32_masters()
        out: dict[str, torch.Tensor] = {}
        for name, param in self.module.named_parameters():
            full = stage0_masters.get(id(param))
            if full is None and param.requires_grad:
                full = safe_get_full_fp32_param(param)  # ZeRO 1-3: collective gather of the fp32 partitions
            if full is None:  # frozen parameter, or plain fp32 without ZeRO: the module copy is exact
                with deepspeed.zero.GatheredParameters([param], enabled=hasattr(param, "ds_id")):
                    full = param.detach().clone()
            if self.rank == 0:
                out[name] = full.detach().float().cpu().clone()
        if self.rank == 0:
            names = dict(self.module.named_parameters())
            for name, value in self.module.state_dict().items():
                if name not in out and name not in names:  # buffers (persistent ones only, like state_dict)
                    out[name] = value.detach().float().cpu().clone() if value.is_floating_point() else value.cpu()
        return out

    def _stage0_fp32_masters(self) -> dict[int, torch.Tensor]:
        """Without ZeRO, bf16/fp16 runs keep fp32 masters in DeepSpeed's FP16 optimizer wrappers; map them back."""
        opt = self._ds.optimizer
        if self.cfg.zero_stage != 0 or not hasattr(opt, "fp16_groups"):
            return {}
        if hasattr(opt, "fp32_groups_flat"):  # FP16_Optimizer (fused client optimizers): one flat master per group
            from torch._utils import _unflatten_dense_tensors

            groups = [_unflatten_dense_tensors(flat, lp) for lp, flat in zip(opt.fp16_groups, opt.fp32_groups_flat)]
        else:  # FP16_UnfusedOptimizer (our torch AdamW): one master per parameter
            groups = opt.fp32_groups
        return {id(p): master for lp, masters in zip(opt.fp16_groups, groups) for p, master in zip(lp, masters)}


class _UniversalArgs:
    """The argparse namespace ``ds_to_universal.main`` expects; one process, no worker pool."""

    def __init__(self, input_folder: str, output_folder: str) -> None:
        self.input_folder = input_folder
        self.output_folder = output_folder
        self.num_extract_workers = 1
        self.num_merge_workers = 1
        self.keep_temp_folder = False
        self.strict = True
        self.inject_missing_state = False


def create_engine(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: DistributedConfig,
    *,
    micro_batch: int,
    grad_accum: int,
    grad_clip: float,
) -> Engine:
    """Start (or reuse) the process group, move ``model`` to this rank's device and wrap it and ``optimizer`` (a
    torch optimizer over its parameters, groups optionally carrying ``lr_scale``) in DeepSpeed. The learning rate
    is ours to set each step with ``set_lr``."""
    deepspeed = import_deepspeed()
    rank, world_size = init_process_group(cfg.backend)
    device = resolve_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    precision = resolve_precision(cfg.precision, device.type)
    layout = "torch"
    if isinstance(optimizer, FlatAdamW):
        layout = "flat_single" if optimizer.single_group else "flat"
        if layout != optimizer_layout(cfg, device.type):
            raise ValueError(
                f"dist: a FlatAdamW in layout '{layout}' cannot drive ZeRO-{cfg.zero_stage} with precision "
                f"{precision}; build the optimizer with optimizer_layout(dist config) = "
                f"'{optimizer_layout(cfg, device.type)}'"
            )
    ds_config = build_deepspeed_config(
        cfg,
        micro_batch=micro_batch,
        grad_accum=grad_accum,
        world_size=world_size,
        grad_clip=grad_clip,
        device_type=device.type,
        layout=layout,
    )
    model = model.to(device)  # moves parameter data in place: the optimizer's references stay valid
    ds_engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    if isinstance(optimizer, FlatAdamW):
        # ZeRO-1/2: each rank steps its own partition, so the squared norms are summed over the ranks
        optimizer.configure_data_parallel(grads_partitioned=cfg.zero_stage > 0)
        if cfg.zero_stage == 0 and world_size == 1:
            # in a world of one DeepSpeed would still flatten, "all-reduce" and copy back every gradient
            ds_engine.enable_backward_allreduce = False
    if rank == 0:
        logger.info(
            "DeepSpeed engine: %d workers, ZeRO-%d, %s, micro batch %d x accum %d x %d = %d, device %s",
            world_size,
            cfg.zero_stage,
            precision,
            micro_batch,
            grad_accum,
            world_size,
            ds_config["train_batch_size"],
            device,
        )
    return Engine(ds_engine, cfg, precision, device, layout)
