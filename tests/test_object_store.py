"""The whole path against ``s3://`` on a real S3 server (moto, the ``s3_server`` fixture): data converted into the
bucket by tools/to_wds.py, the training stream and the validation loader reading shards and Zarr from it, Ray Train
checkpoints in it (``dist.storage_path``), a killed run resumed from them, the exported encoder read from it by
fine-tuning and the sweep."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import committed_step, make_bucket

from medmae.config import from_dict, load_config, to_dict
from medmae.data import DataConfig, build_train_stream, build_val_loader, read_manifest
from medmae.data.convert.options import ConvertOptions
from medmae.data.convert.run import convert
from medmae.data.storage import iter_shard_samples
from medmae.data.synthetic import write_phantom_dataset
from medmae.models import read_encoder
from medmae.training.config import JobConfig

pytest.importorskip("s3fs")
REPO = Path(__file__).resolve().parents[1]
SHAPE = (40, 40, 40)


def _fs():
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True)  # a fresh view: no listing cached from before a write


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, s3_server) -> dict[str, str]:
    """Four labelled phantoms (one for validation) converted three times: into the bucket as shards by the
    tools/to_wds.py CLI, into the bucket as Zarr, and into a local folder to compare with."""
    root = tmp_path_factory.mktemp("s3data")
    datalist = write_phantom_dataset(root / "raw", n=4, shape=SHAPE, num_classes=3, seed=7)
    bucket = make_bucket(s3_server, "data")
    out = {"wds": f"{bucket}/wds", "zarr": f"{bucket}/zarr", "local": str(root / "local")}
    cli = [
        sys.executable,
        str(REPO / "tools/to_wds.py"),
        str(datalist),
        out["wds"],
        "--preset",
        "ct",
        "--quiet",
        "--shard-size-mb",
        "0.2",
    ]
    proc = subprocess.run(cli, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    convert(datalist, out["zarr"], ConvertOptions(format="zarr", preset="ct", workers=0), progress=False)
    convert(datalist, out["local"], ConvertOptions(preset="ct", workers=0), progress=False)
    return out


@pytest.mark.parametrize("fmt, credentials", [("wds", "environment"), ("zarr", "storage_options")])
def test_loaders_read_the_bucket(datasets, s3_server, monkeypatch, fmt, credentials):
    """Training crops cut from volumes a DataLoader worker process read from the bucket, and whole validation
    volumes, byte-equal to the local conversion's; endpoint and credentials from the usual variables or from
    ``data.storage_options``."""
    options = {}
    if credentials == "storage_options":
        options = {"endpoint_url": s3_server, "key": "testing", "secret": "testing"}
        for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.delenv(name)
    no_aug = dict(flip_prob=0.0, rot90_prob=0.0, intensity_shift=0.0, intensity_scale=0.0)
    cfg = DataConfig(path=datasets[fmt], format=fmt, roi_size=SHAPE, num_workers=1, storage_options=options, **no_aug)
    local = datasets["local"]
    stored = {
        s["key"]: s["image"].astype("float32")
        for sh in read_manifest(local)["shards"]
        for s in iter_shard_samples(f"{local}/{sh['name']}")
        if s["meta"]["split"] == "train"
    }
    stream = build_train_stream(cfg, batch_size=2, seed=1, device="cpu")
    crops = [img for _ in range(4) for img in next(stream)["image"]]
    stream.close()
    assert all(sum(torch.equal(c[0], torch.from_numpy(v[0])) for v in stored.values()) == 1 for c in crops)
    [remote] = list(build_val_loader(cfg))
    [local] = list(build_val_loader(DataConfig(path=datasets["local"], roi_size=(16, 16, 16), num_workers=0)))
    assert remote["key"] == local["key"] and remote["image"].shape == (1, 1, *SHAPE)
    assert torch.equal(remote["image"], local["image"]) and torch.equal(remote["label"], local["label"])


def _steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if "train/loss" in line]


def _checkpoints(url: str) -> dict[int, str]:
    """Step -> Ray Train checkpoint folder (``checkpoint_*/step-N``) in the bucket."""
    return {
        int(p.rsplit("step-", 1)[1]): "s3://" + p.rsplit("/", 1)[0] for p in _fs().glob(f"{url}/checkpoint_*/step-*")
    }


@pytest.mark.slow
def test_checkpoints_in_the_bucket_resume_a_killed_run_and_hold_the_encoder(ray_session, s3_bucket, datasets, tmp_path):
    """launch/pretrain.py streams its data from the bucket and reports checkpoints into it; the driver is killed
    (SIGKILL: no clean-up) after two checkpoints and the newest is then truncated in the bucket (a partial upload);
    the same run name resumes from the bucket's previous checkpoint, skipping the broken one; the final checkpoint
    there holds encoder.safetensors, which fine-tuning and the sweep take as ``s3://`` URLs."""
    import ray

    from medmae.distributed import run_ray
    from medmae.distributed.ray_launch import resume_folder
    from medmae.sweep import SweepConfig
    from medmae.sweep.grid import trial_jobs
    from medmae.tasks import get_task
    from medmae.training.trainer import train_worker

    storage = f"{s3_bucket}/checkpoints"
    overrides = [
        f"data.path={datasets['wds']}",
        f"run.output_dir={tmp_path / 'runs'}",
        f"dist.storage_path={storage}",
        "run.name=s3",
        "data.num_workers=0",
        "run.log_every=1",
        "run.image_every=0",
        "run.checkpoint_every=4",
        "train.max_steps=40",  # the killed driver's workers go on for a moment: room to die mid-run
        "dist.num_workers=1",  # two workers' checkpoints in the bucket: test_multinode.py
    ]
    metrics = tmp_path / "runs" / "s3" / "metrics.jsonl"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token"}
    with open(tmp_path / "driver.log", "w") as log:
        driver = subprocess.Popen(
            [
                sys.executable,
                str(REPO / "launch/pretrain.py"),
                "--config",
                str(REPO / "configs/pretrain_debug.yaml"),
                *overrides,
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 240
            while (committed_step(f"{storage}/s3") or 0) < 8:
                assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint in the bucket in time"
                time.sleep(0.3)
        finally:
            driver.send_signal(signal.SIGKILL)
            driver.wait()
    # The killed driver's workers outlive it for a moment (Ray tears down what it owned): wait until they are gone.
    while time.time() - metrics.stat().st_mtime < 3:
        time.sleep(0.5)
    killed_at = _steps(metrics)
    saved = committed_step(f"{storage}/s3")
    assert killed_at[-1] < 40 and not (tmp_path / "runs" / "s3" / "encoder.safetensors").exists()
    on_s3 = _checkpoints(f"{storage}/s3")
    previous = max(s for s in on_s3 if s < saved)
    [optim] = _fs().glob(f"{on_s3[saved]}/step-{saved:08d}/*optim_states.pt")
    _fs().pipe(optim, _fs().cat(optim)[:1000])

    cfg = load_config(JobConfig, REPO / "configs/pretrain_debug.yaml", overrides)
    result = run_ray(train_worker, {"config": to_dict(cfg)}, cfg.dist, run_name="s3")
    assert result.error is None and result.metrics["step"] == 40
    resumed = _steps(metrics)[len(killed_at) :]
    assert resumed == list(range(previous + 1, 41)), (killed_at, saved, resumed)  # the newest that verifies
    shutil.rmtree(resume_folder(f"{storage.removeprefix('s3://')}/s3"))  # where the re-run downloaded it

    final = _checkpoints(f"{storage}/s3")[40]
    url = f"{final}/encoder.safetensors"
    weights, enc_cfg = read_encoder(url)
    local, local_cfg = read_encoder(tmp_path / "runs" / "s3" / "encoder.safetensors")
    assert enc_cfg == local_cfg and weights.keys() == local.keys()
    assert all(torch.equal(weights[k], local[k]) for k in weights)
    with pytest.raises(ValueError, match="does not exist"):
        read_encoder(f"{final}/no-such-encoder.safetensors")

    # fine-tuning builds its UNETR from the URL; the sweep hands the URL to its mae trials unchanged
    ft = load_config(
        JobConfig, REPO / "configs/finetune_debug.yaml", [f"data.path={datasets['wds']}", f"finetune.pretrained={url}"]
    )
    model = get_task(ft).build_model()
    assert all(torch.equal(model.encoder.state_dict()[k], v) for k, v in weights.items())
    sweep = load_config(
        SweepConfig,
        REPO / "configs/sweep_debug.yaml",
        [
            f"storage_path={tmp_path / 'sweeps'}",
            f"pretrained={url}",
            f"overrides.data.path={datasets['wds']}",
            f"finetune_config={REPO / 'configs/finetune_debug.yaml'}",
            "grid.train_fraction=[1.0]",
        ],
    )
    [job] = [job for name, job in trial_jobs(sweep).items() if name.startswith("mae")]
    assert job["finetune"]["pretrained"] == url
    model = get_task(from_dict(JobConfig, job)).build_model()
    assert all(torch.equal(model.encoder.state_dict()[k], v) for k, v in weights.items())
