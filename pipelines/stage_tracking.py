"""MLflow tracking of the pipeline stages, logged from the driver and the Train controller only.

:func:`tracker_for` builds a :class:`MlflowStageTracker` (``run.tracker`` of :class:`pipelines.stages.Run`;
backend ``tracking.tracking_uri`` > ``$MLFLOW_TRACKING_URI`` > ``sqlite:///<output>/mlflow.db``). The
experiment is created once, on the driver, before any run (SQLite creation races); a dead ``http`` server
is found with one quick connection attempt instead of MLflow's retry schedule. Every call then goes through
:class:`brcd.mlflow.tracking.Tracker`: a backend that goes away turns tracking into a no-op with one warning.

Each stage is one MLflow run named after its tag: params = the flattened config; tags ``stage``,
``dataset``, ``teacher_fingerprint``, ``run_dir``, ``config`` (+ ``trial_id``); metrics = every numeric
value of each ``ray.train.report`` at ``step=epoch``, streamed by :class:`MlflowMetricsCallback` from the
Train controller (what it missed, e.g. in local mode, is filled in from the stage's history at the end);
artifacts = ``config.yaml``, the cluster files, ``precision_recall.png``, ``retrieval_grid.png`` and
``results.md`` / ``results.json``. The run id is kept in ``<stage folder>/mlflow_runs/<run name>.json``, so
an interrupted stage re-attaches to its run and a finished one gets a new run (docs/MLFLOW.md).

``brcd compare`` and ``brcd tune`` are a parent run with nested runs (:meth:`MlflowStageTracker.start_parent`,
:meth:`MlflowStageTracker.for_trial`); a tuning job's trials are logged from the Tune driver by
:class:`TuneTrialRuns`.
"""

from __future__ import annotations

import copy
import logging
import os
import socket
from pathlib import Path
from typing import Any, Iterable, Mapping
from urllib.parse import urlparse

from ray.train import UserCallback

from brcd import io
from brcd import layout as lay
from brcd.plots import render_retrieval_grid
from brcd.mlflow.tracking import Tracker, dataset_name

__all__ = ["MlflowMetricsCallback", "MlflowStageTracker", "TuneTrialRuns", "tracker_for"]

log = logging.getLogger("brcd")

CORE_STAGES = ("teacher", "clusters", "evaluate")  # every other stage tag trains a student
_OPEN_STATUSES = ("RUNNING", "SCHEDULED", "FAILED", "KILLED")  # an interrupted stage: re-attach
JOB_TAG = "brcd.job"  # a job's deterministic key, on its parent run and on its trials' runs
TUNE_KIND, TRIAL_KIND = "tune", "tune_trial"  # brcd.kind of a tuning job's parent run / trial runs


def _say(msg: str) -> None:
    print(msg, flush=True)


# Construction


def tracker_for(cfg: Any, output: str | os.PathLike, *, experiment: str | None = None) -> "MlflowStageTracker":
    """The stage tracker of a run: backend ``cfg.tracking.tracking_uri`` > ``$MLFLOW_TRACKING_URI``
    > ``sqlite:///<output>/mlflow.db``; creates the experiment (default ``tracking.experiment``) now, on
    the driver, before any run. ``tracking.enabled=false`` gives a tracker whose hooks do nothing."""
    tracker = Tracker.from_config(cfg.tracking, Path(output))
    if experiment:
        tracker.experiment = experiment
    if tracker.enabled:
        _probe_server(tracker)
        tracker.ensure_experiment()
    return MlflowStageTracker(tracker, cfg=cfg)


def _probe_server(tracker: Tracker, timeout_s: float = 3.0) -> None:
    """One TCP connection attempt to an http(s) tracking server; a refusal disables tracking with
    the tracker's single warning (MLflow itself would retry for minutes)."""
    parsed = urlparse(str(tracker.uri))
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout_s):
            pass
    except OSError as exc:
        tracker._disable(ConnectionError(f"cannot connect to {parsed.hostname}:{port} ({exc})"))


def _search_runs(tracker: Tracker, tags: Mapping[str, str]) -> list:
    """The experiment's active runs whose tags have these values, oldest first (every page)."""
    where = " and ".join(f"tags.`{k}` = '{str(v).replace(chr(39), '')}'" for k, v in tags.items())

    def go() -> list:
        found, token = [], None
        while True:
            page = tracker.client.search_runs([tracker.experiment_id], filter_string=where, max_results=1000,
                                              order_by=["attributes.start_time ASC"], page_token=token)
            found += list(page)
            token = page.token
            if not token:
                return found

    return tracker.call("search_runs", go) or []


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "_"


def _numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[key] = float(value)
    return out


# The Ray Train callback (runs in the controller process)


class MlflowMetricsCallback(UserCallback):
    """Logs rank 0's metrics of every ``ray.train.report`` to one MLflow run, ``step=epoch``.

    Ray ships this object to the Train controller actor (scheduled on the driver's node), so it
    holds only plain values (URI, experiment, run id); the MLflow client is created there on first
    use and never pickled.
    """

    def __init__(self, uri: str, experiment: str, run_id: str, stage: str):
        self.uri = uri
        self.experiment = experiment
        self.run_id = run_id
        self.stage = stage
        self._tracker: Tracker | None = None
        self._reports = 0

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_tracker"] = None
        return state

    @property
    def tracker(self) -> Tracker:
        if self._tracker is None:
            self._tracker = Tracker(self.uri, self.experiment)
        return self._tracker

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        self._reports += 1
        if not metrics:
            return
        try:
            values = _numeric(metrics[0] or {})
            step = int(values.get("epoch", self._reports))
            self.tracker.log_metrics(self.run_id, values, step=step)
        except Exception as exc:  # noqa: BLE001 - never take the controller down for tracking
            log.warning("MLflow metrics callback of %s failed (%s); training continues", self.stage, exc)

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        try:
            rank, exc = next(iter(sorted(worker_exceptions.items(), key=lambda kv: kv[0])))
            text = " ".join(str(exc).split())[-500:]
            self.tracker.set_tags(self.run_id, {"brcd.last_error": f"rank {rank}: {type(exc).__name__}: {text}"})
        except Exception:  # noqa: BLE001
            pass


# The stage hooks


class MlflowStageTracker:
    """``run.tracker`` hooks (see ``pipelines.stages.NullTracker``) that log each stage as an MLflow run.

    ``tracker``: the fail-safe :class:`brcd.mlflow.tracking.Tracker`. ``parent_run_id`` / ``trial_id``:
    set by :meth:`for_trial` for the stage runs of one row of ``brcd compare`` (nested under the
    comparison's parent run). Picklable (it can be shipped to another process): run ids and URIs only.
    """

    def __init__(self, tracker: Tracker, *, cfg: Any = None, parent_run_id: str | None = None,
                 trial_id: str | None = None):
        self.tracker = tracker
        self.cfg = cfg
        self.parent_run_id = parent_run_id
        self.trial_id = trial_id
        self.run_ids: dict[str, str] = {}  # stage tag -> MLflow run id, for the stages started here
        self._announced = False

    def __repr__(self) -> str:
        nest = f", parent={self.parent_run_id}, trial={self.trial_id}" if self.parent_run_id else ""
        return f"MlflowStageTracker({self.tracker!r}{nest})"

    @property
    def uri(self) -> str | None:
        return self.tracker.uri

    @property
    def enabled(self) -> bool:
        return self.tracker.enabled

    # naming and run records

    def run_name(self, stage: str) -> str:
        """The MLflow run name of a stage: the stage tag (prefixed with the trial id inside a trial)."""
        if self.trial_id and self.trial_id not in stage:
            return f"{self.trial_id}-{stage}"
        return stage

    def _record_path(self, stage: str, run: Any) -> Path:
        return lay.mlflow_record(run.layout.stage_folder(stage), _safe_name(self.run_name(stage)))

    def _load_record(self, path: Path) -> dict[str, Any] | None:
        try:
            rec = io.load_json(path)
        except Exception:  # noqa: BLE001 - a missing or broken record: start a new run
            return None
        return rec if isinstance(rec, dict) and rec.get("run_id") else None

    def _reusable(self, rec: dict[str, Any] | None, params_hash: str, parent: str | None = "") -> str | None:
        """The recorded run id when it belongs to this backend / experiment / config / parent (default: this
        tracker's) and the run was interrupted (not finished, not deleted)."""
        if rec is None:
            return None
        parent = self.parent_run_id if parent == "" else parent
        same = (rec.get("tracking_uri") == self.tracker.uri and rec.get("experiment_id") == self.tracker.experiment_id
                and rec.get("params_hash") == params_hash and rec.get("parent_run_id") == parent)
        if not same:
            return None
        return self._open_run(rec["run_id"])

    def _open_run(self, run_id: str) -> str | None:
        """``run_id`` when that run exists, is not deleted and did not finish; else ``None``."""
        from mlflow.exceptions import MlflowException

        def get():
            try:
                return self.tracker.client.get_run(run_id)
            except MlflowException:  # deleted database / unknown id: start a new run
                return None

        found = self.tracker.call("get_run", get)
        if found is None or found.info.lifecycle_stage != "active" or found.info.status not in _OPEN_STATUSES:
            return None
        return found.info.run_id

    def _tags(self, stage: str, run: Any) -> dict[str, Any]:
        cfg = run.cfg
        tags: dict[str, Any] = {"stage": stage, "dataset": dataset_name(cfg), "run_dir": str(run.output),
                                "config": cfg.name, "brcd.kind": "stage"}
        fp = run.layout.teacher_fingerprint()
        if fp:
            tags["teacher_fingerprint"] = fp
        if self.trial_id:
            tags["trial_id"] = self.trial_id
        return tags

    def _announce(self) -> None:
        if self._announced or not self.enabled:
            return
        self._announced = True
        uri = str(self.tracker.uri)
        hint = f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1" if uri.startswith("sqlite:") else uri
        _say(f"[mlflow] tracking experiment {self.tracker.experiment!r} at {uri}  (UI: {hint})")

    # hooks

    def stage_started(self, stage: str, run: Any, params: Mapping[str, Any] | None = None) -> None:
        """Create (or re-attach to) the stage's run; ``params`` default to the flattened config."""
        try:
            self._start(stage, run, run.cfg.flat() if params is None else dict(params))
        except Exception as exc:  # noqa: BLE001 - tracking must never stop a stage
            log.warning("MLflow: could not start the run of stage %s (%s); the stage continues untracked", stage, exc)

    def _start(self, stage: str, run: Any, params: dict[str, Any]) -> None:
        if not self.enabled or self.tracker.ensure_experiment() is None:
            return
        phash = io.stable_hash(params)
        record = self._record_path(stage, run)
        rid = self._reusable(self._load_record(record), phash)
        if rid is not None:
            rid = self.tracker.start_run(run_id=rid)
            resumed = True
        else:
            tags = self._tags(stage, run) | {"brcd.params_hash": phash}
            rid = self.tracker.start_run(self.run_name(stage), parent_run_id=self.parent_run_id, tags=tags)
            resumed = False
            if rid is not None:
                self.tracker.log_params(rid, params)
        if rid is None:
            return
        self.run_ids[stage] = rid
        io.save_json(record, {"run_id": rid, "run_name": self.run_name(stage), "stage": stage,
                              "tracking_uri": self.tracker.uri, "experiment": self.tracker.experiment,
                              "experiment_id": self.tracker.experiment_id, "params_hash": phash,
                              "parent_run_id": self.parent_run_id, "trial_id": self.trial_id})
        self._announce()
        _say(f"[mlflow] {stage}: {'re-attached to' if resumed else 'logging to'} run {rid}")

    def callbacks(self, stage: str, run: Any) -> list:
        """The live-metrics callback of a started stage (empty when tracking is off)."""
        rid = self.run_ids.get(stage)
        if rid is None or not self.enabled:
            return []
        return [MlflowMetricsCallback(str(self.tracker.uri), self.tracker.experiment, rid, stage)]

    def stage_metrics(self, stage: str, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log the numeric ``metrics`` to a started stage's run."""
        rid = self.run_ids.get(stage)
        if rid is not None and self.enabled:
            self.tracker.log_metrics(rid, metrics, step=step)

    def stage_finished(self, stage: str, run: Any, info: dict[str, Any], artifacts: list[Path]) -> None:
        """History back-fill, summary metrics, artifacts, FINISHED."""
        rid = self.run_ids.get(stage)
        if rid is None or not self.enabled:
            return
        try:
            self._finish(stage, run, rid, info, artifacts)
        except Exception as exc:  # noqa: BLE001
            log.warning("MLflow: could not finish the run of stage %s (%s)", stage, exc)
        self.tracker.end_run(rid, "FINISHED")

    def stage_failed(self, stage: str, run: Any, error: BaseException | str) -> None:
        """Mark the stage's run FAILED (re-running the stage re-attaches to it)."""
        rid = self.run_ids.get(stage)
        if rid is None:
            return
        self.tracker.set_tags(rid, {"brcd.last_error": " ".join(str(error).split())[-500:]})
        self.tracker.end_run(rid, "FAILED")

    def _finish(self, stage: str, run: Any, rid: str, info: Mapping[str, Any], artifacts: Iterable[Path]) -> None:
        cfg = run.cfg
        artifacts = [Path(p) for p in artifacts]
        fp = run.layout.teacher_fingerprint()
        if fp:
            self.tracker.set_tags(rid, {"teacher_fingerprint": fp})
        history = info.get("history") if isinstance(info, Mapping) else None
        if history:
            self._backfill(rid, history)
        files: list[tuple[Path, str | None]] = [(run.layout.config, None)]
        files += [(Path(p), self._artifact_dir(Path(p), run)) for p in artifacts]
        summary: dict[str, Any] = {}
        if stage == "clusters":
            files.append((run.layout.k_selection_json, "clusters"))
            sizes = info.get("cluster_sizes") or []
            kept = info.get("kept_bits_per_cluster") or []
            summary.update(num_clusters=len(sizes), mean_kept_bits=sum(kept) / len(kept) if kept else None)
            ks = run.layout.k_selection_json
            if ks.exists():
                summary["suggested_k"] = io.load_json(ks).get("suggested_k")
        elif stage == "evaluate":
            summary.update(_numeric(info))
            if not any(Path(p).name == run.layout.retrieval_grid_png.name for p in artifacts):  # not rendered by the stage
                grid = self._retrieval_grid(run)
                if grid is not None:
                    files.append((grid, None))
        else:
            summary.update({f"best_{k}": v for k, v in (info.get("best") or {}).items()})
            summary["stage_seconds"] = info.get("seconds")
            if stage != "teacher" and getattr(cfg.distill, "method", None) == "brcd":
                files += [(p, "clusters") for p in run.layout.cluster_files]
        summary = {k: v for k, v in summary.items() if v is not None}
        if summary:
            step = int(info.get("epochs") or 0) if isinstance(info.get("epochs"), int) else 0
            self.tracker.log_metrics(rid, summary, step=step)
        seen = set()
        for path, where in files:
            if path.exists() and (path, where) not in seen:
                seen.add((path, where))
                self.tracker.log_artifact(rid, path, where)

    @staticmethod
    def _artifact_dir(path: Path, run: Any) -> str | None:
        for name in ("clusters_dir", "teacher_dir", "student_dir"):
            folder = getattr(run, name, None)
            if folder is not None and path.parent.resolve() == Path(folder).resolve():
                return name[: -len("_dir")]
        return None

    def _backfill(self, rid: str, history: list[Mapping[str, Any]]) -> None:
        """Log the epochs of ``history`` that the live callback did not (local mode, outages)."""
        client = self.tracker.client
        logged = self.tracker.call("get_metric_history", lambda: client.get_metric_history(rid, "epoch"))
        if logged is None and not self.enabled:
            return
        done = {int(m.step) for m in (logged or [])}
        for row in history:
            values = _numeric(row)
            epoch = values.get("epoch")
            if epoch is None or int(epoch) in done:
                continue
            self.tracker.log_metrics(rid, values, step=int(epoch))

    def _retrieval_grid(self, run: Any) -> Path | None:
        """``<output>/retrieval_grid.png``: a few queries encoded here by the student (best asymmetric
        checkpoint) against the teacher's database codes (asymmetric paradigm, nothing re-encoded)."""
        try:
            return render_retrieval_grid(run.cfg, run.bundle, run.layout)
        except Exception as exc:  # noqa: BLE001 - a figure is never worth a failed stage
            log.warning("MLflow: no retrieval grid (%s)", exc)
            return None

    # a job of several pipelines (brcd compare): a parent run and nested runs

    def start_parent(self, name: str, *, params: Mapping[str, Any] | None = None,
                     tags: Mapping[str, Any] | None = None, output: str | os.PathLike | None = None,
                     key: str | None = None) -> str | None:
        """Create (or re-attach to) the parent run of a job (``brcd compare``, ``brcd tune``) and return its
        id (``None`` when tracking is off). Stage runs started by this tracker afterwards, and by every
        :meth:`for_trial` copy, are nested under it. ``params`` default to the flattened config;
        ``output`` (the job folder) keeps the run id so that a resumed job re-attaches. ``key`` (a
        tuning job's fingerprint) finds the parent by its ``brcd.job`` tag instead, whatever its
        status: a job run again after it finished keeps its one parent run, as its trials do."""
        if not self.enabled or self.tracker.ensure_experiment() is None:
            return None
        if params is None and self.cfg is not None:
            params = self.cfg.flat()
        params = dict(params or {})
        phash = io.stable_hash(params)
        all_tags = {"brcd.kind": TUNE_KIND, "stage": "tune"} | dict(tags or {})
        record = lay.mlflow_record(output, f"parent-{_safe_name(name)}") if output is not None else None
        rec = self._load_record(record) if record is not None else None
        rid = None
        if key is not None:
            all_tags[JOB_TAG] = key
            found = _search_runs(self.tracker, {JOB_TAG: key, "brcd.kind": all_tags["brcd.kind"]})
            if found:
                rid = self.tracker.start_run(run_id=found[0].info.run_id)
        elif (open_id := self._reusable(rec, phash, parent=None)) is not None:  # parent records have no parent
            rid = self.tracker.start_run(run_id=open_id)
        if rid is None:
            if self.cfg is not None:
                all_tags.setdefault("dataset", dataset_name(self.cfg))
                all_tags.setdefault("config", self.cfg.name)
            rid = self.tracker.start_run(name, tags=all_tags | {"brcd.params_hash": phash})
            if rid is not None and params:
                self.tracker.log_params(rid, params)
        if rid is None:
            return None
        self.parent_run_id = rid
        if record is not None:
            io.save_json(record, {"run_id": rid, "run_name": name, "tracking_uri": self.tracker.uri,
                                  "experiment_id": self.tracker.experiment_id, "params_hash": phash})
        self._announce()
        _say(f"[mlflow] {all_tags['brcd.kind']} job {name!r}: parent run {rid}")
        return rid

    def for_trial(self, trial_id: str, parent_run_id: str | None = None) -> "MlflowStageTracker":
        """A copy for one trial: its stage runs are nested under ``parent_run_id`` (default: the
        run of :meth:`start_parent`), tagged ``trial_id`` and named ``<trial_id>-<stage>`` (a stage
        tag that already contains the trial id is kept as is)."""
        trial = copy.copy(self)
        trial.run_ids = {}
        trial.parent_run_id = parent_run_id or self.parent_run_id
        trial.trial_id = str(trial_id)
        trial._announced = self._announced
        return trial

    def finish_parent(self, metrics: Mapping[str, Any] | None = None, artifacts: Iterable[str | os.PathLike] = (),
                      tags: Mapping[str, Any] | None = None, status: str = "FINISHED") -> None:
        """Log the job's summary (e.g. every method's mean mAP, ``compare.json``) and end the parent run."""
        rid = self.parent_run_id
        if rid is None:
            return
        if metrics:
            self.tracker.log_metrics(rid, _numeric(metrics))
        if tags:
            self.tracker.set_tags(rid, tags)
        for path in artifacts:
            self.tracker.log_artifact(rid, Path(path))
        self.tracker.end_run(rid, status)

    # lookups

    def training_run_id(self, output: str | os.PathLike | None = None, trial_id: str | None = None) -> str | None:
        """The run of the latest student-training stage started here, else the newest one recorded
        under ``output`` (of trial ``trial_id`` when given)."""
        for stage in reversed(list(self.run_ids)):
            if stage not in CORE_STAGES and trial_id in (None, self.trial_id):
                return self.run_ids[stage]
        if output is None:
            return None
        recs = []
        for path in sorted(lay.mlflow_records_dir(output).glob("*.json")):
            rec = self._load_record(path)
            if not rec or rec.get("stage") in (None, *CORE_STAGES) or rec.get("tracking_uri") != self.tracker.uri:
                continue
            if trial_id is not None and rec.get("trial_id") != trial_id and trial_id not in str(rec.get("stage")):
                continue
            recs.append((path.stat().st_mtime, rec["run_id"]))
        return max(recs)[1] if recs else None


# A tuning job's trials: one nested run per Tune trial, logged from the Tune driver


class TuneTrialRuns:
    """The MLflow runs of one tuning job's trials, nested under the job's parent run.

    Used by the Tune driver's callback (``pipelines.tune.callbacks``), so one process writes them: trials on
    other nodes need no route to the backend, and concurrent trials never contend for a SQLite file.
    A trial's run is found by its tags (``brcd.job`` = ``job_key``, ``trial_id``), never by state
    kept in memory, so a resumed job (a new driver process) re-attaches to it instead of starting a
    duplicate. Holds plain values only: Tune pickles it with the experiment.
    """

    def __init__(self, uri: str, experiment: str, job_key: str, tags: Mapping[str, Any] | None = None):
        self.uri = uri
        self.experiment = experiment
        self.job_key = job_key
        self.tags = dict(tags or {})  # on every trial's run (dataset, config)
        self._reset()

    def _reset(self) -> None:
        self._tracker: Tracker | None = None
        self.parent_run_id: str | None = None
        self._runs: dict[str, str] = {}  # trial id -> run id
        self._last_step: dict[str, int] = {}  # trial id -> newest epoch logged

    def __getstate__(self) -> dict[str, Any]:
        return {k: self.__dict__[k] for k in ("uri", "experiment", "job_key", "tags")}

    def __contains__(self, trial_id: str) -> bool:
        """Whether this process has started (or re-attached to) the trial's run."""
        return trial_id in self._runs

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    @property
    def tracker(self) -> Tracker:
        if self._tracker is None:
            self._tracker = Tracker(self.uri, self.experiment)
            _probe_server(self._tracker)
        return self._tracker

    def attach(self) -> str | None:
        """Find the job's parent run (``MlflowStageTracker.start_parent(key=job_key)`` made it); without
        one, or with the backend down, every other call does nothing."""
        tracker = self.tracker
        if tracker.ensure_experiment() is None:
            return None
        found = _search_runs(tracker, {JOB_TAG: self.job_key, "brcd.kind": TUNE_KIND})
        self.parent_run_id = found[0].info.run_id if found else None
        return self.parent_run_id

    def _trial_runs(self, trial_id: str | None = None) -> dict[str, Any]:
        tags = {JOB_TAG: self.job_key, "brcd.kind": TRIAL_KIND} | ({"trial_id": trial_id} if trial_id else {})
        runs: dict[str, Any] = {}
        for run in _search_runs(self.tracker, tags):
            runs.setdefault(run.data.tags.get("trial_id"), run)  # the oldest, if a race ever made two
        return runs

    def start(self, trial_id: str, params: Mapping[str, Any], tags: Mapping[str, Any] | None = None) -> str | None:
        """The trial's run, RUNNING: found by its tags (a resumed trial) or created with ``params``."""
        if self.parent_run_id is None:
            return None
        tracker = self.tracker
        found = self._trial_runs(trial_id).get(trial_id)
        if found is not None:
            rid = tracker.start_run(run_id=found.info.run_id)
            epoch = found.data.metrics.get("epoch")
            self._last_step[trial_id] = int(epoch) if epoch is not None else 0
        else:
            all_tags = self.tags | dict(tags or {}) | {"brcd.kind": TRIAL_KIND, JOB_TAG: self.job_key,
                                                       "trial_id": trial_id, "stage": "trial"}
            rid = tracker.start_run(trial_id, parent_run_id=self.parent_run_id, tags=all_tags)
            self._last_step[trial_id] = 0
        if rid is not None:
            self._runs[trial_id] = rid
            tracker.log_params(rid, params)  # MLflow accepts the same values again (a run found after a crash)
        return rid

    def log(self, trial_id: str, metrics: Mapping[str, Any], step: int) -> None:
        """One report of the trial at ``step`` (its epoch); a step already logged is skipped (a resumed
        trial reports its last epoch again)."""
        rid = self._runs.get(trial_id)
        if rid is None or step <= self._last_step.get(trial_id, 0):
            return
        self.tracker.log_metrics(rid, _numeric(metrics), step=step)
        self._last_step[trial_id] = step

    def end(self, trial_id: str, status: str) -> None:
        rid = self._runs.get(trial_id)
        if rid is not None:
            self.tracker.end_run(rid, status)

    def finish(self, trials: Iterable[Mapping[str, Any]]) -> None:
        """After the Tune run: every trial's final ``metrics`` (at ``step``), ``tags`` and MLflow ``status``
        (entries: ``trial_id``, ``params``, ``metrics``, ``step``, ``tags``, ``status``). A trial without
        a run (the backend was down while it ran) gets one now; values already logged are not repeated."""
        if self.parent_run_id is None:
            return
        tracker = self.tracker
        runs = self._trial_runs()
        for t in trials:
            trial_id, run = str(t["trial_id"]), runs.get(str(t["trial_id"]))
            if run is None:
                rid = self.start(trial_id, t.get("params") or {})
                have_metrics, have_tags, status = {}, {}, None
            else:
                rid = run.info.run_id
                have_metrics, have_tags, status = run.data.metrics, run.data.tags, run.info.status
            if rid is None:
                continue
            metrics = {k: v for k, v in _numeric(t.get("metrics") or {}).items() if have_metrics.get(k) != v}
            tags = {k: v for k, v in (t.get("tags") or {}).items() if have_tags.get(k) != str(v)}
            if metrics:
                tracker.log_metrics(rid, metrics, step=int(t.get("step") or 0))
            if tags:
                tracker.set_tags(rid, tags)
            if status != t["status"]:
                tracker.end_run(rid, t["status"])
