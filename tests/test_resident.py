"""The resident crop path against references: the same crop and augmentation operators (exactly, per parameter set,
against MONAI's transforms) and the same distributions as MONAI's per-crop transforms, the documented label-balanced
rule and torchvision's RandomResizedCrop (two-sample tests over many draws)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy import stats

from medmae.data import DataConfig
from medmae.data.resident import ResidentSet
from medmae.data.sampling import CropParams, CropSampler
from medmae.data.sources import pad_to_roi

ROI = (8, 8, 8)
NO_AUG = dict(flip_prob=0.0, rot90_prob=0.0, intensity_shift=0.0, intensity_scale=0.0)


def resident_with(volumes: list[tuple], cfg: DataConfig, gather: str = "slices", label: str | None = None):
    """A CPU resident set holding ``volumes`` [(image (C, *S), label or None, fg (N, D))], padded as the workers
    pad them."""
    c = volumes[0][0].shape[0]
    res = ResidentSet(
        capacity=sum(int(np.prod(np.maximum(v[0].shape[1:], cfg.roi_size))) for v in volumes) + 64,
        channels=c,
        spatial_dims=cfg.spatial_dims,
        roi=cfg.roi_size,
        device=torch.device("cpu"),
        label=label,
        max_slots=len(volumes) + 1,
        max_fg=64,
        gather=gather,
        resized=cfg.crop == "resized",
    )
    for i, (image, lab, fg) in enumerate(volumes):
        if cfg.crop != "resized":
            image, lab, fg = pad_to_roi(image, lab, fg, cfg.roi_size)
        item = {"image": torch.from_numpy(image), "fg": fg, "dataset": 0, "key": f"v{i}"}
        if lab is not None:
            item["label"] = torch.from_numpy(lab)
        res.insert(item)
    return res


def new_crops(res: ResidentSet, cfg: DataConfig, n: int, seed: int = 0, batch: int = 50) -> list[dict]:
    sampler = CropSampler(cfg, seed, 0)
    out = []
    for _ in range(n // batch):
        p = sampler.draw(batch, res.live(), res.shape, res.fg, res.nfg)
        b = res.crop(p)
        out += [{k: v[i] for k, v in b.items()} for i in range(batch)]
    return out


def reference_crops(cfg: DataConfig, image, fg, n: int, seed: int = 0) -> list[dict]:
    """``n`` crops of one volume as the per-crop path documents them: the volume zero-padded to the ROI
    (``pad_to_roi``), then a uniform start (MONAI's ``RandSpatialCrop``) or, with ``pos_neg``, a start centred on a
    uniformly drawn foreground point with probability ``pos_fraction`` and clipped into the volume (MONAI's
    ``correct_crop_centers``); then MONAI's flips, rot90 and intensity transforms; ``resized``: torchvision's
    ``RandomResizedCrop``. Each crop is ``{"image": (C, *roi) float32}``."""
    import torchvision.transforms.v2 as tv
    from monai.transforms import (
        Compose,
        RandFlip,
        RandRotate90,
        RandScaleIntensity,
        RandShiftIntensity,
        RandSpatialCrop,
    )

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    img = torch.from_numpy(np.asarray(image, dtype=np.float32))
    if cfg.crop == "resized":
        crop = tv.RandomResizedCrop(cfg.roi_size, scale=(cfg.resized_min_scale, 1.0), antialias=True)
        return [{"image": crop(img)} for _ in range(n)]
    padded, _, fg = pad_to_roi(np.asarray(image), None, np.asarray(fg), cfg.roi_size)
    img = torch.from_numpy(padded.astype(np.float32))
    ts = [RandFlip(prob=cfg.flip_prob, spatial_axis=d) for d in range(cfg.spatial_dims)]
    if cfg.roi_size[0] == cfg.roi_size[1]:
        ts.append(RandRotate90(prob=cfg.rot90_prob, max_k=3, spatial_axes=(0, 1)))
    ts += [
        RandShiftIntensity(offsets=cfg.intensity_shift, prob=cfg.intensity_prob if cfg.intensity_shift else 0.0),
        RandScaleIntensity(factors=cfg.intensity_scale, prob=cfg.intensity_prob if cfg.intensity_scale else 0.0),
    ]
    augment = Compose(ts).set_random_state(seed=seed)
    uniform = RandSpatialCrop(cfg.roi_size, random_size=False).set_random_state(seed=seed + 1)
    out = []
    for _ in range(n):
        if cfg.crop == "pos_neg" and len(fg) and rng.random() < cfg.pos_fraction:
            centre = fg[rng.integers(len(fg))]
            start = [int(np.clip(c - r // 2, 0, s - r)) for c, r, s in zip(centre, cfg.roi_size, padded.shape[1:])]
            box = (slice(None), *(slice(a, a + r) for a, r in zip(start, cfg.roi_size)))
            crop = img[box]
        else:
            crop = uniform(img)
        out.append({"image": torch.as_tensor(augment(crop))})
    return out


def coordinate_volume(shape) -> np.ndarray:
    """Channel d holds 1 + the voxel's coordinate along axis d (0 only in padding): a crop tells where it came
    from and how it was flipped or turned."""
    grids = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    return np.stack([g + 1 for g in grids]).astype(np.float16)


def signature(crop: torch.Tensor) -> tuple:
    """(x start, y start, z profile, dihedral element of the (x, y) plane) of a coordinate-volume crop."""
    c = crop.float().numpy()
    k = c.shape[-1] // 2
    corner = (int(c[0, 0, 0, k] == c[0].max()), int(c[1, 0, 0, k] == c[1].max()))
    along0 = int(c[0, 1, 0, k] != c[0, 0, 0, k])
    return (
        int(c[0][c[0] > 0].min()) - 1,
        int(c[1][c[1] > 0].min()) - 1,
        tuple(c[2, 0, 0].astype(int)),
        (*corner, along0),
    )


def same_distribution(a: list, b: list) -> float:
    """p-value of a chi-square test that two samples of a discrete variable come from one distribution."""
    keys = sorted(set(a) | set(b), key=str)
    table = np.array([[a.count(k) for k in keys], [b.count(k) for k in keys]])
    if table.shape[1] == 1:
        return 1.0
    return stats.chi2_contingency(table)[1]


@pytest.mark.parametrize("gather", ["slices", "index"])
@pytest.mark.parametrize("roi", [(8, 8, 8), (8, 6, 4)])
def test_every_flip_and_turn_matches_monai(gather, roi):
    """Each (flip0, flip1, flip2, k) and intensity pair gives exactly MONAI's Flip/Rotate90/Shift/Scale result,
    image and label alike, for both gather kernels."""
    from monai.transforms import Flip, Rotate90, ScaleIntensity, ShiftIntensity

    rng = np.random.default_rng(0)
    image = rng.normal(size=(2, 12, 11, 10)).astype(np.float16)
    label = rng.integers(0, 5, (12, 11, 10)).astype(np.uint8)
    cfg = DataConfig(roi_size=roi)
    res = resident_with([(image, label, np.zeros((0, 3), np.int32))], cfg, gather, label="segmentation")
    turns = range(4) if roi[0] == roi[1] else [0]
    combos = [(f0, f1, f2, k) for f0 in (0, 1) for f1 in (0, 1) for f2 in (0, 1) for k in turns]
    b = len(combos)
    starts = np.stack(
        [rng.integers(0, 13 - roi[0], b), rng.integers(0, 12 - roi[1], b), rng.integers(0, 11 - roi[2], b)], 1
    )
    shift, factor = rng.uniform(-0.1, 0.1, b), rng.uniform(-0.1, 0.1, b)
    p = CropParams(
        np.zeros(b, np.int64),
        starts,
        None,
        np.array([c[:3] for c in combos], bool),
        np.array([c[3] for c in combos]),
        (1 + factor).astype(np.float32),
        (shift * (1 + factor)).astype(np.float32),
    )
    out = res.crop(p)
    for i, (f0, f1, f2, k) in enumerate(combos):
        box = tuple(slice(a, a + r) for a, r in zip(starts[i], roi))
        img = torch.from_numpy(image[(slice(None), *box)].astype(np.float32))
        lab = torch.from_numpy(label[box].astype(np.int64))[None]
        for d, f in enumerate((f0, f1, f2)):
            if f:
                img, lab = Flip(spatial_axis=d)(img), Flip(spatial_axis=d)(lab)
        if k:
            img, lab = Rotate90(k, (0, 1))(img), Rotate90(k, (0, 1))(lab)
        img = ScaleIntensity(minv=None, maxv=None, factor=factor[i])(ShiftIntensity(shift[i])(img))
        torch.testing.assert_close(out["image"][i], torch.as_tensor(img), rtol=1e-6, atol=1e-6)
        assert torch.equal(out["label"][i], torch.as_tensor(lab))


def test_positions_and_flips_distributed_as_monai():
    """Start positions (x, y uniform; z centred in padding), flips of each axis and the 8 dihedral results of
    flip + rot90 follow the same distributions as MONAI's per-crop transforms (2 x 3000 crops)."""
    cfg = DataConfig(roi_size=ROI, flip_prob=0.3, rot90_prob=0.5, intensity_shift=0.0, intensity_scale=0.0)
    image = coordinate_volume((20, 14, 6))  # z smaller than the ROI: centred and padded
    new = [signature(c["image"]) for c in new_crops(resident_with([(image, None, np.zeros((0, 3)))], cfg), cfg, 3000)]
    old = [signature(c["image"]) for c in reference_crops(cfg, image, np.zeros((0, 3)), 3000)]
    for j, name in enumerate(["x start", "y start", "z profile", "dihedral"]):
        a, b = [s[j] for s in new], [s[j] for s in old]
        assert same_distribution(a, b) > 1e-3, name
    assert sorted({s[0] for s in new}) == list(range(13)) and sorted({s[1] for s in new}) == list(range(7))
    zflip = np.mean([s[2][1] > s[2][2] for s in new])  # padded profile 0,1..6,0 reversed when flipped
    assert abs(zflip - 0.3) < 0.03
    identity = np.mean([s[3] == (0, 0, 1) for s in new])  # P(no net change) = P(f0=f1, k matching): by MONAI
    assert abs(identity - np.mean([s[3] == (0, 0, 1) for s in old])) < 0.04


def test_label_balanced_positions_distributed_as_the_rule():
    rng = np.random.default_rng(1)
    shape = (30, 20, 16)
    fg = np.concatenate([rng.integers(0, 4, (40, 1)), rng.integers(0, 20, (40, 1)), rng.integers(0, 16, (40, 1))], 1)
    cfg = DataConfig(roi_size=ROI, crop="pos_neg", pos_fraction=0.7, **NO_AUG)
    image = coordinate_volume(shape)
    new = [signature(c["image"])[:2] for c in new_crops(resident_with([(image, None, fg)], cfg), cfg, 3000)]
    old = [signature(c["image"])[:2] for c in reference_crops(cfg, image, fg, 3000)]
    assert same_distribution([s[0] for s in new], [s[0] for s in old]) > 1e-3
    assert same_distribution([s[1] for s in new], [s[1] for s in old]) > 1e-3
    near = np.mean([s[0] == 0 for s in new])  # fg x in [0, 4) -> centred start clipped to 0
    assert abs(near - (0.7 + 0.3 / 23)) < 0.03


def test_intensity_augmentation_distributed_as_monai():
    cfg = DataConfig(
        roi_size=ROI,
        flip_prob=0.0,
        rot90_prob=0.0,
        intensity_shift=0.2,
        intensity_scale=0.3,
        intensity_prob=0.4,
    )
    image = np.ones((1, 10, 10, 10), np.float16)
    new = np.array(
        [
            float(c["image"][0, 0, 0, 0])
            for c in new_crops(resident_with([(image, None, np.zeros((0, 3)))], cfg), cfg, 3000)
        ]
    )
    old = np.array([float(c["image"][0, 0, 0, 0]) for c in reference_crops(cfg, image, np.zeros((0, 3)), 3000)])
    assert stats.ks_2samp(new, old).pvalue > 1e-3
    assert abs(np.mean(new == 1.0) - 0.6**2) < 0.03  # neither shift nor scale applied
    assert new.min() >= (1 - 0.2) * (1 - 0.3) - 1e-6 and new.max() <= (1 + 0.2) * (1 + 0.3) + 1e-6


def test_resized_boxes_distributed_as_torchvision():
    cfg = DataConfig(spatial_dims=2, roi_size=(16, 16), crop="resized", resized_min_scale=0.2, **NO_AUG)
    image = coordinate_volume((64, 40))
    res = resident_with([(image, None, np.zeros((0, 2)))], cfg)
    new = new_crops(res, cfg, 2000)
    old = reference_crops(cfg, image, np.zeros((0, 2)), 2000)
    assert new[0]["image"].shape == old[0]["image"].shape == (2, 16, 16)
    for ch in (0, 1):  # mean coordinate ~ box centre, spread ~ box size
        for f in (lambda t: t.mean(), lambda t: t.max() - t.min()):
            a = [float(f(c["image"][ch])) for c in new]
            b = [float(f(c["image"][ch])) for c in old]
            assert stats.ks_2samp(a, b).pvalue > 1e-3


def test_2d_random_crops_pad_and_flip_like_3d():
    cfg = DataConfig(
        spatial_dims=2,
        roi_size=(8, 8),
        flip_prob=0.5,
        rot90_prob=0.5,
        intensity_shift=0.0,
        intensity_scale=0.0,
    )
    image = coordinate_volume((12, 6))  # second axis padded
    for gather in ("slices", "index"):
        res = resident_with([(image, None, np.zeros((0, 2)))], cfg, gather)
        new = new_crops(res, cfg, 400)
        assert new[0]["image"].shape == (2, 8, 8)
        # every crop is the padded volume's box up to a flip/turn: same multiset of values as an unaugmented one
        for c in new[:50]:
            x0 = int(c["image"][0][c["image"][0] > 0].min()) - 1
            ref = np.pad(image, ((0, 0), (0, 0), (1, 1)))[:, x0 : x0 + 8]
            assert sorted(c["image"].flatten().tolist()) == sorted(ref.astype(np.float32).flatten().tolist())


def test_sampler_reproducible_and_restorable():
    import json

    cfg = DataConfig(roi_size=ROI, crop="pos_neg", flip_prob=0.3, rot90_prob=0.3)
    shapes, fg, nfg = np.full((3, 3), 20), np.ones((3, 4, 3), np.int32) * 9, np.array([4, 0, 2])
    live = np.arange(3)
    a, b = CropSampler(cfg, 5, 1), CropSampler(cfg, 5, 1)
    a.draw(8, live, shapes, fg, nfg)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    pa, pb = a.draw(8, live, shapes, fg, nfg), b.draw(8, live, shapes, fg, nfg)
    for f in dataclasses.fields(CropParams):
        if getattr(pa, f.name) is not None:
            assert np.array_equal(getattr(pa, f.name), getattr(pb, f.name)), f.name
    other = CropSampler(cfg, 5, 2).draw(8, live, shapes, fg, nfg)  # another rank draws differently
    assert not np.array_equal(other.start, pa.start)


def test_ring_evicts_oldest_first_and_never_overlaps():
    cfg = DataConfig(roi_size=(4, 4, 4))
    res = ResidentSet(
        capacity=1000, channels=1, spatial_dims=3, roi=(4, 4, 4), device=torch.device("cpu"), max_slots=6, max_fg=0
    )
    rng = np.random.default_rng(0)
    for i in range(200):
        shape = tuple(int(s) for s in rng.integers(4, 8, 3))
        res.insert(
            {
                "image": torch.full((1, *shape), float(i % 1000), dtype=torch.float16),
                "fg": np.zeros((0, 3)),
                "dataset": 0,
                "key": str(i),
            }
        )
        live = list(res.fifo)
        assert [int(res.keys[s]) for s in live] == sorted(int(res.keys[s]) for s in live)  # FIFO order
        spans = sorted((res.offset[s], res.offset[s] + res.nvox[s]) for s in live)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])) and spans[-1][1] <= 1000
        for s in live:  # nothing overwritten
            img, _ = res._views(s)
            assert bool((img == float(int(res.keys[s]) % 1000)).all())
    assert len(res) <= 6 and res.evicted == 200 - len(res)
    with pytest.raises(ValueError, match="data.resident_gib"):
        res.insert({"image": torch.zeros(1, 11, 10, 10), "fg": np.zeros((0, 3)), "dataset": 0, "key": "big"})
    p = CropSampler(cfg, 0, 0).draw(4, res.live(), res.shape, res.fg, res.nfg)
    assert res.crop(p)["image"].shape == (4, 1, 4, 4, 4)


def test_padding_centres_a_small_axis():
    """``pad_to_roi`` centres a too-small axis: ``(roi - size) - (roi - size) // 2`` zeros before, the rest after."""
    for size in range(1, 8):
        image = coordinate_volume((size, 12, 12))
        padded, _, fg = pad_to_roi(image, None, np.asarray([[0, 0, 0]]), ROI)
        before = (ROI[0] - size) - (ROI[0] - size) // 2
        assert padded.shape[1] == ROI[0] and fg[0, 0] == before
        np.testing.assert_array_equal(padded[:, before : before + size], image)
        assert not padded[:, :before].any() and not padded[:, before + size :].any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_gather_equals_cpu(dtype):
    """The batched CUDA gather (flips folded into row offsets, fused intensity) cuts what the CPU path cuts."""
    rng = np.random.default_rng(3)
    cfg = DataConfig(roi_size=(8, 8, 8), crop="pos_neg", flip_prob=0.5, rot90_prob=0.5)
    vols = [
        (
            rng.normal(size=(2, *s)).astype(np.float16),
            rng.integers(0, 4, s).astype(np.uint8),
            rng.integers(0, 6, (5, 3)),
        )
        for s in [(12, 9, 10), (8, 14, 6), (20, 10, 9)]
    ]
    cpu = resident_with(vols, cfg, "slices", label="segmentation")
    gpu = ResidentSet(
        capacity=cpu.capacity,
        channels=2,
        spatial_dims=3,
        roi=cfg.roi_size,
        device=torch.device("cuda"),
        label="segmentation",
        max_slots=cpu.fg.shape[0],
        max_fg=64,
        gather="index",
    )
    for s in cpu.fifo:  # same volumes, same places
        img, lab = cpu._views(s)
        gpu.insert(
            {
                "image": img.pin_memory(),
                "label": lab[0].pin_memory(),
                "fg": cpu.fg[s, : cpu.nfg[s]],
                "dataset": 0,
                "key": cpu.keys[s],
            }
        )
    p = CropSampler(cfg, 0, 0).draw(64, cpu.live(), cpu.shape, cpu.fg, cpu.nfg)
    a, b = cpu.crop(p, torch.float32), gpu.crop(p, dtype)
    torch.testing.assert_close(
        b["image"].float().cpu(), a["image"].to(dtype).float(), rtol=1e-2 if dtype != torch.float32 else 1e-6, atol=1e-6
    )
    assert torch.equal(b["label"].cpu(), a["label"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_stream_pinned_and_restorable(tmp_path):
    from medmae.data import build_train_stream
    from medmae.data.convert import ConvertOptions, convert
    from medmae.data.synthetic import write_phantom_dataset

    dl = write_phantom_dataset(tmp_path / "src", n=8, shape=(24, 24, 20), num_classes=3)
    assert convert(dl, tmp_path / "wds", ConvertOptions(preset="ct", shard_size_mb=0.07, workers=0), progress=False).ok
    for gib in (0.0, 1e-4):
        cfg = DataConfig(
            path=str(tmp_path / "wds"),
            roi_size=(16, 16, 16),
            crop="pos_neg",
            num_workers=2,
            resident_reuse=2.0,
            resident_gib=gib,
        )
        a = build_train_stream(cfg, batch_size=4, with_labels=True, device="cuda", dtype=torch.bfloat16)
        first = next(a)
        assert first["image"].is_cuda and first["image"].dtype == torch.bfloat16 and first["label"].is_cuda
        assert gib == 0.0 or a._it._pin_memory
        for _ in range(3):
            next(a)
        state = a.state_dict()
        ref = [next(a) for _ in range(4)]
        b = build_train_stream(cfg, batch_size=4, with_labels=True, device="cuda", dtype=torch.bfloat16)
        b.load_state_dict(state)
        for x, y in zip(ref, [next(b) for _ in range(4)]):
            assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
