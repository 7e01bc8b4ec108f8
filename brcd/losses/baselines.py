"""Classic knowledge-distillation baselines adapted to hashing, for comparison runs.

Every function maps the student's and the teacher's (B, L) real outputs (logits or codes; the teacher side
detached) to a scalar; a baseline run adds ``weight · BASELINES[name](student, teacher)`` to the student's
``teacher_objective``. No FitNet (nor in the public code): no hint layer exists between a frozen ViT
teacher and a frozen CNN student.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from brcd.losses._common import check_nonnegative, check_pair, check_temperature, float_dtype, normalize_rows

__all__ = ["hinton_kd", "rkd", "pkt", "sp", "crd", "BASELINES", "BaselineKDLoss"]


def _prepare(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    check_pair(student, teacher, ("student", "teacher"))
    dtype = float_dtype(student, teacher)
    return student.to(dtype), teacher.detach().to(device=student.device, dtype=dtype)


def hinton_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float = 4.0) -> torch.Tensor:
    """Hinton et al. (2015) knowledge distillation on bit probabilities ``q = σ(t/T)``, ``p = σ(s/T)``::

        L = T² · mean_k Σ_l KL(Bern(q_kl) ‖ Bern(p_kl))      (computed with log σ)

    Pass (B, L) pre-sign logits for both; {-1,+1} teacher codes give soft targets σ(±1/T). Public code: T = 4.
    """
    s, t = _prepare(student_logits, teacher_logits)
    temp = check_temperature(T, "T")
    log_p, log_1mp = F.logsigmoid(s / temp), F.logsigmoid(-s / temp)
    log_q, log_1mq = F.logsigmoid(t / temp), F.logsigmoid(-t / temp)
    q = torch.sigmoid(t / temp)
    kl = q * (log_q - log_p) + (1 - q) * (log_1mq - log_1mp)
    return kl.sum(dim=1).mean() * temp * temp


def _pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    sq = (x * x).sum(dim=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    # Equal rows (frequent with binary codes) get distance exactly 0 and a zero gradient (no NaN).
    d = torch.where(d2 > 1e-12, d2.clamp_min(1e-12).sqrt(), torch.zeros_like(d2))
    eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    return d.masked_fill(eye, 0.0)


def _angles(x: torch.Tensor) -> torch.Tensor:
    """(B, B, B) tensor A[j, i, k] = <e_ij, e_kj>, e_ij = (x_i − x_j)/||x_i − x_j|| (0 when equal)."""
    diff = x[None, :, :] - x[:, None, :]  # diff[j, i] = x_i − x_j
    e = F.normalize(diff, p=2.0, dim=2, eps=1e-8)
    return e @ e.transpose(1, 2)


def rkd(student: torch.Tensor, teacher: torch.Tensor, w_dist: float = 25.0, w_angle: float = 50.0) -> torch.Tensor:
    """Relational knowledge distillation (Park et al., CVPR 2019): distance + angle terms::

        L = w_dist · mean_{i≠j} Huber(ψ_D^s − ψ_D^t) + w_angle · mean_{i,j,k distinct} Huber(ψ_A^s − ψ_A^t)

    ``ψ_D(i, j) = ||x_i − x_j|| / μ`` (μ: mean distance over distinct pairs), ``ψ_A(i, j, k) = <e_ij, e_kj>``,
    Huber δ = 1. Needs B >= 3; the angle term costs O(B³ · L) memory. Public code: w_dist 25, w_angle 50.
    """
    s, t = _prepare(student, teacher)
    w_d = check_nonnegative(w_dist, "w_dist")
    w_a = check_nonnegative(w_angle, "w_angle")
    b = s.shape[0]
    if b < 3:
        raise ValueError(f"rkd needs a batch of at least 3 (angles use triplets), got {b}")
    off = ~torch.eye(b, dtype=torch.bool, device=s.device)
    with torch.no_grad():
        td = _pairwise_distances(t)
        td = td / td[off].mean().clamp_min(1e-12)
    sd = _pairwise_distances(s)
    sd = sd / sd[off].mean().clamp_min(1e-12)
    loss_d = F.smooth_l1_loss(sd[off], td[off])

    distinct = off[:, :, None] & off[:, None, :] & off[None, :, :]  # j≠i, j≠k, i≠k
    with torch.no_grad():
        ta = _angles(t)[distinct]
    sa = _angles(s)[distinct]
    loss_a = F.smooth_l1_loss(sa, ta)
    return w_d * loss_d + w_a * loss_a


def pkt(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018), cosine kernel::

        L = mean_{i,j} P^t_ij · log( (P^t_ij + ε) / (P^s_ij + ε) ),   P_ij = K_ij / Σ_j K_ij,
        K_ij = (cos(x_i, x_j) + 1)/2   (diagonal included and mean over B² entries, as the authors' code)
    """
    s, t = _prepare(student, teacher)

    def cond_prob(x: torch.Tensor) -> torch.Tensor:
        xn = normalize_rows(x)
        k = (xn @ xn.T + 1.0) / 2.0
        return k / k.sum(dim=1, keepdim=True)

    ps = cond_prob(s)
    with torch.no_grad():
        pt = cond_prob(t)
    return (pt * torch.log((pt + eps) / (ps + eps))).mean()


def sp(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Similarity-preserving KD (Tung & Mori, ICCV 2019): ``|| Ĝ^s − Ĝ^t ||_F² / B²``, ``Ĝ`` the row-normalised
    Gram matrix ``X Xᵀ``."""
    s, t = _prepare(student, teacher)
    b = s.shape[0]
    gs = normalize_rows(s @ s.T)
    with torch.no_grad():
        gt = normalize_rows(t @ t.T)
    return ((gs - gt) ** 2).sum() / (b * b)


def crd(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """CRD-style in-batch contrastive distillation (after Tian et al., ICLR 2020), ``S_ij = cos(s_i, t_j) / τ``::

        L = ½ · [ CE(S, diag) + CE(Sᵀ, diag) ]   (InfoNCE in both directions)

    Unlike published CRD: the negatives are the B − 1 other images of the batch (no 16k memory bank, no NCE
    estimator) and there are no projection heads (both sides live in the same L-bit space).
    """
    s, t = _prepare(student, teacher)
    tau = check_temperature(temperature)
    logits = normalize_rows(s) @ normalize_rows(t).T / tau
    target = torch.arange(s.shape[0], device=s.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


#: name -> baseline function ``f(student, teacher, **kwargs) -> scalar``.
BASELINES: dict[str, Callable[..., torch.Tensor]] = {"kd": hinton_kd, "rkd": rkd, "pkt": pkt, "sp": sp, "crd": crd}


class BaselineKDLoss(nn.Module):
    """Module wrapper around ``BASELINES[name]`` with its keyword arguments (``T``, ``w_dist``, ...);
    ``ValueError`` on an unknown name or keyword, or a bad value (checked on a tiny batch)."""

    def __init__(self, name: str, **kwargs: Any) -> None:
        super().__init__()
        if name not in BASELINES:
            raise ValueError(f"unknown KD baseline {name!r}; choose one of {sorted(BASELINES)}")
        self.name = name
        self.kwargs = dict(kwargs)
        probe = torch.linspace(-1.0, 1.0, 12).reshape(3, 4)
        try:
            BASELINES[name](probe, probe.flip(0), **self.kwargs)
        except TypeError as exc:
            raise ValueError(f"bad arguments for KD baseline {name!r}: {exc}") from None

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return BASELINES[self.name](student, teacher, **self.kwargs)

    def extra_repr(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.kwargs.items())
        return f"name={self.name!r}" + (f", {args}" if args else "")
