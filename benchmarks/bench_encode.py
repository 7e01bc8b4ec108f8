"""Benchmark 4: encode throughput (images/s) of the students vs the teacher, on CPU.

Every model is a :class:`brcd.models.nets.HashingModel` built with the project's defaults (frozen
backbone, channels_last for CNNs, hash head on the pooled features: linear for the teacher,
MLP ``features -> 1000 -> 64`` for the students) and timed through :meth:`HashingModel.encode`
(``no_grad``, eval mode, int8 codes) on random images at 224 px, the same batch size for every
model. Random (not pretrained) weights: the cost of a forward pass does not depend on the weights.

Protocol: one warm-up batch per model, then ``rounds`` interleaved rounds (every model once per
round, order rotated), each model timed over a few batches per round; the best round per model
is reported, with the load average during the measurement. Ratio = student img/s / teacher img/s
(how many times faster the student encodes a query or a database).

Usage: ``python -m benchmarks.bench_encode [--quick] [--threads 1 --timer cpu]``
"""

from __future__ import annotations

import statistics
import time

import torch

BENCH = "bench_encode: encode throughput, students vs teacher (HashingModel.encode, CPU)"

TEACHER = "vit_base_patch16_224"
STUDENTS = ("efficientnet_b0", "mobilenetv2_100", "resnet18")
QUICK_TEACHER = "test_vit"
QUICK_STUDENTS = ("test_efficientnet", "test_resnet", "test_convnext")


def build(name: str, *, teacher: bool, bits: int, image_size: int, hidden_dim: int):
    from brcd.config import ModelConfig
    from brcd.models.nets import create_hashing_model

    kwargs = {"img_size": image_size} if "vit" in name else {}
    cfg = ModelConfig(backbone=name, bits=bits, head="linear" if teacher else "mlp", hidden_dim=hidden_dim,
                      freeze_backbone=True, channels_last=True, model_kwargs=kwargs)
    torch.manual_seed(0)
    return create_hashing_model(cfg).eval()


def run(quick: bool = False, *, image_size: int | None = None, batch_size: int | None = None,
        rounds: int | None = None, teacher: str | None = None, students: tuple[str, ...] | None = None,
        threads: int | None = None, timer: str = "wall") -> list[dict]:
    """Measure images/s of each model; returns result rows (one per model, plus a timing row).

    Full: 224 px, batch 16, the teacher 2 batches and each student 4 batches per round, 2 rounds
    (about 1-2 minutes on 2 idle cores, ViT-B/16 dominating). Quick: test models at 64 px.
    ``threads``: torch threads during the measurement (``None``: as set); ``timer``: ``"wall"``
    (images per wall-clock second) or ``"cpu"`` (images per process-CPU second: with
    ``threads=1`` the steady measure on a machine shared with other jobs) for the value/ratio columns.
    """
    from .report import check_timer, load_string, torch_threads

    check_timer(timer)
    with torch_threads(threads) as n_threads:
        return _run(quick, image_size, batch_size, rounds, teacher, students, timer, n_threads, load_string)


def _run(quick, image_size, batch_size, rounds, teacher, students, timer, n_threads, load_string) -> list[dict]:
    image_size = image_size or (64 if quick else 224)
    batch_size = batch_size or (8 if quick else 16)
    rounds = rounds or 2
    teacher = teacher or (QUICK_TEACHER if quick else TEACHER)
    students = tuple(students or (QUICK_STUDENTS if quick else STUDENTS))
    bits = 32 if quick else 64
    hidden = 64 if quick else 1000
    models = {teacher: build(teacher, teacher=True, bits=bits, image_size=image_size, hidden_dim=hidden)}
    for s in students:
        models[s] = build(s, teacher=False, bits=bits, image_size=image_size, hidden_dim=hidden)
    batches = {name: (2 if name == teacher else 4) for name in models}
    if quick:
        batches = {name: 2 for name in models}

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, image_size, image_size, generator=g)
    for m in models.values():  # warm-up (allocator, oneDNN kernel selection)
        m.encode(x)

    ips: dict[str, list[float]] = {name: [] for name in models}
    cpu: dict[str, list[float]] = {name: [] for name in models}
    load_before = load_string()
    t_start = time.perf_counter()
    order = list(models)
    for r in range(rounds):
        for name in order[r % len(order):] + order[:r % len(order)]:
            m, n = models[name], batches[name]
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(n):
                codes = m.encode(x)
            w, c = time.perf_counter() - w0, time.process_time() - c0
            assert codes.dtype == torch.int8 and codes.shape == (batch_size, bits)
            ips[name].append(batch_size * n / w)
            cpu[name].append(batch_size * n / max(c, 1e-9))
    elapsed = time.perf_counter() - t_start
    load = f"load {load_before} -> {load_string()}; {n_threads} torch thread(s)"

    main_v, other_v = (ips, cpu) if timer == "wall" else (cpu, ips)
    unit, other_name = ("images/s", "per CPU-second") if timer == "wall" else ("images per CPU-second", "wall-clock")
    best = {k: max(v) for k, v in main_v.items()}
    obest = {k: max(v) for k, v in other_v.items()}
    params = {k: sum(p.numel() for p in m.parameters()) / 1e6 for k, m in models.items()}
    rows = [{"benchmark": BENCH, "name": f"teacher {teacher} ({image_size} px, batch {batch_size})", "value": best[teacher],
             "unit": unit,
             "note": f"best of {rounds} rounds x {batches[teacher]} batches (median {statistics.median(main_v[teacher]):.2f}); "
                     f"{params[teacher]:.1f} M params; {other_name} {obest[teacher]:.2f}; {load}"}]
    for s in students:
        rows.append({"benchmark": BENCH, "name": f"student {s} ({image_size} px, batch {batch_size})", "value": best[s],
                     "unit": unit, "ratio": best[s] / best[teacher],
                     "note": f"ratio = student / teacher (median-round ratio "
                             f"{statistics.median(main_v[s]) / statistics.median(main_v[teacher]):.1f}; {other_name} "
                             f"{obest[s]:.2f} -> ratio {obest[s] / obest[teacher]:.1f}); best of {rounds} rounds x "
                             f"{batches[s]} batches; {params[s]:.1f} M params"})
    rows.append({"benchmark": BENCH, "name": "timed section wall time", "value": elapsed, "unit": "s",
                 "note": f"timer {timer}; {load}"})
    return rows


def main(argv: list[str] | None = None) -> None:
    from .report import THREADS, bench_main, timer_option

    bench_main(__doc__, lambda a: run(a.quick, image_size=a.image_size, batch_size=a.batch_size, rounds=a.rounds,
                                      threads=a.threads, timer=a.timer), argv,
               ("--image-size", {"type": int, "default": None}), ("--batch-size", {"type": int, "default": None}),
               ("--rounds", {"type": int, "default": None}), THREADS,
               timer_option("clock of the value/ratio columns (cpu: images per CPU-second, steady with --threads 1 "
                            "on a busy machine)"), quick_help="timm test models at 64 px")

if __name__ == "__main__":
    main()
