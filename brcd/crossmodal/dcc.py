"""Discrete cyclic coordinate descent (DCC) for the student's free database codes B
(derivation in docs/CROSSMODAL.md, "Student").

Column by column, ``b_l = sign(q_l - B_{-l} W_{-l}^T w_l)`` with ``W = [U; V]`` and
``Q = L S_Omega^T (U + V) + gamma P_Omega (U + V)`` is J's exact minimiser over {-1, +1}^n; an entry
whose argument is 0 keeps its value, so no update increases J. One sweep updates l = 0 .. L-1.
"""

from __future__ import annotations

import torch

from brcd.losses.asymmetric import check_asymmetric_inputs
from brcd.losses._common import check_nonnegative

__all__ = ["dcc_terms", "dcc_column", "dcc_update"]


def dcc_terms(u: torch.Tensor, v: torch.Tensor, similarity: torch.Tensor, omega: torch.Tensor, n: int, *,
              gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q, W)`` of the module docstring, in float64."""
    u, v, s = u.double(), v.double(), similarity.double()
    bits = u.shape[1]
    q = bits * s.T @ (u + v)
    q.index_add_(0, omega.long(), gamma * (u + v))
    return q, torch.cat([u, v], dim=0)


def dcc_column(codes: torch.Tensor, q: torch.Tensor, w: torch.Tensor, l: int) -> torch.Tensor:
    """The exact minimiser of J over column ``l`` given the others (ties keep the current entry)."""
    b = codes.double()
    others = [j for j in range(b.shape[1]) if j != l]
    arg = q[:, l] - b[:, others] @ (w[:, others].T @ w[:, l])
    return torch.where(arg > 0, 1.0, torch.where(arg < 0, -1.0, b[:, l])).to(codes.dtype)


def dcc_update(codes: torch.Tensor, u: torch.Tensor, v: torch.Tensor, similarity: torch.Tensor,
               omega: torch.Tensor, *, gamma: float, sweeps: int = 1) -> torch.Tensor:
    """``sweeps`` DCC passes over the bits of ``codes`` (n, L) in {-1, +1}; returns new codes (same dtype)."""
    check_asymmetric_inputs(u, v, codes, similarity, omega)
    gamma = check_nonnegative(gamma, "gamma")
    if sweeps < 1:
        raise ValueError(f"sweeps must be >= 1, got {sweeps}")
    if not bool(((codes == 1) | (codes == -1)).all()):
        raise ValueError("codes must be in {-1, +1}")
    q, w = dcc_terms(u.detach(), v.detach(), similarity, omega, codes.shape[0], gamma=gamma)
    b = codes.detach().clone()
    for _ in range(sweeps):
        for l in range(b.shape[1]):
            b[:, l] = dcc_column(b, q, w, l)
    return b
