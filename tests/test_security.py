"""Security: no pickle is ever executed, weights are safetensors, writes are atomic, configs hold
no credentials, local services bind to localhost."""

from __future__ import annotations

import logging
import os
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from brcd import io
from conftest import TINY

ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------------
# crafted pickles
# --------------------------------------------------------------------------------------------


class Payload:
    """Unpickling this runs code: it writes ``marker``. Proof of execution, harmless otherwise."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('payload ran')",))


def evil_files(folder: Path, marker: Path) -> dict[str, Path]:
    """A raw pickle and a ``torch.save`` zip-pickle, each under a weights-like name."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = pickle.dumps({"weight": Payload(marker)})
    files = {}
    for name in ("raw.safetensors", "raw.pt", "raw.pth", "raw.bin"):
        (folder / name).write_bytes(raw)
        files[name] = folder / name
    torch.save({"weight": Payload(marker), "bias": torch.zeros(2)}, folder / "zip.pt")
    files["zip.pt"] = folder / "zip.pt"
    (folder / "zip.safetensors").write_bytes((folder / "zip.pt").read_bytes())
    files["zip.safetensors"] = folder / "zip.safetensors"
    return files


@pytest.fixture
def evil(tmp_path):
    marker = tmp_path / "PWNED"
    files = evil_files(tmp_path / "evil", marker)
    # controls: the payloads are live -- unpickling them the unsafe way does run the code
    control = tmp_path / "control"
    ctrl = evil_files(tmp_path / "ctrl", control)
    pickle.loads(ctrl["raw.pt"].read_bytes())
    assert control.exists()
    control.unlink()
    torch.load(ctrl["zip.pt"], weights_only=False)
    assert control.exists()
    yield files, marker
    assert not marker.exists(), "a crafted pickle was executed"


def test_load_state_dict_refuses_every_pickle(evil):
    files, marker = evil
    for path in files.values():
        with pytest.raises(io.ArtifactError, match=r"is not a safetensors file .*pickled checkpoints are never loaded"):
            io.load_state_dict(path)
    assert not marker.exists()


def test_third_party_weights_loader_refuses_code(evil):
    files, marker = evil
    for path in files.values():
        with pytest.raises(io.ArtifactError, match="safetensors|weights_only=True"):
            io.load_torch_weights(path)
    assert not marker.exists()


def _tiny_model():
    from brcd.config import ModelConfig
    from brcd.models.nets import create_hashing_model

    torch.manual_seed(0)
    return create_hashing_model(ModelConfig(backbone="test_resnet", bits=16, head="linear"))


def test_resume_checkpoint_with_pickled_state_is_refused(evil, tmp_path):
    from brcd.engine import LoopState, load_state, make_optimizer, save_state

    files, marker = evil
    model = _tiny_model()
    opt = make_optimizer(model, 1e-3)
    ckpt = save_state(tmp_path / "ckpt" / "epoch=0001", model, opt, LoopState(epoch=1))
    load_state(ckpt, model, opt)  # the genuine folder loads
    for name in ("raw.pt", "zip.pt"):
        (ckpt / "state.safetensors").write_bytes(files[name].read_bytes())
        with pytest.raises(io.ArtifactError, match="not a safetensors file"):
            load_state(ckpt, model, opt)
    # a best-weights file swapped for a pickle is refused too (what the stages copy out)
    from brcd.engine import load_model_weights

    with pytest.raises(io.ArtifactError, match="not a safetensors file"):
        load_model_weights(model, files["zip.safetensors"])
    assert not marker.exists()


def test_backbone_weights_file_with_code_is_refused(evil):
    from brcd.models.nets import create_backbone

    files, marker = evil
    for name in ("raw.pt", "raw.pth", "zip.pt", "zip.safetensors", "raw.bin"):
        with pytest.raises(io.ArtifactError):
            create_backbone("test_resnet", weights=files[name])
    assert not marker.exists()


def test_cli_refuses_a_pickled_teacher_checkpoint(evil, tmp_path, capsys, monkeypatch):
    import pipelines.ray.cluster as ray_utils
    from pipelines.cli import main

    files, marker = evil
    monkeypatch.setattr(ray_utils, "init_ray", lambda *a, **k: None)  # fails before any Ray work
    out = tmp_path / "out"
    sets = [x for o in [*TINY, f"teacher.checkpoint={files['zip.pt']}"] for x in ("--set", o)]
    assert main(["teacher", "-c", "demo", "--output", str(out), *sets]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("brcd:")]
    assert len(err) == 1 and "is not a safetensors file" in err[0] and "never loaded" in err[0]
    assert not (out / "teacher" / "teacher.safetensors").exists()
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# local services
# --------------------------------------------------------------------------------------------


def test_init_ray_asks_for_a_localhost_dashboard(tmp_path, monkeypatch):
    import pipelines.ray.cluster as ray_utils

    seen = {}
    monkeypatch.setattr(ray_utils.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_utils.ray, "init", lambda **kw: seen.update(kw))
    monkeypatch.delenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", raising=False)
    ray_utils.init_ray(None, tmp_path)
    assert seen["dashboard_host"] == "127.0.0.1" and seen["include_dashboard"] is True
    assert seen["address"] == "local"  # a fresh local cluster, never someone else's gcs_server
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"  # no error-level log line per Train run
    token_log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    assert not token_log.filter(logging.LogRecord("x", logging.WARNING, "", 0, "Token authentication is enabled "
                                                  "for this Ray cluster. Set RAY_AUTH_MODE=disabled", None, None))
    assert token_log.filter(logging.LogRecord("x", logging.WARNING, "", 0, "Token authentication is disabled", None, None))


def test_init_ray_joins_ray_address_and_keeps_the_callers_sigterm_handler(tmp_path, monkeypatch):
    """Under ``ray job submit`` ``$RAY_ADDRESS`` names the cluster to join; and whatever ray.init does
    to SIGTERM (a local head installs its own handler), the caller's handler is back afterwards."""
    import signal

    import pipelines.ray.cluster as ray_utils

    seen = {}

    def fake_init(**kw):
        seen.update(kw)
        signal.signal(signal.SIGTERM, lambda *a: None)  # what Ray's node does

    def mine(signum, frame):
        raise KeyboardInterrupt

    monkeypatch.setattr(ray_utils.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_utils.ray, "init", fake_init)
    monkeypatch.setattr(ray_utils, "_token_refused", lambda address: False)  # no gRPC probe of a made-up address
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.7:6379")
    monkeypatch.delenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", raising=False)
    previous = signal.signal(signal.SIGTERM, mine)
    try:
        ray_utils.init_ray(None, tmp_path)
        assert seen["address"] == "10.0.0.7:6379"
        assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in os.environ  # a real cluster may have spot nodes
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.ray
def test_local_ray_dashboard_listens_on_localhost_only(tmp_path):
    """A real local Ray started the way the CLI starts it: the dashboard (and its REST API, which
    can submit jobs) is reachable on 127.0.0.1 only. The session stays up for later tests."""
    import ray  # first: Ray puts its vendored psutil on sys.path
    import psutil

    from pipelines.ray.cluster import init_ray

    if ray.is_initialized():
        ray.shutdown()
    before = os.environ.get("RAY_API_SERVER_ADDRESS")
    init_ray(None, tmp_path / "o")
    node = ray._private.worker.global_worker.node
    url = node.address_info.get("webui_url") or node.dashboard_url
    host, _, port = url.rpartition("//")[-1].partition(":")
    assert host == "127.0.0.1", url
    listeners = [c for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == int(port.split("/")[0])]
    assert listeners and all(c.laddr.ip in ("127.0.0.1", "::1") for c in listeners), listeners
    logging.getLogger(__name__).info("dashboard %s", url)
    # the cluster's processes (Ray Train's placement-group cleaner among them) query this cluster's State API
    # instead of scanning the machine for "the" Ray; this process's environment is left as it was
    want = f"http://127.0.0.1:{int(port.split('/')[0])}"
    assert ray.get(ray.remote(lambda: os.environ.get("RAY_API_SERVER_ADDRESS")).remote()) == want
    assert os.environ.get("RAY_API_SERVER_ADDRESS") == before


# --------------------------------------------------------------------------------------------
# what a finished run leaves on disk
# --------------------------------------------------------------------------------------------

PICKLE_SUFFIXES = {".pkl", ".pickle", ".pt", ".pth", ".ckpt", ".bin", ".joblib", ".npy"}


def assert_pickle_free(folder: Path) -> dict[str, int]:
    """No pickle-format file anywhere under ``folder``; every weight file loads as safetensors,
    every ``.npz`` without pickles. Returns counts per suffix."""
    from safetensors.torch import load_file

    counts: dict[str, int] = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.is_symlink():
            continue
        counts[p.suffix] = counts.get(p.suffix, 0) + 1
        assert p.suffix.lower() not in PICKLE_SUFFIXES, f"pickle-style file {p}"
        head = p.read_bytes()[:2]
        assert not (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")), f"{p} is a pickle"
        if zipfile.is_zipfile(p) and p.suffix != ".npz":
            names = zipfile.ZipFile(p).namelist()
            assert not any(n.endswith(".pkl") for n in names), f"{p} is a torch.save archive"
        if p.suffix == ".safetensors":
            assert isinstance(load_file(str(p)), dict)
        elif p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as data:
                for k in data.files:
                    assert data[k].dtype != object
    return counts


def test_finished_run_holds_safetensors_and_no_pickles(trained_run):
    counts = assert_pickle_free(trained_run)
    assert counts.get(".safetensors", 0) >= 1 and counts.get(".npz", 0) >= 2
    assert (trained_run / "teacher" / "teacher.safetensors").exists()


def test_checkpoint_folder_written_by_the_engine_is_pickle_free(tmp_path):
    from brcd.engine import LoopState, make_optimizer, save_state

    model = _tiny_model()
    opt = make_optimizer(model, 1e-3)
    x = torch.randn(4, 3, 16, 16)
    model(x).logits.sum().backward()
    opt.step()  # the Adam state holds tensors and scalars
    ckpt = save_state(tmp_path / "epoch=0001", model, opt, LoopState(epoch=1), {"map": model.state_dict()})
    assert sorted(p.name for p in ckpt.iterdir()) == ["best_map.safetensors", "state.json", "state.safetensors"]
    assert_pickle_free(tmp_path)


# --------------------------------------------------------------------------------------------
# credentials
# --------------------------------------------------------------------------------------------

TOKEN_PATTERNS = {
    "AWS access key id": r"\b(AKIA|ASIA)[0-9A-Z]{16}\b",
    "private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    "GitHub token": r"\b(ghp|gho|ghs|ghu|github_pat)_[A-Za-z0-9_]{20,}",
    "Slack token": r"\bxox[abprs]-[A-Za-z0-9-]{10,}",
    "Hugging Face token": r"\bhf_[A-Za-z0-9]{30,}",
    "OpenAI-style key": r"\bsk-[A-Za-z0-9]{20,}",
    "credentials in a URI": r"[a-z][a-z0-9+.-]*://[^/\s:@'\"]+:[^/\s@'\"$]+@",
}
SECRET_KEY = re.compile(r"(password|passwd|secret|token|api[_-]?key|access[_-]?key|private[_-]?key|credential)", re.I)
PLACEHOLDER = re.compile(r"^(|null|none|YOUR-.*|<.*>|\$\{?[A-Za-z_][A-Za-z0-9_]*\}?|changeme|\*+)$", re.I)
FILE_PATH = re.compile(r"^(~|\.{1,2})?/[\w./-]+$")  # names the file holding a secret (e.g. ~/.ray/auth_token)


def _config_files() -> list[Path]:
    files = sorted((ROOT / "brcd" / "configs").glob("*.yaml")) + [ROOT / "cluster.yaml"]
    files += sorted((ROOT / "deploy").glob("*.y*ml"))
    return [f for f in files if f.exists()]


def _walk(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, (*path, str(k)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, (*path, str(i)))
    else:
        yield path, node


def credential_problems(text: str, name: str) -> list[str]:
    problems = []
    for what, pattern in TOKEN_PATTERNS.items():
        for m in re.finditer(pattern, text):
            problems.append(f"{name}: {what}: {m.group(0)[:12]}...")
    for doc in yaml.safe_load_all(text):
        docs = [doc]
        for _, value in _walk(doc):  # embedded YAML (e.g. KubeRay's runtimeEnvYAML)
            if isinstance(value, str) and "\n" in value and ":" in value:
                try:
                    docs.append(yaml.safe_load(value))
                except yaml.YAMLError:
                    pass
        for d in docs:
            for path, value in _walk(d):
                text = "" if value is None else str(value)
                if path and SECRET_KEY.search(path[-1]) and not (PLACEHOLDER.match(text) or FILE_PATH.match(text)):
                    problems.append(f"{name}: {'.'.join(path)} has a literal value")
            for entry in _mappings(d):  # k8s env: [{name, value}] is a literal; [{name, valueFrom}] reads a Secret
                env = entry.get("name")
                if isinstance(env, str) and SECRET_KEY.search(env) and "valueFrom" not in entry:
                    problems.append(f"{name}: env var {env} is set in the file")
    return problems


def _mappings(node):
    if isinstance(node, dict):
        yield node
        node = list(node.values())
    if isinstance(node, list):
        for v in node:
            yield from _mappings(v)


def test_credential_scan_finds_planted_secrets():
    planted = (
        "tracking:\n  tracking_uri: postgresql://mlflow:s3cr3t@db:5432/mlflow\n"
        "aws:\n  aws_access_key_id: AKIAABCDEFGHIJKLMNOP\n  aws_secret_access_key: abcdEFGH1234\n"
        "env:\n- {name: HF_TOKEN, value: hf_abcdefghijklmnopqrstuvwxyzABCDEFGH}\n"
        "runtimeEnvYAML: |\n  env_vars:\n    MLFLOW_TRACKING_PASSWORD: hunter2\n"
        "env2:\n- {name: RAY_AUTH_TOKEN, value: 0123abcd}\n"
    )
    found = " | ".join(credential_problems(planted, "planted.yaml"))
    for needle in ("credentials in a URI", "AWS access key id", "aws.aws_secret_access_key", "Hugging Face token",
                   "env var HF_TOKEN", "env_vars.MLFLOW_TRACKING_PASSWORD", "env var RAY_AUTH_TOKEN"):
        assert needle in found, found
    from_secret = "env:\n- name: RAY_AUTH_TOKEN\n  valueFrom: {secretKeyRef: {name: brcd-ray-auth, key: auth_token}}\n"
    assert credential_problems(from_secret, "ok") == []
    assert credential_problems("file_mounts:\n  /home/ubuntu/.ray/auth_token: ~/.ray/auth_token\n", "ok") == []
    assert credential_problems("auth_token: 0123abcd/\n", "bad")  # not a path: a literal
    assert credential_problems("auth:\n  ssh_user: ubuntu\n  token: ${RAY_TOKEN}\n  password: YOUR-PASSWORD\n", "ok") == []


def test_config_files_hold_no_credentials():
    files = _config_files()
    assert {"demo.yaml", "cluster.yaml", "kuberay-rayjob.yaml"} <= {f.name for f in files}
    problems = [p for f in files for p in credential_problems(f.read_text(), f.name)]
    assert not problems, problems


# --------------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------------


class Crash(BaseException):
    """A kill in the middle of a write (not an Exception: nothing may swallow it)."""


def _no_temp_files(folder: Path) -> None:
    left = [p.name for p in folder.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".")]
    assert not left, left


def test_crash_inside_save_json_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "stage.json"
    io.save_json(target, {"epoch": 1})
    real = Path.write_bytes

    def half_then_crash(self, data):
        real(self, data[: len(data) // 2])
        raise Crash()

    monkeypatch.setattr(Path, "write_bytes", half_then_crash)
    with pytest.raises(Crash):
        io.save_json(target, {"epoch": 2, "history": list(range(100))})
    monkeypatch.undo()
    assert io.load_json(target) == {"epoch": 1}
    _no_temp_files(tmp_path)


def test_crash_inside_save_state_dict_keeps_the_previous_weights(tmp_path, monkeypatch):
    target = tmp_path / "best_map.safetensors"
    old = {"w": torch.arange(6.0).reshape(2, 3)}
    io.save_state_dict(target, old)

    def partial_then_crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 100)
        raise Crash()

    monkeypatch.setattr("safetensors.torch.save_file", partial_then_crash)  # what io.save_state_dict calls
    with pytest.raises(Crash):
        io.save_state_dict(target, {"w": torch.zeros(50, 50)})
    monkeypatch.undo()
    assert torch.equal(io.load_state_dict(target)["w"], old["w"])
    _no_temp_files(tmp_path)


def test_crash_inside_save_cluster_artifact_is_never_silently_used(tmp_path, monkeypatch):
    from brcd import clustering

    rng = np.random.default_rng(0)

    def artifact(seed_codes):
        codes = np.where(seed_codes.random((40, 16)) < 0.5, -1, 1).astype(np.int8)
        return clustering.build_cluster_artifact(codes, num_clusters=3, margin=0.5, n_init=1, seed=0,
                                                 teacher_fingerprint="teacher-a", split_fingerprint="split-a")

    old, new = artifact(rng), artifact(rng)
    folder = tmp_path / "clusters"
    clustering.save_cluster_artifact(old, folder)

    # 1) killed while writing clusters.npz: the old pair is untouched and still loads
    real_savez = np.savez

    def savez_then_crash(fh, **arrays):
        real_savez(fh, **arrays)
        fh.truncate(fh.tell() // 2)
        raise Crash()

    monkeypatch.setattr(io.np, "savez", savez_then_crash)
    with pytest.raises(Crash):
        clustering.save_cluster_artifact(new, folder)
    monkeypatch.undo()
    loaded = clustering.load_cluster_artifact(folder, teacher_fingerprint="teacher-a", split_fingerprint="split-a")
    np.testing.assert_array_equal(loaded.labels, old.labels)
    _no_temp_files(folder)

    # 2) killed while writing manifest.json (the new npz is already in place): load refuses the pair
    real_write = Path.write_bytes

    def manifest_crash(self, data):
        if self.name.startswith(".manifest.json."):
            real_write(self, data[:10])
            raise Crash()
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", manifest_crash)
    with pytest.raises(Crash):
        clustering.save_cluster_artifact(new, folder)
    monkeypatch.undo()
    with pytest.raises(io.ArtifactError, match="does not match its manifest"):
        clustering.load_cluster_artifact(folder, teacher_fingerprint="teacher-a", split_fingerprint="split-a")
    _no_temp_files(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["clusters.npz", "manifest.json"]


def test_ray_session_shuts_down_only_the_ray_it_started(tmp_path, monkeypatch):
    """The benchmarks' Ray lives in a temporary folder: the Ray they start must not outlive it (the next
    benchmark's init_ray would join it, and its workers could not reach the deleted sockets)."""
    import pipelines.ray.cluster as ray_utils

    state = {"up": False, "shutdowns": 0}
    monkeypatch.setattr(ray_utils.ray, "is_initialized", lambda: state["up"])
    monkeypatch.setattr(ray_utils, "init_ray", lambda *a, **k: state.update(up=True))
    monkeypatch.setattr(ray_utils.ray, "shutdown", lambda: state.update(up=False, shutdowns=state["shutdowns"] + 1))
    with ray_utils.ray_session(tmp_path):
        assert state["up"]
        with ray_utils.ray_session(tmp_path):  # joins the running one
            pass
        assert state["up"] and state["shutdowns"] == 0
    assert not state["up"] and state["shutdowns"] == 1
    with pytest.raises(RuntimeError):
        with ray_utils.ray_session(tmp_path):
            raise RuntimeError("a failed benchmark")
    assert not state["up"] and state["shutdowns"] == 2


def test_artifacts_get_the_mode_of_a_plain_open(tmp_path):
    """Atomic writes go through mkstemp (mode 0600); the artifact ends up readable like any file the
    user writes (0666 minus the umask), e.g. by a tracking server running as another user."""
    from brcd.io import atomic_path, save_json

    umask = os.umask(0)
    os.umask(umask)
    save_json(tmp_path / "a.json", {"x": 1})
    with atomic_path(tmp_path / "b.bin") as tmp:
        tmp.write_bytes(b"x")
    for name in ("a.json", "b.bin"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
