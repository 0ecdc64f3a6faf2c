"""The study's statistics and reports (docs/study/PROTOCOL.md, "Analysis"): paired differences per endpoint with
mean ± SD, the 95 % t interval, the one-sided paired t-test and the exact sign-flip test; the confirmatory
``summary.md`` and the pilot's ``pilot.md`` with the arm-wise choice of lr and layer decay."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

ALPHA = 0.05
ENDPOINTS = {  # key -> the row's title; endpoint_values says which pair.json values are compared
    "dice": "Primary: Dice on the {scored}, MAE − scratch",
    "probe": "Secondary: linear probe on the frozen encoder, token Dice, MAE − random init",
    "colin27": "Extra held-out person: Colin27 hemisphere Dice vs AAL, MAE − scratch",
}


def sign_flip_p(d: np.ndarray) -> float:
    """Exact one-sided sign-flip p-value for H1: E[d] > 0: the share of the 2^n sign assignments of |d| whose mean
    is at least the observed mean (the observed assignment included)."""
    n = len(d)
    signs = ((np.arange(2**n)[:, None] >> np.arange(n)) & 1) * 2 - 1  # (2^n, n), every assignment once
    means = signs @ np.abs(d) / n
    return float(np.mean(means >= d.mean() - 1e-12 * max(1.0, float(np.abs(d).max()))))


def paired_stats(d: list[float] | np.ndarray) -> dict[str, Any]:
    """n, mean, SD (ddof 1), two-sided 95 % t interval, wins, one-sided p (t-test; sign-flip) for E[d] > 0 and the
    t-test's one-sided p for E[d] < 0."""
    d = np.asarray(d, dtype=float)
    n = len(d)
    out: dict[str, Any] = {"n": n, "mean": float(d.mean()) if n else math.nan, "wins": int((d > 0).sum())}
    if n < 2:
        return {**out, "sd": math.nan, "ci": (math.nan, math.nan), "p_t": math.nan, "p_t_less": math.nan,
                "p_flip": sign_flip_p(d) if n else math.nan}  # fmt: skip
    sd = float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    half = float(stats.t.ppf(1 - ALPHA / 2, n - 1)) * se
    if se > 0:
        t = out["mean"] / se
        p_t, p_less = float(stats.t.sf(t, n - 1)), float(stats.t.cdf(t, n - 1))
    else:  # every difference equal: the sign decides
        p_t = 0.0 if out["mean"] > 0 else 1.0
        p_less = 0.0 if out["mean"] < 0 else 1.0
    ci = (out["mean"] - half, out["mean"] + half)
    return {**out, "sd": sd, "ci": ci, "p_t": p_t, "p_t_less": p_less, "p_flip": sign_flip_p(d)}


def verdict(s: dict[str, Any]) -> str:
    """The protocol's reading of the primary endpoint."""
    if s["n"] < 2 or math.isnan(s["p_t"]):
        return "not shown (too few pairs to test)"
    if s["p_t"] < ALPHA:
        if s["p_flip"] >= ALPHA:
            return (
                f"supported by the t-test (p = {s['p_t']:.3g}) but not robust: the exact sign-flip test gives "
                f"p = {s['p_flip']:.3g}"
            )
        return f"supported: MAE beats scratch (one-sided t-test p = {s['p_t']:.3g}, sign-flip p = {s['p_flip']:.3g})"
    if s["mean"] < 0 and s["p_t_less"] < ALPHA:
        return f"the opposite direction: scratch beats MAE (one-sided t-test p = {s['p_t_less']:.3g})"
    return f"not shown (one-sided t-test p = {s['p_t']:.3g}, sign-flip p = {s['p_flip']:.3g})"


def endpoint_values(pair: dict[str, Any], key: str) -> tuple[float, float] | None:
    """(pretrained, baseline) of one endpoint in one pair.json, or None where it is missing."""
    try:
        if key == "probe":
            return pair["probe"]["mae"], pair["probe"]["random"]
        field = "dice" if key == "dice" else "colin27"
        return pair["runs"]["mae"][field], pair["runs"]["scratch"][field]
    except (KeyError, TypeError):
        return None


def _row(title: str, a: list[float], b: list[float], s: dict[str, Any]) -> str:
    lo, hi = s["ci"]
    return (
        f"| {title} | {np.mean(b):.3f} ± {np.std(b, ddof=1) if len(b) > 1 else 0:.3f} | "
        f"{np.mean(a):.3f} ± {np.std(a, ddof=1) if len(a) > 1 else 0:.3f} | **{s['mean']:+.4f} ± {s['sd']:.4f}** | "
        f"[{lo:+.4f}, {hi:+.4f}] | {s['p_t']:.3g} | {s['p_flip']:.3g} | {s['wins']}/{s['n']} |"
    )


def _timing_row(stage: str, t: dict[str, Any]) -> str:
    if t.get("wall_s") is None:
        return f"| {stage} | (done by an earlier run) | |"
    return f"| {stage} | {t['wall_s']:.0f} | {t['load']:.1f} |"


def read_pairs(pairs_dir: Path, names: list[str]) -> dict[str, dict[str, Any] | None]:
    out: dict[str, dict[str, Any] | None] = {}
    for name in names:
        try:
            out[name] = json.loads((pairs_dir / name / "pair.json").read_text())
        except (OSError, ValueError):
            out[name] = None
    return out


def write_summary(
    path: Path,
    pairs: dict[str, dict[str, Any] | None],
    timings: dict[str, dict[str, Any]],
    pretrain_loss: dict[int, float],
    colin27: str,
    command: str,
    scored: str = "held-out subjects 24–31",
) -> dict[str, dict[str, Any]]:
    """``summary.md`` of the confirmatory run (``scored``: the subjects the Dice is on); returns the statistics per
    endpoint."""
    done = {k: v for k, v in pairs.items() if v is not None}
    missing = sorted(set(pairs) - set(done))
    results: dict[str, dict[str, Any]] = {}
    rows = []
    for key, template in ENDPOINTS.items():
        title = template.format(scored=scored)
        values = [v for v in (endpoint_values(p, key) for p in done.values()) if v is not None]
        if not values:
            rows.append(f"| {title} | — | — | not available | | | | |")
            continue
        a, b = [v[0] for v in values], [v[1] for v in values]
        s = paired_stats(np.subtract(a, b))
        results[key] = s
        rows.append(_row(title, a, b, s))
    total = sum(t.get("wall_s") or 0.0 for t in timings.values())
    lines = [
        "# Label-efficiency study: MAE self pre-training vs scratch, one labelled volume, pre-registered",
        "",
        f"Command: `{command}` — wall time {total / 60:.1f} min on this machine (stages below). Protocol: "
        "[PROTOCOL.md](PROTOCOL.md), committed before this code existed. "
        f"Pairs: {len(done)} of {len(pairs)}" + (f" (missing: {', '.join(missing)})" if missing else "") + ".",
        "",
        f"**Result (primary endpoint): {verdict(results['dice']) if 'dice' in results else 'not available'}.**",
        "",
        "| endpoint | baseline | MAE | difference, mean ± SD | 95 % CI | p, t-test (one-sided) | p, sign-flip "
        "(exact, one-sided) | MAE better |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Baseline: the scratch arm (primary, Colin27) or the randomly initialised encoder of the pair's seed (probe). "
        "Means ± SD over pairs; the difference is paired by pair (same labelled subject, seed and crops); SD with "
        "ddof 1; the CI is the two-sided t interval; H1: MAE > baseline. The secondary and Colin27 rows do not change "
        f"the verdict. Colin27: {colin27}.",
        "",
        "## Per pair",
        "",
        "| pair | labelled subject | seed | scratch Dice | MAE Dice | probe random | probe MAE | Colin27 scratch | "
        "Colin27 MAE | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, p in pairs.items():
        if p is None:
            lines.append(f"| {name} | | | missing | | | | | | |")
            continue
        runs, probe = p["runs"], p.get("probe") or {}

        def f(v: Any) -> str:
            return f"{v:.4f}" if isinstance(v, (int, float)) else "—"

        lines.append(
            f"| {name} | {p['subject']} | {p['seed']} | {f(runs['scratch']['dice'])} | {f(runs['mae']['dice'])} | "
            f"{f(probe.get('random'))} | {f(probe.get('mae'))} | {f(runs['scratch'].get('colin27'))} | "
            f"{f(runs['mae'].get('colin27'))} | {p['timings']['total_s']:.0f} |"
        )
    loss = ", ".join(f"step {k}: {v:.4f}" for k, v in sorted(pretrain_loss.items())) or "not recorded"
    lines += [
        "",
        f"MAE pretraining loss (z-scored voxels, masked patches): {loss}.",
        "",
        "## Wall time",
        "",
        "| stage | wall (s) | mean 1-min load (2 cores) |",
        "|---|---|---|",
        *[_timing_row(k, t) for k, t in timings.items()],
        f"| total | {total:.0f} | |",
        "",
    ]
    pair_times = [p["timings"] for p in done.values()]
    if pair_times:
        arm = [r for p in done.values() for r in p["runs"].values() if "train_and_validate_s" in r]

        def mean_of(items: list[dict], key: str) -> float:
            vals = [i[key] for i in items if key in i]
            return float(np.mean(vals)) if vals else math.nan

        lines += [
            f"Per pair (mean over pairs, two pairs run at once, one thread each): imports "
            f"{mean_of(pair_times, 'imports_s'):.1f} s, trainer start-up {mean_of(arm, 'build_s'):.1f} s per arm, "
            f"fine-tuning and held-out validation {mean_of(arm, 'train_and_validate_s'):.1f} s per arm, Colin27 "
            f"{mean_of(arm, 'colin27_s'):.1f} s per arm, probe {mean_of(pair_times, 'probe_s'):.1f} s, whole pair "
            f"{mean_of(pair_times, 'total_s'):.1f} s.",
            "",
        ]
    lines += [
        "## What is real and what is synthetic",
        "",
        "Real: the T1 intensities and anatomy of the ICBM152 2009a template (an average of 152 adults, in nilearn) and "
        "its grey/white-matter maps, from which the labels come; Colin27 (one real person, Debian's mricron-data) "
        "and its AAL regions. Synthetic: every difference between the 32 study subjects, each that one anatomy "
        "under its own warp, contrast, bias field and noise (`tools/study_data.py`): the held-out subjects measure "
        "robustness to those changes on a known anatomy; Colin27 is the only other person.",
        "",
    ]
    path.write_text("\n".join(lines))
    return results


def choose_arm_settings(pilot: dict[str, dict[str, Any] | None]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The protocol's arm-wise rule over the pilot pairs: per arm, the (lr, layer decay) with the highest mean Dice
    on the tuning subjects; ties (to 3 decimals) to no layer decay, then the lower lr. Returns the choice per arm
    and the table rows (arm, lr, layer decay, mean ± SD, n)."""
    by: dict[tuple[str, float, float], list[float]] = {}
    for p in pilot.values():
        for run in (p or {}).get("runs", {}).values():
            by.setdefault((run["arm"], run["lr"], run["layer_decay"]), []).append(run["dice"])
    chosen: dict[str, dict[str, Any]] = {}
    rows = []
    for (arm, lr, ld), dice in sorted(by.items()):
        mean = float(np.mean(dice))
        rows.append(
            f"| {arm} | {lr:g} | {'none' if ld == 1.0 else f'{ld:g}'} | {mean:.4f} ± "
            f"{np.std(dice, ddof=1) if len(dice) > 1 else 0:.4f} | {len(dice)} |"
        )
        rank = (round(mean, 3), ld == 1.0, -lr)  # higher is better; ties to no layer decay, then the lower lr
        if arm not in chosen or rank > chosen[arm]["rank"]:
            chosen[arm] = {"lr": lr, "layer_decay": ld, "mean": mean, "n": len(dice), "rank": rank}
    for c in chosen.values():
        c.pop("rank")
    return chosen, rows


def write_pilot(path: Path, pilot: dict[str, dict[str, Any] | None], timings: dict[str, dict[str, Any]]) -> dict:
    chosen, rows = choose_arm_settings(pilot)
    done = [k for k, v in pilot.items() if v is not None]
    lines = [
        "# Pilot: each arm's lr and layer decay, chosen on the tuning subjects (16–23)",
        "",
        f"Pilot pairs done: {len(done)} of {len(pilot)} ({', '.join(done)}). Rule (PROTOCOL.md): per arm, the "
        "setting with the highest mean Dice on the tuning subjects over the pilot pairs; ties (3 decimals) to no "
        "layer decay, then the lower lr. No pilot model is part of the confirmatory test.",
        "",
        "| arm | lr | layer decay | tuning Dice, mean ± SD over pilot pairs | pairs |",
        "|---|---|---|---|---|",
        *rows,
        "",
        "Chosen: "
        + "; ".join(
            f"{arm}: lr {c['lr']:g}, layer decay {'none' if c['layer_decay'] == 1.0 else c['layer_decay']}"
            for arm, c in sorted(chosen.items())
        )
        + ".",
        "",
        "| stage | wall (s) |",
        "|---|---|",
        *[f"| {k} | {t['wall_s']:.0f} |" for k, t in timings.items() if t.get("wall_s") is not None],
        "",
    ]
    path.write_text("\n".join(lines))
    return chosen
