"""``build_train_stream`` over real converted datasets: batches on the device, refill across epochs, exact
restarts from ``state_dict``, the stream position across a crash, several weighted datasets, the memory budget."""

from __future__ import annotations

import collections
import json
import shutil

import numpy as np
import pytest
import torch

from medmae.config import from_dict
from medmae.data import DataConfig, build_train_stream, read_manifest
from medmae.data.sources import SkipCounters, VolumeSource, resolve_sources, train_keys
from medmae.data.storage import iter_shard_samples
from medmae.data.stream import resident_budget_bytes

SHAPE = (24, 24, 20)
NO_AUG = dict(flip_prob=0.0, rot90_prob=0.0, intensity_shift=0.0, intensity_scale=0.0)
STREAMING = 1e-4  # GiB: 3-4 of the 6 training volumes, so the set streams and refills instead of holding all


@pytest.fixture(scope="module")
def data(phantom_sets):
    return phantom_sets


def build(cfg: DataConfig, **kw):
    """``build_train_stream`` on the CPU unless a test says otherwise (these tests read batches back as arrays)."""
    return build_train_stream(cfg, **{"device": "cpu", **kw})


def cfg_for(path, **kw) -> DataConfig:
    fmt = "zarr" if str(path).endswith("zarr") else "wds"
    base = dict(path=str(path), format=fmt, roi_size=(16, 16, 16), num_workers=0, resident_reuse=2.0)
    return DataConfig(**{**base, **kw})


def take(stream, n: int) -> list[dict]:
    return [next(stream) for _ in range(n)]


def stored(path) -> dict:
    return {s["key"]: s for sh in read_manifest(path)["shards"] for s in iter_shard_samples(path / sh["name"])}


@pytest.mark.parametrize("name", ["ct", "ct_zarr"])
def test_batches_on_device_with_labels(data, name):
    cfg = cfg_for(data[name], crop="pos_neg", pos_fraction=1.0)
    stream = build(cfg, batch_size=4, with_labels=True, device="cpu", dtype=torch.bfloat16)
    for b in take(stream, 3):
        assert b["image"].shape == (4, 1, 16, 16, 16) and b["image"].dtype == torch.bfloat16
        assert b["label"].shape == (4, 1, 16, 16, 16) and b["label"].dtype == torch.int64
        assert set(b["label"].unique().tolist()) <= {0, 1, 2}
        assert (b["label"].flatten(1) > 0).any(dim=1).all()  # pos_fraction=1: every crop holds foreground
        assert -0.25 <= b["image"].min() and b["image"].max() <= 1.25  # ct window [0, 1] +- intensity aug
    s = stream.stats()
    assert s[f"crops/{name}"] == 12 and s["batches"] == 3 and s["corrupt_shards"] == 0
    stream.close()


def which_volume(crop: torch.Tensor, volumes: dict) -> str:
    """Key of the stored volume a whole-volume crop equals exactly."""
    hits = [k for k, v in volumes.items() if np.array_equal(crop.numpy(), v["image"].astype(np.float32))]
    assert len(hits) == 1
    return hits[0]


@pytest.mark.parametrize("path", ["ct", "ct_zarr", "file_zarr"])
def test_crops_are_the_stored_voxels(data, path):
    """A crop the size of the volume, without augmentation, is a stored volume and its label, exactly (shards, a
    Zarr store, and the Zarr store through an fsspec URL)."""
    volumes = stored(data["ct"])
    where = f"file://{data['ct_zarr']}" if path == "file_zarr" else str(data[path])
    cfg = cfg_for(where, format="zarr" if "zarr" in path else "wds", roi_size=SHAPE, **NO_AUG)
    stream = build(cfg, batch_size=3, with_labels=True)
    for b in take(stream, 4):
        for img, lab in zip(b["image"], b["label"]):
            np.testing.assert_array_equal(lab[0].numpy(), volumes[which_volume(img, volumes)]["label"])


def test_roi_larger_than_volume_is_padded(data):
    volumes = stored(data["ct"])
    b = next(build(cfg_for(data["ct"], roi_size=(24, 24, 24), **NO_AUG), batch_size=2))
    assert b["image"].shape == (2, 1, 24, 24, 24)
    assert (b["image"][:, :, :, :, :2] == 0).all() and (b["image"][:, :, :, :, -2:] == 0).all()
    which_volume(b["image"][0, :, :, :, 2:-2], volumes)


def test_the_seed_drives_the_stream(data):
    cfg = cfg_for(data["ct"], flip_prob=0.5)
    a, b, c = (next(build(cfg, batch_size=2, seed=s))["image"] for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_streaming_ranks_read_disjoint_volumes(data):
    """Streaming, the ranks split each epoch's shards (all resident, every rank holds all volumes): the first fill
    of each rank is its share of epoch 0."""
    volumes = stored(data["ct"])
    seen = []
    for rank in range(2):
        cfg = cfg_for(data["ct"], roi_size=SHAPE, resident_gib=STREAMING, **NO_AUG)
        stream = build(cfg, batch_size=1, rank=rank, world_size=2)
        take(stream, 1)
        seen.append({stream.resident.keys[s] for s in stream.resident.fifo})
        stream.close()
    train = {k for k, v in volumes.items() if v["meta"]["split"] == "train"}
    assert seen[0] and seen[1] and not seen[0] & seen[1] and seen[0] | seen[1] <= train


def test_train_subset(data):
    manifest, path = read_manifest(data["ct"]), str(data["ct"])
    assert len(train_keys(cfg_for(path), path, manifest)) == 6
    a = train_keys(cfg_for(path, train_count=2, subset_seed=0), path, manifest)
    assert len(a) == 2 and a == train_keys(cfg_for(path, train_count=2, subset_seed=0), path, manifest)
    assert len(train_keys(cfg_for(path, train_fraction=0.5), path, manifest)) == 3
    subsets = {tuple(train_keys(cfg_for(path, train_count=2, subset_seed=s), path, manifest)) for s in range(5)}
    assert len(subsets) > 1
    with pytest.raises(ValueError, match="data.train_count"):
        train_keys(cfg_for(path, train_count=7), path, manifest)
    stream = build(cfg_for(path, train_count=2, subset_seed=0), batch_size=2)
    assert sorted(stream.sources[0].keys) == a


def test_refill_across_epochs_with_one_persistent_loader(data):
    """Workers are started once and stream on across epochs; every training volume passes through the set."""
    cfg = cfg_for(data["ct"], num_workers=2, resident_reuse=1.0, resident_gib=STREAMING)
    stream = build(cfg, batch_size=2, device="cpu")
    assert stream.whole is None
    seen = set()
    take(stream, 1)
    it, pids = stream._it, sorted(w.pid for w in stream._it._workers)
    assert not it._pin_memory  # pinned hand-over only when the target is CUDA
    for _ in range(20):
        next(stream)
        seen |= {stream.resident.keys[s] for s in stream.resident.fifo}
        assert stream.resident.used_bytes() <= stream.resident.nbytes
    s = stream.stats()
    assert stream._it is it and sorted(w.pid for w in it._workers) == pids
    assert len(seen) == 6 and s["evictions"] > 0 and s["epoch/ct"] >= 3
    assert s["refills"] == s["resident_volumes"] + s["evictions"]
    stream.close()


@pytest.mark.parametrize(
    ("name", "workers", "gib"), [("ct", 0, STREAMING), ("ct", 2, STREAMING), ("ct_zarr", 2, STREAMING), ("ct", 2, 0.0)]
)
def test_state_dict_restores_identical_batches(data, name, workers, gib):
    cfg = cfg_for(data[name], num_workers=workers, crop="pos_neg", flip_prob=0.3, rot90_prob=0.3, resident_gib=gib)
    a = build(cfg, batch_size=3, seed=7, with_labels=True)
    take(a, 5)
    state = json.loads(json.dumps(a.state_dict()))  # JSON-safe
    ref = take(a, 6)
    b = build(cfg, batch_size=3, seed=7, with_labels=True)
    b.load_state_dict(state)
    assert b.state_dict() == state  # restored, not yet started
    got = take(b, 6)
    for x, y in zip(ref, got):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
    assert b.stats()["crops/" + name] == a.stats()["crops/" + name]
    assert b.stats()["refills"] == a.stats()["refills"]
    with pytest.raises(RuntimeError, match="before the first batch"):
        b.load_state_dict(state)


def test_all_volumes_resident_when_they_fit(data):
    """Within the budget every training volume is loaded once, on every rank; no refills, no workers left."""
    volumes = stored(data["ct"])
    train = {k for k, v in volumes.items() if v["meta"]["split"] == "train"}
    for rank in range(2):
        stream = build(cfg_for(data["ct"], num_workers=2), batch_size=2, rank=rank, world_size=2)
        take(stream, 5)
        assert {stream.resident.keys[s] for s in stream.resident.fifo} == train and len(stream.resident) == 6
        assert stream._it is None and stream.stats()["refills"] == 6 and stream.stats()["evictions"] == 0


def shard_counts(stream, n: int, counts: collections.Counter, shard_of: dict) -> None:
    """Advance ``n`` batches, counting every volume the resident set takes in by its shard."""
    insert = stream.resident.insert

    def counting(item, **kw):
        if "preload" not in item:
            counts[shard_of[item["key"]]] += 1
        return insert(item, **kw)

    stream.resident.insert = counting
    take(stream, n)


def test_stream_position_survives_a_crash(data):
    """Per-shard volume counts of a run killed at batch 13 and resumed equal an uninterrupted run's."""
    shard_of = {s["key"]: s["shard"] for s in read_manifest(data["ct"])["samples"]}
    cfg = cfg_for(data["ct"], num_workers=2, resident_reuse=1.5, resident_gib=STREAMING)
    whole, crashed = collections.Counter(), collections.Counter()
    shard_counts(build(cfg, batch_size=2, seed=3), 30, whole, shard_of)
    first = build(cfg, batch_size=2, seed=3)
    shard_counts(first, 13, crashed, shard_of)
    state = json.loads(json.dumps(first.state_dict()))
    del first  # the crash
    resumed = build(cfg, batch_size=2, seed=3)
    resumed.load_state_dict(state)
    shard_counts(resumed, 17, crashed, shard_of)
    train_shards = {s["shard"] for s in read_manifest(data["ct"])["samples"] if s["split"] == "train"}
    assert crashed == whole and set(whole) == train_shards


def test_restore_after_a_resize_or_with_other_data(data):
    """An elastic resize continues at the next epoch; a changed dataset list starts fresh streams; neither fails."""
    cfg = cfg_for(data["ct"], num_workers=2, resident_gib=STREAMING)
    a = build(cfg, batch_size=2, rank=1, world_size=2)
    take(a, 10)
    state = json.loads(json.dumps(a.state_dict()))
    begun = max(p["datasets"][0][0] for p in state["positions"].values())
    b = build(cfg, batch_size=2, rank=0, world_size=1)
    b.load_state_dict(state)
    take(b, 1)
    assert min(p["datasets"][0][0] for p in b.positions.values()) >= begun + 1 and b.stats()["batches"] == 11
    c = build(cfg_for(data["ct2"], num_workers=2, resident_gib=STREAMING), batch_size=2, rank=1, world_size=2)
    c.load_state_dict(state)
    take(c, 1)
    assert c.stats()["batches"] == 11 and c.stats()["epoch/ct2"] == 0


def test_volume_source_continues_from_any_position(data):
    """The volume sequence after restarting from item k's position is the uninterrupted sequence's tail, also
    inside a shard of several samples and across epochs (two datasets, weighted)."""
    cfg = from_dict(
        DataConfig,
        {"datasets": [{"path": str(data["ct"]), "weight": 2.0}, {"path": str(data["ct2"])}], "roi_size": [16, 16, 16]},
    )
    sources = resolve_sources(cfg, with_labels=False)
    assert max(len(u[1]) for s in sources for u in s.units) >= 2

    def source():
        return VolumeSource(cfg, sources, rank=0, world_size=1, seed=4, with_labels=False, counters=SkipCounters())

    items = [(it["dataset"], it["key"], it["pos"]) for _, it in zip(range(40), source())]
    assert {d for d, _, _ in items} == {0, 1} and max(p["datasets"][0][0] for _, _, p in items) >= 2
    for k in (0, 5, 17):
        src = source()
        src.start = {0: items[k][2]}
        tail = [(it["dataset"], it["key"]) for _, it in zip(range(40 - k - 1), src)]
        assert tail == [(d, key) for d, key, _ in items[k + 1 :]]


@pytest.mark.parametrize("gib", [0.0, 2 * STREAMING])
def test_datasets_by_weight(data, gib):
    """Crops follow the weights, whether all volumes are resident (weights per crop) or streamed (per volume)."""
    datasets = [{"path": str(data["ct"]), "weight": 3.0}, {"path": str(data["ct2"]), "weight": 1.0}]
    cfg = from_dict(
        DataConfig,
        {"datasets": datasets, "roi_size": [16, 16, 16], "num_workers": 0, "resident_reuse": 2.0, "resident_gib": gib},
    )
    share = []
    for rank in range(2):
        stream = build(cfg, batch_size=8, rank=rank, world_size=2, seed=0)
        take(stream, 150)
        assert (stream.whole is None) == (gib > 0)
        s = stream.stats()
        share.append(s["crops/ct"] / (s["crops/ct"] + s["crops/ct2"]))
    assert all(abs(x - 0.75) < 0.07 for x in share), share


def test_datasets_must_agree(data):
    def cfg(*names, **kw):
        return from_dict(DataConfig, {"datasets": [{"path": str(data[n])} for n in names], **kw})

    for other, field in [("mri2", "channels"), ("ct2_spacing", "preprocessing.spacing")]:
        with pytest.raises(ValueError, match=field) as e:
            resolve_sources(cfg("ct", other), with_labels=False)
        assert str(data["ct"]) in str(e.value) and str(data[other]) in str(e.value)
    assert len(resolve_sources(cfg("ct", "ct2_spacing", allow_mixed_spacing=True), with_labels=False)) == 2
    with pytest.raises(ValueError, match="data.format"):
        resolve_sources(cfg("ct", "ct_zarr"), with_labels=False)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"datasets": [{"path": "a", "wieght": 1.0}]}, "datasets\\[0\\].wieght"),
        ({"datasets": [{"path": "a", "weight": -1.0}]}, "datasets\\[0\\].weight"),
        ({"datasets": [{"path": "a"}, {"path": "a"}]}, "datasets"),
        ({"path": "b", "datasets": [{"path": "a"}]}, "datasets"),
        ({"loader": "resident"}, "config key 'loader' was removed"),
        ({"samples_per_epoch": 64}, "config key 'samples_per_epoch' was removed"),
        ({"resident_reuse": 0.5}, "resident_reuse"),
        ({"resident_gib": -1.0}, "resident_gib"),
    ],
)
def test_config_errors_name_the_key(bad, match):
    with pytest.raises(ValueError, match=match):
        from_dict(DataConfig, bad)


def test_stream_errors_name_the_key(data, xray_shards):
    with pytest.raises(ValueError, match="data.path"):
        build(DataConfig(), batch_size=2)
    with pytest.raises(ValueError, match="data.format"):
        build(cfg_for(data["ct"], format="zarr"), batch_size=2)
    with pytest.raises(ValueError, match="data.spatial_dims"):
        build(DataConfig(path=str(data["ct"]), spatial_dims=2, roi_size=(16, 16)), batch_size=2)
    with pytest.raises(ValueError, match="data.crop: 'pos_neg' needs a segmentation dataset"):
        build(DataConfig(path=str(xray_shards), spatial_dims=2, roi_size=(16, 16), crop="pos_neg"), batch_size=2)


def test_memory_budget(data):
    cfg = cfg_for(data["ct"], resident_gib=40e3 / 2**30)  # 40 kB: room for one volume and a bit (per_vox 3 B)
    stream = build(cfg, batch_size=2, with_labels=True)
    take(stream, 6)
    r = stream.resident
    assert r.nbytes <= 40e3 and len(r) == 1 and stream.stats()["evictions"] >= 5
    with pytest.raises(ValueError, match="data.resident_gib"):
        build(cfg_for(data["ct"], resident_gib=1e-6), batch_size=2)
    ram = __import__("os").sysconf("SC_PAGE_SIZE") * __import__("os").sysconf("SC_PHYS_PAGES")
    assert resident_budget_bytes(DataConfig(), torch.device("cpu"), 2) == ram // 4 // 2
    assert resident_budget_bytes(DataConfig(resident_gib=1.5), torch.device("cpu"), 2) == int(1.5 * 2**30)


def test_corrupt_shards_skipped_and_counted(data, tmp_path):
    broken = tmp_path / "ct"
    shutil.copytree(data["ct"], broken)
    shards = sorted(broken.glob("train-*.tar"))
    raw = shards[0].read_bytes()
    shards[0].write_bytes(raw[: len(raw) // 2])
    shards[1].write_bytes(b"\x00garbage" * 1000)
    stream = build(cfg_for(broken, num_workers=2, resident_gib=STREAMING), batch_size=2, with_labels=True)
    take(stream, 10)
    assert stream.stats()["corrupt_shards"] > 0
    whole = build(cfg_for(broken, num_workers=2), batch_size=2, with_labels=True)  # read by key
    take(whole, 2)
    assert whole.stats()["corrupt_samples"] >= 2 and len(whole.resident) <= 4


def test_2d_resized_classification(xray_shards):
    cfg = DataConfig(path=str(xray_shards), spatial_dims=2, roi_size=(32, 32), crop="resized", num_workers=0)
    b = next(build(cfg, batch_size=4, with_labels=True))
    assert b["image"].shape == (4, 1, 32, 32) and b["label"].shape == (4, 2) and b["label"].dtype == torch.float32
    assert set(b["label"].flatten().tolist()) <= {0.0, 1.0}
