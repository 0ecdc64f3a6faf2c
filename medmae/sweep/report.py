"""The label-efficiency report, rebuilt from every trial's files: ``results.csv``, ``summary.md``, the figure.

A trial's run directory (``<sweep>/trials/<name>/``) holds the trainer's ``results.json`` (validation history, best,
and the picked model's score on the report split, ``test``) and the sweep's ``trial.json`` (status, wall time).
Nothing else is needed, so the report can be regenerated at any time, also for a sweep that is still running or was
interrupted.

What is reported is never what was picked on (``SweepConfig.selection``): a trial's score is its final model's, or
its best selection-split checkpoint's, on the validation split; the lr of an init × fraction is the one with the best
mean selection-split score. A trial's own results say which split each entry scored (``split``).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from medmae.data.config import SELECTION_SPLIT
from medmae.io import atomic_write_bytes
from medmae.sweep.grid import TrialSpec, format_lr

__all__ = ["collect_rows", "read_trial_status", "write_report"]

logger = logging.getLogger(__name__)

TRIAL_FILE = "trial.json"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_trial_status(run_dir: Path) -> dict[str, Any]:
    """``trial.json`` of a trial (status done/failed/stopped, wall_time_s), or ``{"status": "pending"}``."""
    return _read_json(run_dir / TRIAL_FILE) or {"status": "pending"}


def reported_entries(results: dict[str, Any], selection: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the reported entry, its selection-split entry or {}) of a trial's ``results.json``.

    ``final``: the last validation (its report-split score when a selection split was carved). ``checkpoint``: the
    best selection-split checkpoint scored on the report split (``test``); nothing before the trial ends."""
    history = results.get("history") or []
    best = results.get("best") or {}
    if selection == "checkpoint":
        picked = best if best.get("split") == SELECTION_SPLIT else {}
        return (results.get("test") or {}) if picked else {}, picked
    last = history[-1] if history else {}
    if last.get("split") == SELECTION_SPLIT:
        test = results.get("test") or {}
        return (test if test.get("step") == last.get("step") else {}), last
    return last, {}


def collect_rows(trials_dir: Path, specs: Iterable[TrialSpec], selection: str = "final") -> list[dict[str, Any]]:
    """One row per trial of the grid: parameters, status, the reported step, split, score and per-class values, and
    the score on the selection split that chose the lr."""
    rows = []
    for spec in specs:
        run_dir = trials_dir / spec.name
        status = read_trial_status(run_dir)
        results = _read_json(run_dir / "results.json") or {}
        reported, picked = reported_entries(results, selection)
        metric, groups = _metric_names(results)
        row: dict[str, Any] = {
            "trial": spec.name,
            **spec.params(),
            "status": status["status"],
            "step": reported.get("step"),
            "split": reported.get("split", "validation" if reported else None),
            "metric": metric,
            "score": reported.get("score"),
            "select_score": picked.get("score"),
            "wall_time_s": status.get("wall_time_s"),
        }
        # the task's per-class groups as <group>/<class> columns (the only columns with a '/'), then its other means
        for group in groups:
            row.update({f"{group}/{k}": v for k, v in (reported.get(group) or {}).items()})
        row.update({k: v for k, v in reported.items() if k.startswith("mean_")})
        rows.append(row)
    return rows


def _results_csv(rows: list[dict[str, Any]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})
    return out.getvalue()


def _metric_names(results: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
    """The score's name and the per-class metric groups: recorded in results.json, else (files written before they
    were) from the task's spec."""
    if "metric_groups" in results:
        return results.get("metric", ""), tuple(results["metric_groups"])
    if not results.get("task"):
        return "", ()
    from medmae.tasks import task_class

    spec = task_class(results["task"])
    return spec.metric, spec.metric_groups


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _stats(values: list[float]) -> tuple[float, float, int]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0, len(a)


def _fmt(mean: float, std: float, n: int) -> str:
    return f"{mean:.3f} ± {std:.3f}" if n > 1 else f"{mean:.3f} (n=1)"


def aggregate(rows: list[dict[str, Any]]) -> dict[tuple[str, float], dict[str, Any]]:
    """(init, fraction) -> the lr with the best mean selection-split score over seeds, with mean, std and n of every
    reported metric column. An lr is chosen on the reported score only when it is the only one (nothing is chosen).

    Only trials with a finite reported score count (done, or stopped early by ASHA: the checkpoint it had picked).
    """
    groups: dict[tuple[str, float, float], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if _finite(row.get("score")):
            groups[(row["init"], row["train_fraction"], row["lr"])].append(row)
    best: dict[tuple[str, float], dict[str, Any]] = {}
    lrs: dict[tuple[str, float], set[float]] = defaultdict(set)
    for init, frac, lr in groups:
        lrs[(init, frac)].add(lr)
    for (init, frac, lr), members in groups.items():
        cols = [k for k in members[0] if k == "score" or "/" in k]  # the score and the task's metric groups
        stats = {c: _stats([m[c] for m in members if _finite(m.get(c))]) for c in cols}
        picks = [m.get("select_score") for m in members]
        if all(_finite(p) for p in picks):
            key, rule = float(np.mean(picks)), "selection"
        elif len(lrs[(init, frac)]) == 1:
            key, rule = 0.0, "only"
        else:
            raise ValueError(
                f"{init} at fraction {frac:g}: {len(lrs[(init, frac)])} learning rates but trials without a "
                "selection-split score; the lr would be chosen on the reported volumes"
            )
        entry = {"lr": lr, "stats": stats, "seeds": sorted(m["seed"] for m in members), "key": key, "rule": rule}
        if (init, frac) not in best or key > best[(init, frac)]["key"]:
            best[(init, frac)] = entry
    return best


def selection_rule(rows: list[dict[str, Any]], agg: dict[tuple[str, float], dict[str, Any]], selection: str) -> str:
    """The sentence ``summary.md`` states: what each trial reports and how the lr was chosen."""
    split = next((r["split"] for r in rows if r.get("split")), "validation")
    if selection == "checkpoint":
        what = (
            "the checkpoint with the best score on the selection split (training volumes carved out by "
            f"data.select_count / select_fraction), scored once on the {split} split"
        )
    else:
        what = f"its final model (no checkpoint picked), scored on the {split} split"
    rules = {e["rule"] for e in agg.values()}
    lr = (
        "the lr of each init × fraction is the one with the best mean selection-split score"
        if rules == {"selection"}
        else "each init × fraction has one lr (nothing chosen)"
        if rules == {"only"}
        else "the lr is chosen on the selection split where the grid has several, else the only one"
    )
    return f"Reported per trial: {what}; {lr}. Nothing reported was used to choose anything (selection: {selection})."


def _summary_md(
    rows: list[dict[str, Any]], agg: dict[tuple[str, float], dict[str, Any]], title: str, selection: str
) -> str:
    metric = next((r["metric"] for r in rows if r["metric"]), "score")
    inits = [i for i in ("scratch", "mae") if any(k[0] == i for k in agg)]
    fractions = sorted({k[1] for k in agg})
    counts: dict[str, int] = defaultdict(int)
    for row in rows:
        counts[row["status"]] += 1
    lines = [
        f"# {title}: label efficiency",
        "",
        f"Trials: {len(rows)} ({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))}). "
        f"Mean {metric}, mean ± std over seeds.",
        "",
        selection_rule(rows, agg, selection),
        "",
    ]
    header = ["train fraction"] + [f"{i} {metric}" for i in inits] + (["Δ mae − scratch"] if len(inits) == 2 else [])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for frac in fractions:
        cells = [f"{frac:g}"]
        for init in inits:
            e = agg.get((init, frac))
            cells.append(f"{_fmt(*e['stats']['score'])} (lr {format_lr(e['lr'])})" if e else "—")
        if len(inits) == 2:
            a, b = agg.get(("scratch", frac)), agg.get(("mae", frac))
            cells.append(f"{b['stats']['score'][0] - a['stats']['score'][0]:+.3f}" if a and b else "—")
        lines.append("| " + " | ".join(cells) + " |")
    per_class = sorted({c for e in agg.values() for c in e["stats"] if c != "score" and not c.startswith("hd95/")})
    if per_class:
        lines += [
            "",
            "Per class (mean ± std over seeds):",
            "",
            "| init | fraction | " + " | ".join(c.split("/", 1)[1] for c in per_class) + " |",
            "|---|---|" + "---|" * len(per_class),
        ]
        for (init, frac), e in sorted(agg.items(), key=lambda kv: (kv[0][1], kv[0][0] != "scratch")):
            vals = [_fmt(*e["stats"][c]) if c in e["stats"] and e["stats"][c][2] else "—" for c in per_class]
            lines.append(f"| {init} | {frac:g} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def _plot(agg: dict[tuple[str, float], dict[str, Any]], metric: str, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
    for init, color in (("scratch", "tab:gray"), ("mae", "tab:blue")):
        points = sorted((frac, e["stats"]["score"]) for (i, frac), e in agg.items() if i == init)
        if points:
            x = [p[0] for p in points]
            ax.errorbar(
                x,
                [p[1][0] for p in points],
                yerr=[p[1][1] for p in points],
                marker="o",
                capsize=4,
                color=color,
                label="MAE self pre-trained" if init == "mae" else "from scratch",
            )
    ax.set_xscale("log")
    fractions = sorted({k[1] for k in agg})
    ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
    ax.minorticks_off()
    ax.set_xlabel("fraction of labelled training volumes")
    ax.set_ylabel(f"validation mean {metric} (mean ± std over seeds)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if agg:
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_report(root: Path, specs: Iterable[TrialSpec], title: str, selection: str = "final") -> dict[str, Path]:
    """Regenerate ``results.csv``, ``summary.md`` and ``label_efficiency.png`` in ``root`` (each written atomically).

    ``selection``: the sweep's ``SweepConfig.selection`` (what each trial reports)."""
    root.mkdir(parents=True, exist_ok=True)
    rows = collect_rows(root / "trials", specs, selection)
    agg = aggregate(rows)
    metric = next((r["metric"] for r in rows if r["metric"]), "score")
    paths = {"csv": root / "results.csv", "summary": root / "summary.md", "plot": root / "label_efficiency.png"}
    atomic_write_bytes(paths["csv"], _results_csv(rows).encode())
    atomic_write_bytes(paths["summary"], _summary_md(rows, agg, title, selection).encode())
    atomic_write_bytes(paths["plot"], _plot(agg, metric, title))
    logger.info("report: %s", ", ".join(str(p) for p in paths.values()))
    return paths
