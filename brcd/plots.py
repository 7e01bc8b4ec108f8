"""Every figure the project draws (clusters, evaluate, ``brcd compare``, ``brcd crossmodal``), written
atomically as PNG by :func:`save_figure`; matplotlib's object API on the Agg canvas (no pyplot state, no display).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from brcd.search.flat import HammingIndex
from brcd.io import PathLike, atomic_path

__all__ = [
    "save_figure", "plot_k_selection", "plot_bit_masks", "plot_precision_recall", "retrieval_grid", "plot_retrieval_grid",
    "render_retrieval_grid", "plot_compare", "plot_nested_vs_separate", "plot_crossmodal",
]

RIGHT = "#2ca02c"
WRONG = "#d62728"
QUERY = "#1f77b4"
GRID_QUERIES = 8
GRID_TOP_K = 8


def _figure(figsize: tuple[float, float]) -> Any:
    """A matplotlib ``Figure`` on its own Agg canvas (no pyplot global state, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: PathLike, *, dpi: int = 100) -> Path:
    """Lay out a matplotlib ``Figure`` (tight) and write it to ``path`` as PNG, atomically; returns ``path``."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return Path(path)


def plot_k_selection(result: dict[str, Any], path: PathLike) -> Path:
    """Save a two-panel PNG (inertia elbow | silhouette, the suggested K marked) of a :func:`choose_k` result."""
    try:
        ks = [int(k) for k in result["k"]]
        inertia = [float(v) for v in result["inertia"]]
        sil = [float("nan") if v is None else float(v) for v in result["silhouette"]]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"result must be the dict returned by choose_k ({exc!r} missing or malformed)") from None
    if not (len(ks) == len(inertia) == len(sil)) or not ks:
        raise ValueError("result lists k / inertia / silhouette must be non-empty and of equal length; pass choose_k's output")
    fig = _figure(figsize=(10, 4))
    ax1, ax2 = fig.subplots(1, 2)
    for ax, ys, color, ylabel, name in ((ax1, inertia, None, "inertia (sum of squared distances)", "Elbow"),
                                        (ax2, sil, "tab:orange", "silhouette score", "Silhouette")):
        ax.plot(ks, ys, "o-", color=color)
        ax.set(xlabel="number of clusters K", ylabel=ylabel, title=name)
        ax.grid(alpha=0.3)
    best = result.get("suggested_k")
    if best is not None and best in ks:
        ax2.axvline(best, color="tab:red", linestyle="--", label=f"suggested K = {best}")
        ax2.legend(loc="best")
    for ax in (ax1, ax2):
        ax.set_xticks(ks if len(ks) <= 25 else ks[:: max(1, len(ks) // 25)])
    return save_figure(fig, path, dpi=110)


def plot_bit_masks(masks: Any, path: PathLike) -> Path:
    """Save a clusters x bits heatmap of 0/1 masks as PNG (kept bits dark; row labels count them)."""
    m = np.asarray(masks.detach().cpu() if hasattr(masks, "detach") else masks)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"masks must be a non-empty 2-D array (clusters, bits), got shape {m.shape}")
    m = m.astype(np.float32)
    k, bits = m.shape
    fig = _figure(figsize=(max(6.0, min(20.0, 0.12 * bits + 2)), max(2.5, min(16.0, 0.3 * k + 1.5))))
    ax = fig.subplots()
    ax.imshow(m, cmap="Greys", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    kept = m.sum(axis=1)
    if k <= 60:
        ax.set_yticks(range(k))
        ax.set_yticklabels([f"{c} ({int(kept[c])})" for c in range(k)], fontsize=7)
    ax.set(xlabel="bit", ylabel="cluster (kept bits)",
           title=f"Bit masks (black = kept): {k} clusters x {bits} bits, mean kept {kept.mean():.1f}")
    return save_figure(fig, path, dpi=110)


def plot_precision_recall(curves: Mapping[str, Mapping[str, np.ndarray]], path: PathLike) -> Path:
    """Precision vs recall and both vs Hamming radius of ``name -> precision_recall_by_radius(...)``, as PNG."""
    if not curves:
        raise ValueError("curves is empty; pass {name: precision_recall_by_radius(...)}")
    fig = _figure(figsize=(10, 4))
    ax_pr, ax_r = fig.subplots(1, 2)
    for name, c in curves.items():
        missing = {"radius", "precision", "recall"} - set(c)
        if missing:
            raise ValueError(f"curve {name!r} lacks {sorted(missing)}; pass the dict from precision_recall_by_radius")
        radius, prec, rec = (np.asarray(c[key], dtype=np.float64) for key in ("radius", "precision", "recall"))
        if not (radius.shape == prec.shape == rec.shape) or radius.ndim != 1:
            raise ValueError(f"curve {name!r}: radius, precision and recall must be 1-D arrays of equal length")
        ok = np.isfinite(prec) & np.isfinite(rec)
        ax_pr.plot(rec[ok], prec[ok], marker=".", label=str(name))
        (line,) = ax_r.plot(radius, prec, label=f"{name} precision")
        ax_r.plot(radius, rec, linestyle="--", color=line.get_color(), label=f"{name} recall")
    ax_pr.set(xlabel="recall", ylabel="precision", title="precision-recall (Hamming radius)")
    ax_pr.set(xlim=(0, 1.02), ylim=(0, 1.02))
    ax_r.set(xlabel="Hamming radius", ylabel="value", title="by radius", ylim=(0, 1.02))
    for ax in (ax_pr, ax_r):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def retrieval_grid(query_codes: np.ndarray, db_codes: np.ndarray, query_labels: np.ndarray,
                   db_labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``k`` database positions of every query by Hamming distance (ties: smaller position).

    Codes: {-1,+1} (N, L); labels: multi-hot (N, C). Returns ``(positions int64, distances int32,
    relevant bool)``, each (nq, k); missing hits are position ``-1``, distance ``int32 max``, not relevant.
    """
    query_codes, db_codes = np.asarray(query_codes), np.asarray(db_codes)
    if query_codes.ndim != 2 or db_codes.ndim != 2 or query_codes.shape[1] != db_codes.shape[1]:
        raise ValueError(f"query codes {query_codes.shape} and database codes {db_codes.shape} must be (N, L) arrays "
                         "of the same code length")
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


def plot_retrieval_grid(query_images: Sequence[Any], query_codes: np.ndarray, db_codes: np.ndarray,
                        query_labels: np.ndarray, db_labels: np.ndarray, db_image: Callable[[int], Any] | Sequence[Any],
                        path: PathLike, *, k: int = 8, title: str | None = None,
                        class_names: Sequence[str] | None = None) -> Path:
    """Save a PNG grid, one row per query (blue frame, labelled with its precision@k), then its top-``k``
    Hamming hits framed green (shares a label) or red, with their distance.

    ``query_images``: PIL images or uint8 (H, W, 3) arrays; ``db_image``: the database image at a
    position (callable or sequence: only the shown hits are loaded).
    """
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
    fig = _figure(figsize=(1.15 * cols + 0.6, 1.3 * nq + (0.5 if title else 0.2)))
    axes = np.asarray(fig.subplots(nq, cols, squeeze=False))

    def show(ax, image, color: str, text: str) -> None:
        ax.imshow(_as_rgb(image), interpolation="nearest")
        ax.set(xticks=[], yticks=[])
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
    return save_figure(fig, path)


def render_retrieval_grid(cfg: Any, bundle: Any, layout: Any, path: PathLike | None = None, *,
                          queries: int = GRID_QUERIES, k: int = GRID_TOP_K,
                          student_dir: str | os.PathLike | None = None) -> Path | None:
    """``retrieval_grid.png`` of a finished run: ``queries`` evenly spaced query images encoded by the
    student's best asymmetric checkpoint against the teacher's database codes; ``None`` when either is missing."""
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


def plot_compare(summary: Sequence[Mapping[str, Any]], path: PathLike, *, title: str = "", teacher: str = "teacher",
                 baseline: tuple[str, float] | None = None) -> Path:
    """``brcd compare``'s figure: symmetric / asymmetric mAP bars (± std) per student method of
    ``summarise``'s rows; the ``teacher`` row dashed and ``baseline`` (label, mAP) dotted."""
    students = [s for s in summary if s["method"] != teacher]
    ref = next((s for s in summary if s["method"] == teacher), None)
    fig = _figure(figsize=(max(6.0, 0.75 * len(students) + 2), 4.5))
    ax = fig.subplots()
    x = np.arange(len(students))
    w = 0.38
    for off, key, label in ((-w / 2, "map_symmetric", "symmetric"), (w / 2, "map_asymmetric", "asymmetric")):
        ax.bar(x + off, [s[key]["mean"] for s in students], w, yerr=[s[key]["std"] for s in students],
               capsize=3, label=label)
    if ref is not None:
        ax.axhline(ref["map_symmetric"]["mean"], color="black", linestyle="--", linewidth=1, label="teacher")
    lines = [ref["map_symmetric"]["mean"]] if ref is not None else []
    if baseline is not None:
        ax.axhline(baseline[1], color="tab:red", linestyle=":", linewidth=1.5, label=baseline[0])
        lines.append(baseline[1])
    bars = [s[k] for s in students for k in ("map_symmetric", "map_asymmetric")]
    if bars or lines:
        lo = min([b["mean"] - b["std"] for b in bars] + lines)
        hi = max([b["mean"] + b["std"] for b in bars] + lines)
        pad = max(0.02, 0.1 * (hi - lo))
        ax.set_ylim(max(0.0, lo - pad), min(1.0, hi + pad))
    ax.set_xticks(x, [s["method"] for s in students], rotation=40, ha="right", fontsize=8)
    ax.set(ylabel="mAP", title=title or "brcd compare")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_nested_vs_separate(report: Mapping[str, Any], path: PathLike, *, title: str = "", teacher: str = "teacher") -> Path:
    """``brcd compare --separate``'s figure of ``nested_vs_separate``'s report: mAP (± std) vs code length
    per paradigm; per method the nested student solid, the separate ones dashed."""
    lengths = report["lengths"]
    fig = _figure(figsize=(10, 4.2))
    axes = fig.subplots(1, 2, sharey=True)
    methods = list(dict.fromkeys(e["method"] for e in report["quality"]))
    colors = {m: ("black" if m == teacher else f"C{i}") for i, m in enumerate(methods)}
    for ax, paradigm in zip(axes, ("symmetric", "asymmetric")):
        for m in methods:
            es = [e for e in report["quality"] if e["method"] == m]
            for kind, style in (("nested", "-o"), ("separate", "--s")):
                pts = [(e["bits"], e[kind][paradigm]) for e in es if kind in e]
                if pts:
                    ax.errorbar([b for b, _ in pts], [s["mean"] for _, s in pts], yerr=[s["std"] for _, s in pts],
                                fmt=style, color=colors[m], capsize=3, label=f"{m} ({kind})", markersize=4)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(b) for b in lengths])
        ax.set(xlabel="bits", title=paradigm)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mAP")
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle(title or "nested vs separate")
    return save_figure(fig, path)


CROSSMODAL_TASKS = (("i2t", "I→T"), ("t2i", "T→I"), ("i2i", "I→I"), ("t2t", "T→T"))
CROSSMODAL_COLORS = {"teacher": "#7f7f7f", "student": "#1f77b4", "student_no_teacher": "#ff7f0e"}


def plot_crossmodal(summary: Mapping[str, Any], histories: Mapping[str, Sequence[Mapping[str, float]]],
                    path: PathLike, *, title: str = "") -> Path:
    """``brcd crossmodal``'s figure: mAP (± std over seeds) of each task per model, and each student's
    objective J after every DCC update, per round (``histories``: stage -> one seed's history)."""
    fig = _figure(figsize=(11, 4.2))
    ax, curve = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    order = ("teacher", "student", "student_no_teacher")
    models = sorted(summary["maps"], key=lambda m: order.index(m) if m in order else len(order))
    x = np.arange(len(CROSSMODAL_TASKS))
    w = 0.8 / max(len(models), 1)
    for i, model in enumerate(models):
        maps = summary["maps"][model]
        ax.bar(x + (i - (len(models) - 1) / 2) * w, [maps[t]["mean"] for t, _ in CROSSMODAL_TASKS], w,
               yerr=[maps[t]["std"] for t, _ in CROSSMODAL_TASKS], capsize=3, label=model.replace("_", " "),
               color=CROSSMODAL_COLORS.get(model))
    ax.set_xticks(x, [name for _, name in CROSSMODAL_TASKS])
    ax.set(ylabel=f"mAP@{summary.get('topk') or 'all'}", ylim=(0, 1), title=title or f"seeds {summary.get('seeds')}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    for stage, history in histories.items():
        rounds = [h["round"] for h in history if "objective_after_dcc" in h]
        if rounds:
            curve.plot(rounds, [h["objective_after_dcc"] for h in history if "objective_after_dcc" in h],
                       marker="o", markersize=3, label=stage.replace("_", " "), color=CROSSMODAL_COLORS.get(stage))
    from matplotlib.ticker import MaxNLocator

    curve.set_yscale("log")
    curve.xaxis.set_major_locator(MaxNLocator(integer=True))
    curve.set(xlabel="round (SGD on f, g; then DCC on B)", ylabel="objective J after DCC")
    curve.grid(alpha=0.3)
    if curve.lines:
        curve.legend(fontsize=8)
    return save_figure(fig, path)
