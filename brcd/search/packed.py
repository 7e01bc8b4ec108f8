"""Packed binary codes and the id-keyed store that both indexes (flat and multi-index hashing) are built on.

Packed codes are ``uint8`` arrays (N, ceil(bits/8)), MSB first: the layout of :func:`brcd.codes.pack_codes`
and faiss. Bit counts that are not a multiple of 8 are zero padded, which does not change distances.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from brcd.codes import as_pm1
from brcd.io import ArtifactError


def is_int(x: object) -> bool:
    """An ``int`` or numpy integer, but not a ``bool``."""
    return not isinstance(x, bool) and isinstance(x, (int, np.integer))


def packed_width(bits: int) -> int:
    """Bytes per packed code (``ceil(bits / 8)``)."""
    return (bits + 7) // 8


def distance_dtype(bits: int) -> np.dtype:
    """Smallest unsigned dtype holding distances ``0..bits`` (``uint8`` up to 255 bits)."""
    if bits > 65535:
        raise ValueError(f"codes of {bits} bits are not supported (at most 65535 bits)")
    return np.dtype(np.uint8 if bits <= 255 else np.uint16)


def pad_words(packed: np.ndarray) -> np.ndarray:
    """Packed ``uint8`` (n, B) zero padded to whole 64-bit words: contiguous (n, 8 * max(1, ceil(B / 8)))."""
    n, nbytes = packed.shape
    width = max(1, (nbytes + 7) // 8) * 8
    if nbytes == width:
        return np.ascontiguousarray(packed)
    buf = np.zeros((n, width), dtype=np.uint8)
    buf[:, :nbytes] = packed
    return buf


def to_words(packed: np.ndarray) -> np.ndarray:
    """Packed ``uint8`` (n, B) -> ``uint64`` words transposed to (W, n), zero padded (read-only use); neither
    the padding nor the byte order inside a word changes xor + popcount distances."""
    if packed.shape[1] and packed.shape[1] % 8 == 0 and packed.flags.c_contiguous:
        return packed.view(np.uint64).T  # no copy (a strided view when W > 1)
    return np.ascontiguousarray(pad_words(packed).view(np.uint64).T)


def as_packed_codes(codes: np.ndarray | torch.Tensor, name: str = "codes") -> tuple[np.ndarray, int]:
    """Validate {-1,+1} codes (N, L) and return ``(packed uint8 (N, ceil(L/8)), L)``."""
    try:
        pm1 = as_pm1(codes)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
    return np.ascontiguousarray(np.packbits(pm1 > 0, axis=1)), int(pm1.shape[1])


def check_packed(packed: np.ndarray, bits: int, name: str) -> np.ndarray:
    """``packed`` as a contiguous ``uint8`` (N, ceil(bits/8)) array; one-line ``ValueError`` otherwise."""
    packed = np.asarray(packed)
    width = packed_width(bits)
    if packed.ndim != 2 or packed.dtype != np.uint8:
        raise ValueError(f"{name} must be a packed uint8 array (N, {width}), got {packed.dtype} {packed.shape}")
    if packed.shape[1] != width:
        raise ValueError(f"{name} has {packed.shape[1]} bytes per code but {bits}-bit codes need {width}")
    pad = width * 8 - bits
    if pad and packed.shape[0] and np.any(packed[:, -1] & np.uint8((1 << pad) - 1)):
        raise ValueError(f"{name}: padding bits after bit {bits} must be zero (pack with brcd.codes.pack_codes)")
    return np.ascontiguousarray(packed)


def _as_ids(new_ids: np.ndarray | torch.Tensor, n: int) -> np.ndarray:
    if isinstance(new_ids, torch.Tensor):
        new_ids = new_ids.detach().cpu().numpy()
    ids = np.asarray(new_ids)
    if ids.ndim != 1 or ids.shape[0] != n:
        raise ValueError(f"ids must be a 1-D array of {n} integers, got shape {ids.shape}")
    if n and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be integers, got dtype {ids.dtype}")
    if n and ids.dtype == np.uint64 and ids.max() > np.iinfo(np.int64).max:
        raise ValueError("ids must fit in int64")
    return ids.astype(np.int64)


class PackedCodeStore:
    """Packed codes kept sorted by unique ``int64`` ids: what both indexes share (content, ``search``, loading).

    A subclass implements ``search_packed``, drops its search structures in :meth:`_changed`, reports
    their size in :meth:`_cache_bytes` and may cap its size with ``max_codes``.
    """

    max_codes: int | None = None

    def __init__(self, bits: int) -> None:
        if not is_int(bits) or bits < 1:
            raise ValueError(f"bits must be a positive integer, got {bits!r}")
        distance_dtype(int(bits))
        self.bits = int(bits)
        self._codes = np.empty((0, packed_width(self.bits)), dtype=np.uint8)
        self._ids = np.empty(0, dtype=np.int64)
        self._next_id = 0

    def _changed(self) -> None:
        """The stored codes changed: forget what was built from them."""

    def _cache_bytes(self) -> int:
        return 0

    def __len__(self) -> int:
        return int(self._ids.size)

    @property
    def ids(self) -> np.ndarray:
        """Stored ids, ascending (a copy)."""
        return self._ids.copy()

    @property
    def packed_codes(self) -> np.ndarray:
        """Stored packed codes in id order (a copy)."""
        return self._codes.copy()

    @property
    def memory_bytes(self) -> int:
        """Bytes held: packed codes + ids + the search structures built from them (engine caches, tables)."""
        return int(self._codes.nbytes + self._ids.nbytes + self._cache_bytes())

    def add(self, codes: np.ndarray | torch.Tensor, ids: np.ndarray | None = None) -> np.ndarray:
        """Add {-1,+1} (or bool) codes (N, bits) under unique ``ids`` (default: consecutive integers after the
        largest id ever assigned); returns the ids used."""
        packed, bits = as_packed_codes(codes, "codes")
        if bits != self.bits:
            raise ValueError(f"codes have {bits} bits but the index holds {self.bits}-bit codes")
        return self.add_packed(packed, ids)

    def add_packed(self, packed: np.ndarray, ids: np.ndarray | None = None) -> np.ndarray:
        """Add already packed codes (N, ceil(bits/8)) ``uint8``; returns the ids used."""
        packed = check_packed(packed, self.bits, "packed codes")
        n = packed.shape[0]
        if self.max_codes is not None and len(self) + n > self.max_codes:
            raise ValueError(f"a {type(self).__name__} holds at most {self.max_codes} codes")
        new_ids = np.arange(self._next_id, self._next_id + n, dtype=np.int64) if ids is None else _as_ids(ids, n)
        if n == 0:
            return new_ids
        all_ids = np.concatenate([self._ids, new_ids])
        codes = np.concatenate([self._codes, packed])
        if not (self._ids.size and new_ids.min() > self._ids[-1] and np.all(np.diff(new_ids) > 0)):  # not an append
            order = np.argsort(all_ids, kind="stable")
            all_ids = all_ids[order]
            dup = np.flatnonzero(np.diff(all_ids) == 0)
            if dup.size:
                raise ValueError(f"duplicate id {int(all_ids[dup[0]])}: ids must be unique in the index")
            codes = codes[order]
        self._codes, self._ids = np.ascontiguousarray(codes), all_ids
        self._next_id = max(self._next_id, int(new_ids.max()) + 1)
        self._changed()
        return new_ids

    def remove(self, ids: np.ndarray | list[int]) -> int:
        """Remove the given ids; raises ``ValueError`` naming an id that is not in the index."""
        rm = np.unique(np.asarray(ids, dtype=np.int64).ravel())
        if rm.size == 0:
            return 0
        loc = np.searchsorted(self._ids, rm)
        present = self._ids[np.minimum(loc, len(self) - 1)] == rm if len(self) else np.zeros(rm.size, dtype=bool)
        if not present.all():
            raise ValueError(f"id {int(rm[~present][0])} is not in the index")
        keep = np.ones(len(self), dtype=bool)
        keep[loc] = False
        self._codes = np.ascontiguousarray(self._codes[keep])
        self._ids = self._ids[keep]
        self._changed()
        return int(keep.size - np.count_nonzero(keep))

    def search(self, query_codes: np.ndarray | torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-``k`` of {-1,+1} queries (nq, bits): ``(distances int32 (nq, k), ids int64 (nq, k))`` ranked
        by (distance, id); beyond ``len(self)`` id ``-1`` and distance ``np.iinfo(np.int32).max`` (as faiss)."""
        packed, bits = as_packed_codes(query_codes, "query_codes")
        if bits != self.bits:
            raise ValueError(f"query codes have {bits} bits but the index holds {self.bits}-bit codes")
        return self.search_packed(packed, k)

    def _start_search(self, packed_queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Checked queries and the answer of ``search_packed`` before any hit: ``int32`` max / ``-1`` everywhere."""
        if not is_int(k) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        q = check_packed(packed_queries, self.bits, "query codes")
        shape = (q.shape[0], int(k))
        return q, np.full(shape, np.iinfo(np.int32).max, dtype=np.int32), np.full(shape, -1, dtype=np.int64)

    def _fill(self, path: Path, what: str, codes: np.ndarray, ids: np.ndarray, next_id: int):
        """A loader's last step: store the file's ``codes`` / ``ids``; refused content is an :class:`ArtifactError`."""
        try:
            if ids.dtype != np.int64 or codes.dtype != np.uint8:
                raise ValueError(f"ids {ids.dtype} / codes {codes.dtype}, expected int64 / uint8")
            self.add_packed(codes, ids)
        except ValueError as exc:
            raise ArtifactError(f"{path} holds invalid {what} content ({exc}); rebuild it") from None
        self._next_id = max(self._next_id, next_id)
        return self
