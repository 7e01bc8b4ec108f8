"""Per-worker training functions run by Ray Train (one process per worker, DDP over gloo/NCCL).

Workers need no shared disk: the split, the teacher weights and the cluster arrays arrive in the
``train_loop_config`` (small arrays inline, weights through the object store). Checkpoints go to
Ray's storage (local folder, NFS or S3) via ``ray.train.report``.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import ray.train
import ray.train.torch
import torch

from brcd import builders
from brcd.layout import TEACHER_WEIGHTS
from brcd.config import Config, ModelConfig, config_from_dict
from brcd.engine import encode_dataset, fit, make_train_loader
from pipelines.ray.cluster import materialise, ray_report, restore_checkpoint_dir, worker_device


def _scratch(preferred: str | None) -> Path:
    """A private scratch folder, under the run's output folder when this node can write there
    (a single machine, NFS) and in the system temp folder otherwise (a node without the output
    disk). Removed when the worker process exits."""
    base = None
    if preferred:
        try:
            Path(preferred).mkdir(parents=True, exist_ok=True)
            base = preferred
        except OSError:
            base = None
    path = Path(tempfile.mkdtemp(prefix="worker-", dir=base))
    atexit.register(shutil.rmtree, path, True)
    return path


def _setup(config: dict[str, Any]) -> tuple[Config, Any, torch.device, Path]:
    quiet_train_reports()
    cfg, bundle, workdir = setup_data(config)
    return cfg, bundle, worker_device(), workdir


def setup_data(config: dict[str, Any]) -> tuple[Config, Any, Path]:
    """The config, the data bundle over the driver's split and a scratch folder, in any Ray process
    (a Train worker, a Ray Data actor building the view bank)."""
    cfg = config_from_dict(config["cfg"], check_files=False)
    torch.set_num_threads(max(1, int(cfg.resources.cpus_per_worker)))
    workdir = _scratch(config.get("scratch"))
    split_dir = workdir / "split"
    split_dir.mkdir()
    for name, data in config["split_files"].items():
        (split_dir / name).write_bytes(data)
    quiet = logging.getLogger("brcd.data")  # the split is the driver's, which already said where it is
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        bundle = builders.data_bundle(cfg, split_dir)
    finally:
        quiet.setLevel(level)
    if bundle.split.fingerprint != config["split_fingerprint"]:
        raise RuntimeError("the worker's split differs from the driver's; the data folder changed under the run")
    return cfg, bundle, workdir


def _train_data(config: dict[str, Any], bundle: Any, cfg: Config):
    """The training dataset and the view bank (``None``: live views), as the driver planned them."""
    handle = config.get("bank")
    if handle is None:
        return bundle.train_dataset(), None
    from pipelines.ray.bank_job import bank_dataset, open_bank

    return bank_dataset(handle, bundle, cfg), open_bank(handle)


def _model(model_cfg: ModelConfig, seed: int, weights: Path | None = None) -> torch.nn.Module:
    torch.manual_seed(seed)  # identical random init on every worker and on every restart
    return builders.build_model(model_cfg, weights)


def progress(line: str) -> None:
    # Not print(): in a Ray Train V2 worker print is patched to go to stdout AND the root logger's
    # console handler, so every progress line reached the driver twice.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def quiet_train_reports() -> None:
    """Ray Train V2 logs "Reporting training result N: TrainingReport(<every metric>)" at INFO from
    every rank, through a logger named by its file path (so ``LoggingConfig(log_level=...)``, which
    filters ``ray.train.*`` names, does not reach it). Our one-line progress already says it."""
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
    """A trainable BatchNorm backbone under DDP on GPUs uses global-batch statistics (SyncBatchNorm),
    so N workers x B equals 1 worker x N*B. PyTorch has no CPU SyncBatchNorm: CPU workers keep
    per-worker statistics (LayerNorm models such as ViTs are exact either way)."""
    if cfg.resources.use_gpu and ray.train.get_context().get_world_size() > 1:
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def teacher_worker(config: dict[str, Any]) -> dict[str, Any]:
    cfg, bundle, device, workdir = _setup(config)
    model = ray.train.torch.prepare_model(_sync_batchnorm(_model(cfg.teacher.model, cfg.seed), cfg))
    dataset, bank = _train_data(config, bundle, cfg)
    task = builders.teacher_task(cfg, model, bundle, device, bank=bank, eval_features=config.get("eval_features"))
    o = cfg.teacher.optim
    loader = make_train_loader(dataset, o.batch_size, seed=cfg.seed, num_workers=cfg.data.loader_workers)
    loop = fit(task, loader, epochs=o.epochs, validate_every=o.validate_every, patience=o.patience,
               checkpoint_root=workdir / "ckpt", resume_from=restore_checkpoint_dir(), report=ray_report,
               max_steps_per_epoch=o.max_steps_per_epoch, progress=progress, on_step=fault_injector(),
               log_every=o.log_every)
    return loop.to_json()


def distill_worker(config: dict[str, Any]) -> dict[str, Any]:
    cfg, bundle, device, workdir = _setup(config)
    return _distill(config, cfg, bundle, device, workdir, prepare=ray.train.torch.prepare_model,
                    report=config.get("report") or ray_report, resume_from=restore_checkpoint_dir())


def distill_in_process(config: dict[str, Any], *, report: Callable, resume_from: Path | None) -> dict[str, Any]:
    """Distillation in this process, without a Train worker group: what a Tune trial whose networks
    are all frozen runs (its heads train on the view bank, so DDP would only add start-up)."""
    cfg, bundle, workdir = setup_data(config)
    device = torch.device("cuda") if cfg.resources.use_gpu and torch.cuda.is_available() else torch.device("cpu")
    return _distill(config, cfg, bundle, device, workdir, prepare=lambda m: m.to(device), report=report,
                    resume_from=resume_from)


def _distill(config: dict[str, Any], cfg: Config, bundle: Any, device: torch.device, workdir: Path, *,
             prepare: Callable, report: Callable, resume_from: Path | None) -> dict[str, Any]:
    teacher_weights = materialise(config["teacher_weights"], workdir / TEACHER_WEIGHTS)
    teacher = _model(cfg.teacher.model, cfg.seed, teacher_weights).to(device).eval()
    student = prepare(_model(cfg.student.model, cfg.seed + 1))
    dataset, bank = _train_data(config, bundle, cfg)
    task = builders.distill_task(cfg, student, teacher, bundle, teacher_db_codes=config["teacher_db_codes"],
                                 clusters=config.get("clusters"), device=device, bank=bank,
                                 eval_features=config.get("eval_features"))
    o = cfg.distill.optim
    loader = make_train_loader(dataset, o.batch_size, seed=cfg.seed, num_workers=cfg.data.loader_workers)
    loop = fit(task, loader, epochs=o.epochs, validate_every=o.validate_every, patience=o.patience,
               checkpoint_root=workdir / "ckpt", resume_from=resume_from, report=report,
               max_steps_per_epoch=o.max_steps_per_epoch, progress=progress, on_step=fault_injector(),
               log_every=o.log_every)
    return loop.to_json()


def encode_worker(config: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
    """Encode dataset parts with several models, sharded over workers; rank 0 returns the codes (a
    spec with ``features: true``: the backbone's features)."""
    cfg, bundle, device, workdir = _setup(config)
    out: dict[str, dict[str, Any]] = {}
    for name, spec in config["models"].items():
        weights = materialise(spec["weights"], workdir / f"{name}.safetensors")
        model = _model(ModelConfig(**spec["model"]), cfg.seed, weights).to(device).eval()
        out[name] = {part: encode_dataset(model, bundle.eval_dataset(part), device=device,
                                          features=bool(spec.get("features")))
                     for part in spec["parts"]}
    return out if ray.train.get_context().get_world_rank() == 0 else None
