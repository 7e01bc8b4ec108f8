"""Ray plumbing: connect/start a cluster, build Train configs, run a TorchTrainer, report checkpoints.

Everything Ray-specific that the stages share lives here, so the stages read as "what", not "how".
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")  # workers use this venv; no `uv run` per worker
os.environ.setdefault("RAY_DEDUP_LOGS", "1")

import ray
import ray.train
import ray.train.torch

from brcd.config import Config, ResourcesConfig
from brcd.layout import RunLayout

log = logging.getLogger("brcd")


class StageError(RuntimeError):
    """A pipeline stage failed; the message is one line with the cause and the fix."""


def init_ray(address: str | None, output: Path, *, num_cpus: int | None = None, quiet: bool = True) -> None:
    """Connect to ``address`` (``auto`` or ``host:port``; else ``$RAY_ADDRESS``, as under ``ray job submit``)
    or start a new local Ray (dashboard on 127.0.0.1).

    Without an address a *new* local Ray is started even when another one runs on the machine: a bare
    ``ray.init()`` would silently join any ``gcs_server`` it finds (another user's job, or one still
    shutting down). A SIGTERM handler the caller installed (the CLI's: stop like Ctrl-C, resumable) is
    kept: a local ``ray.init`` replaces it with Ray's own, which exits the driver without the resume hint.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"log_to_driver": True, "configure_logging": True,
                              "logging_level": logging.WARNING if quiet else logging.INFO}
    main_thread = threading.current_thread() is threading.main_thread()
    sigterm = signal.getsignal(signal.SIGTERM) if main_thread else None
    try:
        if address:
            ray.init(address=address, **kwargs)
            return
        # Keep Ray's session files under the output folder when the path is short enough: Ray puts
        # unix sockets at <temp>/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store (64 more
        # bytes) and AF_UNIX paths are limited to 107 bytes.
        tmp = RunLayout(output.resolve()).ray_temp
        if len(str(tmp).encode()) <= 107 - len("/session_2026-11-23_03-07-17_562775_4194304/sockets/plasma_store"):
            tmp.mkdir(parents=True, exist_ok=True)
            kwargs["_temp_dir"] = str(tmp)
        # The dashboard (bound to localhost) serves the State API that Ray Train's placement-group cleaner uses.
        for attempt in range(3):  # Ray's 30 s start-up limit is hard-coded; a loaded machine can miss it
            try:
                ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                         **kwargs)
                break
            except Exception as exc:
                if attempt == 2 or "timed out during startup" not in str(exc):
                    raise
                ray.shutdown()
                time.sleep(5)
    except Exception as exc:  # ray.init raises bare Exceptions (startup timeouts, unreachable address)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise StageError(
            f"could not start {where}: {first}; check --address (or that `ray start --head` runs), "
            "or retry when the machine is less loaded"
        ) from None
    finally:
        if callable(sigterm) and signal.getsignal(signal.SIGTERM) is not sigterm:
            signal.signal(signal.SIGTERM, sigterm)


def scaling_config(res: ResourcesConfig) -> ray.train.ScalingConfig:
    per_worker: dict[str, float] = {"CPU": res.cpus_per_worker}
    if res.use_gpu:
        per_worker["GPU"] = res.gpus_per_worker or 1.0
    return ray.train.ScalingConfig(
        num_workers=res.num_workers, use_gpu=res.use_gpu, resources_per_worker=per_worker,
        placement_strategy=res.placement_strategy,
    )


def storage_path(cfg: Config, output: Path) -> str:
    return cfg.resources.storage_path or str(RunLayout(output).ray_storage.resolve())


def run_trainer(
    train_fn: Callable[[dict], Any],
    loop_config: dict[str, Any],
    cfg: Config,
    output: Path,
    name: str,
    *,
    num_workers: int | None = None,
    callbacks: list | None = None,
    checkpoints: bool = True,
) -> ray.train.Result:
    """Run ``train_fn`` on ``cfg.resources.num_workers`` DDP workers (0 = in this process).

    ``name`` must be deterministic: re-running the same command resumes the run of that name from
    its latest checkpoint (Ray Train V2 job-level restore)."""
    res = cfg.resources
    if num_workers is not None:
        from dataclasses import replace

        res = replace(res, num_workers=num_workers)
    backend = "nccl" if res.use_gpu else "gloo"
    trainer = ray.train.torch.TorchTrainer(
        train_fn,
        train_loop_config=loop_config,
        torch_config=ray.train.torch.TorchConfig(backend=backend),
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
    # TorchTrainer.fit installs Ray Train's SIGINT handler and leaves it installed; restore ours so a
    # later Ctrl-C (k-means, evaluation, the next stage) still reaches the CLI.
    previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    try:
        return trainer.fit()
    except SystemExit as exc:
        # Ray Train's own SIGINT handler aborts the run and calls sys.exit(0): report it as the
        # interruption it is, so the CLI prints the resume hint and exits 130.
        raise KeyboardInterrupt(f"{name} interrupted") from exc
    except Exception as exc:  # ControllerError / WorkerGroupError wrap the worker's exception
        cause = _root_cause(exc)
        raise StageError(f"{name} failed: {cause}") from exc
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _root_cause(exc: BaseException) -> str:
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
    text = str(seen).strip().splitlines()
    last = [t for t in text if t.strip()]
    return f"{type(seen).__name__}: {last[-1] if last else ''}"


# --------------------------------------------------------------------------------------------
# Worker-side helpers
# --------------------------------------------------------------------------------------------


def worker_device():
    return ray.train.torch.get_device()


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
