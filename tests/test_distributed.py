"""Distributed layer without Ray: config validation, generated DeepSpeed JSON, and real DeepSpeed engines (world of
one in-process; two gloo processes under torchrun for checkpoints that resume on a different worker count)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from medmae.config import from_dict
from medmae.distributed import DistributedConfig
from medmae.distributed.deepspeed_config import build_deepspeed_config, resolve_precision

REPO = Path(__file__).resolve().parents[1]


# -- config -----------------------------------------------------------------------------------------------------------


def test_config_from_dict_defaults_and_values():
    cfg = from_dict(DistributedConfig, {"num_workers": 4, "min_workers": 2, "zero_stage": 3, "precision": "bf16"})
    assert (cfg.num_workers, cfg.min_workers, cfg.zero_stage, cfg.precision) == (4, 2, 3, "bf16")
    assert cfg.elastic and not DistributedConfig().elastic


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"num_workers": 0}, "num_workers"),
        ({"num_workers": 2, "min_workers": 3}, "min_workers"),
        ({"zero_stage": 4}, "zero_stage"),
        ({"cpus_per_worker": 0.0}, "cpus_per_worker"),
        ({"max_failures": -2}, "max_failures"),
        ({"offload_optimizer": True, "zero_stage": 0}, "offload_optimizer"),
        ({"precision": "fp8"}, "precision"),
        ({"backend": "mpi"}, "backend"),
        ({"storage_path": ""}, "storage_path"),
        ({"resize_interval_s": 0}, "resize_interval_s"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(data, field):
    with pytest.raises(ValueError, match=field):
        from_dict(DistributedConfig, data)


def test_workers_get_the_object_store_endpoint_but_no_credentials(monkeypatch):
    from medmae.distributed import forwarded_env

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    env = forwarded_env()
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000" and env["AWS_REGION"] == "eu-west-1"
    assert env["NCCL_DEBUG"] == "INFO" and "AWS_SECRET_ACCESS_KEY" not in env


def test_config_direct_construction_validates_literals():
    with pytest.raises(ValueError, match="precision"):
        DistributedConfig(precision="half")  # type: ignore[arg-type]


# -- DeepSpeed JSON ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_config_batch_identity_and_sections(stage):
    cfg = DistributedConfig(zero_stage=stage, precision="bf16", offload_optimizer=stage > 0)
    if stage == 0:  # no offload at stage 0: FlatAdamW's layout, DeepSpeed's autocast mode and no clipping of its own
        ds = build_deepspeed_config(cfg, micro_batch=3, grad_accum=5, world_size=4, grad_clip=1.5, device_type="cpu")
        assert not ds["bf16"]["enabled"] and ds["torch_autocast"]["enabled"] and ds["gradient_clipping"] == 0.0
        return
    ds = build_deepspeed_config(cfg, micro_batch=3, grad_accum=5, world_size=4, grad_clip=1.5, device_type="cpu")
    assert ds["train_batch_size"] == 3 * 5 * 4 == 60
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 5
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]  # the offloaded optimizer keeps DeepSpeed's bf16
    assert ds["gradient_clipping"] == 1.5
    assert ds["zero_allow_untested_optimizer"] and "optimizer" not in ds and "scheduler" not in ds
    assert ("offload_optimizer" in ds["zero_optimization"]) == (stage > 0)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_config_syncs_less_and_reduces_in_fp32(stage):
    ds = build_deepspeed_config(
        DistributedConfig(zero_stage=stage, precision="bf16"),
        micro_batch=2,
        grad_accum=2,
        world_size=4,
        grad_clip=1.0,
        device_type="cuda",
    )
    # no synchronised throughput timer around every micro-step (we time steps ourselves)
    assert ds["timers"] == {"throughput": {"enabled": False}} and ds["wall_clock_breakdown"] is False
    assert ds["communication_data_type"] == "fp32"
    zero = ds["zero_optimization"]
    assert "data_types" not in ds  # BF16_Optimizer (selected by grad_accum_dtype at stage 1) syncs twice a step
    if stage < 3:  # FlatAdamW: fp32 parameters and gradients under autocast, reduced in fp32; no DeepSpeed norm
        assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
        assert not ds["bf16"]["enabled"] and ds["gradient_clipping"] == 0.0
    if stage in (1, 2):  # buckets small enough to overlap with backward; stage 2 overlaps on a side stream
        assert zero["overlap_comm"] == (stage == 2) and zero["reduce_bucket_size"] < 5e8
        assert zero["compute_grad_norm"] is False
    if stage == 3:  # torch AdamW: DeepSpeed's bf16 and clipping
        assert ds["bf16"]["enabled"] and ds["gradient_clipping"] == 1.0


def test_deepspeed_config_refusals():
    cfg = DistributedConfig()
    with pytest.raises(ValueError, match="fp16 needs a CUDA"):
        build_deepspeed_config(
            DistributedConfig(precision="fp16"),
            micro_batch=1,
            grad_accum=1,
            world_size=1,
            grad_clip=0.0,
            device_type="cpu",
        )
    with pytest.raises(ValueError, match="micro_batch"):
        build_deepspeed_config(cfg, micro_batch=0, grad_accum=1, world_size=1, grad_clip=0.0, device_type="cpu")
    with pytest.raises(ValueError, match="grad_accum"):
        build_deepspeed_config(cfg, micro_batch=2, grad_accum=1.5, world_size=1, grad_clip=0.0, device_type="cpu")
    with pytest.raises(ValueError, match="grad_clip"):
        build_deepspeed_config(cfg, micro_batch=2, grad_accum=1, world_size=1, grad_clip=-1.0, device_type="cpu")


def test_precision_auto_on_cuda_counts_only_native_bf16(monkeypatch):
    # T4 / V100 emulate bf16 (slowly): is_bf16_supported() says yes unless emulation is excluded
    def supported(including_emulation: bool = True) -> bool:
        return including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert resolve_precision("auto", "cuda") == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_precision("auto", "cuda") == "bf16"


def test_precision_auto_and_fp16_on_cuda():
    native = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
    assert resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")
    assert resolve_precision("fp16", "cuda") == "fp16"
    assert resolve_precision("fp32", "cpu") == "fp32"


# -- real engines -----------------------------------------------------------------------------------------------------


class TinyNet(nn.Module):
    """Two-layer MLP plus a free root parameter (the MAE mask-token pattern that ZeRO-3 must gather)."""

    def __init__(self) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, 8))
        self.fc1 = nn.Linear(8, 32)
        self.fc2 = nn.Linear(32, 1)
        self.register_buffer("scale", torch.ones(1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        pred = self.fc2(torch.relu(self.fc1(x + self.token))) * self.scale
        return (pred.float() - y).pow(2).mean()


@pytest.mark.parametrize("stage", [0, 2])
def test_single_process_engine_trains_saves_and_loads(tmp_path, monkeypatch, stage):
    from medmae.distributed.engine import create_engine

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    from medmae.distributed import optimizer_layout
    from medmae.distributed.flat_adamw import FlatAdamW

    torch.manual_seed(0)
    model = TinyNet()
    cfg = DistributedConfig(zero_stage=stage, precision="fp32")
    layout = optimizer_layout(cfg, "cpu")
    if layout == "torch":  # ZeRO-3
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    else:
        optimizer = FlatAdamW([{"params": model.parameters()}], lr=3e-2, single_group=layout == "flat_single")
    engine = create_engine(
        model,
        optimizer,
        cfg,
        micro_batch=4,
        grad_accum=2,
        grad_clip=1.0,
    )
    assert (engine.rank, engine.world_size, engine.device.type) == (0, 1, "cpu")
    # The world of one holds its rendezvous port; child processes must not inherit it as theirs.
    assert not {"WORLD_SIZE", "MASTER_PORT", "RANK"} & set(os.environ)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    y = x.sum(1, keepdim=True)
    losses, boundaries = [], []
    for i in range(48):
        loss = engine(x[(i % 8) * 4 : (i % 8) * 4 + 4], y[(i % 8) * 4 : (i % 8) * 4 + 4])
        engine.backward(loss)
        boundaries.append(engine.step())
        losses.append(loss.item())
    assert boundaries == [False, True] * 24
    assert sum(losses[-8:]) < 0.3 * sum(losses[:8])
    assert engine.grad_norm_tensor() is not None and float(engine.grad_norm_tensor()) > 0

    engine.save(tmp_path, "step-00000008", {"step": 8, "data": [1, 2]})
    weights = engine.consolidated_state_dict()
    assert set(weights) == {"token", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "scale"}
    assert all(v.dtype == torch.float32 for v in weights.values())

    # lr 0 freezes the weights (set_lr reaches the optimizer); loading restores the saved step exactly.
    engine.set_lr(0.0)
    for _ in range(2):
        engine.backward(engine(x[:4], y[:4]))
        engine.step()
    assert all(torch.equal(weights[k], v) for k, v in engine.consolidated_state_dict().items())
    engine.set_lr(1.0)
    for _ in range(2):
        engine.backward(engine(x[:4], y[:4]))
        engine.step()
    assert not torch.equal(weights["fc1.weight"], engine.consolidated_state_dict()["fc1.weight"])
    state = engine.load(tmp_path)
    assert state["step"] == 8 and state["data"] == [1, 2] and "universal_checkpoint_info" not in state
    assert all(torch.equal(weights[k], v) for k, v in engine.consolidated_state_dict().items())
    assert json.loads((tmp_path / "step-00000008" / "medmae_dist.json").read_text())["world_size"] == 1


_EXIT_SCRIPT = """
import atexit, torch.distributed as dist
from medmae.distributed.engine import init_process_group
if {ray_like}:  # a group someone else started (Ray Train) is theirs to end
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1)
init_process_group()
atexit._run_exitfuncs()
print("alive" if dist.is_initialized() else "ended")
"""


@pytest.mark.parametrize("ray_like", [False, True])
def test_a_process_group_is_ended_at_exit_only_by_whoever_started_it(ray_like):
    # Without this, a torchrun worker that finished its work still aborted at interpreter teardown about 1 time
    # in 4 ("terminate called without an active exception"), failing CI after everything had passed.
    from medmae.distributed.engine import _free_port

    code = _EXIT_SCRIPT.format(ray_like=ray_like, port=_free_port())
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == ("alive" if ray_like else "ended")


_TORCHRUN_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_distributed import TinyNet
from medmae.distributed import DistributedConfig, create_engine

mode, stage, precision, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
torch.manual_seed(0)
world = int(__import__("os").environ.get("WORLD_SIZE", "1"))
model = TinyNet()
engine = create_engine(model, torch.optim.AdamW(model.parameters(), lr=1e-2),
                       DistributedConfig(zero_stage=stage, precision=precision), micro_batch=4,
                       grad_accum=8 // (4 * world), grad_clip=1.0)
x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
y = x.sum(1, keepdim=True)

def train(steps, start):
    # Global sample order is the same for any world size: sample s of step k is k*8+s.
    for k in range(start, start + steps):
        for a in range(engine.ds_engine.gradient_accumulation_steps()):
            i = (k * 8 + (a * world + engine.rank) * 4) % 64
            engine.backward(engine(x[i:i + 4].to(engine.dtype), y[i:i + 4]))
            engine.step()

if mode == "save":
    train(3, 0)
    engine.save(out, "step-3", {{"step": 3}})
    train(3, 3)
else:
    assert engine.load(out)["step"] == 3
    train(3, 3)
weights = engine.consolidated_state_dict()
if engine.rank == 0:
    torch.save(weights, f"{{out}}/{{mode}}-final.pt")
"""


def _torchrun(nproc: int, args: list[str], tmp_path: Path) -> None:
    script = tmp_path / "resize.py"
    script.write_text(_TORCHRUN_SCRIPT.format(tests=str(REPO / "tests")))
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        str(script),
        *args,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "precision", "save_world", "load_world"),
    [
        (2, "bf16", 2, 1),  # ZeRO partitions -> universal checkpoint
        (3, "fp32", 1, 2),  # parameters partitioned too, and growing instead of shrinking
        (0, "bf16", 2, 1),  # no ZeRO: full fp32 masters in the model file, loads as it is
    ],
)
def test_resume_on_a_different_worker_count_continues_exactly(tmp_path, stage, precision, save_world, load_world):
    out = tmp_path / "ckpt"
    _torchrun(save_world, ["save", str(stage), precision, str(out)], tmp_path)
    _torchrun(load_world, ["load", str(stage), precision, str(out)], tmp_path)
    reference = torch.load(out / "save-final.pt", weights_only=True)
    resumed = torch.load(out / "load-final.pt", weights_only=True)
    assert set(reference) == set(resumed)
    for name, value in reference.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6, msg=name)


# -- a killed rank's checkpoint folder ---------------------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_orphaned_checkpoint_folders_of_this_hosts_dead_processes_are_removed(tmp_path):
    from medmae.distributed.ray_launch import _HOST, remove_orphaned_checkpoint_dirs

    dead = _dead_pid()
    names = {
        f"medmae-ckpt-{dead}-{_HOST}-step-00000004-x1": False,  # a killed rank's: removed
        f"medmae-ckpt-{os.getpid()}-{_HOST}-step-00000004-x2": True,  # a live process's: kept
        f"medmae-ckpt-{dead}-0123abcd-step-00000004-x3": True,  # another host's, in a shared folder: kept
        "medmae-ckpt-odd": True,
        "unrelated": True,
    }
    for name in names:
        (tmp_path / name / "step-00000004").mkdir(parents=True)
    removed = remove_orphaned_checkpoint_dirs(tmp_path)
    assert {p.name for p in removed} == {n for n, kept in names.items() if not kept}
    assert {p.name for p in tmp_path.iterdir()} == {n for n, kept in names.items() if kept}
