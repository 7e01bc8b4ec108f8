"""The kinds of model folder (image hashing model, cross-modal model): each says how to recognise, load,
encode, pull and serve its folder, so callers ask the kind instead of testing which one they hold.

The modules of :data:`KIND_MODULES` register their kind on import; a lookup imports them by name, so that
they can import this module (no cycle).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Mapping

from brcd.io import ArtifactError

__all__ = ["KIND_MODULES", "ModelKind", "register", "kinds", "kind_of", "kind_of_model", "find_model_folder",
           "is_model_uri", "local_model_folder"]

#: the image kind first: it is the default, whose loader names what a folder of no kind lacks
KIND_MODULES = ("brcd.models.encoder", "brcd.crossmodal.export")
_KINDS: list[ModelKind] = []


class ModelKind:
    """What brcd does with one kind of model folder; a subclass per kind, registered with :func:`register`.

    Subclasses define ``read_spec(folder)`` (the checked spec, one-line errors), ``load(folder, device,
    encoders_only=False)`` (the model; ``encoders_only``: what encodes images, from just those files),
    ``files(folder, spec, encoders_only=False)`` (the folder's files, the spec last: a folder is complete once
    it is there), ``bits(spec)`` (code lengths emitted for images, shortest first), ``weights_sha256(folder,
    spec)`` (the identity of its image codes) and ``summary(spec)`` (what ``brcd pull`` says).
    """

    name: str  # as messages say it: "an image model"
    spec_file: str  # the file that marks the folder
    model_type: type  # what ``load`` returns
    image_metadata: Mapping[str, str] | None = None  # schema metadata of its image codes parquets

    def require_texts(self, model: str, option: str) -> None:
        """Raise the one-line error when ``option`` needs tag vectors or a stored database and this kind has none."""

    def query_label(self, modality: str, database: str) -> str:
        """What a search result's header says about the query and the database searched."""
        return ""

    def check_servable(self, model: str) -> None:
        """Raise the one-line error when ``brcd serve`` cannot serve this kind."""


def register(kind: ModelKind) -> ModelKind:
    _KINDS.append(kind)
    return kind


def kinds() -> list[ModelKind]:
    for module in KIND_MODULES:
        importlib.import_module(module)
    return list(_KINDS)


def kind_of(folder: str | os.PathLike, *, strict: bool = False) -> ModelKind | None:
    """The kind whose spec file ``folder`` holds; else the image kind (its loader raises the usual
    one-line error), or ``None`` with ``strict``."""
    found = next((k for k in kinds() if (Path(folder) / k.spec_file).is_file()), None)
    return found if found is not None or strict else kinds()[0]


def kind_of_model(model: Any) -> ModelKind:
    """The kind of a loaded model."""
    return next(k for k in kinds() if isinstance(model, k.model_type))


def find_model_folder(root: str | os.PathLike) -> Path:
    """The model folder inside ``root`` (e.g. a downloaded MLflow model): the shallowest spec file's folder."""
    hits = sorted((p for k in kinds() for p in Path(root).rglob(k.spec_file)), key=lambda p: len(p.parts))
    if not hits:
        raise ArtifactError(f"the downloaded model under {root} has no {kinds()[0].spec_file}; it was not logged by "
                            "brcd.mlflow.registry")
    return hits[0].parent


def is_model_uri(text: str) -> bool:
    """Whether ``--model`` names a model in MLflow rather than a local folder."""
    return "://" in text or text.startswith(("models:/", "runs:/"))


def local_model_folder(path: str | os.PathLike) -> Path | None:
    """The model folder a local path names: a model folder of any kind or a downloaded MLflow model; else ``None``."""
    path = Path(path).expanduser()
    if kind_of(path, strict=True) is not None:
        return path
    return find_model_folder(path) if (path / "MLmodel").is_file() else None
