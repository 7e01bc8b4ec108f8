"""NHL: nested hash layer objectives (He et al., arXiv 2412.08922; ``docs/METHOD.md`` "NHL").

One hash head emits ``Lmax = max(bits)`` real outputs ``u = W f + b``; the ``L_k``-bit code is the prefix
``u[:, :L_k]``, so every shorter code is nested in every longer one and they share the first rows of ``W``.
With per-length base losses ``𝓛_k`` (e.g. CIBHash on the prefixes), NHL trains all K lengths at once::

    𝓛 = Σ_{k=1..K} w_k · (𝓛_k + λ · D_k)          (D_K = 0: the longest code has no teacher)

with the cascade self-distillation ``D_k`` (:func:`cascade_distillation`) and the dominance-aware adaptive
weights ``w`` (:func:`dominance_aware_weights`, constants). Every length enters the sum (the public code
dropped the longest, bug N3); the feature width is read from ``W`` (bug N4: hard-coded 2048).
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch
from torch import nn

from brcd.losses._common import check_nonnegative, float_dtype, normalize_rows

__all__ = [
    "DominanceAnalysis",
    "NestedHashLoss",
    "cascade_distillation",
    "dominance_alphas",
    "dominance_analysis",
    "dominance_aware_weights",
    "length_gradients",
    "nested_objective",
    "nested_prefixes",
    "per_length",
    "prefix_args",
    "shared_gradient_products",
]

GradReducer = Callable[[torch.Tensor], torch.Tensor]


def _check_bits(bits: Sequence[int], max_width: int | None = None) -> list[int]:
    """``bits`` as a list of strictly increasing positive ints (<= ``max_width`` when given)."""
    try:
        values = [bits] if isinstance(bits, numbers.Integral) else list(bits)
    except TypeError:
        raise ValueError(f"bits must be a list of code lengths such as [16, 32, 64], got {bits!r}") from None
    if not values:
        raise ValueError("bits must name at least one code length, e.g. [16, 32, 64]")
    if any(isinstance(b, bool) or not isinstance(b, numbers.Integral) or b < 1 for b in values):
        raise ValueError(f"bits must be positive integers, got {values!r}")
    out = [int(b) for b in values]
    if any(a >= b for a, b in zip(out, out[1:])):
        raise ValueError(f"bits must be strictly increasing (shortest first), got {out}; use sorted(set(bits))")
    if max_width is not None and out[-1] > max_width:
        raise ValueError(f"the longest length {out[-1]} exceeds the {max_width} outputs available")
    return out


def _check_scalar_losses(losses: Sequence[torch.Tensor], k: int | None = None) -> list[torch.Tensor]:
    values = list(losses)
    if k is not None and len(values) != k:
        raise ValueError(f"expected one loss per code length ({k}), got {len(values)}")
    for i, v in enumerate(values):
        if not isinstance(v, torch.Tensor) or v.numel() != 1:
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"per-length loss {i} must be a scalar tensor, got {shape}")
    return [v.reshape(()) for v in values]


def nested_prefixes(logits: torch.Tensor, bits: Sequence[int]) -> list[torch.Tensor]:
    """The nested per-length outputs ``[u[..., :L_1], …, u[..., :L_K]]`` (views, no copy) of the head's (B, Lmax)
    output; ``bits`` strictly increasing. For a :class:`brcd.models.nets.HashOutput` use its ``prefix(L)``."""
    if not isinstance(logits, torch.Tensor) or logits.ndim < 1:
        raise ValueError("logits must be a tensor whose last dimension holds the head's outputs")
    lengths = _check_bits(bits, logits.shape[-1])
    return [logits[..., :L] for L in lengths]


def prefix_args(bits: Sequence[int], *tensors: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """Per-length argument tuples ``[(t1[..., :L], t2[..., :L], …) for L in bits]``: pass only tensors whose
    last dimension is the bit dimension, and length-independent ones (pseudo-labels) as ``per_length`` keywords.
    """
    if not tensors:
        raise ValueError("prefix_args needs at least one tensor")
    cut = [nested_prefixes(t, bits) for t in tensors]
    return [tuple(parts) for parts in zip(*cut)]


def per_length(
    fn: Callable[..., Any], outputs_by_length: Sequence[Any], **kwargs: Any
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Apply one base hashing loss to every code length, e.g.
    ``per_length(teacher_objective, prefix_args(bits, h1, h2, b1, b2), temperature=0.3, kl_weight=1e-3)``.

    ``outputs_by_length[k]``: length k's arguments (a tuple, a mapping of keywords or one tensor). Returns
    the K losses and K dicts of terms (``{}`` where ``fn`` returns a bare loss, not ``(loss, terms)``).
    """
    losses: list[torch.Tensor] = []
    terms: list[dict[str, torch.Tensor]] = []
    for args in outputs_by_length:
        if isinstance(args, Mapping):
            out = fn(**args, **kwargs)
        else:
            out = fn(*((args,) if isinstance(args, torch.Tensor) else args), **kwargs)
        paired = isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping)
        losses.append(out[0] if paired else out)
        terms.append(dict(out[1]) if paired else {})
    if not losses:
        raise ValueError("outputs_by_length is empty: give the arguments of at least one code length")
    return losses, terms


def cascade_distillation(real_outputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Long → short cascade of similarity-preserving losses (Tung & Mori) between consecutive lengths::

        D_k = || sg[G(U_{k+1})] − G(U_k) ||_F² / B²,   G(U) = rownorm(U Uᵀ),   D = Σ_k D_k

    ``real_outputs``: K >= 1 tensors ``U_k`` (B, L_k), shortest first. Computed in at least float32.
    Returns ``(D, [D_1, …, D_{K−1}])``; with K = 1, 0 and an empty list.
    """
    outs = list(real_outputs)
    if not outs:
        raise ValueError("real_outputs must hold at least one (batch, bits) tensor")
    for i, u in enumerate(outs):
        if not isinstance(u, torch.Tensor) or u.ndim != 2 or u.shape[0] < 1:
            shape = tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__
            raise ValueError(f"real_outputs[{i}] must have shape (batch, bits) with batch >= 1, got {shape}")
    b = outs[0].shape[0]
    if any(u.shape[0] != b for u in outs):
        raise ValueError(f"real_outputs must share the batch size, got {[tuple(u.shape) for u in outs]}")
    dtype = float_dtype(*outs)
    device = outs[0].device
    grams = [normalize_rows(u.to(device=device, dtype=dtype) @ u.to(device=device, dtype=dtype).T) for u in outs]
    pairs = [((grams[k + 1].detach() - grams[k]) ** 2).sum() / (b * b) for k in range(len(outs) - 1)]
    total = torch.stack(pairs).sum() if pairs else torch.zeros((), device=device, dtype=dtype)
    return total, pairs


class DominanceAnalysis(NamedTuple):
    """Everything behind the adaptive weights of one step (all detached, float64 except ``weights``)."""

    weights: torch.Tensor  # (K,) float32, summing to K
    alphas: torch.Tensor  # (K, K) α_ij for i < j after the monotone clamp, 1 elsewhere
    products: torch.Tensor  # (K, K) P_ij on the shared rows of W, P_ii = ||g_i||² (zero when K = 1)
    conflicts: torch.Tensor  # (K, K) bool, pairs i < j whose α was lowered before the clamp


def length_gradients(
    per_length_losses: Sequence[torch.Tensor],
    shared_weight: torch.Tensor,
    *,
    grad_reducer: GradReducer | None = None,
) -> torch.Tensor:
    """``g_k = ∂𝓛_k / ∂W`` for every length, stacked as (K, Lmax, d) and detached.

    The graphs are retained and ``W.grad`` is left alone; a loss that does not reach W gets a zero
    gradient. ``grad_reducer`` (e.g. an all-reduce over DDP workers) is applied to the stack.
    """
    losses = _check_scalar_losses(per_length_losses)
    if not isinstance(shared_weight, torch.Tensor) or shared_weight.ndim != 2:
        raise ValueError("shared_weight must be the (Lmax, d) weight of the head's last Linear layer")
    if not shared_weight.requires_grad:
        raise ValueError(
            "shared_weight does not require grad; adaptive weights need the trainable head's last Linear "
            "weight (model.head.last_linear.weight), or set adaptive=False"
        )
    grads = []
    for loss in losses:
        g = None
        if loss.requires_grad:
            (g,) = torch.autograd.grad(loss, shared_weight, retain_graph=True, allow_unused=True)
        grads.append(torch.zeros_like(shared_weight) if g is None else g.detach())
    stacked = torch.stack(grads)
    if grad_reducer is not None:
        stacked = grad_reducer(stacked)
    return stacked


def shared_gradient_products(grads: torch.Tensor, bits: Sequence[int]) -> torch.Tensor:
    """Inner products of the (K, Lmax, d) per-length gradients on their shared rows (float64, (K, K)).

    ``P_ij = Σ_{r < L_m} <g_i[r], g_j[r]>`` with ``m = min(i, j)``: codes i and j share the first
    ``L_min(i,j)`` rows of W, every one of their d columns. ``P_ii = n_i²``.
    """
    if not isinstance(grads, torch.Tensor) or grads.ndim != 3:
        raise ValueError("grads must have shape (lengths, Lmax, d)")
    lengths = _check_bits(bits, grads.shape[1])
    k = len(lengths)
    if grads.shape[0] != k:
        raise ValueError(f"grads holds {grads.shape[0]} gradients but bits names {k} lengths")
    g = grads.detach().to(torch.float64)
    per_row = torch.einsum("ird,jrd->rij", g, g)  # (Lmax, K, K)
    cumulative = per_row.cumsum(dim=0)
    idx = torch.arange(k, device=g.device)
    shared_rows = torch.as_tensor(lengths, device=g.device)[torch.minimum(idx[:, None], idx[None, :])] - 1
    return cumulative[shared_rows, idx[:, None], idx[None, :]]


def dominance_alphas(products: torch.Tensor, beta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise scaling factors ``α_ij`` (i shorter, j longer) from the gradient products.

    With ``d_ij = P_ij``, ``n_i² = P_ii`` and the budget ``τ_i = β n_i² / (K − 1)``::

        α_ij = τ_i / (−d_ij)   if d_ij < 0 and −d_ij > τ_i        (i < j)
        α_ij = 1               otherwise
        α_ij ← min(α_ij, α_{i,i+1})   for j > i + 1               (monotone clamp)

    Entries on and below the diagonal are 1. Returns ``(alphas, conflicts)``: (K, K) float64 and the
    (K, K) bool pairs lowered before the clamp.
    """
    b = check_nonnegative(beta, "beta")
    p = products.detach().to(torch.float64)
    k = p.shape[0]
    ones = torch.ones_like(p)
    upper = torch.ones(k, k, dtype=torch.bool, device=p.device).triu(diagonal=1)
    budget = (b * p.diagonal() / (k - 1))[:, None]  # τ_i, one per row (shorter code i)
    conflicts = upper & (p < 0) & (-p > budget)
    alphas = torch.where(conflicts, budget / torch.where(conflicts, -p, ones), ones)
    # Monotone clamp: α_ij <= α_{i,i+1} for every j > i + 1.
    first = torch.cat([alphas.diagonal(offset=1), alphas.new_ones(1)])  # α_{i,i+1} (1 for the last row)
    beyond = torch.ones(k, k, dtype=torch.bool, device=p.device).triu(diagonal=2)
    alphas = torch.where(beyond, torch.minimum(alphas, first[:, None]), alphas)
    return alphas, conflicts


def dominance_analysis(per_length_losses: Sequence[torch.Tensor], shared_weight: torch.Tensor, bits: Sequence[int],
                       beta: float = 1.0, *, grad_reducer: GradReducer | None = None) -> DominanceAnalysis:
    """:func:`dominance_aware_weights` with every intermediate (see :class:`DominanceAnalysis`)."""
    lengths = _check_bits(bits)
    losses = _check_scalar_losses(per_length_losses, len(lengths))
    check_nonnegative(beta, "beta")
    if not isinstance(shared_weight, torch.Tensor) or shared_weight.ndim != 2:
        raise ValueError("shared_weight must be the (Lmax, d) weight of the head's last Linear layer")
    if lengths[-1] > shared_weight.shape[0]:
        raise ValueError(
            f"shared_weight has {shared_weight.shape[0]} rows but the longest code has {lengths[-1]} bits; "
            "pass the weight of the head's last Linear layer (model.head.last_linear.weight)"
        )
    k = len(lengths)
    device = shared_weight.device
    if k == 1:
        one = torch.ones(1, 1, dtype=torch.float64, device=device)
        return DominanceAnalysis(torch.ones(1, device=device), one, torch.zeros_like(one), one.bool().logical_not())
    grads = length_gradients(losses, shared_weight, grad_reducer=grad_reducer)
    products = shared_gradient_products(grads, lengths)
    alphas, conflicts = dominance_alphas(products, beta)
    w = alphas.prod(dim=0)  # w_j = Π_{i<j} α_ij (alphas are 1 on and below the diagonal); w_1 = 1 <= Σ w
    weights = (k * w / w.sum()).to(torch.float32)
    return DominanceAnalysis(weights, alphas, products, conflicts)


def dominance_aware_weights(per_length_losses: Sequence[torch.Tensor], shared_weight: torch.Tensor,
                            bits: Sequence[int], beta: float = 1.0, *,
                            grad_reducer: GradReducer | None = None) -> torch.Tensor:
    """Dominance-aware adaptive weights of the K code lengths (``docs/METHOD.md``, "NHL"): (K,) float32,
    detached, summing to K; all ones when no pair conflicts. The losses' graphs (retained) must reach
    ``shared_weight``; ``grad_reducer``: e.g. a SUM all-reduce so that every DDP worker gets the same weights.
    """
    return dominance_analysis(per_length_losses, shared_weight, bits, beta, grad_reducer=grad_reducer).weights


def nested_objective(
    per_length_losses: Sequence[torch.Tensor],
    real_outputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    shared_weight: torch.Tensor | None = None,
    bits: Sequence[int],
    adaptive: bool = True,
    cascade: bool = True,
    cascade_weight: float = 1.0,
    beta: float = 1.0,
    grad_reducer: GradReducer | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The NHL training objective ``𝓛 = Σ_k w_k · (𝓛_k + λ · D_k)`` over all K code lengths (``D_K = 0``).

    ``per_length_losses``: the K base losses, shortest first. ``cascade``: ``D_k`` by
    :func:`cascade_distillation` of ``real_outputs`` (one (N, Lmax) tensor or K tensors (N, L_k)), else 0.
    ``adaptive``: ``w`` by :func:`dominance_aware_weights` of the totals ``𝓛_k + λ D_k``, else all ones.

    Returns ``(loss, terms)``, detached 0-dim tensors: ``base/{L}``, ``distill/{L}`` (k < K, when
    ``cascade``), ``weight/{L}``, ``base`` (Σ 𝓛_k), ``distill`` (Σ D_k), ``conflicts`` (pairs whose α was
    lowered) and ``total``.
    """
    lengths = _check_bits(bits)
    k = len(lengths)
    losses = _check_scalar_losses(per_length_losses, k)
    lam = check_nonnegative(cascade_weight, "cascade_weight")
    check_nonnegative(beta, "beta")
    dtype = float_dtype(*losses)
    device = losses[0].device
    losses = [v.to(device=device, dtype=dtype) for v in losses]
    zero = torch.zeros((), device=device, dtype=dtype)

    if cascade:
        if real_outputs is None:
            raise ValueError("cascade=True needs real_outputs (the head's logits); pass them or set cascade=False")
        if isinstance(real_outputs, torch.Tensor):
            outs = nested_prefixes(real_outputs, lengths)
        else:
            outs = list(real_outputs)
            widths = [u.shape[-1] if isinstance(u, torch.Tensor) else None for u in outs]
            if widths != lengths:
                raise ValueError(f"real_outputs widths {widths} must equal bits {lengths} (shortest first)")
        _, pairs = cascade_distillation(outs)
        distill = [d.to(device=device, dtype=dtype) for d in pairs] + [zero]
    else:
        distill = [zero] * k
    per_total = [base + lam * d for base, d in zip(losses, distill)]

    if adaptive:
        if shared_weight is None:
            raise ValueError(
                "adaptive=True needs shared_weight (model.head.last_linear.weight); pass it or set adaptive=False"
            )
        analysis = dominance_analysis(per_total, shared_weight, lengths, beta, grad_reducer=grad_reducer)
        weights = analysis.weights.to(device=device, dtype=dtype)
        conflicts = analysis.conflicts.sum()
    else:
        weights = torch.ones(k, device=device, dtype=dtype)
        conflicts = torch.zeros((), dtype=torch.long)

    loss = (weights * torch.stack(per_total)).sum()
    terms: dict[str, torch.Tensor] = {}
    for i, L in enumerate(lengths):
        terms[f"base/{L}"] = losses[i].detach()
        if cascade and i < k - 1:
            terms[f"distill/{L}"] = distill[i].detach()
        terms[f"weight/{L}"] = weights[i].detach()
    terms.update(base=torch.stack(losses).sum().detach(), distill=torch.stack(distill).sum().detach(),
                 conflicts=conflicts.detach().to(torch.float32), total=loss.detach())
    return loss, terms


class NestedHashLoss(nn.Module):
    """Module wrapper of :func:`nested_objective` holding the lengths and switches (arguments as there)."""

    def __init__(self, bits: Sequence[int], *, adaptive: bool = True, cascade: bool = True,
                 cascade_weight: float = 1.0, beta: float = 1.0) -> None:
        super().__init__()
        self.bits = _check_bits(bits)
        self.adaptive = bool(adaptive)
        self.cascade = bool(cascade)
        self.cascade_weight = check_nonnegative(cascade_weight, "cascade_weight")
        self.beta = check_nonnegative(beta, "beta")

    def forward(
        self,
        per_length_losses: Sequence[torch.Tensor],
        real_outputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
        shared_weight: torch.Tensor | None = None,
        grad_reducer: GradReducer | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return nested_objective(per_length_losses, real_outputs, shared_weight=shared_weight, bits=self.bits,
                                adaptive=self.adaptive, cascade=self.cascade, cascade_weight=self.cascade_weight,
                                beta=self.beta, grad_reducer=grad_reducer)

    def extra_repr(self) -> str:
        return (
            f"bits={self.bits}, adaptive={self.adaptive}, cascade={self.cascade}, "
            f"cascade_weight={self.cascade_weight}, beta={self.beta}"
        )
