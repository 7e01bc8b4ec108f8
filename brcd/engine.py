"""Training loops for the teacher and for distillation, shared by the CLI and the Ray workers.

Plain PyTorch: under ``torch.distributed`` (what Ray Train sets up) the loops shard the data, gather codes so
the contrastive batch is the *global* batch, and only rank 0 writes; Ray's reporting is injected through a
``report`` callback. A checkpoint folder (one per validation) holds ``state.safetensors`` (trainable weights +
optimizer tensors), ``state.json`` (:class:`LoopState`, optimizer param groups) and ``best_<metric>.safetensors``
per selection metric. Nested models (NHL, ``docs/NHL.md``) train every length at once and report ``<metric>@L``
per length; the selection metrics are the means over the lengths.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from brcd import io, layout
from brcd.config import NHLConfig
from brcd.distributed import all_reduce_sum, gather_no_grad, gather_with_grad, is_distributed, world_info
from brcd.evaluation import mean_average_precision
from brcd.losses import nearest_centroid, teacher_objective
from brcd.losses.nhl import nested_objective, per_length, prefix_args
from brcd.models.nets import HashingModel

STATE_WEIGHTS = "state.safetensors"
STATE_META = "state.json"


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; raised with the step and the likely cause."""


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into flat tensors (for safetensors) and JSON metadata."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{pid}.{k}"] = v
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {int(pid): dict(sc) for pid, sc in meta.get("scalars", {}).items()}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


@dataclass
class LoopState:
    """Everything the epoch loop needs to continue exactly where it stopped."""

    epoch: int = 0  # epochs finished
    best: dict[str, float] = field(default_factory=dict)
    best_epoch: dict[str, int] = field(default_factory=dict)
    bad_validations: int = 0
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def save_state(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, loop: LoopState,
               best_weights: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
               previous: str | Path | None = None) -> Path:
    """Write a resumable checkpoint folder (``state.json`` last); best files not in ``best_weights`` are
    copied from ``previous`` (the last checkpoint folder), so every folder is self-contained."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = unwrap(model)
    opt_t, opt_meta = optimizer_tensors(optimizer)
    weights = {f"model.{k}": v for k, v in model.trainable_state_dict().items()}
    io.save_state_dict(directory / STATE_WEIGHTS, {**weights, **opt_t})
    for name, w in (best_weights or {}).items():
        io.save_state_dict(layout.best_weights(directory, name), w)
    if previous is not None and Path(previous) != directory:
        for f in Path(previous).glob(layout.BEST_WEIGHTS_GLOB):
            if not (directory / f.name).exists():
                shutil.copy2(f, directory / f.name)
    io.save_json(directory / STATE_META, {"loop": loop.to_json(), "optimizer": opt_meta})
    return directory


def load_state(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> LoopState:
    directory = Path(directory)
    meta = io.load_json(directory / STATE_META)
    tensors = io.load_state_dict(directory / STATE_WEIGHTS)
    model_sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    own = unwrap(model).trainable_state_dict()
    wrong = sorted(k for k in model_sd if k not in own or tuple(own[k].shape) != tuple(model_sd[k].shape))
    missing = sorted(set(own) - set(model_sd))
    if wrong or missing:
        raise io.ArtifactError(
            f"checkpoint {directory} belongs to another architecture (e.g. {(wrong or missing)[0]!r} does not fit); "
            "use a checkpoint of this model or a new --output"
        )
    unwrap(model).load_state_dict(model_sd, strict=False)
    if optimizer is not None:
        load_optimizer_tensors(optimizer, tensors, meta["optimizer"])
    # fields a newer version may have added are dropped
    return LoopState(**{f.name: meta["loop"][f.name] for f in fields(LoopState) if f.name in meta["loop"]})


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """All weights (frozen backbone included), for the exported model."""
    return {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}


def load_model_weights(model: nn.Module, path: str | Path) -> None:
    """Load exported full weights (safetensors) into a model of the same architecture."""
    sd = io.load_state_dict(path)
    try:
        unwrap(model).load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0][:160]
        raise io.ArtifactError(
            f"{path} does not fit this model ({first}); it was saved from another architecture or bit length"
        ) from None


def make_train_loader(dataset: Dataset, batch_size: int, *, seed: int, num_workers: int = 0) -> DataLoader:
    """Shuffled, drop-last loader, sharded under torch.distributed; ``batch_size`` is per worker."""
    rank, world = world_info()
    if len(dataset) < batch_size * world:
        raise ValueError(
            f"training set has {len(dataset)} images, fewer than one global batch ({batch_size} x {world} workers); "
            "lower batch_size or add data"
        )
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    # a dataset with per-epoch state (the view bank's pairs) must be re-sent to loader processes every epoch
    persistent = num_workers > 0 and not hasattr(dataset, "set_epoch")
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=num_workers,
                      persistent_workers=persistent)


@torch.no_grad()
def encode_dataset(model: HashingModel, dataset: Dataset, *, batch_size: int = 256, device: torch.device | str = "cpu",
                   bits: int | None = None, num_workers: int = 0, features: bool = False) -> np.ndarray:
    """Encode ``(image, position)`` items -> int8 codes (N, bits) in position order; ``features=True``:
    the backbone's float32 outputs (N, D) instead. Under torch.distributed each rank encodes every
    ``world``-th item and every rank gets all the rows."""
    model = unwrap(model)
    rank, world = world_info()
    n = len(dataset)
    per_rank = math.ceil(n / world)
    subset = torch.utils.data.Subset(dataset, range(rank, n, world))
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    if features:
        was_training = model.training
        model.eval()
        try:
            chunks = [model.features(x.to(device, non_blocking=True)).float().flatten(1).cpu() for x, _ in loader]
        finally:
            model.train(was_training)
    else:
        chunks = [model.encode(x.to(device, non_blocking=True), bits=bits).cpu() for x, _ in loader]
    dtype = torch.float32 if features else torch.int8
    width = chunks[0].shape[1] if chunks else (bits or model.bits[-1])
    local = torch.cat(chunks) if chunks else torch.zeros((0, width), dtype=dtype)
    if world == 1:
        return local.numpy()
    pad = torch.zeros((per_rank - local.shape[0], width), dtype=dtype)
    gathered = gather_no_grad(torch.cat([local, pad]).to(torch.float32)).to(dtype)
    # rank r's i-th row is position i * world + r: interleave the ranks' blocks, drop the padding
    return gathered.view(world, per_rank, width).transpose(0, 1).reshape(-1, width)[:n].numpy()


def _float_tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.float()
    return torch.from_numpy(np.array(x, dtype=np.float32))  # a writable copy


@torch.no_grad()
def encode_features(model: HashingModel, features: np.ndarray | torch.Tensor, *, batch_size: int = 1024,
                    device: torch.device | str = "cpu", bits: int | None = None) -> np.ndarray:
    """:func:`encode_dataset` from an exact cache of the frozen-backbone features (N, D): int8 codes (N, bits)."""
    model = unwrap(model)
    L = bits or model.bits[-1]
    # chunk by chunk: a memory-mapped cache is read-only and may not fit in memory as one tensor
    chunks = [model.encode_features(_float_tensor(features[i:i + batch_size]).to(device), bits=bits).cpu()
              for i in range(0, len(features), batch_size)]
    return (torch.cat(chunks) if chunks else torch.zeros((0, L), dtype=torch.int8)).numpy()


ReportFn = Callable[[dict[str, Any], "Path | None"], None]


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def format_progress(tag: str, epoch: int, epochs: int, metrics: Mapping[str, Any], eta_s: float,
                    step: tuple[int, int] | None = None) -> str:
    """The one-line progress of an epoch, or with ``step=(done, total)`` of a step inside it (no mAP)."""
    # per-length NHL terms ("loss/contrastive/16") hold a second "/": the NHL part summarises them
    losses = " ".join(f"{k[5:]}={metrics[k]:.4f}" for k in sorted(metrics)
                      if k.startswith("loss/") and not k.startswith("loss/stat_") and "/" not in k[5:])
    weights = [(int(k.rsplit("/", 1)[1]), metrics[k]) for k in metrics if k.startswith("loss/nhl/weight/")]
    if weights:
        w = ",".join(f"{v:.2f}" for _, v in sorted(weights))
        losses += f" nhl: base={metrics.get('loss/nhl/base', float('nan')):.4f} " \
                  f"cascade={metrics.get('loss/nhl/cascade', float('nan')):.4f} w=[{w}]"
    maps = " ".join(f"{k}={metrics[k]:.4f}" for k in ("map", "map_symmetric", "map_asymmetric") if k in metrics)
    ips = metrics.get("images_per_second", float("nan"))
    where = f"epoch {epoch}/{epochs}" + (f" step {step[0]}/{step[1]}" if step else "")
    middle = losses if step else f"{losses} | {maps or 'no validation'}"
    return f"[{tag}] {where} | {middle} | {ips:.1f} img/s | ETA {_fmt_eta(eta_s)}"


class Task:
    """One trainable thing (teacher or student) the loop drives: subclasses implement ``train_step(batch)`` and
    ``validate()``. ``selection`` lists the metrics (higher is
    better) that each keep a best checkpoint; ``nhl`` (NHLConfig, mapping or None) serves nested models."""

    selection: tuple[str, ...] = ()
    tag = "task"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device | str = "cpu",
                 bf16: bool = False, nhl: Any = None):
        self.model = model
        self.optimizer = optimizer
        self.device = torch.device(device)
        self.bf16 = bf16
        self.step = 0
        self.bits = list(getattr(unwrap(model), "bits", None) or [])
        self.nested = len(self.bits) > 1
        self.nhl = _nhl_options(nhl) if self.nested else None

    def autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def best_weights(self) -> dict[str, torch.Tensor]:
        return full_weights(self.model)

    def _maps(self, query: np.ndarray, database: np.ndarray, name: str) -> dict[str, float]:
        """``name`` = mAP of the codes; nested: per length (``name@L``) and their mean."""
        es = self.eval_sets
        if self.nested:  # encoded once at Lmax; every length is a prefix
            return nested_maps(query, database, es.query_labels, es.database_labels, es.topk, self.bits, name)
        return {name: mean_average_precision(query, database, es.query_labels, es.database_labels, es.topk)}

    def _optimise(self, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> dict[str, float]:
        self.step += 1
        if not torch.isfinite(loss):
            values = {k: float(v) for k, v in terms.items()}
            raise NonFiniteLossError(
                f"[{self.tag}] loss is {float(loss)} at step {self.step} (terms {values}); likely cause: learning rate "
                "too high or temperature too low; lower optim.lr / raise optim.temperature and re-run (best checkpoint "
                "kept)"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {f"loss/{k}": float(v.detach()) for k, v in terms.items()} | {"loss/total": float(loss.detach())}


def fit(
    task: Task,
    loader: DataLoader,
    *,
    epochs: int,
    validate_every: int,
    patience: int,
    checkpoint_root: Path,
    resume_from: Path | None = None,
    report: ReportFn | None = None,
    max_steps_per_epoch: int | None = None,
    progress: Callable[[str], None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
    log_every: int = 0,
) -> LoopState:
    """Run (or continue from ``resume_from``) the epoch loop with validation, early stopping and checkpoints.

    Every validation writes ``checkpoint_root/epoch=NNNN`` (rank 0) and calls ``report(metrics, folder)`` on
    every rank (Ray's ``train.report`` is a barrier). ``on_step(epoch, step)`` runs before every step (fault
    injection); ``progress`` gets a line per epoch and per ``log_every`` steps (rank 0).
    """
    rank, _ = world_info()
    say = progress if rank == 0 else None
    loop = LoopState()
    if resume_from is not None:
        loop = load_state(resume_from, task.model, task.optimizer)
        if say:
            say(f"[{task.tag}] resuming after epoch {loop.epoch} from {resume_from}")
    previous, first, start = resume_from, loop.epoch, time.perf_counter()
    while loop.epoch < epochs and not loop.stopped_early:
        epoch = loop.epoch + 1
        metrics = _train_epoch(task, loader, epoch, epochs, max_steps_per_epoch, on_step, log_every, say)
        loop.epoch = epoch
        validated = epoch % validate_every == 0 or epoch == epochs
        ckpt_dir = None
        if validated:
            ckpt_dir = Path(checkpoint_root) / f"epoch={epoch:04d}"
            val, new_best = _validate(task, loop, epoch, patience, rank)
            metrics.update(val)
            loop.history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
            if rank == 0:
                save_state(ckpt_dir, task.model, task.optimizer, loop, new_best, previous=previous)
            previous = ckpt_dir
        eta = (time.perf_counter() - start) / (epoch - first) * (epochs - epoch)
        if say:
            say(format_progress(task.tag, epoch, epochs, metrics, 0 if loop.stopped_early else eta))
            if loop.stopped_early:
                say(f"[{task.tag}] early stop: no improvement in {patience} validations; best {loop.best}")
        if report is not None and validated:
            report(metrics, ckpt_dir if rank == 0 else None)
    return loop


def _train_epoch(task: Task, loader: DataLoader, epoch: int, epochs: int, max_steps: int | None,
                 on_step: Callable[[int, int], None] | None, log_every: int,
                 say: Callable[[str], None] | None) -> dict[str, Any]:
    """One pass over ``loader``: the mean of every loss term, images/s and seconds."""
    _, world = world_info()
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    if hasattr(loader.dataset, "set_epoch"):  # the view bank's pairs of this epoch
        loader.dataset.set_epoch(epoch)
    task.model.train()
    total = len(loader) if max_steps is None else min(len(loader), max_steps)
    t0 = time.perf_counter()
    sums: dict[str, float] = {}
    steps = images = 0
    for step, batch in enumerate(loader):
        if max_steps is not None and step >= max_steps:
            break
        if on_step is not None:
            on_step(epoch, step)
        for k, v in task.train_step(batch).items():
            sums[k] = sums.get(k, 0.0) + v
        steps += 1
        images += int(batch[0].shape[0]) * world
        if say and log_every > 0 and steps % log_every == 0 and steps < total:
            dt = time.perf_counter() - t0
            running = {k: v / steps for k, v in sums.items()} | {"images_per_second": images / max(dt, 1e-9)}
            eta = dt / steps * (total - steps + total * (epochs - epoch))
            say(format_progress(task.tag, epoch, epochs, running, eta, step=(steps, total)))
    dt = time.perf_counter() - t0
    metrics: dict[str, Any] = {k: v / max(steps, 1) for k, v in sums.items()}
    metrics.update(epoch=epoch, images_per_second=images / max(dt, 1e-9), epoch_seconds=dt)
    return metrics


def _validate(task: Task, loop: LoopState, epoch: int, patience: int,
              rank: int) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """Validate and update ``loop``'s bests and early-stopping count: the metrics with ``best_*``, and the
    new best weights (rank 0)."""
    val = task.validate()
    new_best: dict[str, dict[str, torch.Tensor]] = {}
    improved_any = False
    for key in task.selection:
        if key in val and val[key] > loop.best.get(key, -math.inf):
            loop.best[key], loop.best_epoch[key] = float(val[key]), epoch
            improved_any = True
            if rank == 0:
                new_best[key] = task.best_weights()
    loop.bad_validations = 0 if improved_any else loop.bad_validations + 1
    loop.stopped_early = loop.bad_validations >= patience
    return {**val, **{f"best_{k}": v for k, v in loop.best.items()}}, new_best


def latest_checkpoint(checkpoint_root: Path) -> Path | None:
    """The newest complete checkpoint folder under ``checkpoint_root`` (one with ``state.json``)."""
    done = sorted(p for p in Path(checkpoint_root).glob("epoch=*") if (p / STATE_META).exists())
    return done[-1] if done else None


def _nhl_options(nhl: Any) -> dict[str, Any]:
    """The keyword switches of ``nested_objective`` from an ``NHLConfig``, a mapping or ``None`` (defaults)."""
    return asdict(NHLConfig(**nhl) if isinstance(nhl, Mapping) else nhl or NHLConfig())


def nested_grad_reducer() -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``nested_objective``'s ``grad_reducer``: a SUM all-reduce under torch.distributed (every worker then
    derives the same adaptive weights from the global-batch gradients), ``None`` in one process."""
    return all_reduce_sum if is_distributed() else None


_NHL_TERM_NAMES = {"base": "nhl/base", "distill": "nhl/cascade", "weight": "nhl/weight", "conflicts": "nhl/conflicts"}


def nested_training_loss(per_length_losses: list[torch.Tensor], per_length_terms: list[Mapping[str, torch.Tensor]],
                         real_outputs: torch.Tensor, model: nn.Module, bits: list[int],
                         nhl: Any = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Combine a nested model's per-length losses with :func:`brcd.losses.nhl.nested_objective`: the cascade
    compares prefixes of ``real_outputs`` (N, Lmax, the head's pre-sign outputs); the adaptive weights read
    the head's last linear weight. Terms (detached): each per-length term as ``<name>/<L>`` and NHL's
    ``nhl/base[/<L>]``, ``nhl/cascade[/<L>]``, ``nhl/weight/<L>``, ``nhl/conflicts``.
    """
    loss, raw = nested_objective(
        per_length_losses, real_outputs, shared_weight=unwrap(model).head.last_linear.weight, bits=bits,
        grad_reducer=nested_grad_reducer(), **_nhl_options(nhl),
    )
    terms: dict[str, torch.Tensor] = {}
    for L, t in zip(bits, per_length_terms):
        terms.update({f"{k}/{L}": v.detach() for k, v in t.items() if k != "total"})
    for k, v in raw.items():
        head, _, tail = k.partition("/")
        if head in _NHL_TERM_NAMES:
            terms[_NHL_TERM_NAMES[head] + (f"/{tail}" if tail else "")] = v
    return loss, terms


def nested_maps(query: np.ndarray, database: np.ndarray, query_labels: np.ndarray, database_labels: np.ndarray,
                topk: int | None, bits: list[int], name: str) -> dict[str, float]:
    """``{name}@L`` = mAP of the L-bit prefixes of (N, Lmax) codes for each L in ``bits``; ``{name}`` = their mean."""
    out = {
        f"{name}@{L}": mean_average_precision(np.ascontiguousarray(query[:, :L]), np.ascontiguousarray(database[:, :L]),
                                              query_labels, database_labels, topk)
        for L in bits
    }
    out[name] = float(np.mean([out[f"{name}@{L}"] for L in bits]))
    return out


@dataclass
class EvalSets:
    """Validation data: query images, database images, and their labels (multi-hot)."""

    query: Dataset
    database: Dataset
    query_labels: np.ndarray
    database_labels: np.ndarray
    topk: int | None = 1000
    batch_size: int = 256
    # exact caches of the validated model's frozen-backbone features (N, D), when it has one
    query_features: np.ndarray | None = None
    database_features: np.ndarray | None = None

    def encode(self, model: nn.Module, device: torch.device | str) -> tuple[np.ndarray, np.ndarray]:
        """Codes of the queries and the database: from the feature caches when given, else the images."""
        if self.query_features is not None and self.database_features is not None:
            return (encode_features(model, self.query_features, device=device),
                    encode_features(model, self.database_features, device=device))
        return (encode_dataset(model, self.query, batch_size=self.batch_size, device=device),
                encode_dataset(model, self.database, batch_size=self.batch_size, device=device))


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    params = [p for p in unwrap(model).parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; unfreeze the backbone or add a head")
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


class TeacherTask(Task):
    """Unsupervised teacher (CIBHash objective: NT-Xent over codes + beta * symmetric Bernoulli KL)."""

    selection = ("map",)
    tag = "teacher"

    def __init__(self, model, optimizer, eval_sets: EvalSets, *, temperature: float, kl_weight: float,
                 bank: Any = None, **kw):
        super().__init__(model, optimizer, **kw)
        self.eval_sets = eval_sets
        # a brcd.bank.ViewBank of the frozen backbone's features: batches end with (position, view a1, view a2)
        self.bank = bank
        if bank is not None and "teacher_features" not in bank:
            raise ValueError("the teacher's view bank holds no teacher_features; build it with a frozen teacher backbone")
        self.temperature = temperature
        self.kl_weight = kl_weight

    def train_step(self, batch) -> dict[str, float]:
        B = batch[0].shape[0]
        if self.bank is not None:
            pos, a1, a2 = batch[-3:]
            feats = torch.cat([self.bank.take("teacher_features", pos, a1), self.bank.take("teacher_features", pos, a2)])
            with self.autocast():
                out = self.model(feats.to(self.device, non_blocking=True), from_features=True)
        else:
            both = torch.cat([batch[0], batch[1]]).to(self.device, non_blocking=True)
            with self.autocast():
                out = self.model(both)  # one forward over both views (one DDP pass)
        L = out.logits.shape[1]
        logits = gather_with_grad(torch.cat([out.logits[:B], out.logits[B:]], dim=1).float())
        codes = gather_with_grad(torch.cat([out.codes[:B], out.codes[B:]], dim=1).float())
        args = (logits[:, :L], logits[:, L:], codes[:, :L], codes[:, L:])
        options = {"temperature": self.temperature, "kl_weight": self.kl_weight}
        if not self.nested:
            return self._optimise(*teacher_objective(*args, **options))
        # CIBHash on every length's prefixes, combined by NHL (cascade on both views' outputs)
        losses, terms = per_length(teacher_objective, prefix_args(self.bits, *args), **options)
        outputs = torch.cat(args[:2])
        return self._optimise(*nested_training_loss(losses, terms, outputs, self.model, self.bits, self.nhl))

    def validate(self) -> dict[str, float]:
        return self._maps(*self.eval_sets.encode(self.model, self.device), "map")


class LengthBatch(NamedTuple):
    """One code length's part of a distillation step (the global batch): what an objective receives. The
    cluster fields are set for ``needs_clusters`` objectives, ``assigned`` for ``shares_assignment`` ones."""

    student_logits1: torch.Tensor  # (B, L) pre-sign outputs of view 1, with gradient
    student_logits2: torch.Tensor
    student_codes1: torch.Tensor  # (B, L) straight-through codes
    student_codes2: torch.Tensor
    teacher_logits1: torch.Tensor  # frozen teacher, view 1
    teacher_codes1: torch.Tensor
    teacher_codes2: torch.Tensor  # view 2
    pseudo_labels: torch.Tensor | None = None  # (B,) cluster of each image
    masks: torch.Tensor | None = None  # (K, L) bit masks of this length
    centroids: torch.Tensor | None = None  # (K, L): the first L columns of the centroids
    assigned: torch.Tensor | None = None  # (B,) ĉ' from the longest teacher view-2 code, the same at every length


class Objective(Protocol):
    """A distillation objective: the student's whole loss at one code length (``brcd.builders``)."""

    needs_clusters: bool
    shares_assignment: bool

    def __call__(self, batch: LengthBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


class DistillTask(Task):
    """Student distillation from a frozen teacher: ``objective`` on every code length's prefixes, combined by
    NHL. ``pseudo_labels`` (N,), ``centroids`` (K, Lmax) and ``masks_by_length`` (``{L: (K, L)}``) come from
    the cluster artifact."""

    selection = ("map_symmetric", "map_asymmetric")
    tag = "distill"

    def __init__(self, student, optimizer, teacher: HashingModel, eval_sets: EvalSets, *, objective: Objective,
                 teacher_db_codes: np.ndarray, pseudo_labels: np.ndarray | None = None,
                 centroids: np.ndarray | None = None, masks_by_length: Mapping[int, np.ndarray] | None = None,
                 bank: Any = None, **kw):
        super().__init__(student, optimizer, **kw)
        # a brcd.bank.ViewBank of the teacher's outputs (and frozen student features) per view
        self.bank = bank
        if bank is not None and "teacher_logits" not in bank:
            raise ValueError("the distillation view bank holds no teacher_logits; rebuild it for distillation")
        self.teacher = teacher.eval().requires_grad_(False)
        self.eval_sets = eval_sets
        self.teacher_db_codes = teacher_db_codes
        self.objective = objective
        t_bits = list(unwrap(teacher).bits)
        if t_bits != self.bits:
            raise ValueError(f"distillation needs the teacher's code lengths {t_bits} to equal the student's {self.bits}")
        self.pseudo = self.centroids = None
        self.masks_by_length: dict[int, torch.Tensor] = {}
        if objective.needs_clusters:
            if pseudo_labels is None or centroids is None or masks_by_length is None:
                raise ValueError("BRCD needs a cluster artifact (pseudo-labels, masks, centroids); run `brcd clusters` first")
            self.pseudo = torch.tensor(np.asarray(pseudo_labels), dtype=torch.long)
            # copies: arrays from Ray's object store are read-only and torch warns on every worker
            self.centroids = torch.tensor(np.asarray(centroids), dtype=torch.float32, device=self.device)
            self.masks_by_length = self._length_masks(masks_by_length)

    def _length_masks(self, given: Mapping[int, Any]) -> dict[int, torch.Tensor]:
        given = {int(k): v for k, v in given.items()}
        k = self.centroids.shape[0]
        out: dict[int, torch.Tensor] = {}
        for L in self.bits:
            if L not in given:
                raise ValueError(f"masks_by_length lacks the {L}-bit masks (has {sorted(given)})")
            m = torch.tensor(np.asarray(given[L]), dtype=torch.float32, device=self.device)
            if tuple(m.shape) != (k, L):
                raise ValueError(f"masks_by_length[{L}] has shape {tuple(m.shape)}, expected ({k}, {L})")
            out[L] = m
        return out

    def _bank_forward(self, batch):
        pos, a1, a2 = batch[-3:]
        bank = self.bank
        t = bank.teacher_output(torch.cat([pos, pos]), torch.cat([a1, a2]))
        t = type(t)(*(x.to(self.device, non_blocking=True) for x in (t.logits, t.probs, t.codes)))
        with self.autocast():
            if "student_features" in bank:
                feats = torch.cat([bank.take("student_features", pos, a1), bank.take("student_features", pos, a2)])
                s = self.model(feats.to(self.device, non_blocking=True), from_features=True)
            else:  # a trainable student backbone sees the regenerated views live
                s = self.model(torch.cat([batch[0], batch[1]]).to(self.device, non_blocking=True))
        return pos, t, s

    def train_step(self, batch) -> dict[str, float]:
        B = batch[0].shape[0]
        if self.bank is not None:
            pos, t, s = self._bank_forward(batch)
        else:
            both = torch.cat([batch[0], batch[1]]).to(self.device, non_blocking=True)
            pos = batch[2]
            with torch.no_grad(), self.autocast():
                t = self.teacher(both)
            with self.autocast():
                s = self.model(both)
        t1, t2, s1, s2 = t.slice(0, B), t.slice(B, 2 * B), s.slice(0, B), s.slice(B, 2 * B)
        L = s1.logits.shape[1]
        s = gather_with_grad(torch.cat([s1.logits, s2.logits, s1.codes, s2.codes], dim=1).float())
        sl1, sl2, sc1, sc2 = s[:, :L], s[:, L:2 * L], s[:, 2 * L:3 * L], s[:, 3 * L:]
        t = gather_no_grad(torch.cat([t1.logits, t1.codes, t2.codes], dim=1).float())
        tl1, tc1, tc2 = t[:, :L], t[:, L:2 * L], t[:, 2 * L:]
        loss, terms = self._loss(sl1, sl2, sc1, sc2, tl1, tc1, tc2, pos)
        return self._optimise(loss, terms)

    def _loss(self, sl1, sl2, sc1, sc2, tl1, tc1, tc2, pos) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The objective on every length's prefixes (several combined by NHL). Pseudo-labels and ĉ' are
        computed once per batch, so every length agrees on which views left their cluster."""
        pseudo = assigned = None
        if self.objective.needs_clusters:
            pseudo = gather_no_grad(self.pseudo[pos].to(self.device).float()).long()
            if self.objective.shares_assignment:
                assigned = nearest_centroid(tc2, self.centroids)
        losses, terms = [], []
        for L, parts in zip(self.bits, prefix_args(self.bits, sl1, sl2, sc1, sc2, tl1, tc1, tc2)):
            clusters = () if pseudo is None else (pseudo, self.masks_by_length[L], self.centroids[:, :L], assigned)
            loss, t = self.objective(LengthBatch(*parts, *clusters))
            losses.append(loss)
            terms.append(t)
        if not self.nested:
            return losses[0], terms[0]
        return nested_training_loss(losses, terms, torch.cat([sl1, sl2]), self.model, self.bits, self.nhl)

    def validate(self) -> dict[str, float]:
        q, db = self.eval_sets.encode(self.model, self.device)
        asymmetric = self._maps(q, np.asarray(self.teacher_db_codes), "map_asymmetric")  # teacher codes cut alike
        return {**self._maps(q, db, "map_symmetric"), **asymmetric}


def encode_throughput(models: Mapping[str, HashingModel], image_size: int, *, batch_size: int = 32,
                      rounds: int = 5, min_seconds: float = 0.25, device: torch.device | str = "cpu") -> dict[str, float]:
    """Encode throughput (images/s) of several models taking turns for ``rounds`` rounds of at least
    ``min_seconds``; each keeps its best round, so a burst of load on a shared machine does not decide the ratio."""
    x = torch.randn(batch_size, 3, image_size, image_size, device=device)
    nets = {name: unwrap(m).eval() for name, m in models.items()}
    best = dict.fromkeys(nets, 0.0)
    for net in nets.values():
        net.encode(x)  # warm-up: allocator, lazy init, oneDNN kernel choice
    for _ in range(rounds):
        for name, net in nets.items():
            n, t0, elapsed = 0, time.perf_counter(), 0.0
            while elapsed < min_seconds:
                net.encode(x)
                n += batch_size
                elapsed = time.perf_counter() - t0
            best[name] = max(best[name], n / elapsed)
    return best

