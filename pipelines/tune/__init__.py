"""Ray Tune over BRCD distillation: mask ratio, cluster count, temperature (and alpha, lr).

    brcd tune -c CONFIG --space SPACE --output DIR [--num-samples N] [--search random|grid|optuna]
              [--metric map_asymmetric|map_symmetric] [--address auto] [--retry-errored]

See docs/TUNE.md. The teacher, its codes and k-means per K are computed once (:mod:`.trials`), then each
trial distils into ``DIR/trials/<trial_id>/`` while ASHA stops the weak ones; the same command resumes.
This module (the driver and the command) imports Ray, torch and MLflow only when a job runs.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from brcd import io
from brcd.config import Config, save_config
from brcd.io import settings_hash
from pipelines.commands.common import load_config_args
from pipelines.tune.results import (EXPERIMENT, STATUS, TRIAL_ID, UNFINISHED, best_row, format_table, metric_column,
                                    result_rows, write_results)
from pipelines.tune.space import (ALGORITHMS, METRICS, TuneSpace, TuneSpaceError, check_space_against, load_space,
                                  parse_space, trial_config)

__all__ = ["HEADS_ONLY_TRIAL_CPUS", "TuneSpace", "TuneSpaceError", "TuneSummary", "add_commands", "check_space_against",
           "cmd_tune", "load_space", "parse_space", "trial_config", "tune_main"]

#: CPUs (GPUs) a heads-only trial reserves: several trials share a core (their steps are small matmuls)
HEADS_ONLY_TRIAL_CPUS, HEADS_ONLY_TRIAL_GPUS = 0.5, 0.25


@dataclass
class TuneSummary:
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    results_csv: Path
    best_config: Path | None
    cluster_cache: dict[int, dict[str, Any]]
    restored: bool
    leaked_placement_groups: list[dict[str, Any]]  # still reserved after the run (then removed)
    released_placement_groups: list[str]  # freed during the run after stopped trials (#54305)
    unfinished: list[str]  # trial ids left unfinished by an interruption
    interrupted: bool  # unfinished trials, or trials the search has not created yet
    seconds: float


def _fingerprint(cfg: Config, space: TuneSpace) -> str:
    s = space.to_dict()
    for volatile in ("num_samples", "max_concurrent_trials"):
        s["search"].pop(volatile, None)
    return settings_hash(cfg.to_dict(), s)


def _trial_resources(cfg: Config, space: TuneSpace, heads: bool = False) -> dict[str, float]:
    """The trial's own process (its Train workers get their own placement group). By default no CPU: any
    fraction would keep N workers x 1 CPU off an N-CPU cluster; Ray refuses an all-zero bundle, hence
    one byte of memory. A heads-only trial trains in its own process: a fraction of a CPU (and GPU)."""
    if heads:
        return {"cpu": HEADS_ONLY_TRIAL_CPUS, **({"gpu": HEADS_ONLY_TRIAL_GPUS} if cfg.resources.use_gpu else {})}
    if space.search.driver_cpus > 0:
        return {"cpu": space.search.driver_cpus}
    return {"cpu": 0, "memory": 1}


def _driver_bundle(space: TuneSpace) -> dict[str, float] | None:
    return {"CPU": space.search.driver_cpus} if space.search.driver_cpus > 0 else None


def _max_concurrent(cfg: Config, space: TuneSpace, heads: bool = False) -> int:
    if space.search.max_concurrent_trials:
        return space.search.max_concurrent_trials
    import ray

    r, total = cfg.resources, ray.cluster_resources()
    if heads:  # in the trial's own process: a fraction of a CPU (and of a GPU)
        cpus, gpus = HEADS_ONLY_TRIAL_CPUS, HEADS_ONLY_TRIAL_GPUS
    else:
        cpus = space.search.driver_cpus + r.num_workers * r.cpus_per_worker
        gpus = r.num_workers * (r.gpus_per_worker or 1.0)
    fits = [int(total.get("CPU", 1) // cpus), *([int(total.get("GPU", 0) // gpus)] if r.use_gpu else [])]
    return max(1, min(fits))


def _checked(cfg: Config, space: TuneSpace) -> Config:
    """The config the trials run with, once every check that must pass before any work has passed."""
    from pipelines.ray.cluster import check_placement
    from pipelines.stages import say

    if cfg.resources.num_workers == 0:
        # Train local mode cannot run inside a Tune trial in Ray 2.60: prepare_model() calls
        # ray.train.get_context(), which raises in a Tune session, and local mode runs no callbacks.
        say("[tune] resources.num_workers=0 (Train local mode) does not work inside Tune trials; "
            "using 1 Train worker per trial")
        cfg = replace(cfg, resources=replace(cfg.resources, num_workers=1))
    check_space_against(space, cfg)
    check_placement(cfg.resources, "each trial", driver=_driver_bundle(space))  # before the teacher: Ray would wait for ever
    if space.search.grace_period > cfg.distill.optim.epochs:
        raise TuneSpaceError(f"search.asha.grace_period={space.search.grace_period} exceeds distill.optim.epochs="
                             f"{cfg.distill.optim.epochs}; lower the grace period or raise the epochs")
    return cfg


def _job_params(cfg: Config, space: TuneSpace) -> dict[str, Any]:
    """The parent run's params: the base config, every searched distribution and the search settings."""
    params = {**cfg.flat(), **{f"tune.params.{n}": p.to_dict() for n, p in space.params.items()}}
    return params | {f"tune.search.{k}": v for k, v in asdict(space.search).items()}


def _tuner(run, cfg: Config, space: TuneSpace, trainable, fp: str, *, heads: bool, retry_errored: bool,
           callbacks: list):
    """The restored Tune run in ``DIR/tune``, or a new one; with the number of trials a complete run has."""
    from ray import tune

    from pipelines.stages import say
    from pipelines.tune.trials import build_tuner

    exp_dir, state_file = run.output / EXPERIMENT, run.layout.tune_state
    if tune.Tuner.can_restore(str(exp_dir)):
        prev = io.load_json(state_file) if state_file.exists() else {}
        if prev.get("fingerprint") != fp:
            raise TuneSpaceError(f"{exp_dir} holds a tuning run with another config or space; use a new --output "
                                 f"or delete {exp_dir} to start over")
        if prev.get("num_samples") != space.search.num_samples:
            say(f"[tune] note: resuming keeps the original num_samples={prev.get('num_samples')}")
        say(f"[tune] resuming {exp_dir}: finished trials are kept, unfinished ones continue")
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True,
                                   resume_errored=retry_errored)
        return tuner, prev.get("expected_trials", space.expected_trials())
    io.save_json(state_file, {"fingerprint": fp, "space": space.to_dict(), "num_samples": space.search.num_samples,
                              "expected_trials": space.expected_trials(), "source": space.source})
    mc = _max_concurrent(cfg, space, heads)
    each = (f"heads only on the view bank, {HEADS_ONLY_TRIAL_CPUS:g} CPU each" if heads
            else f"{cfg.resources.num_workers} Train worker(s) each")
    say(f"[tune] {space.search.algorithm} search, {space.search.num_samples} sample(s) over "
        f"{', '.join(space.params)}; ASHA on {space.search.metric} (grace {space.search.grace_period}, "
        f"reduction {space.search.reduction_factor:g}, max_t {cfg.distill.optim.epochs} epochs); "
        f"{mc} trial(s) at a time, {each}")
    return build_tuner(trainable, cfg, space, run.output, mc, callbacks), space.expected_trials()


def _results(run, cfg: Config, space: TuneSpace, rows: list[dict[str, Any]], cache: dict[int, dict[str, Any]],
             expected: int) -> dict[str, Any]:
    """Write and print the results of a finished (or interrupted) run: the ``TuneSummary`` fields they fill."""
    from pipelines.stages import say

    metric = space.search.metric
    for k, entry in cache.items():
        entry["trials"] = [r[TRIAL_ID] for r in rows if r.get("num_clusters", cfg.clusters.num_clusters) == k]
        say(f"[tune] clusters K={k}: k-means {'built once' if entry['built'] else 'cache hit'}, "
            f"reused by trials {', '.join(entry['trials']) or '-'}")
    csv_path = write_results(rows, space, run.layout.tune_results)
    best, best_path = best_row(rows, metric), None
    if best is not None:
        best_path = save_config(trial_config(cfg, {n: best[n] for n in space.params}), run.layout.best_config)
        io.save_json(run.layout.best_trial, best)
    print(format_table(rows, space), flush=True)
    if best is not None:
        say(f"[tune] best trial {best[TRIAL_ID]}: {metric} {best[metric_column(metric)]:.4f} "
            f"with {', '.join(f'{n}={best[n]}' for n in space.params)}; config: {best_path}")
    say(f"[tune] results: {csv_path}")
    unfinished = [r[TRIAL_ID] for r in rows if r[STATUS] == UNFINISHED]
    interrupted = bool(unfinished) or len(rows) < expected
    if interrupted:
        say(f"[tune] interrupted: {len(rows) - len(unfinished)} of {expected} trial(s) finished; "
            "run the same command again to resume")
    return {"rows": rows, "best": best, "results_csv": csv_path, "best_config": best_path, "unfinished": unfinished,
            "interrupted": interrupted}


def tune_main(cfg: Config, output: str | Path, space: TuneSpace, *, retry_errored: bool = False,
              callbacks: list | None = None) -> TuneSummary:
    """Teacher once, codes once, k-means once per K, then the Tune run (or its restore). Extra
    ``callbacks`` apply to a new run; a restored one keeps those it was started with."""
    from ray import tune

    from pipelines.stage_tracking import tracker_for
    from pipelines.stages import Run, teacher_codes, teacher_stage
    from pipelines.tune import callbacks as cb
    from pipelines.tune.trials import asha_rungs, prepare_bank, prepare_clusters, run_trial

    t0 = time.perf_counter()
    cfg = _checked(cfg, space)
    fp = _fingerprint(cfg, space)
    tracker = tracker_for(cfg, Path(output)) if cfg.tracking.enabled else None
    run = Run(cfg, output, tracker=tracker)
    job = settings_hash(fp, str(run.output))  # the MLflow runs' key: this config and space in this folder
    if tracker is not None:
        tracker.start_parent(f"tune-{cfg.name}", key=job, params=_job_params(cfg, space),
                             tags={"run_dir": str(run.output)})
    teacher_stage(run)
    teacher_codes(run)
    cache = prepare_clusters(run, space.cluster_counts(cfg))
    banked, heads = prepare_bank(run, space.expected_trials())
    if banked and cfg.bank.enabled == "auto":
        cfg = replace(cfg, bank=replace(cfg.bank, enabled=True))  # a trial alone would not pay for the bank
    gate = {"rungs": asha_rungs(space, cfg.distill.optim.epochs), "metric": space.search.metric}
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=cfg.to_dict(), output=str(run.output), gate=gate),
                                    _trial_resources(cfg, space, heads))
    pgs_before = cb.created_placement_groups()
    restored = tune.Tuner.can_restore(str(run.output / EXPERIMENT))
    extra = [] if tracker is None else [  # a no-op while MLflow is down
        cb.MlflowTrials(cb.trial_runs(cfg, str(tracker.uri), job), base=cfg.to_dict(), output=str(run.output))]
    tuner, expected = _tuner(run, cfg, space, trainable, fp, heads=heads, retry_errored=retry_errored,
                             callbacks=[*(callbacks or []), *extra])
    released_before = len(cb.RELEASED_PLACEMENT_GROUPS)
    grid = tuner.fit()
    leaked = cb.check_placement_groups(pgs_before)
    found = _results(run, cfg, space, result_rows(grid, space, cfg, run.output), cache, expected)
    if tracker is not None:
        cb.finish_mlflow(tracker, cfg, job, space, found["rows"], found["best"],
                         [found["results_csv"], found["best_config"]], found["interrupted"])
    return TuneSummary(**found, cluster_cache=cache, restored=restored, leaked_placement_groups=leaked,
                       released_placement_groups=cb.RELEASED_PLACEMENT_GROUPS[released_before:],
                       seconds=time.perf_counter() - t0)


def add_commands(sub, common) -> None:
    p = sub.add_parser("tune", help="search mask ratio, cluster count, temperature (+alpha, lr) with Ray Tune + ASHA",
                       description="Ray Tune over BRCD distillation runs; the teacher and k-means are computed once "
                                   "and shared by every trial. Re-run the same command to resume. See docs/TUNE.md.")
    common(p)
    p.add_argument("--space", required=True, help="search-space YAML file or a name in tune_spaces/ (default, demo)")
    p.add_argument("--num-samples", type=int, default=None, help="trials to sample (grid: repeats of the grid)")
    p.add_argument("--search", choices=ALGORITHMS, default=None, help="search algorithm (default: the space's)")
    p.add_argument("--metric", choices=METRICS, default=None, help="metric to maximise (default: map_asymmetric)")
    p.add_argument("--retry-errored", action="store_true", help="when resuming, run errored trials again")
    p.set_defaults(func=cmd_tune)


def cmd_tune(args) -> int:
    if args.num_samples is not None and args.num_samples < 1:
        raise TuneSpaceError("--num-samples must be >= 1")
    cfg = load_config_args(args)
    space = load_space(args.space, algorithm=args.search, metric=args.metric, num_samples=args.num_samples)
    from pipelines.ray.cluster import init_ray  # after the config and space checks: importing Ray takes seconds

    init_ray(args.address, Path(args.output), quiet=not getattr(args, "verbose", False))
    summary = tune_main(cfg, args.output, space, retry_errored=args.retry_errored)
    if summary.interrupted:
        return 130
    return 0 if summary.best is not None else 1
