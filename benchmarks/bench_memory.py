"""Benchmark 5: peak memory of mAP@1000 at CIFAR-10 scale (5,000 queries x 50,000 database).

Each configuration runs in a fresh subprocess that loads the codes from an ``.npz`` (no large
temporaries), resets the kernel's peak-RSS counter (``/proc/self/clear_refs``; falls back to
``ru_maxrss`` deltas), then evaluates. Reported: peak RSS above the pre-evaluation level (covers
faiss / C allocations) and the ``tracemalloc`` peak (numpy allocations only).

Usage: ``python -m benchmarks.bench_memory [--quick]``
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from brcd.search.flat import DEFAULT_MAX_BYTES
from brcd.io import save_arrays

BENCH = "bench_memory: peak memory of mean_average_precision (mAP@1000)"

_CHILD = r"""
import json, resource, sys, time, tracemalloc
import numpy as np
from brcd.evaluation import RetrievalEvaluator
from brcd.io import load_arrays

def vm(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return None

path, engine, max_bytes, topk = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
a = load_arrays(path)
ev = RetrievalEvaluator(engine=engine, max_bytes=max_bytes)
ev.mean_average_precision(a["q"][:2], a["db"][:3000], a["ql"][:2], a["dl"][:3000], 10)  # warm imports
before_rss = vm("VmRSS:")
before_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
reset = True
try:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
except OSError:
    reset = False
tracemalloc.start()
t0 = time.perf_counter()
value = ev.mean_average_precision(a["q"], a["db"], a["ql"], a["dl"], topk)
elapsed = time.perf_counter() - t0
_, traced_peak = tracemalloc.get_traced_memory()
tracemalloc.stop()
hwm = vm("VmHWM:")
after_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
peak = (hwm - before_rss) if (reset and hwm is not None) else max(0, after_max - before_max)
print(json.dumps({"value": value, "seconds": elapsed, "rss_peak_delta": peak, "traced_peak": traced_peak,
                  "rss_before": before_rss, "hwm_reset": reset}))
"""


def _measure(path: Path, engine: str, max_bytes: int, topk: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), engine, str(max_bytes), str(topk)],
        check=True, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> list[dict]:
    """Run the benchmark; returns result rows."""
    from .bench_map import make_data

    nq, ndb, bits, topk = (1000, 10_000, 64, 1000) if quick else (5000, 50_000, 64, 1000)
    q, db, ql, dl = make_data(nq, ndb, bits)
    rows: list[dict] = []
    mib = 2**20
    with tempfile.TemporaryDirectory() as tmp:
        path = save_arrays(Path(tmp) / "codes.npz", q=q, db=db, ql=ql, dl=dl)
        input_bytes = q.nbytes + db.nbytes + ql.nbytes + dl.nbytes
        for engine in ("faiss", "numpy"):
            for max_bytes in (256 * mib, 64 * mib, 16 * mib):
                r = _measure(path, engine, max_bytes, topk)
                rows.append({
                    "benchmark": BENCH,
                    "name": f"engine={engine}, max_bytes={max_bytes // mib} MiB"
                            f"{' (default)' if max_bytes == DEFAULT_MAX_BYTES else ''} ({nq}x{ndb}x{bits}b)",
                    "value": r["rss_peak_delta"] / mib, "unit": "MiB peak RSS",
                    "note": f"tracemalloc peak {r['traced_peak'] / mib:.1f} MiB; {r['seconds']:.2f} s; "
                            f"mAP {r['value']:.6f}; {'VmHWM reset' if r['hwm_reset'] else 'ru_maxrss delta'}",
                })
    dense = nq * ndb * 4
    rows.append({"benchmark": BENCH, "name": "for comparison: one dense float32 distance matrix", "value": dense / mib,
                 "unit": "MiB", "note": f"what a non-chunked evaluation allocates at least once; inputs {input_bytes / mib:.1f} MiB"})
    return rows


def main(argv: list[str] | None = None) -> None:
    from .report import bench_main

    bench_main(__doc__, lambda a: run(a.quick), argv, quick_help="1,000 x 10,000 instead of 5,000 x 50,000")

if __name__ == "__main__":
    main()
