"""Moving an encoder to the next job: another input channel count, and the pretraining data plan it carries."""

from __future__ import annotations

import pytest
import torch

from medmae.models import create_model, load_encoder, open_encoder, save_encoder


def _features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.encoder.forward_features(x)


@pytest.mark.parametrize(("source", "target"), [(1, 4), (4, 1)])
def test_channel_adaptation_keeps_the_features_of_an_image_repeated_in_every_channel(tmp_path, source, target):
    torch.manual_seed(0)
    mae = create_model("mae_vit_3d_debug", in_chans=source).eval()
    path = save_encoder(mae.state_dict(), mae.cfg.encoder_dict(), tmp_path / "encoder.safetensors")
    enc = open_encoder(path)
    model = create_model("unetr_vit_3d_debug", in_chans=target).eval()
    report = load_encoder(model, enc.weights, enc.config)
    assert report["channels"]["from"] == source and report["channels"]["to"] == target
    assert ("sum" in report["channels"]["rule"]) == (target == 1)
    image = torch.rand(2, 1, 32, 32, 32)
    original = _features(mae, image.expand(-1, source, -1, -1, -1))
    adapted = _features(model, image.expand(-1, target, -1, -1, -1))
    torch.testing.assert_close(adapted, original, atol=1e-5, rtol=0)
    # every other weight moved unchanged
    for k, v in mae.encoder.state_dict().items():
        if k != "patch_embed.proj.weight":
            assert torch.equal(model.encoder.state_dict()[k], v), k


def test_channel_rule_for_counts_that_do_not_divide_is_timms_cyclic_repeat():
    torch.manual_seed(0)
    mae = create_model("mae_vit_2d_debug", in_chans=2)
    model = create_model("vit_2d_cls_debug", in_chans=3)
    report = load_encoder(model, mae.state_dict())
    w = mae.encoder.patch_embed.proj.weight.detach()
    expected = torch.cat([w, w[:, :1]], dim=1) * 2 / 3
    torch.testing.assert_close(model.encoder.patch_embed.proj.weight.detach(), expected)
    assert "cyclically" in report["channels"]["rule"]
    # no rule reconciles another patch size: still refused, naming the key
    with pytest.raises(ValueError, match="patch_embed.proj.weight"):
        load_encoder(create_model("vit_2d_cls_debug", in_chans=3, patch_size=4), mae.state_dict())
