"""The search space: a ``tune_spaces/`` YAML file checked into a :class:`TuneSpace`, and a trial's config."""

from __future__ import annotations

import copy
import difflib
import itertools
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from brcd.config import Config, apply_overrides, config_from_dict
from brcd.io import settings_hash

SPACES_DIR = Path(__file__).resolve().parents[2] / "tune_spaces"
METRICS = ("map_asymmetric", "map_symmetric")
ALGORITHMS = ("random", "grid", "optuna")
KINDS = ("choice", "grid", "uniform", "loguniform", "randint")
MAX_CLUSTER_COUNTS = 32  # distinct K values k-means is prepared for


class TuneSpaceError(ValueError):
    """An invalid search space, in one line naming the parameter and the fix."""


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

    def is_grid(self, algorithm: str) -> bool:
        return self.kind == "grid" or (self.kind == "choice" and algorithm == "grid")

    def domain(self, algorithm: str):
        from ray import tune  # Ray only when a run starts: the CLI starts without it

        if self.is_grid(algorithm):
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
        grid = [len(p.values) for p in self.params.values() if p.is_grid(self.search.algorithm)]
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
    for key, allowed in (("algorithm", ALGORITHMS), ("metric", METRICS)):
        value = raw.get(key, getattr(s, key))
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


def load_space(name_or_path: str | Path, *, algorithm: str | None = None, metric: str | None = None,
               num_samples: int | None = None) -> TuneSpace:
    """Load and validate a space file (or one named in ``tune_spaces/``); command-line choices override its
    ``search`` section."""
    candidates = (Path(name_or_path).expanduser(), SPACES_DIR / f"{name_or_path}.yaml")
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        known = ", ".join(sorted(p.stem for p in SPACES_DIR.glob("*.yaml")))
        raise TuneSpaceError(f"tune space {name_or_path} is neither a file nor a name in tune_spaces/ ({known}); "
                             "fix --space")
    try:
        data = copy.deepcopy(yaml.safe_load(path.read_text()) or {})
    except yaml.YAMLError as exc:
        raise TuneSpaceError(f"{path.name}: YAML {getattr(exc, 'problem', None) or 'syntax error'}; fix the syntax") from None
    search = (data.get("search") or {}) if isinstance(data, dict) else None
    if isinstance(search, dict):
        if algorithm == "grid" and num_samples is None:
            num_samples = 1  # one trial per grid point unless asked otherwise
        given = {"algorithm": algorithm, "metric": metric, "num_samples": num_samples}
        data["search"] = search | {k: v for k, v in given.items() if v is not None}
    return parse_space(data, str(path))


def trial_config(base: Config | dict[str, Any], params: dict[str, Any]) -> Config:
    """``base`` with the sampled values set at their config paths (``mask_ratio`` also nulls the margin)."""
    overrides = {path: PARAMS[name].type(value) if companion is None else yaml.safe_load(companion)
                 for name, value in params.items() for path, companion in PARAMS[name].paths.items()}
    data = copy.deepcopy(base.to_dict() if isinstance(base, Config) else base)
    return config_from_dict(apply_overrides(data, overrides), check_files=False)


def trial_run_params(base: Config | dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A trial's MLflow params: its sampled values and ``config_hash``, the hash of its whole config."""
    return {**params, "config_hash": settings_hash(trial_config(base, params).to_dict())}


def check_space_against(space: TuneSpace, cfg: Config) -> None:
    """Check that every combination of discrete values and range ends gives a valid config, before any
    work starts (one line naming the combination and the config error)."""
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
            raise TuneSpaceError(f"{Path(space.source).name}: {dict(zip(names, combo))} gives an invalid config: "
                                 f"{exc}") from None
