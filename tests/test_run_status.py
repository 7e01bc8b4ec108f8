"""No MLflow run is left RUNNING: however a command stops (a `brcd: error`, an exception, SIGINT,
SIGTERM, a failed Ray Train run), the runs it opened end FAILED or KILLED with the one-line reason
as their `brcd.last_error` tag."""

import os
import signal
import time

import pytest

from conftest import TINY
from pipelines.cli import main

SETS = [x for o in TINY if o != "tracking.enabled=false" for x in ("--set", o)]


def _clusters_run(out):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("brcd-demo")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == "clusters"]
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def _fresh_clusters(trained_run):
    import shutil

    shutil.rmtree(trained_run / "clusters")  # the stage runs again (and opens its MLflow run)


def _raise(exc):
    def go(*a, **k):
        raise exc
    return go


def _sigterm(*a, **k):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # the handler interrupts this
    raise AssertionError("SIGTERM did not stop the command")


@pytest.mark.parametrize("how, patch, rc, status, reason", [
    ("brcd error", None, 2, "FAILED", "num_clusters"),
    ("exception", _raise(RuntimeError("k-means exploded")), None, "FAILED", "RuntimeError: k-means exploded"),
    ("SIGINT", _raise(KeyboardInterrupt()), 130, "KILLED", "interrupted (Ctrl-C)"),
    ("SIGTERM", _sigterm, 130, "KILLED", "interrupted (signal 15)"),
])
def test_a_stage_that_stops_closes_its_run(trained_run, monkeypatch, capsys, how, patch, rc, status, reason):
    from brcd import clustering
    from pipelines import cli

    monkeypatch.setattr(cli, "_shutdown_ray", lambda: None)  # keep the shared Ray session (not under test here)
    _fresh_clusters(trained_run)
    args = ["clusters", "-c", "demo", "--output", str(trained_run), *SETS]
    if patch is None:  # more clusters than the 256 training codes: the real one-line error
        args += ["--set", "clusters.num_clusters=1000"]
    else:
        monkeypatch.setattr(clustering, "build_cluster_artifact", patch)
    if rc is None:
        with pytest.raises(RuntimeError, match="k-means exploded"):
            main(args)
    else:
        assert main(args) == rc
        assert ("brcd: error" in capsys.readouterr().err) == (rc == 2)
    run = _clusters_run(trained_run)
    assert run.info.status == status and run.info.end_time is not None
    tag = run.data.tags["brcd.last_error"]
    assert reason in tag and "\n" not in tag


def test_a_failed_ray_train_run_closes_the_stage_run(trained_run, monkeypatch):
    """The driver sees a Train run whose workers died as a StageError (pipelines.ray.cluster.run_trainer)."""
    from pipelines import stages
    from pipelines.ray.cluster import StageError

    monkeypatch.setattr(stages, "run_trainer", _raise(StageError("distill-abc failed: worker 1 died (exit 1)")))
    assert main(["distill", "-c", "demo", "--output", str(trained_run), *SETS]) == 2
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{trained_run / 'mlflow.db'}")
    exp = client.get_experiment_by_name("brcd-demo")
    (run,) = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == "distill"]
    assert run.info.status == "FAILED" and "worker 1 died" in run.data.tags["brcd.last_error"]
    assert not [r for r in client.search_runs([exp.experiment_id]) if r.info.status == "RUNNING"]
