"""What the launchers print: Ray's routine lines stay off the console while ours and real problems show; ``--help``
lists no test hooks."""

from __future__ import annotations

import pytest

from medmae.distributed.console import is_routine
from medmae.training.cli import parser
from medmae.training.faults import FAIL_AT_STEP_ENV

# Forwarded lines as `make demo` printed them (Ray 2.60, DeepSpeed 0.19.8, torch 2.13), all on a healthy run.
ROUTINE = [
    (
        "PlacementGroupCleaner",
        "Failed to query Ray Train Controller actor state. State API may be temporarily "
        "unavailable. Continuing to monitor.",
    ),
    ("PlacementGroupCleaner", "Exception in thread PlacementGroupCleanerMonitor:"),
    (
        "PlacementGroupCleaner",
        "ConnectionError: Found multiple active Ray instances: {'192.0.2.2:45461', "
        "'192.0.2.2:39107'}. Please specify the one to connect to by setting the `--address` flag or `RAY_ADDRESS` "
        "environment variable.",
    ),
    (
        "TrainController",
        "[2026-11-30 21:51:59,253 E 549 580] core_worker.cc:2465: Actor with class name: "
        "'PreemptionWatcher' and ID: '42471019747b7ea87d46099f01000000' has constructor arguments in the object store "
        "and max_restarts > 0. If the arguments in the object store go out of scope or are lost, the actor restart "
        "will fail. See https://github.com/ray-project/ray/issues/53727 for more details.",
    ),
    ("TrainController", "Requesting resources: {'CPU': 1.0} * 2"),
    (
        "TrainController",
        "Attempting to start training worker group of size 2 with the following resources: [{'CPU': 1.0}] * 2",
    ),
    ("TrainController", "Started training worker group of size 2: "),
    ("TrainController", "- (ip=192.0.2.2, pid=677) world_rank=0, local_rank=0, node_rank=0"),
    ("RayTrainWorker", "Setting up process group for: env:// [rank=0, world_size=2]"),
    ("RayTrainWorker", "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully"),
    (
        "RayTrainWorker",
        "Checkpoint successfully created at: Checkpoint(filesystem=local, "
        "path=/w/runs/pretrain_debug/checkpoint_2026-11-30_21-52-14.538147)",
    ),
    (
        "RayTrainWorker",
        "Reporting training result 1: TrainingReport(checkpoint=Checkpoint(filesystem=local, "
        "path=/w/runs/pretrain_debug/checkpoint_2026-11-30_21-52-14.538147), metrics={'loss': 0.71})",
    ),
]
# Lines that must reach the console: ours, and what a failing run prints.
SHOWN = [
    ("RayTrainWorker", "21:52:12 [rank 0] INFO medmae.progress: step 1/60 loss 0.8365 lr 6.25e-05 | eta 0:01:05"),
    ("RayTrainWorker", "21:52:12 [rank 1] WARNING medmae.training.trainer: MEDMAE_TEST_FAIL_AT_STEP: killing"),
    ("RayTrainWorker", "Traceback (most recent call last):"),
    ("RayTrainWorker", "ValueError: data.path: no manifest.json at /data/x/manifest.json"),
    ("TrainController", "[2026-11-30 21:51:59,253 E 549 580] core_worker.cc:1021: Actor RayTrainWorker died"),
    ("TrainController", "Training failed due to worker errors: ..."),
    ("TrainController", "Deciding to RETRY, since the number of failures (1) is within max_failures=1."),
    ("RayTrainWorker", "DeepSpeed Cannot build deepspeed.ops.comm.deepspeed_shm_comm_op: g++ not found"),
]


@pytest.mark.parametrize("actor,line", ROUTINE, ids=[f"{a}:{line[:30]}" for a, line in ROUTINE])
def test_routine_ray_lines_stay_off_the_console(actor, line):
    assert is_routine(actor, line)


@pytest.mark.parametrize("actor,line", SHOWN, ids=[f"{a}:{line[:30]}" for a, line in SHOWN])
def test_our_lines_and_real_problems_show(actor, line):
    assert not is_routine(actor, line)


def test_help_lists_no_test_hooks():
    """The key listing every launcher's --help ends with (built from the config dataclasses, like the configs)."""
    text = parser("launcher").format_help()
    keys = " ".join(line.split(":", 1)[1] for line in text.splitlines() if line.startswith("  ") and ":" in line)
    assert "run: name, output_dir" in text and "dist: num_workers" in text  # the listing is there
    assert "fail_at" not in keys and "test" not in keys.lower()
    assert FAIL_AT_STEP_ENV not in text
