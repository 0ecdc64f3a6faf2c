"""The optimizer built from OptimConfig: weight-decay rule, layer-wise lr decay (MAE's rule), and the schedule."""

from __future__ import annotations

import math

import pytest
import torch

from medmae.models import create_model
from medmae.training.config import OptimConfig
from medmae.training.optim import build_optimizer, lr_at, param_groups


def _groups_by_name(model, groups):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g for g in groups for p in g["params"]}


def test_no_weight_decay_on_norms_biases_tokens_and_position_tables():
    model = create_model("mae_vit_3d_debug", pos_embed="learned")
    by_name = _groups_by_name(model, param_groups(model, weight_decay=0.05))
    assert set(by_name) == {n for n, p in model.named_parameters() if p.requires_grad}
    for name, g in by_name.items():
        p = dict(model.named_parameters())[name]
        exempt = p.ndim <= 1 or name in {
            "encoder.pos_embed.weight",
            "encoder.cls_token.tokens",
            "decoder.mask_token.token",
        }
        assert g["weight_decay"] == (0.0 if exempt else 0.05), name
    assert by_name["encoder.blocks.0.attn.qkv.weight"]["weight_decay"] == 0.05
    assert by_name["encoder.pos_embed.weight"]["weight_decay"] == 0.0


@pytest.mark.parametrize("name", ["unetr_vit_3d_debug", "vit_2d_cls_debug"])
def test_layer_decay_scales_follow_maes_rule(name):
    model = create_model(name)
    depth, decay = len(model.encoder.blocks), 0.75
    by_name = _groups_by_name(model, param_groups(model, weight_decay=0.05, layer_decay=decay))
    # patch embedding and tokens: decay^(depth+1); block i: decay^(depth-i); final norm and heads: 1
    assert by_name["encoder.patch_embed.proj.weight"]["lr_scale"] == pytest.approx(decay ** (depth + 1))
    assert by_name["encoder.cls_token.tokens"]["lr_scale"] == pytest.approx(decay ** (depth + 1))
    for i in range(depth):
        assert by_name[f"encoder.blocks.{i}.mlp.fc1.weight"]["lr_scale"] == pytest.approx(decay ** (depth - i))
        assert by_name[f"encoder.blocks.{i}.norm1.bias"]["lr_scale"] == pytest.approx(decay ** (depth - i))
    assert by_name["encoder.norm.weight"]["lr_scale"] == 1.0
    head = [n for n in by_name if not n.startswith("encoder.")]
    assert head and all(by_name[n]["lr_scale"] == 1.0 for n in head)


def test_build_optimizer_uses_the_config_and_the_engine_scales_each_group():
    model = create_model("unetr_vit_3d_debug")
    opt = build_optimizer(model, OptimConfig(betas=(0.9, 0.999), weight_decay=0.1, layer_decay=0.5), 1e-3, "cpu")
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"]
    assert {g["betas"] for g in opt.param_groups} == {(0.9, 0.999)}
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 0.1}
    assert min(g["lr_scale"] for g in opt.param_groups) == pytest.approx(0.5**5)


def test_lr_schedule_warms_up_linearly_then_follows_the_half_cosine():
    peak, warmup, total, floor = 1e-3, 10, 110, 1e-5
    assert lr_at(0, peak=peak, warmup=warmup, total=total, floor=floor) == pytest.approx(peak / 10)
    assert lr_at(9, peak=peak, warmup=warmup, total=total, floor=floor) == pytest.approx(peak)
    assert lr_at(10, peak=peak, warmup=warmup, total=total, floor=floor) == pytest.approx(peak)
    mid = lr_at(60, peak=peak, warmup=warmup, total=total, floor=floor)
    assert mid == pytest.approx(floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, peak=peak, warmup=warmup, total=total, floor=floor) == pytest.approx(floor)
    assert lr_at(500, peak=peak, warmup=warmup, total=total, floor=floor) == pytest.approx(floor)
    no_warmup = [lr_at(s, peak=peak, warmup=0, total=total) for s in range(total)]
    assert no_warmup[0] == pytest.approx(peak) and all(a >= b for a, b in zip(no_warmup, no_warmup[1:]))
