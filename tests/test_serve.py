"""The search service: merge_topk and the model watcher against references, then one Ray Serve start
(`brcd serve` as the docs show it): answers equal HammingIndex.search of the encoder's codes, and
moving the alias during a request loop drops no request and switches the answers to the new version."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from brcd.codes import pack_codes
from brcd.config import ModelConfig
from brcd.encoder import HashEncoder, export_model
from brcd.index import HammingIndex
from brcd.models import create_hashing_model
from brcd.registry import log_student, register_student
from brcd.tracking import Tracker, default_tracking_uri
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
    from brcd.encoder import codes_metadata
    from pipelines.batch_inference import run_sharded_inference

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
    out = tmp_path_factory.mktemp("serve")
    uri = default_tracking_uri(out, str(out / "mlflow.db"))
    tracker = Tracker(uri, "brcd-serve-test")
    run_id = tracker.start_run("distill")
    versions, dirs = [], []
    for n, bits in enumerate((BITS, BITS, 8)):
        folder = _export(out / f"m{n}", seed=n, bits=bits)
        model_uri = log_student(tracker, run_id, folder, tags={"bits": bits})
        versions.append(register_student(model_uri, "brcd-student", "champion" if n == 0 else None, tracking_uri=uri))
        dirs.append(folder)
    tracker.end_run(run_id)
    rng = np.random.default_rng(1)
    database = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    queries = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    encoders = [HashEncoder.from_dir(d) for d in dirs[:2]]
    codes = encoders[0].encode(database)  # one database, queried by either version (asymmetric search)
    index = HammingIndex(BITS)
    index.add(codes)
    index_path = index.save(out / "index.parquet")
    shards = []  # the same index in two files (ids interleaved), served as two shard actors
    for n, part in enumerate((np.arange(0, 40, 3), np.setdiff1d(np.arange(40), np.arange(0, 40, 3)))):
        shard = HammingIndex(BITS)
        shard.add(codes[part], part)
        shards.append(shard.save(out / f"shard{n}.parquet"))
    expected = [index.search(e.encode(queries), K) for e in encoders]
    assert not np.array_equal(expected[0][1], expected[1][1])  # the versions answer differently
    return SimpleNamespace(out=out, uri=uri, tracker=tracker, versions=versions, index=index_path, shards=shards,
                           queries=queries, expected=expected)


def test_model_watcher_swaps_only_to_a_complete_model_of_the_index_length(registry):
    client = registry.tracker.client
    watcher = ModelWatcher("models:/brcd-student@champion", bits=BITS, tracking_uri=registry.uri)
    first = watcher.current
    assert (first.version, first.uri) == ("1", "models:/brcd-student/1") and not watcher.check()
    try:
        client.set_registered_model_alias("brcd-student", "champion", registry.versions[2])  # 8 bits
        assert not watcher.check() and watcher.current is first
        assert "emits [8] bits but the index holds 16-bit codes" in watcher.last_error
        client.set_registered_model_alias("brcd-student", "champion", registry.versions[1])
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


def _post(url, body, timeout=60):
    req = urllib.request.Request(f"{url}/search", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def _get(url, timeout=5):
    with urllib.request.urlopen(f"{url}/health", timeout=timeout) as resp:
        return json.loads(resp.read())


@pytest.mark.ray
def test_service_answers_like_the_index_and_swaps_champion_without_dropping(registry, ray_local, capsys):
    from pipelines import serve as service
    from pipelines.cli import main

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    argv = ["serve", "--model", "models:/brcd-student@champion", "--tracking-uri", registry.uri,
            "--index", *map(str, registry.shards), "--port", str(port), "--poll-s", "0.3", "--cpus", "0.5",
            "--shard-cpus", "0.25"]
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
        assert health["index_shards"] == 2
        assert health["status"] == "ok" and health["swaps"] == 0

        images = [_b64png(q) for q in registry.queries]
        client = registry.tracker.client

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
                got_v2 += version == "2"
                n += 1
            return seen

        with ThreadPoolExecutor(3) as pool:
            loops = [pool.submit(loop, w) for w in range(3)]
            time.sleep(1.0)  # requests are running on version 1
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
    finally:
        client = registry.tracker.client
        client.set_registered_model_alias("brcd-student", "champion", registry.versions[0])
        service.request_stop()
        cli.join(timeout=60)
    assert rc == [0]
    out = capsys.readouterr().out
    assert f"serving models:/brcd-student@champion (version 1, 40 codes, 16 bits) on {url}" in out, out
