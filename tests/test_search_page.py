"""`brcd serve`'s page (GET /) and its thumbnails (GET /thumbnail), on the service's own ASGI app
(pipelines.serve.create_app of a SearchCore) behind uvicorn, without Ray Serve (tests/test_serve.py
runs the same app in Serve).

- Thumbnails: only a file the loaded index lists, by a symlink-free path, is read: traversal in the
  URL or the query, encoded traversal, paths missing from the index, a symlink put where a listed file
  was, a listed file under a symlinked folder, a missing file, a folder, a FIFO and a non-image are
  all 4xx with one line, and no byte of another file comes back.
- The page in a real headless browser (Debian's chromium via Selenium + chromium-driver) on the demo
  pipeline's model (the tiny demo config of conftest: teacher -> clusters -> distil -> `brcd register`):
  images chosen through the page's file input, thumbnails shown, the hits shown equal /search's, the
  symmetric / asymmetric switch, a screenshot (also written to $BRCD_SCREENSHOT when set:
  docs/images/search_page.png is made that way).

No `from __future__ import annotations`: FastAPI must see the endpoints' `Request` annotation as a class."""

import base64
import http.client
import io
import json
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import serve_asgi
from pipelines.serve import BadRequest, SearchCore, create_app, read_thumbnail

INSTALL = ("the browser test needs Debian's chromium and chromium-driver: apt-get install -y --no-install-recommends "
           "chromium chromium-driver (.ci/run installs them)")


# ---- helpers --------------------------------------------------------------------------------


def _raw_get(port: int, target: str) -> tuple[int, str, bytes]:
    """GET ``target`` sent as written (no client-side normalisation of ``..`` or ``%2e``)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest("GET", target, skip_accept_encoding=True)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.getheader("content-type") or "", resp.read()
    finally:
        conn.close()


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _tiny_model(folder: Path, bits: int = 16) -> Path:
    from brcd.config import ModelConfig
    from brcd.models.encoder import export_model
    from brcd.models.nets import create_hashing_model

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="test_resnet", bits=bits, head="mlp", hidden_dim=32)
    return export_model(folder, create_hashing_model(cfg).eval(), cfg, {"image_size": 32})


# ---- the thumbnail rule ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def listed(tmp_path_factory):
    """An index listing: real PNGs (absolute and relative), a symlink put where a listed PNG was, a
    deleted file, a text file, a folder, a FIFO, a PNG under a symlinked folder; next to them a PNG
    the index does not list and a 'secret' image outside the collection. Served with a random model."""
    from brcd.models.encoder import write_codes_parquet
    from brcd.search import HammingIndex

    root = tmp_path_factory.mktemp("thumbs")
    rng = np.random.default_rng(0)
    pixels = {name: rng.integers(0, 256, (12, 10, 3), dtype=np.uint8) for name in ("a", "rel", "swapped", "unlisted", "secret")}
    (root / "db").mkdir()
    (root / "outside").mkdir()
    for name in ("a", "rel", "swapped", "unlisted"):
        (root / "db" / f"{name}.png").write_bytes(_png(pixels[name]))
    (root / "outside" / "secret.png").write_bytes(_png(pixels["secret"]))
    (root / "db" / "gone.png").write_bytes(_png(pixels["a"]))
    (root / "db" / "notes.png").write_text("not an image: a secret\n")
    (root / "db" / "folder.png").mkdir()
    os.mkfifo(root / "db" / "fifo.png")
    (root / "linked").symlink_to(root / "db", target_is_directory=True)
    paths = [str(root / "db" / "a.png"), "db/rel.png", str(root / "db" / "swapped.png"), str(root / "db" / "gone.png"),
             str(root / "db" / "notes.png"), str(root / "db" / "folder.png"), str(root / "db" / "fifo.png"),
             str(root / "linked" / "a.png")]
    codes = np.where(rng.random((len(paths), 16)) < 0.5, -1, 1).astype(np.int8)
    write_codes_parquet(root / "codes.parquet", codes, paths)
    plain = HammingIndex(16)  # a HammingIndex file lists no paths
    plain.add(codes)
    # after the index was written: the listed file is replaced by a symlink to the secret, one is deleted
    (root / "db" / "swapped.png").unlink()
    (root / "db" / "swapped.png").symlink_to(root / "outside" / "secret.png")
    (root / "db" / "gone.png").unlink()
    core = SearchCore.open(str(_tiny_model(root / "model")), {"asymmetric": root / "codes.parquet",
                                                              "symmetric": plain.save(root / "plain.parquet")},
                           base_dir=root)
    with serve_asgi(create_app(core)) as server:
        yield SimpleNamespace(root=root, paths=paths, pixels=pixels, server=server, core=core)


def _thumb_pixels(body: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(body)) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def test_thumbnails_of_listed_files_by_id_or_exact_path(listed):
    port = listed.server.port
    for target, want in (("/thumbnail?id=0", "a"), ("/thumbnail?id=1&index=asymmetric", "rel"),
                         ("/thumbnail?path=db/rel.png", "rel"), (f"/thumbnail?path={listed.paths[0]}", "a")):
        status, ctype, body = _raw_get(port, target)
        assert (status, ctype) == (200, "image/png"), (target, status, body[:200])
        np.testing.assert_array_equal(_thumb_pixels(body), listed.pixels[want])  # smaller than 160 px: as is
    big = np.random.default_rng(1).integers(0, 256, (400, 300, 3), dtype=np.uint8)
    (listed.root / "big.png").write_bytes(_png(big))
    assert Image.open(io.BytesIO(read_thumbnail("big.png", listed.root))).size == (120, 160)


@pytest.mark.parametrize("target, status, needle", [
    # traversal in the URL path: no route serves files, so nothing is found
    ("/thumbnail/../../outside/secret.png", 404, "Not Found"),
    ("/..%2F..%2Foutside%2Fsecret.png", 404, "Not Found"),
    ("/%2e%2e/%2e%2e/etc/passwd", 404, "Not Found"),
    ("/search_page.html", 404, "Not Found"),  # the page's own file is served at / only
    # traversal and unlisted paths in the query: looked up as exact strings in the index's own list
    ("/thumbnail?path=db/../outside/secret.png", 404, "lists no path 'db/../outside/secret.png'"),
    ("/thumbnail?path=..%2Foutside%2Fsecret.png", 404, "lists no path '../outside/secret.png'"),
    ("/thumbnail?path=%2e%2e/%2e%2e/etc/passwd", 404, "lists no path '../../etc/passwd'"),
    ("/thumbnail?path=/etc/passwd", 404, "lists no path '/etc/passwd'"),
    ("/thumbnail?path=db/unlisted.png", 404, "lists no path 'db/unlisted.png'"),
    ("/thumbnail?path=./db/rel.png", 404, "lists no path './db/rel.png'"),  # not the exact string listed
    ("/thumbnail?id=../../etc/passwd", 422, "id must be a non-negative integer"),
    ("/thumbnail?id=%2e%2e%2fsecret", 422, "id must be a non-negative integer"),
    ("/thumbnail?id=-1", 422, "id must be a non-negative integer"),
    ("/thumbnail?id=99", 404, "id 99 is not in the asymmetric index"),
    ("/thumbnail?id=0&path=db/rel.png", 422, "one of the two"),
    ("/thumbnail", 422, "give id=ID"),
    ("/thumbnail?id=0&index=../db", 422, "index must be one of asymmetric, symmetric"),
    ("/thumbnail?id=0&index=symmetric", 404, "lists no paths (a HammingIndex file)"),
    # listed, but not a plain image file at a symlink-free path
    ("/thumbnail?id=2", 404, "is a symlink or lies under one"),  # a symlink put where a listed file was
    ("/thumbnail?id=7", 404, "is a symlink or lies under one"),  # a listed file under a symlinked folder
    ("/thumbnail?id=3", 404, "does not exist (any more)"),
    ("/thumbnail?id=4", 404, "is not a readable image"),
    ("/thumbnail?id=5", 404, "is not a regular file"),
    ("/thumbnail?id=6", 404, "is not a regular file"),  # a FIFO: not read (nor waited on)
])
def test_nothing_but_listed_images_can_be_read(listed, target, status, needle):
    got, ctype, body = _raw_get(listed.server.port, target)
    assert got == status and ctype == "application/json", (target, got, ctype, body[:200])
    detail = json.loads(body)["detail"]
    assert needle in detail and "\n" not in detail, detail
    assert b"a secret" not in body and b"IHDR" not in body  # neither the text file's content nor an image's


def test_read_thumbnail_refuses_a_symlink_swapped_in_after_the_check(listed, monkeypatch):
    """O_NOFOLLOW and the after-open check: a symlink that appears between the real-path check and
    the open is not followed."""
    import pipelines.serve as service

    target = listed.root / "db" / "race.png"
    target.write_bytes(_png(listed.pixels["a"]))
    real_open = os.open

    def swap_then_open(path, flags, *args):
        os.unlink(path)
        os.symlink(listed.root / "outside" / "secret.png", path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(service.os, "open", swap_then_open)
    with pytest.raises(BadRequest, match="cannot be opened") as exc:
        read_thumbnail(str(target), listed.root)
    assert exc.value.status == 404


def test_the_service_serves_its_page_and_names_the_index(listed):
    with urllib.request.urlopen(f"{listed.server.url}/", timeout=30) as resp:
        page = resp.read().decode()
        assert resp.headers["content-type"] == "text/html; charset=utf-8"
        assert "default-src 'none'" in resp.headers["content-security-policy"]
    assert 'id="files"' in page and "thumbnail?index=" in page and "<script src" not in page  # nothing from elsewhere
    health = json.loads(urllib.request.urlopen(f"{listed.server.url}/health", timeout=30).read())
    assert health["default_index"] == "asymmetric" and set(health["indexes"]) == {"asymmetric", "symmetric"}
    req = urllib.request.Request(f"{listed.server.url}/search?index=elsewhere", data=_png(listed.pixels["a"]),
                                 headers={"Content-Type": "image/png"})
    with pytest.raises(urllib.error.HTTPError) as bad:
        urllib.request.urlopen(req, timeout=30)
    assert bad.value.code == 422 and "index must be one of asymmetric, symmetric" in json.loads(bad.value.read())["detail"]


# ---- the page in a browser, on the demo pipeline's model ---------------------------------------


@pytest.fixture(scope="session")  # session: set up before the session's trained teacher, so a missing chromium fails fast
def browser(tmp_path_factory):
    """Headless chromium driven by Selenium through Debian's chromium-driver (selenium-manager downloads
    nothing when both paths are given). Missing: a failure that says how to install them."""
    chromium, driver_bin = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_bin):
        pytest.fail(INSTALL, pytrace=False)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1180,900",
                "--force-device-scale-factor=1", f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_bin))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def demo_service(_trained_base, tmp_path_factory):
    """The demo pipeline on the tiny config (conftest: the shared teacher + clusters, then distil here),
    its student registered by `brcd register`; 80 database digits and 2 query digits as PNG files; the
    database encoded by the exported teacher (asymmetric) and by models:/brcd-student@champion
    (symmetric) with `brcd encode`; the service's app on both."""
    from conftest import tiny_config
    from brcd.config import load_config
    from pipelines.cli import main
    from pipelines.stages import Run, distill_stage

    out = tmp_path_factory.mktemp("page") / "run"
    demo_run = os.environ.get("BRCD_DEMO_RUN")  # a finished `brcd demo` folder: the docs' screenshot is taken on it
    shutil.copytree(demo_run or _trained_base, out, ignore=shutil.ignore_patterns("ray", "ray_tmp", "mlflow*"))
    run = Run(load_config(out / "config.yaml") if demo_run else tiny_config(), out)
    distill_stage(run)  # a finished demo's student is reused
    assert main(["register", "--output", str(out), "--set", "tracking.enabled=true"]) == 0
    assert main(["export", "--output", str(out), "--model", "teacher", "--to", str(out / "teacher_model")]) == 0
    size = run.cfg.data.image_size
    files = {}
    for part, count in (("database", 80), ("query", 2)):
        folder = out / "images" / part
        folder.mkdir(parents=True)
        for n, i in enumerate(run.bundle.split.indices(part)[:count]):  # as the pipeline pre-resizes the 8x8 digits
            run.bundle.source.load(int(i)).resize((size, size), Image.Resampling.BILINEAR).save(folder / f"{part}{n:03d}.png")
        files[part] = sorted(folder.glob("*.png"))
    uri = f"sqlite:///{out / 'mlflow.db'}"
    model = "models:/brcd-student@champion"
    for name, encoder in (("teacher_db", str(out / "teacher_model")), ("student_db", model)):
        assert main(["encode", "--model", encoder, "--tracking-uri", uri, "--images", str(out / "images" / "database"),
                     "--output", str(out / f"{name}.parquet")]) == 0
    core = SearchCore.open(model, {"asymmetric": out / "teacher_db.parquet", "symmetric": out / "student_db.parquet"},
                           tracking_uri=uri)
    with serve_asgi(create_app(core)) as server:
        yield SimpleNamespace(url=server.url, queries=files["query"], out=out)


def _search(url: str, files: list[Path], k: int, index: str) -> dict:
    from test_serve_inputs import _multipart

    body, ctype = _multipart([(p.name, p.read_bytes()) for p in files], {"k": str(k)})
    req = urllib.request.Request(f"{url}/search?index={index}", data=body, headers={"Content-Type": ctype})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def _shown(driver) -> list[dict]:
    """What the page shows: per query its hits' ids, distances, paths, and whether each thumbnail loaded."""
    return driver.execute_script("""
        return [...document.querySelectorAll('section.query')].map((s) => {
          const items = [...s.querySelectorAll('li')];
          return {ids: items.map((li) => Number(li.dataset.id)), distances: items.map((li) => Number(li.dataset.distance)),
                  paths: items.map((li) => li.querySelector('.path').textContent),
                  loaded: items.map((li) => li.querySelector('img').naturalWidth > 0)};
        });""")


def _wait_done(driver, index: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 60).until(lambda d: d.execute_script(
        "return document.body.dataset.state") in ("done", "error"))
    assert driver.execute_script("return document.body.dataset.state") == "done", driver.find_element("id", "status").text
    assert f"on the {index} index" in driver.find_element("id", "answer").text


def test_the_page_in_a_browser_shows_what_search_answers(browser, demo_service, tmp_path):
    from selenium.webdriver.common.by import By

    url, k = demo_service.url, 8
    browser.get(f"{url}/")
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 30).until(lambda d: d.execute_script("return document.body.dataset.state") == "ready")
    model = browser.find_element(By.ID, "model").text
    assert "brcd-student" in model and "version 1" in model and "alias @champion" in model, model
    switch = browser.find_elements(By.CSS_SELECTOR, "input[name=index]")
    assert [r.get_attribute("value") for r in switch] == ["asymmetric", "symmetric"] and switch[0].is_selected()

    browser.find_element(By.ID, "k").clear()
    browser.find_element(By.ID, "k").send_keys(str(k))
    browser.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in demo_service.queries))  # choose 2 files
    for index, radio in (("asymmetric", None), ("symmetric", switch[1])):
        if radio is not None:  # the switch searches the same images again, in the other index
            browser.execute_script("document.body.dataset.state = ''")
            radio.click()
        _wait_done(browser, index)
        want = _search(url, demo_service.queries, k, index)["results"]
        shown = _shown(browser)
        assert [s["ids"] for s in shown] == [w["ids"] for w in want], index
        assert [s["distances"] for s in shown] == [w["distances"] for w in want], index
        assert [s["paths"] for s in shown] == [w["paths"] for w in want], index
        assert all(all(s["loaded"]) and len(s["ids"]) == k for s in shown), shown
    answer = browser.find_element(By.ID, "answer").text
    assert "answered by brcd-student, version 1 (alias @champion)" in answer and " ms " in answer, answer

    # the whole page in one picture (Chrome's DevTools protocol: a window's size is not its viewport's)
    size = browser.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    png = browser.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": {
        "x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})["data"]
    shot = tmp_path / "search_page.png"
    shot.write_bytes(base64.b64decode(png))
    assert Image.open(shot).size == (round(size["width"]), round(size["height"]))
    if os.environ.get("BRCD_SCREENSHOT"):  # docs/images/search_page.png: BRCD_SCREENSHOT=docs/images/search_page.png
        Path(os.environ["BRCD_SCREENSHOT"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, os.environ["BRCD_SCREENSHOT"])
