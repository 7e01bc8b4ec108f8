"""The search service: image(s) in, top-k ids + distances out, over HTTP (``brcd serve``; docs/SEARCH.md).

    brcd serve --model models:/brcd-student@champion --run-dir runs/demo --index db.parquet [--port 8000]
               [--symmetric-index student_db.parquet]

``GET /`` (the page), ``POST /search``, ``GET /thumbnail``, ``GET /health``: docs/SEARCH.md says what each
takes and answers. Requests are batched (one encoder pass and one index search per batch); for an alias
the replica loads the moved version *first* and then swaps one reference, so no request in flight is
dropped or answered by a half-loaded model. Answers are ranked by (Hamming distance, id). Several index
files are served as shards, one Ray actor each, merged by :func:`merge_topk`.

:class:`SearchCore` and its ASGI app :func:`create_app` need no Ray (the tests run them under plain
uvicorn); :class:`SearchService` is the Serve deployment around them.
"""

# No ``from __future__ import annotations`` here: FastAPI resolves the endpoints' annotations
# (Request) from the functions Serve wraps, which live in Serve's module, not this one.
import asyncio
import base64
import binascii
import functools
import importlib
import io
import json
import logging
import os
import re
import stat
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["ASYMMETRIC", "SYMMETRIC", "BadRequest", "LoadedModel", "ModelWatcher", "NamedIndex", "SearchCore",
           "ShardSearcher", "build_app", "create_app", "decode_image", "decode_image_bytes", "encode_packed", "health",
           "merge_answers", "merge_topk", "search_inputs", "open_index", "read_thumbnail", "request_stop",
           "start_service", "stop_service", "wait_until_stopped"]

log = logging.getLogger("ray.serve")  # lands in the replica's Serve log

MAX_IMAGES_PER_REQUEST = 256
MAX_K = 10_000
APP_NAME = "brcd-search"
#: the names of the indexes a service holds: ``--index`` (the database encoded by the teacher: student
#: queries against it are asymmetric search) and ``--symmetric-index`` (the same database encoded by the student)
ASYMMETRIC, SYMMETRIC = "asymmetric", "symmetric"
#: thumbnails are at most this many pixels on their longer side, from files of at most this many bytes
THUMBNAIL_PX = 160
MAX_THUMBNAIL_SOURCE_BYTES = 64 * 1024 * 1024
PAGE = Path(__file__).with_name("search_page.html")


# --------------------------------------------------------------------------------------------
# pure parts (no Ray): merging shard answers, opening an index, decoding images, the model watcher
# --------------------------------------------------------------------------------------------


def merge_topk(distances: Sequence[np.ndarray], ids: Sequence[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The global top-``k`` of per-shard top-k answers (each ``(nq, k_s)``; id ``-1`` pads), ranked by
    (distance, id) ascending: what one index over the union of the shards answers, provided every
    shard returned its own top-``k`` (or all its codes) and the shards' ids are disjoint."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if not distances or len(distances) != len(ids):
        raise ValueError(f"merge_topk needs one ids array per distances array, got {len(distances)} and {len(ids)}")
    d = np.concatenate([np.asarray(x, dtype=np.int64) for x in distances], axis=1)
    i = np.concatenate([np.asarray(x, dtype=np.int64) for x in ids], axis=1)
    if d.shape != i.shape:
        raise ValueError(f"distances {d.shape} and ids {i.shape} differ in shape")
    # fewer than k hits in all the shards together: padded to k columns with id -1
    d, i = (np.pad(x, ((0, 0), (0, max(0, k - x.shape[1]))), constant_values=-1) for x in (d, i))
    pad = i < 0
    d = np.where(pad, np.iinfo(np.int64).max, d)  # padding ranks after every real hit
    order = np.lexsort((np.where(pad, np.iinfo(np.int64).max, i), d), axis=1)[:, :k]
    out_d = np.take_along_axis(d, order, axis=1)
    out_i = np.take_along_axis(i, order, axis=1)
    int32_max = np.iinfo(np.int32).max
    return np.minimum(out_d, int32_max).astype(np.int32), np.where(out_d >= int32_max, -1, out_i)


def open_index(path: str | os.PathLike, loader: str | None = None) -> tuple[Any, dict[int, str] | None]:
    """``(index, paths by id or None)`` of an index file: a :meth:`HammingIndex.save` file, a
    :meth:`brcd.search.mih.MultiIndexHashingIndex.save` file, a codes parquet of ``brcd encode`` or its sharded
    folder; ``loader`` (``"module:function"``) opens anything else."""
    from brcd.io import ArtifactError

    path = Path(path)
    if loader:
        module, _, name = loader.partition(":")
        if not module or not name:
            raise ValueError(f"index_loader must be 'module:function', got {loader!r}")
        try:
            load = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot import the index loader {loader!r} ({exc}); "
                             "give an importable 'module:function'") from None
        return load(str(path)), None
    if not path.exists():
        raise ArtifactError(f"index {path} does not exist; pass a file from HammingIndex.save or `brcd encode`")
    from brcd.search import HammingIndex, load_index

    if path.is_file():
        import pyarrow.parquet as pq

        try:  # a MultiIndexHashingIndex.save file is a zip, a HammingIndex.save parquet has a format tag
            saved = zipfile.is_zipfile(path) or b"brcd.format" in (pq.read_schema(path).metadata or {})
        except Exception:  # noqa: BLE001 - pyarrow raises several types
            raise ArtifactError(f"{path} is not a parquet index or codes file; rebuild it") from None
        if saved:
            return load_index(path), None
    from brcd.models.encoder import read_codes_parquet

    ids, paths, packed, bits = read_codes_parquet(path)
    index = HammingIndex(bits)
    index.add_packed(packed, ids)
    return index, dict(zip(ids.tolist(), paths))


def decode_image(text: str, where: str = "image"):
    """A base64 PNG / JPEG (any format PIL reads) -> an RGB PIL image; ``ValueError`` in one line."""
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise ValueError(f"{where} is not base64 text; send the PNG or JPEG file's bytes base64-encoded") from None
    return decode_image_bytes(data, where)


def decode_image_bytes(data: bytes, where: str = "image"):
    """PNG / JPEG file bytes (any format PIL reads) -> an RGB PIL image; ``ValueError`` in one line."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{where} is not a readable PNG or JPEG image ({type(exc).__name__})") from None


#: what a client may send to /search, said in every 4xx about the body
HOW_TO_SEND = ('send JSON {"images": ["<base64 PNG/JPEG>", ...], "k": 10}, a PNG or JPEG file as the body '
               "(Content-Type image/png, image/jpeg or application/octet-stream; k as ?k=10), or multipart/form-data "
               "with one or more image files")
RAW_IMAGE_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/webp", "image/bmp", "application/octet-stream")


class BadRequest(ValueError):
    """A request the service cannot answer: ``status`` (400, 404, 413, 415, 422) and one line."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def parse_k(value: Any, default: int = 10) -> int:
    """``k`` from a query parameter, form field or JSON value: an integer in [1, MAX_K]."""
    if value is None or value == "":
        return default
    try:
        k = int(value) if not isinstance(value, bool) and float(value) == int(float(value)) else None
    except (TypeError, ValueError, OverflowError):
        k = None
    if k is None or not 1 <= k <= MAX_K:
        raise BadRequest(422, f"k must be an integer from 1 to {MAX_K}, got {str(value)[:40]!r}")
    return k


def search_inputs(content_type: str | None, body: bytes = b"", *, query_k: str | None = None,
                  files: Sequence[tuple[str, bytes]] = (), form_k: str | None = None) -> tuple[list, int]:
    """The images and ``k`` of a /search request, by its Content-Type (``files``: the uploaded files
    of a multipart form, parsed by the caller). Raises :class:`BadRequest` with what to send."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind in RAW_IMAGE_TYPES:
        if not body:
            raise BadRequest(422, f"the body is empty; {HOW_TO_SEND}")
        try:
            return [decode_image_bytes(body, "the body")], parse_k(query_k)
        except ValueError as exc:
            raise BadRequest(422, f"{exc}; {HOW_TO_SEND}") from None
    if kind == "application/json":
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise BadRequest(400, f"the body is not JSON; {HOW_TO_SEND}") from None
        if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not data["images"]:
            raise BadRequest(422, f'JSON needs "images": a non-empty list of base64 strings; {HOW_TO_SEND}')
        items = [(text, f"image {n}") for n, text in enumerate(data["images"])]
        k, decode, status = data.get("k", query_k), decode_image, 400
    elif kind == "multipart/form-data":
        if not files:
            raise BadRequest(422, f"the form holds no image file; {HOW_TO_SEND}")
        items = [(data, f"file {name!r}") for name, data in files]
        k, decode, status = form_k if form_k not in (None, "") else query_k, decode_image_bytes, 422
    else:
        raise BadRequest(415, f"Content-Type {kind or '(none)'} is not accepted; {HOW_TO_SEND}")
    if len(items) > MAX_IMAGES_PER_REQUEST:
        raise BadRequest(413, f"at most {MAX_IMAGES_PER_REQUEST} images per request, got {len(items)}")
    if decode is decode_image and not all(isinstance(text, str) for text, _ in items):
        raise BadRequest(422, "every entry of images must be a base64 string")
    k = parse_k(k)
    try:
        return [decode(data, where) for data, where in items], k
    except ValueError as exc:
        raise BadRequest(status, str(exc)) from None


@dataclass(frozen=True)
class LoadedModel:
    """One model version, ready: what a batch holds on to while it runs."""

    encoder: Any
    uri: str  # what was loaded: models:/name/<version> or a folder
    version: str | None
    name: str | None
    loaded_at: float = field(default_factory=time.time)


class ModelWatcher:
    """Keeps the version behind a ``models:/name@alias`` loaded (or a fixed model folder / version): a moved
    alias's version is loaded and checked completely, then published with one assignment to :attr:`current`;
    a failed load leaves the old model serving and is reported in :attr:`last_error`."""

    def __init__(self, model: str, *, bits: int, tracking_uri: str | None = None, poll_s: float = 10.0,
                 device: str = "cpu"):
        self.model, self.bits, self.tracking_uri, self.device = str(model), int(bits), tracking_uri, device
        self.poll_s = float(poll_s)
        self.swaps = 0
        self.last_error: str | None = None
        self.last_check: float | None = None
        self._watch = self.model.startswith("models:/") and "@" in self.model
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.current: LoadedModel = self._load(self._resolve())

    def _resolve(self) -> tuple[str, str | None, str | None]:
        """``(uri to load, version, name)``: an alias is pinned to its current version, so the alias
        moving again during the download cannot mix two versions."""
        if not self.model.startswith("models:/"):
            return self.model, None, None
        from brcd.mlflow.registry import resolve_model_version

        mv = resolve_model_version(self.model, self.tracking_uri)
        if mv is None:  # models:/<logged model id>
            return self.model, None, None
        return f"models:/{mv.name}/{mv.version}", str(mv.version), mv.name

    def _load(self, target: tuple[str, str | None, str | None]) -> LoadedModel:
        from brcd.mlflow.registry import load_encoder

        uri, version, name = target
        encoder = load_encoder(uri, tracking_uri=self.tracking_uri, device=self.device)
        if self.bits not in encoder.bits:
            raise ValueError(f"{uri} emits {encoder.bits} bits but the index holds {self.bits}-bit codes; "
                             "register a model of the index's code length or serve another index")
        return LoadedModel(encoder, uri, version, name)

    @property
    def alias(self) -> str | None:
        """The alias followed (``champion`` of ``models:/name@champion``); None for a version or a folder."""
        return self.model.rpartition("@")[2] if self._watch else None

    def check(self) -> bool:
        """Poll once; True when a new version was published."""
        self.last_check = time.time()
        if not self._watch:
            return False
        try:
            target = self._resolve()
            if target[1] == self.current.version:
                return False
            loaded = self._load(target)
        except Exception as exc:  # noqa: BLE001 - keep serving the old model, say why on /health
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("brcd serve: keeping version %s: %s", self.current.version, self.last_error)
            return False
        old = self.current.version
        self.current = loaded  # the swap: one reference; batches already running keep theirs
        self.swaps += 1
        self.last_error = None
        log.info("brcd serve: %s moved from version %s to %s", self.model, old, loaded.version)
        return True

    def start(self) -> None:
        if self._watch and self._thread is None and self.poll_s > 0:
            self._thread = threading.Thread(target=self._run, name="brcd-model-watcher", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.check()

    def stop(self) -> None:
        self._stop.set()


def encode_packed(model: LoadedModel, bits: int, images: Sequence[Any]) -> np.ndarray:
    """Packed codes of ``images`` by ``model`` at the index's code length ``bits``."""
    from brcd.codes import pack_codes

    enc = model.encoder
    return pack_codes(enc.encode(list(images), bits=bits if bits != enc.max_bits else None))


class ShardSearcher:
    """One index (a whole index or one shard of it) answering ``(distances, ids, paths or None)``."""

    def __init__(self, index: Any, paths: dict[int, str] | None = None):
        self.index, self.paths = index, paths
        self._listed: set[str] | None = None  # the paths as a set, built on the first lookup by path

    def info(self) -> dict[str, int]:
        return {"bits": int(self.index.bits), "size": len(self.index), "paths": self.paths is not None}

    def path_of(self, id: int | None = None, path: str | None = None) -> str | None:
        """The path this index lists for ``id``, or ``path`` itself when the index lists exactly that
        string; None otherwise. Only such a path is ever opened for a thumbnail."""
        if self.paths is None:
            return None
        if id is not None:
            return self.paths.get(int(id))
        if self._listed is None:
            self._listed = set(self.paths.values())
        return path if path in self._listed else None

    def search(self, packed: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, list[list[str | None]] | None]:
        d, i = self.index.search_packed(packed, k)
        if self.paths is None:
            return d, i, None
        return d, i, [[self.paths.get(int(x)) for x in row] for row in i]


def merge_answers(answers: Sequence[tuple], k: int) -> tuple[np.ndarray, np.ndarray, list[list[str | None]] | None]:
    """:func:`merge_topk` of :meth:`ShardSearcher.search` answers, carrying each hit's path along."""
    d, i = merge_topk([a[0] for a in answers], [a[1] for a in answers], k)
    if any(a[2] is None for a in answers):
        return d, i, None
    known = {int(x): p for a in answers for row_i, row_p in zip(a[1], a[2]) for x, p in zip(row_i, row_p)}
    return d, i, [[known.get(int(x)) for x in row] for row in i]


def read_thumbnail(listed: str, base_dir: str | os.PathLike, px: int = THUMBNAIL_PX) -> bytes:
    """A PNG thumbnail (at most ``px`` pixels a side) of the image an index lists as ``listed`` (relative to
    ``base_dir``), read only from a regular file at its own real path, no symlink in any of its parts
    (docs/SEARCH.md); anything else is a :class:`BadRequest` 404."""
    from PIL import Image, UnidentifiedImageError

    path = os.path.abspath(os.path.join(base_dir, listed))
    symlink = BadRequest(404, f"{listed} is a symlink or lies under one; thumbnails are served only from files "
                              "the index lists by their real path")
    if os.path.realpath(path) != path:
        raise symlink
    try:  # O_NOFOLLOW: a symlink swapped in since the check is not followed; O_NONBLOCK: a FIFO does not hang
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise BadRequest(404, f"{listed} does not exist (any more); the index lists a file that is gone") from None
    except OSError as exc:
        raise BadRequest(404, f"{listed} cannot be opened ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # a folder, a FIFO, a device: never read
            raise BadRequest(404, f"{listed} is not a regular file")
        try:  # the file opened is the one at the symlink-free path (a folder swapped for a symlink meanwhile: refused)
            same = os.path.realpath(path) == path and os.path.samestat(st, os.stat(path))
        except OSError:
            same = False
        if not same:
            raise symlink
        if st.st_size > MAX_THUMBNAIL_SOURCE_BYTES:
            raise BadRequest(404, f"{listed} is larger than {MAX_THUMBNAIL_SOURCE_BYTES >> 20} MiB; no thumbnail")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_THUMBNAIL_SOURCE_BYTES + 1)
    finally:
        os.close(fd)
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (px, px))  # JPEG: decode at a reduced scale
            thumb = im.convert("RGB")
        thumb.thumbnail((px, px))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BadRequest(404, f"{listed} is not a readable image ({type(exc).__name__})") from None
    out = io.BytesIO()
    thumb.save(out, format="PNG")
    return out.getvalue()


@dataclass
class NamedIndex:
    """One loaded index (``--index`` or ``--symmetric-index``), whole or in shards: per shard an async
    search ``(packed, k) -> (distances, ids, paths)`` and an async lookup ``(id, path) -> listed path or None``."""

    searches: list[Callable]
    lookups: list[Callable]
    bits: int
    size: int
    paths: bool  # whether the index lists paths (a `brcd encode` codes file does, a HammingIndex file not)

    @classmethod
    def local(cls, path: str | os.PathLike, loader: str | None = None) -> "NamedIndex":
        """An index file opened in this process, searched in a thread, so the event loop keeps taking requests."""
        searcher = ShardSearcher(*open_index(path, loader))
        info = searcher.info()
        return cls([functools.partial(asyncio.to_thread, searcher.search)],
                   [functools.partial(asyncio.to_thread, searcher.path_of)], info["bits"], info["size"], info["paths"])

    @classmethod
    async def remote(cls, shards: Sequence[Any]) -> "NamedIndex":
        """An index in :class:`IndexShard` actors (their deployment handles)."""
        infos = list(await asyncio.gather(*[h.info.remote() for h in shards]))
        bits = {info["bits"] for info in infos}
        if len(bits) != 1:
            raise ValueError(f"the index shards hold codes of different lengths {sorted(bits)}; serve shards of one index")
        return cls([h.search.remote for h in shards], [h.path_of.remote for h in shards], bits.pop(),
                   sum(info["size"] for info in infos), all(info["paths"] for info in infos))


class SearchCore:
    """What the service does, without Ray: the indexes by name (a request naming none searches the
    first), the model watcher, a batch of searches, the files behind thumbnails. :class:`SearchService`
    wraps it in Serve; the tests serve :func:`create_app` of one with plain uvicorn."""

    def __init__(self, model: str, indexes: dict[str, NamedIndex], *, tracking_uri: str | None = None,
                 poll_s: float = 10.0, device: str = "cpu", base_dir: str | os.PathLike | None = None):
        if not indexes:
            raise ValueError("give at least one index")
        bits = {name: ix.bits for name, ix in indexes.items()}
        if len(set(bits.values())) != 1:  # one watcher checks one code length
            raise ValueError(f"the indexes hold codes of different lengths ({', '.join(f'{n}: {b}' for n, b in bits.items())}"
                             "); encode every database at the served model's code length")
        self.indexes, self.default = dict(indexes), next(iter(indexes))
        self.bits = next(iter(bits.values()))
        self.base_dir = os.path.abspath(base_dir or os.getcwd())
        self.watcher = ModelWatcher(model, bits=self.bits, tracking_uri=tracking_uri, poll_s=poll_s, device=device)

    @classmethod
    def open(cls, model: str, indexes: dict[str, str | os.PathLike], *, index_loader: str | None = None,
             **kwargs: Any) -> "SearchCore":
        """A core over one index file per name, opened in this process."""
        named = {name: NamedIndex.local(path, index_loader) for name, path in indexes.items()}
        return cls(model, named, **kwargs)

    def index_name(self, value: str | None) -> str:
        """The index a request names (``?index=``), or the default one."""
        if value in (None, ""):
            return self.default
        if value not in self.indexes:
            raise BadRequest(422, f"index must be one of {', '.join(self.indexes)}, got {str(value)[:40]!r}")
        return value

    def health(self) -> dict[str, Any]:
        cur, w, ix = self.watcher.current, self.watcher, self.indexes[self.default]
        return {"status": "ok", "model": w.model, "model_uri": cur.uri, "model_name": cur.name,
                "model_version": cur.version, "model_alias": w.alias, "loaded_at": cur.loaded_at, "swaps": w.swaps,
                "last_error": w.last_error, "last_check": w.last_check, "poll_s": w.poll_s, "bits": int(self.bits),
                "index_size": ix.size, "index_shards": len(ix.searches), "default_index": self.default,
                "indexes": {name: {"size": x.size, "shards": len(x.searches), "paths": x.paths}
                            for name, x in self.indexes.items()}}

    async def search_batch(self, items: Sequence[tuple[list, int, str]]) -> list[tuple]:
        """``(images, k, index name)`` requests -> ``(model, distances, ids, paths or None)`` each: one
        encoder pass for all the images, one search of each index named."""
        model = self.watcher.current  # read once: the whole batch uses one version
        images = [img for imgs, _, _ in items for img in imgs]
        packed = await asyncio.to_thread(encode_packed, model, self.bits, images)
        starts = np.cumsum([0] + [len(imgs) for imgs, _, _ in items])
        out: list[tuple | None] = [None] * len(items)

        async def one_index(name: str) -> None:
            members = [n for n, item in enumerate(items) if item[2] == name]
            rows = np.concatenate([np.arange(starts[n], starts[n + 1]) for n in members])
            kmax = max(items[n][1] for n in members)
            searches = self.indexes[name].searches
            d, i, paths = merge_answers(list(await asyncio.gather(*[s(packed[rows], kmax) for s in searches])), kmax)
            row = 0
            for n in members:  # the top-k is a prefix of the top-kmax: (distance, id) is a total order
                imgs, k, _ = items[n]
                part = slice(row, row + len(imgs))
                out[n] = (model, d[part, :k], i[part, :k], None if paths is None else [p[:k] for p in paths[part]])
                row += len(imgs)

        await asyncio.gather(*[one_index(name) for name in dict.fromkeys(item[2] for item in items)])
        return out

    async def thumbnail(self, index: str | None, id: str | None = None, path: str | None = None) -> bytes:
        """The PNG thumbnail of a hit: ``id`` (query text) or ``path`` exactly as the index lists it."""
        name = self.index_name(index)
        if (id is None) == (path is None):
            raise BadRequest(422, "give id=ID of a hit (or path=PATH exactly as the index lists it), one of the two")
        if id is not None and not re.fullmatch(r"[0-9]{1,18}", id):
            raise BadRequest(422, f"id must be a non-negative integer, got {id[:40]!r}")
        ix = self.indexes[name]
        if not ix.paths:
            raise BadRequest(404, f"the {name} index lists no paths (a HammingIndex file); serve a `brcd encode` "
                                  "codes file to see thumbnails")
        num = None if id is None else int(id)
        found = [p for p in await asyncio.gather(*[look(num, path) for look in ix.lookups]) if p is not None]
        if not found:
            raise BadRequest(404, f"id {num} is not in the {name} index" if id is not None
                             else f"the {name} index lists no path {path[:80]!r}")
        return await asyncio.to_thread(read_thumbnail, found[0], self.base_dir)


# --------------------------------------------------------------------------------------------
# the Ray Serve application
# --------------------------------------------------------------------------------------------

from fastapi import FastAPI, Request  # noqa: E402 - the Serve part below needs them, the pure part not
from fastapi.responses import HTMLResponse, JSONResponse, Response  # noqa: E402
from ray import serve  # noqa: E402

#: multipart uploads: at most this many parts, and this many bytes per file (a thumbnail-sized query
#: is KBs; the limit keeps one request from filling the replica's memory)
MAX_FILE_BYTES = 32 * 1024 * 1024


async def read_search_request(request: Request) -> tuple[list, int]:
    """:func:`search_inputs` of a Starlette request (multipart forms parsed by python-multipart)."""
    kind = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    query_k = request.query_params.get("k")
    if kind != "multipart/form-data":
        return search_inputs(kind, await request.body(), query_k=query_k)
    try:
        async with request.form(max_files=MAX_IMAGES_PER_REQUEST + 1, max_fields=16,
                                max_part_size=MAX_FILE_BYTES) as form:
            items = form.multi_items()
            files = [(v.filename or n, await v.read()) for n, v in items if hasattr(v, "read")]  # UploadFiles
            form_k = next((v for n, v in reversed(items) if n == "k" and isinstance(v, str)), None)
    except Exception as exc:  # noqa: BLE001 - a malformed form is the client's: Starlette raises several kinds
        raise BadRequest(400, f"the multipart form cannot be read ({type(exc).__name__}); {HOW_TO_SEND}") from None
    return search_inputs(kind, query_k=query_k, files=files, form_k=form_k)


#: the page's headers: its own origin only (thumbnails, /search), inline script and style, no framing
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'none'; img-src 'self' blob:; connect-src 'self'; "
                                           "script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                           "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
                "X-Content-Type-Options": "nosniff"}


def create_app(core: SearchCore, search: Callable | None = None) -> FastAPI:
    """The service's HTTP interface over ``core``: ``/`` (the page), ``/search``, ``/thumbnail``,
    ``/health``. ``search`` (``(images, k, index) -> (model, distances, ids, paths)``) is the Serve
    deployment's batched search; without it every request is a batch of its own."""
    if search is None:
        async def search(item: tuple) -> tuple:
            return (await core.search_batch([item]))[0]

    page = PAGE.read_bytes()
    app = FastAPI(title="brcd search", description="Hamming search of images against a code index")

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest) -> JSONResponse:  # what an HTTPException answers
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.get("/", response_class=HTMLResponse)
    def search_page() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    @app.get("/health")
    def health_route() -> dict[str, Any]:
        return core.health()

    @app.post("/search")
    async def search_route(request: Request) -> dict[str, Any]:
        t0 = time.perf_counter()
        name = core.index_name(request.query_params.get("index"))
        images, k = await read_search_request(request)
        model, d, i, paths = await search((images, k, name))
        results = []
        for r, (row_d, row_i) in enumerate(zip(d, i)):
            keep = row_i >= 0
            hit = {"ids": row_i[keep].tolist(), "distances": row_d[keep].tolist()}
            if paths is not None:
                hit["paths"] = [p for p, ok in zip(paths[r], keep) if ok]
            results.append(hit)
        return {"model_uri": model.uri, "model_version": model.version, "model_name": model.name,
                "model_alias": core.watcher.alias, "index": name, "k": k,
                "took_ms": round((time.perf_counter() - t0) * 1000, 1), "results": results}

    @app.get("/thumbnail")
    async def thumbnail_route(request: Request) -> Response:
        q = request.query_params
        png = await core.thumbnail(q.get("index"), q.get("id"), q.get("path"))
        return Response(png, media_type="image/png", headers={"X-Content-Type-Options": "nosniff",
                                                              "Cache-Control": "private, max-age=60"})

    return app


# A replica being removed checks for requests still running every 0.5 s (Serve's default: 2 s) and
# stops once there are none: shutting down or scaling in takes less time, in-flight requests still finish.
@serve.deployment(graceful_shutdown_wait_loop_s=0.5)
class IndexShard(ShardSearcher):
    """One index file of a sharded index, in its own Ray actor (on any node), searched by the front."""

    def __init__(self, path: str, loader: str | None = None):
        super().__init__(*open_index(path, loader))


@serve.deployment(graceful_shutdown_wait_loop_s=0.5)
@serve.ingress()  # the app comes from __serve_build_asgi_app__, once the core is loaded
class SearchService:
    """The front deployment: a :class:`SearchCore` (decode, encode, search every shard, merge) whose
    requests are batched, behind :func:`create_app`."""

    async def __init__(self, model: str, indexes: dict[str, Any], *, tracking_uri: str | None = None,
                       poll_s: float = 10.0, index_loader: str | None = None, max_batch_size: int = 16,
                       batch_wait_s: float = 0.002, device: str = "cpu", base_dir: str | None = None):
        """``indexes``: name -> one index file (opened in this replica) or its IndexShard actors' handles."""
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        named = {}
        for name, where in indexes.items():
            named[name] = (NamedIndex.local(where, index_loader) if isinstance(where, (str, os.PathLike))
                           else await NamedIndex.remote(where))
        self.core = SearchCore(model, named, tracking_uri=tracking_uri, poll_s=poll_s, device=device, base_dir=base_dir)
        self.core.watcher.start()
        self._batched.set_max_batch_size(int(max_batch_size))
        self._batched.set_batch_wait_timeout_s(float(batch_wait_s))

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self.core, self._batched)

    def __del__(self):
        core = getattr(self, "core", None)
        if core is not None:
            core.watcher.stop()

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _batched(self, items: list[tuple[list, int, str]]) -> list[tuple]:
        return await self.core.search_batch(items)


def build_app(model: str, index: Sequence[str], *, symmetric_index: Sequence[str] = (), tracking_uri: str | None = None,
              poll_s: float = 10.0, index_loader: str | None = None, replicas: int = 1, num_cpus: float = 1.0,
              num_gpus: float = 0.0, shard_cpus: float = 0.5, max_batch_size: int = 16, batch_wait_s: float = 0.002,
              base_dir: str | os.PathLike | None = None):
    """The Serve application: one front deployment, plus one :class:`IndexShard` per file when an
    index names several files (an index split across machines). ``index`` is the ``asymmetric`` index
    (the default), ``symmetric_index`` the optional ``symmetric`` one; relative paths in them are
    taken from ``base_dir`` (default: this process's working folder) for thumbnails."""
    files = {ASYMMETRIC: [str(p) for p in index], SYMMETRIC: [str(p) for p in symmetric_index or ()]}
    if not files[ASYMMETRIC]:
        raise ValueError("give at least one index file")
    # Serve's default of 5 requests in flight per replica would cap every batch at 5 (and Serve warns
    # so); two batches' worth lets one batch fill while the previous one runs
    front = SearchService.options(num_replicas=int(replicas), max_ongoing_requests=max(5, 2 * int(max_batch_size)),
                                  ray_actor_options={"num_cpus": float(num_cpus), "num_gpus": float(num_gpus)})
    common = dict(tracking_uri=tracking_uri, poll_s=poll_s, index_loader=index_loader, max_batch_size=max_batch_size,
                  batch_wait_s=batch_wait_s, device="cuda" if num_gpus else "cpu",
                  base_dir=os.path.abspath(base_dir or os.getcwd()))
    indexes: dict[str, Any] = {}
    for name, prefix in ((ASYMMETRIC, "IndexShard"), (SYMMETRIC, "SymmetricIndexShard")):
        if len(files[name]) == 1:
            indexes[name] = files[name][0]
        elif files[name]:
            indexes[name] = [IndexShard.options(name=f"{prefix}{n}", ray_actor_options={"num_cpus": float(shard_cpus)})
                             .bind(path, index_loader) for n, path in enumerate(files[name])]
    return front.bind(model, indexes, **common)


def start_service(app, *, host: str = "127.0.0.1", port: int = 8000, quiet: bool = True) -> str:
    """Start Serve's HTTP proxy on ``host:port`` and deploy ``app``; returns the base URL. ``quiet``: Serve logs
    warnings only (no line per request, in the replicas' log files either), else INFO and the access log."""
    _STOP.clear()
    level = "WARNING" if quiet else "INFO"
    logging.getLogger("ray.serve").setLevel(level)  # the driver's own "Deploying app ..." lines
    serve.start(http_options={"host": host, "port": int(port)}, logging_config={"log_level": level})
    serve.run(app, name=APP_NAME, route_prefix="/", logging_config={"log_level": level})
    return f"http://{host}:{int(port)}"


_STOP = threading.Event()  # set by request_stop(): how a test (or an embedding program) ends `brcd serve`


def wait_until_stopped() -> None:
    while not _STOP.wait(0.5):
        pass


def request_stop() -> None:
    _STOP.set()


def stop_service() -> None:
    """Remove the application (and Serve's proxy and controller, when nothing else uses them)."""
    try:
        serve.delete(APP_NAME)
        if not serve.status().applications:
            serve.shutdown()
    except Exception as exc:  # noqa: BLE001 - shutting down anyway
        logging.getLogger("brcd").debug("serve shutdown: %s", exc)


def health(url: str, timeout: float = 10.0) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(f"{url}/health", timeout=timeout) as resp:
        return json.loads(resp.read())
