"""HammingIndex and the shared search kernel against brute force, with heavy ties."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brcd.codes import pack_codes
from brcd.search.flat import HammingIndex, PackedSearcher
from brcd.io import ArtifactError

ENGINES = ["faiss", "numpy"]


def random_codes(rng, n, bits, pool=None):
    if pool is None:
        return np.where(rng.random((n, bits)) < 0.5, -1, 1).astype(np.int8)
    base = np.where(rng.random((pool, bits)) < 0.5, -1, 1).astype(np.int8)
    return base[rng.integers(0, pool, n)]


def brute_search(q, db, ids, k):
    """Reference: stable argsort of distances over the database sorted by id."""
    order_by_id = np.argsort(ids, kind="stable")
    db, ids = db[order_by_id], ids[order_by_id]
    dist = (q.shape[1] - q.astype(np.int64) @ db.astype(np.int64).T) // 2
    kk = min(k, len(ids))
    top = np.argsort(dist, axis=1, kind="stable")[:, :kk]
    out_d = np.full((q.shape[0], k), np.iinfo(np.int32).max, dtype=np.int64)
    out_i = np.full((q.shape[0], k), -1, dtype=np.int64)
    out_d[:, :kk] = np.take_along_axis(dist, top, axis=1)
    out_i[:, :kk] = ids[top]
    return out_d, out_i


# ---------------------------------------------------------------------------------------------
# kernel
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("strategy", ["dense", "threshold"])
@pytest.mark.parametrize("sample", [(2048, 0.3, 3), (3, 0.0, 0)])  # second: forces the fallback
@pytest.mark.parametrize("bits,pool", [(8, 10), (12, None), (64, 40), (130, 30)])
def test_kernel_matches_stable_argsort(engine, strategy, sample, bits, pool):
    rng = np.random.default_rng(bits)
    q = random_codes(rng, 23, bits, pool)
    db = random_codes(rng, 700, bits, pool)
    ref_d, ref_p = brute_search(q, db, np.arange(700), 700)
    size, margin, slack = sample
    s = PackedSearcher(pack_codes(db), bits, engine, strategy=strategy, chunk_queries=5, sample_size=size, margin=margin, slack=slack)
    for k in (1, 9, 150, 700):
        got_d = np.zeros((23, k), np.int64)
        got_p = np.zeros((23, k), np.int64)
        seen = []
        for rows, d, p in s.iter_topk(pack_codes(q), k):
            assert d.dtype == np.int32 and p.dtype == np.int64
            got_d[rows], got_p[rows] = d, p
            seen.append(rows)
        np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(23))
        np.testing.assert_array_equal(got_d, ref_d[:, :k])
        np.testing.assert_array_equal(got_p, ref_p[:, :k])


def test_kernel_memory_budget_groups_rows():
    # all codes identical: every item ties with every other one; a tiny budget splits rows.
    rng = np.random.default_rng(0)
    db = np.ones((2000, 16), dtype=np.int8)
    q = random_codes(rng, 30, 16)
    for engine in ENGINES:
        s = PackedSearcher(pack_codes(db), 16, engine, max_bytes=1 << 16, strategy="threshold")
        for rows, d, p in s.iter_topk(pack_codes(q), 10):
            np.testing.assert_array_equal(p, np.tile(np.arange(10), (len(rows), 1)))
            np.testing.assert_array_equal(d, np.abs(q[rows] - 1).sum(1, keepdims=True).repeat(10, 1) // 2)


# ---------------------------------------------------------------------------------------------
# index
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,pool", [(8, 12), (12, None), (64, 50), (64, None)])
def test_index_matches_bruteforce_and_engines_agree(bits, pool):
    rng = np.random.default_rng(1)
    db = random_codes(rng, 1500, bits, pool)
    q = random_codes(rng, 40, bits, pool)
    ids = rng.permutation(10**6)[:1500].astype(np.int64) - 500_000  # arbitrary, unsorted, negative
    results = {}
    for engine in ENGINES:
        index = HammingIndex(bits, engine=engine)
        index.add(db, ids)
        assert len(index) == 1500
        for k in (1, 10, 100, 1499, 1500, 1600):
            d, i = index.search(q, k)
            assert d.dtype == np.int32 and i.dtype == np.int64 and d.shape == (40, k)
            ref_d, ref_i = brute_search(q, db, ids, k)
            np.testing.assert_array_equal(d, ref_d)
            np.testing.assert_array_equal(i, ref_i)
            results[engine, k] = (d, i)
    for k in (1, 10, 100, 1600):
        np.testing.assert_array_equal(results["faiss", k][1], results["numpy", k][1])


def test_faiss_tie_order_is_ascending_id_with_many_ties():
    # 8-bit codes from 3 patterns: thousands of exact ties around every boundary.
    rng = np.random.default_rng(2)
    db = random_codes(rng, 5000, 8, pool=3)
    q = random_codes(rng, 30, 8, pool=3)
    ids = np.arange(5000, dtype=np.int64)[::-1].copy() * 3  # added in descending id order
    fa = HammingIndex(8, engine="faiss")
    fa.add(db, ids)
    nu = HammingIndex(8, engine="numpy")
    nu.add(db, ids)
    for k in (1, 17, 1000, 2500):
        fd, fi = fa.search(q, k)
        nd, ni = nu.search(q, k)
        np.testing.assert_array_equal(fi, ni)
        np.testing.assert_array_equal(fd, nd)
        ref_d, ref_i = brute_search(q, db, ids, k)
        np.testing.assert_array_equal(fi, ref_i)
        # within equal distances ids ascend
        same = np.diff(fd, axis=1) == 0
        assert np.all(np.diff(fi, axis=1)[same] > 0)


@pytest.mark.parametrize("engine", ENGINES)
def test_add_remove_and_default_ids(engine):
    rng = np.random.default_rng(3)
    a, b = random_codes(rng, 300, 16, 20), random_codes(rng, 200, 16, 20)
    index = HammingIndex(16, engine=engine)
    np.testing.assert_array_equal(index.add(a), np.arange(300))
    np.testing.assert_array_equal(index.add(torch.from_numpy(b).float()), np.arange(300, 500))
    q = random_codes(rng, 20, 16, 20)
    index.search(q, 5)  # builds the engine cache, which remove() must invalidate
    removed = np.arange(0, 500, 3)
    assert index.remove(removed) == len(removed)
    keep = np.setdiff1d(np.arange(500), removed)
    allc = np.concatenate([a, b])
    for k in (5, 400):
        d, i = index.search(q, k)
        ref_d, ref_i = brute_search(q, allc[keep], keep, k)
        np.testing.assert_array_equal(i, ref_i)
        np.testing.assert_array_equal(d, ref_d)
    # default ids continue after the largest id ever assigned, even after removing it
    index.remove([499])
    index.search(q, 3)
    np.testing.assert_array_equal(index.add(a[:2]), [500, 501])
    d, i = index.search(q, 400)  # the cache is invalidated by add() as well
    keep = np.append(keep[keep != 499], [500, 501])
    ref_d, ref_i = brute_search(q, np.concatenate([allc, a[:2]])[keep], keep, 400)
    np.testing.assert_array_equal(i, ref_i)
    with pytest.raises(ValueError, match="not in the index"):
        index.remove([0])  # already removed
    with pytest.raises(ValueError, match="duplicate id 1"):
        index.add(a[:2], ids=np.array([1, 7]))
    with pytest.raises(ValueError, match="16-bit"):
        index.add(random_codes(rng, 2, 8))
    with pytest.raises(ValueError, match="16-bit"):
        index.search(random_codes(rng, 2, 24), 3)
    with pytest.raises(ValueError, match="k must be"):
        index.search(q, 0)
    with pytest.raises(ValueError, match=r"-1 and \+1"):
        index.add(np.zeros((2, 16)))


def test_empty_index_and_memory():
    index = HammingIndex(32)
    d, i = index.search(np.ones((3, 32)), 4)
    assert (i == -1).all() and (d == np.iinfo(np.int32).max).all()
    index.add(np.ones((1000, 32)))
    assert index.memory_bytes >= 1000 * (4 + 8)
    index.search(np.ones((2, 32)), 3)  # builds engine caches, still counted
    assert index.memory_bytes >= 1000 * (4 + 8 + 4)
    with pytest.raises(ValueError, match="bits"):
        HammingIndex(0)
    with pytest.raises(ValueError, match="engine"):
        HammingIndex(8, engine="gpu")


@pytest.mark.parametrize("bits", [12, 64])
def test_save_load_roundtrip(tmp_path, bits):
    rng = np.random.default_rng(4)
    db = random_codes(rng, 400, bits, 30)
    ids = rng.permutation(5000)[:400].astype(np.int64)
    index = HammingIndex(bits, engine="numpy")
    index.add(db, ids)
    index.remove(ids[:50])
    path = index.save(tmp_path / "idx" / "codes.parquet")
    assert sorted(p.name for p in path.parent.iterdir()) == ["codes.parquet"]  # no temp left

    import pyarrow.parquet as pq

    table = pq.read_table(path)
    assert table.schema.field("id").type.bit_width == 64
    assert table.schema.field("code").type.byte_width == (bits + 7) // 8
    assert table.schema.metadata[b"brcd.bits"] == str(bits).encode()

    loaded = HammingIndex.load(path, engine="faiss")
    assert loaded.bits == bits and len(loaded) == 350
    np.testing.assert_array_equal(loaded.ids, index.ids)
    np.testing.assert_array_equal(loaded.packed_codes, index.packed_codes)
    q = random_codes(rng, 15, bits, 30)
    for k in (3, 200):
        np.testing.assert_array_equal(loaded.search(q, k)[1], index.search(q, k)[1])
    assert loaded.add(db[:1])[0] == index.add(db[:1])[0]  # next default id survives


def test_load_errors(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        HammingIndex.load(tmp_path / "missing.parquet")
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ArtifactError, match="not a readable parquet"):
        HammingIndex.load(bad)

    import pyarrow as pa
    import pyarrow.parquet as pq

    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"id": pa.array([1, 2], pa.int64())}), other)
    with pytest.raises(ArtifactError, match="not a brcd Hamming index"):
        HammingIndex.load(other)

    good = HammingIndex(8)
    good.add(np.ones((3, 8)))
    path = good.save(tmp_path / "good.parquet")
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(ArtifactError):
        HammingIndex.load(truncated)

    # duplicate ids inside a file are rejected
    table = pq.read_table(path)
    dup = table.set_column(0, table.schema.field("id"), pa.array([1, 1, 2], pa.int64()))
    pq.write_table(dup, tmp_path / "dup.parquet")
    with pytest.raises(ArtifactError, match="duplicate id"):
        HammingIndex.load(tmp_path / "dup.parquet")


def test_faiss_thread_setting_is_restored():
    faiss = pytest.importorskip("faiss")
    before = faiss.omp_get_max_threads()
    rng = np.random.default_rng(5)
    index = HammingIndex(16, engine="faiss", faiss_threads=1)
    index.add(random_codes(rng, 3000, 16))
    d, i = index.search(random_codes(rng, 5, 16), 5)
    assert faiss.omp_get_max_threads() == before
    with pytest.raises(ValueError, match="faiss_threads"):
        HammingIndex(16, faiss_threads=0)
