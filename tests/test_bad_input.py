"""Bad input through the ``brcd`` CLI: one line naming the problem and the fix, exit code 2,
nothing half-written -- and, for config/data mistakes, before any Ray cluster is started.

Almost nothing here starts Ray: ``init_ray`` is replaced by a recorder (the stage errors fire
before the first Ray call; training stages run in Ray Train local mode, in this process).
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from brcd import io
from conftest import TINY, tiny_config

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture
def ray_calls(monkeypatch):
    """Replace ``init_ray`` by a recorder: the CLI runs without a Ray cluster, and the test can
    tell whether the error came before or after the CLI would have started one."""
    import pipelines.ray.cluster as ray_utils

    calls: list[tuple] = []
    monkeypatch.setattr(ray_utils, "init_ray", lambda *a, **k: calls.append(a))
    # Ray's log handler keeps the sys.stderr of the pytest phase that imported Ray; once pytest
    # closes that capture, its INFO lines ("Running in local mode") print '--- Logging error ---'.
    # That is a test-harness artefact, not output of the CLI: silence logging's own errors.
    monkeypatch.setattr(logging, "raiseExceptions", False)
    return calls


def run_cli(capsys, *argv: str, overrides: list[str] = ()) -> tuple[int, str]:
    """``brcd <argv> --set <tiny overrides>``; returns (exit code, the single error line)."""
    from pipelines.cli import main

    sets = [x for o in [*TINY, *overrides] for x in ("--set", o)]
    rc = main([*argv, *sets])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("brcd:")]
    assert len(lines) == 1, f"expected one 'brcd: error:' line, got:\n{err}"
    return rc, lines[0]


def write_png(path: Path, seed: int = 0, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def image_folder(root: Path, classes: dict[str, int]) -> Path:
    for c, n in classes.items():
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            write_png(root / c / f"{i}.png", seed=hash((c, i)) % 1000)
    return root


def folder_overrides(root: Path) -> list[str]:
    return ["data.source=folder", f"data.root={root}", "data.query=2", "data.validation=2", "data.train=4",
            "teacher.optim.batch_size=4", "teacher.optim.epochs=1", "teacher.optim.max_steps_per_epoch=1"]


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def test_truncated_png_with_on_corrupt_error(tmp_path, capsys, ray_calls):
    root = image_folder(tmp_path / "imgs", {"a": 6, "b": 6})
    bad = root / "a" / "0.png"
    bad.write_bytes(bad.read_bytes()[:40])  # header only: PIL opens it, decoding fails
    out = tmp_path / "out"
    rc, line = run_cli(capsys, "teacher", "-c", "demo", "--output", str(out),
                       overrides=folder_overrides(root) + ["data.on_corrupt=error"])
    assert rc == 2
    assert "CorruptImageError" in line and str(bad) in line  # the problem: which file
    assert "replace or remove the file" in line and "on_corrupt='skip'" in line  # the fix
    assert not (out / "teacher" / "stage.json").exists() and not (out / "teacher" / "teacher.safetensors").exists()


@pytest.mark.parametrize("case", ["empty_class", "no_images", "no_class_folders"])
def test_image_folder_without_images(tmp_path, capsys, ray_calls, case):
    root = tmp_path / "imgs"
    if case == "empty_class":
        image_folder(root, {"a": 4, "b": 0})
        needle, fix = "class folder(s) ['b'] have no images", "add images or remove the folder"
    elif case == "no_images":
        image_folder(root, {"a": 0, "b": 0})
        (root / "a" / "notes.txt").write_text("not an image")
        needle, fix = "has no images", "add images under its class sub-folders"
    else:
        root.mkdir()
        write_png(root / "loose.png")
        needle, fix = "has no class sub-folders", f"put images in {root}/<class>/"
    out = tmp_path / "out"
    rc, line = run_cli(capsys, "teacher", "-c", "demo", "--output", str(out), overrides=folder_overrides(root))
    assert rc == 2 and needle in line and fix in line, line
    assert ray_calls == []  # found while opening the data, before Ray is started
    assert not (out / "data").exists()  # no split written


def _list_dataset(root: Path, train: str, test: str, database: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in (("train.txt", train), ("test.txt", test), ("database.txt", database)):
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize("case", ["label_width", "empty_list", "not_binary"])
def test_list_files(tmp_path, capsys, ray_calls, case):
    good = "".join(f"img/{i}.jpg 0 1 0\n" for i in range(4))
    if case == "label_width":
        root = _list_dataset(tmp_path / "ds", good + "img/9.jpg 0 1\n", good, good)
        needle, fix = "train.txt:5: 2 label values but line 1 has 3", "same number of 0/1 labels"
    elif case == "empty_list":
        root = _list_dataset(tmp_path / "ds", good, "\n\n", good)
        needle, fix = "test.txt names no images", "expected lines 'relative/path.jpg 0 1 0 ...'"
    else:
        root = _list_dataset(tmp_path / "ds", good, good, "img/0.jpg 0 2 0\n")
        needle, fix = "database.txt:1: labels must be 0 or 1", "got 0 2 0"
    rc, line = run_cli(capsys, "teacher", "-c", "demo", "--output", str(tmp_path / "out"),
                       overrides=["data.source=list", f"data.root={root}"])
    assert rc == 2 and needle in line and fix in line, line
    assert ray_calls == []


def test_changed_split_settings_on_an_existing_output(tmp_path, capsys, ray_calls):
    from pipelines.stages import Run

    Run(tiny_config(), tmp_path)  # the split of the first run
    split = (tmp_path / "data" / "split.npz").read_bytes()
    rc, line = run_cli(capsys, "teacher", "-c", "demo", "--output", str(tmp_path), overrides=["data.train=200"])
    assert rc == 2 and "split at" in line and "delete the split" in line, line
    assert (tmp_path / "data" / "split.npz").read_bytes() == split  # not overwritten
    assert ray_calls == []


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, needles", [
    (["teacher.optim.epoch=3"], ["unknown key 'teacher.optim.epoch'", "did you mean 'teacher.optim.epochs'"]),
    (["teacher.optim.epochs=ten"], ["teacher.optim.epochs: expected an integer, got str 'ten'"]),
    (["resources.use_gpu=maybe"], ["resources.use_gpu: expected true/false"]),
    (["student.model.bits=16"], ["teacher.model.bits 32 and student.model.bits 16 differ",
                                 "the student must emit codes of the teacher's length"]),
    (["teacher.checkpoint=/nonexistent/teacher.safetensors"], ["teacher.checkpoint: file", "does not exist",
                                                               "fix the path or set it to null"]),
])
def test_config_errors_before_anything_runs(tmp_path, capsys, ray_calls, overrides, needles):
    out = tmp_path / "out"
    rc, line = run_cli(capsys, "teacher", "-c", "demo", "--output", str(out), overrides=overrides)
    assert rc == 2 and line.startswith("brcd: error: ")
    for needle in needles:
        assert needle in line, line
    assert ray_calls == [] and not out.exists()  # validated before Ray starts and before anything is written


@pytest.mark.parametrize("text, needles", [
    ("teacher:\n  optim: {epochs: 3\n", ["YAML", "line", "column", "fix the syntax"]),
    ("teacher:\n  optim:\n    epochz: 3\n", ["bad.yaml: unknown key 'teacher.optim.epochz'", "did you mean 'teacher.optim.epochs'"]),
    ("- just\n- a list\n", ["must be a mapping at the top level", "start from a preset"]),
])
def test_config_file_errors(tmp_path, capsys, ray_calls, text, needles):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    rc, line = run_cli(capsys, "teacher", "-c", str(cfg), "--output", str(tmp_path / "out"))
    assert rc == 2
    for needle in needles:
        assert needle in line, line
    assert ray_calls == []


@pytest.mark.parametrize("argv", [
    ["teacher", "-c", "{bad}", "--output", "{out}"],
    ["tune", "-c", "{bad}", "--space", "demo", "--output", "{out}"],
    ["compare", "-c", "{bad}", "--output", "{out}"],
])
def test_config_error_comes_before_the_heavy_imports(tmp_path, argv):
    """Importing torch and Ray takes 13+ s on 2 cores; a config error must not wait for them."""
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher:\n  model:\n    bitz: 32\n")
    argv = [a.format(bad=bad, out=tmp_path / "out") for a in argv]
    code = ("import sys\nfrom pipelines.cli import main\nrc = main(sys.argv[1:])\n"
            "print(sorted(m for m in ('torch', 'ray', 'timm', 'mlflow', 'torchvision') if m in sys.modules))\n"
            "sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "unknown key 'teacher.model.bitz'" in proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout  # none of them was imported


# --------------------------------------------------------------------------------------------
# artifacts from elsewhere
# --------------------------------------------------------------------------------------------


def _save_model(model_cfg, path: Path, seed: int) -> Path:
    from brcd import builders
    from brcd.engine import full_weights

    torch.manual_seed(seed)
    io.save_state_dict(path, full_weights(builders.build_model(model_cfg)))
    return path


def test_teacher_checkpoint_of_another_architecture(tmp_path, capsys, ray_calls):
    cfg = tiny_config()
    student_weights = _save_model(cfg.student.model, tmp_path / "student.safetensors", seed=0)
    out = tmp_path / "out"
    rc, line = run_cli(capsys, "teacher", "-c", "demo", "--output", str(out),
                       overrides=[f"teacher.checkpoint={student_weights}"])
    assert rc == 2
    assert f"{student_weights} does not fit this model" in line
    assert "saved from another architecture or bit length" in line
    assert not (out / "teacher" / "teacher.safetensors").exists()  # the bad file is not adopted
    assert not (out / "teacher" / "stage.json").exists()


@pytest.fixture
def run_with_clusters(tmp_path, monkeypatch):
    """An output folder with a (random, untrained) teacher and a real cluster artifact built by
    ``clusters_stage`` from fake teacher codes -- no Ray, no training."""
    import pipelines.stages as stages

    run = stages.Run(tiny_config(), tmp_path / "out")
    _save_model(run.cfg.teacher.model, run.teacher_weights, seed=1)
    n, bits = len(run.bundle.split.train), run.cfg.teacher.model.bits

    def fake_codes(r):
        rng = np.random.default_rng(int(r.teacher_fingerprint()[:8], 16))
        return {"train": np.where(rng.random((n, bits)) < 0.5, -1, 1).astype(np.int8)}

    monkeypatch.setattr(stages, "teacher_codes", fake_codes)
    stages.clusters_stage(run)
    return run


def test_stale_clusters_are_never_used(run_with_clusters, capsys, ray_calls):
    import pipelines.stages as stages
    from brcd.clustering import load_cluster_artifact

    run = run_with_clusters
    old_fp = run.teacher_fingerprint()
    manifest = (run.clusters_dir / "manifest.json").read_bytes()
    capsys.readouterr()

    # the teacher is replaced after the clusters were built (retrained elsewhere, copied in)
    _save_model(run.cfg.teacher.model, run.teacher_weights, seed=2)
    new_fp = run.teacher_fingerprint()
    assert new_fp != old_fp

    # distill refuses the stale artifact, names both teachers and the fix; writes nothing
    rc, line = run_cli(capsys, "distill", "-c", "demo", "--output", str(run.output))
    assert rc == 2
    assert f"built from teacher {old_fp} but this run's teacher is {new_fp}" in line
    assert "re-run `brcd clusters`" in line
    assert (run.clusters_dir / "manifest.json").read_bytes() == manifest
    assert not run.student_dir.exists()

    # ... and `brcd clusters` does not skip ("already built"): it rebuilds for the new teacher
    stages.clusters_stage(run)
    assert "already built" not in capsys.readouterr().out
    assert stages.load_clusters(run).teacher_fingerprint == new_fp

    # another split is refused as well
    with pytest.raises(io.ArtifactError, match=r"built from split .* but this run's split is other-split; re-run"):
        load_cluster_artifact(run.clusters_dir, teacher_fingerprint=new_fp, split_fingerprint="other-split")


# --------------------------------------------------------------------------------------------
# training and the disk
# --------------------------------------------------------------------------------------------


def test_nan_loss_stops_the_stage_with_step_and_cause(tmp_path, capsys, ray_calls, monkeypatch):
    """Stage level (Ray Train local mode): the NaN surfaces as one CLI line, nothing is published."""
    import brcd.engine
    import brcd.losses

    real = brcd.losses.teacher_objective
    calls = {"n": 0}

    def objective(*args, **kwargs):
        loss, terms = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] >= 2 else loss), terms

    monkeypatch.setattr(brcd.losses, "teacher_objective", objective)
    monkeypatch.setattr(brcd.engine, "teacher_objective", objective)  # the name TeacherTask calls
    out = tmp_path / "out"
    rc, line = run_cli(capsys, "teacher", "-c", "demo", "--output", str(out),
                       overrides=["teacher.optim.epochs=1", "teacher.optim.max_steps_per_epoch=2"])
    assert rc == 2
    assert "NonFiniteLossError" in line and "loss is nan at step 2" in line
    assert "likely cause: learning rate too high" in line and "lower optim.lr" in line
    assert not (out / "teacher" / "stage.json").exists() and not (out / "teacher" / "teacher.safetensors").exists()


def test_disk_full_leaves_previous_file_and_no_temp_file(tmp_path, capsys, ray_calls, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text("previous: run\n")
    real_replace = os.replace

    def replace(src, dst, *a, **k):
        if str(dst).startswith(str(out)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(io.os, "replace", replace)
    rc, line = run_cli(capsys, "teacher", "-c", "demo", "--output", str(out))
    assert rc == 2
    assert "could not write" in line and "config.yaml" in line and "No space left on device" in line
    assert "free disk space or choose another --output" in line
    assert (out / "config.yaml").read_text() == "previous: run\n"
    assert [p.name for p in out.iterdir()] == ["config.yaml"]  # no .config.yaml.*.tmp left behind
    assert ray_calls == []


def test_output_folder_that_cannot_be_created(tmp_path, capsys, ray_calls):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")  # root ignores chmod: a path *under a regular file* cannot be created by anyone
    rc, line = run_cli(capsys, "teacher", "-c", "demo", "--output", str(blocker / "sub"))
    assert rc == 2 and ray_calls == []
    assert "Not a directory" in line and str(blocker / "sub") in line  # the problem
    assert "choose a writable --output folder" in line  # the fix


def test_ray_that_cannot_start_is_one_line(tmp_path, capsys, monkeypatch):
    import pipelines.ray.cluster as ray_utils
    from pipelines.cli import main

    def init(**kw):  # what ray.init raises when the raylet does not come up in time
        raise Exception("The current node timed out during startup. This could happen because some of the raylet "
                        "failed to startup or the GCS has become overloaded.")

    monkeypatch.setattr(logging, "raiseExceptions", False)
    monkeypatch.setattr(ray_utils.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_utils.ray, "init", init)
    sets = [x for o in TINY for x in ("--set", o)]
    rc = main(["teacher", "-c", "demo", "--output", str(tmp_path / "out"), *sets])
    err = capsys.readouterr().err
    assert rc == 2 and "brcd: error:" in err and "timed out during startup" in err and "--address" in err


@pytest.mark.parametrize("raised", [
    None,  # the GCS answered UNAUTHENTICATED to the probe: ray.init is never called
    "AuthenticationError",  # what Ray raises when the client's token is missing or wrong
    "Failed to connect to GCS: InvalidAuthToken: Authentication token is missing or incorrect",
])
def test_cluster_that_refuses_our_token_is_one_line_naming_the_fix(tmp_path, capsys, monkeypatch, raised):
    import pipelines.ray.cluster as ray_utils
    from ray.exceptions import AuthenticationError

    from pipelines.cli import main

    def init(**kw):
        if raised is None:
            raise AssertionError("ray.init called although the probe was refused")
        if raised == "AuthenticationError":
            raise AuthenticationError("Token authentication is enabled but the authentication token is invalid or incorrect")
        try:
            raise RuntimeError(raised)
        except RuntimeError as exc:  # as Ray does: the cause is the context of a bare ConnectionError
            raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379") from exc

    monkeypatch.setattr(logging, "raiseExceptions", False)
    monkeypatch.setattr(ray_utils.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_utils.ray, "init", init)
    monkeypatch.setattr(ray_utils, "_token_refused", lambda address: raised is None)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    sets = [x for o in TINY for x in ("--set", o)]
    rc = main(["distill", "-c", "demo", "--output", str(tmp_path / "out"), "--address", "10.0.0.1:6379", *sets])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in ("10.0.0.1:6379 refused this client's authentication token", "(RAY_AUTH_MODE is unset)",
                   "set RAY_AUTH_MODE=token", "RAY_AUTH_TOKEN", "ray get-auth-token"):
        assert needle in err, err


def test_output_path_of_moderate_length_still_starts_ray(monkeypatch):
    import tempfile

    import pipelines.ray.cluster as ray_utils

    seen: dict = {}
    monkeypatch.setattr(ray_utils.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_utils.ray, "init", lambda **kw: seen.update(kw))
    base = Path(tempfile.mkdtemp(prefix="b", dir="/tmp"))
    try:
        out = base / ("o" * (55 - len(str(base)) - len("//ray_tmp")))  # out/ray_tmp: 55 chars, like a pytest tmp_path
        ray_utils.init_ray(None, out)
    finally:
        import shutil

        shutil.rmtree(base, ignore_errors=True)
    temp_dir = seen.get("_temp_dir")
    # the longest socket Ray creates: <temp_dir>/session_<date>_<time>_<usec>_<pid up to 7 digits>/sockets/plasma_store
    longest = f"{temp_dir}/session_2026-11-23_03-07-17_562775_4194304/sockets/plasma_store" if temp_dir else ""
    assert len(longest.encode()) <= 107, f"{len(longest.encode())} bytes: {longest}"


# --------------------------------------------------------------------------------------------
# MLflow
# --------------------------------------------------------------------------------------------


def test_unreachable_tracking_server_warns_once_and_training_code_continues(tmp_path, monkeypatch, caplog):
    from brcd.config import TrackingConfig
    from brcd.mlflow.tracking import Tracker

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    tracker = Tracker.from_config(TrackingConfig(tracking_uri="http://127.0.0.1:9", experiment="bad-input"), tmp_path)
    with caplog.at_level(logging.WARNING, logger="brcd.mlflow.tracking"):
        run_id = tracker.start_run("teacher")
        for epoch in range(3):  # what a training loop would do: every call is a silent no-op now
            tracker.log_metrics(run_id, {"loss": 1.0 / (epoch + 1)}, step=epoch)
        tracker.end_run(run_id)
    assert run_id is None and not tracker.enabled
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "unreachable" in warnings[0] and "training continues without tracking" in warnings[0]


def test_registry_name_or_alias_that_does_not_exist(tmp_path):
    from brcd.mlflow.registry import pull, resolve_model_version
    from brcd.mlflow.tracking import default_tracking_uri

    uri = default_tracking_uri(tmp_path, str(tmp_path / "mlflow.db"))
    with pytest.raises(ValueError) as exc:
        resolve_model_version("models:/no-such-model@champion", tracking_uri=uri)
    msg = str(exc.value)
    assert "\n" not in msg and "registered model 'no-such-model' does not exist" in msg
    assert "registered models: none" in msg
    with pytest.raises(ValueError, match="is not a models:/ URI"):
        resolve_model_version("no-such-model@champion", tracking_uri=uri)
    dest = tmp_path / "pulled"
    with pytest.raises(ValueError, match="does not exist"):
        pull("models:/no-such-model/3", dest, tracking_uri=uri)
    assert not dest.exists()  # nothing created for a model that does not exist
