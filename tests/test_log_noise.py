"""Ray's own lines that look broken in a healthy run (issue 21, part 4): each filter drops exactly its
record, passes every other one, and ``brcd -v`` keeps them. The texts are the ones Ray 2.60 printed
under ``ray job submit``, a Train run joined with ``--address`` and ``brcd tune``."""

from __future__ import annotations

import json
import logging

import pytest

from pipelines.ray import logs

PREEMPTION = ("[2026-12-07 22:58:20,722 E 18050 18226] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' "
              "and ID: 'bfe0255051a7fcd35394a6ce02000000' has constructor arguments in the object store and "
              "max_restarts > 0. If the arguments in the object store go out of scope or are lost, the actor restart "
              "will fail. See https://github.com/ray-project/ray/issues/53727 for more details.")
OTHER_ACTOR = PREEMPTION.replace("'PreemptionWatcher'", "'MapWorker(MapBatches(_ShardWriter))'")
FETCH = ("Failed to fetch metrics for 1 trial(s):\n- run_trial_b8a79_00001: FileNotFoundError('Could not fetch metrics "
         "for run_trial_b8a79_00001: both result.json and progress.csv were not found at /r/tune/trial_b8a79_00001')")
ANALYSIS = "ray.tune.analysis.experiment_analysis"
TOKEN = "ray._private.authentication.authentication_token_setup"


def _passes(logger: str, message: str) -> bool:
    record = logging.LogRecord(logger, logging.WARNING, "", 0, message, None, None)
    return logging.getLogger(logger).filter(record)


@pytest.fixture
def restore_filters():
    yield
    logs.quiet_ray_logs(True)


def test_tune_fetch_warning_is_dropped_only_for_missing_files_and_shown_with_v(restore_filters):
    logs.quiet_ray_logs(True)
    assert not _passes(ANALYSIS, FETCH)
    assert not _passes(ANALYSIS, FETCH + FETCH.split(":", 1)[1].replace("00001", "00002"))  # two trials, both missing
    other_error = FETCH.replace("FileNotFoundError('Could not fetch metrics", "JSONDecodeError('Expecting value")
    assert _passes(ANALYSIS, other_error)  # a broken result file still shows
    assert _passes(ANALYSIS, FETCH + "\n- t2: ValueError('bad')")
    assert _passes(ANALYSIS, "Some other Tune warning")
    assert _passes("ray.tune.other", FETCH)  # only that logger
    logs.quiet_ray_logs(False)  # brcd -v
    assert _passes(ANALYSIS, FETCH)
    assert not _passes(TOKEN, "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled")
    assert _passes(TOKEN, "Token authentication is disabled")


def test_preemption_watcher_line_is_dropped_from_worker_output_only():
    batch = {"pid": 18050, "actor_name": "TrainController", "is_err": True, "lines": [PREEMPTION]}
    assert logs.drop_worker_noise(batch) is None
    kept = logs.drop_worker_noise({**batch, "lines": ["[teacher] epoch 1/1", PREEMPTION, OTHER_ACTOR]})
    assert kept is not None and kept["lines"] == ["[teacher] epoch 1/1", OTHER_ACTOR] and kept["pid"] == 18050
    untouched = {**batch, "lines": [OTHER_ACTOR, "Traceback (most recent call last):"]}
    assert logs.drop_worker_noise(untouched) is untouched
    assert logs.drop_worker_noise({**batch, "lines": []})["lines"] == []


def test_worker_printer_is_wrapped_once(monkeypatch):
    from ray._private.ray_logging import WorkerStandardStreamDispatcher

    dispatcher, printed = WorkerStandardStreamDispatcher(), []
    dispatcher.add_handler("ray_print_logs", lambda data: printed.append(data["lines"]))
    monkeypatch.setattr("ray._private.ray_logging.global_worker_stdstream_dispatcher", dispatcher)
    logs.filter_worker_output()
    logs.filter_worker_output()  # a second init_ray in the process does not wrap twice
    assert len(dispatcher.handlers) == 1
    dispatcher.emit({"pid": 1, "is_err": True, "lines": [PREEMPTION]})
    dispatcher.emit({"pid": 1, "is_err": True, "lines": ["hello", PREEMPTION]})
    assert printed == [["hello"]]


def test_joined_cluster_workers_get_the_cluster_address(monkeypatch):
    """Ray Train's placement-group cleaner finds the State API through RAY_ADDRESS: without it, a second
    Ray on the head's host made it die with "Found multiple active Ray instances"."""
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.7:6379")  # as under `ray job submit`
    assert logs.cluster_runtime_env("auto") == {"env_vars": {"RAY_ADDRESS": "10.0.0.7:6379"}}
    monkeypatch.delenv("RAY_ADDRESS")
    assert logs.cluster_runtime_env("10.0.0.8:6379") == {"env_vars": {"RAY_ADDRESS": "10.0.0.8:6379"}}
    assert logs.cluster_runtime_env("ray://10.0.0.8:10001") is None
    job = {"runtime_env": {"env_vars": {"RAY_ADDRESS": "10.0.0.9:6379"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))  # the job's own setting wins
    assert logs.cluster_runtime_env("10.0.0.8:6379") is None


def test_init_ray_joining_a_cluster_passes_the_address_and_quiets_worker_output(tmp_path, monkeypatch):
    import pipelines.ray.cluster as ray_utils

    seen, wrapped = {}, []
    monkeypatch.setattr(ray_utils.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_utils.ray, "init", lambda **kw: seen.update(kw))
    monkeypatch.setattr(ray_utils, "_token_refused", lambda address: False)
    monkeypatch.setattr(ray_utils, "filter_worker_output", lambda: wrapped.append(1))
    monkeypatch.setattr(ray_utils, "_start_autoscaling_coordinator", lambda **kw: None)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray_utils.init_ray("10.0.0.7:6379", tmp_path)
    assert seen["runtime_env"] == {"env_vars": {"RAY_ADDRESS": "10.0.0.7:6379"}} and wrapped == [1]
    ray_utils.init_ray("10.0.0.7:6379", tmp_path, quiet=False)  # brcd -v: worker output as Ray prints it
    assert wrapped == [1]
    logs.quiet_ray_logs(True)
