"""``brcd compare`` on nested codes (NHL): one nested student vs separate single-length students.

``brcd compare --separate`` also runs, per length L, a complete single-length comparison (its own teacher,
clusters and students, same seeds and epochs) in ``DIR/separate/bits<L>/`` and sets the two side by side:
quality per method, length and paradigm (the nested student's L-bit prefix vs the L-bit student), and
training time (one nested pipeline vs the sum of the single-length ones; CPU seconds where the work ran in
this process, ``resources.num_workers=0``). Everything here is a pure function of ``compare.json`` contents.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from brcd.config import Config, code_lengths, config_from_dict
from brcd.layout import COMPARE_NESTED_PNG

TEACHER = "teacher"
PARADIGMS = ("symmetric", "asymmetric")
NESTED_PNG = COMPARE_NESTED_PNG


def check_separate(cfg: Config) -> list[int]:
    """The lengths a ``--separate`` comparison trains, or a one-line ``ValueError`` saying why not."""
    lengths = code_lengths(cfg.student.model.bits)
    if len(lengths) < 2:
        raise ValueError(f"--separate compares one nested student with single-length ones, but student.model.bits "
                         f"is {cfg.student.model.bits}; use a nested config (e.g. -c demo_nested or "
                         f"--set 'teacher.model.bits=[16,32,64]' --set 'student.model.bits=[16,32,64]')")
    if cfg.teacher.checkpoint:
        raise ValueError("--separate trains one teacher per code length, so it cannot use teacher.checkpoint "
                         f"({cfg.teacher.checkpoint}); drop the checkpoint or run without --separate")
    return lengths


def single_length_config(cfg: Config, bits: int) -> Config:
    """``cfg`` with teacher and student at ``bits`` only (name ``<name>-<bits>bits``)."""
    data = cfg.to_dict()
    data["teacher"]["model"]["bits"] = int(bits)
    data["student"]["model"]["bits"] = int(bits)
    data["name"] = f"{cfg.name}-{bits}bits"
    return config_from_dict(data, check_files=False)


def map_at(row: Mapping[str, Any], paradigm: str, bits: int, nested: bool) -> float:
    """A compare row's mAP in ``paradigm`` at ``bits`` (a nested row's from its ``per_length``)."""
    if not nested:
        return float(row[f"map_{paradigm}"])
    per = row.get("per_length") or {}
    key = f"teacher_map@{bits}" if row["method"] == TEACHER else f"student_map_{paradigm}@{bits}"
    if key not in per:
        raise ValueError(f"row {row['method']} seed {row.get('seed')} has no {key}; delete its "
                         f"students/{row['method']}/seed{row.get('seed')}/row.json and run `brcd compare` again")
    return float(per[key])


def _stats(values: Sequence[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v))}


def _model_rows(result: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The teacher's and the students' rows (training-free rows carry an ``input``)."""
    return [r for r in result["rows"] if "input" not in r]


def _methods(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["method"] for r in rows))


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return float(np.mean(vals)) if vals and len(vals) == len(values) else None


def stage_times(result: Mapping[str, Any]) -> dict[str, float | None]:
    """Training seconds of one compare result: teacher, clusters, and per student method the mean over
    its seeds; ``*_cpu`` where measured."""
    times: dict[str, float | None] = {f"{stage}{cpu}": result.get(f"{stage}{cpu}_seconds")
                                      for stage in ("teacher", "clusters") for cpu in ("", "_cpu")}
    rows = [r for r in _model_rows(result) if r["method"] != TEACHER]
    for m in _methods(rows):
        rs = [r for r in rows if r["method"] == m]
        times[f"distill:{m}"] = _mean([r.get("distill_seconds") for r in rs])
        times[f"distill:{m}_cpu"] = _mean([r.get("distill_cpu_seconds") for r in rs])
    return times


def _pipeline_total(times: Mapping[str, float | None], cpu: bool) -> float | None:
    """Teacher + clusters + one student per method (None when any part was not measured)."""
    suffix = "_cpu" if cpu else ""
    parts = [times.get(f"teacher{suffix}"), times.get(f"clusters{suffix}")]
    parts += [v for k, v in times.items() if k.startswith("distill:") and k.endswith(suffix) and
              (cpu or not k.endswith("_cpu"))]
    return None if any(p is None for p in parts) else float(sum(parts))  # type: ignore[arg-type]


def nested_vs_separate(nested: Mapping[str, Any], separate: Mapping[int, Mapping[str, Any]] | None = None
                       ) -> dict[str, Any]:
    """Set a nested compare result against single-length ones (``{bits: result}``, may be empty).

    Returns ``{"lengths", "quality", "time"}``: per method and length the ``nested`` (and ``separate``)
    stats per paradigm with ``delta`` = nested - separate mean; the stage times, their sum and ratio.
    """
    lengths = [int(b) for b in code_lengths(nested["bits"])]
    separate = {int(k): v for k, v in (separate or {}).items()}
    unknown = sorted(set(separate) - set(lengths))
    if unknown:
        raise ValueError(f"separate runs at {unknown} bits do not match the nested lengths {lengths}")
    quality = []
    for method in _methods(_model_rows(nested)):
        n_rows = [r for r in nested["rows"] if r["method"] == method]
        for L in lengths:
            entry: dict[str, Any] = {"method": method, "bits": L,
                                     "nested": {p: _stats([map_at(r, p, L, True) for r in n_rows]) for p in PARADIGMS}}
            s_rows = [r for r in separate[L]["rows"] if r["method"] == method] if L in separate else []
            if s_rows:
                entry["separate"] = {p: _stats([map_at(r, p, L, False) for r in s_rows]) for p in PARADIGMS}
                entry["delta"] = {p: entry["nested"][p]["mean"] - entry["separate"][p]["mean"] for p in PARADIGMS}
            quality.append(entry)
    time: dict[str, Any] = {"nested": stage_times(nested)}
    if separate:
        time["separate"] = {str(L): stage_times(separate[L]) for L in lengths if L in separate}
        complete = len(time["separate"]) == len(lengths)
        total: dict[str, float | None] = {}
        for key in time["nested"]:
            vals = [t.get(key) for t in time["separate"].values()]
            total[key] = float(sum(vals)) if complete and all(v is not None for v in vals) else None  # type: ignore[arg-type]
        time["separate_sum"] = total
        time["ratio"] = {k: (time["nested"][k] / v if v and time["nested"].get(k) is not None else None)
                         for k, v in total.items()}
        for cpu in (False, True):
            key = "pipeline_cpu" if cpu else "pipeline"
            nest = _pipeline_total(time["nested"], cpu)
            summed = _pipeline_total(total, cpu) if complete else None
            time[key] = {"nested": nest, "separate_sum": summed,
                         "ratio": nest / summed if nest is not None and summed else None}
    return {"lengths": lengths, "quality": quality, "time": time}


def mean_std(m: Mapping[str, float] | None) -> str:
    """``"0.1234 ± 0.0056"`` of a ``{"mean", "std"}`` entry (``"—"`` for None)."""
    return "—" if m is None else f"{m['mean']:.4f} ± {m['std']:.4f}"


def _s(v: float | None, fmt: str = "{:.1f}") -> str:
    return "—" if v is None else fmt.format(v)


def markdown(report: Mapping[str, Any]) -> str:
    """The per-length quality table and, after single-length runs, the training-time table."""
    lengths = report["lengths"]
    has_sep = any("separate" in e for e in report["quality"])
    lines = ["", f"## Nested codes {lengths}: per-length mAP" + (" — one nested student vs separate single-length "
                                                                 "students" if has_sep else ""), ""]
    heads = [f"{kind} {dict(symmetric='sym', asymmetric='asym')[p]}" for p in PARADIGMS
             for kind in (("nested", "separate", "Δ") if has_sep else ("nested",))]
    lines += ["| method | bits | " + " | ".join(heads) + " |", "|---|---:|" + "---:|" * len(heads)]
    for e in report["quality"]:
        cells = []
        for p in PARADIGMS:
            cells.append(mean_std(e["nested"][p]))
            if has_sep:
                cells += [mean_std((e.get("separate") or {}).get(p)), _s((e.get("delta") or {}).get(p), "{:+.4f}")]
        lines.append(f"| {e['method']} | {e['bits']} | " + " | ".join(cells) + " |")
    lines += ["", "Nested: the L-bit prefix of the one nested model. Separate: a model trained at L bits alone "
                  "(its own teacher, clusters and students, same seeds and epochs; `separate/bits<L>/`). "
                  "The teacher's asymmetric = its symmetric."]
    time = report["time"]
    if "separate" in time:
        keys = [k for k in time["nested"] if not k.endswith("_cpu")]
        cols = list(time["separate"])
        lines += ["", "### Training time: one nested run vs the sum of the single-length runs", "",
                  "| stage | clock | nested | " + " | ".join(f"{c} bits" for c in cols) + " | sum of separate | nested / sum |",
                  "|---|---|---:|" + "---:|" * len(cols) + "---:|---:|"]
        for key in keys:
            for clock, k in (("wall s", key), ("CPU s", f"{key}_cpu")):
                if time["nested"].get(k) is None and time["separate_sum"].get(k) is None:
                    continue
                name = key.replace("distill:", "distill ") + (" (mean/seed)" if key.startswith("distill:") else "")
                lines.append(f"| {name} | {clock} | {_s(time['nested'].get(k))} | "
                             + " | ".join(_s(time["separate"][c].get(k)) for c in cols)
                             + f" | {_s(time['separate_sum'].get(k))} | {_s(time['ratio'].get(k), '**{:.2f}**')} |")
        for clock, key in (("wall s", "pipeline"), ("CPU s", "pipeline_cpu")):
            p = time[key]
            if p["nested"] is not None or p["separate_sum"] is not None:
                lines.append(f"| whole pipeline (teacher + clusters + one student per method) | {clock} | "
                             f"{_s(p['nested'])} | " + " | ".join("" for _ in cols)
                             + f" | {_s(p['separate_sum'])} | {_s(p['ratio'], '**{:.2f}**')} |")
        lines += ["", "Wall seconds include Ray start-up per stage and depend on the machine's load; CPU seconds "
                      "(this process, measured with `resources.num_workers=0`) are the work done."]
    return "\n".join(lines) + "\n"
