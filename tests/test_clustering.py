"""Tests for brcd.clustering: hand-computed masks, k-means, assignment, artifact I/O, K selection."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from brcd.clustering import (
    ClusterArtifact,
    KMeansResult,
    assign_nearest,
    bit_masks,
    build_cluster_artifact,
    choose_k,
    cluster_cache_key,
    kmeans,
    load_cluster_artifact,
    num_masked_bits,
    released_bit_masks,
    save_cluster_artifact,
)
from brcd.io import ArtifactError
from brcd.plots import plot_bit_masks, plot_k_selection

# --------------------------------------------------------------------------------------------
# hand-made codes: 2 clusters x 4 bits (+ an empty cluster 2)
#
# cluster 0 (4 codes)            cluster 1 (3 codes)
#   +1 +1 +1 -1                    -1 +1 +1 +1
#   +1 +1 -1 -1                    -1 -1 +1 +1
#   +1 +1 +1 +1                    -1 +1 -1 +1
#   +1 -1 -1 -1
# sums   4  2  0 -2                sums  -3  1  1  3
# mean   1 .5  0 -.5               mean  -1 1/3 1/3 1
# --------------------------------------------------------------------------------------------
HAND_CODES = np.array(
    [
        [+1, +1, +1, -1],
        [-1, +1, +1, +1],
        [+1, +1, -1, -1],
        [-1, -1, +1, +1],
        [+1, +1, +1, +1],
        [-1, +1, -1, +1],
        [+1, -1, -1, -1],
    ],
    dtype=np.int8,
)
HAND_LABELS = np.array([0, 1, 0, 1, 0, 1, 0], dtype=np.int64)


def test_margin_rule_hand_computed() -> None:
    # delta = 0.5: |mean| strictly greater than 0.5 is kept; 0.5 exactly is NOT kept.
    m = bit_masks(HAND_CODES, HAND_LABELS, 2, margin=0.5)
    expected = np.array([[1, 0, 0, 0], [1, 0, 0, 1]], dtype=np.float32)
    assert m.dtype == np.float32
    np.testing.assert_array_equal(m, expected)
    # delta = 1/3: cluster 1's bits 1, 2 sit exactly at the margin -> 0; cluster 0's 0.5 bits -> 1.
    m = bit_masks(HAND_CODES, HAND_LABELS, 2, margin=1 / 3)
    np.testing.assert_array_equal(m, np.array([[1, 1, 0, 1], [1, 0, 0, 1]], dtype=np.float32))
    # delta = 0: every bit whose mean is not exactly 0 is kept.
    m = bit_masks(HAND_CODES, HAND_LABELS, 2, margin=0.0)
    np.testing.assert_array_equal(m, np.array([[1, 1, 0, 1], [1, 1, 1, 1]], dtype=np.float32))


def test_ratio_rule_hand_computed_with_ties() -> None:
    # |mean| cluster 0: [1, .5, 0, .5]; cluster 1: [1, 1/3, 1/3, 1].
    # r = 0.5, L = 4 -> 2 masked per cluster.
    # cluster 0: smallest are bit 2 (0) then a tie at .5 between bits 1 and 3 -> bit 1 (lower index).
    # cluster 1: tie at 1/3 between bits 1 and 2 -> both masked.
    m = bit_masks(HAND_CODES, HAND_LABELS, 2, mask_ratio=0.5)
    np.testing.assert_array_equal(m, np.array([[1, 0, 0, 1], [1, 0, 0, 1]], dtype=np.float32))
    # r = 0.25 -> 1 masked: cluster 0 bit 2; cluster 1 tie (bits 1, 2) -> bit 1.
    m = bit_masks(HAND_CODES, HAND_LABELS, 2, mask_ratio=0.25)
    np.testing.assert_array_equal(m, np.array([[1, 1, 0, 1], [1, 0, 1, 1]], dtype=np.float32))
    # r = 0.75 -> 3 masked: cluster 0 keeps bit 0; cluster 1 tie at 1 between bits 0 and 3 -> bit 0 masked.
    m = bit_masks(HAND_CODES, HAND_LABELS, 2, mask_ratio=0.75)
    np.testing.assert_array_equal(m, np.array([[1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float32))


def test_ratio_zero_and_one() -> None:
    np.testing.assert_array_equal(bit_masks(HAND_CODES, HAND_LABELS, 2, mask_ratio=0.0), np.ones((2, 4)))
    np.testing.assert_array_equal(bit_masks(HAND_CODES, HAND_LABELS, 2, mask_ratio=1.0), np.zeros((2, 4)))


def test_ratio_rounding_is_half_up() -> None:
    # L = 5, r = 0.5 -> 2.5 -> 3 masked (Python's banker's round would give 2).
    codes = np.array([[1, 1, 1, 1, 1], [1, -1, 1, -1, 1], [1, 1, -1, -1, -1]], dtype=np.int8)
    labels = np.zeros(3, dtype=np.int64)
    # sums [3, 1, 1, -1, 1] -> |mean| [1, 1/3, 1/3, 1/3, 1/3]: masked bits 1, 2, 3 (ties -> lower first)
    m = bit_masks(codes, labels, 1, mask_ratio=0.5)
    np.testing.assert_array_equal(m, np.array([[1, 0, 0, 0, 1]], dtype=np.float32))
    assert num_masked_bits(0.5, 5) == 3
    assert num_masked_bits(0.1, 5) == 1  # 0.5 -> 1
    assert num_masked_bits(0.29, 50) == 15  # float gives 14.499999999999998; intended 14.5 -> 15
    assert num_masked_bits(0.3, 10) == 3


def test_empty_cluster_gets_all_ones_and_torch_inputs() -> None:
    for kwargs in ({"margin": 0.5}, {"mask_ratio": 0.5}, {"mask_ratio": 1.0}):
        m = bit_masks(torch.tensor(HAND_CODES, dtype=torch.float32), torch.tensor(HAND_LABELS), 3, **kwargs)
        assert m.shape == (3, 4)
        np.testing.assert_array_equal(m[2], np.ones(4))
        np.testing.assert_array_equal(m[:2], bit_masks(HAND_CODES, HAND_LABELS, 2, **kwargs))


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"margin": 0.5, "mask_ratio": 0.5},
        {"margin": 1.0},
        {"margin": -0.1},
        {"margin": float("nan")},
        {"mask_ratio": 1.5},
        {"mask_ratio": -0.01},
        {"margin": True},
    ],
)
def test_invalid_mask_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError) as info:
        bit_masks(HAND_CODES, HAND_LABELS, 2, **kwargs)
    assert "\n" not in str(info.value)


def test_invalid_codes_and_assignments() -> None:
    with pytest.raises(ValueError):
        bit_masks(HAND_CODES.astype(np.float32) * 0.5, HAND_LABELS, 2, margin=0.5)  # not {-1,+1}
    with pytest.raises(ValueError):
        bit_masks(HAND_CODES, HAND_LABELS, 1, margin=0.5)  # label 1 out of range
    with pytest.raises(ValueError):
        bit_masks(HAND_CODES, HAND_LABELS[:-1], 2, margin=0.5)  # wrong length
    with pytest.raises(ValueError):
        bit_masks(HAND_CODES, HAND_LABELS.astype(np.float64), 2, margin=0.5)  # not integer


def test_released_masks_are_all_zero() -> None:
    rng = np.random.default_rng(0)
    codes = np.where(rng.random((60, 16)) < 0.8, 1, -1).astype(np.int8)
    labels = rng.integers(0, 4, size=60)
    for margin in (0.0, 0.1, 0.3, 0.5, 0.9, 0.999, 1.0):
        released = released_bit_masks(codes, labels, 5, margin)  # cluster 4 is empty
        assert released.shape == (5, 16)
        assert not released.any()
    # intended rule on the same data keeps bits
    assert bit_masks(codes, labels, 4, margin=0.1).any()


def test_assign_nearest_matches_brute_force_with_ties() -> None:
    centroids = np.array([[1, -1], [-1, 1], [1, 1], [1, 1]], dtype=np.float32)  # 2 and 3 identical
    codes = np.array([[1, 1], [-1, -1], [1, -1], [-1, 1]], dtype=np.int8)
    # [1,1]: tie 2/3 -> 2. [-1,-1]: distances [4, 4, 8, 8] -> tie 0/1 -> 0.
    np.testing.assert_array_equal(assign_nearest(codes, centroids), [2, 0, 0, 1])
    rng = np.random.default_rng(1)
    codes = np.where(rng.random((300, 8)) < 0.5, 1, -1).astype(np.int8)
    cents = np.where(rng.random((6, 8)) < 0.5, 1.0, -1.0)  # many exact ties in Hamming geometry
    brute = np.array(
        [min(range(6), key=lambda j: (float(((c - cents[j]) ** 2).sum()), j)) for c in codes.astype(float)]
    )
    np.testing.assert_array_equal(assign_nearest(codes, cents, chunk_size=64), brute)
    np.testing.assert_array_equal(assign_nearest(torch.tensor(codes), torch.tensor(cents)), brute)
    with pytest.raises(ValueError):
        assign_nearest(codes, cents[:, :4])


def _planted(n_per: int = 40, k: int = 3, bits: int = 16, flip: float = 0.05, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    protos = np.where(rng.random((k, bits)) < 0.5, 1, -1)
    truth = np.repeat(np.arange(k), n_per)
    codes = protos[truth] * np.where(rng.random((k * n_per, bits)) < flip, -1, 1)
    return codes.astype(np.int8), truth


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_kmeans_finds_planted_clusters() -> None:
    codes, truth = _planted()
    res = kmeans(codes, 3, n_init=5, seed=0)
    assert isinstance(res, KMeansResult)
    assert res.labels.dtype == np.int64 and res.labels.shape == (120,)
    assert res.centroids.dtype == np.float32 and res.centroids.shape == (3, 16)
    assert _same_partition(res.labels, truth)
    assert res.inertia > 0
    # deterministic for a seed
    again = kmeans(torch.tensor(codes), 3, n_init=5, seed=0)
    np.testing.assert_array_equal(again.labels, res.labels)
    # nearest centroid reproduces the labels
    np.testing.assert_array_equal(assign_nearest(codes, res.centroids), res.labels)


def test_kmeans_validation() -> None:
    codes, _ = _planted()
    with pytest.raises(ValueError):
        kmeans(codes, 0)
    with pytest.raises(ValueError):
        kmeans(codes[:5], 6)
    with pytest.raises(ValueError):
        kmeans(codes[0], 2)  # 1-D
    with pytest.raises(ValueError, match="distinct"):
        kmeans(np.ones((10, 4), dtype=np.int8), 2)


TEACHER, SPLIT = "teacher-aaaa1111", "split-bbbb2222"


@pytest.fixture(scope="module")
def artifact() -> ClusterArtifact:
    codes, _ = _planted(n_per=30, k=3, bits=16, flip=0.2, seed=3)
    return build_cluster_artifact(
        codes, num_clusters=3, margin=0.5, n_init=3, seed=0, teacher_fingerprint=TEACHER, split_fingerprint=SPLIT
    )


def test_build_artifact_contents(artifact: ClusterArtifact) -> None:
    a = artifact
    assert a.codes.dtype == np.int8 and a.codes.shape == (90, 16)
    assert a.masks.shape == (3, 16) and a.masks.dtype == np.float32
    np.testing.assert_array_equal(a.masks, bit_masks(a.codes, a.labels, 3, margin=0.5))
    assert a.settings["mask_rule"] == "margin" and a.settings["margin"] == 0.5 and a.settings["mask_ratio"] is None
    m = a.manifest
    assert m["teacher_fingerprint"] == TEACHER and m["split_fingerprint"] == SPLIT
    assert sum(m["cluster_sizes"]) == 90 and m["bits"] == 16 and m["num_clusters"] == 3
    assert m["kept_bits_per_cluster"] == a.masks.sum(axis=1).astype(int).tolist()
    assert m["cache_key"] == cluster_cache_key(TEACHER, SPLIT, 3, 3, 0)


def test_artifact_roundtrip(artifact: ClusterArtifact, tmp_path: Path) -> None:
    save_cluster_artifact(artifact, tmp_path / "c")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["clusters.npz", "manifest.json"]
    loaded = load_cluster_artifact(tmp_path / "c", teacher_fingerprint=TEACHER, split_fingerprint=SPLIT)
    for name in ("labels", "centroids", "masks", "codes"):
        got, want = getattr(loaded, name), getattr(artifact, name)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    assert loaded.settings == artifact.settings
    assert loaded.manifest["arrays_sha256"]
    # fingerprints are optional on load
    load_cluster_artifact(tmp_path / "c")


def test_fingerprint_mismatch_refused(artifact: ClusterArtifact, tmp_path: Path) -> None:
    save_cluster_artifact(artifact, tmp_path)
    with pytest.raises(ArtifactError) as info:
        load_cluster_artifact(tmp_path, teacher_fingerprint="other-teacher", split_fingerprint=SPLIT)
    msg = str(info.value)
    assert "\n" not in msg and "teacher" in msg and TEACHER in msg and "other-teacher" in msg and "brcd clusters" in msg
    with pytest.raises(ArtifactError) as info:
        load_cluster_artifact(tmp_path, teacher_fingerprint=TEACHER, split_fingerprint="other-split")
    msg = str(info.value)
    assert "\n" not in msg and "split" in msg and SPLIT in msg and "other-split" in msg


def test_tampered_npz_detected(artifact: ClusterArtifact, tmp_path: Path) -> None:
    save_cluster_artifact(artifact, tmp_path)
    npz = tmp_path / "clusters.npz"
    other = artifact.with_masks(mask_ratio=0.9)
    with open(npz, "wb") as fh:  # a valid npz, but not the one the manifest describes
        np.savez(fh, labels=other.labels, centroids=other.centroids, masks=other.masks, codes=other.codes)
    with pytest.raises(ArtifactError, match="does not match its manifest") as info:
        load_cluster_artifact(tmp_path)
    assert "\n" not in str(info.value)


def test_missing_files(artifact: ClusterArtifact, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        load_cluster_artifact(tmp_path / "nothing")
    save_cluster_artifact(artifact, tmp_path)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="manifest.json is missing") as info:
        load_cluster_artifact(tmp_path)
    assert "\n" not in str(info.value)
    save_cluster_artifact(artifact, tmp_path)
    (tmp_path / "clusters.npz").unlink()
    with pytest.raises(ArtifactError, match="clusters.npz is missing"):
        load_cluster_artifact(tmp_path)


def test_manifest_is_valid_json_with_settings(artifact: ClusterArtifact, tmp_path: Path) -> None:
    save_cluster_artifact(artifact, tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    for key in (
        "teacher_fingerprint",
        "split_fingerprint",
        "settings",
        "codes_fingerprint",
        "arrays_fingerprint",
        "arrays_sha256",
        "bits",
        "num_items",
        "cluster_sizes",
        "kept_bits_per_cluster",
        "created",
        "format_version",
    ):
        assert key in manifest
    assert manifest["settings"]["num_clusters"] == 3 and manifest["settings"]["n_init"] == 3


def test_with_masks_changes_only_masks(artifact: ClusterArtifact) -> None:
    other = artifact.with_masks(mask_ratio=0.25)
    assert other.labels is artifact.labels and other.centroids is artifact.centroids and other.codes is artifact.codes
    np.testing.assert_array_equal(other.masks.sum(axis=1), np.full(3, 12.0))  # 16 - 4 masked
    np.testing.assert_array_equal(other.masks, bit_masks(artifact.codes, artifact.labels, 3, mask_ratio=0.25))
    assert other.settings["mask_rule"] == "ratio" and other.settings["mask_ratio"] == 0.25
    assert other.settings["margin"] is None
    assert {k: v for k, v in other.settings.items() if k not in ("mask_rule", "margin", "mask_ratio")} == {
        k: v for k, v in artifact.settings.items() if k not in ("mask_rule", "margin", "mask_ratio")
    }
    assert other.manifest["cache_key"] == artifact.manifest["cache_key"]
    assert other.manifest["codes_fingerprint"] == artifact.manifest["codes_fingerprint"]
    assert other.manifest["teacher_fingerprint"] == TEACHER
    assert artifact.settings["mask_rule"] == "margin"  # original untouched
    with pytest.raises(ValueError):
        artifact.with_masks()


def test_cluster_cache_key() -> None:
    key = cluster_cache_key(TEACHER, SPLIT, 10, 10, 0)
    assert key == cluster_cache_key(TEACHER, SPLIT, 10, 10, 0) and key.startswith("kmeans-k10-")
    others = {
        cluster_cache_key("t2", SPLIT, 10, 10, 0),
        cluster_cache_key(TEACHER, "s2", 10, 10, 0),
        cluster_cache_key(TEACHER, SPLIT, 11, 10, 0),
        cluster_cache_key(TEACHER, SPLIT, 10, 5, 0),
        cluster_cache_key(TEACHER, SPLIT, 10, 10, 1),
    }
    assert key not in others and len(others) == 5


def test_choose_k_and_plots(tmp_path: Path) -> None:
    codes, _ = _planted(n_per=25, k=4, bits=16, flip=0.05, seed=2)
    res = choose_k(codes, [1, 2, 3, 4, 5, 6], n_init=2, seed=0, sample_size=80)
    assert res["k"] == [1, 2, 3, 4, 5, 6]
    assert res["silhouette"][0] is None and all(isinstance(s, float) for s in res["silhouette"][1:])
    assert all(a >= b - 1e-6 for a, b in zip(res["inertia"], res["inertia"][1:]))  # elbow falls
    assert res["suggested_k"] == 4
    json.dumps(res)  # JSON-serialisable
    out = plot_k_selection(res, tmp_path / "plots" / "k.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    masks = bit_masks(codes, kmeans(codes, 4, n_init=2).labels, 4, margin=0.5)
    out = plot_bit_masks(masks, tmp_path / "masks.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["masks.png", "plots"]  # no temp files left
