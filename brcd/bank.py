"""The view bank: frozen networks paid once per image and view (docs/BANK.md).

View ``a`` of training image ``i`` is ``augment(image_i)`` under the torch seed :func:`view_seed`
``(seed, i, a)``, so any view can be regenerated exactly; row ``i * A + a`` of each entry
(:data:`ENTRIES`) holds what a frozen network makes of it. Training draws two distinct views per image
and epoch (:func:`view_pairs`, a pure function of ``(seed, epoch, position)``, hence resumable).
The on-disk format is :mod:`brcd.shards`'; building at scale is :mod:`pipelines.ray.batch_inference`'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from brcd.models.nets import HashOutput, hash_output

ENTRIES = ("teacher_features", "teacher_logits", "student_features")

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a fast, well-mixed bijection of uint64 (vectorised)."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


def mix(*parts: Any) -> np.ndarray:
    """A deterministic 64-bit hash of integers / integer arrays (broadcast), platform independent."""
    out = np.zeros(np.broadcast_shapes(*(np.shape(p) for p in parts)), dtype=np.uint64)
    for p in parts:
        out = _splitmix(out ^ np.asarray(p, dtype=np.int64).astype(np.uint64))
    return out


def view_seed(seed: int, position: int, view: int) -> int:
    """The torch seed of view ``view`` of training image ``position`` (63 bits)."""
    return int(mix(seed, position, view) >> np.uint64(1))


def _check_views(num_views: int) -> int:
    if num_views < 2:
        raise ValueError(f"bank.views must be >= 2 (two distinct views per step), got {num_views}")
    return int(num_views)


def view_pairs(seed: int, epoch: int, positions: np.ndarray | Sequence[int], num_views: int) -> np.ndarray:
    """``(n, 2)`` int64: the two distinct views each image is trained on in ``epoch``."""
    _check_views(num_views)
    pos = np.asarray(positions, dtype=np.int64)
    h = mix(seed, epoch, pos, 0x5EED)
    first = (h % np.uint64(num_views)).astype(np.int64)
    step = 1 + ((h >> np.uint64(32)) % np.uint64(num_views - 1)).astype(np.int64)
    return np.stack([first, (first + step) % num_views], axis=1)


def render_view(augment: Callable[[Any], torch.Tensor], image: Any, seed: int) -> torch.Tensor:
    """``augment(image)`` with torch's RNG seeded by ``seed``; the global RNG state is left as it was.
    (torchvision ``transforms.v2`` draws every random parameter from torch's generator.)"""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return augment(image)


class ViewRenderer:
    """Regenerates views: ``render(rows)`` -> the images of flat rows ``i * A + a``.

    ``image(position)`` returns a training image (e.g. ``TwoViewDataset.items.image``)."""

    def __init__(self, image: Callable[[int], Any], num_images: int, augment: Callable[[Any], torch.Tensor],
                 num_views: int, seed: int):
        self.image, self.num_images, self.augment = image, int(num_images), augment
        self.num_views, self.seed = _check_views(num_views), int(seed)

    def view(self, position: int, view: int) -> torch.Tensor:
        return render_view(self.augment, self.image(int(position)), view_seed(self.seed, int(position), int(view)))

    def render(self, rows: Sequence[int] | np.ndarray) -> torch.Tensor:
        rows = np.asarray(rows, dtype=np.int64)
        return torch.stack([self.view(r // self.num_views, r % self.num_views) for r in rows])


@torch.no_grad()
def bank_outputs(renderer: ViewRenderer, networks: Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
                 start: int, stop: int, *, batch_size: int = 64,
                 device: torch.device | str = "cpu") -> dict[str, np.ndarray]:
    """What the frozen ``networks`` (entry name -> images -> (B, D) tensor) make of flat rows
    ``[start, stop)``: ``{name: float32 (stop - start, D)}``. The build's unit of work."""
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in networks}
    for lo in range(start, stop, batch_size):
        images = renderer.render(range(lo, min(stop, lo + batch_size))).to(device)
        for name, net in networks.items():
            chunks[name].append(net(images).float().cpu().numpy())
    return {name: np.concatenate(c) if c else np.zeros((0, 0), np.float32) for name, c in chunks.items()}


def frozen_networks(role: str, *, teacher: Any = None, student: Any = None) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The bank entries of a stage and the functions that make them: ``role="teacher"`` (a frozen
    teacher backbone) or ``"distill"`` (the frozen teacher; the student backbone if frozen)."""
    if role == "teacher":
        if teacher is None or not teacher.freeze_backbone:
            return {}
        return {"teacher_features": teacher.eval().features}
    if role == "distill":
        nets: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
        if teacher is not None:
            teacher.eval()
            nets["teacher_logits"] = lambda x: teacher.head(teacher.features(x))
        if student is not None and student.freeze_backbone:
            nets["student_features"] = student.eval().features
        return nets
    raise ValueError(f"bank role must be 'teacher' or 'distill', got {role!r}")


class ViewBank:
    """Read side: ``columns`` maps an entry name to an array-like of flat rows (``np.ndarray``, a
    memory map, or a lazy sharded column with ``take(rows)``)."""

    def __init__(self, columns: Mapping[str, Any], num_views: int, num_images: int,
                 fingerprint: Mapping[str, Any] | None = None):
        self.columns = dict(columns)
        self.num_views, self.num_images = int(num_views), int(num_images)
        self.fingerprint = dict(fingerprint or {})
        for name, col in self.columns.items():
            if name not in ENTRIES:
                raise ValueError(f"unknown bank entry {name!r}; the bank stores {', '.join(ENTRIES)}")
            if len(col) != self.num_views * self.num_images:
                raise ValueError(f"bank entry {name} has {len(col)} rows, expected {self.num_images} images x "
                                 f"{self.num_views} views; rebuild the bank")

    def __contains__(self, name: str) -> bool:
        return name in self.columns

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(col.shape)) * np.dtype(col.dtype).itemsize for col in self.columns.values())

    def take(self, name: str, positions: torch.Tensor | np.ndarray, views: torch.Tensor | np.ndarray) -> torch.Tensor:
        """float32 ``(n, D)``: entry ``name`` of view ``views[j]`` of image ``positions[j]``."""
        if name not in self.columns:
            raise KeyError(f"the bank has no {name!r} (it holds {', '.join(self.columns) or 'nothing'}); "
                           "rebuild it for this stage")
        pos = np.asarray(positions, dtype=np.int64)
        v = np.asarray(views, dtype=np.int64)
        rows = pos * self.num_views + v
        col = self.columns[name]
        data = col.take(rows) if hasattr(col, "take") and not isinstance(col, np.ndarray) else np.asarray(col[rows])
        return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))

    def teacher_output(self, positions, views) -> HashOutput:
        """The frozen teacher's output of those views, as a live forward returns it (no gradient)."""
        return hash_output(self.take("teacher_logits", positions, views))


class BankViews(Dataset):
    """The bank's training dataset: item ``pos`` -> ``(pos, a1, a2)``, or with ``renderer`` (a
    trainable network sees the views live) ``(view_a1, view_a2, pos, a1, a2)``. The pair
    ``(a1, a2)`` is :func:`view_pairs` of the epoch set by :meth:`set_epoch`."""

    def __init__(self, num_images: int, num_views: int, seed: int, renderer: ViewRenderer | None = None):
        self.num_images, self.num_views, self.seed = int(num_images), _check_views(num_views), int(seed)
        self.renderer = renderer
        self.epoch = 0
        if renderer is not None and (renderer.num_images, renderer.num_views) != (self.num_images, self.num_views):
            raise ValueError("the renderer's images / views differ from the bank's")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, pos: int):
        a1, a2 = (int(x) for x in view_pairs(self.seed, self.epoch, [pos], self.num_views)[0])
        if self.renderer is None:
            return int(pos), a1, a2
        return self.renderer.view(pos, a1), self.renderer.view(pos, a2), int(pos), a1, a2


@dataclass(frozen=True)
class BankSummary:
    """What a run says once about its bank."""

    entries: tuple[str, ...]
    num_images: int
    num_views: int
    nbytes: int
    build_seconds: float | None = None

    def line(self, role: str) -> str:
        built = "reused" if self.build_seconds is None else f"built in {self.build_seconds:.1f} s"
        return (f"[{role}] view bank: {self.num_images} images x {self.num_views} views of "
                f"{', '.join(self.entries)} ({self.nbytes / 2**20:.1f} MiB, {built}); the frozen networks "
                "are not run during training")


def bank_rows_per_shard(num_views: int, target_rows: int = 4096) -> int:
    """Shards hold whole images (a multiple of ``A`` rows), about ``target_rows`` rows each."""
    return max(1, math.ceil(target_rows / num_views)) * num_views
