"""From a :class:`~brcd.config.Config` to ready objects: data bundle, evaluation sets, models, tasks.

The CLI's in-process path and the Ray workers call the same builders, so what runs on a laptop is
what runs on the cluster.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from brcd.config import Config, ModelConfig
from brcd.data import DataBundle, build_data, default_resize_then_crop
from brcd.engine import DistillTask, EvalSets, TeacherTask, make_optimizer
from brcd.models import HashingModel, create_hashing_model

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
    return build_data(
        source=kind, root=d.root, image_size=d.image_size, seed=d.seed, split_path=split_path,
        on_corrupt=d.on_corrupt, **kwargs,
    )


def resize_then_crop(cfg: Config) -> bool:
    """The eval geometry of the configured dataset (what :func:`data_bundle`'s bundle uses), without opening it."""
    return default_resize_then_crop(_SOURCE_KIND[cfg.data.source])


def eval_sets(bundle: DataBundle, cfg: Config, query_part: str = "validation") -> EvalSets:
    """Queries from ``query_part`` (validation during training, query for the final report)
    against the database."""
    return EvalSets(
        query=bundle.eval_dataset(query_part),
        database=bundle.eval_dataset("database"),
        query_labels=bundle.labels(query_part),
        database_labels=bundle.labels("database"),
        topk=cfg.data.topk,
    )


def build_model(model_cfg: ModelConfig, weights: str | Path | None = None) -> HashingModel:
    """A hashing model; ``weights`` = full exported weights (safetensors) to load on top."""
    model = create_hashing_model(model_cfg)
    if weights is not None:
        from brcd.engine import load_model_weights

        load_model_weights(model, weights)
    return model


def teacher_task(cfg: Config, model: torch.nn.Module, bundle: DataBundle, device: torch.device | str = "cpu") -> TeacherTask:
    o = cfg.teacher.optim
    return TeacherTask(
        model, make_optimizer(model, o.lr, o.weight_decay), eval_sets(bundle, cfg),
        temperature=o.temperature, kl_weight=o.kl_weight, device=device, bf16=cfg.resources.bf16, nhl=cfg.nhl,
    )


def distill_task(
    cfg: Config,
    student: torch.nn.Module,
    teacher: HashingModel,
    bundle: DataBundle,
    *,
    teacher_db_codes: np.ndarray,
    clusters: dict[str, np.ndarray] | None,
    device: torch.device | str = "cpu",
) -> DistillTask:
    """``clusters`` holds ``labels`` (pseudo-label per training image), ``masks`` and ``centroids``;
    for nested bits (NHL) optionally ``masks_by_length`` (``{L: (K, L) masks}``, see
    ``pipelines.stages.nested_masks``). Nested models use ``cfg.nhl``."""
    o = cfg.distill.optim
    c = clusters or {}
    return DistillTask(
        student, make_optimizer(student, o.lr, o.weight_decay), teacher, eval_sets(bundle, cfg),
        teacher_db_codes=teacher_db_codes, pseudo_labels=c.get("labels"), masks=c.get("masks"),
        centroids=c.get("centroids"), distill_cfg=cfg.distill, temperature=o.temperature,
        kl_weight=o.kl_weight, device=device, bf16=cfg.resources.bf16, nhl=cfg.nhl,
        masks_by_length=c.get("masks_by_length"),
    )
