"""Fixtures shared by the test modules that run real Ray."""

from __future__ import annotations

import os
import shutil

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
