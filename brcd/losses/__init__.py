"""Training objectives: one per module, each a pure function plus a thin ``nn.Module`` wrapper.

- :mod:`~brcd.losses.ntxent`: NT-Xent (:func:`nt_xent`, :class:`NTXentLoss`);
- :mod:`~brcd.losses.bernoulli_kl`: symmetric Bernoulli KL (:func:`symmetric_bernoulli_kl`);
- :mod:`~brcd.losses.teacher`: the CIBHash objective (:func:`teacher_objective`);
- :mod:`~brcd.losses.brcd`: the BRCD distillation loss (:func:`brcd_loss`, :class:`BRCDLoss`) and
  the student total (:func:`distillation_objective`, :class:`DistillationLoss`);
- :mod:`~brcd.losses.baselines`: KD baselines (:data:`BASELINES`);
- :mod:`~brcd.losses.nhl`: nested hash layer objectives (imported as ``brcd.losses.nhl``).
"""

from brcd.losses.baselines import BASELINES, BaselineKDLoss, crd, hinton_kd, pkt, rkd, sp
from brcd.losses.bernoulli_kl import SymmetricBernoulliKL, bernoulli_kl, symmetric_bernoulli_kl
from brcd.losses.brcd import (
    RELEASED_FALSE_NEGATIVE_PENALTY,
    BRCDLogits,
    BRCDLoss,
    DistillationLoss,
    brcd_logits,
    brcd_loss,
    distillation_objective,
    nearest_centroid,
)
from brcd.losses.ntxent import NTXentLoss, nt_xent
from brcd.losses.teacher import TeacherLoss, teacher_objective

__all__ = [
    "BASELINES",
    "BaselineKDLoss",
    "crd",
    "hinton_kd",
    "pkt",
    "rkd",
    "sp",
    "SymmetricBernoulliKL",
    "bernoulli_kl",
    "symmetric_bernoulli_kl",
    "RELEASED_FALSE_NEGATIVE_PENALTY",
    "BRCDLogits",
    "BRCDLoss",
    "DistillationLoss",
    "brcd_logits",
    "brcd_loss",
    "distillation_objective",
    "nearest_centroid",
    "NTXentLoss",
    "nt_xent",
    "TeacherLoss",
    "teacher_objective",
]
