"""From a :class:`~brcd.config.Config` to ready objects: data bundle, evaluation sets, models, distillation
objectives, tasks; the CLI's in-process path and the Ray workers call the same builders.

:data:`DISTILL_OBJECTIVES` maps ``distill.method`` to an objective of one code length's
:class:`~brcd.engine.LengthBatch`: :func:`brcd.losses.student_objective` with the method's distillation term.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from brcd import losses
from brcd.config import Config, DistillConfig, ModelConfig, check_split_sizes
from brcd.data import DataBundle, build_data, default_resize_then_crop
from brcd.engine import DistillTask, EvalSets, LengthBatch, TeacherTask, load_model_weights, make_optimizer
from brcd.losses.options import BRCDOptions
from brcd.models.nets import HashingModel, create_hashing_model

_SOURCE_KIND = {"digits": "digits", "cifar10": "cifar10", "folder": "image_folder", "list": "list_files"}


def data_bundle(cfg: Config, split_path: str | Path | None) -> DataBundle:
    """Open the configured dataset and create (first time) or reuse its saved, seeded split."""
    d = cfg.data
    kind = _SOURCE_KIND[d.source]
    kwargs: dict[str, Any] = {}
    if kind in ("digits", "image_folder"):
        kwargs.update(query=d.query, validation=d.validation, train=d.train)
    elif kind == "list_files":
        kwargs.update(
            list_files={"train": d.train_list, "query": d.query_list, "database": d.database_list},
            num_classes=d.num_classes,
        )
    bundle = build_data(
        source=kind, root=d.root, image_size=d.image_size, seed=d.seed, split_path=split_path,
        on_corrupt=d.on_corrupt, augment=d.augment, **kwargs,
    )
    check_split_sizes(d)
    return bundle


def resize_then_crop(cfg: Config) -> bool:
    """The eval geometry of the configured dataset (what :func:`data_bundle`'s bundle uses), without opening it."""
    return default_resize_then_crop(_SOURCE_KIND[cfg.data.source])


def eval_sets(bundle: DataBundle, cfg: Config, query_part: str = "validation",
              features: dict[str, np.ndarray] | None = None) -> EvalSets:
    """Queries from ``query_part`` against the database; ``features`` (``{"query", "database"}``): exact
    caches of the validated model's frozen-backbone features, encoded instead of the images."""
    f = features or {}
    return EvalSets(
        query=bundle.eval_dataset(query_part),
        database=bundle.eval_dataset("database"),
        query_labels=bundle.labels(query_part),
        database_labels=bundle.labels("database"),
        topk=cfg.data.topk,
        query_features=f.get("query"),
        database_features=f.get("database"),
    )


def build_model(model_cfg: ModelConfig, weights: str | Path | None = None) -> HashingModel:
    """A hashing model; ``weights`` = full exported weights (safetensors) to load on top."""
    model = create_hashing_model(model_cfg)
    if weights is not None:
        load_model_weights(model, weights)
    return model


def teacher_task(cfg: Config, model: torch.nn.Module, bundle: DataBundle, device: torch.device | str = "cpu", *,
                 bank: Any = None, eval_features: dict[str, np.ndarray] | None = None) -> TeacherTask:
    """``bank``: a :class:`brcd.bank.ViewBank` of the frozen backbone's features (the loader then
    yields positions and view pairs); ``eval_features``: see :func:`eval_sets`."""
    o = cfg.teacher.optim
    return TeacherTask(
        model, make_optimizer(model, o.lr, o.weight_decay), eval_sets(bundle, cfg, features=eval_features),
        temperature=o.temperature, kl_weight=o.kl_weight, device=device, bf16=cfg.resources.bf16, nhl=cfg.nhl,
        bank=bank,
    )


# --------------------------------------------------------------------------------------------
# distillation objectives
# --------------------------------------------------------------------------------------------

Terms = dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class DistillOptions:
    """Everything a distillation objective reads from the config, read once."""

    temperature: float  # τ of the student's NT-Xent and of BRCD (distill.optim.temperature)
    kl_weight: float  # β of the student's Bernoulli KL
    weight: float  # of the distillation term: distill.brcd_weight for brcd, distill.baseline_weight for baselines
    brcd: BRCDOptions = dataclasses.field(default_factory=BRCDOptions)


ObjectiveFn = Callable[[DistillOptions, LengthBatch], tuple[torch.Tensor, Terms]]


def _student(o: DistillOptions, b: LengthBatch, distill: tuple[str, Callable[[], tuple]] | None = None
             ) -> tuple[torch.Tensor, Terms]:
    return losses.student_objective(b.student_logits1, b.student_logits2, b.student_codes1, b.student_codes2,
                                    o.temperature, o.kl_weight, distill, o.weight)


def brcd_objective(o: DistillOptions, b: LengthBatch) -> tuple[torch.Tensor, Terms]:
    """CIBHash + ``weight`` · BRCD (:func:`brcd.losses.brcd_loss`); terms ``brcd`` and ``stat_<name>``."""
    return _student(o, b, ("brcd", lambda: losses.brcd_loss(
        b.student_codes1, b.teacher_codes1, b.teacher_codes2, b.pseudo_labels, b.masks, b.centroids, options=o.brcd,
        temperature=o.temperature, assigned=b.assigned)))


def baseline_objective(name: str) -> ObjectiveFn:
    """CIBHash + ``weight`` · ``BASELINES[name]`` on view 1: Hinton KD on the teacher's logits, the
    others on its codes; term ``<name>``."""
    fn = losses.BASELINES[name]

    def objective(o: DistillOptions, b: LengthBatch) -> tuple[torch.Tensor, Terms]:
        return _student(o, b, (name, lambda: (fn(b.student_logits1, b.teacher_logits1 if name == "kd" else b.teacher_codes1),
                                              None)))

    return objective


@dataclasses.dataclass(frozen=True)
class DistillObjective:
    """An objective of one code length, bound to its options by :func:`build_objective` (what DistillTask trains)."""

    fn: ObjectiveFn
    needs_clusters: bool = False  # trains on the cluster artifact (pseudo-labels, masks, centroids)
    options: DistillOptions | None = None

    @property
    def shares_assignment(self) -> bool:
        # released mode keeps the public code's own (masked) assignment at every length
        return self.needs_clusters and not self.options.brcd.released

    def __call__(self, batch: LengthBatch) -> tuple[torch.Tensor, Terms]:
        return self.fn(self.options, batch)


#: ``distill.method`` -> objective of one code length.
DISTILL_OBJECTIVES: dict[str, DistillObjective] = {
    "no_kd": DistillObjective(_student),  # the student's own CIBHash objective only
    "brcd": DistillObjective(brcd_objective, needs_clusters=True),
    **{name: DistillObjective(baseline_objective(name)) for name in losses.BASELINES},
}


def build_objective(d: DistillConfig) -> DistillObjective:
    """The ``distill`` section's objective, ready for :class:`~brcd.engine.DistillTask`."""
    if d.method not in DISTILL_OBJECTIVES:
        raise ValueError(f"unknown distill.method {d.method!r}; choose one of {', '.join(DISTILL_OBJECTIVES)}")
    weight = d.brcd_weight if d.method == "brcd" else d.baseline_weight
    options = DistillOptions(d.optim.temperature, d.optim.kl_weight, weight, d.brcd_options())
    return dataclasses.replace(DISTILL_OBJECTIVES[d.method], options=options)


def distill_task(
    cfg: Config,
    student: torch.nn.Module,
    teacher: HashingModel,
    bundle: DataBundle,
    *,
    teacher_db_codes: np.ndarray,
    clusters: dict[str, Any] | None,
    device: torch.device | str = "cpu",
    bank: Any = None,
    eval_features: dict[str, np.ndarray] | None = None,
) -> DistillTask:
    """``clusters``: the cluster artifact's ``labels``, ``centroids`` and ``masks_by_length``; ``bank`` (the
    frozen teacher's outputs per view) and ``eval_features``: see :func:`teacher_task`."""
    o = cfg.distill.optim
    c = clusters or {}
    return DistillTask(
        student, make_optimizer(student, o.lr, o.weight_decay), teacher, eval_sets(bundle, cfg, features=eval_features),
        objective=build_objective(cfg.distill), teacher_db_codes=teacher_db_codes, pseudo_labels=c.get("labels"),
        centroids=c.get("centroids"), masks_by_length=c.get("masks_by_length"), device=device,
        bf16=cfg.resources.bf16, nhl=cfg.nhl, bank=bank,
    )
