"""bench/gpu_check.sh runs on the CPU as a smoke test (tiny sizes; the CUDA-only sections say they were skipped)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_gpu_check_runs_on_the_cpu_and_writes_its_json(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [
            str(REPO / "bench/gpu_check.sh"),
            "--cpu",
            "--out",
            str(tmp_path),
            "--sections",
            "env,sdpa,model,engine,pinned,mfu,predict",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check_cpu.json").read_text())
    assert result["device"] == "cpu" and result["env"]["deepspeed"][0].isdigit()
    assert result["sdpa"] == {"skipped": "no CUDA"} and result["pinned"] == {"skipped": "no CUDA"}
    [row] = result["model"]["rows"]
    assert row["ours_bf16_weights_s"] > 0 and row["flops_per_sample_G"] > 0
    assert result["engine"]["ours"]["step_s"] > 0 and result["engine"]["with_throughput_timer"]["step_s"] > 0
    rows = result["mfu"]["rows"]  # issue 17's table: without a GPU no compiled rows, no MFU; syncs counted
    assert set(rows) == {"model eager", "engine zero0", "engine zero1", "engine zero2", "trainer b2 eager"}
    assert all(r["step_s"] > 0 and r["syncs_per_step"] <= 1 for r in rows.values())
    assert result["predict"]["one_pass"]["volumes_per_s"] > 0 and result["predict"]["tta_cost"] > 1
