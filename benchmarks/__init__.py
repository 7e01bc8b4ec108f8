"""Benchmarks for retrieval evaluation and Hamming search (not part of the test suite).

Each module exposes ``run(quick: bool) -> list[dict]`` and ``main()``; ``main`` prints the rows and
records them in ``benchmarks/RESULTS.md`` through :func:`benchmarks.report.write_results`.
Run e.g. ``python -m benchmarks.bench_map [--quick]``.
"""
