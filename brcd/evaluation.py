"""Retrieval metrics for binary codes: mAP@K, precision@K, precision-recall by Hamming radius.

The protocol is docs/METHOD.md, "Evaluation protocol": the database is ranked by Hamming distance,
ties by database index (``np.argsort(distances, kind="stable")``); an item is relevant when it shares a
label with the query; AP@K is normalised by the relevant items *in the top K*, a query without one
scores 0 and still counts; ``topk=None`` or ``-1`` is the whole database, a larger ``topk`` is clamped.

Queries go in chunks of bounded working memory (``max_bytes``) through
:class:`brcd.search.flat.PackedSearcher`, with relevance a bitwise AND of packed labels: ~30-50x faster than a
per-query ``argsort`` loop at CIFAR-10 scale, the same values up to summation order (< 1e-12).

Codes: numpy arrays or torch tensors in {-1, +1} (``bool``: {False: -1, True: +1}); labels (N, C), nonzero =
label present.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from brcd.search.flat import DEFAULT_MAX_BYTES, PackedSearcher
from brcd.search.packed import as_packed_codes, is_int, to_words

ArrayLike = np.ndarray | torch.Tensor

__all__ = ["RetrievalEvaluator", "hamming_distances", "mean_average_precision", "precision_at_k",
           "precision_recall_by_radius", "evaluate_paradigms"]


def _labels_words(labels: ArrayLike, name: str, n: int, n_name: str) -> tuple[np.ndarray, int]:
    """Multi-hot labels (N, C) packed into unsigned words (N, W): one word up to 32 classes, else ``uint64``."""
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise ValueError(f"{name} must be a 2-D one-hot/multi-hot array (N, classes), got shape {lab.shape}")
    if lab.shape[0] != n:
        raise ValueError(f"{name} has {lab.shape[0]} rows but {n_name} has {n}")
    if lab.shape[1] < 1:
        raise ValueError(f"{name} has no label columns")
    if not (np.issubdtype(lab.dtype, np.number) or lab.dtype == np.bool_):
        raise ValueError(f"{name} must be numeric or boolean, got dtype {lab.dtype}")
    if np.issubdtype(lab.dtype, np.floating) and not np.isfinite(lab).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    packed = np.packbits(lab != 0, axis=1)
    nbytes = packed.shape[1]
    if nbytes <= 4:  # few classes: one small word per item keeps relevance gathers cheap
        width = 1 if nbytes == 1 else 2 if nbytes == 2 else 4
        buf = np.zeros((packed.shape[0], width), dtype=np.uint8)
        buf[:, :nbytes] = packed
        return buf.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[width]), int(lab.shape[1])
    return to_words(packed).T.copy(), int(lab.shape[1])


def _codes(codes: ArrayLike, name: str, bits: int | None = None, what: str = "") -> tuple[np.ndarray, int]:
    """Packed non-empty codes; with ``bits``, ``ValueError`` unless they have that many."""
    packed, n_bits = as_packed_codes(codes, name)
    if packed.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 codes)")
    if bits is not None and n_bits != bits:
        raise ValueError(f"{what} have {bits} bits but {name} have {n_bits}; both sides must use the same code length")
    return packed, n_bits


def _resolve_topk(topk: int | None, n_db: int) -> int:
    if topk is None:
        return n_db
    if not is_int(topk) or (topk < 1 and topk != -1):
        raise ValueError(f"topk must be a positive integer, -1 or None (whole database), got {topk!r}")
    return n_db if topk == -1 else min(int(topk), n_db)


@dataclass
class _Prepared:
    q: np.ndarray  # packed query codes
    db: np.ndarray  # packed database codes
    bits: int
    qlab: np.ndarray  # label words (nq, W)
    dlab: np.ndarray  # label words (ndb, W)


def _prepare(query_codes: ArrayLike, db_codes: ArrayLike, query_labels: ArrayLike, db_labels: ArrayLike,
             db_name: str = "db_codes") -> _Prepared:
    q, qbits = _codes(query_codes, "query_codes")
    db, _ = _codes(db_codes, db_name, qbits, "query_codes")
    qlab, qc = _labels_words(query_labels, "query_labels", q.shape[0], "query_codes")
    dlab, dc = _labels_words(db_labels, "db_labels", db.shape[0], db_name)
    if qc != dc:
        raise ValueError(f"query_labels have {qc} classes but db_labels have {dc}; label widths must match")
    return _Prepared(q, db, qbits, qlab, dlab)


def _relevance(qlab: np.ndarray, dlab: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Relevance (r, K) of database positions ``pos`` ((r, K), or (1, K) for all) to queries' label words (r, W)."""
    rel = (dlab[pos, 0] & qlab[:, 0:1]) != 0
    for w in range(1, qlab.shape[1]):
        rel |= (dlab[pos, w] & qlab[:, w : w + 1]) != 0
    return rel


def _average_precision(rel: np.ndarray) -> np.ndarray:
    """AP (mean over the hits of hits-so-far / rank) of each row of a ranked relevance matrix (r, K), 0 without
    a hit. Sparse rankings (mAP over the whole database) touch only the hit positions."""
    r, k = rel.shape
    if k == 0:
        return np.zeros(r)
    if 4 * np.count_nonzero(rel) >= rel.size:
        hits = np.cumsum(rel, axis=1, dtype=np.int32 if k < 2**31 else np.int64)
        prec_sum = np.where(rel, hits / np.arange(1.0, k + 1.0), 0.0).sum(axis=1)
        n_rel = hits[:, -1]
        return np.where(n_rel > 0, prec_sum / np.maximum(n_rel, 1), 0.0)
    rows, cols = np.nonzero(rel)  # row-major: the hits of each row, in rank order
    n_rel = np.bincount(rows, minlength=r)
    first = np.cumsum(n_rel) - n_rel
    hits_so_far = np.arange(1, rows.size + 1) - first[rows]
    prec_sum = np.bincount(rows, weights=hits_so_far / (cols + 1.0), minlength=r)
    return np.where(n_rel > 0, prec_sum / np.maximum(n_rel, 1), 0.0)


class RetrievalEvaluator:
    """Retrieval metrics with explicit engine and memory settings (the module-level functions: a default one).

    ``engine``, ``strategy``, ``chunk_queries`` and ``**searcher_options`` go to
    :class:`brcd.search.flat.PackedSearcher` (speed only: values never depend on them); ``max_bytes`` bounds the
    working memory per call. ``faiss_threads`` defaults to 1: faiss's spinning thread team slows down badly
    when the cores are shared with training jobs (``None`` keeps faiss's own setting).
    """

    def __init__(self, engine: str = "auto", max_bytes: int = DEFAULT_MAX_BYTES, chunk_queries: int | None = None,
                 strategy: str = "auto", faiss_threads: int | None = 1, **searcher_options: Any) -> None:
        self._searcher = functools.partial(PackedSearcher, engine=engine, max_bytes=int(max_bytes), strategy=strategy,
                                           chunk_queries=chunk_queries, faiss_threads=faiss_threads, **searcher_options)
        # Validate the options early (one-line errors) with an empty database.
        self._searcher(np.zeros((0, 1), np.uint8), 8)

    def _map_and_precision(self, p: _Prepared, topk: int | None) -> tuple[float, float, int]:
        k = _resolve_topk(topk, p.db.shape[0])
        ap_sum = 0.0
        prec_sum = 0.0
        for rows, _dist, pos in self._searcher(p.db, p.bits).iter_topk(p.q, k, return_distances=False):
            rel = _relevance(p.qlab[rows], p.dlab, pos)
            ap_sum += float(_average_precision(rel).sum())
            prec_sum += float(np.count_nonzero(rel, axis=1).sum()) / k
        nq = p.q.shape[0]
        return ap_sum / nq, prec_sum / nq, k

    def hamming_distances(self, query_codes: ArrayLike, db_codes: ArrayLike) -> np.ndarray:
        """Hamming distance matrix (nq, ndb) ``int32`` between {-1,+1} codes; for small inputs (memory nq*ndb*4)."""
        q, qbits = _codes(query_codes, "query_codes")
        db, _ = _codes(db_codes, "db_codes", qbits, "query_codes")
        out = np.empty((q.shape[0], db.shape[0]), dtype=np.int32)
        for a, b, d in self._searcher(db, qbits).iter_dense(q):
            out[a:b] = d
        return out

    def mean_average_precision(self, query_codes: ArrayLike, db_codes: ArrayLike, query_labels: ArrayLike,
                               db_labels: ArrayLike, topk: int | None) -> float:
        """mAP@topk under the module's protocol; ``topk=None``, ``-1`` or above the database size: all of it."""
        return self._map_and_precision(_prepare(query_codes, db_codes, query_labels, db_labels), topk)[0]

    def precision_at_k(self, query_codes: ArrayLike, db_codes: ArrayLike, query_labels: ArrayLike,
                       db_labels: ArrayLike, k: int | None) -> float:
        """Mean over queries of (#relevant in the stable top-k) / k', ``k' = min(k, ndb)`` (k as ``topk``)."""
        return self._map_and_precision(_prepare(query_codes, db_codes, query_labels, db_labels), k)[1]

    def precision_recall_by_radius(self, query_codes: ArrayLike, db_codes: ArrayLike, query_labels: ArrayLike,
                                   db_labels: ArrayLike) -> dict[str, np.ndarray]:
        """Precision and recall of "retrieve everything within Hamming radius r", r = 0..L.

        ``precision[r]``: mean over the queries retrieving anything at radius r (their count:
        ``queries_retrieving[r]``); ``recall[r]``: mean over the queries with a relevant item; NaN when none.
        """
        p = _prepare(query_codes, db_codes, query_labels, db_labels)
        nb = p.bits + 1
        prec_sum = np.zeros(nb)
        prec_cnt = np.zeros(nb, dtype=np.int64)
        rec_sum = np.zeros(nb)
        rec_cnt = 0
        every = np.arange(p.db.shape[0])[None, :]
        for a, b, dist in self._searcher(p.db, p.bits).iter_dense(p.q, bytes_per_element=40):
            r = b - a
            rel = _relevance(p.qlab[a:b], p.dlab, every)
            key = dist.astype(np.int64)
            key += (np.arange(r, dtype=np.int64) * nb)[:, None]
            retrieved = np.cumsum(np.bincount(key.ravel(), minlength=r * nb).reshape(r, nb), axis=1)
            rel_ret = np.cumsum(np.bincount(key[rel], minlength=r * nb).reshape(r, nb), axis=1)
            del key, rel
            n_rel = rel_ret[:, -1]
            has = retrieved > 0
            prec_sum += np.where(has, rel_ret / np.maximum(retrieved, 1), 0.0).sum(axis=0)
            prec_cnt += has.sum(axis=0)
            ok = n_rel > 0
            rec_sum += (rel_ret[ok] / n_rel[ok, None]).sum(axis=0)
            rec_cnt += int(ok.sum())
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = np.where(prec_cnt > 0, prec_sum / np.maximum(prec_cnt, 1), np.nan)
            recall = rec_sum / rec_cnt if rec_cnt else np.full(nb, np.nan)
        return {"radius": np.arange(nb), "precision": precision, "recall": recall, "queries_retrieving": prec_cnt}

    def evaluate_paradigms(self, student_query: ArrayLike, student_db: ArrayLike, query_labels: ArrayLike,
                           db_labels: ArrayLike, topk: int | None,
                           teacher_db: ArrayLike | None = None) -> dict[str, float]:
        """``map_symmetric`` / ``precision_at_k_symmetric`` (student database) and, with ``teacher_db``,
        ``map_asymmetric`` / ``precision_at_k_asymmetric`` (teacher-encoded database); ``topk``: the K used."""
        p = _prepare(student_query, student_db, query_labels, db_labels, "student_db")
        m, prec, k = self._map_and_precision(p, topk)
        out: dict[str, float] = {"topk": k, "map_symmetric": m, "precision_at_k_symmetric": prec}
        if teacher_db is not None:
            t, _ = _codes(teacher_db, "teacher_db", p.bits, "student codes")
            if t.shape[0] != p.db.shape[0]:
                raise ValueError(f"teacher_db has {t.shape[0]} codes but student_db has {p.db.shape[0]}; "
                                 "both must encode the same database")
            m, prec, _ = self._map_and_precision(_Prepared(p.q, t, p.bits, p.qlab, p.dlab), topk)
            out.update(map_asymmetric=m, precision_at_k_asymmetric=prec)
        return out


_DEFAULT = RetrievalEvaluator()
hamming_distances = _DEFAULT.hamming_distances
mean_average_precision = _DEFAULT.mean_average_precision
precision_at_k = _DEFAULT.precision_at_k
precision_recall_by_radius = _DEFAULT.precision_recall_by_radius
evaluate_paradigms = _DEFAULT.evaluate_paradigms
