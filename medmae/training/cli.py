"""Shared command-line handling of the launch scripts: ``--config FILE`` plus dotted ``key=value`` overrides, in any
order with the flags (``--config F a=1 --pretrained E b=2``)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from medmae.config import field_docs, load_config
from medmae.io import resolve_local
from medmae.tasks import task_class, task_names
from medmae.training.config import JobConfig


def sections_help() -> str:
    lines = ["config sections and keys (override any with section.key=value):"]
    for f in dataclasses.fields(JobConfig):
        if dataclasses.is_dataclass(f.default_factory):
            lines.append(f"  {f.name}: " + ", ".join(field_docs(f.default_factory)))
        elif f.name == "task":
            lines.append(f"  task: {' | '.join(task_names())}")
    lines.append("  model: name=<registered model> plus any key of that model's config (img_size, depth, ...)")
    for name in task_names():
        options = field_docs(task_class(name).options)
        if options:
            lines.append(f"  finetune (task {name}): " + ", ".join(options))
    return "\n".join(lines)


class OverrideParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose ``parse_args`` takes flags and positional ``key=value`` overrides intermixed.

    Plain ``parse_args`` fills a ``nargs="*"`` positional from the first run of positionals only, so overrides after
    another flag (``--config X a=1 --pretrained E b=2``) were "unrecognized arguments"; ``parse_intermixed_args``
    collects them all."""

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:
        return self.parse_intermixed_args(args, namespace)


def parser(description: str, epilog: str | None = None) -> OverrideParser:
    """``--config`` and ``KEY=VALUE`` overrides; the epilog lists the job config's sections unless given."""
    ap = OverrideParser(
        description=description,
        epilog=sections_help() if epilog is None else epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--config", help="YAML file with the values that differ from the defaults")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. optim.base_lr=1e-4")
    return ap


def load_job(args: Any) -> JobConfig:
    """Build the job config, printing a one-line error (not a traceback) for a bad key or value."""
    try:
        return load_config(JobConfig, args.config, args.overrides)
    except ValueError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def absolute_paths(cfg: JobConfig) -> JobConfig:
    """Resolve local relative paths against the launching directory: worker processes may start elsewhere."""
    cfg.run.output_dir = resolve_local(cfg.run.output_dir)
    cfg.dist.storage_path = resolve_local(cfg.dist.storage_path)
    cfg.data.path = resolve_local(cfg.data.path)
    for source in cfg.data.datasets:
        source.path = resolve_local(source.path)
    if hasattr(cfg.finetune, "pretrained"):
        cfg.finetune.pretrained = resolve_local(cfg.finetune.pretrained)
    return cfg
