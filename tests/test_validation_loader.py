"""Whole-volume validation reads over real converted datasets (tar shards, a Zarr store, an fsspec URL), the one
reader per storage format they share with training, and the synthetic phantoms the tests convert."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import PHANTOM_SHAPE

from medmae.data import DataConfig, build_val_loader, read_manifest
from medmae.data.storage import iter_shard_samples, npy_view
from medmae.data.synthetic import make_phantom


@pytest.fixture(scope="module")
def volumes(phantom_sets) -> dict:
    path = phantom_sets["ct"]
    return {s["key"]: s for sh in read_manifest(path)["shards"] for s in iter_shard_samples(path / sh["name"])}


@pytest.mark.parametrize("where", ["ct", "ct_zarr", "file_zarr"])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_validation_every_volume_once_whole(phantom_sets, volumes, where, world_size):
    path = f"file://{phantom_sets['ct_zarr']}" if where == "file_zarr" else str(phantom_sets[where])
    cfg = DataConfig(path=path, format="zarr" if "zarr" in where else "wds", num_workers=1)
    per_rank = [list(build_val_loader(cfg, rank=r, world_size=world_size)) for r in range(world_size)]
    keys = [b["key"] for bs in per_rank for b in bs]
    val = sorted(k for k, v in volumes.items() if v["meta"]["split"] == "validation")
    assert sorted(keys) == val and len(set(keys)) == len(keys)
    for b in (b for bs in per_rank for b in bs):
        assert b["image"].shape == (1, 1, *PHANTOM_SHAPE) and b["label"].shape == (1, 1, *PHANTOM_SHAPE)
        assert b["label"].dtype == torch.int64 and b["image"].dtype == torch.float32
        np.testing.assert_array_equal(b["image"][0].numpy(), volumes[b["key"]]["image"].astype(np.float32))
        np.testing.assert_array_equal(b["label"][0, 0].numpy(), volumes[b["key"]]["label"])
        assert b["meta"]["spacing"] == [1.5, 1.5, 2.0] and b["meta"]["key"] == b["key"]


def test_2d_classification_validation(xray_shards):
    cfg = DataConfig(path=str(xray_shards), spatial_dims=2, roi_size=(32, 32), num_workers=0)
    v = next(iter(build_val_loader(cfg)))
    assert v["image"].shape == (1, 1, 48, 40) and v["label"].shape == (1, 2) and v["label"].dtype == torch.float32


def test_loader_errors_name_the_key(phantom_sets):
    with pytest.raises(ValueError, match="data.path"):
        build_val_loader(DataConfig())
    with pytest.raises(ValueError, match="data.format"):
        build_val_loader(DataConfig(path=str(phantom_sets["ct"]), format="zarr"))
    with pytest.raises(ValueError, match="rank"):
        build_val_loader(DataConfig(path=str(phantom_sets["ct"])), rank=2, world_size=2)


def test_npy_member_reader_views_and_refuses_what_is_not_a_volume():
    import io

    a = np.arange(24, dtype=np.float16).reshape(2, 3, 4)
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    raw = np.frombuffer(buf.getvalue(), dtype=np.uint8).copy()
    view = npy_view(raw)
    np.testing.assert_array_equal(view, a)
    assert np.shares_memory(view, raw)  # a view, not a copy
    with pytest.raises(ValueError, match="truncated"):
        npy_view(raw[:-4])
    obj = io.BytesIO()
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickle"):
        npy_view(obj.getvalue())


@pytest.mark.parametrize("kind", ["ct", "mri"])
def test_phantom_structures_are_visible(kind):
    image, label = make_phantom((32, 32, 32), num_classes=4, channels=2, seed=0, kind=kind)
    assert image.shape == (2, 32, 32, 32) and image.dtype == np.float32 and label.dtype == np.uint8
    assert set(np.unique(label)) == {0, 1, 2, 3}
    for c in range(1, 4):  # each class differs from the body around it by far more than the noise
        assert abs(image[0][label == c].mean() - np.median(image[0][(label == 0) & (image[0] > image[0].min())])) > 50
    if kind == "ct":
        assert image.min() == -1000 and image.max() > 250  # air and bone outside the CT window
    else:
        assert image.min() == 0 and (image > 0).mean() < 0.9  # exactly-zero background for non-zero z-score


@pytest.mark.parametrize("where", ["ct", "ct_zarr"])
def test_selection_split_is_carved_from_training_disjoint_and_deterministic(phantom_sets, where):
    """data.select_count takes training volumes out of training and serves them as the 'selection' split: never
    trained on, never the validation split, the same whatever labelled subset a trial draws."""
    from medmae.data.sources import selection_keys, train_keys

    path = str(phantom_sets[where])
    manifest = read_manifest(path)
    fmt = "zarr" if "zarr" in where else "wds"
    train = {s["key"] for s in manifest["samples"] if s["split"] == "train"}
    val = {s["key"] for s in manifest["samples"] if s["split"] == "validation"}

    def cfg(**kw) -> DataConfig:
        return DataConfig(path=path, format=fmt, num_workers=0, select_count=2, **kw)

    chosen = selection_keys(cfg(), path, manifest)
    assert len(chosen) == 2 and set(chosen) <= train
    rest = train_keys(cfg(), path, manifest)
    assert not set(rest) & set(chosen) and set(rest) | set(chosen) == train  # carved out of training, nothing lost
    for subset_seed, count in ((0, 1), (3, 2), (7, None)):  # the labelled subset is drawn from what is left
        c = cfg(subset_seed=subset_seed, train_count=count)
        assert selection_keys(c, path, manifest) == chosen
        assert set(train_keys(c, path, manifest)) <= set(rest)
    assert {tuple(selection_keys(cfg(select_seed=s), path, manifest)) for s in range(6)} != {tuple(chosen)}
    served = [b["key"] for b in build_val_loader(cfg(), split="selection")]
    assert sorted(served) == chosen and not set(served) & val
    assert sorted(b["key"] for b in build_val_loader(cfg())) == sorted(val)  # validation is untouched
    fraction = DataConfig(path=path, format=fmt, num_workers=0, select_fraction=0.5)
    assert len(selection_keys(fraction, path, manifest)) == round(0.5 * len(train))

    with pytest.raises(ValueError, match="data.train_subset: .* is in the selection split"):
        train_keys(cfg(train_subset=[chosen[0]]), path, manifest)
    assert train_keys(cfg(train_subset=[rest[1]]), path, manifest) == [rest[1]]
    with pytest.raises(ValueError, match="data.select_count: 6 volumes .* would leave none"):
        selection_keys(DataConfig(path=path, format=fmt, select_count=len(train)), path, manifest)
    with pytest.raises(ValueError, match="data.select_count"):
        build_val_loader(DataConfig(path=path, format=fmt), split="selection")
