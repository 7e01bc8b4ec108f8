"""Torch datasets over an :class:`~brcd.data.sources.ImageSource` and a split, plus :func:`build_data`.

``position`` (the last item of a dataset's tuples) is the position within the dataset's ``indices``.

Corrupt images (``on_corrupt``): ``"error"`` raises :class:`~brcd.data.sources.CorruptImageError`;
``"skip"`` substitutes the next readable item of ``indices`` (wrapping around), warns once per bad path
and still returns the *requested* position. The substitution depends only on the files, so every
dataset over the same indices substitutes the same image (teacher codes, pseudo-labels and views agree).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from brcd.config import AugmentConfig
from brcd.data.sources import (
    ConcatSource,
    CorruptImageError,
    ImageSource,
    cifar10_source,
    digits_source,
    image_folder_source,
    list_file_source,
)
from brcd.data.splits import Split, cifar10_split, list_split, load_or_create_split, random_split
from brcd.data.transforms import TwoViewTransform, eval_transform
from brcd.io import PathLike

log = logging.getLogger("brcd.data")

OnCorrupt = Literal["skip", "error"]
SOURCES: tuple[str, ...] = ("digits", "cifar10", "image_folder", "list_files")
DEFAULT_LIST_FILES: dict[str, str | None] = {"train": "train.txt", "query": "test.txt", "database": "database.txt"}
# Small, already square images (digits, CIFAR-10) are resized; photos are resized then centre-cropped.
_RESIZE_THEN_CROP = {"digits": False, "cifar10": False, "image_folder": True, "list_files": True}
DEFAULT_MAX_CACHE_BYTES = 256 * 1024 * 1024

_warned_paths: set[str] = set()


def default_resize_then_crop(source: str) -> bool:
    """The eval geometry :func:`build_data` uses for ``source`` when ``resize_then_crop`` is not given."""
    if source not in _RESIZE_THEN_CROP:
        raise ValueError(f"unknown data source {source!r}; choose one of {', '.join(SOURCES)}")
    return _RESIZE_THEN_CROP[source]


def labels_for(source: ImageSource, indices: Sequence[int] | np.ndarray) -> np.ndarray:
    """``float32`` ``(len(indices), C)`` labels of the items at ``indices``."""
    return source.labels[np.asarray(indices, dtype=np.int64)]


class _Items:
    """Indexed access to ``source[indices[pos]]`` with corrupt-image policy and optional pre-resize."""

    def __init__(self, source: ImageSource, indices: Sequence[int] | np.ndarray, on_corrupt: str, preresize: int | None,
                 max_cache_bytes: int) -> None:
        if on_corrupt not in ("skip", "error"):
            raise ValueError(f"on_corrupt must be 'skip' or 'error', got {on_corrupt!r}")
        idx = np.asarray(indices)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise ValueError(f"indices must be a 1-D integer array, got {idx.dtype} {idx.shape}")
        idx = idx.astype(np.int64, copy=False)
        if idx.size == 0:
            raise ValueError("indices are empty; a dataset needs at least one image (check the split sizes)")
        if idx.min() < 0 or idx.max() >= len(source):
            raise ValueError(f"indices must lie in [0, {len(source)}) for this source; the split does not fit it")
        self.source = source
        self.indices = idx
        self.on_corrupt = on_corrupt
        self.bad: set[int] = set()
        self.cache: np.ndarray | None = None
        if preresize is not None:
            if isinstance(preresize, bool) or not isinstance(preresize, int) or preresize < 1:
                raise ValueError(f"preresize must be a positive int or None, got {preresize!r}")
            self.cache = self._build_cache(preresize, max_cache_bytes)

    def _build_cache(self, size: int, max_bytes: int) -> np.ndarray | None:
        if not self.source.in_memory:
            return None
        first = self.source.load(int(self.indices[0]))
        w, h = first.size
        if min(w, h) >= size:  # only upsampling is cached; larger images keep full resolution
            return None
        new = (round(w * size / min(w, h)), round(h * size / min(w, h)))
        nbytes = len(self.indices) * new[0] * new[1] * 3
        if nbytes > max_bytes:
            log.debug("not pre-resizing %d images to %s (%.0f MiB > budget)", len(self.indices), new, nbytes / 2**20)
            return None
        out = np.empty((len(self.indices), new[1], new[0], 3), dtype=np.uint8)
        for k, i in enumerate(self.indices):
            im = self.source.load(int(i))
            if im.size != (w, h):
                return None  # mixed sizes: no cache
            out[k] = np.asarray(im.resize(new, Image.Resampling.BILINEAR))
        return out

    def __len__(self) -> int:
        return int(self.indices.size)

    def image(self, pos: int) -> Image.Image:
        n = len(self)
        pos = int(pos)
        if not 0 <= pos < n:
            raise IndexError(f"position {pos} out of range for a dataset of {n} images")
        if self.cache is not None:
            return Image.fromarray(self.cache[pos])
        if self.on_corrupt == "error":
            return self.source.load(int(self.indices[pos]))
        for step in range(n):
            p = (pos + step) % n
            if p in self.bad:
                continue
            try:
                return self.source.load(int(self.indices[p]))
            except CorruptImageError as exc:
                self.bad.add(p)
                if exc.path not in _warned_paths:
                    _warned_paths.add(exc.path)
                    log.warning("skipping corrupt image %s (%s); using the next readable image", exc.path, exc.reason)
        raise ValueError(f"none of the {n} images of this dataset is readable; run brcd.data.scan_images on the source")


class _ItemsDataset(Dataset):
    """Shared part of the two datasets: checked ``indices``, the corrupt-image policy."""

    def __init__(self, source: ImageSource, indices: Sequence[int] | np.ndarray,
                 transform: Callable[[Image.Image], Any], on_corrupt: OnCorrupt = "error", *,
                 preresize: int | None = None, max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES) -> None:
        self.items = _Items(source, indices, on_corrupt, preresize, max_cache_bytes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)


class TwoViewDataset(_ItemsDataset):
    """``(view1, view2, position)`` for contrastive training; ``transform(image)`` returns a pair of tensors."""

    def __getitem__(self, pos: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        view1, view2 = self.transform(self.items.image(pos))
        return view1, view2, int(pos)


class EvalDataset(_ItemsDataset):
    """``(image, position)`` with a deterministic transform (see :func:`eval_transform`)."""

    def __getitem__(self, pos: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.items.image(pos)), int(pos)


@dataclass
class DataBundle:
    """A source (a :class:`ConcatSource` for CIFAR-10 and list files), its split of positions into it,
    and the settings to build datasets from them."""

    source: ImageSource
    split: Split
    kind: str
    image_size: int
    resize_then_crop: bool
    on_corrupt: OnCorrupt = "error"
    preresize: bool = True
    augment: AugmentConfig | None = None  # the training views' recipe (None: the natural-image default)

    def _preresize(self) -> int | None:
        return self.image_size if self.preresize and self.source.in_memory else None

    def train_dataset(self, transform: Callable | None = None) -> TwoViewDataset:
        transform = transform or TwoViewTransform(self.image_size, self.augment)
        return TwoViewDataset(self.source, self.split.train, transform, self.on_corrupt, preresize=self._preresize())

    def eval_dataset(self, part: str, transform: Callable | None = None) -> EvalDataset:
        """Clean dataset over ``part`` (``train``, ``validation``, ``query`` or ``database``)."""
        transform = transform or eval_transform(self.image_size, self.resize_then_crop)
        return EvalDataset(self.source, self.split.indices(part), transform, self.on_corrupt,
                           preresize=self._preresize())

    def labels(self, part: str) -> np.ndarray:
        return self.split.labels_of(part)


def _need_root(kind: str, root: PathLike | None, what: str) -> Path:
    if root is None:
        raise ValueError(f"source={kind} needs root: {what}")
    return Path(root)


def _reject(kind: str, **given: Any) -> None:
    bad = [k for k, v in given.items() if v is not None]
    if bad:
        raise ValueError(f"source={kind} does not use {', '.join(bad)}; remove them from the data config")


# (source, its split's creator, the split's recorded params, protocol name)
_Protocol = tuple[ImageSource, Callable[[], Split], dict[str, Any], str]


def _list_files_protocol(folder: Path, list_files: Mapping[str, str | None] | None, num_classes: int | None,
                         seed: int, train: int | None, validation: int | Literal["query"] | None) -> _Protocol:
    lists = dict(DEFAULT_LIST_FILES)
    if list_files is not None:
        unknown = set(list_files) - set(DEFAULT_LIST_FILES)
        if unknown:
            raise ValueError(f"list_files has unknown keys {sorted(unknown)}; use train, query, database")
        lists.update(list_files)
    if lists["query"] is None or lists["database"] is None:
        raise ValueError("list_files needs a query and a database list (e.g. test.txt, database.txt)")
    by_name = {part: list_file_source(folder, lists[part], num_classes)
               for part in ("train", "query", "database") if lists[part] is not None}
    kwargs: dict[str, Any] = {"train": train, "validation": "query" if validation is None else validation}
    train_labels = by_name["train"].labels if "train" in by_name else None
    create = lambda: list_split(by_name["query"].labels, by_name["database"].labels, seed,
                                train_labels=train_labels, **kwargs)
    return ConcatSource(list(by_name.items())), create, {**kwargs, "train_list": train_labels is not None}, "list_files"


def _protocol(source: str, root: PathLike | None, seed: int, stratify: bool, *, query: int | None,
              validation: int | Literal["query"] | None, train: int | None, database: int | Literal["rest"] | None,
              train_per_class: int | None, list_files: Mapping[str, str | None] | None,
              num_classes: int | None) -> _Protocol:
    """Open ``source`` and pick its split protocol, with the documented default sizes of :func:`build_data`."""
    if source == "cifar10":
        _reject(source, query=query, train=train, database=database, list_files=list_files, num_classes=num_classes)
        folder = _need_root(source, root, "the cifar-10-batches-py folder (data_batch_1..5, test_batch, batches.meta)")
        tr, te = cifar10_source(folder, train=True), cifar10_source(folder, train=False)
        kwargs: dict[str, Any] = {
            "train_per_class": 500 if train_per_class is None else train_per_class,
            "validation": 5000 if validation is None else validation,
        }
        src = ConcatSource([("train", tr), ("test", te)])
        return src, lambda: cifar10_split(tr.labels, te.labels, seed, **kwargs), kwargs, "cifar10"
    if source == "list_files":
        _reject(source, query=query, database=database, train_per_class=train_per_class)
        folder = _need_root(source, root, "the folder holding the images and train.txt / test.txt / database.txt")
        return _list_files_protocol(folder, list_files, num_classes, seed, train, validation)
    _reject(source, train_per_class=train_per_class, list_files=list_files, num_classes=num_classes)
    if source == "digits":
        src = digits_source()
        defaults = {"query": 200, "validation": 200, "train": 1000}
    else:
        src = image_folder_source(_need_root(source, root, "a folder with one sub-folder of images per class"))
        defaults = {"query": max(1, len(src) // 10), "validation": len(src) // 10, "train": None}
    given = {"query": query, "validation": validation, "train": train}
    kwargs = {k: defaults[k] if given[k] is None else given[k] for k in defaults}
    kwargs.update(database="rest" if database is None else database, stratify=stratify)
    return src, lambda: random_split(src.labels, seed, **kwargs), kwargs, "random"


def build_data(*, source: str = "digits", root: PathLike | None = None, image_size: int = 32, seed: int = 0,
               split_path: PathLike | None = None, on_corrupt: OnCorrupt = "error", query: int | None = None,
               validation: int | Literal["query"] | None = None, train: int | None = None,
               database: int | Literal["rest"] | None = None, train_per_class: int | None = None,
               list_files: Mapping[str, str | None] | None = None, num_classes: int | None = None,
               resize_then_crop: bool | None = None, stratify: bool = True, preresize: bool = True,
               augment: AugmentConfig | None = None) -> DataBundle:
    """Open a source, create or reuse its saved split, and return a :class:`DataBundle`.

    Default sizes per ``source``: ``"digits"`` (no root) query 200, validation 200, train 1,000 of the
    remaining 1,397; ``"cifar10"`` (``root`` = ``cifar-10-batches-py``) ``train_per_class`` 500 and
    ``validation`` 5,000 test images, the rest queries; ``"image_folder"`` query and validation 10 %
    each, train = the whole database; ``"list_files"`` the lists of :data:`DEFAULT_LIST_FILES` under
    ``root`` (a ``None`` train list draws ``train`` images from the database, NUS-WIDE style),
    validation = the query list or a number carved out of it.

    A split saved at ``split_path`` (a folder, or a ``*.npz`` file) is reused only if it was made from
    the same labels, protocol, seed and sizes (else :class:`~brcd.io.ArtifactError`).
    """
    rtc = default_resize_then_crop(source) if resize_then_crop is None else bool(resize_then_crop)
    src, create, params, protocol = _protocol(
        source, root, seed, stratify, query=query, validation=validation, train=train, database=database,
        train_per_class=train_per_class, list_files=list_files, num_classes=num_classes)
    if len(src) == 0:
        raise ValueError(f"data source {source} has no images; check root")
    expect = {"protocol": protocol, "seed": seed, "params": params}
    split = load_or_create_split(split_path, create, labels=src.labels, expect=expect)
    return DataBundle(source=src, split=split, kind=source, image_size=image_size, resize_then_crop=rtc,
                      on_corrupt=on_corrupt, preresize=preresize, augment=augment)
