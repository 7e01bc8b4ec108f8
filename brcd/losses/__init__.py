"""Training objectives: one per module, each a pure function plus a thin ``nn.Module`` wrapper.

The names below (module -> names) are imported on first use: :mod:`brcd.config` reads :class:`BRCDOptions`
from here, and the CLI must load a config without importing torch. :mod:`~brcd.losses.nhl`,
:mod:`~brcd.losses.asymmetric` and :mod:`~brcd.losses.djsrh` are imported as modules.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "baselines": ("BASELINES", "BaselineKDLoss", "crd", "hinton_kd", "pkt", "rkd", "sp"),
    "bernoulli_kl": ("SymmetricBernoulliKL", "bernoulli_kl", "symmetric_bernoulli_kl"),
    "brcd": ("RELEASED_FALSE_NEGATIVE_PENALTY", "BRCDLogits", "BRCDLoss", "DistillationLoss", "brcd_logits",
             "brcd_loss", "distillation_objective", "nearest_centroid"),
    "ntxent": ("NTXentLoss", "nt_xent"),
    "options": ("BRCDOptions",),
    "teacher": ("TeacherLoss", "student_objective", "teacher_objective"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = list(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    globals()[name] = value
    return value
