"""The cross-modal student's asymmetric objective (ADSH / DADH style) with free database codes B.

For a sampled set Omega of m database items with network outputs ``U = f(x_Omega)`` (images) and
``V = g(y_Omega)`` (texts), all (m, L) in (-1, 1), database codes ``B`` in {-1, +1}^(n x L), the
rows ``S_Omega`` (m, n) of the reconstructed similarity and the positions ``omega`` (m,) of the
sampled items inside the database::

    J = ||U B^T - L S_Omega||^2 + ||V B^T - L S_Omega||^2
        + gamma (||B_omega - U||^2 + ||B_omega - V||^2)

:func:`asymmetric_objective` is ``J`` (the sum). The networks are trained by SGD on
:func:`asymmetric_loss` = ``J / (m n)`` (same minimiser, batch-size independent scale) with B fixed;
B is optimised by discrete cyclic coordinate descent on the same J
(:func:`brcd.crossmodal.dcc.dcc_update`). :func:`asymmetric_grad` is the closed-form gradient
``dJ/dU = 2 (U B^T - L S) B + 2 gamma (U - B_omega)`` (the same with V).
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
    check_asymmetric_inputs(u, v, codes, similarity, omega)
    gamma = check_nonnegative(gamma, "gamma")
    dtype = float_dtype(u, v)
    u, v, b, s = u.to(dtype), v.to(dtype), codes.to(dtype), similarity.to(dtype)
    bits = b.shape[1]
    b_omega = b[omega]
    return ((u @ b.T - bits * s).pow(2).sum() + (v @ b.T - bits * s).pow(2).sum()
            + gamma * ((b_omega - u).pow(2).sum() + (b_omega - v).pow(2).sum()))


def asymmetric_loss(u: torch.Tensor, v: torch.Tensor, codes: torch.Tensor, similarity: torch.Tensor,
                    omega: torch.Tensor, *, gamma: float) -> torch.Tensor:
    """``J / (m n)``: the networks' training loss (B fixed)."""
    m, n = u.shape[0], codes.shape[0]
    return asymmetric_objective(u, v, codes, similarity, omega, gamma=gamma) / (max(m, 1) * n)


def asymmetric_grad(u: torch.Tensor, v: torch.Tensor, codes: torch.Tensor, similarity: torch.Tensor,
                    omega: torch.Tensor, *, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form ``(dJ/dU, dJ/dV)``."""
    check_asymmetric_inputs(u, v, codes, similarity, omega)
    gamma = check_nonnegative(gamma, "gamma")
    b, s = codes.to(u.dtype), similarity.to(u.dtype)
    bits = b.shape[1]
    b_omega = b[omega]
    du = 2 * (u @ b.T - bits * s) @ b + 2 * gamma * (u - b_omega)
    dv = 2 * (v @ b.T - bits * s) @ b + 2 * gamma * (v - b_omega)
    return du, dv
