"""ChestX-ray14 splits (official list files, patient-wise hold-out, a test split the loaders leave alone) and the
foreground crop computed on raw intensities for every preset, on a real head volume."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medmae.data import DataConfig, build_val_loader
from medmae.data.convert import ConvertOptions, convert, read_manifest, verify
from medmae.data.sources import train_keys
from medmae.data.storage import iter_shard_samples
from medmae.data.synthetic import make_phantom

NIH_COLUMNS = [
    "Image Index",
    "Finding Labels",
    "Follow-up #",
    "Patient ID",
    "Patient Age",
    "Patient Gender",
    "View Position",
    "OriginalImage[Width",
    "Height]",
    "OriginalImagePixelSpacing[x",
    "y]",
]
FINDINGS = ["No Finding", "Effusion", "Mass|Effusion", "Atelectasis"]


def write_nih(folder: Path, patients: int = 12, test_patients: int = 3) -> dict[str, int]:
    """``Data_Entry_2017.csv``, ``images/*.png`` and the two official lists in the NIH layout: 1-4 follow-ups per
    patient, the last ``test_patients`` patients in ``test_list.txt``. Returns image name -> patient."""
    import itk

    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows, patient_of = [], {}
    for pid in range(1, patients + 1):
        for follow_up in range(int(rng.integers(1, 5))):
            name = f"{pid:08d}_{follow_up:03d}.png"
            img = (make_phantom((32, 32), 2, seed=pid * 10 + follow_up, kind="xray")[0][0] * 255).astype(np.uint8)
            itk.imwrite(itk.image_from_array(np.ascontiguousarray(img.T)), str(folder / "images" / name))
            rows.append([name, FINDINGS[(pid + follow_up) % 4], follow_up, pid, 50, "M", "PA", 32, 32, 0.14, 0.14])
            patient_of[name] = pid
    with open(folder / "Data_Entry_2017.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(NIH_COLUMNS)
        w.writerows(rows)
    first_test = patients - test_patients + 1
    (folder / "train_val_list.txt").write_text("".join(f"{n}\n" for n, p in patient_of.items() if p < first_test))
    (folder / "test_list.txt").write_text("".join(f"{n}\n" for n, p in patient_of.items() if p >= first_test))
    return patient_of


def cxr_options(folder: Path, **kw) -> ConvertOptions:
    return ConvertOptions(
        preset="xray", image_col="Image Index", label_col="Finding Labels", images_dir="images", workers=0, **kw
    )


def test_cxr14_official_lists_and_patient_wise_validation(tmp_path):
    src = tmp_path / "nih"
    patient_of = write_nih(src)
    out = tmp_path / "out"
    opts = cxr_options(
        src,
        train_list=str(src / "train_val_list.txt"),
        test_list=str(src / "test_list.txt"),
        group_col="Patient ID",
        val_fraction=0.25,
    )
    res = convert(src / "Data_Entry_2017.csv", out, opts, progress=False)
    assert res.ok, res.errors
    manifest = read_manifest(out)
    split_of = {s["key"]: s["split"] for s in manifest["samples"]}
    patients = {
        split: {patient_of[f"{k}.png"] for k, s in split_of.items() if s == split} for split in split_of.values()
    }
    assert patients["test"] == {10, 11, 12}  # the official test list, whole
    listed = set((src / "test_list.txt").read_text().split())
    assert {f"{k}.png" for k, s in split_of.items() if s == "test"} == listed
    assert len(patients["validation"]) == round(9 * 0.25)  # a quarter of the train_val patients
    assert not patients["validation"] & patients["train"]  # no patient on both sides
    assert manifest["counts"]["test"] == len(listed) and manifest["split"]["group_col"] == "Patient ID"
    assert manifest["split"]["test_list"] == "test_list.txt" and manifest["split"]["test_list_sha256"]
    assert sorted(p.name for p in out.glob("test-*.tar")) == ["test-000000.tar"]
    assert {s["key"] for s in iter_shard_samples(out / "test-000000.tar")} == {n[:-4] for n in listed}
    assert verify(out) == []

    # the loaders read train and validation only: the test images stay unseen until the final evaluation
    cfg = DataConfig(path=str(out), spatial_dims=2, roi_size=(32, 32), crop="resized", num_workers=0)
    assert set(train_keys(cfg, cfg.path, manifest)) == {k for k, s in split_of.items() if s == "train"}
    assert {item["key"] for item in build_val_loader(cfg)} == {k for k, s in split_of.items() if s == "validation"}


def test_selection_split_keeps_patients_whole(tmp_path):
    """The manifest records each image's patient (group_col), so a selection split carved from training for model
    picking holds whole patients: none of them has an image left in training."""
    from medmae.data.sources import selection_keys

    src = tmp_path / "nih"
    patient_of = write_nih(src, patients=8, test_patients=0)
    out = tmp_path / "out"
    assert convert(src / "Data_Entry_2017.csv", out, cxr_options(src, group_col="Patient ID"), progress=False).ok
    manifest = read_manifest(out)
    assert {s["key"]: s["group"] for s in manifest["samples"]} == {n[:-4]: str(p) for n, p in patient_of.items()}
    cfg = DataConfig(path=str(out), spatial_dims=2, roi_size=(32, 32), crop="resized", select_count=3)
    chosen = selection_keys(cfg, cfg.path, manifest)
    held = {patient_of[f"{k}.png"] for k in chosen}
    assert len(held) == 3  # three patients, with every one of their images
    assert set(chosen) == {n[:-4] for n, p in patient_of.items() if p in held}
    assert not held & {patient_of[f"{k}.png"] for k in train_keys(cfg, cfg.path, manifest)}


def test_image_level_split_of_a_patient_csv_is_refused(tmp_path):
    src = tmp_path / "nih"
    write_nih(src)
    with pytest.raises(ValueError, match=r"patient column 'Patient ID'.*--group-col 'Patient ID'"):
        convert(src / "Data_Entry_2017.csv", tmp_path / "out", cxr_options(src, val_fraction=0.1), progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_images_outside_the_lists_are_reported(tmp_path):
    src = tmp_path / "nih"
    patient_of = write_nih(src, patients=4, test_patients=1)
    names = sorted(patient_of)
    (src / "train_val_list.txt").write_text("\n".join(n for n in names if patient_of[n] < 3) + "\nghost_000.png\n")
    res = convert(
        src / "Data_Entry_2017.csv",
        tmp_path / "out",
        cxr_options(src, train_list=str(src / "train_val_list.txt"), test_list=str(src / "test_list.txt")),
        progress=False,
    )
    reasons = {e["key"]: e["reason"] for e in res.errors}
    assert reasons.pop("ghost_000") == "missing_from_csv"
    assert set(reasons.values()) == {"not_in_split_lists"}
    assert {f"{k}.png" for k in reasons} == {n for n in names if patient_of[n] == 3}


def _ct_with_padding() -> tuple[np.ndarray, np.ndarray]:
    """A CT phantom whose scan circle is padded with -2048 outside, as scanners store it; air inside is -1000."""
    hu = np.round(make_phantom((40, 36, 20), 2, seed=3)[0][0]).astype(np.int16)
    hu[:3], hu[-3:] = -2048, -2048
    return hu, hu > -175  # the body: what survives the ct window


@pytest.mark.parametrize("preset", ["mri", "none", "xray", "ct"])
def test_crop_foreground_on_raw_intensities_of_a_real_head(tmp_path, preset):
    """The ICBM152 T1 (nilearn ships it): zero background around the head. The box is that of the non-zero voxels,
    whatever the preset does to intensities afterwards (the mri z-score made the background no longer the minimum)."""
    datasets = pytest.importorskip("nilearn.datasets")
    t1 = nib.load(datasets.MNI152_FILE_PATH)
    raw = np.asarray(t1.dataobj).astype(np.float32)
    (tmp_path / "in").mkdir()
    nib.save(nib.Nifti1Image(raw, t1.affine), tmp_path / "in" / "icbm152.nii.gz")
    margin = 3
    opts = ConvertOptions(preset=preset, crop_foreground=True, fg_margin=margin, image_dtype="float32", workers=0)
    assert convert(tmp_path / "in", tmp_path / "out", opts, progress=False).ok
    manifest = read_manifest(tmp_path / "out")
    got = next(iter_shard_samples(tmp_path / "out" / manifest["shards"][0]["name"]))
    nz = np.argwhere(raw > 0)
    box = tuple(
        slice(max(0, lo - margin), min(n, hi + 1 + margin)) for lo, hi, n in zip(nz.min(0), nz.max(0), raw.shape)
    )
    assert got["image"].shape[1:] == tuple(s.stop - s.start for s in box)
    assert all(a < b for a, b in zip(got["image"].shape[1:], raw.shape))
    if preset == "mri":  # z-scored over the non-zero voxels of the whole volume, then cropped
        fg = raw > 0
        expected = np.where(fg, (raw - raw[fg].mean()) / raw[fg].std(), 0.0)[box]
        np.testing.assert_allclose(got["image"][0], expected, atol=1e-4)
    origin = t1.affine[:3, :3] @ [s.start for s in box] + t1.affine[:3, 3]  # the template is RAS already
    np.testing.assert_allclose(np.asarray(got["meta"]["affine"])[:3, 3], origin, atol=1e-5)


def test_crop_foreground_ct_ignores_air_and_padding(tmp_path):
    hu, body = _ct_with_padding()
    (tmp_path / "in").mkdir()
    nib.save(nib.Nifti1Image(hu, np.eye(4)), tmp_path / "in" / "ct.nii.gz")
    opts = ConvertOptions(preset="ct", crop_foreground=True, fg_margin=0, workers=0)
    assert convert(tmp_path / "in", tmp_path / "out", opts, progress=False).ok
    got = next(iter_shard_samples(next((tmp_path / "out").glob("*.tar"))))
    nz = np.argwhere(body)
    assert got["image"].shape[1:] == tuple(nz.max(0) - nz.min(0) + 1)
    assert got["meta"]["original_shape"] == list(hu.shape)
