"""Seeded, saved, fingerprinted dataset splits: four ``int64`` position arrays into **one** image source.

Downstream artifacts are only valid for the exact split they were computed on, so a split is drawn
once (``numpy.random.default_rng(seed)``; saving it also guards against stream changes across numpy
versions), saved atomically as ``split.npz`` (no pickle) plus ``split.json`` (manifest), and reused.
A saved split that differs from what the caller expects is refused with a one-line
:class:`~brcd.io.ArtifactError`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np

from brcd.io import (ArtifactError, PathLike, array_fingerprint, json_default, load_arrays, load_json, save_arrays,
                     save_json)
from brcd.data.sources import one_hot
from brcd.layout import SPLIT_ARRAYS, SPLIT_MANIFEST

log = logging.getLogger("brcd.data")

PARTS: tuple[str, ...] = ("train", "validation", "query", "database")
SPLIT_FORMAT = "brcd.split/1"


@dataclass(frozen=True, eq=False)
class Split:
    """Index arrays (``int64`` positions into one source) for the four parts of a protocol.

    ``labels`` is the ``float32`` ``(N, C)`` label matrix of the whole source the positions refer
    to; ``segments`` names the concatenated sub-sources (``[(name, size), ...]``, sizes sum to N).
    ``validation`` may equal ``query`` (list-file protocols use the query set for validation).
    """

    train: np.ndarray
    validation: np.ndarray
    query: np.ndarray
    database: np.ndarray
    labels: np.ndarray
    seed: int
    protocol: str
    segments: tuple[tuple[str, int], ...] = ()
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        labels = np.asarray(self.labels)
        if labels.ndim != 2:
            raise ValueError(f"split labels must be a (N, C) matrix, got shape {labels.shape}")
        object.__setattr__(self, "labels", labels.astype(np.float32, copy=False))
        n = labels.shape[0]
        for part in PARTS:
            idx = np.asarray(getattr(self, part))
            if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
                raise ValueError(f"split part {part!r} must be a 1-D integer array, got {idx.dtype} {idx.shape}")
            idx = idx.astype(np.int64, copy=False)
            if idx.size and (idx.min() < 0 or idx.max() >= n):
                raise ValueError(f"split part {part!r} has positions outside [0, {n}); the split does not fit the labels")
            if np.unique(idx).size != idx.size:
                raise ValueError(f"split part {part!r} repeats positions; each image may appear once per part")
            object.__setattr__(self, part, idx)
        segs = tuple((str(a), int(b)) for a, b in self.segments) or (("all", n),)
        if sum(s for _, s in segs) != n:
            raise ValueError(f"split segments {segs} do not add up to the {n} labelled items")
        object.__setattr__(self, "segments", segs)
        object.__setattr__(self, "seed", int(self.seed))
        object.__setattr__(self, "params", dict(self.params))

    @property
    def fingerprint(self) -> str:
        """Content hash of the four index arrays and the label matrix."""
        return array_fingerprint(self.train, self.validation, self.query, self.database, self.labels)

    @property
    def labels_fingerprint(self) -> str:
        """Content hash of the label matrix only (identifies the dataset)."""
        return array_fingerprint(self.labels)

    @property
    def sizes(self) -> dict[str, int]:
        return {p: int(getattr(self, p).size) for p in PARTS}

    @property
    def num_items(self) -> int:
        return int(self.labels.shape[0])

    def indices(self, part: str) -> np.ndarray:
        """Positions of ``part`` (one of ``train``, ``validation``, ``query``, ``database``)."""
        if part not in PARTS:
            raise ValueError(f"unknown split part {part!r}; choose one of {', '.join(PARTS)}")
        return getattr(self, part)

    def labels_of(self, part: str) -> np.ndarray:
        return self.labels[self.indices(part)]

    def segment_offset(self, name: str) -> int:
        """First position of segment ``name``."""
        names = [n for n, _ in self.segments]
        if name not in names:
            raise KeyError(f"split has no segment {name!r}; segments are {names}")
        return sum(size for _, size in self.segments[:names.index(name)])

    def manifest(self) -> dict[str, Any]:
        return {"format": SPLIT_FORMAT, "protocol": self.protocol, "seed": self.seed, "sizes": self.sizes,
                "num_items": self.num_items, "num_classes": int(self.labels.shape[1]),
                "segments": [list(s) for s in self.segments], "params": dict(self.params),
                "fingerprint": self.fingerprint, "labels_fingerprint": self.labels_fingerprint}

    def __repr__(self) -> str:
        return f"Split(protocol={self.protocol!r}, seed={self.seed}, sizes={self.sizes}, fingerprint={self.fingerprint})"


def split_files(path: PathLike) -> tuple[Path, Path]:
    """``(npz, json)`` paths for ``path``: a ``*.npz`` file (manifest beside it, ``.json``) or a
    folder (``split.npz`` and ``split.json`` inside)."""
    path = Path(path)
    if path.suffix == ".npz":
        return path, path.with_suffix(".json")
    return path / SPLIT_ARRAYS, path / SPLIT_MANIFEST


def save_split(split: Split, path: PathLike) -> Path:
    """Write ``split.npz`` then ``split.json`` atomically; the manifest, written last, marks completion."""
    npz, manifest = split_files(path)
    labels = split.labels
    stored = labels.astype(np.uint8) if np.isin(labels, (0.0, 1.0)).all() else labels
    save_arrays(npz, labels=stored, **{p: getattr(split, p) for p in PARTS})
    save_json(manifest, split.manifest())
    return manifest


def load_split(path: PathLike, *, labels: np.ndarray | None = None, expected_fingerprint: str | None = None,
               expect: Mapping[str, Any] | None = None) -> Split:
    """Load a saved split; :class:`ArtifactError` (one line) when its files are missing or do not match
    the manifest, or it was made for other ``labels``, another ``expected_fingerprint``, or another value
    of a manifest entry named in ``expect`` (e.g. ``{"seed": 0, "protocol": "cifar10"}``)."""
    npz, mpath = split_files(path)
    if not mpath.exists():
        if npz.exists():
            raise ArtifactError(f"{npz} has no manifest {mpath.name} (interrupted write?); delete {npz} to recreate the split")
        raise ArtifactError(f"no saved split at {mpath}")
    manifest = load_json(mpath)
    if not isinstance(manifest, dict) or manifest.get("format") != SPLIT_FORMAT:
        raise ArtifactError(f"{mpath} is not a brcd split manifest (format {SPLIT_FORMAT}); delete it and re-run")
    if not npz.exists():
        raise ArtifactError(f"{mpath} names a split but {npz.name} is missing; delete {mpath} to recreate the split")
    arrays = load_arrays(npz)
    try:
        split = Split(
            **{p: arrays[p] for p in PARTS},
            labels=arrays["labels"].astype(np.float32),
            seed=int(manifest["seed"]),
            protocol=str(manifest["protocol"]),
            segments=tuple((str(a), int(b)) for a, b in manifest.get("segments", [])),
            params=manifest.get("params", {}),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{npz} is not a valid split ({exc}); delete it and {mpath.name} to recreate") from None
    if split.fingerprint != manifest.get("fingerprint"):
        raise ArtifactError(
            f"{npz} does not match its manifest (fingerprint {split.fingerprint} != {manifest.get('fingerprint')}); "
            f"delete {npz} and {mpath.name} and re-run"
        )
    if labels is not None:
        current = array_fingerprint(np.asarray(labels, dtype=np.float32))
        if current != split.labels_fingerprint:
            raise ArtifactError(
                f"split at {mpath} was made for other data (labels {split.labels_fingerprint}, current dataset "
                f"{current}); use another split_path or delete the split (its artifacts become invalid)"
            )
    for key, want in (expect or {}).items():
        have = manifest.get(key)
        if _jsonable(have) != _jsonable(want):
            raise ArtifactError(
                f"split at {mpath} was made with {key}={have!r}, but {key}={want!r} is configured; "
                "use another split_path or delete the split (its artifacts become invalid)"
            )
    return _check_fingerprint(split, expected_fingerprint, f"split at {mpath}")


def _check_fingerprint(split: Split, expected: str | None, what: str, hint: str = "") -> Split:
    if expected is not None and split.fingerprint != expected:
        raise ArtifactError(f"{what} has fingerprint {split.fingerprint}, expected {expected}; "
                            f"the artifacts you are using were computed on another split{hint}")
    return split


def _jsonable(v: Any) -> Any:
    """The JSON form of ``v`` (tuples become lists, numpy scalars numbers), as the manifest stores it."""
    return json.loads(json.dumps(v, default=json_default))


def load_or_create_split(path: PathLike | None, create_fn: Callable[[], Split], *, labels: np.ndarray | None = None,
                         expected_fingerprint: str | None = None, expect: Mapping[str, Any] | None = None) -> Split:
    """The split saved at ``path`` (checked as by :func:`load_split`), or ``create_fn()``'s, saved there
    (``path=None``: not saved)."""
    if path is not None:
        npz, mpath = split_files(path)
        if mpath.exists() or npz.exists():
            split = load_split(path, labels=labels, expected_fingerprint=expected_fingerprint, expect=expect)
            log.info("reusing split %s from %s", split.fingerprint, mpath)
            return split
    split = _check_fingerprint(create_fn(), expected_fingerprint, "new split", " -- restore its split files")
    if path is not None:
        save_split(split, path)
        log.info("saved split %s to %s", split.fingerprint, split_files(path)[1])
    return split


def class_ids(labels: np.ndarray) -> np.ndarray:
    """Primary class per row of a ``(N, C)`` multi-hot matrix: its first positive column (0 for an
    all-zero row). Used as the stratum for sampling."""
    return np.argmax(np.asarray(labels) > 0, axis=1).astype(np.int64)


def _as_matrix(labels: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim == 2:
        return labels.astype(np.float32, copy=False)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D class ids or a (N, C) matrix, got shape {labels.shape}")
    if labels.size and labels.min() < 0:
        raise ValueError("class ids must be non-negative")
    return one_hot(labels, num_classes if num_classes is not None else (int(labels.max()) + 1 if labels.size else 1))


def _check_size(name: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"split size {name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def stratified_sample(pool: np.ndarray, strata: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` positions drawn without replacement from ``pool``, spread over ``strata[pool]`` in
    proportion to stratum size (largest-remainder rounding). Returned sorted."""
    pool = np.asarray(pool, dtype=np.int64)
    if n > pool.size:
        raise ValueError(f"cannot draw {n} items from {pool.size}")
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    groups, inverse = np.unique(strata[pool], return_inverse=True)
    counts = np.bincount(inverse, minlength=groups.size)
    exact = counts * (n / pool.size)
    quota = np.floor(exact).astype(np.int64)
    short = n - int(quota.sum())
    if short:
        order = np.lexsort((np.arange(groups.size), -(exact - quota)))  # largest remainder, then group order
        quota[order[:short]] += 1
    picked = []
    for g in range(groups.size):
        members = pool[inverse == g]
        if quota[g]:
            picked.append(rng.permutation(members)[: quota[g]])
    return np.sort(np.concatenate(picked)).astype(np.int64)


def _rest(pool: np.ndarray, taken: np.ndarray) -> np.ndarray:
    return np.setdiff1d(pool, taken, assume_unique=True).astype(np.int64)


def cifar10_split(train_labels: np.ndarray, test_labels: np.ndarray, seed: int, *, train_per_class: int = 500,
                  validation: int = 5000) -> Split:
    """The CIFAR-10 hashing protocol (BRCD / CIBHash); positions into ``ConcatSource([("train", ..), ("test", ..)])``.

    ``train`` = ``train_per_class`` random images per class of the training set; ``validation`` = that
    many random test images, ``query`` = the other test images; ``database`` = the whole training set.
    Labels may be 1-D class ids or one-hot matrices.
    """
    seed = _check_size("seed", seed)
    train_per_class = _check_size("train_per_class", train_per_class, 1)
    tr, te = np.asarray(train_labels), np.asarray(test_labels)
    num_classes = None
    if tr.ndim == 1 and te.ndim == 1 and (tr.size or te.size):
        num_classes = int(max(tr.max(initial=0), te.max(initial=0))) + 1
    tr_m, te_m = _as_matrix(tr, num_classes), _as_matrix(te, num_classes)
    if tr_m.shape[1] != te_m.shape[1]:
        raise ValueError(f"train labels have {tr_m.shape[1]} classes but test labels {te_m.shape[1]}")
    n_tr, n_te = tr_m.shape[0], te_m.shape[0]
    validation = _check_size("validation", validation)
    if validation >= n_te:
        raise ValueError(f"validation={validation} leaves no query images out of {n_te} test images; lower it")
    rng = np.random.default_rng(seed)
    cls_tr = class_ids(tr_m)
    train_parts = []
    for c in range(tr_m.shape[1]):
        members = np.flatnonzero(cls_tr == c)
        if members.size < train_per_class:
            raise ValueError(
                f"class {c} has {members.size} training images, fewer than train_per_class={train_per_class}; lower it"
            )
        train_parts.append(rng.permutation(members)[:train_per_class])
    train = np.sort(np.concatenate(train_parts))
    test_pos = np.arange(n_tr, n_tr + n_te, dtype=np.int64)
    perm = rng.permutation(test_pos)
    val, query = np.sort(perm[:validation]), np.sort(perm[validation:])
    return Split(train=train, validation=val, query=query, database=np.arange(n_tr, dtype=np.int64),
                 labels=np.concatenate([tr_m, te_m]), seed=seed, protocol="cifar10",
                 segments=(("train", n_tr), ("test", n_te)),
                 params={"train_per_class": train_per_class, "validation": validation})


def random_split(labels: np.ndarray, seed: int, *, query: int, validation: int, train: int | None,
                 database: int | Literal["rest"] = "rest", stratify: bool = True,
                 segments: Sequence[tuple[str, int]] = ()) -> Split:
    """A generic split of one labelled collection: disjoint random ``query`` and ``validation`` draws,
    ``database`` the rest (``"rest"``) or that many of them, ``train`` that many database images
    (``None``: all). With ``stratify`` each draw follows the class proportions."""
    seed = _check_size("seed", seed)
    mat = _as_matrix(labels)
    n = mat.shape[0]
    query = _check_size("query", query, 1)
    validation = _check_size("validation", validation)
    if query + validation >= n:
        raise ValueError(
            f"query={query} + validation={validation} leave no database images out of {n}; lower them"
        )
    n_db_avail = n - query - validation
    if database == "rest":
        n_db = n_db_avail
    else:
        n_db = _check_size("database", database, 1)
        if n_db > n_db_avail:
            raise ValueError(f"database={n_db} exceeds the {n_db_avail} images left after query and validation; lower it")
    n_train = n_db if train is None else _check_size("train", train, 1)
    if n_train > n_db:
        raise ValueError(f"train={n_train} exceeds the database size {n_db}; training images are drawn from the database")
    rng = np.random.default_rng(seed)
    strata = class_ids(mat) if stratify else np.zeros(n, dtype=np.int64)
    everything = np.arange(n, dtype=np.int64)
    q = stratified_sample(everything, strata, query, rng)
    rest = _rest(everything, q)
    v = stratified_sample(rest, strata, validation, rng)
    rest = _rest(rest, v)
    db = rest if n_db == rest.size else stratified_sample(rest, strata, n_db, rng)
    tr = db if n_train == db.size else stratified_sample(db, strata, n_train, rng)
    return Split(train=tr, validation=v, query=q, database=db, labels=mat, seed=seed, protocol="random",
                 segments=tuple(segments),
                 params={"query": query, "validation": validation, "train": train, "database": database,
                         "stratify": stratify})


def list_split(query_labels: np.ndarray, database_labels: np.ndarray, seed: int, *,
               train_labels: np.ndarray | None = None, train: int | None = None,
               validation: int | Literal["query"] = "query") -> Split:
    """The list-file protocols (MS-COCO, ImageNet-100, NUS-WIDE), positions into
    ``ConcatSource([("train", ...), ("query", ...), ("database", ...)])`` (``train`` only with ``train_labels``).

    ``train``: the train list, or ``train`` random images of it (of the database without a train list,
    NUS-WIDE: 10,500). ``validation``: ``"query"`` (the public protocol) or that many query-list images
    carved out. ``database``: the whole database list.
    """
    seed = _check_size("seed", seed)
    mats = [_as_matrix(query_labels), _as_matrix(database_labels)]
    if train_labels is not None:
        mats.insert(0, _as_matrix(train_labels))
    widths = {m.shape[1] for m in mats}
    if len(widths) != 1:
        raise ValueError(f"list files have different label widths {sorted(widths)}; they must share the classes")
    names = (["train"] if train_labels is not None else []) + ["query", "database"]
    segments = tuple((nm, m.shape[0]) for nm, m in zip(names, mats))
    labels = np.concatenate(mats)
    offsets = dict(zip(names, np.concatenate([[0], np.cumsum([m.shape[0] for m in mats])])))
    strata = class_ids(labels)
    rng = np.random.default_rng(seed)
    q_pos = np.arange(offsets["query"], offsets["query"] + mats[-2].shape[0], dtype=np.int64)
    db_pos = np.arange(offsets["database"], offsets["database"] + mats[-1].shape[0], dtype=np.int64)
    if validation == "query":
        v, q = q_pos, q_pos
    else:
        nv = _check_size("validation", validation)
        if nv >= q_pos.size:
            raise ValueError(f"validation={nv} leaves no queries out of {q_pos.size} query-list images; lower it")
        v = stratified_sample(q_pos, strata, nv, rng)
        q = _rest(q_pos, v)
    if train_labels is None and train is None:
        raise ValueError("no train list: set train (number of database images to train on, e.g. 10500 for NUS-WIDE)")
    tr_pos = db_pos if train_labels is None else np.arange(0, mats[0].shape[0], dtype=np.int64)
    if train is not None:
        nt = _check_size("train", train, 1)
        if nt > tr_pos.size:
            what = "database images" if train_labels is None else "images of the train list"
            raise ValueError(f"train={nt} exceeds the {tr_pos.size} {what}; lower it")
        tr_pos = stratified_sample(tr_pos, strata, nt, rng)
    return Split(train=tr_pos, validation=v, query=q, database=db_pos, labels=labels, seed=seed, protocol="list_files",
                 segments=segments, params={"train": train, "validation": validation,
                                            "train_list": train_labels is not None})
