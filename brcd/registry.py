"""Export, register and serve hashing models without pickles.

A *model folder* holds two files, written atomically (``model.json`` last, with the weights' hash):

- ``model.safetensors``: the full ``state_dict()`` of a :class:`~brcd.models.HashingModel`;
- ``model.json``: the ``ModelConfig`` (as a dict), bits, image size, eval transform and
  normalisation, and free-form provenance (teacher, dataset, metrics).

:class:`HashEncoder` rebuilds the model from such a folder (``pretrained=False``, weights from the
safetensors file) and turns images into ``int8`` {-1,+1} codes. In MLflow the folder is logged as
the artifact of a *models-from-code* pyfunc (``brcd/mlflow_model.py``): MLflow loads it by running
that file, never by unpickling. The registry uses aliases (``champion``) and version tags, not stages.

``mlflow`` is imported only by the functions that talk to MLflow; encoding from a folder does not
need it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
import threading
from importlib import metadata as _metadata
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from brcd.codes import pack_codes
from brcd.io import ArtifactError, atomic_path, file_sha256, load_json, load_state_dict, save_json, save_state_dict

__all__ = [
    "MODEL_JSON",
    "MODEL_WEIGHTS",
    "FORMAT",
    "HashEncoder",
    "export_model",
    "log_student",
    "register_student",
    "resolve_model_version",
    "read_model_spec",
    "pyfunc_signature",
    "pull",
    "load_encoder",
    "load_pyfunc",
    "encode_images_to_parquet",
    "read_codes_parquet",
    "list_image_paths",
    "pickle_files",
]

MODEL_JSON = "model.json"
MODEL_WEIGHTS = "model.safetensors"
FORMAT = "brcd-hashing-model"
FORMAT_VERSION = 1
ARTIFACT_KEY = "model_dir"  # name of the model folder inside the pyfunc's artifacts
PYFUNC_CODE = Path(__file__).with_name("mlflow_model.py")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".joblib", ".cloudpickle")

PathLike = str | os.PathLike


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def _model_config_dict(model_config: Any) -> dict[str, Any]:
    from brcd.config import ModelConfig

    if dataclasses.is_dataclass(model_config):
        cfg = dataclasses.asdict(model_config)
    elif isinstance(model_config, Mapping):
        cfg = dict(model_config)
    else:
        raise TypeError(f"model_config must be a ModelConfig or a dict, got {type(model_config).__name__}")
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(cfg) - names)
    if unknown:
        raise ValueError(f"model_config has unknown keys {unknown}; allowed: {', '.join(sorted(names))}")
    # the exported weights hold everything: never reach for the hub or a local weights file at load time
    cfg["pretrained"] = False
    cfg["weights"] = None
    return cfg


def _build_model(cfg: Mapping[str, Any]):
    from brcd.config import ModelConfig
    from brcd.models import create_hashing_model

    return create_hashing_model(ModelConfig(**dict(cfg)))


def _as_state_dict(weights: Any) -> dict[str, torch.Tensor]:
    if isinstance(weights, torch.nn.Module):
        return dict(weights.state_dict())
    if isinstance(weights, Mapping):
        return {str(k): v for k, v in weights.items()}
    if isinstance(weights, (str, os.PathLike)):
        from brcd.io import load_torch_weights

        return load_torch_weights(weights)
    raise TypeError(f"weights must be a path, a state dict or a module, got {type(weights).__name__}")


def _check_loadable(model: torch.nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        example = (missing or unexpected or wrong)[0]
        raise ValueError(
            f"{where} do not match the model config ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(wrong)} wrongly shaped tensors, e.g. {example}); export the full model.state_dict() "
            "(not trainable_state_dict()) of a model built from this config"
        )


def export_model(
    model_dir: PathLike,
    weights: Any,
    model_config: Any,
    extra: Mapping[str, Any] | None = None,
    *,
    validate: bool = True,
) -> Path:
    """Write ``model.safetensors`` + ``model.json`` into ``model_dir`` (each atomically, JSON last).

    ``weights``: a safetensors / state-dict file, a state dict, or the model itself (full state dict).
    ``model_config``: a ``ModelConfig`` or its dict. ``extra`` may set ``image_size`` (default 224),
    ``resize_then_crop`` (default ``False``), ``mean`` / ``std`` (default ImageNet); every other key
    (teacher, dataset, metrics, ...) is stored under ``info``. ``validate`` rebuilds the model and
    checks that the weights fit it exactly.
    """
    model_dir = Path(model_dir)
    cfg = _model_config_dict(model_config)
    extra = dict(extra or {})
    image_size = extra.pop("image_size", 224)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"extra['image_size'] must be a positive int, got {image_size!r}")
    resize_then_crop = bool(extra.pop("resize_then_crop", False))
    mean = [float(x) for x in extra.pop("mean", IMAGENET_MEAN)]
    std = [float(x) for x in extra.pop("std", IMAGENET_STD)]
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean/std must be 3 values (std > 0), got mean={mean} std={std}")
    state = _as_state_dict(weights)
    if validate:
        _check_loadable(_build_model(cfg), state, "the weights")
    bits = cfg["bits"] if isinstance(cfg["bits"], list) else [cfg["bits"]]
    weights_path = save_state_dict(model_dir / MODEL_WEIGHTS, state, metadata={"format": FORMAT})
    spec = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": cfg,
        "bits": sorted(int(b) for b in bits),
        "image_size": image_size,
        "resize_then_crop": resize_then_crop,
        "mean": mean,
        "std": std,
        "weights": MODEL_WEIGHTS,
        "weights_sha256": file_sha256(weights_path),
        "info": extra,
    }
    save_json(model_dir / MODEL_JSON, spec)
    return model_dir


def read_model_spec(model_dir: PathLike) -> dict[str, Any]:
    """The validated ``model.json`` of a model folder."""
    model_dir = Path(model_dir)
    path = model_dir / MODEL_JSON
    if not path.is_file():
        raise ArtifactError(f"{model_dir} is not a brcd model folder ({MODEL_JSON} missing); export one with brcd.registry.export_model")
    spec = load_json(path)
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a {FORMAT} description; re-export the model")
    if int(spec.get("format_version", 0)) > FORMAT_VERSION:
        raise ArtifactError(f"{path} has format_version {spec['format_version']}; upgrade brcd to load it")
    return spec


# --------------------------------------------------------------------------------------------
# Encoding images
# --------------------------------------------------------------------------------------------


def _eval_transform(image_size: int, resize_then_crop: bool, mean: Sequence[float], std: Sequence[float]):
    same_norm = np.allclose(mean, IMAGENET_MEAN) and np.allclose(std, IMAGENET_STD)
    if same_norm:
        try:
            from brcd.data.transforms import eval_transform
        except ImportError:  # pragma: no cover - brcd.data is part of the package
            eval_transform = None
        if eval_transform is not None:
            return eval_transform(image_size, resize_then_crop)
    from torchvision.transforms import v2

    if resize_then_crop:
        geometry = [v2.Resize(max(image_size, round(image_size * 256 / 224)), antialias=True), v2.CenterCrop(image_size)]
    else:
        geometry = [v2.Resize((image_size, image_size), antialias=True)]
    return v2.Compose(
        [v2.ToImage(), *geometry, v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    )


def _open_rgb(path: PathLike):
    try:
        from brcd.data.sources import open_rgb
    except ImportError:  # pragma: no cover
        from PIL import Image

        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    return open_rgb(path)


def _as_uint8_hwc(array: np.ndarray) -> np.ndarray:
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"images must be uint8 arrays (H, W, 3) with values 0..255, got dtype {array.dtype}")
        array = np.clip(array, 0, 255).astype(np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"an image must be an (H, W, 3) array, got shape {array.shape}")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif array.shape[2] == 4:
        array = array[:, :, :3]
    return np.ascontiguousarray(array)


def _as_items(images: Any) -> list[Any]:
    """Normalise the accepted inputs to a list of (path | PIL image | uint8 HWC array)."""
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover
        pd = None
    if pd is not None and isinstance(images, pd.Series):
        images = images.tolist()
    elif pd is not None and isinstance(images, pd.DataFrame):
        for col in ("path", "image", "images"):
            if col in images.columns:
                images = images[col].tolist()
                break
        else:
            if images.shape[1] != 1:
                raise ValueError(
                    f"a DataFrame of images needs a 'path' or 'image' column, got columns {list(images.columns)}"
                )
            images = images.iloc[:, 0].tolist()
    if isinstance(images, (str, os.PathLike)):
        return [images]
    if isinstance(images, np.ndarray):
        if images.dtype.kind in "US":
            return [str(x) for x in images.ravel()]
        if images.dtype == object:
            return list(images)
        if images.ndim == 4:
            return list(images)
        if images.ndim in (2, 3):
            return [images]
        raise ValueError(f"images must be (N, H, W, 3) or (H, W, 3) uint8 arrays, got shape {images.shape}")
    if isinstance(images, Iterable):
        return list(images)
    return [images]


class HashEncoder:
    """A hashing model rebuilt from a model folder: ``encode(images) -> int8 (N, bits)``.

    ``images``: a uint8 array (N, H, W, 3) or (H, W, 3), a list of such arrays / PIL images / file
    paths, a pandas DataFrame / Series of paths or images, or a float tensor (N, 3, S, S) that is
    already transformed. The eval transform (resize to ``image_size``, normalisation) is applied.
    """

    def __init__(self, model: torch.nn.Module, spec: Mapping[str, Any], device: str | torch.device = "cpu"):
        self.spec = dict(spec)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.bits: list[int] = list(spec["bits"])
        self.image_size: int = int(spec["image_size"])
        self.transform = _eval_transform(
            self.image_size, bool(spec.get("resize_then_crop", False)), spec.get("mean", IMAGENET_MEAN),
            spec.get("std", IMAGENET_STD),
        )

    @classmethod
    def from_dir(cls, model_dir: PathLike, device: str | torch.device = "cpu", verify: bool = True) -> "HashEncoder":
        model_dir = Path(model_dir)
        spec = read_model_spec(model_dir)
        weights = model_dir / spec.get("weights", MODEL_WEIGHTS)
        if verify and spec.get("weights_sha256") and weights.is_file():
            if file_sha256(weights) != spec["weights_sha256"]:
                raise ArtifactError(
                    f"{weights} does not match the hash in {model_dir / MODEL_JSON}; the folder was modified "
                    "or half-copied; pull or export it again"
                )
        state = load_state_dict(weights)
        model = _build_model(spec["model"])
        _check_loadable(model, state, f"the weights in {weights}")
        model.load_state_dict(state, strict=True)
        return cls(model, spec, device=device)

    @property
    def max_bits(self) -> int:
        return self.bits[-1]

    @property
    def info(self) -> dict[str, Any]:
        return dict(self.spec.get("info") or {})

    def preprocess(self, images: Any) -> torch.Tensor:
        """Images -> normalised float tensor (N, 3, S, S)."""
        if isinstance(images, torch.Tensor) and images.is_floating_point():
            if images.dim() != 4 or images.shape[1] != 3:
                raise ValueError(f"a float tensor input must be transformed images (N, 3, S, S), got {tuple(images.shape)}")
            return images
        if isinstance(images, torch.Tensor):
            images = images.cpu().numpy()
        out = []
        for item in _as_items(images):
            if isinstance(item, (str, os.PathLike)):
                item = _open_rgb(item)
            elif isinstance(item, torch.Tensor):
                item = item.cpu().numpy()
            if isinstance(item, (np.ndarray, list)):
                item = _as_uint8_hwc(np.asarray(item))
            elif not hasattr(item, "convert"):  # PIL images pass
                raise ValueError(f"cannot encode an image of type {type(item).__name__}; pass uint8 arrays or paths")
            else:
                item = item.convert("RGB")
            out.append(self.transform(item))
        if not out:
            return torch.zeros((0, 3, self.image_size, self.image_size))
        return torch.stack(out)

    @torch.no_grad()
    def encode(self, images: Any, bits: int | None = None, batch_size: int = 64) -> np.ndarray:
        """{-1,+1} codes, ``int8`` (N, bits); ``bits`` picks a nested prefix length (default: the longest)."""
        if bits is not None:
            bits = int(bits)
            if bits not in self.bits:
                raise ValueError(f"this model emits {self.bits} bits; bits={bits} is not one of them")
        if isinstance(images, torch.Tensor) and images.is_floating_point():
            batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
        else:
            items = _as_items(images.cpu().numpy() if isinstance(images, torch.Tensor) else images)
            batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
        chunks = []
        for batch in batches:
            x = self.preprocess(batch).to(self.device)
            chunks.append(self.model.encode(x, bits=bits).cpu().numpy())
        if not chunks:
            return np.zeros((0, bits or self.max_bits), dtype=np.int8)
        return np.concatenate(chunks).astype(np.int8, copy=False)

    __call__ = encode

    def __repr__(self) -> str:
        return f"HashEncoder(backbone={self.spec['model'].get('backbone')!r}, bits={self.bits}, image_size={self.image_size})"


# --------------------------------------------------------------------------------------------
# MLflow: logging, registry, pulling
# --------------------------------------------------------------------------------------------

_URI_LOCK = threading.RLock()


@contextlib.contextmanager
def _mlflow_uris(uri: str):
    """Temporarily point MLflow's fluent API at ``uri`` (tracking and registry), then restore."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    with _URI_LOCK:
        old_tracking = getattr(tracking_utils, "_tracking_uri", None)
        old_registry = getattr(registry_utils, "_registry_uri", None)
        old_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(old_tracking)
            mlflow.set_registry_uri(old_registry)
            for key, value in old_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@contextlib.contextmanager
def _env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _tracking_uri_of(source: Any) -> str:
    """A tracking URI from a Tracker, an MlflowClient, a string, or (None) MLflow's current one."""
    if source is None:
        import mlflow

        return mlflow.get_tracking_uri()
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    uri = getattr(source, "uri", None) or getattr(source, "tracking_uri", None)
    if uri is None:
        raise TypeError(f"cannot find a tracking URI on {type(source).__name__}; pass a Tracker, MlflowClient or URI")
    return str(uri)


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _pip_requirements() -> list[str]:
    """Pinned requirements of the serving environment (skips MLflow's slow requirement inference).
    ``brcd`` itself is not on PyPI: install it where the model is served (or log with include_code)."""
    reqs = []
    for dist in ("mlflow", "torch", "torchvision", "timm", "safetensors", "numpy", "pillow", "pandas"):
        try:
            reqs.append(f"{dist}=={_metadata.version(dist)}")
        except _metadata.PackageNotFoundError:
            continue
    return reqs


def pyfunc_signature(bits: int, image_size: int):
    """Input: uint8 images (N, H, W, 3) of any size; output: int8 codes (N, bits); param ``bits``."""
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
        outputs=Schema([TensorSpec(np.dtype(np.int8), (-1, -1))]),
        params=ParamSchema([ParamSpec("bits", "integer", int(bits))]),
    )


def _log_student(uri: str, run_id: str, model_dir: Path, tags: Mapping[str, Any] | None, name: str,
                 include_code: bool) -> str:
    import mlflow
    from mlflow.entities import LoggedModelOutput

    spec = read_model_spec(model_dir)
    client = _client(uri)
    run = client.get_run(run_id)
    str_tags = {str(k): str(v) for k, v in (tags or {}).items()}
    # create the LoggedModel in the run's experiment (the fluent API would pick the default one)
    logged = client.create_logged_model(
        run.info.experiment_id, name=name, source_run_id=run_id, tags=str_tags or None, model_type="brcd-hashing"
    )
    size = int(spec["image_size"])
    example = np.random.default_rng(0).integers(0, 256, size=(2, size, size, 3), dtype=np.uint8)
    with _mlflow_uris(uri), _env(MLFLOW_UV_AUTO_DETECT="false"):  # do not copy the cwd's uv.lock
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=str(PYFUNC_CODE),
            artifacts={ARTIFACT_KEY: str(model_dir)},
            signature=pyfunc_signature(spec["bits"][-1], size),
            input_example=example,
            pip_requirements=_pip_requirements(),
            code_paths=[str(Path(__file__).parent)] if include_code else None,
            model_id=logged.model_id,
        )
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    return info.model_uri


def log_student(tracker_or_client: Any, run_id: str | None, model_dir: PathLike,
                tags: Mapping[str, Any] | None = None, *, name: str = "model", include_code: bool = False) -> str | None:
    """Log a model folder as a models-from-code pyfunc linked to ``run_id``; returns ``models:/<model_id>``.

    With a :class:`~brcd.tracking.Tracker` failures are warned about and ``None`` is returned (training
    never crashes); with an ``MlflowClient`` or a URI they raise. ``include_code`` also copies the
    ``brcd`` package into the model (for serving where brcd is not installed).
    """
    from brcd.tracking import Tracker

    model_dir = Path(model_dir)
    read_model_spec(model_dir)  # a local mistake: raise at once, whatever the backend
    if isinstance(tracker_or_client, Tracker):
        if run_id is None or not tracker_or_client.enabled:
            return None
        uri = tracker_or_client.uri
        return tracker_or_client.call("log_student", lambda: _log_student(uri, run_id, model_dir, tags, name, include_code))
    if run_id is None:
        raise ValueError("log_student needs the run_id of the run that trained the model")
    return _log_student(_tracking_uri_of(tracker_or_client), run_id, model_dir, tags, name, include_code)


def _registered_names(client) -> list[str]:
    try:
        return sorted(m.name for m in client.search_registered_models(max_results=100))
    except Exception:  # noqa: BLE001 - only used to enrich an error message
        return []


def _parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/name@alias`` -> (name, None, alias); ``models:/name/3`` -> (name, "3", None);
    ``models:/m-<id>`` -> (id, None, None)."""
    body = uri[len("models:/"):].strip("/")
    if "@" in body:
        name, alias = body.rsplit("@", 1)
        return name, None, alias
    if "/" in body:
        name, version = body.rsplit("/", 1)
        return name, version, None
    return body, None, None


def resolve_model_version(uri: str, tracking_uri: Any = None):
    """The registry ``ModelVersion`` behind ``models:/name@alias`` or ``models:/name/<version>``
    (``None`` for ``models:/<model_id>``), with one-line ``ValueError`` for unknown names / aliases."""
    from mlflow.exceptions import MlflowException

    if not uri.startswith("models:/"):
        raise ValueError(f"{uri!r} is not a models:/ URI (use models:/<name>@<alias> or models:/<name>/<version>)")
    reg_uri = _tracking_uri_of(tracking_uri)
    client = _client(reg_uri)
    name, version, alias = _parse_models_uri(uri)
    if version is None and alias is None:
        return None  # a LoggedModel id
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" not in str(getattr(exc, "error_code", "")) and "not found" not in str(exc).lower():
            raise
        known = _registered_names(client)
        raise ValueError(
            f"registered model {name!r} does not exist in registry {reg_uri}; registered models: "
            f"{', '.join(known) or 'none'}"
        ) from None
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except MlflowException:
        known = _registered_names(client)
        what = f"alias {alias!r}" if alias is not None else f"version {version!r}"
        aliases = sorted(getattr(client.get_registered_model(name), "aliases", {}) or {})
        raise ValueError(
            f"model {name!r} has no {what} in registry {reg_uri}; its aliases: {', '.join(aliases) or 'none'}; "
            f"registered models: {', '.join(known) or 'none'}"
        ) from None


def register_student(model_uri: str, name: str = "brcd-student", alias: str | None = "champion",
                     tags: Mapping[str, Any] | None = None, *, tracking_uri: Any = None) -> str:
    """Register ``model_uri`` as a new version of ``name``, tag the version, point ``alias`` at it.

    ``tags`` (e.g. teacher, dataset, bits, map_symmetric, map_asymmetric) go on the model version.
    Returns the version (a string, as MLflow reports it).
    """
    import mlflow

    uri = _tracking_uri_of(tracking_uri)
    str_tags = {str(k): str(v) for k, v in (tags or {}).items()}
    with _mlflow_uris(uri):
        version = mlflow.register_model(model_uri, name, tags=str_tags or None).version
    if alias:
        _client(uri).set_registered_model_alias(name, alias, version)
    return str(version)


def _find_model_folder(root: Path) -> Path:
    hits = sorted(root.rglob(MODEL_JSON), key=lambda p: len(p.parts))
    if not hits:
        raise ArtifactError(f"the downloaded model under {root} has no {MODEL_JSON}; it was not logged by brcd.registry")
    return hits[0].parent


def _artifact_uri(uri: str, version: Any, reg_uri: str) -> str:
    """A concrete artifact location for a models:/ URI (MLflow's own resolution of models:/ URIs
    ignores an explicit registry URI in places)."""
    if not uri.startswith("models:/"):
        return uri
    client = _client(reg_uri)
    if version is not None:
        return client.get_model_version_download_uri(version.name, version.version)
    model_id = _parse_models_uri(uri)[0]
    try:
        return client.get_logged_model(model_id).artifact_location
    except Exception as exc:  # noqa: BLE001 - an unknown id: say so in one line
        raise ValueError(
            f"{uri} names no registered model version and no logged model in {reg_uri} ({_one_line(exc)}); "
            "use models:/<name>@<alias>, models:/<name>/<version> or models:/<model_id>"
        ) from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 160 else text[:157] + "..."


def load_pyfunc(uri: str, *, tracking_uri: Any = None):
    """``mlflow.pyfunc.load_model`` against an explicit backend (models-from-code: runs
    ``brcd/mlflow_model.py``, unpickles nothing)."""
    import mlflow

    reg_uri = _tracking_uri_of(tracking_uri)
    if uri.startswith("models:/"):
        resolve_model_version(uri, reg_uri)  # clear errors for unknown names / aliases
    with _mlflow_uris(reg_uri):
        return mlflow.pyfunc.load_model(uri)


def pull(uri: str, output_dir: PathLike, *, tracking_uri: Any = None) -> Path:
    """Download a registered / logged model so that ``model.json`` + ``model.safetensors`` land in
    ``output_dir`` (plus ``registry.json`` naming where they came from). Returns ``output_dir``."""
    import mlflow

    output_dir = Path(output_dir)
    reg_uri = _tracking_uri_of(tracking_uri)
    version = resolve_model_version(uri, reg_uri) if uri.startswith("models:/") else None
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".pull-", dir=output_dir))
    try:
        artifact_uri = _artifact_uri(uri, version, reg_uri)
        with _mlflow_uris(reg_uri):
            local = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=artifact_uri, dst_path=str(staging), tracking_uri=reg_uri, registry_uri=reg_uri
                )
            )
        folder = _find_model_folder(local)
        read_model_spec(folder)
        os.replace(folder / MODEL_WEIGHTS, output_dir / MODEL_WEIGHTS)
        os.replace(folder / MODEL_JSON, output_dir / MODEL_JSON)  # last: the folder is complete
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    provenance: dict[str, Any] = {"uri": uri}
    if version is not None:
        provenance.update(
            name=version.name, version=str(version.version), aliases=list(getattr(version, "aliases", []) or []),
            tags=dict(version.tags or {}), model_id=getattr(version, "model_id", None), run_id=version.run_id,
        )
    save_json(output_dir / "registry.json", provenance)
    return output_dir


def load_encoder(uri_or_dir: Any, *, tracking_uri: Any = None, device: str | torch.device = "cpu") -> HashEncoder:
    """A :class:`HashEncoder` from a model folder, a downloaded MLflow model folder, or a
    ``models:/`` / ``runs:/`` URI (pulled to a temporary folder). Nothing is unpickled."""
    text = str(uri_or_dir)
    path = Path(text).expanduser()
    if "://" not in text and not text.startswith(("models:/", "runs:/")):
        if (path / MODEL_JSON).is_file():
            return HashEncoder.from_dir(path, device=device)
        if (path / "MLmodel").is_file():
            return HashEncoder.from_dir(_find_model_folder(path), device=device)
        raise ValueError(
            f"{text} is neither a model folder (with {MODEL_JSON}) nor a models:/ URI; "
            "use brcd.registry.pull or export_model to make one"
        )
    with tempfile.TemporaryDirectory(prefix="brcd-model-") as tmp:
        pull(text, tmp, tracking_uri=tracking_uri)
        return HashEncoder.from_dir(tmp, device=device)


def pickle_files(model_dir: PathLike) -> list[Path]:
    """Files in a (downloaded) model folder that look like pickles (``*.pkl``, ``python_model.pkl``, ...)."""
    root = Path(model_dir)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in _PICKLE_SUFFIXES)


# --------------------------------------------------------------------------------------------
# Codes of a folder of images -> parquet
# --------------------------------------------------------------------------------------------


def list_image_paths(images: Any, root: PathLike | None = None) -> list[str]:
    """Image paths from a list of paths, a folder (recursive, sorted) or a list file
    (one ``path [labels...]`` per line, relative to ``root`` or the list file's folder)."""
    if isinstance(images, (str, os.PathLike)):
        src = Path(images).expanduser()
        if src.is_dir():
            paths = sorted(str(p) for p in src.rglob("*") if p.is_file() and p.suffix.lower() in _IMAGE_EXTENSIONS)
            if not paths:
                raise ValueError(f"folder {src} holds no images ({', '.join(_IMAGE_EXTENSIONS)})")
            return paths
        if not src.is_file():
            raise ValueError(f"{src} does not exist; pass a folder of images, a list file or a list of paths")
        if src.suffix.lower() in _IMAGE_EXTENSIONS:
            return [str(src)]
        base = Path(root) if root is not None else src.parent
        paths = []
        for line in src.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            p = Path(line.split()[0])
            paths.append(str(p if p.is_absolute() else base / p))
        if not paths:
            raise ValueError(f"list file {src} names no images")
        return paths
    base = Path(root) if root is not None else None
    out = []
    for p in images:
        p = Path(p)
        out.append(str(base / p if base is not None and not p.is_absolute() else p))
    return out


def encode_images_to_parquet(encoder: Any, images: Any, output_path: PathLike, batch_size: int = 64,
                             *, bits: int | None = None, root: PathLike | None = None) -> Path:
    """Encode images and write ``id`` (int64), ``path`` (string), ``code`` (fixed_size_binary(ceil(bits/8)),
    :func:`brcd.codes.pack_codes` layout) to a parquet file (atomically); schema metadata ``bits``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = list_image_paths(images, root)
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise ValueError(f"{len(missing)} of {len(paths)} images do not exist, e.g. {missing[0]}; fix the paths or root")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n_bits = bits or getattr(encoder, "max_bits", None)
    output_path = Path(output_path)
    writer = None
    with atomic_path(output_path) as tmp:
        try:
            for start in range(0, max(len(paths), 1), batch_size):
                chunk = paths[start : start + batch_size]
                if chunk:
                    codes = np.asarray(encoder.encode(chunk, bits=bits) if bits else encoder.encode(chunk))
                    n_bits = codes.shape[1]
                    packed = pack_codes(codes)
                else:  # no images: an empty file with the right schema
                    if not n_bits:
                        raise ValueError("no images to encode and the encoder's bits are unknown; pass bits=")
                    packed = np.zeros((0, (n_bits + 7) // 8), dtype=np.uint8)
                width = packed.shape[1]
                if writer is None:
                    schema = pa.schema(
                        [("id", pa.int64()), ("path", pa.string()), ("code", pa.binary(width))],
                        metadata={"bits": str(n_bits), "packing": "numpy.packbits MSB-first, bit 1 = +1",
                                  "format": "brcd-codes"},
                    )
                    writer = pq.ParquetWriter(str(tmp), schema)
                code_arr = pa.FixedSizeBinaryArray.from_buffers(
                    pa.binary(width), len(chunk), [None, pa.py_buffer(np.ascontiguousarray(packed).tobytes())]
                )
                batch = pa.record_batch(
                    [pa.array(np.arange(start, start + len(chunk), dtype=np.int64)), pa.array(chunk, pa.string()), code_arr],
                    schema=schema,
                )
                writer.write_batch(batch)
        finally:
            if writer is not None:
                writer.close()
    return output_path


def read_codes_parquet(path: PathLike) -> tuple[np.ndarray, list[str], np.ndarray, int]:
    """``(ids int64 (N,), paths, packed uint8 (N, ceil(bits/8)), bits)`` of a file from :func:`encode_images_to_parquet`."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"codes file {path} does not exist")
    try:
        table = pq.read_table(str(path))
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types
        raise ArtifactError(f"{path} is not a readable parquet file ({type(exc).__name__}); write it again") from None
    meta = table.schema.metadata or {}
    if b"bits" not in meta or not {"id", "path", "code"} <= set(table.column_names):
        raise ArtifactError(f"{path} was not written by encode_images_to_parquet (bits metadata or columns missing)")
    bits = int(meta[b"bits"])
    width = (bits + 7) // 8
    ids = table.column("id").to_numpy().astype(np.int64, copy=False)
    paths = table.column("path").to_pylist()
    col = table.column("code").combine_chunks()
    n = len(col)
    if n:
        buf = col.buffers()[1]
        packed = np.frombuffer(buf, dtype=np.uint8, count=n * width, offset=col.offset * width).reshape(n, width).copy()
    else:
        packed = np.zeros((0, width), dtype=np.uint8)
    return ids, paths, packed, bits
