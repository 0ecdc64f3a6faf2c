"""Ray Train (v2) launch glue and the per-rank helpers a training function uses, inside Ray or not.

Driver side: :func:`run_ray` starts or joins Ray and runs ``train_fn`` on N workers with a ``TorchTrainer``.
Worker side: :func:`world_info`, :func:`checkpoint_dir`, :func:`report`, :func:`checkpoint_candidates` behave the
same way under Ray, under ``torchrun``/``deepspeed``, and in one plain process, so the trainer has one code path:

    for ckpt in checkpoint_candidates(run_dir):     # newest first: Ray's reported checkpoints, else run_dir/step-*
        ...verify, then state = engine.load(ckpt); break
    ...
    with checkpoint_dir(run_dir, f"step-{step:08d}") as d:   # this rank's own folder
        engine.save(d, tag=f"step-{step:08d}", client_state=state)
        report(metrics, d)                          # Ray: uploads every rank's files into one checkpoint

Resuming: Ray Train v2 keeps a checkpoint-manager snapshot in ``<storage_path>/<run_name>/``; re-running with the
same name and storage path restores it, and ``ray.train.get_checkpoint()`` then returns the last reported checkpoint.
Worker-group failures restart from the same place (``FailureConfig(max_failures)``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import posixpath
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from medmae.distributed.config import DistributedConfig
from medmae.distributed.deepspeed_config import resolve_backend
from medmae.io import resolve_local

__all__ = [
    "checkpoint_dir",
    "ensure_ray",
    "forwarded_env",
    "checkpoint_candidates",
    "in_ray_worker",
    "preemption_pending",
    "remove_orphaned_checkpoint_dirs",
    "report",
    "resume_folder",
    "run_ray",
    "world_info",
]

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d+)$")
_CKPT_PREFIX = "medmae-ckpt-"  # + pid-host-name-: see remove_orphaned_checkpoint_dirs
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
# Variables the launching shell sets for the workers: NCCL / libfabric (EFA) tuning, and medmae's own.
FORWARDED_ENV_PREFIXES = ("NCCL_", "TORCH_NCCL_", "FI_", "MEDMAE_")
# Where the object store is (an S3-compatible endpoint, its region), never who may use it: Ray shows a job's
# environment in its dashboard, so credentials stay with each node (instance role, IRSA, the node's environment).
FORWARDED_ENV_NAMES = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


def forwarded_env() -> dict[str, str]:
    """This process's ``NCCL_*``, ``TORCH_NCCL_*``, ``FI_*`` and ``MEDMAE_*`` variables and the object store's
    endpoint and region (``AWS_ENDPOINT_URL``, ``AWS_REGION``, ...), for the Ray workers: a worker's environment is
    its raylet's, not the shell's that ran the launcher."""
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES) or k in FORWARDED_ENV_NAMES}


def in_ray_worker() -> bool:
    """True inside a function launched by Ray Train's ``trainer.fit()``."""
    if "ray" not in sys.modules:
        return False  # a Ray worker imports Ray before it runs anything; elsewhere, no need to pay ~1 s to import it
    try:
        from ray.train.v2._internal.util import _in_ray_train_worker
    except ImportError:  # Ray not installed: certainly not a Ray worker
        return False
    return _in_ray_train_worker()


def world_info() -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` of this process: Ray context, launcher variables, or ``(0, 0, 1)``."""
    if in_ray_worker():
        import ray.train

        ctx = ray.train.get_context()
        return ctx.get_world_rank(), ctx.get_local_rank(), ctx.get_world_size()
    if torch.distributed.is_initialized():
        return (
            torch.distributed.get_rank(),
            int(os.environ.get("LOCAL_RANK", "0")),
            torch.distributed.get_world_size(),
        )
    rank = int(os.environ.get("RANK", "0"))
    return rank, int(os.environ.get("LOCAL_RANK", str(rank))), int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def checkpoint_dir(run_dir: str | os.PathLike, name: str) -> Iterator[Path]:
    """This rank's own folder for checkpoint ``name``: every file in it is this rank's.

    Under Ray a per-rank temporary folder (``report`` uploads it into the run's storage, merged with the other
    ranks', then it is removed; those of killed ranks go at the node's next checkpoint). Otherwise
    ``run_dir/.partial-<name>/rank-<r>``, on the file system the ranks of a ``torchrun`` job share: when every rank
    has left the block without an error, rank 0 merges the rank folders and renames the result to ``run_dir/name``,
    so that name only ever holds a whole checkpoint. A collective: every rank must enter it.
    """
    if in_ray_worker():
        remove_orphaned_checkpoint_dirs()
        tmp = Path(tempfile.mkdtemp(prefix=f"{_CKPT_PREFIX}{os.getpid()}-{_HOST}-{name}-"))
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    from medmae.distributed.collectives import barrier

    rank, _, world = world_info()
    partial = Path(run_dir) / f".partial-{name}"
    own = partial / f"rank-{rank:05d}"
    shutil.rmtree(own, ignore_errors=True)  # a folder an earlier, interrupted attempt left
    own.mkdir(parents=True)
    yield own
    barrier()  # reached only when every rank wrote its part (an error propagates instead)
    if rank == 0:
        merged = partial / "merged"
        for r in range(world):
            src = partial / f"rank-{r:05d}"
            for f in sorted(p for p in src.rglob("*") if p.is_file()):
                dst = merged / f.relative_to(src)
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(f, dst)
        final = Path(run_dir) / name
        if final.exists():  # the same step written again (a re-run that resumed before it): the new one wins
            shutil.rmtree(final)
        os.replace(merged, final)
        shutil.rmtree(partial, ignore_errors=True)
    barrier()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_orphaned_checkpoint_dirs(tmp_dir: str | os.PathLike | None = None) -> list[Path]:
    """Remove the :func:`checkpoint_dir` folders of this host's dead processes; returns what was removed.

    A rank killed while it writes or reports a checkpoint never reaches its ``finally``: Ray kills the rest of the
    worker group in the report barrier whenever one rank or node is lost, so every restart of an elastic run would
    leave the survivors' folders behind (a ViT-B MAE checkpoint is ~1.5 GB per rank) on nodes that live on. The
    folder names carry pid and host, so a node never touches another host's folders in a shared temporary folder.
    """
    removed = []
    for path in Path(tmp_dir or tempfile.gettempdir()).glob(f"{_CKPT_PREFIX}*"):
        pid, _, rest = path.name[len(_CKPT_PREFIX) :].partition("-")
        if rest.startswith(f"{_HOST}-") and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def report(metrics: dict[str, Any], checkpoint_dir: str | os.PathLike | None = None) -> None:
    """Under Ray: ``ray.train.report`` (a barrier; every rank must call it), with this rank's checkpoint files.

    Ray merges all ranks' folders into one checkpoint in ``<storage_path>/<run_name>/``. Outside Ray the files are
    already in place, so this only logs the metrics at debug level.
    """
    if not in_ray_worker():
        logger.debug("report %s checkpoint=%s", metrics, checkpoint_dir)
        return
    import ray.train

    checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
    ray.train.report(dict(metrics), checkpoint=checkpoint)


def preemption_pending() -> bool:
    """Under Ray: whether a node of this run is being drained (``ray.train.get_preemption_info``, a barrier: every
    rank must call it at the same step). Always False outside Ray."""
    if not in_ray_worker():
        return False
    import ray.train

    return ray.train.get_preemption_info() is not None


def _step_of(path: Path) -> int:
    match = _STEP_DIR.match(path.name)
    return int(match.group(1)) if match else -1


def checkpoint_candidates(run_dir: str | os.PathLike | None = None) -> Iterator[Path]:
    """Checkpoints to resume from, newest first, each as a local folder for ``Engine.load``; the caller takes the
    first that verifies. Every rank sees the same sequence.

    Under Ray: ``ray.train.get_checkpoint()`` (after a worker failure, or on a re-run of the same run name), then
    the older checkpoints Ray's storage still holds beside it (``checkpoint_<time>``, oldest last), each downloaded
    once per node when the storage is remote (:func:`resume_folder`). Otherwise the complete ``run_dir/step-*``,
    highest step first.
    """
    if in_ray_worker():
        import pyarrow.fs
        import ray.train

        latest = ray.train.get_checkpoint()
        if latest is None:
            return
        fs = latest.filesystem
        parent, newest = posixpath.split(latest.path.rstrip("/"))
        infos = fs.get_file_info(pyarrow.fs.FileSelector(parent))
        names = sorted(
            (i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory and i.base_name <= newest),
            reverse=True,
        )
        for name in [newest] + [n for n in names if n != newest and n.startswith("checkpoint_")]:
            checkpoint = ray.train.Checkpoint(posixpath.join(parent, name), filesystem=fs)
            if isinstance(fs, pyarrow.fs.LocalFileSystem):
                yield Path(checkpoint.path)
            else:
                yield _download(checkpoint)
        return
    if run_dir is None or not Path(run_dir).is_dir():
        return
    done = [p for p in Path(run_dir).iterdir() if _step_of(p) >= 0 and _has_marker(p)]
    yield from sorted(done, key=_step_of, reverse=True)


def resume_folder(run_path: str) -> Path:
    """This node's folder for downloads of the remote checkpoints of the run stored at ``run_path``
    (``<storage_path>/<run_name>`` as pyarrow names it, without the scheme)."""
    return Path(tempfile.gettempdir()) / f"medmae-resume-{hashlib.sha1(run_path.encode()).hexdigest()[:12]}"


def _download(checkpoint: Any) -> Path:
    """A remote checkpoint in this node's temporary folder, downloaded once per node (Ray locks the target).

    The run's folder keeps only the checkpoint being resumed: a long elastic run restarts many times and Ray's own
    ``to_directory()`` would leave every download behind (1.5 GB each for a ViT-B MAE). Older downloads belong to
    worker groups Ray has already stopped."""
    run_path, name = posixpath.split(checkpoint.path.rstrip("/"))
    target = resume_folder(run_path) / name
    if target.parent.is_dir():
        for old in target.parent.iterdir():
            if old.is_dir() and old != target:
                shutil.rmtree(old, ignore_errors=True)
    return Path(checkpoint.to_directory(str(target)))


def _has_marker(path: Path) -> bool:
    from medmae.distributed.engine import META_FILE  # engine imports DeepSpeed lazily; this module stays light

    return any((sub / META_FILE).is_file() for sub in path.iterdir() if sub.is_dir())


_STARTED_LOCALLY = False  # whether ensure_ray started a private Ray (which has no autoscaler to add GPU nodes)


def ensure_ray(**init_kwargs: Any) -> None:
    """Join the running Ray: this process's, ``RAY_ADDRESS``'s, or a local ``ray start`` cluster; else start one.

    ``RAY_ADDRESS=local`` skips the search and always starts a private Ray inside this process.

    ``init_kwargs`` apply only when a new local Ray is started (e.g. ``num_cpus``, ``object_store_memory``).
    """
    global _STARTED_LOCALLY
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS", "")
    if address and address != "local":  # set by `ray job submit` for the driver, or by the user
        ray.init(address=address)
        return
    if not address:
        try:
            ray.init(address="auto")
            logger.info("joined the Ray cluster running on this machine (RAY_ADDRESS=local starts a private one)")
            return
        except ConnectionError:
            pass
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(**{"include_dashboard": False, **init_kwargs})
    _STARTED_LOCALLY = True
    logger.info("started a local Ray: %s", ray.cluster_resources())


def _use_gpu(setting: str) -> bool:
    """``yes`` asks Ray for a GPU per worker even when no GPU node is up yet: an autoscaling cluster adds GPU nodes
    for such requests (GPU node types usually have ``min_workers: 0``). ``auto`` uses GPUs when the cluster has
    some now. Only a Ray this process started itself is known to have no way to get GPUs."""
    import ray

    has_gpus = ray.cluster_resources().get("GPU", 0) > 0
    if setting == "yes" and not has_gpus:
        if _STARTED_LOCALLY:
            raise ValueError("dist.use_gpu: 'yes' but this machine has no GPU (a local Ray was started here)")
        logger.warning(
            "dist.use_gpu: 'yes' and no GPU node is up yet: the workers wait for the autoscaler to add GPU nodes"
        )
    return setting == "yes" or (setting == "auto" and has_gpus)


def run_ray(
    train_fn: Callable[[dict], None],
    train_fn_config: dict[str, Any],
    cfg: DistributedConfig,
    *,
    run_name: str,
    keep_checkpoints: int | None = None,
    ray_init_kwargs: dict[str, Any] | None = None,
    callbacks: list[Any] | None = None,
    env: dict[str, str] | None = None,
) -> Any:
    """Run ``train_fn(train_fn_config)`` on ``cfg.num_workers`` Ray Train workers; returns the ``ray.train.Result``.

    A run name that already exists under ``cfg.storage_path`` resumes from its last reported checkpoint. Raises
    ``ray.train.TrainingFailedError`` when the workers fail more than ``cfg.max_failures`` times.
    ``keep_checkpoints`` keeps only that many of the newest checkpoints in storage (None keeps all).
    ``callbacks``: Ray Train callbacks, e.g. one forwarding reports to Ray Tune when this runs inside a Tune trial
    (a Tune function trainable may call ``run_ray``: Ray is already initialised there and is reused).
    ``env``: variables for the workers, on top of :func:`forwarded_env` of this process.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ensure_ray(**(ray_init_kwargs or {}))
    use_gpu = _use_gpu(cfg.use_gpu)
    backend = resolve_backend(cfg.backend, "cuda" if use_gpu else "cpu")
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    workers = (cfg.min_workers, cfg.num_workers) if cfg.elastic else cfg.num_workers
    env = {**forwarded_env(), **(env or {}), **({} if use_gpu else {"DS_ACCELERATOR": "cpu"})}
    trainer = TorchTrainer(
        train_fn,
        train_loop_config=train_fn_config,
        torch_config=TorchConfig(backend=backend),
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=use_gpu,
            resources_per_worker=resources,
            elastic_resize_monitor_interval_s=cfg.resize_interval_s,
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=resolve_local(cfg.storage_path),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
            worker_runtime_env={"env_vars": env},
            callbacks=callbacks,
        ),
    )
    logger.info(
        "Ray Train run %r: %s workers, %s, gpu=%s, storage %s", run_name, workers, backend, use_gpu, cfg.storage_path
    )
    return trainer.fit()
