"""brcd.mlflow.tracking: URI resolution, runs on a SQLite store, and the never-crash guard."""

import logging
from pathlib import Path

import pytest
import torch

from brcd.mlflow.tracking import (
    Tracker,
    artifact_location_for,
    clean_key,
    default_tracking_uri,
    flatten_params,
    sqlite_db_path,
)


# ---- URIs (no MLflow needed) -----------------------------------------------------------------


def test_default_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = default_tracking_uri(tmp_path / "out")
    assert uri == f"sqlite:///{(tmp_path / 'out' / 'mlflow.db').resolve()}"
    assert uri.startswith("sqlite:////")  # absolute path: four slashes
    assert (tmp_path / "out").is_dir()  # sqlite cannot create the folder itself
    assert sqlite_db_path(uri) == (tmp_path / "out" / "mlflow.db").resolve()
    assert artifact_location_for(uri) == (tmp_path / "out" / "mlartifacts").resolve().as_uri()

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert default_tracking_uri(tmp_path) == "http://tracking:5000"
    assert artifact_location_for("http://tracking:5000") is None
    assert default_tracking_uri(tmp_path, "sqlite:////x/y.db") == "sqlite:////x/y.db"  # explicit wins

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert default_tracking_uri(tmp_path, str(tmp_path / "runs.db")) == f"sqlite:///{(tmp_path / 'runs.db').resolve()}"
    assert default_tracking_uri(tmp_path, str(tmp_path / "track")).endswith("/track/mlflow.db")


def test_file_store_is_refused_with_a_hint(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(ValueError, match="sqlite:///"):
        default_tracking_uri(tmp_path, (tmp_path / "mlruns").as_uri())


def test_flatten_params_limits():
    flat = flatten_params({"a": {"b": [1, 2], "c": None}, "long": "x" * 7000, "k" * 300: 1})
    assert flat["a.b"] == "[1, 2]" and flat["a.c"] == "None"
    assert len(flat["long"]) == 6000 and flat["long"].endswith("...")
    assert "k" * 250 in flat
    assert clean_key("map@1000") == "map_1000" and clean_key("val/map") == "val/map"
    assert clean_key("/abs//x") == "_abs__x" and clean_key("") == "_"


def test_disabled_tracker_is_a_noop():
    tracker = Tracker(None, "x", enabled=True)  # no uri: nothing to talk to
    assert not tracker.enabled
    assert tracker.start_run("r") is None
    tracker.log_params(None, {"a": 1})
    tracker.log_metrics(None, {"a": 1.0}, step=0)
    tracker.end_run(None)
    off = Tracker("sqlite:////nonexistent/x.db", "x", enabled=False)
    assert off.start_run("r") is None and off.disabled_reason == "disabled by configuration"


# ---- the guard with a fake client (fast, no backend) -----------------------------------------


class _FlakyClient:
    def __init__(self, failures, message):
        self.failures, self.message, self.calls = failures, message, 0

    def log_batch(self, run_id, **kwargs):
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError(self.message)


def _tracker_with(client):
    tracker = Tracker("sqlite:////tmp/unused.db", "x")
    tracker._client, tracker._experiment_id = client, "1"
    tracker.backoff_s = 0.001
    return tracker


def test_database_locked_is_retried(caplog):
    client = _FlakyClient(2, "(sqlite3.OperationalError) database is locked")
    tracker = _tracker_with(client)
    with caplog.at_level(logging.WARNING, logger="brcd.mlflow.tracking"):
        tracker.log_metrics("run", {"loss": 1.0}, step=3)
    assert client.calls == 3 and tracker.enabled and not caplog.records


def test_other_failures_warn_once_and_keep_tracking(caplog):
    client = _FlakyClient(10**6, "INVALID_PARAMETER_VALUE: Changing param values is not allowed")
    tracker = _tracker_with(client)
    with caplog.at_level(logging.WARNING, logger="brcd.mlflow.tracking"):
        tracker.log_params("run", {"a": 1})
        tracker.log_params("run", {"a": 2})
    assert tracker.enabled and client.calls == 2  # not retried, not disabled
    assert len(caplog.records) == 1 and "log_params failed" in caplog.records[0].getMessage()


def test_unreachable_server_warns_once_and_noops(monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    tracker = Tracker("http://127.0.0.1:9", "brcd")
    with caplog.at_level(logging.WARNING, logger="brcd.mlflow.tracking"):
        run_id = tracker.start_run("teacher", tags={"a": "b"})
        tracker.log_params(run_id, {"a": 1})
        tracker.log_metrics("some-run", {"loss": 0.5}, step=1)  # even with an id: no-op now
        tracker.log_artifact("some-run", __file__)
        tracker.end_run("some-run", "FAILED")
        child = tracker.start_run("child", parent_run_id="some-run")
    assert run_id is None and child is None and not tracker.enabled
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings
    assert "MLflow tracking at http://127.0.0.1:9 is unreachable" in warnings[0]
    assert "training continues without tracking" in warnings[0]


# ---- a real SQLite store ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def sqlite_tracker(tmp_path_factory):
    out = tmp_path_factory.mktemp("track")
    tracker = Tracker(default_tracking_uri(out, str(out / "mlflow.db")), "brcd-test")  # explicit: ignores the env
    assert tracker.ensure_experiment() is not None, tracker.disabled_reason
    return out, tracker


def test_runs_params_metrics_artifacts_and_nesting(sqlite_tracker, tmp_path):
    out, tracker = sqlite_tracker
    parent = tracker.start_run("sweep", tags={"stage": "tune"})
    child = tracker.start_run("trial-0", parent_run_id=parent)
    assert parent and child and parent != child

    params = {f"p{i}": i for i in range(130)}  # > 100: two log_batch chunks
    params["nested"] = {"lr": 1e-3, "bits": [16, 32]}
    tracker.log_params(child, params)
    for step in range(3):
        tracker.log_metrics(child, {"loss": 1.0 / (step + 1), "note": "skipped", "map@10": torch.tensor(0.5)}, step=step)
    (tmp_path / "result.json").write_text("{}")
    tracker.log_artifact(child, tmp_path / "result.json", artifact_path="results")
    tracker.end_run(child)
    tracker.end_run(parent, "FAILED")

    client = tracker.client
    run = client.get_run(child)
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.info.run_name == "trial-0" and run.info.status == "FINISHED"
    assert run.data.params["p129"] == "129" and run.data.params["nested.bits"] == "[16, 32]"
    assert [m.step for m in client.get_metric_history(child, "loss")] == [0, 1, 2]
    assert "note" not in run.data.metrics and run.data.metrics["map_10"] == 0.5
    assert [a.path for a in client.list_artifacts(child, "results")] == ["results/result.json"]
    assert client.get_run(parent).info.status == "FAILED"
    assert client.get_run(parent).data.tags["stage"] == "tune"

    # artifacts stay under the output folder, next to the database
    assert Path(run.info.artifact_uri.replace("file://", "")).is_relative_to((out / "mlartifacts").resolve())
    assert (out / "mlartifacts").is_dir()

    # a restarted worker re-attaches to the same run
    assert tracker.start_run(run_id=child) == child
    assert client.get_run(child).info.status == "RUNNING"
    tracker.end_run(child)


def test_experiment_creation_is_idempotent(sqlite_tracker):
    out, tracker = sqlite_tracker
    again = Tracker(tracker.uri, tracker.experiment)
    assert again.ensure_experiment() == tracker.experiment_id


def test_tracker_survives_shipping_to_a_worker(sqlite_tracker):
    import pickle  # how Ray (cloudpickle) moves objects between processes; our own object, in memory

    out, tracker = sqlite_tracker
    clone = pickle.loads(pickle.dumps(tracker))
    assert clone.uri == tracker.uri and clone.experiment_id == tracker.experiment_id
    run_id = clone.start_run("worker")
    assert run_id and clone.client.get_run(run_id).info.experiment_id == tracker.experiment_id


def test_from_config(tmp_path, monkeypatch):
    from brcd.config import TrackingConfig

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = Tracker.from_config(TrackingConfig(experiment="e1"), tmp_path)
    assert tracker.uri.endswith("/mlflow.db") and tracker.experiment == "e1" and tracker.enabled
    off = Tracker.from_config(TrackingConfig(enabled=False), tmp_path)
    assert not off.enabled and off.start_run("x") is None


def test_registration_chatter_is_quiet_unless_asked_for(monkeypatch, capfd):
    """MLflow's event lines ("Successfully registered model ...") are muted while the student is
    logged and registered, even across an inner MLflow mute/unmute (what importing
    mlflow.types.responses does inside log_model); MLFLOW_LOGGING_LEVEL=INFO (brcd -v) keeps them."""
    from mlflow.utils.autologging_utils.logging_and_warnings import MlflowEventsAndWarningsBehaviorGlobally
    from mlflow.utils.logging_utils import eprint

    from brcd.mlflow.registry import _quiet_mlflow

    monkeypatch.setenv("MLFLOW_LOGGING_LEVEL", "WARNING")
    with _quiet_mlflow():
        eprint("chatter before")
        with MlflowEventsAndWarningsBehaviorGlobally(disable_event_logs=True, disable_warnings=False,
                                                     reroute_warnings=False):
            pass
        eprint("chatter after")
    eprint("outside")
    err = capfd.readouterr().err
    assert "chatter" not in err and "outside" in err
    monkeypatch.setenv("MLFLOW_LOGGING_LEVEL", "INFO")
    with _quiet_mlflow():
        eprint("asked for")
    assert "asked for" in capfd.readouterr().err
