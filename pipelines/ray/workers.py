"""Per-worker training functions run by Ray Train (one process per worker, DDP over gloo/NCCL); checkpoints
go to Ray's storage (local folder, NFS or S3) via ``ray.train.report``."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import ray.train
import ray.train.torch
import torch

from brcd import builders
from brcd.config import Config, ModelConfig
from brcd.engine import encode_dataset, fit, make_train_loader
from brcd.io import ArtifactError, load_json
from brcd.layout import TEACHER_WEIGHTS
from pipelines.ray.bank_job import bank_dataset, build_seeded, local_device, open_bank
from pipelines.ray.cluster import materialise, ray_report, restore_checkpoint_dir
from pipelines.ray.payload import WorkerPayload


def _setup(payload: WorkerPayload) -> tuple[Config, Any, torch.device, Path]:
    quiet_train_reports()
    cfg, bundle, workdir = payload.setup()
    return cfg, bundle, ray.train.torch.get_device(), workdir


def _train_data(payload: WorkerPayload, bundle: Any, cfg: Config):
    """The training dataset and the view bank (``None``: live views), as the driver planned them."""
    if payload.bank is None:
        return bundle.train_dataset(), None
    return bank_dataset(payload.bank, bundle, cfg), open_bank(payload.bank)


def progress(line: str) -> None:
    # Not print(): in a Ray Train V2 worker print goes to stdout AND the root logger's console handler,
    # so every progress line reached the driver twice.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def quiet_train_reports() -> None:
    """Silence Train V2's per-rank INFO "Reporting training result N: ..." (a logger named by its file
    path, which ``LoggingConfig`` does not reach); our progress line says it."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: keep its logs
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def fault_injector() -> Callable[[int, int], None] | None:
    """Test hook: ``BRCD_FAULT_KILL="epoch:step:rank:marker_file"`` kills that worker process once
    (the marker file records that it happened), to exercise worker restarts from checkpoints."""
    spec = os.environ.get("BRCD_FAULT_KILL")
    if not spec:
        return None
    epoch, step, rank, marker = spec.split(":", 3)

    def hook(e: int, s: int) -> None:
        if (e, s) == (int(epoch), int(step)) and ray.train.get_context().get_world_rank() == int(rank):
            if not os.path.exists(marker):
                Path(marker).write_text(f"killed at epoch {e} step {s}\n")
                os._exit(1)

    return hook


def _sync_batchnorm(model: torch.nn.Module, cfg: Config) -> torch.nn.Module:
    """SyncBatchNorm under multi-GPU DDP (N workers x B = 1 worker x N*B); PyTorch has none on CPU."""
    if cfg.resources.use_gpu and ray.train.get_context().get_world_size() > 1:
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def _fit(task: Any, dataset: Any, o: Any, cfg: Config, workdir: Path, *, report: Callable,
         resume_from: Path | None) -> dict[str, Any]:
    loader = make_train_loader(dataset, o.batch_size, seed=cfg.seed, num_workers=cfg.data.loader_workers)
    loop = fit(task, loader, epochs=o.epochs, validate_every=o.validate_every, patience=o.patience,
               checkpoint_root=workdir / "ckpt", resume_from=resume_from, report=report,
               max_steps_per_epoch=o.max_steps_per_epoch, progress=progress, on_step=fault_injector(),
               log_every=o.log_every)
    return loop.to_json()


def gated_report(report: Callable, *, file: str, rungs: list[float], metric: str, timeout_s: float = 120.0) -> Callable:
    """``report`` that, after a result with ``metric`` at or past one of ASHA's ``rungs``, waits until Tune lets
    the trial continue (``file`` holds the epoch; pipelines.tune.callbacks.ContinueMarker), so a stopped trial does
    not train on while the stop travels."""
    pending = sorted(rungs)

    def wrapped(metrics: dict[str, Any], ckpt_dir: Path | None) -> None:
        report(metrics, ckpt_dir)
        epoch = int(metrics["epoch"])
        if not pending or epoch < pending[0] or metric not in metrics:
            return
        while pending and epoch >= pending[0]:
            pending.pop(0)
        deadline = time.monotonic() + timeout_s
        while _continued_epoch(file) < epoch:  # a stopped trial is killed while it waits here
            if time.monotonic() > deadline:
                progress(f"[tune] no decision from Tune on epoch {epoch} after {timeout_s:.0f} s; training on")
                return
            time.sleep(0.1)

    return wrapped


def _continued_epoch(file: str) -> int:
    try:
        return int(load_json(file)["epoch"])
    except (ArtifactError, OSError, ValueError, KeyError, TypeError):  # not written yet, or mid-replace
        return -1


def teacher_worker(payload: WorkerPayload) -> dict[str, Any]:
    cfg, bundle, device, workdir = _setup(payload)
    model = ray.train.torch.prepare_model(_sync_batchnorm(build_seeded(cfg.teacher.model, cfg.seed), cfg))
    dataset, bank = _train_data(payload, bundle, cfg)
    task = builders.teacher_task(cfg, model, bundle, device, bank=bank, eval_features=payload.eval_features)
    return _fit(task, dataset, cfg.teacher.optim, cfg, workdir, report=ray_report, resume_from=restore_checkpoint_dir())


def distill_worker(payload: WorkerPayload) -> dict[str, Any]:
    cfg, bundle, device, workdir = _setup(payload)
    report = ray_report if payload.rung_gate is None else gated_report(ray_report, **payload.rung_gate)
    return _distill(payload, cfg, bundle, device, workdir, prepare=ray.train.torch.prepare_model, report=report,
                    resume_from=restore_checkpoint_dir())


def distill_in_process(payload: WorkerPayload, *, report: Callable, resume_from: Path | None) -> dict[str, Any]:
    """Distillation in this process, without a Train worker group: what a Tune trial whose networks
    are all frozen runs (its heads train on the view bank, so DDP would only add start-up)."""
    cfg, bundle, workdir = payload.setup()
    device = local_device(cfg)
    return _distill(payload, cfg, bundle, device, workdir, prepare=lambda m: m.to(device), report=report,
                    resume_from=resume_from)


def _distill(payload: WorkerPayload, cfg: Config, bundle: Any, device: torch.device, workdir: Path, *,
             prepare: Callable, report: Callable, resume_from: Path | None) -> dict[str, Any]:
    teacher_weights = materialise(payload.teacher_weights, workdir / TEACHER_WEIGHTS)
    teacher = build_seeded(cfg.teacher.model, cfg.seed, teacher_weights).to(device).eval()
    student = prepare(build_seeded(cfg.student.model, cfg.seed + 1))
    dataset, bank = _train_data(payload, bundle, cfg)
    task = builders.distill_task(cfg, student, teacher, bundle, teacher_db_codes=payload.teacher_db_codes,
                                 clusters=payload.clusters, device=device, bank=bank,
                                 eval_features=payload.eval_features)
    return _fit(task, dataset, cfg.distill.optim, cfg, workdir, report=report, resume_from=resume_from)


def encode_worker(payload: WorkerPayload) -> dict[str, dict[str, Any]] | None:
    """Encode dataset parts with several models, sharded over workers; rank 0 returns the codes (a
    spec with ``features: true``: the backbone's features)."""
    cfg, bundle, device, workdir = _setup(payload)
    out: dict[str, dict[str, Any]] = {}
    for name, spec in (payload.models or {}).items():
        weights = materialise(spec["weights"], workdir / f"{name}.safetensors")
        model = build_seeded(ModelConfig(**spec["model"]), cfg.seed, weights).to(device).eval()
        out[name] = {part: encode_dataset(model, bundle.eval_dataset(part), device=device,
                                          features=bool(spec.get("features")))
                     for part in spec["parts"]}
    return out if ray.train.get_context().get_world_rank() == 0 else None
