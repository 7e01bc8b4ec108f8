"""MLflow tracking of the pipeline stages (SQLite, Ray Train local mode), the registry commands, a
dead backend, nested tuning runs and a real ``mlflow server`` on localhost."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_config

EXPERIMENT = "brcd-test"
TRACK = ["tracking.enabled=true", f"tracking.experiment={EXPERIMENT}"]
SERVER_WAIT_S = 240  # bounded: the server imports MLflow's whole web app (slow on a loaded 2-core box)


# --------------------------------------------------------------------------------------------
# helpers and fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_ambient_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` on a free localhost port, killed at the end of the module; the test that
    uses it waits for /health (bounded)."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    log_file = open(root / "server.log", "wb")
    cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{root / 'srv.db'}", "--artifacts-destination", str(root / "art"),
           "--workers", "1"]
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, cwd=root, env=env, start_new_session=True)
    try:
        yield {"proc": proc, "port": port, "url": f"http://127.0.0.1:{port}", "log": root / "server.log",
               "started": time.monotonic()}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the group of the process started above (uvicorn child)
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
        log_file.close()


@pytest.fixture(scope="module")
def tracked(_trained_base, tmp_path_factory, request):
    """clusters (re-run) -> distill -> evaluate -> register with the MLflow tracker, once per module;
    then starts the tracking server, whose start-up overlaps the tests below (not Ray's start-up)."""
    from pipelines.stages import Run, clusters_stage, distill_stage, evaluate_stage
    from pipelines.commands.registry import register_run_student
    from pipelines.stage_tracking import tracker_for

    out = tmp_path_factory.mktemp("tracked") / "run"
    shutil.copytree(_trained_base, out, ignore=shutil.ignore_patterns("ray", "ray_tmp"))
    (out / "clusters" / "stage.json").unlink()  # rebuild the (cheap) clusters with the tracker attached
    cfg = tiny_config(*TRACK)
    tracker = tracker_for(cfg, out)
    run = Run(cfg, out, tracker=tracker)
    clusters_stage(run)
    distill_stage(run)
    results = evaluate_stage(run)
    results = register_run_student(run, results)
    request.getfixturevalue("mlflow_server")
    return {"out": out, "cfg": cfg, "run": run, "tracker": tracker, "results": results}


def _client(uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _runs(client, experiment=EXPERIMENT) -> dict:
    exp = client.get_experiment_by_name(experiment)
    return {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}


def _artifacts(client, run_id, path=None) -> set[str]:
    out = set()
    for f in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, f.path) if f.is_dir else {f.path}
    return out


def _student_codes(cfg, out: Path, paths: list[Path]) -> np.ndarray:
    """The in-memory student's codes (best asymmetric checkpoint, eval transform)."""
    from brcd import builders
    from brcd.data.transforms import eval_transform

    model = builders.build_model(cfg.student.model, out / "student" / "best_map_asymmetric.safetensors").eval()
    tf = eval_transform(cfg.data.image_size, False)
    with torch.no_grad():
        return model.encode(torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])).numpy()


def _write_pngs(run, folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    idx = run.bundle.split.indices("database")[:n]
    paths = []
    for k, i in enumerate(idx):
        p = folder / f"img{k:03d}.png"
        run.bundle.source.load(int(i)).save(p)
        paths.append(p)
    return paths


# --------------------------------------------------------------------------------------------
# stage runs
# --------------------------------------------------------------------------------------------


def test_stage_runs_have_params_metrics_tags_and_artifacts(tracked):
    cfg, run, tracker = tracked["cfg"], tracked["run"], tracked["tracker"]
    assert tracker.uri == f"sqlite:///{tracked['out'] / 'mlflow.db'}"
    client = _client(tracker.uri)
    runs = _runs(client)
    assert {"clusters", "distill", "evaluate"} <= set(runs)
    for name in ("clusters", "distill", "evaluate"):
        r = runs[name]
        assert r.info.status == "FINISHED"
        assert r.data.tags["stage"] == name and r.data.tags["dataset"] == "digits"
        assert r.data.tags["teacher_fingerprint"] == run.teacher_fingerprint()
        assert r.data.params["distill.alpha"] == str(cfg.distill.alpha)
        assert r.data.params["student.model.backbone"] == cfg.student.model.backbone
        assert len(r.data.params) == len(cfg.flat())
    distill_id = runs["distill"].info.run_id
    for metric in ("loss/total", "map_symmetric", "map_asymmetric", "images_per_second"):
        steps = [m.step for m in client.get_metric_history(distill_id, metric)]
        assert steps == [1, 2], (metric, steps)  # one value per epoch, step = epoch, no duplicates
    assert set(_artifacts(client, runs["clusters"].info.run_id)) >= {
        "config.yaml", "clusters/manifest.json", "clusters/bit_masks.png", "clusters/k_selection.png"}
    assert set(_artifacts(client, distill_id)) >= {"config.yaml", "student/stage.json", "clusters/bit_masks.png"}
    assert set(_artifacts(client, runs["evaluate"].info.run_id)) >= {
        "config.yaml", "precision_recall.png", "retrieval_grid.png", "results.md", "results.json"}
    ev = runs["evaluate"].data.metrics
    assert ev["student_map_asymmetric"] == pytest.approx(tracked["results"]["student_map_asymmetric"])
    with Image.open(tracked["out"] / "retrieval_grid.png") as im:
        assert im.size[0] > 400 and im.size[1] > 300


def test_registered_champion_pulls_to_the_same_codes(tracked, tmp_path, capsys):
    from brcd.models.encoder import HashEncoder, pickle_files
    from pipelines.cli import main

    results, tracker, out = tracked["results"], tracked["tracker"], tracked["out"]
    assert results["model_version"] == "1" and results["model_uri"].startswith("models:/")
    client = _client(tracker.uri)
    mv = client.get_model_version_by_alias("brcd-student", "champion")
    assert str(mv.version) == "1"
    assert mv.tags["teacher"] == tracked["cfg"].teacher.model.backbone and mv.tags["dataset"] == "digits"
    assert mv.tags["bits"] == "32"
    assert float(mv.tags["map_asymmetric"]) == pytest.approx(results["student_map_asymmetric"], abs=1e-6)
    assert float(mv.tags["map_symmetric"]) == pytest.approx(results["student_map_symmetric"], abs=1e-6)

    pulled = tmp_path / "pulled"
    assert main(["pull", "models:/brcd-student@champion", "--output", str(pulled), "--run-dir", str(out)]) == 0
    printed = capsys.readouterr()
    assert "pulled models:/brcd-student@champion" in printed.out
    assert "Downloading artifacts" not in printed.err  # MLflow's progress bars only with -v
    assert not pickle_files(pulled)
    images = _write_pngs(tracked["run"], tmp_path / "imgs", 6)
    np.testing.assert_array_equal(HashEncoder.from_dir(pulled).encode([str(p) for p in images]),
                                  _student_codes(tracked["cfg"], out, images))

    # registering the same weights again moves the alias, no new version
    assert main(["register", "--output", str(out)]) == 0
    assert "already holds these weights" in capsys.readouterr().out
    assert len(client.search_model_versions("name = 'brcd-student'")) == 1

    assert main(["pull", "models:/brcd-student@nope", "--output", str(tmp_path / "x"), "--run-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'nope'" in err and "champion" in err


def test_encode_and_search_commands_symmetric_and_asymmetric(tracked, tmp_path, capsys):
    from brcd.codes import pack_codes
    from brcd.models.encoder import read_codes_parquet
    from pipelines.cli import main

    out, cfg = tracked["out"], tracked["cfg"]
    images = _write_pngs(tracked["run"], tmp_path / "db", 12)
    db = tmp_path / "student.parquet"
    assert main(["encode", "--model", "models:/brcd-student@champion", "--run-dir", str(out),
                 "--images", str(tmp_path / "db"), "--output", str(db)]) == 0
    ids, paths, packed, bits = read_codes_parquet(db)
    assert bits == 32 and paths == [str(p) for p in images]
    np.testing.assert_array_equal(packed, pack_codes(_student_codes(cfg, out, images)))
    capsys.readouterr()

    assert main(["search", "--model", "models:/brcd-student@champion", "--run-dir", str(out), "--index", str(db),
                 "--query", str(images[3]), "-k", "4"]) == 0
    lines = [ln.split() for ln in capsys.readouterr().out.splitlines()[2:]]
    assert len(lines) == 4 and [ln[0] for ln in lines] == ["1", "2", "3", "4"]
    assert lines[0][1] == "0"  # the query itself is in the database
    assert [int(ln[1]) for ln in lines] == sorted(int(ln[1]) for ln in lines)

    # asymmetric: database encoded by the exported teacher, queries by the student
    teacher = tmp_path / "teacher"
    assert main(["export", "--output", str(out), "--model", "teacher", "--to", str(teacher)]) == 0
    tdb = tmp_path / "teacher.parquet"
    assert main(["encode", "--model", str(teacher), "--images", str(tmp_path / "db"), "--output", str(tdb)]) == 0
    capsys.readouterr()
    assert main(["search", "--model", "models:/brcd-student@champion", "--run-dir", str(out), "--index", str(tdb),
                 "--query", str(images[0]), str(images[1]), "-k", "3"]) == 0
    text = capsys.readouterr().out
    assert text.count("query ") == 2 and len([ln for ln in text.splitlines() if ln.split()[0].isdigit()]) == 6

    assert main(["encode", "--model", "models:/brcd-student@champion", "--images", str(tmp_path / "db"),
                 "--output", str(tmp_path / "z.parquet")]) == 2  # no registry given: one-line error
    assert "--tracking-uri" in capsys.readouterr().err


def test_register_picks_the_best_trial_of_a_tuning_job(tracked, tmp_path, capsys):
    from pipelines.cli import main

    out = tracked["out"]
    job = tmp_path / "job"  # the layout of pipelines.tune: DIR/trials/<trial_id>/{best_*.safetensors,config.yaml}
    for trial in ("t_a", "t_b"):
        shutil.copytree(out / "student", job / "trials" / trial, ignore=shutil.ignore_patterns("mlflow_runs"))
        shutil.copy(out / "config.yaml", job / "trials" / trial / "config.yaml")
    shutil.copy(out / "config.yaml", job / "config.yaml")
    (job / "tune_results.csv").write_text(
        "trial_id,distill.alpha,status,best_map_asymmetric,final_map_asymmetric,best_map_symmetric\n"
        "t_b,0.8,TERMINATED,0.5,0.45,0.4\nt_a,0.5,TERMINATED,0.25,0.2,0.2\nt_c,0.1,ERROR,,,\n")
    assert main(["register", "--output", str(job)]) == 0
    text = capsys.readouterr().out
    assert "best trial t_b" in text and "registered brcd-student version 1" in text
    mv = _client(f"sqlite:///{job / 'mlflow.db'}").get_model_version_by_alias("brcd-student", "champion")
    assert mv.tags["map_asymmetric"] == "0.500000" and mv.tags["map_symmetric"] == "0.400000"
    assert (job / "export" / "student" / "model.json").is_file()


# --------------------------------------------------------------------------------------------
# the live callback, resume, nesting, a dead backend
# --------------------------------------------------------------------------------------------


def test_live_callback_is_picklable_logs_rank0_and_runs_reattach(trained_run):
    from pipelines.stages import Run
    from pipelines.stage_tracking import tracker_for

    cfg = tiny_config(*TRACK)
    run = Run(cfg, trained_run, tracker=tracker_for(cfg, trained_run))
    run.tracker.stage_started("distill", run)
    rid = run.tracker.run_ids["distill"]
    (cb,) = run.tracker.callbacks("distill", run)
    cb = pickle.loads(pickle.dumps(cb))  # what Ray does to ship it to the controller
    for epoch in (1, 2):
        cb.after_report(None, [{"epoch": epoch, "loss/total": 1.0 / epoch, "map_symmetric": 0.1 * epoch, "note": "x"},
                               {"epoch": epoch, "loss/total": 99.0}], None)
    client = _client(run.tracker.uri)
    assert [(m.step, m.value) for m in client.get_metric_history(rid, "loss/total")] == [(1, 1.0), (2, 0.5)]

    # an interrupted stage run again (a new process: a new tracker) re-attaches to the same run
    again = Run(cfg, trained_run, tracker=tracker_for(cfg, trained_run), write_config=False)
    again.tracker.stage_started("distill", again)
    assert again.tracker.run_ids["distill"] == rid
    history = [{"epoch": 1, "loss/total": 1.0}, {"epoch": 2, "loss/total": 0.5}, {"epoch": 3, "loss/total": 0.25}]
    again.tracker.stage_finished("distill", again, {"history": history, "best": {"map_symmetric": 0.3},
                                                    "epochs": 3, "seconds": 1.0}, [])
    assert [m.step for m in client.get_metric_history(rid, "loss/total")] == [1, 2, 3]  # back-filled, no duplicates
    assert client.get_run(rid).info.status == "FINISHED"

    # a finished stage run again gets a new run; so does a changed config
    third = tracker_for(cfg, trained_run)
    third.stage_started("distill", run)
    assert third.run_ids["distill"] != rid
    changed = tiny_config(*TRACK, "distill.alpha=0.3")
    fourth = tracker_for(changed, trained_run)
    fourth.stage_started("distill", Run(changed, trained_run, write_config=False))
    assert fourth.run_ids["distill"] not in (rid, third.run_ids["distill"])


def test_trial_runs_are_nested_under_the_tuning_parent(trained_run):
    from pipelines.stages import Run
    from pipelines.stage_tracking import tracker_for

    cfg = tiny_config(*TRACK)
    tracker = tracker_for(cfg, trained_run)
    parent = tracker.start_parent("tune-demo", output=trained_run)
    assert parent is not None
    run = Run(cfg, trained_run, write_config=False)
    ids = {}
    for trial in ("t1", "t2"):
        trial_tracker = pickle.loads(pickle.dumps(tracker.for_trial(trial)))  # shipped to the trial process
        trial_tracker.stage_started(f"trial-{trial}", run)
        trial_tracker.stage_started("evaluate", run)
        ids[trial] = dict(trial_tracker.run_ids)
    tracker.finish_parent(metrics={"best_map_asymmetric": 0.5})
    client = _client(tracker.uri)
    runs = _runs(client)
    assert runs["tune-demo"].info.status == "FINISHED" and runs["tune-demo"].data.tags["brcd.kind"] == "tune"
    for trial in ("t1", "t2"):
        for name in (f"trial-{trial}", f"{trial}-evaluate"):
            tags = runs[name].data.tags
            assert tags["mlflow.parentRunId"] == parent and tags["trial_id"] == trial
    children = client.search_runs([runs["tune-demo"].info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert len(children) == 4
    assert ids["t1"]["evaluate"] != ids["t2"]["evaluate"]


def test_unreachable_backend_does_not_stop_the_stages(trained_run, caplog):
    from pipelines.stages import Run, distill_stage, evaluate_stage
    from pipelines.commands.registry import register_run_student
    from pipelines.stage_tracking import tracker_for

    cfg = tiny_config(*TRACK, "tracking.tracking_uri=http://127.0.0.1:9")
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING):
        tracker = tracker_for(cfg, trained_run)
        assert not tracker.enabled and time.monotonic() - t0 < 10  # one quick probe, not MLflow's retries
        run = Run(cfg, trained_run, tracker=tracker)
        distill_stage(run)
        results = register_run_student(run, evaluate_stage(run))
    assert "model_uri" not in results and results["student_map_asymmetric"] >= 0
    assert (trained_run / "results.json").exists()
    said = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(said) == 1 and "training continues" in said[0].getMessage()


# --------------------------------------------------------------------------------------------
# a real tracking server
# --------------------------------------------------------------------------------------------


def _wait_for(server) -> None:
    deadline = server["started"] + SERVER_WAIT_S
    while time.monotonic() < deadline:
        if server["proc"].poll() is not None:
            pytest.fail(f"mlflow server exited with {server['proc'].returncode}: "
                        f"{server['log'].read_text(errors='replace')[-2000:]}")
        try:
            with urllib.request.urlopen(server["url"] + "/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"mlflow server not up after {SERVER_WAIT_S} s: {server['log'].read_text(errors='replace')[-2000:]}")


def test_tracking_server_serves_the_experiment(mlflow_server, tmp_path):
    from brcd.mlflow.tracking import Tracker

    _wait_for(mlflow_server)
    url = mlflow_server["url"]
    tracker = Tracker(url, "brcd-server-test")
    rid = tracker.start_run("distill", tags={"stage": "distill"})
    assert rid is not None, tracker.disabled_reason
    tracker.log_params(rid, {"distill": {"alpha": 0.8}})
    for epoch in (1, 2):
        tracker.log_metrics(rid, {"loss/total": 1.0 / epoch}, step=epoch)
    (tmp_path / "results.md").write_text("| metric | value |\n")
    tracker.log_artifact(rid, tmp_path / "results.md")
    tracker.end_run(rid)

    query = f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=brcd-server-test"
    with urllib.request.urlopen(query, timeout=30) as resp:
        exp = json.load(resp)["experiment"]
    assert exp["name"] == "brcd-server-test" and exp["lifecycle_stage"] == "active"
    with urllib.request.urlopen(f"{url}/api/2.0/mlflow/runs/get?run_id={rid}", timeout=30) as resp:
        got = json.load(resp)["run"]
    assert got["info"]["status"] == "FINISHED" and got["info"]["experiment_id"] == exp["experiment_id"]
    assert {"key": "distill.alpha", "value": "0.8"} in got["data"]["params"]
    client = _client(url)
    assert [m.step for m in client.get_metric_history(rid, "loss/total")] == [1, 2]
    assert [f.path for f in client.list_artifacts(rid)] == ["results.md"]


def test_nested_student_is_registered_with_every_length(tmp_path):
    """A nested (NHL) student: one registered model; its tags and exported info carry each length's
    mAP (MLflow tag keys cannot hold "@": ``map_symmetric_8``), and the pulled model encodes every length."""
    from mlflow import MlflowClient

    from brcd import io
    from brcd.models.nets import create_hashing_model
    from brcd.models.encoder import HashEncoder
    from brcd.mlflow.registry import register_student_dir
    from pipelines.stage_tracking import tracker_for

    cfg = tiny_config(*TRACK, "teacher.model.bits=[8,16]", "student.model.bits=[8,16]")
    out, sdir = tmp_path / "run", tmp_path / "run" / "student"
    sdir.mkdir(parents=True)
    io.save_state_dict(sdir / f"best_{cfg.tracking.select_metric}.safetensors",
                       create_hashing_model(cfg.student.model).state_dict())
    results = {"student_map_symmetric": 0.35, "student_map_asymmetric": 0.4,
               "student_map_symmetric@8": 0.3, "student_map_symmetric@16": 0.4,
               "student_map_asymmetric@8": 0.32, "student_map_asymmetric@16": 0.48}
    reg = register_student_dir(cfg, sdir, tracker_for(cfg, out), output=out, results=results,
                               teacher_fingerprint="t" * 16, find_run=False)
    assert reg["model_version"] == "1"
    uri = f"sqlite:///{out.resolve() / 'mlflow.db'}"
    version = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version(cfg.tracking.model_name, "1")
    tags = version.tags
    assert tags["bits"] == "[8, 16]" and tags["map_symmetric"] == "0.350000"
    assert (tags["map_symmetric_8"], tags["map_symmetric_16"]) == ("0.300000", "0.400000")
    assert (tags["map_asymmetric_8"], tags["map_asymmetric_16"]) == ("0.320000", "0.480000")
    enc = HashEncoder.from_dir(reg["export_dir"])
    assert enc.spec["info"]["map_by_length"] == {"map_symmetric@8": 0.3, "map_symmetric@16": 0.4,
                                         "map_asymmetric@8": 0.32, "map_asymmetric@16": 0.48}
    assert enc.bits == [8, 16]
