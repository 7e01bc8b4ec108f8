"""Retrieval metrics against brute-force references (per-query stable argsort loops)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brcd import evaluation as ev
from brcd import plots
from brcd.evaluation import RetrievalEvaluator

ENGINES = ["faiss", "numpy"]
# (engine, strategy, extra searcher options) -- "tiny sample" forces the exact-radius fallback.
CONFIGS = [
    ("faiss", "threshold", {}),
    ("numpy", "threshold", {}),
    ("faiss", "threshold", {"sample_size": 4, "margin": 0.0, "slack": 0}),
    ("numpy", "threshold", {"sample_size": 4, "margin": 0.0, "slack": 0}),
    ("faiss", "dense", {}),
    ("numpy", "dense", {}),
]


# ---------------------------------------------------------------------------------------------
# brute-force references
# ---------------------------------------------------------------------------------------------
def ref_distances(q: np.ndarray, db: np.ndarray) -> np.ndarray:
    q = np.asarray(q, dtype=np.int64)
    db = np.asarray(db, dtype=np.int64)
    return (q.shape[1] - q @ db.T) // 2


def ref_relevance(ql: np.ndarray, dl: np.ndarray) -> np.ndarray:
    return (np.asarray(ql, np.float64) @ np.asarray(dl, np.float64).T) > 0


def ref_map(q, db, ql, dl, topk) -> float:
    dist, rel = ref_distances(q, db), ref_relevance(ql, dl)
    k = db.shape[0] if topk in (None, -1) else min(topk, db.shape[0])
    aps = []
    for i in range(q.shape[0]):
        order = np.argsort(dist[i], kind="stable")[:k]
        hit = rel[i, order]
        if not hit.any():
            aps.append(0.0)
            continue
        ranks = np.flatnonzero(hit) + 1
        aps.append(np.mean(np.arange(1, len(ranks) + 1) / ranks))
    return float(np.mean(aps))


def ref_precision_at_k(q, db, ql, dl, k) -> float:
    dist, rel = ref_distances(q, db), ref_relevance(ql, dl)
    k = min(k, db.shape[0])
    return float(np.mean([rel[i, np.argsort(dist[i], kind="stable")[:k]].sum() / k for i in range(q.shape[0])]))


def ref_pr(q, db, ql, dl):
    dist, rel = ref_distances(q, db), ref_relevance(ql, dl)
    bits = q.shape[1]
    precision, recall = [], []
    for r in range(bits + 1):
        ps, rs = [], []
        for i in range(q.shape[0]):
            got = dist[i] <= r
            if got.any():
                ps.append((got & rel[i]).sum() / got.sum())
            if rel[i].any():
                rs.append((got & rel[i]).sum() / rel[i].sum())
        precision.append(np.mean(ps) if ps else np.nan)
        recall.append(np.mean(rs) if rs else np.nan)
    return np.array(precision), np.array(recall)


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
def tied_data(seed: int = 0, nq: int = 40, ndb: int = 600, bits: int = 8, pool: int = 12, classes: int = 5):
    """Codes drawn from a small pool (heavy ties), multi-hot labels, one label-less query."""
    rng = np.random.default_rng(seed)
    base = np.where(rng.random((pool, bits)) < 0.5, -1, 1).astype(np.int8)
    q = base[rng.integers(0, pool, nq)]
    db = base[rng.integers(0, pool, ndb)]
    density = min(0.25, 1.5 / classes)
    ql = (rng.random((nq, classes)) < density).astype(np.float32)
    dl = (rng.random((ndb, classes)) < density).astype(np.float32)
    ql[0] = 0  # a query with no relevant item at all
    ql[1] = 0
    ql[1, 0] = 1
    dl[:, 0] = 0  # ... and one whose only label is absent from the database
    return q, db, ql, dl


@pytest.fixture(scope="module")
def data():
    return tied_data()


# ---------------------------------------------------------------------------------------------
# mAP
# ---------------------------------------------------------------------------------------------
def test_hand_computed_example():
    # query [+1,+1]; database distances 2, 0, 1, 0 -> stable order 1, 3, 2, 0.
    q = np.array([[1, 1], [1, 1]])
    db = np.array([[-1, -1], [1, 1], [1, -1], [1, 1]])
    dl = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [1, 0, 0]])
    ql = np.array([[1, 0, 0], [0, 0, 1]])  # second query: nothing relevant
    # relevance in rank order for query 0: [0, 1, 1, 1]
    assert ev.mean_average_precision(q, db, ql, dl, None) == pytest.approx((1 / 2 + 2 / 3 + 3 / 4) / 3 / 2, abs=1e-15)
    assert ev.mean_average_precision(q, db, ql, dl, -1) == pytest.approx(23 / 72, abs=1e-15)
    # ties broken by database index: item 1 (irrelevant) precedes item 3 (relevant)
    assert ev.mean_average_precision(q, db, ql, dl, 2) == pytest.approx(0.5 / 2, abs=1e-15)
    assert ev.mean_average_precision(q, db, ql, dl, 1) == 0.0
    assert ev.precision_at_k(q, db, ql, dl, 2) == pytest.approx(0.25, abs=1e-15)
    np.testing.assert_array_equal(ev.hamming_distances(q, db), [[2, 0, 1, 0], [2, 0, 1, 0]])


@pytest.mark.parametrize("engine,strategy,opts", CONFIGS)
@pytest.mark.parametrize("topk", [1, 7, 50, 599, None, -1, 10_000])
def test_map_matches_bruteforce_with_ties(data, engine, strategy, opts, topk):
    q, db, ql, dl = data
    e = RetrievalEvaluator(engine=engine, strategy=strategy, chunk_queries=7, **opts)
    got = e.mean_average_precision(q, db, ql, dl, topk)
    assert got == pytest.approx(ref_map(q, db, ql, dl, topk), abs=1e-12)


@pytest.mark.parametrize("bits", [13, 64, 70])
def test_map_other_code_lengths(bits):
    # 70 classes -> labels span two uint64 words
    q, db, ql, dl = tied_data(seed=bits, nq=25, ndb=400, bits=bits, pool=60, classes=70 if bits == 70 else 5)
    for engine in ENGINES:
        e = RetrievalEvaluator(engine=engine, strategy="threshold", chunk_queries=6)
        assert e.mean_average_precision(q, db, ql, dl, 30) == pytest.approx(ref_map(q, db, ql, dl, 30), abs=1e-12)


@pytest.mark.parametrize("density", [0.02, 0.3, 0.9])  # sparse and dense code paths
def test_average_precision_rows(density):
    rng = np.random.default_rng(11)
    rel = rng.random((40, 300)) < density
    rel[0] = False
    want = []
    for row in rel:
        ranks = np.flatnonzero(row) + 1
        want.append(np.mean(np.arange(1, len(ranks) + 1) / ranks) if len(ranks) else 0.0)
    np.testing.assert_allclose(ev._average_precision(rel), want, rtol=0, atol=1e-12)


def test_map_whole_database_has_no_off_by_one():
    q, db, ql, dl = tied_data(seed=3, nq=10, ndb=50)
    dl[-1] = 0
    dl[-1, 1] = 1  # the last database item matters for mAP@all
    full = ev.mean_average_precision(q, db, ql, dl, None)
    assert full == pytest.approx(ref_map(q, db, ql, dl, 50), abs=1e-12)
    assert ev.mean_average_precision(q, db, ql, dl, -1) == full
    assert ev.mean_average_precision(q, db, ql, dl, 50) == full
    assert ev.mean_average_precision(q, db, ql, dl, 51) == full


def test_zero_relevant_query_counts_as_zero(data):
    q, db, ql, dl = data
    single = ev.mean_average_precision(q[:1], db, ql[:1], dl, 100)
    assert single == 0.0
    both = ev.mean_average_precision(q[:3], db, ql[:3], dl, 100)
    assert both == pytest.approx(ev.mean_average_precision(q[2:3], db, ql[2:3], dl, 100) / 3, abs=1e-15)


def test_torch_inputs_match_numpy(data):
    q, db, ql, dl = data
    want = ev.mean_average_precision(q, db, ql, dl, 50)
    got = ev.mean_average_precision(
        torch.from_numpy(q).float(), torch.from_numpy(db).float(), torch.from_numpy(ql), torch.from_numpy(dl).bool(), 50
    )
    assert got == want
    assert ev.precision_at_k(torch.from_numpy(q), torch.from_numpy(db), ql, dl, 20) == ev.precision_at_k(q, db, ql, dl, 20)


def test_chunking_and_memory_invariance(data):
    q, db, ql, dl = data
    want = ev.mean_average_precision(q, db, ql, dl, 60)
    for chunk in (1, 2, 3, 1000):
        for engine in ENGINES:
            e = RetrievalEvaluator(engine=engine, chunk_queries=chunk, max_bytes=1 << 16)
            assert e.mean_average_precision(q, db, ql, dl, 60) == pytest.approx(want, abs=1e-12)


def test_random_64bit_multilabel_matches_bruteforce():
    rng = np.random.default_rng(7)
    q = np.where(rng.random((60, 64)) < 0.5, -1, 1)
    db = np.where(rng.random((3000, 64)) < 0.5, -1, 1)
    db[1000:1400] = db[:400]  # exact duplicates
    ql = (rng.random((60, 21)) < 0.1).astype(np.float32)
    dl = (rng.random((3000, 21)) < 0.1).astype(np.float32)
    for engine in ENGINES:
        e = RetrievalEvaluator(engine=engine, chunk_queries=16)
        assert e.mean_average_precision(q, db, ql, dl, 100) == pytest.approx(ref_map(q, db, ql, dl, 100), abs=1e-12)


# ---------------------------------------------------------------------------------------------
# precision@k, PR curve, paradigms, distances
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 5, 64, 600, 1000])
def test_precision_at_k_matches_bruteforce(data, k):
    q, db, ql, dl = data
    for engine in ENGINES:
        e = RetrievalEvaluator(engine=engine, chunk_queries=9)
        assert e.precision_at_k(q, db, ql, dl, k) == pytest.approx(ref_precision_at_k(q, db, ql, dl, k), abs=1e-12)


def test_precision_recall_by_radius_matches_bruteforce(data):
    q, db, ql, dl = data
    want_p, want_r = ref_pr(q, db, ql, dl)
    got = RetrievalEvaluator(chunk_queries=3).precision_recall_by_radius(q, db, ql, dl)
    np.testing.assert_array_equal(got["radius"], np.arange(9))
    np.testing.assert_allclose(got["precision"], want_p, atol=1e-12, equal_nan=True)
    np.testing.assert_allclose(got["recall"], want_r, atol=1e-12, equal_nan=True)
    assert got["recall"][-1] == pytest.approx(1.0)
    # default chunking gives the same arrays
    default = ev.precision_recall_by_radius(q, db, ql, dl)
    np.testing.assert_allclose(default["precision"], got["precision"], atol=1e-12, equal_nan=True)


def test_precision_recall_multiword_codes():
    q, db, ql, dl = tied_data(seed=5, nq=12, ndb=150, bits=70, pool=200)
    want_p, want_r = ref_pr(q, db, ql, dl)
    got = ev.precision_recall_by_radius(q, db, ql, dl)
    np.testing.assert_allclose(got["precision"], want_p, atol=1e-12, equal_nan=True)
    np.testing.assert_allclose(got["recall"], want_r, atol=1e-12, equal_nan=True)


def test_evaluate_paradigms(data):
    q, db, ql, dl = data
    rng = np.random.default_rng(1)
    teacher = db.copy()
    flip = rng.random(teacher.shape) < 0.2
    teacher[flip] *= -1
    res = ev.evaluate_paradigms(q, db, ql, dl, 50, teacher_db=teacher)
    assert res["map_symmetric"] == pytest.approx(ref_map(q, db, ql, dl, 50), abs=1e-12)
    assert res["map_asymmetric"] == pytest.approx(ref_map(q, teacher, ql, dl, 50), abs=1e-12)
    assert res["precision_at_k_symmetric"] == pytest.approx(ref_precision_at_k(q, db, ql, dl, 50), abs=1e-12)
    assert res["precision_at_k_asymmetric"] == pytest.approx(ref_precision_at_k(q, teacher, ql, dl, 50), abs=1e-12)
    assert res["topk"] == 50
    only = ev.evaluate_paradigms(q, db, ql, dl, 50)
    assert "map_asymmetric" not in only and only["map_symmetric"] == res["map_symmetric"]
    with pytest.raises(ValueError, match="teacher_db has 7 codes"):
        ev.evaluate_paradigms(q, db, ql, dl, 50, teacher_db=teacher[:7])
    with pytest.raises(ValueError, match="bits"):
        ev.evaluate_paradigms(q, db, ql, dl, 50, teacher_db=np.ones((db.shape[0], 16)))


@pytest.mark.parametrize("bits", [1, 8, 13, 64, 70, 130])
def test_hamming_distances(bits):
    rng = np.random.default_rng(bits)
    q = np.where(rng.random((9, bits)) < 0.5, -1, 1)
    db = np.where(rng.random((31, bits)) < 0.5, -1, 1)
    got = ev.hamming_distances(q, db)
    assert got.dtype == np.int32 and got.shape == (9, 31)
    np.testing.assert_array_equal(got, ref_distances(q, db))


def test_plot_precision_recall(tmp_path, data):
    q, db, ql, dl = data
    curves = {"student": ev.precision_recall_by_radius(q, db, ql, dl), "teacher": ev.precision_recall_by_radius(q, q, ql, ql)}
    out = plots.plot_precision_recall(curves, tmp_path / "plots" / "pr.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in (tmp_path / "plots").iterdir()] == ["pr.png"]
    with pytest.raises(ValueError, match="empty"):
        plots.plot_precision_recall({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="lacks"):
        plots.plot_precision_recall({"a": {"radius": np.arange(3)}}, tmp_path / "x.png")


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
def test_validation_errors(data):
    q, db, ql, dl = data
    with pytest.raises(ValueError, match="same code length"):
        ev.mean_average_precision(q, db[:, :4], ql, dl, 10)
    with pytest.raises(ValueError, match="label widths"):
        ev.mean_average_precision(q, db, ql, dl[:, :3], 10)
    with pytest.raises(ValueError, match=r"-1 and \+1"):
        ev.mean_average_precision(np.zeros_like(q), db, ql, dl, 10)
    with pytest.raises(ValueError, match="query_labels has 3 rows"):
        ev.mean_average_precision(q, db, ql[:3], dl, 10)
    with pytest.raises(ValueError, match="2-D"):
        ev.mean_average_precision(q, db, ql.argmax(1), dl, 10)
    with pytest.raises(ValueError, match="topk"):
        ev.mean_average_precision(q, db, ql, dl, 0)
    with pytest.raises(ValueError, match="topk"):
        ev.mean_average_precision(q, db, ql, dl, -2)
    with pytest.raises(ValueError, match="empty"):
        ev.mean_average_precision(q, db[:0], ql, dl[:0], 10)
    with pytest.raises(ValueError, match="NaN"):
        ev.mean_average_precision(q, db, ql * np.nan, dl, 10)
    with pytest.raises(ValueError, match="engine"):
        RetrievalEvaluator(engine="gpu")
    with pytest.raises(ValueError, match="strategy"):
        RetrievalEvaluator(strategy="fast")
