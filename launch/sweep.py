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

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `ray job submit --working-dir .` runs from a copy

from medmae.config import field_docs, load_config  # noqa: E402
from medmae.sweep import SweepConfig  # noqa: E402
from medmae.training.cli import parser  # noqa: E402
from medmae.training.logs import setup_logging  # noqa: E402


def parse(argv: list[str] | None = None) -> SweepConfig:
    """The command line (flags and key=value overrides in any order) -> the sweep config, every trial's config
    checked; a config error exits with one line, before Ray starts."""
    keys = ", ".join(field_docs(SweepConfig))
    ap = parser(__doc__, epilog=f"sweep keys: {keys}; see medmae/sweep/config.py")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(SweepConfig, args.config, args.overrides)
        from medmae.sweep.grid import trial_jobs

        trial_jobs(cfg)
    except ValueError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return cfg


def main() -> None:
    cfg = parse()
    setup_logging(rank=0)
    from medmae.sweep import run_sweep

    paths = run_sweep(cfg)
    print(paths["summary"].read_text())
    print(f"sweep directory: {paths['summary'].parent}\n" + "\n".join(f"  {p}" for p in paths.values()))


if __name__ == "__main__":
    main()
