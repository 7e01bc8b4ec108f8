"""BRCD: bit-mask robust contrastive knowledge distillation (He et al., WWW 2024).

The objective, its switches and released mode are specified in ``docs/METHOD.md`` ("The distillation
objective"); the public code's bugs are in the same file. Everything here is vectorised over the batch:
no Python loop runs over samples, columns or clusters.

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

import dataclasses
import functools
import inspect
from typing import Any, Callable, Mapping, NamedTuple, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from brcd.losses._common import (check_nonnegative, check_pair, check_temperature, check_unit_interval, cosine_matrix,
                                 float_dtype, rowwise_cosine)
from brcd.losses.options import BRCDOptions
from brcd.losses.teacher import student_objective

__all__ = ["RELEASED_FALSE_NEGATIVE_PENALTY", "BRCDLogits", "BRCDOptions", "brcd_options", "brcd_logits", "brcd_loss",
           "nearest_centroid", "BRCDLoss", "distillation_objective", "DistillationLoss"]

#: What the public code adds to a false negative's logit (instead of removing it).
RELEASED_FALSE_NEGATIVE_PENALTY = -1000.0

Fn = TypeVar("Fn", bound=Callable[..., Any])


def brcd_options(options: BRCDOptions | None = None, **switches: Any) -> BRCDOptions:
    """``options`` (default: the defaults) with the keyword ``switches`` applied over it, checked: α in
    [0, 1] and at least one positive term. An unknown keyword is a ``TypeError``."""
    o = dataclasses.replace(options or BRCDOptions(), **switches)
    check_unit_interval(o.alpha, "alpha")
    if not (o.use_structural or o.use_individual):
        raise ValueError("use_structural and use_individual cannot both be False: the positive would be empty")
    return o


def _takes_options(fn: Fn) -> Fn:
    """``fn(..., *, options, ...)`` also takes :class:`BRCDOptions`' fields as keywords (``alpha=0.5``); its
    signature lists them with their defaults, read from the dataclass (the one place they are spelled)."""
    fields = dataclasses.fields(BRCDOptions)

    @functools.wraps(fn)
    def wrapper(*args: Any, options: BRCDOptions | None = None, **kwargs: Any) -> Any:
        switches = {f.name: kwargs.pop(f.name) for f in fields if f.name in kwargs}
        return fn(*args, options=brcd_options(options, **switches), **kwargs)

    sig = inspect.signature(fn)
    keywords = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
                for f in fields]
    wrapper.__signature__ = sig.replace(parameters=[*sig.parameters.values(), *keywords])  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


class BRCDLogits(NamedTuple):
    """Everything :func:`brcd_logits` builds for one batch (2B rows, B pairs)."""

    logits: torch.Tensor  # (2B, 2B): column π(a) = ℓ⁺_a, column a = −inf, false negatives −inf (released: −1000)
    targets: torch.Tensor  # (2B,) long, π(a)
    false_negatives: torch.Tensor  # (2B, 2B) bool (never a or π(a))
    offset_positives: torch.Tensor  # (B,) bool, pairs whose α_k was switched to 1
    left_cluster: torch.Tensor  # (B,) bool, ĉ'_k ≠ c_k whatever the switches
    assigned: torch.Tensor  # (B,) long, ĉ'_k
    column_labels: torch.Tensor  # (2B,) long, cluster of each column for the false-negative test
    alpha: torch.Tensor  # (B,) effective α_k
    row_masks: torch.Tensor  # (B, L) mask applied to row k (m_{c_k}, ones, or zeros)
    individual: torch.Tensor  # (B,) cos(s_k, t_k), unmasked
    structural: torch.Tensor  # (B,) cos(ŝ_k, t̂'_k), masked
    positive: torch.Tensor  # (2B,) ℓ⁺_a, already divided by τ


@torch.no_grad()
def nearest_centroid(codes: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """``ĉ_k = argmin_j ||x_k − μ_j||²`` for every row of ``codes`` (B, L) against ``centroids`` (K, L): long
    (B,), computed in float64, ties to the lowest index, no gradient.

    Nested (NHL) distillation computes it once per batch on the longest code and passes it to every
    length as ``assigned``.
    """
    if not isinstance(codes, torch.Tensor) or codes.ndim != 2:
        raise ValueError("codes must be a (batch, bits) tensor")
    _check_clusters(centroids, "centroids", codes.shape[1])
    x64 = codes.detach().to(torch.float64)
    c64 = centroids.detach().to(device=x64.device, dtype=torch.float64)
    d = (x64 * x64).sum(1, keepdim=True) - 2.0 * (x64 @ c64.T) + (c64 * c64).sum(1)[None, :]
    return d.argmin(dim=1)


def _check_labels(labels: Any, name: str, b: int, k: int, hint: str = "") -> None:
    """``labels`` must be an integer (b,) tensor of cluster ids in [0, k)."""
    if not isinstance(labels, torch.Tensor) or labels.shape != (b,):
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"{name} must be a tensor of shape ({b},) (one cluster per image), got {shape}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor (long), got {labels.dtype}")
    if b and (int(labels.min()) < 0 or int(labels.max()) >= k):
        raise ValueError(f"{name} must be cluster ids in [0, {k - 1}], got values in "
                         f"[{int(labels.min())}, {int(labels.max())}]{hint}")


def _check_clusters(t: Any, name: str, bits: int) -> None:
    if not isinstance(t, torch.Tensor) or t.ndim != 2 or t.shape[0] < 1:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t)
        raise ValueError(f"{name} must be a (clusters, bits) tensor, got {shape}")
    if t.shape[1] != bits:
        raise ValueError(f"{name} has {t.shape[1]} bits but the codes have {bits}")


def _validate_brcd_inputs(student_codes: torch.Tensor, teacher_codes: torch.Tensor, teacher_aug_codes: torch.Tensor,
                          pseudo_labels: torch.Tensor, masks: torch.Tensor, centroids: torch.Tensor) -> None:
    check_pair(student_codes, teacher_codes, ("student_codes", "teacher_codes"))
    check_pair(student_codes, teacher_aug_codes, ("student_codes", "teacher_aug_codes"))
    b, bits = student_codes.shape
    _check_clusters(masks, "masks", bits)
    _check_clusters(centroids, "centroids", bits)
    if masks.shape != centroids.shape:
        raise ValueError(
            f"masks {tuple(masks.shape)} and centroids {tuple(centroids.shape)} must both be (clusters, bits)"
        )
    _check_labels(pseudo_labels, "pseudo_labels", b, masks.shape[0],
                  " (do the labels come from the same cluster artifact as the masks?)")


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


@torch.no_grad()
def _pair_flags(o: BRCDOptions, c: torch.Tensor, assigned: torch.Tensor, dtype: torch.dtype) -> dict[str, Any]:
    """Per pair: whether ``ĉ'_k ≠ c_k``, the offset positives and α_k; per logit: the false negatives."""
    b, device = c.shape[0], c.device
    n = 2 * b
    left_cluster = assigned != c
    # no switch, or no individual term to fall back on: the pair keeps its positive as it is
    offset_positives = left_cluster if o.use_offset_positives and o.use_individual else torch.zeros_like(left_cluster)
    base = 1.0 if not o.use_structural else 0.0 if not o.use_individual else float(o.alpha)
    alpha = torch.full((b,), base, device=device, dtype=dtype).masked_fill(offset_positives, 1.0)
    idx = torch.arange(n, device=device)
    targets = (idx + b) % n
    eye = torch.eye(n, dtype=torch.bool, device=device)
    partner = eye.roll(b, dims=1)  # partner[a, π(a)]
    # Cluster of each column: student columns c_b, teacher-view columns ĉ'_b. Released mode without
    # offset positives follows the public --false_neg branch, which uses c_b there too.
    column_labels = torch.cat([c, c if (o.released and not o.use_offset_positives) else assigned])
    # Cluster of each row: c_{k(a)} for both rows of a pair. (The public code's `down_m = up_m` copies the
    # anchor rows' flags to the teacher-view rows; it yields the same flags.)
    row_labels = torch.cat([c, c])
    if o.use_false_negatives:
        false_negatives = (row_labels[:, None] == column_labels[None, :]) & ~eye & ~partner
    else:
        false_negatives = torch.zeros_like(eye)
    return dict(targets=targets, eye=eye, partner=partner, false_negatives=false_negatives,
                offset_positives=offset_positives, left_cluster=left_cluster, column_labels=column_labels, alpha=alpha)


@_takes_options
def brcd_logits(student_codes: torch.Tensor, teacher_codes: torch.Tensor, teacher_aug_codes: torch.Tensor,
                pseudo_labels: torch.Tensor, masks: torch.Tensor, centroids: torch.Tensor, *, options: BRCDOptions,
                temperature: float = 0.3, assigned: torch.Tensor | None = None) -> BRCDLogits:
    """The (2B, 2B) BRCD logit matrix and every flag behind it; ``F.cross_entropy(out.logits, out.targets)``
    is :func:`brcd_loss` (same arguments)."""
    o = options
    _validate_brcd_inputs(student_codes, teacher_codes, teacher_aug_codes, pseudo_labels, masks, centroids)
    tau = check_temperature(temperature)
    dtype = float_dtype(student_codes)
    device = student_codes.device
    s = student_codes.to(dtype)
    t = teacher_codes.detach().to(device=device, dtype=dtype)
    tp = teacher_aug_codes.detach().to(device=device, dtype=dtype)
    c = pseudo_labels.to(device=device, dtype=torch.long)
    b = s.shape[0]

    # Bit masks of each image's cluster (rows k and k + B both use m_{c_k}).
    if not o.use_mask:
        row_masks = torch.ones_like(t)
    elif o.released:
        row_masks = torch.zeros_like(t)  # B1: the public mask file is all zeros for every δ < 1
    else:
        row_masks = masks.detach().to(device=device, dtype=dtype)[c]
    s_hat, tp_hat = s * row_masks, tp * row_masks
    with torch.no_grad():
        # ĉ'_k: nearest centroid of the teacher's view-2 code. Intended: the unmasked t'_k. Released (B3): the
        # masked t̂'_k against unmasked centroids. A caller's (NHL: the longest code's) replaces it.
        if assigned is None:
            assigned = nearest_centroid(tp_hat if o.released else tp, centroids)
        else:
            _check_labels(assigned, "assigned", b, masks.shape[0])
            assigned = assigned.to(device=device, dtype=torch.long)
    flags = _pair_flags(o, c, assigned, dtype)
    eye, partner, false_negatives = flags.pop("eye"), flags.pop("partner"), flags["false_negatives"]

    individual = rowwise_cosine(s, t)  # unmasked codes
    sim = cosine_matrix(torch.cat([s_hat, tp_hat], dim=0))  # zero rows -> cosine 0, never NaN
    k = torch.arange(b, device=device)
    structural = sim[k, k + b]  # cos(ŝ_k, t̂'_k) = cos(Z_a, Z_π(a)) for both rows
    pos_pair = flags["alpha"] * individual + (1 - flags["alpha"]) * structural
    positive = torch.cat([pos_pair, pos_pair]) / tau
    logits = sim / tau
    if o.released:
        logits = logits + false_negatives.to(dtype) * RELEASED_FALSE_NEGATIVE_PENALTY
    else:
        logits = logits.masked_fill(false_negatives, float("-inf"))
    logits = logits.masked_fill(eye, float("-inf"))
    # The positive column is always finite, so no row's log-sum-exp is ever −inf / NaN.
    logits = torch.where(partner, positive[:, None], logits)
    return BRCDLogits(logits=logits, assigned=assigned, row_masks=row_masks, individual=individual,
                      structural=structural, positive=positive, **flags)


@_takes_options
def brcd_loss(student_codes: torch.Tensor, teacher_codes: torch.Tensor, teacher_aug_codes: torch.Tensor,
              pseudo_labels: torch.Tensor, masks: torch.Tensor, centroids: torch.Tensor, *, options: BRCDOptions,
              temperature: float = 0.3,
              assigned: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """BRCD distillation loss (``docs/METHOD.md``, "The distillation objective", "Switches", "Released mode").

    With ``Z = [ŝ; t̂']`` (2B rows), partner ``π(a) = a ± B`` and ``k = k(a)``::

        ℓ⁺_a  = [ α_k · cos(s_k, t_k) + (1 − α_k) · cos(Z_a, Z_π(a)) ] / τ
        ℓ_ab  = cos(Z_a, Z_b) / τ                      for b ∉ {a, π(a)}, b not a false negative
        L     = 1/(2B) · Σ_a [ −ℓ⁺_a + log( exp(ℓ⁺_a) + Σ_b exp(ℓ_ab) ) ]

    A false negative (column b whose cluster equals ``c_{k(a)}``; teacher-view columns use ``ĉ'_b``) gets
    logit −∞ (released: −1000 added). An offset positive (``ĉ'_k ≠ c_k``) sets ``α_k := 1``, unless
    ``use_individual=False``. Masks (K, L) hold 1 = keep (values in [0, 1] multiply). ``assigned``: optional
    (B,) long ``ĉ'`` replacing the nearest-centroid assignment (NHL passes the longest code's to every length).

    Returns ``(loss, stats)``, stats detached 0-dim tensors: ``loss``, ``offset_fraction``,
    ``left_cluster_fraction`` (``ĉ'_k ≠ c_k``), ``alpha_mean``, ``false_negatives_per_row``,
    ``kept_bit_fraction``, ``positive_individual`` (mean ``cos(s, t)``), ``positive_structural``
    (mean ``cos(ŝ, t̂')``). ``ValueError`` on bad shapes / dtypes, labels outside ``[0, K)``, τ <= 0,
    α outside [0, 1], or both positive terms off.
    """
    out = brcd_logits(student_codes, teacher_codes, teacher_aug_codes, pseudo_labels, masks, centroids,
                      options=options, temperature=temperature, assigned=assigned)
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
    """Module wrapper of :func:`brcd_loss`; holds the (K, L) cluster masks and centroids (tensors or
    arrays; mask values in [0, 1]) as float32 buffers."""

    masks: torch.Tensor
    centroids: torch.Tensor

    @_takes_options
    def __init__(self, masks: Any, centroids: Any, *, options: BRCDOptions, temperature: float = 0.3) -> None:
        super().__init__()
        m = _as_float_tensor(masks, "masks")
        mu = _as_float_tensor(centroids, "centroids")
        if m.shape != mu.shape:
            raise ValueError(
                f"masks {tuple(m.shape)} and centroids {tuple(mu.shape)} must both be (clusters, bits)"
            )
        if ((m < 0) | (m > 1)).any():
            raise ValueError("masks must hold values in [0, 1] (1 = keep the bit)")
        self.temperature = check_temperature(temperature)
        self.options = options
        self.register_buffer("masks", m)
        self.register_buffer("centroids", mu)

    @classmethod
    def from_arrays(cls, masks: Any, centroids: Any, **kwargs: Any) -> "BRCDLoss":
        """Build from (K, L) mask and centroid arrays (numpy or torch); ``kwargs`` as ``__init__``."""
        return cls(masks, centroids, **kwargs)

    @classmethod
    def from_artifact(cls, artifact: Any, **kwargs: Any) -> "BRCDLoss":
        """Build from a cluster artifact: a mapping with keys, or an object with attributes, ``masks`` and
        ``centroids``. ``kwargs`` as ``__init__``."""
        get = artifact.get if isinstance(artifact, Mapping) else lambda k: getattr(artifact, k, None)
        masks, centroids = get("masks"), get("centroids")
        if masks is None or centroids is None:
            raise ValueError(f"cluster artifact {type(artifact).__name__} needs 'masks' and 'centroids'")
        return cls(masks, centroids, **kwargs)

    def forward(self, student_codes: torch.Tensor, teacher_codes: torch.Tensor, teacher_aug_codes: torch.Tensor,
                pseudo_labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return brcd_loss(student_codes, teacher_codes, teacher_aug_codes, pseudo_labels, self.masks, self.centroids,
                         options=self.options, temperature=self.temperature)

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(self.options).items())
        return f"clusters={self.masks.shape[0]}, bits={self.masks.shape[1]}, temperature={self.temperature}, {opts}"


@_takes_options
def distillation_objective(student_logits1: torch.Tensor, student_logits2: torch.Tensor, student_codes1: torch.Tensor,
                           student_codes2: torch.Tensor, teacher_codes: torch.Tensor, teacher_aug_codes: torch.Tensor,
                           pseudo_labels: torch.Tensor, masks: torch.Tensor, centroids: torch.Tensor, *,
                           options: BRCDOptions, temperature: float = 0.3, kl_weight: float = 1e-3,
                           brcd_weight: float = 1.0, brcd_temperature: float | None = None,
                           assigned: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Student total (:func:`brcd.losses.student_objective` with the BRCD term)::

        L = NT-Xent(s1, s2; τ) + β · L_KL(σ(h1), σ(h2)) + w · L_BRCD(s1, t, t', c; τ_BRCD)

    ``s``/``h``: the student's codes / pre-sigmoid outputs of views 1 and 2; ``t``/``t'``: the teacher's codes.
    ``brcd_temperature=None`` reuses τ (the public code); β = ``kl_weight``, w = ``brcd_weight`` >= 0.
    Returns ``(loss, terms)``, detached 0-dim tensors: ``contrastive``, ``kl``, ``student_objective``
    (= contrastive + β·kl), ``brcd``, ``total``, and every BRCD statistic under ``brcd/<name>``.
    """
    w = check_nonnegative(brcd_weight, "brcd_weight")
    tau_brcd = temperature if brcd_temperature is None else brcd_temperature
    loss, terms = student_objective(student_logits1, student_logits2, student_codes1, student_codes2, temperature,
                                    kl_weight, ("brcd", lambda: brcd_loss(student_codes1, teacher_codes, teacher_aug_codes,
                                                                         pseudo_labels, masks, centroids, options=options,
                                                                         temperature=tau_brcd, assigned=assigned)), w)
    terms["student_objective"] = terms["contrastive"] + float(kl_weight) * terms["kl"]
    stats = {k.removeprefix("stat_"): terms.pop(k) for k in [k for k in terms if k.startswith("stat_")]}
    terms.update({f"brcd/{k}": v for k, v in stats.items() if k != "loss"})
    return loss, terms


class DistillationLoss(nn.Module):
    """Module wrapper of :func:`distillation_objective` (holds a :class:`BRCDLoss`); arguments as there."""

    @_takes_options
    def __init__(self, masks: Any, centroids: Any, *, options: BRCDOptions, temperature: float = 0.3,
                 kl_weight: float = 1e-3, brcd_weight: float = 1.0, brcd_temperature: float | None = None) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.kl_weight = check_nonnegative(kl_weight, "kl_weight")
        self.brcd_weight = check_nonnegative(brcd_weight, "brcd_weight")
        tau_brcd = self.temperature if brcd_temperature is None else brcd_temperature
        self.brcd = BRCDLoss(masks, centroids, options=options, temperature=tau_brcd)

    def forward(self, student_logits1: torch.Tensor, student_logits2: torch.Tensor, student_codes1: torch.Tensor,
                student_codes2: torch.Tensor, teacher_codes: torch.Tensor, teacher_aug_codes: torch.Tensor,
                pseudo_labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return distillation_objective(
            student_logits1, student_logits2, student_codes1, student_codes2, teacher_codes, teacher_aug_codes,
            pseudo_labels, self.brcd.masks, self.brcd.centroids, options=self.brcd.options,
            temperature=self.temperature, kl_weight=self.kl_weight, brcd_weight=self.brcd_weight,
            brcd_temperature=self.brcd.temperature,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, kl_weight={self.kl_weight}, brcd_weight={self.brcd_weight}"
