"""The tuning results table (``DIR/tune_results.csv``): the one owner of its column names, with its
writer and its reader. One row per trial, best first."""

from __future__ import annotations

import csv
import io as _io
import math
from pathlib import Path
from typing import Any

from brcd import io
from brcd.config import Config
from brcd.layout import RunLayout, stage_file
from pipelines.tune.space import METRICS, TuneSpace

EXPERIMENT = "tune"  # the Tune experiment's folder under DIR
TRIAL_ID, STATUS, EPOCHS_RUN, ERROR = "trial_id", "status", "epochs_run", "error"
# the statuses (a row's STATUS)
TERMINATED = "terminated"  # ran to the end and saved its weights
PATIENCE_STOP = "terminated (patience early stop)"  # the loop's own early stopping ended it
ASHA_STOP = "stopped early by ASHA"
ASHA_LAST_STOP = "stopped by ASHA at the last epoch"  # all its metrics, but no weights
FAILED = "error"
UNFINISHED = "unfinished"  # the run was interrupted; the same command resumes it


def metric_column(metric: str, which: str = "best") -> str:
    """The column of ``metric`` (``map_asymmetric``...): its ``best`` or its ``final`` value."""
    return f"{which}_{metric}"


FINAL_METRICS = (EPOCHS_RUN, *(metric_column(m, w) for m in METRICS for w in ("final", "best")))


def number(value: Any) -> float | None:
    """``value`` as a finite float, else None (a metric the trial never reported)."""
    try:
        return out if math.isfinite(out := float(value)) else None
    except (TypeError, ValueError):
        return None


def _saved_params(trial_path: str | None) -> dict[str, Any]:
    """The sampled parameters Tune saved for a trial (also for trials that never reported)."""
    try:
        return io.load_json(Path(trial_path) / "params.json")
    except Exception:
        return {}


def _saved_statuses(exp_dir: Path) -> dict[str, str]:
    """Trial id -> status in the saved experiment state (empty if it cannot be read)."""
    try:
        from ray.tune import ExperimentAnalysis  # Ray only once a run has finished: the CLI starts without it

        return {t.trial_id: t.status for t in ExperimentAnalysis(str(Path(exp_dir).resolve())).trials}
    except Exception:
        return {}


def _status(tune_status: str | None, errored: bool, finished: bool, ran: int, epochs: int) -> str:
    if errored or tune_status == "ERROR":
        return FAILED
    if tune_status in ("PENDING", "RUNNING", "PAUSED"):
        return UNFINISHED
    if finished:
        return TERMINATED if ran >= epochs else PATIENCE_STOP
    return ASHA_STOP if ran < epochs else ASHA_LAST_STOP


def result_rows(grid, space: TuneSpace, cfg: Config, output: Path) -> list[dict[str, Any]]:
    """One row per trial of a Tune ``ResultGrid``: parameters, status, epochs run, final and best metrics."""
    trials = {t.trial_id: t for t in getattr(getattr(grid, "_experiment_analysis", None), "trials", None) or []}
    saved = _saved_statuses(output / EXPERIMENT)
    rows = []
    for result in grid:
        m = result.metrics or {}
        trial_id = m.get("trial_id") or Path(result.path).name.removeprefix("trial_")
        trial = trials.get(trial_id)
        config = result.config or getattr(trial, "config", None) or _saved_params(result.path)
        ran = int(m["epoch"]) if number(m.get("epoch")) is not None else 0
        # the saved state is what a resume sees: after an interruption Tune marks the trials it
        # stopped TERMINATED in memory, but saves them as unfinished
        tune_status = saved.get(trial_id) or getattr(trial, "status", None)
        finished = stage_file(RunLayout(output).trial_dir(trial_id)).exists()
        row = {TRIAL_ID: trial_id, **{n: config.get(n) for n in space.params},
               STATUS: _status(tune_status, result.error is not None, finished, ran, cfg.distill.optim.epochs),
               EPOCHS_RUN: ran}
        for key in METRICS:
            row[metric_column(key, "final")] = number(m.get(key))
            row[metric_column(key)] = number(m.get(f"best_{key}"))
        row[ERROR] = "" if result.error is None else str(result.error).strip().splitlines()[-1][:200]
        rows.append(row)
    col = metric_column(space.search.metric)
    rows.sort(key=lambda r: (-(r[col] if r[col] is not None else -math.inf), r[TRIAL_ID]))
    return rows


def best_row(rows: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """The best trial by ``best_<metric>`` (``rows`` come best first), or None."""
    return next((r for r in rows if r[STATUS] != FAILED and r.get(metric_column(metric)) is not None), None)


def result_columns(space: TuneSpace) -> list[str]:
    metric = space.search.metric
    other = [m for m in METRICS if m != metric]
    return ([TRIAL_ID, *space.params, STATUS, EPOCHS_RUN, metric_column(metric), metric_column(metric, "final")]
            + [metric_column(m, w) for m in other for w in ("best", "final")] + [ERROR])


def write_results(rows: list[dict[str, Any]], space: TuneSpace, path: Path) -> Path:
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=result_columns(space), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
    return io.write_text(path, buf.getvalue())


def read_results(path: Path) -> list[dict[str, str]]:
    """The rows of a results table as written (text values, best first); raise ValueError without ``trial_id``."""
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    if rows and TRIAL_ID not in (reader.fieldnames or []):
        raise ValueError(f"{path} has no {TRIAL_ID} column; it is not a tuning job's results table")
    return rows


def format_table(rows: list[dict[str, Any]], space: TuneSpace) -> str:
    """The table printed at the end of a run: the CSV's columns without ``error`` and ``final_map_symmetric``."""
    cols = [c for c in result_columns(space) if c not in (ERROR, metric_column("map_symmetric", "final"))]

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    table = [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) if table else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(t, widths)) for t in table]
    return "\n".join(lines)
