"""Label-efficiency sweep: Ray Tune over fine-tuning trials (init × train fraction × lr × seed), then the report.

    ray job submit --working-dir . -- python launch/sweep.py --config configs/sweep_btcv.yaml [key=value ...]
    python launch/sweep.py --config configs/sweep_debug.yaml       # no cluster: starts a local Ray

Each trial fine-tunes on its own Ray Train workers; a worker that dies restarts from the trial's checkpoint.
Re-running with the same name skips finished trials and resumes interrupted ones. The sweep directory
(<storage_path>/<name>/) gets results.csv, summary.md and label_efficiency.png, regenerated as trials finish.
Override any sweep key (grid.seeds=[0,1], resources.workers=2) or any fine-tuning key of every trial
(overrides.train.max_steps=500).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `ray job submit --working-dir .` runs from a copy

from medmae.config import field_docs, load_config  # noqa: E402
from medmae.sweep import SweepConfig  # noqa: E402
from medmae.training.logs import setup_logging  # noqa: E402


def main() -> None:
    keys = ", ".join(field_docs(SweepConfig))
    ap = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"sweep keys: {keys}; see medmae/sweep/config.py",
    )
    ap.add_argument("--config", help="sweep YAML (values that differ from SweepConfig's defaults)")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. grid.seeds=[0,1]")
    args = ap.parse_args()
    try:
        cfg = load_config(SweepConfig, args.config, args.overrides)
        from medmae.sweep.grid import trial_jobs

        trial_jobs(cfg)  # config errors of any trial, as one line, before Ray starts
    except ValueError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    setup_logging(rank=0)
    from medmae.sweep import run_sweep

    paths = run_sweep(cfg)
    print(paths["summary"].read_text())
    print(f"sweep directory: {paths['summary'].parent}\n" + "\n".join(f"  {p}" for p in paths.values()))


if __name__ == "__main__":
    main()
