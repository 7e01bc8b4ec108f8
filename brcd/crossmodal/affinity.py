"""Affinities and the reconstructed similarity matrix S (pure functions; the formulas and the
``topk`` / ``threshold`` / ``continuous`` rules are in docs/CROSSMODAL.md, "Teacher" and "Similarity reconstruction").
"""

from __future__ import annotations

import numpy as np
import torch

from brcd.losses._common import cosine_matrix

__all__ = ["joint_semantic_affinity", "teacher_affinity", "reconstruct_similarity"]


def joint_semantic_affinity(image_features: torch.Tensor, tag_vectors: torch.Tensor, *, beta: float,
                            eta: float) -> torch.Tensor:
    """DJSRH's ``S_joint`` (n, n), symmetric, computed once over the whole set (DJSRH: per batch)."""
    if image_features.ndim != 2 or tag_vectors.ndim != 2 or image_features.shape[0] != tag_vectors.shape[0]:
        raise ValueError(f"image_features and tag_vectors must be (n, d) with the same n, got "
                         f"{tuple(image_features.shape)} and {tuple(tag_vectors.shape)}")
    for name, v in (("beta", beta), ("eta", eta)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {v}")
    fi, ft = image_features.double(), tag_vectors.double()
    s = beta * cosine_matrix(fi) + (1 - beta) * cosine_matrix(ft)
    s = (1 - eta) * s + eta * (s @ s.T) / s.shape[0]
    return ((s + s.T) / 2).float()


def teacher_affinity(image_out: torch.Tensor, text_out: torch.Tensor, source: str = "both") -> torch.Tensor:
    """The teacher's (n, n) symmetric affinity from its image and text outputs (before sign)."""
    if source not in ("codes", "features", "both"):
        raise ValueError(f"source must be codes, features or both, got {source!r}")
    if image_out.shape != text_out.shape or image_out.ndim != 2:
        raise ValueError(f"image and text outputs must be (n, bits) alike, got {tuple(image_out.shape)} and "
                         f"{tuple(text_out.shape)}")

    def fused(i: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        it = cosine_matrix(i, t)
        return (cosine_matrix(i) + cosine_matrix(t) + it + it.T) / 4

    i, t = image_out.double(), text_out.double()
    parts = []
    if source in ("codes", "both"):
        parts.append(fused(torch.where(i >= 0, 1.0, -1.0).double(), torch.where(t >= 0, 1.0, -1.0).double()))
    if source in ("features", "both"):
        parts.append(fused(i, t))
    s = sum(parts) / len(parts)
    return ((s + s.T) / 2).float()


def reconstruct_similarity(affinity: torch.Tensor, *, rule: str = "topk", k: int = 100,
                           threshold: float = 0.0) -> torch.Tensor:
    """S from an (n, n) affinity; symmetric float32, diagonal +1 for the binary rules."""
    if affinity.ndim != 2 or affinity.shape[0] != affinity.shape[1]:
        raise ValueError(f"affinity must be square (n, n), got {tuple(affinity.shape)}")
    a = affinity.double()
    a = (a + a.T) / 2
    n = a.shape[0]
    if rule == "continuous":
        return a.clamp(-1, 1).float()
    if rule == "threshold":
        s = torch.where(a >= threshold, 1.0, -1.0)
    elif rule == "topk":
        if not 1 <= k:
            raise ValueError(f"k must be >= 1, got {k}")
        kk = min(k, n)
        # stable order: ties -> smaller index first (argsort of -a, stable)
        order = np.argsort(-a.numpy(), axis=1, kind="stable")[:, :kk]
        near = torch.zeros((n, n), dtype=torch.bool)
        near[torch.arange(n)[:, None], torch.from_numpy(order)] = True
        s = torch.where(near | near.T, 1.0, -1.0)
    else:
        raise ValueError(f"rule must be topk, threshold or continuous, got {rule!r}")
    s.fill_diagonal_(1.0)
    return s.float()
