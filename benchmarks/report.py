"""Write benchmark rows as markdown tables, one section per benchmark, plus machine details."""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import os
import platform
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from brcd.io import write_text

_COLUMNS = ("name", "value", "unit", "ratio", "note")
_HEADER = "# Benchmark results\n"


def machine_info() -> dict[str, str]:
    """Platform, CPU count and model, library versions, current date (UTC)."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": str(os.cpu_count()),
        "cpu_model": model,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    for mod in ("numpy", "torch", "faiss"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing library is just reported as such
            info[mod] = "not installed"
    try:
        load = os.getloadavg()
        info["load_average"] = " / ".join(f"{x:.2f}" for x in load)
    except OSError:
        pass
    return info


def load_string() -> str:
    """The 1/5/15-minute load averages as ``"a/b/c"`` (``"?"`` where unavailable)."""
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        return "?"


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run the block with ``torch.set_num_threads(n)`` (``None``: leave as is), then restore."""
    import torch

    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(int(n))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


TIMERS = ("wall", "cpu")


def check_timer(timer: str) -> str:
    """``"wall"`` (perf_counter) or ``"cpu"`` (process CPU time; robust on a shared machine with 1 thread)."""
    if timer not in TIMERS:
        raise ValueError(f"timer must be one of {', '.join(TIMERS)}, got {timer!r}")
    return timer


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if value != value:  # NaN
            return "nan"
        if abs(value) >= 100:
            return f"{value:,.1f}"
        if abs(value) >= 0.01 or value == 0:
            return f"{value:.4g}"
        return f"{value:.3g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def format_table(rows: Iterable[Mapping[str, Any]]) -> str:
    """Markdown table with the standard columns (missing cells left blank)."""
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in _COLUMNS) + " |")
    return "\n".join(lines)


def write_results(rows: list[Mapping[str, Any]], path: str | os.PathLike = "benchmarks/RESULTS.md", *,
                  note: str | None = None) -> Path:
    """Write ``rows`` into ``path`` (atomically).

    Rows are grouped by their ``benchmark`` key; each group replaces the section of the same name
    in an existing file and other sections are kept, so benchmarks can be run one at a time.
    The machine block at the top is refreshed on every write and each section carries its own
    machine line (CPU, load, versions, date); ``note`` (e.g. the mode and the command that produced
    the rows) is appended to that line.
    """
    path = Path(path)
    info = machine_info()
    sections: dict[str, str] = {}
    if path.exists():
        text = path.read_text()
        for m in re.finditer(r"^## (.+?)\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M):
            sections[m.group(1).strip()] = m.group(2).rstrip() + "\n"
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(str(row.get("benchmark", "results")), []).append(row)
    stamp = (
        f"_{info['date']}; {info['cpu_count']} x {info['cpu_model']}; load {info.get('load_average', '?')}; "
        f"numpy {info['numpy']}, torch {info['torch']}, faiss {info['faiss']}"
        + (f"; {note}" if note else "") + "_\n"
    )
    for name, group in groups.items():
        sections[name] = "\n" + stamp + "\n" + format_table(group) + "\n"
    machine = "\n".join(f"- {k}: {v}" for k, v in info.items())
    body = _HEADER + "\nLast written on this machine:\n\n" + machine + "\n\n"
    body += ("Timings are wall-clock on a shared machine (other jobs may run) unless the unit says CPU (process CPU "
             "time, used with 1 thread when the machine is oversubscribed); ratios compare runs made side by side "
             "(interleaved) in one run.\n")
    body += "What each number means and how to reproduce it: `docs/BENCHMARKS.md` (`brcd bench`).\n\n"
    body += "\n".join(f"## {name}\n{text}" for name, text in sorted(sections.items()))
    return write_text(path, body)


def print_rows(rows: Iterable[Mapping[str, Any]]) -> None:
    print(format_table(rows))


RESULTS = "benchmarks/RESULTS.md"
THREADS = ("--threads", {"type": int, "default": None, "help": "torch threads (default: torch's setting)"})
N_DB = ("--n-db", {"type": int, "default": None})
N_QUERIES = ("--n-queries", {"type": int, "default": None})


def timer_option(help: str) -> tuple[str, dict[str, Any]]:
    """``--timer wall|cpu`` (see :func:`check_timer`) with a benchmark's own help text."""
    return "--timer", {"choices": TIMERS, "default": "wall", "help": help}


def bench_main(doc: str, run: Callable[[argparse.Namespace], list[dict]], argv: list[str] | None,
               *options: tuple[str, dict[str, Any]], quick_help: str | None = None, write: bool = True) -> None:
    """One benchmark's command line: ``--quick``, ``options`` (flag, ``add_argument`` keywords) and, with
    ``write``, ``--output``; prints ``run(args)``'s rows and writes them to ``--output`` unless it is ''."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    for flag, kwargs in options:
        parser.add_argument(flag, **kwargs)
    if write:
        parser.add_argument("--output", default=RESULTS, help="results file ('' to skip writing)")
    args = parser.parse_args(argv)
    rows = run(args)
    print_rows(rows)
    if write and args.output:
        write_results(rows, args.output)
