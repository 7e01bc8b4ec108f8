"""What /search accepts: JSON with base64 images, a raw PNG / JPEG body, multipart uploads of one or
several files; anything else a 4xx that says what to send, never a 5xx. Parsed by the service's own
functions (pipelines.serve.search_inputs / read_search_request) behind a real HTTP server (uvicorn, as
Ray Serve runs it) without Ray.

No `from __future__ import annotations`: FastAPI must see the endpoint's `Request` annotation as a class."""


import base64
import io
import json
import urllib.error
import urllib.request
import uuid

import numpy as np
import pytest
from PIL import Image

from conftest import serve_asgi
from pipelines.serve import MAX_K, BadRequest, search_inputs

CONTENT_TYPES = ["application/json", "image/png", "image/jpeg", "application/octet-stream", "text/plain",
                 "multipart/form-data; boundary=xyz", "multipart/form-data", "application/x-www-form-urlencoded",
                 "image/svg+xml", None]


def _png(seed: int = 0, fmt: str = "PNG") -> bytes:
    img = np.random.default_rng(seed).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt)
    return buf.getvalue()


def _multipart(files: list[tuple[str, bytes]], fields: dict[str, str] | None = None) -> tuple[bytes, str]:
    """A multipart/form-data body as browsers and `curl -F` send it."""
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, value in (fields or {}).items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for n, (filename, data) in enumerate(files):
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{filename}"\r\n'
                  f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


# ---- the pure parser -----------------------------------------------------------------------


def test_json_raw_and_multipart_bodies_give_the_same_images():
    png, jpg = _png(0), _png(1, "JPEG")
    want = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    body = json.dumps({"images": [base64.b64encode(png).decode()], "k": 7}).encode()
    imgs, k = search_inputs("application/json; charset=utf-8", body)
    assert k == 7 and np.array_equal(np.asarray(imgs[0]), want)
    for ctype, data in (("image/png", png), ("application/octet-stream", png)):
        imgs, k = search_inputs(ctype, data, query_k="3")
        assert k == 3 and np.array_equal(np.asarray(imgs[0]), want)
    imgs, k = search_inputs("image/jpeg", jpg)
    assert k == 10 and imgs[0].size == (5, 6)
    imgs, k = search_inputs("multipart/form-data; boundary=b", files=[("a.png", png), ("b.jpg", jpg)], form_k="4")
    assert k == 4 and len(imgs) == 2 and np.array_equal(np.asarray(imgs[0]), want)


@pytest.mark.parametrize("ctype, body, kw, status, needle", [
    ("text/plain", b"hello", {}, 415, "Content-Type text/plain is not accepted; send JSON"),
    (None, b"", {}, 415, "Content-Type (none)"),
    ("application/json", b"\xff\xfe\x00garbage", {}, 400, "the body is not JSON"),
    ("application/json", b'{"images": []}', {}, 422, "non-empty list"),
    ("application/json", b'{"images": ["not base64!"]}', {}, 400, "image 0 is not base64"),
    ("application/json", b'{"images": ["aGVsbG8="], "k": 0}', {}, 422, "k must be an integer"),
    ("image/png", b"\x89PNG but not really", {}, 422, "the body is not a readable PNG or JPEG image"),
    ("image/png", b"", {}, 422, "the body is empty"),
    ("image/png", _png(), {"query_k": "ten"}, 422, "k must be an integer"),
    ("image/png", _png(), {"query_k": str(MAX_K + 1)}, 422, "k must be an integer"),
    ("multipart/form-data", b"", {}, 422, "the form holds no image file"),
    ("multipart/form-data", b"", {"files": [("x.png", b"nope")]}, 422, "file 'x.png' is not a readable"),
])
def test_bad_bodies_are_4xx_in_one_line(ctype, body, kw, status, needle):
    with pytest.raises(BadRequest) as exc:
        search_inputs(ctype, body, **kw)
    assert exc.value.status == status and needle in str(exc.value) and "\n" not in str(exc.value)


# ---- behind a real HTTP server ------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    """uvicorn on a free localhost port with /search answering what read_search_request parsed."""
    from fastapi import FastAPI, HTTPException, Request

    from pipelines.serve import read_search_request

    app = FastAPI()

    @app.post("/search")
    async def search(request: Request):
        try:
            images, k = await read_search_request(request)
        except BadRequest as exc:
            raise HTTPException(status_code=exc.status, detail=str(exc)) from None
        return {"k": k, "sizes": [list(im.size) for im in images]}

    @app.get("/health")
    def health():
        return {"status": "ok"}

    with serve_asgi(app) as server:
        yield server.url


def _post(url: str, body: bytes, ctype: str | None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": ctype} if ctype else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_uploads_as_people_send_them(server):
    png = _png(2)
    assert _post(f"{server}/search?k=2", png, "image/png") == (200, {"k": 2, "sizes": [[5, 6]]})
    body, ctype = _multipart([("a.png", png), ("b.png", _png(3))], {"k": "5"})
    assert _post(f"{server}/search", body, ctype) == (200, {"k": 5, "sizes": [[5, 6], [5, 6]]})
    body = json.dumps({"images": [base64.b64encode(png).decode()] * 2}).encode()
    assert _post(f"{server}/search", body, "application/json") == (200, {"k": 10, "sizes": [[5, 6], [5, 6]]})
    status, err = _post(f"{server}/search", b"\x00\x01binary", "text/plain")
    assert status == 415 and "multipart/form-data" in err["detail"]


def test_fuzz_random_bodies_under_every_content_type_never_5xx(server):
    """Bounded: 10 content types x 12 random bodies (up to 4 KiB), then the service is still healthy."""
    rng = np.random.default_rng(0)
    seen = set()
    for ctype in CONTENT_TYPES:
        for n in range(12):
            size = int(rng.integers(0, 4096))
            body = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
            if n == 0 and ctype and ctype.startswith("multipart"):
                body = b"--xyz\r\n" + body  # starts like a form, then garbage
            status, err = _post(f"{server}/search", body, ctype)
            assert 400 <= status < 500, (ctype, size, status, err)
            assert isinstance(err.get("detail"), str) and "\n" not in err["detail"], err
            seen.add(status)
    assert seen <= {400, 413, 415, 422}, seen
    with urllib.request.urlopen(f"{server}/health", timeout=10) as resp:
        assert json.loads(resp.read()) == {"status": "ok"}
