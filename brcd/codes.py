"""Binary codes: the training codes b = sign(σ(h) − ½) with a straight-through sign, conversions
between {-1,+1}, {0,1} and packed bits.

Conventions used throughout the project:
- training-time codes are float tensors with values in {-1, +1};
- stored codes are ``int8`` arrays in {-1, +1} with shape (N, L);
- packed codes are ``uint8`` arrays of shape (N, ceil(L / 8)): bit l of a code is 1 when the code
  is +1, packed MSB-first with :func:`numpy.packbits` (the layout faiss binary indexes use).
"""

from __future__ import annotations

import numpy as np
import torch


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D401
        return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """{-1,+1} codes with an identity (straight-through) gradient. ``0`` maps to ``+1``; exact for ±inf too
    (``x - x.detach()`` would make those NaN)."""
    return _SignSTE.apply(x)


def hash_codes(logits: torch.Tensor, probs: torch.Tensor | None = None) -> torch.Tensor:
    """The method's training codes: ``b = sign(σ(h) − ½)`` with the straight-through gradient on the
    sign only, so ``db/dh = σ'(h) = p(1 − p)`` (CIBHash; BRCD's teacher and student).

    The values are taken from ``sign(h)`` (``h >= 0`` -> +1, exactly what :meth:`encode` stores): in
    float32 ``σ(h) − ½`` rounds to 0 for ``|h| < 3e-8`` and would flip the sign of such bits.
    """
    p = torch.sigmoid(logits) if probs is None else probs
    return torch.where(logits >= 0, 1.0, -1.0).to(logits.dtype) + (p - p.detach())


def binarize(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Real values (or probabilities centred at 0) -> int8 codes in {-1,+1} (``>= 0`` -> +1)."""
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return np.where(x >= 0, 1, -1).astype(np.int8)


def as_pm1(codes: torch.Tensor | np.ndarray) -> np.ndarray:
    """Validate and convert codes to an int8 {-1,+1} numpy array of shape (N, L)."""
    codes = codes.detach().cpu().numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be a 2-D array (N, bits), got shape {codes.shape}")
    if codes.dtype == np.bool_:
        return np.where(codes, 1, -1).astype(np.int8)
    if not np.isin(codes, (-1, 1)).all():
        raise ValueError("codes must contain only -1 and +1 (use brcd.codes.binarize on real values)")
    return codes.astype(np.int8)


def pack_codes(codes: torch.Tensor | np.ndarray) -> np.ndarray:
    """{-1,+1} codes (N, L) -> packed uint8 (N, ceil(L/8)), MSB first."""
    return np.packbits(as_pm1(codes) > 0, axis=1)


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """Packed uint8 (N, ceil(L/8)) -> int8 {-1,+1} codes (N, bits)."""
    unpacked = np.unpackbits(np.asarray(packed, dtype=np.uint8), axis=1, count=bits)
    return unpacked.astype(np.int8) * 2 - 1
