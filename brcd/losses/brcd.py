"""BRCD: bit-mask robust contrastive knowledge distillation (He et al., WWW 2024).

The objective is specified in ``docs/METHOD.md`` ("The distillation objective"); the public
code's behaviour and bugs are in the same file ("The public code's bugs"). Everything
here is vectorised over the batch: no Python loop runs over samples, columns or clusters.

Notation for a batch of B images (row k = image k):

- ``s_k``  student code of view 1 (carries the gradient, straight-through friendly);
- ``t_k``  teacher code of the same view 1; ``t'_k`` teacher code of view 2 (both treated as
  constants: they are detached here);
- ``c_k``  pseudo-label (k-means cluster of the teacher's clean code), ``m_c`` the bit mask of
  cluster c, ``μ_j`` the k-means centroids;
- ``ŝ_k = s_k ⊙ m_{c_k}``, ``t̂'_k = t'_k ⊙ m_{c_k}``, ``Z = [ŝ_1..ŝ_B ; t̂'_1..t̂'_B]`` (2B rows),
  partner ``π(a) = a ± B``, ``k(a) = a mod B``.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from brcd.losses._common import (
    check_nonnegative,
    check_pair,
    check_temperature,
    check_unit_interval,
    cosine_matrix,
    float_dtype,
    rowwise_cosine,
)
from brcd.losses.teacher import teacher_objective

__all__ = [
    "RELEASED_FALSE_NEGATIVE_PENALTY",
    "BRCDLogits",
    "brcd_logits",
    "brcd_loss",
    "nearest_centroid",
    "BRCDLoss",
    "distillation_objective",
    "DistillationLoss",
]

#: What the public code adds to a false negative's logit (instead of removing it).
RELEASED_FALSE_NEGATIVE_PENALTY = -1000.0


class BRCDLogits(NamedTuple):
    """Everything :func:`brcd_logits` builds for one batch (2B rows, B pairs).

    Attributes:
        logits: (2B, 2B). Row a is the cross-entropy input of anchor a: column ``π(a)`` holds the
            positive logit ℓ⁺_a, column a is −inf (a row is never its own negative), every other
            column b holds ``cos(Z_a, Z_b)/τ``; a removed false negative is −inf (intended) or has
            −1000 added (``released``).
        targets: (2B,) long, ``π(a)``: the column of the positive.
        false_negatives: (2B, 2B) bool, negatives flagged as false negatives (never a or π(a)).
        offset_positives: (B,) bool, pairs whose α_k was switched to 1 because the teacher's view-2
            code left the image's cluster (only when offset positives are on and the individual
            term is available).
        left_cluster: (B,) bool, ``ĉ'_k ≠ c_k`` whatever the switches (diagnostic).
        assigned: (B,) long, ``ĉ'_k``, the cluster assigned to the teacher's view-2 code.
        column_labels: (2B,) long, cluster of each column for the false-negative test.
        alpha: (B,) effective mixing weight α_k of each pair.
        row_masks: (B, L) the bit mask applied to row k (``m_{c_k}``, ones, or zeros).
        individual: (B,) ``cos(s_k, t_k)`` on unmasked codes.
        structural: (B,) ``cos(ŝ_k, t̂'_k)`` on masked codes.
        positive: (2B,) ℓ⁺_a (already divided by τ).
    """

    logits: torch.Tensor
    targets: torch.Tensor
    false_negatives: torch.Tensor
    offset_positives: torch.Tensor
    left_cluster: torch.Tensor
    assigned: torch.Tensor
    column_labels: torch.Tensor
    alpha: torch.Tensor
    row_masks: torch.Tensor
    individual: torch.Tensor
    structural: torch.Tensor
    positive: torch.Tensor


def _nearest_centroid(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """argmin_j ||x_k − μ_j||² per row (float64; ties go to the lowest index)."""
    x64 = x.to(torch.float64)
    c64 = centroids.to(device=x.device, dtype=torch.float64)
    d = (x64 * x64).sum(1, keepdim=True) - 2.0 * (x64 @ c64.T) + (c64 * c64).sum(1)[None, :]
    return d.argmin(dim=1)


@torch.no_grad()
def nearest_centroid(codes: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """``ĉ_k = argmin_j ||x_k − μ_j||²`` for every row of ``codes`` (B, L) against ``centroids`` (K, L).

    Long (B,) on ``codes``' device; computed in float64, ties go to the lowest index; no gradient.
    This is the assignment :func:`brcd_logits` makes internally for the teacher's view-2 code
    (intended mode). Nested (NHL) distillation computes it once per batch on the longest code and
    passes it to every length's loss as ``assigned``.
    """
    if not isinstance(codes, torch.Tensor) or codes.ndim != 2:
        raise ValueError("codes must be a (batch, bits) tensor")
    if not isinstance(centroids, torch.Tensor) or centroids.ndim != 2 or centroids.shape[0] < 1:
        raise ValueError("centroids must be a (clusters, bits) tensor")
    if centroids.shape[1] != codes.shape[1]:
        raise ValueError(f"centroids have {centroids.shape[1]} bits but the codes have {codes.shape[1]}")
    return _nearest_centroid(codes.detach(), centroids.detach())


def _check_assigned(assigned: Any, b: int, k: int) -> torch.Tensor:
    if not isinstance(assigned, torch.Tensor) or assigned.shape != (b,):
        shape = tuple(assigned.shape) if isinstance(assigned, torch.Tensor) else type(assigned).__name__
        raise ValueError(f"assigned must be a tensor of shape ({b},) (one cluster per image), got {shape}")
    if assigned.is_floating_point() or assigned.is_complex() or assigned.dtype == torch.bool:
        raise ValueError(f"assigned must be an integer tensor (long), got {assigned.dtype}")
    if b and (int(assigned.min()) < 0 or int(assigned.max()) >= k):
        raise ValueError(
            f"assigned must hold cluster ids in [0, {k - 1}], got values in [{int(assigned.min())}, {int(assigned.max())}]"
        )
    return assigned


def _validate_brcd_inputs(
    student_codes: torch.Tensor,
    teacher_codes: torch.Tensor,
    teacher_aug_codes: torch.Tensor,
    pseudo_labels: torch.Tensor,
    masks: torch.Tensor,
    centroids: torch.Tensor,
) -> None:
    check_pair(student_codes, teacher_codes, ("student_codes", "teacher_codes"))
    check_pair(student_codes, teacher_aug_codes, ("student_codes", "teacher_aug_codes"))
    b, bits = student_codes.shape
    if not isinstance(pseudo_labels, torch.Tensor) or pseudo_labels.shape != (b,):
        shape = tuple(pseudo_labels.shape) if isinstance(pseudo_labels, torch.Tensor) else type(pseudo_labels)
        raise ValueError(f"pseudo_labels must be a tensor of shape ({b},), got {shape}")
    if pseudo_labels.is_floating_point() or pseudo_labels.is_complex() or pseudo_labels.dtype == torch.bool:
        raise ValueError(f"pseudo_labels must be an integer tensor (long), got {pseudo_labels.dtype}")
    for t, n in ((masks, "masks"), (centroids, "centroids")):
        if not isinstance(t, torch.Tensor) or t.ndim != 2 or t.shape[0] < 1:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t)
            raise ValueError(f"{n} must be a (clusters, bits) tensor, got {shape}")
        if t.shape[1] != bits:
            raise ValueError(f"{n} has {t.shape[1]} bits but the codes have {bits}")
    if masks.shape != centroids.shape:
        raise ValueError(
            f"masks {tuple(masks.shape)} and centroids {tuple(centroids.shape)} must both be (clusters, bits)"
        )
    k = masks.shape[0]
    lo, hi = int(pseudo_labels.min()), int(pseudo_labels.max())
    if lo < 0 or hi >= k:
        raise ValueError(
            f"pseudo_labels must be cluster ids in [0, {k - 1}], got values in [{lo}, {hi}] "
            "(do the labels come from the same cluster artifact as the masks?)"
        )


@torch.no_grad()
def _stats(out: BRCDLogits, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "loss": loss.detach(),
        "offset_fraction": out.offset_positives.float().mean(),
        "left_cluster_fraction": out.left_cluster.float().mean(),
        "alpha_mean": out.alpha.detach().float().mean(),
        "false_negatives_per_row": out.false_negatives.float().sum(dim=1).mean(),
        "kept_bit_fraction": out.row_masks.float().mean(),
        "positive_individual": out.individual.detach().float().mean(),
        "positive_structural": out.structural.detach().float().mean(),
    }


def brcd_logits(
    student_codes: torch.Tensor,
    teacher_codes: torch.Tensor,
    teacher_aug_codes: torch.Tensor,
    pseudo_labels: torch.Tensor,
    masks: torch.Tensor,
    centroids: torch.Tensor,
    *,
    temperature: float = 0.3,
    alpha: float = 0.8,
    use_mask: bool = True,
    use_false_negatives: bool = True,
    use_offset_positives: bool = True,
    use_structural: bool = True,
    use_individual: bool = True,
    released: bool = False,
    assigned: torch.Tensor | None = None,
) -> BRCDLogits:
    """Build the (2B, 2B) BRCD logit matrix and every flag behind it. See :func:`brcd_loss`.

    ``F.cross_entropy(out.logits, out.targets)`` is the BRCD loss. Arguments are those of
    :func:`brcd_loss` (``assigned`` included).
    """
    _validate_brcd_inputs(student_codes, teacher_codes, teacher_aug_codes, pseudo_labels, masks, centroids)
    tau = check_temperature(temperature)
    base_alpha = check_unit_interval(alpha, "alpha")
    if not (use_structural or use_individual):
        raise ValueError("use_structural and use_individual cannot both be False: the positive would be empty")

    dtype = float_dtype(student_codes)
    device = student_codes.device
    s = student_codes.to(dtype)
    t = teacher_codes.detach().to(device=device, dtype=dtype)
    tp = teacher_aug_codes.detach().to(device=device, dtype=dtype)
    c = pseudo_labels.to(device=device, dtype=torch.long)
    b = s.shape[0]
    n = 2 * b

    # Bit masks of each image's cluster (rows k and k + B both use m_{c_k}).
    if not use_mask:
        row_masks = torch.ones_like(t)
    elif released:
        row_masks = torch.zeros_like(t)  # B1: the public mask file is all zeros for every δ < 1
    else:
        row_masks = masks.detach().to(device=device, dtype=dtype)[c]
    s_hat = s * row_masks
    tp_hat = tp * row_masks
    z = torch.cat([s_hat, tp_hat], dim=0)

    with torch.no_grad():
        # ĉ'_k: nearest centroid of the teacher's view-2 code. Intended: the unmasked t'_k.
        # Released (B3): the masked t̂'_k against unmasked centroids.
        if assigned is None:
            assigned = _nearest_centroid(tp_hat if released else tp, centroids)
        else:  # given by the caller (e.g. NHL: once per batch on the longest code, shared by all lengths)
            assigned = _check_assigned(assigned, b, masks.shape[0]).to(device=device, dtype=torch.long)
        left_cluster = assigned != c
        if use_offset_positives and use_individual:
            offset_positives = left_cluster
        else:  # no switch, or no individual term to fall back on: keep the pair's positive as is
            offset_positives = torch.zeros_like(left_cluster)
        if not use_structural:
            alpha_vec = torch.ones(b, device=device, dtype=dtype)
        elif not use_individual:
            alpha_vec = torch.zeros(b, device=device, dtype=dtype)
        else:
            alpha_vec = torch.full((b,), base_alpha, device=device, dtype=dtype)
            alpha_vec = torch.where(offset_positives, torch.ones_like(alpha_vec), alpha_vec)

        idx = torch.arange(n, device=device)
        targets = (idx + b) % n
        eye = torch.eye(n, dtype=torch.bool, device=device)
        partner = torch.zeros_like(eye)
        partner[idx, targets] = True
        # Cluster of each column: student columns c_b, teacher-view columns ĉ'_b. Released mode
        # without offset positives follows the public --false_neg branch, which uses c_b there too.
        teacher_col = c if (released and not use_offset_positives) else assigned
        column_labels = torch.cat([c, teacher_col])
        # Cluster of each row: the row's image's pseudo-label c_{k(a)} for both rows of a pair.
        # (The public code's `down_m = up_m` copies the anchor rows' flags to the teacher-view
        # rows; as the anchor rows already test against c_{k(a)} this yields the same flags.)
        row_labels = torch.cat([c, c])
        if use_false_negatives:
            false_negatives = (row_labels[:, None] == column_labels[None, :]) & ~eye & ~partner
        else:
            false_negatives = torch.zeros_like(eye)

    individual = rowwise_cosine(s, t)  # unmasked codes
    sim = cosine_matrix(z)  # zero rows -> cosine 0, never NaN
    structural = sim[idx[:b], idx[:b] + b]  # cos(ŝ_k, t̂'_k) = cos(Z_a, Z_π(a)) for both rows
    pos_pair = alpha_vec * individual + (1 - alpha_vec) * structural
    positive = torch.cat([pos_pair, pos_pair]) / tau

    logits = sim / tau
    if released:
        logits = logits + false_negatives.to(dtype) * RELEASED_FALSE_NEGATIVE_PENALTY
    else:
        logits = logits.masked_fill(false_negatives, float("-inf"))
    logits = logits.masked_fill(eye, float("-inf"))
    # The positive column is always finite, so no row's log-sum-exp is ever −inf / NaN.
    logits = torch.where(partner, positive[:, None], logits)
    return BRCDLogits(
        logits=logits,
        targets=targets,
        false_negatives=false_negatives,
        offset_positives=offset_positives,
        left_cluster=left_cluster,
        assigned=assigned,
        column_labels=column_labels,
        alpha=alpha_vec,
        row_masks=row_masks,
        individual=individual,
        structural=structural,
        positive=positive,
    )


def brcd_loss(
    student_codes: torch.Tensor,
    teacher_codes: torch.Tensor,
    teacher_aug_codes: torch.Tensor,
    pseudo_labels: torch.Tensor,
    masks: torch.Tensor,
    centroids: torch.Tensor,
    *,
    temperature: float = 0.3,
    alpha: float = 0.8,
    use_mask: bool = True,
    use_false_negatives: bool = True,
    use_offset_positives: bool = True,
    use_structural: bool = True,
    use_individual: bool = True,
    released: bool = False,
    assigned: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """BRCD distillation loss (``docs/METHOD.md``, "The distillation objective").

    With ``Z = [ŝ; t̂']`` (2B rows, ``ŝ_k = s_k ⊙ m_{c_k}``, ``t̂'_k = t'_k ⊙ m_{c_k}``), partner
    ``π(a) = a ± B`` and ``k = k(a)``::

        ℓ⁺_a  = [ α_k · cos(s_k, t_k) + (1 − α_k) · cos(Z_a, Z_π(a)) ] / τ
        ℓ_ab  = cos(Z_a, Z_b) / τ                      for b ∉ {a, π(a)}, b not a false negative
        L     = 1/(2B) · Σ_a [ −ℓ⁺_a + log( exp(ℓ⁺_a) + Σ_b exp(ℓ_ab) ) ]

    - individual term ``cos(s_k, t_k)``: unmasked codes (what asymmetric search needs);
    - structural term ``cos(ŝ_k, t̂'_k)`` and all negatives: masked codes (symmetric search);
    - a cosine with a zero vector (fully masked row) is 0, never NaN;
    - **false negatives** (``use_false_negatives``): column b is removed from row a's
      log-sum-exp (logit −∞) when its cluster equals ``c_{k(a)}``; student columns use ``c_b``,
      teacher-view columns use ``ĉ'_b``. The positive is never removed, so no row becomes NaN;
    - **offset positives** (``use_offset_positives``): ``ĉ'_k = argmin_j ||t'_k − μ_j||²`` on the
      *unmasked* ``t'_k``; if ``ĉ'_k ≠ c_k`` then ``α_k := 1`` for both rows of pair k.

    Switches (each independent, for ablations):

    - ``use_mask=False``: every mask is all ones (Z holds the full codes).
    - ``use_structural=False``: ``α_k = 1`` for every pair (positive = individual term only; the
      masked negatives stay).
    - ``use_individual=False``: ``α_k = 0`` for every pair. Offset positives then have no
      individual term to fall back on, so they are **not** applied: the pair keeps its structural
      positive (``offset_fraction`` reports 0; ``left_cluster_fraction`` still shows how often the
      view left its cluster). False negatives still use ``ĉ'``.
    - ``use_offset_positives=False``: α is never switched, but ``ĉ'`` (nearest centroid of the
      unmasked ``t'``) is still computed and used as the teacher-view columns' cluster in the
      false-negative test, as docs/METHOD.md defines it independently of the offset switch.
    - both ``use_structural`` and ``use_individual`` False: ``ValueError``.

    ``released=True`` reproduces what the public code (hly1998/BRCD, ``--revise_distance
    --false_pos``) effectively trains. Differences from the intended mode, all else equal:

    1. mask: all zeros whatever ``masks`` holds (bug B1), so when ``use_mask`` is on every row of
       Z is the zero vector and every structural cosine and every negative is 0. With
       ``use_mask=False`` the mask is all ones, as in the public code without
       ``--revise_distance``;
    2. assignment: ``ĉ'_k`` is the nearest centroid of the *masked* ``t̂'_k`` (bug B3); with the
       zero mask every view goes to the centroid of smallest norm, whatever ``t'`` is;
    3. false negatives: ``−1000`` is *added* to the logit instead of removing it (numerically the
       same in float32 as exp(−1000) underflows to 0); with ``use_offset_positives=False`` the
       teacher-view columns use ``c_b`` instead of ``ĉ'_b`` (the public ``--false_neg`` branch);
    4. teacher-view rows reuse the anchor rows' flags (``down_m = up_m``, bug B9). Both rows of a
       pair already test against the image's own label ``c_{k(a)}`` in the intended rule, so
       this gives identical flags; it is listed for completeness.

    Net effect of 1–2 (``docs/METHOD.md``, "Released mode"): the loss no longer depends on ``t'``
    once ``t`` is fixed; it trains the individual term only, against a constant set of negatives.

    Args:
        student_codes: (B, L) student code ``s`` of view 1 (with gradient).
        teacher_codes: (B, L) teacher code ``t`` of view 1 (detached here).
        teacher_aug_codes: (B, L) teacher code ``t'`` of view 2 (detached here).
        pseudo_labels: (B,) long, cluster ``c_k`` of each image.
        masks: (K, L) bit masks, 1 = keep (0/1; values in [0, 1] are accepted and multiply).
        centroids: (K, L) k-means centroids of the teacher's training codes.
        temperature: τ > 0.
        alpha: base mixing weight α in [0, 1] (paper CIFAR-10: 0.8).
        use_mask, use_false_negatives, use_offset_positives, use_structural, use_individual,
        released: switches, see above.
        assigned: optional (B,) long ``ĉ'`` (cluster of each teacher view-2 code) that replaces the
            internal nearest-centroid assignment (in both modes). ``None`` (default): computed here
            as described above. Nested (NHL) distillation passes the assignment of the longest
            code (:func:`nearest_centroid`) to every length so that all lengths agree on which
            views left their cluster.

    Returns:
        ``(loss, stats)``: scalar loss and a dict of detached 0-dim tensors (``float()`` them to
        log): ``loss``, ``offset_fraction`` (pairs whose α was switched to 1),
        ``left_cluster_fraction`` (pairs with ``ĉ'_k ≠ c_k``), ``alpha_mean``,
        ``false_negatives_per_row`` (mean count of removed negatives per row),
        ``kept_bit_fraction`` (mean of the applied masks), ``positive_individual`` (mean
        ``cos(s, t)``), ``positive_structural`` (mean ``cos(ŝ, t̂')``).

    Raises:
        ValueError: on shape / dtype mismatches, labels outside ``[0, K)``, τ <= 0, α outside
            [0, 1], or both positive terms switched off.
    """
    out = brcd_logits(
        student_codes,
        teacher_codes,
        teacher_aug_codes,
        pseudo_labels,
        masks,
        centroids,
        temperature=temperature,
        alpha=alpha,
        use_mask=use_mask,
        use_false_negatives=use_false_negatives,
        use_offset_positives=use_offset_positives,
        use_structural=use_structural,
        use_individual=use_individual,
        released=released,
        assigned=assigned,
    )
    loss = F.cross_entropy(out.logits, out.targets)
    return loss, _stats(out, loss)


def _as_float_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach().clone()
    else:
        try:
            t = torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name} must be an array of numbers: {exc}") from None
    if not (t.is_floating_point() or t.dtype in (torch.bool, torch.int8, torch.uint8, torch.int16,
                                                   torch.int32, torch.int64)):
        raise ValueError(f"{name} must be numeric, got {t.dtype}")
    t = t.to(torch.float32)
    if t.ndim != 2 or t.shape[0] < 1 or t.shape[1] < 1:
        raise ValueError(f"{name} must have shape (clusters, bits), got {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or inf")
    return t


class BRCDLoss(nn.Module):
    """Module wrapper of :func:`brcd_loss`; holds the cluster masks and centroids as buffers.

    Args:
        masks: (K, L) bit masks (tensor or array; 0/1, values in [0, 1] accepted).
        centroids: (K, L) k-means centroids (tensor or array).
        temperature: τ > 0.
        alpha: α in [0, 1].
        use_mask, use_false_negatives, use_offset_positives, use_structural, use_individual,
        released: see :func:`brcd_loss`.

    Raises:
        ValueError: bad shapes, NaN, mask values outside [0, 1], τ <= 0, α outside [0, 1], or both
            positive terms switched off.
    """

    masks: torch.Tensor
    centroids: torch.Tensor

    def __init__(
        self,
        masks: Any,
        centroids: Any,
        *,
        temperature: float = 0.3,
        alpha: float = 0.8,
        use_mask: bool = True,
        use_false_negatives: bool = True,
        use_offset_positives: bool = True,
        use_structural: bool = True,
        use_individual: bool = True,
        released: bool = False,
    ) -> None:
        super().__init__()
        m = _as_float_tensor(masks, "masks")
        mu = _as_float_tensor(centroids, "centroids")
        if m.shape != mu.shape:
            raise ValueError(
                f"masks {tuple(m.shape)} and centroids {tuple(mu.shape)} must both be (clusters, bits)"
            )
        if ((m < 0) | (m > 1)).any():
            raise ValueError("masks must hold values in [0, 1] (1 = keep the bit)")
        if not (use_structural or use_individual):
            raise ValueError("use_structural and use_individual cannot both be False: the positive would be empty")
        self.temperature = check_temperature(temperature)
        self.alpha = check_unit_interval(alpha, "alpha")
        self.use_mask = bool(use_mask)
        self.use_false_negatives = bool(use_false_negatives)
        self.use_offset_positives = bool(use_offset_positives)
        self.use_structural = bool(use_structural)
        self.use_individual = bool(use_individual)
        self.released = bool(released)
        self.register_buffer("masks", m)
        self.register_buffer("centroids", mu)

    @classmethod
    def from_arrays(cls, masks: Any, centroids: Any, **kwargs: Any) -> "BRCDLoss":
        """Build from (K, L) mask and centroid arrays (numpy or torch); ``kwargs`` as ``__init__``."""
        return cls(masks, centroids, **kwargs)

    @classmethod
    def from_artifact(cls, artifact: Any, **kwargs: Any) -> "BRCDLoss":
        """Build from a cluster artifact: a mapping with keys, or an object with attributes,
        ``masks`` and ``centroids``. ``kwargs`` as ``__init__``."""
        if isinstance(artifact, Mapping):
            missing = [k for k in ("masks", "centroids") if k not in artifact]
            if missing:
                raise ValueError(f"cluster artifact lacks {missing}: it needs 'masks' and 'centroids'")
            return cls(artifact["masks"], artifact["centroids"], **kwargs)
        if not (hasattr(artifact, "masks") and hasattr(artifact, "centroids")):
            raise ValueError(
                f"cluster artifact {type(artifact).__name__} needs 'masks' and 'centroids' attributes"
            )
        return cls(artifact.masks, artifact.centroids, **kwargs)

    @property
    def num_clusters(self) -> int:
        return int(self.masks.shape[0])

    @property
    def bits(self) -> int:
        return int(self.masks.shape[1])

    def options(self) -> dict[str, Any]:
        """The keyword options passed on to :func:`brcd_loss`."""
        return {
            "temperature": self.temperature,
            "alpha": self.alpha,
            "use_mask": self.use_mask,
            "use_false_negatives": self.use_false_negatives,
            "use_offset_positives": self.use_offset_positives,
            "use_structural": self.use_structural,
            "use_individual": self.use_individual,
            "released": self.released,
        }

    def forward(
        self,
        student_codes: torch.Tensor,
        teacher_codes: torch.Tensor,
        teacher_aug_codes: torch.Tensor,
        pseudo_labels: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return brcd_loss(
            student_codes,
            teacher_codes,
            teacher_aug_codes,
            pseudo_labels,
            self.masks,
            self.centroids,
            **self.options(),
        )

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options().items())
        return f"clusters={self.num_clusters}, bits={self.bits}, {opts}"


def distillation_objective(
    student_logits1: torch.Tensor,
    student_logits2: torch.Tensor,
    student_codes1: torch.Tensor,
    student_codes2: torch.Tensor,
    teacher_codes: torch.Tensor,
    teacher_aug_codes: torch.Tensor,
    pseudo_labels: torch.Tensor,
    masks: torch.Tensor,
    centroids: torch.Tensor,
    *,
    temperature: float = 0.3,
    kl_weight: float = 1e-3,
    brcd_weight: float = 1.0,
    brcd_temperature: float | None = None,
    **brcd_options: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Student total objective: CIBHash on the student's own two views plus weighted BRCD::

        L = NT-Xent(s1, s2; τ) + β · L_KL(σ(h1), σ(h2)) + w · L_BRCD(s1, t, t', c; τ_BRCD)

    ``s1``/``s2`` are the student's codes of views 1 and 2, ``h1``/``h2`` its pre-sign logits,
    ``t``/``t'`` the teacher codes of views 1 and 2. The public code uses w = 1 and the same τ
    for both parts (``brcd_temperature=None`` reuses ``temperature``).

    Args:
        student_logits1, student_logits2: (B, L) student pre-sigmoid outputs of views 1 and 2.
        student_codes1, student_codes2: (B, L) straight-through student codes of views 1 and 2.
        teacher_codes, teacher_aug_codes: (B, L) teacher codes of views 1 and 2.
        pseudo_labels: (B,) long cluster ids.
        masks, centroids: (K, L) cluster bit masks and centroids.
        temperature: τ of NT-Xent (and of BRCD unless ``brcd_temperature`` is given).
        kl_weight: β >= 0.
        brcd_weight: w >= 0.
        brcd_temperature: optional separate τ for BRCD.
        **brcd_options: ``alpha`` and the switches of :func:`brcd_loss`.

    Returns:
        ``(loss, terms)``, ``terms`` detached 0-dim tensors: ``contrastive``, ``kl``,
        ``student_objective`` (= contrastive + β·kl), ``brcd``, ``total``, and every BRCD statistic
        under ``brcd/<name>``.
    """
    w = check_nonnegative(brcd_weight, "brcd_weight")
    own, own_terms = teacher_objective(
        student_logits1, student_logits2, student_codes1, student_codes2, temperature, kl_weight
    )
    tau_brcd = temperature if brcd_temperature is None else brcd_temperature
    distill, stats = brcd_loss(
        student_codes1,
        teacher_codes,
        teacher_aug_codes,
        pseudo_labels,
        masks,
        centroids,
        temperature=tau_brcd,
        **brcd_options,
    )
    loss = own + w * distill
    terms = {
        "contrastive": own_terms["contrastive"],
        "kl": own_terms["kl"],
        "student_objective": own.detach(),
        "brcd": distill.detach(),
        "total": loss.detach(),
    }
    terms.update({f"brcd/{k}": v for k, v in stats.items() if k != "loss"})
    return loss, terms


class DistillationLoss(nn.Module):
    """Module wrapper of :func:`distillation_objective` (holds a :class:`BRCDLoss`).

    Args:
        masks, centroids: (K, L) cluster bit masks and centroids.
        temperature: τ of NT-Xent and, unless ``brcd_temperature`` is given, of BRCD.
        kl_weight: β >= 0.
        brcd_weight: w >= 0.
        brcd_temperature: optional separate τ for BRCD.
        **brcd_options: ``alpha`` and the switches of :func:`brcd_loss`.

    Raises:
        ValueError: as :class:`BRCDLoss`, or on a negative weight.
    """

    def __init__(
        self,
        masks: Any,
        centroids: Any,
        *,
        temperature: float = 0.3,
        kl_weight: float = 1e-3,
        brcd_weight: float = 1.0,
        brcd_temperature: float | None = None,
        **brcd_options: Any,
    ) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.kl_weight = check_nonnegative(kl_weight, "kl_weight")
        self.brcd_weight = check_nonnegative(brcd_weight, "brcd_weight")
        tau_brcd = self.temperature if brcd_temperature is None else brcd_temperature
        self.brcd = BRCDLoss(masks, centroids, temperature=tau_brcd, **brcd_options)

    def forward(
        self,
        student_logits1: torch.Tensor,
        student_logits2: torch.Tensor,
        student_codes1: torch.Tensor,
        student_codes2: torch.Tensor,
        teacher_codes: torch.Tensor,
        teacher_aug_codes: torch.Tensor,
        pseudo_labels: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        opts = self.brcd.options()
        tau_brcd = opts.pop("temperature")
        return distillation_objective(
            student_logits1,
            student_logits2,
            student_codes1,
            student_codes2,
            teacher_codes,
            teacher_aug_codes,
            pseudo_labels,
            self.brcd.masks,
            self.brcd.centroids,
            temperature=self.temperature,
            kl_weight=self.kl_weight,
            brcd_weight=self.brcd_weight,
            brcd_temperature=tau_brcd,
            **opts,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, kl_weight={self.kl_weight}, brcd_weight={self.brcd_weight}"
