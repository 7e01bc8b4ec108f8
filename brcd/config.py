"""Typed configuration: dataclasses, strict YAML loading, presets and dotted overrides.

A YAML file may start from another with ``base: <preset name or path relative to the file>`` and change
only what differs (sections merge key by key). Loading validates everything up front, so a typo fails in a
second with one :class:`ConfigError` line naming the key, instead of after an hour of teacher training::

    cfg = load_config("my_run.yaml", overrides=["distill.alpha=0.5", "clusters.num_clusters=12"])
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence, Union, get_args, get_origin

import yaml

from brcd.losses.options import BRCDOptions

PRESETS_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A configuration problem, described in one line that names the key and the fix."""


@dataclass
class AugmentConfig:
    """The random view of contrastive training, drawn twice per image. The defaults are CIBHash's natural-image
    recipe; data where a flip or a colour change makes another thing (digits, text) sets its own (demo preset)."""

    crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])  # RandomResizedCrop area range
    hflip: float = 0.5  # probability of a horizontal flip
    rotate: float = 0.0  # degrees: a random affine rotates within +-rotate ...
    translate: float = 0.0  # ... shifts by up to this fraction of the size ...
    shear: float = 0.0  # ... and shears within +-shear degrees (all 0: no affine step)
    color_jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.4, 0.1])  # brightness, contrast, saturation, hue
    color_jitter_p: float = 0.7
    grayscale: float = 0.2  # probability
    blur: bool = True  # 3x3 Gaussian blur


@dataclass
class DataConfig:
    """Where images come from and how they are split (see ``brcd.data``)."""

    source: Literal["digits", "cifar10", "folder", "list"] = "digits"
    root: str | None = None
    image_size: int = 32
    seed: int = 0
    # split sizes of the digits and folder sources; database = everything not in query/validation.
    # cifar10 (paper protocol) and list files (the lists are the split) reject other values.
    query: int = 200
    validation: int = 200
    train: int = 1000
    # list-file datasets (NUS-WIDE, MS-COCO, ImageNet-100): file names relative to ``root``
    train_list: str = "train.txt"
    query_list: str = "test.txt"
    database_list: str = "database.txt"
    num_classes: int | None = None
    # mAP@topk (None = whole database)
    topk: int | None = 1000
    on_corrupt: Literal["error", "skip"] = "error"
    loader_workers: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class ModelConfig:
    """A hashing model: timm backbone + hash head (see ``brcd.models.nets``)."""

    backbone: str = "test_vit"
    bits: int | list[int] = 64  # student.model.bits unset: the teacher's (config_from_dict)
    pretrained: bool = False
    weights: str | None = None  # local weights file for offline machines (safetensors / state dict)
    freeze_backbone: bool = True
    head: Literal["linear", "mlp"] = "linear"
    head_input: Literal["features", "logits"] = "features"
    hidden_dim: int = 1000
    channels_last: bool = True
    model_kwargs: dict = field(default_factory=dict)  # passed to timm.create_model (e.g. img_size, patch_size)


@dataclass
class OptimConfig:
    """Optimisation and model-selection settings shared by teacher training and distillation."""

    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    temperature: float = 0.3
    kl_weight: float = 0.001
    validate_every: int = 1
    patience: int = 3  # validations without improvement (on either paradigm) before stopping
    max_steps_per_epoch: int | None = None
    log_every: int = 0  # steps between progress lines inside an epoch (0 = once per epoch)


@dataclass
class TeacherConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(head="linear"))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-4))
    checkpoint: str | None = None  # use an existing teacher checkpoint instead of training one


@dataclass
class ClustersConfig:
    """k-means on the teacher's codes and the per-cluster bit masks (``brcd.clustering``)."""

    num_clusters: int = 10
    n_init: int = 10
    margin: float | None = 0.5
    mask_ratio: float | None = None
    k_range: list[int] = field(default_factory=lambda: [2, 14])  # elbow / silhouette scan


@dataclass
class DistillConfig(BRCDOptions):
    """Student distillation: the method, the BRCD objective's ``alpha`` and switches (inherited from
    :class:`~brcd.losses.options.BRCDOptions`, the one list of them), and the weights."""

    method: Literal["brcd", "no_kd", "kd", "rkd", "pkt", "sp", "crd"] = "brcd"
    brcd_weight: float = 1.0
    baseline_weight: float = 1.0
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3))

    def brcd_options(self) -> BRCDOptions:
        """The BRCD options alone, as the losses take them."""
        return BRCDOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(BRCDOptions)})


@dataclass
class StudentConfig:
    model: ModelConfig = field(
        default_factory=lambda: ModelConfig(backbone="test_efficientnet", head="mlp")
    )


@dataclass
class NHLConfig:
    """Nested hash layer (NHL, ``docs/NHL.md``): used only when ``*.model.bits`` lists several lengths (one head
    emits the longest code, every shorter code is its prefix, all trained at once)."""

    adaptive: bool = True  # dominance-aware adaptive weights from the per-length gradients on the shared layer
    cascade: bool = True  # long -> short cascade self-distillation between consecutive lengths
    cascade_weight: float = 1.0  # lambda of the cascade terms (public code default 0.1, its scripts use 1)
    beta: float = 1.0  # conflict budget of the adaptive weights


@dataclass
class ResourcesConfig:
    """Ray Train scaling (``pipelines``); ``num_workers: 0`` runs in-process (local mode)."""

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | None = None
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    max_failures: int = 1
    storage_path: str | None = None  # local folder (default: <output>/ray) or s3://, NFS path
    bf16: bool = False


@dataclass
class BankConfig:
    """The view bank (docs/BANK.md): frozen networks run once per training image and view.

    ``enabled``: ``auto`` where a frozen network's bank at least halves the live run's frozen forward passes
    (2 x ``views`` x images <= epochs x steps x 2 x batch); ``true`` wherever a network is frozen; ``false``
    never (nor the exact feature caches). ``views`` = A, views drawn per image."""

    enabled: Literal["auto", True, False] = "auto"
    views: int = 16
    actors: int | None = None  # Ray Data actors building it (None: one per CPU/GPU slot; 0: in the driver)
    batch_size: int = 64


@dataclass
class TrackingConfig:
    """MLflow tracking and registry."""

    enabled: bool = True
    tracking_uri: str | None = None  # default: sqlite:///<output>/mlflow.db (or MLFLOW_TRACKING_URI)
    experiment: str = "brcd"
    model_name: str = "brcd-student"
    select_metric: Literal["map_asymmetric", "map_symmetric"] = "map_asymmetric"


@dataclass
class CrossModalDataConfig:
    """Paired image + tag-vector data (docs/CROSSMODAL.md): ``digits`` pairs real digit images with SYNTHETIC
    tag vectors from their labels; ``mirflickr`` / ``nuswide``: a list file of images and .mat tag/label files."""

    source: Literal["digits", "mirflickr", "nuswide"] = "digits"
    root: str | None = None
    list_file: str = "images.txt"
    tags_file: str = "tags.mat"
    tags_key: str = "YAll"
    labels_file: str = "labels.mat"
    labels_key: str = "LAll"
    num_labels: int | None = None  # nuswide: 10 or 21 (default 10); mirflickr: 24
    query: int = 250  # the rest is the retrieval database (= the unlabelled training set)
    limit: int | None = None  # use a seeded random subset of this many pairs (memory grows as n^2, see docs)
    image_size: int = 32
    topk: int | None = 500  # mAP@topk (null = whole database)
    # synthetic tags of the digits source
    tags_per_class: int = 4
    noise_tags: int = 24
    keep_prob: float = 0.5  # each true tag of an item kept with this probability
    extra_tags: float = 2.0  # mean number (Poisson) of random extra tags per item, from the whole vocabulary


@dataclass
class CrossModalTeacherConfig:
    """Unsupervised DJSRH-style teacher: image hash net (frozen backbone + MLP) and text MLP trained on
    the joint-semantics affinity of image features and tag vectors."""

    image_backbone: str = "pixels"  # "pixels" (the flattened image) or a timm name (frozen, e.g. test_resnet)
    image_pretrained: bool = False  # timm hub weights (needs internet once)
    image_weights: str | None = None  # local weights file for the backbone (safetensors / state dict)
    bits: int = 32
    hidden_dim: int = 512
    epochs: int = 60
    batch_size: int = 128
    lr: float = 1e-3
    beta: float = 0.6  # S_tilde = beta * cos(F_I) + (1 - beta) * cos(F_T)
    eta: float = 0.4  # S_joint = (1 - eta) * S_tilde + eta * S_tilde S_tilde^T / n
    mu: float = 1.5  # target scale: ||mu * S_joint - cos(B_x, B_y)||^2
    lambda_ii: float = 0.1
    lambda_it: float = 1.0
    lambda_tt: float = 0.1
    alpha: float = 1.0  # tanh(alpha * h) relaxation


@dataclass
class SimilarityConfig:
    """How the student's symmetric S in {-1, +1} (or [-1, 1]) is rebuilt from the teacher."""

    source: Literal["codes", "features", "both"] = "both"
    rule: Literal["topk", "threshold", "continuous"] = "continuous"
    k: int = 100  # topk: j is similar to i when either is among the other's k nearest
    threshold: float = 0.0  # threshold: similar when the affinity is >= threshold


@dataclass
class CrossModalStudentConfig:
    """Supervised asymmetric student (ADSH/DADH style) on S: image net f, text net g, free database codes
    B updated by discrete cyclic coordinate descent (DCC)."""

    bits: int = 32
    hidden_dim: int = 512
    outer_iters: int = 20  # (sample Omega, train f and g, DCC update of B) rounds
    inner_epochs: int = 3
    sample_size: int | None = 800  # |Omega| per round (null = the whole database)
    batch_size: int = 64
    lr: float = 1e-3
    gamma: float = 200.0  # weight of ||b_i - u_i||^2 + ||b_i - v_i||^2
    dcc_sweeps: int = 3  # passes over the bits per B update


@dataclass
class CrossModalConfig:
    """The cross-modal job (``brcd crossmodal``); resources and tracking come from the top-level sections."""

    data: CrossModalDataConfig = field(default_factory=CrossModalDataConfig)
    teacher: CrossModalTeacherConfig = field(default_factory=CrossModalTeacherConfig)
    similarity: SimilarityConfig = field(default_factory=SimilarityConfig)
    student: CrossModalStudentConfig = field(default_factory=CrossModalStudentConfig)
    baseline_beta: float = 0.6  # the no-teacher student's S: joint affinity of the raw features


@dataclass
class Config:
    name: str = "run"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    clusters: ClustersConfig = field(default_factory=ClustersConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    nhl: NHLConfig = field(default_factory=NHLConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    crossmodal: CrossModalConfig = field(default_factory=CrossModalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted ``key -> value`` view (for MLflow params and Tune spaces)."""
        return _flatten(self.to_dict())


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        (inner,) = get_args(tp)
        return f"list of {_type_name(inner)}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


#: scalar type -> (accepts a YAML value, what the error asks for)
_SCALARS: dict[type, tuple[Callable[[Any], bool], str]] = {
    bool: (lambda v: isinstance(v, bool), "true/false"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    str: (lambda v: isinstance(v, str), "a string"),
    type(None): (lambda v: v is None, "null"),
}


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"{key}: {value!r} is not allowed; use {_type_name(tp)}")
    if origin in (Union, types.UnionType):
        for option in get_args(tp):
            try:
                return _convert(value, option, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin is list:
        (inner,) = get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        return [_convert(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key}: expected a mapping with string keys, got {type(value).__name__}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping (section), got {type(value).__name__}")
        return _build(tp, value, key + ".")
    if tp in _SCALARS:
        accepts, want = _SCALARS[tp]
        if accepts(value):
            return float(value) if tp is float else value
        raise ConfigError(f"{key}: expected {want}, got {type(value).__name__} {value!r}")
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def _build(cls: type, data: dict[str, Any], prefix: str = "", base: Any = None) -> Any:
    """``data`` over ``base`` (default ``cls()``); a partial section keeps its own defaults for what it omits."""
    base = cls() if base is None else base
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key, value in data.items():
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key '{prefix}{key}'{hint}; allowed keys here: {', '.join(names)}")
        current = getattr(base, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            setattr(base, key, _build(type(current), value, f"{prefix}{key}.", current))
        else:
            setattr(base, key, _convert(value, hints[key], f"{prefix}{key}"))
    return base


def code_lengths(bits: int | Sequence[int]) -> list[int]:
    """The code length(s) of a ``ModelConfig.bits`` value as a list (``32`` -> ``[32]``): the one place an
    int or a list of lengths is told apart."""
    return list(bits) if isinstance(bits, Sequence) else [bits]


def is_nested(cfg: "Config") -> bool:
    """True when the config trains nested codes (NHL): the student (= teacher) names several lengths."""
    return len(code_lengths(cfg.student.model.bits)) > 1


#: sources whose split sizes are not configurable, and why
_FIXED_SPLIT = {
    "cifar10": "its split is the paper protocol: 500 train images per class, 5,000 validation and 5,000 query "
               "test images, database = the 50,000 training images",
    "list": "the list files are the split: data.train_list, data.query_list (also the validation set), data.database_list",
}


def check_split_sizes(d: DataConfig) -> None:
    """Non-default ``data.query`` / ``validation`` / ``train`` are an error for the sources that fix their
    own split (``brcd.builders.data_bundle`` checks it once the data opened, so a broken dataset is reported first)."""
    for key in ("query", "validation", "train") if d.source in _FIXED_SPLIT else ():
        _require(getattr(d, key) == getattr(DataConfig, key), f"data.{key}={getattr(d, key)} is not used by "
                 f"data.source={d.source!r} ({_FIXED_SPLIT[d.source]}); remove it")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_augment(a: AugmentConfig) -> None:
    lo_hi, cj = a.crop_scale, a.color_jitter
    _require(len(lo_hi) == 2 and 0.0 < lo_hi[0] <= lo_hi[1] <= 1.0,
             f"data.augment.crop_scale must be [low, high] with 0 < low <= high <= 1, got {lo_hi}")
    for key in ("hflip", "color_jitter_p", "grayscale"):
        _require(0.0 <= getattr(a, key) <= 1.0, f"data.augment.{key} is a probability in [0, 1], got {getattr(a, key)}")
    _require(0.0 <= a.rotate <= 180.0 and 0.0 <= a.translate <= 1.0 and 0.0 <= a.shear < 90.0,
             f"data.augment: rotate in [0, 180], translate in [0, 1] and shear in [0, 90) degrees, "
             f"got {a.rotate}, {a.translate}, {a.shear}")
    _require(len(cj) == 4 and min(cj) >= 0 and cj[3] <= 0.5, f"data.augment.color_jitter must be "
             f"[brightness, contrast, saturation, hue] >= 0 with hue <= 0.5, got {cj}")


def _validate_crossmodal(x: CrossModalConfig) -> None:
    d, t, s, st = x.data, x.teacher, x.similarity, x.student
    _require(t.image_backbone != "pixels" or not (t.image_pretrained or t.image_weights),
             "crossmodal.teacher.image_pretrained / image_weights need a timm image_backbone, not pixels")
    _require(d.source == "digits" or bool(d.root),
             f"crossmodal.data.root is required for crossmodal.data.source={d.source!r}")
    _require(d.source != "nuswide" or d.num_labels in (None, 10, 21),
             f"crossmodal.data.num_labels must be 10 or 21 for nuswide, got {d.num_labels}")
    _require(d.query >= 1 and d.image_size >= 8, "crossmodal.data: query must be >= 1 and image_size >= 8")
    _require(d.limit is None or d.limit >= d.query + 2, f"crossmodal.data.limit must leave a database of at least "
             f"2 pairs after the {d.query} queries, got {d.limit}")
    _require(d.topk is None or d.topk >= 1, f"crossmodal.data.topk must be >= 1 or null, got {d.topk}")
    _require(0.0 < d.keep_prob <= 1.0 and d.extra_tags >= 0 and d.tags_per_class >= 1 and d.noise_tags >= 0,
             "crossmodal.data: keep_prob in (0, 1], extra_tags >= 0, tags_per_class >= 1, noise_tags >= 0")
    for name, v in (("teacher.bits", t.bits), ("student.bits", st.bits), ("teacher.hidden_dim", t.hidden_dim),
                    ("student.hidden_dim", st.hidden_dim), ("teacher.epochs", t.epochs), ("student.outer_iters", st.outer_iters),
                    ("student.inner_epochs", st.inner_epochs), ("student.dcc_sweeps", st.dcc_sweeps), ("similarity.k", s.k)):
        _require(v >= 1, f"crossmodal.{name} must be >= 1, got {v}")
    for name, v in (("teacher.batch_size", t.batch_size), ("student.batch_size", st.batch_size)):
        _require(v >= 2, f"crossmodal.{name} must be >= 2, got {v}")
    for name, v in (("teacher.lr", t.lr), ("student.lr", st.lr), ("teacher.mu", t.mu), ("teacher.alpha", t.alpha)):
        _require(v > 0, f"crossmodal.{name} must be > 0, got {v}")
    for name, v in (("teacher.beta", t.beta), ("teacher.eta", t.eta), ("baseline_beta", x.baseline_beta)):
        _require(0.0 <= v <= 1.0, f"crossmodal.{name} must be in [0, 1], got {v}")
    _require(st.gamma >= 0 and min(t.lambda_ii, t.lambda_it, t.lambda_tt) >= 0,
             "crossmodal: student.gamma and the teacher's lambda_* must be >= 0")
    _require(st.sample_size is None or st.sample_size >= 2,
             f"crossmodal.student.sample_size must be >= 2 or null, got {st.sample_size}")
    _require(-1.0 <= s.threshold <= 1.0, f"crossmodal.similarity.threshold must be in [-1, 1], got {s.threshold}")


def _validate_training(cfg: Config) -> None:
    """Bit lengths, augmentation, clusters, NHL, the BRCD options and both optimisers (in this order)."""
    t_bits, s_bits = code_lengths(cfg.teacher.model.bits), code_lengths(cfg.student.model.bits)
    for name, bits in (("teacher.model.bits", t_bits), ("student.model.bits", s_bits)):
        _require(bool(bits) and min(bits) >= 1, f"{name}: bit lengths must be positive integers, got {bits}")
        _require(bits == sorted(set(bits)), f"{name}: nested bit lengths must be strictly increasing, got {bits}")
    _require(t_bits == s_bits, f"teacher.model.bits {cfg.teacher.model.bits} and student.model.bits "
             f"{cfg.student.model.bits} differ; the student must emit codes of the teacher's length(s)")
    _check_augment(cfg.data.augment)
    c = cfg.clusters
    _require((c.margin is None) != (c.mask_ratio is None),
             "clusters: set exactly one of margin and mask_ratio (set the other to null)")
    _require(c.margin is None or 0.0 <= c.margin < 1.0, f"clusters.margin must be in [0, 1), got {c.margin}")
    _require(c.mask_ratio is None or 0.0 <= c.mask_ratio <= 1.0,
             f"clusters.mask_ratio must be in [0, 1], got {c.mask_ratio}")
    for key in ("num_clusters", "n_init"):
        _require(getattr(c, key) >= 1, f"clusters.{key} must be >= 1, got {getattr(c, key)}")
    _require(len(c.k_range) == 2 and 2 <= c.k_range[0] <= c.k_range[1],
             f"clusters.k_range must be [low, high] with 2 <= low <= high, got {c.k_range}")
    for key in ("cascade_weight", "beta"):
        value = getattr(cfg.nhl, key)
        _require(0.0 <= value < float("inf"), f"nhl.{key} must be a finite number >= 0, got {value}")
    _require(0.0 <= cfg.distill.alpha <= 1.0, f"distill.alpha must be in [0, 1], got {cfg.distill.alpha}")
    for sec, optim in (("teacher.optim", cfg.teacher.optim), ("distill.optim", cfg.distill.optim)):
        _require(optim.temperature > 0, f"{sec}.temperature must be > 0, got {optim.temperature}")
        _require(optim.lr > 0, f"{sec}.lr must be > 0, got {optim.lr}")
        _require(optim.batch_size >= 2, f"{sec}.batch_size must be >= 2 (contrastive losses need pairs)")
        _require(min(optim.epochs, optim.validate_every, optim.patience) >= 1,
                 f"{sec}: epochs, validate_every and patience must be >= 1")


def validate(cfg: Config, *, check_files: bool = True) -> Config:
    """Cross-field checks. Raises :class:`ConfigError` with one line naming key and fix."""
    _validate_training(cfg)
    d, b = cfg.data, cfg.bank
    _require(d.image_size >= 8, f"data.image_size must be >= 8, got {d.image_size}")
    _require(d.topk is None or d.topk >= 1, f"data.topk must be >= 1 or null (whole database), got {d.topk}")
    _require(d.source == "digits" or bool(d.root),
             f"data.root is required for data.source={d.source!r}; set it to the dataset folder")
    _require(b.enabled is True or b.enabled is False or b.enabled == "auto",
             f"bank.enabled must be auto, true or false, got {b.enabled!r}")
    _require(b.views >= 2, f"bank.views must be >= 2 (each step draws two distinct views), got {b.views}")
    _require(b.actors is None or b.actors >= 0, f"bank.actors must be >= 0 or null, got {b.actors}")
    _require(b.batch_size >= 1, f"bank.batch_size must be >= 1, got {b.batch_size}")
    _validate_crossmodal(cfg.crossmodal)
    _require(cfg.resources.num_workers >= 0, "resources.num_workers must be >= 0 (0 = run in this process)")
    files = (("teacher.checkpoint", cfg.teacher.checkpoint), ("teacher.model.weights", cfg.teacher.model.weights),
             ("student.model.weights", cfg.student.model.weights),
             ("crossmodal.teacher.image_weights", cfg.crossmodal.teacher.image_weights))
    for key, path in files if check_files else ():
        _require(path is None or Path(path).expanduser().exists(),
                 f"{key}: file {path} does not exist; fix the path or set it to null")
    return cfg


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def describe_presets() -> list[str]:
    """One line per preset: its name, and the preset or file it starts from (``base:``)."""
    lines = []
    for name in list_presets():
        base = _read_yaml(PRESETS_DIR / f"{name}.yaml").get("base")
        lines.append(f"{name} (base: {base})" if base else name)
    return lines


def _file_or_preset(path: Path, name: str | Path) -> Path | None:
    """``path`` when it is a file, else the preset called ``name``, else None."""
    return next((p for p in (path, PRESETS_DIR / f"{name}.yaml") if p.is_file()), None)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise ConfigError(f"{path}:{where} YAML {problem}; fix the syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path.name}: a config must be a mapping at the top level, got {type(data).__name__}; "
                          "start from a preset (`brcd presets`)")
    return data


def _resolve_base(base: Any, including: Path) -> Path:
    """``base:`` of ``including``: a YAML file relative to it, else a preset name."""
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{including.name}: base must be a preset name or a YAML path, got {base!r}")
    candidate = including.parent / Path(base).expanduser()
    path = _file_or_preset(candidate, base)
    if path is None:
        raise ConfigError(f"{including.name}: base {base!r} is neither a file ({candidate}) nor a preset; "
                          f"presets: {', '.join(list_presets())}")
    return path.resolve()


def _merge_raw(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``changes`` over ``base``: sections merge key by key, every other value (lists too) replaces."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = _merge_raw(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_config_data(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The raw mapping of a YAML config with its ``base:`` chain merged in (the file wins)."""
    path = Path(path).resolve()
    if path in _chain:
        cycle = " -> ".join(p.name for p in (*_chain, path))
        raise ConfigError(f"base cycle {cycle}; remove the base key that closes it")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    return _merge_raw(read_config_data(_resolve_base(base, path), (*_chain, path)), data)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings (or a ``{"a.b.c": value}`` dict) onto a raw config dict."""
    if not overrides:
        return data
    items = overrides.items() if isinstance(overrides, dict) else (_parse_override(o) for o in overrides)
    for key, value in items:
        parts = key.split(".") if isinstance(key, str) else key
        node = data
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {'.'.join(parts)}: {p} is not a section")
            node = nxt
        node[parts[-1]] = value
    return data


def _student_bits_from_teacher(data: dict[str, Any]) -> dict[str, Any]:
    """``student.model.bits`` defaults to the teacher's (the student must emit codes of the teacher's
    length(s)); malformed sections are left for ``_build`` to report."""
    teacher, student = data.get("teacher"), data.get("student", {})
    t_model = teacher.get("model") if isinstance(teacher, dict) else None
    s_model = student.get("model", {}) if isinstance(student, dict) else None
    if isinstance(t_model, dict) and "bits" in t_model and isinstance(s_model, dict) and "bits" not in s_model:
        # _build copies a list, so the two sections never share one
        return {**data, "student": {**student, "model": {**s_model, "bits": t_model["bits"]}}}
    return data


def config_from_dict(data: dict[str, Any], *, check_files: bool = True) -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping at the top level, got {type(data).__name__}")
    return validate(_build(Config, _student_bits_from_teacher(data)), check_files=check_files)


def load_config(
    name_or_path: str | Path,
    overrides: list[str] | dict[str, Any] | None = None,
    *,
    check_files: bool = True,
) -> Config:
    """Load a preset name or YAML file (with its ``base:`` chain), apply dotted overrides, validate,
    return a :class:`Config`."""
    path = _file_or_preset(Path(name_or_path).expanduser(), name_or_path)
    if path is None:
        raise ConfigError(f"config {name_or_path} is neither a file nor a preset; presets: {', '.join(list_presets())}")
    data = read_config_data(path)
    try:
        return config_from_dict(apply_overrides(data, overrides), check_files=check_files)
    except ConfigError as exc:
        raise ConfigError(f"{path.name}: {exc}") from None


def save_config(cfg: Config, path: str | Path) -> Path:
    from brcd.io import write_text

    return write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
