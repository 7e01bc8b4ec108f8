"""The search service: merge_topk and the model watcher against references, then one Ray Serve start
(`brcd serve` as the docs show it): answers equal HammingIndex.search of the encoder's codes, and
moving the alias during a request loop drops no request and switches the answers to the new version."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from brcd.codes import pack_codes
from brcd.config import ModelConfig
from brcd.models.encoder import HashEncoder, export_model, read_codes_parquet
from brcd.search.flat import HammingIndex
from brcd.models.nets import create_hashing_model
from brcd.mlflow.registry import log_student, register_student
from brcd.mlflow.tracking import Tracker, default_tracking_uri
from pipelines.serve import ModelWatcher, ShardSearcher, decode_image, merge_answers, merge_topk, open_index

BITS, K = 16, 5


# ---- merge_topk ----------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 4, 17, 60])
def test_merge_topk_equals_one_index_over_the_union(k):
    rng = np.random.default_rng(k)
    codes = np.where(rng.random((50, 6)) < 0.5, -1, 1).astype(np.int8)  # 6 bits: heavy distance ties
    ids = rng.permutation(1000)[:50]
    queries = np.where(rng.random((7, 6)) < 0.5, -1, 1).astype(np.int8)
    whole = HammingIndex(6, engine="numpy")
    whole.add(codes, ids)
    parts = np.array_split(rng.permutation(50), 3)  # shards of uneven size, ids interleaved
    answers = []
    for part in parts:
        shard = HammingIndex(6, engine="numpy")
        shard.add(codes[part], ids[part])
        answers.append(ShardSearcher(shard, {int(x): f"p{x}" for x in ids[part]}).search(pack_codes(queries), k))
    got_d, got_i = merge_topk([a[0] for a in answers], [a[1] for a in answers], k)
    want_d, want_i = whole.search(queries, k)  # k = 60 > 50 codes: padded with -1 / int32 max
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_array_equal(got_d, want_d)
    assert got_d.dtype == np.int32 and got_i.dtype == np.int64
    _, _, paths = merge_answers(answers, k)  # each hit keeps its own shard's path
    assert paths == [[f"p{x}" if x >= 0 else None for x in row] for row in want_i]


def test_merge_topk_pads_and_checks_its_input():
    d, i = merge_topk([np.array([[3]]), np.array([[1, 2]])], [np.array([[9]]), np.array([[4, -1]])], 4)
    np.testing.assert_array_equal(i, [[4, 9, -1, -1]])
    np.testing.assert_array_equal(d, [[1, 3, np.iinfo(np.int32).max, np.iinfo(np.int32).max]])
    with pytest.raises(ValueError, match="one ids array per distances array"):
        merge_topk([np.zeros((1, 1))], [], 1)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        merge_topk([np.zeros((1, 1))], [np.zeros((1, 1))], 0)


def test_open_index_reads_index_files_and_codes_folders(tmp_path):
    from brcd.models.encoder import codes_metadata
    from pipelines.ray.batch_inference import run_sharded_inference

    rng = np.random.default_rng(3)
    codes = np.where(rng.random((9, 12)) < 0.5, -1, 1).astype(np.int8)

    class Codes:  # what `brcd encode --actors N` writes: id, path, packed code per shard
        def __call__(self, start, stop):
            return {"id": np.arange(start, stop), "path": np.array([f"img{r}.png" for r in range(start, stop)]),
                    "code": pack_codes(codes[start:stop])}

    folder = tmp_path / "codes"
    run_sharded_inference(folder, 9, 4, Codes, {}, fingerprint=codes_metadata(12), writer="parquet", num_actors=0,
                          progress=None)
    index, paths = open_index(folder)
    assert index.bits == 12 and len(index) == 9 and paths[7] == "img7.png"
    ref = HammingIndex(12)
    ref.add(codes)
    np.testing.assert_array_equal(index.search(codes[:3], 4)[1], ref.search(codes[:3], 4)[1])
    loaded, none = open_index(ref.save(tmp_path / "index.parquet"))
    assert none is None and len(loaded) == 9
    with pytest.raises(Exception, match="does not exist"):
        open_index(tmp_path / "nope.parquet")
    with pytest.raises(ValueError, match="cannot import the index loader 'nope:load'"):
        open_index(folder, loader="nope:load")


def test_decode_image_round_trip_and_errors():
    img = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(decode_image(_b64png(img))), img)
    with pytest.raises(ValueError, match="image 3 is not base64 text"):
        decode_image("not base64!", "image 3")
    with pytest.raises(ValueError, match="is not a readable PNG or JPEG image"):
        decode_image(base64.b64encode(b"hello").decode())


# ---- a registry with two versions (and a wrong-length third) --------------------------------


def _b64png(img: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _export(folder, seed, bits=BITS):
    torch.manual_seed(seed)
    cfg = ModelConfig(backbone="test_resnet", bits=bits, head="mlp", hidden_dim=32)
    model = create_hashing_model(cfg).eval()
    with torch.no_grad():  # a non-trivial head so codes differ between images and between versions
        for p in model.head.parameters():
            p.normal_(0, 1)
    return export_model(folder, model, cfg, {"image_size": 32})


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Versions 1 and 2 (different weights) of brcd-student, champion -> 1; a database of 40 PNGs
    encoded by `brcd encode --actors 0` from the registry into 2 parquet shards."""
    from pipelines.cli import main

    out = tmp_path_factory.mktemp("serve")
    uri = default_tracking_uri(out, str(out / "mlflow.db"))
    tracker = Tracker(uri, "brcd-serve-test")
    run_id = tracker.start_run("distill")
    versions, dirs = [], []
    for n in range(2):
        folder = _export(out / f"m{n}", seed=n)
        model_uri = log_student(tracker, run_id, folder, tags={"bits": BITS})
        versions.append(register_student(model_uri, "brcd-student", "champion" if n == 0 else None, tracking_uri=uri))
        dirs.append(folder)
    tracker.end_run(run_id)
    rng = np.random.default_rng(1)
    (out / "db").mkdir()
    for n, img in enumerate(rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)):
        Image.fromarray(img).save(out / "db" / f"{n:02d}.png")
    queries = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    assert main(["encode", "--model", "models:/brcd-student@champion", "--tracking-uri", uri, "--images",
                 str(out / "db"), "--output", str(out / "codes"), "--actors", "0", "--shard-rows", "24",
                 "--batch-size", "8"]) == 0
    shards = sorted((out / "codes").glob("shard-*.parquet"))
    encoders = [HashEncoder.from_dir(d) for d in dirs[:2]]
    ids, paths, packed, _ = read_codes_parquet(out / "codes")
    assert len(shards) == 2 and paths == sorted(str(p) for p in (out / "db").glob("*.png"))
    np.testing.assert_array_equal(packed, pack_codes(encoders[0].encode(paths)))  # PNG is lossless
    index = HammingIndex(BITS)  # one database, queried by either version (asymmetric search)
    index.add_packed(packed, ids)
    expected = [index.search(e.encode(queries), K) for e in encoders]
    assert not np.array_equal(expected[0][1], expected[1][1])  # the versions answer differently
    return SimpleNamespace(out=out, uri=uri, tracker=tracker, versions=versions, dirs=dirs, index=index.save(out / "index.parquet"),
                           shards=shards, paths=paths, queries=queries, expected=expected)


def test_model_watcher_swaps_only_to_a_complete_model_of_the_index_length(registry, monkeypatch):
    import brcd.mlflow.registry

    client = registry.tracker.client
    with pytest.raises(ValueError, match=r"emits \[16\] bits but the index holds 8-bit codes; register a model"):
        ModelWatcher("models:/brcd-student@champion", bits=8, tracking_uri=registry.uri)
    watcher = ModelWatcher("models:/brcd-student@champion", bits=BITS, tracking_uri=registry.uri)
    first = watcher.current
    assert (first.version, first.uri) == ("1", "models:/brcd-student/1") and not watcher.check()
    try:
        client.set_registered_model_alias("brcd-student", "champion", registry.versions[1])
        real = brcd.mlflow.registry.load_encoder

        def broken(uri, **kwargs):  # the download of the new version dies half-way
            raise OSError("connection reset")

        monkeypatch.setattr(brcd.mlflow.registry, "load_encoder", broken)
        assert not watcher.check() and watcher.current is first  # the old model keeps serving
        assert watcher.last_error == "OSError: connection reset" and watcher.swaps == 0
        monkeypatch.setattr(brcd.mlflow.registry, "load_encoder", real)
        assert watcher.check() and watcher.current.version == "2" and watcher.swaps == 1
        assert watcher.last_error is None
        codes = watcher.current.encoder.encode(registry.queries)
        np.testing.assert_array_equal(HammingIndex.load(registry.index).search(codes, K)[1], registry.expected[1][1])
    finally:
        client.set_registered_model_alias("brcd-student", "champion", registry.versions[0])
    pinned = ModelWatcher("models:/brcd-student/2", bits=BITS, tracking_uri=registry.uri)
    assert pinned.current.version == "2" and not pinned.check()  # a fixed version is never polled


# ---- the service ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url, body, timeout=60, index=None):
    req = urllib.request.Request(f"{url}/search" + (f"?index={index}" if index else ""), data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def _doc_commands(prefix: str, doc: str = "docs/SEARCH.md") -> list[str]:
    """The shell commands of ``doc`` that start with ``prefix`` (continuation lines joined)."""
    text = (Path(__file__).resolve().parents[1] / doc).read_text()
    lines = [line.strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)
             for line in block.replace("\\\n", " ").splitlines()]
    found = [re.sub(r"\s+#.*$", "", line) for line in lines if line.startswith(prefix)]
    assert found, f"{doc} shows no `{prefix}` command"
    return found


def _bash(command: str, cwd) -> str:
    out = subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, (command, out.stderr)
    return out.stdout + "\n"


def _send(url, body: bytes, ctype: str) -> tuple[int, dict]:
    """POST raw bytes to /search (any Content-Type): (status, JSON answer)."""
    req = urllib.request.Request(f"{url}/search", data=body, method="POST", headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _get(url, timeout=5):
    with urllib.request.urlopen(f"{url}/health", timeout=timeout) as resp:
        return json.loads(resp.read())


@pytest.mark.ray
def test_service_answers_like_the_index_and_swaps_champion_without_dropping(registry, ray_local, capsys):
    from pipelines import serve as service
    from pipelines.cli import main

    port, mlflow_port = _free_port(), _free_port()
    url = f"http://127.0.0.1:{port}"
    # docs/SEARCH.md: `mlflow models serve` (encoding) next to `brcd serve` (search), both on the registry
    mlflow_cmd = _doc_commands("mlflow models serve")[0].replace("5001", str(mlflow_port)).rstrip(" &")
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry.uri, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    mlflow_server = subprocess.Popen(shlex.split(mlflow_cmd), env=env, cwd=registry.out, start_new_session=True,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # the index served as shard actors, as docs/SEARCH.md shows: every `brcd encode` shard file is one;
    # the same codes as a HammingIndex file (no paths) in the front replica as the symmetric index
    argv = ["serve", "--model", "models:/brcd-student@champion", "--tracking-uri", registry.uri,
            "--index", *map(str, registry.shards), "--symmetric-index", str(registry.index), "--port", str(port),
            "--poll-s", "0.3", "--cpus", "0.5", "--shard-cpus", "0.25"]
    rc: list[int] = []
    cli = threading.Thread(target=lambda: rc.append(main(argv)), daemon=True)
    cli.start()
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not rc:
            try:
                health = _get(url)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        else:
            pytest.fail(f"the service did not come up (rc={rc}): {capsys.readouterr()}")
        assert health["model_version"] == "1" and health["index_size"] == 40 and health["bits"] == BITS
        assert health["index_shards"] == 2 and health["model_alias"] == "champion"
        assert health["indexes"] == {"asymmetric": {"size": 40, "shards": 2, "paths": True},
                                     "symmetric": {"size": 40, "shards": 1, "paths": False}}
        assert health["status"] == "ok" and health["swaps"] == 0

        images = [_b64png(q) for q in registry.queries]
        client = registry.tracker.client

        # the documented curl commands, as written (port and file names put in)
        Image.fromarray(registry.queries[2]).save(registry.out / "q.jpg", format="PNG")  # lossless bytes, .jpg name
        Image.fromarray(registry.queries[3]).save(registry.out / "q2.jpg", format="PNG")
        health_cmd, search_cmd, raw_cmd, form_cmd, thumb_cmd = _doc_commands("curl -s http://127.0.0.1:8000")
        assert json.loads(_bash(health_cmd.replace("8000", str(port)), registry.out))["model_version"] == "1"
        body = json.loads(_bash(search_cmd.replace("8000", str(port)), registry.out))
        top10 = HammingIndex.load(registry.index).search(HashEncoder.from_dir(registry.dirs[0]).encode(registry.queries[2:3]), 10)
        assert body["results"][0]["ids"] == top10[1][0].tolist() and body["results"][0]["distances"] == top10[0][0].tolist()
        assert body["results"][0]["paths"] == [registry.paths[i] for i in top10[1][0]]
        # the same image as the request body, and two as a form upload (curl -F)
        assert json.loads(_bash(raw_cmd.replace("8000", str(port)), registry.out))["results"] == body["results"]
        form = json.loads(_bash(form_cmd.replace("8000", str(port)), registry.out))["results"]
        assert form[0] == body["results"][0] and len(form) == 2
        # the page, a thumbnail found through the shard actors (docs/SEARCH.md's command), the symmetric index
        with urllib.request.urlopen(f"{url}/", timeout=30) as resp:
            assert resp.status == 200 and b'id="files"' in resp.read()
        _bash(thumb_cmd.replace("8000", str(port)), registry.out)  # id 17 of the 40
        with Image.open(registry.out / "hit.png") as thumb:
            np.testing.assert_array_equal(np.asarray(thumb.convert("RGB")), np.asarray(Image.open(registry.paths[17])))
        sym = _post(f"{url}", {"images": [images[2]], "k": 10}, index="symmetric")
        assert sym["index"] == "symmetric" and sym["model_alias"] == "champion"
        assert sym["results"] == [{k: v for k, v in body["results"][0].items() if k != "paths"}]  # no paths
        with pytest.raises(urllib.error.HTTPError) as bad:
            urllib.request.urlopen(f"{url}/thumbnail?id=17&index=symmetric", timeout=30)
        assert bad.value.code == 404 and "lists no paths" in json.loads(bad.value.read())["detail"]

        started: set[int] = set()

        def loop(worker: int) -> list[tuple[str, int, int]]:
            """Requests of one image (rotating) or all six, until two answers of version 2 came."""
            seen, n, got_v2 = [], 0, 0
            while got_v2 < 2 and n < 400:
                rows = list(range(6)) if n % 3 == 0 else [(worker + n) % 6]
                body = _post(url, {"images": [images[r] for r in rows], "k": K})
                version = body["model_version"]
                want_d, want_i = registry.expected[int(version) - 1]
                for r, hit in zip(rows, body["results"]):
                    assert hit["ids"] == want_i[r].tolist() and hit["distances"] == want_d[r].tolist(), (version, r)
                seen.append((version, n, len(rows)))
                started.add(worker)
                got_v2 += version == "2"
                n += 1
            return seen

        # the CLI prints its "serving ..." line once start_service returns, which can be after the service
        # answers: wait for it before the alias moves, so that it names version 1
        printed = ""
        while "serving models:/" not in printed and time.time() < deadline and cli.is_alive():
            printed += capsys.readouterr().out
            time.sleep(0.1)
        with ThreadPoolExecutor(3) as pool:
            loops = [pool.submit(loop, w) for w in range(3)]
            while len(started) < 3 and not any(f.done() for f in loops):  # every loop has an answer of version 1
                time.sleep(0.05)
            client.set_registered_model_alias("brcd-student", "champion", registry.versions[1])
            sequences = [f.result(timeout=180) for f in loops]  # any failed request raises here
        for seq in sequences:
            versions = [v for v, _, _ in seq]
            assert versions[0] == "1" and versions[-1] == "2", versions
            assert versions == sorted(versions), versions  # once on version 2, never back
        after = _get(url)
        assert after["model_version"] == "2" and after["swaps"] == 1 and after["last_error"] is None

        # bad input: one line, HTTP 400 / 422, the service keeps running
        with pytest.raises(urllib.error.HTTPError) as bad:
            _post(url, {"images": ["not base64!"], "k": 3})
        assert bad.value.code == 400 and json.loads(bad.value.read())["detail"].startswith("image 0 is not base64")
        with pytest.raises(urllib.error.HTTPError) as bad:
            _post(url, {"images": images[:1], "k": 0})
        assert bad.value.code == 422
        hit = _post(url, {"images": images[:1], "k": 100})["results"][0]  # k beyond the 40 codes: all of them
        assert sorted(hit["ids"]) == list(range(40)) and hit["distances"] == sorted(hit["distances"])
        # images as people send them: a raw PNG body, a multipart upload of two files: the JSON answers
        from test_serve_inputs import _multipart

        want = _post(url, {"images": images[:2], "k": K})["results"]
        png = [base64.b64decode(t) for t in images[:2]]
        status, body = _send(url, png[0], "image/png")  # k defaults to 10; the top K is its prefix
        assert status == 200 and body["k"] == 10 and body["results"][0]["ids"][:K] == want[0]["ids"]
        status, body = _send(url, *_multipart([("q0.png", png[0]), ("q1.png", png[1])], {"k": str(K)}))
        assert status == 200 and body["results"] == want
        # bodies that are not what /search takes: a 4xx naming what to send, never a 500 (issue 21)
        rng = np.random.default_rng(0)
        for ctype in ("application/octet-stream", "image/png", "text/plain", "application/json", "multipart/form-data"):
            status, err = _send(url, rng.integers(0, 256, 2000, dtype=np.uint8).tobytes(), ctype)
            assert 400 <= status < 500 and "\n" not in err["detail"], (ctype, status, err)
        assert _send(url, png[0], "text/plain")[0] == 415
        assert _get(url)["status"] == "ok"
        # the encoding server next to it answers the codes the service searched with
        (registry.out / "images.json").write_text(json.dumps({"inputs": registry.queries.tolist()}))
        invocations = _doc_commands("curl -s http://127.0.0.1:5001")[0].replace("5001", str(mlflow_port))
        deadline = time.time() + 120  # it started with the service; usually up by now
        while mlflow_server.poll() is None and time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{mlflow_port}/ping", timeout=5).close()
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        codes = json.loads(_bash(invocations, registry.out))["predictions"]
        np.testing.assert_array_equal(codes, HashEncoder.from_dir(registry.dirs[0]).encode(registry.queries))
    finally:
        client = registry.tracker.client
        client.set_registered_model_alias("brcd-student", "champion", registry.versions[0])
        service.request_stop()
        cli.join(timeout=60)
        os.killpg(mlflow_server.pid, signal.SIGTERM)  # mlflow and the uvicorn it started
        mlflow_server.wait(timeout=30)
    assert rc == [0]
    out = printed + capsys.readouterr().out
    assert f"serving models:/brcd-student@champion (version 1, 40 codes, 16 bits) on {url}" in out, out


def test_every_brcd_command_of_the_search_doc_parses():
    """docs/SEARCH.md's `brcd` lines are valid command lines (the ones this machine can run, run above
    and in tests/test_encode_ray.py; `--address auto` needs a cluster)."""
    from pipelines.cli import build_parser

    commands = _doc_commands("brcd ")
    assert {c.split()[1] for c in commands} >= {"encode", "search", "serve"}, commands
    for command in commands:
        args = build_parser().parse_args(shlex.split(command.rstrip(" &"))[1:])
        assert callable(args.func), command
    # the README's search commands are SEARCH.md's (which run in these tests) or, for the cross-modal model,
    # CROSSMODAL.md's (run in tests/test_crossmodal.py)
    readme = [c for c in _doc_commands("", "README.md") if c.startswith(("brcd encode", "brcd serve", "curl"))]
    shown = set(commands) | set(_doc_commands("curl")) | set(_doc_commands("brcd ", "docs/CROSSMODAL.md"))
    assert readme and all(c in shown for c in readme), set(readme) - shown


def test_serve_refuses_bad_arguments_before_starting_ray(registry, tmp_path, capsys):
    from pipelines.cli import main

    base = ["serve", "--tracking-uri", registry.uri]
    assert main([*base, "--model", "models:/brcd-student@champion", "--index", str(tmp_path / "none.parquet")]) == 2
    assert "index " in (err := capsys.readouterr().err) and "does not exist" in err, err
    assert main([*base, "--model", "models:/brcd-student@staging", "--index", str(registry.index)]) == 2
    assert "has no alias 'staging'" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main([*base, "--model", "models:/brcd-student@champion", "--index", str(registry.index),
                     "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
