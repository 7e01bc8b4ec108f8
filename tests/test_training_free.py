"""Training-free hashing baselines (brcd.training_free): ITQ against a reference written from the
paper, orthogonal rotations, determinism, fits that see only the training rows, and scores through
the models' own mAP code."""

import numpy as np
import pytest
from scipy.stats import ortho_group

from brcd import training_free as tf
from brcd.evaluation import mean_average_precision


def _clusters(n: int, d: int = 24, classes: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Anisotropic Gaussian clusters (features) and their one-hot labels."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (classes, d))
    y = rng.integers(0, classes, n)
    x = centres[y] + rng.normal(0, 1, (n, d)) * np.linspace(0.2, 2.0, d)
    return x.astype(np.float32), np.eye(classes, dtype=np.float32)[y]


def _reference_itq(v: np.ndarray, r: np.ndarray, iterations: int) -> np.ndarray:
    """Gong & Lazebnik's update from the paper: B = sgn(VR); S Omega S_hat^T = svd(B^T V); R = S_hat S^T."""
    for _ in range(iterations):
        b = np.where(v @ r >= 0, 1.0, -1.0)
        s, _, s_hat_t = np.linalg.svd(b.T @ v)
        r = s_hat_t.T @ s.T
    return r


def test_itq_rotation_is_orthogonal_matches_the_paper_and_its_loss_never_increases():
    x, _ = _clusters(400)
    h = tf.TrainingFreeHasher("pca_itq", bits=8, seed=3).fit(x)
    r = h.rotation
    assert np.abs(r.T @ r - np.eye(8)).max() < 1e-9
    assert len(h.losses) == tf.ITQ_ITERATIONS
    assert all(b <= a * (1 + 1e-12) for a, b in zip(h.losses, h.losses[1:])), h.losses
    assert h.losses[-1] < h.losses[0]
    # the same iterations from the same random start, written from the paper's formulas
    from sklearn.decomposition import PCA

    x64 = x.astype(np.float64)
    v = PCA(8, svd_solver="full").fit(x64).transform(x64)
    ref = _reference_itq(v, ortho_group.rvs(8, random_state=3), tf.ITQ_ITERATIONS)
    np.testing.assert_allclose(np.abs(r), np.abs(ref), atol=1e-6)  # PCA's component signs may differ
    # and the codes minimise the same quantisation loss
    loss = np.square(np.where(v @ ref >= 0, 1.0, -1.0) - v @ ref).sum()
    assert h.losses[-1] == pytest.approx(loss, rel=1e-6)


@pytest.mark.parametrize("method", list(tf.METHODS))
def test_codes_are_signs_deterministic_by_seed_and_fitted_on_train_only(method):
    x, _ = _clusters(300)
    train, other = x[:200], x[200:]
    a = tf.TrainingFreeHasher(method, bits=8, seed=0).fit(train)
    codes = a.encode(other)
    assert codes.dtype == np.int8 and codes.shape == (100, 8) and set(np.unique(codes)) <= {-1, 1}
    np.testing.assert_array_equal(codes, tf.TrainingFreeHasher(method, bits=8, seed=0).fit(train).encode(other))
    if method != "pcah":  # PCAH has no randomness
        assert not np.array_equal(codes, tf.TrainingFreeHasher(method, bits=8, seed=1).fit(train).encode(other))
    if a.rotation is not None:
        assert np.abs(a.rotation.T @ a.rotation - np.eye(8)).max() < 1e-9


def test_evaluate_fits_on_train_rows_only_and_scores_with_the_models_map(monkeypatch):
    x, y = _clusters(600, seed=1)
    feats = {"train": x[:300], "query": x[300:360], "database": x[360:]}
    labels = {"query": y[300:360], "database": y[360:]}
    seen: list[np.ndarray] = []
    real_fit = tf.TrainingFreeHasher.fit

    def spy(self, train_features):
        seen.append(np.asarray(train_features))
        return real_fit(self, train_features)

    monkeypatch.setattr(tf.TrainingFreeHasher, "fit", spy)
    rows = tf.evaluate(feats, labels["query"], labels["database"], bits=8, topk=100, seed=0)
    assert [r["method"] for r in rows] == list(tf.METHODS)
    assert len(seen) == len(tf.METHODS) and all(s is feats["train"] or np.array_equal(s, feats["train"]) for s in seen)
    # query / database rows change nothing of a fit: same codes with other query and database rows
    shuffled = {**feats, "query": feats["query"][::-1] * 5, "database": feats["database"] + 100}
    for m in tf.METHODS:
        h1 = real_fit(tf.TrainingFreeHasher(m, 8, 0), feats["train"])
        h2 = real_fit(tf.TrainingFreeHasher(m, 8, 0), shuffled["train"])
        np.testing.assert_array_equal(h1.projection, h2.projection)
    for row in rows:  # the score is the models' mAP of the method's codes, and beats chance here
        h = real_fit(tf.TrainingFreeHasher(row["method"], 8, 0), feats["train"])
        expect = mean_average_precision(h.encode(feats["query"]), h.encode(feats["database"]),
                                        labels["query"], labels["database"], 100)
        assert row["map_symmetric"] == pytest.approx(expect, abs=1e-12)
        assert row["encode_images_per_second"] > 0
    assert tf.best(rows)["map_symmetric"] == max(r["map_symmetric"] for r in rows)
    chance = float((labels["query"] @ labels["database"].T > 0).mean())
    assert tf.best(rows)["map_symmetric"] > chance + 0.2


def test_bad_input_gets_one_line_errors():
    x, _ = _clusters(50, d=6)
    with pytest.raises(ValueError, match="unknown training-free method 'itq'"):
        tf.TrainingFreeHasher("itq", 8)
    with pytest.raises(ValueError, match="only min"):
        tf.TrainingFreeHasher("pca_itq", 8).fit(x)
    assert set(tf.fit_all(x, 8)) == {"lsh"}  # PCA methods cannot give 8 bits from 6 dimensions
    with pytest.raises(RuntimeError, match="not fitted"):
        tf.TrainingFreeHasher("lsh", 4).encode(x)
    with pytest.raises(ValueError, match="fitted on 6"):
        tf.TrainingFreeHasher("lsh", 4).fit(x).encode(x[:, :5])
    with pytest.raises(ValueError, match="NaN"):
        tf.TrainingFreeHasher("lsh", 4).fit(np.full((3, 6), np.nan))
    with pytest.raises(ValueError, match="missing database"):
        tf.evaluate({"train": x, "query": x}, None, None, bits=4, topk=10)
