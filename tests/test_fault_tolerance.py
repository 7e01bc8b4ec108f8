"""Fault tolerance with real Ray workers: a training worker killed mid-epoch, the driver interrupted.

Both scenarios check the same contract: the run continues from its last reported checkpoint (no
epoch before it is trained again), the history is 1..N exactly once, and the final weights,
``stage.json`` and checkpoints exist (safetensors only).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from brcd import io
from conftest import TINY

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]


def _reported_epochs_recorder(path: Path):
    """A Ray Train ``UserCallback`` (runs in the controller process) appending every reported
    epoch to ``path``. Defined in a function so that cloudpickle ships it by value."""
    from ray.train import UserCallback

    class ReportedEpochs(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            with open(path, "a") as fh:
                fh.write(f"{int(metrics[0]['epoch'])} {checkpoint is not None}\n")

    return ReportedEpochs()


def _checkpoint_files_are_safetensors(run_dir: Path) -> list[str]:
    from safetensors.torch import load_file

    ckpts = sorted(run_dir.glob("epoch=*"))
    for c in ckpts:
        names = sorted(p.name for p in c.iterdir())
        assert names == ["best_map.safetensors", "state.json", "state.safetensors"], (c, names)
        for n in ("best_map.safetensors", "state.safetensors"):
            load_file(str(c / n))
    return [c.name for c in ckpts]


@pytest.fixture(scope="module")
def killed_worker_run(tmp_path_factory):
    """The teacher stage on 2 Ray workers, rank 1 killed (os._exit) before step 1 of epoch 2:
    epoch 1's checkpoint is the last one when the worker group is restarted. Ray is started the
    way the CLI starts it (``pipelines.cli._run``), with the fault hook in the environment."""
    import ray

    from pipelines import cli
    from pipelines.stages import NullTracker, teacher_stage

    tmp = tmp_path_factory.mktemp("killed_worker")
    marker, reports = tmp / "killed.txt", tmp / "reported_epochs.txt"

    class Recorder(NullTracker):
        def callbacks(self, stage, run):
            return [_reported_epochs_recorder(reports)]

    if ray.is_initialized():
        ray.shutdown()
    # set before Ray starts: the raylet, and every worker it spawns, inherit it
    os.environ["BRCD_FAULT_KILL"] = f"2:1:1:{marker}"
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    sets = [*TINY, "resources.num_workers=2", "resources.max_failures=1", "teacher.optim.epochs=3",
            "teacher.optim.validate_every=1"]
    args = cli.build_parser().parse_args(["teacher", "-c", "demo", "--output", str(tmp / "out"),
                                          *[x for o in sets for x in ("--set", o)]])
    signal.signal(signal.SIGTERM, cli._terminate)  # what cli.main installs before running the command
    try:
        run = cli._run(args)  # Run + init_ray, as `brcd teacher` does
        sigterm_after_init = signal.getsignal(signal.SIGTERM)
        run.tracker = Recorder()
        info = teacher_stage(run)
        sigint_after_stage = signal.getsignal(signal.SIGINT)
    finally:
        for sig, handler in handlers.items():  # whatever Ray left behind must not outlive this module
            signal.signal(sig, handler)
        ray.shutdown()  # the env var must not leak into the shared session of later tests
        os.environ.pop("BRCD_FAULT_KILL", None)
    return {"run": run, "info": info, "marker": marker, "reports": reports, "handlers": handlers,
            "sigint_after_stage": sigint_after_stage, "sigterm_after_init": sigterm_after_init,
            "cli_sigterm": cli._terminate}


def test_worker_killed_mid_epoch_restarts_from_last_checkpoint(killed_worker_run):
    r = killed_worker_run
    run, info = r["run"], r["info"]
    assert r["marker"].read_text().startswith("killed at epoch 2 step 1")  # the kill did happen
    reported = [int(line.split()[0]) for line in r["reports"].read_text().splitlines()]
    assert reported == [1, 2, 3], reported  # epoch 1 was not trained again after the restart
    stage = io.load_json(run.teacher_dir / "stage.json")
    assert stage["epochs"] == info["epochs"] == 3
    assert [h["epoch"] for h in stage["history"]] == [1, 2, 3]
    assert stage["fingerprint"] == run.teacher_fingerprint()
    assert set(io.load_state_dict(run.teacher_weights)) and stage["best"]["map"] > 0
    (run_dir,) = (run.output / "ray").glob("teacher-*")
    assert _checkpoint_files_are_safetensors(run_dir) == ["epoch=0002", "epoch=0003"]  # num_to_keep=2


def test_training_stage_restores_the_sigint_handler(killed_worker_run):
    """fit() installs Ray Train's SIGINT handler; left behind, a later Ctrl-C (k-means, evaluation,
    the next stage of `brcd demo`) would abort a finished controller and exit 0 silently."""
    r = killed_worker_run
    assert r["sigint_after_stage"] is r["handlers"][signal.SIGINT], r["sigint_after_stage"]


def test_cli_keeps_its_sigterm_handler_after_starting_ray(killed_worker_run):
    r = killed_worker_run
    assert r["sigterm_after_init"] is r["cli_sigterm"], r["sigterm_after_init"]


# --------------------------------------------------------------------------------------------
# the driver interrupted (Ctrl-C, then SIGTERM), then re-run
# --------------------------------------------------------------------------------------------

EPOCHS = 5
CLI_OVERRIDES = [*TINY, f"teacher.optim.epochs={EPOCHS}", "teacher.optim.validate_every=1",
                 "resources.num_workers=1", "resources.max_failures=0"]


def _leftover_processes(out: Path, grace: float = 10.0) -> list[str]:
    """Processes of the Ray session a killed driver started under ``out`` that are still alive
    after ``grace`` seconds (its session folder is ``out/ray_tmp``); they are killed by pid."""
    import ray  # noqa: F401 - first: Ray puts its vendored psutil on sys.path
    import psutil

    deadline = time.monotonic() + grace
    while True:
        left = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if p.pid != os.getpid() and str(out) in " ".join(p.info["cmdline"] or []):
                    left.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    names = []
    for p in left:
        try:
            names.append(f"{p.pid} {' '.join(p.cmdline())[:80]}")
            p.kill()
        except psutil.NoSuchProcess:
            pass
    return names


def _latest_reported_epoch(out: Path) -> int:
    """The newest checkpoint Ray Train has registered (what a re-run restores), 0 if none."""
    best = 0
    for snap in (out / "ray").glob("teacher-*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snap.read_text()).get("latest_checkpoint_result") or {}
        except (OSError, ValueError):  # being written right now
            continue
        best = max(best, int((latest.get("metrics") or {}).get("epoch", 0)))
    return best


class CliRun:
    """``brcd teacher`` in a subprocess; stdout/stderr go to files (a full pipe would stall it)."""

    def __init__(self, out: Path, name: str):
        cmd = [sys.executable, "-m", "pipelines.cli", "teacher", "-c", "demo", "--output", str(out)]
        cmd += [x for o in CLI_OVERRIDES for x in ("--set", o)]
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "BRCD_FAULT_KILL")}
        env["PYTHONUNBUFFERED"] = "1"  # a killed driver keeps what it printed (forwarded worker lines)
        self.out = out
        self.logs = (out.parent / f"{name}.stdout", out.parent / f"{name}.stderr")
        with open(self.logs[0], "w") as so, open(self.logs[1], "w") as se:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=so, stderr=se, text=True,
                                         start_new_session=True)
        self.rc: int | None = None
        self.stdout = self.stderr = ""

    def interrupt_after_epoch(self, epoch: int, sig: int, timeout: float = 420) -> int:
        """Send ``sig`` to the driver once a checkpoint after ``epoch`` is registered; return that epoch."""
        deadline = time.monotonic() + timeout
        while (seen := _latest_reported_epoch(self.out)) <= epoch:
            if self.proc.poll() is not None:
                self.wait()
                pytest.fail(f"the run ended (rc {self.rc}) before a checkpoint after epoch {epoch}:\n{self.stderr[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"no checkpoint after epoch {epoch} within {timeout} s")
            time.sleep(0.2)
        self.proc.send_signal(sig)
        self.wait()
        return seen

    def wait(self, timeout: float = 420) -> "CliRun":
        try:
            self.rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        finally:
            self.stdout, self.stderr = (p.read_text() for p in self.logs)
        return self

    def kill(self) -> None:
        """Last resort on a test failure: the driver's process group (it started its own Ray)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="module")
def interrupted_runs(tmp_path_factory):
    """``brcd teacher`` three times on one output folder: Ctrl-C after the first checkpoint,
    SIGTERM after a later one, then a run to the end. Each CLI run starts its own local Ray."""
    import ray

    if ray.is_initialized():  # 2 cores: do not keep an idle session around while 3 others run
        ray.shutdown()
    # a short path: the CLI keeps Ray's session (unix sockets) under --output when it is short
    base = Path(tempfile.mkdtemp(prefix="brcd-ft-", dir="/tmp"))
    out = base / "out"
    runs = {}
    first = CliRun(out, "first")
    runs["sigint"] = (first, first.interrupt_after_epoch(0, signal.SIGINT))
    runs["left_after_sigint"] = _leftover_processes(out)
    runs["after_sigint"] = _latest_reported_epoch(out)
    second = CliRun(out, "second")
    runs["sigterm"] = (second, second.interrupt_after_epoch(runs["after_sigint"], signal.SIGTERM))
    runs["left_after_sigterm"] = _leftover_processes(out)
    runs["after_sigterm"] = _latest_reported_epoch(out)
    runs["final"] = CliRun(out, "final").wait()
    runs["left_after_final"] = _leftover_processes(out, grace=30)
    runs["out"] = out
    summary = {k: v for k, v in runs.items() if k.startswith(("left_", "after_"))}
    summary.update({f"rc_{k}": runs[k][0].rc for k in ("sigint", "sigterm")}, rc_final=runs["final"].rc)
    io.save_json(tmp_path_factory.getbasetemp() / "interrupted_runs.json", summary)  # kept for a look afterwards
    yield runs
    shutil.rmtree(base, ignore_errors=True)


def test_interrupted_driver_resumes_and_finishes(interrupted_runs):
    r = interrupted_runs
    out: Path = r["out"]
    second, final = r["sigterm"][0], r["final"]
    # each re-run continued from the checkpoint the previous one left (no restart at epoch 1)
    assert f"resuming after epoch {r['after_sigint']}" in second.stdout, second.stdout[-3000:]
    assert r["after_sigterm"] > r["after_sigint"] >= 1
    assert final.rc == 0, final.stderr[-3000:]
    assert f"resuming after epoch {r['after_sigterm']}" in final.stdout, final.stdout[-3000:]
    retrained = [k for k in range(1, r["after_sigterm"] + 1) if f"[teacher] epoch {k}/{EPOCHS} " in final.stdout]
    assert retrained == []  # epochs already checkpointed were not trained again
    assert "[teacher] done" in final.stdout
    stage = io.load_json(out / "teacher" / "stage.json")
    assert stage["epochs"] == EPOCHS and [h["epoch"] for h in stage["history"]] == list(range(1, EPOCHS + 1))
    assert io.load_state_dict(out / "teacher" / "teacher.safetensors")
    (run_dir,) = (out / "ray").glob("teacher-*")  # one deterministic run name: the same Ray run reused
    assert _checkpoint_files_are_safetensors(run_dir)[-1] == f"epoch={EPOCHS:04d}"
    # no Ray process of the Ctrl-C'd and of the finished session outlived its driver
    assert r["left_after_sigint"] == r["left_after_final"] == []


def test_ctrl_c_exits_130_with_the_resume_hint(interrupted_runs):
    first, _ = interrupted_runs["sigint"]
    assert first.rc == 130, (first.rc, first.stderr[-2000:])
    assert "brcd: interrupted; run the same command again to resume from the last checkpoint" in first.stderr


def test_sigterm_is_handled_like_ctrl_c(interrupted_runs):
    second, _ = interrupted_runs["sigterm"]
    assert second.rc in (130, 143), (second.rc, second.stderr[-2000:])
    assert "brcd: interrupted" in second.stderr
    assert interrupted_runs["left_after_sigterm"] == []


def test_worker_progress_reaches_the_driver_once_per_epoch(interrupted_runs):
    """A Ray Train worker's progress line arrives once (V2 patches print() into stdout AND the root
    logger), and Ray Train's per-report "Reporting training result ..." dump is not printed."""
    import re

    final = interrupted_runs["final"]
    text = final.stdout + final.stderr
    epochs = re.findall(r"\[teacher\] epoch (\d+)/\d+ \|", text)
    assert epochs and len(epochs) == len(set(epochs)), epochs
    assert "Reporting training result" not in text
