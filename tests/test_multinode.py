"""A real two-node Ray cluster on this machine, made as docs/CLUSTER.md (section 9) makes one: two
`ray start` commands with token authentication, then `brcd distill --address` from the command
line. 2 DDP workers placed STRICT_SPREAD run one worker per node; a `brcd` without the token stops
at once with one line naming the fix."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
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
BIN = Path(sys.executable).parent
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")


def _free_port() -> int:
    """Fixed default ports (6379, 8265, 10001) may be taken by any other local Ray."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(token: str | None) -> dict[str, str]:
    """This environment without any Ray auth settings (a local ray.init sets RAY_AUTH_MODE in
    os.environ), plus the cluster's token when given."""
    env = {k: v for k, v in os.environ.items() if k not in AUTH_VARS}
    if token is not None:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    return env


def _kill_processes_of(temp_dir: str) -> None:
    """Stop the Ray processes of this cluster only (their command lines name its temp dir): a
    `ray stop` would also stop every other Ray on the machine."""
    def ours() -> list[int]:
        pids = []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and temp_dir.encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                continue
        return pids

    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        for pid in ours():
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while ours() and time.monotonic() < deadline:
            time.sleep(0.5)


def _ray_start(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), "start", "--disable-usage-stats", *args], env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture
def two_nodes(trained_run):
    """`ray start --head` (1 CPU, dashboard on 127.0.0.1: Ray Train needs the State API) and
    `ray start --address` (1 CPU), both with RAY_AUTH_MODE=token and one token. Depends on
    ``trained_run`` so the shared session's teacher is trained before that session is shut down."""
    import ray

    if ray.is_initialized():
        ray.shutdown()  # the shared single-node session (2 cores); ``ray_local`` starts a new one lazily later
    token = secrets.token_hex(32)
    temp_dir = ""
    try:
        for attempt in range(3):  # Ray's 30 s start-up limit is hard-coded; a loaded machine can miss it
            temp_dir = tempfile.mkdtemp(prefix="brcd-rs-", dir="/tmp")  # short: AF_UNIX paths <= 107 bytes
            address, dashboard = f"127.0.0.1:{_free_port()}", f"http://127.0.0.1:{_free_port()}"
            head = _ray_start(["--head", f"--port={address.split(':')[1]}", "--num-cpus=1", f"--temp-dir={temp_dir}",
                               "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard.rsplit(':', 1)[1]}",
                               f"--ray-client-server-port={_free_port()}"], _env(token))
            if head.returncode == 0:
                break
            _kill_processes_of(temp_dir)
            assert attempt < 2 and "timed out during startup" in head.stderr, head.stderr[-3000:]
        node = _ray_start([f"--address={address}", "--num-cpus=1", f"--temp-dir={temp_dir}"], _env(token))
        assert node.returncode == 0, node.stderr[-3000:]
        yield {"address": address, "dashboard": dashboard, "token": token}
    finally:
        if temp_dir:
            _kill_processes_of(temp_dir)


def _brcd(args: list[str], env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "brcd"), *args], env=env, capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)


def test_two_ray_start_nodes_with_token_auth_run_brcd_distill(trained_run, two_nodes):
    address, token = two_nodes["address"], two_nodes["token"]
    sets = [x for o in [*TINY, "resources.num_workers=2", "resources.placement_strategy=STRICT_SPREAD",
                        "distill.optim.epochs=1"] for x in ("--set", o)]
    argv = ["distill", "-c", "demo", "--output", str(trained_run), "--address", address, *sets]

    # without the token: one line naming the fix, before anything runs
    refused = _brcd(argv, _env(None), timeout=300)
    assert refused.returncode == 2, refused.stderr[-3000:]
    err = refused.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"{address} refused this client's authentication token" in err and "set RAY_AUTH_MODE=token" in err, err
    assert not (trained_run / "student").exists()

    # with it: both nodes, one DDP worker on each, and nothing printed that looks like a failure
    done = _brcd(argv, _env(token))
    printed = done.stdout + done.stderr
    assert done.returncode == 0, printed[-4000:]
    for bad in ("GetTimeoutError", "not writable", "InvalidAuthToken"):
        assert bad not in printed, printed[-4000:]
    stage = io.load_json(trained_run / "student" / "stage.json")
    assert stage["epochs"] == 1 and set(stage["best"]) == {"map_symmetric", "map_asymmetric"}
    for m in ("map_symmetric", "map_asymmetric"):
        assert io.load_state_dict(trained_run / "student" / f"best_{m}.safetensors")

    where = ("import json, ray\nfrom ray.util.state import list_actors\nray.init(address=%r, logging_level='ERROR')\n"
             "nodes = sorted(n['NodeID'] for n in ray.nodes() if n['Alive'])\n"
             "workers = list_actors(address=%r, filters=[('class_name', '=', 'RayTrainWorker')], detail=True, "
             "raise_on_missing_output=False)\n"
             "print(json.dumps({'nodes': nodes, 'workers': sorted(w.node_id for w in workers)}))"
             % (address, two_nodes["dashboard"]))
    probe = subprocess.run([sys.executable, "-c", where], env=_env(token), capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]
    seen = json.loads(probe.stdout.strip().splitlines()[-1])
    assert len(seen["nodes"]) == 2 and seen["workers"] == seen["nodes"], seen  # one worker on each node
