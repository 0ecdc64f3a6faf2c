"""Prediction over an archive (``tools/predict.py --ray``): one job per input file, spread over Ray workers that
each hold one model, read and write on their own, and skip what is already done.

- **Resumable.** A job whose output exists is skipped: by the driver (one listing of OUTPUT) and again by the worker
  just before it starts, so a retried job whose first worker died after writing is not predicted twice.
- **Atomic outputs.** A local output is written under a temporary name and renamed; an object-store output is written
  locally, then uploaded as one object (an object appears whole at the end of its upload, or not at all).
- **Object stores.** INPUT and OUTPUT may be fsspec URLs (``s3://bucket/prefix``): a worker copies a remote input to
  a local temporary file for the readers (single-file formats: NIfTI, MGZ, NRRD, MHA; DICOM series and detached
  headers must be local) and uploads its output.
- **Failures.** An input that cannot be predicted is one line of ``OUTPUT/errors.jsonl`` (``path``, ``error``); the
  others go on.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import posixpath
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medmae.data.convert.options import SampleError
from medmae.data.convert.sources import IMAGE_SUFFIXES
from medmae.inference import faults
from medmae.inference.volume_io import list_inputs, output_name, write_label
from medmae.io import is_url, write_json_atomic

__all__ = ["Job", "ManyResult", "list_jobs", "predict_many"]
log = logging.getLogger(__name__)

ERRORS = "errors.jsonl"
# Remote inputs must be one self-contained file each: a DICOM series is many objects, .mhd/.nhdr point at others.
_REMOTE_SUFFIXES = tuple(s for s in IMAGE_SUFFIXES if s not in (".dcm", ".mhd", ".nhdr"))


@dataclass(frozen=True)
class Job:
    src: str
    """Input file (or DICOM series folder): a local path or a URL."""
    out: str
    """Output file: a local path or a URL."""
    name: str
    """Output file name (the last part of ``out``)."""


def _fs(url: str, storage_options: dict) -> tuple[Any, str]:
    import fsspec

    try:
        return fsspec.core.url_to_fs(url, **storage_options)
    except ImportError as e:
        raise ValueError(f"{url}: no filesystem for it is installed (medmae[s3] for s3://): {e}") from None


def _join(folder: str, name: str) -> str:
    return f"{folder.rstrip('/')}/{name}" if is_url(folder) else str(Path(folder) / name)


def list_jobs(input_path: str, output: str, storage_options: dict | None = None) -> list[Job]:
    """One job per image in INPUT (a file, a folder or a URL prefix), each writing into the OUTPUT folder under
    ``output_name`` of its input; ``ValueError`` when there are none or two would write the same output."""
    so = storage_options or {}
    if is_url(input_path):
        fs, root = _fs(input_path, so)
        files = [root] if fs.isfile(root) else sorted(fs.find(root))
        srcs = [
            fs.unstrip_protocol(p)
            for p in files
            if p.lower().endswith(_REMOTE_SUFFIXES) and not posixpath.basename(p).startswith(".")
        ]
        if not srcs:
            raise ValueError(f"INPUT {input_path}: no image files ({', '.join(_REMOTE_SUFFIXES)}) under it")
    else:
        srcs = [str(p) for p in list_inputs(input_path)]
    jobs: list[Job] = []
    seen: dict[str, str] = {}
    for src in srcs:
        name = output_name(Path(posixpath.basename(src.rstrip("/"))))
        if name in seen:
            raise ValueError(f"INPUT {src} and {seen[name]} would both write {name}; rename one")
        seen[name] = src
        jobs.append(Job(src, _join(output, name), name))
    if not is_url(output):
        sources = {os.path.realpath(j.src) for j in jobs if not is_url(j.src)}
        clash = [j.out for j in jobs if os.path.realpath(j.out) in sources]
        if clash:
            raise ValueError(f"OUTPUT {clash[0]} is an input file: refusing to overwrite it; choose another OUTPUT")
    return jobs


def _existing_names(output: str, storage_options: dict) -> set[str]:
    """File names already in the OUTPUT folder (one listing, however many jobs)."""
    if not is_url(output):
        return {p.name for p in Path(output).iterdir()} if Path(output).is_dir() else set()
    fs, root = _fs(output, storage_options)
    fs.invalidate_cache(root)  # s3fs keeps listings: this process may have listed it before the workers wrote
    try:
        return {posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)}
    except FileNotFoundError:
        return set()


class FileWorker:
    """What runs on each worker: one ``Predictor`` (built from the model file's bytes), applied job by job."""

    def __init__(self, model: bytes, options: dict[str, Any]) -> None:
        import torch

        from medmae.inference.predict import Predictor

        if options.get("threads"):
            torch.set_num_threads(int(options["threads"]))
        self.storage_options: dict = options.get("storage_options") or {}
        with tempfile.TemporaryDirectory(prefix="medmae-model-") as tmp:
            path = Path(tmp) / "model.safetensors"
            path.write_bytes(model)
            self.predictor = Predictor.from_checkpoint(path, **options.get("predictor", {}))

    def _exists(self, url_or_path: str) -> bool:
        if not is_url(url_or_path):
            return os.path.exists(url_or_path)
        fs, path = _fs(url_or_path, self.storage_options)
        return fs.exists(path)

    @contextlib.contextmanager
    def _staged(self, src: str, tmp: Path) -> Iterator[str]:
        if not is_url(src):
            yield src
            return
        fs, path = _fs(src, self.storage_options)
        local = tmp / posixpath.basename(path)  # the readers pick the format by the suffix
        fs.get_file(path, str(local))
        yield str(local)

    def __call__(self, job: Job) -> dict[str, Any]:
        if self._exists(job.out):
            return {"status": "exists"}
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="medmae-predict-") as tmp:
            with self._staged(job.src, Path(tmp)) as local:
                try:
                    labels, affine = self.predictor.predict_file(local)
                except SampleError as e:  # name the input as the user gave it, not its local copy
                    raise SampleError(e.reason, e.message.replace(local, job.src)) from None
                faults.before_write(job.name)
                if is_url(job.out):
                    staged = write_label(labels, affine, Path(local), Path(tmp) / "out" / job.name)
                    fs, path = _fs(job.out, self.storage_options)
                    fs.put_file(str(staged), path)  # one object, visible once whole
                else:
                    write_label(labels, affine, Path(local), Path(job.out))
        faults.after_write(job.name)
        return {"status": "written", "seconds": time.perf_counter() - start}


@dataclass
class ManyResult:
    jobs: int = 0
    written: list[str] = field(default_factory=list)
    skipped: int = 0
    """Outputs that already existed (an earlier run's)."""
    volume_seconds: list[float] = field(default_factory=list)
    """Seconds a worker spent on each volume it wrote (read, predict, write)."""
    errors: list[dict[str, str]] = field(default_factory=list)
    """``{"path": input, "error": message}`` per failed input, as in errors.jsonl."""
    seconds: float = 0.0
    startup_seconds: float = 0.0
    workers: int = 0
    worker_deaths: int = 0

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def volumes_per_second(self) -> float:
        return len(self.written) / self.seconds if self.seconds > 0 else 0.0


def _model_bytes(checkpoint: str, storage_options: dict) -> tuple[bytes, dict[str, Any]]:
    from medmae.tasks import task_for_file_kind
    from medmae.tasks.model_file import read_finetuned_meta, resolve_checkpoint

    if is_url(checkpoint):
        fs, remote = _fs(checkpoint, storage_options)
        try:
            data = fs.cat_file(remote)
        except FileNotFoundError:
            raise ValueError(f"--checkpoint {checkpoint}: no such model file") from None
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "model.safetensors").write_bytes(data)
            meta = read_finetuned_meta(Path(tmp) / "model.safetensors")
    else:
        file = resolve_checkpoint(checkpoint)
        data, meta = file.read_bytes(), read_finetuned_meta(file)
    if task_for_file_kind(meta["task"]).writes_table:
        raise ValueError(f"--ray: a {meta['task']} model writes one table; predict it without --ray")
    return data, meta


def _write_errors(output: str, errors: list[dict[str, str]], storage_options: dict) -> None:
    if not is_url(output):
        write_json_atomic(Path(output) / ERRORS, errors, lines=True)
        return
    import json

    fs, root = _fs(output, storage_options)
    fs.pipe_file(f"{root.rstrip('/')}/{ERRORS}", "".join(json.dumps(e) + "\n" for e in errors).encode())


def predict_many(
    checkpoint: str,
    input_path: str,
    output: str,
    *,
    workers: int | None = None,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float | None = None,
    predictor: dict[str, Any] | None = None,
    storage_options: dict | None = None,
    progress: bool = True,
) -> ManyResult:
    """Predict every image of ``input_path`` into the ``output`` folder on Ray workers (see the module docstring).

    ``gpus_per_worker`` None: 1 when the cluster has GPUs, else 0; ``workers`` None: one per GPU, else one per
    ``cpus_per_worker`` CPUs. ``predictor``: ``Predictor`` options (overlap, sw_batch, device, tta). ``errors.jsonl``
    in ``output`` lists this run's failures (empty when there were none).
    """
    from medmae.distributed.ray_map import cluster_resources, map_items

    so = storage_options or {}
    model, meta = _model_bytes(checkpoint, so)
    jobs = list_jobs(input_path, output, so)
    done = _existing_names(output, so)
    todo = [j for j in jobs if j.name not in done]
    result = ManyResult(jobs=len(jobs), skipped=len(jobs) - len(todo))
    if not is_url(output):
        Path(output).mkdir(parents=True, exist_ok=True)
    resources = cluster_resources()
    gpus = gpus_per_worker if gpus_per_worker is not None else (1.0 if resources.get("GPU", 0) > 0 else 0.0)
    if workers is None:
        slots = resources.get("GPU", 0) / gpus if gpus else resources.get("CPU", 1) / cpus_per_worker
        workers = max(1, int(slots))
    result.workers = min(workers, len(todo))
    log.info("%s: %d input(s), %d done already, %d worker(s)", meta["model_name"], len(jobs), result.skipped, workers)

    def record(r: Any) -> None:
        if r.error is not None:
            result.errors.append({"path": r.item.src, "error": r.error})
            log.error("%s: %s", r.item.src, r.error)
        elif r.value["status"] == "written" or r.attempts > 1:  # "exists" on a retry: this run's first attempt
            result.written.append(r.item.out)
            result.volume_seconds.append(r.value.get("seconds", r.seconds))
        else:
            result.skipped += 1

    options = {
        "predictor": predictor or {},
        "storage_options": so,
        "threads": max(1, int(cpus_per_worker)),
    }
    try:
        stats = map_items(
            functools.partial(FileWorker, options=options),
            todo,
            shared=model,
            workers=workers,
            num_cpus=cpus_per_worker,
            num_gpus=gpus,
            on_result=record,
            progress=progress,
            desc="predict",
            unit="vol",
        )
    finally:
        _write_errors(output, result.errors, so)
    result.seconds, result.startup_seconds = stats.seconds, stats.startup_seconds
    result.worker_deaths = stats.worker_deaths
    return result
