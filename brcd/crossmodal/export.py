"""The cross-modal model folder: both encoders of a student and its database, no pickles.

    <folder>/crossmodal.json            spec: bits, widths, feature extractor, image size, tasks
    <folder>/image.safetensors          image hash head (+ the frozen timm extractor's weights, "extractor.*")
    <folder>/text.safetensors           text hash head
    <folder>/database.npz               B (the learned database codes, one per pair) and the
                                        database re-encoded per modality: image_codes = sign(f(x)),
                                        text_codes = sign(g(y)); ids = the database's item positions

:func:`load_crossmodal` reads it back; :func:`search` ranks a database for queries of either
modality (stable Hamming ranking, ties -> smaller database index): a text query against the image
database and back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from brcd import io
from brcd.crossmodal.nets import CrossModalEncoder, HashMLP, create_feature_extractor

__all__ = ["SPEC_JSON", "export_crossmodal", "load_crossmodal", "search", "DATABASES"]

SPEC_JSON, DATABASE_NPZ = "crossmodal.json", "database.npz"
DATABASES = {"pairs": "codes", "images": "image_codes", "texts": "text_codes"}
FORMAT = 1


def export_crossmodal(folder: str | Path, image_head: HashMLP, text_head: HashMLP, *, extractor: str, image_size: int,
                      database: dict[str, np.ndarray], tags: dict[str, Any] | None = None) -> Path:
    """Write the folder (see the module docstring). ``database`` has ``codes``, ``image_codes``,
    ``text_codes`` (int8 {-1, +1}) and ``ids``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    img_state = {f"head.{k}": v for k, v in image_head.state_dict().items()}
    if extractor != "pixels":
        ext, _ = create_feature_extractor(extractor, image_size, seed=0)
        img_state |= {f"extractor.{k}": v for k, v in ext.state_dict().items()}
    io.save_state_dict(folder / "image.safetensors", img_state)
    io.save_state_dict(folder / "text.safetensors", {f"head.{k}": v for k, v in text_head.state_dict().items()})
    io.save_arrays(folder / DATABASE_NPZ, **{k: np.asarray(v) for k, v in database.items()})
    lin_i, lin_t = image_head.net[0], text_head.net[0]
    spec = {"format": FORMAT, "kind": "brcd-crossmodal", "bits": int(image_head.net[2].out_features),
            "hidden_dim": int(lin_i.out_features), "image_in": int(lin_i.in_features), "text_in": int(lin_t.in_features),
            "extractor": extractor, "image_size": int(image_size), "database_size": int(len(database["codes"])),
            "tags": dict(tags or {})}
    io.save_json(folder / SPEC_JSON, spec)  # last: the folder is complete
    return folder


def _spec(folder: Path) -> dict[str, Any]:
    path = folder / SPEC_JSON
    if not path.is_file():
        raise ValueError(f"{folder} is not a cross-modal model folder (no {SPEC_JSON}); use the folder "
                         "`brcd crossmodal` exported (DIR/crossmodal/export) or a models:/ URI")
    spec = io.load_json(path)
    if spec.get("kind") != "brcd-crossmodal" or spec.get("format") != FORMAT:
        raise ValueError(f"{path} is not a format-{FORMAT} brcd cross-modal spec")
    return spec


def load_crossmodal(folder: str | Path) -> dict[str, Any]:
    """``{"spec", "image" (CrossModalEncoder on images), "text" (on tag vectors), "database" (arrays)}``."""
    folder = Path(folder)
    spec = _spec(folder)
    encoders = {}
    for side, width in (("image", spec["image_in"]), ("text", spec["text_in"])):
        state = io.load_state_dict(folder / f"{side}.safetensors")
        head = HashMLP(width, spec["bits"], spec["hidden_dim"])
        head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})
        extractor = None
        if side == "image":
            extractor, _ = create_feature_extractor(spec["extractor"], spec["image_size"], seed=0)
            if spec["extractor"] != "pixels":
                extractor.load_state_dict({k[10:]: v for k, v in state.items() if k.startswith("extractor.")})
        encoders[side] = CrossModalEncoder(head.eval(), extractor).eval()
    return {"spec": spec, **encoders, "database": io.load_arrays(folder / DATABASE_NPZ)}


def encode(model: dict[str, Any], *, images: np.ndarray | None = None, tags: np.ndarray | None = None) -> np.ndarray:
    """int8 {-1, +1} codes of (N, 3, H, W) images in [0, 1] or (N, V) tag vectors (exactly one)."""
    if (images is None) == (tags is None):
        raise ValueError("give exactly one of images and tags")
    spec = model["spec"]
    if tags is not None:
        tags = np.asarray(tags, dtype=np.float32)
        if tags.ndim != 2 or tags.shape[1] != spec["text_in"]:
            raise ValueError(f"tag vectors must be (N, {spec['text_in']}), got {tags.shape}")
        out = model["text"](torch.from_numpy(tags))
    else:
        images = np.asarray(images, dtype=np.float32)
        size = spec["image_size"]
        if images.ndim != 4 or images.shape[1:] != (3, size, size):
            raise ValueError(f"images must be (N, 3, {size}, {size}) in [0, 1], got {images.shape}")
        out = model["image"](torch.from_numpy(images))
    return out.numpy().astype(np.int8)


def search(query_codes: np.ndarray, database_codes: np.ndarray, topk: int) -> tuple[np.ndarray, np.ndarray]:
    """``(positions, distances)`` (Q, k) of the k nearest database codes by Hamming distance,
    ties -> smaller database position."""
    q = np.asarray(query_codes, dtype=np.int32)
    d = np.asarray(database_codes, dtype=np.int32)
    if q.ndim != 2 or d.ndim != 2 or q.shape[1] != d.shape[1]:
        raise ValueError(f"query codes {q.shape} and database codes {d.shape} must have the same bits")
    dist = (q.shape[1] - q @ d.T) // 2
    k = min(topk, d.shape[0])
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(dist, order, axis=1)
