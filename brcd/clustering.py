"""k-means on teacher codes, per-cluster bit masks, nearest-centroid assignment, cluster artifact.

Steps 3-4 of the BRCD pipeline (``docs/METHOD.md``, "Teacher codes and clusters", "Bit masks").
:class:`ClusterArtifact`'s manifest pins the teacher and split fingerprints (bug B5: pseudo-labels are only
valid for the split and teacher they were computed on); :func:`masks_by_length` is the only place masks are
recomputed. Masks are ``float32`` exactly 0/1, so they do not promote float training codes to float64
(the public mask was float64, bug B11).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch

from brcd.codes import as_pm1
from brcd.io import (ArtifactError, PathLike, array_fingerprint, file_sha256, load_arrays, load_json, save_arrays,
                     save_json, stable_hash)
from brcd.layout import CLUSTER_ARRAYS, CLUSTER_MANIFEST

__all__ = [
    "ARTIFACT_FORMAT_VERSION", "CLUSTER_ARRAYS", "CLUSTER_MANIFEST", "MASK_DTYPE", "DEFAULT_SILHOUETTE_SAMPLE",
    "KMeansResult", "ClusterArtifact", "kmeans", "bit_masks", "masks_by_length", "released_bit_masks",
    "num_masked_bits", "assign_nearest", "choose_k", "build_cluster_artifact", "save_cluster_artifact",
    "load_cluster_artifact", "cluster_cache_key",
]

ARTIFACT_FORMAT_VERSION = 1
ARTIFACT_KIND = "brcd-cluster-artifact"
MASK_DTYPE = np.float32
DEFAULT_SILHOUETTE_SAMPLE = 10_000
_ROUND_TOLERANCE = 1e-9
_ARRAY_KEYS = ("labels", "centroids", "masks", "codes")

ArrayLike = np.ndarray | torch.Tensor


def _to_numpy(x: ArrayLike | Sequence[Any]) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _real_codes(codes: ArrayLike) -> np.ndarray:
    """2-D finite real array (float64 view of the codes) for k-means / distances."""
    arr = _to_numpy(codes)
    if arr.ndim != 2:
        raise ValueError(f"codes must be a 2-D array (N, bits), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"codes must be non-empty, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        arr = np.where(arr, 1.0, -1.0)
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"codes must be real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError("codes contain NaN or infinite values; check the teacher's code extraction")
    return arr


def _check_assignments(assignments: ArrayLike, n: int, num_clusters: int) -> np.ndarray:
    a = _to_numpy(assignments)
    if a.ndim != 1 or a.shape[0] != n:
        raise ValueError(f"assignments must have shape ({n},) to match the codes, got {a.shape}")
    if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"assignments must be integer cluster ids, got dtype {a.dtype}")
    a = a.astype(np.int64, copy=False)
    if n and (a.min() < 0 or a.max() >= num_clusters):
        raise ValueError(
            f"assignments must lie in [0, {num_clusters}) for num_clusters={num_clusters}, "
            f"got values in [{a.min()}, {a.max()}]; pass the num_clusters the labels were computed with"
        )
    return a


def _check_mask_args(margin: float | None, mask_ratio: float | None) -> tuple[str, float]:
    """Validate the (margin, mask_ratio) pair; return ("margin"|"ratio", value)."""
    if (margin is None) == (mask_ratio is None):
        raise ValueError("give exactly one of margin (e.g. 0.5) or mask_ratio (e.g. 0.5) for the bit masks")
    if margin is not None:
        if isinstance(margin, bool) or not isinstance(margin, numbers.Real) or not (0.0 <= float(margin) < 1.0):
            raise ValueError(f"margin must be a number in [0, 1), got {margin!r}")
        return "margin", float(margin)
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, numbers.Real) or not (0.0 <= float(mask_ratio) <= 1.0):
        raise ValueError(f"mask_ratio must be a number in [0, 1], got {mask_ratio!r}")
    return "ratio", float(mask_ratio)


class KMeansResult(NamedTuple):
    """Output of :func:`kmeans`: ``labels`` int64 (N,), ``centroids`` float32 (K, L), ``inertia``."""

    labels: np.ndarray
    centroids: np.ndarray
    inertia: float


def kmeans(codes: ArrayLike, num_clusters: int, *, n_init: int = 10, seed: int = 0,
           max_iter: int = 300) -> KMeansResult:
    """Cluster (N, L) codes (numpy or torch) with scikit-learn's k-means (k-means++, ``n_init`` restarts),
    deterministic for a ``seed``. ``ValueError`` when K exceeds the distinct code rows (k-means would return
    duplicate centroids and empty clusters)."""
    from sklearn.cluster import KMeans

    x = _real_codes(codes)
    k = _check_int("num_clusters", num_clusters, 1)
    n_init = _check_int("n_init", n_init, 1)
    max_iter = _check_int("max_iter", max_iter, 1)
    seed = _check_int("seed", seed, 0)
    distinct = np.unique(x, axis=0).shape[0]
    if k > distinct:
        raise ValueError(
            f"num_clusters={k} exceeds the {distinct} distinct codes; choose num_clusters <= {distinct}"
        )
    km = KMeans(n_clusters=k, init="k-means++", n_init=n_init, max_iter=max_iter, random_state=seed, algorithm="lloyd")
    labels = km.fit_predict(x)
    return KMeansResult(np.asarray(labels, dtype=np.int64), np.asarray(km.cluster_centers_, dtype=np.float32),
                        float(km.inertia_))


def assign_nearest(codes: ArrayLike, centroids: ArrayLike, *, chunk_size: int = 65_536) -> np.ndarray:
    """int64 (N,) index of the nearest of the (K, L) centroids (squared Euclidean, float64, in chunks of
    ``chunk_size`` rows, ties to the lower index) for every (N, L) code. Use *unmasked* codes and centroids (B3).
    """
    x = _real_codes(codes)
    mu = _to_numpy(centroids)
    if mu.ndim != 2 or mu.shape[1] != x.shape[1] or mu.shape[0] == 0:
        raise ValueError(
            f"centroids must have shape (K>=1, {x.shape[1]}) to match the codes, got {mu.shape}"
        )
    mu = mu.astype(np.float64, copy=False)
    if not np.isfinite(mu).all():
        raise ValueError("centroids contain NaN or infinite values; rebuild the cluster artifact")
    chunk_size = _check_int("chunk_size", chunk_size, 1)
    mu_sq = np.einsum("kl,kl->k", mu, mu)
    out = np.empty(x.shape[0], dtype=np.int64)
    for start in range(0, x.shape[0], chunk_size):
        xs = x[start : start + chunk_size]
        d = np.einsum("nl,nl->n", xs, xs)[:, None] + mu_sq[None, :] - 2.0 * (xs @ mu.T)
        out[start : start + chunk_size] = np.argmin(d, axis=1)
    return out


def num_masked_bits(mask_ratio: float, bits: int) -> int:
    """Bits masked per cluster by the ratio rule: ``floor(mask_ratio * bits + 0.5)`` (round half up, not
    Python's half-to-even ``round``); a 1e-9 tolerance makes ``0.29 * 50`` (14.499999999999998) mask 15."""
    _, ratio = _check_mask_args(None, mask_ratio)
    bits = _check_int("bits", bits, 1)
    return min(bits, int(math.floor(ratio * bits + 0.5 + _ROUND_TOLERANCE)))


def _cluster_sums(codes: ArrayLike, assignments: ArrayLike, num_clusters: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-cluster bit sums S (K, L) int64 and cluster sizes n (K,) int64."""
    pm1 = as_pm1(codes)
    k = _check_int("num_clusters", num_clusters, 1)
    a = _check_assignments(assignments, pm1.shape[0], k)
    sums = np.zeros((k, pm1.shape[1]), dtype=np.int64)
    np.add.at(sums, a, pm1.astype(np.int64))
    counts = np.bincount(a, minlength=k).astype(np.int64)
    return sums, counts


def bit_masks(codes: ArrayLike, assignments: ArrayLike, num_clusters: int, *, margin: float | None = None,
              mask_ratio: float | None = None) -> np.ndarray:
    """Per-cluster ``float32`` (K, L) 0/1 bit masks (1 = kept) from the per-bit mean ``a_c`` of each
    cluster's {-1,+1} codes; exactly one rule:

    - ``margin`` = delta in [0, 1): keep a bit iff ``|a_c,l| > delta`` strictly, with ``a_c,l`` from exact
      integer sums (3 of 4 members agreeing, ``|a| = 0.5``, is not kept at delta = 0.5).
    - ``mask_ratio`` = r in [0, 1]: mask the :func:`num_masked_bits` bits of smallest ``|a_c,l|``, the
      lower bit index first among ties.

    An empty cluster gets an all-ones mask: without members there is no evidence that a bit is redundant.
    """
    rule, value = _check_mask_args(margin, mask_ratio)
    sums, counts = _cluster_sums(codes, assignments, num_clusters)
    k, bits = sums.shape
    empty = counts == 0
    if rule == "margin":
        with np.errstate(divide="ignore", invalid="ignore"):
            mean_abs = np.abs(sums) / np.maximum(counts, 1)[:, None].astype(np.float64)
        masks = (mean_abs > value).astype(MASK_DTYPE)
    else:
        n_mask = num_masked_bits(value, bits)
        masks = np.ones((k, bits), dtype=MASK_DTYPE)
        if n_mask:
            # Within one cluster every mean has the same denominator n_c, so ranking the exact
            # integers |S_c,l| is ranking |a_c,l|, with exact ties; the stable sort keeps the
            # lower bit index first among ties.
            order = np.argsort(np.abs(sums), axis=1, kind="stable")
            np.put_along_axis(masks, order[:, :n_mask], MASK_DTYPE(0.0), axis=1)
    masks[empty] = 1.0
    return masks


def released_bit_masks(codes: ArrayLike, assignments: ArrayLike, num_clusters: int, margin: float) -> np.ndarray:
    """The public BRCD code's mask, bug B1 included (the "released" baseline only): all zeros for every
    margin <= 1, as the shipped CIFAR-10 mask file.

    ``get_mask/get_matrix.py``'s two ``np.where`` calls, reproduced literally, have their second and third
    arguments swapped. An empty cluster (NaN mean in the public code) behaves like one whose means are 0.
    """
    if isinstance(margin, bool) or not isinstance(margin, numbers.Real) or not math.isfinite(margin) or margin < 0:
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
    sums, counts = _cluster_sums(codes, assignments, num_clusters)
    a = np.abs(sums) / np.maximum(counts, 1)[:, None].astype(np.float64)
    a = np.where(a > margin, a, 1)  # public code: arguments swapped (intended: where(A > d, 1, A))
    a = np.where(a < margin, a, 0)  # public code: arguments swapped (intended: where(A < d, 0, A))
    return a.astype(MASK_DTYPE)


def choose_k(codes: ArrayLike, ks: Sequence[int], *, n_init: int = 10, seed: int = 0,
             sample_size: int | None = None) -> dict[str, Any]:
    """Elbow (inertia) and Euclidean silhouette for each K in ``ks`` (sorted, deduplicated), plus a suggested K.

    The silhouette is scored on one random subsample of ``sample_size`` codes (``None``:
    ``min(N, DEFAULT_SILHOUETTE_SAMPLE)``) drawn with ``seed``; it is None where undefined (K = 1, K >= N, or
    fewer than two clusters in the subsample). ``suggested_k``: highest silhouette (ties -> smaller K), or None.
    Returns ``{"k", "inertia", "silhouette", "suggested_k", "silhouette_sample_size"}`` (JSON-serialisable).
    """
    from sklearn.metrics import silhouette_score

    x = _real_codes(codes)
    n = x.shape[0]
    ks_list = sorted({_check_int("every k in ks", k, 1) for k in ks})
    if not ks_list:
        raise ValueError("ks is empty; pass candidate cluster counts, e.g. range(2, 15)")
    if ks_list[-1] > n:
        raise ValueError(f"ks contains {ks_list[-1]} > N={n} codes; use cluster counts <= {n}")
    sample = min(n, DEFAULT_SILHOUETTE_SAMPLE if sample_size is None else _check_int("sample_size", sample_size, 2))
    inertia: list[float] = []
    silhouette: list[float | None] = []
    for k in ks_list:
        res = kmeans(x, k, n_init=n_init, seed=seed)
        inertia.append(res.inertia)
        score: float | None = None
        if 2 <= k <= n - 1:
            try:
                score = float(silhouette_score(x, res.labels, metric="euclidean",
                                               sample_size=sample if sample < n else None, random_state=seed))
            except ValueError:  # the subsample held fewer than two clusters
                score = None
        silhouette.append(score)
    scored = [(s, -k) for k, s in zip(ks_list, silhouette) if s is not None]
    suggested = -max(scored)[1] if scored else None
    return {"k": ks_list, "inertia": inertia, "silhouette": silhouette, "suggested_k": suggested,
            "silhouette_sample_size": sample}


def cluster_cache_key(teacher_fingerprint: str, split_fingerprint: str, num_clusters: int, n_init: int,
                      seed: int) -> str:
    """Deterministic key of one k-means run, e.g. ``"kmeans-k10-3f2a..."`` (safe as a folder name).

    The mask rule is not in it, so Tune caches k-means per K and recomputes the cheap masks
    (:meth:`ClusterArtifact.with_masks`).
    """
    for name, value in (("teacher_fingerprint", teacher_fingerprint), ("split_fingerprint", split_fingerprint)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{name} must be a non-empty string (the fingerprint written by the step that "
                             "produced it)")
    payload = {
        "format_version": ARTIFACT_FORMAT_VERSION,
        "teacher_fingerprint": teacher_fingerprint,
        "split_fingerprint": split_fingerprint,
        "num_clusters": _check_int("num_clusters", num_clusters, 1),
        "n_init": _check_int("n_init", n_init, 1),
        "seed": _check_int("seed", seed, 0),
    }
    return f"kmeans-k{payload['num_clusters']}-{stable_hash(payload, 16)}"


@dataclasses.dataclass(frozen=True, eq=False)
class ClusterArtifact:
    """Pseudo-labels, centroids and bit masks computed from one teacher's codes on one split."""

    labels: np.ndarray  # int64 (N,): pseudo-label of every training position of the split
    centroids: np.ndarray  # float32 (K, L)
    masks: np.ndarray  # float32 (K, L) 0/1 (see bit_masks)
    codes: np.ndarray  # int8 (N, L) teacher codes in {-1,+1} the clusters were computed from
    settings: dict[str, Any]  # num_clusters, n_init, seed, max_iter, mask_rule ("margin" | "ratio"), margin, mask_ratio
    manifest: dict[str, Any]  # provenance and summary: what save_cluster_artifact writes as manifest.json

    num_clusters = property(lambda self: int(self.centroids.shape[0]))
    bits = property(lambda self: int(self.codes.shape[1]))
    teacher_fingerprint = property(lambda self: str(self.manifest["teacher_fingerprint"]))
    split_fingerprint = property(lambda self: str(self.manifest["split_fingerprint"]))

    def with_masks(self, margin: float | None = None, mask_ratio: float | None = None) -> "ClusterArtifact":
        """A copy with masks recomputed by another rule (exactly one of ``margin`` / ``mask_ratio``)."""
        masks = masks_by_length(self, [self.bits], margin=margin, mask_ratio=mask_ratio)[self.bits]
        settings = {**self.settings, **_mask_settings(margin, mask_ratio)}
        manifest = _make_manifest(self.labels, self.centroids, masks, self.codes, settings, self.teacher_fingerprint,
                                  self.split_fingerprint, self.manifest.get("inertia"))
        return dataclasses.replace(self, masks=masks, settings=settings, manifest=manifest)


def masks_by_length(
    artifact: Any, bits: Sequence[int], *, margin: float | None = None, mask_ratio: float | None = None
) -> dict[int, np.ndarray]:
    """The (K, L) bit masks of every code length L in ``bits``: :func:`bit_masks` on the L-bit prefixes of the
    artifact's codes with its pseudo-labels (``artifact``: anything with ``codes``, ``labels``, ``num_clusters``).
    Nested codes (NHL) share one partition; the margin rule gives prefixes of the longest masks, the ratio rule not.
    """
    codes = np.asarray(artifact.codes)
    return {int(L): bit_masks(codes[:, :L], artifact.labels, artifact.num_clusters, margin=margin,
                              mask_ratio=mask_ratio) for L in bits}


def _mask_settings(margin: float | None, mask_ratio: float | None) -> dict[str, Any]:
    rule, value = _check_mask_args(margin, mask_ratio)
    return {
        "mask_rule": rule,
        "margin": value if rule == "margin" else None,
        "mask_ratio": value if rule == "ratio" else None,
    }


def _make_manifest(labels: np.ndarray, centroids: np.ndarray, masks: np.ndarray, codes: np.ndarray,
                   settings: dict[str, Any], teacher_fingerprint: str, split_fingerprint: str,
                   inertia: float | None) -> dict[str, Any]:
    k = int(centroids.shape[0])
    return {
        "kind": ARTIFACT_KIND,
        "format_version": ARTIFACT_FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "teacher_fingerprint": teacher_fingerprint,
        "split_fingerprint": split_fingerprint,
        "settings": dict(settings),
        "cache_key": cluster_cache_key(
            teacher_fingerprint, split_fingerprint, settings["num_clusters"], settings["n_init"], settings["seed"]
        ),
        "num_items": int(codes.shape[0]),
        "bits": int(codes.shape[1]),
        "num_clusters": k,
        "cluster_sizes": np.bincount(labels, minlength=k).astype(int).tolist(),
        "kept_bits_per_cluster": masks.sum(axis=1).astype(int).tolist(),
        "inertia": None if inertia is None else float(inertia),
        "codes_fingerprint": array_fingerprint(codes),
        "arrays_fingerprint": array_fingerprint(labels, centroids, masks, codes),
        "arrays_file": CLUSTER_ARRAYS,
    }


def build_cluster_artifact(codes: ArrayLike, *, num_clusters: int, margin: float | None = None,
                           mask_ratio: float | None = None, n_init: int = 10, seed: int = 0, teacher_fingerprint: str,
                           split_fingerprint: str) -> ClusterArtifact:
    """Run k-means on the training split's (N, L) teacher codes (row i = split position i) and build the
    per-cluster masks (exactly one of ``margin`` / ``mask_ratio``, checked before k-means runs), with the
    teacher's and the split's fingerprints as provenance. Not saved yet (:func:`save_cluster_artifact`)."""
    cluster_cache_key(teacher_fingerprint, split_fingerprint, num_clusters, n_init, seed)  # checked before k-means
    mask_settings = _mask_settings(margin, mask_ratio)
    pm1 = as_pm1(codes)
    max_iter = 300
    res = kmeans(pm1, num_clusters, n_init=n_init, seed=seed, max_iter=max_iter)
    masks = bit_masks(pm1, res.labels, int(num_clusters), margin=margin, mask_ratio=mask_ratio)
    settings = {"num_clusters": int(num_clusters), "n_init": int(n_init), "seed": int(seed), "max_iter": max_iter,
                **mask_settings}
    manifest = _make_manifest(res.labels, res.centroids, masks, pm1, settings, teacher_fingerprint, split_fingerprint,
                              res.inertia)
    return ClusterArtifact(res.labels, res.centroids, masks, pm1, settings, manifest)


def save_cluster_artifact(artifact: ClusterArtifact, directory: PathLike) -> Path:
    """Write ``clusters.npz`` then ``manifest.json`` (both atomic) into ``directory``; return it.

    The manifest, written last, records the npz's SHA-256: a crash between the writes is detected on load.
    """
    directory = Path(directory)
    npz_path = directory / CLUSTER_ARRAYS
    save_arrays(
        npz_path,
        labels=np.asarray(artifact.labels, dtype=np.int64),
        centroids=np.asarray(artifact.centroids, dtype=np.float32),
        masks=np.asarray(artifact.masks, dtype=MASK_DTYPE),
        codes=np.asarray(artifact.codes, dtype=np.int8),
    )
    manifest = dict(artifact.manifest)
    manifest["arrays_sha256"] = file_sha256(npz_path)
    save_json(directory / CLUSTER_MANIFEST, manifest)
    return directory


_FIX = "re-run `brcd clusters` to rebuild it"


def _load_manifest(directory: Path, teacher_fingerprint: str | None, split_fingerprint: str | None) -> dict[str, Any]:
    """The artifact's manifest, checked for presence, kind, format version and the expected fingerprints."""
    manifest_path = directory / CLUSTER_MANIFEST
    if not manifest_path.is_file():
        interrupted = (directory / CLUSTER_ARRAYS).exists()
        hint = " (clusters.npz is there: a previous write was interrupted)" if interrupted else ""
        raise ArtifactError(f"no cluster artifact at {directory}: {CLUSTER_MANIFEST} is missing{hint}; {_FIX}")
    try:
        manifest = load_json(manifest_path)
    except ArtifactError as exc:
        raise ArtifactError(f"cluster artifact manifest {manifest_path} is unreadable ({exc}); {_FIX}") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != ARTIFACT_KIND:
        raise ArtifactError(f"{manifest_path} is not a brcd cluster artifact manifest; {_FIX}")
    if manifest.get("format_version") != ARTIFACT_FORMAT_VERSION:
        raise ArtifactError(
            f"cluster artifact at {directory} has format version {manifest.get('format_version')!r}, "
            f"this code reads version {ARTIFACT_FORMAT_VERSION}; {_FIX}"
        )
    for what, expected in (("teacher", teacher_fingerprint), ("split", split_fingerprint)):
        stored = manifest.get(f"{what}_fingerprint")
        if expected is not None and stored != expected:
            raise ArtifactError(
                f"cluster artifact at {directory} was built from {what} {stored} but this run's {what} is "
                f"{expected}; re-run `brcd clusters` for this {what}"
            )
    return manifest


def _load_arrays(directory: Path, manifest: dict[str, Any]) -> tuple[np.ndarray, ...]:
    """``(labels, centroids, masks, codes)`` of ``clusters.npz``, checked against the manifest (hash, shapes,
    dtypes, values, content fingerprint)."""
    npz_path = directory / CLUSTER_ARRAYS
    if not npz_path.is_file():
        raise ArtifactError(
            f"cluster artifact at {directory} has {CLUSTER_MANIFEST} but {CLUSTER_ARRAYS} is missing; {_FIX}")
    digest = file_sha256(npz_path)
    if digest != manifest.get("arrays_sha256"):
        raise ArtifactError(
            f"{npz_path} does not match its manifest (sha256 {digest[:12]} vs recorded "
            f"{str(manifest.get('arrays_sha256'))[:12]}): the file was modified or the pair mixed; {_FIX}"
        )
    try:
        arrays = load_arrays(npz_path)
    except ArtifactError as exc:
        raise ArtifactError(f"{exc}; {_FIX}") from None
    missing = [k for k in _ARRAY_KEYS if k not in arrays]
    if missing:
        raise ArtifactError(f"{npz_path} lacks arrays {missing}; {_FIX}")
    labels, centroids, masks, codes = (arrays[k] for k in _ARRAY_KEYS)
    n, bits, k = manifest.get("num_items"), manifest.get("bits"), manifest.get("num_clusters")
    ok = (labels.shape == (n,) and labels.dtype == np.int64 and centroids.shape == masks.shape == (k, bits)
          and codes.shape == (n, bits) and codes.dtype == np.int8 and bool(np.isin(codes, (-1, 1)).all())
          and bool(np.isin(masks, (0.0, 1.0)).all()) and (n == 0 or (labels.min() >= 0 and labels.max() < k)))
    if not ok:
        raise ArtifactError(
            f"{npz_path} holds arrays inconsistent with its manifest (shapes, dtypes or values); {_FIX}")
    if array_fingerprint(labels, centroids, masks, codes) != manifest.get("arrays_fingerprint"):
        raise ArtifactError(f"{npz_path} content fingerprint differs from its manifest; {_FIX}")
    return labels, centroids, masks, codes


def load_cluster_artifact(directory: PathLike, *, teacher_fingerprint: str | None = None,
                          split_fingerprint: str | None = None) -> ClusterArtifact:
    """Load and verify a cluster artifact written by :func:`save_cluster_artifact`, against the teacher /
    split fingerprints when given; every failure is a one-line :class:`ArtifactError` naming the fix."""
    directory = Path(directory)
    manifest = _load_manifest(directory, teacher_fingerprint, split_fingerprint)
    labels, centroids, masks, codes = _load_arrays(directory, manifest)
    return ClusterArtifact(labels, centroids.astype(np.float32, copy=False), masks.astype(MASK_DTYPE, copy=False),
                           codes, dict(manifest.get("settings") or {}), manifest)
