"""The pipeline stages, driver side: teacher -> clusters -> distill -> evaluate.

Each stage writes its outputs atomically with a ``stage.json`` marker (written last) holding the settings
hash and fingerprints: a finished stage with the same settings is skipped, an interrupted one resumes from
its last checkpoint (deterministic run names), changed settings start a new run next to the old one.
``run.layout`` (:class:`brcd.layout.RunLayout`) names every path.

Nested codes (NHL, ``docs/NHL.md``): one teacher and one student serve every length; the clusters are built
once on the longest code and the L-bit masks recomputed from its L-bit prefixes when distilling. Results
report every length (``student_map_symmetric@16``); the unsuffixed keys are the means over the lengths.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from brcd import builders, clustering, io, training_free
from brcd import layout as lay
from brcd.config import Config, code_lengths, is_nested, save_config
from brcd.data.splits import split_files
from brcd.engine import STATE_META, encode_features, encode_throughput
from brcd.evaluation import evaluate_paradigms, precision_recall_by_radius
from brcd.io import settings_hash
from brcd.plots import plot_bit_masks, plot_k_selection, plot_precision_recall
from pipelines.ray import bank_job as view_bank
from pipelines.ray import workers
from pipelines.ray.cluster import StageError, put_file, run_trainer, say
from pipelines.ray.payload import WorkerPayload

STAGE_FILE = lay.STAGE_FILE


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _elapsed(t0: tuple[float, float], cfg: Config | None = None) -> dict[str, float]:
    """Wall seconds since ``t0`` and, when the work ran in this process (Ray Train local mode,
    ``resources.num_workers=0``, or driver-side work when ``cfg`` is None), its CPU seconds too."""
    out = {"seconds": time.perf_counter() - t0[0]}
    if cfg is None or cfg.resources.num_workers == 0:
        out["cpu_seconds"] = time.process_time() - t0[1]
    return out


def _nhl_part(cfg: Config) -> list[Any]:
    """The NHL settings as an extra settings-hash part, for nested configs only (single-length keys stay)."""
    return [asdict(cfg.nhl)] if is_nested(cfg) else []


def _bank_part(plan: Any) -> list[Any]:
    """The bank's fingerprint as an extra settings-hash part when a stage trains from a bank (live keys stay)."""
    return [plan.fingerprint] if plan is not None else []


def _per_length_summary(loop: dict[str, Any], metric: str, bits: list[int]) -> str:
    """``" (8: 0.41, 16: 0.47, 32: 0.50)"`` = ``metric@L`` at the epoch where ``metric`` was best."""
    epoch = loop.get("best_epoch", {}).get(metric)
    row = next((h for h in loop.get("history", []) if h.get("epoch") == epoch), None)
    if len(bits) < 2 or row is None:
        return ""
    return " (" + ", ".join(f"{L}: {row[f'{metric}@{L}']:.4f}" for L in bits if f"{metric}@{L}" in row) + ")"


class NullTracker:
    """Stage hooks with no effect; ``pipelines.stage_tracking.MlflowStageTracker`` logs them to MLflow."""

    def stage_started(self, stage: str, run: "Run", params: dict[str, Any] | None = None) -> None:
        pass

    def callbacks(self, stage: str, run: "Run") -> list:
        """Ray Train ``UserCallback``s for live per-epoch metrics of a training stage."""
        return []

    def stage_metrics(self, stage: str, metrics: dict[str, Any], step: int | None = None) -> None:
        pass

    def stage_finished(self, stage: str, run: "Run", info: dict[str, Any], artifacts: list[Path]) -> None:
        pass

    def stage_failed(self, stage: str, run: "Run", error: BaseException) -> None:
        pass


class Run:
    """One output folder: the config, the data split and ``layout`` (a :class:`brcd.layout.RunLayout`).
    ``data=False``: no image split (the cross-modal job, which has its own pairs)."""

    def __init__(self, cfg: Config, output: str | Path, *, teacher_dir: Path | None = None,
                 clusters_dir: Path | None = None, student_dir: Path | None = None, write_config: bool = True,
                 tracker: Any = None, data: bool = True):
        self.cfg = cfg
        self.output = Path(output).resolve()
        try:
            self.output.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OSError(f"cannot create the output folder {self.output} ({exc.strerror}); "
                          "choose a writable --output folder") from None
        self.layout = lay.RunLayout(self.output, teacher_dir=teacher_dir, clusters_dir=clusters_dir,
                                    student_dir=student_dir)
        if write_config:
            save_config(cfg, self.layout.config)
        self.tracker = tracker or NullTracker()
        self.bundle, self.split_fingerprint = None, ""
        if not data:
            return
        existed = any(p.exists() for p in split_files(self.split_dir))
        self.bundle = builders.data_bundle(cfg, self.split_dir)
        self.split_fingerprint = self.bundle.split.fingerprint
        if write_config:  # said once, by the driver, with the path the user knows
            sizes = ", ".join(f"{len(self.bundle.split.indices(p)):,} {p}" for p in ("train", "validation", "query", "database"))
            say(f"[data] {'reusing' if existed else 'saved'} split {self.split_fingerprint} ({sizes}) "
                f"{'from' if existed else 'in'} {split_files(self.split_dir)[0]}")

    split_dir = property(lambda self: self.layout.split_dir)
    teacher_dir = property(lambda self: self.layout.teacher_dir)
    clusters_dir = property(lambda self: self.layout.clusters_dir)
    student_dir = property(lambda self: self.layout.student_dir)
    teacher_weights = property(lambda self: self.layout.teacher_weights)

    def payload(self, **extra: Any) -> WorkerPayload:
        """What this run's Ray processes get: the config, the split files, the scratch folder and ``extra``."""
        files = {p.name: p.read_bytes() for p in split_files(self.split_dir)} if self.bundle is not None else {}
        return WorkerPayload(self.cfg, files, self.split_fingerprint, str(self.layout.scratch), **extra)

    def teacher_fingerprint(self) -> str:
        fp = self.layout.teacher_fingerprint()
        if fp is None:
            raise StageError(f"no teacher at {self.teacher_weights}; run `brcd teacher` first (or set teacher.checkpoint)")
        return fp


@dataclass
class Stage:
    """The skeleton every stage shares: skip when ``marker`` holds these settings (and ``outputs`` exist),
    else ``work()`` as one tracked run (``tag``; None: untracked) whose info is saved as the marker, last."""

    run: Run
    tag: str | None
    key: str | None = None  # the settings hash; None: no marker, never skipped (evaluate)
    marker: Path | None = None
    outputs: tuple[Path, ...] = ()

    def done(self, message: str) -> dict[str, Any] | None:
        """The marker's info when this stage already ran with these settings (``message`` is said then)."""
        if self.key is None or not self.marker.exists() or not all(p.exists() for p in self.outputs):
            return None
        info = io.load_json(self.marker)
        if info.get("settings_hash") != self.key:
            return None
        say(message)
        return info

    def execute(self, work: Callable[[], tuple[dict[str, Any], list[Path]]]) -> dict[str, Any]:
        tracker, tag = self.run.tracker, self.tag
        if tag:
            tracker.stage_started(tag, self.run)
        try:
            info, artifacts = work()
        except StageError as exc:
            if tag:
                tracker.stage_failed(tag, self.run, exc)
            raise
        if self.key is not None:
            info = {"settings_hash": self.key, **info}
            io.save_json(self.marker, info)
        if tag:
            tracker.stage_finished(tag, self.run, info, artifacts)
        return info


def _copy_best(result: Any, names: dict[str, Path]) -> dict[str, Any]:
    """Copy the checkpoint's best weights out (``names``: file in the checkpoint -> destination); its loop state."""
    if result.checkpoint is None:
        raise StageError("the run finished without a checkpoint; check the worker logs above")
    with result.checkpoint.as_directory() as d:
        for src, dst in names.items():
            f = Path(d) / src
            if not f.exists():
                raise StageError(f"checkpoint {d} has no {src}; the run may have diverged before any validation")
            dst.parent.mkdir(parents=True, exist_ok=True)
            with io.atomic_path(dst) as tmp:
                shutil.copyfile(f, tmp)
        return io.load_json(Path(d) / STATE_META)["loop"]


def _train(run: Run, role: str, tag: str, bank: tuple[Any, str | None], worker: Callable, best: dict[str, Path],
           name: str, *, callbacks: list | None = None, runner: Any = None, **extra: Any) -> dict[str, Any]:
    """A training stage's run: its workers get ``extra``, the view bank ``bank`` (the plan and the line saying
    why it is off) and the exact feature caches of the ``role`` model's frozen backbone; the best weights are
    copied to ``best``. ``runner(payload, name)`` replaces the Ray Train run (Tune's in-process trials)."""
    t0 = _clock()
    plan, note = bank
    if note:
        say(note)
    if plan is not None:
        extra["bank"] = view_bank.ensure_bank(run, plan)
    features = view_bank.eval_feature_caches(run, role)
    if features is not None:
        say(f"[{'teacher' if role == 'teacher' else 'distill'}] validation encodes the {role}'s cached frozen-backbone "
            f"features ({len(features['query'])} validation + {len(features['database'])} database images)")
    payload = run.payload(eval_features=features, **extra)
    if runner is not None:
        result = runner(payload, name)
    else:
        result = run_trainer(worker, payload, run.cfg, run.output, name,
                             callbacks=(callbacks or []) + run.tracker.callbacks(tag, run))
    loop = _copy_best(result, best)
    return {"best": loop["best"], "best_epoch": loop["best_epoch"], "epochs": loop["epoch"],
            "history": loop["history"], **_elapsed(t0, run.cfg)}


def teacher_stage(run: Run) -> dict[str, Any]:
    cfg = run.cfg
    if cfg.teacher.checkpoint:  # an existing teacher: verify it fits the configured architecture
        torch.manual_seed(cfg.seed)
        builders.build_model(cfg.teacher.model, cfg.teacher.checkpoint)
        run.teacher_dir.mkdir(parents=True, exist_ok=True)
        with io.atomic_path(run.teacher_weights) as tmp:
            shutil.copyfile(cfg.teacher.checkpoint, tmp)
        info = {"settings_hash": "external", "source": cfg.teacher.checkpoint, "fingerprint": run.teacher_fingerprint()}
        io.save_json(lay.stage_file(run.teacher_dir), info)
        say(f"[teacher] using existing checkpoint {cfg.teacher.checkpoint}")
        return info
    bank = view_bank.bank_decision(run, "teacher")
    key = settings_hash(asdict(cfg.data), asdict(cfg.teacher), cfg.seed, run.split_fingerprint, *_nhl_part(cfg),
                        *_bank_part(bank[0]))
    marker = lay.stage_file(run.teacher_dir)
    stage = Stage(run, "teacher", key, marker, (run.teacher_weights,))
    if info := stage.done(f"[teacher] already trained ({run.teacher_weights}); delete {run.teacher_dir} to retrain"):
        return info

    def work() -> tuple[dict[str, Any], list[Path]]:
        say(f"[teacher] training {cfg.teacher.model.backbone} ({cfg.teacher.model.bits} bits) on "
            f"{cfg.resources.num_workers or 1} worker(s)")
        loop = _train(run, "teacher", "teacher", bank, workers.teacher_worker,
                      {lay.best_weights_name("map"): run.teacher_weights}, f"teacher-{key}")
        return {"fingerprint": run.teacher_fingerprint(), **loop}, [marker]

    info = stage.execute(work)
    say(f"[teacher] done: best validation mAP {info['best'].get('map', float('nan')):.4f} at epoch "
        f"{info['best_epoch'].get('map')}{_per_length_summary(info, 'map', code_lengths(cfg.teacher.model.bits))}")
    return info


def _encode(run: Run, role: str, models: dict[str, tuple[Path, list[str]]], job: Callable[[], str],
            label: str | None = None) -> dict[str, dict[str, np.ndarray]]:
    """``{name: {part: codes}}`` of ``role``'s models (name -> (weights, parts)): the heads on the exact
    feature caches when :func:`pipelines.ray.bank_job.uses_feature_cache` says so (no Train job), else a Ray
    Train encode job named ``job()``. ``label``: the line said before, completed with the way taken."""
    cfg = run.cfg
    model_cfg = cfg.teacher.model if role == "teacher" else cfg.student.model
    if view_bank.uses_feature_cache(cfg, role):
        if label:
            say(f"{label} from the frozen backbone's feature caches")
        feats: dict[str, np.ndarray] = {}
        out: dict[str, dict[str, np.ndarray]] = {}
        for name, (weights, parts) in models.items():
            model = builders.build_model(model_cfg, weights)
            for p in parts:
                if p not in feats:
                    feats[p] = view_bank.feature_cache(run, role, p, run.teacher_weights if role == "teacher" else None)
                out.setdefault(name, {})[p] = encode_features(model, feats[p])
        return out
    if label:
        say(f"{label} with the teacher (once)")
    spec = {name: {"model": asdict(model_cfg), "weights": put_file(w), "parts": list(parts)}
            for name, (w, parts) in models.items()}
    return run_trainer(workers.encode_worker, run.payload(models=spec), cfg, run.output, job(),
                       checkpoints=False).return_value


def teacher_codes(run: Run) -> dict[str, np.ndarray]:
    """Teacher codes of the clean train / validation / query / database images (computed once)."""
    tfp = run.teacher_fingerprint()
    path, marker = run.layout.teacher_codes, run.layout.teacher_codes_meta
    if path.exists() and marker.exists():
        meta = io.load_json(marker)
        if meta.get("teacher") == tfp and meta.get("split") == run.split_fingerprint:
            return io.load_arrays(path)
    parts = ["train", "validation", "query", "database"]
    codes = _encode(run, "teacher", {"teacher": (run.teacher_weights, parts)}, lambda: f"encode-teacher-{tfp[:10]}",
                    "[teacher] encoding train / validation / query / database")["teacher"]
    io.save_arrays(path, **codes)
    io.save_json(marker, {"teacher": tfp, "split": run.split_fingerprint})
    return codes


def clusters_stage(run: Run) -> dict[str, Any]:
    cfg, c = run.cfg, run.cfg.clusters
    tfp = run.teacher_fingerprint()
    key = settings_hash(asdict(c), tfp, run.split_fingerprint, cfg.seed)
    stage = Stage(run, "clusters", key, lay.stage_file(run.clusters_dir))
    if info := stage.done(f"[clusters] already built for this teacher and split ({run.clusters_dir})"):
        return info

    def work() -> tuple[dict[str, Any], list[Path]]:
        t0 = _clock()
        train_codes = teacher_codes(run)["train"]
        say(f"[clusters] k-means K={c.num_clusters} (n_init={c.n_init}) on {len(train_codes)} teacher codes")
        artifact = clustering.build_cluster_artifact(
            train_codes, num_clusters=c.num_clusters, margin=c.margin, mask_ratio=c.mask_ratio, n_init=c.n_init,
            seed=cfg.seed, teacher_fingerprint=tfp, split_fingerprint=run.split_fingerprint,
        )
        clustering.save_cluster_artifact(artifact, run.clusters_dir)
        lo, hi = c.k_range
        hi = min(hi, len(np.unique(train_codes, axis=0)) - 1)
        if hi >= lo:
            ks = clustering.choose_k(train_codes, list(range(lo, hi + 1)), n_init=min(c.n_init, 3), seed=cfg.seed)
            plot_k_selection(ks, run.layout.k_selection_png)
            io.save_json(run.layout.k_selection_json, ks)
            say(f"[clusters] silhouette suggests K={ks['suggested_k']} (configured K={c.num_clusters}); "
                f"plot: {run.layout.k_selection_png.name}")
        plot_bit_masks(artifact.masks, run.layout.bit_masks_png)
        info = {"teacher": tfp, "kept_bits_per_cluster": artifact.masks.sum(axis=1).tolist(),
                "cluster_sizes": np.bincount(artifact.labels, minlength=c.num_clusters).tolist(), **_elapsed(t0)}
        if is_nested(cfg):  # clusters of the longest code; the masks of every length (recomputed when distilling)
            per = clustering.masks_by_length(artifact, code_lengths(cfg.teacher.model.bits), margin=c.margin,
                                             mask_ratio=c.mask_ratio)
            info["kept_bits_per_cluster_by_length"] = {str(L): m.sum(axis=1).tolist() for L, m in per.items()}
        return info, [p for p in run.layout.cluster_files if p.exists()]

    info = stage.execute(work)
    kept = [int(k) for k in info["kept_bits_per_cluster"]]
    say(f"[clusters] done: cluster sizes {info['cluster_sizes']}, kept bits per cluster {kept}")
    return info


def load_clusters(run: Run) -> clustering.ClusterArtifact:
    """The verified cluster artifact of this teacher and split."""
    artifact = clustering.load_cluster_artifact(
        run.clusters_dir, teacher_fingerprint=run.teacher_fingerprint(), split_fingerprint=run.split_fingerprint)
    c = run.cfg.clusters
    if artifact.num_clusters != c.num_clusters:
        raise StageError(f"cluster artifact has K={artifact.num_clusters} but clusters.num_clusters={c.num_clusters}; "
                         "re-run `brcd clusters`")
    return artifact


def distill_clusters(run: Run) -> dict[str, Any]:
    """What the distillation workers take from the artifact: ``labels``, ``centroids`` and
    ``masks_by_length`` by this config's mask rule (which may differ from the rule the artifact was
    saved with: Tune tries several on one k-means run)."""
    artifact, c = load_clusters(run), run.cfg.clusters
    masks = clustering.masks_by_length(artifact, code_lengths(run.cfg.student.model.bits), margin=c.margin,
                                       mask_ratio=c.mask_ratio)
    return {"labels": artifact.labels, "centroids": artifact.centroids, "masks_by_length": masks}


def distill_stage(run: Run, *, student_dir: Path | None = None, tag: str = "distill", callbacks=None,
                  runner: Any = None, rung_gate: dict[str, Any] | None = None) -> dict[str, Any]:
    """``runner(payload, name)`` replaces the Ray Train run (a result with ``.checkpoint``): Tune
    trials whose networks are all frozen distil in their own process. ``rung_gate``: a Tune trial's
    workers wait for Tune's decision at ASHA's rungs (:func:`pipelines.ray.workers.gated_report`)."""
    cfg = run.cfg
    out = student_dir or run.student_dir
    tfp = run.teacher_fingerprint()
    needs_clusters = builders.DISTILL_OBJECTIVES[cfg.distill.method].needs_clusters
    clusters = distill_clusters(run) if needs_clusters else None
    bank = view_bank.bank_decision(run, "distill")
    key = settings_hash(asdict(cfg.data), asdict(cfg.student), asdict(cfg.distill), asdict(cfg.clusters) if needs_clusters else None,
                        tfp, run.split_fingerprint, cfg.seed, *_nhl_part(cfg), *_bank_part(bank[0]))
    best_files = {lay.best_weights_name(m): lay.best_weights(out, m) for m in ("map_symmetric", "map_asymmetric")}
    stage = Stage(run, tag, key, lay.stage_file(out), tuple(best_files.values()))
    if info := stage.done(f"[{tag}] already distilled ({out}); delete it to retrain"):
        return info
    codes = teacher_codes(run)

    def work() -> tuple[dict[str, Any], list[Path]]:
        where = "in this process" if runner is not None else f"on {cfg.resources.num_workers or 1} worker(s)"
        say(f"[{tag}] {cfg.distill.method} distillation of {cfg.student.model.backbone} from the teacher {where}")
        loop = _train(run, "student", tag, bank, workers.distill_worker, best_files, f"{tag}-{key}",
                      callbacks=callbacks, runner=runner, teacher_weights=put_file(run.teacher_weights),
                      teacher_db_codes=codes["database"], clusters=clusters, rung_gate=rung_gate)
        return {"teacher": tfp, **loop, "model": asdict(cfg.student.model)}, [stage.marker]

    info = stage.execute(work)
    bits = code_lengths(cfg.student.model.bits)
    say(f"[{tag}] done: best validation mAP symmetric {info['best'].get('map_symmetric', float('nan')):.4f}"
        f"{_per_length_summary(info, 'map_symmetric', bits)}, "
        f"asymmetric {info['best'].get('map_asymmetric', float('nan')):.4f}{_per_length_summary(info, 'map_asymmetric', bits)}")
    return info


def evaluate_stage(run: Run, *, student_dir: Path | None = None, write: bool = True) -> dict[str, Any]:
    """Both paradigms on the query set with the best checkpoint of each; encode throughput. ``write=False``
    (compare, tune: they track their own rows): no files, no tracked run, no training-free baselines."""
    cfg = run.cfg
    sdir = student_dir or run.student_dir
    sym_weights, asym_weights = (lay.best_weights(sdir, m) for m in ("map_symmetric", "map_asymmetric"))
    codes = teacher_codes(run)

    def work() -> tuple[dict[str, Any], list[Path]]:
        enc = _encode(run, "student", {"sym": (sym_weights, ["query", "database"]), "asym": (asym_weights, ["query"])},
                      lambda: f"evaluate-{settings_hash(str(sdir), io.file_sha256(sym_weights))}")
        q_labels, db_labels = run.bundle.labels("query"), run.bundle.labels("database")
        topk, bits = cfg.data.topk, code_lengths(cfg.student.model.bits)
        per_length = [_paradigm_metrics(codes, enc, q_labels, db_labels, topk, L) for L in bits]
        # One length: its metrics. Nested (NHL): every length under "<key>@L", and the unsuffixed keys are
        # the means over the lengths (as the checkpoint-selection metrics during training).
        results = {k: _mean_or_none([m[k] for m in per_length]) for k in per_length[0]}
        results.update(topk=topk, bits=cfg.student.model.bits, num_queries=int(len(q_labels)),
                       num_database=int(len(db_labels)))
        if len(bits) > 1:
            results.update({f"{k}@{L}": m[k] for L, m in zip(bits, per_length) for k in m})
        results.update(bit_agreement(enc["asym"]["query"], codes["query"]))
        if write:  # the demo's and `brcd evaluate`'s table; compare and tune rows have their own
            results.update(training_free_pixels(run, bits, q_labels, db_labels))
        torch.manual_seed(cfg.seed)
        speed = encode_throughput({"teacher": builders.build_model(cfg.teacher.model, run.teacher_weights),
                                   "student": builders.build_model(cfg.student.model, asym_weights)}, cfg.data.image_size)
        results["teacher_images_per_second"], results["student_images_per_second"] = speed["teacher"], speed["student"]
        results["speedup"] = results["student_images_per_second"] / results["teacher_images_per_second"]
        if not write:
            return results, []
        pr = precision_recall_by_radius
        plot_precision_recall({
            "teacher": pr(codes["query"], codes["database"], q_labels, db_labels),
            "student (symmetric)": pr(enc["sym"]["query"], enc["sym"]["database"], q_labels, db_labels),
            "student -> teacher db (asymmetric)": pr(enc["asym"]["query"], codes["database"], q_labels, db_labels),
        }, run.layout.precision_recall_png)
        io.save_json(run.layout.results_json, results)
        io.write_text(run.layout.results_md, results_table(results))
        return results, [run.layout.results_json, run.layout.results_md, run.layout.precision_recall_png]

    return Stage(run, "evaluate" if write else None).execute(work)


def bit_agreement(student: np.ndarray, teacher: np.ndarray) -> dict[str, Any]:
    """Per bit, the fraction of query images on which the asymmetric student's bit equals the teacher's."""
    s, t = np.asarray(student), np.asarray(teacher)
    L = min(s.shape[1], t.shape[1])
    per_bit = (s[:, :L] == t[:, :L]).mean(axis=0)
    return {"bit_agreement": float(per_bit.mean()), "bit_agreement_min": float(per_bit.min()),
            "bit_agreement_per_bit": [round(float(v), 4) for v in per_bit]}


def training_free_pixels(run: Run, bits: list[int], q_labels: np.ndarray, db_labels: np.ndarray) -> dict[str, Any]:
    """The training-free baselines on raw pixels at every code length: rows under ``training_free``, the best
    one's mAP and method under ``training_free_map`` / ``training_free_method`` (``@L`` per length when nested)."""
    say(f"[evaluate] training-free baselines ({', '.join(training_free.METHODS)}) on raw pixels, fitted on the "
        "training split")
    feats = {p: training_free.pixel_features(run.bundle, p) for p in ("train", "query", "database")}
    out: dict[str, Any] = {"training_free": []}
    for L in bits:
        rows = [{"input": "pixels", **r} for r in
                training_free.evaluate(feats, q_labels, db_labels, bits=L, topk=run.cfg.data.topk, seed=run.cfg.seed)]
        top = training_free.best(rows)
        out["training_free"] += rows
        suffix = f"@{L}" if len(bits) > 1 else ""
        out[f"training_free_map{suffix}"], out[f"training_free_method{suffix}"] = top["map_symmetric"], top["method"]
    if len(bits) > 1:
        out["training_free_map"] = float(np.mean([out[f"training_free_map@{L}"] for L in bits]))
    return out


def _paradigm_metrics(codes: dict[str, np.ndarray], enc: dict[str, dict[str, np.ndarray]], q_labels: np.ndarray,
                      db_labels: np.ndarray, topk: int | None, bits: int) -> dict[str, Any]:
    """Teacher, symmetric and asymmetric metrics on the ``bits``-bit prefixes of the codes."""
    def cut(a: np.ndarray) -> np.ndarray:
        a = np.asarray(a)
        return a if a.shape[1] == bits else np.ascontiguousarray(a[:, :bits])

    teacher_eval = evaluate_paradigms(cut(codes["query"]), cut(codes["database"]), q_labels, db_labels, topk)
    sym = evaluate_paradigms(cut(enc["sym"]["query"]), cut(enc["sym"]["database"]), q_labels, db_labels, topk)
    asym = evaluate_paradigms(cut(enc["asym"]["query"]), cut(enc["sym"]["database"]), q_labels, db_labels, topk,
                              teacher_db=cut(codes["database"]))
    return {
        "teacher_map": teacher_eval["map_symmetric"],
        "student_map_symmetric": sym["map_symmetric"],
        "student_map_asymmetric": asym["map_asymmetric"],
        "teacher_precision_at_k": teacher_eval.get("precision_at_k_symmetric"),
        "student_precision_at_k_symmetric": sym.get("precision_at_k_symmetric"),
        "student_precision_at_k_asymmetric": asym.get("precision_at_k_asymmetric"),
    }


def _mean_or_none(values: list[Any]) -> Any:
    if len(values) > 1:
        return None if None in values else float(np.mean(values))
    return values[0]


def results_table(r: dict[str, Any]) -> str:
    bits = code_lengths(r.get("bits", 0))
    nested = len(bits) > 1 and all(f"student_map_symmetric@{L}" in r for L in bits)
    mean = f" (mean of {'/'.join(map(str, bits))} bits)" if nested else ""
    maps = [(f"teacher mAP@{r['topk']}", "teacher_map"), ("student mAP symmetric", "student_map_symmetric"),
            ("student mAP asymmetric", "student_map_asymmetric")]
    rows = [(label + mean, f"{r[key]:.4f}") for label, key in maps]
    if "training_free_map" in r:  # users must see where the models stand against the classic baselines
        method = r.get("training_free_method")
        name = training_free.LABELS.get(method, "best") if method else "best per length"
        rows.insert(0, (f"training-free: {name} on pixels (no training)" + mean, f"{r['training_free_map']:.4f}"))
    rows += [(f"{L} bits: {label}", f"{r[f'{key}@{L}']:.4f}") for L in (bits if nested else []) for label, key in maps]
    if "bit_agreement" in r:
        rows.append(("student / teacher bit agreement (queries)", f"{r['bit_agreement']:.4f}"))
    rows += [
        ("teacher encode img/s", f"{r['teacher_images_per_second']:.1f}"),
        ("student encode img/s", f"{r['student_images_per_second']:.1f}"),
        ("student / teacher speed", f"{r['speedup']:.2f}x"),
    ]
    w = max(len(a) for a, _ in rows)
    lines = [f"| {'metric'.ljust(w)} | value |", f"|{'-' * (w + 2)}|-------|"]
    lines += [f"| {a.ljust(w)} | {b} |" for a, b in rows]
    return "\n".join(lines) + "\n"
