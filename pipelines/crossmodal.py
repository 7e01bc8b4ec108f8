"""``brcd crossmodal``: the cross-modal job (docs/CROSSMODAL.md) on Ray Train, tracked in MLflow.

One Ray Train run per seed (``resources.num_workers`` DDP workers; 0 = local mode, no Ray) trains the
teacher, S from it and both students; a seed is a :class:`pipelines.stages.Stage` (marker
``DIR/crossmodal/seed<N>/results.json``) and each of its models one stage-tracker run.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from brcd import layout as lay
from brcd.layout import CROSSMODAL_STAGES as STAGES

MODEL_NAME = "brcd-crossmodal"


def add_commands(sub: argparse._SubParsersAction, common: Any) -> None:
    p = sub.add_parser(
        "crossmodal", help="cross-modal hashing: unsupervised teacher -> S -> asymmetric DCC student (image <-> text)",
        description="Train the DJSRH-style unsupervised cross-modal teacher, rebuild a similarity matrix S from it, "
                    "train the asymmetric student (DCC database codes) on S and a no-teacher student on raw-feature S, "
                    "and evaluate I->T, T->I, I->I, T->T mAP (docs/CROSSMODAL.md).")
    common(p)
    p.add_argument("--seeds", type=int, default=1, metavar="N", help="run seeds seed .. seed+N-1 (default 1)")
    p.set_defaults(func=cmd_crossmodal)


def cmd_crossmodal(args) -> int:
    from pipelines.commands.common import load_config_args

    cfg = load_config_args(args)  # config errors before the slow imports
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    output = Path(args.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    if cfg.resources.num_workers > 0 or args.address:  # local mode (0 workers) runs in this process, no Ray
        from pipelines.ray.cluster import init_ray

        init_ray(args.address, output, quiet=not args.verbose)
    t0 = time.perf_counter()
    summary = crossmodal_job(cfg, output, seeds=list(range(cfg.seed, cfg.seed + args.seeds)))
    print()
    print(results_table(summary))
    if summary.get("registered"):
        print(f"registered: {summary['registered']}  (exported to {summary['export']})")
    layout = lay.RunLayout(output)
    print(f"results: {layout.crossmodal_results}, figure {layout.crossmodal_png}  "
          f"(total {time.perf_counter() - t0:.0f} s)")
    return 0


# Ray Train workers


def _report(metrics: dict[str, Any], files: dict[str, Any], scratch: str | None) -> None:
    """Rank 0 writes ``files`` (name -> state dict / array / json-able) into a checkpoint and reports it."""
    import ray.train

    from brcd import io
    from pipelines.ray.cluster import ray_report

    ckpt = None
    if ray.train.get_context().get_world_rank() == 0:
        if scratch:
            Path(scratch).mkdir(parents=True, exist_ok=True)
        ckpt = Path(tempfile.mkdtemp(prefix="brcd-cm-", dir=scratch)) / f"epoch={int(metrics['epoch']):04d}"
        ckpt.mkdir(parents=True)
        for name, obj in files.items():
            (ckpt / name).parent.mkdir(parents=True, exist_ok=True)
            if name.endswith(".safetensors"):
                io.save_state_dict(ckpt / name, {k: v.detach().contiguous() for k, v in obj.items()})
            elif name.endswith(".npz"):
                io.save_arrays(ckpt / name, **{k: np.asarray(v) for k, v in obj.items()})
            else:
                io.save_json(ckpt / name, obj)
    ray_report(metrics, ckpt)  # the folder lives in the run's scratch, which the CLI removes at the end


def crossmodal_worker(payload: Any) -> None:
    """One seed on every worker: teacher -> S (rank 0's, broadcast) -> student -> no-teacher student."""
    import torch
    import torch.distributed as dist

    from brcd.crossmodal.flow import teacher_similarity
    from brcd.crossmodal.train import train_student, train_teacher
    from brcd.distributed import is_distributed
    from pipelines.ray.workers import quiet_train_reports

    quiet_train_reports()
    torch.set_num_threads(1)
    a = {k: torch.from_numpy(np.array(v)) for k, v in payload.arrays.items()}
    x, seed = payload.cfg.crossmodal, payload.seed
    files: dict[str, Any] = {}

    def nets(stage: str, out: dict[str, Any]) -> None:
        files[f"{stage}/{lay.CROSSMODAL_IMAGE}"] = out["image"].state_dict()
        files[f"{stage}/{lay.CROSSMODAL_TEXT}"] = out["text"].state_dict()
        files[f"{stage}/{lay.CROSSMODAL_HISTORY}"] = out["history"]

    teacher = train_teacher(a["features"], a["tags"], a["affinity"], x.teacher, seed=seed, log=progress)
    sim = teacher_similarity(teacher["image"], teacher["text"], a["features"], a["tags"], x.similarity)
    if is_distributed():  # every rank trains on rank 0's S (the teachers agree; this makes it exact)
        dist.broadcast(sim, src=0)
    nets("teacher", teacher)
    dtype = np.int8 if x.similarity.rule != "continuous" else np.float32
    files[f"teacher/{lay.CROSSMODAL_SIMILARITY}"] = {"similarity": sim.numpy().astype(dtype)}
    for stage, s in (("student", sim), ("student_no_teacher", a["raw_similarity"])):
        out = train_student(a["features"], a["tags"], s, x.student, seed=seed, log=progress)
        nets(stage, out)
        files[f"{stage}/{lay.CROSSMODAL_CODES}"] = {"codes": out["codes"].numpy().astype(np.int8)}
    _report({"epoch": 1, "teacher_loss": teacher["history"][-1]["loss"]}, files, payload.scratch)


def progress(line: str) -> None:
    import ray.train

    from pipelines.ray.workers import progress as write_line

    if ray.train.get_context().get_world_rank() == 0:
        write_line(line)  # not print(): Ray Train V2 sends a worker's print to the driver twice


# Driver


def settings_key(cfg: Any, seed: int) -> str:
    from brcd.io import settings_hash

    return settings_hash(asdict(cfg.crossmodal), seed)


def _fit(run: Any, name: str, seed: int, arrays: dict[str, Any]) -> None:
    """The seed's Ray Train run; its checkpoint's files are copied to the seed's folder."""
    from brcd import io
    from pipelines.ray.cluster import StageError, run_trainer
    from pipelines.ray.payload import WorkerPayload

    payload = WorkerPayload(run.cfg, scratch=str(run.layout.scratch), seed=seed,
                            arrays={k: np.asarray(v) for k, v in arrays.items()})
    result = run_trainer(crossmodal_worker, payload, run.cfg, run.output, name)
    if result.checkpoint is None:
        raise StageError(f"{name} finished without a checkpoint; check the worker logs above")
    with result.checkpoint.as_directory() as d:
        for f in sorted(Path(d).rglob("*")):
            if f.is_file():
                dst = run.layout.crossmodal_seed(seed) / f.relative_to(d)
                dst.parent.mkdir(parents=True, exist_ok=True)
                with io.atomic_path(dst) as tmp:
                    shutil.copyfile(f, tmp)


def _load_stage(stage_dir: Path, p: Any, m: Any) -> dict[str, Any]:
    """A trained stage's history, image and text networks (eval mode) and, for students, its codes."""
    from brcd import io
    from brcd.crossmodal.nets import HashMLP

    out: dict[str, Any] = {"history": io.load_json(stage_dir / lay.CROSSMODAL_HISTORY)}
    for key, width, name in (("image", p.db_features.shape[1], lay.CROSSMODAL_IMAGE),
                             ("text", p.db_tags.shape[1], lay.CROSSMODAL_TEXT)):
        out[key] = HashMLP(width, m.bits, m.hidden_dim)
        out[key].load_state_dict(io.load_state_dict(stage_dir / name))
        out[key].eval()
    if (stage_dir / lay.CROSSMODAL_CODES).exists():
        out["codes"] = io.load_arrays(stage_dir / lay.CROSSMODAL_CODES)["codes"]
    return out


def run_seed(run: Any, seed: int) -> dict[str, Any]:
    """One seed (skipped when its ``results.json`` holds these settings): train, evaluate, log one run per model."""
    from pipelines.stages import Stage

    seed_dir = run.layout.crossmodal_seed(seed)
    stage = Stage(run, None, settings_key(run.cfg, seed), seed_dir / lay.RESULTS_JSON)
    if info := stage.done(f"[crossmodal] seed {seed}: already done ({stage.marker}); delete {seed_dir} to rerun"):
        return info
    return stage.execute(lambda: (_seed_work(run, seed), []))


def _seed_work(run: Any, seed: int) -> dict[str, Any]:
    import torch

    from brcd import io
    from brcd.crossmodal import flow
    from brcd.crossmodal.affinity import joint_semantic_affinity

    cfg, x = run.cfg, run.cfg.crossmodal
    t0 = time.perf_counter()
    p = flow.prepare(cfg, seed)
    print(f"[crossmodal] seed {seed}: teacher ({x.teacher.image_backbone} features + MLP, text MLP, {x.teacher.bits} bits) "
          f"-> S -> student and no-teacher student (DCC codes) on {cfg.resources.num_workers or 1} worker(s)", flush=True)
    affinity = joint_semantic_affinity(p.db_features, p.db_tags, beta=x.teacher.beta, eta=x.teacher.eta)
    s_raw = flow.raw_similarity(p, cfg)
    ts = time.perf_counter()
    _fit(run, f"crossmodal-{settings_key(cfg, seed)}", seed,
         {"features": p.db_features, "tags": p.db_tags, "affinity": affinity, "raw_similarity": s_raw})
    timings = {"train": time.perf_counter() - ts}
    maps: dict[str, Any] = {}
    histories: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    for stage in STAGES:
        state = _load_stage(run.layout.crossmodal_seed(seed, stage), p, x.teacher if stage == "teacher" else x.student)
        histories[stage] = state["history"]
        img, txt = state["image"], state["text"]
        if stage == "teacher":
            maps[stage] = flow.evaluate_teacher(img, txt, p, x.data.topk)
            sim = io.load_arrays(run.layout.crossmodal_seed(seed, stage) / lay.CROSSMODAL_SIMILARITY)["similarity"]
            stats["teacher"] = flow.similarity_stats(torch.from_numpy(sim.astype(np.float32)), p.db_labels)
        else:
            codes = torch.from_numpy(state["codes"].astype(np.float32))
            maps[stage] = flow.evaluate_student(img, txt, codes, p, x.data.topk)
    stats["raw"] = flow.similarity_stats(s_raw, p.db_labels)
    _track(run, seed, histories, maps, stats)
    return {"seed": seed, "maps": maps, "similarity": stats, "seconds": timings,
            "total_seconds": time.perf_counter() - t0, "topk": x.data.topk,
            "num_queries": len(p.query_index), "num_database": len(p.database_index)}


def _track(run: Any, seed: int, histories: dict[str, Any], maps: dict[str, Any], stats: dict[str, Any]) -> None:
    """One stage-tracker run per model: its config, training curve, S statistics and mAPs."""
    from brcd.mlflow.tracking import flatten_params

    x, tracker = run.cfg.crossmodal, run.tracker
    params = flatten_params({"crossmodal": asdict(x), "seed": seed, "resources.num_workers": run.cfg.resources.num_workers})
    for stage in STAGES:
        name = f"crossmodal-{stage}-seed{seed}"
        tracker.stage_started(name, run, params=params | {"stage": stage})
        for i, h in enumerate(histories[stage], 1):
            tracker.stage_metrics(name, {f"train_{k}": v for k, v in h.items() if k not in ("epoch", "round")}, step=i)
        sim_key = "raw" if stage == "student_no_teacher" else "teacher"
        tracker.stage_metrics(name, {f"map_{k}": v for k, v in maps[stage].items()}
                              | {f"S_{k}": v for k, v in stats[sim_key].items()})
        tracker.stage_finished(name, run, {}, [run.layout.crossmodal_seed(seed, stage) / lay.CROSSMODAL_HISTORY])


def crossmodal_job(cfg: Any, output: Path, *, seeds: list[int]) -> dict[str, Any]:
    """Every seed, then the summary (mean and std over seeds) in ``output/crossmodal_results.json``."""
    from brcd import io
    from brcd.plots import plot_crossmodal
    from pipelines.stages import Run

    tracker = None
    if cfg.tracking.enabled:
        from pipelines.stage_tracking import tracker_for

        tracker = tracker_for(cfg, output, experiment=f"{cfg.tracking.experiment}-crossmodal")
        tracker.start_parent(f"crossmodal-{cfg.name}", params={}, tags={"brcd.kind": "crossmodal", "stage": "crossmodal"})
    run = Run(cfg, output, tracker=tracker, data=False)
    summary = summarise([run_seed(run, s) for s in seeds])
    summary["config"] = cfg.name
    export = export_student(cfg, output, seeds[0])
    summary["export"] = str(export)
    if tracker:
        summary["registered"] = register_export(tracker.tracker, tracker.parent_run_id, export, cfg, summary)
    io.save_json(run.layout.crossmodal_results, summary)
    histories = {s: io.load_json(run.layout.crossmodal_seed(seeds[0], s) / lay.CROSSMODAL_HISTORY) for s in STAGES[1:]}
    plot_crossmodal(summary, histories, run.layout.crossmodal_png,
                    title=f"{cfg.name}: {len(seeds)} seed(s), {cfg.crossmodal.student.bits} bits")
    if tracker:
        flat = {f"{m}_{t}_mean": v["mean"] for m, tasks in summary["maps"].items() for t, v in tasks.items()}
        tracker.finish_parent(metrics=flat, artifacts=[run.layout.crossmodal_results, run.layout.crossmodal_png])
    return summary


def export_student(cfg: Any, output: Path, seed: int) -> Path:
    """The first seed's student (both encoders + database codes) as a model folder (brcd.crossmodal.export)."""
    from brcd.crossmodal import flow
    from brcd.crossmodal.export import export_crossmodal
    from brcd.crossmodal.nets import codes_of

    x, layout = cfg.crossmodal, lay.RunLayout(output)
    p = flow.prepare(cfg, seed)
    state = _load_stage(layout.crossmodal_seed(seed, "student"), p, x.student)
    f, g = state["image"], state["text"]
    database = {"codes": state["codes"].astype(np.int8), "image_codes": codes_of(f, p.db_features),
                "text_codes": codes_of(g, p.db_tags), "ids": p.database_rows.astype(np.int64)}
    return export_crossmodal(layout.crossmodal_export, f, g, extractor=x.teacher.image_backbone,
                             image_size=x.data.image_size, database=database, extractor_module=p.extractor,
                             tags={"seed": seed, "source": x.data.source, "settings_hash": settings_key(cfg, seed)})


def register_export(tracker: Any, run_id: str | None, folder: Path, cfg: Any, summary: dict[str, Any]) -> str | None:
    """Log the folder to the parent run and register it as a new version of brcd-crossmodal (alias champion)."""
    if run_id is None:
        return None
    tracker.log_artifact(run_id, folder, "crossmodal_model")

    def go() -> str:
        client = tracker.client
        try:
            client.get_registered_model(MODEL_NAME)
        except Exception:  # noqa: BLE001 - not registered yet
            client.create_registered_model(MODEL_NAME)
        source = client.get_run(run_id).info.artifact_uri.rstrip("/") + "/crossmodal_model"
        maps = summary["maps"]["student"]
        version = client.create_model_version(MODEL_NAME, source, run_id=run_id, tags={
            "map_i2t": f"{maps['i2t']['mean']:.4f}", "map_t2i": f"{maps['t2i']['mean']:.4f}",
            "bits": str(cfg.crossmodal.student.bits), "config": cfg.name})
        client.set_registered_model_alias(MODEL_NAME, "champion", version.version)
        return f"models:/{MODEL_NAME}/{version.version} (@champion)"

    return tracker.call("register crossmodal", go)


def summarise(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    def spread(values: list[float]) -> dict[str, Any]:
        return {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": values}

    maps = {model: {task: spread([r["maps"][model][task] for r in per_seed]) for task in tasks}
            for model, tasks in per_seed[0]["maps"].items()}
    sim = {src: {k: float(np.mean([r["similarity"][src][k] for r in per_seed])) for k in per_seed[0]["similarity"][src]}
           for src in per_seed[0]["similarity"]}
    return {"seeds": [r["seed"] for r in per_seed], "maps": maps, "similarity": sim, "topk": per_seed[0]["topk"],
            "num_queries": per_seed[0]["num_queries"], "num_database": per_seed[0]["num_database"],
            "seconds_per_seed": float(np.mean([r["total_seconds"] for r in per_seed]))}


def results_table(summary: dict[str, Any]) -> str:
    tasks = ("i2t", "t2i", "i2i", "t2t")
    head = f"mAP@{summary['topk']} over seeds {summary['seeds']} (mean ± std)"
    lines = [head, "| model | I→T | T→I | I→I | T→T |", "|---|---|---|---|---|"]
    for model in [m for m in STAGES if m in summary["maps"]]:
        m = summary["maps"][model]
        lines.append(f"| {model} | " + " | ".join(f"{m[t]['mean']:.3f} ± {m[t]['std']:.3f}" for t in tasks) + " |")
    return "\n".join(lines)

