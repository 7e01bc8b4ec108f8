"""``brcd register | export | pull | encode | search | serve``: the model registry from the command line.

    brcd register --output DIR [-c CONFIG]              # best student of a run / tuning job -> registry
    brcd export   --output DIR --model teacher --to T   # a model folder (model.json + safetensors)
    brcd pull     models:/brcd-student@champion --output M [--tracking-uri URI | --run-dir DIR]
    brcd encode   --model M|URI --images IMAGES --output codes.parquet [--bits N]
    brcd encode   --model M|URI --images IMAGES --output codes/ --actors N [--address auto]   # on Ray, sharded
    brcd encode   --model CROSSMODAL --tags tags.npy|tags.mat:KEY --output codes.parquet     # text
    brcd search   --model M|URI --index codes.parquet|codes/ --query IMAGE [-k 10] [--bits N]
    brcd search   --model CROSSMODAL --query-tags q.npy --index image_codes.parquet         # text -> image
    brcd search   --model CROSSMODAL --query IMAGE --database pairs|images|texts           # the model's own
    brcd serve    --model models:/brcd-student@champion --index codes.parquet [--port 8000]   # HTTP, Ray Serve
                  [--symmetric-index student_codes.parquet]                                  # page at /

``--model`` is a model folder (from ``pull`` or ``export``) or a ``models:/`` URI. The registry
backend is ``--tracking-uri``, else ``--run-dir DIR`` (= ``sqlite:///DIR/mlflow.db``, where a run
keeps it by default), else ``$MLFLOW_TRACKING_URI``. Asymmetric search: encode the database with
the teacher (``brcd export --model teacher``), the queries with the student. A cross-modal model
(``brcd crossmodal``, :mod:`brcd.crossmodal.export`) encodes images and tag vectors, so a text query
searches an image database and back (docs/CROSSMODAL.md). Nothing is unpickled.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping

from brcd.layout import RunLayout, best_weights, stage_file
from brcd.models.kinds import is_model_uri
from pipelines.tune.results import TRIAL_ID, read_results

__all__ = ["add_commands", "best_trial", "encode_collection", "register_run_student", "resolve_registry_uri"]

log = logging.getLogger("brcd")

METRIC_COLUMNS = ("student_{m}", "{m}", "best_{m}", "val_{m}", "metrics/{m}")
_MAKE_MODEL = "use `brcd pull` or `brcd export` to make one"


def add_commands(sub: argparse._SubParsersAction, common: Any) -> None:
    for add, cmd, registry in ((_add_register, cmd_register, False), (_add_export, cmd_export, False),
                               (_add_pull, cmd_pull, True), (_add_encode, cmd_encode, True),
                               (_add_search, cmd_search, True), (_add_serve, cmd_serve, True)):
        p = add(sub)
        if registry:  # the registry backend of a models:/ URI
            _registry_args(p)
        p.set_defaults(func=cmd)


def _config_args(p: argparse.ArgumentParser, set_help: str | None = None) -> None:
    p.add_argument("-c", "--config", default=None, help="preset or YAML file (default: DIR/config.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=set_help)


def _add_register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "register", help="register the best student of a finished run or tuning job (alias champion)",
        description=cmd_register.__doc__)
    p.add_argument("--output", "-o", required=True, help="the run's (or tuning job's) output folder")
    _config_args(p, "override a config value, e.g. --set tracking.model_name=my-student")
    p.add_argument("--metric", default=None,
                   help="tune_results.csv column to pick the best trial by (default: the select_metric's column)")
    p.add_argument("--alias", default="champion", help="alias to point at the new version (default: champion)")
    p.add_argument("--tracking-uri", default=None, help="registry backend (default: tracking.tracking_uri, "
                   "$MLFLOW_TRACKING_URI or sqlite:///DIR/mlflow.db)")
    return p


def _add_export(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("export", description=cmd_export.__doc__,
                       help="write a model folder (model.json + model.safetensors) of a run's teacher or student")
    p.add_argument("--output", "-o", required=True, help="the run's output folder")
    p.add_argument("--model", choices=("teacher", "student"), default="student")
    p.add_argument("--to", required=True, help="folder to write")
    _config_args(p)
    return p


def _add_pull(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("pull", help="download a registered model to a folder", description=cmd_pull.__doc__)
    p.add_argument("uri", help="models:/brcd-student@champion, models:/brcd-student/3 or models:/<model id>")
    p.add_argument("--output", "-o", required=True, help="folder to write model.json + model.safetensors into")
    return p


def _add_encode(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("encode", help="encode images (or a cross-modal model's tag vectors) to binary codes "
                                      "(parquet: id, path, packed code)",
                       description=cmd_encode.__doc__)
    p.add_argument("--model", required=True, help="model folder or models:/ URI")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--images", default=None, help="folder of images (recursive), list file, or one image")
    what.add_argument("--tags", default=None, metavar="FILE",
                      help="tag vectors (cross-modal models): .npy (N x V) or FILE.mat[:KEY] (default key YAll)")
    p.add_argument("--root", default=None, help="base folder for relative paths of a list file")
    p.add_argument("--output", "-o", required=True, help="parquet file to write (a folder of shards on Ray)")
    p.add_argument("--bits", type=int, default=None, help="nested code length (default: the model's longest)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--address", default=None,
                   help="encode on this Ray cluster ('auto' or host:port; default with --actors: a local Ray)")
    p.add_argument("--actors", "--workers", dest="actors", type=int, default=None, metavar="N",
                   help="encoder actors (default on Ray: one per GPU, else per CPU slot; 0: sharded, in this process)")
    p.add_argument("--shard-rows", type=int, default=None, metavar="N",
                   help="images per shard, a multiple of --batch-size (default 16 batches)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--gpus-per-actor", type=float, default=None,
                   help="GPUs per actor (default: 1 when the cluster has GPUs, else 0)")
    return p


def _add_search(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("search", help="Hamming search of query images (or tag vectors) in a parquet of codes",
                       description=cmd_search.__doc__)
    p.add_argument("--model", required=True, help="model folder or models:/ URI that encodes the queries")
    db = p.add_mutually_exclusive_group(required=True)
    db.add_argument("--index", default=None, help="parquet file (or folder of shards) written by `brcd encode`")
    db.add_argument("--database", choices=("pairs", "images", "texts"), default=None,
                    help="cross-modal models: search the database stored with the model: its learned pair codes B "
                         "(what the student was trained for), or its images / texts encoded by the networks")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--query", default=None, nargs="+", help="query image(s)")
    q.add_argument("--query-tags", default=None, metavar="FILE",
                   help="text queries (cross-modal models): .npy (N x V) or FILE.mat[:KEY] of tag vectors")
    p.add_argument("-k", type=int, default=10, help="hits per query (default 10)")
    p.add_argument("--bits", type=int, default=None, help="code length of the queries (default: the index's)")
    return p


def _add_serve(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="search service over HTTP (Ray Serve): images in, top-k ids + distances out",
                       description="Serve Hamming search of images against a code index with Ray Serve, on "
                                   "127.0.0.1 by default. A models:/NAME@ALIAS model is polled and a new version is "
                                   "swapped in without dropping requests. GET / (a page to search with); POST /search "
                                   "{\"images\": [base64 PNG/JPEG], \"k\": 10}; GET /thumbnail?id=ID; GET /health. "
                                   "See docs/SEARCH.md.")
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS (followed), models:/NAME/VERSION or a model folder")
    p.add_argument("--index", required=True, nargs="+",
                   help="index file(s): HammingIndex.save parquet, or a codes parquet / folder from `brcd encode`; "
                        "several files are served as shards (one Ray actor each). With a teacher-encoded database "
                        "(the setup BRCD trains for) student queries are asymmetric search: this index is named "
                        "'asymmetric'")
    p.add_argument("--symmetric-index", nargs="+", default=None, metavar="INDEX",
                   help="the same database encoded by the served student, named 'symmetric': /search?index=symmetric "
                        "and the page's switch search it (re-encode it when the alias moves)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--poll-s", type=float, default=10.0, help="seconds between registry polls of the alias (0: never)")
    for flag, default, text in (
            ("--replicas", 1, "replicas of the front deployment"), ("--cpus", 1.0, "CPUs per replica"),
            ("--gpus", 0.0, "GPUs per replica (encoding on the GPU)"),
            ("--shard-cpus", 0.5, "CPUs per index shard actor (several --index files)"),
            ("--max-batch", 16, "requests batched into one encode + search"),
            ("--batch-wait-ms", 2.0, "how long a batch waits to fill up")):
        p.add_argument(flag, type=type(default), default=default, help=text)
    p.add_argument("--index-loader", default=None, metavar="MODULE:FUNCTION",
                   help="function that opens an index file (another index type with HammingIndex's interface)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to deploy on ('auto' or host:port; default: a local Ray)")
    return p


def _registry_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", default=None,
                   help="registry backend, e.g. sqlite:///DIR/mlflow.db or http://127.0.0.1:5000 "
                        "(default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--run-dir", default=None, help="shortcut for --tracking-uri sqlite:///RUN_DIR/mlflow.db")


def resolve_registry_uri(tracking_uri: str | None, run_dir: str | None, *, needed: bool = True) -> str | None:
    """``--tracking-uri`` > ``--run-dir`` > ``$MLFLOW_TRACKING_URI``; a missing SQLite file is an error
    (MLflow would silently create an empty registry)."""
    from brcd.mlflow.tracking import default_tracking_uri, sqlite_db_path

    if tracking_uri:
        uri = default_tracking_uri(".", tracking_uri)
    elif run_dir:
        uri = default_tracking_uri(run_dir, str(RunLayout(Path(run_dir).expanduser().resolve()).mlflow_db))
    elif os.environ.get("MLFLOW_TRACKING_URI"):
        uri = os.environ["MLFLOW_TRACKING_URI"]
    elif needed:
        raise ValueError("no registry given: pass --tracking-uri sqlite:///DIR/mlflow.db (a run keeps its registry "
                         "there) or --run-dir DIR, or set MLFLOW_TRACKING_URI")
    else:
        return None
    db = sqlite_db_path(uri)
    if db is not None and not db.is_file():
        raise ValueError(f"registry database {db} does not exist; pass the output folder of a run that registered "
                         "a model (--run-dir DIR) or the tracking server's URI")
    return uri


def _load_cfg(output: Path, config: str | None, overrides: list[str]):
    from brcd.config import load_config

    if config is None:
        path = RunLayout(output).config
        if not path.is_file():
            raise ValueError(f"{output} has no {path.name}; pass -c CONFIG (the preset or YAML the run used)")
        config = str(path)
    return load_config(config, overrides)


def _encoder(model: str, args) -> tuple[Any, Any]:
    """The model ``--model`` names (either kind) and its kind."""
    from brcd.mlflow.registry import load_model
    from brcd.models.kinds import kind_of_model

    encoder = load_model(model, tracking_uri=resolve_registry_uri(args.tracking_uri, args.run_dir,
                                                                  needed=is_model_uri(model)))
    return encoder, kind_of_model(encoder)


def _float(value: Any) -> float | None:
    with contextlib.suppress(TypeError, ValueError):
        if math.isfinite(out := float(value)):
            return out
    return None


def best_trial(job_dir: str | os.PathLike, metric: str, column: str | None = None) -> dict[str, Any]:
    """The best row of ``<job_dir>/tune_results.csv`` (max of ``column``, default the first
    :data:`METRIC_COLUMNS` entry present), with ``trial_dir``, ``column`` and ``value`` added."""
    layout = RunLayout(Path(job_dir))
    path = layout.tune_results
    rows = read_results(path)
    header = list(rows[0]) if rows else []
    names = [column] if column else [c.format(m=metric) for c in METRIC_COLUMNS]
    col = next((c for c in names if c in header), None)
    if col is None:
        raise ValueError(f"{path} has none of the columns {', '.join(names)}; pass --metric COLUMN "
                         f"(columns: {', '.join(header) or 'none'})")
    scored = [(v, i) for i, r in enumerate(rows) if (v := _float(r.get(col))) is not None]
    if not scored:
        raise ValueError(f"{path} has no finished trial with a value in column {col}; wait for the job or resume it")
    value, i = max(scored)
    row = dict(rows[i])
    row.update(trial_dir=str(layout.trial_dir(row[TRIAL_ID])), column=col, value=value)
    return row


def _student_dir(folder: Path, metric: str) -> Path | None:
    """A run's student folder, or a tuning trial's folder (its weights lie directly in it)."""
    for cand in (RunLayout(folder).student_dir, folder):
        if best_weights(cand, metric).is_file():
            return cand
    return None


def register_run_student(run: Any, results: Mapping[str, Any]) -> dict[str, Any]:
    """After ``evaluate_stage``: register the run's best student (alias ``champion``); returns ``results`` plus
    ``model_uri`` / ``model_version`` (unchanged when tracking is off or the backend is down)."""
    from brcd.mlflow.registry import register_student_dir
    from pipelines.stage_tracking import MlflowStageTracker

    results = dict(results)
    tracker = getattr(run, "tracker", None)
    if not isinstance(tracker, MlflowStageTracker) or not tracker.enabled:
        return results
    try:
        reg = register_student_dir(run.cfg, run.student_dir, tracker, output=run.output, results=results,
                                   teacher_fingerprint=run.layout.teacher_fingerprint(),
                                   resize_then_crop=run.bundle.resize_then_crop)
    except Exception as exc:  # noqa: BLE001 - the pipeline's results stand without the registry
        log.warning("MLflow: the student was not registered (%s)", exc)
        return results
    if reg.get("model_version") is None:
        print("[register] the student was not registered (tracking backend unavailable); run "
              f"`brcd register --output {run.output}` later", flush=True)
        return results
    results.update(model_uri=reg["model_uri"], model_version=reg["model_version"], model_name=reg["model_name"])
    rid = tracker.run_ids.get("evaluate")
    if rid is not None:
        tracker.tracker.set_tags(rid, {"model_uri": reg["model_uri"],
                                       "registered_model": f"{reg['model_name']}/{reg['model_version']}"})
    return results


def cmd_register(args) -> int:
    """Export the best student (tracking.select_metric) of DIR, log it in its MLflow run and register it as
    tracking.model_name with an alias. For a tuning job (DIR/tune_results.csv) the best trial by the metric is
    registered."""
    from brcd import io
    from brcd.mlflow.registry import register_student_dir
    from pipelines.stage_tracking import tracker_for

    output = Path(args.output).expanduser().resolve()
    if not output.is_dir():
        raise ValueError(f"{output} does not exist; pass the --output folder of a finished run")
    overrides = list(args.overrides) + ([f"tracking.tracking_uri={args.tracking_uri}"] if args.tracking_uri else [])
    cfg = _load_cfg(output, args.config, overrides)
    metric = cfg.tracking.select_metric
    source, results, trial_id = output, {}, None
    if RunLayout(output).tune_results.is_file():
        best = best_trial(output, metric, args.metric)
        source, trial_id = Path(best["trial_dir"]), best["trial_id"]
        if not source.is_dir():
            raise ValueError(f"best trial {best['trial_id']} ({best['column']}={best['value']:.4f}) has no folder "
                             f"{source}; pass the trial's folder as --output")
        if RunLayout(source).config.is_file() and args.config is None:
            cfg = _load_cfg(source, None, overrides)
        results = {k: v for k, v in ((k, _float(v)) for k, v in best.items()) if v is not None}
        print(f"[register] best trial {best['trial_id']}: {best['column']}={best['value']:.4f} ({source})")
    sdir = _student_dir(source, metric)
    if sdir is None:
        raise ValueError(f"no {best_weights(source, metric).name} under {source} (or its student/); run "
                         "`brcd distill` first")
    if RunLayout(source).results_json.is_file():  # query-set numbers (student_map_*) win over validation ones
        results = io.load_json(RunLayout(source).results_json) | results
    elif trial_id is None and stage_file(sdir).is_file():  # a tuning job's CSV already has best_map_*
        results = io.load_json(stage_file(sdir)).get("best") or {}
    tracker = tracker_for(cfg, output)
    if not tracker.enabled:
        raise ValueError(f"tracking backend {tracker.uri} is not available ({tracker.tracker.disabled_reason}); "
                         "start it or pass --tracking-uri")
    run_id = tracker.training_run_id(source, trial_id)
    if not run_id and trial_id:
        run_id = tracker.training_run_id(output, trial_id)
    reg = register_student_dir(cfg, sdir, tracker, output=output, results=results, run_id=run_id, alias=args.alias,
                               find_run=trial_id is None)
    if reg.get("model_version") is None:
        raise ValueError(f"the student was exported to {reg['export_dir']} but not registered in {tracker.uri} "
                         "(see the warning above)")
    print(f"registered {reg['model_name']} version {reg['model_version']} (alias {args.alias}): {reg['model_uri']}")
    return 0


def cmd_export(args) -> int:
    """Export the teacher or the best student of a run as a model folder, usable by `brcd encode/search --model
    FOLDER` (e.g. a teacher-encoded database for asymmetric search)."""
    from brcd.builders import resize_then_crop
    from brcd.models.encoder import export_model
    from brcd.mlflow.tracking import dataset_name

    output = Path(args.output).expanduser().resolve()
    layout = RunLayout(output)
    cfg = _load_cfg(output, args.config, list(args.overrides))
    info: dict[str, Any] = {"image_size": int(cfg.data.image_size), "resize_then_crop": resize_then_crop(cfg),
                            "dataset": dataset_name(cfg), "teacher": cfg.teacher.model.backbone,
                            "teacher_fingerprint": layout.teacher_fingerprint() or "unknown",
                            "role": args.model}
    if args.model == "teacher":
        weights, model_cfg = layout.teacher_weights, cfg.teacher.model
    else:
        metric = cfg.tracking.select_metric
        sdir = _student_dir(output, metric)
        weights, model_cfg = best_weights(sdir or layout.student_dir, metric), cfg.student.model
    if not weights.is_file():
        raise ValueError(f"no {args.model} weights at {weights}; run the {args.model} stage first")
    folder = export_model(Path(args.to).expanduser(), weights, model_cfg, info)
    print(f"exported the {args.model} ({model_cfg.backbone}, {model_cfg.bits} bits) to {folder}")
    return 0


def cmd_pull(args) -> int:
    """Download models:/NAME@ALIAS (or models:/NAME/VERSION) to a model folder."""
    from brcd.mlflow.registry import pull
    from brcd.models.kinds import kind_of

    folder = pull(args.uri, args.output, tracking_uri=resolve_registry_uri(args.tracking_uri, args.run_dir))
    kind = kind_of(folder)
    print(f"pulled {args.uri} -> {folder} ({kind.summary(kind.read_spec(folder))})")
    return 0


def cmd_encode(args) -> int:
    """Encode images into a codes parquet file, or, with --address / --actors N, on Ray (one encoder actor per
    CPU or GPU slot) into a resumable folder of parquet shards that `brcd search` and
    brcd.models.encoder.read_codes_parquet read like one file. A cross-modal model (brcd crossmodal) also
    encodes tag vectors (--tags)."""
    from brcd.models.encoder import encode_images_to_parquet, read_codes_parquet, write_codes_parquet

    if args.address is not None or args.actors is not None:
        if args.tags:
            raise ValueError("--tags encodes in this process; drop --actors / --address")
        return _encode_sharded(args)
    encoder, kind = _encoder(args.model, args)
    if args.tags:
        from brcd.crossmodal.data import read_tag_matrix

        kind.require_texts(args.model, "--tags")
        if args.bits is not None and args.bits != encoder.max_bits:
            raise ValueError(f"this model emits {encoder.max_bits} bits; --bits {args.bits} is not one of them")
        codes = encoder.encode_tags(read_tag_matrix(args.tags))
        out = write_codes_parquet(args.output, codes, [f"{args.tags}#{i}" for i in range(len(codes))],
                                  metadata={"modality": "text"})
        print(f"encoded {len(codes)} tag vectors to {codes.shape[1]}-bit codes -> {out}")
        return 0
    out = encode_images_to_parquet(encoder, args.images, args.output, batch_size=args.batch_size, bits=args.bits,
                                   root=args.root, metadata=kind.image_metadata)
    ids, _, _, bits = read_codes_parquet(out)
    print(f"encoded {len(ids)} images to {bits}-bit codes -> {out}")
    return 0


def _encode_sharded(args) -> int:
    """``brcd encode --actors N / --address``: parquet shards written by encoder actors (resumable)."""
    tracking_uri = resolve_registry_uri(args.tracking_uri, args.run_dir, needed=is_model_uri(args.model))
    summary = encode_collection(
        args.model, args.images, args.output, root=args.root, bits=args.bits, batch_size=args.batch_size,
        shard_rows=args.shard_rows, actors=args.actors, address=args.address, cpus_per_actor=args.cpus_per_actor,
        gpus_per_actor=args.gpus_per_actor, tracking_uri=tracking_uri, quiet=not getattr(args, "verbose", False))
    where = "in this process" if args.actors == 0 else f"{summary['actors']} Ray actor(s)"
    rate = f", {summary['rows_per_s']:.1f} images/s" if summary["computed_shards"] else ""
    print(f"encoded {summary['rows']} images to {summary['bits']}-bit codes in {summary['shards']} shards "
          f"({summary['computed_shards']} computed by {where}{rate}) -> {summary['out_dir']}/")
    return 0


def encode_collection(model: str, images: Any, output: str | os.PathLike, *, root: str | None = None,
                      bits: int | None = None, batch_size: int = 64, shard_rows: int | None = None,
                      actors: int | None = None, address: str | None = None, cpus_per_actor: float = 1.0,
                      gpus_per_actor: float | None = None, tracking_uri: str | None = None, quiet: bool = True,
                      progress: Any = print) -> dict[str, Any]:
    """Encode a collection into a folder of parquet shards; returns ``run_sharded_inference``'s summary plus ``bits``.
    ``actors``: encoder actors on Ray (``None``: one per GPU, else per CPU slot; ``0``: in this process)."""
    from brcd.mlflow.registry import model_folder
    from brcd.models.encoder import CodesPredictor, codes_fingerprint, existing_image_paths
    from brcd.models.kinds import kind_of

    if actors is not None and actors < 0:
        raise ValueError(f"--actors must be >= 0, got {actors}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    shard_rows = shard_rows or 16 * batch_size
    if shard_rows < 1 or shard_rows % batch_size:
        raise ValueError(f"--shard-rows {shard_rows} must be a positive multiple of --batch-size {batch_size} "
                         "(so every batch is the one a single process would encode)")
    output = Path(output).expanduser()
    if output.is_file():
        raise ValueError(f"{output} is a file; on Ray --output names a folder of shards (choose another path)")
    paths = existing_image_paths(images, root)
    if is_model_uri(model) and tracking_uri is None:
        tracking_uri = resolve_registry_uri(None, None)  # $MLFLOW_TRACKING_URI, or the one-line error
    with model_folder(model, tracking_uri=tracking_uri, hint=_MAKE_MODEL) as model_dir:
        kind = kind_of(model_dir)
        spec = kind.read_spec(model_dir)
        emitted, names = kind.bits(spec), kind.files(model_dir, spec, encoders_only=True)
        if bits is not None and bits not in emitted:
            raise ValueError(f"this model emits {emitted} bits; --bits {bits} is not one of them")
        fingerprint = codes_fingerprint(model_dir, paths, bits)
        # the actors get the model's bytes (through Ray's object store), so no node needs the driver's disk
        files = {name: (model_dir / name).read_bytes() for name in names}
    gpus = gpus_per_actor or 0
    if actors != 0:
        import ray

        from pipelines.ray.cluster import init_ray

        init_ray(address, output, quiet=quiet)
        if gpus_per_actor is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    kwargs = {"paths": paths, "model_files": files, "bits": bits, "batch_size": batch_size,
              "device": "cuda" if gpus else "cpu"}
    from pipelines.ray.batch_inference import run_sharded_inference

    summary = run_sharded_inference(
        output, len(paths), shard_rows, CodesPredictor, kwargs, fingerprint=fingerprint, writer="parquet",
        num_actors=actors, num_cpus_per_actor=cpus_per_actor, num_gpus_per_actor=gpus, label="encode",
        unit="images", progress=progress)
    return {**summary, "bits": fingerprint["bits"]}


def cmd_search(args) -> int:
    """Encode the queries with --model and rank the codes of --index by Hamming distance (ties: smaller id
    first). With a cross-modal model the queries may be images or tag vectors and the database image or text
    codes: a text query against an image database and back (docs/CROSSMODAL.md)."""
    from brcd.codes import pack_codes
    from brcd.crossmodal.export import DATABASES
    from brcd.models.encoder import read_codes_parquet
    from brcd.search.flat import HammingIndex

    if args.k < 1:
        raise ValueError(f"-k must be >= 1, got {args.k}")
    if args.index is not None:
        ids, paths, packed, bits = read_codes_parquet(args.index)
        if args.bits is not None and args.bits != bits:
            raise ValueError(f"{args.index} holds {bits}-bit codes; --bits {args.bits} cannot search it "
                             f"(re-encode the database with --bits {args.bits})")
    missing = [q for q in args.query or [] if not Path(q).is_file()]
    if missing:
        raise ValueError(f"query image {missing[0]} does not exist")
    encoder, kind = _encoder(args.model, args)
    if args.database is not None:  # the database stored with a cross-modal model
        kind.require_texts(args.model, "--database")
        codes = encoder.database[DATABASES[args.database]]
        ids, bits, packed = encoder.database["ids"].astype("int64"), encoder.max_bits, pack_codes(codes)
        paths = [f"{args.database[:-1]} {i}" for i in ids.tolist()]
        if args.bits is not None and args.bits != bits:
            raise ValueError(f"the model's {args.database} are {bits}-bit codes; --bits {args.bits} cannot search them")
    if bits not in encoder.bits:
        raise ValueError(f"{args.index} holds {bits}-bit codes but the model emits {encoder.bits} bits; "
                         "encode the database with a model of the same code length")
    if args.query_tags is not None:
        from brcd.crossmodal.data import read_tag_matrix

        kind.require_texts(args.model, "--query-tags")
        codes = encoder.encode_tags(read_tag_matrix(args.query_tags))
        names, modality = [f"{args.query_tags}#{i}" for i in range(len(codes))], "text"
    else:
        codes = encoder.encode(list(args.query), bits=bits if bits != encoder.max_bits else None)
        names, modality = list(args.query), "image"
    index = HammingIndex(bits)
    index.add_packed(packed, ids)
    path_of = dict(zip(ids.tolist(), paths))
    where = kind.query_label(modality, args.index if args.index is not None else f"the model's {args.database}")
    dist, hits = index.search_packed(pack_codes(codes), min(args.k, max(len(index), 1)))
    for q, query in enumerate(names):
        print(f"query {query} ({where}{len(index)} codes, {bits} bits)")
        print(f"{'rank':>4}  {'distance':>8}  {'id':>8}  path")
        for rank, (d, i) in enumerate(zip(dist[q], hits[q]), start=1):
            if i < 0:
                break
            print(f"{rank:>4}  {int(d):>8}  {int(i):>8}  {path_of[int(i)]}")
    return 0


def _check_served_model(model: str, tracking_uri: str | None) -> None:
    """One-line errors before Ray starts: an unknown name / alias, no model folder, a kind `brcd serve` refuses."""
    from brcd.mlflow.registry import model_folder, resolve_model_version
    from brcd.models.kinds import kind_of

    if is_model_uri(model):
        resolve_model_version(model, tracking_uri)
        return
    with model_folder(model, hint=_MAKE_MODEL) as folder:
        kind_of(folder).check_servable(model)


def cmd_serve(args) -> int:
    """Deploy the search service and block until Ctrl-C (or SIGTERM), then remove it."""
    import tempfile

    for path in [*args.index, *(args.symmetric_index or [])]:
        if not Path(path).exists():
            raise ValueError(f"index {path} does not exist; pass a file from HammingIndex.save or `brcd encode`")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be 1..65535, got {args.port}")
    if args.replicas < 1 or args.max_batch < 1 or args.poll_s < 0 or args.batch_wait_ms < 0:
        raise ValueError("--replicas and --max-batch must be >= 1, --poll-s and --batch-wait-ms >= 0")
    if args.address is None and not os.environ.get("RAY_ADDRESS"):  # the proxy will bind here: is the port free?
        import socket

        with socket.socket() as probe:
            try:
                probe.bind((args.host, args.port))
            except OSError as exc:
                raise ValueError(f"cannot listen on {args.host}:{args.port} ({exc.strerror}); pass another --port "
                                 "or stop what uses it") from None
    tracking_uri = resolve_registry_uri(args.tracking_uri, args.run_dir, needed=is_model_uri(args.model))
    _check_served_model(args.model, tracking_uri)
    from pipelines import serve as service
    from pipelines.ray.cluster import StageError, root_cause, init_ray

    quiet = not getattr(args, "verbose", False)
    init_ray(args.address, Path(tempfile.gettempdir()) / f"brcd-serve-{os.getuid()}", quiet=quiet)
    app = service.build_app(
        args.model if is_model_uri(args.model) else str(Path(args.model).resolve()),
        [str(Path(p).resolve()) for p in args.index],
        symmetric_index=[str(Path(p).resolve()) for p in args.symmetric_index or []],
        base_dir=os.getcwd(), tracking_uri=tracking_uri, poll_s=args.poll_s, index_loader=args.index_loader,
        replicas=args.replicas, num_cpus=args.cpus, num_gpus=args.gpus, shard_cpus=args.shard_cpus,
        max_batch_size=args.max_batch, batch_wait_s=args.batch_wait_ms / 1000)
    try:
        url = service.start_service(app, host=args.host, port=args.port, quiet=quiet)
    except Exception as exc:  # a replica's constructor failed (bad index, wrong code length, ...)
        service.stop_service()
        raise StageError(f"the search service did not start: {root_cause(exc)}") from None
    health = service.health(url)
    print(f"serving {args.model} (version {health.get('model_version') or 'local'}, {health['index_size']} codes, "
          f"{health['bits']} bits) on {url}{'' if len(health['indexes']) == 1 else ' (+ the symmetric index)'}: "
          "the page at /, POST /search, GET /health; Ctrl-C to stop", flush=True)
    try:
        service.wait_until_stopped()
    except KeyboardInterrupt:
        pass
    finally:
        service.stop_service()
    print("search service stopped")
    return 0
