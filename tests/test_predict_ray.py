"""tools/predict.py --ray: a folder (and an S3 prefix) spread over 2 local Ray workers, surviving killed workers
and re-runs (each output written once, none missing), a corrupt input recorded in errors.jsonl, and the labels of
the single-process path.

Workers are killed by the test hook in ``medmae/inference/faults.py`` (SIGKILL of the worker process, once, just
before or just after it writes a given output); every output a worker writes is one line of a trace file, which
is how "written once" is counted across processes and runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script, make_bucket

from medmae.data.convert import ConvertOptions
from medmae.data.convert.preprocess import read_image
from medmae.data.synthetic import write_phantom_dataset
from medmae.inference import Predictor, predict_paths
from medmae.inference.faults import KILL_ENV, TRACE_ENV
from medmae.models import create_model
from medmae.models.registry import config_dict
from medmae.tasks.model_file import save_finetuned

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
CASES = [f"case_{i:03d}.nii.gz" for i in range(5)]


def _cli():
    return load_script("tools/predict.py")


@pytest.fixture(scope="module")
def ray_s3(s3_server, ray_session):
    """Ray started after the S3 server: its workers inherit the endpoint and credentials, as cluster nodes have
    their own."""
    return s3_server


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """A debug UNETR model file (random weights, 1.5 mm, CT preset), 5 phantoms and one corrupt file, and the
    single-process path's labels for each phantom."""
    root = tmp_path_factory.mktemp("ray_predict")
    write_phantom_dataset(root / "raw", n=5, shape=(40, 36, 24), num_classes=3, spacing=(1.0, 1.0, 2.0))
    inputs = root / "raw" / "imagesTr"
    (inputs / "broken.nii.gz").write_bytes(b"not a nifti file")
    torch.manual_seed(0)
    model = create_model("unetr_vit_3d_debug", num_classes=3)
    pre = {**ConvertOptions(preset="ct", spacing=(1.5, 1.5, 1.5)).preprocessing(), "spatial_dims": 3, "channels": 1}
    ckpt = save_finetuned(
        root / "model.safetensors",
        model.state_dict(),
        model_name="unetr_vit_3d_debug",
        model_config=config_dict(model.cfg),
        task="segment",
        preprocessing=pre,
        num_classes=3,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each 1-CPU worker runs: the same float reductions, the same argmax
    try:
        single = predict_paths(Predictor.from_checkpoint(ckpt), inputs, root / "single")
    finally:
        torch.set_num_threads(threads)
    assert [Path(p).name for p in single.written] == CASES and len(single.errors) == 1
    return {"inputs": inputs, "ckpt": ckpt, "single": {n: read_image(str(root / "single" / n), 3)[0] for n in CASES}}


def _trace(folder: Path) -> list[str]:
    log = folder / "written.log"
    return sorted(line.split()[0] for line in log.read_text().splitlines()) if log.exists() else []


def _state(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir() if p.name in CASES}


def test_folder_on_two_workers_survives_killed_workers_and_resumes(ray_s3, data, tmp_path, monkeypatch, capsys):
    trace, out = tmp_path / "trace", tmp_path / "out"
    trace.mkdir()
    monkeypatch.setenv(TRACE_ENV, str(trace))
    # one worker dies right after writing an output (the retry must find it and not predict again), another right
    # before writing one (the retry must predict it)
    monkeypatch.setenv(KILL_ENV, f"{CASES[1]}:after,{CASES[3]}:before")
    args = ["--ray", "--workers", "2", "--quiet", "--checkpoint", str(data["ckpt"]), str(data["inputs"]), str(out)]
    cli = _cli()
    assert cli.main(args) == 1  # the corrupt input
    printed = capsys.readouterr()
    assert f"{len(CASES)} written, 0 already there, 1 failed (of {len(CASES) + 1}) on 2 worker(s)" in printed.out
    assert "2 worker death(s) retried" in printed.out and "volumes/s" in printed.out
    assert sorted(os.listdir(trace)) == sorted(
        ["written.log", f".killed-{CASES[1]}-after", f".killed-{CASES[3]}-before"]
    )
    assert _trace(trace) == CASES  # each output written exactly once, none missing
    assert sorted(p.name for p in out.iterdir()) == sorted([*CASES, "errors.jsonl"])  # no temporaries left
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert len(errors) == 1 and errors[0]["path"] == str(data["inputs"] / "broken.nii.gz")
    assert "unreadable" in errors[0]["error"] and "broken.nii.gz" in printed.err
    for name in CASES:  # the labels of the single-process path
        np.testing.assert_array_equal(read_image(str(out / name), 3)[0], data["single"][name], err_msg=name)

    before = _state(out)
    (out / CASES[2]).unlink()  # a lost output: the re-run predicts it, and nothing else
    assert cli.main(args) == 1
    assert f"1 written, {len(CASES) - 1} already there, 1 failed" in capsys.readouterr().out
    assert _trace(trace) == sorted([*CASES, CASES[2]])
    after = _state(out)
    assert {k: v for k, v in after.items() if k != CASES[2]} == {k: v for k, v in before.items() if k != CASES[2]}
    assert set(after) == set(CASES)


def test_from_and_to_s3(ray_s3, data, tmp_path, capsys):
    import boto3

    bucket = make_bucket(ray_s3, "predict")
    s3 = boto3.client("s3", endpoint_url=ray_s3)
    name = bucket.removeprefix("s3://")
    for f in [*CASES[:3], "broken.nii.gz"]:
        s3.upload_file(str(data["inputs"] / f), name, f"scans/{f}")
    s3.upload_file(str(data["ckpt"]), name, "models/m.safetensors")
    args = ["--ray", "--workers", "2", "--quiet", "--checkpoint", f"{bucket}/models/m.safetensors"]
    args += [f"{bucket}/scans", f"{bucket}/pred"]
    cli = _cli()
    assert cli.main(args) == 1
    assert "3 written, 0 already there, 1 failed (of 4)" in capsys.readouterr().out
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=name, Prefix="pred/")["Contents"])
    assert keys == sorted([f"pred/{c}" for c in CASES[:3]] + ["pred/errors.jsonl"])
    errors = [json.loads(x) for x in s3.get_object(Bucket=name, Key="pred/errors.jsonl")["Body"].read().splitlines()]
    assert [e["path"] for e in errors] == [f"{bucket}/scans/broken.nii.gz"]
    assert "unreadable" in errors[0]["error"] and f"{bucket}/scans/broken.nii.gz" in errors[0]["error"]
    for c in CASES[:3]:
        s3.download_file(name, f"pred/{c}", str(tmp_path / c))
        np.testing.assert_array_equal(read_image(str(tmp_path / c), 3)[0], data["single"][c], err_msg=c)
    modified = {o["Key"]: o["LastModified"] for o in s3.list_objects_v2(Bucket=name, Prefix="pred/")["Contents"]}
    assert cli.main(args) == 1
    assert "0 written, 3 already there, 1 failed" in capsys.readouterr().out
    again = {o["Key"]: o["LastModified"] for o in s3.list_objects_v2(Bucket=name, Prefix="pred/")["Contents"]}
    assert {k: v for k, v in again.items() if k.endswith(".nii.gz")} == {
        k: v for k, v in modified.items() if k.endswith(".nii.gz")
    }
