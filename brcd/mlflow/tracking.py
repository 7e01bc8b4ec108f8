"""A fail-safe MLflow wrapper: explicit run ids, no global active-run state, never crashes training.

SQLite contention is retried with backoff; an unreachable backend logs ONE warning and turns the tracker
into a no-op; any other failure logs one warning per kind of call. With a SQLite backend artifacts go to
``<db folder>/mlartifacts``. ``mlflow`` is imported lazily: a disabled tracker costs nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import random
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlparse

from brcd.layout import MLFLOW_ARTIFACTS, MLFLOW_DB

__all__ = ["Tracker", "default_tracking_uri", "sqlite_db_path", "artifact_location_for",
           "flatten_params", "clean_key", "dataset_name"]

log = logging.getLogger(__name__)

# MLflow's own limits (mlflow.utils.validation), copied so that importing this module stays cheap.
MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH, MAX_KEY_LENGTH = 6000, 8000, 250

_RETRY_MARKERS = ("database is locked", "database table is locked", "duplicate column name")
_UNREACHABLE_MARKERS = ("api request to", "max retries exceeded", "connection refused", "failed to establish",
                        "name or service not known", "temporary failure in name resolution", "timed out",
                        "unable to open database", "could not connect", "connection aborted", "remote end closed")


def _sqlite_uri(path: Path) -> str:
    return f"sqlite:///{path.expanduser().resolve()}"


def default_tracking_uri(output_dir: str | os.PathLike, explicit: str | None = None) -> str:
    """``explicit`` > ``$MLFLOW_TRACKING_URI`` > ``sqlite:///<abs output>/mlflow.db``; creates the SQLite folder.

    A plain path ``*.db`` is that SQLite file, another path ``<folder>/mlflow.db``. A ``file:`` store raises a
    one-line :class:`ValueError` (MLflow >= 3.13 refuses it) unless ``MLFLOW_ALLOW_FILE_STORE=true``.
    """
    uri = str(explicit or os.environ.get("MLFLOW_TRACKING_URI") or _sqlite_uri(Path(output_dir) / MLFLOW_DB))
    scheme = urlparse(uri).scheme
    if scheme == "file" or (scheme == "" and not uri.endswith(".db")):
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("1", "true"):
            return uri
        if scheme == "file":
            raise ValueError(f"tracking uri {uri} is a file store, which MLflow >= 3.13 refuses; use "
                             f"sqlite:///<folder>/{MLFLOW_DB} or http://host:5000 (migrate old runs with "
                             "'mlflow migrate-filestore')")
        uri = _sqlite_uri(Path(uri) / MLFLOW_DB)
    elif len(scheme) <= 1:  # a path to a .db file (or from a Windows drive letter)
        uri = _sqlite_uri(Path(uri))
    db = sqlite_db_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    return uri


def sqlite_db_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (absolute: ``sqlite:////abs/x.db``), else ``None``."""
    rest = uri[len("sqlite:///"):].split("?", 1)[0] if uri.startswith("sqlite:///") else ""
    return Path(rest).expanduser().absolute() if rest and rest != ":memory:" else None


def artifact_location_for(uri: str) -> str | None:
    """``file://<db folder>/mlartifacts`` for a SQLite backend; ``None`` (server default) otherwise."""
    db = sqlite_db_path(uri)
    return None if db is None else (db.parent / MLFLOW_ARTIFACTS).as_uri()


def dataset_name(cfg: Any) -> str:
    """The ``dataset`` tag: ``digits`` / ``cifar10``, or ``folder:<root name>`` / ``list:<root name>``."""
    source = cfg.data.source
    if source in ("digits", "cifar10") or not cfg.data.root:
        return str(source)
    return f"{source}:{Path(cfg.data.root).name}"


def _stringify(value: Any, limit: int) -> str:
    text = str(value)
    if isinstance(value, (list, tuple, dict)):
        with contextlib.suppress(TypeError, ValueError):
            text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clean_key(key: Any) -> str:
    """A param / metric / tag name MLflow accepts: characters outside ``[/\\w.\\- :]`` become ``_``
    (``map@1000`` -> ``map_1000``), no leading or doubled slashes, at most 250 characters."""
    text = re.sub(r"[^/\w.\- :]", "_", str(key))[:MAX_KEY_LENGTH] or "_"
    norm = posixpath.normpath(text)
    if norm != text or norm.startswith(("/", "..")) or norm == ".":
        text = text.replace("/", "_")
    return text


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings -> dotted keys; values stringified (lists as JSON) and truncated to MLflow's limit."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_params(value, name + "."))
        else:
            out[clean_key(name)] = _stringify(value, MAX_PARAM_VAL_LENGTH)
    return out


#: runs this process started or re-attached to and has not ended (run id -> tracker), for close_open_runs
_OPEN_RUNS: dict[str, "Tracker"] = {}
_OPEN_LOCK = threading.Lock()


def close_open_runs(status: str, reason: str) -> list[str]:
    """End every run this process left open with ``status`` and ``reason`` as ``brcd.last_error``; their ids."""
    with _OPEN_LOCK:
        runs = list(_OPEN_RUNS.items())
    for run_id, tracker in runs:
        tracker.end_run(run_id, status, error=reason)
    return [r for r, _ in runs]


class Tracker:
    """Explicit-run-id MLflow logging that degrades to a no-op: no backend contact before the first call;
    once disabled (``enabled=False`` or unreachable) ``start_run`` returns ``None`` and calls do nothing."""

    retries: int = 6
    backoff_s: float = 0.05  # 0.05, 0.1, 0.2, 0.4, 0.8 s (+ jitter)

    def __init__(self, uri: str | None, experiment: str = "brcd", enabled: bool = True,
                 artifact_location: str | None = None):
        self.uri = uri
        self.experiment = experiment
        self.artifact_location = artifact_location or (artifact_location_for(uri) if uri else None)
        self.enabled = bool(enabled) and uri is not None
        self._client = None
        self._experiment_id: str | None = None
        self._lock = threading.RLock()
        self._warned: set[str] = set()
        self.disabled_reason: str | None = None if enabled else "disabled by configuration"

    @classmethod
    def from_config(cls, tracking_cfg: Any, output_dir: str | os.PathLike) -> "Tracker":
        """From a ``brcd.config.TrackingConfig``."""
        enabled = tracking_cfg.enabled
        uri = default_tracking_uri(output_dir, tracking_cfg.tracking_uri) if enabled else None
        return cls(uri, tracking_cfg.experiment, enabled=enabled)

    @property
    def experiment_id(self) -> str | None:
        return self._experiment_id

    @property
    def client(self):
        with self._lock:
            if self._client is None:
                from mlflow import MlflowClient

                self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
            return self._client

    def __getstate__(self) -> dict[str, Any]:
        """Ray ships trackers to workers: drop the lock and the client (recreated on first use)."""
        state = self.__dict__.copy()
        state["_client"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        state = "enabled" if self.enabled else f"disabled ({self.disabled_reason})"
        return f"Tracker(uri={self.uri!r}, experiment={self.experiment!r}, {state})"

    def _disable(self, exc: BaseException) -> None:
        with self._lock:
            if not self.enabled:
                return
            self.enabled = False
            self.disabled_reason = _short(exc)
        log.warning("MLflow tracking at %s is unreachable (%s); training continues without tracking", self.uri,
                    self.disabled_reason)

    def _call(self, what: str, fn: Callable[[], Any], *, fatal: bool = False) -> Any:
        """``fn()`` with retries on SQLite contention. ``fatal`` (first contact): any failure disables the tracker."""
        if not self.enabled:
            return None
        for attempt in range(self.retries):
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - tracking must never take training down
                text = str(exc).lower()
                if attempt + 1 < self.retries and _is_retryable(text):
                    time.sleep(self.backoff_s * (2**attempt) * (1.0 + 0.5 * random.random()))
                    continue
                if fatal or _is_unreachable(exc):
                    self._disable(exc)
                else:
                    key = f"{what}:{type(exc).__name__}"
                    if key not in self._warned:
                        self._warned.add(key)
                        log.warning("MLflow %s failed at %s (%s); continuing without it", what, self.uri, _short(exc))
                return None

    def ensure_experiment(self) -> str | None:
        """Create the experiment once (race-safe) and return its id; ``None`` when tracking is off."""
        if self._experiment_id is not None or not self.enabled:
            return self._experiment_id

        def go() -> str:
            client = self.client
            exp = client.get_experiment_by_name(self.experiment)
            if exp is None:
                try:
                    return client.create_experiment(self.experiment, artifact_location=self.artifact_location)
                except Exception as exc:  # another process created it first
                    exp = client.get_experiment_by_name(self.experiment)
                    if exp is None or "already exists" not in str(exc).lower():
                        raise
            if exp.lifecycle_stage == "deleted":
                client.restore_experiment(exp.experiment_id)
            return exp.experiment_id

        with self._lock:
            if self._experiment_id is None:
                self._experiment_id = self._call("ensure_experiment", go, fatal=True)
        return self._experiment_id

    def start_run(self, name: str | None = None, parent_run_id: str | None = None,
                  tags: Mapping[str, Any] | None = None, run_id: str | None = None) -> str | None:
        """Create a run (nested under ``parent_run_id``) and return its id; ``run_id`` re-attaches to that run."""
        exp_id = self.ensure_experiment()
        if exp_id is None:
            return None
        if run_id is not None:
            def go() -> str:
                self.client.update_run(run_id, status="RUNNING")
                return run_id
        else:
            all_tags = {clean_key(k): _stringify(v, MAX_TAG_VAL_LENGTH) for k, v in (tags or {}).items()}
            if parent_run_id is not None:
                all_tags["mlflow.parentRunId"] = str(parent_run_id)  # mlflow.utils.mlflow_tags.MLFLOW_PARENT_RUN_ID

            def go() -> str:
                return self.client.create_run(exp_id, run_name=name, tags=all_tags).info.run_id

        started = self._call("start_run", go, fatal=True)
        if started is not None:
            with _OPEN_LOCK:
                _OPEN_RUNS[started] = self
        return started

    def end_run(self, run_id: str | None, status: str = "FINISHED", error: Any = None) -> None:
        """Terminate a run: ``FINISHED``, ``FAILED`` or ``KILLED``; ``error`` goes in tag ``brcd.last_error``."""
        if run_id is None:
            return None
        if error is not None:
            self.set_tags(run_id, {"brcd.last_error": " ".join(str(error).split())[-500:]})
        status = status.upper()
        with _OPEN_LOCK:
            _OPEN_RUNS.pop(run_id, None)
        return self._call("end_run", lambda: self.client.set_terminated(run_id, status=status))

    def _log_batch(self, what: str, run_id: str | None, entity: str, rows: list[tuple], size: int) -> None:
        """``client.log_batch`` of ``mlflow.entities.<entity>(*row)`` in chunks of ``size`` (MLflow's limits)."""
        if run_id is None or not rows:
            return None
        field = {"Param": "params", "RunTag": "tags", "Metric": "metrics"}[entity]

        def go() -> None:
            from mlflow import entities

            make = getattr(entities, entity)
            for start in range(0, len(rows), size):
                batch = [make(*row) for row in rows[start : start + size]]
                self.client.log_batch(run_id, **{field: batch}, synchronous=True)

        return self._call(what, go)

    def log_params(self, run_id: str | None, params: Mapping[str, Any]) -> None:
        rows = sorted(flatten_params(params).items()) if run_id is not None else []
        return self._log_batch("log_params", run_id, "Param", rows, 100)

    def set_tags(self, run_id: str | None, tags: Mapping[str, Any]) -> None:
        items = tags.items() if run_id is not None else ()
        rows = [(clean_key(k), _stringify(v, MAX_TAG_VAL_LENGTH)) for k, v in items]
        return self._log_batch("set_tags", run_id, "RunTag", rows, 100)

    def log_metrics(self, run_id: str | None, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log numeric metrics at ``step``; non-numeric values are skipped."""
        now = int(time.time() * 1000)
        rows = []
        for key, value in metrics.items() if run_id is not None else ():
            with contextlib.suppress(TypeError, ValueError):
                value = float(value.item() if hasattr(value, "item") else value)
                rows.append((clean_key(key), value, now, int(step or 0)))
        return self._log_batch("log_metrics", run_id, "Metric", rows, 1000)

    def log_artifact(self, run_id: str | None, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload a file (or every file of a folder) to the run's artifacts."""
        if run_id is None:
            return None
        path = Path(path)
        if not path.exists():
            log.warning("not logging artifact %s to MLflow: it does not exist", path)
            return None
        method = "log_artifacts" if path.is_dir() else "log_artifact"
        return self._call("log_artifact", lambda: getattr(self.client, method)(run_id, str(path), artifact_path))

    def call(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run any MLflow operation under the same guard (retry, warn once, never raise)."""
        return None if self.ensure_experiment() is None else self._call(what, fn)


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _is_retryable(text: str) -> bool:
    """SQLite contention, or two processes racing through MLflow's first-use schema migration."""
    return any(m in text for m in _RETRY_MARKERS) or "already exists" in text and ("table" in text or "index" in text)


def _is_unreachable(exc: BaseException) -> bool:
    import requests  # MLflow's HTTP client

    network = (ConnectionError, TimeoutError, requests.exceptions.ConnectionError, requests.exceptions.Timeout)
    return isinstance(exc, network) or any(m in str(exc).lower() for m in _UNREACHABLE_MARKERS)
