"""MLflow and the model registry: log a model folder, register it, pull it back, without pickles.

An image model folder (:mod:`brcd.models.encoder`) is logged as the artifact of a *models-from-code* pyfunc
(``brcd/mlflow/mlflow_model.py``): MLflow loads it by running that file, never by unpickling. The registry
uses aliases (``champion``) and version tags, not stages. :func:`register_student_dir` is the whole
registration of a run's best student, used by ``brcd demo`` and ``brcd register``. :func:`pull` and
:func:`load_model` take either kind of model folder (:mod:`brcd.models.kinds`).
``mlflow`` is imported only by the functions that talk to MLflow.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import threading
from importlib import metadata as _metadata
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from brcd.io import save_json
from brcd.models.encoder import MODEL_JSON, HashEncoder, read_model_spec
from brcd.models.kinds import find_model_folder, is_model_uri, kind_of, local_model_folder

__all__ = ["ARTIFACT_KEY", "CHAMPION", "log_student", "register_student", "register_student_dir",
           "resolve_model_version", "pyfunc_signature", "pull", "model_folder", "load_encoder", "load_model",
           "load_pyfunc"]

ARTIFACT_KEY = "model_dir"  # name of the model folder inside the pyfunc's artifacts
PYFUNC_CODE = Path(__file__).with_name("mlflow_model.py")
CHAMPION = "champion"
PROVENANCE_JSON = "registry.json"  # written by pull next to the model folder's files

PathLike = str | os.PathLike
_URI_LOCK = threading.RLock()


@contextlib.contextmanager
def _mlflow_uris(uri: str):
    """Temporarily point MLflow's fluent API at ``uri`` (tracking and registry), then restore."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    with _URI_LOCK, _env("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):  # set_*_uri also set these variables
        old_tracking = getattr(tracking_utils, "_tracking_uri", None)
        old_registry = getattr(registry_utils, "_registry_uri", None)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(old_tracking)
            mlflow.set_registry_uri(old_registry)


@contextlib.contextmanager
def _env(*keys: str, **values: str):
    """Set ``values`` in the environment; restore them and ``keys`` afterwards."""
    old = {k: os.environ.get(k) for k in (*keys, *values)}
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
    """Pinned requirements of the serving environment (skips MLflow's slow inference); ``brcd`` is not on PyPI."""
    reqs = []
    for dist in ("mlflow", "torch", "torchvision", "timm", "safetensors", "numpy", "pillow", "pandas"):
        with contextlib.suppress(_metadata.PackageNotFoundError):
            reqs.append(f"{dist}=={_metadata.version(dist)}")
    return reqs


def pyfunc_signature(bits: int, image_size: int):
    """Input: uint8 images (N, H, W, 3) of any size; output: int8 codes (N, bits); param ``bits``."""
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
                          outputs=Schema([TensorSpec(np.dtype(np.int8), (-1, -1))]),
                          params=ParamSchema([ParamSpec("bits", "integer", int(bits))]))


def _log_student(uri: str, run_id: str, model_dir: Path, tags: Mapping[str, Any] | None, name: str,
                 include_code: bool) -> str:
    import mlflow
    from mlflow.entities import LoggedModelOutput

    spec = read_model_spec(model_dir)
    client = _client(uri)
    run = client.get_run(run_id)
    str_tags = {str(k): str(v) for k, v in (tags or {}).items()}
    # create the LoggedModel in the run's experiment (the fluent API would pick the default one)
    logged = client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id,
                                        tags=str_tags or None, model_type="brcd-hashing")
    size = int(spec["image_size"])
    example = np.random.default_rng(0).integers(0, 256, size=(2, size, size, 3), dtype=np.uint8)
    with _mlflow_uris(uri), _env(MLFLOW_UV_AUTO_DETECT="false"):  # do not copy the cwd's uv.lock
        info = mlflow.pyfunc.log_model(
            name=name, python_model=str(PYFUNC_CODE), artifacts={ARTIFACT_KEY: str(model_dir)},
            signature=pyfunc_signature(spec["bits"][-1], size), input_example=example,
            pip_requirements=_pip_requirements(), code_paths=[str(Path(__file__).parent)] if include_code else None,
            model_id=logged.model_id)
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    return info.model_uri


def log_student(tracker_or_client: Any, run_id: str | None, model_dir: PathLike,
                tags: Mapping[str, Any] | None = None, *, name: str = "model",
                include_code: bool = False) -> str | None:
    """Log an image model folder as a models-from-code pyfunc linked to ``run_id``; returns ``models:/<model_id>``.

    With a :class:`~brcd.mlflow.tracking.Tracker` failures warn and return ``None``; otherwise they raise.
    ``include_code`` also copies the ``brcd`` package into the model.
    """
    from brcd.mlflow.tracking import Tracker

    model_dir = Path(model_dir)
    read_model_spec(model_dir)  # a local mistake: raise at once, whatever the backend
    if isinstance(tracker_or_client, Tracker):
        if run_id is None or not tracker_or_client.enabled:
            return None
        uri = tracker_or_client.uri
        return tracker_or_client.call("log_student",
                                      lambda: _log_student(uri, run_id, model_dir, tags, name, include_code))
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
        raise ValueError(f"registered model {name!r} does not exist in registry {reg_uri}; registered models: "
                         f"{', '.join(_registered_names(client)) or 'none'}") from None
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except MlflowException:
        what = f"alias {alias!r}" if alias is not None else f"version {version!r}"
        aliases = sorted(getattr(client.get_registered_model(name), "aliases", {}) or {})
        raise ValueError(f"model {name!r} has no {what} in registry {reg_uri}; its aliases: "
                         f"{', '.join(aliases) or 'none'}; registered models: "
                         f"{', '.join(_registered_names(client)) or 'none'}") from None


def register_student(model_uri: str, name: str = "brcd-student", alias: str | None = "champion",
                     tags: Mapping[str, Any] | None = None, *, tracking_uri: Any = None) -> str:
    """Register ``model_uri`` as a new version of ``name`` with ``tags``, point ``alias`` at it; returns the version."""
    import mlflow

    uri = _tracking_uri_of(tracking_uri)
    str_tags = {str(k): str(v) for k, v in (tags or {}).items()}
    with _mlflow_uris(uri):
        version = mlflow.register_model(model_uri, name, tags=str_tags or None).version
    if alias:
        _client(uri).set_registered_model_alias(name, alias, version)
    return str(version)


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
        raise ValueError(f"{uri} names no registered model version and no logged model in {reg_uri} "
                         f"({_one_line(exc)}); use models:/<name>@<alias>, models:/<name>/<version> or "
                         "models:/<model_id>") from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 160 else text[:157] + "..."


def load_pyfunc(uri: str, *, tracking_uri: Any = None):
    """``mlflow.pyfunc.load_model`` against an explicit backend (models-from-code: runs
    ``brcd/mlflow/mlflow_model.py``, unpickles nothing)."""
    import mlflow

    reg_uri = _tracking_uri_of(tracking_uri)
    if uri.startswith("models:/"):
        resolve_model_version(uri, reg_uri)  # clear errors for unknown names / aliases
    with _mlflow_uris(reg_uri):
        return mlflow.pyfunc.load_model(uri)


def pull(uri: str, output_dir: PathLike, *, tracking_uri: Any = None) -> Path:
    """Download a registered / logged model of either kind so that its folder's files land in ``output_dir``,
    plus ``registry.json`` naming where they came from. Returns ``output_dir``."""
    import mlflow

    output_dir = Path(output_dir)
    reg_uri = _tracking_uri_of(tracking_uri)
    version = resolve_model_version(uri, reg_uri) if uri.startswith("models:/") else None
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".pull-", dir=output_dir))
    try:
        artifact_uri = _artifact_uri(uri, version, reg_uri)
        with _mlflow_uris(reg_uri):
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(staging),
                                                             tracking_uri=reg_uri, registry_uri=reg_uri))
        folder = find_model_folder(local)
        kind = kind_of(folder)
        for name in kind.files(folder, kind.read_spec(folder)):  # the spec last: the folder is complete once there
            os.replace(folder / name, output_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    provenance: dict[str, Any] = {"uri": uri}
    if version is not None:
        provenance.update(
            name=version.name, version=str(version.version), aliases=list(getattr(version, "aliases", []) or []),
            tags=dict(version.tags or {}), model_id=getattr(version, "model_id", None), run_id=version.run_id,
        )
    save_json(output_dir / PROVENANCE_JSON, provenance)
    return output_dir


@contextlib.contextmanager
def model_folder(uri_or_dir: Any, *, tracking_uri: Any = None, hint: str = "use brcd.mlflow.registry.pull or "
                 "brcd.models.encoder.export_model to make one") -> Iterator[Path]:
    """A model folder of either kind: a local folder (or a downloaded MLflow model's), or a ``models:/`` /
    ``runs:/`` URI pulled to a temporary folder that lasts as long as the context."""
    text = str(uri_or_dir)
    if not is_model_uri(text):
        folder = local_model_folder(text)
        if folder is None:
            raise ValueError(f"{text} is neither a model folder (with {MODEL_JSON}) nor a models:/ URI; {hint}")
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="brcd-model-") as tmp:
        yield pull(text, tmp, tracking_uri=tracking_uri)


def load_encoder(uri_or_dir: Any, *, tracking_uri: Any = None, device: str | torch.device = "cpu") -> HashEncoder:
    """The :class:`HashEncoder` of an image model folder or URI (see :func:`model_folder`). Nothing is unpickled."""
    with model_folder(uri_or_dir, tracking_uri=tracking_uri) as folder:
        return HashEncoder.from_dir(folder, device=device)


def load_model(uri_or_dir: Any, *, tracking_uri: Any = None, device: str | torch.device = "cpu") -> Any:
    """Either kind of model from a folder or URI (see :func:`model_folder`): a :class:`HashEncoder` or a
    :class:`brcd.crossmodal.export.CrossModalModel`. Nothing is unpickled."""
    with model_folder(uri_or_dir, tracking_uri=tracking_uri) as folder:
        return kind_of(folder).load(folder, device)


def register_student_dir(cfg: Any, student_dir: PathLike, tracker: Any, *, output: PathLike,
                         results: Mapping[str, Any] | None = None, run_id: str | None = None,
                         teacher_fingerprint: str | None = None, resize_then_crop: bool | None = None,
                         alias: str = CHAMPION, find_run: bool = True) -> dict[str, Any]:
    """Export the best student of ``student_dir`` to ``<output>/export/student``, log it in ``run_id`` (default:
    with ``find_run`` the training run of ``output``, else a new ``register`` run) and register it as
    ``cfg.tracking.model_name`` with ``alias``; weights registered before only get the alias.

    ``tracker``: a :class:`brcd.mlflow.tracking.Tracker` or a stage tracker holding one as ``.tracker``.
    Returns ``{"model_uri", "model_version", "model_name", "export_dir"}`` (only ``export_dir`` set without a backend).
    """
    from brcd import io
    from brcd.builders import resize_then_crop as default_resize_then_crop
    from brcd.models.encoder import export_model
    from brcd.layout import RunLayout, best_weights
    from brcd.mlflow.tracking import dataset_name

    results = dict(results or {})
    output = Path(output)
    layout = RunLayout(output)
    metric = cfg.tracking.select_metric
    weights = best_weights(student_dir, metric)
    if not weights.exists():
        raise ValueError(f"no student weights {weights}; run `brcd distill` (and `brcd evaluate`) first")
    teacher_fp = teacher_fingerprint or layout.teacher_fingerprint() or "unknown"
    sha = io.file_sha256(weights)
    maps, per_length = _student_maps(cfg, results)
    bits = cfg.student.model.bits
    shared = {"teacher": cfg.teacher.model.backbone, "teacher_fingerprint": teacher_fp, "dataset": dataset_name(cfg),
              "select_metric": metric, "weights_sha256": sha}
    info = {"image_size": int(cfg.data.image_size),
            "resize_then_crop": default_resize_then_crop(cfg) if resize_then_crop is None else bool(resize_then_crop),
            **shared, "run_dir": str(output),
            **{k: v for k, v in maps.items() if v is not None}, **({"map_by_length": per_length} if per_length else {})}
    export_dir = export_model(layout.export_dir(), weights, cfg.student.model, info)
    out: dict[str, Any] = {"export_dir": str(export_dir), "model_uri": None, "model_version": None,
                           "model_name": cfg.tracking.model_name}
    base = getattr(tracker, "tracker", tracker)
    if not base.enabled or base.ensure_experiment() is None:
        return out
    name = cfg.tracking.model_name
    tags = {**shared, "bits": json.dumps(bits) if isinstance(bits, list) else str(bits),
            "student": cfg.student.model.backbone,
            **{k: f"{v:.6f}" for k, v in maps.items() if isinstance(v, (int, float))},
            **{k.replace("@", "_"): f"{v:.6f}" for k, v in per_length.items()}}  # MLflow tag keys: no "@"
    registered = _register_version(base, tracker, cfg, export_dir, tags, sha=sha, alias=alias, output=output,
                                   run_id=run_id, find_run=find_run)
    if registered is None or registered[1] is None:
        return out | {"model_uri": registered[0] if registered else None}
    uri, version = registered
    out.update(model_uri=uri, model_version=str(version))
    io.save_json(layout.registered_json, {**out, "tracking_uri": base.uri, "alias": alias, "tags": tags})
    embedded = base.uri == f"sqlite:///{RunLayout(output.resolve()).mlflow_db}"
    where = f"--run-dir {output}" if embedded else f"--tracking-uri {base.uri}"
    print(f"[register] pull it with: brcd pull models:/{name}@{alias} --output DIR {where}", flush=True)
    return out


def _student_maps(cfg: Any, results: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
    """The student's mAP per paradigm from evaluate's (or training's) results, and for nested codes every
    length's (``map_symmetric@16`` ...)."""
    from brcd.config import code_lengths, is_nested

    maps = {m: next((results[k] for k in (f"student_{m}", m, f"best_{m}") if results.get(k) is not None), None)
            for m in ("map_symmetric", "map_asymmetric")}
    per_length: dict[str, float] = {}
    for L in (code_lengths(cfg.student.model.bits) if is_nested(cfg) else []):
        for m in ("map_symmetric", "map_asymmetric"):
            if isinstance(value := results.get(f"student_{m}@{L}"), (int, float)):
                per_length[f"{m}@{L}"] = float(value)
    return maps, per_length


def _register_version(base: Any, tracker: Any, cfg: Any, export_dir: Path, tags: Mapping[str, str], *, sha: str,
                      alias: str, output: Path, run_id: str | None, find_run: bool) -> tuple[str | None, Any] | None:
    """``(model_uri, version)`` of the exported student: the version already holding these weights (``alias``
    moved to it) or a new one. ``None`` / a ``None`` version when MLflow refused."""
    from brcd.mlflow.tracking import dataset_name

    name = cfg.tracking.model_name
    existing = base.call("search_model_versions", lambda: _version_with_sha(base, name, sha))
    if existing is not None:
        version = str(existing.version)
        model_id = getattr(existing, "model_id", None)
        base.call("set_alias", lambda: base.client.set_registered_model_alias(name, alias, version))
        print(f"[register] {name} version {version} already holds these weights; alias {alias!r} -> version {version}",
              flush=True)
        return (f"models:/{model_id}" if model_id else existing.source), version
    find = getattr(tracker, "training_run_id", None)
    rid = run_id or (find(output) if find_run and find is not None else None)
    if rid is None:
        rid = base.start_run("register", tags={"stage": "register", "dataset": dataset_name(cfg),
                                                "teacher_fingerprint": tags["teacher_fingerprint"],
                                                "run_dir": str(output)})
        base.end_run(rid)
    with _quiet_mlflow():
        uri = log_student(base, rid, export_dir, tags)
        if uri is None:
            return None
        version = base.call("register_student",
                            lambda: register_student(uri, name=name, alias=alias, tags=dict(tags),
                                                     tracking_uri=base.uri))
    if version is None:
        return uri, None
    base.set_tags(rid, {"model_uri": uri, "registered_model": f"{name}/{version}"})
    print(f"[register] {name} version {version} (alias {alias!r}) <- {uri}", flush=True)
    return uri, version


@contextlib.contextmanager
def _quiet_mlflow():
    """No artifact progress bars (unless asked for) and, above ``MLFLOW_LOGGING_LEVEL=INFO``, no MLflow event logs.
    MLflow's own counting context, because MLflow re-enables its event logs when an inner use of it exits."""
    level = logging.getLevelName((os.environ.get("MLFLOW_LOGGING_LEVEL") or "INFO").upper())
    quiet: Any = contextlib.nullcontext()
    if isinstance(level, int) and level > logging.INFO:
        try:
            from mlflow.utils.autologging_utils.logging_and_warnings import MlflowEventsAndWarningsBehaviorGlobally

            quiet = MlflowEventsAndWarningsBehaviorGlobally(disable_event_logs=True, disable_warnings=False,
                                                            reroute_warnings=False)
        except ImportError:  # another MLflow layout: keep its output
            pass
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    with _env(**({} if key in os.environ else {key: "false"})), quiet:
        yield


def _version_with_sha(base: Any, name: str, sha: str):
    from mlflow.exceptions import MlflowException

    try:
        versions = base.client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    return next((v for v in versions if (v.tags or {}).get("weights_sha256") == sha), None)
