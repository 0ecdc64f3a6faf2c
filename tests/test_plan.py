"""tools/plan.py: the fingerprint read with the converter's readers, the documented rules (docs/plan.md) applied to
CT-like, MRI-like and anisotropic sets and to the repository's sample data, and to_wds.py --plan.

Expected values are computed here from the files and the rules as docs/plan.md states them, not from the planner.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import load_script

from medmae.data.convert.plan import ANISOTROPY, target_spacing
from medmae.data.synthetic import make_phantom, write_dicom_series, write_phantom_dataset
from medmae.models import create_model, train_memory

REPO = Path(__file__).resolve().parents[1]
MODEL = "unetr_vit_3d_debug"  # patch 8
PATCH = 8


def _tool(name: str):
    return load_script(f"tools/{name}.py")


def _plan(tmp_path: Path, src: Path, *extra: str) -> dict:
    out = tmp_path / "plan.json"
    args = [str(src), "-o", str(out), "--model", MODEL, "--quiet", "--workers", "0", *extra]
    assert _tool("plan").main(args) == 0
    return json.loads(out.read_text())


def _save(path: Path, data: np.ndarray, spacing, descrip: str = "") -> None:
    img = nib.Nifti1Image(data, np.diag([*spacing, 1.0]))
    img.header["descrip"] = descrip.encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def _weighted_percentiles(per_case: list[np.ndarray], q: tuple[float, ...]) -> list[float]:
    """Percentiles of the pooled foreground with every case weighing the same (the planner draws the same number
    of voxels from each case)."""
    values = np.concatenate(per_case)
    weights = np.concatenate([np.full(v.size, 1.0 / v.size) for v in per_case])
    order = np.argsort(values)
    cum = np.cumsum(weights[order]) / weights.sum()
    return [float(values[order][np.searchsorted(cum, p / 100)]) for p in q]


def test_target_spacing_follows_nnunet_rules():
    shapes = np.array([[200, 200, 150]] * 4)
    # median per axis when no axis is 3x coarser
    spacings = np.array([[0.7, 0.8, 1.5], [0.8, 0.8, 2.0], [0.9, 0.7, 2.5], [0.8, 0.9, 3.0]])
    assert target_spacing(spacings, shapes)[0] == pytest.approx([0.8, 0.8, 2.25])
    # coarse axis (> 3x) with few voxels (< 1/3): that axis takes the 10th percentile of its spacings
    spacings = np.array([[0.8, 0.8, z] for z in (3.5, 4.0, 5.0, 5.0, 6.0)])
    thin = np.array([[64, 64, 12]] * 5)
    value, rule = target_spacing(spacings, thin)
    assert value == pytest.approx([0.8, 0.8, np.percentile([3.5, 4.0, 5.0, 5.0, 6.0], 10)]) and "10th" in rule
    # coarse, but as many voxels along it: the median stays
    assert target_spacing(spacings, np.array([[64, 64, 60]] * 5))[0] == pytest.approx([0.8, 0.8, 5.0])
    # the 10th percentile never goes finer than the other axes
    spacings = np.array([[1.0, 1.0, z] for z in (0.5, 0.6, 4.0, 5.0, 5.0)])
    value, _ = target_spacing(spacings, thin)
    assert value[2] == pytest.approx(1.0, abs=1e-4) and value[2] > 1.0
    assert ANISOTROPY == 3.0


def test_ct_like_set(tmp_path):
    """NIfTI cases with labels and a DICOM series without one, at different spacings, padded with air: header
    evidence (DICOM Modality CT), the foreground percentiles as the window, cropping, median spacing."""
    src = tmp_path / "ct"
    spacings = [(0.7, 0.7, 2.0), (0.8, 0.8, 2.5), (0.9, 0.9, 3.0), (0.8, 0.8, 2.5)]
    fg = []
    for i, sp in enumerate(spacings):
        image, label = make_phantom((32, 32, 16), num_classes=3, seed=i)
        pad = ((12, 12), (12, 12), (2, 2))  # air around the body: the foreground box is ~40 % of the volume
        hu = np.pad(np.round(image[0]), pad, constant_values=-1000).astype(np.int16)
        label = np.pad(label, pad)
        if i < 3:
            _save(src / "imagesTr" / f"case{i}.nii.gz", hu, sp)
            _save(src / "labelsTr" / f"case{i}.nii.gz", label, sp)
            fg.append(hu[label > 0].astype(np.float64))
        else:
            write_dicom_series(src / "imagesTr" / "series3", hu, spacing=sp)
            fg.append(hu[hu > -500].astype(np.float64))  # unlabelled CT: the voxels above air
    plan = _plan(tmp_path, src)
    ch, fp = plan["choices"], plan["fingerprint"]
    assert plan["cases"] == 4 and fp["labelled_cases"] == 3
    assert fp["intensity_mask"] == {"label": 3, "above-air": 1}
    assert fp["modality"]["value"] == "CT" and fp["modality"]["evidence"]["header"] == {"CT": 1}
    assert ch["preset"]["value"] == "ct"
    assert ch["spacing"]["value"] == pytest.approx(np.median(spacings, axis=0).tolist())
    low, high = _weighted_percentiles(fg, (0.5, 99.5))
    assert ch["ct_window"]["value"] == pytest.approx([low, high], abs=3.0)
    assert ch["crop_foreground"]["value"] is True and fp["foreground_box_fraction"] <= 0.75
    median = fp["resampled_shape"]["median"]
    assert ch["roi_size"]["value"] == [max(PATCH, int(m) // PATCH * PATCH) for m in median]
    assert plan["convert"] == {
        "preset": "ct",
        "spacing": ch["spacing"]["value"],
        "ct_window": ch["ct_window"]["value"],
        "crop_foreground": True,
    }
    assert plan["train"] == {"data.roi_size": ch["roi_size"]["value"], "train.micro_batch": 64}
    for key in ("spacing", "preset", "ct_window", "crop_foreground", "roi_size", "micro_batch"):
        assert ch[key]["rule"], key


def test_mri_like_set_without_declared_modality(tmp_path):
    dl = write_phantom_dataset(tmp_path / "mri", n=4, shape=(24, 24, 20), channels=2, kind="mri", spacing=(1, 1, 1.2))
    data = json.loads(dl.read_text())
    del data["modality"]  # no declaration: the intensities must tell
    dl.write_text(json.dumps(data))
    plan = _plan(tmp_path, dl, "--workers", "2")  # through the worker pool
    ch, fp = plan["choices"], plan["fingerprint"]
    assert fp["modality"]["value"] == "MR" and fp["modality"]["evidence"]["intensity"] == {"non-negative": 4}
    assert ch["preset"]["value"] == "mri" and "ct_window" not in ch and "ct_window" not in plan["convert"]
    assert ch["spacing"]["value"] == pytest.approx([1.0, 1.0, 1.2])
    assert plan["channels"] == 2 and len(fp["foreground_intensity"]) == 2
    assert ch["crop_foreground"]["value"] is False  # the phantom's body fills its box


def test_anisotropic_set_takes_the_10th_percentile(tmp_path):
    zs = (3.5, 4.0, 5.0, 5.0, 6.0)
    for i, z in enumerate(zs):  # MR-like slabs; NIfTI descrip as dcm2niix writes it for an MR series
        image, label = make_phantom((40, 40, 10), num_classes=2, seed=i, kind="mri")
        _save(tmp_path / "aniso" / f"case{i}.nii.gz", image[0], (0.8, 0.8, z), descrip="TE=4.2;Time=120000.000")
        _save(tmp_path / "aniso" / f"case{i}_seg.nii.gz", label, (0.8, 0.8, z))
    plan = _plan(tmp_path, tmp_path / "aniso")
    ch, fp = plan["choices"], plan["fingerprint"]
    expected_z = float(np.percentile(zs, 10))
    assert ch["spacing"]["value"] == pytest.approx([0.8, 0.8, expected_z])
    assert "10th percentile" in ch["spacing"]["rule"]
    assert fp["modality"]["evidence"]["header"] == {"MR": 5} and ch["preset"]["value"] == "mri"
    resampled_z = np.median([10 * z / expected_z for z in zs])
    assert fp["resampled_shape"]["median"][2] == pytest.approx(resampled_z, abs=1.0)
    assert ch["roi_size"]["value"][2] == int(fp["resampled_shape"]["median"][2]) // PATCH * PATCH


def test_roi_shrinks_until_two_samples_fit(tmp_path):
    """A small GPU: the crop loses a patch at a time on the axis largest against the median shape, until the
    stated memory rule fits 2 samples; the micro-batch is the largest that fits."""
    from medmae.data.convert.plan import HEADROOM, RESIDENT_SHARE, STATIC_BYTES_PER_PARAM

    write_phantom_dataset(tmp_path / "big", n=2, shape=(64, 64, 48), spacing=(1, 1, 1))
    gib = 0.1
    plan = _plan(tmp_path, tmp_path / "big" / "dataset.json", "--gpu-gib", str(gib))
    roi, micro = plan["choices"]["roi_size"]["value"], plan["choices"]["micro_batch"]["value"]

    def fits(r: list[int]) -> int:
        m = train_memory(MODEL, img_size=r, in_chans=1)
        usable = gib * 2**30 * (1 - RESIDENT_SHARE) - m.parameters * STATIC_BYTES_PER_PARAM
        return int(usable // (m.activation_bytes * HEADROOM))

    assert roi != [64, 64, 48] and all(r % PATCH == 0 for r in roi) and "shrunk" in plan["choices"]["roi_size"]["rule"]
    assert micro == fits(roi) >= 2
    grown = [r + PATCH if r < m else r for r, m in zip(roi, (64, 64, 48))]
    assert fits(grown) < 2  # one patch more on every shrunk axis no longer fits two samples


def test_activation_count_matches_a_real_forward():
    """The meta-device count is the bytes a real bf16 forward saves for the backward (deduplicated here by storage
    address, which the meta device does not have), from above: on meta, attention takes the math kernel (it saves
    the attention weights; CPU and CUDA flash kernels save a log-sum-exp) and LayerNorm keeps fp32 statistics (as
    on CUDA; the CPU kernel keeps bf16)."""
    mem = train_memory(MODEL, img_size=[32, 32, 16], in_chans=1)
    torch.manual_seed(0)
    model = create_model(MODEL, img_size=[32, 32, 16]).to(torch.bfloat16)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    x = torch.randn(2, 1, 32, 32, 16, dtype=torch.bfloat16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    assert 0.95 * 2 * mem.activation_bytes <= sum(seen.values()) <= 2 * mem.activation_bytes
    assert mem.parameters == sum(p.numel() for p in model.parameters())


def test_to_wds_plan_equals_the_flags(tmp_path, capsys):
    dl = write_phantom_dataset(tmp_path / "src", n=3, shape=(24, 24, 16), num_classes=2, spacing=(0.8, 0.8, 2.0))
    plan = _plan(tmp_path, dl)
    c = plan["convert"]
    to_wds = _tool("to_wds")
    common = ["--workers", "0", "--quiet"]
    assert to_wds.main([str(dl), str(tmp_path / "planned"), "--plan", str(tmp_path / "plan.json"), *common]) == 0
    flags = ["--preset", c["preset"], "--spacing", *map(str, c["spacing"])]
    flags += ["--ct-window", *map(str, c["ct_window"])] + (["--crop-foreground"] if c["crop_foreground"] else [])
    assert to_wds.main([str(dl), str(tmp_path / "flags"), *flags, *common]) == 0
    planned = json.loads((tmp_path / "planned" / "manifest.json").read_text())
    by_flags = json.loads((tmp_path / "flags" / "manifest.json").read_text())
    assert planned["preprocessing"] == by_flags["preprocessing"]
    assert planned["preprocessing"]["spacing"] == c["spacing"] and planned["preprocessing"]["preset"] == "ct"
    assert [s["checksum"] for s in planned["samples"]] == [s["checksum"] for s in by_flags["samples"]]
    assert planned["plan"]["file"] == str((tmp_path / "plan.json").resolve()) and "plan" not in by_flags
    assert planned["plan"]["choices"]["spacing"]["rule"] == plan["choices"]["spacing"]["rule"]
    capsys.readouterr()
    args = [str(dl), str(tmp_path / "x"), "--plan", str(tmp_path / "plan.json"), "--preset", "mri", *common]
    assert to_wds.main(args) == 2 and "drop --preset" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}")
    assert to_wds.main([str(dl), str(tmp_path / "x"), "--plan", str(tmp_path / "bad.json"), *common]) == 2
    assert "not a medmae plan" in capsys.readouterr().err


def test_radiographs_from_a_csv(tmp_path):
    import itk

    rows = ["image,effusion"]
    for i in range(3):
        img = (make_phantom((72, 60), 2, seed=i, kind="xray")[0][0] * 255).astype(np.uint8)
        itk.imwrite(itk.image_from_array(np.ascontiguousarray(img.T)), str(tmp_path / f"x{i}.png"))
        rows.append(f"x{i}.png,{i % 2}")
    (tmp_path / "x.csv").write_text("\n".join(rows) + "\n")
    plan = _plan(tmp_path, tmp_path / "x.csv", "--model", "vit_2d_cls_debug")
    ch = plan["choices"]
    assert plan["spatial_dims"] == 2 and plan["fingerprint"]["modality"]["value"] == "X-ray"
    assert ch["preset"]["value"] == "xray" and ch["spacing"]["value"] is None is plan["convert"]["spacing"]
    assert ch["roi_size"]["value"] == [72 // PATCH * PATCH, 60 // PATCH * PATCH]  # vit_2d_cls_debug: patch 8


def test_sample_data(tmp_path):
    """The demo's ICBM152 T1 volumes (real anatomy): MRI by its intensities, 1 mm, the 96-voxel cap."""
    pytest.importorskip("nilearn")
    sample_data = _tool("sample_data")
    src = sample_data.write(tmp_path / "icbm", 2).parent
    plan = _plan(tmp_path, src)
    ch, fp = plan["choices"], plan["fingerprint"]
    assert fp["modality"]["value"] == "MR" and ch["preset"]["value"] == "mri"
    assert ch["spacing"]["value"] == pytest.approx([1.0, 1.0, 1.0])
    assert ch["crop_foreground"]["value"] == (fp["foreground_box_fraction"] <= 0.75)
    assert ch["roi_size"]["value"] == [96, 96, 96]  # the median shape exceeds the cap on every axis
