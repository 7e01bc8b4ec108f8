"""``brcd bench``: run the benchmarks in ``benchmarks/`` and record them in ``benchmarks/RESULTS.md``.

    brcd bench [--quick] [--only map,search,mih,step,encode,memory,bank,tune_bank,encode_ray,serve,gpu] [--output benchmarks/RESULTS.md]
               [--threads N] [--timer wall|cpu]

The benchmarks are a top-level folder of the source checkout, not part of the installed package:
this command finds it next to ``pipelines/`` (an editable install or a checkout) and says so
plainly when it is missing (e.g. installed from a wheel).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

BENCH_NAMES = ("map", "search", "mih", "step", "encode", "memory", "bank", "tune_bank", "encode_ray", "serve", "gpu")


def repo_root() -> Path:
    """The checkout holding ``pipelines/`` (and, in a source checkout, ``benchmarks/``)."""
    return Path(__file__).resolve().parents[1]


def load_runner():
    """Import ``benchmarks.run_all`` from the checkout; ``ValueError`` with a fix when it is absent."""
    root = repo_root()
    folder = root / "benchmarks"
    if not (folder / "run_all.py").is_file():
        raise ValueError(
            f"benchmarks folder not found at {folder} (brcd installed as a wheel?); run `brcd bench` from a source "
            "checkout installed in editable mode (pip install -e .), or `python -m benchmarks.run_all` inside it"
        )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    module = importlib.import_module("benchmarks.run_all")
    found = Path(module.__file__).resolve().parent
    if found != folder.resolve():
        raise ValueError(f"imported 'benchmarks' from {found}, not from {folder}; another package of that name "
                         "shadows the checkout's folder: run from the checkout or fix PYTHONPATH")
    return module


def _only(value: str) -> str:
    """argparse type of ``--only``: rejects unknown names at parse time (before anything is imported)."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCH_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown benchmark(s) {', '.join(unknown) or '(none given)'}; choose from {','.join(BENCH_NAMES)}")
    return ",".join(names)


def add_commands(sub, common) -> None:  # noqa: ARG001 - ``common`` (config args) is not needed here
    p = sub.add_parser(
        "bench", help="run the benchmarks and write benchmarks/RESULTS.md",
        description="Run the benchmark modules (each compares the project's code with a reference side by side in "
                    "one run) and write their tables, with the machine (platform, CPU, load, library versions, date), "
                    "into benchmarks/RESULTS.md. See docs/BENCHMARKS.md.")
    p.add_argument("--quick", action="store_true", help="small sizes / timm test models (seconds to a minute each)")
    p.add_argument("--only", default=None, metavar="NAMES", type=_only,
                   help=f"comma-separated subset of {','.join(BENCH_NAMES)} (default: all)")
    p.add_argument("--output", default=None, metavar="FILE",
                   help="results file (default: benchmarks/RESULTS.md of the checkout; '' to print only)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch threads for the step / encode benchmarks (default: torch's setting)")
    p.add_argument("--timer", choices=("wall", "cpu"), default="wall",
                   help="step / encode / mih: report wall-clock (default) or process CPU time (use with --threads 1 on a "
                        "machine shared with other jobs)")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    runner = load_runner()
    runner.parse_only(args.only)  # unknown names -> ValueError before anything runs
    return runner.run_from_args(args)
