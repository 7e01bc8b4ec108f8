"""`brcd tune`: the search space, and one real tuning job, made by the documented demo command
(small sizes) on the shared tiny teacher and inspected by several tests: k-means once per K, ASHA
stopping a trial, the results table and best config, an interrupted run resumed without rerunning
finished trials, no placement group left reserved (Ray #54305), the demo's 2 workers per trial on
2 CPUs, and every trial's MLflow run nested under the job's parent run."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from conftest import TINY, start_ray, tiny_config
from pipelines import tune as T


# --------------------------------------------------------------------------------------------
# The space (no Ray)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("params, match", [
    ({"mask_ratoi": [0.1]}, r"unknown parameter 'mask_ratoi'; did you mean 'mask_ratio'"),
    ({"mask_ratio": {"uniform": [0.5, 0.2]}}, r"'mask_ratio'.*low >= high"),
    ({"temperature": {"loguniform": [0.3, 0.3]}}, r"'temperature'.*empty \(low >= high\)"),
    ({"num_clusters": {"choice": []}}, r"'num_clusters' has an empty choice list"),
    ({"num_clusters": {"uniform": [2, 8]}}, r"'num_clusters' is an integer; use choice, grid or randint"),
    ({"mask_ratio": {"choice": [0.5, 1.5]}}, r"'mask_ratio' value 1.5 is outside \[0, 1\]"),
    ({"lr": {"loguniform": ["1e-4", 1.0e-2]}}, r"'lr' needs numbers.*write 1.0e-3"),
    ({"alpha": {"normal": [0, 1]}}, r"'alpha' must be one of"),
    ({"temperature": {"uniform": [0.0, 1.0]}}, r"'temperature' value 0.0 is outside \(0, inf\)"),
])
def test_invalid_spaces_fail_in_one_line_naming_the_parameter(params, match):
    with pytest.raises(ValueError, match=match) as exc:
        T.parse_space({"params": params})
    assert "\n" not in str(exc.value)


def test_invalid_search_sections():
    ok = {"params": {"mask_ratio": [0.2]}}
    for search, match in [({"algorithm": "bayes"}, "search.algorithm 'bayes'"),
                          ({"metric": "map"}, "search.metric 'map'"),
                          ({"asha": {"max_t": 5}}, "max_t is always distill.optim.epochs"),
                          ({"asha": {"reduction_factor": 1}}, "reduction_factor must be a number > 1"),
                          ({"num_samples": 0}, "num_samples must be an integer >= 1"),
                          ({"resources": {"driver_cpus": -0.5}}, "driver_cpus must be in"),
                          ({"samples": 3}, "unknown key")]:
        with pytest.raises(ValueError, match=match):
            T.parse_space({**ok, "search": search})
    with pytest.raises(ValueError, match="uses grid, which Optuna cannot search"):
        T.parse_space({"params": {"num_clusters": {"grid": [3, 4]}}, "search": {"algorithm": "optuna"}})
    with pytest.raises(ValueError, match="neither a file nor a name"):
        T.load_space("no_such_space")


def test_bundled_spaces_and_parameter_mapping():
    from ray import tune

    default = T.load_space("default")
    assert set(default.params) == {"mask_ratio", "num_clusters", "temperature", "alpha", "lr"}
    assert default.search.metric == "map_asymmetric" and default.search.mode == "max"
    demo = T.load_space("demo", algorithm="grid")
    assert demo.search.num_samples == 1  # one trial per grid point
    space = demo.param_space()
    assert space["num_clusters"] == tune.grid_search([8, 10]) and space["mask_ratio"] == tune.grid_search([0.25, 0.5])
    assert T.load_space("demo", metric="map_symmetric", num_samples=7).search.num_samples == 7
    assert demo.cluster_counts(tiny_config()) == [8, 10]
    assert T.parse_space({"params": {"num_clusters": {"randint": [3, 5]}}}).cluster_counts(tiny_config()) == [3, 4, 5]
    cfg = T.trial_config(tiny_config(), {"mask_ratio": 0.3, "num_clusters": 6, "temperature": 0.2, "alpha": 0.5,
                                         "lr": 0.01})
    assert (cfg.clusters.mask_ratio, cfg.clusters.margin, cfg.clusters.num_clusters) == (0.3, None, 6)
    assert (cfg.distill.optim.temperature, cfg.distill.alpha, cfg.distill.optim.lr) == (0.2, 0.5, 0.01)
    broken = tiny_config()
    broken.clusters.n_init = 0  # every trial config is validated before any work starts
    with pytest.raises(ValueError, match="num_clusters': 3.*gives an invalid config.*n_init"):
        T.check_space_against(T.parse_space({"params": {"num_clusters": [3]}}), broken)


def test_cli_parses_the_tune_command():
    from pipelines.cli import build_parser

    args = build_parser().parse_args(["tune", "-c", "demo", "--space", "demo", "--output", "o", "--num-samples", "3",
                                      "--search", "optuna", "--metric", "map_symmetric", "--set", "seed=1"])
    assert (args.space, args.num_samples, args.search, args.metric, args.overrides) == (
        "demo", 3, "optuna", "map_symmetric", ["seed=1"])
    assert args.func is T.cmd_tune


def _nodes(monkeypatch, *nodes, node_types=None):
    import pipelines.ray.cluster as R

    monkeypatch.setattr(R.ray, "nodes", lambda: [{"Alive": True, "Resources": n} for n in nodes])
    monkeypatch.setattr(R, "_autoscaling_node_types", lambda: node_types)
    return R


@pytest.mark.parametrize("sets, driver, nodes, node_types, needle", [
    # the demo on a 2-core machine: fits without a CPU for the trial's process, not with 0.01
    ([], None, [{"CPU": 2.0}], None, None),
    ([], {"CPU": 0.01}, [{"CPU": 2.0}], None,
     "each trial asks for 2 Train worker(s) x 1 CPU (PACK) + 0.01 CPU for the trial's own process, but the cluster "
     "has 2 CPU on 1 node(s); lower resources.num_workers (--workers N) or resources.cpus_per_worker "
     "(or search.resources.driver_cpus), or add nodes"),
    (["resources.num_workers=3"], None, [{"CPU": 1.0}, {"CPU": 1.0}], None,
     "3 Train worker(s) x 1 CPU (PACK), but the cluster has 2 CPU on 2 node(s) (1 CPU; 1 CPU)"),
    (["resources.placement_strategy=STRICT_PACK"], None, [{"CPU": 1.0}, {"CPU": 1.0}], None, "(STRICT_PACK)"),
    (["resources.placement_strategy=STRICT_SPREAD"], None, [{"CPU": 4.0}], None, "(STRICT_SPREAD)"),
    (["resources.placement_strategy=STRICT_SPREAD"], None, [{"CPU": 1.0}, {"CPU": 1.0}], None, None),
    (["resources.use_gpu=true"], None, [{"CPU": 8.0}], None, "x 1 CPU + 1 GPU (PACK), but the cluster has 8 CPU + 0 GPU"),
    # an autoscaler that can add GPU nodes: judged on its node types, not on the live CPU-only head
    (["resources.use_gpu=true"], None, [{"CPU": 4.0}], [{"CPU": 4.0, "GPU": 1.0}], None),
    (["resources.use_gpu=true", "resources.cpus_per_worker=8"], None, [{"CPU": 4.0}], [{"CPU": 4.0, "GPU": 1.0}],
     "no node here or among the autoscaler's node types holds one worker (4 CPU + 1 GPU)"),
])
def test_a_trial_that_cannot_be_placed_is_one_line(monkeypatch, sets, driver, nodes, node_types, needle):
    R = _nodes(monkeypatch, *nodes, node_types=node_types)
    res = tiny_config("resources.num_workers=2", *sets).resources
    problem = R.placement_problem(res, "each trial", driver=driver)
    if needle is None:
        assert problem is None
        R.check_placement(res, "each trial", driver=driver)
    else:
        assert problem is not None and needle in problem and "\n" not in problem, problem
        with pytest.raises(R.StageError, match="asks for"):
            R.check_placement(res, "each trial", driver=driver)


def test_trial_process_reserves_no_cpu_by_default():
    space = T.load_space("demo")
    assert space.search.driver_cpus == 0 and T._trial_resources(tiny_config(), space) == {"cpu": 0, "memory": 1}
    assert T._driver_bundle(space) is None
    custom = T.parse_space({"params": {"mask_ratio": [0.2]}, "search": {"resources": {"driver_cpus": 0.5}}})
    assert T._trial_resources(tiny_config(), custom) == {"cpu": 0.5} and T._driver_bundle(custom) == {"CPU": 0.5}


# --------------------------------------------------------------------------------------------
# One real tuning job, shared by the tests below
# --------------------------------------------------------------------------------------------


def interrupt_once(marker: Path, after: int = 1):
    """A Tune callback that interrupts the run (as Ctrl-C does) once ``after`` trials finished.
    Tune saves callbacks with the experiment; the marker file keeps the restored copy quiet."""
    from ray.tune import Callback

    class InterruptOnce(Callback):
        def __init__(self):
            self.done = 0

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            if self.done >= after and not marker.exists():
                marker.write_text(trial.trial_id)
                os.kill(os.getpid(), signal.SIGUSR1)  # Tune's handler: stop and save the experiment state

    return InterruptOnce()


def _created_placement_groups():
    import ray

    return {pid for pid, info in ray.util.placement_group_table().items() if info["state"] == "CREATED"}


def _documented_tune_command() -> list[str]:
    """The demo tuning command exactly as docs/TUNE.md (and the README's `brcd tune` row) show it."""
    import shlex

    doc = (Path(__file__).resolve().parent.parent / "docs" / "TUNE.md").read_text()
    line = next(ln for ln in doc.splitlines() if ln.startswith("brcd tune -c demo --space demo --output "))
    return shlex.split(line)[1:]


# The demo's own resources (2 Train workers x 1 CPU) and tracking (on), the tiny config's sizes; 4
# epochs validated at 3 and 4: ASHA (demo space: grace 3, reduction 3) has its one rung at epoch 3.
SETS = [o for o in TINY if not o.startswith(("resources.num_workers", "tracking.enabled"))] + [
    "distill.optim.epochs=4", "distill.optim.validate_every=3"]
SAMPLES = 3  # ASHA compares trials within one run: 1 before the interruption, 2 after it


def _mlflow_runs(out: Path) -> dict[str, dict]:
    """Run name -> id, status, tags, params, latest metrics of the job's experiment."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("brcd-demo")
    runs = client.search_runs([exp.experiment_id]) if exp else []
    return {r.info.run_name: {"id": r.info.run_id, "status": r.info.status, "tags": r.data.tags,
                              "params": r.data.params, "metrics": r.data.metrics} for r in runs}


@pytest.fixture(scope="module")
def tune_job(_trained_base, tmp_path_factory):
    """The documented command three times on one folder that holds the shared tiny teacher (reused,
    not retrained): interrupted after its first finished trial, resumed, then once more. Returns each
    call's exit code, printed output, ``TuneSummary`` and a snapshot of the folder and MLflow after it."""
    from brcd import clustering
    from brcd.config import load_config
    from pipelines.cli import main

    ray = start_ray()
    assert ray.cluster_resources()["CPU"] == 2  # the shared session: a 2-core machine, whatever this one has
    out = tmp_path_factory.mktemp("tune") / "job"
    shutil.copytree(_trained_base, out, ignore=shutil.ignore_patterns("ray", "ray_tmp"))
    argv = _documented_tune_command()
    assert argv[:5] == ["tune", "-c", "demo", "--space", "demo"] and argv[5] == "--output"
    argv[6] = str(out)
    argv += [*(x for o in SETS for x in ("--set", o)), "--num-samples", str(SAMPLES)]
    assert load_config("demo", SETS).resources.num_workers == 2 and load_config("demo", SETS).tracking.enabled

    builds, calls = [], []
    real_build, real_tune_main = clustering.build_cluster_artifact, T.tune_main

    def tune_main(*args, **kwargs):  # what `brcd tune` calls; the first call gets the interruption
        extra = [] if calls else [interrupt_once(out.parent / "interrupted")]
        calls.append({"summary": real_tune_main(*args, callbacks=extra, **kwargs)})
        return calls[-1]["summary"]

    pgs_before = _created_placement_groups()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setattr(clustering, "build_cluster_artifact",
                   lambda codes, **kw: builds.append(kw["num_clusters"]) or real_build(codes, **kw))
        mp.setattr(T, "tune_main", tune_main)
        for i in range(3):
            printed, t0 = io.StringIO(), time.monotonic()
            with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
                rc = main(argv)
            (out.parent / f"call{i}.log").write_text(printed.getvalue())  # kept with pytest's temp folders
            print(f"brcd tune call {i + 1}: rc {rc} in {time.monotonic() - t0:.0f} s")
            stamps = {p.parent.name: p.stat().st_mtime_ns for p in (out / "trials").glob("*/stage.json")}
            calls[-1].update(rc=rc, printed=printed.getvalue(), builds=list(builds), mlflow=_mlflow_runs(out),
                             ray_runs=sorted(p.name for p in (out / "ray").iterdir()), stamps=stamps)
    return {"out": out, "calls": calls, "pgs_before": pgs_before}


@pytest.mark.ray
def test_documented_tune_command_runs_the_demos_two_workers_per_trial_on_two_cpus(tune_job):
    """2 Train workers x 1 CPU (the demo preset's own) on a 2-CPU Ray: the trial's process must not
    hold a CPU of its own, or Ray Train waits for its second CPU for ever (0 trials in 13 min)."""
    from brcd.config import load_config

    calls = tune_job["calls"]
    assert [c["rc"] for c in calls] == [130, 0, 0], calls[-1]["printed"][-3000:]  # 130: interrupted, resumable
    for c in calls:
        assert "Traceback" not in c["printed"], c["printed"][-3000:]
    assert "[teacher] already trained" in calls[0]["printed"]  # the shared teacher was reused
    rows = calls[1]["summary"].rows
    assert len(rows) == SAMPLES
    for r in rows:
        trial = load_config(tune_job["out"] / "trials" / r["trial_id"] / "config.yaml")
        assert (trial.resources.num_workers, trial.resources.cpus_per_worker) == (2, 1.0)
        assert (trial.clusters.num_clusters, trial.clusters.mask_ratio) == (r["num_clusters"], r["mask_ratio"])
        assert r["num_clusters"] in (8, 10) and r["mask_ratio"] in (0.25, 0.5) and 0.2 <= r["temperature"] <= 0.5


@pytest.mark.ray
def test_tune_builds_kmeans_once_per_k_before_the_trials(tune_job):
    first, second, third = tune_job["calls"]
    assert first["builds"] == [8, 10]  # every K of the space, before any trial
    assert second["builds"] == third["builds"] == [8, 10]  # the resumed runs reused both caches
    rows = second["summary"].rows
    assert {k: sorted(e["trials"]) for k, e in second["summary"].cluster_cache.items()} == {
        k: sorted(r["trial_id"] for r in rows if r["num_clusters"] == k) for k in (8, 10)}


@pytest.mark.ray
def test_asha_stops_a_trial_and_the_results_are_ranked(tune_job):
    from brcd.config import load_config

    out, summary = tune_job["out"], tune_job["calls"][1]["summary"]
    rows = summary.rows
    statuses = [r["status"] for r in rows]
    assert set(statuses) <= {"terminated", "stopped early by ASHA"}, statuses
    stopped = [r for r in rows if r["status"] == "stopped early by ASHA"]
    assert stopped and all(r["epochs_run"] == 3 for r in stopped)  # at the rung, before the last epoch
    assert all(r["epochs_run"] == 4 for r in rows if r["status"] == "terminated")
    best_values = [r["best_map_asymmetric"] for r in rows]
    assert best_values == sorted(best_values, reverse=True) and all(0 < v <= 1 for v in best_values)

    with open(out / "tune_results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["trial_id"] for r in table] == [r["trial_id"] for r in rows]
    assert {"trial_id", "num_clusters", "mask_ratio", "temperature", "status", "epochs_run", "best_map_asymmetric",
            "final_map_asymmetric", "best_map_symmetric", "final_map_symmetric", "error"} <= set(table[0])
    assert [r["status"] for r in table] == statuses

    best = load_config(out / "best_config.yaml")
    top = rows[0]
    assert summary.best["trial_id"] == top["trial_id"]
    assert (best.clusters.num_clusters, best.clusters.mask_ratio, best.clusters.margin) == (
        top["num_clusters"], top["mask_ratio"], None)
    assert best.distill.optim.temperature == top["temperature"]
    assert best.distill.optim.epochs == 4 and best.resources.num_workers == 2


@pytest.mark.ray
def test_an_interrupted_job_resumes_without_rerunning_finished_trials(tune_job):
    first, second, third = tune_job["calls"]
    assert first["summary"].interrupted and not first["summary"].restored
    done_first = {r["trial_id"]: r for r in first["summary"].rows if r["status"] != "unfinished"}
    assert len(done_first) >= 1 and first["stamps"]
    assert second["summary"].restored and not second["summary"].interrupted
    rows = second["summary"].rows
    assert len({r["trial_id"] for r in rows}) == SAMPLES
    for t, r in done_first.items():
        assert next(x for x in rows if x["trial_id"] == t) == r  # not rerun: same row
    assert {t: second["stamps"][t] for t in first["stamps"]} == first["stamps"]  # its weights not rewritten
    # once more: nothing runs again, same results
    assert third["summary"].restored and third["summary"].rows == rows
    assert third["ray_runs"] == second["ray_runs"] and third["stamps"] == second["stamps"]


@pytest.mark.ray
def test_no_placement_group_is_left_reserved(tune_job):
    """Trials ASHA stopped must not keep their Train workers' placement group (Ray issue #54305)."""
    for c in tune_job["calls"]:
        assert c["summary"].leaked_placement_groups == []
    assert _created_placement_groups() <= tune_job["pgs_before"]


@pytest.mark.ray
def test_every_trial_has_one_mlflow_run_nested_under_the_jobs_run(tune_job):
    """One parent run for the job, kept across the interruption and the reruns; one run per trial,
    named by its trial id, with its sampled values and config hash, every report to Tune at
    step=epoch (each epoch once, across the resume) and its final metrics and status."""
    from mlflow import MlflowClient

    from brcd.config import load_config
    from brcd.io import settings_hash

    out, calls = tune_job["out"], tune_job["calls"]
    runs = calls[-1]["mlflow"]
    parent = runs["tune-demo"]
    assert [c["mlflow"]["tune-demo"]["id"] for c in calls] == [parent["id"]] * 3  # found again by its tag
    assert [c["mlflow"]["tune-demo"]["status"] for c in calls] == ["KILLED", "FINISHED", "FINISHED"]
    assert parent["tags"]["brcd.kind"] == "tune" and "mlflow.parentRunId" not in parent["tags"]
    assert parent["params"]["tune.params.num_clusters.choice"] == "[8, 10]"
    rows = calls[1]["summary"].rows
    assert parent["metrics"]["best_map_asymmetric"] == rows[0]["best_map_asymmetric"]
    assert parent["tags"]["best_trial_id"] == rows[0]["trial_id"] and parent["metrics"]["trials"] == SAMPLES

    trial_runs = {name: r for name, r in runs.items() if r["tags"].get("brcd.kind") == "tune_trial"}
    assert sorted(trial_runs) == sorted(r["trial_id"] for r in rows)  # one each: no duplicate after the resume
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    for row in rows:
        run = trial_runs[row["trial_id"]]
        assert run["tags"]["mlflow.parentRunId"] == parent["id"] and run["tags"]["trial_id"] == row["trial_id"]
        trial_cfg = load_config(out / "trials" / row["trial_id"] / "config.yaml")
        assert run["params"] == {"num_clusters": str(row["num_clusters"]), "mask_ratio": str(row["mask_ratio"]),
                                 "temperature": str(row["temperature"]),
                                 "config_hash": settings_hash(trial_cfg.to_dict())}
        assert run["status"] == "FINISHED" and run["tags"]["status"] == row["status"]
        history = client.get_metric_history(run["id"], "map_asymmetric")
        assert [m.step for m in history] == ([3] if row["status"] == "stopped early by ASHA" else [3, 4])
        assert history[-1].value == pytest.approx(row["final_map_asymmetric"])
        for key in ("final_map_asymmetric", "best_map_asymmetric", "final_map_symmetric", "best_map_symmetric"):
            assert run["metrics"][key] == pytest.approx(row[key]), key
        assert len(client.get_metric_history(run["id"], "final_map_asymmetric")) == 1  # not logged again by reruns
        assert run["metrics"]["epochs_run"] == row["epochs_run"]
        assert {"loss/total", "map_symmetric", "best_map_symmetric", "epoch"} <= set(run["metrics"]), run["metrics"]
        assert not {"training_iteration", "time_this_iter_s", "timestamp", "pid"} & set(run["metrics"])


def test_trial_runs_are_found_again_by_their_tags(tmp_path, monkeypatch):
    """Without Ray: a resumed job (a new process: the pickled logger) re-attaches to the parent and
    to each trial's run, skips the epochs already logged and does not repeat final values; with the
    backend down every call is a no-op."""
    import pickle
    import socket

    from mlflow import MlflowClient

    from pipelines.stage_tracking import TuneTrialRuns, tracker_for

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = tiny_config("tracking.enabled=true", "tracking.experiment=brcd-test")
    job = "job123"
    parent = tracker_for(cfg, tmp_path).start_parent("tune-demo", key=job)
    assert tracker_for(cfg, tmp_path).start_parent("tune-demo", key=job) == parent  # found by its tag
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = TuneTrialRuns(uri, "brcd-test", job, tags={"dataset": "digits"})
    assert runs.attach() == parent
    rid = runs.start("t1", {"mask_ratio": 0.25, "config_hash": "abc"})
    runs.log("t1", {"map": 0.5, "epoch": 3, "note": "text"}, step=3)
    again = pickle.loads(pickle.dumps(runs))  # as Tune restores it
    assert "t1" not in again and again.attach() == parent
    assert again.start("t1", {"mask_ratio": 0.25, "config_hash": "abc"}) == rid
    again.log("t1", {"map": 0.9, "epoch": 3}, step=3)  # the resumed trial reports its last epoch again
    again.log("t1", {"map": 0.6, "epoch": 4}, step=4)
    final = [{"trial_id": "t1", "metrics": {"best_map": 0.6}, "step": 4, "tags": {"status": "terminated"},
              "status": "FINISHED"},
             {"trial_id": "t2", "params": {"mask_ratio": 0.5}, "metrics": {"best_map": 0.4}, "step": 3,
              "tags": {"status": "error"}, "status": "FAILED"}]  # never started here: its run is made now
    again.finish(final)
    again.finish(final)
    client = MlflowClient(uri)
    found = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("brcd-test").experiment_id])}
    assert sorted(found) == ["t1", "t2", "tune-demo"]
    assert [(m.step, m.value) for m in client.get_metric_history(rid, "map")] == [(3, 0.5), (4, 0.6)]
    assert len(client.get_metric_history(rid, "best_map")) == 1
    t1, t2 = found["t1"], found["t2"]
    assert t1.data.params == {"mask_ratio": "0.25", "config_hash": "abc"} and t1.data.tags["dataset"] == "digits"
    assert (t1.info.status, t1.data.tags["status"], t2.info.status) == ("FINISHED", "terminated", "FAILED")
    assert t2.data.tags["mlflow.parentRunId"] == parent and t2.data.params == {"mask_ratio": "0.5"}

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    down = TuneTrialRuns(dead, "brcd-test", job)
    assert down.attach() is None and down.start("t1", {"mask_ratio": 0.25}) is None
    down.log("t1", {"map": 0.5}, step=1)
    down.finish(final)


def test_a_trial_waits_at_ashas_rungs_for_tunes_decision(tmp_path):
    """Ray Train's report does not wait for Tune: at a rung the workers wait for the continue marker, so
    a trial ASHA stops is killed there instead of training its next epoch while the stop travels."""
    import threading
    from types import SimpleNamespace

    from brcd.layout import tune_continue_file
    from pipelines.ray.workers import gated_report
    from pipelines.tune.callbacks import ContinueMarker

    reported, file = [], tune_continue_file(tmp_path / "trials" / "t1")
    report = gated_report(lambda m, c: reported.append(m["epoch"]), file=str(file), rungs=[3], metric="map", timeout_s=30)
    report({"epoch": 1, "map": 0.1}, None)
    report({"epoch": 2}, None)  # before the rung: no wait
    marker = ContinueMarker(str(tmp_path), "map")
    trial = SimpleNamespace(trial_id="t1")
    marker.on_trial_result(0, [], trial, {"epoch": 3, "map": 0.2, "done": True})  # ASHA stops it: no marker
    assert not file.exists()
    timer = threading.Timer(0.5, marker.on_trial_result, (0, [], trial, {"epoch": 3, "map": 0.2, "done": False}))
    timer.start()
    t0 = time.monotonic()
    report({"epoch": 3, "map": 0.2}, None)  # returns once Tune has continued epoch 3
    assert time.monotonic() - t0 >= 0.4 and reported == [1, 2, 3]
    report({"epoch": 4, "map": 0.3}, None)  # past the last rung: no wait
    assert reported == [1, 2, 3, 4]
    stuck = gated_report(lambda m, c: None, file=str(tmp_path / "none.json"), rungs=[1], metric="map", timeout_s=0.2)
    stuck({"epoch": 1, "map": 0.1}, None)  # no decision ever: trains on after the timeout
