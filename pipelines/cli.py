"""The ``brcd`` command line.

    brcd demo --output runs/demo                       # the whole pipeline on the embedded data
    brcd teacher  -c CONFIG --output DIR [--address auto] [--set key=value ...]
    brcd clusters -c CONFIG --output DIR
    brcd distill  -c CONFIG --output DIR
    brcd evaluate -c CONFIG --output DIR

``CONFIG`` is a preset name (``brcd presets`` lists them) or a YAML file. Every command is
resumable: run it again with the same arguments and it continues where it stopped.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from pipelines import crossmodal
from pipelines.commands import bench, compare, registry
from pipelines.commands.common import add_config_options, load_config_args
from pipelines import tune

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

EXIT_USER_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brcd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="show Ray's and MLflow's own logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="teacher -> clusters -> distill -> evaluate on the embedded digits data",
                       description="Run the whole pipeline on scikit-learn's digits with a local Ray and 2 workers.")
    add_config_options(p, config_required=False)
    p.set_defaults(func=cmd_demo)

    for name, helptext in (
        ("teacher", "train the unsupervised hashing teacher (Ray Train, DDP)"),
        ("clusters", "teacher codes of the clean training images -> k-means -> bit masks"),
        ("distill", "BRCD distillation of the student from the frozen teacher (Ray Train, DDP)"),
        ("evaluate", "both search paradigms on the query set, encode throughput"),
    ):
        p = sub.add_parser(name, help=helptext, description=helptext)
        add_config_options(p)
        p.set_defaults(func=cmd_stage)

    p = sub.add_parser("presets", help="list the bundled config presets")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("data", help="write a dataset made from the embedded digits (no download)",
                       description="Write a dataset made from scikit-learn's real digits. multilabel-digits: 32 x 32 "
                                   "images of 1-3 digits in the NUS-WIDE / MS-COCO list-file format (preset "
                                   "demo_multilabel reads it from data/multilabel_digits).")
    p.add_argument("kind", choices=["multilabel-digits"])
    p.add_argument("--output", "-o", default="data/multilabel_digits", help="folder to write (default: %(default)s)")
    p.add_argument("--database", type=int, default=1500)
    p.add_argument("--query", type=int, default=250)
    p.add_argument("--train", type=int, default=1000, help="training images, drawn from the database")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data)
    for module in (tune, registry, compare, bench, crossmodal):  # each adds its own subcommands
        module.add_commands(sub, add_config_options)
    return parser


def _run(args):
    cfg = load_config_args(args)  # config errors come before the slow torch and Ray imports
    from pipelines.ray.cluster import init_ray
    from pipelines.stages import Run

    tracker = None
    if cfg.tracking.enabled:  # else no MLflow import
        from pipelines.stage_tracking import tracker_for

        tracker = tracker_for(cfg, Path(args.output))
    run = Run(cfg, args.output, tracker=tracker)
    init_ray(args.address, run.output, quiet=not args.verbose)
    return run


def cmd_presets(args) -> int:
    from brcd.config import describe_presets

    print("\n".join(describe_presets()))
    return 0


def cmd_data(args) -> int:
    from brcd.data.multilabel import write_multilabel_digits

    root = write_multilabel_digits(args.output, database=args.database, query=args.query, train=args.train,
                                   seed=args.seed)
    print(f"[data] {args.database} database + {args.query} query images (train: {args.train} of the database) "
          f"with list files in {root}")
    return 0


def cmd_stage(args) -> int:
    """``brcd teacher|clusters|distill|evaluate``: one stage of the pipeline."""
    run = _run(args)
    from pipelines import stages

    results = getattr(stages, f"{args.command}_stage")(run)
    if args.command == "evaluate":
        print(stages.results_table(results))
    return 0


def cmd_demo(args) -> int:
    t0 = time.perf_counter()
    run = _run(args)
    from pipelines.stages import clusters_stage, distill_stage, evaluate_stage, results_table, teacher_stage

    teacher_stage(run)
    clusters_stage(run)
    distill_stage(run)
    results = evaluate_stage(run)
    if run.cfg.tracking.enabled:
        from pipelines.commands.registry import register_run_student

        results = register_run_student(run, results) or results
    print()
    print(results_table(results))
    print(f"results: {run.layout.results_json}  (total {time.perf_counter() - t0:.0f} s)")
    return 0


def _user_errors() -> tuple[type[BaseException], ...]:
    from brcd.config import ConfigError
    from brcd.io import ArtifactError

    errors: list[type[BaseException]] = [ConfigError, ArtifactError, FileNotFoundError, ValueError]
    ray_utils = sys.modules.get("pipelines.ray.cluster")  # never imported: no StageError raised, and no slow Ray import
    if ray_utils is not None:
        errors.append(ray_utils.StageError)
    return tuple(errors)


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _shutdown_ray() -> None:
    """Stop the local Ray this process started, so no worker outlives an interrupted driver."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


def _close_runs(status: str, reason: BaseException | str) -> None:
    """End the MLflow runs this command left open (only when tracking was used: no mlflow import)."""
    tracking = sys.modules.get("brcd.mlflow.tracking")
    if tracking is None:
        return
    text = reason if isinstance(reason, str) else (str(reason) or type(reason).__name__)
    try:
        tracking.close_open_runs(status, text)
    except Exception as exc:  # noqa: BLE001 - never hide the command's own error behind MLflow's
        print(f"brcd: warning: could not close the MLflow runs ({exc})", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # before MLflow is imported: no INFO lines ("Creating initial MLflow database tables")
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # "Downloading artifacts" bars (pull/encode/search)
    func: Callable = args.func
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)  # `kill`, job schedulers: stop like Ctrl-C, resumable
    try:
        code = func(args) or 0
        from brcd.layout import RunLayout

        scratch = RunLayout(getattr(args, "output", None) or "/nonexistent").scratch
        if scratch.is_dir():  # workers' scratch folders (split copies, local checkpoints)
            shutil.rmtree(scratch, ignore_errors=True)
        return code
    except KeyboardInterrupt as exc:
        _close_runs("KILLED", f"interrupted ({exc})" if str(exc) else "interrupted (Ctrl-C)")
        print("brcd: interrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        _shutdown_ray()
        return 130
    except (OSError, *_user_errors()) as exc:
        _close_runs("FAILED", exc)
        print(f"brcd: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BaseException as exc:  # a bug or a Ray failure: the traceback follows, the runs say FAILED
        _close_runs("FAILED", f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
