"""Benchmark: ``brcd tune -c demo --space demo`` wall time, live augmentations vs the view bank.

The teacher is trained once (``brcd teacher``) and copied into one run folder per setting, so each
timed command is the tuning job proper: teacher codes, k-means per K, the bank (when on) and the
trials. Every setting runs the documented command as a subprocess (its own local Ray, its own
start-up), with the same seeded search, so the trials are the same (checked: same parameters, same
count). Two student settings:

- **trainable student** (the demo preset as shipped): the bank replaces the teacher's forward
  passes only; the student backbone still sees live views in a Ray Train worker group per trial;
- **frozen student** (``student.model.freeze_backbone=true``, the paper's setting): with the bank
  every network's output is cached, trials train heads only in their own process, two per core.

The settings run one after another (a tuning job cannot be interleaved with another without
sharing the cores), so the ratio carries the load's drift; the machine's load is recorded.

Usage: ``brcd bench --only tune_bank [--quick]`` (section ``bench_tune_bank`` of ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = "bench_tune_bank: brcd tune -c demo --space demo, live vs view bank"

#: ``--quick``: the tests' tiny models, 1 teacher epoch, 2 trials of 3 epochs
QUICK = ["teacher.model.backbone=test_resnet", "student.model.backbone=test_efficientnet",
         "teacher.optim.epochs=1", "distill.optim.epochs=3", "data.train=128", "data.validation=32",
         "data.query=32", "data.topk=100", "resources.num_workers=1", "tracking.enabled=false"]
SETTINGS = [
    ("trainable student", "live", ["bank.enabled=false"]),
    ("trainable student", "bank", ["bank.enabled=true"]),
    ("frozen student", "live", ["bank.enabled=false", "student.model.freeze_backbone=true"]),
    ("frozen student", "bank", ["bank.enabled=true", "student.model.freeze_backbone=true"]),
]


def _brcd(args: list[str], log: Path) -> float:
    """Run ``brcd ARGS`` (this interpreter's package); its wall time in seconds."""
    cmd = [sys.executable, "-m", "pipelines.cli", *args]
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"`brcd {' '.join(args)}` failed (rc {done.returncode}):\n{tail}")
    return seconds


def _sets(overrides: list[str]) -> list[str]:
    return [x for o in overrides for x in ("--set", o)]


def _results_csv(run_dir: Path) -> Path:
    path = run_dir / "tune_results.csv"
    if not path.is_file():
        raise RuntimeError(f"no {path}: the tuning job wrote no results")
    return path


def _best(run_dir: Path) -> float:
    with open(_results_csv(run_dir)) as fh:
        vals = [float(r["best_map_asymmetric"]) for r in csv.DictReader(fh) if r.get("best_map_asymmetric")]
    return max(vals) if vals else float("nan")


def _tune_seconds(log: Path) -> float:
    """The Tune phase (trials) of a job: the last ``Total running time`` Tune printed."""
    found = re.findall(r"Total running time: (?:(\d+)hr )?(?:(\d+)min )?(\d+)s", log.read_text(errors="replace"))
    if not found:
        return float("nan")
    h, m, s = (int(x or 0) for x in found[-1])
    return 3600 * h + 60 * m + s


def _bank_seconds(log: Path) -> float | None:
    found = re.search(r"\[distill\] view bank: .*?built in ([\d.]+) s", log.read_text(errors="replace"))
    return float(found.group(1)) if found else None


def run(quick: bool = False, *, keep: str | None = None, students: str = "both") -> list[dict]:
    base = QUICK if quick else []
    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="brcd-bench-tune-"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    try:
        teacher_dir = work / "teacher"
        t_teacher = _brcd(["teacher", "-c", "demo", "--output", str(teacher_dir), *_sets(base)], work / "teacher.log")
        print(f"[bench tune_bank] teacher trained once in {t_teacher:.0f} s", flush=True)
        rows.append({"benchmark": BENCH, "name": "teacher training, once (shared by every setting, not timed below)",
                     "value": round(t_teacher, 1), "unit": "s"})
        times: dict[tuple[str, str], float] = {}
        trials: dict[tuple[str, str], list] = {}
        chosen = [s for s in SETTINGS if students == "both" or s[0].startswith(students)]
        for student, mode, extra in chosen:
            d = work / f"{student.split()[0]}-{mode}"
            shutil.rmtree(d, ignore_errors=True)
            shutil.copytree(teacher_dir, d, ignore=shutil.ignore_patterns("ray_tmp", "tmp"))  # not Ray's sockets
            load = os.getloadavg()[0]
            s = _brcd(["tune", "-c", "demo", "--space", "demo", "--output", str(d), *_sets([*base, *extra])],
                      work / f"{d.name}.log")
            with open(_results_csv(d)) as fh:
                trials[(student, mode)] = sorted((r["num_clusters"], r["mask_ratio"], r["temperature"])
                                                 for r in csv.DictReader(fh))
            times[(student, mode)] = s
            trials_s, bank_s = _tune_seconds(work / f"{d.name}.log"), _bank_seconds(work / f"{d.name}.log")
            print(f"[bench tune_bank] {student}, {mode}: {s:.0f} s, {len(trials[(student, mode)])} trials, "
                  f"best map_asymmetric {_best(d):.4f} (load {load:.1f})", flush=True)
            rows.append({"benchmark": BENCH, "name": f"{student}, {mode}: tune wall time "
                         f"({len(trials[(student, mode)])} trials, best mAP asym {_best(d):.4f})",
                         "value": round(s, 1), "unit": "s",
                         "note": f"load {load:.1f} at start; trials (Tune) {trials_s:.0f} s, before them {s - trials_s:.0f} s"
                                 + (f" of which bank build {bank_s:.0f} s" if bank_s is not None else "")})
        for student in sorted({s[0] for s in chosen}, reverse=True):
            same = trials[(student, "live")] == trials[(student, "bank")]
            if not same:
                raise RuntimeError(f"{student}: live and bank ran different trials: {trials[(student, 'live')]} vs "
                                   f"{trials[(student, 'bank')]}")
            rows.append({"benchmark": BENCH, "name": f"{student}: speed-up, live / bank (same trials)",
                         "value": round(times[(student, "live")] / times[(student, "bank")], 2), "unit": "x"})
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return rows


if __name__ == "__main__":
    from .report import bench_main

    bench_main(__doc__, lambda a: run(a.quick, keep=a.keep, students=a.students), None,
               ("--keep", {"default": None, "metavar": "DIR", "help": "work folder to keep (logs, runs)"}),
               ("--students", {"choices": ("both", "trainable", "frozen"), "default": "both"}), write=False)
