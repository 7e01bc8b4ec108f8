"""Sharded batch inference on Ray Data: a model per actor, every shard written by the actor that computed it.

``predictor_cls(**predictor_kwargs)`` is built once per actor; ``predictor(start, stop)`` returns ``{column: array}``
for rows ``[start, stop)``, written as one shard (:mod:`brcd.shards`): outputs never pass through the driver.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from brcd.shards import ShardJob, start_sharded

__all__ = ["run_sharded_inference"]

PROGRESS_EVERY_S = 2.0  # at most one progress line per interval (and always the last)
WAIT_FOR_ACTORS_S = 600  # how long the actor pool may take to start (model downloads on fresh nodes)


class _ShardWriter:
    """The Ray Data UDF: a predictor per actor; each call computes and writes whole shards."""

    def __init__(self, job: ShardJob, predictor_cls: type, predictor_kwargs: Mapping[str, Any]):
        self.job = job
        self.predictor = predictor_cls(**dict(predictor_kwargs))

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        done = [_compute_shard(self.job, self.predictor, int(i), int(s), int(e))
                for i, s, e in zip(batch["shard"], batch["start"], batch["stop"])]
        return {key: np.array([d[key] for d in done]) for key in ("shard", "rows", "seconds")}


def _compute_shard(job: ShardJob, predictor: Any, shard: int, start: int, stop: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    outputs = predictor(start, stop)
    seconds = time.perf_counter() - t0
    job.write_shard(shard, outputs, seconds=seconds)
    return {"shard": shard, "rows": stop - start, "seconds": seconds}


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else (f"{m}m{s:02d}s" if m else f"{s}s")


class _Progress:
    def __init__(self, label: str, unit: str, job: ShardJob, todo: int, skipped_rows: int, say: Callable[[str], Any]):
        self.label, self.unit, self.say = label, unit, say
        self.total_shards, self.total_rows = job.num_shards, job.num_rows
        self.shards_done = job.num_shards - todo
        self.rows_done = skipped_rows
        self.rows_now = 0
        self.t0 = time.perf_counter()
        self.last = -math.inf

    def update(self, rows: int) -> None:
        self.shards_done += 1
        self.rows_done += rows
        self.rows_now += rows
        now = time.perf_counter()
        if now - self.last >= PROGRESS_EVERY_S or self.shards_done == self.total_shards:
            self.last = now
            rate = self.rows_now / max(now - self.t0, 1e-9)
            eta = (self.total_rows - self.rows_done) / rate if rate > 0 else math.inf
            self.say(f"[{self.label}] {self.shards_done}/{self.total_shards} shards, {self.rows_done}/{self.total_rows} "
                     f"{self.unit}, {rate:.1f} {self.unit}/s, ETA {_fmt_eta(eta)}")


def run_sharded_inference(
    out_dir: str | Path,
    num_rows: int,
    shard_rows: int,
    predictor_cls: type,
    predictor_kwargs: Mapping[str, Any],
    *,
    fingerprint: Mapping[str, Any],
    writer: str = "npy",
    num_actors: int | None = None,
    num_cpus_per_actor: float = 1,
    num_gpus_per_actor: float = 0,
    label: str = "encode",
    unit: str = "rows",
    progress: Callable[[str], Any] | None = print,
) -> dict[str, Any]:
    """Compute rows ``[0, num_rows)`` in shards of ``shard_rows`` into ``out_dir`` (resumable).

    ``num_actors``: ``None`` one per slot of the cluster (at most one per unfinished shard), ``0`` in this
    process; else Ray must be initialised. Returns ``{rows, shards, computed_shards, skipped_shards, seconds,
    rows_per_s, actors, out_dir}`` (``rows_per_s``: rows computed in this call over its wall time)."""
    job = start_sharded(out_dir, fingerprint, num_rows=num_rows, shard_rows=shard_rows, writer=writer)
    if num_cpus_per_actor < 0 or num_gpus_per_actor < 0 or (num_actors != 0 and num_cpus_per_actor + num_gpus_per_actor <= 0):
        raise ValueError("num_cpus_per_actor / num_gpus_per_actor must be >= 0 and reserve something for each actor")
    say = progress or (lambda _msg: None)
    bounds = job.bounds
    todo = job.unfinished()
    pending = set(todo)
    skipped_rows = sum(b - a for i, (a, b) in enumerate(bounds) if i not in pending)
    t0 = time.perf_counter()
    actors = 0
    if todo:
        tracker = _Progress(label, unit, job, len(todo), skipped_rows, say)
        if len(todo) < len(bounds):
            say(f"[{label}] resuming: {len(bounds) - len(todo)}/{len(bounds)} shards already in {out_dir}")
        if num_actors == 0:
            predictor = predictor_cls(**dict(predictor_kwargs))
            for i in todo:
                tracker.update(_compute_shard(job, predictor, i, *bounds[i])["rows"])
        else:
            actors = _run_on_ray(job, todo, predictor_cls, predictor_kwargs, num_actors, num_cpus_per_actor,
                                 num_gpus_per_actor, label, tracker)
    else:
        say(f"[{label}] all {len(bounds)} shards already in {out_dir}")
    seconds = time.perf_counter() - t0
    computed_rows = sum(bounds[i][1] - bounds[i][0] for i in todo)
    return {"rows": int(num_rows), "shards": len(bounds), "computed_shards": len(todo),
            "skipped_shards": len(bounds) - len(todo), "seconds": seconds,
            "rows_per_s": computed_rows / seconds if todo and seconds > 0 else 0.0, "actors": actors,
            "out_dir": str(out_dir)}


def _run_on_ray(job: ShardJob, todo: list[int], predictor_cls: type, predictor_kwargs: Mapping[str, Any],
                num_actors: int | None, num_cpus: float, num_gpus: float, label: str, tracker: _Progress) -> int:
    import ray
    import ray.data

    from pipelines.ray.cluster import StageError, node_capacity, root_cause

    if not ray.is_initialized():
        raise ValueError("Ray is not initialised: call pipelines.ray.cluster.init_ray first, or pass num_actors=0 "
                         "to run in this process")
    slots = sum(node_capacity(n.get("Resources", {}), {"CPU": num_cpus, "GPU": num_gpus})
                for n in ray.nodes() if n.get("Alive"))
    asked = f"{num_cpus:g} CPU" + (f" + {num_gpus:g} GPU" if num_gpus else "")
    if slots < 1:
        raise StageError(f"{label}: no node of the Ray cluster holds one actor of {asked}; lower the per-actor "
                         "CPUs/GPUs or add nodes")
    wanted = slots if num_actors is None else int(num_actors)
    if wanted > slots:
        tracker.say(f"[{label}] {wanted} actors of {asked} asked, the cluster holds {slots}: using {slots}")
    size = max(1, min(wanted, slots, len(todo)))
    bounds = job.bounds
    items = [{"shard": i, "start": bounds[i][0], "stop": bounds[i][1]} for i in todo]
    ctx = ray.data.DataContext.get_current()
    previous = ctx.enable_progress_bars, ctx.wait_for_min_actors_s
    ctx.enable_progress_bars = False  # the driver prints its own progress lines
    # Start when the whole pool is up, so the first shards spread over all actors and a pool the
    # cluster cannot place fails with Ray's timeout
    ctx.wait_for_min_actors_s = WAIT_FOR_ACTORS_S
    # Ray Data need not say so (its log_once key), nor log its plan at INFO unless brcd -v
    with contextlib.suppress(Exception):
        from ray.util.debug import log_once

        log_once("ray_data_progress_manager_disabled")
    data_log = logging.getLogger("ray.data")
    data_level = data_log.level
    if logging.getLogger().getEffectiveLevel() > logging.INFO:
        data_log.setLevel(logging.WARNING)
    try:
        # One block per shard, so idle actors pick up the next shard; Ray Data restarts a lost actor
        # and retries its shard.
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _ShardWriter, batch_size=1, batch_format="numpy",
            # one shard (minutes of work) in flight per actor: a queued one would wait for a busy actor
            compute=ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=1),
            fn_constructor_kwargs={"job": job, "predictor_cls": predictor_cls, "predictor_kwargs": dict(predictor_kwargs)},
            num_cpus=num_cpus, num_gpus=num_gpus or None,
        )
        for row in ds.iter_rows():
            tracker.update(int(row["rows"]))
    except Exception as exc:  # Ray wraps the actor's exception (RayTaskError / UserCodeException)
        raise StageError(f"{label} failed on a Ray actor: {root_cause(exc)}; fix it and run again to resume "
                         f"({len(job.finished())}/{job.num_shards} shards are done)") from exc
    finally:
        ctx.enable_progress_bars, ctx.wait_for_min_actors_s = previous
        data_log.setLevel(data_level)
    return size
