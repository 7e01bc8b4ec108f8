"""The view bank and the exact feature caches, driver side: decide (:func:`bank_decision`), build once with
Ray Data (:func:`ensure_bank`, :func:`feature_cache`; resumable, shared by every trial of a tuning job),
hand to workers (:func:`open_bank`, memory-mapped)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brcd import builders
from brcd.bank import BankSummary, BankViews, ViewBank, ViewRenderer, bank_outputs, bank_rows_per_shard, frozen_networks
from brcd.config import Config, ModelConfig
from brcd.data.transforms import augmentation, eval_transform
from brcd.io import array_fingerprint, stable_hash
from brcd.shards import open_sharded
from pipelines.ray.batch_inference import run_sharded_inference
from pipelines.ray.cluster import materialise, put_file, say
from pipelines.ray.payload import WorkerPayload

#: ``bank.enabled=auto`` builds a bank when it cuts the frozen forward passes at least this many times
#: (below that, the build's start-up and the fixed set of views are not worth it)
AUTO_MIN_SAVING = 2


def model_seed(cfg: Config, role: str) -> int:
    """Teacher ``seed``, student ``seed + 1``, as the workers seed them: a frozen backbone matches the bank's."""
    return cfg.seed if role == "teacher" else cfg.seed + 1


def build_seeded(model_cfg: ModelConfig, seed: int, weights: Path | None = None) -> torch.nn.Module:
    torch.manual_seed(seed)  # identical random init on every worker, restart and bank build
    return builders.build_model(model_cfg, weights)


def backbone_fingerprint(model: torch.nn.Module) -> str:
    sd = model.backbone.state_dict()
    return array_fingerprint(*(sd[k] for k in sorted(sd)))


_FINGERPRINTS: dict[tuple[str, int], str] = {}


def seeded_backbone_fingerprint(model_cfg: ModelConfig, seed: int) -> str:
    """:func:`backbone_fingerprint` of the seeded model, built once per process (every trial plans its bank)."""
    key = (stable_hash(asdict(model_cfg)), seed)
    if key not in _FINGERPRINTS:
        _FINGERPRINTS[key] = backbone_fingerprint(build_seeded(model_cfg, seed))
    return _FINGERPRINTS[key]


@dataclass(frozen=True)
class BankPlan:
    role: str
    entries: tuple[str, ...]
    fingerprint: dict[str, Any]
    folder: Path
    num_images: int
    views: int
    render: bool  # a trainable network sees the regenerated views live

    @property
    def num_rows(self) -> int:
        return self.num_images * self.views


def heads_only(plan: BankPlan | None) -> bool:
    """Whether a distillation trains heads only: the bank holds every frozen output (no images, no DDP group)."""
    return plan is not None and not plan.render


def live_frozen_forwards(cfg: Config, role: str, num_images: int) -> int:
    """Images a frozen network sees in the live run: epochs x steps x global batch x 2 views."""
    o = cfg.teacher.optim if role == "teacher" else cfg.distill.optim
    world = max(1, cfg.resources.num_workers)
    steps = num_images // (o.batch_size * world)
    if o.max_steps_per_epoch is not None:
        steps = min(steps, o.max_steps_per_epoch)
    return o.epochs * steps * o.batch_size * world * 2


def plan_bank(run: Any, role: str, *, quiet: bool = False, runs: int = 1) -> BankPlan | None:
    """:func:`bank_decision`'s plan, saying why ``auto`` left the bank off unless ``quiet``."""
    plan, note = bank_decision(run, role, runs=runs)
    if note and not quiet:
        say(note)
    return plan


def bank_decision(run: Any, role: str, *, runs: int = 1) -> tuple[BankPlan | None, str | None]:
    """The bank ``role`` ("teacher" or "distill") trains from (``None``: live views) and, when ``auto`` left it
    off, the line saying why; ``auto`` weighs it against ``runs`` live runs (a tuning job's trials)."""
    cfg, b = run.cfg, run.cfg.bank
    if b.enabled is False or (role == "teacher" and not cfg.teacher.model.freeze_backbone):
        return None, None
    num_images = len(run.bundle.split.train)
    student_frozen = bool(cfg.student.model.freeze_backbone)
    if b.enabled == "auto":
        bank_cost, live_cost = num_images * b.views, live_frozen_forwards(cfg, role, num_images) * runs
        if bank_cost * AUTO_MIN_SAVING > live_cost:
            live_runs = f"{runs} live runs'" if runs > 1 else "live run's"
            return None, (f"[{role}] view bank off (bank.enabled=auto): {num_images} images x {b.views} views = "
                          f"{bank_cost} frozen forward passes would not halve the {live_runs} {live_cost}; set "
                          "bank.enabled=true to use it")
    if role == "teacher":
        entries, render = ("teacher_features",), False
        frozen = {"teacher_backbone": seeded_backbone_fingerprint(cfg.teacher.model, model_seed(cfg, "teacher")),
                  "teacher_model": asdict(cfg.teacher.model)}
    else:
        entries = ("teacher_logits",) + (("student_features",) if student_frozen else ())
        render = not student_frozen
        frozen = {"teacher": run.teacher_fingerprint(), "teacher_model": asdict(cfg.teacher.model)}
        if student_frozen:
            frozen.update(student_backbone=seeded_backbone_fingerprint(cfg.student.model, model_seed(cfg, "student")),
                          student_model=asdict(cfg.student.model))
    fingerprint = {
        "role": role, "entries": list(entries), "split": run.split_fingerprint, "views": b.views, "seed": cfg.seed,
        "image_size": cfg.data.image_size, "augmentation": repr(_view(cfg)),
        "augment": asdict(cfg.data.augment), **frozen,
    }
    folder = run.layout.bank_dir(role, stable_hash(fingerprint))
    return BankPlan(role, entries, fingerprint, folder, num_images, b.views, render), None


def _view(cfg: Config):
    """The training view of the configured recipe (``data.augment``): what every bank row is rendered with."""
    return augmentation(cfg.data.image_size, cfg.data.augment)


def local_device(cfg: Config) -> torch.device:
    return torch.device("cuda") if cfg.resources.use_gpu and torch.cuda.is_available() else torch.device("cpu")


class BankPredictor:
    """One Ray Data actor: the bank's flat rows ``[start, stop)`` (view ``r % A`` of training image ``r // A``)."""

    def __init__(self, payload: WorkerPayload, role: str):
        cfg, bundle, workdir = payload.setup()
        self.device = local_device(cfg)
        distill = role != "teacher"
        weights = materialise(payload.teacher_weights, workdir / "teacher.safetensors") if distill else None
        teacher = build_seeded(cfg.teacher.model, model_seed(cfg, "teacher"), weights).to(self.device).eval()
        student = build_seeded(cfg.student.model, model_seed(cfg, "student")).to(self.device) if distill else None
        self.networks = frozen_networks(role, teacher=teacher, student=student)
        train = bundle.train_dataset()
        self.renderer = ViewRenderer(train.items.image, len(train), _view(cfg), cfg.bank.views, cfg.seed)
        self.batch_size = cfg.bank.batch_size

    def __call__(self, start: int, stop: int) -> dict[str, np.ndarray]:
        return bank_outputs(self.renderer, self.networks, start, stop, batch_size=self.batch_size, device=self.device)


def _actors(cfg: Config) -> dict[str, Any]:
    """``run_sharded_inference``'s actor arguments; local mode (0 workers) builds in this process."""
    r, actors = cfg.resources, cfg.bank.actors
    return {"num_actors": actors if actors is not None else (0 if r.num_workers == 0 else None),
            "num_cpus_per_actor": r.cpus_per_worker,
            "num_gpus_per_actor": (r.gpus_per_worker or 1.0) if r.use_gpu else 0.0}


def ensure_bank(run: Any, plan: BankPlan, *, runs: int = 1) -> dict[str, Any]:
    """Build the bank of ``plan`` unless complete; say what it holds and saves over ``runs`` runs.
    Returns the workers' handle (:func:`open_bank`)."""
    cfg = run.cfg
    extra = {"teacher_weights": put_file(run.teacher_weights)} if plan.role == "distill" else {}
    summary = run_sharded_inference(
        plan.folder, plan.num_rows, bank_rows_per_shard(plan.views), BankPredictor,
        {"payload": run.payload(**extra), "role": plan.role}, fingerprint=plan.fingerprint, writer="npy",
        label=f"{plan.role} bank", unit="views", progress=say, **_actors(cfg),
    )
    handle = {"dir": str(plan.folder), "fingerprint": plan.fingerprint, "views": plan.views,
              "num_images": plan.num_images, "render": plan.render}
    bank = open_bank(handle)
    built = summary["seconds"] if summary.get("computed_shards") else None
    say(BankSummary(plan.entries, plan.num_images, plan.views, bank.nbytes, built).line(plan.role)
        + "; " + _saving(live_frozen_forwards(cfg, plan.role, plan.num_images), plan.num_rows, built is not None, runs))
    return handle


def _saving(live: int, rows: int, built: bool, runs: int) -> str:
    """What the bank saves in frozen forward passes: ``runs`` live runs of ``live`` each vs ``rows`` once."""
    if not built:
        return f"this run makes no frozen forward pass (live: {live})"
    total = live * runs
    many = f"{runs} runs x {live}" if runs > 1 else f"{live}"
    if rows <= total:
        return f"{rows} frozen forward passes instead of {many} live ({total / max(rows, 1):.1f}x fewer)"
    return (f"{rows} frozen forward passes instead of {many} live: it pays once {math.ceil(rows / max(live, 1))} runs "
            "reuse it (Tune trials, reruns)")


def open_bank(handle: dict[str, Any]) -> ViewBank:
    """The bank a worker trains from (memory-mapped; refused in one line if it is not this run's)."""
    columns = open_sharded(handle["dir"], expect_fingerprint=handle["fingerprint"])
    return ViewBank(columns, handle["views"], handle["num_images"], handle["fingerprint"])


def bank_dataset(handle: dict[str, Any], bundle: Any, cfg: Config) -> BankViews:
    """A bank run's training dataset (plus the regenerated views when a trainable network needs them)."""
    renderer = None
    if handle["render"]:
        train = bundle.train_dataset()
        renderer = ViewRenderer(train.items.image, len(train), _view(cfg), handle["views"], cfg.seed)
    return BankViews(handle["num_images"], handle["views"], cfg.seed, renderer)


class FeaturePredictor:
    """Clean-image (eval transform) features of a frozen backbone on one split part, rows = positions."""

    def __init__(self, payload: WorkerPayload, role: str, part: str):
        cfg, bundle, workdir = payload.setup()
        self.device = local_device(cfg)
        model_cfg = cfg.teacher.model if role == "teacher" else cfg.student.model
        weights = payload.weights
        weights = None if weights is None else materialise(weights, workdir / "weights.safetensors")
        self.model = build_seeded(model_cfg, model_seed(cfg, role), weights).to(self.device).eval()
        self.dataset = bundle.eval_dataset(part)
        self.batch_size = cfg.bank.batch_size

    @torch.no_grad()
    def __call__(self, start: int, stop: int) -> dict[str, np.ndarray]:
        out = []
        for lo in range(start, stop, self.batch_size):
            x = torch.stack([self.dataset[i][0] for i in range(lo, min(stop, lo + self.batch_size))])
            out.append(self.model.features(x.to(self.device)).float().cpu().numpy())
        return {"features": np.concatenate(out)}


def uses_feature_cache(cfg: Config, role: str) -> bool:
    """Whether ``role``'s ("teacher" / "student") frozen backbone is encoded from exact feature caches."""
    model_cfg = cfg.teacher.model if role == "teacher" else cfg.student.model
    return cfg.bank.enabled is not False and bool(model_cfg.freeze_backbone)


def feature_cache(run: Any, role: str, part: str, weights: Path | None = None) -> np.ndarray:
    """float32 (N, D): the frozen ``role`` backbone's (seeded, or ``weights``') features of ``part``'s clean
    images, computed once per (backbone, split, transform)."""
    cfg = run.cfg
    model_cfg = cfg.teacher.model if role == "teacher" else cfg.student.model
    if not model_cfg.freeze_backbone:
        raise ValueError(f"the {role} backbone is trainable; its features cannot be cached")
    model = build_seeded(model_cfg, model_seed(cfg, role), weights)
    rtc = run.bundle.resize_then_crop
    fingerprint = {"role": role, "part": part, "split": run.split_fingerprint, "backbone": backbone_fingerprint(model),
                   "model": asdict(model_cfg), "transform": repr(eval_transform(cfg.data.image_size, rtc))}
    folder = run.layout.feature_cache_dir(role, part, stable_hash(fingerprint))
    n = len(run.bundle.split.indices(part))
    payload = run.payload(weights=put_file(weights) if weights is not None else None)
    run_sharded_inference(folder, n, 4096, FeaturePredictor, {"payload": payload, "role": role, "part": part},
                          fingerprint=fingerprint, writer="npy", label=f"{role} features ({part})", unit="images",
                          progress=None, **_actors(cfg))
    return open_sharded(folder, expect_fingerprint=fingerprint)["features"].to_array()


def eval_feature_caches(run: Any, role: str) -> dict[str, np.ndarray] | None:
    """``{"query": validation, "database": database}`` features for ``role``'s validation, if frozen."""
    if not uses_feature_cache(run.cfg, role):
        return None
    return {"query": feature_cache(run, role, "validation"), "database": feature_cache(run, role, "database")}
