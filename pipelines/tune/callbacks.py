"""The Tune callbacks of the driver: each trial's MLflow run, and the clean-up of the placement groups
stopped trials leave reserved (Ray issue #54305). Imports Ray: the driver imports this module lazily."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Any

import ray
from ray.tune import Callback
from ray.tune.result import AUTO_RESULT_KEYS
from ray.util.placement_group import PlacementGroup

from brcd.config import Config
from brcd.io import save_json
from brcd.layout import RunLayout, tune_continue_file
from brcd.mlflow.tracking import dataset_name
from pipelines.stage_tracking import TuneTrialRuns
from pipelines.stages import say
from pipelines.tune import results as R
from pipelines.tune.space import TuneSpace, trial_run_params

log = logging.getLogger("brcd")

TUNE_KEYS = {*AUTO_RESULT_KEYS, "done", "trial_id", "checkpoint_path"}  # Tune's bookkeeping, not the trial's
MLFLOW_STATUS = {R.FAILED: "FAILED", R.UNFINISHED: "KILLED"}  # a row's status -> its run's; else FINISHED


def trial_runs(cfg: Config, tracker_uri: str, job: str) -> TuneTrialRuns:
    tags = {"dataset": dataset_name(cfg), "config": cfg.name}
    return TuneTrialRuns(tracker_uri, cfg.tracking.experiment, job, tags=tags)


class MlflowTrials(Callback):
    """Each trial's MLflow run (``TuneTrialRuns``), fed from the Tune driver. Not Ray's
    ``MLflowLoggerCallback``: it logs resumed trials twice and raises when the backend is down."""

    def __init__(self, runs: TuneTrialRuns, *, base: dict[str, Any], output: str):
        self.runs, self.base, self.output = runs, base, output

    def _guard(self, fn) -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - tracking never stops the search
            log.warning("MLflow: a trial's run was not updated (%s: %s); tuning continues", type(exc).__name__, exc)

    def _start(self, trial) -> None:
        trial_dir = RunLayout(Path(self.output)).trial_dir(trial.trial_id)
        self.runs.start(trial.trial_id, trial_run_params(self.base, trial.config), tags={"run_dir": str(trial_dir)})

    def _log(self, trial, result: dict[str, Any]) -> None:
        if trial.trial_id not in self.runs:
            self._start(trial)
        step = int(result.get("epoch") or result.get("training_iteration") or 0)
        self.runs.log(trial.trial_id, {k: v for k, v in result.items() if k not in TUNE_KEYS}, step)

    def setup(self, **info):
        self._guard(self.runs.attach)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._guard(lambda: self._start(trial))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._guard(lambda: self._log(trial, result))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._guard(lambda: self.runs.end(trial.trial_id, "FINISHED"))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._guard(lambda: self.runs.end(trial.trial_id, "FAILED"))


def _row_params(cfg: Config, space: TuneSpace, row: dict[str, Any]) -> dict[str, Any]:
    params = {n: row.get(n) for n in space.params}
    try:
        return trial_run_params(cfg, params)
    except (ValueError, TypeError):  # a trial whose sampled values were never saved
        return {n: v for n, v in params.items() if v is not None}


def finish_mlflow(tracker, cfg: Config, job: str, space: TuneSpace, rows: list[dict[str, Any]],
                  best: dict[str, Any] | None, artifacts: list[Path | None], interrupted: bool) -> None:
    """Every trial's final metrics and status (its row of the results), then the parent's summary."""
    if tracker.parent_run_id is None:
        return
    runs = trial_runs(cfg, str(tracker.uri), job)
    if runs.attach() is not None:
        runs.finish([{
            "trial_id": r[R.TRIAL_ID], "params": _row_params(cfg, space, r),
            "metrics": {k: r[k] for k in R.FINAL_METRICS if r.get(k) is not None}, "step": r[R.EPOCHS_RUN],
            "tags": {"status": r[R.STATUS], **({"error": r[R.ERROR]} if r.get(R.ERROR) else {})},
            "status": MLFLOW_STATUS.get(r[R.STATUS], "FINISHED"),
        } for r in rows])
    col = R.metric_column(space.search.metric)
    summary = {"trials": len(rows), "trials_unfinished": sum(r[R.STATUS] == R.UNFINISHED for r in rows)}
    if best is not None:
        summary[col] = best[col]
    tracker.finish_parent(metrics=summary, artifacts=[p for p in artifacts if p is not None],
                          tags={"best_trial_id": best[R.TRIAL_ID]} if best else None,
                          status="KILLED" if interrupted else "FINISHED")


# Placement groups left reserved by stopped trials (Ray issue #54305)


def orphaned_placement_groups() -> list[str]:
    """This job's reserved (CREATED) placement groups whose creating actor (a stopped trial's Train
    controller) is dead: they follow the live driver's job, so they stay reserved and starve the next
    trials. Reads the GCS table: the public ``placement_group_table`` drops the creator fields."""
    # Ray internals, imported here: if they move, only this check fails (the reaper reports it)
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    job = ray.get_runtime_context().get_job_id()
    created = gcs_pb2.PlacementGroupTableData.CREATED
    nil = ray.ActorID.nil().binary()
    out = []
    for blob in state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(blob)
        by_actor = pg.creator_actor_id and pg.creator_actor_id != nil[: len(pg.creator_actor_id)]  # not a driver
        orphaned = pg.creator_actor_dead and not pg.is_detached
        if pg.state == created and by_actor and orphaned and pg.creator_job_id.hex() == job:
            out.append(pg.placement_group_id.hex())
    return out


def remove_placement_groups(ids: list[str]) -> None:
    for pid in ids:
        ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(pid)))


RELEASED_PLACEMENT_GROUPS: list[str] = []  # freed in this process (for the summary)


def release_orphaned_placement_groups(why: str = "") -> list[str]:
    """Remove this job's orphaned groups (see :func:`orphaned_placement_groups`); log and return them."""
    ids = [i for i in orphaned_placement_groups() if i not in RELEASED_PLACEMENT_GROUPS]
    if ids:
        remove_placement_groups(ids)
        RELEASED_PLACEMENT_GROUPS.extend(ids)
        print(f"[tune] released {len(ids)} placement group(s) left reserved by a stopped trial's Train run"
              f"{why} (Ray issue #54305): {[i[:12] for i in ids]}", flush=True)
    return ids


class ContinueMarker(Callback):
    """Writes a trial's ``tune_continue.json`` once Tune has decided to continue it after a result with the
    metric (callbacks run after the scheduler): its Train workers wait for it at ASHA's rungs."""

    def __init__(self, output: str, metric: str):
        self.output, self.metric = output, metric

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if not result.get("done") and self.metric in result and "epoch" in result:
            save_json(tune_continue_file(RunLayout(self.output).trial_dir(trial.trial_id)), {"epoch": int(result["epoch"])})


class PlacementGroupReaper(Callback):
    """Frees the worker placement groups that stopped trials leave behind (Ray issue #54305),
    at most every ``interval_s`` during the run and whenever a trial ends."""

    def __init__(self, interval_s: float = 2.0):
        self.interval_s = interval_s  # the job id is read at run time: a restored run is a new job
        self._last = 0.0

    def reap(self, why: str = "") -> None:
        try:
            release_orphaned_placement_groups(why)
        except Exception as exc:  # Ray internals moved: the end-of-run check still reports leaks
            print(f"[tune] placement-group check unavailable ({type(exc).__name__}: {exc})", flush=True)
            self.interval_s = math.inf
        self._last = time.monotonic()

    def on_step_begin(self, iteration, trials, **info):
        if time.monotonic() - self._last >= self.interval_s:
            self.reap()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.reap(f" after trial {trial.trial_id}")

    on_trial_error = on_trial_complete


def created_placement_groups() -> set[str]:
    return {pid for pid, info in ray.util.placement_group_table().items() if info.get("state") == "CREATED"}


def check_placement_groups(before: set[str], *, wait_s: float = 20.0) -> list[dict[str, Any]]:
    """Placement groups created during the run and still CREATED up to ``wait_s`` after it (removal is
    asynchronous), then removed (Ray issue #54305)."""
    deadline = time.monotonic() + wait_s
    while True:
        with contextlib.suppress(Exception):
            release_orphaned_placement_groups(" after the run")
        table = ray.util.placement_group_table()
        leaked = [{"id": pid, **{k: info.get(k) for k in ("name", "state", "bundles")}}
                  for pid, info in table.items() if info.get("state") == "CREATED" and pid not in before]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if leaked:
        say(f"[tune] WARNING: {len(leaked)} placement group(s) still reserved after the run (Ray issue #54305): "
            f"{[p['id'][:12] for p in leaked]}; removing them")
        remove_placement_groups([p["id"] for p in leaked])
    else:
        say("[tune] placement groups: none left reserved after the run")
    return leaked
