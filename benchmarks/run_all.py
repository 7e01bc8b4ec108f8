"""Run several benchmarks in one process and record them in ``benchmarks/RESULTS.md``.

Every benchmark module exposes ``run(quick) -> list[dict]``; each compares the project's code with
its reference *inside one run* (interleaved rounds), so the ratios in one section were measured
side by side under the same load. Sections are written as soon as their benchmark finishes and
replace the section of the same name (others are kept), so a subset can be re-run alone.

Usage: ``python -m benchmarks.run_all [--quick] [--only step,encode] [--output benchmarks/RESULTS.md]
[--threads N] [--timer wall|cpu]``
(the same as ``brcd bench``).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
import time
import traceback
from pathlib import Path

from pipelines.commands.bench import BENCH_NAMES, add_arguments, parse_only

#: name -> module, in the default running order (the names are the CLI's: ``brcd bench --only``).
BENCHMARKS: dict[str, str] = {name: f"benchmarks.bench_{name}" for name in BENCH_NAMES}
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "RESULTS.md"


def run_all(only: str | list[str] | None = None, *, quick: bool = False, output: str | os.PathLike | None = DEFAULT_OUTPUT,
            threads: int | None = None, timer: str = "wall", echo=print) -> tuple[list[dict], list[str]]:
    """Run the selected benchmarks; write each one's section into ``output`` (``None``: don't write).

    ``threads`` / ``timer`` go to the benchmarks whose ``run`` accepts them (step, encode: torch
    threads and wall-clock vs process-CPU timing); the others run as they are.
    Returns ``(rows, failed)``: every row produced and the names of the benchmarks that raised
    (their traceback is printed; a failed benchmark leaves its previous section untouched).
    """
    from .report import format_table, write_results

    names = parse_only(only)
    mode = "quick" if quick else "full"
    rows: list[dict] = []
    failed: list[str] = []
    for name in names:
        echo(f"== {name} ({mode}) ==")
        t0 = time.perf_counter()
        try:
            module = importlib.import_module(BENCHMARKS[name])
            accepted = inspect.signature(module.run).parameters
            extra = {k: v for k, v in (("threads", threads), ("timer", timer)) if k in accepted}
            got = module.run(quick, **extra)
        except Exception:  # noqa: BLE001 - report and continue with the next benchmark
            traceback.print_exc()
            failed.append(name)
            continue
        seconds = time.perf_counter() - t0
        echo(format_table(got))
        echo(f"({name}: {seconds:.0f} s)\n")
        rows.extend(got)
        if output is not None and got:
            flags = (" --quick" if quick else "") + (f" --threads {threads}" if threads is not None and "threads" in extra else "")
            flags += f" --timer {timer}" if timer != "wall" and "timer" in extra else ""
            write_results(got, output, note=f"{mode} mode, {seconds:.0f} s; `brcd bench --only {name}{flags}`")
    return rows, failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_from_args(args)


def run_from_args(args: argparse.Namespace) -> int:
    output = DEFAULT_OUTPUT if args.output is None else (Path(args.output) if args.output else None)
    names = parse_only(args.only)
    t0 = time.perf_counter()
    _rows, failed = run_all(names, quick=args.quick, output=output, threads=getattr(args, "threads", None),
                            timer=getattr(args, "timer", "wall"))
    where = f"; results in {output}" if output is not None else ""
    print(f"bench: {len(names) - len(failed)}/{len(names)} benchmarks done in {time.perf_counter() - t0:.0f} s{where}")
    if failed:
        print(f"bench: failed: {', '.join(failed)} (tracebacks above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
