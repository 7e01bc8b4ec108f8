"""Small helpers shared by the loss modules: argument checks and zero-safe cosine similarity."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

#: Floor on vector norms before dividing. A zero vector (for example a code whose every bit is
#: masked) is then normalised to the zero vector, so its cosine with anything is exactly 0.
COSINE_EPS = 1e-8


def _number(value: float, name: str, ok: Callable[[float], bool], what: str, in_range: str) -> float:
    """``value`` as a float, or ``ValueError`` naming ``what`` it must be (not a number) or ``in_range``."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {what}, got {value!r}") from None
    if not ok(out):
        raise ValueError(f"{name} must be {in_range}, got {value!r}")
    return out


def check_temperature(temperature: float, name: str = "temperature") -> float:
    """``temperature`` as a float; ``ValueError`` unless it is finite and > 0."""
    return _number(temperature, name, lambda v: math.isfinite(v) and v > 0.0, "a positive number", "a finite number > 0")


def check_nonnegative(value: float, name: str) -> float:
    """``value`` as a float; ``ValueError`` unless it is finite and >= 0."""
    return _number(value, name, lambda v: math.isfinite(v) and v >= 0.0, "a number >= 0", "a finite number >= 0")


def check_unit_interval(value: float, name: str) -> float:
    """``value`` as a float; ``ValueError`` unless 0 <= value <= 1."""
    return _number(value, name, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]", "in [0, 1]")


def check_pair(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str]) -> None:
    """Raise ``ValueError`` unless ``a`` and ``b`` are 2-D tensors of the same shape (B, L), B >= 1."""
    for t, n in zip((a, b), names):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{n} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 2 or t.shape[0] < 1:
            raise ValueError(f"{n} must have shape (batch, bits) with batch >= 1, got {tuple(t.shape)}")
    if a.shape != b.shape:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def float_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """At least float32: half-precision inputs (autocast) are computed in float32."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype if t.is_floating_point() else torch.float32)
    return dtype


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows divided by ``max(||row||_2, COSINE_EPS)``; zero rows stay zero (cosine 0, no NaN)."""
    return F.normalize(x, p=2.0, dim=1, eps=COSINE_EPS)


def cosine_matrix(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """All-pairs cosine similarity ``cos(x_i, y_j)`` (``y = x`` when omitted); zero rows give 0."""
    xn = normalize_rows(x)
    yn = xn if y is None else normalize_rows(y)
    return xn @ yn.T


def rowwise_cosine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``cos(x_k, y_k)`` for every row k, shape (B,); a zero row gives 0."""
    return (normalize_rows(x) * normalize_rows(y)).sum(dim=1)
