"""Training-free hashing baselines: LSH, PCAH, PCA + random rotation, PCA-ITQ.

Each is fitted on the **training split's** features only (raw pixels or a frozen backbone's), is
deterministic given its seed, and maps features to {-1, +1} codes scored like the trained models::

    hasher = TrainingFreeHasher("pca_itq", bits=32, seed=0).fit(train_features)
    codes = hasher.encode(database_features)          # int8 (N, 32) in {-1, +1}

The methods are listed in :data:`METHODS`. ``pca_itq`` (Gong & Lazebnik, 2011) alternates ``B = sign(V R)``
and the Procrustes rotation ``R`` mapping ``V`` onto ``B``, ``iterations`` times from a random rotation; the
quantisation loss ``||B - V R||_F^2`` never increases (``losses`` records it per iteration).

Not faiss's ``ITQTransform`` (it L2-normalises before PCA) nor ``ITQMatrix`` (its loss goes *up* on the
demo's pixels): both give ~0.59-0.62 mAP@1000 where textbook ITQ gives ~0.65 (32 bits, digits;
docs/RESULTS.md), and a baseline is only worth reporting at its strongest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# scipy and scikit-learn are imported where a fit runs: the CLI's parser (which lists the methods)
# stays light (tests/test_pipeline_local.py)

#: method -> one-line description (table order: weakest family first)
METHODS: dict[str, str] = {
    "lsh": "LSH: random Gaussian projections of the centred features, sign",
    "pcah": "PCAH: top principal components, sign",
    "pca_rr": "PCA + random orthogonal rotation, sign",
    "pca_itq": "PCA-ITQ: PCA + iterative quantisation (50 iterations)",
}
#: short names for tables
LABELS: dict[str, str] = {"lsh": "LSH", "pcah": "PCAH", "pca_rr": "PCA-RR", "pca_itq": "PCA-ITQ"}
ITQ_ITERATIONS = 50
ENCODE_ROWS = 8192


def _as_features(x: Any, name: str, dtype: Any = np.float64) -> np.ndarray:
    a = np.asarray(x, dtype=dtype)
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"{name} must be a non-empty 2-D array (N, D) of features, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} holds NaN or inf; check the features")
    return a


@dataclass
class TrainingFreeHasher:
    """One training-free hashing method at one code length (see the module docstring)."""

    method: str
    bits: int
    seed: int = 0
    iterations: int = ITQ_ITERATIONS
    losses: list[float] = field(default_factory=list)  # pca_itq: quantisation loss after each iteration
    rotation: np.ndarray | None = field(default=None, repr=False)  # pca_rr / pca_itq: (bits, bits), orthogonal
    _mean: np.ndarray | None = field(default=None, repr=False)
    _projection: np.ndarray | None = field(default=None, repr=False)  # (D, bits)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown training-free method {self.method!r}; choose one of {', '.join(METHODS)}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits < 1:
            raise ValueError(f"bits must be a positive int, got {self.bits!r}")
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 0:
            raise ValueError(f"iterations must be a non-negative int, got {self.iterations!r}")

    @property
    def projection(self) -> np.ndarray:
        """The fitted linear map ``(D, bits)`` applied to centred features (codes = sign(x W))."""
        if self._projection is None:
            raise RuntimeError(f"{self.method} is not fitted; call fit(train_features) first")
        return self._projection

    def fit(self, train_features: Any) -> "TrainingFreeHasher":
        """Fit on the training split's features ``(N, D)`` (never on queries or the database)."""
        from scipy.stats import ortho_group
        from sklearn.decomposition import PCA
        from sklearn.random_projection import GaussianRandomProjection

        x = _as_features(train_features, "train_features")
        n, d = x.shape
        self._mean = x.mean(axis=0)
        if self.method == "lsh":
            rp = GaussianRandomProjection(n_components=self.bits, random_state=self.seed).fit(x)
            self._projection = np.ascontiguousarray(rp.components_.T)
            return self
        if self.bits > min(n, d):
            raise ValueError(f"{self.method} keeps {self.bits} principal components but the training features "
                             f"have only min(N, D) = {min(n, d)}; use fewer bits or lsh")
        pca = PCA(n_components=self.bits, svd_solver="full").fit(x)
        components = pca.components_.T  # (D, bits); PCA centres with the same training mean
        if self.method == "pcah":
            self._projection = components
            return self
        rotation = ortho_group.rvs(self.bits, random_state=self.seed) if self.bits > 1 else np.ones((1, 1))
        if self.method == "pca_itq":
            rotation = self._itq(pca.transform(x), rotation)
        self.rotation = rotation
        self._projection = components @ rotation
        return self

    def _itq(self, v: np.ndarray, rotation: np.ndarray) -> np.ndarray:
        """ITQ: alternate the codes and the Procrustes rotation; record the quantisation loss."""
        from scipy.linalg import orthogonal_procrustes

        self.losses = []
        for _ in range(self.iterations):
            b = np.where(v @ rotation >= 0, 1.0, -1.0)
            rotation, _ = orthogonal_procrustes(v, b)
            self.losses.append(float(np.square(np.where(v @ rotation >= 0, 1.0, -1.0) - v @ rotation).sum()))
        return rotation

    def encode(self, features: Any) -> np.ndarray:
        """``int8`` codes ``(N, bits)`` in {-1, +1}. Encoded in float64 chunks of ``ENCODE_ROWS`` rows:
        a database of raw pixels (50,000 x 3,072 on CIFAR-10) never exists as one float64 copy."""
        x = _as_features(features, "features", dtype=None)
        w = self.projection
        if x.shape[1] != w.shape[0]:
            raise ValueError(f"features have {x.shape[1]} dimensions; {self.method} was fitted on {w.shape[0]}")
        z = np.concatenate([(x[i:i + ENCODE_ROWS].astype(np.float64) - self._mean) @ w
                            for i in range(0, len(x), ENCODE_ROWS)])
        return np.where(z >= 0, 1, -1).astype(np.int8)  # 0 -> +1, as the models' sign


def fit_all(train_features: Any, bits: int, seed: int = 0,
            methods: list[str] | tuple[str, ...] | None = None) -> dict[str, TrainingFreeHasher]:
    """Every method (or those named) fitted on the same training features; a method that cannot
    run at this length (PCA with ``bits`` > dimensions) is left out."""
    out: dict[str, TrainingFreeHasher] = {}
    for m in methods or tuple(METHODS):
        h = TrainingFreeHasher(m, bits, seed)
        try:
            out[m] = h.fit(train_features)
        except ValueError as exc:
            if "principal components" not in str(exc):
                raise
    return out


def evaluate(features: dict[str, Any], query_labels: Any, database_labels: Any, *, bits: int, topk: int | None,
             seed: int = 0, methods: list[str] | tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """Fit every method on ``features["train"]`` and score symmetric search of ``"query"`` against
    ``"database"`` as the models are. One row per method: ``method``, ``bits``, ``map_symmetric``,
    ``precision_at_k_symmetric`` and ``encode_images_per_second`` (features -> codes)."""
    from brcd.evaluation import evaluate_paradigms

    missing = {"train", "query", "database"} - set(features)
    if missing:
        raise ValueError(f"features need train, query and database parts; missing {', '.join(sorted(missing))}")
    rows = []
    for name, hasher in fit_all(features["train"], bits, seed, methods).items():
        t0 = time.perf_counter()
        q, db = hasher.encode(features["query"]), hasher.encode(features["database"])
        seconds = time.perf_counter() - t0
        scores = evaluate_paradigms(q, db, query_labels, database_labels, topk)
        rows.append({
            "method": name, "bits": bits, "map_symmetric": float(scores["map_symmetric"]),
            "precision_at_k_symmetric": scores.get("precision_at_k_symmetric"),
            "encode_images_per_second": (len(q) + len(db)) / max(seconds, 1e-9),
        })
    return rows


def best(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The row with the highest ``map_symmetric``."""
    if not rows:
        raise ValueError("no training-free rows to choose from")
    return max(rows, key=lambda r: r["map_symmetric"])


#: raw-pixel baselines see the images at most this many pixels a side (the classic 32 x 32 x 3 input)
PIXEL_SIZE = 32


def pixel_features(bundle: Any, part: str, size: int = PIXEL_SIZE) -> np.ndarray:
    """``float32 (N, 3 * s * s)``: the clean images of ``part`` of a :class:`brcd.data.DataBundle`
    at ``s = min(size, data.image_size)`` pixels a side, through the eval transform's geometry and
    normalisation, flattened (the raw-pixel input of the training-free rows)."""
    from torch.utils.data import DataLoader

    from brcd.data import eval_transform

    s = min(size, bundle.image_size)
    ds = bundle.eval_dataset(part, eval_transform(s, bundle.resize_then_crop))
    chunks = [x.flatten(1).numpy() for x, _ in DataLoader(ds, batch_size=512)]
    return np.concatenate(chunks).astype(np.float32, copy=False)
