"""Image sources: indexable collections of RGB images with ``float32`` ``(N, C)`` multi-hot labels.

Sources: scikit-learn's digits, the CIFAR-10 python batches (read with a restricted unpickler),
image folders, list files (NUS-WIDE, MS-COCO, ImageNet-100), and :class:`ConcatSource` (several as
one, so that a split is plain ``int64`` positions into a single source).

Corrupt or unreadable files make ``load`` raise :class:`CorruptImageError` (a ``ValueError`` whose
message names the path); :func:`scan_images` lists such files up front.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image

log = logging.getLogger("brcd.data")

PathLike = str | os.PathLike

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
CIFAR10_TRAIN_FILES: tuple[str, ...] = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILES: tuple[str, ...] = ("test_batch",)
CIFAR10_META_FILE = "batches.meta"


class CorruptImageError(ValueError):
    """An image file could not be opened or decoded. ``.path`` holds the offending path."""

    def __init__(self, path: str, reason: str = "") -> None:
        self.path = str(path)
        self.reason = reason
        detail = f" ({reason})" if reason else ""
        super().__init__(
            f"corrupt or unreadable image {self.path}{detail}; replace or remove the file, "
            "or set on_corrupt='skip'"
        )


class UnsafePickleError(ValueError):
    """A pickle referenced a global outside the allow-list; it was not loaded."""


class ImageSource:
    """Abstract indexable image collection: subclasses set ``labels`` (``float32`` ``(N, C)``), ``names``
    and ``class_names``, and implement :meth:`load`."""

    labels: np.ndarray
    names: list[str]
    class_names: list[str]
    #: True when every image is held in memory (cheap to load, never corrupt).
    in_memory: bool = False

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.labels.shape[1])

    def load(self, i: int) -> Image.Image:
        """Return item ``i`` as an RGB :class:`PIL.Image.Image`; :class:`CorruptImageError` if unreadable."""
        raise NotImplementedError

    def path_of(self, i: int) -> str:
        return self.names[i]

    def _check_index(self, i: int) -> int:
        n = len(self)
        i = int(i)
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for a source of {n} images")
        return i

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={len(self)}, classes={self.num_classes})"


def _init_source(src: ImageSource, names: Sequence[str], labels: np.ndarray,
                 class_names: Sequence[str] | None) -> None:
    src.names = [str(n) for n in names]
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.shape[0] != len(src.names):
        raise ValueError(f"labels must be a (N={len(src.names)}, C) multi-hot matrix, got shape {labels.shape}")
    src.labels = labels.astype(np.float32, copy=False)
    src.class_names = list(class_names) if class_names is not None else [str(k) for k in range(src.num_classes)]


class ArraySource(ImageSource):
    """Images held in memory as one ``uint8`` array of shape ``(N, H, W, 3)``."""

    in_memory = True

    def __init__(self, images: np.ndarray, labels: np.ndarray, names: Sequence[str],
                 class_names: Sequence[str] | None = None) -> None:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"ArraySource needs uint8 images of shape (N, H, W, 3), got {images.dtype} {images.shape}")
        if len(names) != len(images):
            raise ValueError(f"ArraySource got {len(names)} names for {len(images)} images")
        self.images = images
        _init_source(self, names, labels, class_names)

    def load(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[self._check_index(i)])


class FileSource(ImageSource):
    """Images stored as files; ``names`` are their paths."""

    def __init__(self, paths: Sequence[str], labels: np.ndarray, class_names: Sequence[str] | None = None) -> None:
        _init_source(self, paths, labels, class_names)

    def load(self, i: int) -> Image.Image:
        return open_rgb(self.names[self._check_index(i)])


class ConcatSource(ImageSource):
    """Several named sources seen as one: position ``p`` in ``[offset_k, offset_k + len_k)`` is
    item ``p - offset_k`` of part ``k``. All parts must have the same label width."""

    def __init__(self, parts: Sequence[tuple[str, ImageSource]]) -> None:
        if not parts:
            raise ValueError("ConcatSource needs at least one (name, source) part")
        widths = {s.num_classes for _, s in parts}
        if len(widths) != 1:
            raise ValueError(
                f"ConcatSource parts have different label widths {sorted(widths)}; "
                "all parts must use the same classes"
            )
        self.parts: list[tuple[str, ImageSource]] = list(parts)
        sizes = [len(s) for _, s in parts]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.labels = np.concatenate([s.labels for _, s in parts], axis=0).astype(np.float32, copy=False)
        self.names = [nm for _, s in parts for nm in s.names]
        self.class_names = list(parts[0][1].class_names)
        self.in_memory = all(s.in_memory for _, s in parts)

    def _part(self, i: int) -> tuple[int, int]:
        i = self._check_index(i)
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return k, i - int(self.offsets[k])

    def locate(self, i: int) -> tuple[str, int]:
        """``(part_name, local_index)`` of position ``i``."""
        k, local = self._part(i)
        return self.parts[k][0], local

    def load(self, i: int) -> Image.Image:
        k, local = self._part(i)
        return self.parts[k][1].load(local)


def one_hot(classes: np.ndarray, num_classes: int) -> np.ndarray:
    """``float32`` one-hot matrix ``(N, num_classes)`` from integer class ids."""
    classes = np.asarray(classes, dtype=np.int64).reshape(-1)
    if classes.size and (classes.min() < 0 or classes.max() >= num_classes):
        raise ValueError(
            f"class ids must lie in [0, {num_classes}), got range [{classes.min()}, {classes.max()}]"
        )
    out = np.zeros((classes.size, num_classes), dtype=np.float32)
    out[np.arange(classes.size), classes] = 1.0
    return out


def _require_every_class(labels: np.ndarray, class_names: Sequence[str], where: str) -> None:
    counts = labels.sum(axis=0)
    empty = [class_names[k] for k in np.flatnonzero(counts == 0)]
    if empty:
        raise ValueError(
            f"{where}: class(es) {empty[:5]}{'...' if len(empty) > 5 else ''} have no images; "
            "add images for them or remove the class"
        )


def open_rgb(path: PathLike) -> Image.Image:
    """Open and fully decode an image file as RGB; :class:`CorruptImageError` if that fails."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except CorruptImageError:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, zlib/struct errors ...
        raise CorruptImageError(str(path), f"{type(exc).__name__}: {exc}".splitlines()[0]) from None


def scan_images(source: ImageSource, indices: Iterable[int] | None = None) -> list[str]:
    """Try to load every image (or those at ``indices``) and return the paths that fail."""
    if source.in_memory:
        return []
    positions = range(len(source)) if indices is None else (int(i) for i in indices)
    bad: list[str] = []
    for i in positions:
        try:
            source.load(i)
        except CorruptImageError as exc:
            bad.append(exc.path)
    return bad


def _read_digits() -> np.ndarray:
    """The digits table ``(1797, 65)`` (64 grey levels 0..16, then the class).

    Importing ``sklearn.datasets`` takes seconds, so the CSV inside the installed package is read
    directly when it has the expected shape."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    if spec is not None and spec.submodule_search_locations:
        csv = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
        try:
            with gzip.open(csv, "rt") as fh:
                table = np.loadtxt(fh, delimiter=",")
            if table.shape == (1797, 65) and table.min() >= 0 and table[:, :64].max() <= 16 and table[:, 64].max() <= 9:
                return table
        except (OSError, ValueError):
            pass
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.concatenate([np.asarray(d.data, dtype=np.float64), np.asarray(d.target)[:, None]], axis=1)


def digits_source() -> ArraySource:
    """scikit-learn's embedded digits: 1,797 real 8x8 grey images of 10 classes, as RGB ``uint8`` (0..255)."""
    raw = _read_digits()
    grey = np.rint(raw[:, :64].reshape(-1, 8, 8) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    images = np.repeat(grey[..., None], 3, axis=-1)
    labels = one_hot(raw[:, 64].astype(np.int64), 10)
    names = [f"digits[{i}]" for i in range(len(images))]
    src = ArraySource(images, labels, names, class_names=[str(k) for k in range(10)])
    _require_every_class(src.labels, src.class_names, "digits")
    return src


try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct


def _safe_reconstruct(subtype: Any, shape: Any, typecode: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise UnsafePickleError("pickle asked to reconstruct a non-ndarray type; refusing it")
    return _np_reconstruct(np.ndarray, shape, typecode)


def _safe_dtype(*args: Any) -> np.dtype:
    dt = np.dtype(*args)
    if dt.hasobject:
        raise UnsafePickleError("pickle holds an object-dtype array; refusing it")
    return dt


def _safe_codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """``_codecs.encode`` as pickle protocol 2 uses it under Python 3 to store ``bytes`` (a latin-1
    string and its encoding): a pure str -> bytes conversion, nothing else."""
    if not isinstance(text, str) or not isinstance(encoding, str) or encoding.lower().replace("_", "-") not in (
            "latin1", "latin-1", "iso-8859-1", "utf-8", "utf8"):
        raise UnsafePickleError("pickle called _codecs.encode with other than (str, latin1); refusing it")
    return text.encode(encoding)


#: The only globals a CIFAR batch may reference, mapped to what we hand back. The module path of
#: ``_reconstruct`` moved from ``numpy.core`` (numpy 1, and the official files) to ``numpy._core``
#: (numpy 2); both names denote the same function. Nothing is ever imported by name from the pickle.
_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[..., Any] | type] = {
    ("numpy.core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _safe_dtype,
    ("_codecs", "encode"): _safe_codecs_encode,  # bytes in a protocol-2 pickle written by Python 3
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"global {module}.{name} is not allowed") from None


def read_cifar_batch(path: PathLike) -> dict[str, Any]:
    """Read one official CIFAR-10 python batch without trusting pickle; keys are returned as ``str``.

    A pickle can call any importable function while loading, so only the globals of
    :data:`_ALLOWED_GLOBALS` resolve; any other (protocol-5 re-saves' ``_frombuffer`` included) raises
    :class:`UnsafePickleError`.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            obj = _RestrictedUnpickler(fh, encoding="bytes").load()
    except UnsafePickleError as exc:
        raise UnsafePickleError(
            f"{path}: {exc}; refusing to unpickle it (only numpy array reconstruction is allowed) -- "
            "use the official CIFAR-10 python batches"
        ) from None
    except OSError as exc:
        raise ValueError(f"cannot read CIFAR-10 batch {path} ({exc.strerror or exc}); check the file") from None
    except Exception as exc:  # truncated / not a pickle
        raise ValueError(
            f"{path} is not a valid CIFAR-10 python batch ({type(exc).__name__}); "
            "re-extract the official archive"
        ) from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not a CIFAR-10 batch (expected a dict, got {type(obj).__name__})")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def cifar10_source(root: PathLike, train: bool) -> ArraySource:
    """CIFAR-10 from the official ``cifar-10-batches-py`` folder: ``data_batch_1..5`` (``train``) or
    ``test_batch``, in memory as ``uint8`` ``(N, 32, 32, 3)``; class names from ``batches.meta`` if present."""
    root = Path(root)
    files = CIFAR10_TRAIN_FILES if train else CIFAR10_TEST_FILES
    expected = (*CIFAR10_TRAIN_FILES, *CIFAR10_TEST_FILES, CIFAR10_META_FILE)
    missing = [f for f in files if not (root / f).is_file()]
    if not root.is_dir() or missing:
        what = f"folder {root} does not exist" if not root.is_dir() else f"{root} lacks {', '.join(missing)}"
        raise ValueError(
            f"CIFAR-10: {what}; expected {', '.join(expected)} -- download CIFAR-10 python version "
            f"and extract to {root}"
        )
    class_names = [str(k) for k in range(10)]
    meta_path = root / CIFAR10_META_FILE
    if meta_path.is_file():
        meta = read_cifar_batch(meta_path)
        names_raw = meta.get("label_names")
        if not isinstance(names_raw, list) or len(names_raw) != 10:
            raise ValueError(f"{meta_path} has no list of 10 label_names; re-extract the official archive")
        class_names = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in names_raw]

    images, classes, names = [], [], []
    for f in files:
        batch = read_cifar_batch(root / f)
        data, labels = batch.get("data"), batch.get("labels")
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise ValueError(f"{root / f}: 'data' must be a uint8 array of shape (N, 3072), got {got}")
        if not isinstance(labels, list) or len(labels) != len(data) or not all(isinstance(v, int) for v in labels):
            raise ValueError(f"{root / f}: 'labels' must be a list of {len(data)} ints")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        classes.extend(labels)
        names.extend(f"{f}[{r}]" for r in range(len(data)))
    cls = np.asarray(classes, dtype=np.int64)
    if cls.size == 0:
        raise ValueError(f"CIFAR-10 batches in {root} hold no images; re-extract the official archive")
    if cls.min() < 0 or cls.max() > 9:
        raise ValueError(f"CIFAR-10 labels in {root} must lie in 0..9, got {cls.min()}..{cls.max()}")
    src = ArraySource(np.ascontiguousarray(np.concatenate(images)), one_hot(cls, 10), names, class_names)
    _require_every_class(src.labels, class_names, f"CIFAR-10 {'train' if train else 'test'} batches in {root}")
    return src


def image_folder_source(root: PathLike) -> FileSource:
    """One sub-folder per class (``root/<class>/**/<image>``, :data:`IMAGE_EXTENSIONS`, hidden files
    ignored), sorted by class then path."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"image folder {root} does not exist; point root at a folder with one sub-folder per class")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise ValueError(f"image folder {root} has no class sub-folders; put images in {root}/<class>/")
    paths: list[str] = []
    classes: list[int] = []
    empty: list[str] = []
    for k, d in enumerate(class_dirs):
        files = sorted(
            (p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
             and not any(part.startswith(".") for part in p.relative_to(d).parts)),
            key=lambda p: p.relative_to(d).as_posix(),
        )
        if not files:
            empty.append(d.name)
        paths.extend(str(p) for p in files)
        classes.extend([k] * len(files))
    if not paths:
        raise ValueError(
            f"image folder {root} has no images ({'/'.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)}); "
            "add images under its class sub-folders"
        )
    if empty:
        raise ValueError(
            f"image folder {root}: class folder(s) {empty[:5]} have no images; add images or remove the folder(s)"
        )
    return FileSource(paths, one_hot(np.asarray(classes), len(class_dirs)), [d.name for d in class_dirs])


def list_file_source(root: PathLike, list_file: PathLike, num_classes: int | None = None) -> FileSource:
    """Images named in a list file, one per line: ``relative/path.jpg 0 1 0 ...`` (path under ``root``,
    no whitespace; then the 0/1 labels, the same width on every line, ``num_classes`` when given).
    A relative ``list_file`` is looked up under ``root``; blank lines are skipped."""
    root = Path(root)
    lf = Path(list_file)
    if not lf.is_absolute():
        lf = root / lf
    if not lf.is_file():
        raise ValueError(f"list file {lf} does not exist; put it under {root} or give its path")
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    paths: list[str] = []
    rows: list[list[int]] = []
    width = num_classes
    first_line = None
    with open(lf, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            tokens = line.split()
            if not tokens:
                continue
            rel, vals = tokens[0], tokens[1:]
            if width is None:
                width, first_line = len(vals), lineno
            if len(vals) != width or width == 0:
                ref = f"num_classes={num_classes}" if num_classes is not None else f"line {first_line} has {width}"
                raise ValueError(
                    f"{lf}:{lineno}: {len(vals)} label values but {ref}; every line needs "
                    "'path' followed by the same number of 0/1 labels"
                )
            try:
                row = [int(float(v)) for v in vals]
            except ValueError:
                raise ValueError(f"{lf}:{lineno}: labels must be 0/1 numbers, got {' '.join(vals[:8])}") from None
            if any(v not in (0, 1) for v in row):
                raise ValueError(f"{lf}:{lineno}: labels must be 0 or 1, got {' '.join(vals[:8])}")
            p = Path(rel)
            paths.append(str(p if p.is_absolute() else root / p))
            rows.append(row)
    if not paths:
        raise ValueError(f"list file {lf} names no images; expected lines 'relative/path.jpg 0 1 0 ...'")
    return FileSource(paths, np.asarray(rows, dtype=np.float32))
