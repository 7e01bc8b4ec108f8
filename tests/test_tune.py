"""`brcd tune`: the search space, and a real Ray Tune run over distillations of the tiny teacher:
k-means once per K, ASHA stopping a trial, the results table and best config, an interrupted run
resumed without rerunning finished trials, and no placement group left reserved (Ray #54305)."""

from __future__ import annotations

import csv
import os
import signal
from pathlib import Path

import pytest

from conftest import tiny_config
from pipelines import tune as T


def _space(**search):
    return {"params": {"num_clusters": {"grid": [3, 4]}, "mask_ratio": {"grid": [0.25, 0.5]}},
            "search": {"algorithm": "grid", "num_samples": 1, "max_concurrent_trials": 1,
                       "asha": {"grace_period": 1, "reduction_factor": 2}, **search}}


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
    import pipelines.ray_utils as R

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
# A real tuning run
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


@pytest.mark.ray
def test_tune_shares_work_stops_early_reports_and_resumes(trained_run, monkeypatch):
    from brcd import clustering
    from brcd.config import load_config

    builds = []
    real_build = clustering.build_cluster_artifact
    monkeypatch.setattr(clustering, "build_cluster_artifact",
                        lambda codes, **kw: builds.append(kw["num_clusters"]) or real_build(codes, **kw))
    cfg = tiny_config("distill.optim.epochs=3", "distill.optim.patience=10", "resources.num_workers=1")
    space = T.parse_space(_space())
    pgs_before = _created_placement_groups()
    out = trained_run

    # 1. interrupted after the first finished trial
    first = T.tune_main(cfg, out, space, callbacks=[interrupt_once(out / "interrupted")])
    assert first.interrupted and not first.restored
    done_first = {r["trial_id"]: r for r in first.rows if r["status"] != "unfinished"}
    assert len(done_first) >= 1
    assert builds == [3, 4]  # k-means once per K, before any trial
    trials_dir = out / "trials"
    stamps = {t: (trials_dir / t / "stage.json").stat().st_mtime_ns for t in done_first
              if (trials_dir / t / "stage.json").exists()}

    # 2. the same command resumes: finished trials are kept, the others run
    second = T.tune_main(cfg, out, space)
    assert second.restored and not second.interrupted
    rows = second.rows
    assert len(rows) == 4 and len({r["trial_id"] for r in rows}) == 4
    for t, r in done_first.items():
        assert next(x for x in rows if x["trial_id"] == t) == r  # not rerun: same row
    assert {t: (trials_dir / t / "stage.json").stat().st_mtime_ns for t in stamps} == stamps
    assert builds == [3, 4]  # the resumed run reused both cluster caches
    assert {k: sorted(e["trials"]) for k, e in second.cluster_cache.items()} == {
        k: sorted(r["trial_id"] for r in rows if r["num_clusters"] == k) for k in (3, 4)}
    assert all(len(e["trials"]) == 2 for e in second.cluster_cache.values())
    assert {(r["num_clusters"], r["mask_ratio"]) for r in rows} == {(3, 0.25), (3, 0.5), (4, 0.25), (4, 0.5)}

    statuses = [r["status"] for r in rows]
    assert set(statuses) <= {"terminated", "stopped early by ASHA"}, statuses
    stopped = [r for r in rows if r["status"] == "stopped early by ASHA"]
    assert stopped and all(r["epochs_run"] < 3 for r in stopped)
    assert all(r["epochs_run"] == 3 for r in rows if r["status"] == "terminated")
    best_values = [r["best_map_asymmetric"] for r in rows]
    assert best_values == sorted(best_values, reverse=True) and all(0 < v <= 1 for v in best_values)

    with open(out / "tune_results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["trial_id"] for r in table] == [r["trial_id"] for r in rows]
    assert {"trial_id", "num_clusters", "mask_ratio", "status", "epochs_run", "best_map_asymmetric",
            "final_map_asymmetric", "best_map_symmetric", "final_map_symmetric", "error"} <= set(table[0])
    assert [r["status"] for r in table] == statuses

    best = load_config(out / "best_config.yaml")
    top = rows[0]
    assert second.best["trial_id"] == top["trial_id"]
    assert (best.clusters.num_clusters, best.clusters.mask_ratio, best.clusters.margin) == (
        top["num_clusters"], top["mask_ratio"], None)
    assert best.distill.optim.epochs == 3 and best.resources.num_workers == 1

    # no placement group left reserved by the trials ASHA stopped (Ray issue #54305)
    assert second.leaked_placement_groups == [] and first.leaked_placement_groups == []
    assert _created_placement_groups() <= pgs_before

    # 3. once more: nothing runs again, same results
    ray_runs = sorted(p.name for p in (out / "ray").iterdir())
    third = T.tune_main(cfg, out, space)
    assert third.restored and third.rows == rows and builds == [3, 4]
    assert sorted(p.name for p in (out / "ray").iterdir()) == ray_runs



def _documented_tune_command() -> list[str]:
    """The demo tuning command exactly as docs/TUNE.md (and the README's `brcd tune` row) show it."""
    import shlex

    doc = (Path(__file__).resolve().parent.parent / "docs" / "TUNE.md").read_text()
    line = next(ln for ln in doc.splitlines() if ln.startswith("brcd tune -c demo --space demo --output "))
    return shlex.split(line)[1:]


@pytest.mark.ray
@pytest.mark.timeout(600)  # the bug this guards against waited for ever
def test_documented_tune_command_runs_a_trial_with_the_demos_two_workers_on_two_cpus(trained_run, capsys):
    """2 Train workers x 1 CPU (the demo preset's own) on a 2-CPU Ray: the trial's process must not
    hold a CPU of its own, or Ray Train waits for its second CPU for ever (0 trials in 13 min)."""
    import ray

    from brcd.config import load_config
    from conftest import TINY
    from pipelines.cli import main

    assert ray.cluster_resources()["CPU"] == 2  # the shared session: a 2-core machine, whatever this one has
    argv = _documented_tune_command()
    assert argv[:5] == ["tune", "-c", "demo", "--space", "demo"] and argv[5] == "--output"
    argv[6] = str(trained_run)  # holds the tiny teacher, trained with the same data/teacher settings: reused
    sets = [o for o in TINY if not o.startswith("resources.num_workers")] + ["distill.optim.epochs=3",
                                                                             "distill.optim.validate_every=3"]
    assert load_config("demo", sets).resources.num_workers == 2
    rc = main([*argv, *(x for o in sets for x in ("--set", o)), "--num-samples", "1"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err[-2000:]
    assert "Traceback" not in printed.out + printed.err
    with open(trained_run / "tune_results.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["status"] == "terminated" and row["epochs_run"] == "3" and float(row["best_map_asymmetric"]) > 0
    trial = load_config(trained_run / "trials" / row["trial_id"] / "config.yaml")
    assert (trial.resources.num_workers, trial.resources.cpus_per_worker) == (2, 1.0)
