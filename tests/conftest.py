"""Fixtures shared by the test modules: a light real Ray, a real S3 server (moto), and a Ray cluster of several
nodes on this machine."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PHANTOM_SHAPE = (24, 24, 20)  # phantom_sets' volume shape

# The modules that run real Ray / DeepSpeed jobs, longest first. `make test` runs the suite on two pytest-xdist
# workers, one module at a time each (`--dist loadfile`), handing modules out in collection order
# (`--no-loadscope-reorder`): the longest first, so no worker is left with a long one at the end.
SLOW_MODULES_FIRST = (  # seconds each took under `make test` (two workers sharing 2 cores)
    "test_multinode",  # 199
    "test_readme_path",  # 167
    "test_pretrain",  # 114
    "test_sweep",  # 100
    "test_distributed",  # 89
    "test_finetune",  # 81
    "test_object_store",  # 74
    "test_predict_ray",  # 65
    "test_step",  # 32 on a machine whose inductor cache is cold (a clean CI machine), 5 once warm
    "test_gpu_check",  # 21
    "test_convert_s3",  # 20
    "test_rank_streams",  # 18
    "test_resident",  # 11
)


def pytest_configure(config):
    """Under pytest-xdist, each worker's torch (and every process it starts) gets its share of the cores: two workers
    with two OpenMP threads each on 2 cores would spend CPU spinning rather than testing."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        cores = len(os.sched_getaffinity(0))
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // int(workers))))


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_MODULES_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rpartition(".")[2], len(rank)))  # stable sort


def load_script(path: str):
    """A launcher or tool of the repository (``"tools/predict.py"``) as a module, to call its ``main(argv)`` here:
    the same code as its command line without a new Python process."""
    name = path.replace("/", "_").removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class LocalRay:
    """The session's light local Ray: 2 CPUs, 200 MB object store, no dashboard, a short private temp dir.

    Started by the first test module that asks for it and kept for the next ones (a start costs ~6 s of CPU in
    Ray's own processes); the multi-node fixture, which connects this process to its own cluster, stops it first,
    and the next module that asks starts it again."""

    def __init__(self, temp: str) -> None:
        self.temp = temp

    def start(self) -> None:
        import ray

        if ray.is_initialized():
            return
        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
        # The Train controller polls workers every 2 s by default and a report waits for it; tests poll faster.
        os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.25"
        ray.init(
            num_cpus=2,
            object_store_memory=200 * 1024**2,
            include_dashboard=False,
            _temp_dir=self.temp,
            log_to_driver=False,
        )

    def stop(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="session")
def _local_ray(s3_server):
    """The session's ``LocalRay``. It starts after the S3 server, so its workers see the endpoint and credentials
    as a cluster node sees its object store's (credentials are never forwarded to workers)."""
    pytest.importorskip("ray")
    local = LocalRay(f"/tmp/rs_{os.getpid()}")  # socket paths must stay short
    yield local
    local.stop()


@pytest.fixture(scope="module")
def ray_session(_local_ray):
    """The session's light local Ray (``LocalRay``), running for the module's tests."""
    _local_ray.start()
    yield


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """Four 40³ CT phantoms as wds shards of ~0.1 MB: the pretraining data of the Ray, multi-node and rank-stream
    tests, which only read it."""
    from medmae.data.convert.options import ConvertOptions
    from medmae.data.convert.run import convert
    from medmae.data.synthetic import write_phantom_dataset

    root = tmp_path_factory.mktemp("data")
    datalist = write_phantom_dataset(root / "raw", n=4, shape=(40, 40, 40), seed=3)
    opts = ConvertOptions(format="wds", preset="ct", workers=0, shard_size_mb=0.1)
    convert(datalist, root / "wds", opts, progress=False)
    return root / "wds"


@pytest.fixture(scope="session")
def phantom_sets(tmp_path_factory):
    """Converted phantoms: ``ct`` (8 volumes, 6 train, ~2 per shard) as wds and Zarr, ``ct2`` (another 6 train
    volumes), ``ct2_spacing`` (ct2 at another spacing) and ``mri2`` (2-channel MRI), all 24 x 24 x 20: the data of
    the stream and validation-loader tests, which only read it."""
    from medmae.data.convert import ConvertOptions, convert
    from medmae.data.synthetic import write_phantom_dataset

    root = tmp_path_factory.mktemp("streams")
    out = {}

    def conv(name, src, **kw):
        opts = dict(format="wds", preset="ct", shard_size_mb=0.07, zarr_chunk=8, workers=0)
        assert convert(src, root / name, ConvertOptions(**{**opts, **kw}), progress=False).ok
        out[name] = root / name

    ct = write_phantom_dataset(root / "src_ct", n=8, shape=PHANTOM_SHAPE, num_classes=3)
    ct2 = write_phantom_dataset(root / "src_ct2", n=8, shape=PHANTOM_SHAPE, num_classes=3, seed=50)
    mri = write_phantom_dataset(root / "src_mri", n=4, shape=PHANTOM_SHAPE, channels=2, kind="mri")
    conv("ct", ct)
    conv("ct_zarr", ct, format="zarr")
    conv("ct2", ct2)
    conv("ct2_spacing", ct2, spacing=(2.0, 2.0, 2.0))
    conv("mri2", mri, preset="mri")
    return out


@pytest.fixture(scope="session")
def seg_shards(tmp_path_factory):
    """Eight 40³ CT-like phantoms with two organ classes (the datalist puts two in validation), as wds shards: the
    fine-tuning data of the finetune, sweep and multi-node tests, which only read it."""
    from medmae.data.convert import ConvertOptions, convert
    from medmae.data.synthetic import write_phantom_dataset

    root = tmp_path_factory.mktemp("seg")
    datalist = write_phantom_dataset(root / "raw", n=8, shape=(40, 40, 40), num_classes=3, seed=5)
    convert(datalist, root / "wds", ConvertOptions(format="wds", preset="ct", workers=0), progress=False)
    return root / "wds"


@pytest.fixture(scope="session")
def xray_shards(tmp_path_factory):
    """Four small 8-bit PNG radiographs (written by ITK) with two findings in a CSV, converted with the xray preset
    (one for validation): the 2D classification data of the loader tests, which only read it."""
    import itk
    import numpy as np

    from medmae.data.convert import ConvertOptions, convert
    from medmae.data.synthetic import make_phantom

    root = tmp_path_factory.mktemp("xray")
    rows = ["image,effusion,mass"]
    for i in range(4):
        img = (make_phantom((48, 40), 2, seed=i, kind="xray")[0][0] * 255).astype(np.uint8)
        itk.imwrite(itk.image_from_array(np.ascontiguousarray(img.T)), str(root / f"x{i}.png"))
        rows.append(f"x{i}.png,{i % 2},{int(i == 3)}")
    (root / "x.csv").write_text("\n".join(rows) + "\n")
    opts = ConvertOptions(preset="xray", val_fraction=0.25, workers=0)
    assert convert(root / "x.csv", root / "out", opts, progress=False).ok
    return root / "out"


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


def committed_step(run_url: str) -> int | None:
    """Step of the newest checkpoint Ray Train has committed for the run at ``run_url`` (``<storage_path>/<name>``,
    local or ``s3://``), None before the first: a checkpoint counts once the controller has written it into
    ``checkpoint_manager_snapshot.json``; a run re-started or resumed continues from that one, even if a newer
    checkpoint's files were uploaded already."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(f"{run_url}/checkpoint_manager_snapshot.json")
    # One whole-object GET, no cached ETag: the controller rewrites the snapshot while we poll it (s3fs's buffered
    # file would raise FileExpired on the second ranged read of an object replaced in between).
    try:
        latest = json.loads(fs.cat_file(path)).get("latest_checkpoint_result")
    except FileNotFoundError:
        return None
    return None if latest is None else int(latest["metrics"]["step"])


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket on the session's S3 server, as ``s3://name``."""
    return make_bucket(s3_server)


class ClusterNodes:
    """The nodes of the ``ray_cluster`` fixture: add worker nodes, kill them the hard way, list them."""

    def __init__(self, cluster) -> None:
        self.cluster = cluster

    def add(self, cpus: int = 1):
        """A new node offering ``cpus`` CPUs (1 = one training worker, as a 1-GPU node offers one GPU worker)."""
        return self.cluster.add_node(num_cpus=cpus, object_store_memory=80 * 2**20)

    def kill(self, node) -> None:
        """SIGKILL the node's raylet and every process on it, as when a spot instance disappears (no drain)."""
        self.cluster.remove_node(node, allow_graceful=False)

    @property
    def workers(self) -> list:
        return list(self.cluster.worker_nodes)


def _fast_autoscaling_coordinator(ray, head_id: str) -> None:
    """Start Ray's AutoscalingCoordinator ourselves with a 1 s refresh instead of 20 s.

    Ray Train's elastic policy sizes the worker group from this named actor's view of the nodes, which it refreshes
    every ``TICK_INTERVAL_S`` = 20 s (a class constant, no setting). The same class with a shorter period, created
    first under the same name, is the one Ray Train then finds: a join or a loss is seen in ~1 s, nothing else
    changes. The elastic test's schedule is sized for that: with 20 s the run would finish before it could grow.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            _AutoscalingCoordinatorActor,
        )
    except ImportError as e:  # a Ray other than 2.60 moved it: find it again rather than get a slow, flaky test
        raise RuntimeError(f"Ray's AutoscalingCoordinator is no longer where this fixture expects it: {e}") from e

    class FastTick(_AutoscalingCoordinatorActor):
        TICK_INTERVAL_S = 1

    actor = (
        ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(FastTick)
        .options(
            name="AutoscalingCoordinator",
            namespace="AutoscalingCoordinator",
            lifetime="detached",
            get_if_exists=True,
            scheduling_strategy=NodeAffinitySchedulingStrategy(head_id, soft=False),
        )
        .remote()
    )
    ray.get(actor.get_reserved_resources.remote("medmae-tests"))


@pytest.fixture(scope="module")
def _ray_cluster_module(s3_server):
    """Several Ray nodes on this machine (``ray.cluster_utils.Cluster``): real raylets, each with its own resources.

    The head has no CPUs, so it runs only drivers, Ray Train controllers and Tune trial drivers (as a cloud head
    does); tests add 1-CPU worker nodes and kill them. Nodes start after ``s3_server``, so their processes see the
    session's S3 endpoint and credentials as cluster nodes see their object store.
    """
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    temp = f"/tmp/rc{os.getpid()}"  # socket paths must stay short
    os.makedirs(f"{temp}/ray", exist_ok=True)
    with pytest.MonkeyPatch.context() as env:
        # Cluster writes its address into $RAY_TMPDIR/ray/ray_current_cluster: a private folder keeps other Ray
        # users of this machine (`ray.init(address="auto")`) from joining the test cluster.
        env.setenv("RAY_TMPDIR", temp)
        env.setenv("RAY_USAGE_STATS_ENABLED", "0")
        env.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")  # the controller polls workers (2 s by default)
        env.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "5")  # a group planned on a node just lost retries
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 0,
                "object_store_memory": 80 * 2**20,
                "include_dashboard": False,
                "temp_dir": f"{temp}/ray",
                # A killed raylet is declared dead after ~1.5 s instead of ~15 s (3 s period x 5 misses).
                "_system_config": {
                    "health_check_initial_delay_ms": 1000,
                    "health_check_period_ms": 500,
                    "health_check_timeout_ms": 1000,
                    "health_check_failure_threshold": 3,
                },
            },
        )
        try:
            if ray.is_initialized():  # the session's local Ray (LocalRay): its next user starts it again
                ray.shutdown()
            ray.init(address=cluster.address, log_to_driver=False)
            _fast_autoscaling_coordinator(ray, ray.get_runtime_context().get_node_id())
            yield ClusterNodes(cluster)
        finally:
            ray.shutdown()
            cluster.shutdown()
            shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def ray_cluster(_ray_cluster_module):
    """The module's multi-node Ray cluster (see ``_ray_cluster_module``); the worker nodes a test adds are removed
    after it, so every test starts with the head alone."""
    yield _ray_cluster_module
    for node in _ray_cluster_module.workers:
        _ray_cluster_module.kill(node)
