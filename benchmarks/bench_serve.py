"""Benchmark: the search service (``brcd serve``, Ray Serve on loopback) under load, with an alias swap.

A registry (temporary SQLite) holds two versions of a 64-bit student; the index holds ``codes``
uniformly random 64-bit codes (1 M in the full run). The service follows ``@champion``; ``clients``
threads send single-image requests (base64 PNG, k = 10) over keep-alive HTTP connections until
``requests`` answers came back or ``time_limit_s`` passed, and the alias is moved to version 2 when
half of the requests are done. Reported: requests/s, p50 / p99 latency, failed requests (must be
0), how many answers each version gave. Side by side, in the same process before the service
starts: the same encoder and index called directly (decode + encode + search of one image), the
floor a request's latency is compared against (ratio = service p50 / direct median).

Usage: ``python -m benchmarks.bench_serve [--quick]`` (``brcd bench --only serve``).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

BENCH = "bench_serve: search service (Ray Serve, loopback), alias swap under load"

FULL = {"codes": 1_000_000, "requests": 2000, "clients": 8, "time_limit_s": 120.0}
QUICK = {"codes": 100_000, "requests": 200, "clients": 4, "time_limit_s": 60.0}
BITS, K, IMAGE_SIZE = 64, 10, 64


def _png_b64(img: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _registry(root: Path):
    """Two registered 64-bit students (different weights), alias champion -> version 1."""
    import torch

    from brcd.config import ModelConfig
    from brcd.models.encoder import export_model
    from brcd.models.nets import create_hashing_model
    from brcd.mlflow.registry import log_student, register_student
    from brcd.mlflow.tracking import Tracker, default_tracking_uri

    uri = default_tracking_uri(root, str(root / "mlflow.db"))
    tracker = Tracker(uri, "bench-serve")
    run_id = tracker.start_run("bench")
    versions, folders = [], []
    for n in range(2):
        torch.manual_seed(n)
        cfg = ModelConfig(backbone="test_efficientnet", bits=BITS, head="mlp", hidden_dim=64, freeze_backbone=True)
        folder = export_model(root / f"v{n}", create_hashing_model(cfg).eval(), cfg, {"image_size": IMAGE_SIZE})
        model_uri = log_student(tracker, run_id, folder)
        versions.append(register_student(model_uri, "bench-student", "champion" if n == 0 else None,
                                         tracking_uri=uri))
        folders.append(folder)
    tracker.end_run(run_id)
    return uri, tracker, versions, folders


class _Direct:
    """Decode + encode + search of one image called in this process, with one torch thread (as the
    1-CPU replica has): the floor of a request's latency."""

    def __init__(self, folder: Path, index_path: Path):
        from brcd.models.encoder import HashEncoder
        from pipelines.serve import LoadedModel, open_index

        self.model = LoadedModel(HashEncoder.from_dir(folder), str(folder), None, None)
        self.index, _ = open_index(index_path)

    def median_ms(self, images: list[str], repeats: int) -> float:
        import torch

        from pipelines.serve import decode_image, encode_packed

        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            times = []
            for r in range(repeats + 1):
                t0 = time.perf_counter()
                packed = encode_packed(self.model, BITS, [decode_image(images[r % len(images)])])
                self.index.search_packed(packed, K)
                times.append(time.perf_counter() - t0)
        finally:
            torch.set_num_threads(before)
        return 1000 * statistics.median(times[1:])  # the first call warms up


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load(port: int, images: list[str], setup: dict, on_half) -> dict:
    lock = threading.Lock()
    lat: list[float] = []
    versions: dict[str, int] = {}
    failures: list[str] = []
    started = [0]
    deadline = time.perf_counter() + setup["time_limit_s"]
    half = threading.Event()

    def client(c: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        n = 0
        while time.perf_counter() < deadline:
            with lock:
                if started[0] >= setup["requests"]:
                    break
                started[0] += 1
            body = json.dumps({"images": [images[(c + n) % len(images)]], "k": K})
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/search", body, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
                ok = resp.status == 200
            except (OSError, http.client.HTTPException) as exc:
                ok, data = False, str(exc).encode()
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            dt = time.perf_counter() - t0
            with lock:
                if ok:
                    answer = json.loads(data)
                    assert len(answer["results"][0]["ids"]) == K
                    lat.append(dt)
                    versions[answer["model_version"]] = versions.get(answer["model_version"], 0) + 1
                    if len(lat) >= setup["requests"] // 2:
                        half.set()
                else:
                    failures.append(data[:200].decode(errors="replace"))
            n += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(setup["clients"])]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    if half.wait(setup["time_limit_s"]):
        on_half()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"latencies": lat, "versions": versions, "failures": failures, "wall": wall}


def run(quick: bool = False, **overrides) -> list[dict]:
    from brcd.search.flat import HammingIndex
    from pipelines import serve as service
    from pipelines.ray.cluster import ray_session

    from .report import load_string

    setup = {**(QUICK if quick else FULL), **{k: v for k, v in overrides.items() if v is not None}}
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        tmp = Path(tmp)
        uri, tracker, versions, folders = _registry(tmp)
        index = HammingIndex(BITS)
        index.add(np.where(rng.random((setup["codes"], BITS)) < 0.5, -1, 1).astype(np.int8))
        index_path = index.save(tmp / "index.parquet")
        del index
        images = [_png_b64(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)) for _ in range(32)]
        reference = _Direct(folders[0], index_path)
        repeats = 20 if quick else 50
        direct_before = reference.median_ms(images, repeats)
        with ray_session(tmp, num_cpus=os.cpu_count()):
            port = _free_port()
            app = service.build_app("models:/bench-student@champion", [str(index_path)], tracking_uri=uri, poll_s=0.5,
                                    num_cpus=1)
            t0 = time.perf_counter()
            service.start_service(app, port=port)
            startup = time.perf_counter() - t0
            load_before = load_string()
            swapped_at: list[float] = []

            def swap():
                tracker.client.set_registered_model_alias("bench-student", "champion", versions[1])
                swapped_at.append(time.perf_counter())

            try:
                got = _load(port, images, setup, swap)
            finally:
                service.stop_service()
        # the floor measured before and after the load (the better of the two: the machine is shared)
        direct = min(direct_before, reference.median_ms(images, repeats))
        load = f"load {load_before} -> {load_string()}"
    lat = sorted(got["latencies"])
    n_ok, n_bad = len(lat), len(got["failures"])
    p50 = 1000 * lat[len(lat) // 2] if lat else float("nan")
    p99 = 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("nan")
    what = (f"{setup['codes']:,} random {BITS}-bit codes, k={K}, {setup['clients']} clients, 1 image ({IMAGE_SIZE} px "
            f"PNG) per request, test_efficientnet student, 1 replica (1 CPU)")
    by_version = ", ".join(f"v{v}: {c}" for v, c in sorted(got["versions"].items()))
    return [
        {"benchmark": BENCH, "name": "throughput", "value": n_ok / got["wall"], "unit": "requests/s",
         "note": f"{n_ok} answered in {got['wall']:.1f} s; {what}; {load}"},
        {"benchmark": BENCH, "name": "latency p50", "value": p50, "unit": "ms",
         "ratio": p50 / direct, "note": f"ratio = service p50 / direct call ({direct:.1f} ms: decode + encode + search "
                                        "in one process with one torch thread, median)"},
        {"benchmark": BENCH, "name": "latency p99", "value": p99, "unit": "ms", "ratio": p99 / direct, "note": ""},
        {"benchmark": BENCH, "name": "failed requests during the alias swap", "value": n_bad, "unit": "requests",
         "note": f"answers by version: {by_version}; alias moved after {setup['requests'] // 2} answers"
                 + (f"; first failure: {got['failures'][0]}" if n_bad else "")},
        {"benchmark": BENCH, "name": "service start-up", "value": startup, "unit": "s",
         "note": "serve.run until the replica (model pulled from the registry, index loaded) is ready"},
    ]


def main(argv: list[str] | None = None) -> None:
    from .report import bench_main

    bench_main(__doc__, lambda a: run(a.quick), argv, write=False)

if __name__ == "__main__":
    main()
