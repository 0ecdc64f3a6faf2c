"""One pair of the label-efficiency study (docs/study/PROTOCOL.md), in one process: fine-tune both arms back to back on
the pair's labelled subject with the same seed (so the same crops), then the secondary endpoints.

    python tools/study_pair.py JOB.json        # written by tools/study.py; writes pair.json next to it

``JOB.json``: ``name``, ``subject``, ``seed``, ``data`` (converted shards), ``output`` (the pair's folder),
``finetune_config``, ``encoder`` (the MAE's ``encoder.safetensors``), ``overrides`` (every run), ``runs`` (a list of
``{name, arm, lr, layer_decay}``: the two arms of a pair, or a pilot's grid), ``probe`` (``ProbeConfig`` values or
null) and ``colin27`` (``{image, label}`` or null). Each run is the one ``Trainer`` every launcher uses, in this
process, validating once, at the end; a run already finished (its ``results.json`` at the last step) is not repeated,
so an interrupted pair continues. Its checkpoints are deleted once it is done (the model files stay).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

T_START = time.perf_counter()
import torch  # noqa: E402

from medmae.config import apply_overrides, from_dict  # noqa: E402
from medmae.io import write_json_atomic  # noqa: E402
from medmae.training.config import JobConfig  # noqa: E402
from medmae.training.rng import seed_everything  # noqa: E402

WINDOW = 32  # the study's crop size: windows the probe's tokens come from


def job_config(job: dict[str, Any], run: dict[str, Any]) -> JobConfig:
    """The fine-tuning config of one run: the shared YAML <- the study's overrides <- this pair and arm."""
    import yaml

    base = yaml.safe_load(Path(job["finetune_config"]).read_text()) or {}
    mine = {
        "run": {"name": run["name"], "output_dir": job["output"], "seed": job["seed"], "val_every": 0},
        "data": {"path": job["data"], "train_subset": [f"subject_{job['subject']:02d}"]},
        "optim": {"lr": run["lr"], "layer_decay": run["layer_decay"]},
        "finetune": {"pretrained": job["encoder"] if run["arm"] == "mae" else ""},
        "dist": {"num_workers": 1},
    }
    return from_dict(JobConfig, apply_overrides(apply_overrides(base, job["overrides"]), mine))


def finished(cfg: JobConfig) -> dict[str, Any] | None:
    """The final validation of a run that completed, else None."""
    path = Path(cfg.run.output_dir) / cfg.run.name / "results.json"
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    best = results.get("best") or {}
    done = best.get("step") == cfg.train.max_steps and (path.parent / "model.safetensors").is_file()
    return best if done else None


def fine_tune(cfg: JobConfig) -> tuple[dict[str, Any], dict[str, float]]:
    """Train one arm (or find it trained); its final validation and the seconds spent building and training."""
    from medmae.training.trainer import Trainer

    done = finished(cfg)
    if done is not None:
        return done, {}
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    t1 = time.perf_counter()
    trainer.train()
    t2 = time.perf_counter()
    res = finished(cfg)
    if res is None:
        raise RuntimeError(f"{cfg.run.name}: training ended without a final validation")
    shutil.rmtree(Path(cfg.run.output_dir) / cfg.run.name / "checkpoints", ignore_errors=True)
    del trainer
    return res, {"build_s": round(t1 - t0, 2), "train_and_validate_s": round(t2 - t1, 2)}


# ---- secondary endpoint: a linear probe on the frozen encoder ------------------------------------------------------
def _windows(image: torch.Tensor, label: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C, *S)`` image, ``(*S)`` label -> ``(N, C, 32, 32, 32)`` and ``(N, 32, 32, 32)`` windows every ``stride``
    voxels (the last one flush with the end), the volume zero-padded to at least one window."""
    pad = [max(0, WINDOW - s) for s in image.shape[1:]]
    spec = [p for d in reversed(pad) for p in (0, d)]
    image, label = torch.nn.functional.pad(image, spec), torch.nn.functional.pad(label, spec)
    starts = []
    for s in image.shape[1:]:
        axis = list(range(0, s - WINDOW + 1, stride))
        starts.append(sorted({*axis, s - WINDOW}))
    boxes = [(x, y, z) for x in starts[0] for y in starts[1] for z in starts[2]]
    cut = [tuple(slice(o, o + WINDOW) for o in box) for box in boxes]
    return torch.stack([image[(slice(None), *c)] for c in cut]), torch.stack([label[c] for c in cut])


@torch.no_grad()
def tokens(encoder: torch.nn.Module, image: torch.Tensor, label: torch.Tensor, stride: int, classes: int):
    """Frozen-encoder tokens ``(T, D)`` of the windows of one volume and each token's majority label ``(T,)``."""
    wins, labs = _windows(image, label, stride)
    feats = []
    for i in range(0, len(wins), 16):
        out = encoder.forward_features(wins[i : i + 16].float())
        feats.append(encoder.tokens_to_output(out, "NCHW"))  # (B, D, g, g, g)
    fmap = torch.cat(feats)
    n, d, g = fmap.shape[0], fmap.shape[1], fmap.shape[2]
    p = WINDOW // g  # voxels per token along an axis
    patches = labs.reshape(n, g, p, g, p, g, p).permute(0, 1, 3, 5, 2, 4, 6).reshape(n * g**3, p**3)
    counts = torch.nn.functional.one_hot(patches.long(), classes).sum(1)
    return fmap.permute(0, 2, 3, 4, 1).reshape(-1, d).double(), counts.argmax(1)


def fit_probe(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float, iterations: int):
    """Multinomial logistic regression on standardised features (full-batch L-BFGS); returns a predict function."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    xs = (x - mean) / std
    w = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xs @ w + b, y) + l2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lambda z: (((z - mean) / std) @ w.detach() + b.detach()).argmax(1)


def token_dice(pred: torch.Tensor, truth: torch.Tensor, classes: int) -> float:
    """Mean over the foreground classes of the token-level Dice (F1)."""
    scores = []
    for c in range(1, classes):
        p, t = pred == c, truth == c
        denom = int(p.sum() + t.sum())
        scores.append(2.0 * int((p & t).sum()) / denom if denom else 1.0)
    return float(np.mean(scores))


def volume_tokens(
    encoder: torch.nn.Module, samples: list[dict], stride: int, classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and token labels of whole volumes (validation-loader items)."""
    xs, ys = [], []
    for s in samples:
        image = s["image"].reshape(-1, *s["image"].shape[-3:])
        x, y = tokens(encoder, image, s["label"].reshape(s["label"].shape[-3:]), stride, classes)
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def probe(job: dict[str, Any], cfgs: dict[str, JobConfig]) -> dict[str, Any]:
    """The probe endpoint for the random (scratch arm's starting) encoder and the MAE encoder."""
    from medmae.data import build_val_loader, read_manifest
    from medmae.data.validation import ValDataset
    from medmae.tasks import get_task

    opts = job["probe"]
    cfg = cfgs["scratch"]
    manifest = read_manifest(cfg.data.path)
    key = cfg.data.train_subset[0]
    entry = next(s for s in manifest["samples"] if s["key"] == key)
    labelled = [ValDataset(cfg.data, manifest, [entry])[0]]
    held = list(build_val_loader(cfg.data, split="validation"))
    out: dict[str, Any] = {}
    for name, arm_cfg in (("random", cfgs["scratch"]), ("mae", cfgs["mae"])):
        seed_everything(arm_cfg.run.seed)  # the scratch arm's initial weights, exactly
        model = get_task(arm_cfg).build_model().float().eval()
        classes = model.cfg.num_classes
        x_train, y_train = volume_tokens(model.encoder, labelled, opts["stride"], classes)
        x_test, y_test = volume_tokens(model.encoder, held, opts["stride"], classes)
        predict = fit_probe(x_train, y_train, classes, opts["l2"], opts["iterations"])
        out[name] = token_dice(predict(x_test), y_test, classes)
        out["tokens"] = {"train": len(y_train), "test": len(y_test)}
    return out


# ---- extra held-out person: Colin27 -------------------------------------------------------------------------------
def colin27_score(run_dir: Path, image: str, label: str) -> float:
    """Mean over the sides of the Dice between the model's tissue of a side and AAL's regions of that side."""
    import nibabel as nib

    from medmae.inference import Predictor

    pred, _ = Predictor.from_checkpoint(run_dir, overlap=0.25, sw_batch=8, device="cpu").predict_file(image)
    truth = np.asarray(nib.load(label).dataobj)
    keep = truth != 255  # the midline vermis regions: no side
    scores = []
    for side, tissue in ((1, (1, 2)), (3, (3, 4))):
        p, t = np.isin(pred, tissue) & keep, (truth == side) & keep
        scores.append(2.0 * (p & t).sum() / max(int(p.sum() + t.sum()), 1))
    return float(np.mean(scores))


def main() -> None:
    job_path = Path(sys.argv[1])
    job = json.loads(job_path.read_text())
    torch.set_num_threads(int(os.environ.get("MEDMAE_STUDY_THREADS", "1")))
    t_import = time.perf_counter() - T_START
    out_path = Path(job["output"]) / "pair.json"
    result: dict[str, Any] = {k: job[k] for k in ("name", "subject", "seed")}
    result["runs"], timings = {}, {"imports_s": round(t_import, 2)}
    cfgs: dict[str, JobConfig] = {}
    for run in job["runs"]:
        cfg = job_config(job, run)
        cfgs.setdefault(run["arm"], cfg)
        t0 = time.perf_counter()
        res, spent = fine_tune(cfg)
        entry = {**run, "dice": res["score"], "dice_per_class": res.get("dice"), "step": res["step"], **spent}
        if job.get("colin27"):
            t1 = time.perf_counter()
            entry["colin27"] = colin27_score(Path(cfg.run.output_dir) / cfg.run.name, **job["colin27"])
            entry["colin27_s"] = round(time.perf_counter() - t1, 2)
        entry["wall_s"] = round(time.perf_counter() - t0, 2)
        result["runs"][run["name"]] = entry
        print(f"{job['name']} {run['name']}: Dice {res['score']:.4f} ({entry['wall_s']:.0f} s)", flush=True)
    if job.get("probe"):
        t0 = time.perf_counter()
        result["probe"] = probe(job, cfgs)
        timings["probe_s"] = round(time.perf_counter() - t0, 2)
        print(f"{job['name']} probe: random {result['probe']['random']:.4f}, mae {result['probe']['mae']:.4f}")
    timings["total_s"] = round(time.perf_counter() - T_START, 2)
    result["timings"] = timings
    write_json_atomic(out_path, result)


if __name__ == "__main__":
    main()
