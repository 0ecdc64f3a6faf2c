"""Registered models: shapes, gradients, masking, patchify, loss, checkpointing, attention and transfer."""

from __future__ import annotations

import math

import pytest
import torch

from medmae.layers import Attention, interpolate_pos_embed, patchify, sincos_pos_embed, unpatchify
from medmae.models import create_model, list_models, load_encoder, read_encoder, save_encoder
from medmae.models.mae import MaskedAutoencoderViT

DEBUG = list_models("*_debug")


def _input(model: torch.nn.Module, batch: int = 2) -> torch.Tensor:
    cfg = model.cfg
    return torch.randn(batch, cfg.in_chans, *cfg.img_size)


@pytest.mark.parametrize("name", DEBUG)
def test_forward_shapes(name):
    torch.manual_seed(0)
    model = create_model(name)
    cfg = model.cfg
    x = _input(model)
    out = model(x)
    if isinstance(model, MaskedAutoencoderViT):
        loss, pred, mask = out
        num_patches = math.prod(cfg.grid_size)
        assert loss.ndim == 0
        assert pred.shape == (2, num_patches, cfg.patch_size ** len(cfg.img_size) * cfg.in_chans)
        assert mask.shape == (2, num_patches)
    elif hasattr(cfg, "skip_indices"):
        assert out.shape == (2, cfg.num_classes, *cfg.img_size)
    else:
        assert out.shape == (2, cfg.num_classes)


@pytest.mark.parametrize("name", DEBUG)
def test_every_trainable_parameter_gets_a_finite_gradient(name):
    torch.manual_seed(0)
    model = create_model(name)
    out = model(_input(model))
    loss = out[0] if isinstance(out, tuple) else out.float().pow(2).mean()
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"


def test_paper_sizes_are_registered():
    from medmae.models import model_config

    cfg = model_config("mae_vit_base_patch16_3d")
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.embed_dim * cfg.mlp_ratio) == (768, 12, 12, 3072)
    assert (cfg.decoder_embed_dim, cfg.decoder_depth, cfg.decoder_num_heads) == (384, 8, 12)
    assert cfg.img_size == (96, 96, 96) and cfg.patch_size == 16
    for name in [
        "mae_vit_large_patch16_3d",
        "unetr_vit_base_patch16_3d",
        "vit_base_patch16_2d_cls",
        "mae_vit_base_patch16_2d",
    ]:
        assert name in list_models()


def test_overrides_reach_the_model_and_bad_ones_name_the_key():
    model = create_model("unetr_vit_3d_debug", in_chans=4, num_classes=3, img_size=(32, 32, 16))
    assert model(torch.randn(1, 4, 32, 32, 16)).shape == (1, 3, 32, 32, 16)
    with pytest.raises(ValueError, match="depht"):
        create_model("mae_vit_3d_debug", depht=3)
    with pytest.raises(ValueError, match="mask_ratio"):
        create_model("mae_vit_3d_debug", mask_ratio=1.5)
    with pytest.raises(ValueError, match="skip_indices"):
        create_model("unetr_vit_3d_debug", skip_indices=(0, 1, 2))
    with pytest.raises(ValueError, match="unknown model"):
        create_model("resnet50")


@pytest.mark.parametrize("shape,patch", [((2, 3, 16, 24), (8, 8)), ((2, 4, 16, 8, 24), (8, 8, 8))])
def test_patchify_round_trip_is_exact(shape, patch):
    x = torch.randn(shape)
    p = patchify(x, patch)
    grid = [s // q for s, q in zip(shape[2:], patch)]
    assert p.shape == (shape[0], math.prod(grid), math.prod(patch) * shape[1])
    assert torch.equal(unpatchify(p, patch, grid, shape[1]), x)
    # one row is one spatial patch: the first row holds exactly the first corner block
    corner = x[(slice(None), slice(None)) + tuple(slice(0, q) for q in patch)]
    assert torch.equal(p[:, 0].sort(dim=-1).values, corner.reshape(shape[0], -1).sort(dim=-1).values)


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9])
def test_masking_keeps_round_l_times_one_minus_ratio_and_restore_inverts(ratio):
    torch.manual_seed(1)
    b, n, d = 3, 64, 5
    x = torch.arange(b * n, dtype=torch.float32).reshape(b, n, 1).expand(b, n, d).contiguous()
    visible, mask, ids_restore = MaskedAutoencoderViT.random_masking(x, ratio)
    keep = round(n * (1 - ratio))
    assert visible.shape == (b, keep, d)
    assert torch.equal(mask.sum(1), torch.full((b,), float(n - keep)))
    # visible tokens are exactly the unmasked ones
    for i in range(b):
        kept_ids = visible[i, :, 0].long() - i * n
        assert torch.equal(mask[i, kept_ids], torch.zeros(keep))
    # restore inverts the shuffle: putting visible tokens back (zeros elsewhere) gives x where mask == 0
    filled = torch.cat([visible, torch.zeros(b, n - keep, d)], dim=1)
    restored = torch.gather(filled, 1, ids_restore.unsqueeze(-1).expand(-1, -1, d))
    assert torch.equal(restored * (1 - mask).unsqueeze(-1), x * (1 - mask).unsqueeze(-1))
    # per-sample masks differ (masking is per sample, not per batch)
    if 0 < ratio:
        assert not torch.equal(mask[0], mask[1])


def test_masking_and_the_whole_mae_step_run_without_host_sync():
    # A tensor on the meta device has no data: any .item(), .tolist(), .cpu() or data-dependent branch raises, so
    # this fails exactly where a CUDA step would stall the host waiting for the GPU.
    x = torch.randn(2, 16, 4, device="meta")
    _, mask, ids = MaskedAutoencoderViT.random_masking(x, 0.75)
    assert mask.device == x.device and ids.device == x.device and mask.shape == (2, 16)
    with torch.device("meta"):
        model = create_model("mae_vit_3d_debug")
        loss, pred, mask = model(torch.randn(2, 1, *model.cfg.img_size))
    loss.backward()
    assert loss.device.type == "meta" and pred.shape[:2] == mask.shape


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_ignores_visible_patches(norm_pix):
    torch.manual_seed(0)
    model = create_model("mae_vit_3d_debug", norm_pix_loss=norm_pix)
    x = torch.randn(2, 1, 32, 32, 32)
    _, pred, mask = model(x)
    target = model.patchify(x)
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    # change the prediction of visible patches only: the loss must not move
    tampered = torch.where(mask.bool().unsqueeze(-1), pred, pred + 100.0)
    assert torch.allclose(model.forward_loss(x, pred, mask), model.forward_loss(x, tampered, mask))
    # a perfect prediction on masked patches gives zero loss whatever the visible ones hold
    perfect = torch.where(mask.bool().unsqueeze(-1), target, torch.randn_like(pred))
    assert model.forward_loss(x, perfect, mask).item() < 1e-6


@pytest.mark.parametrize("name", ["mae_vit_3d_debug", "unetr_vit_3d_debug", "vit_2d_cls_debug"])
def test_checkpointed_and_plain_blocks_give_the_same_gradients(name):
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = create_model(name)
        model.set_grad_checkpointing(ckpt)
        x = _input(model)
        torch.manual_seed(1)  # same mask draw in both runs
        out = model(x)
        loss = out[0] if isinstance(out, tuple) else out.pow(2).mean()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-6, msg=n)


def test_fused_attention_equals_naive_softmax_reference():
    torch.manual_seed(0)
    attn = Attention(64, 4).eval()
    x = torch.randn(2, 50, 64)
    fused = attn(x)
    q, k, v = attn.qkv(x).reshape(2, 50, 3, 4, 16).permute(2, 0, 3, 1, 4)
    ref = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(16), dim=-1) @ v
    ref = attn.proj(ref.transpose(1, 2).reshape(2, 50, 64))
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    attn.fused = False
    torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=1e-5)


def test_sincos_table_is_fixed_and_distinct():
    t = sincos_pos_embed(48, (4, 4, 4))
    assert t.shape == (1, 64, 48)
    assert torch.unique(t[0], dim=0).shape[0] == 64  # every position has its own code
    model = create_model("mae_vit_3d_debug")
    assert not any("pos_embed" in n for n, _ in model.named_parameters())
    assert not any("pos_embed" in k for k in model.state_dict())


def test_interpolate_pos_embed_keeps_values_on_the_same_grid_and_resizes():
    t = torch.randn(1, 1 + 27, 8)
    assert torch.equal(interpolate_pos_embed(t, (3, 3, 3), (3, 3, 3), 1), t)
    out = interpolate_pos_embed(t, (3, 3, 3), (6, 6, 3), 1)
    assert out.shape == (1, 1 + 108, 8) and torch.equal(out[:, :1], t[:, :1])


def test_encoder_features_and_intermediates():
    model = create_model("vit_3d_cls_debug").encoder
    x = torch.randn(2, 1, 32, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, 1 + 64, 48)
    final, inter = model.forward_intermediates(x, indices=[0, 2])
    assert torch.allclose(final, feats, atol=1e-6)
    assert [t.shape for t in inter] == [(2, 48, 4, 4, 4)] * 2
    only = model.forward_intermediates(x, indices=2, output_fmt="NLC", intermediates_only=True)
    assert [t.shape for t in only] == [(2, 64, 48)] * 2
    assert model.no_weight_decay() <= {n for n, _ in model.named_parameters()}
    assert "blocks" in model.group_matcher()


@pytest.mark.parametrize("target", ["unetr_vit_3d_debug", "vit_3d_cls_debug"])
def test_mae_encoder_transfers_every_weight(tmp_path, target):
    torch.manual_seed(0)
    mae = create_model("mae_vit_3d_debug")
    path = save_encoder(mae.state_dict(), mae.cfg.encoder_dict(), tmp_path / "encoder.safetensors")
    weights, cfg = read_encoder(path)
    torch.manual_seed(1)
    model = create_model(target)
    report = load_encoder(model, weights, cfg)
    assert report["loaded"] == len(mae.encoder.state_dict()) == len(model.encoder.state_dict())
    for k, v in mae.encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[k], v), k


def test_transfer_interpolates_learned_pos_embed_and_rejects_mismatches():
    mae = create_model("mae_vit_3d_debug", pos_embed="learned")
    unetr = create_model("unetr_vit_3d_debug", pos_embed="learned", img_size=(64, 64, 32))
    report = load_encoder(unetr, mae.state_dict(), mae.cfg.encoder_dict())
    assert report["interpolated"] and unetr.encoder.pos_embed.weight.shape == (1, 8 * 8 * 4, 48)
    with pytest.raises(ValueError, match="not exact"):
        load_encoder(create_model("unetr_vit_3d_debug"), mae.state_dict())  # learned table into a sin-cos model
    patch4 = create_model("unetr_vit_3d_debug", patch_size=4, skip_indices=(0,))
    with pytest.raises(ValueError, match="shape mismatch"):  # another patch size: no rule reconciles it
        load_encoder(patch4, create_model("mae_vit_3d_debug").state_dict())
    partial = {k: v for k, v in create_model("mae_vit_3d_debug").state_dict().items() if "blocks.0." not in k}
    with pytest.raises(ValueError, match="missing"):
        load_encoder(create_model("unetr_vit_3d_debug"), partial)


def test_bf16_autocast_runs_in_bf16():
    model = create_model("mae_vit_3d_debug")
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, pred, _ = model(x)
    assert pred.dtype == torch.bfloat16 and torch.isfinite(loss)
    loss.backward()


@pytest.mark.parametrize("img_size,patch", [((16, 24), (8, 8)), ((16, 8, 24), (8, 8, 8))])
def test_patch_embed_equals_the_strided_conv(img_size, patch):
    from medmae.layers import PatchEmbed

    torch.manual_seed(0)
    pe = PatchEmbed(img_size, patch, in_chans=3, embed_dim=10)
    x = torch.randn(2, 3, *img_size)
    conv = torch.nn.functional.conv3d if len(img_size) == 3 else torch.nn.functional.conv2d
    ref = conv(x, pe.proj.weight, pe.proj.bias, stride=patch).flatten(2).transpose(1, 2)
    torch.testing.assert_close(pe(x), ref, rtol=1e-5, atol=1e-5)


def test_training_flops_come_from_the_model_and_count_unetrs_decoder():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from medmae.models import model_config, train_flops_per_sample

    # the meta-device count used for MFU equals a count on real tensors (attention as explicit matmuls: the fused
    # CPU kernel's backward has no flop formula, so the counter would miss it)
    torch.manual_seed(0)
    model = create_model("mae_vit_3d_debug")
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 1, *model.cfg.img_size))[0].backward()
    assert train_flops_per_sample("mae_vit_3d_debug", model.cfg) == counter.get_total_flops()
    # UNETR's convolutional decoder costs far more than its ViT encoder: an encoder-only formula misses most of it
    unetr = train_flops_per_sample("unetr_vit_base_patch16_3d", model_config("unetr_vit_base_patch16_3d"))
    vit = train_flops_per_sample(
        "vit_3d_cls_debug",
        model_config(
            "vit_3d_cls_debug",
            **{
                k: getattr(model_config("unetr_vit_base_patch16_3d"), k)
                for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")
            },
        ),
    )
    assert unetr > 3 * vit


def test_peak_flops_is_keyed_on_the_exact_device_name_and_dtype(monkeypatch):
    from medmae.training import logs

    assert logs.peak_flops(torch.device("cpu"), torch.bfloat16) is None
    for name, dtype, peak in [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989e12),
        ("NVIDIA H100 PCIe", torch.bfloat16, 756e12),
        ("NVIDIA H100 NVL", torch.bfloat16, 835e12),
        ("NVIDIA L4", torch.bfloat16, 121e12),
        ("NVIDIA L40", torch.bfloat16, 181e12),
        ("NVIDIA H200", torch.float32, 495e12),
        ("Tesla T4", torch.bfloat16, None),
        ("NVIDIA GeForce GTX 1080", torch.bfloat16, None),
    ]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_a, n=name: n)
        monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")  # TF32 allowed
        assert logs.peak_flops(torch.device("cuda"), dtype) == (pytest.approx(peak) if peak else None), name
