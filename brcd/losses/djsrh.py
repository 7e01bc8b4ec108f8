"""The unsupervised cross-modal teacher's objective (DJSRH-style joint-semantics reconstruction).

Given relaxed codes ``b_x = tanh(alpha h_x)`` of a batch's images and texts and the batch's block
``S`` of the joint-semantics affinity (:func:`brcd.crossmodal.affinity.joint_semantic_affinity`)::

    L = lambda_ii ||cos(B_I, B_I) - mu S||^2 + lambda_it ||cos(B_I, B_T) - mu S||^2
        + lambda_tt ||cos(B_T, B_T) - mu S||^2          (each term a mean over the m x m entries)

No label is used. ``mu`` > 1 pushes similar pairs to the saturated cosine (DJSRH's scale knob).
"""

from __future__ import annotations

import torch

from brcd.losses._common import check_nonnegative, check_pair, check_temperature, cosine_matrix, float_dtype

__all__ = ["djsrh_loss"]


def djsrh_loss(image_codes: torch.Tensor, text_codes: torch.Tensor, affinity: torch.Tensor, *, mu: float = 1.5,
               lambda_ii: float = 0.1, lambda_it: float = 1.0, lambda_tt: float = 0.1) -> torch.Tensor:
    """The weighted reconstruction loss above (scalar). ``affinity`` is the (m, m) target block."""
    check_pair(image_codes, text_codes, ("image_codes", "text_codes"))
    m = image_codes.shape[0]
    if not isinstance(affinity, torch.Tensor) or tuple(affinity.shape) != (m, m):
        raise ValueError(f"affinity must be a ({m}, {m}) tensor for a batch of {m}, got "
                         f"{tuple(getattr(affinity, 'shape', ()))}")
    mu = check_temperature(mu, "mu")
    weights = [check_nonnegative(w, n) for w, n in ((lambda_ii, "lambda_ii"), (lambda_it, "lambda_it"),
                                                     (lambda_tt, "lambda_tt"))]
    dtype = float_dtype(image_codes, text_codes)
    bi, bt = image_codes.to(dtype), text_codes.to(dtype)
    target = mu * affinity.to(dtype)
    pairs = (cosine_matrix(bi), cosine_matrix(bi, bt), cosine_matrix(bt))
    return sum(w * (c - target).pow(2).mean() for w, c in zip(weights, pairs))
