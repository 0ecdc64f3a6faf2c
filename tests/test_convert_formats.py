"""The files real users have, each written here by nibabel / pydicom / pynrrd or shipped in an installed package:
FreeSurfer MGZ/MGH, Siemens mosaic DICOM, folders of several DICOM series, NRRD with a measurement frame, 4-D and
5-D NIfTI with singleton axes, float masks, plain .nii, datalist label names, and degenerate shapes."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medmae.data.convert import ConvertOptions, convert, read_manifest, verify
from medmae.data.storage import iter_shard_samples
from medmae.data.synthetic import make_phantom, write_dicom_series, write_phantom_dataset

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
NIBABEL_DICOM = Path(nib.__file__).parent / "nicom" / "tests" / "data"
SHAPE = (20, 18, 12)
F32 = {"image_dtype": "float32", "workers": 0}


def stored(out: Path) -> dict[str, dict]:
    manifest = read_manifest(out)
    return {s["key"]: s for sh in manifest["shards"] for s in iter_shard_samples(out / sh["name"])}


def assert_same_world(src: np.ndarray, src_affine: np.ndarray, got: np.ndarray, got_affine) -> None:
    """Every stored voxel holds the source voxel at the same world position, however the axes were moved."""
    idx = np.indices(got.shape).reshape(3, -1)
    world = np.asarray(got_affine) @ np.vstack([idx, np.ones(idx.shape[1])])
    src_idx = np.rint(np.linalg.inv(src_affine) @ world)[:3].astype(int)
    np.testing.assert_array_equal(got.reshape(-1), src[tuple(src_idx)])


def errors_of(out: Path) -> list[tuple[str, str]]:
    return [(e["key"], e["reason"]) for e in map(json.loads, (out / "errors.jsonl").read_text().splitlines())]


# FreeSurfer's conformed space: x left, y inferior, z anterior (LIA), 1 mm
LIA = np.array([[-1.0, 0, 0, 10], [0, 0, 1, -9], [0, -1, 0, 6], [0, 0, 0, 1]])


@pytest.mark.parametrize("ext", [".mgz", ".mgh"])
def test_freesurfer_mgz_mgh_reoriented_to_ras(tmp_path, ext):
    image, label = make_phantom(SHAPE, 3, seed=4, kind="mri")
    t1 = np.round(image[0]).astype(np.int16)
    (tmp_path / "in").mkdir()
    nib.save(nib.MGHImage(t1, LIA), tmp_path / "in" / f"T1{ext}")
    nib.save(nib.MGHImage(label.astype(np.int32), LIA), tmp_path / "in" / f"T1_seg{ext}")  # aseg is int32
    res = convert(tmp_path / "in", tmp_path / "out", ConvertOptions(**F32), progress=False)
    assert res.ok, res.errors
    got = stored(tmp_path / "out")["T1"]
    assert got["meta"]["orientation"] == "RAS" and sorted(got["image"].shape[1:]) == sorted(SHAPE)
    assert got["image"].shape[1:] != SHAPE  # LIA -> RAS swaps the last two axes
    assert_same_world(t1, LIA, got["image"][0], got["meta"]["affine"])
    assert_same_world(label, LIA, got["label"], got["meta"]["affine"])


def test_shipped_mgz_frames_are_channels_and_small_ones_are_degenerate(tmp_path):
    """nibabel's own test.mgz: 3x4x5 with 2 frames. Too small for the default --min-size, so refused by name."""
    dl = tmp_path / "dl.json"
    dl.write_text(json.dumps({"training": [{"image": str(NIBABEL_DATA / "test.mgz")}]}))
    res = convert(dl, tmp_path / "o1", ConvertOptions(**F32), progress=False)
    assert [(e["key"], e["reason"]) for e in res.errors] == [("test", "degenerate_shape")]
    assert "min-size" in res.errors[0]["message"] and errors_of(tmp_path / "o1") == [("test", "degenerate_shape")]
    assert read_manifest(tmp_path / "o1")["samples"] == []
    res = convert(dl, tmp_path / "o2", ConvertOptions(min_size=3, **F32), progress=False)
    assert res.ok, res.errors
    src = nib.load(NIBABEL_DATA / "test.mgz")
    got = stored(tmp_path / "o2")["test"]
    assert got["image"].shape[0] == 2 and read_manifest(tmp_path / "o2")["channels"] == 2
    for c in range(2):
        assert_same_world(np.asarray(src.dataobj)[..., c], src.affine, got["image"][c], got["meta"]["affine"])


def _siemens_mosaic(path: Path, volume: np.ndarray, instance: int, strip_csa: bool = False) -> None:
    """A real Siemens DWI mosaic header (shipped with nibabel, its pixels zeroed) holding ``volume``
    (rows, columns, 48 slices of 128x128) tiled 7x7 row by row, as the scanner stores it."""
    ds = pydicom.dcmread(io.BytesIO(gzip.decompress((NIBABEL_DICOM / "siemens_dwi_1000.dcm.gz").read_bytes())))
    rows, cols, n = volume.shape
    mosaic = np.zeros((7 * rows, 7 * cols), dtype=np.uint16)
    for k in range(n):
        mosaic[(k // 7) * rows : (k // 7 + 1) * rows, (k % 7) * cols : (k % 7 + 1) * cols] = volume[:, :, k]
    ds.PixelData = mosaic.tobytes()
    ds.InstanceNumber = instance
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    if strip_csa:
        del ds[0x0029, 0x1010]
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path)


def _mosaic_volume(seed: int) -> np.ndarray:
    return (make_phantom((128, 128, 48), 3, seed=seed, kind="mri")[0][0]).astype(np.uint16)


@pytest.mark.filterwarnings("ignore:The DICOM readers are highly experimental")
def test_siemens_mosaic_series_untiled_one_sample_per_volume(tmp_path):
    from nibabel.nicom import dicomwrappers

    volumes = [_mosaic_volume(0), _mosaic_volume(1)]  # b0 and b1000 of one DWI series
    for i, v in enumerate(volumes):
        _siemens_mosaic(tmp_path / "in" / "dwi" / f"IM{i}.dcm", v, instance=i + 1)
    out = tmp_path / "out"
    res = convert(tmp_path / "in", out, ConvertOptions(**F32), progress=False)
    assert res.ok and res.converted == 2, res.errors
    got = stored(out)
    assert sorted(got) == ["dwi_v0000", "dwi_v0001"]
    wrapper = dicomwrappers.wrapper_from_data(pydicom.dcmread(tmp_path / "in" / "dwi" / "IM0.dcm"))
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ wrapper.affine  # nibabel's LPS geometry of the un-tiled volume
    for key, v in zip(["dwi_v0000", "dwi_v0001"], volumes):
        image = got[key]["image"][0]
        assert sorted(image.shape) == [48, 128, 128] and got[key]["meta"]["orientation"] == "RAS"
        assert_same_world(v, affine, image, got[key]["meta"]["affine"])
        np.testing.assert_allclose(sorted(got[key]["meta"]["spacing"]), [1.796875, 1.796875, 3.0], rtol=1e-4)
    assert verify(out) == []
    # a datalist entry is one volume: a mosaic series of two is refused by name, not cut to its first volume
    dl = tmp_path / "dl.json"
    dl.write_text(json.dumps({"training": [{"image": str(tmp_path / "in" / "dwi")}]}))
    res = convert(dl, tmp_path / "out2", ConvertOptions(**F32), progress=False)
    assert [e["reason"] for e in res.errors] == ["mosaic_series"] and "2 volumes" in res.errors[0]["message"]


def test_mosaic_that_cannot_be_untiled_is_refused_by_name(tmp_path):
    src = tmp_path / "in"
    _siemens_mosaic(src / "stripped" / "IM0.dcm", _mosaic_volume(2), 1, strip_csa=True)  # anonymised: no CSA
    (src / "cut").mkdir()
    (src / "cut" / "0.dcm").write_bytes((NIBABEL_DICOM / "0.dcm").read_bytes())  # shipped: 256 rows for 7x7 tiles of 36
    # The case: the MOSAIC marker and CSA gone, ITK reads the tiles as one 896x896x1 slice.
    ds = pydicom.dcmread(src / "stripped" / "IM0.dcm")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"]
    (src / "flat").mkdir()
    ds.save_as(src / "flat" / "IM0.dcm")
    res = convert(src, tmp_path / "out", ConvertOptions(**F32), progress=False)
    assert res.converted == 0
    assert sorted(errors_of(tmp_path / "out")) == [
        ("cut", "unreadable"),
        ("flat", "degenerate_shape"),
        ("stripped", "mosaic_without_csa"),
    ]
    messages = {e["key"]: e["message"] for e in res.errors}
    assert "48 equal tiles" in messages["cut"] and "[896, 896, 1]" in messages["flat"]


def test_folder_of_several_dicom_series(tmp_path):
    first = np.round(make_phantom(SHAPE, 2, seed=1)[0][0]).astype(np.int16)
    second = np.round(make_phantom((16, 14, 10), 2, seed=2)[0][0]).astype(np.int16)
    folder = tmp_path / "in" / "patient1"
    write_dicom_series(folder, first, series_number=2, description="CT abdomen", prefix="a")
    write_dicom_series(folder, second, series_number=3, description="CT abdomen", prefix="b")
    out = tmp_path / "out"
    res = convert(tmp_path / "in", out, ConvertOptions(preset="ct", **F32), progress=False)
    assert res.ok and res.converted == 2, res.errors
    got = stored(out)
    assert sorted(got) == ["patient1_2_CT_abdomen", "patient1_3_CT_abdomen"]
    hu = got["patient1_3_CT_abdomen"]["image"][0]
    assert hu.shape == (16, 14, 10) and got["patient1_2_CT_abdomen"]["image"].shape[1:] == SHAPE
    np.testing.assert_allclose(hu, ((np.clip(second, -175, 250) + 175) / 425)[::-1, ::-1], atol=1e-6)  # LPS
    series = {s["key"]: s["source"]["series"] for s in read_manifest(out)["samples"]}
    assert len(set(series.values())) == 2

    # the folder itself as INPUT: its loose slices are read as DICOM series, not as one sample per slice
    res = convert(folder, tmp_path / "out2", ConvertOptions(preset="ct", **F32), progress=False)
    assert res.ok and sorted(stored(tmp_path / "out2")) == ["patient1_2_CT_abdomen", "patient1_3_CT_abdomen"]

    # a datalist entry must be one volume: a folder of two series is refused, naming both
    dl = tmp_path / "dl.json"
    dl.write_text(json.dumps({"training": [{"image": str(folder)}]}))
    res = convert(dl, tmp_path / "out3", ConvertOptions(preset="ct", **F32), progress=False)
    assert [e["reason"] for e in res.errors] == ["multiple_series"]
    assert "#2 'CT abdomen'" in res.errors[0]["message"] and "#3 'CT abdomen'" in res.errors[0]["message"]


def test_nrrd_with_measurement_frame_scalar_and_dwi(tmp_path):
    """A DWI NRRD as Slicer writes it (gradient list first, LPS space, measurement frame) and a scalar one."""
    import nrrd

    dwi = np.round(make_phantom(SHAPE, 2, channels=3, seed=5, kind="mri")[0]).astype(np.int16)  # (3, *S)
    directions = np.array([[np.nan] * 3, [-1.5, 0, 0], [0, 1.5, 0], [0, 0, 2.0]])
    header = {
        "space": "left-posterior-superior",
        "kinds": ["list", "domain", "domain", "domain"],
        "space directions": directions,
        "space origin": np.array([5.0, -3.0, 1.0]),
        "measurement frame": np.array([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]]),
        "DWMRI_b-value": "1000",
    }
    (tmp_path / "in").mkdir()
    nrrd.write(str(tmp_path / "in" / "dwi.nrrd"), dwi, header)
    scalar = {**header, "kinds": ["domain"] * 3, "space directions": directions[1:]}
    nrrd.write(str(tmp_path / "in" / "t1.nrrd"), dwi[0], scalar)
    res = convert(tmp_path / "in", tmp_path / "out", ConvertOptions(**F32), progress=False)
    # channels come from the first sample (dwi, 3): the scalar one is then refused by name, not mixed in
    assert [(e["key"], e["reason"]) for e in res.errors] == [("t1", "wrong_channels")]
    got = stored(tmp_path / "out")["dwi"]
    # LPS world -> RAS: flip x and y of the affine built from the header
    lps = np.eye(4)
    lps[:3, :3], lps[:3, 3] = directions[1:].T, header["space origin"]
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    for c in range(3):
        assert_same_world(dwi[c], ras, got["image"][c], got["meta"]["affine"])
    dl = tmp_path / "scalar.json"
    dl.write_text(json.dumps({"training": [{"image": str(tmp_path / "in" / "t1.nrrd")}]}))
    assert convert(dl, tmp_path / "o2", ConvertOptions(**F32), progress=False).ok
    got = stored(tmp_path / "o2")["t1"]
    assert_same_world(dwi[0], ras, got["image"][0], got["meta"]["affine"])


def test_nifti_singleton_axes_float_masks_and_plain_nii(tmp_path):
    image, label = make_phantom(SHAPE, 3, seed=6, kind="mri")
    affine = np.diag([1.2, 1.2, 2.0, 1.0])
    src = tmp_path / "in"
    src.mkdir()
    entries = []
    for name, data in [("t4d", image[0][..., None]), ("t5d", image[0][..., None, None]), ("plain", image[0])]:
        ext = ".nii" if name == "plain" else ".nii.gz"
        nib.save(nib.Nifti1Image(data, affine), src / f"{name}{ext}")
        # float32 mask holding integer values, as many tools write them
        nib.save(nib.Nifti1Image(label.astype(np.float32), affine), src / f"{name}_seg{ext}")
        entries.append({"image": f"{name}{ext}", "label": f"{name}_seg{ext}"})
    nib.save(nib.Nifti1Image(image[0][..., None, :1].repeat(2, axis=-1), affine), src / "vec.nii.gz")  # (X,Y,Z,1,2)
    entries.append({"image": "vec.nii.gz"})
    (src / "dataset.json").write_text(json.dumps({"training": entries}))
    res = convert(src, tmp_path / "out", ConvertOptions(**F32), progress=False)
    assert [(e["key"], e["reason"]) for e in res.errors] == [("vec", "wrong_channels")]  # 2 channels, not 1
    got = stored(tmp_path / "out")
    for key in ("t4d", "t5d", "plain"):
        assert got[key]["image"].shape == (1, *SHAPE)
        np.testing.assert_array_equal(got[key]["image"][0], image[0])
        assert got[key]["label"].dtype == np.uint8
        np.testing.assert_array_equal(got[key]["label"], label)


def test_label_names_reach_the_manifest(tmp_path):
    dl = write_phantom_dataset(tmp_path / "msd", n=2, shape=SHAPE, num_classes=3)  # MSD 'labels': {"0": ...}
    data = json.loads(dl.read_text())
    data["labels"] = {"0": "background", "1": "spleen", "2": "liver"}
    dl.write_text(json.dumps(data))
    assert convert(dl, tmp_path / "o1", ConvertOptions(workers=0), progress=False).ok
    manifest = read_manifest(tmp_path / "o1")
    assert manifest["label_names"] == ["background", "spleen", "liver"] and manifest["num_classes"] == 3

    # nnU-Net v2 writes name: value; a name for a class no volume holds still counts (index order, background first)
    data["labels"] = {"background": 0, "liver": 2, "spleen": 1, "tumour": 3}
    dl.write_text(json.dumps(data))
    assert convert(dl, tmp_path / "o2", ConvertOptions(workers=0), progress=False).ok
    manifest = read_manifest(tmp_path / "o2")
    assert manifest["label_names"] == ["background", "spleen", "liver", "tumour"] and manifest["num_classes"] == 4

    # a label value the map does not name is refused by name; a map with a gap is an input error
    data["labels"] = {"0": "background", "1": "spleen"}
    dl.write_text(json.dumps(data))
    res = convert(dl, tmp_path / "o3", ConvertOptions(workers=0), progress=False)
    assert {e["reason"] for e in res.errors} == {"label_out_of_range"} and "value 2" in res.errors[0]["message"]
    data["labels"] = {"0": "background", "2": "liver"}
    dl.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"missing \[1\]"):
        convert(dl, tmp_path / "o4", ConvertOptions(workers=0), progress=False)


def test_degenerate_shapes_refused_never_stored(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    image = make_phantom(SHAPE, 2, seed=7, kind="mri")[0][0]
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(image[:, :, :1], affine), src / "slice.nii.gz")  # one slice stored as a volume
    nib.save(nib.Nifti1Image(image[:, :, :6], affine), src / "thin.nii.gz")  # 6 slices of 2 mm: 3 at 4 mm
    nib.save(nib.Nifti1Image(image, affine), src / "ok.nii.gz")
    opts = {"spacing": (4.0, 4.0, 4.0), "workers": 0}
    res = convert(src, tmp_path / "out", ConvertOptions(min_size=5, **opts), progress=False)
    assert sorted((e["key"], e["reason"]) for e in res.errors) == [
        ("slice", "degenerate_shape"),
        ("thin", "degenerate_shape"),
    ]
    assert [s["key"] for s in read_manifest(tmp_path / "out")["samples"]] == ["ok"]
    res = convert(src, tmp_path / "out2", ConvertOptions(min_size=2, **opts), progress=False)
    assert [(e["key"], e["reason"]) for e in res.errors] == [("slice", "degenerate_shape")]  # size 1: always
