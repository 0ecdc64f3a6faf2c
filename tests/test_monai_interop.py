"""MONAI interoperability: our UNETR, classifier and encoder load into MONAI's own UNETR and ViT with strict=True and
compute the same outputs; MONAI ViT/UNETR weights (a bundle's model.pt) become an encoder we fine-tune from."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import UNETR as MonaiUNETR
from monai.networks.nets import ViT as MonaiViT

from medmae.models import create_model, load_encoder, open_encoder, save_encoder
from medmae.models.monai_interop import build_monai, encoder_from_monai, monai_layout, to_monai

# The debug width on MONAI's UNETR geometry (patch 16, 12 blocks, skips 3/6/9, no cls token) on 32³ crops, with
# MONAI's LayerNorm epsilon (PyTorch's default, which its constructors fix).
MONAI_UNETR = dict(img_size=32, patch_size=16, depth=12, skip_indices=(3, 6, 9), cls_token=False, norm_eps=1e-5)


def _perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every weight moved off its initial value (norms are 1/0, the classifier head near 0 at init), so that a
    mixed-up key cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


def _out(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        y = net(x)
    return y[0] if isinstance(y, tuple) else y  # MONAI's ViT returns (tokens or logits, hidden states)


def assert_same_outputs(monai_net: torch.nn.Module, ours: torch.nn.Module, x: torch.Tensor) -> None:
    """Within 1e-5: fp32 arithmetic (SDPA against MONAI's einsum attention); a mixed-up weight would cost ~0.1."""
    torch.testing.assert_close(_out(monai_net, x), _out(ours, x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("pos_embed", ["sincos", "learned"])
def test_unetr_exports_to_monais_unetr_loaded_strictly_with_the_same_outputs(pos_embed):
    torch.manual_seed(0)
    ours = _perturbed(create_model("unetr_vit_3d_debug", pos_embed=pos_embed, **MONAI_UNETR))
    state, name, kwargs = to_monai(ours)
    assert name == "UNETR"
    theirs = MonaiUNETR(**kwargs).eval()
    theirs.load_state_dict(state, strict=True)  # every MONAI key given, none left over
    assert_same_outputs(theirs, ours, torch.rand(2, 1, 32, 32, 32))


def test_classifier_and_encoder_export_to_monais_vit():
    torch.manual_seed(0)
    cls = _perturbed(create_model("vit_3d_cls_debug", global_pool="token", num_classes=3, norm_eps=1e-5))
    state, name, kwargs = to_monai(cls)
    theirs = MonaiViT(**kwargs).eval()
    theirs.load_state_dict(state, strict=True)
    x = torch.rand(2, 1, 32, 32, 32)
    assert_same_outputs(theirs, cls, x)

    # an MAE encoder with our default epsilon (1e-6): build_monai sets it on MONAI's norms
    mae = _perturbed(create_model("mae_vit_3d_debug", cls_token=False))
    state, name, kwargs = to_monai(mae)
    vit = build_monai(name, kwargs, state, norm_eps=mae.cfg.norm_eps).eval()
    assert isinstance(vit, MonaiViT) and vit.norm.eps == 1e-6
    assert_same_outputs(vit, mae.encoder, x)


@pytest.mark.parametrize(
    ("name", "overrides", "setting"),
    [
        ("unetr_vit_3d_debug", {}, "model.patch_size: 8"),
        ("unetr_vit_3d_debug", {**MONAI_UNETR, "skip_indices": (2, 5, 8)}, "model.skip_indices: (2, 5, 8)"),
        ("unetr_vit_3d_debug", {**MONAI_UNETR, "cls_token": True}, "model.cls_token: True"),
        ("unetr_vit_3d_debug", {**MONAI_UNETR, "depth": 13}, "model.depth: 13"),
        ("vit_3d_cls_debug", {}, "model.global_pool: 'avg'"),
        ("mae_vit_3d_debug", {}, "cls_token: True"),
    ],
)
def test_what_monai_cannot_express_is_refused_naming_the_setting(name, overrides, setting):
    with pytest.raises(ValueError, match=rf"^{__import__('re').escape(setting)} has no MONAI equivalent"):
        monai_layout(create_model(name, **overrides))


def test_monai_bundle_weights_become_an_encoder_we_finetune_from(tmp_path):
    """A MONAI UNETR's weights, saved as a bundle's models/model.pt and read back with weights_only=True, load into
    our UNETR's encoder, which then computes what MONAI's ViT computes."""
    torch.manual_seed(0)
    monai_net = _perturbed(
        MonaiUNETR(in_channels=1, out_channels=3, img_size=32, hidden_size=48, mlp_dim=96, num_heads=4, qkv_bias=True)
    )
    torch.save(monai_net.state_dict(), tmp_path / "model.pt")
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    weights, config = encoder_from_monai(state, num_heads=4)
    assert config["depth"] == 12 and config["patch_size"] == 16 and config["pos_embed"] == "learned"
    assert config["img_size"] == [32, 32, 32] and config["cls_token"] is False and config["mlp_ratio"] == 2.0
    path = save_encoder(weights, config, tmp_path / "encoder.safetensors")
    enc = open_encoder(path)
    ours = create_model("unetr_vit_3d_debug", pos_embed="learned", num_classes=5, **MONAI_UNETR).eval()
    report = load_encoder(ours, enc.weights, enc.config)
    assert report["loaded"] == len(ours.encoder.state_dict())
    x = torch.rand(2, 1, 32, 32, 32)
    assert_same_outputs(monai_net.vit, ours.encoder, x)
    with pytest.raises(ValueError, match="not a MONAI ViT/UNETR state dict"):
        encoder_from_monai(create_model("mae_vit_3d_debug").state_dict())
