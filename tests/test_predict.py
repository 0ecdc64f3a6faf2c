"""Prediction: the fine-tuned model file, the recorded preprocessing and its exact inverse, BraTS regions, the CLI.

Inputs are written in non-RAS orientations (permuted and flipped axes) with anisotropic spacing, so a missed flip,
transpose, resampling or crop offset shows up as a wrong shape, affine or Dice.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import load_script
from torch import nn

from medmae.data.convert import ConvertOptions, convert
from medmae.data.convert.preprocess import read_image
from medmae.data.labels import brats_regions
from medmae.inference import Predictor, logits_to_labels, predict_paths
from medmae.models import create_model, save_encoder
from medmae.models.registry import config_dict
from medmae.tasks.model_file import load_finetuned, save_finetuned

SPACING = (0.8, 1.3, 2.5)
SHAPE = (48, 30, 16)  # about 38 x 39 x 40 mm
HU = (-1000.0, 40.0, 200.0)  # air, body (class 1), an off-centre box (class 2): thresholds recover the label
MODEL = "unetr_vit_3d_debug"


def _lps_affine() -> np.ndarray:
    """Voxel axes (i, j, k) run along world (-y, -x, +z): permuted and flipped, far from RAS."""
    a = np.zeros((4, 4))
    a[1, 0], a[0, 1], a[2, 2], a[3, 3] = -SPACING[0], -SPACING[1], SPACING[2], 1.0
    a[:3, 3] = (12.0, 25.0, -30.0)
    return a


def _case(shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """int16 HU image and uint8 label: a body ellipsoid (1) in air, cut by three off-centre planes into class 2
    (asymmetric along every axis, so a missed flip or transpose cannot go unnoticed)."""
    g = np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij")
    body = (g[0] - shift) ** 2 + g[1] ** 2 + g[2] ** 2 <= 0.6
    box = (g[0] > 0.1) & (g[1] < 0.25) & (g[2] > -0.35)
    label = body.astype(np.uint8)
    label[box & body] = 2
    return np.asarray(HU, dtype=np.float32)[label].astype(np.int16), label


def _write(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    if path.name.endswith(".nrrd"):
        import nrrd

        lps = np.diag([-1.0, -1.0, 1.0])
        nrrd.write(
            str(path),
            data,
            {
                "space": "left-posterior-superior",
                "space directions": (lps @ affine[:3, :3]).T,  # one row per voxel axis
                "space origin": lps @ affine[:3, 3],
            },
        )
    else:
        nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    """Two raw cases converted as a user would: the manifest's ``preprocessing`` is what the model records."""
    root = tmp_path_factory.mktemp("raw")
    entries = []
    for i in range(2):
        image, label = _case(shift=0.1 * i)
        _write(root / f"img{i}.nii.gz", image, _lps_affine())
        _write(root / f"lab{i}.nii.gz", label, _lps_affine())
        entries.append({"image": f"img{i}.nii.gz", "label": f"lab{i}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"training": entries}))
    opts = ConvertOptions(format="wds", preset="ct", spacing=(1.5, 1.5, 1.5), crop_foreground=True, workers=0)
    out = tmp_path_factory.mktemp("wds")
    assert convert(root / "dataset.json", out, opts, progress=False).ok
    manifest = json.loads((out / "manifest.json").read_text())
    return {"root": root, "preprocessing": manifest["preprocessing"]}


def _save(path: Path, preprocessing: dict, model: nn.Module | None = None, **kw) -> Path:
    model = model if model is not None else create_model(MODEL, num_classes=3)
    return save_finetuned(
        path, model.state_dict(), model_name=MODEL, model_config=config_dict(model.cfg), task=kw.pop("task", "segment"),
        preprocessing=preprocessing, num_classes=3, **kw,
    )  # fmt: skip


# The oracle's CT window: interpolation then mixes the levels linearly (air is clipped by 10 HU only, which also
# flattens the float rounding of resampled air, so the foreground crop sees a clean background).
WINDOW = (-990.0, 250.0)


class Oracle(nn.Module):
    """One-hot logits of the class whose CT-preset intensity (HU scaled to [0, 1] by WINDOW) is nearest."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = (torch.tensor(HU).clamp(*WINDOW) - WINDOW[0]) / (WINDOW[1] - WINDOW[0])
        cls = (x - levels.view(1, -1, 1, 1, 1)).abs().argmin(dim=1)
        return torch.nn.functional.one_hot(cls, 3).movedim(-1, 1).float() * 10


def _dice(a: np.ndarray, b: np.ndarray, c: int) -> float:
    return 2 * ((a == c) & (b == c)).sum() / ((a == c).sum() + (b == c).sum())


def test_prediction_keeps_input_shape_and_affine(dataset, tmp_path):
    ckpt = _save(tmp_path / "run" / "model.safetensors", dataset["preprocessing"])
    predictor = Predictor.from_checkpoint(tmp_path / "run")  # a run directory resolves to its model file
    src = dataset["root"] / "img0.nii.gz"
    result = predict_paths(predictor, src, tmp_path / "pred.nii.gz")
    assert result.ok and result.written == [tmp_path / "pred.nii.gz"]
    out, ref = nib.load(str(tmp_path / "pred.nii.gz")), nib.load(str(src))
    data = np.asarray(out.dataobj)
    assert out.shape == ref.shape == SHAPE
    assert np.allclose(out.affine, ref.affine) and out.get_data_dtype() == np.uint8 and data.dtype == np.uint8
    assert data.min() >= 0 and data.max() < 3
    assert ckpt.is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["pred.nii.gz", "run"]  # no temporaries


@pytest.mark.parametrize(
    ("suffix", "spacing", "exact"),
    [
        # Half the source spacing (RAS order: 1.3, 0.8, 2.5): every source voxel centre is a stored voxel centre, so
        # nearest-neighbour resampling back recovers the labels exactly — unless an axis, flip or offset is wrong.
        (".nii.gz", (0.65, 0.4, 1.25), True),
        (".nrrd", (0.65, 0.4, 1.25), True),
        (".nii.gz", None, True),  # reorientation and crop only
        # Down to 1.5 mm and back loses detail at the boundaries of these small shapes (about 3 % per class).
        (".nii.gz", (1.5, 1.5, 1.5), False),
    ],
)
def test_geometry_inverse_recovers_labels(tmp_path, suffix, spacing, exact):
    """An oracle that reads the label off the preprocessed intensities: what comes back must be the source label."""
    image, label = _case()
    src = _write(tmp_path / f"img{suffix}", image, _lps_affine())
    opts = ConvertOptions(preset="ct", ct_window=WINDOW, spacing=spacing, crop_foreground=True, fg_margin=1)
    pre = {**opts.preprocessing(), "spatial_dims": 3, "channels": 1}
    _, meta = load_finetuned(_save(tmp_path / "m.safetensors", pre))
    predictor = Predictor(Oracle(), meta, overlap=0.25, sw_batch=4)
    result = predict_paths(predictor, src, tmp_path / "out")
    assert result.ok
    pred, pred_affine = read_image(str(tmp_path / "out" / src.name), 3)
    _, src_affine = read_image(str(src), 3)
    assert pred.shape[1:] == SHAPE and np.allclose(pred_affine, src_affine, atol=1e-4)
    if exact:
        np.testing.assert_array_equal(pred[0], label)
    for c in (0, 1, 2):
        assert _dice(pred[0], label, c) > 0.9, f"class {c}: Dice {_dice(pred[0], label, c):.3f}"


def test_brats_regions_map_back_to_msd_labels():
    label = np.array([[[0, 1, 2, 3]]], dtype=np.uint8)  # background, edema, non-enhancing, enhancing
    regions = brats_regions(label)
    np.testing.assert_array_equal(regions[:, 0, 0], [[0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]])  # WT, TC, ET
    probs = np.array(
        [  # WT, TC, ET probabilities per voxel: the label is the innermost region above 0.5
            [0.1, 0.9, 0.9, 0.9, 0.6, 0.4],
            [0.2, 0.1, 0.8, 0.7, 0.1, 0.9],
            [0.3, 0.2, 0.3, 0.9, 0.6, 0.2],
        ],
        dtype=np.float32,
    )
    logits = torch.logit(torch.from_numpy(probs))[:, None, None]  # (3, 1, 1, 6)
    np.testing.assert_array_equal(logits_to_labels(logits, "segment_regions")[0, 0], [0, 1, 2, 3, 3, 2])
    back = logits_to_labels(torch.from_numpy(regions.astype(np.float32) * 2 - 1), "segment_regions")
    np.testing.assert_array_equal(back, label)


def test_model_file_round_trip(dataset, tmp_path):
    model = create_model(MODEL, num_classes=3)
    path = _save(
        tmp_path / "m.safetensors", dataset["preprocessing"], model, label_names=["bg", "a", "b"], extra={"dice": 0.5}
    )
    loaded, meta = load_finetuned(path)
    assert not loaded.training
    assert meta["task"] == "segment" and meta["roi_size"] == [32, 32, 32] and meta["label_names"] == ["bg", "a", "b"]
    assert meta["preprocessing"] == dataset["preprocessing"] and meta["extra"] == {"dice": 0.5}
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model.eval()(x))


def test_model_file_errors(dataset, tmp_path):
    pre = dataset["preprocessing"]
    with pytest.raises(ValueError, match="no such model file"):
        load_finetuned(tmp_path / "missing.safetensors")
    good = _save(tmp_path / "m.safetensors", pre).read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="cut.safetensors: not a readable safetensors"):
        load_finetuned(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="junk.safetensors: not a readable safetensors"):
        load_finetuned(tmp_path / "junk.safetensors")
    save_encoder(create_model(MODEL).encoder.state_dict(), {}, tmp_path / "encoder.safetensors")
    with pytest.raises(ValueError, match="pretrained encoder"):
        load_finetuned(tmp_path / "encoder.safetensors")
    model = create_model(MODEL, num_classes=3)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}  # a DDP/DeepSpeed-wrapped state dict
    with pytest.raises(ValueError, match="missing .*unexpected .*module"):
        save_finetuned(tmp_path / "x.safetensors", state, model_name=MODEL, model_config=config_dict(model.cfg),
                       task="segment", preprocessing=pre, num_classes=3)  # fmt: skip
    with pytest.raises(ValueError, match="task 'segmentation' is not one of"):
        _save(tmp_path / "x.safetensors", pre, task="segmentation")
    with pytest.raises(ValueError, match="segment_regions predicts the 3 regions"):
        save_finetuned(tmp_path / "x.safetensors", create_model(MODEL, num_classes=4).state_dict(), model_name=MODEL,
                       model_config=config_dict(create_model(MODEL, num_classes=4).cfg), task="segment_regions",
                       preprocessing=pre, num_classes=4)  # fmt: skip
    assert not (tmp_path / "x.safetensors").exists()


def _cli():
    return load_script("tools/predict.py")


def test_cli_folder_with_bad_inputs(dataset, tmp_path, capsys):
    ckpt = _save(tmp_path / "model.safetensors", dataset["preprocessing"])
    inputs = tmp_path / "in"
    inputs.mkdir()
    image, _ = _case()
    _write(inputs / "good.nii.gz", image, _lps_affine())
    _write(inputs / "good2.nrrd", image, _lps_affine())
    _write(inputs / "two_channels.nii.gz", np.stack([image, image], axis=-1), _lps_affine())
    (inputs / "broken.nii.gz").write_bytes(b"not a nifti file")
    cli = _cli()
    assert cli.main(["--checkpoint", str(ckpt), str(inputs), str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "broken.nii.gz" in err and "two_channels.nii.gz: 2 channel(s), expected 1" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.nii.gz", "good2.nrrd"]
    for name in ("good.nii.gz", "good2.nrrd"):
        pred, affine = read_image(str(tmp_path / "out" / name), 3)
        assert (
            pred.shape[1:] == SHAPE
            and pred.dtype == np.uint8
            and np.allclose(affine, read_image(str(inputs / name), 3)[1])
        )
    before = (inputs / "good.nii.gz").read_bytes()
    assert cli.main(["--checkpoint", str(ckpt), str(inputs / "good.nii.gz"), str(inputs / "good.nii.gz")]) == 2
    assert cli.main(["--checkpoint", str(ckpt), str(inputs), str(inputs), "--quiet"]) == 2
    assert (inputs / "good.nii.gz").read_bytes() == before
    assert "refusing to overwrite" in capsys.readouterr().err


def test_classification_writes_probability_table(tmp_path):
    model = create_model("vit_2d_cls_debug", num_classes=3)
    pre = {**ConvertOptions(preset="xray").preprocessing(), "spatial_dims": 2, "channels": 1}
    names = ["Atelectasis", "Effusion", "Nodule"]
    ckpt = save_finetuned(tmp_path / "cls.safetensors", model.state_dict(), model_name="vit_2d_cls_debug",
                          model_config=config_dict(model.cfg), task="classify", preprocessing=pre, num_classes=3,
                          label_names=names)  # fmt: skip
    (tmp_path / "xr").mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):  # 2D images stored as single-slice NIfTI, of another size than the model's 32²
        nib.save(
            nib.Nifti1Image(rng.uniform(0, 255, (50, 40, 1)).astype(np.float32), np.eye(4)),
            tmp_path / "xr" / f"x{i}.nii",
        )
    result = predict_paths(Predictor.from_checkpoint(ckpt), tmp_path / "xr", tmp_path / "probs.csv")
    assert result.ok and result.written == [tmp_path / "probs.csv"]
    rows = (tmp_path / "probs.csv").read_text().splitlines()
    assert rows[0] == "input," + ",".join(names) and len(rows) == 3
    probs = np.array([[float(v) for v in r.split(",")[1:]] for r in rows[1:]])
    assert ((probs > 0) & (probs < 1)).all()


def test_dicom_series_gives_nifti_in_its_geometry(dataset, tmp_path):
    from medmae.data.synthetic import write_dicom_series

    image, _ = _case()
    series = write_dicom_series(tmp_path / "series", image, spacing=SPACING)
    ckpt = _save(tmp_path / "model.safetensors", dataset["preprocessing"])
    result = predict_paths(Predictor.from_checkpoint(ckpt), series, tmp_path / "out")
    assert result.ok and result.written == [tmp_path / "out" / "series.nii.gz"]
    pred, affine = read_image(str(result.written[0]), 3)
    src, src_affine = read_image(str(series), 3)
    assert pred.shape == src.shape and np.allclose(affine, src_affine, atol=1e-4)
