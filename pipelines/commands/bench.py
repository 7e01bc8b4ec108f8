"""``brcd bench``: run the benchmarks in ``benchmarks/`` and record them in ``benchmarks/RESULTS.md``.

    brcd bench [--quick] [--only map,search,mih,step,encode,memory,bank,tune_bank,encode_ray,serve,gpu] [--output benchmarks/RESULTS.md]
               [--threads N] [--timer wall|cpu]

The benchmarks are a top-level folder of the source checkout, not part of the installed package, so
the command runs ``python -m benchmarks.run_all`` in the checkout as its own process (it never imports
them) and says so plainly when the folder is missing (e.g. installed from a wheel).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

#: the benchmarks, in their default running order (cheap and CPU-bound first, GPU last)
BENCH_NAMES = ("map", "search", "mih", "step", "encode", "memory", "bank", "tune_bank", "encode_ray", "serve", "gpu")


def parse_only(only: str | list[str] | None) -> list[str]:
    """``"step,encode"`` -> ``["step", "encode"]`` (validated); ``None`` -> every benchmark."""
    if not only:
        return list(BENCH_NAMES)
    names = [n.strip() for n in (only.split(",") if isinstance(only, str) else only) if n.strip()]
    unknown = [n for n in names if n not in BENCH_NAMES]
    if unknown or not names:
        raise ValueError(f"unknown benchmark(s) {', '.join(unknown) or '(none given)'}; choose from {','.join(BENCH_NAMES)}")
    return names


class BenchRunner:
    """The checkout's ``benchmarks/run_all.py``, run as a child process from the checkout."""

    parse_only = staticmethod(parse_only)

    def __init__(self, root: Path):
        self.root = root

    def run_from_args(self, args: argparse.Namespace) -> int:
        argv = ["--quick"] * bool(args.quick) + ["--timer", args.timer]
        if args.only:
            argv += ["--only", args.only]
        if args.threads is not None:
            argv += ["--threads", str(args.threads)]
        if args.output is not None:  # relative to where the user stands, not to the checkout
            argv += ["--output", str(Path(args.output).resolve()) if args.output else ""]
        return subprocess.call([sys.executable, "-m", "benchmarks.run_all", *argv], cwd=self.root)


def load_runner() -> BenchRunner:
    """The checkout's benchmark runner; ``ValueError`` with a fix when the folder is absent."""
    root = Path(__file__).resolve().parents[2]  # the checkout holding pipelines/ (and benchmarks/)
    if not (root / "benchmarks" / "run_all.py").is_file():
        raise ValueError(
            f"benchmarks folder not found at {root / 'benchmarks'} (brcd installed as a wheel?); run `brcd bench` from "
            "a source checkout installed in editable mode (pip install -e .), or `python -m benchmarks.run_all` inside it"
        )
    return BenchRunner(root)


def _only(value: str) -> str:
    """argparse type of ``--only``: rejects unknown names at parse time (before anything is imported)."""
    try:
        return ",".join(parse_only(value or None))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``brcd bench`` and ``python -m benchmarks.run_all`` (one spelling for both)."""
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


def add_commands(sub, common) -> None:  # noqa: ARG001 - ``common`` (config args) is not needed here
    p = sub.add_parser(
        "bench", help="run the benchmarks and write benchmarks/RESULTS.md",
        description="Run the benchmark modules (each compares the project's code with a reference side by side in "
                    "one run) and write their tables, with the machine (platform, CPU, load, library versions, date), "
                    "into benchmarks/RESULTS.md. See docs/BENCHMARKS.md.")
    add_arguments(p)
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    return load_runner().run_from_args(args)
