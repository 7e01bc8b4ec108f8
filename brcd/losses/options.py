"""The BRCD loss's settings, in a module without torch so that :mod:`brcd.config` can read them cheaply."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class BRCDOptions:
    """``alpha`` and the on/off switches of the BRCD loss (``docs/METHOD.md``, "Switches").

    The one list of them: :class:`brcd.config.DistillConfig` inherits these fields (the config keys
    ``distill.<name>``), every BRCD loss function takes them as an ``options`` object or as keywords of the
    same names, and ``brcd compare``'s ablation rows flip each switch."""

    alpha: float = 0.8  # base mixing weight of the individual term in the positive (paper CIFAR-10: 0.8)
    use_mask: bool = True
    use_false_negatives: bool = True
    use_offset_positives: bool = True
    use_structural: bool = True
    use_individual: bool = True
    released: bool = False  # reproduce the public code (all-zero mask, masked assignment)

    @classmethod
    def switches(cls) -> tuple[str, ...]:
        """The on/off switches (every boolean field), in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls) if isinstance(f.default, bool))

