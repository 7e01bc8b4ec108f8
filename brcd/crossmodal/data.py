"""Paired cross-modal data: an image, a bag-of-words tag vector and multi-hot labels per item.

Labels are used for evaluation only: the teacher, the similarity reconstruction and the student never
read them. Sources (docs/CROSSMODAL.md): :func:`digits_pairs` (real sklearn digits with synthetic
Flickr-like tags) and :func:`load_mat_pairs` (MIRFLICKR-25K / NUS-WIDE as the papers ship them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["PairedData", "DATASETS", "digits_pairs", "load_mat_pairs", "read_list_file", "read_mat_matrix",
           "read_tag_matrix", "limit_pairs",
           "check_pairs", "split_query_database", "load_images", "paired_data"]

#: the shipped widths of the real datasets: (tag vocabulary, label counts allowed)
DATASETS = {"mirflickr": (1386, (24,)), "nuswide": (1000, (10, 21))}


@dataclass
class PairedData:
    """``tags`` (N, V) float32 bag of words, ``labels`` (N, C) multi-hot; ``images`` (N, 3, H, W)
    float32 in [0, 1] for array sources, or ``paths`` for file sources (loaded by :func:`load_images`)."""

    tags: np.ndarray
    labels: np.ndarray
    images: np.ndarray | None = None
    paths: list[str] | None = None
    vocabulary: list[str] | None = None
    rows: np.ndarray | None = None  # each pair's row in the source (None: 0 .. N-1)

    def __len__(self) -> int:
        return int(self.tags.shape[0])

    def source_rows(self) -> np.ndarray:
        return np.arange(len(self), dtype=np.int64) if self.rows is None else self.rows

    def subset(self, idx: np.ndarray) -> "PairedData":
        idx = np.asarray(idx)
        return PairedData(
            tags=self.tags[idx], labels=self.labels[idx],
            images=None if self.images is None else self.images[idx],
            paths=None if self.paths is None else [self.paths[i] for i in idx], vocabulary=self.vocabulary,
            rows=self.source_rows()[idx])


def check_pairs(tags: np.ndarray, labels: np.ndarray, n_images: int, *, vocab: int | None = None,
                where: str = "data") -> None:
    """One-line errors for malformed pairs: wrong tag width, row counts that differ, empty vocabulary."""
    if tags.ndim != 2:
        raise ValueError(f"{where}: the tag matrix must be 2-D (items x vocabulary), got shape {tags.shape}")
    if tags.shape[1] == 0:
        raise ValueError(f"{where}: empty vocabulary (the tag matrix has 0 columns)")
    if vocab is not None and tags.shape[1] != vocab:
        raise ValueError(f"{where}: tag vectors have {tags.shape[1]} entries, expected {vocab}; "
                         "use the tag matrix shipped for this dataset")
    if not np.isfinite(tags).all() or (tags < 0).any():
        raise ValueError(f"{where}: tag vectors must be finite and non-negative (bag-of-words counts)")
    if not tags.any():
        raise ValueError(f"{where}: empty vocabulary (the tag matrix is all zero: no item has any tag)")
    if labels.ndim != 2 or labels.shape[0] != tags.shape[0]:
        raise ValueError(f"{where}: {labels.shape[0] if labels.ndim else 0} label rows for {tags.shape[0]} tag rows; "
                         "every item needs one tag row and one label row")
    if n_images != tags.shape[0]:
        raise ValueError(f"{where}: {n_images} images for {tags.shape[0]} tag rows; the list file and the .mat files "
                         "must describe the same items in the same order")


def synthetic_tags(classes: np.ndarray, num_classes: int, *, tags_per_class: int, noise_tags: int,
                   keep_prob: float, extra_tags: float, seed: int) -> tuple[np.ndarray, list[str]]:
    """Flickr-like noisy tags from class ids (docs/CROSSMODAL.md). Returns (N, V) 0/1 and the vocabulary."""
    rng = np.random.default_rng(seed)
    n, vocab = len(classes), num_classes * tags_per_class + noise_tags
    tags = np.zeros((n, vocab), dtype=np.float32)
    own = classes[:, None] * tags_per_class + np.arange(tags_per_class)[None, :]
    keep = rng.random(own.shape) < keep_prob
    rows = np.repeat(np.arange(n)[:, None], tags_per_class, axis=1)
    tags[rows[keep], own[keep]] = 1.0
    extra = rng.poisson(extra_tags, size=n)
    for i in range(n):
        if extra[i]:
            tags[i, rng.integers(0, vocab, size=extra[i])] = 1.0
        if not tags[i].any():
            tags[i, rng.integers(0, vocab)] = 1.0
    names = [f"digit{c}_tag{t}" for c in range(num_classes) for t in range(tags_per_class)]
    names += [f"noise{t}" for t in range(noise_tags)]
    return tags, names


def digits_pairs(*, image_size: int = 32, tags_per_class: int = 4, noise_tags: int = 24, keep_prob: float = 0.5,
                 extra_tags: float = 2.0, seed: int = 0) -> PairedData:
    """The 1,797 sklearn digits (real images, 3 x image_size^2 in [0, 1]) with synthetic tags."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    d = load_digits()
    classes = d.target.astype(np.int64)
    img = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    img = F.interpolate(img, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = img.clamp(0, 1).repeat(1, 3, 1, 1).numpy()
    tags, vocab = synthetic_tags(classes, 10, tags_per_class=tags_per_class, noise_tags=noise_tags,
                                 keep_prob=keep_prob, extra_tags=extra_tags, seed=seed)
    labels = np.eye(10, dtype=np.float32)[classes]
    return PairedData(tags=tags, labels=labels, images=images, vocabulary=vocab)


def read_list_file(path: str | Path) -> list[str]:
    """Image paths, one per line (first whitespace-separated field; label columns are ignored)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"list file {path} does not exist")
    out = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not out:
        raise ValueError(f"list file {path} names no image")
    return out


def _read_hdf5_matrix(path: Path, key: str) -> np.ndarray:
    """``key`` of a MATLAB v7.3 (HDF5) file: dense (stored column-major, so transposed back) or sparse
    (a group of ``data`` / ``ir`` / ``jc``, MATLAB's compressed columns)."""
    import h5py

    try:
        fh = h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(f"{path.name} is not a readable MATLAB v7.3 (HDF5) file ({exc})") from None
    with fh:
        keys = sorted(k for k in fh.keys() if not k.startswith("#"))
        if key not in fh:
            raise ValueError(f"{path.name} has no matrix {key!r}; it has {', '.join(keys) or 'none'}")
        node = fh[key]
        if isinstance(node, h5py.Group):
            if not {"data", "ir", "jc"} <= set(node.keys()) or "MATLAB_sparse" not in node.attrs:
                raise ValueError(f"{path.name}:{key} is a MATLAB struct or cell, not a matrix")
            import scipy.sparse

            rows, jc = int(node.attrs["MATLAB_sparse"]), node["jc"][()]
            cols = len(jc) - 1
            return scipy.sparse.csc_matrix((node["data"][()], node["ir"][()], jc), shape=(rows, cols)).toarray()
        value = node[()]
    if value.ndim != 2:
        raise ValueError(f"{path.name}:{key} must be a 2-D matrix, got shape {value.shape}")
    return value.T


def read_mat_matrix(path: str | Path, key: str) -> np.ndarray:
    """A 2-D matrix ``key`` of a MATLAB .mat file, float32: v4-v7 (scipy) or v7.3 (HDF5, h5py); dense or sparse."""
    import scipy.io
    import scipy.sparse

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f".mat file {path} does not exist")
    with open(path, "rb") as fh:
        head = fh.read(1024)
    if b"\x89HDF" in (head[:4], head[512:516]) or b"MATLAB 7.3" in head[:128]:  # HDF5, maybe after a userblock
        value = _read_hdf5_matrix(path, key)
    else:
        try:
            mat = scipy.io.loadmat(str(path))
        except Exception as exc:  # scipy raises ValueError / MatReadError / TypeError on garbage
            raise ValueError(f"{path.name} is not a readable .mat file ({type(exc).__name__}: {exc})") from None
        keys = sorted(k for k in mat if not k.startswith("__"))
        if key not in mat:
            raise ValueError(f"{path.name} has no matrix {key!r}; it has {', '.join(keys) or 'none'}")
        value = mat[key].toarray() if scipy.sparse.issparse(mat[key]) else np.asarray(mat[key])
    if value.ndim != 2 or not np.issubdtype(value.dtype, np.number) and value.dtype != bool:
        raise ValueError(f"{path.name}:{key} must be a 2-D numeric matrix, got shape {value.shape} ({value.dtype})")
    return value.astype(np.float32)


def read_tag_matrix(spec: str, *, default_key: str = "YAll") -> np.ndarray:
    """Tag vectors (N, V) float32 from ``FILE.npy`` or ``FILE.mat[:KEY]`` (default key ``YAll``, the
    papers' name for the tag matrix); no pickles."""
    path, key = spec, default_key
    head, sep, tail = spec.rpartition(":")
    if sep and head.lower().endswith(".mat") and "/" not in tail:
        path, key = head, tail or default_key
    if not Path(path).is_file():
        raise FileNotFoundError(f"tag file {path} does not exist")
    if path.lower().endswith(".npy"):
        try:
            tags = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise ValueError(f"{path} is not a plain .npy array of tag vectors ({exc})") from None
        if tags.ndim != 2:
            raise ValueError(f"{path}: tag vectors must be a 2-D array (items x vocabulary), got shape {tags.shape}")
        return tags.astype(np.float32)
    if path.lower().endswith(".mat"):
        return read_mat_matrix(path, key)
    raise ValueError(f"tag file {path} must be a .npy array or a .mat file (FILE.mat:KEY)")


def load_mat_pairs(root: str | Path, dataset: str, *, list_file: str = "images.txt", tags_file: str = "tags.mat",
                   tags_key: str = "YAll", labels_file: str = "labels.mat", labels_key: str = "LAll",
                   num_labels: int | None = None, check_images: bool = True) -> PairedData:
    """MIRFLICKR-25K / NUS-WIDE pairs from ``root``: a list file (one image path per line, relative to
    ``root``), the N x V tag and N x C label .mat files (v4-v7.3, dense or sparse). Every image must exist."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown cross-modal dataset {dataset!r}; use one of {', '.join(DATASETS)}")
    root = Path(root)
    vocab, label_counts = DATASETS[dataset]
    paths = read_list_file(root / list_file)
    tags = read_mat_matrix(root / tags_file, tags_key)
    labels = read_mat_matrix(root / labels_file, labels_key)
    check_pairs(tags, labels, len(paths), vocab=vocab, where=f"{dataset} {tags_file}")
    want = (num_labels,) if num_labels is not None else label_counts
    if labels.shape[1] not in want:
        raise ValueError(f"{dataset} {labels_file}: {labels.shape[1]} labels, expected {' or '.join(map(str, want))}")
    if not set(np.unique(labels)) <= {0.0, 1.0}:
        raise ValueError(f"{dataset} {labels_file}: labels must be multi-hot 0/1")
    full = [str(root / p) for p in paths]
    if check_images:
        for i, p in enumerate(full):
            if not Path(p).is_file():
                raise FileNotFoundError(f"pair {i}: image {paths[i]} (line {i + 1} of {list_file}) does not exist under {root}")
    return PairedData(tags=tags, labels=labels, paths=full)


def load_images(paths: Sequence[str], image_size: int) -> np.ndarray:
    """RGB images resized to image_size^2, (N, 3, H, W) float32 in [0, 1]."""
    from PIL import Image

    out = np.empty((len(paths), 3, image_size, image_size), dtype=np.float32)
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                im = im.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
                out[i] = np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255.0
        except OSError as exc:
            raise ValueError(f"pair {i}: cannot read image {p} ({exc})") from None
    return out


def limit_pairs(data: PairedData, limit: int | None, seed: int) -> PairedData:
    """A seeded random subset of ``limit`` pairs (in source order; ``rows`` says which), or ``data``."""
    if limit is None or limit >= len(data):
        return data
    return data.subset(np.sort(np.random.default_rng([seed, 7]).choice(len(data), size=limit, replace=False)))


def paired_data(d, *, seed: int = 0, images: bool = True) -> PairedData:
    """The pairs a ``brcd.config.CrossModalDataConfig`` describes (``d.limit`` of them), images loaded
    (file sources with ``images=False``: paths only, :func:`load_images` later)."""
    if d.source == "digits":
        data = digits_pairs(image_size=d.image_size, tags_per_class=d.tags_per_class, noise_tags=d.noise_tags,
                            keep_prob=d.keep_prob, extra_tags=d.extra_tags, seed=seed)
    else:
        data = load_mat_pairs(d.root, d.source, list_file=d.list_file, tags_file=d.tags_file, tags_key=d.tags_key,
                              labels_file=d.labels_file, labels_key=d.labels_key, num_labels=d.num_labels)
    data = limit_pairs(data, d.limit, seed)  # before the images are read
    if images and data.images is None:
        data.images = load_images(data.paths, d.image_size)
    return data


def split_query_database(n: int, query: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random split: ``query`` query indices and the rest as database (both sorted)."""
    if not 1 <= query < n:
        raise ValueError(f"query size {query} must be in [1, {n - 1}] for {n} pairs")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[:query]), np.sort(perm[query:])
