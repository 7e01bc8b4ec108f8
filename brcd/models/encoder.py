"""Image hashing models as plain folders (no MLflow, no pickles), and images encoded with them.

A *model folder* holds ``model.safetensors`` (the full ``state_dict()`` of a
:class:`~brcd.models.nets.HashingModel`) and ``model.json`` (the ``ModelConfig``, bits, image size,
normalisation, provenance and the weights' hash), each written atomically, the JSON last.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from brcd.codes import pack_codes
from brcd.io import ArtifactError, atomic_path, file_sha256, load_json, load_state_dict, save_json, save_state_dict
from brcd.models.kinds import ModelKind, kind_of, register

__all__ = ["MODEL_JSON", "MODEL_WEIGHTS", "FORMAT", "HashEncoder", "ImageKind", "export_model", "read_model_spec",
           "write_codes_parquet", "CodesPredictor", "codes_fingerprint", "codes_metadata", "encode_images_to_parquet",
           "read_codes_parquet", "list_image_paths", "existing_image_paths", "pickle_files"]

MODEL_JSON = "model.json"
MODEL_WEIGHTS = "model.safetensors"
FORMAT = "brcd-hashing-model"
FORMAT_VERSION = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".joblib", ".cloudpickle")
CODES_FORMAT = "brcd-codes"

PathLike = str | os.PathLike


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
    return cfg | {"pretrained": False, "weights": None}


def _build_model(cfg: Mapping[str, Any]):
    from brcd.config import ModelConfig
    from brcd.models.nets import create_hashing_model

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
    from brcd.models.nets import state_mismatch

    missing, unexpected, wrong = state_mismatch(model, state)
    if missing or unexpected or wrong:
        example = (missing or unexpected or wrong)[0]
        raise ValueError(f"{where} do not match the model config ({len(missing)} missing, {len(unexpected)} "
                         f"unexpected, {len(wrong)} wrongly shaped tensors, e.g. {example}); export the full "
                         "model.state_dict() (not trainable_state_dict()) of a model built from this config")


def export_model(model_dir: PathLike, weights: Any, model_config: Any, extra: Mapping[str, Any] | None = None, *,
                 validate: bool = True) -> Path:
    """Write ``model.safetensors`` + ``model.json`` into ``model_dir`` (each atomically, JSON last).

    ``weights``: a safetensors / state-dict file, a state dict, or the model itself (full state dict).
    ``extra`` may set ``image_size`` (default 224), ``resize_then_crop`` (default ``False``), ``mean`` /
    ``std`` (default ImageNet); other keys (teacher, dataset, metrics) go under ``info``. ``validate``
    checks that the weights fit a model rebuilt from ``model_config`` exactly.
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
    spec = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": cfg, "bits": sorted(int(b) for b in bits),
            "image_size": image_size, "resize_then_crop": resize_then_crop, "mean": mean, "std": std,
            "weights": MODEL_WEIGHTS, "weights_sha256": file_sha256(weights_path), "info": extra}
    save_json(model_dir / MODEL_JSON, spec)
    return model_dir


def read_model_spec(model_dir: PathLike) -> dict[str, Any]:
    """The validated ``model.json`` of a model folder."""
    model_dir = Path(model_dir)
    path = model_dir / MODEL_JSON
    if not path.is_file():
        raise ArtifactError(f"{model_dir} is not a brcd model folder ({MODEL_JSON} missing); export one with "
                            "brcd.models.encoder.export_model")
    spec = load_json(path)
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a {FORMAT} description; re-export the model")
    if int(spec.get("format_version", 0)) > FORMAT_VERSION:
        raise ArtifactError(f"{path} has format_version {spec['format_version']}; upgrade brcd to load it")
    return spec


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
    import pandas as pd

    if isinstance(images, pd.Series):
        images = images.tolist()
    elif isinstance(images, pd.DataFrame):
        col = next((c for c in ("path", "image", "images") if c in images.columns), None)
        if col is None and images.shape[1] != 1:
            raise ValueError("a DataFrame of images needs a 'path' or 'image' column, got columns "
                             f"{list(images.columns)}")
        images = (images.iloc[:, 0] if col is None else images[col]).tolist()
    if isinstance(images, (str, os.PathLike)):
        return [images]
    if isinstance(images, np.ndarray):
        if images.dtype.kind in "US":
            return [str(x) for x in images.ravel()]
        if images.dtype == object or images.ndim == 4:
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
        from torchvision.transforms import v2

        from brcd.data.transforms import eval_transform

        # the eval transform of training, with the model's own normalisation
        self.transform = eval_transform(self.image_size, bool(spec.get("resize_then_crop", False)))
        self.transform.transforms[-1] = v2.Normalize(list(spec.get("mean", IMAGENET_MEAN)),
                                                     list(spec.get("std", IMAGENET_STD)))

    @classmethod
    def from_dir(cls, model_dir: PathLike, device: str | torch.device = "cpu", verify: bool = True) -> "HashEncoder":
        model_dir = Path(model_dir)
        spec = read_model_spec(model_dir)
        weights = model_dir / spec.get("weights", MODEL_WEIGHTS)
        expected = spec.get("weights_sha256") if verify and weights.is_file() else None
        if expected and file_sha256(weights) != expected:
            raise ArtifactError(f"{weights} does not match the hash in {model_dir / MODEL_JSON}; the folder was "
                                "modified or half-copied; pull or export it again")
        state = load_state_dict(weights)
        model = _build_model(spec["model"])
        _check_loadable(model, state, f"the weights in {weights}")
        model.load_state_dict(state, strict=True)
        return cls(model, spec, device=device)

    @property
    def max_bits(self) -> int:
        return self.bits[-1]

    def preprocess(self, images: Any) -> torch.Tensor:
        """Images -> normalised float tensor (N, 3, S, S)."""
        if isinstance(images, torch.Tensor) and images.is_floating_point():
            if images.dim() != 4 or images.shape[1] != 3:
                raise ValueError(f"a float tensor input must be transformed images (N, 3, S, S), got "
                                 f"{tuple(images.shape)}")
            return images
        from brcd.data.sources import open_rgb

        if isinstance(images, torch.Tensor):
            images = images.cpu().numpy()
        out = []
        for item in _as_items(images):
            if isinstance(item, (str, os.PathLike)):
                item = open_rgb(item)
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
        if not (isinstance(images, torch.Tensor) and images.is_floating_point()):
            images = _as_items(images.cpu().numpy() if isinstance(images, torch.Tensor) else images)
        chunks = []
        for i in range(0, len(images), batch_size):
            x = self.preprocess(images[i : i + batch_size]).to(self.device)
            chunks.append(self.model.encode(x, bits=bits).cpu().numpy())
        if not chunks:
            return np.zeros((0, bits or self.max_bits), dtype=np.int8)
        return np.concatenate(chunks).astype(np.int8, copy=False)

    __call__ = encode

    def __repr__(self) -> str:
        backbone = self.spec["model"].get("backbone")
        return f"HashEncoder(backbone={backbone!r}, bits={self.bits}, image_size={self.image_size})"


class ImageKind(ModelKind):
    """Image hashing models: a :class:`HashEncoder` from ``model.json`` + ``model.safetensors``."""

    name, spec_file, model_type = "an image model", MODEL_JSON, HashEncoder

    def read_spec(self, folder: Path) -> dict[str, Any]:
        return read_model_spec(folder)

    def load(self, folder: Path, device: str = "cpu", *, encoders_only: bool = False) -> HashEncoder:
        return HashEncoder.from_dir(folder, device=device)

    def files(self, folder: Path, spec: Mapping[str, Any], *, encoders_only: bool = False) -> list[str]:
        return [spec.get("weights", MODEL_WEIGHTS), MODEL_JSON]

    def bits(self, spec: Mapping[str, Any]) -> list[int]:
        return list(spec["bits"])

    def weights_sha256(self, folder: Path, spec: Mapping[str, Any]) -> str:
        return spec.get("weights_sha256") or file_sha256(Path(folder) / spec.get("weights", MODEL_WEIGHTS))

    def summary(self, spec: Mapping[str, Any]) -> str:
        return f"{spec['model']['backbone']}, {spec['bits']} bits, image size {spec['image_size']}"

    def require_texts(self, model: str, option: str) -> None:
        raise ValueError(f"{model} is an image model; {option} needs a cross-modal model "
                         "(`brcd crossmodal` exports and registers one: models:/brcd-crossmodal@champion)")


register(ImageKind())


def pickle_files(model_dir: PathLike) -> list[Path]:
    """Files in a (downloaded) model folder that look like pickles (``*.pkl``, ``python_model.pkl``, ...)."""
    return sorted(p for p in Path(model_dir).rglob("*") if p.is_file() and p.suffix.lower() in _PICKLE_SUFFIXES)


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
        lines = [line.strip() for line in src.read_text().splitlines()]
        paths = list_image_paths([line.split()[0] for line in lines if line and not line.startswith("#")],
                                 src.parent if root is None else root)
        if not paths:
            raise ValueError(f"list file {src} names no images")
        return paths
    return [str(Path(root) / p if root is not None and not Path(p).is_absolute() else Path(p)) for p in images]


def existing_image_paths(images: Any, root: PathLike | None = None) -> list[str]:
    """:func:`list_image_paths`, with a one-line error when any of them does not exist."""
    paths = list_image_paths(images, root)
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise ValueError(f"{len(missing)} of {len(paths)} images do not exist, e.g. {missing[0]}; fix the paths or "
                         "root")
    return paths


def _write_codes(output_path: PathLike, bits: int, batches: Iterable[tuple[np.ndarray, Sequence[str], np.ndarray]],
                 metadata: Mapping[str, Any] | None) -> Path:
    """``(ids, paths, {-1, +1} codes)`` batches to a codes parquet, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = {k: str(v) for k, v in {**codes_metadata(bits), **(metadata or {})}.items()}
    width = (int(bits) + 7) // 8
    schema = pa.schema([("id", pa.int64()), ("path", pa.string()), ("code", pa.binary(width))], metadata=meta)
    with atomic_path(output_path) as tmp, pq.ParquetWriter(str(tmp), schema) as writer:
        for ids, paths, codes in batches:
            packed = pa.py_buffer(np.ascontiguousarray(pack_codes(codes)).tobytes())
            code_arr = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(paths), [None, packed])
            writer.write_batch(pa.record_batch([pa.array(np.asarray(ids, dtype=np.int64)),
                                                pa.array(list(paths), pa.string()), code_arr], schema=schema))
    return Path(output_path)


def write_codes_parquet(output_path: PathLike, codes: np.ndarray, paths: Sequence[str], *,
                        ids: np.ndarray | None = None, metadata: Mapping[str, Any] | None = None) -> Path:
    """{-1, +1} ``codes`` (N, bits) with a ``path`` (any label: a file, ``tags.npy#3``) per row to a
    codes parquet (the layout of :func:`encode_images_to_parquet`), atomically; ids default to 0..N-1."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or len(paths) != codes.shape[0]:
        raise ValueError(f"codes must be (N, bits) with one path per row, got {codes.shape} and {len(paths)} paths")
    ids = np.arange(codes.shape[0], dtype=np.int64) if ids is None else ids
    return _write_codes(output_path, codes.shape[1], [(ids, paths, codes)], metadata)


def encode_images_to_parquet(encoder: Any, images: Any, output_path: PathLike, batch_size: int = 64,
                             *, bits: int | None = None, root: PathLike | None = None,
                             metadata: Mapping[str, Any] | None = None) -> Path:
    """Encode images and write ``id`` (int64), ``path`` (string), ``code`` (fixed_size_binary(ceil(bits/8)),
    :func:`brcd.codes.pack_codes` layout) to a parquet file (atomically); schema metadata ``bits``
    (plus ``metadata``)."""
    paths = existing_image_paths(images, root)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    def encoded():
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            codes = encoder.encode(chunk, bits=bits) if bits else encoder.encode(chunk)
            yield np.arange(start, start + len(chunk)), chunk, np.asarray(codes)

    batches = encoded()
    first = next(batches, None)  # the code length comes from the first batch
    n_bits = first[2].shape[1] if first is not None else bits or getattr(encoder, "max_bits", None)
    if not n_bits:
        raise ValueError("no images to encode and the encoder's bits are unknown; pass bits=")
    return _write_codes(output_path, n_bits, itertools.chain([first] if first else [], batches), metadata)


def read_codes_parquet(path: PathLike) -> tuple[np.ndarray, list[str], np.ndarray, int]:
    """``(ids int64 (N,), paths, packed uint8 (N, ceil(bits/8)), bits)`` of a file from
    :func:`encode_images_to_parquet`, or of a sharded folder written by ``brcd encode --actors N``."""
    import pyarrow.parquet as pq

    path = Path(path)
    if path.is_dir():
        return _read_codes_shards(path)
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


def _read_codes_shards(folder: Path) -> tuple[np.ndarray, list[str], np.ndarray, int]:
    from brcd.shards import open_sharded

    out = open_sharded(folder)
    fp = out.fingerprint
    if fp.get("format") != CODES_FORMAT or "bits" not in fp or not {"id", "path", "code"} <= set(out):
        raise ArtifactError(f"{folder} is a sharded folder but not of codes (format {fp.get('format')!r}); pass the "
                            "folder written by `brcd encode --actors N` or a codes parquet file")
    return (out["id"].to_array(), out["path"].to_array().tolist(), out["code"].to_array(), int(fp["bits"]))


def codes_metadata(bits: int) -> dict[str, Any]:
    """What every codes parquet says about itself (schema metadata): the code length and packing."""
    return {"bits": int(bits), "packing": "numpy.packbits MSB-first, bit 1 = +1", "format": CODES_FORMAT}


def codes_fingerprint(model_dir: PathLike, paths: Sequence[str], bits: int | None = None) -> dict[str, Any]:
    """The identity of "these images encoded by this model at this length": a sharded codes folder
    with another fingerprint is never resumed into."""
    import hashlib

    kind = kind_of(model_dir)
    spec = kind.read_spec(Path(model_dir))
    digest = hashlib.sha256("\n".join(paths).encode()).hexdigest()[:16]
    return {**codes_metadata(int(bits or kind.bits(spec)[-1])), "model_sha256": kind.weights_sha256(model_dir, spec),
            "images": len(paths), "images_sha256": digest}


def _load_encoder_dir(folder: PathLike, device: str) -> Any:
    return kind_of(folder).load(Path(folder), device, encoders_only=True)


class CodesPredictor:
    """``predictor(start, stop) -> {"id", "path", "code"}`` for images ``paths[start:stop]``: the
    columns of :func:`encode_images_to_parquet`, computed the same way (batches of ``batch_size``
    from ``start``; with shards a multiple of ``batch_size`` the batches are the single-process ones).

    The model comes as a folder or as the bytes of its files (``model_files``: name -> bytes, what a
    Ray actor on another node receives, written to a private temporary folder and loaded from there).
    """

    def __init__(self, paths: Sequence[str], *, model_dir: PathLike | None = None,
                 model_files: Mapping[str, bytes] | None = None, bits: int | None = None, batch_size: int = 64,
                 device: str = "cpu"):
        import tempfile

        if (model_dir is None) == (model_files is None):
            raise ValueError("CodesPredictor needs exactly one of model_dir or model_files")
        if model_files is not None:
            with tempfile.TemporaryDirectory(prefix="brcd-model-") as tmp:
                for name, data in model_files.items():
                    (Path(tmp) / Path(name).name).write_bytes(data)
                self.encoder = _load_encoder_dir(tmp, device)
        else:
            self.encoder = _load_encoder_dir(model_dir, device)
        self.paths = list(paths)
        self.bits = bits if bits and bits != self.encoder.max_bits else None
        self.batch_size = int(batch_size)

    def __call__(self, start: int, stop: int) -> dict[str, np.ndarray]:
        chunk = self.paths[start:stop]
        codes = self.encoder.encode(chunk, bits=self.bits, batch_size=self.batch_size)
        return {"id": np.arange(start, stop, dtype=np.int64), "path": np.array(chunk, dtype=str),
                "code": pack_codes(codes)}
