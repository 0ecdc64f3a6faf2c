"""``convert``: discover samples, read and preprocess them in parallel, write shards or Zarr, then the manifest.

Resumable: complete shards / Zarr samples found under OUTPUT are kept and their samples skipped. A change of
preprocessing between runs is refused, since it would mix two versions of the data in one dataset.
"""

from __future__ import annotations

import datetime
import functools
import logging
import multiprocessing as mp
import os
import queue
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from medmae.data.convert.manifest import MANIFEST, read_manifest, verify, write_errors
from medmae.io import write_json_atomic
from medmae.data.convert.options import ConvertOptions, SampleError
from medmae.data.convert.preprocess import prepare, read_image
from medmae.data.convert.sources import SampleSpec, discover
from medmae.data.convert.writers import (
    ShardWriter,
    remove_temporaries,
    sample_members,
    scan_shards,
    scan_zarr,
    write_zarr_sample,
)

__all__ = ["ConvertResult", "convert"]
log = logging.getLogger(__name__)
_MANIFEST_SAMPLE_FIELDS = (
    "key",
    "split",
    "shape",
    "dtype",
    "label_shape",
    "label_dtype",
    "label_max",
    "spacing",
    "affine",
    "orientation",
    "original_shape",
    "original_spacing",
    "source",
    "checksum",
    "shard",
    "members",
)


@dataclass
class ConvertResult:
    output: Path
    converted: int = 0
    """Samples written by this run."""
    skipped: int = 0
    """Samples already complete from an earlier run."""
    errors: list[dict] = field(default_factory=list)
    """One record per bad sample: key, source, reason, message."""
    problems: list[str] = field(default_factory=list)
    """--verify findings."""
    megabytes: float = 0.0
    """Stored voxel data written by this run."""

    @property
    def ok(self) -> bool:
        return not self.errors and not self.problems


_WORKER: dict = {}


class _ShardNumbers:
    """Next shard number per split, shared by all workers (a lock-protected counter each)."""

    def __init__(self, starts: dict[str, int]):
        self.values = {split: mp.Value("l", start) for split, start in starts.items()}

    def __call__(self, split: str) -> int:
        value = self.values[split]
        with value.get_lock():
            value.value += 1
            return value.value - 1


def _init_worker(opts: ConvertOptions, out: Path, spatial_dims: int, channels: int, numbers: _ShardNumbers) -> None:
    import torch

    torch.set_num_threads(1)  # one process per core already
    writers = {
        split: ShardWriter(out, split, opts.prefix, int(opts.shard_size_mb * 2**20), functools.partial(numbers, split))
        for split in ("train", "validation")
    }
    _WORKER.update(opts=opts, out=out, spatial_dims=spatial_dims, channels=channels, writers=writers)


def _work(spec: SampleSpec) -> tuple:
    """Convert and store one sample in this worker: ``("ok", meta, nbytes)`` or ``("error", reason, message)``."""
    opts: ConvertOptions = _WORKER["opts"]
    try:
        p = prepare(spec, opts, _WORKER["spatial_dims"], _WORKER["channels"])
    except SampleError as e:
        return ("error", e.reason, e.message)
    except Exception as e:  # a reader or converter bug on odd input must not end a run of thousands
        log.exception("internal error on %s", spec.key)
        return ("error", "internal_error", f"{type(e).__name__}: {e}")
    nbytes = p.image.nbytes + (p.label.nbytes if p.label is not None else 0)
    if opts.format == "zarr":
        write_zarr_sample(_WORKER["out"], p, opts.zarr_chunk, opts.zarr_shard)
        return ("ok", p.meta, nbytes)
    return ("ok", {**p.meta, **_WORKER["writers"][spec.split].add(sample_members(p))}, nbytes)


def _close_writers() -> list[dict]:
    finished = []
    for w in _WORKER["writers"].values():
        w.close()
        finished += w.finished
    return finished


def _worker_main(tasks, results, initargs) -> None:
    """Worker process: convert specs from ``tasks`` until ``None``, writing its own shards; report, then close."""
    _init_worker(*initargs)
    try:
        for i, spec in iter(tasks.get, None):
            results.put((i, _work(spec)))
    finally:
        results.put((-1, ("closed", _close_writers())))


def _run_workers(todo: list[SampleSpec], initargs: tuple, workers: int, handle, bar) -> list[dict]:
    """Fan ``todo`` out to ``workers`` processes (each writes its own shards); returns the shards they closed."""
    import monai.data  # noqa: F401 - imported once here, inherited by every forked worker
    import monai.transforms  # noqa: F401

    # fork: workers start in milliseconds; they run torch single-threaded (as DataLoader workers do), so thread
    # pools the parent may hold are never used in a child. Only specs and metadata cross process boundaries.
    ctx = mp.get_context("fork" if os.name == "posix" else "spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_worker_main, args=(tasks, results, initargs), daemon=True) for _ in range(workers)]
    for p in procs:
        p.start()
    for item in enumerate(todo):
        tasks.put(item)
    for _ in procs:
        tasks.put(None)
    shards, closed = [], 0
    try:
        while closed < workers:
            try:
                i, res = results.get(timeout=5.0)
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(
                        f"a converter worker died (exit code {dead[0].exitcode}); re-run to resume"
                    ) from None
                continue
            if i < 0:
                shards += res[1]
                closed += 1
            else:
                handle(todo[i], res)
                bar.update()
    finally:
        for p in procs:
            if p.is_alive() and closed < workers:
                p.terminate()
            p.join()
    return shards


def _infer_channels(specs: list[SampleSpec], opts: ConvertOptions, spatial_dims: int) -> int:
    if opts.channels is not None:
        return opts.channels
    if opts.channel_suffixes:
        return len(opts.channel_suffixes)
    for spec in specs:
        if spec.error is None:
            if len(spec.images) > 1:
                return len(spec.images)
            try:
                return read_image(spec.images[0], spatial_dims)[0].shape[0]
            except SampleError:
                continue
    return 1


def _settings(opts: ConvertOptions, spatial_dims: int, channels: int) -> dict:
    pre = opts.preprocessing()
    pre.update(spatial_dims=spatial_dims, channels=channels)
    return pre


def _check_resume(out: Path, opts: ConvertOptions, settings: dict) -> None:
    if not (out / MANIFEST).is_file():
        return
    old = read_manifest(out)
    if old["format"] != opts.format:
        raise ValueError(f"{out} holds a '{old['format']}' dataset; use a new OUTPUT for --format {opts.format}")
    changed = {k: (old["preprocessing"].get(k), v) for k, v in settings.items() if old["preprocessing"].get(k) != v}
    split = {"val_fraction": opts.val_fraction, "seed": opts.seed}
    changed.update({k: (old["split"].get(k), v) for k, v in split.items() if old["split"].get(k) != v})
    if changed:
        raise ValueError(
            f"{out} was converted with other settings {changed} (old, new); "
            "resuming would mix two versions: use a new OUTPUT"
        )


def _manifest(out, opts, settings, input_path, samples, shards, errors, label_names, complete) -> dict:
    from medmae import __version__

    samples = sorted(samples, key=lambda s: (s["split"], s["key"]))
    label_max = max((s["label_max"] for s in samples if s.get("label_max") is not None), default=None)
    has_target = any(s.get("label_shape") and len(s["label_shape"]) == 1 for s in samples)
    return {
        "medmae_dataset": 1,
        "format": opts.format,
        "complete": complete,
        "tool": "tools/to_wds.py",
        "version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "input": str(input_path),
        "task": "classification" if has_target else ("segmentation" if label_max is not None else "image"),
        "spatial_dims": settings["spatial_dims"],
        "channels": settings["channels"],
        "num_classes": label_max + 1 if label_max is not None else (len(label_names) if label_names else 0),
        "label_names": label_names,
        "preprocessing": settings,
        "split": {"val_fraction": opts.val_fraction, "seed": opts.seed},
        "counts": {
            "train": sum(s["split"] == "train" for s in samples),
            "validation": sum(s["split"] == "validation" for s in samples),
            "errors": len(errors),
        },
        "shards": sorted(shards, key=lambda s: s["name"]),
        "samples": [{k: s[k] for k in _MANIFEST_SAMPLE_FIELDS if k in s} for s in samples],
    }


def convert(
    input_path: str | Path, output: str | Path, opts: ConvertOptions, *, run_verify: bool = False, progress: bool = True
) -> ConvertResult:
    """Convert ``input_path`` into ``output`` (see ``tools/to_wds.py --help``); never raises for bad samples."""
    out = Path(output)
    specs, label_names = discover(input_path, opts)
    spatial_dims = opts.spatial_dims or (2 if str(input_path).lower().endswith(".csv") else 3)
    channels = _infer_channels(specs, opts, spatial_dims)
    settings = _settings(opts, spatial_dims, channels)
    out.mkdir(parents=True, exist_ok=True)
    _check_resume(out, opts, settings)
    remove_temporaries(out)
    if opts.format == "wds":
        shards, done = scan_shards(out, opts.prefix)
    else:
        import zarr

        root = zarr.open_group(str(out), mode="a", attributes={"medmae_dataset": 1})
        for split in ("train", "validation"):
            root.require_group(split)
        shards, done = [], scan_zarr(out)
    done_keys = {s["key"] for s in done}
    result = ConvertResult(out, skipped=len(done_keys))
    write_json_atomic(out / MANIFEST, _manifest(out, opts, settings, input_path, done, shards, [], label_names, False))

    errors, todo = [], []
    for spec in specs:
        if spec.key in done_keys and spec.error is None:
            continue
        if spec.error is not None:
            errors.append({"key": spec.key, "source": spec.images, "reason": spec.error[0], "message": spec.error[1]})
        else:
            todo.append(spec)
    starts = {
        split: max((int(sh["name"][-10:-4]) for sh in shards if sh["split"] == split), default=-1) + 1
        for split in ("train", "validation")
    }
    initargs = (opts, out, spatial_dims, channels, _ShardNumbers(starts))

    def handle(spec: SampleSpec, res) -> None:
        if res[0] == "error":
            errors.append(
                {"key": spec.key, "source": spec.images, "label": spec.label, "reason": res[1], "message": res[2]}
            )
            log.warning("skipped %s: %s: %s", spec.key, res[1], res[2])
            return
        _, meta, nbytes = res
        done.append(meta)
        result.converted += 1
        result.megabytes += nbytes / 1e6

    bar = tqdm(total=len(todo), desc=f"convert → {opts.format}", unit="sample", disable=not progress)
    try:
        if opts.workers == 0:
            _init_worker(*initargs)
            try:
                for spec in todo:
                    handle(spec, _work(spec))
                    bar.update()
            finally:
                shards += _close_writers()
        else:
            shards += _run_workers(todo, initargs, opts.workers, handle, bar)
    finally:
        bar.close()
        remove_temporaries(out)
        result.errors = errors
        write_errors(out, errors)
        complete = len(done) + len(errors) >= len(specs)
        write_json_atomic(
            out / MANIFEST, _manifest(out, opts, settings, input_path, done, shards, errors, label_names, complete)
        )
    if run_verify:
        result.problems = verify(out)
    return result
