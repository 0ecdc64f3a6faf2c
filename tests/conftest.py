"""Fixtures shared by the test modules: a light real Ray, and a real S3 server (moto)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest


@pytest.fixture(scope="module")
def ray_session(request):
    """One light local Ray per test module: 2 CPUs, 200 MB object store, no dashboard, a short private temp dir."""
    ray = pytest.importorskip("ray")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    # The Train controller polls workers every 2 s by default and a report waits for it; tests poll faster.
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.25"
    temp = f"/tmp/r{request.module.__name__[-6:]}_{os.getpid()}"  # socket paths must stay short
    ray.init(num_cpus=2, object_store_memory=200 * 1024**2, include_dashboard=False, _temp_dir=temp,
             log_to_driver=False)
    yield
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 endpoint for the whole session: moto's standalone server in its own process on 127.0.0.1 (a free
    port), stopped at the end. Sets ``AWS_ENDPOINT_URL``, dummy credentials and the region in ``os.environ`` for the
    session, so boto3, s3fs and every process started afterwards (CLI tools, a Ray started after it) reach it.
    Yields the endpoint URL; ``s3_bucket`` gives each test a fresh bucket."""
    pytest.importorskip("moto.server", reason="needs moto[server] (the dev extra)")
    pytest.importorskip("s3fs", reason="needs s3fs (the s3 or dev extra)")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("moto") / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start (exit {proc.poll()}); see {log.name}") from None
                time.sleep(0.2)
        with pytest.MonkeyPatch.context() as env:
            env.setenv("AWS_ENDPOINT_URL", endpoint)
            env.setenv("AWS_ACCESS_KEY_ID", "testing")
            env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            env.setenv("AWS_DEFAULT_REGION", "us-east-1")
            env.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no waiting on a cloud metadata service
            for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
                env.delenv(name, raising=False)
            yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def make_bucket(endpoint: str, prefix: str = "test") -> str:
    """Create a bucket with a fresh name on ``endpoint``; returns its ``s3://`` URL."""
    import boto3

    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket on the session's S3 server, as ``s3://name``."""
    return make_bucket(s3_server)
