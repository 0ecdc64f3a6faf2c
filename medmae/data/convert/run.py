"""``convert``: discover samples, read and preprocess them in parallel, write shards or Zarr, then the manifest.

Resumable: complete shards / Zarr samples of earlier runs are kept and their samples skipped. A change of
preprocessing between runs is refused, since it would mix two versions of the data in one dataset. OUTPUT may be an
object store URL (``s3://bucket/prefix``); see ``target.py`` for how that stays atomic for readers.
"""

from __future__ import annotations

import datetime
import functools
import logging
import multiprocessing as mp
import os
import queue
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from medmae.data.convert.manifest import ERRORS, MANIFEST, verify
from medmae.data.convert.options import ConvertOptions, SampleError
from medmae.data.convert.preprocess import prepare
from medmae.data.convert.readers import read_image
from medmae.data.convert.sources import SampleSpec, discover
from medmae.data.convert.splits import SPLITS, split_settings
from medmae.data.convert.target import Output
from medmae.data.convert.writers import (
    ShardWriter,
    remove_temporaries,
    sample_members,
    write_zarr_sample,
)

__all__ = ["ConvertResult", "convert", "infer_channels"]
log = logging.getLogger(__name__)
# A remote run rewrites its manifest at most this often: what a killed run loses, against re-uploading a manifest
# that grows with the dataset.
MANIFEST_EVERY_S = 60.0
_MANIFEST_SAMPLE_FIELDS = (
    "key",
    "split",
    "group",
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
    output: Path | str
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


def _init_worker(
    opts: ConvertOptions,
    output: Output,
    spatial_dims: int,
    channels: int,
    num_labels: int | None,
    numbers: _ShardNumbers,
    report_shard,
) -> None:
    import torch

    torch.set_num_threads(1)  # one process per core already

    def closed(path: Path, info: dict) -> None:
        output.publish(path)
        report_shard(info)

    size = int(opts.shard_size_mb * 2**20)
    writers = {
        split: ShardWriter(output.local, split, opts.prefix, size, functools.partial(numbers, split), closed)
        for split in SPLITS
    }
    _WORKER.update(
        opts=opts, output=output, spatial_dims=spatial_dims, channels=channels, num_labels=num_labels, writers=writers
    )


def _work(spec: SampleSpec) -> tuple:
    """Convert and store one sample in this worker: ``("ok", meta, nbytes)`` or ``("error", reason, message)``."""
    opts: ConvertOptions = _WORKER["opts"]
    try:
        p = prepare(spec, opts, _WORKER["spatial_dims"], _WORKER["channels"], _WORKER["num_labels"])
    except SampleError as e:
        return ("error", e.reason, e.message)
    except Exception as e:  # a reader or converter bug on odd input must not end a run of thousands
        log.exception("internal error on %s", spec.key)
        return ("error", "internal_error", f"{type(e).__name__}: {e}")
    nbytes = p.image.nbytes + (p.label.nbytes if p.label is not None else 0)
    if opts.format == "zarr":
        output: Output = _WORKER["output"]
        write_zarr_sample(output.local, p, opts.zarr_chunk, opts.zarr_shard)
        output.publish(output.local / spec.split / spec.key)
        return ("ok", p.meta, nbytes)
    return ("ok", {**p.meta, **_WORKER["writers"][spec.split].add(sample_members(p))}, nbytes)


def _close_writers() -> None:
    for w in _WORKER["writers"].values():
        w.close()


def _worker_main(tasks, results, initargs: tuple[Any, ...]) -> None:
    """Worker process: convert specs from ``tasks`` until ``None``, writing its own shards and reporting each one
    it closes; then close the open ones."""
    opts, output, spatial_dims, channels, num_labels, numbers = initargs
    _init_worker(
        opts, output, spatial_dims, channels, num_labels, numbers, report_shard=lambda info: results.put((-2, info))
    )
    for i, spec in iter(tasks.get, None):
        results.put((i, _work(spec)))
    _close_writers()
    results.put((-1, None))


def _run_workers(todo: list[SampleSpec], initargs: tuple, workers: int, handle, on_shard, bar) -> None:
    """Fan ``todo`` out to ``workers`` processes, each writing its own shards; ``handle`` gets every sample's
    result and ``on_shard`` every shard a worker closed."""
    import monai.data  # noqa: F401 - imported once here, inherited by every forked worker
    import monai.transforms  # noqa: F401

    # fork: workers start in milliseconds; they run torch single-threaded (as DataLoader workers do), so thread
    # pools the parent may hold are never used in a child. Only specs and metadata cross process boundaries.
    ctx: Any = mp.get_context("fork" if os.name == "posix" else "spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_worker_main, args=(tasks, results, initargs), daemon=True) for _ in range(workers)]
    for p in procs:
        p.start()
    for item in enumerate(todo):
        tasks.put(item)
    for _ in procs:
        tasks.put(None)
    finished = 0
    try:
        while finished < workers:
            try:
                i, res = results.get(timeout=5.0)
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(
                        f"a converter worker died (exit code {dead[0].exitcode}); re-run to resume"
                    ) from None
                continue
            if i == -1:
                finished += 1
            elif i == -2:
                on_shard(res)
            else:
                handle(todo[i], res)
                bar.update()
    finally:
        for p in procs:
            if p.is_alive() and finished < workers:
                p.terminate()
            p.join()


def infer_channels(specs: list[SampleSpec], opts: ConvertOptions, spatial_dims: int) -> int:
    """``opts.channels``, else the channel suffixes' count, else the channels of the first readable sample."""
    if opts.channels is not None:
        return opts.channels
    if opts.channel_suffixes:
        return len(opts.channel_suffixes)
    for spec in specs:
        if spec.error is None:
            if len(spec.images) > 1:
                return len(spec.images)
            try:
                return read_image(spec.images[0], spatial_dims, spec.files)[0].shape[0]
            except SampleError:
                continue
    return 1


def _settings(opts: ConvertOptions, spatial_dims: int, channels: int) -> dict:
    pre = opts.preprocessing()
    pre.update(spatial_dims=spatial_dims, channels=channels)
    return pre


def _check_resume(old: dict | None, output: Output, opts: ConvertOptions, settings: dict) -> None:
    if old is None:
        return
    if old["format"] != opts.format:
        raise ValueError(f"{output} holds a '{old['format']}' dataset; use a new OUTPUT for --format {opts.format}")
    changed = {k: (old["preprocessing"].get(k), v) for k, v in settings.items() if old["preprocessing"].get(k) != v}
    changed.update({k: (old["split"].get(k), v) for k, v in split_settings(opts).items() if old["split"].get(k) != v})
    if changed:
        raise ValueError(
            f"{output} was converted with other settings {changed} (old, new); "
            "resuming would mix two versions: use a new OUTPUT"
        )


@dataclass
class _State:
    """What a run has written so far, and which of it a manifest may name."""

    fmt: str
    done: list[dict]
    """Metadata of every stored sample (earlier runs' and this one's)."""
    shards: dict[str, dict] = field(default_factory=dict)
    """Closed (and, for a URL, uploaded) shards by name."""
    errors: list[dict] = field(default_factory=list)

    def listable(self) -> tuple[list[dict], list[dict]]:
        """Samples and shards a manifest may name now: a shard once closed and every sample of it reported (a
        worker reports a shard's closing before the result of the sample that filled it), and only their samples."""
        if self.fmt != "wds":
            return self.done, []
        count = Counter(s["shard"] for s in self.done)
        names = {n for n, info in self.shards.items() if count[n] >= info["samples"]}
        return [s for s in self.done if s["shard"] in names], [self.shards[n] for n in sorted(names)]


def _manifest(opts, settings, input_path, state: _State, label_names, complete: bool) -> dict:
    from medmae import __version__

    samples, shards = state.listable()
    samples = sorted(samples, key=lambda s: (s["split"], s["key"]))
    label_max = max((s["label_max"] for s in samples if s.get("label_max") is not None), default=None)
    has_target = any(s.get("label_shape") and len(s["label_shape"]) == 1 for s in samples)
    return {
        "medmae_dataset": 1,
        "format": opts.format,
        "complete": complete,
        "tool": "tools/to_wds.py",
        "version": __version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "input": str(input_path),
        "task": "classification" if has_target else ("segmentation" if label_max is not None else "image"),
        "spatial_dims": settings["spatial_dims"],
        "channels": settings["channels"],
        "num_classes": len(label_names) if label_names else (label_max + 1 if label_max is not None else 0),
        "label_names": label_names,
        "preprocessing": settings,
        **({"plan": opts.plan} if opts.plan is not None else {}),
        "min_size": opts.min_size,
        "split": split_settings(opts),
        "counts": {
            **{split: sum(s["split"] == split for s in samples) for split in SPLITS},
            "errors": len(state.errors),
        },
        "shards": shards,
        "samples": [{k: s[k] for k in _MANIFEST_SAMPLE_FIELDS if k in s} for s in samples],
    }


def convert(
    input_path: str | Path, output: str | Path, opts: ConvertOptions, *, run_verify: bool = False, progress: bool = True
) -> ConvertResult:
    """Convert ``input_path`` into ``output``, a folder or an fsspec URL (see ``tools/to_wds.py --help``); never
    raises for bad samples. An OUTPUT that cannot be written raises ``ValueError`` before any work."""
    target = Output(output, opts.storage_options)
    try:
        return _convert(input_path, target, opts, run_verify, progress)
    finally:
        target.close()


def _convert(input_path, target: Output, opts: ConvertOptions, run_verify: bool, progress: bool) -> ConvertResult:
    specs, label_names = discover(input_path, opts)
    is_csv = str(input_path).lower().endswith(".csv")
    spatial_dims = opts.spatial_dims or (2 if is_csv else 3)
    channels = infer_channels(specs, opts, spatial_dims)
    settings = _settings(opts, spatial_dims, channels)
    _check_resume(target.read_manifest(), target, opts, settings)
    target.open()
    out = target.local
    remove_temporaries(out)
    if opts.format == "zarr":
        import zarr

        root = zarr.open_group(str(out), mode="a", attributes={"medmae_dataset": 1})
        for split in SPLITS:
            root.require_group(split)
        target.publish_metadata()
    shards, done = target.existing(opts.format, opts.prefix)
    state = _State(opts.format, list(done), {s["name"]: s for s in shards})
    done_keys = {s["key"] for s in done}
    result = ConvertResult(target.local if not target.remote else target.name, skipped=len(done_keys))
    num_labels = len(label_names) if label_names and not is_csv else None

    def write_manifest(complete: bool) -> None:
        target.write_json(MANIFEST, _manifest(opts, settings, input_path, state, label_names, complete))

    write_manifest(False)
    todo = []
    for spec in specs:
        if spec.key in done_keys and spec.error is None:
            continue
        if spec.error is not None:
            state.errors.append(
                {"key": spec.key, "source": spec.images, "reason": spec.error[0], "message": spec.error[1]}
            )
        else:
            todo.append(spec)
    starts = {
        split: max((int(sh["name"][-10:-4]) for sh in shards if sh["split"] == split), default=-1) + 1
        for split in SPLITS
    }
    initargs = (opts, target, spatial_dims, channels, num_labels, _ShardNumbers(starts))
    last_write = time.monotonic()

    def checkpoint() -> None:
        nonlocal last_write
        if target.remote and time.monotonic() - last_write >= MANIFEST_EVERY_S:
            write_manifest(False)
            last_write = time.monotonic()

    def handle(spec: SampleSpec, res) -> None:
        if res[0] == "error":
            state.errors.append(
                {"key": spec.key, "source": spec.images, "label": spec.label, "reason": res[1], "message": res[2]}
            )
            log.warning("skipped %s: %s: %s", spec.key, res[1], res[2])
            return
        _, meta, nbytes = res
        state.done.append(meta)
        result.converted += 1
        result.megabytes += nbytes / 1e6
        checkpoint()

    def on_shard(info: dict) -> None:
        state.shards[info["name"]] = info
        checkpoint()

    bar = tqdm(total=len(todo), desc=f"convert → {opts.format}", unit="sample", disable=not progress)
    try:
        if opts.workers == 0:
            _init_worker(*initargs, report_shard=on_shard)
            try:
                for spec in todo:
                    handle(spec, _work(spec))
                    bar.update()
            finally:
                _close_writers()
        else:
            _run_workers(todo, initargs, opts.workers, handle, on_shard, bar)
    finally:
        bar.close()
        remove_temporaries(out)
        result.errors = state.errors
        target.write_json(ERRORS, state.errors, lines=True)
        write_manifest(len(state.listable()[0]) + len(state.errors) >= len(specs))
    if run_verify:
        result.problems = verify(target.name, opts.storage_options)
    return result
