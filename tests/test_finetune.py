"""Fine-tuning: UNETR learns a segmentation, the MAE encoder transfers, BraTS regions, classification, and the
DeepSpeed launcher with 2 CPU processes writes results.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medmae.config import load_config
from medmae.data import read_manifest
from medmae.data.convert.options import ConvertOptions
from medmae.data.convert.run import convert
from medmae.data.labels import brats_regions, regions_to_brats
from medmae.data.synthetic import write_phantom_dataset
from medmae.models import create_model, save_encoder
from medmae.training.config import JobConfig

REPO = Path(__file__).resolve().parents[1]


def _job(tmp_path: Path, shards: Path, *overrides: str) -> JobConfig:
    return load_config(
        JobConfig,
        REPO / "configs/finetune_debug.yaml",
        [
            f"data.path={shards}",
            f"run.output_dir={tmp_path / 'runs'}",
            "data.num_workers=0",
            "run.log_every=50",
            "dist.num_workers=1",
            *overrides,
        ],
    )


def _trainer(cfg: JobConfig):
    from medmae.training.trainer import Trainer

    return Trainer(cfg)


def test_unetr_learns_an_easy_segmentation(tmp_path, seg_shards):
    cfg = _job(
        tmp_path,
        seg_shards,
        "run.name=learn",
        "train.max_steps=100",
        "run.val_every=50",
        "optim.lr=1.5e-2",  # mean Dice 0.48 at step 50, 0.96 at 100 (0.89 after 200 steps at 3e-3)
        "optim.warmup_steps=5",
        "optim.layer_decay=1.0",
    )
    trainer = _trainer(cfg)
    trainer.train()
    run = tmp_path / "runs" / "learn"
    results = json.loads((run / "results.json").read_text())
    assert [h["step"] for h in results["history"]] == [50, 100]
    best = results["best"]
    assert best["mean_dice"] >= 0.8, best
    assert set(best["dice"]) == set(best["hd95"]) and len(best["dice"]) == 2  # background excluded
    assert np.isfinite(best["mean_hd95"]) and best["volumes"] == 2
    for name in ("best_model.safetensors", "model.safetensors"):
        from medmae.tasks.model_file import load_finetuned

        model, meta = load_finetuned(run / name)
        assert meta["task"] == "segment" and meta["num_classes"] == 3
        assert meta["preprocessing"]["preset"] == "ct"
    # TensorBoard got the validation scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("val/mean_dice")] == [50, 100]


def test_selection_split_picks_the_checkpoint_and_the_validation_split_scores_it_once(tmp_path, seg_shards):
    """With data.select_count the periodic validation scores training volumes carved out for it, picks the best
    checkpoint there, and the validation volumes score that checkpoint's weights once, at the end."""
    from medmae.data import build_val_loader
    from medmae.data.sources import selection_keys
    from medmae.tasks.metrics import evaluate_segmentation
    from medmae.tasks.model_file import load_finetuned

    cfg = _job(
        tmp_path,
        seg_shards,
        "run.name=select",
        "data.select_count=2",
        "train.max_steps=12",
        "run.val_every=4",
        "optim.lr=3e-3",
        "optim.warmup_steps=2",
        "optim.layer_decay=1.0",
    )
    trainer = _trainer(cfg)
    chosen = selection_keys(cfg.data, cfg.data.path, read_manifest(seg_shards))
    assert len(chosen) == 2 and not set(chosen) & set(trainer.data.sources[0].keys)  # never trained on
    trainer.train()
    results = json.loads((tmp_path / "runs" / "select" / "results.json").read_text())
    history, best, reported = results["history"], results["best"], results["test"]
    assert [h["step"] for h in history] == [4, 8, 12]
    assert all(h["split"] == "selection" and h["volumes"] == 2 for h in history)
    assert best["score"] == max(h["score"] for h in history)  # picked on the selection split
    assert reported["split"] == "validation" and reported["step"] == best["step"] and reported["volumes"] == 2
    # the reported number is the picked weights' score on the validation volumes, run as the trainer runs them
    # (fp32 weights under bf16 autocast: the engine's torch-autocast mode)
    model, _ = load_finetuned(tmp_path / "runs" / "select" / "best_model.safetensors")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        again = evaluate_segmentation(
            model,
            build_val_loader(cfg.data, split="validation"),
            roi=tuple(cfg.data.roi_size),
            num_classes=3,
            regions=False,
            device=torch.device("cpu"),
            dtype=torch.bfloat16,
            sw_batch=cfg.finetune.sw_batch,
            overlap=cfg.finetune.sw_overlap,
        )
    assert again["score"] == pytest.approx(reported["score"], abs=1e-6)


def test_pretrained_encoder_initialises_every_encoder_weight(tmp_path, seg_shards):
    torch.manual_seed(7)
    mae = create_model("mae_vit_3d_debug")
    path = save_encoder(mae.state_dict(), mae.cfg.encoder_dict(), tmp_path / "encoder.safetensors")
    cfg = _job(tmp_path, seg_shards, "run.name=init", "train.max_steps=1", f"finetune.pretrained={path}")
    trainer = _trainer(cfg)
    got = trainer.engine.module.encoder.state_dict()
    expected = mae.encoder.state_dict()
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        torch.testing.assert_close(got[k].float(), v.float(), atol=1e-2, rtol=1e-2, msg=k)  # bf16 engine copy
    # an encoder of another patch size is refused, naming the mismatch
    bad = _job(
        tmp_path,
        seg_shards,
        "run.name=bad",
        "model.patch_size=4",
        "model.skip_indices=[0]",
        f"finetune.pretrained={path}",
    )
    with pytest.raises(ValueError, match="patch_embed"):
        _trainer(bad)


def test_brats_region_mapping_on_a_hand_made_volume():
    label = np.zeros((4, 4, 4), dtype=np.uint8)
    label[0] = 1  # edema
    label[1] = 2  # non-enhancing core
    label[2] = 3  # enhancing
    wt, tc, et = brats_regions(label)
    assert wt.sum() == 48 and tc.sum() == 32 and et.sum() == 16
    assert (wt[:3] == 1).all() and (wt[3] == 0).all()
    assert (tc[1:3] == 1).all() and (tc[0] == 0).all()
    assert (et[2] == 1).all() and (et[:2] == 0).all() and (et[3] == 0).all()
    assert np.array_equal(regions_to_brats(np.stack([wt, tc, et])), label)
    t = brats_regions(torch.from_numpy(label.astype(np.int64))[None, None])
    assert t.shape == (1, 3, 4, 4, 4) and t.dtype == torch.float32
    assert torch.equal(t[0], torch.from_numpy(np.stack([wt, tc, et])).float())


def test_brats_regions_train_and_validate_per_region(tmp_path_factory):
    """4-channel MRI from a 1-channel encoder (VoCo #2): the patch embedding is adapted, and the model file says how."""
    root = tmp_path_factory.mktemp("brats")
    datalist = write_phantom_dataset(
        root / "raw", n=3, shape=(32, 32, 32), num_classes=4, channels=4, seed=2, kind="mri"
    )
    convert(datalist, root / "wds", ConvertOptions(preset="mri", workers=0, val_fraction=0.34), progress=False)
    mae = create_model("mae_vit_3d_debug")
    encoder = save_encoder(mae.state_dict(), mae.cfg.encoder_dict(), root / "encoder.safetensors")
    cfg = _job(
        root,
        root / "wds",
        "run.name=brats",
        "finetune.labels=brats_regions",
        "model.in_chans=4",
        "train.max_steps=3",
        f"finetune.pretrained={encoder}",
    )
    trainer = _trainer(cfg)
    trainer.train()
    best = json.loads((root / "runs" / "brats" / "results.json").read_text())["best"]
    assert set(best["dice"]) == {"WT", "TC", "ET"}
    from medmae.tasks.model_file import read_finetuned_meta

    record = read_finetuned_meta(root / "runs" / "brats" / "model.safetensors")["extra"]["encoder"]
    assert record["pretrained"] == str(encoder) and record["plan"] is None
    assert record["channels"] == {"from": 1, "to": 4, "rule": "the 1-channel weights repeated 4x, scaled by 1/4"}


def test_classification_learns_and_reports_the_best_model_on_the_official_test_list(tmp_path):
    """NIH-style CSV with patients, a train_val list and a test list: the model learns a visible finding, is
    selected on the patient-wise hold-out of train_val, and its best weights are scored once on the test list."""
    import itk

    rng = np.random.default_rng(0)
    rows, test = ["Image Index,effusion,mass,Patient ID"], []
    for i in range(36):
        img = rng.normal(60, 10, (40, 40))
        effusion = i % 2
        if effusion:  # a bright patch the model can learn
            img[4:20, 4:20] += 120
        name = f"x{i:02d}.png"
        itk.imwrite(itk.image_from_array(np.clip(img, 0, 255).astype(np.uint8)), str(tmp_path / name))
        rows.append(f"{name},{effusion},{int(rng.random() < 0.3)},p{i // 2}")
        if i >= 28:
            test.append(name)
    (tmp_path / "x.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "test_list.txt").write_text("\n".join(test) + "\n")
    (tmp_path / "train_val_list.txt").write_text("\n".join(f"x{i:02d}.png" for i in range(28)) + "\n")
    convert(
        tmp_path / "x.csv",
        tmp_path / "wds",
        ConvertOptions(
            preset="xray",
            val_fraction=0.25,
            workers=0,
            seed=1,
            group_col="Patient ID",
            image_col="Image Index",
            label_cols=["effusion", "mass"],
            train_list=str(tmp_path / "train_val_list.txt"),
            test_list=str(tmp_path / "test_list.txt"),
        ),
        progress=False,
    )
    cfg = load_config(
        JobConfig,
        None,
        [
            "task=classify",
            "model.name=vit_2d_cls_debug",
            "model.num_classes=2",
            f"data.path={tmp_path / 'wds'}",
            "data.spatial_dims=2",
            "data.roi_size=[32,32]",
            "data.crop=resized",
            "data.resized_min_scale=0.8",
            "data.num_workers=0",
            "train.max_steps=40",
            "train.micro_batch=8",
            "optim.lr=2e-3",
            "run.val_every=20",
            "dist.num_workers=1",
            f"run.output_dir={tmp_path / 'runs'}",
            "run.name=cls",
        ],
    )
    _trainer(cfg).train()
    results = json.loads((tmp_path / "runs" / "cls" / "results.json").read_text())
    best, final_test = results["best"], results["test"]
    samples = read_manifest(tmp_path / "wds")["samples"]
    val = [s for s in samples if s["split"] == "validation"]
    assert set(best["auc"]) == {"effusion", "mass"} and best["images"] == len(val) >= 4
    # the hold-out is by patient: no patient has images on both sides
    patient = {f"x{i:02d}": f"p{i // 2}" for i in range(36)}
    assert not {patient[s["key"]] for s in val} & {patient[s["key"]] for s in samples if s["split"] == "train"}
    assert best["auc"]["effusion"] >= 0.85, best
    # the test list is scored once, with the best model (its step), and never used for selection
    assert final_test["step"] == best["step"] and final_test["images"] == len(test)
    assert final_test["auc"]["effusion"] >= 0.8, final_test
    assert all("test" not in h for h in results["history"])


@pytest.mark.slow
def test_deepspeed_launcher_two_cpu_processes_writes_results(tmp_path, seg_shards):
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    cmd = [
        str(Path(sys.executable).parent / "deepspeed"),
        "--num_gpus",
        "2",
        "--master_port",
        "29577",
        str(REPO / "launch/finetune.py"),
        "--config",
        str(REPO / "configs/finetune_debug.yaml"),
        f"data.path={seg_shards}",
        f"run.output_dir={tmp_path / 'runs'}",
        "run.name=ds",
        "train.max_steps=6",
        "data.num_workers=0",
        "run.log_every=3",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "runs" / "ds" / "results.json").read_text())
    assert results["best"]["step"] == 6 and results["best"]["volumes"] == 2  # one volume per rank, reduced
    config = (tmp_path / "runs" / "ds" / "config.yaml").read_text()
    assert "world_size: 2" in config
