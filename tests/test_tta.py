"""Test-time mirroring (``--tta``): probabilities averaged over every flip of the spatial axes, per window.

A mirror-equivariant model (a 1x1x1 convolution; a UNETR symmetrised by averaging over flips) must give the
single-pass result; an ordinary UNETR must give exactly the mean of the 8 flipped single passes.
"""

from __future__ import annotations

import itertools

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from medmae.data.convert import ConvertOptions
from medmae.inference import Predictor
from medmae.models import create_model
from medmae.models.registry import config_dict
from medmae.tasks.model_file import load_finetuned, save_finetuned

MODEL = "unetr_vit_3d_debug"
ROI = 16  # the debug UNETR on 16³ windows (2³ tokens): 64 forward passes per window in the symmetrised test
FLIPS = [c for r in range(4) for c in itertools.combinations((0, 1, 2), r)]  # spatial axes of a (C, *S) volume + 1


def _unetr() -> nn.Module:
    torch.manual_seed(0)
    return create_model(MODEL, num_classes=3, img_size=ROI).eval()


def _meta(tmp_path, task: str = "segment") -> dict:
    model = _unetr()
    pre = {**ConvertOptions(preset="ct").preprocessing(), "spatial_dims": 3, "channels": 1}
    path = save_finetuned(tmp_path / "m.safetensors", model.state_dict(), model_name=MODEL,
                          model_config=config_dict(model.cfg), task=task, preprocessing=pre, num_classes=3)  # fmt: skip
    return load_finetuned(path)[1]


class Symmetrised(nn.Module):
    """Mean of flip(m(flip(x))) over all 8 flips: mirror-equivariant by construction, with real context."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [self.m(x.flip([d + 2 for d in f])).flip([d + 2 for d in f]) for f in FLIPS]
        return torch.stack(outs).mean(0)


def _image(shape=(24, 20, 16)) -> np.ndarray:
    rng = np.random.default_rng(0)
    g = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    blob = (g[0] - 0.3) ** 2 + (g[1] + 0.2) ** 2 + g[2] ** 2 < 0.4  # off-centre: flips change the input
    return (blob + 0.3 * rng.standard_normal(shape)).astype(np.float32)[None]


def test_pointwise_model_gives_the_single_pass_labels(tmp_path):
    conv = nn.Conv3d(1, 3, 1)
    torch.manual_seed(0)
    nn.init.normal_(conv.weight)
    meta = _meta(tmp_path)
    image = _image()
    plain = Predictor(conv, meta, overlap=0.5, sw_batch=2)
    mirrored = Predictor(conv, meta, overlap=0.5, sw_batch=2, tta=True)
    torch.testing.assert_close(mirrored.probabilities(image), plain.probabilities(image), atol=1e-6, rtol=0)
    # the file path: TTA labels equal the one-pass labels (argmax of the blended logits)
    hu = (image[0] * 200 - 500).astype(np.int16)
    nib.save(nib.Nifti1Image(hu, np.diag([1.0, 1.0, 1.0, 1.0])), str(tmp_path / "x.nii.gz"))
    np.testing.assert_array_equal(
        mirrored.predict_file(tmp_path / "x.nii.gz")[0], plain.predict_file(tmp_path / "x.nii.gz")[0]
    )


def test_symmetrised_unetr_gives_the_single_pass_probabilities(tmp_path):
    sym = Symmetrised(_unetr())
    predictor = Predictor(sym, _meta(tmp_path), overlap=0.5, sw_batch=2)
    image = _image()  # larger than the window along two axes: overlapping windows are blended
    one, mirrored = predictor.probabilities(image, tta=False), predictor.probabilities(image, tta=True)
    torch.testing.assert_close(mirrored, one, atol=2e-5, rtol=0)
    assert one.shape == (3, *image.shape[1:]) and torch.allclose(one.sum(0), torch.ones(()), atol=1e-5)


def test_ordinary_unetr_averages_the_eight_flips(tmp_path):
    """One window (the image is the roi): TTA = the mean over the 8 flips of the flipped-back single passes, and it
    differs from one pass (the model is not symmetric), so mirroring really happens."""
    predictor = Predictor(_unetr(), _meta(tmp_path), sw_batch=8)
    image = _image((ROI, ROI, ROI))
    by_hand = torch.stack(
        [
            predictor.probabilities(np.ascontiguousarray(np.flip(image, [d + 1 for d in f])), tta=False).flip(
                [d + 1 for d in f]
            )
            for f in FLIPS
        ]
    ).mean(0)
    mirrored = predictor.probabilities(image, tta=True)
    torch.testing.assert_close(mirrored, by_hand, atol=1e-5, rtol=0)
    assert (mirrored - predictor.probabilities(image, tta=False)).abs().max() > 1e-3


def test_regions_and_classification(tmp_path):
    conv = nn.Conv3d(1, 3, 1)
    predictor = Predictor(conv, _meta(tmp_path, "segment_regions"), tta=True)
    probs = predictor.probabilities(_image())
    assert probs.shape == (3, 24, 20, 16) and 0 <= float(probs.min()) and float(probs.max()) <= 1  # sigmoid
    cls = create_model("vit_2d_cls_debug", num_classes=3)
    pre = {**ConvertOptions(preset="xray").preprocessing(), "spatial_dims": 2, "channels": 1}
    path = save_finetuned(
        tmp_path / "c.safetensors",
        cls.state_dict(),
        model_name="vit_2d_cls_debug",
        model_config=config_dict(cls.cfg),
        task="classify",
        preprocessing=pre,
        num_classes=3,
    )
    with pytest.raises(ValueError, match="tta: test-time mirroring applies to segmentation"):
        Predictor.from_checkpoint(path, tta=True)
