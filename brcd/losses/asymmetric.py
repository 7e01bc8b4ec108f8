"""The cross-modal student's asymmetric objective (ADSH / DADH style) with free database codes B.

For a sampled set Omega of m database items with network outputs ``U = f(x_Omega)`` (images) and
``V = g(y_Omega)`` (texts), all (m, L) in (-1, 1), database codes ``B`` in {-1, +1}^(n x L), the
rows ``S_Omega`` (m, n) of the reconstructed similarity and the positions ``omega`` (m,) of the
sampled items inside the database::

    J = ||U B^T - L S_Omega||^2 + ||V B^T - L S_Omega||^2
        + gamma (||B_omega - U||^2 + ||B_omega - V||^2)

The networks are trained by SGD on ``J / (m n)`` with B fixed; B by discrete cyclic coordinate descent on
the same J (:func:`brcd.crossmodal.dcc.dcc_update`).
"""

from __future__ import annotations

import torch

from brcd.losses._common import check_nonnegative, float_dtype

__all__ = ["asymmetric_objective", "asymmetric_loss", "asymmetric_grad", "check_asymmetric_inputs"]


def check_asymmetric_inputs(u: torch.Tensor, v: torch.Tensor, codes: torch.Tensor, similarity: torch.Tensor,
                            omega: torch.Tensor) -> None:
    """One-line ``ValueError`` for inconsistent shapes of the asymmetric objective's inputs."""
    for t, name in ((u, "u"), (v, "v"), (codes, "codes"), (similarity, "similarity"), (omega, "omega")):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if u.ndim != 2 or u.shape != v.shape:
        raise ValueError(f"u and v must be (m, bits) of the same shape, got {tuple(u.shape)} and {tuple(v.shape)}")
    m, bits = u.shape
    if codes.ndim != 2 or codes.shape[1] != bits:
        raise ValueError(f"codes must be (n, {bits}), got {tuple(codes.shape)}")
    n = codes.shape[0]
    if tuple(similarity.shape) != (m, n):
        raise ValueError(f"similarity must be ({m}, {n}) (rows of the sampled items), got {tuple(similarity.shape)}")
    if omega.ndim != 1 or omega.shape[0] != m:
        raise ValueError(f"omega must list the {m} sampled database positions, got shape {tuple(omega.shape)}")
    if m and (int(omega.min()) < 0 or int(omega.max()) >= n):
        raise ValueError(f"omega must index the {n} database items, got values in [{int(omega.min())}, {int(omega.max())}]")


def asymmetric_objective(u: torch.Tensor, v: torch.Tensor, codes: torch.Tensor, similarity: torch.Tensor,
                         omega: torch.Tensor, *, gamma: float) -> torch.Tensor:
    """``J`` of the module docstring (a scalar sum)."""
    gamma, u, v, b, ls, b_omega = _prepare(u, v, codes, similarity, omega, gamma, promote=True)
    return ((u @ b.T - ls).pow(2).sum() + (v @ b.T - ls).pow(2).sum()
            + gamma * ((b_omega - u).pow(2).sum() + (b_omega - v).pow(2).sum()))


def _prepare(u: torch.Tensor, v: torch.Tensor, codes: torch.Tensor, similarity: torch.Tensor, omega: torch.Tensor,
             gamma: float, promote: bool) -> tuple[float, torch.Tensor, ...]:
    """Checked ``gamma``, ``U``, ``V``, ``B``, ``L S``, ``B_omega``: in at least float32 (``promote``) or u's dtype."""
    check_asymmetric_inputs(u, v, codes, similarity, omega)
    dtype = float_dtype(u, v) if promote else u.dtype
    b = codes.to(dtype)
    return (check_nonnegative(gamma, "gamma"), u.to(dtype), v.to(dtype), b, b.shape[1] * similarity.to(dtype),
            b[omega])


def asymmetric_loss(u: torch.Tensor, v: torch.Tensor, codes: torch.Tensor, similarity: torch.Tensor,
                    omega: torch.Tensor, *, gamma: float) -> torch.Tensor:
    """``J / (m n)``: the networks' training loss (B fixed)."""
    m, n = u.shape[0], codes.shape[0]
    return asymmetric_objective(u, v, codes, similarity, omega, gamma=gamma) / (max(m, 1) * n)


def asymmetric_grad(u: torch.Tensor, v: torch.Tensor, codes: torch.Tensor, similarity: torch.Tensor,
                    omega: torch.Tensor, *, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form ``(dJ/dU, dJ/dV) = 2 (U B^T - L S) B + 2 gamma (U - B_omega)`` (the same with V)."""
    gamma, u, v, b, ls, b_omega = _prepare(u, v, codes, similarity, omega, gamma, promote=False)
    return 2 * (u @ b.T - ls) @ b + 2 * gamma * (u - b_omega), 2 * (v @ b.T - ls) @ b + 2 * gamma * (v - b_omega)
