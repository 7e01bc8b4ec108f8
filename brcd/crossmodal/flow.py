"""The cross-modal job's steps as plain functions (``pipelines.crossmodal`` runs the two training loops
on Ray Train workers between them): :func:`prepare` (split, frozen features; the database is also the
unlabelled training set), S from the teacher or raw features, mAP@K of I->T, T->I, I->I, T->T.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from brcd.crossmodal.affinity import joint_semantic_affinity, reconstruct_similarity, teacher_affinity
from brcd.crossmodal.data import load_images, paired_data, split_query_database
from brcd.crossmodal.nets import codes_of, create_feature_extractor, extract_features
from brcd.evaluation import mean_average_precision

__all__ = ["Prepared", "prepare", "teacher_similarity", "raw_similarity", "cross_modal_maps", "evaluate_teacher",
           "evaluate_student", "TASKS"]

TASKS = ("i2t", "t2i", "i2i", "t2t")


@dataclass
class Prepared:
    """Tensors of one seed's split: features (image), tags (text), labels (evaluation only)."""

    db_features: torch.Tensor
    db_tags: torch.Tensor
    db_labels: np.ndarray
    q_features: torch.Tensor
    q_tags: torch.Tensor
    q_labels: np.ndarray
    query_index: np.ndarray
    database_index: np.ndarray
    extractor: torch.nn.Module
    database_rows: np.ndarray  # each database pair's row in the source data (the exported ids)


#: peak bytes per (database pair)^2 of one process holding the n x n affinities and S (measured
#: about 50 in the driver at n = 4,000: float64 cosines, the second-order product, their float32 copies)
BYTES_PER_PAIR_SQUARED = 50


def available_memory() -> int:
    """Bytes this machine can still give (Linux MemAvailable; else free pages)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_memory(n: int, processes: int, available: int | None = None) -> None:
    """A one-line error, before any slow work, when ``n`` database pairs cannot fit: the job holds
    n x n matrices in the driver and in each of ``processes`` workers."""
    need = BYTES_PER_PAIR_SQUARED * n * n * (1 + max(processes, 1))
    have = available_memory() if available is None else available
    if need > have:
        fit = int(math.sqrt(have / (BYTES_PER_PAIR_SQUARED * (1 + max(processes, 1)))))
        raise ValueError(f"{n:,} database pairs need about {need / 2**30:.1f} GiB for the n x n affinities "
                         f"(driver + {max(processes, 1)} worker(s)); this machine has {have / 2**30:.1f} GiB free: "
                         f"set crossmodal.data.limit (about {fit:,} database pairs fit) or use fewer workers")


def prepare(cfg: Any, seed: int) -> Prepared:
    """Pairs of ``cfg.crossmodal.data`` (tags drawn with ``seed``), split with ``seed``, features."""
    x = cfg.crossmodal
    data = paired_data(x.data, seed=seed, images=False)
    q, db = split_query_database(len(data), x.data.query, seed)
    check_memory(len(db), cfg.resources.num_workers)
    if data.images is None:
        data.images = load_images(data.paths, x.data.image_size)
    extractor, _ = create_feature_extractor(x.teacher.image_backbone, x.data.image_size, seed=0,
                                            pretrained=x.teacher.image_pretrained, weights=x.teacher.image_weights)
    feats = extract_features(extractor, data.images)
    tags = torch.from_numpy(data.tags)
    return Prepared(db_features=feats[db], db_tags=tags[db], db_labels=data.labels[db], q_features=feats[q],
                    q_tags=tags[q], q_labels=data.labels[q], query_index=q, database_index=db, extractor=extractor,
                    database_rows=data.source_rows()[db])


@torch.no_grad()
def teacher_similarity(image_net: torch.nn.Module, text_net: torch.nn.Module, features: torch.Tensor,
                       tags: torch.Tensor, s: Any) -> torch.Tensor:
    """S from the teacher's outputs on the database features and tags (``s`` = ``crossmodal.similarity``)."""
    image_net.eval(), text_net.eval()
    a = teacher_affinity(image_net(features), text_net(tags), s.source)
    return reconstruct_similarity(a, rule=s.rule, k=s.k, threshold=s.threshold)


def raw_similarity(p: Prepared, cfg: Any) -> torch.Tensor:
    """S of the no-teacher student: the joint affinity of the raw image features and tag vectors
    (the teacher's target, without any training), same rule as the teacher's S."""
    x = cfg.crossmodal
    a = joint_semantic_affinity(p.db_features, p.db_tags, beta=x.baseline_beta, eta=x.teacher.eta)
    return reconstruct_similarity(a, rule=x.similarity.rule, k=x.similarity.k, threshold=x.similarity.threshold)


def cross_modal_maps(q_img: np.ndarray, q_txt: np.ndarray, db_img: np.ndarray, db_txt: np.ndarray,
                     q_labels: np.ndarray, db_labels: np.ndarray, topk: int | None) -> dict[str, float]:
    """mAP@topk of the four tasks (relevant = at least one shared label, ties by database index)."""
    side = {"i": (q_img, db_img), "t": (q_txt, db_txt)}
    return {task: mean_average_precision(side[task[0]][0], side[task[2]][1], q_labels, db_labels, topk)
            for task in TASKS}


def evaluate_teacher(image_net, text_net, p: Prepared, topk: int | None) -> dict[str, float]:
    """Teacher: every code from its own networks (database images / texts encoded by them)."""
    return cross_modal_maps(codes_of(image_net, p.q_features), codes_of(text_net, p.q_tags),
                            codes_of(image_net, p.db_features), codes_of(text_net, p.db_tags),
                            p.q_labels, p.db_labels, topk)


def evaluate_student(image_net, text_net, codes: torch.Tensor, p: Prepared, topk: int | None) -> dict[str, float]:
    """Student, asymmetric: queries of either modality encoded by f / g, searched against the learned
    database codes B (one code per database pair, so I->T = I->I and T->I = T->T here); the
    ``net_*`` keys search a database re-encoded by the networks instead."""
    b = codes.numpy().astype(np.int8)
    qi, qt = codes_of(image_net, p.q_features), codes_of(text_net, p.q_tags)
    out = cross_modal_maps(qi, qt, b, b, p.q_labels, p.db_labels, topk)
    net = cross_modal_maps(qi, qt, codes_of(image_net, p.db_features), codes_of(text_net, p.db_tags),
                           p.q_labels, p.db_labels, topk)
    return out | {f"net_{k}": v for k, v in net.items()}


def similarity_stats(s: torch.Tensor, labels: np.ndarray) -> dict[str, float]:
    """How well S agrees with the (hidden) labels, diagonal excluded: the mean S over pairs that share
    a label and over pairs that do not, and precision / recall of the pairs with S > 0 (for the
    binary rules: the +1 pairs). Reported only; nothing trains on it."""
    same = torch.from_numpy((labels @ labels.T) > 0)
    eye = torch.eye(len(s), dtype=torch.bool)
    pos, same = (s > 0) & ~eye, same & ~eye
    diff = ~same & ~eye
    tp = float((pos & same).sum())
    return {"precision": tp / max(float(pos.sum()), 1.0), "recall": tp / max(float(same.sum()), 1.0),
            "positive_fraction": float(pos.sum()) / (len(s) * (len(s) - 1)),
            "mean_same": float(s[same].double().mean()) if same.any() else 0.0,
            "mean_different": float(s[diff].double().mean()) if diff.any() else 0.0}
