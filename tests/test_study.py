"""The pre-registered study's machinery (docs/study/PROTOCOL.md) on hand-worked cases: the statistics and the verdict,
the pilot's arm-wise rule, the study config, the linear probe's tokens, and Colin27 read from a real .deb archive."""

from __future__ import annotations

import gzip
import io
import json
import sys
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import stats

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import study_colin27  # noqa: E402
import study_pair  # noqa: E402
from study_config import StudyConfig  # noqa: E402
from study_report import choose_arm_settings, paired_stats, sign_flip_p, verdict  # noqa: E402

from medmae.config import load_config  # noqa: E402


def test_exact_sign_flip_p_by_hand():
    # |d| = 1, 2, 3: the 8 sign assignments sum to 6, 4, 2, 0, 0, -2, -4, -6
    assert sign_flip_p(np.array([1.0, 2.0, 3.0])) == pytest.approx(1 / 8)  # only the observed one reaches 6
    assert sign_flip_p(np.array([1.0, -2.0, 3.0])) == pytest.approx(3 / 8)  # observed sum 2: 6, 4, 2
    assert sign_flip_p(np.array([-1.0, -2.0, -3.0])) == pytest.approx(1.0)
    d = np.random.default_rng(0).normal(0.01, 0.02, 12)
    every = np.array(np.meshgrid(*[[-1, 1]] * 12)).T.reshape(-1, 12)  # all 4,096 sign vectors, another way
    assert sign_flip_p(d) == pytest.approx(np.mean(every @ np.abs(d) >= d.sum() - 1e-12))


def test_paired_stats_match_the_one_sided_t_test_and_its_interval():
    d = np.array([0.02, -0.01, 0.03, 0.015, 0.0, 0.025, 0.01, -0.005])
    s = paired_stats(d)
    assert s["n"] == 8 and s["wins"] == 5 and s["mean"] == pytest.approx(d.mean())
    assert s["sd"] == pytest.approx(d.std(ddof=1))
    assert s["p_t"] == pytest.approx(stats.ttest_1samp(d, 0.0, alternative="greater").pvalue)
    assert s["p_t_less"] == pytest.approx(stats.ttest_1samp(d, 0.0, alternative="less").pvalue)
    lo, hi = stats.t.interval(0.95, 7, loc=d.mean(), scale=d.std(ddof=1) / np.sqrt(8))
    assert s["ci"] == (pytest.approx(lo), pytest.approx(hi))
    assert s["p_flip"] == pytest.approx(sign_flip_p(d))


def test_verdict_follows_the_protocol():
    assert verdict(paired_stats([0.03, 0.02, 0.025, 0.04, 0.03, 0.035])).startswith("supported: MAE beats scratch")
    # t-test below 0.05 but 3 pairs cannot reach it with sign flips (1/8 at best): not robust
    assert "not robust" in verdict(paired_stats([0.030, 0.031, 0.029]))
    assert verdict(paired_stats([-0.03, -0.02, -0.025, -0.04, -0.03, -0.035])).startswith("the opposite direction")
    assert verdict(paired_stats([0.01, -0.01, 0.02, -0.015])).startswith("not shown")


def _pilot_run(arm: str, lr: float, ld: float, dice: float) -> dict:
    return {"arm": arm, "lr": lr, "layer_decay": ld, "dice": dice}


def test_pilot_chooses_each_arm_on_its_own_mean_with_the_stated_ties():
    pilot = {}
    for i, shift in enumerate((0.0, 0.02)):
        runs = [
            _pilot_run("scratch", 1e-3, 1.0, 0.70 + shift),
            _pilot_run("scratch", 1e-3, 0.75, 0.66 + shift),
            _pilot_run("scratch", 3e-3, 1.0, 0.7004 + shift),  # equal to 3 decimals: the lower lr wins
            _pilot_run("scratch", 3e-3, 0.75, 0.60 + shift),
            _pilot_run("mae", 1e-3, 1.0, 0.72 + shift),
            _pilot_run("mae", 1e-3, 0.75, 0.74 + shift),  # mae's best: layer decay
            _pilot_run("mae", 3e-3, 1.0, 0.50 + shift),
            _pilot_run("mae", 3e-3, 0.75, 0.7396 + shift),  # mean 0.7496 = 0.750 to 3 decimals: the lower lr wins
        ]
        pilot[f"pilot{i}"] = {"runs": {f"r{j}": r for j, r in enumerate(runs)}}
    pilot["pilot9"] = None  # a missing pilot pair counts for nothing
    chosen, rows = choose_arm_settings(pilot)
    assert (chosen["scratch"]["lr"], chosen["scratch"]["layer_decay"]) == (1e-3, 1.0)
    assert (chosen["mae"]["lr"], chosen["mae"]["layer_decay"]) == (1e-3, 0.75)
    assert chosen["mae"]["n"] == 2 and chosen["mae"]["mean"] == pytest.approx(0.75)
    assert len(rows) == 8


def test_study_config_keeps_pilot_and_confirmatory_pairs_apart():
    cfg = load_config(StudyConfig, REPO / "configs/study.yaml")
    assert cfg.pairs == list(range(12)) and not set(cfg.pairs) & set(cfg.pilot.subjects)
    assert (REPO / cfg.pretrain_config).is_file() and (REPO / cfg.finetune_config).is_file()
    with pytest.raises(ValueError, match="pilot.subjects: \\[11\\] also label confirmatory pairs"):
        load_config(StudyConfig, REPO / "configs/study.yaml", ["pilot.subjects=[11,12]"])
    with pytest.raises(ValueError, match="pairs: distinct pool subjects"):
        load_config(StudyConfig, REPO / "configs/study.yaml", ["pairs=[0,0]"])
    with pytest.raises(ValueError, match="unknown config key"):
        load_config(StudyConfig, REPO / "configs/study.yaml", ["scratch.momentum=0.9"])


def test_probe_tokens_carry_the_majority_label_of_their_patch():
    """A 40³ volume whose label is the x-slab index (8 voxels per token): every window's tokens must come out with
    the label of the slab they cover, in the encoder's token order."""

    class Identity(torch.nn.Module):  # tokens = the mean intensity of each 8³ patch, in the ViT's grid order
        def forward_features(self, x: torch.Tensor) -> torch.Tensor:
            g = torch.nn.functional.avg_pool3d(x, 8)  # (B, 1, 4, 4, 4)
            return g.flatten(2).transpose(1, 2)  # (B, 64, 1)

        def tokens_to_output(self, x: torch.Tensor, fmt: str) -> torch.Tensor:
            return x.transpose(1, 2).reshape(x.shape[0], 1, 4, 4, 4)

    label = torch.zeros(40, 40, 40, dtype=torch.int64)
    for i in range(5):
        label[8 * i : 8 * (i + 1)] = i
    image = label[None].float()
    x, y = study_pair.tokens(Identity(), image, label, stride=8, classes=5)
    assert x.shape == (2**3 * 64, 1) and y.shape == (2**3 * 64,)
    assert torch.equal(x[:, 0].round().long(), y)  # each token's feature (its slab index) equals its label
    predict = study_pair.fit_probe(x, y, 5, l2=1e-6, iterations=100)
    assert study_pair.token_dice(predict(x), y, 5) == pytest.approx(1.0)
    assert study_pair.token_dice(torch.zeros_like(y), y, 5) == pytest.approx(0.0)


def _deb(path: Path, files: dict[str, bytes]) -> None:
    """A real Debian package layout: an ar archive with debian-binary, control.tar.xz and data.tar.xz."""

    def tar_xz(members: dict[str, bytes]) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:xz") as tar:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    entries = [
        ("debian-binary", b"2.0\n"),
        ("control.tar.xz", tar_xz({"./control": b"Package: mricron-data\n"})),
        ("data.tar.xz", tar_xz({f"./usr/share/mricron/templates/{k}": v for k, v in files.items()})),
    ]
    out = b"!<arch>\n"
    for name, data in entries:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode() + data
        out += b"\n" if len(data) % 2 else b""
    path.write_bytes(out)


def test_colin27_is_read_from_the_package_and_labelled_by_side(tmp_path):
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = -8
    t1 = np.zeros((16, 16, 16), np.uint8)
    t1[2:14, 2:14, 2:14] = 100
    aal = np.zeros_like(t1)
    aal[2:8, 2:14, 2:14] = 1  # Precentral_L
    aal[8:14, 2:14, 2:14] = 2  # Precentral_R
    aal[7:9, 2:14, 2:14] = 3  # Vermis_3, on the midline

    def gz(a: np.ndarray) -> bytes:
        return gzip.compress(nib.Nifti1Image(a, affine).to_bytes())

    table = b"1 Precentral_L 2001\n2 Precentral_R 2002\n3 Vermis_3 9110\n"
    cache = tmp_path / "cache"
    cache.mkdir()
    _deb(cache / "mricron-data_1.0_all.deb", {"ch2bet.nii.gz": gz(t1), "aal.nii.gz": gz(aal), "aal.nii.txt": table})
    source = study_colin27.write(tmp_path / "colin", cache, spacing=2.0)  # the cached package: no download
    info = json.loads(source.read_text())
    assert info["package"] == "mricron-data_1.0_all.deb" and info["shape"] == [8, 8, 8]
    image = np.asarray(nib.load(tmp_path / "colin" / "colin27.nii.gz").dataobj)
    label = np.asarray(nib.load(tmp_path / "colin" / "colin27_aal.nii.gz").dataobj)
    assert image.max() == pytest.approx(1.0) and image[0, 0, 0] == 0.0  # [0, 1], background exactly 0
    assert set(np.unique(label[1:3, 1:7, 1:7])) == {1} and set(np.unique(label[5:7, 1:7, 1:7])) == {3}
    assert (label[4] == study_colin27.IGNORE).any()  # the vermis is left out of the score, not given a side
    (tmp_path / "bad.deb").write_bytes(b"not an archive")
    with pytest.raises(ValueError, match="not a Debian package"):
        study_colin27.read_deb_members(tmp_path / "bad.deb", study_colin27.MEMBERS)
