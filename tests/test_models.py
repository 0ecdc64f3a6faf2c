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
        loss, pred, ids = out
        num_patches = math.prod(cfg.grid_size)
        hidden = num_patches - model.num_kept()
        assert loss.ndim == 0 and loss.requires_grad and not pred.requires_grad  # only the loss carries gradients
        assert pred.shape == (2, hidden, cfg.patch_size ** len(cfg.img_size) * cfg.in_chans)
        assert ids.shape == (2, num_patches) and torch.equal(
            ids.sort(1).values, torch.arange(num_patches).expand(2, -1)
        )
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


def mae_as_he_et_al(model: MaskedAutoencoderViT, x: torch.Tensor, noise: torch.Tensor, ratio: float) -> torch.Tensor:
    """The reference MAE forward (facebookresearch/mae, as medmae ran it until now), on ``model``'s weights: embed
    every patch, gather the visible ones, un-shuffle to patch order with a gather after the mask tokens, predict
    every patch, average the loss over the hidden ones with a mask."""
    enc, dec = model.encoder, model.decoder
    b, n = noise.shape
    tokens = enc.embed(x)  # (B, L, D)
    n_keep = int(round(n * (1 - ratio)))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    visible = torch.gather(tokens, 1, ids_shuffle[:, :n_keep, None].expand(-1, -1, tokens.shape[-1]))
    mask = torch.ones(b, n)
    mask[:, :n_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    latent = enc.norm(enc.forward_blocks(enc.add_prefix(visible)))
    y = dec.embed(latent)
    prefix, vis = y[:, : dec.num_prefix_tokens], y[:, dec.num_prefix_tokens :]
    full = torch.cat([vis, dec.mask_token.token.expand(b, n - n_keep, -1)], dim=1)
    full = torch.gather(full, 1, ids_restore[:, :, None].expand(-1, -1, full.shape[-1]))
    y = torch.cat([prefix, dec.pos_embed(full)], dim=1)
    for blk in dec.blocks:
        y = blk(y)
    pred = dec.pred(dec.norm(y))[:, dec.num_prefix_tokens :]
    target = model.patchify(x).float()
    if model.cfg.norm_pix_loss:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    return (((pred.float() - target) ** 2).mean(-1) * mask).sum() / mask.sum()


@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_static_masking_gives_the_reference_loss_and_gradients_for_the_same_noise(norm_pix, ratio):
    """Embedding only the visible patches and decoding in shuffled order is the reference MAE, exactly: same loss
    and same gradient for every parameter (fp32: 1e-6 relative; gradients 1e-5, sums in another order), with no
    scatter left in the backward."""
    torch.manual_seed(0)
    model = create_model("mae_vit_3d_debug", norm_pix_loss=norm_pix, mask_ratio=ratio)
    x = torch.randn(3, 1, *model.cfg.img_size)
    noise = torch.rand(3, model.cfg.num_patches)
    losses, grads = [], []
    for run in (lambda: model(x, noise=noise).loss, lambda: mae_as_he_et_al(model, x, noise, ratio)):
        model.zero_grad()
        loss = run()
        loss.backward()
        losses.append(loss.detach())
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=0)
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-5, atol=1e-8, msg=k)
    # the hidden patches' predictions in patch order, with the mask, for pictures
    out = model(x, noise=noise)
    full, mask = model.prediction_in_patch_order(out)
    assert full.shape[:2] == mask.shape == (3, model.cfg.num_patches)
    assert torch.equal(mask.sum(1), torch.full((3,), float(model.cfg.num_patches - model.num_kept())))
    assert torch.equal(full[mask == 0], torch.zeros_like(full[mask == 0]))


def test_masking_and_the_whole_mae_step_run_without_host_sync():
    # A tensor on the meta device has no data: any .item(), .tolist(), .cpu() or data-dependent branch raises, so
    # this fails exactly where a CUDA step would stall the host waiting for the GPU.
    with torch.device("meta"):
        model = create_model("mae_vit_3d_debug")
        loss, pred, ids = model(torch.randn(2, 1, *model.cfg.img_size))
    loss.backward()
    assert loss.device.type == "meta" and ids.shape == (2, model.cfg.num_patches)


def test_a_perfect_prediction_of_the_hidden_patches_has_zero_loss():
    torch.manual_seed(0)
    model = create_model("mae_vit_3d_debug", norm_pix_loss=False)
    x = torch.randn(2, 1, 32, 32, 32)
    out = model(x)
    hidden = out.ids_shuffle[:, model.num_kept() :]
    target = torch.gather(model.patchify(x), 1, hidden[..., None].expand(-1, -1, out.pred.shape[-1]))
    assert model.forward_loss(x, target, hidden).item() < 1e-12
    assert model.forward_loss(x, target + 1.0, hidden).item() == pytest.approx(1.0)


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
