"""Ray plumbing the stages share: start or join a cluster, build Train configs, run a TorchTrainer, report."""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")  # workers use this venv; no `uv run` per worker
os.environ.setdefault("RAY_DEDUP_LOGS", "1")

import ray
import ray.train
import ray.train.torch

from brcd.config import Config, ResourcesConfig
from brcd.layout import RunLayout
from pipelines.ray.logs import cluster_runtime_env, filter_worker_output, quiet_ray_logs

if TYPE_CHECKING:  # annotations only: payload imports torch
    from pipelines.ray.payload import WorkerPayload

log = logging.getLogger("brcd")


class StageError(RuntimeError):
    """A pipeline stage failed; the message is one line with the cause and the fix."""


def say(msg: str) -> None:
    """A progress line of the driver (flushed: Ray's own output interleaves with it)."""
    print(msg, flush=True)


def init_ray(address: str | None, output: Path, *, num_cpus: int | None = None, quiet: bool = True) -> None:
    """Connect to ``address`` (``auto``, ``host:port`` or ``$RAY_ADDRESS``) or start a *new* local Ray; keeps
    the caller's SIGTERM handler (a local ``ray.init`` installs one that exits without the resume hint)."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"log_to_driver": True, "configure_logging": True,
                              "logging_level": logging.WARNING if quiet else logging.INFO}
    main_thread = threading.current_thread() is threading.main_thread()
    sigterm = signal.getsignal(signal.SIGTERM) if main_thread else None
    quiet_ray_logs(quiet)
    try:
        if address:
            if _token_refused(address):  # before ray.init, which logs a warning a second for 20 s, then fails
                raise ConnectionRefusedError("UNAUTHENTICATED")
            ray.init(address=address, runtime_env=cluster_runtime_env(address), **kwargs)
        else:
            _init_local(output, num_cpus, kwargs)
        if quiet:
            filter_worker_output()
        _start_autoscaling_coordinator(wait=False)
    except Exception as exc:  # ray.init raises bare Exceptions (startup timeouts, unreachable address)
        if address and _is_auth_failure(exc):
            mode = os.environ.get("RAY_AUTH_MODE") or "unset"
            raise StageError(
                f"the Ray cluster at {address} refused this client's authentication token (RAY_AUTH_MODE is {mode}); "
                "set RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN, or the file ~/.ray/auth_token or "
                "$RAY_AUTH_TOKEN_PATH; `ray get-auth-token` on the head prints it) and run again, see docs/CLUSTER.md"
            ) from None
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        where = f"connect to the Ray cluster at {address}" if address else "start a local Ray"
        raise StageError(
            f"could not {where}: {first}; check --address (or that `ray start --head` runs), "
            "or retry when the machine is less loaded"
        ) from None
    finally:
        if callable(sigterm) and signal.getsignal(signal.SIGTERM) is not sigterm:
            signal.signal(signal.SIGTERM, sigterm)


def _init_local(output: Path, num_cpus: int | None, kwargs: dict[str, Any]) -> None:
    # Keep Ray's session files under the output folder when the path is short enough: Ray puts
    # unix sockets at <temp>/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store (64 more
    # bytes) and AF_UNIX paths are limited to 107 bytes.
    tmp = RunLayout(output.resolve()).ray_temp
    if len(str(tmp).encode()) <= 107 - len("/session_2026-11-23_03-07-17_562775_4194304/sockets/plasma_store"):
        tmp.mkdir(parents=True, exist_ok=True)
        kwargs["_temp_dir"] = str(tmp)
    # A local Ray has no preemptible nodes, and Ray Train's preemption watcher actor makes Ray's
    # core worker log an error-level line ("constructor arguments in the object store") per run.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # The dashboard (bound to localhost) serves the State API that Ray Train's placement-group cleaner uses.
    for attempt in range(3):  # Ray's 30 s start-up limit is hard-coded; a loaded machine can miss it
        try:
            with pinned_state_api() as port:
                ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                         dashboard_port=port, **kwargs)
            break
        except Exception as exc:
            if attempt == 2 or "timed out during startup" not in str(exc):
                raise
            ray.shutdown()
            time.sleep(5)


@contextlib.contextmanager
def ray_session(output: Path, *, num_cpus: int | None = None):
    """``init_ray(None, output)`` for the block; a Ray it started is shut down at its end (a caller deleting
    ``output``, where Ray keeps its sockets, would leave a Ray the next ``init_ray`` joins but cannot use)."""
    started = not ray.is_initialized()
    init_ray(None, output, num_cpus=num_cpus)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


@contextlib.contextmanager
def pinned_state_api():
    """A free port for a new local Ray's dashboard, with ``RAY_API_SERVER_ADDRESS`` pointing at it while
    ``ray.init`` starts the cluster (else State API clients next to a second Ray query the newest one)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    before = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    try:
        yield port
    finally:  # only this key: ray.init may set others
        os.environ.pop("RAY_API_SERVER_ADDRESS")
        if before is not None:
            os.environ["RAY_API_SERVER_ADDRESS"] = before


def _token_refused(address: str) -> bool:
    """True only when the cluster's GCS answers UNAUTHENTICATED to this client's token (anything else: ray.init)."""
    if address.startswith("ray://"):
        return False
    import grpc  # a dependency of Ray

    try:
        from ray._private import services
        from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
        from ray._private.authentication.grpc_authentication_client_interceptor import (
            _get_authentication_metadata_tuple,
        )
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

        if address == "auto":  # what ray.init does for "auto": use ~/.ray/auth_token if there is one
            maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
        gcs = services.canonicalize_bootstrap_address(address)
        if not gcs:
            return False
        with grpc.insecure_channel(gcs) as channel:
            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(), timeout=10, metadata=_get_authentication_metadata_tuple())
    except grpc.RpcError as exc:
        return exc.code() == grpc.StatusCode.UNAUTHENTICATED
    except Exception:
        return False
    return False


def _is_auth_failure(exc: BaseException) -> bool:
    """Ray's token authentication refused us, in ``exc`` or any exception it wraps."""
    from ray.exceptions import AuthenticationError

    seen: BaseException | None = exc
    while seen is not None:
        text = str(seen)
        if isinstance(seen, AuthenticationError) or any(
                needle in text for needle in ("InvalidAuthToken", "UNAUTHENTICATED", "authentication token")):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def scaling_config(res: ResourcesConfig) -> ray.train.ScalingConfig:
    per_worker: dict[str, float] = {"CPU": res.cpus_per_worker}
    if res.use_gpu:
        per_worker["GPU"] = res.gpus_per_worker or 1.0
    return ray.train.ScalingConfig(
        num_workers=res.num_workers, use_gpu=res.use_gpu, resources_per_worker=per_worker,
        placement_strategy=res.placement_strategy,
    )


def _describe(resources: dict[str, float], *, zeros: bool = False) -> str:
    return " + ".join(f"{v:g} {k}" for k, v in resources.items() if v or zeros) or "nothing"


def node_capacity(node: dict[str, float], bundle: dict[str, float]) -> int:
    """How many copies of ``bundle`` one node holds (Ray counts resources in steps of 1e-4)."""
    return min((int(node.get(k, 0.0) / v + 1e-6) for k, v in bundle.items() if v > 0), default=0)


def _autoscaling_node_types() -> list[dict[str, float]] | None:
    """The node types an autoscaler can still add, or None on a fixed-size cluster (or if unknown)."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # Ray internals moved: treat the cluster as fixed (the check then uses live nodes)
        return None
    groups = [g for g in getattr(config, "node_group_configs", None) or []
              if g.resources and g.max_count != 0 and (g.max_count == -1 or g.max_count > g.min_count)]
    return [dict(g.resources) for g in groups] or None


def placement_problem(res: ResourcesConfig, what: str, *, driver: dict[str, float] | None = None) -> str | None:
    """Why ``res.num_workers`` Train workers (plus a Tune trial's ``driver`` bundle) can never be placed, in
    one line with the fix; None if they can (Ray would retry for ever). An autoscaling cluster only needs
    a node type that holds a worker."""
    if res.num_workers < 1:
        return None
    bundle, n, strategy = scaling_config(res).resources_per_worker or {}, res.num_workers, res.placement_strategy
    nodes = [{k: float(v) for k, v in node["Resources"].items()} for node in ray.nodes() if node.get("Alive")]
    keys = sorted(set(bundle) | set(driver or {}))
    have = {k: sum(node.get(k, 0.0) for node in nodes) for k in keys}
    asked = f"{n} Train worker(s) x {_describe(bundle)} ({strategy})"
    if driver:
        asked += f" + {_describe(driver)} for the trial's own process"
    fix = ("lower resources.num_workers (--workers N) or resources.cpus_per_worker"
           + (" (or search.resources.driver_cpus)" if driver else "") + ", or add nodes")
    node_types = _autoscaling_node_types()
    if node_types is not None:
        if any(node_capacity(node, bundle) for node in [*node_types, *nodes]):
            return None
        return (f"{what} asks for {asked}, but no node here or among the autoscaler's node types holds one worker "
                f"({'; '.join(_describe({k: t.get(k, 0.0) for k in keys}, zeros=True) for t in node_types)}); {fix}")
    hosts = range(len(nodes)) if driver else [None]
    best = 0
    for h in hosts:  # the trial's own process may run on any node; take the best placement
        if h is not None and not node_capacity(nodes[h], driver):
            continue
        free = [{k: v - (driver.get(k, 0.0) if i == h else 0.0) for k, v in node.items()} for i, node in enumerate(nodes)]
        per_node = [node_capacity(node, bundle) for node in free]
        best = max(best, {"STRICT_PACK": max(per_node, default=0),
                          "STRICT_SPREAD": sum(1 for c in per_node if c >= 1)}.get(strategy, sum(per_node)))
    if best >= n:
        return None
    where = f"{len(nodes)} node(s)" + (
        f" ({'; '.join(_describe({k: nd.get(k, 0.0) for k in keys}, zeros=True) for nd in nodes)})" if len(nodes) > 1 else "")
    return f"{what} asks for {asked}, but the cluster has {_describe(have, zeros=True)} on {where}; {fix}"


def check_placement(res: ResourcesConfig, what: str, *, driver: dict[str, float] | None = None) -> None:
    problem = placement_problem(res, what, driver=driver)
    if problem:
        raise StageError(problem)


def storage_path(cfg: Config, output: Path) -> str:
    return cfg.resources.storage_path or str(RunLayout(output).ray_storage.resolve())


def run_trainer(
    train_fn: Callable[[WorkerPayload], Any],
    loop_config: WorkerPayload,
    cfg: Config,
    output: Path,
    name: str,
    *,
    num_workers: int | None = None,
    callbacks: list | None = None,
    checkpoints: bool = True,
) -> ray.train.Result:
    """Run ``train_fn`` on ``cfg.resources.num_workers`` DDP workers (0 = in this process). A deterministic
    ``name``: re-running the same command resumes that run from its latest checkpoint."""
    res = cfg.resources if num_workers is None else dataclasses.replace(cfg.resources, num_workers=num_workers)
    trainer = ray.train.torch.TorchTrainer(
        train_fn,
        train_loop_config=loop_config,
        torch_config=ray.train.torch.TorchConfig(backend="nccl" if res.use_gpu else "gloo"),
        scaling_config=scaling_config(res),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path(cfg, output),
            failure_config=ray.train.FailureConfig(max_failures=res.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2) if checkpoints else None,
            callbacks=callbacks,
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    if res.num_workers > 0:  # local mode (0 workers) has no controller and no coordinator
        check_placement(res, name)
        _start_autoscaling_coordinator()
    # TorchTrainer.fit installs Ray Train's SIGINT handler and leaves it installed; restore ours so a
    # later Ctrl-C (k-means, evaluation, the next stage) still reaches the CLI.
    previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    try:
        return trainer.fit()
    except SystemExit as exc:  # Ray Train's SIGINT handler calls sys.exit(0): the CLI prints the resume hint
        raise KeyboardInterrupt(f"{name} interrupted") from exc
    except Exception as exc:  # ControllerError / WorkerGroupError wrap the worker's exception
        raise StageError(f"{name} failed: {root_cause(exc)}") from exc
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _start_autoscaling_coordinator(timeout_s: float = 120.0, *, wait: bool = True) -> None:
    """Start Ray's AutoscalingCoordinator actor and (``wait``) wait until it answers; best effort (Train V2
    allows it 5 s, too few on a loaded machine for a healthy first run)."""
    if not ray.is_initialized():  # never let the actor call start a Ray of its own
        return
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )

        coordinator = get_or_create_autoscaling_coordinator()
        if wait:
            ray.get(coordinator.cancel_request.remote(requester_id="brcd-warm-up"), timeout=timeout_s)
    except Exception as exc:  # pragma: no cover - depends on Ray internals and load
        log.debug("AutoscalingCoordinator warm-up failed: %s", exc)


def root_cause(exc: BaseException) -> str:
    seen = exc
    while True:
        nxt = getattr(seen, "worker_failures", None)
        if isinstance(nxt, dict) and nxt:
            seen = next(iter(nxt.values()))
            continue
        inner = seen.__cause__ or getattr(seen, "cause", None)
        if inner is None or inner is seen:
            break
        seen = inner
    last = [t for t in str(seen).splitlines() if t.strip()]
    return f"{type(seen).__name__}: {last[-1] if last else ''}"


# Worker-side helpers


def restore_checkpoint_dir() -> Path | None:
    """Copy the latest reported checkpoint (after a worker restart or a re-run) to a local folder."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    local = Path(tempfile.mkdtemp(prefix="brcd-resume-"))
    atexit.register(shutil.rmtree, local, True)
    with ckpt.as_directory() as d:
        shutil.copytree(d, local / Path(d).name)
    return local / Path(d).name


def ray_report(metrics: dict[str, Any], ckpt_dir: Path | None) -> None:
    """``ray.train.report`` with the rank-0 checkpoint folder (a barrier on every rank)."""
    clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
    name = f"epoch={int(metrics['epoch']):04d}"
    ckpt = ray.train.Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir is not None else None
    ray.train.report(clean, checkpoint=ckpt, checkpoint_dir_name=name)
    if ckpt_dir is not None:  # keep only the newest local folder (needed to carry best weights forward)
        for old in Path(ckpt_dir).parent.glob("epoch=*"):
            if old.name < Path(ckpt_dir).name:
                shutil.rmtree(old, ignore_errors=True)


def put_file(path: Path) -> ray.ObjectRef:
    """Ship a file's bytes to workers through the object store (no shared disk needed)."""
    return ray.put(Path(path).read_bytes())


def materialise(ref_or_bytes: Any, path: Path) -> Path:
    data = ray.get(ref_or_bytes) if isinstance(ref_or_bytes, ray.ObjectRef) else ref_or_bytes
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
