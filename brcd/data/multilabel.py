"""A multi-label list-file dataset made from real digits, in the NUS-WIDE / MS-COCO file format.

Nothing can be downloaded here, yet multi-label retrieval (relevant = sharing a label) behaves
differently from single-label retrieval. :func:`write_multilabel_digits` composes scikit-learn's 8x8
digits into 32 x 32 images of 1 or 2 digits (left and right 16 px slots, at a random height) and
writes PNG files plus ``train.txt`` / ``test.txt`` / ``database.txt`` that ``data.source: list`` reads::

    brcd data multilabel-digits --output data/mldigits
    brcd demo -c demo_multilabel --output runs/multilabel

The queries' digits are other handwritten instances than the database's; train is a database subset.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from brcd.data.sources import digits_source
from brcd.io import PathLike, atomic_path

SIZE, SLOTS, GLYPH = 32, 2, 16  # a 32 x 32 image: two 16 px wide slots, each holding at most one 16 px digit


def _digit_pool() -> tuple[np.ndarray, np.ndarray]:
    src = digits_source()
    return src.images[..., 0], src.labels.argmax(axis=1)


def _compose(rng: np.random.Generator, glyphs: np.ndarray, targets: np.ndarray, pool: np.ndarray,
             max_digits: int) -> tuple[np.ndarray, np.ndarray]:
    canvas = np.zeros((SIZE, SIZE), dtype=np.uint8)
    labels = np.zeros(10, dtype=np.int64)
    k = int(rng.integers(1, max_digits + 1))
    for slot in rng.choice(SLOTS, size=k, replace=False):
        i = int(rng.choice(pool))
        g = np.asarray(Image.fromarray(glyphs[i]).resize((GLYPH, GLYPH), Image.Resampling.BILINEAR))
        y, x = int(rng.integers(0, SIZE - GLYPH + 1)), int(slot) * (SIZE // SLOTS)
        canvas[y:y + GLYPH, x:x + GLYPH] = g
        labels[targets[i]] = 1
    return canvas, labels


def write_multilabel_digits(root: PathLike, *, database: int = 1500, query: int = 250, train: int = 1000,
                            max_digits: int = 2, seed: int = 0) -> Path:
    """Write the dataset under ``root`` (created) and return it. ``train`` images are drawn from the
    database list; the queries use other digit instances than the database (held out)."""
    for name, v in (("database", database), ("query", query), ("train", train), ("max_digits", max_digits)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if train > database:
        raise ValueError(f"train ({train}) is drawn from the database and cannot exceed it ({database})")
    if max_digits > SLOTS:
        raise ValueError(f"max_digits must be <= {SLOTS} (one digit per slot), got {max_digits}")
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    glyphs, targets = _digit_pool()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(targets))
    held_out = order[: len(order) // 4]  # query glyphs: a quarter of the instances, never in the database
    db_pool = order[len(order) // 4:]
    lines: dict[str, list[str]] = {"database": [], "query": []}
    for part, n, pool in (("database", database, db_pool), ("query", query, held_out)):
        for j in range(n):
            img, lab = _compose(rng, glyphs, targets, pool, max_digits)
            rel = f"images/{part}_{j:05d}.png"
            with atomic_path(root / rel) as tmp:
                Image.fromarray(img).convert("RGB").save(tmp, format="PNG")
            lines[part].append(rel + " " + " ".join(map(str, lab)))
    lines["train"] = [lines["database"][i] for i in sorted(rng.choice(database, size=train, replace=False))]
    for part, fname in (("train", "train.txt"), ("query", "test.txt"), ("database", "database.txt")):
        with atomic_path(root / fname) as tmp:
            Path(tmp).write_text("\n".join(lines[part]) + "\n", encoding="utf-8")
    return root
