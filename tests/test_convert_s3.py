"""The converter writing to an object store: a real S3 endpoint (moto's server, the ``s3_server`` fixture), the
real CLI, s3fs. Shards, manifest and error report land in the bucket, a reader never sees a manifest naming what is
not there, a re-run resumes from what the bucket holds, and a URL that cannot be written fails before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from medmae.data.convert import ConvertOptions, convert, read_manifest, verify
from medmae.data.convert import run as convert_run
from medmae.data.synthetic import write_phantom_dataset

REPO = Path(__file__).resolve().parents[1]
SHAPE = (16, 16, 12)
TO_WDS = [sys.executable, str(REPO / "tools" / "to_wds.py")]


def _fs():
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True)  # a fresh view: no listing cached from before a write


def _objects(url: str) -> dict[str, dict]:
    return {p.rsplit("/", 1)[-1]: info for p, info in _fs().find(url, detail=True).items()}


def _checksums(manifest: dict) -> dict[str, str]:
    return {s["key"]: s["checksum"] for s in manifest["samples"]}


def test_cli_writes_shards_manifest_and_errors_to_the_bucket(tmp_path, s3_bucket):
    dl = write_phantom_dataset(tmp_path / "src", n=4, shape=SHAPE)
    (dl.parent / "imagesTr" / "case_001.nii.gz").write_bytes(b"not an image")
    url = f"{s3_bucket}/spleen/v1"
    args = [str(dl), url, "--preset", "ct", "--workers", "2", "--shard-size-mb", "0.001", "--quiet", "--verify"]
    p = subprocess.run(TO_WDS + args + ["--allow-errors"], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "verify: ok" in p.stdout and "unreadable: case_001" in p.stdout
    assert not list(tmp_path.glob("s3*"))  # no local folder named after the URL
    objects = _objects(url)
    manifest = read_manifest(url)
    assert set(objects) == {"manifest.json", "errors.jsonl"} | {s["name"] for s in manifest["shards"]}
    assert all(objects[s["name"]]["size"] == s["bytes"] for s in manifest["shards"])
    assert manifest["complete"] and manifest["counts"] == {"train": 2, "validation": 1, "test": 0, "errors": 1}
    errors = [json.loads(line) for line in _fs().cat_file(f"{url}/errors.jsonl").decode().splitlines()]
    assert [(e["key"], e["reason"]) for e in errors] == [("case_001", "unreadable")]
    assert verify(url) == []

    local = tmp_path / "local"
    convert(dl, local, ConvertOptions(preset="ct", workers=0), progress=False)
    assert _checksums(manifest) == _checksums(read_manifest(local))  # the same bytes as a local conversion


@pytest.mark.parametrize(
    "url, problem",
    [
        ("s3://no-such-bucket-medmae/x", "cannot write there"),
        ("gs://bucket/x", "no filesystem for 'gs://' is installed"),
        ("nosuch://bucket/x", "Protocol not known"),
    ],
)
def test_unwritable_url_fails_before_any_work(tmp_path, s3_server, monkeypatch, url, problem):
    monkeypatch.chdir(tmp_path)
    # INPUT does not exist: an error about the URL proves it was checked first
    with pytest.raises(ValueError, match=problem) as e:
        convert(tmp_path / "missing.json", url, ConvertOptions(workers=0), progress=False)
    assert url.split("://")[0] in str(e.value) and not list(tmp_path.iterdir())


def test_cli_without_credentials_exits_2_before_any_work(tmp_path, s3_bucket):
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"))
    p = subprocess.run(
        TO_WDS + [str(tmp_path / "missing.json"), f"{s3_bucket}/x", "--quiet"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert p.returncode == 2 and "credentials" in p.stderr, p.stderr
    assert _objects(s3_bucket) == {} and not list(tmp_path.iterdir())


def test_resume_keeps_uploaded_shards_and_drops_what_no_manifest_names(tmp_path, s3_bucket):
    dl = write_phantom_dataset(tmp_path / "src", n=4, shape=SHAPE)
    full = json.loads(dl.read_text())
    part = tmp_path / "src" / "part.json"
    part.write_text(json.dumps({**full, "training": full["training"][:2], "validation": []}))
    url = f"{s3_bucket}/ds"
    opts = ConvertOptions(preset="ct", workers=0, shard_size_mb=0.001)  # one sample per shard
    assert convert(part, url, opts, progress=False).converted == 2
    before = _objects(url)
    # what a killed run leaves: a complete shard uploaded after the last manifest write
    _fs().pipe_file(f"{url}/train-000009.tar", _fs().cat_file(f"{url}/train-000000.tar"))
    res = convert(dl, url, opts, progress=False)
    assert (res.converted, res.skipped) == (2, 2)
    after = _objects(url)
    assert "train-000009.tar" not in after
    for name in ("train-000000.tar", "train-000001.tar"):
        assert after[name]["ETag"] == before[name]["ETag"]  # not rewritten
    manifest = read_manifest(url)
    assert {s["name"] for s in manifest["shards"]} | {"manifest.json", "errors.jsonl"} == set(after)
    assert len(manifest["samples"]) == 4 and verify(url) == []
    with pytest.raises(ValueError, match="other settings"):
        convert(dl, url, ConvertOptions(preset="mri", workers=0), progress=False)


def test_a_reader_never_sees_a_manifest_naming_missing_shards(tmp_path, s3_bucket, monkeypatch):
    """A reader polls the bucket while a run rewrites its manifest after every sample and shard."""
    monkeypatch.setattr(convert_run, "MANIFEST_EVERY_S", 0.0)
    dl = write_phantom_dataset(tmp_path / "src", n=8, shape=SHAPE)
    url = f"{s3_bucket}/ds"
    seen, running = [], True

    def read() -> None:
        while running:
            time.sleep(0.01)
            fs = _fs()
            try:
                manifest = json.loads(fs.cat_file(f"{url}/manifest.json"))
            except FileNotFoundError:
                continue
            sizes = {p.rsplit("/", 1)[-1]: i["size"] for p, i in fs.find(url, detail=True).items()}
            seen.append([(s["name"], s["bytes"], sizes.get(s["name"])) for s in manifest["shards"]])

    reader = threading.Thread(target=read)
    reader.start()
    try:
        res = convert(dl, url, ConvertOptions(preset="ct", workers=0, shard_size_mb=0.001), progress=False)
    finally:
        running = False
        reader.join()
    assert res.ok and len(read_manifest(url)["shards"]) == 8
    assert seen and all(size == stored for listing in seen for _, size, stored in listing)


def test_zarr_to_the_bucket(tmp_path, s3_bucket):
    import zarr

    dl = write_phantom_dataset(tmp_path / "src", n=2, shape=SHAPE)
    url = f"{s3_bucket}/z"
    res = convert(dl, url, ConvertOptions(format="zarr", preset="ct", workers=0, zarr_chunk=8), progress=False)
    assert res.ok and res.converted == 2
    assert verify(url) == []
    root = zarr.open_group(url, mode="r")
    assert root.attrs["medmae_dataset"] == 1 and root["train/case_000/image"].shape == (1, *SHAPE)
