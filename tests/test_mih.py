"""MultiIndexHashingIndex against HammingIndex and a brute-force stable argsort, with heavy ties.

The numba kernel compiles once per session (one signature; ``cache=True`` keeps it for the next
session), so these tests cost about a second each after the first.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brcd.codes import pack_codes
from brcd.search import HammingIndex, load_index
from brcd.io import ArtifactError
from brcd.search.mih import MultiIndexHashingIndex, choose_m, substring_bounds

INT32_MAX = np.iinfo(np.int32).max


def brute_search(q, db, ids, k):
    """Reference: stable argsort of the distances over the database sorted by id."""
    order = np.argsort(ids, kind="stable")
    db, ids = db[order], ids[order]
    dist = (q.shape[1] - q.astype(np.int64) @ db.astype(np.int64).T) // 2
    kk = min(k, len(ids))
    top = np.argsort(dist, axis=1, kind="stable")[:, :kk]
    out_d = np.full((q.shape[0], k), INT32_MAX, dtype=np.int64)
    out_i = np.full((q.shape[0], k), -1, dtype=np.int64)
    out_d[:, :kk] = np.take_along_axis(dist, top, axis=1)
    out_i[:, :kk] = ids[top]
    return out_d, out_i


def make_codes(rng, n, bits, kind):
    """{-1,+1} codes: uniform, clustered (centres + 5% bit noise), or duplicates of 4 patterns."""
    if kind == "random":
        return np.where(rng.random((n, bits)) < 0.5, -1, 1).astype(np.int8)
    pool = 4 if kind == "dups" else 12
    base = np.where(rng.random((pool, bits)) < 0.5, -1, 1).astype(np.int8)
    codes = base[rng.integers(0, pool, n)]
    if kind == "clustered":
        codes = np.where(rng.random(codes.shape) < 0.05, -codes, codes)
    return codes


def assert_same(mih, ref_index, q, db, ids, ks):
    for k in ks:
        d, i = mih.search(q, k)
        assert d.dtype == np.int32 and i.dtype == np.int64 and d.shape == i.shape == (q.shape[0], k)
        hd, hi = ref_index.search(q, k)
        np.testing.assert_array_equal(d, hd, err_msg=f"k={k}")
        np.testing.assert_array_equal(i, hi, err_msg=f"k={k}")
        bd, bi = brute_search(q, db, ids, k)
        np.testing.assert_array_equal(d, bd, err_msg=f"k={k}")
        np.testing.assert_array_equal(i, bi, err_msg=f"k={k}")


@pytest.mark.parametrize("kind", ["random", "clustered", "dups"])
@pytest.mark.parametrize("bits", [16, 32, 64, 128, 70])
def test_matches_hamming_index_and_bruteforce(bits, kind):
    rng = np.random.default_rng(bits)
    n = 1200
    db = make_codes(rng, n, bits, kind)
    q = np.concatenate([make_codes(rng, 12, bits, kind), db[:3]])  # exact matches too
    q = np.where(rng.random(q.shape) < 0.03, -q, q)
    ids = rng.permutation(10**6)[:n].astype(np.int64) - 400_000  # unsorted, negative
    mih = MultiIndexHashingIndex(bits)
    mih.add(db, ids)
    ref = HammingIndex(bits, engine="numpy")
    ref.add(db, ids)
    assert mih.m == choose_m(bits, n)
    assert_same(mih, ref, q, db, ids, (1, 7, 10, 100, n - 1, n, n + 50))


@pytest.mark.parametrize("m", [2, 3, 5, 8, 13])
def test_every_m_gives_the_same_answers(m):
    """m <= 5 on 64 bits: sparse tables (sorted keys + bisection; m=2: 32-bit keys); m >= 8: direct offsets."""
    rng = np.random.default_rng(m)
    db = make_codes(rng, 900, 64, "clustered")
    db[100:300] = db[0]  # 201 copies of one code: ties across every boundary
    q = np.concatenate([db[:2], make_codes(rng, 10, 64, "clustered")])
    ids = np.arange(900, dtype=np.int64)[::-1] * 7
    mih = MultiIndexHashingIndex(64, m=m)
    mih.add(db, ids)
    ref = HammingIndex(64)
    ref.add(db, ids)
    assert mih.m == m
    assert_same(mih, ref, q, db, ids, (1, 10, 150, 250, 1000))
    assert set(mih._tables["dense"].tolist()) == ({1} if m >= 8 else {0})  # 2**b <= 2 n: direct offsets


def test_stopping_rule_is_exact_at_the_pigeonhole_bound():
    """Query 0 and four 8-bit substrings. C (id 0) differs by one bit in every substring: d = 4,
    met at substring radius 1 only. D (id 1) differs by 4 bits in substring 0: d = 4, met at
    radius 0 in tables 1-3. After radius 0 only d <= 3 is guaranteed (m*(r+1) - 1), so a rule
    that stopped there (e.g. "d <= m*(r+1)") would answer D for k=1; the tie goes to C."""
    bits, m = 32, 4
    q = np.zeros((1, bits), dtype=bool)
    c = np.zeros(bits, dtype=bool)
    c[[0, 8, 16, 24]] = True
    d = np.zeros(bits, dtype=bool)
    d[[1, 2, 3, 4]] = True
    e = np.zeros(bits, dtype=bool)  # d = 5 = m*r + j + 1 after (r=1, j=0): sd (2, 1, 1, 1)
    e[[0, 1, 9, 17, 25]] = True
    db = np.stack([c, d, e])
    mih = MultiIndexHashingIndex(bits, m=m)
    mih.add(db)
    dist, ids = mih.search(q, 1)
    assert ids.tolist() == [[0]] and dist.tolist() == [[4]]
    dist, ids = mih.search(q, 3)
    assert ids.tolist() == [[0, 1, 2]] and dist.tolist() == [[4, 4, 5]]
    np.testing.assert_array_equal(substring_bounds(bits, m), [0, 8, 16, 24, 32])
    # many random configurations near the bound, all k, against brute force
    rng = np.random.default_rng(0)
    pm1 = np.zeros((400, bits), np.int8) - 1
    for row in pm1:  # few flips per substring, so distances pile up at m*r + j
        for s in range(m):
            row[s * 8 + rng.choice(8, rng.integers(0, 3), replace=False)] = 1
    ref = HammingIndex(bits)
    ref.add(pm1)
    mih = MultiIndexHashingIndex(bits, m=m)
    mih.add(pm1)
    qq = -np.ones((3, bits), np.int8)
    qq[1, [0, 9]] = 1
    qq[2, 20] = 1
    assert_same(mih, ref, qq, pm1, np.arange(400), range(1, 402, 23))


def test_add_in_batches_packed_remove_and_torch_input():
    rng = np.random.default_rng(5)
    bits = 48
    a, b, c = (make_codes(rng, n, bits, "clustered") for n in (500, 300, 200))
    mih, ref = MultiIndexHashingIndex(bits), HammingIndex(bits)
    for index in (mih, ref):
        np.testing.assert_array_equal(index.add(a), np.arange(500))
        np.testing.assert_array_equal(index.add_packed(pack_codes(b)), np.arange(500, 800))
        index.add(torch.from_numpy(c).float(), ids=np.arange(-200, 0))  # smaller ids: re-sorted
    q = make_codes(rng, 15, bits, "clustered")
    allc, allids = np.concatenate([a, b, c]), np.concatenate([np.arange(800), np.arange(-200, 0)])
    assert len(mih) == 1000
    assert_same(mih, ref, q, allc, allids, (1, 10, 999, 1001))
    for index in (mih, ref):
        assert index.remove(np.arange(0, 800, 2)) == 400
    keep = np.concatenate([np.arange(1, 800, 2), np.arange(800, 1000)])
    assert_same(mih, ref, q, allc[keep], allids[keep], (1, 10, 700))
    np.testing.assert_array_equal(mih.ids, ref.ids)
    np.testing.assert_array_equal(mih.packed_codes, ref.packed_codes)
    assert mih.add(a[:2]).tolist() == [800, 801]  # after the largest id ever assigned
    assert "MultiIndexHashingIndex(bits=48" in repr(mih)
    assert mih.memory_bytes >= 602 * (6 + 8)


def test_empty_index_and_k_beyond_size():
    mih = MultiIndexHashingIndex(24)
    d, i = mih.search(np.ones((2, 24)), 5)
    assert (i == -1).all() and (d == INT32_MAX).all()
    mih.add(np.ones((3, 24)))
    d, i = mih.search(-np.ones((1, 24)), 5)
    assert i.tolist() == [[0, 1, 2, -1, -1]] and d.tolist() == [[24, 24, 24, INT32_MAX, INT32_MAX]]
    assert mih.search(np.ones((0, 24)), 3)[0].shape == (0, 3)


def test_save_load_roundtrip_and_load_index(tmp_path):
    rng = np.random.default_rng(6)
    db = make_codes(rng, 700, 64, "clustered")
    ids = rng.permutation(10_000)[:700].astype(np.int64)
    mih = MultiIndexHashingIndex(64, m=4)
    mih.add(db, ids)
    path = mih.save(tmp_path / "idx" / "mih.npz")
    assert sorted(p.name for p in path.parent.iterdir()) == ["mih.npz"]  # no temp file left
    for loaded in (MultiIndexHashingIndex.load(path), load_index(path)):
        assert isinstance(loaded, MultiIndexHashingIndex) and loaded.m == 4 and len(loaded) == 700
        np.testing.assert_array_equal(loaded.ids, mih.ids)
        q = make_codes(rng, 9, 64, "clustered")
        for k in (1, 50):
            np.testing.assert_array_equal(loaded.search(q, k)[1], mih.search(q, k)[1])
        assert loaded.add(db[:1]).tolist() == [int(ids.max()) + 1]
    flat = HammingIndex(64)
    flat.add(db, ids)
    assert isinstance(load_index(flat.save(tmp_path / "flat.parquet")), HammingIndex)
    auto = MultiIndexHashingIndex(16)
    auto.add(db[:50, :16])
    assert MultiIndexHashingIndex.load(auto.save(tmp_path / "auto.npz"))._m is None


def test_bad_files_fail_in_one_line(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not an index at all")
    other = tmp_path / "other.npz"
    np.savez(other, x=np.arange(3))
    HammingIndex(8).save(tmp_path / "flat.parquet")
    truncated = tmp_path / "truncated.npz"
    index = MultiIndexHashingIndex(32)
    index.add(np.ones((10, 32)))
    truncated.write_bytes(index.save(tmp_path / "ok.npz").read_bytes()[:200])
    for path, pattern in [(tmp_path / "missing.npz", "does not exist"), (garbage, "corrupt|not a readable"),
                          (other, "missing format tag"), (tmp_path / "flat.parquet", "corrupt|not a readable"),
                          (truncated, "corrupt|not a readable")]:
        with pytest.raises(ArtifactError, match=pattern) as info:
            MultiIndexHashingIndex.load(path)
        assert "\n" not in str(info.value)
    with pytest.raises(ArtifactError, match="does not exist"):
        load_index(tmp_path / "missing.npz")


def test_bad_arguments_fail_in_one_line():
    index = MultiIndexHashingIndex(16)
    index.add(np.ones((4, 16)))
    bad = [
        (lambda: MultiIndexHashingIndex(0), "bits must be"),
        (lambda: MultiIndexHashingIndex(64, m=1), "m must be an integer from 2 to 64"),
        (lambda: MultiIndexHashingIndex(16, m=17), "m must be"),
        (lambda: index.add(np.ones((2, 8))), "16-bit"),
        (lambda: index.search(np.ones((2, 24)), 3), "16-bit"),
        (lambda: index.search(np.ones((2, 16)), 0), "k must be"),
        (lambda: index.search(np.ones((2, 16)), 2.5), "k must be"),
        (lambda: index.add(np.zeros((2, 16))), r"-1 and \+1"),
        (lambda: index.add_packed(np.zeros((2, 3), np.uint8)), "bytes per code"),
        (lambda: index.add_packed(np.zeros((2, 2), np.int64)), "packed uint8"),
        (lambda: index.add(np.ones((2, 16)), ids=[0, 1]), "duplicate id 0"),
        (lambda: index.remove([99]), "not in the index"),
    ]
    for fn, pattern in bad:
        with pytest.raises(ValueError, match=pattern) as info:
            fn()
        assert "\n" not in str(info.value)
    odd = MultiIndexHashingIndex(12)
    with pytest.raises(ValueError, match="padding bits"):
        odd.add_packed(np.full((1, 2), 255, np.uint8))


def test_choose_m_follows_the_paper():
    assert choose_m(64, 10_000_000) == 3  # 64 / log2(1e7) = 2.75
    assert choose_m(128, 10_000_000) == 6  # 5.5
    assert choose_m(64, 1) == 2 and choose_m(256, 2) == 256 and choose_m(16, 1000) == 2
    assert choose_m(64, 2**32) == 2  # substrings of at most 32 bits
    np.testing.assert_array_equal(np.diff(substring_bounds(70, 3)), [24, 23, 23])


def test_candidate_buffer_compacts_and_grows():
    """3,000 copies of the query's code in one bucket: the kernel's candidate buffer (1,024 entries
    at first) is compacted and doubled while every copy still ties for the top-k."""
    rng = np.random.default_rng(7)
    db = make_codes(rng, 5000, 64, "random")
    order = rng.permutation(5000)
    db[order[:3000]] = db[order[0]]
    ids = np.arange(5000, dtype=np.int64)
    mih, ref = MultiIndexHashingIndex(64), HammingIndex(64)
    mih.add(db, ids)
    ref.add(db, ids)
    q = np.concatenate([db[order[:1]], make_codes(rng, 3, 64, "random")])
    assert_same(mih, ref, q, db, ids, (1, 200, 2999, 3001))
    assert mih.last_stats["candidates"] >= 3000


def test_size_cap_is_checked_before_anything_is_stored(monkeypatch):
    """int32 table positions cap an index's size; a batch that would pass it is refused whole."""
    from brcd.search.mih import MultiIndexHashingIndex

    monkeypatch.setattr(MultiIndexHashingIndex, "max_codes", 3)
    index = MultiIndexHashingIndex(16)
    index.add(np.ones((2, 16), dtype=np.int8))
    with pytest.raises(ValueError, match="a MultiIndexHashingIndex holds at most 3 codes"):
        index.add(np.ones((2, 16), dtype=np.int8))
    assert len(index) == 2 and index.ids.tolist() == [0, 1]
