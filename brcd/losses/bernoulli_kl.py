"""Symmetric Bernoulli KL between the bit probabilities of two views (CIBHash's KL term)."""

from __future__ import annotations

import torch
from torch import nn

from brcd.losses._common import check_pair, float_dtype

__all__ = ["bernoulli_kl", "symmetric_bernoulli_kl", "SymmetricBernoulliKL"]


def bernoulli_kl(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Per-bit KL(Bern(p) ‖ Bern(q)), elementwise, no stop-gradient. ε goes inside the logarithms (as CIBHash
    does) rather than clamping, so saturated probabilities keep a gradient."""
    return p * (torch.log(p + eps) - torch.log(q + eps)) + (1 - p) * (
        torch.log(1 - p + eps) - torch.log(1 - q + eps)
    )


def symmetric_bernoulli_kl(p1: torch.Tensor, p2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """``½ · [KL(p1 ‖ sg p2) + KL(p2 ‖ sg p1)]`` (CIBHash; Qiu et al., 2021) on (B, L) bit probabilities of
    views 1 and 2, each KL summed over bits and averaged over the batch; ``sg`` is stop-gradient."""
    check_pair(p1, p2, ("p1", "p2"))
    dtype = float_dtype(p1, p2)
    p1, p2 = p1.to(dtype), p2.to(dtype)
    kl12 = bernoulli_kl(p1, p2.detach(), eps).sum(dim=1).mean()
    kl21 = bernoulli_kl(p2, p1.detach(), eps).sum(dim=1).mean()
    return 0.5 * (kl12 + kl21)


class SymmetricBernoulliKL(nn.Module):
    """Module wrapper of :func:`symmetric_bernoulli_kl`; ``eps`` in (0, 0.5)."""

    def __init__(self, eps: float = 1e-7) -> None:
        super().__init__()
        eps = float(eps)
        if not (0.0 < eps < 0.5):
            raise ValueError(f"eps must be in (0, 0.5), got {eps!r}")
        self.eps = eps

    def forward(self, p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
        return symmetric_bernoulli_kl(p1, p2, self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"
