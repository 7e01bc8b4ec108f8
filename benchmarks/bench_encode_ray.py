"""Benchmark: ``brcd encode`` on Ray Data, 2 encoder actors vs 1, and the same shards in one process.

The collection is a folder of JPEG images (smooth random pictures, so they compress and decode like
photos), encoded by an exported student (random weights: the cost of a forward pass does not
depend on them) through :func:`pipelines.commands.registry.encode_collection`, what ``brcd encode
--actors N`` runs: a local Ray, one actor per CPU slot (1 CPU each, so Ray gives each actor one
torch thread), each writing its parquet shards. "in one process" is ``--actors 0``: the same
shards without Ray, with torch's own thread count (every core).

Protocol: ``rounds`` interleaved rounds (the three settings once per round, order rotated), each
into a fresh folder; the best round per setting is reported. Two rates per run:

- end to end: images / wall time of the call (actor start-up and model loading included);
- steady: images after each actor's first shard / time from the first actor's first shard to the
  last shard (the shards' completion-marker times): what more images would cost.

Ratio = 2 actors / 1 actor. Usage: ``python -m benchmarks.bench_encode_ray [--quick]``.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

BENCH = "bench_encode_ray: brcd encode on Ray Data, 2 encoder actors vs 1 (CPU)"

FULL = {"backbone": "efficientnet_b0", "image_size": 224, "images": 512, "batch_size": 16, "shard_rows": 32}
QUICK = {"backbone": "test_efficientnet", "image_size": 64, "images": 128, "batch_size": 8, "shard_rows": 16}


def make_images(folder: Path, n: int, size: int, seed: int = 0) -> Path:
    """``n`` JPEG files: low-resolution noise upscaled (photo-like files, not incompressible noise)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size + 32, size + 32), Image.BICUBIC).save(folder / f"{i:06d}.jpg", quality=90)
    return folder


def export_student(folder: Path, backbone: str, image_size: int, bits: int = 64) -> Path:
    import torch

    from brcd.config import ModelConfig
    from brcd.models.encoder import export_model
    from brcd.models.nets import create_hashing_model

    torch.manual_seed(0)
    cfg = ModelConfig(backbone=backbone, bits=bits, head="mlp", hidden_dim=256, freeze_backbone=True)
    return export_model(folder, create_hashing_model(cfg).eval(), cfg, {"image_size": image_size})


def steady_rate(out: Path, actors: int, shard_rows: int) -> float:
    """Images per second after each actor's first shard, from the completion markers' times."""
    from brcd.shards import read_job, shard_marker

    job = read_job(out)
    done = sorted(os.stat(shard_marker(out, i)).st_mtime for i in range(job.num_shards))
    first = max(1, actors)
    if len(done) <= first:
        return float("nan")
    return (len(done) - first) * shard_rows / max(done[-1] - done[first - 1], 1e-9)


def run(quick: bool = False, *, rounds: int | None = None, **overrides) -> list[dict]:
    from pipelines.ray.cluster import ray_session
    from pipelines.commands.registry import encode_collection

    from .report import load_string

    setup = {**(QUICK if quick else FULL), **{k: v for k, v in overrides.items() if v is not None}}
    rounds = rounds or (1 if quick else 2)
    settings = [("1 actor", 1), ("2 actors", 2), ("1 process, no Ray", 0)]
    with tempfile.TemporaryDirectory(prefix="bench-encode-ray-") as tmp, ray_session(Path(tmp), num_cpus=os.cpu_count()):
        tmp = Path(tmp)
        images = make_images(tmp / "images", setup["images"], setup["image_size"])
        model = export_student(tmp / "model", setup["backbone"], setup["image_size"])
        load_before = load_string()
        e2e: dict[str, list[float]] = {name: [] for name, _ in settings}
        steady: dict[str, list[float]] = {name: [] for name, _ in settings}
        t_start = time.perf_counter()
        for r in range(rounds):
            for name, actors in settings[r % 3:] + settings[:r % 3]:
                out = tmp / f"codes-{r}-{actors}"
                t0 = time.perf_counter()
                summary = encode_collection(str(model), images, out, batch_size=setup["batch_size"],
                                            shard_rows=setup["shard_rows"], actors=actors, progress=None)
                wall = time.perf_counter() - t0
                assert summary["computed_shards"] == summary["shards"] and summary["rows"] == setup["images"]
                e2e[name].append(setup["images"] / wall)
                steady[name].append(steady_rate(out, actors, setup["shard_rows"]))
        elapsed = time.perf_counter() - t_start
        load = f"load {load_before} -> {load_string()}"
    what = f"{setup['images']} JPEGs {setup['image_size']} px, {setup['backbone']} 64 bits, shards of {setup['shard_rows']}"
    rows = []
    for name, _ in settings:
        best_e2e, best_steady = max(e2e[name]), max(steady[name])
        row = {"benchmark": BENCH, "name": f"{name}: steady", "value": best_steady, "unit": "images/s",
               "note": f"end to end {best_e2e:.1f} images/s (start-up included); best of {rounds} round(s); {what}"}
        if name == "2 actors":
            row["ratio"] = best_steady / max(steady["1 actor"])
            row["note"] += f"; ratio = 2 actors / 1 actor (end to end {best_e2e / max(e2e['1 actor']):.2f})"
        rows.append(row)
    rows.append({"benchmark": BENCH, "name": "timed section wall time", "value": elapsed, "unit": "s", "note": load})
    return rows


def main(argv: list[str] | None = None) -> None:
    from .report import bench_main

    bench_main(__doc__, lambda a: run(a.quick), argv, write=False)

if __name__ == "__main__":
    main()
