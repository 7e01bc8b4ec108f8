"""The trials: the work they share (k-means per K, the view bank), prepared once by the driver, and the
Tune function trainable that drives one distillation per trial. Imports Ray and torch: the driver
imports this module lazily."""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import ray.tune
import torch
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.basic_variant import BasicVariantGenerator

from brcd import clustering, io
from brcd.config import Config, save_config
from brcd.layout import RunLayout, stage_file, tune_continue_file
from pipelines.ray import bank_job
from pipelines.ray.bank_job import ensure_bank, eval_feature_caches, feature_cache, plan_bank, uses_feature_cache
from pipelines.ray.workers import distill_in_process
from pipelines.stages import Run, distill_stage, say, teacher_codes
from pipelines.tune.callbacks import ContinueMarker, PlacementGroupReaper
from pipelines.tune.results import EXPERIMENT
from pipelines.tune.space import TuneSpace, trial_config


def prepare_clusters(run: Run, ks: list[int]) -> dict[int, dict[str, Any]]:
    """k-means once per K into ``DIR/clusters/k=<K>/`` (reused when the teacher, split, K, n_init
    and seed are unchanged). Masks are recomputed per trial from its own mask rule."""
    cfg, c = run.cfg, run.cfg.clusters
    tfp, sfp = run.teacher_fingerprint(), run.split_fingerprint
    codes = None
    cache: dict[int, dict[str, Any]] = {}
    for k in ks:
        folder = RunLayout(run.output).cluster_cache(k)
        key = clustering.cluster_cache_key(tfp, sfp, k, c.n_init, cfg.seed)
        try:
            art = clustering.load_cluster_artifact(folder, teacher_fingerprint=tfp, split_fingerprint=sfp)
            hit = art.manifest.get("cache_key") == key
        except (io.ArtifactError, OSError):
            hit = False
        if hit:
            say(f"[tune] clusters K={k}: cache hit ({folder}, built {art.manifest.get('created')}); k-means not rerun")
            cache[k] = {"dir": str(folder), "built": False, "key": key}
            continue
        if codes is None:
            codes = teacher_codes(run)["train"]
        t0 = time.perf_counter()
        art = clustering.build_cluster_artifact(
            codes, num_clusters=k, margin=c.margin, mask_ratio=c.mask_ratio, n_init=c.n_init, seed=cfg.seed,
            teacher_fingerprint=tfp, split_fingerprint=sfp)
        clustering.save_cluster_artifact(art, folder)
        say(f"[tune] clusters K={k}: built once (k-means n_init={c.n_init} on {len(codes)} teacher codes, "
            f"{time.perf_counter() - t0:.1f} s) -> {folder}; trials with K={k} reuse it")
        cache[k] = {"dir": str(folder), "built": True, "key": key}
    return cache


def prepare_bank(run: Run, trials: int = 1) -> tuple[bool, bool]:
    """Build the distillation view bank (``auto`` weighs it against ``trials`` live runs) and the student's
    feature caches before any trial. Returns (whether there is a bank, whether trials train heads only)."""
    plan = plan_bank(run, "distill", runs=trials)
    if plan is not None:
        ensure_bank(run, plan, runs=trials)
    eval_feature_caches(run, "student")
    if uses_feature_cache(run.cfg, "student"):
        feature_cache(run, "student", "query")
    return plan is not None, bank_job.heads_only(plan)


def run_trial(params: dict[str, Any], *, base: dict[str, Any], output: str, gate: dict[str, Any] | None = None) -> None:
    """One Tune trial: the trial's config -> ``distill_stage`` into ``DIR/trials/<trial_id>``."""
    trial_id = ray.tune.get_context().get_trial_id()
    out = Path(output)
    cfg = trial_config(base, params)
    k = cfg.clusters.num_clusters
    cdir, sdir = RunLayout(out).cluster_cache(k), RunLayout(out).trial_dir(trial_id)
    sdir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, RunLayout(sdir).config)
    rule = f"mask_ratio={cfg.clusters.mask_ratio}" if cfg.clusters.mask_ratio is not None else f"margin={cfg.clusters.margin}"
    say(f"[tune] trial {trial_id}: clusters K={k}: cache hit ({cdir}, built once, reused by trial {trial_id}); "
        f"masks recomputed with {rule}")
    run = Run(cfg, out, clusters_dir=cdir, student_dir=sdir, write_config=False)
    marker = stage_file(sdir)
    stamp = marker.stat().st_mtime_ns if marker.exists() else None
    if bank_job.heads_only(plan_bank(run, "distill", quiet=True)):
        say(f"[tune] trial {trial_id}: every network is frozen; the heads train on the shared view bank in the "
            "trial's own process (no Train worker group)")
        info = distill_stage(run, student_dir=sdir, tag=f"trial-{trial_id}", runner=_in_trial_runner)
    else:
        gate = None if gate is None else {**gate, "file": str(tune_continue_file(sdir))}
        info = distill_stage(run, student_dir=sdir, tag=f"trial-{trial_id}", callbacks=[TuneReportCallback()],
                             rung_gate=gate)
    if stamp is not None and marker.stat().st_mtime_ns == stamp and info.get("history"):
        # finished before (e.g. Tune was interrupted right after): give Tune the final result again
        ray.tune.report({k: v for k, v in info["history"][-1].items() if isinstance(v, (int, float))})


def _in_trial_runner(loop_cfg: dict[str, Any], name: str):
    """Run distillation in the Tune trial's process, reporting to Tune (resumes from Tune's checkpoint)."""
    torch.set_num_threads(1)
    last: dict[str, Any] = {}
    keep = Path(tempfile.mkdtemp(prefix="brcd-trial-"))

    def report(metrics: dict[str, Any], ckpt_dir: Path | None) -> None:
        clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
        if ckpt_dir is not None:
            # a copy that outlives the loop's own folder rotation, for the stage's best-weights copy
            dst = keep / Path(ckpt_dir).name
            shutil.copytree(ckpt_dir, dst)
            if last.get("dir") is not None:
                shutil.rmtree(last["dir"], ignore_errors=True)
            last["dir"] = dst
        ray.tune.report(clean, checkpoint=ray.tune.Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir else None)

    resume = None
    ckpt = ray.tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            resume = keep / "resume" / Path(d).name
            shutil.copytree(d, resume)
    distill_in_process(loop_cfg, report=report, resume_from=resume)
    if last.get("dir") is None and resume is not None:
        last["dir"] = resume
    return SimpleNamespace(checkpoint=ray.tune.Checkpoint.from_directory(str(last["dir"])) if last.get("dir") else None)


def asha_rungs(space: TuneSpace, epochs: int) -> list[float]:
    """The epochs below the last where ASHA compares trials, placed as ``ASHAScheduler`` places them."""
    g, rf = space.search.grace_period, space.search.reduction_factor
    if epochs <= g:
        return []
    return [g * rf ** k for k in range(int(math.log(epochs / g) / math.log(rf) + 1)) if g * rf ** k < epochs]


def build_tuner(trainable, cfg: Config, space: TuneSpace, output: Path, max_concurrent: int, callbacks: list):
    """A new Tune run in ``DIR/tune``: the space's searcher, ASHA on ``epoch`` up to the last epoch."""
    s = space.search
    seed = cfg.seed if s.seed is None else s.seed
    if s.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch  # Optuna only when asked for

        search_alg = ConcurrencyLimiter(OptunaSearch(seed=seed), max_concurrent=max_concurrent)
    else:
        search_alg = BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent)
    # stop_last_trials=False: a trial reaching the last epoch finishes by itself (saves its weights)
    scheduler = ASHAScheduler(time_attr="epoch", max_t=cfg.distill.optim.epochs, grace_period=s.grace_period,
                              reduction_factor=s.reduction_factor, stop_last_trials=False)
    return tune.Tuner(
        trainable,
        param_space=space.param_space(),
        tune_config=tune.TuneConfig(metric=s.metric, mode=s.mode, search_alg=search_alg, scheduler=scheduler,
                                    num_samples=s.num_samples,  # the search algorithm carries the limit
                                    trial_dirname_creator=lambda t: f"trial_{t.trial_id}"),
        run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(output), verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=0),
                                  callbacks=[PlacementGroupReaper(), ContinueMarker(str(output), s.metric), *callbacks]),
    )
