"""Offline checks of the cluster definitions: ``cluster.yaml`` (Ray cluster launcher, AWS) and
``deploy/kuberay-rayjob.yaml`` (KubeRay RayJob), plus the ``brcd`` command lines in them and in
``docs/CLUSTER.md``.

``prepare_config`` and ``validate_config`` are **private** Ray helpers
(``ray.autoscaler._private.util``). They are the first two calls ``ray up`` makes, before it talks to
the cloud. They are pinned to Ray 2.60.0 below; after a Ray upgrade, re-read them and update the pin.

What runs offline, read from the Ray 2.60.0 source: for ``provider.type: aws``, ``prepare_config``
only loads ``ray/autoscaler/aws/defaults.yaml`` (a file in the wheel), does a *shallow*
``defaults.update(config)`` and fills per-type min/max workers. ``validate_config`` runs jsonschema
against ``ray/autoscaler/ray-schema.json`` (local ``#/definitions`` refs only) and does a few
cross-field checks. Neither needs boto3, credentials or the network. The tests block sockets to
prove it. The AWS-side bootstrap (key pair, IAM profile, security group, subnets, AMI lookup) is in
``ray.autoscaler._private.aws.config.bootstrap_aws``. That needs boto3 and credentials, so it is
*not* exercised here: instance types, AMI ids and ARNs are only checked when ``ray up`` runs.
"""

from __future__ import annotations

import copy
import re
import shlex
import socket
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
RAYJOB_YAML = ROOT / "deploy" / "kuberay-rayjob.yaml"
CLUSTER_MD = ROOT / "docs" / "CLUSTER.md"

PINNED_RAY = "2.60.0"  # the version whose private autoscaler helpers were read (see module docstring)

# vCPUs and GPUs per instance type. A node type's `resources` *replace* what Ray would detect, so they
# must match the hardware. Add a row here when adding an instance type to cluster.yaml.
INSTANCE_SHAPES = {
    "m5.xlarge": (4, 0),
    "m5.2xlarge": (8, 0),
    "m5.4xlarge": (16, 0),
    "g5.xlarge": (4, 1),
    "g5.2xlarge": (8, 1),
    "g5.12xlarge": (48, 4),
    "g5.48xlarge": (192, 8),
    "p4d.24xlarge": (96, 8),
}

COMMAND_KEYS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)

SECRET_PATTERNS = {
    "AWS access key id": r"\b(AKIA|ASIA)[0-9A-Z]{16}\b",
    "AWS secret key setting": r"aws_secret_access_key|aws_session_token|AWS_SECRET_ACCESS_KEY",
    "password setting": r"password\s*[:=]",
    "password inside a URI": r"://[^/\s:@]+:[^@\s/]+@",
    "private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    "GitHub / HF token": r"\b(ghp_[A-Za-z0-9]{20,}|hf_[A-Za-z0-9]{20,})\b",
}


@contextmanager
def no_network():
    """Make any socket connect or DNS lookup raise, so a hidden cloud/network call fails loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]!r}")

    saved = (socket.socket.connect, socket.create_connection, socket.getaddrinfo)
    socket.socket.connect, socket.create_connection, socket.getaddrinfo = refuse, refuse, refuse
    try:
        yield
    finally:
        socket.socket.connect, socket.create_connection, socket.getaddrinfo = saved


def prepare_and_validate(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    before = set(sys.modules)
    with no_network():
        prepared = prepare_config(copy.deepcopy(config))
        validate_config(prepared)
    cloud_sdks = sorted(m for m in set(sys.modules) - before if m.split(".")[0] in ("boto3", "botocore"))
    assert not cloud_sdks, f"preparing/validating the config imported {cloud_sdks}"
    return prepared


def all_commands(config: dict) -> list[str]:
    return [cmd for key in COMMAND_KEYS for cmd in config.get(key) or []]


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    return prepare_and_validate(raw)


@pytest.fixture(scope="module")
def rayjob() -> dict:
    docs = [d for d in yaml.safe_load_all(RAYJOB_YAML.read_text()) if d]
    jobs = [d for d in docs if d.get("kind") == "RayJob"]
    assert len(jobs) == 1, f"{RAYJOB_YAML.name} must hold exactly one RayJob, found {len(jobs)}"
    return jobs[0]


# --------------------------------------------------------------------------------------------
# cluster.yaml: schema validation through Ray's own (private) helpers
# --------------------------------------------------------------------------------------------


def test_private_autoscaler_api_is_the_pinned_one():
    import inspect

    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    assert ray.__version__ == PINNED_RAY, (
        f"Ray is {ray.__version__}; re-read ray.autoscaler._private.util.prepare_config/validate_config "
        f"and update PINNED_RAY in {Path(__file__).name}"
    )
    assert list(inspect.signature(prepare_config).parameters) == ["config"]
    assert list(inspect.signature(validate_config).parameters) == ["config"]


def test_cluster_yaml_validates_offline(prepared):
    # validate_config raised nothing, and prepare_config filled per-type limits (head: 0 workers).
    assert prepared["head_node_type"] in prepared["available_node_types"]
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0
    assert prepared["provider"]["type"] == "aws"  # and it needed neither boto3 nor the network


def test_typo_in_top_level_key_fails_validation(raw):
    import jsonschema

    bad = copy.deepcopy(raw)
    bad["max_worker"] = bad.pop("max_workers")  # typo
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        prepare_and_validate(bad)


def test_typo_in_node_type_key_fails_validation(raw):
    import jsonschema

    bad = copy.deepcopy(raw)
    worker = next(n for n in bad["available_node_types"] if n != bad["head_node_type"])
    bad["available_node_types"][worker]["min_worker"] = 1  # typo of min_workers
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        prepare_and_validate(bad)


def test_unknown_head_node_type_fails_validation(raw):
    bad = copy.deepcopy(raw)
    bad["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError, match="head_node_type"):
        prepare_and_validate(bad)


def test_no_default_commands_leak_in(raw, prepared):
    """prepare_config merges defaults.yaml *shallowly*: a command list left out of cluster.yaml
    would be taken from Ray's defaults, which install a nightly Ray wheel and bind the dashboard to
    0.0.0.0. So every command list must be set explicitly."""
    missing = [k for k in COMMAND_KEYS if k not in raw]
    assert not missing, f"set {missing} explicitly in cluster.yaml (even as [])"
    joined = "\n".join(all_commands(prepared))
    assert "ray-wheels" not in joined and "ray-3.0.0.dev0" not in joined


# --------------------------------------------------------------------------------------------
# cluster.yaml: hardware, install, network exposure, secrets
# --------------------------------------------------------------------------------------------


def test_head_node_has_no_gpu(prepared):
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"].get("GPU") == 0, "declare GPU: 0 on the head so no GPU worker lands there"
    cpus, gpus = INSTANCE_SHAPES[head["node_config"]["InstanceType"]]
    assert gpus == 0 and head["resources"].get("CPU", 0) <= cpus


def test_worker_node_types_request_gpus(prepared):
    workers = {n: t for n, t in prepared["available_node_types"].items() if n != prepared["head_node_type"]}
    assert workers, "no worker node types"
    for name, node in workers.items():
        itype = node["node_config"]["InstanceType"]
        assert itype in INSTANCE_SHAPES, f"{name}: add {itype} to INSTANCE_SHAPES"
        cpus, gpus = INSTANCE_SHAPES[itype]
        assert node["resources"].get("GPU", 0) >= 1, f"{name} requests no GPU"
        assert (node["resources"].get("CPU"), node["resources"]["GPU"]) == (cpus, gpus), (
            f"{name}: resources {node['resources']} do not match {itype} ({cpus} vCPU, {gpus} GPU)"
        )
        assert 0 <= node["min_workers"] <= node["max_workers"]
        # Train workers write checkpoints to S3 themselves: they need an instance profile
        assert "IamInstanceProfile" in node["node_config"], f"{name}: workers need S3 access (instance profile)"
    assert sum(n["min_workers"] for n in workers.values()) <= prepared["max_workers"]


def test_setup_installs_from_the_lock_file(prepared):
    for key in ("head_setup_commands", "worker_setup_commands"):  # setup_commands merged into both
        cmds = prepared[key]
        sync = [i for i, c in enumerate(cmds) if re.search(r"\buv sync\b.*--locked", c)]
        assert sync, f"{key}: no `uv sync --locked`"
        assert any("uv==0.13.9" in c for c in cmds[: sync[0]]), f"{key}: install pinned uv before syncing"
        extra = [i for i, c in enumerate(cmds) if "uv pip install" in c]
        assert all(i > sync[0] for i in extra), f"{key}: extra installs must come after the locked sync"
    assert any("/home/ubuntu/brcd" in remote for remote in prepared["file_mounts"])


def test_file_mounts_carry_what_uv_sync_needs(raw):
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*").rstrip(".") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    mounts = {remote: (ROOT / local).resolve() for remote, local in raw["file_mounts"].items() if remote != TOKEN_MOUNT}
    for remote, local in mounts.items():
        assert remote.startswith("/home/ubuntu/brcd/"), remote
        assert local.exists(), f"file_mounts source {local} is missing: `ray up` would stop"
        assert local != ROOT, "don't mount the whole project folder (it holds .venv, data, runs)"
    needed = {ROOT / "pyproject.toml", ROOT / "uv.lock", *(ROOT / p for p in packages)}
    assert needed <= set(mounts.values()), f"not mounted: {sorted(map(str, needed - set(mounts.values())))}"


TOKEN_MOUNT = "/home/ubuntu/.ray/auth_token"  # Ray's default token path on the nodes (ssh_user ubuntu)


def test_every_node_runs_ray_with_token_authentication(raw, prepared):
    """Ray 2.61 turns token authentication on for every cluster: the head, each worker and every
    job driver must run with RAY_AUTH_MODE=token and one token, copied from the user's machine."""
    assert raw["file_mounts"].get(TOKEN_MOUNT) == "~/.ray/auth_token", "mount the local token on every node"
    starts = [c for c in prepared["head_start_ray_commands"] + prepared["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c.split("ray start")[0] for c in starts), starts
    setup = "\n".join(prepared["head_setup_commands"] + prepared["worker_setup_commands"])
    assert "export RAY_AUTH_MODE=token' >> ~/.bashrc" in setup  # job drivers and `ray status` on the nodes
    assert "chmod 600 ~/.ray/auth_token" in setup
    assert "ray get-auth-token --generate" in CLUSTER_YAML.read_text() and "ray get-auth-token --generate" in CLUSTER_MD.read_text()


def test_ray_is_started_from_the_locked_venv(prepared):
    starts = [c for c in prepared["head_start_ray_commands"] + prepared["worker_start_ray_commands"]
              if "ray start" in c]
    assert len(starts) == 2
    for cmd in starts:
        assert ".venv/bin/ray start" in cmd, f"use the venv's ray (the locked version): {cmd}"


def test_dashboard_bound_to_localhost(prepared):
    head_start = [c for c in prepared["head_start_ray_commands"] if "ray start --head" in c]
    assert len(head_start) == 1
    assert "--dashboard-host=127.0.0.1" in head_start[0]
    assert "0.0.0.0" not in "\n".join(all_commands(prepared))


def test_mlflow_server_bound_to_localhost(prepared):
    cmds = [c for c in prepared["head_start_ray_commands"] + prepared["head_setup_commands"]
            if "mlflow server" in c]
    assert len(cmds) == 1, "start exactly one MLflow server, on the head"
    args = shlex.split(cmds[0].split("mlflow server", 1)[1].split(">", 1)[0])
    opts = dict(zip(args[::2], args[1::2]))
    assert opts.get("--host") == "127.0.0.1"
    assert re.match(r"(sqlite:////|postgresql(\+\w+)?://)", opts.get("--backend-store-uri", "")), opts
    assert opts.get("--artifacts-destination", opts.get("--default-artifact-root", "")).startswith("s3://")
    assert not any("mlflow server" in c for c in prepared["worker_start_ray_commands"])


@pytest.mark.parametrize("path", [CLUSTER_YAML, RAYJOB_YAML, CLUSTER_MD], ids=lambda p: p.name)
def test_no_obvious_secrets(path):
    text = path.read_text()
    for what, pattern in SECRET_PATTERNS.items():
        hit = re.search(pattern, text, flags=re.IGNORECASE)
        assert hit is None, f"{path.name}: {what} found: {hit.group(0)!r}"


def test_no_ssh_key_or_credentials_in_auth(raw):
    assert set(raw.get("auth", {})) <= {"ssh_user"}, "let Ray manage the key pair; keep key paths out of the repo"


# --------------------------------------------------------------------------------------------
# deploy/kuberay-rayjob.yaml
# --------------------------------------------------------------------------------------------


def _pod_containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def test_rayjob_structure(rayjob):
    import ray

    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", "don't expose the head"
    images = {c["image"] for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]] for c in _pod_containers(g)}
    assert len(images) == 1, f"head and workers must run the same image, got {images}"
    assert f"ray{ray.__version__}" in images.pop(), "tag the image with its Ray version"


def test_rayjob_gpus_on_workers_only(rayjob):
    cluster = rayjob["spec"]["rayClusterSpec"]
    for c in _pod_containers(cluster["headGroupSpec"]):
        assert "nvidia.com/gpu" not in c.get("resources", {}).get("limits", {})
    assert cluster["workerGroupSpecs"]
    for group in cluster["workerGroupSpecs"]:
        for c in _pod_containers(group):
            assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1, group["groupName"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_rayjob_passes_one_token_to_every_ray_container(rayjob):
    """Head, workers and the submitter (`ray job submit` needs it too) read RAY_AUTH_TOKEN from one
    Kubernetes Secret, never from a literal in the file."""
    spec = rayjob["spec"]
    cluster = spec["rayClusterSpec"]
    groups = {"head": cluster["headGroupSpec"], **{g["groupName"]: g for g in cluster["workerGroupSpecs"]},
              "submitter": {"template": spec["submitterPodTemplate"]}}
    refs = set()
    for name, group in groups.items():
        for c in _pod_containers(group):
            env = {e["name"]: e for e in c.get("env", [])}
            assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{name}: set RAY_AUTH_MODE=token"
            ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
            assert ref and "value" not in env["RAY_AUTH_TOKEN"], f"{name}: RAY_AUTH_TOKEN must come from a Secret"
            refs.add((ref["name"], ref["key"]))
    assert len(refs) == 1, f"every container must read the same token, got {refs}"
    assert "kubectl create secret generic {} --from-literal={}=".format(*refs.pop()) in RAYJOB_YAML.read_text()


def test_rayjob_installs_nothing_at_runtime(rayjob):
    runtime_env = yaml.safe_load(rayjob["spec"].get("runtimeEnvYAML") or "{}") or {}
    assert not {"pip", "uv", "conda", "working_dir"} & set(runtime_env), "dependencies come from the image (uv.lock)"


# --------------------------------------------------------------------------------------------
# brcd command lines in the RayJob and in docs/CLUSTER.md parse and load
# --------------------------------------------------------------------------------------------


def _check_brcd_command(argv: list[str]):
    from brcd.config import load_config
    from pipelines.cli import build_parser

    assert argv[0] == "brcd", argv
    args = build_parser().parse_args(argv[1:])
    cfg = load_config(args.config, args.overrides, check_files=False)
    return args, cfg


def test_rayjob_entrypoint_runs_brcd(rayjob):
    stages = [shlex.split(part) for part in rayjob["spec"]["entrypoint"].split("&&")]
    assert [s[1] for s in stages] == ["teacher", "clusters", "distill", "evaluate"]
    outputs = set()
    for argv in stages:
        args, cfg = _check_brcd_command(argv)
        assert args.address == "auto"
        assert cfg.resources.use_gpu
        assert (cfg.resources.storage_path or "").startswith("s3://"), "multi-node checkpoints need shared storage"
        assert Path(cfg.data.root).is_absolute(), "Train workers chdir: data.root must be absolute"
        outputs.add(args.output)
    assert len(outputs) == 1, "all stages must share one --output (each reads the previous one's results)"


def _doc_brcd_commands() -> list[list[str]]:
    """`brcd ...` invocations in the shell blocks of docs/CLUSTER.md (after `--` for ray job submit)."""
    text = CLUSTER_MD.read_text() if CLUSTER_MD.exists() else ""
    commands = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if submitted := re.search(r"\s--\s+(brcd\s.*)", line):
                commands.append(shlex.split(submitted.group(1)))
            elif line.startswith("brcd "):
                commands.append(shlex.split(line))
    return commands


def test_doc_shows_brcd_commands():
    assert len(_doc_brcd_commands()) >= 3, "docs/CLUSTER.md should show how to run brcd on the cluster"


@pytest.mark.parametrize("argv", _doc_brcd_commands(), ids=lambda a: " ".join(a[:2]))
def test_doc_command_parses(argv):
    import argparse

    from pipelines.cli import build_parser

    subcommands = next(a.choices for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    # A documented command the CLI lacks is a broken doc (or a lost command): fail, never skip.
    assert argv[1] in subcommands, (
        f"docs/CLUSTER.md documents `brcd {argv[1]}`, which the CLI lacks (it has {sorted(subcommands)})")
    args, cfg = _check_brcd_command(argv)
    if args.address == "auto" and cfg.resources.num_workers and cfg.resources.use_gpu:
        # a GPU run on the cluster: checkpoints must go to shared storage
        assert (cfg.resources.storage_path or "").startswith("s3://"), " ".join(argv)
        assert Path(cfg.data.root).is_absolute(), " ".join(argv)
