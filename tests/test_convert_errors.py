"""Every bad-input case of the converter, each with a real broken file: reported with file and reason, the rest
converted, exit status non-zero unless --allow-errors, nothing already written lost."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medmae.data.convert import ConvertOptions, convert, read_manifest, verify
from medmae.data.synthetic import make_phantom

SHAPE = (16, 16, 12)
AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])


def _save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> str:
    nib.save(nib.Nifti1Image(data, affine), path)
    return str(path)


def _good(folder: Path, name: str, seed: int = 0) -> dict:
    image, label = make_phantom(SHAPE, 2, seed=seed)
    return {
        "image": _save(folder / f"{name}.nii.gz", np.round(image[0]).astype(np.int16)),
        "label": _save(folder / f"{name}_seg.nii.gz", label),
    }


def _truncate(path: str, keep: float = 0.5) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep)])


def make_bad(kind: str, folder: Path) -> dict:
    """One datalist entry named ``bad`` broken in the way ``kind`` says."""
    entry = _good(folder, "bad", seed=1)
    image = np.asarray(nib.load(entry["image"]).dataobj)
    label = np.asarray(nib.load(entry["label"]).dataobj)
    if kind == "garbage_file":
        Path(entry["image"]).write_bytes(b"this is not a NIfTI file at all" * 10)
    elif kind == "truncated_nii_gz":
        _truncate(entry["image"])
    elif kind == "truncated_nii":
        entry["image"] = _save(folder / "bad.nii", image)
        _truncate(entry["image"], 0.6)
    elif kind == "truncated_nrrd":
        import nrrd

        entry["image"] = str(folder / "bad.nrrd")
        nrrd.write(entry["image"], image, {"encoding": "gzip"})
        _truncate(entry["image"], 0.5)
    elif kind == "missing_file":
        entry["image"] = str(folder / "does_not_exist.nii.gz")
    elif kind == "not_3d":
        _save(Path(entry["image"]), image[:, :, 0])
    elif kind == "nan_voxels":
        bad = image.astype(np.float32)
        bad[3, 4, 5] = np.nan
        bad[1, 1, 1] = np.inf
        _save(Path(entry["image"]), bad)
    elif kind == "label_shape":
        _save(Path(entry["label"]), label[:, :, :-2])
    elif kind == "label_geometry":
        shifted = AFFINE.copy()
        shifted[:3, 3] = 10.0
        _save(Path(entry["label"]), label, shifted)
    elif kind == "label_not_integer":
        _save(Path(entry["label"]), label.astype(np.float32) * 0.5)
    elif kind == "empty_volume":
        _save(Path(entry["image"]), np.zeros(SHAPE, dtype=np.int16))
    elif kind == "wrong_channels":
        _save(Path(entry["image"]), np.stack([image, image], axis=-1))
    else:
        raise AssertionError(kind)
    return entry


CASES = {
    "garbage_file": "unreadable",
    "truncated_nii_gz": "unreadable",
    "truncated_nii": "unreadable",
    "truncated_nrrd": "unreadable",
    "missing_file": "unreadable",
    "not_3d": "wrong_ndim",
    "nan_voxels": "non_finite",
    "label_shape": "label_mismatch",
    "label_geometry": "label_mismatch",
    "label_not_integer": "label_not_integer",
    "empty_volume": "empty",
    "wrong_channels": "wrong_channels",
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_bad_input_is_reported_and_rest_converted(tmp_path, kind):
    src = tmp_path / "src"
    src.mkdir()
    entries = [_good(src, "good0"), make_bad(kind, src), _good(src, "good1", seed=2)]
    dl = src / "datalist.json"
    dl.write_text(json.dumps({"training": entries}))
    out = tmp_path / "out"
    res = convert(dl, out, ConvertOptions(preset="ct", workers=0), progress=False)
    assert res.converted == 2 and len(res.errors) == 1 and not res.ok
    err = res.errors[0]
    key = "does_not_exist" if kind == "missing_file" else "bad"
    assert err["key"] == key and err["reason"] == CASES[kind], err
    assert key in err["message"]  # names the file
    logged = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert logged == [json.loads(json.dumps(err))]
    manifest = read_manifest(out)
    assert sorted(s["key"] for s in manifest["samples"]) == ["good0", "good1"]
    assert manifest["counts"]["errors"] == 1 and verify(out) == []


def test_duplicate_key_keeps_first(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    entries = [_good(tmp_path / "a", "case"), _good(tmp_path / "b", "case", seed=5)]
    dl = tmp_path / "datalist.json"
    dl.write_text(json.dumps({"training": entries}))
    res = convert(dl, tmp_path / "out", ConvertOptions(format="zarr", workers=0), progress=False)
    assert res.converted == 1 and [e["reason"] for e in res.errors] == ["duplicate_key"]
    assert read_manifest(tmp_path / "out")["samples"][0]["source"]["image"] == [entries[0]["image"]]


def test_not_2d_in_xray_csv(tmp_path):
    good = (make_phantom((32, 32), 2, kind="xray")[0][0] * 255).astype(np.uint8)
    _save(tmp_path / "ok.nii.gz", good[:, :, None], np.eye(4))
    _save(tmp_path / "vol.nii.gz", np.round(make_phantom(SHAPE, 2)[0][0]).astype(np.int16))
    (tmp_path / "x.csv").write_text("image,effusion\nok.nii.gz,1\nvol.nii.gz,0\n")
    res = convert(tmp_path / "x.csv", tmp_path / "out", ConvertOptions(preset="xray", workers=0), progress=False)
    assert res.converted == 1 and [(e["key"], e["reason"]) for e in res.errors] == [("vol", "wrong_ndim")]


def test_errors_do_not_touch_earlier_output(tmp_path):
    """A later run over more (partly broken) input keeps every shard written before, byte for byte."""
    src = tmp_path / "src"
    src.mkdir()
    entries = [_good(src, f"g{i}", seed=i) for i in range(2)]
    dl = src / "datalist.json"
    dl.write_text(json.dumps({"training": entries}))
    out = tmp_path / "out"
    assert convert(dl, out, ConvertOptions(workers=0), progress=False).ok
    before = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    entries.append(make_bad("truncated_nii_gz", src))
    with gzip.open(src / "g2.nii.gz", "wb") as f:  # gzip of garbage: passes the gzip layer, fails NIfTI parsing
        f.write(b"\0" * 100)
    entries.append({"image": str(src / "g2.nii.gz")})
    dl.write_text(json.dumps({"training": entries}))
    res = convert(dl, out, ConvertOptions(workers=0), progress=False)
    assert (res.converted, res.skipped, len(res.errors)) == (0, 2, 2)
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == before
    assert verify(out) == []
