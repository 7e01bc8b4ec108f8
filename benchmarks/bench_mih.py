"""Benchmark: exact multi-index hashing (MultiIndexHashingIndex) vs the flat scan (HammingIndex).

10 M database codes of 64 and 128 bits, uniformly random and clustered (300 random centres, each
bit flipped with probability ~0.1), queries drawn from the same distribution (not in the
database), k = 1, 10, 100, 1000. Both indexes answer the same query blocks in alternating order
(interleaved, so machine load falls on both alike) and their answers must be identical (distances
and ids; the benchmark raises otherwise). Both run single-threaded: ``HammingIndex(engine="faiss",
faiss_threads=1)`` and the MIH numba kernel, which is serial. Reported per configuration:
milliseconds per query of each (wall clock; process CPU time in the note), the speed-up
flat / MIH, MIH's verified candidates and bucket probes per query; per collection: build time and
``memory_bytes`` of both. ``--quick``: 200 k codes, 40 queries (full: 100 queries per configuration).

``--timer cpu`` (``brcd bench --only mih --timer cpu``) reports process CPU time instead of wall
clock: on a machine shared with other jobs the fair single-core comparison.

Usage: ``python -m benchmarks.bench_mih [--quick] [--n-db N] [--n-queries Q] [--timer wall|cpu]``
"""

from __future__ import annotations

import gc
import time

import numpy as np

from brcd.search.flat import HammingIndex
from brcd.search.mih import MultiIndexHashingIndex

BENCH = "bench_mih: multi-index hashing vs flat HammingIndex (exact, single-threaded)"
NOISE = 26 / 256  # bit-flip probability of the clustered codes (~0.10)
CENTRES = 300


def make_packed(n: int, bits: int, kind: str, rng: np.random.Generator, centres: np.ndarray,
                chunk: int = 1 << 20) -> np.ndarray:
    """Packed codes generated in chunks: uniform bytes, or a random centre with bit noise ``NOISE``."""
    nbytes = bits // 8
    out = np.empty((n, nbytes), dtype=np.uint8)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        if kind == "random":
            out[a:b] = rng.integers(0, 256, (b - a, nbytes), dtype=np.uint8)
        else:
            flips = np.packbits(rng.integers(0, 256, (b - a, bits), dtype=np.uint8) < round(NOISE * 256), axis=1)
            out[a:b] = centres[rng.integers(0, centres.shape[0], b - a)] ^ flips
    return out


def _load() -> str:
    from .report import load_string

    return load_string()


def run(quick: bool = False, n_db: int | None = None, n_queries: int | None = None,
        bits_list: tuple[int, ...] = (64, 128), kinds: tuple[str, ...] = ("clustered", "random"),
        ks: tuple[int, ...] = (1, 10, 100, 1000), blocks: int = 4, timer: str = "wall") -> list[dict]:
    """Run the benchmark; returns result rows (see the module docstring).

    ``timer="cpu"``: the value and ratio use process CPU time (both sides run on one thread, so
    it is their single-core cost, robust to other jobs' load); ``"wall"``: wall clock. The other
    timer is reported in the note.
    """
    from .report import check_timer

    check_timer(timer)
    other = "wall" if timer == "cpu" else "CPU"
    n_db = n_db or (200_000 if quick else 10_000_000)
    n_queries = n_queries or (40 if quick else 100)
    rows: list[dict] = []
    for bits in bits_list:
        for kind in kinds:
            rng = np.random.default_rng(bits + (kind == "random"))
            centres = rng.integers(0, 256, (CENTRES, bits // 8), dtype=np.uint8)
            db = make_packed(n_db, bits, kind, rng, centres)
            q = make_packed(n_queries, bits, kind, rng, centres)
            tag = f"{n_db:,} x {bits}b {kind}"
            flat = HammingIndex(bits, engine="faiss", faiss_threads=1)
            w0 = time.perf_counter()
            flat.add_packed(db)
            flat.search_packed(q[:1], 1)  # builds faiss's copy outside the timings
            t_flat = time.perf_counter() - w0
            mih = MultiIndexHashingIndex(bits)
            w0 = time.perf_counter()
            mih.add_packed(db)
            mih.build()
            t_mih = time.perf_counter() - w0
            del db
            gc.collect()
            mih.search_packed(q[:1], 1)  # compiles (or loads) the kernel outside the timings
            rows.append({"benchmark": BENCH, "name": f"build: {tag}, MIH m={mih.m} (tables) vs flat (add + faiss copy)",
                         "value": t_mih, "unit": "s", "ratio": t_mih / max(t_flat, 1e-9),
                         "note": f"flat {t_flat:.2f} s; ratio = MIH / flat build time"})
            rows.append({"benchmark": BENCH, "name": f"memory: {tag}, MIH m={mih.m} vs flat",
                         "value": mih.memory_bytes / 2**20, "unit": "MiB",
                         "ratio": mih.memory_bytes / flat.memory_bytes,
                         "note": f"flat {flat.memory_bytes / 2**20:.0f} MiB (codes + int64 ids + faiss copy); MIH: codes + "
                                 "ids + per table a copy of the codes in key order, int32 positions and offsets; "
                                 "ratio = MIH / flat"})
            splits = np.array_split(np.arange(n_queries), max(1, min(blocks, n_queries)))
            for k in ks:
                wall = {"flat": 0.0, "mih": 0.0}
                cpu = {"flat": 0.0, "mih": 0.0}
                probes = cands = 0
                load0 = _load()
                for bi, part in enumerate(splits):
                    x = np.ascontiguousarray(q[part])
                    out = {}
                    for name in (("flat", "mih") if bi % 2 == 0 else ("mih", "flat")):
                        index = flat if name == "flat" else mih
                        w0, c0 = time.perf_counter(), time.process_time()
                        out[name] = index.search_packed(x, k)
                        wall[name] += time.perf_counter() - w0
                        cpu[name] += time.process_time() - c0
                    probes += mih.last_stats["probes"]
                    cands += mih.last_stats["candidates"]
                    for a, b in zip(out["flat"], out["mih"]):
                        if not np.array_equal(a, b):
                            raise AssertionError(f"MIH and flat answers differ ({tag}, k={k})")
                main, alt = (cpu, wall) if timer == "cpu" else (wall, cpu)
                ms = {name: 1e3 * main[name] / n_queries for name in main}
                unit = "CPU ms/query" if timer == "cpu" else "ms/query"
                rows.append({"benchmark": BENCH, "name": f"{tag}, k={k}: MIH {unit} (flat {ms['flat']:.3g} ms)",
                             "value": ms["mih"], "unit": unit, "ratio": main["flat"] / max(main["mih"], 1e-12),
                             "note": f"ratio = flat / MIH (speed-up); {other} ms/query MIH "
                                     f"{1e3 * alt['mih'] / n_queries:.3g}, flat {1e3 * alt['flat'] / n_queries:.3g} "
                                     f"(ratio {alt['flat'] / max(alt['mih'], 1e-12):.3g}); MIH verified {cands / n_queries:,.0f} "
                                     f"codes and probed {probes / n_queries:,.0f} buckets per query; answers identical; "
                                     f"load {load0}"})
            del flat, mih
            gc.collect()
    return rows


def main(argv: list[str] | None = None) -> None:
    from .report import N_DB, N_QUERIES, bench_main, timer_option

    bench_main(__doc__, lambda a: run(a.quick, a.n_db, a.n_queries, timer=a.timer), argv, N_DB, N_QUERIES,
               timer_option("value / ratio from wall clock (default) or process CPU time (on a busy machine)"),
               quick_help="200k codes x 40 queries instead of 10M x 100")

if __name__ == "__main__":
    main()
