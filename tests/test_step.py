"""The training step's host work, counted on CPU as a stand-in for the GPU (issue 17): no host sync outside the log
step, optimizer work that does not grow with the model's depth, FlatAdamW's maths, and the compiled forward."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from medmae.config import load_config
from medmae.distributed.flat_adamw import FlatAdamW
from medmae.models import create_model
from medmae.training.config import JobConfig
from medmae.training.counters import StepCounter
from medmae.training.optim import param_groups

REPO = Path(__file__).resolve().parents[1]


def trainer(shards: Path, out: Path, name: str, *extra: str):
    from medmae.training.trainer import Trainer

    cfg = load_config(
        JobConfig,
        REPO / "configs/pretrain_debug.yaml",
        [
            f"data.path={shards}",
            "data.roi_size=16",
            "data.num_workers=0",
            f"run.output_dir={out}",
            f"run.name={name}",
            "train.max_steps=100",
            "train.micro_batch=2",
            "run.image_every=0",
            "dist.num_workers=1",
            "dist.precision=bf16",
            *extra,
        ],
    )
    t = Trainer(cfg)
    for _ in range(3):  # warm-up: lazy optimizer state, first-call caches
        t.train_step(t.data)
    return t


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_the_step_syncs_only_once_per_log_step(shards, tmp_path, stage):
    t = trainer(shards, tmp_path, f"s{stage}", f"dist.zero_stage={stage}")
    with StepCounter() as plain:
        for _ in range(3):
            t.train_step(t.data)
    assert plain.sync_count == 0, dict(plain.syncs)
    with StepCounter() as logged:
        t.train_step(t.data)
        metrics = t.read_metrics(1e-4, time.perf_counter())
    assert logged.sync_count == 1, dict(logged.syncs)  # the one stacked read of the interval's numbers
    assert metrics["grad_norm"] > 0 and metrics["bad_steps"] == 0


def outside_the_model(t) -> int:
    """Ops a step dispatches beyond its model's own forward and backward of the same batch."""
    batch = next(t.data)
    batch["image"] = batch["image"].to(t.engine.dtype)
    with StepCounter() as model_only:
        with t.engine.autocast_context():
            loss, _ = t.task.loss(t.engine.module, batch)
        loss.backward()
    t.engine.module.zero_grad(set_to_none=True)
    with StepCounter() as step:
        t.train_step(t.data)
    return step.total_ops - model_only.total_ops


def test_the_optimizer_work_does_not_grow_with_the_number_of_parameter_tensors(shards, tmp_path):
    """ZeRO-0 (the default) in a world of one: the norm, clipping, skip and AdamW update are a fixed number of fused
    kernels, DeepSpeed adds none per parameter; 4x the blocks (60 -> 132 parameter tensors) adds no op outside."""
    counts = [
        outside_the_model(
            trainer(shards, tmp_path, f"d{d}", "dist.zero_stage=0", f"model.depth={d}", "optim.grad_clip=1")
        )
        for d in (2, 8)
    ]
    assert counts[0] == counts[1] and counts[0] < 120, counts  # the crop, the lr, the fused update, the metrics


def reference_step(params: list, opt: torch.optim.AdamW, max_norm: float) -> None:
    """torch AdamW after DeepSpeed's clipping: ``clip_coef = max_norm / (norm + 1e-6)`` when below 1."""
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    if max_norm > 0 and max_norm / (float(norm) + 1e-6) < 1:
        for p in params:
            p.grad.mul_(max_norm / (float(norm) + 1e-6))
    opt.step()


@pytest.mark.parametrize("single_group", [False, True])
@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_flat_adamw_is_adamw_with_clipping_and_skips_a_non_finite_step(single_group, clip):
    torch.manual_seed(0)
    models = [create_model("mae_vit_3d_debug", img_size=16) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    groups = [param_groups(m, 0.05, layer_decay=0.75) for m in models]  # several decay and lr-scale classes
    ours = FlatAdamW(groups[0], lr=1e-3, betas=(0.9, 0.95), max_grad_norm=clip, single_group=single_group)
    ref = torch.optim.AdamW(groups[1], lr=torch.tensor(1e-3), betas=(0.9, 0.95), fused=True)
    for g in ref.param_groups:  # a tensor lr, as FlatAdamW feeds its kernel: the same fp32 rounding
        g["lr"] = torch.tensor(1e-3 * g.get("lr_scale", 1.0))
    if not single_group:
        for g in ours.param_groups:
            g["lr"] = 1e-3 * g["lr_scale"]
    x = torch.randn(2, 1, 16, 16, 16)
    for _ in range(5):
        noise = torch.rand(2, models[0].cfg.num_patches)
        for m in models:
            m.zero_grad()
            m(x, noise=noise).loss.backward()
        ours.step()
        reference_step([p for p in models[1].parameters() if p.grad is not None], ref, clip)
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        if name.endswith("attn.qkv.bias"):  # attention ignores the key bias: its exactly-zero gradient is rounding
            d = a.numel() // 3  # noise, which Adam scales up to lr-sized steps: compare the query and value thirds
            a, b = torch.cat([a[:d], a[2 * d :]]), torch.cat([b[:d], b[2 * d :]])
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")
    before = {k: v.clone() for k, v in models[0].state_dict().items()}
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in ours.state.items()}
    next(models[0].parameters()).grad[0].fill_(float("nan"))  # one non-finite gradient: the whole step is skipped
    ours.step()
    assert all(torch.equal(before[k], v) for k, v in models[0].state_dict().items())
    assert all(torch.equal(state[id(p)][k], v) for p, s in ours.state.items() for k, v in s.items())
    assert float(ours.skipped_steps) == 1 and not torch.isfinite(ours.grad_norm)


@pytest.fixture(scope="module")
def compiled_mae():
    """One Inductor compile (~40 s on 2 cores) for the compile checks: a 1-block debug MAE in fp32."""
    import torch._dynamo
    import torch._inductor.config

    from medmae.training.compile import compile_training_forward

    torch._dynamo.reset()
    torch._inductor.config.fallback_random = True  # the same masks from the same seed as eager
    torch.manual_seed(0)
    eager = create_model("mae_vit_3d_debug", img_size=16, depth=1, decoder_depth=1)
    compiled = create_model("mae_vit_3d_debug", img_size=16, depth=1, decoder_depth=1)
    compiled.load_state_dict(eager.state_dict())
    yield eager, compile_training_forward(compiled, "default")
    torch._inductor.config.fallback_random = False


def test_the_compiled_forward_follows_eager_without_breaks_or_recompiles(compiled_mae):
    from torch._dynamo.utils import counters

    eager, compiled = compiled_mae
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True) for m in (eager, compiled)]
    counters.clear()
    losses: list[list[float]] = [[], []]
    for step in range(20):
        x = torch.randn(2, 1, 16, 16, 16)
        for i, (m, opt) in enumerate(zip((eager, compiled), opts)):
            torch.manual_seed(step)  # the same mask noise in both
            loss = m(x).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[i].append(float(loss))
    torch.testing.assert_close(losses[1][0], losses[0][0], rtol=1e-5, atol=0)  # the first step
    torch.testing.assert_close(torch.tensor(losses[1][:10]), torch.tensor(losses[0][:10]), rtol=1e-4, atol=0)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1  # compiled once: no recompile over 20 steps
    compiled.eval()
    with torch.no_grad():  # eval without grad runs eager: no second graph for validation shapes
        compiled(torch.randn(1, 1, 16, 16, 16))
    assert counters["stats"]["unique_graphs"] == 1
