"""Options and config loading shared by the commands that run a pipeline config."""

from __future__ import annotations

import argparse


def add_config_options(p: argparse.ArgumentParser, *, config_required: bool = True) -> None:
    p.add_argument("-c", "--config", required=config_required, default=None if config_required else "demo",
                   help="preset name or YAML file" + ("" if config_required else " (default: demo)"))
    p.add_argument("--output", "-o", required=not not config_required, default=None if config_required else "runs/demo",
                   help="output folder (everything the run writes goes here)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set distill.alpha=0.5 (repeatable)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join ('auto' or host:port); default: start a local Ray")
    p.add_argument("--workers", type=int, default=None, help="shortcut for --set resources.num_workers=N")


def load_config_args(args):
    """The config of ``-c`` with ``--set`` and ``--workers`` applied (config errors before slow imports)."""
    from brcd.config import load_config

    overrides = list(args.overrides)
    if args.workers is not None:
        overrides.append(f"resources.num_workers={args.workers}")
    return load_config(args.config, overrides)
