"""A newcomer's first hour, as the README tells it, on a copy of the checkout as a clean clone holds it.

`make demo`'s data step (with the venv running this suite: no reinstall), then the README's
`ray job submit --working-dir . -- python launch/pretrain.py --config configs/pretrain_debug.yaml`, literally, to a
Ray head this test starts on 127.0.0.1 (and stops by its process id), then the fine-tuning and prediction commands
that job prints, run as printed. HOME is the test's own, so the demo data (~/.cache/medmae) and Ray's token are too.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import load_script

from medmae.config import load_config
from medmae.training.config import JobConfig

pytest.importorskip("ray")
REPO = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_clone(dst: Path) -> Path:
    """The files a clone of this checkout holds (tracked or not ignored): what `git clone` gives after a commit."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout")
    names = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, names):
        if (REPO / name).is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dst / name)
    return dst


def _run(cmd: list[str], cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{shlex.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def _start_head(env: dict, temp: str, log: Path) -> tuple[subprocess.Popen, int]:
    # Every port explicit: a Ray already on this machine holds the defaults, and a clash leaves the head without
    # a job agent ("No available agent to submit job").
    port, dash, *agent_ports = (_free_port() for _ in range(7))
    port_flags = [
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
        "--metrics-export-port",
        "--ray-client-server-port",
    ]
    # --block keeps `ray start` in the foreground: SIGTERM to it stops exactly this head (`ray stop` stops all).
    start = [
        str(VENV / "bin" / "ray"),
        "start",
        "--head",
        "--block",
        "--num-cpus",
        "2",
        "--port",
        str(port),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dash),
        "--disable-usage-stats",
        "--temp-dir",
        temp,
        "--object-store-memory",
        str(200 * 1024**2),
    ]
    start += [x for flag, p in zip(port_flags, agent_ports) for x in (flag, str(p))]
    with open(log, "wb") as f:
        head = subprocess.Popen(start, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", dash)) == 0:
                return head, dash
        assert head.poll() is None, f"ray start exited:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)
    _stop(head)
    raise AssertionError("the Ray head's dashboard did not come up in 120 s")


def _stop(head: subprocess.Popen) -> None:
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()


def _readme_line(pattern: str) -> list[str]:
    """A command line of the README, as a newcomer copies it."""
    match = re.search(rf"^({pattern})$", (REPO / "README.md").read_text(), flags=re.M)
    assert match, f"the README has no line matching {pattern!r}"
    return shlex.split(match.group(1).split("#")[0])


def _printed(stdout: str, label: str) -> list[str]:
    """The command after ``label`` in the launcher's closing "next:" block."""
    match = re.search(rf"^  {label} +(.+)$", stdout, flags=re.M)
    assert match, f"no '{label}' command in the job's output:\n{stdout[-3000:]}"
    return shlex.split(match.group(1))


@pytest.mark.slow
def test_readme_commands_from_a_clean_clone(tmp_path):
    clone = _clean_clone(tmp_path / "clone")
    home = tmp_path / "home"
    home.mkdir()
    env = {
        **os.environ,
        "HOME": str(home),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        # The job's `python` is the head's. No drain on SIGTERM: a test head serves nobody.
        "PATH": f"{VENV / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        # DeepSpeed's CPU op, built once per machine where the Makefile keeps it (not in this test's HOME).
        "TORCH_EXTENSIONS_DIR": os.environ.get(
            "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/medmae/torch_extensions")
        ),
    }
    # A clone's scripts find their own medmae; the outer `make test`'s flags (TORCH=..., -j) are not the newcomer's.
    for name in ("RAY_ADDRESS", "PYTHONPATH", "MAKEFLAGS", "MFLAGS", "MAKELEVEL"):
        env.pop(name, None)

    # 1. `make demo` up to its pretraining: the sample volumes and their shards, at the path the configs name.
    _run(["make", "-o", str(VENV / ".installed-cpu"), f"VENV={VENV}", "demo-data"], clone, env, timeout=300)
    shards = home / ".cache/medmae/sample_wds"
    assert (shards / "manifest.json").is_file()

    # The token a first `make demo` leaves in ~/.ray (its local Ray writes one); the head and the CLI use it.
    _run([str(VENV / "bin" / "ray"), "get-auth-token", "--generate"], clone, env, timeout=60)
    temp = f"/tmp/rnc_{os.getpid()}"  # socket paths must stay short; the job's copy of the clone lives here
    try:
        out, encoder = _pretrain_job(clone, env, temp, tmp_path / "head.log")
        # 3. Fine-tuning from the exported encoder: the printed command, shortened for the test.
        finetune = _printed(out, "fine-tune")
        assert finetune[1:] == [
            "launch/finetune.py",
            "--config",
            "configs/finetune_debug.yaml",
            "--pretrained",
            str(encoder),
        ]
        quick = [
            "train.max_steps=4",
            "run.log_every=2",
            "run.checkpoint_every=4",
            "run.val_every=0",
            "data.num_workers=0",
            "finetune.sw_overlap=0",
        ]
        tuned = _run([*finetune, *quick], clone, env, timeout=400)
        assert f"initialised the encoder from {encoder}" in tuned.stderr
        assert (clone / "runs/finetune_debug/best_model.safetensors").is_file()
        # 4. Prediction on a real volume (the sample's validation brain), written in its own geometry.
        predict = _printed(out, "predict")
        image, labels = Path(predict[-2]), clone / predict[-1]
        assert predict[1:4] == ["tools/predict.py", "--checkpoint", "runs/finetune_debug"]
        assert image == home / ".cache/medmae/sample/imagesTr/icbm152_05.nii.gz"
        _run([*predict, "--quiet", "--overlap", "0"], clone, env, timeout=300)  # 48 windows, not 210
        src, seg = nib.load(image), nib.load(labels)
        assert seg.shape == src.shape and np.allclose(seg.affine, src.affine)
        assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1, 2}
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _pretrain_job(clone: Path, env: dict, temp: str, log: Path) -> tuple[str, Path]:
    """2. The README's `ray job submit` line, as written, to a head started for it; -> (job output, encoder)."""
    head, dash = _start_head(env, temp, log)
    try:
        job_env = {**env, "RAY_ADDRESS": f"http://127.0.0.1:{dash}"}  # how the Ray CLI is pointed at a cluster
        submit = _readme_line(r"ray job submit --working-dir \. -- python launch/pretrain\.py .*")
        assert submit[-2:] == ["--config", "configs/pretrain_debug.yaml"]
        out = _run(submit, clone, job_env, timeout=400).stdout
    finally:
        _stop(head)  # before fine-tuning: the head's memory and CPUs are the machine's
    assert "succeeded" in out.lower()
    assert re.search(r"\[rank 0\] INFO medmae\.progress: step 60/60 loss", out)
    for routine in (
        "PreemptionWatcher",
        "Failed to query Ray Train Controller",
        "Checkpoint successfully created",
        "Reporting training result",
        "built successfully",
        "all_gather_into_tensor` is deprecated",
        "[rank 1] INFO",
    ):
        assert routine not in out, f"{routine!r} reached the console:\n{out[-6000:]}"
    # The launcher knows it runs in the job's uploaded copy (what the test below fakes) and says where outputs go.
    assert "run.output_dir: 'runs' is relative, so this Ray job writes into its uploaded copy" in out
    encoder = Path(re.search(r"^encoder: (\S+)$", out, flags=re.M).group(1))
    assert encoder.is_file() and encoder.name == "encoder.safetensors"
    assert _printed(out, "curves")[1:] == ["--logdir", str(encoder.parent / "tensorboard")]
    return out, encoder


def _launcher():
    return load_script("launch/pretrain.py")


def test_a_relative_data_path_missing_from_a_jobs_upload_says_so(tmp_path, monkeypatch):
    """What a job's driver sees (Ray's variable as a job gets it; the test above checks Ray sets it): it runs in the
    uploaded copy, which has no data/ (git-ignored). The error names the key, the reason and the fix."""
    launcher = _launcher()
    cfg = load_config(JobConfig, REPO / "configs/pretrain_debug.yaml", ["data.path=data/sample_wds"])
    monkeypatch.chdir(tmp_path)
    launcher.check_job_paths(cfg)  # not a job: nothing to say (the loaders report a missing dataset)
    monkeypatch.setenv(
        "RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}})
    )
    with pytest.raises(
        SystemExit,
        match=r"data\.path: 'data/sample_wds' is relative, so this Ray job looks for it in "
        r"its uploaded copy .* not there: .* uploads neither what \.gitignore hides .*"
        r"data\.path=\$PWD/data/sample_wds",
    ):
        launcher.check_job_paths(cfg)
    (tmp_path / "data/sample_wds").mkdir(parents=True)  # uploaded after all (e.g. not ignored): fine
    launcher.check_job_paths(cfg)
    launcher.check_job_paths(load_config(JobConfig, REPO / "configs/pretrain_debug.yaml"))  # the demo's absolute path
