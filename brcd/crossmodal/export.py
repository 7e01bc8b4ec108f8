"""The cross-modal model folder: both encoders of a student and its database, no pickles.

    <folder>/crossmodal.json            spec: bits, widths, feature extractor, image size, tasks
    <folder>/image.safetensors          image hash head (+ the frozen timm extractor's weights, "extractor.*")
    <folder>/text.safetensors           text hash head
    <folder>/database.npz               B (the learned database codes, one per pair) and the
                                        database re-encoded per modality: image_codes = sign(f(x)),
                                        text_codes = sign(g(y)); ids = the database's item positions

:func:`load_crossmodal` reads it back as a :class:`CrossModalModel`, which encodes images (arrays
or files) and tag vectors; ``brcd encode`` / ``brcd search`` use it for a text query against an
image database and back (the search itself is :class:`brcd.search.flat.HammingIndex`'s).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from brcd import io
from brcd.crossmodal.nets import CrossModalEncoder, HashMLP, create_feature_extractor
from brcd.models.kinds import ModelKind, register

__all__ = ["SPEC_JSON", "DATABASES", "ENCODER_FILES", "CrossModalKind", "CrossModalModel", "export_crossmodal",
           "load_crossmodal", "read_spec"]

SPEC_JSON, DATABASE_NPZ = "crossmodal.json", "database.npz"
IMAGE_WEIGHTS, TEXT_WEIGHTS = "image.safetensors", "text.safetensors"
#: what encoding needs (the stored database is for searching it)
ENCODER_FILES = (SPEC_JSON, IMAGE_WEIGHTS, TEXT_WEIGHTS)
#: the databases a model folder stores: B (one code per pair), the images encoded by f, the texts by g
DATABASES = {"pairs": "codes", "images": "image_codes", "texts": "text_codes"}
FORMAT = 1


def export_crossmodal(folder: str | Path, image_head: HashMLP, text_head: HashMLP, *, extractor: str, image_size: int,
                      database: dict[str, np.ndarray], tags: dict[str, Any] | None = None,
                      extractor_module: torch.nn.Module | None = None) -> Path:
    """Write the folder (see the module docstring). ``database`` has ``codes``, ``image_codes``,
    ``text_codes`` (int8 {-1, +1}) and ``ids``; ``extractor_module`` is the frozen backbone the
    features came from (default: ``extractor`` built from its fixed seed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ext = None
    if extractor != "pixels":
        ext = extractor_module if extractor_module is not None else create_feature_extractor(extractor, image_size)[0]
    # the encoders' own state dicts: "head.*" (+ "extractor.*"), what load_crossmodal reads back
    io.save_state_dict(folder / IMAGE_WEIGHTS, CrossModalEncoder(image_head, ext).state_dict())
    io.save_state_dict(folder / TEXT_WEIGHTS, CrossModalEncoder(text_head).state_dict())
    io.save_arrays(folder / DATABASE_NPZ, **{k: np.asarray(v) for k, v in database.items()})
    lin_i, lin_t = image_head.net[0], text_head.net[0]
    spec = {"format": FORMAT, "kind": "brcd-crossmodal", "bits": int(image_head.net[2].out_features),
            "hidden_dim": int(lin_i.out_features), "image_in": int(lin_i.in_features), "text_in": int(lin_t.in_features),
            "extractor": extractor, "image_size": int(image_size), "database_size": int(len(database["codes"])),
            "tags": dict(tags or {})}
    io.save_json(folder / SPEC_JSON, spec)  # last: the folder is complete
    return folder


def read_spec(folder: str | Path) -> dict[str, Any]:
    """The folder's ``crossmodal.json``, checked (one-line errors)."""
    folder = Path(folder)
    path = folder / SPEC_JSON
    if not path.is_file():
        raise ValueError(f"{folder} is not a cross-modal model folder (no {SPEC_JSON}); use the folder "
                         "`brcd crossmodal` exported (DIR/crossmodal/export) or a models:/ URI")
    spec = io.load_json(path)
    if spec.get("kind") != "brcd-crossmodal" or spec.get("format") != FORMAT:
        raise ValueError(f"{path} is not a format-{FORMAT} brcd cross-modal spec")
    return spec


class CrossModalModel:
    """A loaded cross-modal student: ``image`` and ``text`` encoders and the stored ``database``.

    ``bits`` / ``max_bits`` / ``encode(paths)`` make it usable wherever an image
    :class:`brcd.models.encoder.HashEncoder` encodes files (``encode_images_to_parquet``)."""

    def __init__(self, spec: dict[str, Any], image: CrossModalEncoder, text: CrossModalEncoder,
                 database: dict[str, np.ndarray]):
        self.spec, self.image, self.text, self.database = spec, image, text, database
        self.bits = [int(spec["bits"])]
        self.max_bits = int(spec["bits"])
        self.image_size = int(spec["image_size"])

    def encode_tags(self, tags: np.ndarray) -> np.ndarray:
        """int8 {-1, +1} codes of (N, V) tag vectors."""
        tags = np.asarray(tags, dtype=np.float32)
        if tags.ndim != 2 or tags.shape[1] != self.spec["text_in"]:
            raise ValueError(f"tag vectors must be (N, {self.spec['text_in']}) for this model (its vocabulary), "
                             f"got shape {tags.shape}")
        return self.text(torch.from_numpy(tags)).numpy().astype(np.int8)

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        """int8 {-1, +1} codes of (N, 3, H, W) images in [0, 1]."""
        images = np.asarray(images, dtype=np.float32)
        size = self.image_size
        if images.ndim != 4 or images.shape[1:] != (3, size, size):
            raise ValueError(f"images must be (N, 3, {size}, {size}) in [0, 1], got {images.shape}")
        return self.image(torch.from_numpy(images)).numpy().astype(np.int8)

    def encode(self, paths: list[str], bits: int | None = None, batch_size: int = 64) -> np.ndarray:
        """Codes of image files (resized to the model's image size, as in training), read ``batch_size``
        at a time."""
        from brcd.crossmodal.data import load_images

        if bits is not None and bits != self.max_bits:
            raise ValueError(f"this model emits {self.max_bits} bits; --bits {bits} is not one of them")
        paths = list(paths)
        chunks = [self.encode_images(load_images(paths[i:i + batch_size], self.image_size))
                  for i in range(0, len(paths), batch_size)]
        return np.concatenate(chunks) if chunks else np.zeros((0, self.max_bits), dtype=np.int8)

    def __repr__(self) -> str:
        return (f"CrossModalModel(bits={self.max_bits}, extractor={self.spec['extractor']!r}, "
                f"vocabulary={self.spec['text_in']}, database={self.spec['database_size']})")


def load_crossmodal(folder: str | Path, *, database: bool = True) -> CrossModalModel:
    """The :class:`CrossModalModel` of an exported (or pulled) folder (``database=False``: encoders
    only, the folder may hold just :data:`ENCODER_FILES`)."""
    folder = Path(folder)
    spec = read_spec(folder)
    def encoder(width: int, weights: str, extractor: torch.nn.Module | None = None) -> CrossModalEncoder:
        enc = CrossModalEncoder(HashMLP(width, spec["bits"], spec["hidden_dim"]), extractor)
        enc.load_state_dict(io.load_state_dict(folder / weights))
        return enc.eval()

    extractor, _ = create_feature_extractor(spec["extractor"], spec["image_size"], seed=0)
    image = encoder(spec["image_in"], IMAGE_WEIGHTS, extractor)
    text = encoder(spec["text_in"], TEXT_WEIGHTS)
    return CrossModalModel(spec, image, text, io.load_arrays(folder / DATABASE_NPZ) if database else {})


class CrossModalKind(ModelKind):
    """Cross-modal models: a :class:`CrossModalModel` (image and text encoders, the stored database)."""

    name, spec_file, model_type = "a cross-modal model", SPEC_JSON, CrossModalModel
    image_metadata = {"modality": "image"}

    def read_spec(self, folder: Path) -> dict[str, Any]:
        return read_spec(folder)

    def load(self, folder: Path, device: str = "cpu", *, encoders_only: bool = False) -> CrossModalModel:
        return load_crossmodal(folder, database=not encoders_only)

    def files(self, folder: Path, spec: dict[str, Any], *, encoders_only: bool = False) -> list[str]:
        names = ENCODER_FILES if encoders_only else sorted(p.name for p in Path(folder).iterdir() if p.is_file())
        return [*(n for n in names if n != SPEC_JSON), SPEC_JSON]

    def bits(self, spec: dict[str, Any]) -> list[int]:
        return [int(spec["bits"])]

    def weights_sha256(self, folder: Path, spec: dict[str, Any]) -> str:
        return io.file_sha256(Path(folder) / IMAGE_WEIGHTS)  # its image network encodes the files

    def summary(self, spec: dict[str, Any]) -> str:
        return (f"cross-modal: image {spec['extractor']} + text {spec['text_in']}-word vocabulary, "
                f"{spec['bits']} bits, {spec['database_size']} database pairs")

    def query_label(self, modality: str, database: str) -> str:
        return f"{modality} query; {database}: "

    def check_servable(self, model: str) -> None:
        raise ValueError(f"{model} is a cross-modal model; `brcd serve` serves image models (search a "
                         "cross-modal model with `brcd search --query-tags / --query`)")


register(CrossModalKind())
