"""Benchmark 1: mAP@1000, 5,000 queries x 50,000 database x 64 bits (CIFAR-10 protocol scale).

Compares :func:`brcd.evaluation.mean_average_precision` (both engines) with the usual per-query
loop (``0.5 * (L - B1 @ B2.T)`` distances, then ``np.argsort(kind="stable")`` per query). The loop
is timed on a subset of the queries and extrapolated linearly (its cost is exactly linear in the
number of queries); the project's value on that same subset is checked against the loop's.

Usage: ``python -m benchmarks.bench_map [--quick]``
"""

from __future__ import annotations

import time

import numpy as np

from brcd.evaluation import RetrievalEvaluator, mean_average_precision

BENCH = "bench_map: mAP@K vs per-query stable argsort loop"


def make_data(nq: int, ndb: int, bits: int, classes: int = 10, flip: float = 0.25, seed: int = 0):
    """Class-clustered {-1,+1} codes (each code = its class centre with bits flipped at random),
    one-hot labels -- realistic tie structure and a non-trivial mAP."""
    rng = np.random.default_rng(seed)
    centres = np.where(rng.random((classes, bits)) < 0.5, -1, 1).astype(np.int8)

    def draw(n):
        y = rng.integers(0, classes, n)
        codes = centres[y] * np.where(rng.random((n, bits)) < flip, -1, 1).astype(np.int8)
        return codes, np.eye(classes, dtype=np.float32)[y]

    q, ql = draw(nq)
    db, dl = draw(ndb)
    return q, db, ql, dl


def loop_map(q: np.ndarray, db: np.ndarray, ql: np.ndarray, dl: np.ndarray, topk: int) -> float:
    """The reference per-query loop (what public hashing code does, with a stable sort)."""
    bits = q.shape[1]
    dist = 0.5 * (bits - q.astype(np.float32) @ db.astype(np.float32).T)
    aps = []
    for i in range(q.shape[0]):
        order = np.argsort(dist[i], kind="stable")[:topk]
        rel = (dl[order] @ ql[i]) > 0
        n_rel = int(rel.sum())
        if n_rel == 0:
            aps.append(0.0)
            continue
        hits = np.cumsum(rel)[rel]
        ranks = np.flatnonzero(rel) + 1.0
        aps.append(float(np.mean(hits / ranks)))
    return float(np.mean(aps))


def _timed(fn) -> tuple[float, float, object]:
    """(wall seconds, process CPU seconds, result) of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w0, time.process_time() - c0, out


def run(quick: bool = False, repeats: int = 3) -> list[dict]:
    """Run the benchmark; returns result rows.

    The loop (on a query subset) and every project configuration are timed in ``repeats``
    interleaved rounds and the best round of each is kept, so that load from other jobs on a
    shared machine affects both sides alike. Process CPU time is reported as well: on a busy
    machine it is the steadier measure of work for single-threaded code.
    """
    nq, ndb, bits, topk = (1000, 10_000, 64, 1000) if quick else (5000, 50_000, 64, 1000)
    n_loop = min(nq, 200 if quick else 500)
    q, db, ql, dl = make_data(nq, ndb, bits)
    tag = f"{nq}x{ndb}x{bits}b mAP@{topk}"

    try:
        import faiss

        faiss_threads = faiss.omp_get_max_threads()
    except ImportError:  # pragma: no cover
        faiss, faiss_threads = None, 0
    configs: dict[str, tuple[str, object]] = {
        "loop": (f"per-query stable argsort loop ({tag})", lambda: loop_map(q[:n_loop], db, ql[:n_loop], dl, topk)),
        "auto": (f"mean_average_precision, default engine=auto -> faiss, faiss_threads=1 ({tag})",
                 lambda: mean_average_precision(q, db, ql, dl, topk)),
    }
    if faiss is not None:
        ev_n = RetrievalEvaluator(engine="faiss", faiss_threads=None)
        configs["faissN"] = (f"RetrievalEvaluator(engine='faiss', faiss_threads=None -> {faiss_threads} OpenMP threads)",
                             lambda: ev_n.mean_average_precision(q, db, ql, dl, topk))
    ev_np = RetrievalEvaluator(engine="numpy")
    configs["numpy"] = ("RetrievalEvaluator(engine='numpy'), single-threaded numpy",
                        lambda: ev_np.mean_average_precision(q, db, ql, dl, topk))

    wall = {k: float("inf") for k in configs}
    cpu = {k: float("inf") for k in configs}
    values: dict[str, float] = {}
    for _ in range(repeats):
        for key, (_label, fn) in configs.items():
            w, c, values[key] = _timed(fn)
            wall[key], cpu[key] = min(wall[key], w), min(cpu[key], c)

    scale = nq / n_loop
    loop_wall, loop_cpu = wall["loop"] * scale, cpu["loop"] * scale
    ref_sub = values["loop"]
    ours_sub = mean_average_precision(q[:n_loop], db, ql[:n_loop], dl, topk)
    diff = abs(ours_sub - ref_sub)
    if diff > 1e-12:
        raise AssertionError(f"mAP mismatch on the loop subset: project {ours_sub!r} vs loop {ref_sub!r}")

    rows = [{"benchmark": BENCH, "name": configs["loop"][0], "value": loop_wall, "unit": "s",
             "note": f"timed on {n_loop} queries ({wall['loop']:.2f} s wall, {cpu['loop']:.2f} s CPU), "
                     f"extrapolated linearly to {nq}; CPU {loop_cpu:.2f} s"}]
    for key, (label, _fn) in configs.items():
        if key == "loop":
            continue
        rows.append({"benchmark": BENCH, "name": label, "value": wall[key], "unit": "s", "ratio": loop_wall / wall[key],
                     "note": f"ratio = wall-clock speed-up vs loop (best of {repeats} interleaved rounds); "
                             f"CPU {cpu[key]:.3f} s -> CPU-time ratio {loop_cpu / cpu[key]:.1f}"})
    project = [values[k] for k in configs if k != "loop"]
    rows.append({"benchmark": BENCH, "name": "mAP value (project, all queries)", "value": values["auto"], "unit": "",
                 "note": f"engines agree within {max(project) - min(project):.1e}"})
    rows.append({"benchmark": BENCH, "name": f"|project - loop| on the {n_loop}-query subset", "value": diff, "unit": "",
                 "note": f"loop {ref_sub:.12f} vs project {ours_sub:.12f}"})
    return rows


def main(argv: list[str] | None = None) -> None:
    from .report import bench_main

    bench_main(__doc__, lambda a: run(a.quick), argv, quick_help="1,000 x 10,000 instead of 5,000 x 50,000")

if __name__ == "__main__":
    main()
