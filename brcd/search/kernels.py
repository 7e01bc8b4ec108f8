"""Compiled (numba) hot loop of :class:`brcd.search.mih.MultiIndexHashingIndex`, single-threaded.

For substring radius ``r = 0, 1, ...`` and every table in turn it enumerates the keys at distance ``r``
(Gosper's hack, or a scan of the table's keys when ``C(b, r)`` exceeds them), looks them up ``CHUNK`` at a
time (independent loads whose cache misses overlap) and verifies a bucket's codes only where a code is
*first* met (decided from its substring distances, so no visited set); it stops by the pigeonhole bound
(docs/SEARCH.md, "Exact multi-index hashing"). ``cache=True`` keeps the machine code in ``__pycache__``.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from llvmlite import ir
from numba.extending import intrinsic


CHUNK = 256  # keys looked up before their buckets are verified


@intrinsic
def _popcount(typingctx, x):  # noqa: ARG001 - numba's intrinsic signature
    """LLVM ``ctpop`` on a uint64 (one ``popcnt`` instruction on x86-64), returned as int64."""
    sig = types.int64(types.uint64)

    def codegen(context, builder, signature, args):  # noqa: ARG001
        return builder.ctpop(args[0])

    return sig, codegen


@intrinsic
def _ctz(typingctx, x):  # noqa: ARG001
    """LLVM ``cttz`` (count trailing zeros) on a nonzero int64."""
    sig = types.int64(types.int64)

    def codegen(context, builder, signature, args):  # noqa: ARG001
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 1))

    return sig, codegen


@njit(cache=True, nogil=True)
def _heapsort(a, n):
    """Sort ``a[:n]`` (int64) ascending in place (cheaper to compile than ``np.argsort``)."""
    for start in range(n // 2 - 1, -1, -1):
        _sift(a, start, n)
    for end in range(n - 1, 0, -1):
        tmp = a[0]
        a[0] = a[end]
        a[end] = tmp
        _sift(a, 0, end)


@njit(cache=True, nogil=True)
def _sift(a, root, n):
    while True:
        child = 2 * root + 1
        if child >= n:
            return
        if child + 1 < n and a[child + 1] > a[child]:
            child += 1
        if a[root] >= a[child]:
            return
        tmp = a[root]
        a[root] = a[child]
        a[child] = tmp
        root = child


@njit(cache=True, nogil=True)
def _kth_bound(hist, k, bits):
    """Smallest t with sum(hist[:t+1]) >= k, or ``bits`` when fewer than k were counted."""
    c = 0
    for t in range(bits + 1):
        c += hist[t]
        if c >= k:
            return t
    return bits


@njit(cache=True, nogil=True)
def mih_search(
    qwords,  # (nq, W) uint64, big-endian bit order (bit i of a code = bit 63 - i % 64 of word i // 64)
    qkeys,  # (m, nq) uint32: the queries' substrings
    codes_all,  # (m * n, W) uint64, same layout: table j's codes in its key order are rows j*n:(j+1)*n
    sublens,  # (m,) int64: substring lengths (<= 32)
    w0,  # (m,) int64: first word of each substring
    mk0,  # (m,) uint64: the substring's bits in word w0
    w1,  # (m,) int64: second word (== w0 when the substring lies in one word)
    mk1,  # (m,) uint64: its bits in word w1 (0 when none)
    dense,  # (m,) uint8: 1 = offsets indexed by key directly, 0 = binary search in keys
    key_ptr,  # (m + 1,) int64: table j's sorted unique keys are keys_all[key_ptr[j]:key_ptr[j+1]]
    keys_all,  # uint32
    off_ptr,  # (m + 1,) int64: table j's bucket offsets are offs_all[off_ptr[j]:off_ptr[j+1]]
    offs_all,  # int32
    pos_all,  # (m * n,) int32: table j's positions sorted by key are pos_all[j*n:(j+1)*n]
    k,  # int64
    bits,  # int64: code length L
    out_d,  # (nq, k) int32, prefilled by the caller (int32 max)
    out_p,  # (nq, k) int64, prefilled by the caller (-1)
):
    """Exact top-k by (Hamming distance, database position); returns probes and candidates done."""
    nq, nw = qwords.shape
    m = sublens.shape[0]
    n = pos_all.shape[0] // max(m, 1)
    maxb = 0
    for j in range(m):
        maxb = max(maxb, sublens[j])
    cap0 = max(1, min(max(1024, 4 * k), n))  # a query verifies each code at most once
    hist = np.zeros(bits + 1, np.int64)
    x = np.zeros(nw, np.uint64)
    los = np.empty(CHUNK, np.int64)
    his = np.empty(CHUNK, np.int64)
    stats = np.zeros(2, np.int64)
    binom = np.zeros((65, 65), np.int64)  # binom[b, r] = C(b, r), b <= 32 here
    for b in range(65):
        binom[b, 0] = 1
        for r in range(1, b + 1):
            binom[b, r] = binom[b - 1, r - 1] + binom[b - 1, r]
    for qi in range(nq):
        hist[:] = 0
        cap = cap0
        buf_d = np.empty(cap, np.int64)
        buf_p = np.empty(cap, np.int64)
        nbuf = 0
        bound = bits  # candidates farther than this cannot enter the top-k
        done = n == 0
        r = 0
        while not done:
            for j in range(m):
                b = sublens[j]
                if r <= b:
                    qk = np.int64(qkeys[j, qi])
                    kb = key_ptr[j]
                    nu = key_ptr[j + 1] - kb
                    ob = off_ptr[j]
                    pb = j * n
                    # enumerate the C(b, r) keys at radius r, or scan the table's keys when fewer
                    nkeys = (np.int64(1) << b) if dense[j] else nu
                    scan = binom[b, r] > nkeys
                    v = (np.int64(1) << r) - 1
                    limit = np.int64(1) << b
                    it = 0
                    more = True
                    while more:
                        # phase 1: the non-empty buckets of up to CHUNK keys (independent loads,
                        # so the CPU overlaps their cache misses)
                        nb = 0
                        while nb < CHUNK:
                            if scan:
                                if it >= nkeys:
                                    more = False
                                    break
                                key = it if dense[j] else np.int64(keys_all[kb + it])
                                it += 1
                                if _popcount(np.uint64(key ^ qk)) != r:
                                    continue
                                lo = np.int64(offs_all[ob + it - 1])
                                hi = np.int64(offs_all[ob + it])
                            else:
                                if v >= limit:
                                    more = False
                                    break
                                key = qk ^ v
                                if r == 0:
                                    v = limit
                                else:
                                    tt = v | (v - 1)  # next r-subset of the b bits (Gosper's hack)
                                    v = (tt + 1) | (((~tt & -~tt) - 1) >> (_ctz(v) + 1))
                                if dense[j]:
                                    lo = np.int64(offs_all[ob + key])
                                    hi = np.int64(offs_all[ob + key + 1])
                                else:
                                    lo = 0
                                    hi = 0
                                    a = 0
                                    z = nu
                                    while a < z:  # first unique key >= key
                                        mid = (a + z) >> 1
                                        if np.int64(keys_all[kb + mid]) < key:
                                            a = mid + 1
                                        else:
                                            z = mid
                                    if a < nu and np.int64(keys_all[kb + a]) == key:
                                        lo = np.int64(offs_all[ob + a])
                                        hi = np.int64(offs_all[ob + a + 1])
                            stats[0] += 1
                            los[nb] = pb + lo
                            his[nb] = pb + hi
                            nb += hi > lo
                        # phase 2: verify the buckets' codes (contiguous rows of codes_all)
                        for u in range(nb):
                            for t in range(los[u], his[u]):
                                for w in range(nw):
                                    x[w] = qwords[qi, w] ^ codes_all[t, w]
                                first = True
                                for jj in range(m):
                                    if jj != j:
                                        s = _popcount(x[w0[jj]] & mk0[jj]) + _popcount(x[w1[jj]] & mk1[jj])
                                        if s < r or (jj < j and s == r):
                                            first = False
                                            break
                                if not first:
                                    continue
                                stats[1] += 1
                                d = 0
                                for w in range(nw):
                                    d += _popcount(x[w])
                                hist[d] += 1
                                if d <= bound:
                                    if nbuf == cap:  # drop what cannot enter the top-k, grow if still full
                                        bound = _kth_bound(hist, k, bits)
                                        kept = 0
                                        for uu in range(nbuf):
                                            if buf_d[uu] <= bound:
                                                buf_d[kept] = buf_d[uu]
                                                buf_p[kept] = buf_p[uu]
                                                kept += 1
                                        nbuf = kept
                                        if nbuf * 2 > cap:
                                            buf_d = np.concatenate((buf_d, np.empty(cap, np.int64)))
                                            buf_p = np.concatenate((buf_p, np.empty(cap, np.int64)))
                                            cap *= 2
                                    if d <= bound:
                                        buf_d[nbuf] = d
                                        buf_p[nbuf] = pos_all[t]
                                        nbuf += 1
                # stopping rule after level r of tables 0..j: every code within G has been seen
                g = m * r + j
                if g >= bits or r >= maxb and j == m - 1:
                    done = True
                    break
                cnt = 0
                for t in range(g + 1):
                    cnt += hist[t]
                if cnt >= k:
                    done = True
                    break
                bound = _kth_bound(hist, k, bits)
            r += 1
        bound = _kth_bound(hist, k, bits)
        kept = 0
        for u in range(nbuf):
            if buf_d[u] <= bound:
                buf_d[kept] = buf_d[u] * n + buf_p[u]
                kept += 1
        _heapsort(buf_d, kept)
        for u in range(min(k, kept)):
            key2 = buf_d[u]
            out_d[qi, u] = key2 // n
            out_p[qi, u] = key2 % n
    return stats
