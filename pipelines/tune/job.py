"""Ray Tune over BRCD distillation: mask ratio, cluster count, temperature (and alpha, lr).

    brcd tune -c CONFIG --space SPACE --output DIR [--num-samples N] [--search random|grid|optuna]
              [--metric map_asymmetric|map_symmetric] [--address auto] [--retry-errored]

``SPACE`` is a file or a name in ``tune_spaces/`` (``default``, ``demo``); see docs/TUNE.md.

Work is shared, not repeated:

1. the teacher is trained once (``teacher_stage`` on ``DIR``) and encodes the splits once;
2. k-means runs once per distinct ``num_clusters`` on the driver, before any trial starts, into
   ``DIR/clusters/k=<K>/``; a trial only recomputes the cheap bit masks for its own mask rule
   (``clustering.masks_by_length`` in ``stages.distill_clusters``);
3. each trial is a Tune function trainable that drives one Ray Train distillation
   (``distill_stage``) into ``DIR/trials/<trial_id>/`` and forwards every validation to Tune
   (``TuneReportCallback``); ASHA stops the weak ones on ``epoch``.

The Tune experiment lives in ``DIR/tune``: running the same command again restores it, keeps the
finished trials and resumes the unfinished ones (their Train runs are named after the trial id,
so they continue from their last checkpoint). Results: ``DIR/tune_results.csv`` (one row per
trial, best first) and ``DIR/best_config.yaml`` (a ready-to-run config).

MLflow (``tracking.enabled``): the job is a parent run ``tune-<config name>`` (the teacher's stage run
nested under it) and every trial a nested run named by its trial id, logged from this driver by a
Tune callback (``pipelines.stage_tracking.TuneTrialRuns``): the sampled values and the config hash as
params, every report to Tune at ``step=epoch``, then the final metrics and the status. A resumed
job finds both by their tags and continues them.

Ray 2.60 specifics handled here: Train local mode (``num_workers: 0``) cannot run inside a Tune
trial, so trials use at least one Train worker; and a trial stopped by ASHA can leave its Train
worker placement group reserved (Ray issue #54305), which would starve the next trials, so a Tune
callback frees such orphaned groups during the run and a final check reports any left.
"""

from __future__ import annotations

import copy
import csv
import io as _io
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from brcd import io
from brcd.config import Config, apply_overrides, config_from_dict, save_config
from brcd.layout import RunLayout, stage_file

log = logging.getLogger("brcd")

SPACES_DIR = Path(__file__).resolve().parent.parent / "tune_spaces"
EXPERIMENT = "tune"  # Tune experiment folder under DIR
METRICS = ("map_asymmetric", "map_symmetric")
ALGORITHMS = ("random", "grid", "optuna")
KINDS = ("choice", "grid", "uniform", "loguniform", "randint")
MAX_CLUSTER_COUNTS = 32  # distinct K values k-means is prepared for


class TuneSpaceError(ValueError):
    """An invalid search space, in one line naming the parameter and the fix."""


# --------------------------------------------------------------------------------------------
# The search space
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamSpec:
    """A searchable parameter: the config paths it sets and its valid values."""

    paths: dict[str, Any]  # config path -> None (the sampled value) or a fixed companion value
    type: type
    low: float
    high: float
    low_open: bool = False  # low itself is invalid (e.g. temperature > 0)

    def check(self, name: str, value: Any, where: str) -> Any:
        if self.type is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise TuneSpaceError(f"{where}: parameter '{name}' needs integers, got {value!r}; write e.g. 8")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            hint = " (YAML reads 1e-3 as text: write 1.0e-3)" if isinstance(value, str) else ""
            raise TuneSpaceError(f"{where}: parameter '{name}' needs numbers, got {value!r}{hint}")
        bad_low = value <= self.low if self.low_open else value < self.low
        if bad_low or value > self.high:
            lo = "(" if self.low_open else "["
            hi = "inf)" if math.isinf(self.high) else f"{self.high:g}]"
            raise TuneSpaceError(f"{where}: parameter '{name}' value {value!r} is outside {lo}{self.low:g}, {hi}; "
                                 "use values inside that interval")
        return self.type(value)


PARAMS: dict[str, ParamSpec] = {
    "mask_ratio": ParamSpec({"clusters.mask_ratio": None, "clusters.margin": "null"}, float, 0.0, 1.0),
    "num_clusters": ParamSpec({"clusters.num_clusters": None}, int, 1, math.inf),
    "temperature": ParamSpec({"distill.optim.temperature": None}, float, 0.0, math.inf, low_open=True),
    "alpha": ParamSpec({"distill.alpha": None}, float, 0.0, 1.0),
    "lr": ParamSpec({"distill.optim.lr": None}, float, 0.0, math.inf, low_open=True),
}


@dataclass(frozen=True)
class Param:
    """One searched parameter: ``kind`` with its ``values`` (choice/grid) or ``(low, high)`` range."""

    name: str
    kind: str
    values: tuple

    @property
    def discrete(self) -> list | None:
        """Every value the parameter can take, for discrete kinds (randint is inclusive)."""
        if self.kind in ("choice", "grid"):
            return list(self.values)
        if self.kind == "randint":
            return list(range(self.values[0], self.values[1] + 1))
        return None

    def domain(self, algorithm: str):
        from ray import tune

        if self.kind == "grid" or (self.kind == "choice" and algorithm == "grid"):
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        low, high = self.values
        if self.kind == "randint":
            return tune.randint(low, high + 1)  # Tune's upper bound is exclusive; ours is inclusive
        return (tune.loguniform if self.kind == "loguniform" else tune.uniform)(low, high)

    def to_dict(self) -> dict[str, Any]:
        return {self.kind: list(self.values)}


@dataclass
class SearchSettings:
    algorithm: str = "random"
    metric: str = "map_asymmetric"
    mode: str = "max"
    num_samples: int = 8
    max_concurrent_trials: int | None = None  # None: as many as the cluster's CPUs/GPUs fit
    grace_period: int = 1  # ASHA: epochs before a trial can be stopped
    reduction_factor: float = 2.0  # ASHA: keep the best 1/reduction_factor at each rung
    driver_cpus: float = 0.0  # the trial's own process only drives Train workers: no CPU of its own
    seed: int | None = None  # searcher seed (default: the config's seed)


@dataclass
class TuneSpace:
    params: dict[str, Param]
    search: SearchSettings = field(default_factory=SearchSettings)
    source: str = "<dict>"

    def to_dict(self) -> dict[str, Any]:
        return {"params": {n: p.to_dict() for n, p in self.params.items()}, "search": asdict(self.search)}

    def param_space(self) -> dict[str, Any]:
        return {n: p.domain(self.search.algorithm) for n, p in self.params.items()}

    def expected_trials(self) -> int:
        """Trials a complete run has: num_samples x the size of the grid (if any)."""
        grid = [len(p.values) for p in self.params.values()
                if p.kind == "grid" or (p.kind == "choice" and self.search.algorithm == "grid")]
        return self.search.num_samples * math.prod(grid)

    def cluster_counts(self, cfg: Config) -> list[int]:
        """The K values trials can ask for (k-means is built once for each before trials start)."""
        p = self.params.get("num_clusters")
        return [cfg.clusters.num_clusters] if p is None else sorted(set(p.discrete))


_SEARCH_KEYS = {"algorithm", "metric", "mode", "num_samples", "max_concurrent_trials", "seed", "asha", "resources"}


def parse_space(data: Any, source: str = "<dict>") -> TuneSpace:
    """Validate a space mapping (``params:`` + ``search:``); raise :class:`TuneSpaceError`."""
    where = Path(source).name
    if not isinstance(data, dict):
        raise TuneSpaceError(f"{where}: a tune space must be a mapping with 'params' and 'search' sections")
    unknown = set(data) - {"params", "search"}
    if unknown:
        raise TuneSpaceError(f"{where}: unknown section(s) {sorted(unknown)}; a space has only 'params' and 'search'")
    raw = data.get("params")
    if not isinstance(raw, dict) or not raw:
        raise TuneSpaceError(f"{where}: 'params' must map at least one of {', '.join(PARAMS)} to a distribution")
    params = {name: _parse_param(name, spec, where) for name, spec in raw.items()}
    search = _parse_search(data.get("search") or {}, where)
    k = params.get("num_clusters")
    if k is not None and len(k.discrete) > MAX_CLUSTER_COUNTS:
        raise TuneSpaceError(f"{where}: parameter 'num_clusters' allows {len(k.discrete)} values, each needing its own "
                             f"k-means before the trials; list at most {MAX_CLUSTER_COUNTS} with choice")
    if search.algorithm == "optuna":
        for p in params.values():
            if p.kind == "grid":
                raise TuneSpaceError(f"{where}: parameter '{p.name}' uses grid, which Optuna cannot search; "
                                     "write choice instead (or use --search grid)")
    return TuneSpace(params=params, search=search, source=str(source))


def _parse_param(name: Any, spec: Any, where: str) -> Param:
    if name not in PARAMS:
        import difflib

        close = difflib.get_close_matches(str(name), list(PARAMS), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise TuneSpaceError(f"{where}: unknown parameter '{name}'; {hint}searchable: {', '.join(PARAMS)}")
    if isinstance(spec, list):  # shorthand: a plain list is a choice
        spec = {"choice": spec}
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise TuneSpaceError(f"{where}: parameter '{name}' must be one of {{{': ..., '.join(KINDS)}: ...}}, "
                             f"e.g. {{choice: [..]}} or {{uniform: [low, high]}}; got {spec!r}")
    kind, values = next(iter(spec.items()))
    pspec = PARAMS[name]
    if kind in ("choice", "grid"):
        if not isinstance(values, list) or not values:
            raise TuneSpaceError(f"{where}: parameter '{name}' has an empty {kind} list; give at least one value")
        checked = [pspec.check(name, v, where) for v in values]
        if len(set(checked)) != len(checked):
            raise TuneSpaceError(f"{where}: parameter '{name}' repeats a value in {checked}; list each value once")
        return Param(name, kind, tuple(checked))
    if not isinstance(values, list) or len(values) != 2:
        raise TuneSpaceError(f"{where}: parameter '{name}': {kind} needs [low, high], got {values!r}")
    if kind == "randint" and pspec.type is not int:
        raise TuneSpaceError(f"{where}: parameter '{name}' is real-valued; use uniform or loguniform, not randint")
    if kind in ("uniform", "loguniform") and pspec.type is int:
        raise TuneSpaceError(f"{where}: parameter '{name}' is an integer; use choice, grid or randint, not {kind}")
    low, high = (pspec.check(name, v, where) for v in values)
    if low >= high:
        raise TuneSpaceError(f"{where}: parameter '{name}': {kind} range [{low}, {high}] is empty (low >= high); "
                             "write [low, high] with low < high, or use choice for a single value")
    if kind == "loguniform" and low <= 0:
        raise TuneSpaceError(f"{where}: parameter '{name}': loguniform needs low > 0, got {low}; use uniform or raise low")
    return Param(name, kind, (low, high))


def _parse_search(raw: Any, where: str) -> SearchSettings:
    if not isinstance(raw, dict):
        raise TuneSpaceError(f"{where}: 'search' must be a mapping (algorithm, metric, num_samples, asha, ...)")
    unknown = set(raw) - _SEARCH_KEYS
    if unknown:
        raise TuneSpaceError(f"{where}: unknown key(s) search.{sorted(unknown)}; allowed: {', '.join(sorted(_SEARCH_KEYS))}")
    s = SearchSettings()
    asha = raw.get("asha") or {}
    res = raw.get("resources") or {}
    for sec, d, allowed in (("asha", asha, {"grace_period", "reduction_factor", "max_t"}),
                            ("resources", res, {"driver_cpus"})):
        if not isinstance(d, dict) or set(d) - allowed:
            raise TuneSpaceError(f"{where}: search.{sec} accepts only {', '.join(sorted(allowed))}; got {d!r}")
    if "max_t" in asha:
        raise TuneSpaceError(f"{where}: search.asha.max_t is always distill.optim.epochs; remove it and set the epochs")
    for key, value in (("algorithm", raw.get("algorithm", s.algorithm)), ("metric", raw.get("metric", s.metric))):
        allowed = ALGORITHMS if key == "algorithm" else METRICS
        if value not in allowed:
            raise TuneSpaceError(f"{where}: search.{key} {value!r} is not allowed; use one of {', '.join(allowed)}")
        setattr(s, key, value)
    if raw.get("mode", "max") != "max":
        raise TuneSpaceError(f"{where}: search.mode must be max (every searchable metric is an mAP)")
    for key, value, minimum in (("num_samples", raw.get("num_samples", s.num_samples), 1),
                                ("max_concurrent_trials", raw.get("max_concurrent_trials"), 1),
                                ("seed", raw.get("seed"), 0),
                                ("asha.grace_period", asha.get("grace_period", s.grace_period), 1)):
        if value is None and key in ("max_concurrent_trials", "seed"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise TuneSpaceError(f"{where}: search.{key} must be an integer >= {minimum}, got {value!r}")
        setattr(s, key.split(".")[-1], value)
    rf = asha.get("reduction_factor", s.reduction_factor)
    if isinstance(rf, bool) or not isinstance(rf, (int, float)) or rf <= 1:
        raise TuneSpaceError(f"{where}: search.asha.reduction_factor must be a number > 1, got {rf!r}")
    s.reduction_factor = float(rf)
    dc = res.get("driver_cpus", s.driver_cpus)
    if isinstance(dc, bool) or not isinstance(dc, (int, float)) or not 0 <= dc <= 1:
        raise TuneSpaceError(f"{where}: search.resources.driver_cpus must be in [0, 1] (0: the trial's process "
                             f"reserves no CPU), got {dc!r}")
    s.driver_cpus = float(dc)
    return s


def resolve_space_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    named = SPACES_DIR / f"{name_or_path}.yaml"
    if named.is_file():
        return named
    known = ", ".join(sorted(p.stem for p in SPACES_DIR.glob("*.yaml")))
    raise TuneSpaceError(f"tune space {name_or_path} is neither a file nor a name in tune_spaces/ ({known}); fix --space")


def load_space(name_or_path: str | Path, *, algorithm: str | None = None, metric: str | None = None,
               num_samples: int | None = None) -> TuneSpace:
    """Load and validate a space file; command-line choices override its ``search`` section."""
    path = resolve_space_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise TuneSpaceError(f"{path.name}: YAML {getattr(exc, 'problem', None) or 'syntax error'}; fix the syntax") from None
    data = copy.deepcopy(data)
    if isinstance(data, dict):
        search = data.setdefault("search", {}) or {}
        data["search"] = search
        if isinstance(search, dict):
            if algorithm is not None:
                search["algorithm"] = algorithm
                if algorithm == "grid" and num_samples is None:
                    search["num_samples"] = 1  # one trial per grid point unless asked otherwise
            if metric is not None:
                search["metric"] = metric
            if num_samples is not None:
                search["num_samples"] = num_samples
    return parse_space(data, str(path))


# --------------------------------------------------------------------------------------------
# Trial configs
# --------------------------------------------------------------------------------------------


def trial_overrides(params: dict[str, Any]) -> dict[str, Any]:
    """Sampled parameter values -> dotted config overrides (``mask_ratio`` also nulls the margin)."""
    out: dict[str, Any] = {}
    for name, value in params.items():
        spec = PARAMS[name]
        for path, companion in spec.paths.items():
            out[path] = spec.type(value) if companion is None else yaml.safe_load(companion)
    return out


def trial_config(base: Config | dict[str, Any], params: dict[str, Any]) -> Config:
    data = copy.deepcopy(base.to_dict() if isinstance(base, Config) else base)
    return config_from_dict(apply_overrides(data, trial_overrides(params)), check_files=False)


def trial_run_params(base: Config | dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A trial's MLflow params: its sampled values and ``config_hash``, the hash of its whole config."""
    from brcd.io import settings_hash

    return {**params, "config_hash": settings_hash(trial_config(base, params).to_dict())}


def check_space_against(space: TuneSpace, cfg: Config) -> None:
    """Every combination of discrete values and range ends must give a valid config (checked
    before any work starts; one line naming the combination and the config error)."""
    import itertools

    corners = {n: p.discrete if p.discrete is not None else list(p.values) for n, p in space.params.items()}
    names = list(corners)
    if math.prod(len(v) for v in corners.values()) > 4096:  # huge grids: each value with the others' first
        combos = [tuple(corners[m][0] if m != n else v for m in names) for n in names for v in corners[n]]
    else:
        combos = itertools.product(*(corners[n] for n in names))
    for combo in combos:
        try:
            trial_config(cfg, dict(zip(names, combo)))
        except ValueError as exc:
            combo_text = dict(zip(names, combo))
            raise TuneSpaceError(f"{Path(space.source).name}: {combo_text} gives an invalid config: {exc}") from None


# --------------------------------------------------------------------------------------------
# Shared work: teacher, teacher codes, one k-means per K
# --------------------------------------------------------------------------------------------


def cluster_cache_dir(output: Path, k: int) -> Path:
    return RunLayout(output).cluster_cache(k)


def prepare_clusters(run, ks: list[int]) -> dict[int, dict[str, Any]]:
    """k-means once per K into ``DIR/clusters/k=<K>/`` (reused when the teacher, split, K, n_init
    and seed are unchanged). Masks are recomputed per trial from its own mask rule."""
    from brcd import clustering
    from pipelines.stages import say, teacher_codes

    cfg = run.cfg
    c = cfg.clusters
    tfp, sfp = run.teacher_fingerprint(), run.split_fingerprint
    codes = None
    cache: dict[int, dict[str, Any]] = {}
    for k in ks:
        folder = cluster_cache_dir(run.output, k)
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


# --------------------------------------------------------------------------------------------
# The trial (a Tune function trainable driving one Ray Train distillation)
# --------------------------------------------------------------------------------------------


def run_trial(params: dict[str, Any], *, base: dict[str, Any], output: str) -> None:
    """One Tune trial: the trial's config -> ``distill_stage`` into ``DIR/trials/<trial_id>``."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines.stages import Run, distill_stage, say

    trial_id = ray.tune.get_context().get_trial_id()
    out = Path(output)
    cfg = trial_config(base, params)
    k = cfg.clusters.num_clusters
    cdir = cluster_cache_dir(out, k)
    sdir = RunLayout(out).trial_dir(trial_id)
    sdir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, RunLayout(sdir).config)
    rule = f"mask_ratio={cfg.clusters.mask_ratio}" if cfg.clusters.mask_ratio is not None else f"margin={cfg.clusters.margin}"
    say(f"[tune] trial {trial_id}: clusters K={k}: cache hit ({cdir}, built once, reused by trial {trial_id}); "
        f"masks recomputed with {rule}")
    run = Run(cfg, out, clusters_dir=cdir, student_dir=sdir, write_config=False)
    marker = stage_file(sdir)
    stamp = marker.stat().st_mtime_ns if marker.exists() else None
    if heads_only(run):
        say(f"[tune] trial {trial_id}: every network is frozen; the heads train on the shared view bank in the "
            "trial's own process (no Train worker group)")
        info = distill_stage(run, student_dir=sdir, tag=f"trial-{trial_id}", runner=_in_trial_runner)
    else:
        info = distill_stage(run, student_dir=sdir, tag=f"trial-{trial_id}", callbacks=[TuneReportCallback()])
    if stamp is not None and marker.stat().st_mtime_ns == stamp and info.get("history"):
        # finished before (e.g. Tune was interrupted right after): give Tune the final result again
        ray.tune.report({k: v for k, v in info["history"][-1].items() if isinstance(v, (int, float))})


def heads_only(run) -> bool:
    """Whether distillation trains heads only: the student backbone is frozen and the view bank holds
    every frozen output (so a trial needs neither the images nor a DDP group)."""
    from pipelines.ray.bank_job import plan_bank

    plan = plan_bank(run, "distill", quiet=True)
    return plan is not None and not plan.render


#: CPUs a heads-only trial reserves: several trials share a core (their steps are small matmuls)
HEADS_ONLY_TRIAL_CPUS = 0.5


def _in_trial_runner(loop_cfg: dict[str, Any], name: str):
    """Run distillation in the Tune trial's process, reporting to Tune (resumes from Tune's checkpoint)."""
    import shutil
    import tempfile
    from types import SimpleNamespace

    import ray.tune
    import torch

    from pipelines.ray.workers import distill_in_process

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


def prepare_bank(run, trials: int = 1) -> tuple[bool, bool]:
    """Build the distillation view bank and the student's feature caches before any trial starts (every
    trial reads them). Returns (whether there is a bank, whether trials train heads only):
    ``bank.enabled=auto`` weighs the bank against all ``trials`` live runs."""
    from pipelines.ray.bank_job import ensure_bank, eval_feature_caches, feature_cache, plan_bank, uses_feature_cache

    plan = plan_bank(run, "distill", runs=trials)
    if plan is not None:
        ensure_bank(run, plan, runs=trials)
    eval_feature_caches(run, "student")
    if uses_feature_cache(run.cfg, "student"):
        feature_cache(run, "student", "query")
    return plan is not None, plan is not None and not plan.render


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


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
    from brcd.io import settings_hash

    s = space.to_dict()
    for volatile in ("num_samples", "max_concurrent_trials"):
        s["search"].pop(volatile, None)
    return settings_hash(cfg.to_dict(), s)


def _trial_resources(cfg: Config, space: TuneSpace, heads: bool = False) -> dict[str, float]:
    """The trial's own process; its Train workers get their own placement group from Ray Train.

    Without a CPU of its own: any fraction would keep N workers x 1 CPU off an N-CPU cluster for
    ever. Ray refuses an all-zero bundle, so the trial reserves one byte of (logical) memory.
    A heads-only trial trains in its own process: a fraction of a CPU (and of a GPU)."""
    if heads:
        r = cfg.resources
        return {"cpu": HEADS_ONLY_TRIAL_CPUS, **({"gpu": 0.25} if r.use_gpu else {})}
    if space.search.driver_cpus > 0:
        return {"cpu": space.search.driver_cpus}
    return {"cpu": 0, "memory": 1}


def _driver_bundle(space: TuneSpace) -> dict[str, float] | None:
    return {"CPU": space.search.driver_cpus} if space.search.driver_cpus > 0 else None


def _max_concurrent(cfg: Config, space: TuneSpace, heads: bool = False) -> int:
    if space.search.max_concurrent_trials:
        return space.search.max_concurrent_trials
    import ray

    r = cfg.resources
    total = ray.cluster_resources()
    if heads:
        fits = [int(total.get("CPU", 1) // HEADS_ONLY_TRIAL_CPUS)]
        if r.use_gpu:
            fits.append(int(total.get("GPU", 0) // 0.25))
        return max(1, min(fits))
    fits = [int(total.get("CPU", 1) // (space.search.driver_cpus + r.num_workers * r.cpus_per_worker))]
    if r.use_gpu:
        fits.append(int(total.get("GPU", 0) // (r.num_workers * (r.gpus_per_worker or 1.0))))
    return max(1, min(fits))


def _build_tuner(trainable, cfg: Config, space: TuneSpace, output: Path, max_concurrent: int, callbacks: list):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    s = space.search
    seed = cfg.seed if s.seed is None else s.seed
    if s.algorithm == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        search_alg = ConcurrencyLimiter(OptunaSearch(seed=seed), max_concurrent=max_concurrent)
    else:
        from ray.tune.search.basic_variant import BasicVariantGenerator

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
                                  callbacks=[_reaper_class()(), *callbacks]),
    )


# --------------------------------------------------------------------------------------------
# MLflow: the job's parent run and one nested run per trial (pipelines.stage_tracking owns the runs)
# --------------------------------------------------------------------------------------------

_MLFLOW_STATUS = {"error": "FAILED", "unfinished": "KILLED"}  # result_rows status -> run status; else FINISHED
_FINAL_METRICS = ("epochs_run", *(f"{p}_{m}" for m in METRICS for p in ("final", "best")))


def _job_tracker(cfg: Config, output: str | Path):
    """The job's stage tracker (its parent run, the teacher's run), or None with ``tracking.enabled=false``."""
    if not cfg.tracking.enabled:
        return None
    from pipelines.stage_tracking import tracker_for

    return tracker_for(cfg, Path(output))


def _job_params(cfg: Config, space: TuneSpace) -> dict[str, Any]:
    """The parent run's params: the base config, every searched distribution and the search settings."""
    params = {**cfg.flat(), **{f"tune.params.{n}": p.to_dict() for n, p in space.params.items()}}
    return params | {f"tune.search.{k}": v for k, v in asdict(space.search).items()}


def _trial_runs(cfg: Config, tracker_uri: str, job: str):
    from brcd.mlflow.tracking import dataset_name
    from pipelines.stage_tracking import TuneTrialRuns

    tags = {"dataset": dataset_name(cfg), "config": cfg.name}
    return TuneTrialRuns(tracker_uri, cfg.tracking.experiment, job, tags=tags)


def _mlflow_trials(tracker, cfg: Config, output: Path, job: str):
    return _mlflow_trials_class()(_trial_runs(cfg, str(tracker.uri), job), base=cfg.to_dict(), output=str(output))


def _mlflow_trials_class():
    from ray.tune import Callback
    from ray.tune.result import AUTO_RESULT_KEYS

    tune_keys = {*AUTO_RESULT_KEYS, "done", "trial_id", "checkpoint_path"}  # Tune's bookkeeping, not the trial's

    class MlflowTrials(Callback):
        """Each trial's MLflow run (``pipelines.stage_tracking.TuneTrialRuns``), fed from the Tune driver.

        Not Ray's ``MLflowLoggerCallback``: it starts a new run whenever a trial starts, so a resumed
        job would log its unfinished trials twice, and it raises when the backend is down."""

        def __init__(self, runs, *, base: dict[str, Any], output: str):
            self.runs, self.base, self.output = runs, base, output

        def _guard(self, fn) -> None:
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - tracking never stops the search
                log.warning("MLflow: a trial's run was not updated (%s: %s); tuning continues", type(exc).__name__, exc)

        def _start(self, trial) -> None:
            trial_dir = RunLayout(Path(self.output)).trial_dir(trial.trial_id)
            self.runs.start(trial.trial_id, trial_run_params(self.base, trial.config), tags={"run_dir": str(trial_dir)})

        def setup(self, **info):
            self._guard(self.runs.attach)

        def on_trial_start(self, iteration, trials, trial, **info):
            self._guard(lambda: self._start(trial))

        def on_trial_result(self, iteration, trials, trial, result, **info):
            def go() -> None:
                if trial.trial_id not in self.runs:
                    self._start(trial)
                step = int(result.get("epoch") or result.get("training_iteration") or 0)
                self.runs.log(trial.trial_id, {k: v for k, v in result.items() if k not in tune_keys}, step)

            self._guard(go)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._guard(lambda: self.runs.end(trial.trial_id, "FINISHED"))

        def on_trial_error(self, iteration, trials, trial, **info):
            self._guard(lambda: self.runs.end(trial.trial_id, "FAILED"))

    return MlflowTrials


def _row_params(cfg: Config, space: TuneSpace, row: dict[str, Any]) -> dict[str, Any]:
    params = {n: row.get(n) for n in space.params}
    try:
        return trial_run_params(cfg, params)
    except (ValueError, TypeError):  # a trial whose sampled values were never saved
        return {n: v for n, v in params.items() if v is not None}


def _finish_mlflow(tracker, cfg: Config, job: str, space: TuneSpace, rows: list[dict[str, Any]],
                   best: dict[str, Any] | None, artifacts: list[Path | None], interrupted: bool) -> None:
    """Every trial's final metrics and status (its row of the results), then the parent's summary."""
    if tracker.parent_run_id is None:
        return
    runs = _trial_runs(cfg, str(tracker.uri), job)
    if runs.attach() is not None:
        runs.finish([{
            "trial_id": r["trial_id"], "params": _row_params(cfg, space, r),
            "metrics": {k: r[k] for k in _FINAL_METRICS if r.get(k) is not None}, "step": r["epochs_run"],
            "tags": {"status": r["status"], **({"error": r["error"]} if r.get("error") else {})},
            "status": _MLFLOW_STATUS.get(r["status"], "FINISHED"),
        } for r in rows])
    metric = space.search.metric
    summary = {"trials": len(rows), "trials_unfinished": sum(r["status"] == "unfinished" for r in rows)}
    if best is not None:
        summary[f"best_{metric}"] = best[f"best_{metric}"]
    tracker.finish_parent(metrics=summary, artifacts=[p for p in artifacts if p is not None],
                          tags={"best_trial_id": best["trial_id"]} if best else None,
                          status="KILLED" if interrupted else "FINISHED")


def tune_main(cfg: Config, output: str | Path, space: TuneSpace, *, retry_errored: bool = False,
              callbacks: list | None = None) -> TuneSummary:
    """Teacher once, codes once, k-means once per K, then the Tune run (or its restore).

    ``callbacks``: extra ``ray.tune.Callback``s for a new run; a restored run keeps the callbacks it
    was started with (Tune saves them with the experiment), the MLflow trial logger included."""
    import ray
    from ray import tune

    from brcd.io import settings_hash
    from pipelines.stages import Run, say, teacher_codes, teacher_stage

    t0 = time.perf_counter()
    if cfg.resources.num_workers == 0:
        # Train local mode cannot run inside a Tune trial in Ray 2.60: prepare_model() calls
        # ray.train.get_context(), which raises in a Tune session, and local mode runs no callbacks.
        say("[tune] resources.num_workers=0 (Train local mode) does not work inside Tune trials; "
            "using 1 Train worker per trial")
        cfg = replace(cfg, resources=replace(cfg.resources, num_workers=1))
    check_space_against(space, cfg)
    from pipelines.ray.cluster import check_placement

    check_placement(cfg.resources, "each trial", driver=_driver_bundle(space))  # before the teacher: Ray would wait for ever
    if space.search.grace_period > cfg.distill.optim.epochs:
        raise TuneSpaceError(f"search.asha.grace_period={space.search.grace_period} exceeds distill.optim.epochs="
                             f"{cfg.distill.optim.epochs}; lower the grace period or raise the epochs")
    fp = _fingerprint(cfg, space)
    tracker = _job_tracker(cfg, output)
    run = Run(cfg, output, tracker=tracker)
    out = run.output
    job = settings_hash(fp, str(out))  # the MLflow runs' key: this config and space in this folder
    if tracker is not None:
        tracker.start_parent(f"tune-{cfg.name}", key=job, params=_job_params(cfg, space), tags={"run_dir": str(out)})
    teacher_stage(run)
    teacher_codes(run)
    cache = prepare_clusters(run, space.cluster_counts(cfg))
    banked, heads = prepare_bank(run, space.expected_trials())
    if banked and cfg.bank.enabled == "auto":
        cfg = replace(cfg, bank=replace(cfg.bank, enabled=True))  # a trial alone would not pay for the bank

    exp_dir = out / EXPERIMENT
    state_file = run.layout.tune_state
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=cfg.to_dict(), output=str(out)),
                                    _trial_resources(cfg, space, heads))
    pgs_before = {pid for pid, info in ray.util.placement_group_table().items() if info.get("state") == "CREATED"}
    restored = tune.Tuner.can_restore(str(exp_dir))
    expected_trials = space.expected_trials()
    if restored:
        prev = io.load_json(state_file) if state_file.exists() else {}
        expected_trials = prev.get("expected_trials", expected_trials)
        if prev.get("fingerprint") != fp:
            raise TuneSpaceError(f"{exp_dir} holds a tuning run with another config or space; use a new --output "
                                 f"or delete {exp_dir} to start over")
        if prev.get("num_samples") != space.search.num_samples:
            say(f"[tune] note: resuming keeps the original num_samples={prev.get('num_samples')}")
        say(f"[tune] resuming {exp_dir}: finished trials are kept, unfinished ones continue")
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True,
                                   resume_errored=retry_errored)
    else:
        io.save_json(state_file, {"fingerprint": fp, "space": space.to_dict(), "num_samples": space.search.num_samples,
                                  "expected_trials": space.expected_trials(), "source": space.source})
        mc = _max_concurrent(cfg, space, heads)
        each = (f"heads only on the view bank, {HEADS_ONLY_TRIAL_CPUS:g} CPU each" if heads
                else f"{cfg.resources.num_workers} Train worker(s) each")
        say(f"[tune] {space.search.algorithm} search, {space.search.num_samples} sample(s) over "
            f"{', '.join(space.params)}; ASHA on {space.search.metric} (grace {space.search.grace_period}, "
            f"reduction {space.search.reduction_factor:g}, max_t {cfg.distill.optim.epochs} epochs); "
            f"{mc} trial(s) at a time, {each}")
        extra = [_mlflow_trials(tracker, cfg, out, job)] if tracker is not None else []  # a no-op while MLflow is down
        tuner = _build_tuner(trainable, cfg, space, out, mc, [*(callbacks or []), *extra])
    released_before = len(RELEASED_PLACEMENT_GROUPS)
    grid = tuner.fit()
    leaked = check_placement_groups(pgs_before)
    released = RELEASED_PLACEMENT_GROUPS[released_before:]

    rows = result_rows(grid, space, cfg, out)
    for k, entry in cache.items():
        entry["trials"] = [r["trial_id"] for r in rows if r.get("num_clusters", cfg.clusters.num_clusters) == k]
        say(f"[tune] clusters K={k}: k-means {'built once' if entry['built'] else 'cache hit'}, "
            f"reused by trials {', '.join(entry['trials']) or '-'}")
    csv_path = write_results(rows, space, run.layout.tune_results)
    metric = space.search.metric
    best = next((r for r in rows if r["status"] != "error" and r.get(f"best_{metric}") is not None), None)
    best_path = None
    if best is not None:
        best_cfg = trial_config(cfg, {n: best[n] for n in space.params})
        best_path = save_config(best_cfg, run.layout.best_config)
        io.save_json(run.layout.best_trial, best)
    print(format_table(rows, space), flush=True)
    if best is not None:
        say(f"[tune] best trial {best['trial_id']}: {metric} {best[f'best_{metric}']:.4f} "
            f"with {', '.join(f'{n}={best[n]}' for n in space.params)}; config: {best_path}")
    say(f"[tune] results: {csv_path}")
    unfinished = [r["trial_id"] for r in rows if r["status"] == "unfinished"]
    expected = expected_trials
    interrupted = bool(unfinished) or len(rows) < expected
    if tracker is not None:
        _finish_mlflow(tracker, cfg, job, space, rows, best, [csv_path, best_path], interrupted)
    if interrupted:
        say(f"[tune] interrupted: {len(rows) - len(unfinished)} of {expected} trial(s) finished; "
            "run the same command again to resume")
    return TuneSummary(rows=rows, best=best, results_csv=csv_path, best_config=best_path, cluster_cache=cache,
                       restored=restored, leaked_placement_groups=leaked,
                       released_placement_groups=released, unfinished=unfinished, interrupted=interrupted,
                       seconds=time.perf_counter() - t0)


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _saved_params(trial_path: str | None) -> dict[str, Any]:
    """The sampled parameters Tune saved for a trial (also for trials that never reported)."""
    try:
        return io.load_json(Path(trial_path) / "params.json")
    except Exception:
        return {}


def _saved_statuses(exp_dir: Path) -> dict[str, str]:
    """Trial id -> status in the saved experiment state (empty if it cannot be read)."""
    try:
        from ray.tune import ExperimentAnalysis

        return {t.trial_id: t.status for t in ExperimentAnalysis(str(exp_dir)).trials}
    except Exception:
        return {}


def result_rows(grid, space: TuneSpace, cfg: Config, output: Path) -> list[dict[str, Any]]:
    """One row per trial: parameters, status, epochs run, final and best metrics; best first.

    Status: ``terminated`` (ran to the end and saved its weights; ``(patience early stop)`` when
    the loop's own early stopping ended it), ``stopped early by ASHA``, ``error``, or
    ``unfinished`` (the run was interrupted; the same command resumes it)."""
    epochs = cfg.distill.optim.epochs
    metric = space.search.metric
    trials = {t.trial_id: t for t in getattr(getattr(grid, "_experiment_analysis", None), "trials", None) or []}
    saved = _saved_statuses(output / EXPERIMENT)
    rows = []
    for result in grid:
        m = result.metrics or {}
        trial_id = m.get("trial_id") or Path(result.path).name.removeprefix("trial_")
        trial = trials.get(trial_id)
        config = result.config or getattr(trial, "config", None) or _saved_params(result.path)
        row: dict[str, Any] = {"trial_id": trial_id, **{n: config.get(n) for n in space.params}}
        ran = int(m["epoch"]) if _num(m.get("epoch")) is not None else 0
        # the saved state is what a resume sees: after an interruption Tune marks the trials it
        # stopped TERMINATED in memory, but saves them as unfinished
        tune_status = saved.get(trial_id) or getattr(trial, "status", None)
        finished = stage_file(RunLayout(output).trial_dir(trial_id)).exists()
        if result.error is not None or tune_status == "ERROR":
            status = "error"
        elif tune_status in ("PENDING", "RUNNING", "PAUSED"):
            status = "unfinished"
        elif finished:
            status = "terminated" if ran >= epochs else "terminated (patience early stop)"
        elif ran < epochs:
            status = "stopped early by ASHA"
        else:
            status = "stopped by ASHA at the last epoch"
        row.update(status=status, epochs_run=ran)
        for key in METRICS:
            row[f"final_{key}"] = _num(m.get(key))
            row[f"best_{key}"] = _num(m.get(f"best_{key}"))
        row["error"] = "" if result.error is None else str(result.error).strip().splitlines()[-1][:200]
        rows.append(row)
    rows.sort(key=lambda r: (-(r[f"best_{metric}"] if r[f"best_{metric}"] is not None else -math.inf), r["trial_id"]))
    return rows


def result_columns(space: TuneSpace) -> list[str]:
    metric = space.search.metric
    other = [m for m in METRICS if m != metric]
    return (["trial_id", *space.params, "status", "epochs_run", f"best_{metric}", f"final_{metric}"]
            + [f"{p}_{m}" for m in other for p in ("best", "final")] + ["error"])


def write_results(rows: list[dict[str, Any]], space: TuneSpace, path: Path) -> Path:
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=result_columns(space), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
    return io.write_text(path, buf.getvalue())


def format_table(rows: list[dict[str, Any]], space: TuneSpace) -> str:
    cols = [c for c in result_columns(space) if c != "error" and not c.startswith("final_map_sym")]

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    table = [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) if table else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(t, widths)) for t in table]
    return "\n".join(lines)


def orphaned_placement_groups(job_id: str | None = None) -> list[str]:
    """Reserved (CREATED) placement groups whose creating actor is dead, of this job by default.

    Ray Train V2 creates a run's worker placement group from its controller actor. When ASHA
    stops a trial, Tune kills the trial actor; the controller dies with it, but the group's
    lifetime also follows the creating *job* (the Tune driver, still alive), so it stays reserved
    and starves the next trials (Ray issue #54305). Ray's own PlacementGroupCleaner actor should
    remove it but needs the State API, which fails e.g. when several Ray instances share a host.
    Reads the GCS table directly (the public ``placement_group_table`` drops the creator fields).
    """
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    job = job_id or ray.get_runtime_context().get_job_id()
    created = gcs_pb2.PlacementGroupTableData.CREATED
    nil = ray.ActorID.nil().binary()
    out = []
    for blob in state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(blob)
        by_actor = pg.creator_actor_id and pg.creator_actor_id != nil[: len(pg.creator_actor_id)]  # not a driver
        orphaned = pg.creator_actor_dead and not pg.is_detached
        if pg.state == created and by_actor and orphaned and pg.creator_job_id.hex() == job:
            out.append(pg.placement_group_id.hex())
    return out


def remove_placement_groups(ids: list[str]) -> None:
    import ray
    from ray.util.placement_group import PlacementGroup

    for pid in ids:
        ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(pid)))


RELEASED_PLACEMENT_GROUPS: list[str] = []  # freed in this process (for the summary)


def release_orphaned_placement_groups(why: str = "") -> list[str]:
    """Remove this job's orphaned groups (see :func:`orphaned_placement_groups`); log and return them."""
    ids = [i for i in orphaned_placement_groups() if i not in RELEASED_PLACEMENT_GROUPS]
    if ids:
        remove_placement_groups(ids)
        RELEASED_PLACEMENT_GROUPS.extend(ids)
        print(f"[tune] released {len(ids)} placement group(s) left reserved by a stopped trial's Train run"
              f"{why} (Ray issue #54305): {[i[:12] for i in ids]}", flush=True)
    return ids


def _reaper_class():
    from ray.tune import Callback

    class PlacementGroupReaper(Callback):
        """Frees the worker placement groups that stopped trials leave behind (Ray issue #54305),
        at most every ``interval_s`` during the run and whenever a trial ends."""

        def __init__(self, interval_s: float = 2.0):
            self.interval_s = interval_s  # the job id is read at run time: a restored run is a new job
            self._last = 0.0

        def reap(self, why: str = "") -> None:
            try:
                release_orphaned_placement_groups(why)
            except Exception as exc:  # Ray internals moved: the end-of-run check still reports leaks
                print(f"[tune] placement-group check unavailable ({type(exc).__name__}: {exc})", flush=True)
                self.interval_s = math.inf
            self._last = time.monotonic()

        def on_step_begin(self, iteration, trials, **info):
            if time.monotonic() - self._last >= self.interval_s:
                self.reap()

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.reap(f" after trial {trial.trial_id}")

        def on_trial_error(self, iteration, trials, trial, **info):
            self.reap(f" after trial {trial.trial_id}")

    return PlacementGroupReaper


def check_placement_groups(before: set[str], *, wait_s: float = 20.0, clean: bool = True) -> list[dict[str, Any]]:
    """Placement groups created during the run and still CREATED after it (Ray issue #54305).

    A stopped trial's groups are removed asynchronously, so this waits up to ``wait_s`` (freeing
    orphaned groups of this job meanwhile); whatever is left is reported and, with ``clean``,
    removed."""
    import ray

    from pipelines.stages import say

    deadline = time.monotonic() + wait_s
    while True:
        try:
            release_orphaned_placement_groups(" after the run")
        except Exception:
            pass
        table = ray.util.placement_group_table()
        leaked = [{"id": pid, **{k: info.get(k) for k in ("name", "state", "bundles")}}
                  for pid, info in table.items() if info.get("state") == "CREATED" and pid not in before]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if leaked:
        say(f"[tune] WARNING: {len(leaked)} placement group(s) still reserved after the run (Ray issue #54305): "
            f"{[p['id'][:12] for p in leaked]}" + ("; removing them" if clean else ""))
        if clean:
            remove_placement_groups([p["id"] for p in leaked])
    else:
        say("[tune] placement groups: none left reserved after the run")
    return leaked


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


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
    from pipelines.commands.common import load_config_args

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
