"""Converter round-trips on real files: NIfTI, NRRD, MHA, DICOM series, multi-channel, 2D CSV; resume and verify."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import load_script

from medmae.data.convert import ConvertOptions, convert, read_manifest, verify
from medmae.data.storage import iter_shard_samples, read_zarr_sample
from medmae.data.synthetic import make_phantom, write_dicom_series, write_phantom_dataset

REPO = Path(__file__).resolve().parents[1]
SHAPE = (24, 20, 16)


def stored(out: Path) -> dict[str, dict]:
    """Every sample of a converted dataset, decoded, by key."""
    manifest = read_manifest(out)
    if manifest["format"] == "wds":
        return {s["key"]: s for sh in manifest["shards"] for s in iter_shard_samples(out / sh["name"])}
    import zarr

    root = zarr.open_group(str(out), mode="r")
    return {s["key"]: read_zarr_sample(root, s["split"], s["key"]) for s in manifest["samples"]}


def ct_expected(hu: np.ndarray) -> np.ndarray:
    return ((np.clip(hu.astype(np.float32), -175, 250) + 175) / 425).astype(np.float16)


@pytest.mark.parametrize("fmt", ["wds", "zarr"])
def test_nifti_datalist_roundtrip_exact(tmp_path, fmt):
    dl = write_phantom_dataset(tmp_path / "src", n=4, shape=SHAPE, num_classes=3)
    out = tmp_path / "out"
    res = convert(dl, out, ConvertOptions(format=fmt, preset="ct", workers=0, zarr_chunk=8), progress=False)
    assert res.ok and res.converted == 4
    manifest = read_manifest(out)
    assert manifest["counts"] == {"train": 3, "validation": 1, "test": 0, "errors": 0}
    assert manifest["task"] == "segmentation" and manifest["num_classes"] == 3
    assert manifest["preprocessing"]["preset"] == "ct" and manifest["complete"]
    samples = stored(out)
    for entry in json.loads(dl.read_text())["training"]:
        key = Path(entry["image"]).name.removesuffix(".nii.gz")
        src = nib.load(dl.parent / entry["image"])
        got = samples[key]
        assert got["image"].dtype == np.float16 and got["image"].shape == (1, *SHAPE)
        np.testing.assert_array_equal(got["image"][0], ct_expected(np.asarray(src.dataobj)))
        assert got["label"].dtype == np.uint8
        np.testing.assert_array_equal(got["label"], np.asarray(nib.load(dl.parent / entry["label"]).dataobj))
        meta = got["meta"]
        assert meta["spacing"] == [1.5, 1.5, 2.0] and meta["orientation"] == "RAS"
        assert meta["original_shape"] == list(SHAPE)
        np.testing.assert_allclose(meta["affine"], src.affine)
        assert meta["fg_points"] and all(got["label"][tuple(p)] > 0 for p in meta["fg_points"])
    assert verify(out) == []


def test_reorient_and_resample(tmp_path):
    """An LAS-oriented file comes out RAS (x flipped) and resampling keeps labels integer and aligned."""
    image, label = make_phantom(SHAPE, 2, seed=3)
    affine = np.diag([-2.0, 2.0, 2.0, 1.0])
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    nib.save(nib.Nifti1Image(np.round(image[0]).astype(np.int16), affine), tmp_path / "imagesTr" / "a.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), tmp_path / "labelsTr" / "a.nii.gz")
    out = tmp_path / "o1"
    assert convert(tmp_path, out, ConvertOptions(preset="none", image_dtype="float32", workers=0), progress=False).ok
    got = stored(out)["a"]
    np.testing.assert_array_equal(got["image"][0], np.round(image[0])[::-1])
    np.testing.assert_array_equal(got["label"], label[::-1])
    assert got["meta"]["orientation"] == "RAS" and got["meta"]["affine"][0][0] == 2.0

    out = tmp_path / "o2"
    assert convert(tmp_path, out, ConvertOptions(spacing=(1.0, 1.0, 1.0), workers=0), progress=False).ok
    got = stored(out)["a"]
    assert got["image"].shape[1:] == got["label"].shape == tuple(2 * s - 1 for s in SHAPE)
    assert set(np.unique(got["label"])) == {0, 1} and got["meta"]["spacing"] == [1.0, 1.0, 1.0]
    np.testing.assert_array_equal(got["label"][::2, ::2, ::2], label[::-1])  # nearest keeps the original grid


def test_nrrd_mha_and_parallel_workers(tmp_path):
    dl = write_phantom_dataset(tmp_path / "nrrd", n=2, shape=SHAPE, fmt="nrrd")
    out = tmp_path / "out"
    res = convert(dl.parent, out, ConvertOptions(preset="ct", workers=2), progress=False)
    assert res.ok and res.converted == 2 and verify(out) == []  # each worker wrote its own shard(s)
    ref_img, ref_lab = make_phantom(SHAPE, 2, seed=0)
    got = stored(out)["case_000"]
    np.testing.assert_array_equal(got["image"][0], ct_expected(np.round(ref_img[0])))
    np.testing.assert_array_equal(got["label"], ref_lab)

    import itk

    mha = tmp_path / "mha"
    mha.mkdir()
    img = itk.image_from_array(np.ascontiguousarray(np.round(ref_img[0]).astype(np.int16).T))  # ITK arrays are zyx
    img.SetSpacing([1.5, 1.5, 2.0])
    itk.imwrite(img, str(mha / "vol.mha"))
    out = tmp_path / "out_mha"
    assert convert(mha, out, ConvertOptions(preset="ct", workers=0), progress=False).ok
    got = stored(out)["vol"]
    # ITK's identity direction is LPS: RAS output flips x and y
    np.testing.assert_array_equal(got["image"][0], ct_expected(np.round(ref_img[0]))[::-1, ::-1])


def test_dicom_series(tmp_path):
    hu = np.round(make_phantom(SHAPE, 2, seed=1)[0][0]).astype(np.int16)
    write_dicom_series(tmp_path / "in" / "patient1", hu, spacing=(0.8, 0.8, 2.5))
    out = tmp_path / "out"
    res = convert(tmp_path / "in", out, ConvertOptions(format="zarr", preset="ct", workers=0), progress=False)
    assert res.ok, res.errors
    got = stored(out)["patient1"]
    np.testing.assert_array_equal(got["image"][0], ct_expected(hu)[::-1, ::-1])  # DICOM is LPS
    np.testing.assert_allclose(got["meta"]["spacing"], [0.8, 0.8, 2.5], rtol=1e-5)


def test_multichannel_4d_nifti_and_channel_suffixes(tmp_path):
    dl = write_phantom_dataset(tmp_path / "brats", n=2, shape=SHAPE, channels=4, kind="mri", num_classes=4)
    out = tmp_path / "out"
    assert convert(dl, out, ConvertOptions(preset="mri", workers=0), progress=False).ok
    got = stored(out)["case_000"]
    assert got["image"].shape == (4, *SHAPE) and read_manifest(out)["channels"] == 4
    src = np.moveaxis(np.asarray(nib.load(dl.parent / "imagesTr" / "case_000.nii.gz").dataobj), -1, 0)
    for c in range(4):
        nz = src[c] != 0
        expected = (src[c][nz] - src[c][nz].mean()) / src[c][nz].std()
        np.testing.assert_allclose(got["image"][c][nz].astype(np.float32), expected, atol=5e-3)
        assert (got["image"][c][~nz] == 0).all()

    folder = tmp_path / "suffixes"
    folder.mkdir()
    for c, suf in enumerate(["t1", "t2"]):
        nib.save(nib.Nifti1Image(src[c], np.eye(4)), folder / f"p1_{suf}.nii.gz")
    nib.save(nib.Nifti1Image(src[0], np.eye(4)), folder / "p2_t1.nii.gz")  # p2 misses t2
    nib.save(nib.Nifti1Image((src[0] > 600).astype(np.uint8), np.eye(4)), folder / "p1_seg.nii.gz")
    out = tmp_path / "out2"
    res = convert(folder, out, ConvertOptions(channel_suffixes=["t1", "t2"], preset="mri", workers=0), progress=False)
    assert [e["reason"] for e in res.errors] == ["wrong_channels"] and res.errors[0]["key"] == "p2"
    got = stored(out)["p1"]
    assert got["image"].shape == (2, *SHAPE) and got["label"].sum() == (src[0] > 600).sum()


def test_csv_2d_multilabel_and_val_fraction(tmp_path):
    import itk

    rows = []
    for i in range(6):
        img = (make_phantom((40, 32), 2, seed=i, kind="xray")[0][0] * 255).astype(np.uint8)
        itk.imwrite(itk.image_from_array(np.ascontiguousarray(img.T)), str(tmp_path / f"cxr_{i}.png"))
        findings = ["No Finding", "Effusion", "Mass|Effusion"][i % 3]
        rows.append({"Image Index": f"cxr_{i}.png", "Finding Labels": findings})
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["Image Index", "Finding Labels"])
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "out"
    opts = ConvertOptions(
        preset="xray", image_col="Image Index", label_col="Finding Labels", val_fraction=0.34, workers=0
    )
    assert convert(tmp_path / "labels.csv", out, opts, progress=False).ok
    manifest = read_manifest(out)
    assert manifest["task"] == "classification" and manifest["label_names"] == ["Effusion", "Mass"]
    assert manifest["spatial_dims"] == 2 and manifest["counts"]["validation"] == 2
    got = stored(out)
    assert got["cxr_2"]["image"].shape == (1, 40, 32)
    assert got["cxr_2"]["image"].min() == 0 and got["cxr_2"]["image"].max() == 1
    np.testing.assert_array_equal(got["cxr_2"]["label"], [1.0, 1.0])
    np.testing.assert_array_equal(got["cxr_0"]["label"], [0.0, 0.0])


def test_resume_skips_complete_and_refuses_changed_settings(tmp_path):
    dl = write_phantom_dataset(tmp_path / "src", n=4, shape=SHAPE)
    out = tmp_path / "out"
    opts = ConvertOptions(preset="ct", shard_size_mb=0.01, workers=0)  # one sample per shard
    assert convert(dl, out, opts, progress=False).converted == 4
    shards = sorted(p.name for p in out.glob("*.tar"))
    assert shards == ["train-000000.tar", "train-000001.tar", "train-000002.tar", "validation-000000.tar"]
    before = {p: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    (out / "train-000001.tar").unlink()  # as if the run died before this shard was renamed into place
    (out / ".train-000003.tar.tmp-999").write_bytes(b"partial")
    res = convert(dl, out, opts, progress=False)
    assert (res.converted, res.skipped) == (1, 3)
    assert not list(out.glob(".*tmp*"))
    assert all(p.stat().st_mtime_ns == t for p, t in before.items() if p.exists())  # nothing rewritten
    assert len(read_manifest(out)["samples"]) == 4 and verify(out) == []
    with pytest.raises(ValueError, match="other settings"):
        convert(dl, out, ConvertOptions(preset="mri", shard_size_mb=0.01, workers=0), progress=False)


@pytest.mark.parametrize("fmt", ["wds", "zarr"])
def test_verify_detects_corruption(tmp_path, fmt):
    dl = write_phantom_dataset(tmp_path / "src", n=2, shape=SHAPE)
    out = tmp_path / "out"
    assert convert(dl, out, ConvertOptions(format=fmt, preset="ct", workers=0), progress=False).ok
    if fmt == "wds":
        s = read_manifest(out)["samples"][0]
        offset, _ = s["members"]["image.npy"]
        with open(out / s["shard"], "r+b") as f:
            f.seek(offset + 200)
            f.write(b"\x7f\x7f\x7f\x7f")
    else:
        m = json.loads((out / "manifest.json").read_text())
        m["samples"][0]["checksum"] = "0" * 64
        (out / "manifest.json").write_text(json.dumps(m))
    problems = verify(out)
    assert len(problems) == 1 and "checksum mismatch" in problems[0]


def test_cli_help_and_exit_codes(tmp_path, capsys):
    # The script runs from a clone as it is; its main() then in this process.
    run = [sys.executable, str(REPO / "tools" / "to_wds.py")]
    assert "--format" in subprocess.run(run + ["--help"], capture_output=True, text=True, check=True).stdout
    to_wds = load_script("tools/to_wds.py")
    dl = write_phantom_dataset(tmp_path / "src", n=2, shape=SHAPE)
    (dl.parent / "imagesTr" / "case_001.nii.gz").write_bytes(b"not an image")
    args = [str(dl), str(tmp_path / "out"), "--preset", "ct", "--workers", "0", "--quiet", "--verify"]
    assert to_wds.main(args) == 1
    out = capsys.readouterr().out
    assert "unreadable: case_001" in out and "verify: ok" in out
    assert json.loads((tmp_path / "out" / "errors.jsonl").read_text().splitlines()[0])["key"] == "case_001"
    assert to_wds.main(args + ["--allow-errors"]) == 0
    assert "1 already done" in capsys.readouterr().out
