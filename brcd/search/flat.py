"""Exact Hamming search over packed binary codes, ranked by (distance, position), without a per-query loop.

:class:`PackedSearcher` is the kernel (shared with :mod:`brcd.evaluation`); :class:`HammingIndex` the
user-facing index (ids kept sorted, so "smaller position" == "smaller id") with a parquet file format.

The stable top-k is every item at distance ``< d*`` plus the first items (by position) at ``d*``, the k-th
smallest distance. The kernel estimates from a database sample a radius ``t`` very likely ``>= d*``,
collects every item within ``t`` in position order (faiss ``range_search``, whose set semantics do not
depend on faiss's tie order, or numpy xor + popcount), keeps the first ``k`` after a *stable* radix sort
on ``uint16`` (query, distance) keys, and redoes the few queries whose radius was too small with their
exact ``d*``. When ``k`` is a large fraction of the database it sorts whole distance rows instead ("dense").
"""

from __future__ import annotations

import contextlib
import functools
import math
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np

from brcd.io import ArtifactError, PathLike, atomic_path, binary_column, binary_to_numpy, existing_file
from brcd.search.packed import PackedCodeStore, check_packed, distance_dtype, packed_width, to_words

try:  # faiss is a project dependency, but keep the numpy engine usable without it.
    import faiss  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover - exercised only where faiss is missing
    faiss = None

Engine = Literal["auto", "faiss", "numpy"]

#: Default bound on the kernel's working memory (bytes), per call.
DEFAULT_MAX_BYTES = 64 << 20  # smaller chunks are also faster (cache), measured
_FORMAT = "brcd-hamming-index/1"
_UINT16_KEYS = 1 << 16


def resolve_engine(engine: str) -> str:
    """Map ``"auto"`` to ``"faiss"`` (or ``"numpy"`` when faiss is not importable); validate."""
    if engine not in ("auto", "faiss", "numpy"):
        raise ValueError(f"engine must be 'auto', 'faiss' or 'numpy', got {engine!r}")
    if engine == "auto":
        return "faiss" if faiss is not None else "numpy"
    if engine == "faiss" and faiss is None:
        raise ValueError("engine='faiss' requested but faiss is not installed; use engine='numpy'")
    return engine


def _limits(max_bytes: int, faiss_threads: int | None) -> tuple[int, int | None]:
    """Validated ``(max_bytes, faiss_threads)`` of a searcher or an index."""
    if int(max_bytes) < 1 << 16:
        raise ValueError(f"max_bytes must be at least 65536, got {max_bytes}")
    if faiss_threads is not None and int(faiss_threads) < 1:
        raise ValueError(f"faiss_threads must be a positive integer or None, got {faiss_threads}")
    return int(max_bytes), None if faiss_threads is None else int(faiss_threads)


@contextlib.contextmanager
def _faiss_threads(n: int | None) -> Iterator[None]:
    """Run faiss calls with ``n`` OpenMP threads (``None``: leave them); the calling thread's setting only."""
    if n is None or faiss is None:
        yield
        return
    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(int(n))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(old)


def _row_groups(weights: np.ndarray, budget: float, max_rows: int) -> list[tuple[int, int]]:
    """Split rows ``0..len(weights)`` into consecutive groups of total weight <= budget (>= 1 row)."""
    n = len(weights)
    groups: list[tuple[int, int]] = []
    start = 0
    csum = np.cumsum(weights, dtype=np.float64)
    while start < n:
        base = csum[start - 1] if start else 0.0
        stop = int(np.searchsorted(csum, base + budget, side="right"))
        stop = min(max(stop, start + 1), start + max_rows, n)
        groups.append((start, stop))
        start = stop
    return groups


def _radius_groups(rows: np.ndarray, t: np.ndarray, min_rows: int = 64,
                   max_raise: int = 2) -> list[tuple[np.ndarray, int]]:
    """Rows grouped by radius, one range search each; a faiss call has a fixed cost, so fewer than ``min_rows``
    rows join the next radius up to ``max_raise`` larger (a larger radius only adds candidates)."""
    order = np.argsort(t, kind="stable")
    ts = t[order]
    vals, starts = np.unique(ts, return_index=True)
    bounds = list(starts) + [len(ts)]
    groups: list[tuple[np.ndarray, int]] = []
    g0 = 0  # index into vals where the open group starts
    for i in range(len(vals)):
        size = bounds[i + 1] - bounds[g0]
        last = i + 1 == len(vals)
        if last or size >= min_rows or int(vals[i + 1]) - int(vals[g0]) > max_raise:
            groups.append((rows[order[bounds[g0] : bounds[i + 1]]], int(vals[i])))
            g0 = i + 1
    return groups


class PackedSearcher:
    """Exact stable top-k / dense Hamming distances of packed queries against a packed database.

    ``sample_size``, ``margin`` and ``slack`` tune the radius estimate (speed, never results); the dense
    strategy is used when ``k * dense_factor >= n``.
    """

    def __init__(self, db_packed: np.ndarray, bits: int, engine: str = "auto", max_bytes: int = DEFAULT_MAX_BYTES,
                 strategy: str = "auto", chunk_queries: int | None = None, faiss_threads: int | None = None,
                 sample_size: int = 2048, margin: float = 0.3, slack: int = 3, dense_factor: int = 4) -> None:
        if strategy not in ("auto", "dense", "threshold"):
            raise ValueError(f"strategy must be 'auto', 'dense' or 'threshold', got {strategy!r}")
        self.max_bytes, self.faiss_threads = _limits(max_bytes, faiss_threads)
        if chunk_queries is not None and int(chunk_queries) < 1:
            raise ValueError(f"chunk_queries must be a positive integer, got {chunk_queries}")
        self.bits = int(bits)
        self.ddtype = distance_dtype(self.bits)
        self.db = check_packed(db_packed, self.bits, "database codes")
        self.n = int(self.db.shape[0])
        self.engine = resolve_engine(engine)
        self.strategy = strategy
        self.chunk_queries = None if chunk_queries is None else int(chunk_queries)
        self.sample_size = max(1, int(sample_size))
        self.margin = float(margin)
        self.slack = int(slack)
        self.dense_factor = int(dense_factor)

    @functools.cached_property
    def words(self) -> np.ndarray:
        """Database as ``uint64`` words, shape (W, n)."""
        return to_words(self.db)

    @functools.cached_property
    def faiss_index(self):
        index = faiss.IndexBinaryFlat(self.db.shape[1] * 8)
        if self.n:
            index.add(self.db)
        return index

    @functools.cached_property
    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        """(positions, words (W, m)) of an evenly spaced database sample."""
        pos = np.unique(np.linspace(0, self.n - 1, min(self.n, self.sample_size)).round().astype(np.int64))
        return pos, to_words(self.db[pos])

    def cached_bytes(self) -> int:
        """Bytes held by lazily built engine structures (words, faiss copy, sample)."""
        built = self.__dict__
        total = self.words.nbytes if "words" in built and not np.may_share_memory(self.words, self.db) else 0
        total += self.n * self.db.shape[1] if "faiss_index" in built else 0
        return total + (self.sample[0].nbytes + self.sample[1].nbytes if "sample" in built else 0)

    def _dense(self, qwords: np.ndarray, dwords: np.ndarray) -> np.ndarray:
        """Distances (r, ndb) between query words (r, W) and database words (W, ndb)."""
        r, nwords = qwords.shape
        nd = dwords.shape[1]
        out = np.empty((r, nd), dtype=self.ddtype)
        if r == 0 or nd == 0:
            return out
        block = max(1, min(nd, (4 << 20) // (8 * r)))  # uint64 xor temp <= 4 MiB
        tmp = np.empty((r, block), dtype=np.uint64)
        pop = np.empty((r, block), dtype=np.uint8) if nwords > 1 else None
        for j0 in range(0, nd, block):
            j1 = min(nd, j0 + block)
            t = tmp[:, : j1 - j0]
            dst = out[:, j0:j1]
            np.bitwise_xor(qwords[:, 0:1], dwords[0:1, j0:j1], out=t)
            np.bitwise_count(t, out=dst, casting="unsafe")
            for w in range(1, nwords):
                np.bitwise_xor(qwords[:, w : w + 1], dwords[w : w + 1, j0:j1], out=t)
                p = pop[:, : j1 - j0]
                np.bitwise_count(t, out=p)
                np.add(dst, p, out=dst, casting="unsafe")
        return out

    def _dense_rows_per_chunk(self, per_element: int) -> int:
        rows = max(1, self.max_bytes // max(1, per_element * max(self.n, 1)))
        return min(rows, self.chunk_queries or rows)

    def iter_dense(self, queries: np.ndarray, bytes_per_element: int = 16) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield ``(start, stop, distances (stop-start, n))`` over query chunks of at most ``max_bytes``
        at the caller's ``bytes_per_element`` per distance."""
        q = check_packed(queries, self.bits, "query codes")
        qw = to_words(q).T
        rows = self._dense_rows_per_chunk(bytes_per_element)
        for a in range(0, q.shape[0], rows):
            b = min(q.shape[0], a + rows)
            yield a, b, self._dense(qw[a:b], self.words)

    def iter_topk(self, queries: np.ndarray, k: int,
                  return_distances: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray | None, np.ndarray]]:
        """Yield ``(rows int64 (r,), dist int32 (r, k'), pos int64 (r, k'))``, ``k' = min(k, n)``, ``dist`` None
        with ``return_distances=False``; ``pos`` ranked as a stable argsort of the distance row.

        Every query is in exactly one chunk, but chunks are not in query order (queries of similar radius
        share one faiss call).
        """
        q = check_packed(queries, self.bits, "query codes")
        if isinstance(k, bool) or int(k) < 1:
            raise ValueError(f"k must be a positive integer, got {k}")
        kk = min(int(k), self.n)
        nq = q.shape[0]
        strategy = self.strategy
        if strategy == "auto" or kk == 0:  # an empty database: empty rows from the dense strategy
            strategy = "dense" if kk * self.dense_factor >= self.n else "threshold"
        qw = to_words(q).T
        if strategy == "dense":
            rows = self._dense_rows_per_chunk(24)
            for a in range(0, nq, rows):
                b = min(nq, a + rows)
                yield (np.arange(a, b), *self._topk_dense(qw[a:b], kk, return_distances))
            return
        per_row = 3 * self.n if self.engine == "numpy" else 0
        per_row += 48 * kk  # candidates (~2k per query) and outputs
        rows = max(1, self.max_bytes // max(1, per_row))
        rows = min(rows, max(1, _UINT16_KEYS // (self.bits + 1)), self.chunk_queries or rows)
        # Radius estimates for all queries first, then chunks of queries sorted by radius.
        t = np.empty(nq, dtype=self.ddtype)
        est = np.empty(nq, dtype=np.float64)
        est_rows = max(1, min(rows, self.max_bytes // (16 * max(1, min(self.n, self.sample_size)))))
        for a in range(0, nq, est_rows):
            b = min(nq, a + est_rows)
            t[a:b], est[a:b] = self._estimate_radius(qw[a:b], kk)
        order = np.argsort(t, kind="stable")
        for a in range(0, nq, rows):
            idx = order[a : a + rows]
            yield (idx, *self._topk_threshold(q[idx], qw[idx], t[idx], est[idx], kk, return_distances))

    def _topk_dense(self, qw: np.ndarray, k: int,
                    return_distances: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
        dist = self._dense(qw, self.words)
        order = np.argsort(dist, axis=1, kind="stable")  # radix sort for uint8/uint16
        if k < order.shape[1]:
            order = order[:, :k]
        top = np.take_along_axis(dist, order, axis=1).astype(np.int32) if return_distances else None
        return top, order.astype(np.int64, copy=False)

    def _estimate_radius(self, qw: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-query radius ``t`` (likely >= the k-th distance) and estimated #items <= t."""
        pos, swords = self.sample
        m = len(pos)
        ks = min(m, int(math.ceil(k * m / self.n * (1.0 + self.margin))) + self.slack)
        srt = np.sort(self._dense(qw, swords), axis=1, kind="stable")
        t = srt[:, ks - 1]
        est = np.count_nonzero(srt <= t[:, None], axis=1) * (self.n / m)
        return t, est

    def _topk_threshold(self, q: np.ndarray, qw: np.ndarray, t: np.ndarray, est: np.ndarray, k: int,
                        return_distances: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
        """Stable top-k of a chunk of queries, given radius estimates ``t`` / candidate counts ``est``."""
        r = q.shape[0]
        out_d = np.empty((r, k), dtype=np.int32) if return_distances else None
        out_p = np.empty((r, k), dtype=np.int64)
        dense = self._dense(qw, self.words) if self.engine == "numpy" else None
        cand_budget = max(1.0, self.max_bytes / 48.0)  # ~48 bytes per candidate while selecting
        failed: list[np.ndarray] = []
        for a, b in _row_groups(np.maximum(est * 1.25, k), cand_budget, r):
            rows = np.arange(a, b)
            failed.append(self._collect(q, dense, rows, t[a:b], k, out_d, out_p))
        fail = np.concatenate(failed) if failed else np.empty(0, np.int64)
        if fail.size:
            # Exact k-th distance for the queries whose estimated radius was too small.
            rows_d = dense[fail] if dense is not None else self._dense(qw[fail], self.words)
            t_exact = np.partition(rows_d, k - 1, axis=1)[:, k - 1]
            exact_counts = np.count_nonzero(rows_d <= t_exact[:, None], axis=1)
            del rows_d
            for a, b in _row_groups(exact_counts.astype(np.float64), cand_budget, len(fail)):
                left = self._collect(q, dense, fail[a:b], t_exact[a:b], k, out_d, out_p)
                assert left.size == 0, "internal error: exact radius left a query short of k items"
        return out_d, out_p

    def _collect(self, q: np.ndarray, dense: np.ndarray | None, rows: np.ndarray, t: np.ndarray, k: int,
                 out_d: np.ndarray | None, out_p: np.ndarray) -> np.ndarray:
        """Select the top-k of ``rows`` from candidates within radius ``t``; return short rows."""
        short: list[np.ndarray] = []
        if self.engine == "numpy":
            contiguous = bool(rows.size) and bool(np.all(np.diff(rows) == 1))
            block = dense[rows[0] : rows[-1] + 1] if contiguous else dense[rows]
            flat = np.flatnonzero(block <= t[:, None])
            rr = flat // self.n
            pos = flat - rr * self.n
            dist = block.ravel()[flat]
            counts = np.bincount(rr, minlength=len(rows))
            short.append(self._select(rows, counts, pos, dist, k, out_d, out_p))
        else:
            index = self.faiss_index
            for sub, radius in _radius_groups(rows, t):
                with _faiss_threads(self.faiss_threads):
                    lims, dist, pos = index.range_search(q[sub], radius + 1)
                counts = np.diff(lims).astype(np.int64)
                short.append(self._select(sub, counts, pos.astype(np.int64, copy=False), dist, k, out_d, out_p))
        return np.concatenate(short)

    def _select(self, rows: np.ndarray, counts: np.ndarray, pos: np.ndarray, dist: np.ndarray, k: int,
                out_d: np.ndarray | None, out_p: np.ndarray) -> np.ndarray:
        """Stable top-k from per-row candidate lists (concatenated, positions ascending per row) into
        ``out_*[rows[i]]``; returns the rows with fewer than ``k`` candidates."""
        ok = counts >= k
        if not ok.all():
            keep = np.repeat(ok, counts)
            pos, dist, counts, short, rows = pos[keep], dist[keep], counts[ok], rows[~ok], rows[ok]
        else:
            short = rows[:0]
        nr = len(rows)
        if nr == 0:
            return short
        lims = np.zeros(nr + 1, dtype=np.int64)
        np.cumsum(counts, out=lims[1:])
        # Candidate lists must be in ascending position order inside every row (faiss range
        # search and np.flatnonzero produce that); a decrease is only allowed at a row start.
        drops = np.flatnonzero(pos[1:] <= pos[:-1]) + 1
        if drops.size and not np.isin(drops, lims[1:-1]).all():
            rid = np.repeat(np.arange(nr, dtype=np.int64), counts)
            fix = np.lexsort((pos, rid))  # never observed; keeps results exact anyway
            pos, dist = pos[fix], dist[fix]
        # one stable radix sort on uint16 (query, distance) keys: iter_topk's chunks hold at most
        # 2**16 // (bits + 1) queries, so the keys fit
        key = np.repeat(np.arange(nr, dtype=np.uint16) * np.uint16(self.bits + 1), counts)
        np.add(key, dist, out=key, casting="unsafe")
        order = np.argsort(key, kind="stable")
        top = order[lims[:-1, None] + np.arange(k)]
        if out_d is not None:
            out_d[rows] = dist[top]
        out_p[rows] = pos[top]
        return short


class HammingIndex(PackedCodeStore):
    """Exact Hamming-distance index over packed codes with ``int64`` ids, ranked by (distance, id) on either engine.

    ``bits`` up to 65535; ``engine`` ``"auto"`` (faiss when importable), ``"faiss"`` or ``"numpy"``; ``max_bytes``
    bounds one search's working memory; ``faiss_threads`` (``None``: faiss's setting, all cores unless changed;
    on a busy machine ``1`` can be faster).
    """

    def __init__(
        self, bits: int, engine: Engine = "auto", max_bytes: int = DEFAULT_MAX_BYTES, faiss_threads: int | None = None
    ) -> None:
        super().__init__(bits)
        self.engine = resolve_engine(engine)
        self.max_bytes, self.faiss_threads = _limits(max_bytes, faiss_threads)
        self._searcher: PackedSearcher | None = None

    def __repr__(self) -> str:
        return f"HammingIndex(bits={self.bits}, engine={self.engine!r}, size={len(self)})"

    def _changed(self) -> None:
        self._searcher = None

    def _cache_bytes(self) -> int:
        return self._searcher.cached_bytes() if self._searcher is not None else 0

    def search_packed(self, packed_queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`search` for packed ``uint8`` queries (nq, ceil(bits/8))."""
        q, dist, ids = self._start_search(packed_queries, k)
        if len(self) == 0 or q.shape[0] == 0:
            return dist, ids
        if self._searcher is None:
            self._searcher = PackedSearcher(self._codes, self.bits, self.engine, self.max_bytes,
                                            faiss_threads=self.faiss_threads)
        kk = min(int(k), len(self))
        for rows, d, p in self._searcher.iter_topk(q, kk):
            dist[rows, :kk] = d
            ids[rows, :kk] = self._ids[p]
        return dist, ids

    def save(self, path: PathLike) -> Path:
        """Write a parquet file (columns ``id`` int64, ``code`` fixed-size binary) atomically."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        meta = {b"brcd.format": _FORMAT.encode(), b"brcd.bits": str(self.bits).encode(),
                b"brcd.next_id": str(self._next_id).encode()}
        nbytes = packed_width(self.bits)
        fields = [pa.field("id", pa.int64(), nullable=False), pa.field("code", pa.binary(nbytes), nullable=False)]
        table = pa.Table.from_arrays([pa.array(self._ids, type=pa.int64()), binary_column(self._codes)],
                                     schema=pa.schema(fields, metadata=meta))
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
        return Path(path)

    @classmethod
    def load(cls, path: PathLike, **options: Any) -> HammingIndex:
        """Load a :meth:`save` file (``options``: the constructor's); :class:`brcd.io.ArtifactError` if bad."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = existing_file(path, "index file ")
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as exc:
            raise ArtifactError(f"{path} is not a readable parquet index ({type(exc).__name__}); rebuild it") from None
        meta = table.schema.metadata or {}
        if meta.get(b"brcd.format") != _FORMAT.encode():
            raise ArtifactError(f"{path} is not a brcd Hamming index (missing format tag {_FORMAT!r})")
        try:
            bits = int(meta[b"brcd.bits"])
            next_id = int(meta.get(b"brcd.next_id", b"0"))
        except (KeyError, ValueError):
            raise ArtifactError(f"{path} has corrupt index metadata (bits); rebuild it") from None
        nbytes = packed_width(bits) if bits > 0 else -1
        schema = table.schema
        if schema.names != ["id", "code"] or schema.types != [pa.int64(), pa.binary(nbytes)]:
            raise ArtifactError(f"{path} has schema {schema.names} / {schema.types}, "
                                f"expected id:int64, code:fixed_size_binary[{nbytes}]")
        if table.column("id").null_count or table.column("code").null_count:
            raise ArtifactError(f"{path} holds null ids or codes; rebuild it")
        codes, ids = binary_to_numpy(table.column("code").combine_chunks()), table.column("id").to_numpy()
        return cls(bits, **options)._fill(path, "index", codes, ids.astype(np.int64), next_id)
