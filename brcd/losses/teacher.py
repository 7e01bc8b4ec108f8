"""The CIBHash objective: trains the teacher, and is the student's own objective during distillation."""

from __future__ import annotations

import torch
from torch import nn

from typing import Callable, Mapping

from brcd.losses._common import check_nonnegative, check_pair, check_temperature
from brcd.losses.bernoulli_kl import symmetric_bernoulli_kl
from brcd.losses.ntxent import nt_xent

__all__ = ["teacher_objective", "student_objective", "TeacherLoss"]


def teacher_objective(logits1: torch.Tensor, logits2: torch.Tensor, codes1: torch.Tensor, codes2: torch.Tensor,
                      temperature: float = 0.3, kl_weight: float = 1e-3) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CIBHash objective on two views (Qiu et al., IJCAI 2021)::

        L = NT-Xent(b1, b2; τ) + β · ½[KL(σ(h1) ‖ sg σ(h2)) + KL(σ(h2) ‖ sg σ(h1))]

    with ``h`` (``logits``, (B, L)) the pre-sign outputs of views 1 and 2, ``b = sign(σ(h) − ½)`` (``codes``)
    their straight-through codes and β = ``kl_weight``. Terms: ``contrastive``, ``kl``, ``total`` (detached).
    """
    check_pair(logits1, logits2, ("logits1", "logits2"))
    check_pair(codes1, codes2, ("codes1", "codes2"))
    check_pair(logits1, codes1, ("logits1", "codes1"))
    beta = check_nonnegative(kl_weight, "kl_weight")
    contrastive = nt_xent(codes1, codes2, check_temperature(temperature))
    kl = symmetric_bernoulli_kl(torch.sigmoid(logits1), torch.sigmoid(logits2))
    loss = contrastive + beta * kl
    terms = {"contrastive": contrastive.detach(), "kl": kl.detach(), "total": loss.detach()}
    return loss, terms


def student_objective(logits1: torch.Tensor, logits2: torch.Tensor, codes1: torch.Tensor, codes2: torch.Tensor,
                      temperature: float, kl_weight: float,
                      distill: tuple[str, Callable[[], tuple[torch.Tensor, Mapping[str, torch.Tensor] | None]]] | None = None,
                      weight: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A student's whole loss: :func:`teacher_objective` on its own two views plus ``weight`` times the
    distillation term ``distill = (name, term)`` (``None``: CIBHash alone); ``term()`` returns the loss and its
    statistics (or ``None``) and is called last, as autograd sums gradients in graph order (bit-identical
    training). Terms (the training metrics): ``contrastive``, ``kl``, ``total``, ``name`` and ``stat_<k>``.
    """
    loss, terms = teacher_objective(logits1, logits2, codes1, codes2, temperature, kl_weight)
    if distill is not None:
        name, term = distill
        kd, stats = term()
        loss = loss + weight * kd
        terms.update({name: kd.detach(), "total": loss.detach()})
        terms.update({f"stat_{k}": v for k, v in (stats or {}).items()})
    return loss, terms


class TeacherLoss(nn.Module):
    """Module wrapper of :func:`teacher_objective` (CIBHash defaults τ = 0.3, β = 0.001)."""

    def __init__(self, temperature: float = 0.3, kl_weight: float = 1e-3) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.kl_weight = check_nonnegative(kl_weight, "kl_weight")

    def forward(
        self, logits1: torch.Tensor, logits2: torch.Tensor, codes1: torch.Tensor, codes2: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return teacher_objective(logits1, logits2, codes1, codes2, self.temperature, self.kl_weight)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, kl_weight={self.kl_weight}"
