"""Figures for reports: the retrieval grid (queries and their top Hamming hits).

Uses matplotlib's object API with the Agg canvas (no pyplot global state, no display), like the
other plots of the package (``brcd.clustering.plot_bit_masks``, ``brcd.evaluation.plot_precision_recall``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from brcd.index import HammingIndex
from brcd.io import PathLike, atomic_path

__all__ = ["retrieval_grid", "plot_retrieval_grid", "render_retrieval_grid"]

RIGHT = "#2ca02c"
WRONG = "#d62728"
QUERY = "#1f77b4"
GRID_QUERIES = 8
GRID_TOP_K = 8


def retrieval_grid(query_codes: np.ndarray, db_codes: np.ndarray, query_labels: np.ndarray,
                   db_labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``k`` database positions of every query by Hamming distance (ties: smaller position).

    Codes are {-1,+1} arrays (N, L); labels are multi-hot (N, C) (a hit is relevant when it shares
    a label with the query). Returns ``(positions int64 (nq, k), distances int32 (nq, k),
    relevant bool (nq, k))``; with fewer than ``k`` database items the extra columns hold position
    ``-1``, distance ``int32 max`` and ``relevant=False``.
    """
    query_codes, db_codes = np.asarray(query_codes), np.asarray(db_codes)
    if query_codes.ndim != 2 or db_codes.ndim != 2 or query_codes.shape[1] != db_codes.shape[1]:
        raise ValueError(
            f"query codes {query_codes.shape} and database codes {db_codes.shape} must be (N, L) arrays of the "
            "same code length"
        )
    q_labels = np.asarray(query_labels).reshape(len(query_codes), -1).astype(bool)
    d_labels = np.asarray(db_labels).reshape(len(db_codes), -1).astype(bool)
    if q_labels.shape[1] != d_labels.shape[1]:
        raise ValueError(f"query labels have {q_labels.shape[1]} classes, database labels {d_labels.shape[1]}")
    index = HammingIndex(int(db_codes.shape[1]), engine="numpy")
    index.add(db_codes)  # ids = positions 0..N-1
    dist, pos = index.search(query_codes, k)
    hit = pos >= 0
    relevant = np.zeros(pos.shape, dtype=bool)
    rows = np.nonzero(hit)
    relevant[rows] = (q_labels[rows[0]] & d_labels[pos[rows]]).any(axis=1)
    return pos, dist, relevant


def _as_rgb(image: Any) -> np.ndarray:
    if hasattr(image, "convert"):  # PIL
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[2] not in (1, 3, 4):  # CHW
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise ValueError(f"an image must be (H, W, 3) or a PIL image, got shape {arr.shape}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8) if arr.max(initial=0) > 1.0 else (np.clip(arr, 0, 1) * 255).astype(np.uint8)
    return arr[:, :, :3]


def plot_retrieval_grid(
    query_images: Sequence[Any],
    query_codes: np.ndarray,
    db_codes: np.ndarray,
    query_labels: np.ndarray,
    db_labels: np.ndarray,
    db_image: Callable[[int], Any] | Sequence[Any],
    path: PathLike,
    *,
    k: int = 8,
    title: str | None = None,
    class_names: Sequence[str] | None = None,
) -> Path:
    """Save a PNG grid, one row per query: the query (blue frame) then its top-``k`` database hits
    by Hamming distance, each framed green (shares a label with the query) or red (wrong hit), with
    its distance above it; each row is labelled with its precision@k. Written atomically.

    ``query_images``: PIL images or uint8 (H, W, 3) arrays, one per row of ``query_codes``.
    ``db_image``: the database image at a position (a callable or a sequence), so only the shown
    hits are loaded. ``class_names`` (optional) names label columns in the captions.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    nq = len(query_images)
    if nq == 0 or nq != len(query_codes):
        raise ValueError(f"need one code per query image and at least one query, got {nq} images and "
                         f"{len(query_codes)} codes")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    pos, dist, relevant = retrieval_grid(query_codes, db_codes, query_labels, db_labels, int(k))
    load = db_image if callable(db_image) else db_image.__getitem__
    q_labels = np.asarray(query_labels).reshape(nq, -1).astype(bool)
    d_labels = np.asarray(db_labels).reshape(len(db_codes), -1).astype(bool)

    def caption(labels: np.ndarray) -> str:
        names = [class_names[c] if class_names is not None and c < len(class_names) else str(c)
                 for c in np.flatnonzero(labels)[:3]]
        return ",".join(names)

    cols = int(k) + 1
    fig = Figure(figsize=(1.15 * cols + 0.6, 1.3 * nq + (0.5 if title else 0.2)))
    FigureCanvasAgg(fig)
    axes = np.asarray(fig.subplots(nq, cols, squeeze=False))

    def show(ax, image, color: str, text: str) -> None:
        ax.imshow(_as_rgb(image), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_edgecolor(color)
            spine.set_linewidth(3.0)
        ax.set_title(text, fontsize=7, color=color, pad=2)

    for r in range(nq):
        show(axes[r, 0], query_images[r], QUERY, f"query [{caption(q_labels[r])}]")
        shown = pos[r] >= 0
        p_at_k = relevant[r][shown].mean() if shown.any() else float("nan")
        axes[r, 0].set_ylabel(f"P@{int(shown.sum())}={p_at_k:.2f}", fontsize=7)
        for c in range(int(k)):
            ax = axes[r, c + 1]
            if pos[r, c] < 0:
                ax.set_axis_off()
                continue
            ok = bool(relevant[r, c])
            text = f"d={int(dist[r, c])}" + ("" if ok else f" [{caption(d_labels[pos[r, c]])}]")
            show(ax, load(int(pos[r, c])), RIGHT if ok else WRONG, text)
    fig.suptitle(title or f"Top-{int(k)} Hamming retrieval (green: shares a label with the query, red: wrong)",
                 fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return Path(path)


def render_retrieval_grid(cfg: Any, bundle: Any, layout: Any, path: PathLike | None = None, *,
                          queries: int = GRID_QUERIES, k: int = GRID_TOP_K,
                          student_dir: str | os.PathLike | None = None) -> Path | None:
    """``retrieval_grid.png`` of a finished run (``layout``: its :class:`brcd.layout.RunLayout`,
    ``bundle``: its data): ``queries`` evenly spaced query images, encoded by the student's best
    asymmetric checkpoint, against the teacher's database codes (asymmetric paradigm, nothing
    re-encoded). Returns ``None`` when the student or the teacher codes are not there."""
    import torch

    from brcd import builders
    from brcd.data.transforms import eval_transform
    from brcd.io import load_arrays

    weights = layout.student_weights("map_asymmetric", student_dir)
    codes_file = layout.teacher_codes
    if not weights.exists() or not codes_file.exists():
        return None
    db_codes = load_arrays(codes_file)["database"]
    q_index = bundle.split.indices("query")
    db_index = bundle.split.indices("database")
    n = min(int(queries), len(q_index))
    picks = np.unique(np.linspace(0, len(q_index) - 1, n).round().astype(int))
    images = [bundle.source.load(int(q_index[p])) for p in picks]
    torch.manual_seed(cfg.seed)
    model = builders.build_model(cfg.student.model, weights).eval()
    bits = int(db_codes.shape[1])
    if bits not in model.bits:
        return None
    tf = eval_transform(cfg.data.image_size, bundle.resize_then_crop)
    with torch.no_grad():
        q_codes = model.encode(torch.stack([tf(im) for im in images]), bits=bits).numpy()
    out = Path(path) if path is not None else layout.retrieval_grid_png
    return plot_retrieval_grid(
        images, q_codes, db_codes, bundle.labels("query")[picks], bundle.labels("database"),
        lambda pos: bundle.source.load(int(db_index[pos])), out, k=k,
        class_names=getattr(bundle.source, "class_names", None),
        title=f"student queries -> teacher database codes (asymmetric), top-{k} by Hamming distance "
              "(red: wrong hit)",
    )
