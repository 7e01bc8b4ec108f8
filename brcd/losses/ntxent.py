"""NT-Xent (normalised temperature-scaled cross-entropy), the contrastive half of CIBHash."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from brcd.losses._common import check_pair, check_temperature, cosine_matrix, float_dtype

__all__ = ["nt_xent", "NTXentLoss"]


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.3) -> torch.Tensor:
    """NT-Xent over the 2B rows of ``Z = [z1; z2]`` (SimCLR; Chen et al., 2020), partner ``π(a) = a ± B``::

        L = 1/(2B) · Σ_a [ −sim(a, π(a)) + log Σ_{b ≠ a} exp(sim(a, b)) ],   sim(a, b) = cos(Z_a, Z_b) / τ

    ``z1``, ``z2``: (B, L) codes of views 1 and 2. A zero row has cosine 0 with everything (no NaN).
    """
    check_pair(z1, z2, ("z1", "z2"))
    tau = check_temperature(temperature)
    dtype = float_dtype(z1, z2)
    b = z1.shape[0]
    z = torch.cat([z1, z2], dim=0).to(dtype)
    logits = cosine_matrix(z) / tau
    n = 2 * b
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(eye, float("-inf"))
    idx = torch.arange(n, device=z.device)
    targets = (idx + b) % n
    return F.cross_entropy(logits, targets)


class NTXentLoss(nn.Module):
    """Module wrapper of :func:`nt_xent` (CIBHash default τ = 0.3)."""

    def __init__(self, temperature: float = 0.3) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return nt_xent(z1, z2, self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
