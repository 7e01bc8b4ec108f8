"""A sharded output folder: rows ``[0, num_rows)`` of a batch-inference job, written shard by shard.

The folder of a job (any number of writers, each writing whole shards) holds::

    fingerprint.json               the job: its fingerprint dict, num_rows, shard_rows, writer (written first)
    shard-00000.<column>.npy       writer "npy": one array per output column (rows [start, stop))
    shard-00000.parquet            writer "parquet": every column in one file (schema metadata: the fingerprint)
    shard-00000.done.json          the shard's completion marker, written atomically after its files

A shard counts as finished only when its marker exists, belongs to this job (the hash of
``fingerprint.json``) and every file it lists has the recorded size, so a shard whose writer died
half-way is never trusted and is written again on resume. Reopening a folder with another
fingerprint (other model weights, other inputs) is an error, never a silent mix of two jobs.

:func:`open_sharded` reads a complete folder back as lazy per-column arrays. The parallel writers
live in ``pipelines/ray/batch_inference.py``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import socket
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from brcd.io import (ArtifactError, PathLike, atomic_path, binary_column, binary_to_numpy, json_default, load_json,
                     save_json)

__all__ = ["FINGERPRINT_JSON", "ShardJob", "ShardedColumn", "ShardedOutput", "WRITERS", "finished_shards",
           "open_sharded", "plan_shards", "read_job", "shard_marker", "shard_npy", "shard_parquet", "start_sharded"]

FORMAT = "brcd-shards/1"
FINGERPRINT_JSON = "fingerprint.json"
WRITERS = ("npy", "parquet")
_COLUMN = re.compile(r"^[A-Za-z0-9_]+$")  # column names become file names


def shard_stem(shard: int) -> str:
    return f"shard-{int(shard):05d}"


def shard_marker(out_dir: PathLike, shard: int) -> Path:
    return Path(out_dir) / f"{shard_stem(shard)}.done.json"


def shard_npy(out_dir: PathLike, shard: int, column: str) -> Path:
    return Path(out_dir) / f"{shard_stem(shard)}.{column}.npy"


def shard_parquet(out_dir: PathLike, shard: int) -> Path:
    return Path(out_dir) / f"{shard_stem(shard)}.parquet"


def plan_shards(num_rows: int, shard_rows: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``[0, num_rows)`` in pieces of ``shard_rows`` (the last may be shorter)."""
    for name, value, low, what in (("num_rows", num_rows, 0, "non-negative"),
                                   ("shard_rows", shard_rows, 1, "positive")):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be a {what} integer, got {value!r}")
    return [(s, min(s + int(shard_rows), int(num_rows))) for s in range(0, int(num_rows), int(shard_rows))]


def _canonical(obj: Any) -> Any:
    """The JSON form of ``obj`` (tuples become lists, numpy scalars numbers): what a reopen compares."""
    try:
        return json.loads(json.dumps(obj, sort_keys=True, default=json_default))
    except TypeError as exc:
        raise ValueError(f"the fingerprint must be JSON-serialisable ({exc}); use strings and numbers") from None


def _mismatch(stored: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    def short(v: Any) -> str:
        text = json.dumps(v, sort_keys=True)
        return text if len(text) <= 40 else text[:37] + "..."

    keys = sorted(set(stored) | set(now))
    return [f"{k} (stored {short(stored.get(k))}, now {short(now.get(k))})" for k in keys if stored.get(k) != now.get(k)]


@dataclasses.dataclass(frozen=True)
class ShardJob:
    """One sharded job's folder and plan; cheap to pickle to the writers (Ray actors)."""

    out_dir: str
    num_rows: int
    shard_rows: int
    writer: str
    fingerprint: dict
    job_id: str  # hash of the job record: markers of another job are not trusted

    @property
    def bounds(self) -> list[tuple[int, int]]:
        return plan_shards(self.num_rows, self.shard_rows)

    @property
    def num_shards(self) -> int:
        return len(self.bounds)

    def finished(self) -> list[int]:
        """The shards whose files are complete."""
        return [i for i, b in enumerate(self.bounds) if _marker_ok(self, i, b) is not None]

    def unfinished(self) -> list[int]:
        done = set(self.finished())
        return [i for i in range(self.num_shards) if i not in done]

    def write_shard(self, shard: int, outputs: Mapping[str, np.ndarray], seconds: float | None = None) -> dict:
        """Write shard ``shard``'s columns (each with ``stop - start`` rows), then its marker; returns the marker."""
        bounds = self.bounds
        if not 0 <= int(shard) < len(bounds):
            raise ValueError(f"shard {shard} is not in this job's plan (0..{len(bounds) - 1})")
        start, stop = bounds[int(shard)]
        arrays = _check_outputs(outputs, stop - start, f"shard {shard} (rows {start}..{stop})")
        out = Path(self.out_dir)
        if self.writer == "npy":
            files = {name: _write_npy(shard_npy(out, shard, name), arr) for name, arr in arrays.items()}
        else:
            path = _write_parquet(shard_parquet(out, shard), arrays, self.fingerprint)
            files = {name: path for name in arrays}
        columns = [{"name": name, "dtype": arr.dtype.str, "shape": list(arr.shape[1:]), "file": files[name].name}
                   for name, arr in arrays.items()]  # a list: the predictor's column order survives sorted JSON
        sizes = {p.name: p.stat().st_size for p in set(files.values())}
        # who wrote it (host, pid): on a cluster, which node's disk and process a shard came from
        marker = {"job": self.job_id, "shard": int(shard), "start": start, "stop": stop, "columns": columns,
                  "bytes": sizes, "seconds": None if seconds is None else float(seconds),
                  "host": socket.gethostname(), "pid": os.getpid()}
        save_json(shard_marker(out, shard), marker)
        return marker


def start_sharded(out_dir: PathLike, fingerprint: Mapping[str, Any], *, num_rows: int, shard_rows: int,
                  writer: str = "npy") -> ShardJob:
    """Create (or reopen, to resume) the folder of a job; ``fingerprint.json`` is written when it starts.

    Reopening with another fingerprint, row count, shard size or writer raises :class:`ArtifactError`
    naming what differs. A killed writer's temporary files are removed (call this once, from the driver).
    """
    if writer not in WRITERS:
        raise ValueError(f"writer must be one of {', '.join(WRITERS)}, got {writer!r}")
    plan_shards(num_rows, shard_rows)  # validates both
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; sharded outputs need a folder (choose another --output)")
    record = {"format": FORMAT, "num_rows": int(num_rows), "shard_rows": int(shard_rows), "writer": writer,
              "fingerprint": _canonical(dict(fingerprint))}
    path = out / FINGERPRINT_JSON
    if path.is_file():
        flat = [{**r["fingerprint"], **{k: r.get(k) for k in ("num_rows", "shard_rows", "writer")}}
                for r in (_read_record(out), record)]
        if diff := _mismatch(*flat):
            raise ArtifactError(
                f"{out} holds the shards of another job ({'; '.join(diff)}); write to another folder, or delete "
                f"{out} to start over (re-run with the original inputs to resume it)")
    else:
        if out.is_dir() and any(out.glob("shard-*")):
            raise ArtifactError(f"{out} holds shard files but no {FINGERPRINT_JSON}; delete the folder or write to another one")
        save_json(path, record)
    for tmp in out.glob(".shard-*.tmp"):  # a killed writer's half file (atomic_path's temporary name)
        tmp.unlink(missing_ok=True)
    return _job(out, record)


def _job(out: Path, record: Mapping[str, Any]) -> ShardJob:
    job_id = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
    return ShardJob(str(out), int(record["num_rows"]), int(record["shard_rows"]), str(record["writer"]),
                    dict(record["fingerprint"]), job_id)


def _read_record(out: Path) -> dict:
    path = out / FINGERPRINT_JSON
    if not path.is_file():
        raise ArtifactError(f"{out} is not a sharded output folder ({FINGERPRINT_JSON} missing); run the job that writes it")
    record = load_json(path)
    if not isinstance(record, dict) or record.get("format") != FORMAT or record.get("writer") not in WRITERS:
        raise ArtifactError(f"{path} is not a {FORMAT} job record; delete {out} and run the job again")
    try:
        plan_shards(record["num_rows"], record["shard_rows"])
    except (KeyError, ValueError):
        raise ArtifactError(f"{path} has a corrupt plan (num_rows / shard_rows); delete {out} and run the job again") from None
    return record


def read_job(out_dir: PathLike) -> ShardJob:
    """The job recorded in ``out_dir/fingerprint.json``."""
    return _job(Path(out_dir), _read_record(Path(out_dir)))


def _check_outputs(outputs: Mapping[str, Any], rows: int, where: str) -> dict[str, np.ndarray]:
    if not isinstance(outputs, Mapping) or not outputs:
        raise ValueError(f"{where}: the predictor must return a non-empty dict of column name -> array, "
                         f"got {type(outputs).__name__}")
    arrays = {}
    for name, value in outputs.items():
        if not isinstance(name, str) or not _COLUMN.match(name):
            raise ValueError(f"{where}: column name {name!r} must be letters, digits and '_' (it names files)")
        arr = np.asarray(value)
        if arr.dtype == object:
            raise ValueError(f"{where}: column {name!r} is an object array; return numeric, bool or str arrays")
        if arr.ndim == 0 or arr.shape[0] != rows:
            raise ValueError(f"{where}: column {name!r} has shape {arr.shape}, expected {rows} rows (leading dim)")
        arrays[name] = np.ascontiguousarray(arr)
    return arrays


def _write_npy(path: Path, arr: np.ndarray) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, arr, allow_pickle=False)
    return path


def _arrow_column(arr: np.ndarray):
    """1-D arrays as they are, (n, w) uint8 as fixed-size binary (packed codes), other shapes as
    fixed-size lists of the flattened trailing dims."""
    import pyarrow as pa

    if arr.ndim == 1:
        return pa.array(arr)
    if arr.ndim == 2 and arr.dtype == np.uint8:
        return binary_column(arr)
    width = int(np.prod(arr.shape[1:]))
    return pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), width)


def _write_parquet(path: Path, arrays: Mapping[str, np.ndarray], fingerprint: Mapping[str, Any]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # every shard carries the job's fingerprint, so one shard file describes itself (e.g. a codes
    # file's "bits") when it is read on its own
    table = pa.table({name: _arrow_column(arr) for name, arr in arrays.items()})
    table = table.replace_schema_metadata(
        {str(k): v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in fingerprint.items()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def _numpy_column(col, dtype: np.dtype, trailing: Sequence[int]) -> np.ndarray:
    import pyarrow as pa

    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_fixed_size_binary(col.type):
        return binary_to_numpy(col)
    if pa.types.is_fixed_size_list(col.type):
        return np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=dtype).reshape(len(col), *trailing)
    return np.asarray(col.to_numpy(zero_copy_only=False), dtype=dtype)


def _marker_ok(job: ShardJob, shard: int, bounds: tuple[int, int]) -> dict | None:
    path = shard_marker(job.out_dir, shard)
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("job") != job.job_id or (marker.get("start"), marker.get("stop")) != bounds:
        return None
    for name, size in (marker.get("bytes") or {}).items():
        try:
            if (Path(job.out_dir) / name).stat().st_size != size:
                return None
        except OSError:
            return None
    return marker


def finished_shards(out_dir: PathLike) -> list[int]:
    """The shards of ``out_dir`` whose files are complete (``[]`` for a folder without a job yet)."""
    out = Path(out_dir)
    if not (out / FINGERPRINT_JSON).is_file():
        return []
    return read_job(out).finished()


class ShardedColumn:
    """One column of a complete sharded folder, ``shape`` ``(num_rows, *trailing)``: ``take(indices)``
    opens only the shards the rows fall in; ``to_array()`` reads everything."""

    def __init__(self, out: Path, name: str, writer: str, markers: Sequence[Mapping[str, Any]], mmap: bool):
        self.name = name
        self._out, self._writer, self._mmap = out, writer, mmap
        specs = [next(c for c in m["columns"] if c["name"] == name) for m in markers]
        self._starts = np.array([m["start"] for m in markers], dtype=np.int64)
        self._stops = np.array([m["stop"] for m in markers], dtype=np.int64)
        self._files = [s["file"] for s in specs]
        trailing = {tuple(s["shape"]) for s in specs}
        if len(trailing) > 1:
            raise ArtifactError(f"{out}: column {name!r} has different shapes in different shards ({sorted(trailing)}); "
                                "the predictor must return the same trailing shape for every shard")
        self._trailing = trailing.pop() if trailing else ()
        self.dtype = np.result_type(*[np.dtype(s["dtype"]) for s in specs]) if specs else np.dtype(np.float32)
        self.shape = (int(self._stops[-1]) if len(self._stops) else 0, *self._trailing)
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.shape[0]

    def _shard(self, i: int) -> np.ndarray:
        arr = self._cache.get(i)
        if arr is None:
            path = self._out / self._files[i]
            if self._writer == "npy":
                arr = np.load(path, mmap_mode="r" if self._mmap else None, allow_pickle=False)
                if self._mmap:  # memory maps cost no memory until read; keep them open
                    self._cache[i] = arr
            else:
                import pyarrow.parquet as pq

                table = pq.read_table(path, columns=[self.name])
                arr = _numpy_column(table.column(self.name), self.dtype, self._trailing)
        return arr

    def take(self, indices: Any) -> np.ndarray:
        idx = np.asarray(indices)
        if idx.size and not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"indices must be integers, got dtype {idx.dtype}")
        idx = idx.astype(np.int64, copy=False)
        flat = idx.ravel()
        n = len(self)
        if flat.size and (flat.min() < 0 or flat.max() >= n):
            bad = flat[(flat < 0) | (flat >= n)][0]
            raise IndexError(f"row {int(bad)} is out of range for column {self.name!r} with {n} rows")
        out = np.empty((flat.size, *self._trailing), dtype=self.dtype)
        shard_of = np.searchsorted(self._starts, flat, side="right") - 1
        order = np.argsort(shard_of, kind="stable")
        cuts = np.flatnonzero(np.diff(shard_of[order])) + 1
        for group in np.split(order, cuts) if flat.size else []:
            s = int(shard_of[group[0]])
            out[group] = self._shard(s)[flat[group] - self._starts[s]]
        return out.reshape(*idx.shape, *self._trailing)

    def to_array(self) -> np.ndarray:
        out = np.empty(self.shape, dtype=self.dtype)
        for i, (a, b) in enumerate(zip(self._starts, self._stops)):
            out[a:b] = self._shard(i)
        return out


class ShardedOutput(dict):
    """A complete sharded folder: ``out["code"]`` is a :class:`ShardedColumn`; ``fingerprint`` the job's."""

    def __init__(self, job: ShardJob, columns: Mapping[str, ShardedColumn]):
        super().__init__(columns)
        self.job, self.fingerprint, self.num_rows = job, dict(job.fingerprint), job.num_rows

    def __missing__(self, name: str) -> ShardedColumn:
        raise KeyError(f"no column {name!r} in {self.job.out_dir}; columns: {', '.join(self)}")


def open_sharded(out_dir: PathLike, expect_fingerprint: Mapping[str, Any] | None = None, mmap: bool = True) -> ShardedOutput:
    """Open a complete sharded folder; refuses, in one line, a folder with missing shards or
    (with ``expect_fingerprint``) one written by another job."""
    out = Path(out_dir)
    job = read_job(out)
    if expect_fingerprint is not None:
        if diff := _mismatch(job.fingerprint, _canonical(dict(expect_fingerprint))):
            raise ArtifactError(f"{out} was written by another job ({'; '.join(diff)}); run the job for these inputs "
                                "into another folder")
    bounds = job.bounds
    markers = [_marker_ok(job, i, b) for i, b in enumerate(bounds)]
    missing = [i for i, m in enumerate(markers) if m is None]
    if missing:
        raise ArtifactError(
            f"{out} is incomplete: {len(missing)} of {len(bounds)} shards missing (first: shard {missing[0]}, rows "
            f"{bounds[missing[0]][0]}..{bounds[missing[0]][1]}); run the same job again to resume it")
    names = [c["name"] for c in markers[0]["columns"]] if markers else []
    for i, m in enumerate(markers):
        if [c["name"] for c in m["columns"]] != names:
            raise ArtifactError(f"{out}: shard {i} has columns {[c['name'] for c in m['columns']]}, shard 0 has {names}; the "
                                "predictor must return the same columns for every shard (delete the folder and re-run)")
    return ShardedOutput(job, {name: ShardedColumn(out, name, job.writer, markers, mmap) for name in names})

