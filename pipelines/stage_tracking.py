"""MLflow tracking of the pipeline stages, logged from the driver and the Train controller only.

Each stage is one MLflow run named after its tag (params, tags, metrics and artifacts: docs/MLFLOW.md);
its id is kept in ``<stage folder>/mlflow_runs/<run name>.json``, so an interrupted stage re-attaches to
its run and a finished one gets a new run. ``brcd compare`` and ``brcd tune`` are a parent run with nested
runs; a tuning job's trials are logged from the Tune driver by :class:`TuneTrialRuns`.
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


def tracker_for(cfg: Any, output: str | os.PathLike, *, experiment: str | None = None) -> "MlflowStageTracker":
    """The stage tracker of a run; creates the experiment now, on the driver, before any run (SQLite creation
    races). ``tracking.enabled=false`` gives a tracker whose hooks do nothing."""
    tracker = Tracker.from_config(cfg.tracking, Path(output))
    if experiment:
        tracker.experiment = experiment
    if tracker.enabled:
        _probe_server(tracker)
        tracker.ensure_experiment()
    return MlflowStageTracker(tracker, cfg=cfg)


def _probe_server(tracker: Tracker, timeout_s: float = 3.0) -> None:
    """One TCP connection attempt to an http(s) server; a refusal disables tracking (MLflow would retry for minutes)."""
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
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class MlflowMetricsCallback(UserCallback):
    """Logs rank 0's metrics of every ``ray.train.report`` to one MLflow run, ``step=epoch``, from the Train
    controller (Ray pickles it there)."""

    def __init__(self, uri: str, experiment: str, run_id: str, stage: str):
        self.tracker = Tracker(uri, experiment)  # pickles without its client
        self.run_id = run_id
        self.stage = stage
        self._reports = 0

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
            rank, exc = min(worker_exceptions.items(), key=lambda kv: kv[0])
            text = " ".join(str(exc).split())[-500:]
            self.tracker.set_tags(self.run_id, {"brcd.last_error": f"rank {rank}: {type(exc).__name__}: {text}"})
        except Exception:  # noqa: BLE001
            pass


class MlflowStageTracker:
    """``run.tracker`` hooks (see ``pipelines.stages.NullTracker``) that log each stage as an MLflow run.
    ``parent_run_id`` / ``trial_id``: set by :meth:`for_trial` (a row of ``brcd compare``)."""

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

    def run_name(self, stage: str) -> str:
        if self.trial_id and self.trial_id not in stage:
            return f"{self.trial_id}-{stage}"
        return stage

    def _record_path(self, stage: str, run: Any) -> Path:
        return lay.mlflow_record(run.layout.stage_folder(stage), _safe_name(self.run_name(stage)))

    @staticmethod
    def _load_record(path: Path) -> dict[str, Any] | None:
        try:
            rec = io.load_json(path)
        except Exception:  # noqa: BLE001 - a missing or broken record: start a new run
            return None
        return rec if isinstance(rec, dict) and rec.get("run_id") else None

    def _reusable(self, rec: dict[str, Any] | None, params_hash: str, parent: str | None = "") -> str | None:
        """The recorded run id when it belongs to this backend / experiment / config / parent (default: this
        tracker's) and the run exists and was interrupted (not finished, not deleted)."""
        parent = self.parent_run_id if parent == "" else parent
        want = {"tracking_uri": self.tracker.uri, "experiment_id": self.tracker.experiment_id,
                "params_hash": params_hash, "parent_run_id": parent}
        if rec is None or any(rec.get(k) != v for k, v in want.items()):
            return None
        from mlflow.exceptions import MlflowException

        def get():
            try:
                return self.tracker.client.get_run(rec["run_id"])
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
        print(f"[mlflow] tracking experiment {self.tracker.experiment!r} at {uri}  (UI: {hint})")

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
        reuse = self._reusable(self._load_record(record), phash)
        rid = self._open(reuse, self.run_name(stage), self.parent_run_id, self._tags(stage, run), params, phash, record,
                         stage=stage, experiment=self.tracker.experiment, parent_run_id=self.parent_run_id,
                         trial_id=self.trial_id)
        if rid is not None:
            self.run_ids[stage] = rid
            print(f"[mlflow] {stage}: {'re-attached to' if reuse else 'logging to'} run {rid}")

    def _open(self, reuse: str | None, name: str, parent: str | None, tags: dict[str, Any], params: dict[str, Any],
              phash: str, record: Path | None, **rec: Any) -> str | None:
        """Re-attach to run ``reuse``, else create run ``name`` with ``tags`` and ``params``; the run id,
        backend, params hash and ``rec`` are saved at ``record``."""
        if reuse is not None:
            rid = self.tracker.start_run(run_id=reuse)
        else:
            rid = self.tracker.start_run(name, parent_run_id=parent, tags=tags | {"brcd.params_hash": phash})
            if rid is not None and params:
                self.tracker.log_params(rid, params)
        if rid is not None and record is not None:
            io.save_json(record, {"run_id": rid, "run_name": name, "tracking_uri": self.tracker.uri,
                                  "experiment_id": self.tracker.experiment_id, "params_hash": phash, **rec})
        if rid is not None:
            self._announce()
        return rid

    def callbacks(self, stage: str, run: Any) -> list:
        """The live-metrics callback of a started stage (empty when tracking is off)."""
        rid = self.run_ids.get(stage)
        if rid is None or not self.enabled:
            return []
        return [MlflowMetricsCallback(str(self.tracker.uri), self.tracker.experiment, rid, stage)]

    def stage_metrics(self, stage: str, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log the numeric ``metrics`` to a started stage's run."""
        self.tracker.log_metrics(self.run_ids.get(stage), metrics, step=step)

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
        self.tracker.end_run(self.run_ids.get(stage), "FAILED", error=error)

    def _finish(self, stage: str, run: Any, rid: str, info: Mapping[str, Any], artifacts: Iterable[Path]) -> None:
        artifacts = [Path(p) for p in artifacts]
        fp = run.layout.teacher_fingerprint()
        if fp:
            self.tracker.set_tags(rid, {"teacher_fingerprint": fp})
        if info.get("history"):
            self._backfill(rid, info["history"])
        files: list[tuple[Path, str | None]] = [(run.layout.config, None)]
        files += [(p, self._artifact_dir(p, run)) for p in artifacts]
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
            if not any(p.name == run.layout.retrieval_grid_png.name for p in artifacts):  # not rendered by the stage
                try:
                    grid = render_retrieval_grid(run.cfg, run.bundle, run.layout)
                    files += [(grid, None)] if grid is not None else []
                except Exception as exc:  # noqa: BLE001 - a figure is never worth a failed stage
                    log.warning("MLflow: no retrieval grid (%s)", exc)
        else:
            summary.update({f"best_{k}": v for k, v in (info.get("best") or {}).items()})
            summary["stage_seconds"] = info.get("seconds")
            if stage != "teacher" and run.cfg.distill.method == "brcd":
                files += [(p, "clusters") for p in run.layout.cluster_files]
        summary = {k: v for k, v in summary.items() if v is not None}
        if summary:
            self.tracker.log_metrics(rid, summary, step=info["epochs"] if isinstance(info.get("epochs"), int) else 0)
        for path, where in dict.fromkeys(files):  # each once, in order
            if path.exists():
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

    def start_parent(self, name: str, *, params: Mapping[str, Any] | None = None,
                     tags: Mapping[str, Any] | None = None, output: str | os.PathLike | None = None,
                     key: str | None = None) -> str | None:
        """Create (or re-attach to) the parent run of a job and return its id (``None`` when tracking is off);
        later stage runs of this tracker and its :meth:`for_trial` copies nest under it. ``output`` keeps the
        run id for a resumed job; ``key`` (a tuning job's fingerprint) finds the parent by its ``brcd.job``
        tag instead, whatever its status, so a job run again keeps its one parent run."""
        if not self.enabled or self.tracker.ensure_experiment() is None:
            return None
        if params is None and self.cfg is not None:
            params = self.cfg.flat()
        params = dict(params or {})
        phash = io.stable_hash(params)
        all_tags = {"brcd.kind": TUNE_KIND, "stage": "tune"} | dict(tags or {})
        record = lay.mlflow_record(output, f"parent-{_safe_name(name)}") if output is not None else None
        rec = self._load_record(record) if record is not None else None
        if key is not None:
            all_tags[JOB_TAG] = key
            found = _search_runs(self.tracker, {JOB_TAG: key, "brcd.kind": all_tags["brcd.kind"]})
            reuse = found[0].info.run_id if found else None
        else:
            reuse = self._reusable(rec, phash, parent=None)  # parent records have no parent
        if reuse is None and self.cfg is not None:
            all_tags.setdefault("dataset", dataset_name(self.cfg))
            all_tags.setdefault("config", self.cfg.name)
        rid = self._open(reuse, name, None, all_tags, params, phash, record)
        if rid is not None:
            self.parent_run_id = rid
            print(f"[mlflow] {all_tags['brcd.kind']} job {name!r}: parent run {rid}")
        return rid

    def for_trial(self, trial_id: str, parent_run_id: str | None = None) -> "MlflowStageTracker":
        """A copy whose stage runs nest under ``parent_run_id`` (default: :meth:`start_parent`'s), tagged
        ``trial_id`` and named ``<trial_id>-<stage>``."""
        trial = copy.copy(self)
        trial.run_ids = {}
        trial.parent_run_id = parent_run_id or self.parent_run_id
        trial.trial_id = str(trial_id)
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

    def training_run_id(self, output: str | os.PathLike | None = None, trial_id: str | None = None) -> str | None:
        """The run of the latest student-training stage started here, else the newest one recorded
        under ``output`` (of trial ``trial_id`` when given)."""
        for stage in reversed(self.run_ids):
            if stage not in CORE_STAGES and trial_id in (None, self.trial_id):
                return self.run_ids[stage]
        recs = []
        for path in sorted(lay.mlflow_records_dir(output).glob("*.json")) if output is not None else ():
            rec = self._load_record(path) or {}
            stage = str(rec.get("stage"))
            ours = rec.get("trial_id") == trial_id or trial_id is None or trial_id in stage
            if ours and rec.get("stage") not in (None, *CORE_STAGES) and rec.get("tracking_uri") == self.tracker.uri:
                recs.append((path.stat().st_mtime, rec["run_id"]))
        return max(recs)[1] if recs else None


class TuneTrialRuns:
    """The MLflow runs of one tuning job's trials, nested under its parent run, written by the Tune driver only
    (no route to the backend needed on other nodes, no SQLite contention). A trial's run is found by its tags
    (``brcd.job``, ``trial_id``), so a resumed job re-attaches to it. Pickled by Tune: plain values only."""

    def __init__(self, uri: str, experiment: str, job_key: str, tags: Mapping[str, Any] | None = None):
        # tags: on every trial's run (dataset, config)
        self.__setstate__({"uri": uri, "experiment": experiment, "job_key": job_key, "tags": dict(tags or {})})

    def __getstate__(self) -> dict[str, Any]:
        return {k: self.__dict__[k] for k in ("uri", "experiment", "job_key", "tags")}

    def __contains__(self, trial_id: str) -> bool:
        """Whether this process has started (or re-attached to) the trial's run."""
        return trial_id in self._runs

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.tracker = Tracker(self.uri, self.experiment)
        self.parent_run_id: str | None = None
        self._runs: dict[str, str] = {}  # trial id -> run id
        self._last_step: dict[str, int] = {}  # trial id -> newest epoch logged

    def attach(self) -> str | None:
        """Find the job's parent run (``start_parent(key=job_key)`` made it); without one every call does nothing."""
        tracker = self.tracker
        _probe_server(tracker)
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
        """After the Tune run: every trial's final ``metrics`` (at ``step``), ``tags`` and ``status`` (entries also
        have ``trial_id``, ``params``); a trial without a run gets one now; logged values are not repeated."""
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
