"""Atomic, pickle-free file I/O shared by every artifact the project writes.

Data is written to a temporary file in the target folder and renamed into place, so a crash or a full disk
never leaves a half-written file under the final name. Weights are safetensors, metadata JSON, arrays
``.npz`` loaded with ``allow_pickle=False``: nothing here unpickles.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import numpy as np

if TYPE_CHECKING:
    import torch

# torch, safetensors and pyarrow are imported by the functions that need them: reading configs and
# JSON (the CLI's parser, `brcd --help`) should not pay their import time.


def _is_tensor(obj: Any) -> bool:
    torch = sys.modules.get("torch")  # not imported yet -> obj cannot be a tensor
    return torch is not None and isinstance(obj, torch.Tensor)


PathLike = str | os.PathLike


class ArtifactError(RuntimeError):
    """An artifact on disk is missing, corrupt, or belongs to another run."""


# mkstemp makes 0600 files; an artifact gets the mode of a plain open() (0644 under the usual umask), so a
# tracking server or another user of the cluster can read what a run wrote
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` if the block succeeds (a one-line
    :class:`OSError` naming the folder when it cannot be written)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OSError(
            f"cannot write to {path.parent} ({exc.strerror or exc}); choose a writable --output folder"
        ) from exc
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        if isinstance(exc, OSError) and exc.errno is not None:
            raise OSError(
                exc.errno, f"could not write {path} ({exc.strerror}); free disk space or choose another --output"
            ) from exc
        raise


def write_bytes(path: PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def json_default(obj: Any) -> Any:
    """JSON form of numpy scalars and arrays, tensors and paths (``json.dumps(default=...)``)."""
    if isinstance(obj, (np.integer, np.floating, np.ndarray)) or _is_tensor(obj):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def existing_file(path: PathLike, what: str = "") -> Path:
    """``Path(path)``, or a one-line :class:`ArtifactError` ``"<what><path> does not exist"``."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{what}{path} does not exist")
    return path


def save_json(path: PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=json_default) + "\n")


def load_json(path: PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc.msg}); delete it and re-run the step that writes it") from None


def save_arrays(path: PathLike, **arrays: np.ndarray) -> Path:
    """Save named numpy arrays as an uncompressed ``.npz`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **{k: np.asarray(v) for k, v in arrays.items()})
    return Path(path)


def load_arrays(path: PathLike) -> dict[str, np.ndarray]:
    """Load an ``.npz`` written by :func:`save_arrays` (object arrays refused: no unpickling)."""
    path = existing_file(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except ValueError as exc:
        raise ArtifactError(f"{path} holds pickled objects or is corrupt ({exc}); refusing to load it") from None


def save_state_dict(path: PathLike, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Path:
    """Save tensors as safetensors, atomically. Tensors are made contiguous and moved to CPU."""
    from safetensors.torch import save_file as _st_save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    with atomic_path(path) as tmp:
        _st_save(tensors, str(tmp), metadata=dict(metadata or {}))
    return Path(path)


def load_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """Load safetensors weights; a pickle (or any other format) is refused with a clear error."""
    from safetensors.torch import load_file as _st_load

    path = existing_file(path, "checkpoint ")
    try:
        return _st_load(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise ArtifactError(
            f"{path} is not a safetensors file ({type(exc).__name__}); refusing to load it "
            "(pickled checkpoints are never loaded)"
        ) from None


def load_torch_weights(path: PathLike) -> dict[str, torch.Tensor]:
    """Load third-party weights: safetensors, or a ``torch.save`` state dict with ``weights_only=True``."""
    path = existing_file(path, "weights file ")
    if path.suffix == ".safetensors":
        return load_state_dict(path)
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ArtifactError(
            f"{path} could not be loaded with weights_only=True ({type(exc).__name__}); "
            "provide a safetensors file or a plain state dict"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ArtifactError(f"{path} does not hold a state dict")
    return obj


def binary_column(arr: np.ndarray):
    """``uint8`` rows (n, w) as a pyarrow fixed-size binary array (packed codes in parquet)."""
    import pyarrow as pa

    data = pa.py_buffer(np.ascontiguousarray(arr).tobytes())
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(arr.shape[1]), arr.shape[0], [None, data])


def binary_to_numpy(col) -> np.ndarray:
    """A pyarrow fixed-size binary array (n values of w bytes) as a ``uint8`` array (n, w), copied."""
    n, width = len(col), col.type.byte_width
    buf = col.buffers()[1]
    if n == 0 or buf is None:
        return np.zeros((n, width), dtype=np.uint8)
    return np.frombuffer(buf, dtype=np.uint8, count=n * width, offset=col.offset * width).reshape(n, width).copy()


def stable_hash(obj: Any, length: int = 12) -> str:
    """Short hex key of a JSON-able object (sorted keys; other objects by ``str``): settings keys, folder names."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def settings_hash(*parts: Any) -> str:
    """The key of a stage's settings (its cache folder and its ``settings_hash`` in ``info.json``)."""
    return stable_hash(list(parts), 10)


def file_sha256(path: PathLike) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def array_fingerprint(*arrays: np.ndarray | torch.Tensor) -> str:
    """A short content hash of arrays (dtype, shape and bytes), for manifests."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a.detach().cpu().numpy() if _is_tensor(a) else a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]
