"""``brcd compare``: baselines and ablations in one command (issue 7).

Every student is distilled from the **same** teacher, data split and cluster artifact (built once in
``DIR/teacher`` and ``DIR/clusters``), once per method and seed, and evaluated in both search paradigms::

    brcd compare -c demo --output runs/compare --seeds 3
    brcd compare -c demo_nested --output runs/nested --methods no_kd,brcd --separate   # NHL: nested vs single-length

Output: ``DIR/students/<method>/seed<k>/`` (weights, stage.json, row.json), ``compare.json`` (one row per
method and seed), ``compare.md`` (mean +- std per method), ``compare.png``, ``compare_nested.png`` and, with
``--separate``, ``DIR/separate/bits<L>/``. Resumable: a row whose ``row.json`` was made with the same settings
is not run again (an interrupted row resumes from its checkpoint only on Ray workers). With MLflow tracking, a
parent run ``compare-<name>`` holds the stage runs and one ``compare-<method>-s<seed>`` distill run per row.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np

from brcd import io, training_free
from brcd import layout as lay
from brcd.config import BRCDOptions, Config, apply_overrides, code_lengths, config_from_dict
from pipelines.commands import compare_nested as nested

if TYPE_CHECKING:
    from pipelines.stages import Run

# pipelines.stages (and with it Ray, torch, timm) is imported where it is used, so that building the
# CLI parser (`brcd --help`) does not pay for it.

ROW_FILE = lay.COMPARE_ROW
RESULT_JSON, RESULT_MD, RESULT_PNG = lay.COMPARE_JSON, lay.COMPARE_MD, lay.COMPARE_PNG
TEACHER = nested.TEACHER

# Every BRCD row sets every switch explicitly, so a base config that already turns a switch off
# cannot silently turn "brcd" (full) into an ablation.
_FULL = {"distill.method": "brcd", **{f"distill.{k}": getattr(BRCDOptions(), k) for k in BRCDOptions.switches()}}


def _brcd(**changes: Any) -> dict[str, Any]:
    return {**_FULL, **{f"distill.{k}": v for k, v in changes.items()}}


def _ablation(switch: str) -> str:
    """``released`` -> ``brcd_released``; ``use_mask`` -> ``brcd_no_mask``."""
    return f"brcd_no_{switch[4:]}" if switch.startswith("use_") else f"brcd_{switch}"


#: method name -> config overrides (dotted keys). ``teacher`` (None) is the reference line: the
#: teacher's own codes for queries and database (its asymmetric score equals its symmetric one).
#: One ablation row per BRCD switch (each switch flipped from its default), released first.
METHODS: dict[str, dict[str, Any] | None] = {
    TEACHER: None,
    "no_kd": {"distill.method": "no_kd"},
    **{m: {"distill.method": m} for m in ("kd", "rkd", "pkt", "sp", "crd")},
    **{_ablation(k): _brcd(**{k: not getattr(BRCDOptions(), k)})
       for k in sorted(BRCDOptions.switches(), key=lambda k: k != "released")},
    "brcd": _brcd(),
}

#: training-free rows (``brcd.training_free``): ``<method>@<input>``, fitted per seed on the training
#: split, symmetric search only. ``teacher_features``: the teacher's backbone outputs (its frozen
#: backbone's exact feature cache, or its trained backbone); ``student_features``: the student's
#: frozen backbone (what its head trains on; left out when the student's backbone trains).
TRAINING_FREE_INPUTS = ("pixels", "teacher_features", "student_features")
TRAINING_FREE: dict[str, tuple[str, str]] = {f"{m}@{inp}": (m, inp) for inp in TRAINING_FREE_INPUTS
                                             for m in training_free.METHODS}

#: one-line description of each row, for the markdown table
DESCRIPTIONS = {
    TEACHER: "teacher itself (reference; trained once)",
    "no_kd": "student's own CIBHash objective only",
    "kd": "+ Hinton KD on bit probabilities",
    "rkd": "+ relational KD (distance + angle)",
    "pkt": "+ probabilistic knowledge transfer",
    "sp": "+ similarity-preserving KD",
    "crd": "+ contrastive representation distillation",
    "brcd_released": "BRCD as the public code trains it (zero mask, masked assignment)",
    "brcd_no_mask": "BRCD without bit masks",
    "brcd_no_false_negatives": "BRCD without false-negative removal",
    "brcd_no_offset_positives": "BRCD without offset positives",
    "brcd_no_structural": "BRCD without the structural term (alpha=1)",
    "brcd_no_individual": "BRCD without the individual term (alpha=0)",
    "brcd": "BRCD, full",
    **{name: f"training-free: {training_free.LABELS[m]} on {inp.replace('_', ' ')}" for name, (m, inp) in TRAINING_FREE.items()},
}


def parse_methods(text: str | Sequence[str] | None) -> list[str]:
    """``"a,b"`` / ``["a", "b"]`` / None (all) -> method names in table order, the teacher always included."""
    if text is None:
        return list(TRAINING_FREE) + list(METHODS)
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n and n.strip()]
    unknown = [n for n in names if n not in METHODS and n not in TRAINING_FREE]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)} in --methods; choose from "
                         f"{', '.join([*METHODS, *TRAINING_FREE])}")
    if not names:
        raise ValueError(f"--methods is empty; choose from {', '.join(METHODS)}")
    wanted = set(names) | {TEACHER}  # the teacher line costs nothing (cached codes) and anchors the table
    return [n for n in [*TRAINING_FREE, *METHODS] if n in wanted]


def seed_list(seeds: int | Sequence[int], base_seed: int) -> list[int]:
    """``3`` -> ``[base, base+1, base+2]``; an explicit list is kept as given."""
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {seeds}")
        return [base_seed + i for i in range(seeds)]
    out = [int(s) for s in seeds]
    if not out or len(set(out)) != len(out):
        raise ValueError(f"seeds must be a non-empty list without repeats, got {list(seeds)}")
    return out


def method_config(base: Config, method: str, seed: int) -> Config:
    """The base config with the method's overrides and the run seed (the split seed is untouched)."""
    overrides = METHODS[method]
    if overrides is None:
        raise ValueError(f"{method!r} is the reference line and has no student config")
    data = apply_overrides(base.to_dict(), {**overrides, "seed": seed})
    data["name"] = f"{base.name}-{method}-s{seed}"
    return config_from_dict(data, check_files=False)


def _row_key(cfg: Config, teacher_fp: str, split_fp: str) -> str:
    """Everything that determines a row's numbers (not where or on how many workers it ran)."""
    d = {k: v for k, v in cfg.to_dict().items() if k not in ("name", "resources", "tracking")}
    return io.settings_hash(d, teacher_fp, split_fp)


def _teacher_row(run: Run, seed: int, teacher_fp: str) -> dict[str, Any]:
    """The teacher's own codes for queries and database (nested codes: mean over the lengths)."""
    from brcd.evaluation import evaluate_paradigms
    from pipelines.stages import teacher_codes

    codes = teacher_codes(run)
    q_labels, db_labels = run.bundle.labels("query"), run.bundle.labels("database")
    lengths = code_lengths(run.cfg.teacher.model.bits)
    per = []
    for L in lengths:
        q, db = (np.ascontiguousarray(np.asarray(codes[p])[:, :L]) for p in ("query", "database"))
        per.append(evaluate_paradigms(q, db, q_labels, db_labels, run.cfg.data.topk, teacher_db=db))
    mean = {k: float(np.mean([r[k] for r in per])) for k in ("map_symmetric", "precision_at_k_symmetric")}
    row = {"method": TEACHER, "seed": seed, "map_symmetric": mean["map_symmetric"],
           "map_asymmetric": mean["map_symmetric"],  # teacher query vs teacher database in both paradigms
           "precision_at_k": {"symmetric": mean["precision_at_k_symmetric"],
                              "asymmetric": mean["precision_at_k_symmetric"]},
           "topk": per[0].get("topk"), "teacher": teacher_fp}
    if len(lengths) > 1:  # same keys as evaluate_stage's results.json
        row["per_length"] = {f"teacher_map@{L}": float(r["map_symmetric"]) for L, r in zip(lengths, per)}
    return row


def _training_free_features(run: Run, inp: str, progress: Callable[[str], None]) -> dict[str, np.ndarray] | None:
    """train / query / database features of one training-free input (None: not available for this config)."""
    from pipelines.ray import bank_job as view_bank

    parts = ("train", "query", "database")
    if inp == "pixels":
        return {p: training_free.pixel_features(run.bundle, p) for p in parts}
    role = inp.split("_")[0]
    model_cfg = run.cfg.teacher.model if role == "teacher" else run.cfg.student.model
    if model_cfg.freeze_backbone:  # the exact feature caches the heads train on
        weights = run.teacher_weights if role == "teacher" else None
        return {p: np.asarray(view_bank.feature_cache(run, role, p, weights)) for p in parts}
    if role == "student":  # a trainable student backbone differs per method and seed: no one input
        progress("[compare] student_features rows left out: the student's backbone trains (no frozen features)")
        return None
    from dataclasses import asdict

    from pipelines.ray import workers
    from pipelines.ray.cluster import put_file, run_trainer

    progress("[compare] teacher backbone features of train / query / database (the trained backbone)")
    spec = {"teacher": {"model": asdict(model_cfg), "weights": put_file(run.teacher_weights), "parts": list(parts),
                        "features": True}}
    result = run_trainer(workers.encode_worker, run.payload(models=spec), run.cfg, run.output,
                         f"features-teacher-{run.teacher_fingerprint()[:10]}", checkpoints=False)
    return result.return_value["teacher"]


def _training_free_rows(run: Run, names: Sequence[str], seeds: Sequence[int],
                        progress: Callable[[str], None]) -> list[dict[str, Any]]:
    """One row per training-free method x input x seed (the seed draws the random projections); symmetric
    search only (nested: the mean over the lengths)."""
    wanted: dict[str, list[str]] = {}
    for method, inp in (TRAINING_FREE[n] for n in names if n in TRAINING_FREE):
        wanted.setdefault(inp, []).append(method)
    q_labels, db_labels = run.bundle.labels("query"), run.bundle.labels("database")
    lengths = code_lengths(run.cfg.student.model.bits)
    rows = []
    for inp, methods in wanted.items():
        feats = _training_free_features(run, inp, progress)
        if feats is None:
            continue
        progress(f"[compare] training-free on {inp} ({feats['train'].shape[1]} dimensions): {', '.join(methods)}")
        for seed in seeds:
            per = [training_free.evaluate(feats, q_labels, db_labels, bits=L, topk=run.cfg.data.topk, seed=seed,
                                          methods=methods) for L in lengths]
            for i, r in enumerate(per[0]):
                same = [p[i] for p in per]
                rows.append({
                    "method": f"{r['method']}@{inp}", "seed": seed, "input": inp,
                    "map_symmetric": float(np.mean([x["map_symmetric"] for x in same])),
                    "precision_at_k": {"symmetric": float(np.mean([x["precision_at_k_symmetric"] for x in same]))},
                    "encode_images_per_second": float(np.mean([x["encode_images_per_second"] for x in same])),
                    "topk": run.cfg.data.topk, "feature_dims": int(feats["train"].shape[1]),
                })
                if len(lengths) > 1:
                    rows[-1]["per_length"] = {f"map_symmetric@{L}": x["map_symmetric"] for L, x in zip(lengths, same)}
    return rows


def _student_row(base: Run, method: str, seed: int, teacher_fp: str, out: Path,
                 progress: Callable[[str], None], tracker: Any = None) -> tuple[dict[str, Any], bool]:
    """Distil + evaluate one method x seed (or read its finished row). Returns (row, reused)."""
    from pipelines.stages import STAGE_FILE, Run, StageError, distill_stage, evaluate_stage

    cfg = method_config(base.cfg, method, seed)
    sdir = lay.RunLayout(out).compare_student_dir(method, seed)
    key = _row_key(cfg, teacher_fp, base.split_fingerprint)
    row_file = sdir / ROW_FILE
    if (sdir / STAGE_FILE).exists() and row_file.exists():
        row = io.load_json(row_file)
        if row.get("settings") == key:
            return row, True
    trial = tracker.for_trial(f"{method}-s{seed}") if tracker is not None else None
    run = Run(cfg, out, teacher_dir=base.teacher_dir, clusters_dir=base.clusters_dir, student_dir=sdir,
              write_config=False, tracker=trial)
    if run.teacher_fingerprint() != teacher_fp:
        raise StageError(f"{method} seed {seed}: the teacher changed during the comparison; "
                         f"re-run with a fresh --output")
    progress(f"[compare] {method} seed {seed}: distilling")
    t0 = time.perf_counter()
    info = distill_stage(run, student_dir=sdir, tag=f"compare-{method}-s{seed}")
    t1 = time.perf_counter()
    res = evaluate_stage(run, student_dir=sdir, write=False)
    row = {
        "method": method, "seed": seed,
        "map_symmetric": float(res["student_map_symmetric"]),
        "map_asymmetric": float(res["student_map_asymmetric"]),
        "precision_at_k": {"symmetric": float(res["student_precision_at_k_symmetric"]),
                           "asymmetric": float(res["student_precision_at_k_asymmetric"])},
        "topk": res.get("topk"), "bit_agreement": res.get("bit_agreement"),
        "validation_best": info.get("best"), "best_epoch": info.get("best_epoch"), "epochs": info.get("epochs"),
        "distill_seconds": round(t1 - t0, 2), "evaluate_seconds": round(time.perf_counter() - t1, 2),
        "teacher": info.get("teacher", teacher_fp), "settings": key, "student_dir": str(sdir),
    }
    if "cpu_seconds" in info:  # local mode: the distillation ran in this process
        row["distill_cpu_seconds"] = round(float(info["cpu_seconds"]), 2)
    per_length = {k: v for k, v in res.items() if "@" in k and k.startswith("student_")}
    if per_length:  # nested codes (NHL): the row's numbers are the means over the lengths
        row["per_length"] = per_length
    if row["teacher"] != teacher_fp:
        raise StageError(f"{method} seed {seed} was distilled from teacher {row['teacher']}, not {teacher_fp}")
    io.save_json(row_file, row)
    return row, False


def _student_rows(base: Run, students: list[tuple[str, int]], teacher_fp: str, rows: list[dict[str, Any]],
                  meta: dict[str, Any], t_start: float, progress: Callable[[str], None],
                  tracker: Any) -> tuple[int, int]:
    """Append one row per (method, seed) to ``rows``, rewriting ``compare.json`` after each; returns (ran, reused)."""
    out = base.output
    ran = reused = 0
    for i, (method, seed) in enumerate(students, 1):
        row, was_reused = _student_row(base, method, seed, teacher_fp, out, progress, tracker)
        rows.append(row)
        reused += was_reused
        ran += not was_reused
        progress(f"[compare] {i}/{len(students)} {method} seed {seed}: mAP symmetric {row['map_symmetric']:.4f}, "
                 f"asymmetric {row['map_asymmetric']:.4f}" + (" (finished earlier)" if was_reused else ""))
        _write_json(out, meta, rows, t_start, ran, reused)
    return ran, reused


def compare(cfg: Config, output: str | Path, *, seeds: int | Sequence[int] = 3, methods: str | Sequence[str] | None = None,
            separate: bool = False, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run (or finish) the comparison under ``output``; returns the ``compare.json`` content. Needs Ray initialised.

    Nested configs (NHL) also get per-length numbers; ``separate=True`` first runs one single-length
    comparison per length in ``output/separate/bits<L>`` (:mod:`pipelines.commands.compare_nested`).
    """
    from brcd import plots
    from pipelines.stages import Run, StageError, clusters_stage, say, teacher_stage

    progress = progress or say
    names = parse_methods(methods)
    seed_values = seed_list(seeds, cfg.seed)
    lengths = nested.check_separate(cfg) if separate else code_lengths(cfg.student.model.bits)
    out = Path(output).resolve()
    t_start = time.perf_counter()
    tracker = _stage_tracker(cfg, out)
    if tracker is not None:
        tracker.start_parent(f"compare-{cfg.name}", output=out, tags={"brcd.kind": "compare", "stage": "compare"},
                             params=cfg.flat() | {"compare.seeds": ",".join(map(str, seed_values)),
                                                  "compare.methods": ",".join(names)})
    base = Run(cfg, out, tracker=tracker)
    t_info = teacher_stage(base)  # trained once, with the base seed (skipped when already there)
    teacher_fp = base.teacher_fingerprint()
    c_info = clusters_stage(base)  # built once; method runs only re-derive masks from it
    rows: list[dict[str, Any]] = [*_training_free_rows(base, names, seed_values, progress),
                                  _teacher_row(base, cfg.seed, teacher_fp)]
    meta = {"config": cfg.name, "teacher_fingerprint": teacher_fp, "split_fingerprint": base.split_fingerprint,
            "base_seed": cfg.seed, "seeds": seed_values, "methods": names, "topk": cfg.data.topk,
            "bits": cfg.student.model.bits, "num_workers": cfg.resources.num_workers,
            # as recorded when the stage ran (stage.json), whichever invocation that was
            **{f"{stage}_{k}": info.get(k) for stage, info in (("teacher", t_info), ("clusters", c_info))
               for k in ("seconds", "cpu_seconds")}}
    students = [(m, s) for m in names if METHODS.get(m) is not None for s in seed_values]
    ran, reused = _student_rows(base, students, teacher_fp, rows, meta, t_start, progress, tracker)
    if base.teacher_fingerprint() != teacher_fp:
        raise StageError("the teacher weights changed during the comparison; re-run with a fresh --output")
    result = _write_json(out, meta, rows, t_start, ran, reused)
    summary = summarise(rows)
    md = markdown_table(summary, meta)
    top = best_training_free(summary)
    plots.plot_compare([e for e in summary if e["method"] not in TRAINING_FREE], out / RESULT_PNG, teacher=TEACHER,
                       title=f"{cfg.name}: {len(seed_values)} seed(s), mAP@{cfg.data.topk}",
                       baseline=(f"best training-free ({top['method']})", top["map_symmetric"]["mean"]) if top else None)
    artifacts = [out / RESULT_JSON, out / RESULT_MD, out / RESULT_PNG]
    metrics = {f"{e['method'].replace('@', '.')}.{k}.{stat}": e[k][stat] for e in summary
               for k in ("map_symmetric", "map_asymmetric") if e[k] is not None for stat in ("mean", "std")}
    if len(lengths) > 1:
        section, png, nested_metrics = _nested_section(cfg, out, result, lengths, separate, names, seed_values,
                                                       progress, tracker)
        md += section
        artifacts.append(png)
        metrics |= nested_metrics
    io.write_text(out / RESULT_MD, md)
    if tracker is not None:
        tracker.finish_parent(metrics=metrics, artifacts=artifacts, tags={"teacher_fingerprint": teacher_fp})
    progress(f"[compare] {ran} run(s) trained, {reused} reused; results: {out / RESULT_MD}")
    return result


def _nested_section(cfg: Config, out: Path, result: dict[str, Any], lengths: list[int], separate: bool,
                    names: list[str], seed_values: list[int], progress: Callable[[str], None],
                    tracker: Any) -> tuple[str, Path, dict[str, float]]:
    """Nested configs: the per-length report (after the single-length comparisons with ``separate``), saved
    into ``compare.json``; returns its markdown, figure and metrics."""
    from brcd import plots

    singles = {}
    for L in (lengths if separate else []):
        sub = lay.RunLayout(out).compare_separate_dir(L)
        progress(f"[compare] separate {L}-bit pipeline (teacher, clusters, students) in {sub}")
        sub_cfg = nested.single_length_config(cfg, L)
        if tracker is not None and not sub_cfg.tracking.tracking_uri:  # same store as this comparison
            uri = {"tracking.tracking_uri": tracker.tracker.uri}
            sub_cfg = config_from_dict(apply_overrides(sub_cfg.to_dict(), uri), check_files=False)
        singles[L] = compare(sub_cfg, sub, seeds=seed_values, methods=names, progress=progress)
    report = nested.nested_vs_separate(result, singles)
    result["nested_vs_separate"] = report
    io.save_json(out / RESULT_JSON, result)
    png = plots.plot_nested_vs_separate(report, out / nested.NESTED_PNG, teacher=TEACHER,
                                        title=f"{cfg.name}: nested {lengths}" + (" vs separate" if singles else ""))
    metrics = {f"{e['method']}.{e['bits']}bits.{kind}.{p}": e[kind][p]["mean"] for e in report["quality"]
               for kind in ("nested", "separate") if kind in e for p in nested.PARADIGMS}
    if singles:
        metrics |= {f"time.{k}.nested_over_separate": report["time"][k]["ratio"]
                    for k in ("pipeline", "pipeline_cpu") if report["time"][k]["ratio"] is not None}
    return nested.markdown(report), png, metrics


def _write_json(out: Path, meta: dict[str, Any], rows: list[dict[str, Any]], t_start: float, ran: int,
                reused: int) -> dict[str, Any]:
    students = [r for r in rows if r["method"] != TEACHER and r["method"] not in TRAINING_FREE]
    result = {**meta, "runs_trained": ran, "runs_reused": reused,
              "wall_seconds": round(time.perf_counter() - t_start, 1),  # this invocation only
              "student_seconds_total": round(sum(r.get("distill_seconds", 0) + r.get("evaluate_seconds", 0)
                                                 for r in students), 1),  # every row, whenever it ran
              "rows": rows}
    io.save_json(out / RESULT_JSON, result)
    return result


# --------------------------------------------------------------------------------------------
# summary, table, chart
# --------------------------------------------------------------------------------------------

_METRICS = ("map_symmetric", "map_asymmetric", "precision_at_k.symmetric", "precision_at_k.asymmetric")


def _get(row: dict[str, Any], key: str) -> float:
    return float(functools.reduce(dict.__getitem__, key.split("."), row))


def summarise(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample std (ddof=1; 0 for one seed) per method in table order; training-free rows have
    ``None`` asymmetric metrics."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["method"], []).append(r)
    out = []
    order = [*TRAINING_FREE, *METHODS]
    for method in [m for m in order if m in by] + [m for m in by if m not in order]:
        rs = by[method]
        entry: dict[str, Any] = {"method": method, "n": len(rs), "seeds": [r["seed"] for r in rs]}
        for key in _METRICS:
            if method in TRAINING_FREE and "asymmetric" in key:  # no student, no asymmetric search
                entry[key] = None
                continue
            vals = np.array([_get(r, key) for r in rs], dtype=np.float64)
            entry[key] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0}
        agree = [r["bit_agreement"] for r in rs if r.get("bit_agreement") is not None]
        entry["bit_agreement"] = float(np.mean(agree)) if agree else None  # student vs teacher, query codes
        speed = [r["encode_images_per_second"] for r in rs if r.get("encode_images_per_second")]
        if speed:  # training-free rows: features -> codes
            entry["encode_images_per_second"] = float(np.mean(speed))
        out.append(entry)
    return out


def markdown_table(summary: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The results table in :func:`summarise` order; Δ columns against ``no_kd``, best student mean in bold."""
    ref = next((s for s in summary if s["method"] == "no_kd"), None)
    students = [s for s in summary if s["method"] != TEACHER and s["method"] not in TRAINING_FREE]
    best = {k: max((s[k]["mean"] for s in students), default=math.nan) for k in ("map_symmetric", "map_asymmetric")}
    k = meta.get("topk")
    head = (f"| method | n | mAP@{k} symmetric | Δ vs no_kd | mAP@{k} asymmetric | Δ vs no_kd | "
            f"P@{k} sym | P@{k} asym | bit agreement | what |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for s in summary:
        fixed = s["method"] == TEACHER or s["method"] in TRAINING_FREE  # no Δ: not a student
        cells = []
        for key in ("map_symmetric", "map_asymmetric"):
            if s[key] is None:
                cells += ["—", "—"]
                continue
            text = nested.mean_std(s[key])
            if not fixed and s[key]["mean"] == best[key]:
                text = f"**{text}**"
            cells += [text, "—" if fixed else "" if ref is None else f"{s[key]['mean'] - ref[key]['mean']:+.4f}"]
        name = f"*{s['method']}* (reference)" if s["method"] == TEACHER else s["method"]
        p_sym, p_asym = (f"{s[m]['mean']:.4f}" if s[m] is not None else "—"
                         for m in ("precision_at_k.symmetric", "precision_at_k.asymmetric"))
        agree = s.get("bit_agreement")
        what = DESCRIPTIONS.get(s["method"], "")
        if s.get("encode_images_per_second"):  # the encode cost, where it means something
            after = "" if TRAINING_FREE[s["method"]][1] == "pixels" else f" after the {TRAINING_FREE[s['method']][1].split('_')[0]} backbone"
            what += f"; codes at {s['encode_images_per_second']:,.0f} img/s{after}"
        lines.append(f"| {name} | {s['n']} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} | "
                     f"{p_sym} | {p_asym} | {'—' if agree is None else f'{agree:.3f}'} | "
                     f"{what} |")
    note = (f"\nmean ± sample std over seeds {meta.get('seeds')}; one teacher (fingerprint "
            f"`{meta.get('teacher_fingerprint')}`), split `{meta.get('split_fingerprint')}` and cluster artifact "
            "shared by every row. Symmetric: student query vs student database; asymmetric: student query vs "
            "teacher-encoded database (the teacher's asymmetric = its symmetric). Bit agreement: the fraction of "
            "query bits on which the asymmetric student's code equals the teacher's. Training-free rows "
            "(`<method>@<input>`) are fitted on the training split only, with each seed's random projections "
            "and rotations; they have no asymmetric search.\n")
    return "\n".join(lines) + "\n" + note


def best_training_free(summary: list[dict[str, Any]], inp: str = "pixels") -> dict[str, Any] | None:
    """The training-free row of ``inp`` with the highest mean symmetric mAP (None when there is none)."""
    rows = [s for s in summary if s["method"] in TRAINING_FREE and TRAINING_FREE[s["method"]][1] == inp]
    return max(rows, key=lambda s: s["map_symmetric"]["mean"], default=None)


def _stage_tracker(cfg: Config, out: Path) -> Any:
    """The MLflow stage tracker, or None without ``pipelines.stage_tracking`` or ``tracking.enabled``."""
    if not cfg.tracking.enabled or importlib.util.find_spec("pipelines.stage_tracking") is None:
        return None
    from pipelines.stage_tracking import tracker_for

    tracker = tracker_for(cfg, out)
    return tracker if tracker.enabled else None


def add_commands(sub: argparse._SubParsersAction, common: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser(
        "compare", help="baselines and BRCD ablations from one teacher, several seeds, both paradigms",
        description="Distil one student per method and seed from the SAME teacher, split and clusters; "
                    "write compare.json / compare.md / compare.png. Methods: " + ", ".join(METHODS),
    )
    common(p)
    p.add_argument("--seeds", type=int, default=3, help="seeds per method: seed, seed+1, ... (default 3)")
    p.add_argument("--methods", default=None, help="comma-separated subset (default: all; the teacher line is always added)")
    p.add_argument("--separate", action="store_true",
                   help="nested configs (NHL): also train one single-length pipeline per length (teacher, clusters, "
                        "students) and compare quality per length and training time with the one nested run")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args) -> int:
    from pipelines.commands.common import load_config_args

    cfg = load_config_args(args)
    names = parse_methods(args.methods)  # fail on a typo before starting Ray
    seed_list(args.seeds, cfg.seed)
    if args.separate:
        nested.check_separate(cfg)
    t0 = time.perf_counter()
    from pipelines.ray.cluster import init_ray

    init_ray(args.address, Path(args.output).resolve(), quiet=not getattr(args, "verbose", False))
    result = compare(cfg, args.output, seeds=args.seeds, methods=names, separate=args.separate)
    print()
    print((Path(args.output) / RESULT_MD).read_text())
    print(f"{RESULT_JSON}: {len(result['rows'])} rows, {result['runs_trained']} trained, "
          f"{result['runs_reused']} reused (total {time.perf_counter() - t0:.0f} s)")
    return 0
