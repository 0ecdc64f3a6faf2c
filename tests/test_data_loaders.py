"""Training and validation loaders over real converted datasets (tar shards and Zarr stores on disk)."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch

from medmae.config import from_dict
from medmae.data import DataConfig, build_train_loader, build_val_loader, read_manifest
from medmae.data.convert import ConvertOptions, convert
from medmae.data.convert.writers import iter_shard_samples
from medmae.data.crops import read_crop
from medmae.data.loaders import train_keys
from medmae.data.synthetic import make_phantom, write_phantom_dataset

SHAPE = (24, 24, 20)
NO_AUG = dict(flip_prob=0.0, rot90_prob=0.0, intensity_shift=0.0, intensity_scale=0.0)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """8 phantoms (6 train, 2 validation) as wds (one sample per shard) and as Zarr (8³ chunks)."""
    root = tmp_path_factory.mktemp("data")
    dl = write_phantom_dataset(root / "src", n=8, shape=SHAPE, num_classes=3)
    for fmt in ("wds", "zarr"):
        opts = ConvertOptions(format=fmt, preset="ct", shard_size_mb=0.01, zarr_chunk=8, workers=0)
        assert convert(dl, root / fmt, opts, progress=False).ok
    volumes = {
        s["key"]: s
        for sh in read_manifest(root / "wds")["shards"]
        for s in iter_shard_samples(root / "wds" / sh["name"])
    }
    return root, volumes


def cfg_for(root, fmt: str, **kw) -> DataConfig:
    base = dict(
        path=str(root / fmt),
        format=fmt,
        roi_size=(16, 16, 16),
        crops_per_volume=2,
        num_workers=0,
        samples_per_epoch=16,
        shuffle_buffer=2,
        crop_shuffle_buffer=4,
    )
    return DataConfig(**{**base, **kw})


def which_volume(crop: torch.Tensor, volumes: dict) -> str:
    """Key of the stored volume a whole-volume crop equals exactly."""
    hits = [k for k, v in volumes.items() if np.array_equal(crop.numpy(), v["image"].astype(np.float32))]
    assert len(hits) == 1
    return hits[0]


@pytest.mark.parametrize("fmt", ["wds", "zarr"])
def test_train_batches_shapes_dtypes_labels(datasets, fmt):
    root, _ = datasets
    loader = build_train_loader(cfg_for(root, fmt, crop="pos_neg", pos_fraction=1.0), batch_size=4, with_labels=True)
    batches = list(loader)
    assert len(batches) == len(loader) == 4
    for b in batches:
        assert b["image"].shape == (4, 1, 16, 16, 16) and b["image"].dtype == torch.float32
        assert b["label"].shape == (4, 1, 16, 16, 16) and b["label"].dtype == torch.int64
        assert set(b["label"].unique().tolist()) <= {0, 1, 2}
        assert (b["label"].flatten(1) > 0).any(dim=1).all()  # pos_fraction=1: every crop holds foreground
        assert -0.25 <= b["image"].min() and b["image"].max() <= 1.25  # ct window [0, 1] +- intensity aug


@pytest.mark.parametrize("fmt", ["wds", "zarr"])
def test_crops_equal_stored_voxels(datasets, fmt):
    """Without augmentation, a crop the size of the volume is the stored volume, exactly."""
    root, volumes = datasets
    cfg = cfg_for(root, fmt, roi_size=SHAPE, **NO_AUG)
    for b in build_train_loader(cfg, batch_size=2, with_labels=True):
        for img, lab in zip(b["image"], b["label"]):
            key = which_volume(img, volumes)
            np.testing.assert_array_equal(lab[0].numpy(), volumes[key]["label"])


def test_roi_larger_than_volume_is_padded(datasets):
    root, volumes = datasets
    cfg = cfg_for(root, "wds", roi_size=(24, 24, 24), **NO_AUG)
    b = next(iter(build_train_loader(cfg, batch_size=2)))
    assert b["image"].shape == (2, 1, 24, 24, 24)
    assert (b["image"][:, :, :, :, :2] == 0).all() and (b["image"][:, :, :, :, -2:] == 0).all()
    which_volume(b["image"][0, :, :, :, 2:-2], volumes)


def test_seed_and_epoch_drive_the_stream(datasets):
    root, _ = datasets
    cfg = cfg_for(root, "wds")

    def first(loader):
        return next(iter(loader))["image"]

    a, b = build_train_loader(cfg, batch_size=2, seed=1), build_train_loader(cfg, batch_size=2, seed=1)
    assert torch.equal(first(a), first(b))
    assert not torch.equal(first(build_train_loader(cfg, batch_size=2, seed=2)), first(a))
    loader = build_train_loader(cfg, batch_size=2, seed=1)
    e0 = [x["image"] for x in loader]
    e1 = [x["image"] for x in loader]
    assert loader.epoch == 2 and not torch.equal(e0[0], e1[0])
    loader.set_epoch(0)
    assert torch.equal(first(loader), e0[0])


@pytest.mark.parametrize("fmt", ["wds", "zarr"])
def test_ranks_read_disjoint_volumes(datasets, fmt):
    root, volumes = datasets
    cfg = cfg_for(root, fmt, roi_size=SHAPE, crops_per_volume=1, samples_per_epoch=24, **NO_AUG)
    seen = []
    for rank in range(2):
        loader = build_train_loader(cfg, batch_size=3, rank=rank, world_size=2, seed=0)
        seen.append({which_volume(img, volumes) for b in loader for img in b["image"]})
    train = {k for k, v in volumes.items() if v["meta"]["split"] == "train"}
    assert seen[0] and seen[1] and not seen[0] & seen[1] and seen[0] | seen[1] <= train


def test_workers_split_and_run(datasets):
    root, volumes = datasets
    cfg = cfg_for(root, "wds", roi_size=SHAPE, crops_per_volume=1, num_workers=2, samples_per_epoch=12, **NO_AUG)
    loader = build_train_loader(cfg, batch_size=2, seed=0)
    keys = {which_volume(img, volumes) for b in loader for img in b["image"]}
    assert len(list(loader)) == 6 and len(keys) >= 2


@pytest.mark.parametrize("fmt", ["wds", "zarr"])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_validation_every_volume_once_whole(datasets, fmt, world_size):
    root, volumes = datasets
    cfg = cfg_for(root, fmt, num_workers=1)
    per_rank = [[b for b in build_val_loader(cfg, rank=r, world_size=world_size)] for r in range(world_size)]
    keys = [b["key"] for bs in per_rank for b in bs]
    val = sorted(k for k, v in volumes.items() if v["meta"]["split"] == "validation")
    assert sorted(keys) == val and len(set(keys)) == len(keys)
    for b in (b for bs in per_rank for b in bs):
        assert b["image"].shape == (1, 1, *SHAPE) and b["label"].shape == (1, 1, *SHAPE)
        assert b["label"].dtype == torch.int64
        np.testing.assert_array_equal(b["image"][0].numpy(), volumes[b["key"]]["image"].astype(np.float32))
        assert b["meta"]["spacing"] == [1.5, 1.5, 2.0] and b["meta"]["key"] == b["key"]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_shards_skipped_and_counted(datasets, tmp_path, num_workers):
    root, _ = datasets
    broken = tmp_path / "wds"
    shutil.copytree(root / "wds", broken)
    shards = sorted(broken.glob("train-*.tar"))
    data = shards[0].read_bytes()
    shards[0].write_bytes(data[: len(data) // 2])  # truncated mid-sample
    shards[1].write_bytes(b"\x00garbage" * 1000)  # not a tar at all
    cfg = dataclasses.replace(cfg_for(root, "wds", num_workers=num_workers, samples_per_epoch=64), path=str(broken))
    loader = build_train_loader(cfg, batch_size=4, with_labels=True)
    assert len(list(loader)) == 16
    assert loader.stats["corrupt_shards"] > 0


def test_zarr_crop_reads_only_touched_chunks(datasets):
    import zarr
    from zarr.storage import LocalStore

    class RecordingStore(LocalStore):
        keys: list[str] = []

        async def get(self, key, prototype=None, byte_range=None):
            RecordingStore.keys.append(key)
            return await super().get(key, prototype, byte_range)

    root, volumes = datasets
    key = sorted(k for k, v in volumes.items() if v["meta"]["split"] == "train")[0]
    arr = zarr.open_group(store=RecordingStore(str(root / "zarr")), mode="r")[f"train/{key}/image"]
    RecordingStore.keys.clear()
    crop = read_crop(arr, (8, 8, 8), (8, 8, 8))  # exactly chunk (1, 1, 1) of 3x3x3
    np.testing.assert_array_equal(crop, volumes[key]["image"][:, 8:16, 8:16, 8:16])
    assert [k for k in RecordingStore.keys if "/c/" in k] == [f"train/{key}/image/c/0/1/1/1"]
    RecordingStore.keys.clear()
    read_crop(arr, (4, 4, 4), (8, 8, 8))  # straddles 2x2x2 chunks
    assert len([k for k in RecordingStore.keys if "/c/" in k]) == 8


def test_zarr_through_fsspec_url(datasets):
    root, volumes = datasets
    cfg = dataclasses.replace(cfg_for(root, "zarr", roi_size=SHAPE, **NO_AUG), path=f"file://{root / 'zarr'}")
    b = next(iter(build_train_loader(cfg, batch_size=2)))
    which_volume(b["image"][0], volumes)
    assert len(list(build_val_loader(cfg))) == 2


def test_train_subset(datasets):
    root, _ = datasets
    manifest = read_manifest(root / "wds")
    assert len(train_keys(cfg_for(root, "wds"), manifest)) == 6
    a = train_keys(cfg_for(root, "wds", train_count=2, subset_seed=0), manifest)
    assert len(a) == 2 and a == train_keys(cfg_for(root, "wds", train_count=2, subset_seed=0), manifest)
    assert len(train_keys(cfg_for(root, "wds", train_fraction=0.5), manifest)) == 3
    subsets = {tuple(train_keys(cfg_for(root, "wds", train_count=2, subset_seed=s), manifest)) for s in range(5)}
    assert len(subsets) > 1
    with pytest.raises(ValueError, match="data.train_count"):
        train_keys(cfg_for(root, "wds", train_count=7), manifest)


def test_config_validation_and_loader_errors(datasets):
    root, _ = datasets
    assert DataConfig().format == "wds"
    for bad, field in [
        (dict(roi_size=(96, 96)), "roi_size"),
        (dict(pos_fraction=1.5), "pos_fraction"),
        (dict(crop="resized"), "crop"),
        (dict(samples_per_epoch=0), "samples_per_epoch"),
    ]:
        with pytest.raises(ValueError, match=f"^{field}:"):
            DataConfig(**bad)
    with pytest.raises(ValueError, match="crop"):
        from_dict(DataConfig, {"crop": "bogus"})
    with pytest.raises(ValueError, match="data.path"):
        build_train_loader(DataConfig(), batch_size=2)
    with pytest.raises(ValueError, match="data.format"):
        build_train_loader(dataclasses.replace(cfg_for(root, "wds"), format="zarr"), batch_size=2)
    with pytest.raises(ValueError, match="data.samples_per_epoch"):
        build_train_loader(cfg_for(root, "wds"), batch_size=16, world_size=2)


def test_2d_classification_resized_crops(xray_shards):
    cfg = DataConfig(
        path=str(xray_shards),
        spatial_dims=2,
        roi_size=(32, 32),
        crop="resized",
        num_workers=0,
        samples_per_epoch=8,
        shuffle_buffer=2,
        crop_shuffle_buffer=2,
    )
    b = next(iter(build_train_loader(cfg, batch_size=4, with_labels=True)))
    assert b["image"].shape == (4, 1, 32, 32) and b["label"].shape == (4, 2) and b["label"].dtype == torch.float32
    v = next(iter(build_val_loader(cfg)))
    assert v["image"].shape == (1, 1, 48, 40) and v["label"].shape == (1, 2)


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
