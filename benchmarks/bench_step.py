"""Benchmark 3: one BRCD distillation training step on CPU, project vs naive implementations.

Same teacher, same student, same batch, same cluster artifact, same optimizer (Adam on the
student head); only the way the step is computed differs:

- **project**: :meth:`brcd.engine.DistillTask.train_step`: frozen teacher under ``no_grad``,
  student backbone frozen and run under ``no_grad`` (:meth:`brcd.models.nets.HashingModel.features`),
  channels_last for the CNN student, autograd only through the hash head, one forward over both
  views (2B images) per network, vectorised :func:`brcd.losses.brcd_loss`.
- **naive** (what the brief calls the naive step): plain modules with autograd enabled through
  the frozen networks (backbone parameters have ``requires_grad=False`` but the images do, so the
  whole input graph is built and the student's backward runs through its backbone), no
  channels_last, two separate forwards (one per view) per network, and the loop-based BRCD loss
  below (per-sample centroid assignment, per-row mask / false-negative construction, per-row
  cross-entropy), written after the public code's structure.
- **public-code-like** (an extra, honest reference): as naive, but the teacher runs under
  ``no_grad`` and the images do not require grad, so, as in the public code, autograd builds no
  graph through the frozen backbones. The gap to this one is what the vectorised loss, the single
  forward and channels_last buy; the gap to *naive* adds the cost of autograd through frozen nets.

All three start from identical head weights and see the same batches, so their loss values must
agree (asserted; printed). Steps are timed in interleaved rounds (order rotated every round) and
the best and median round of each are reported with the load average during the measurement.

Usage: ``python -m benchmarks.bench_step [--quick] [--image-size 160] [--batch-size 16] [--threads 1 --timer cpu]``
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

BENCH = "bench_step: distillation training step (DistillTask.train_step vs naive)"


@dataclass
class StepSetup:
    """Models and sizes of one benchmark configuration."""

    teacher: str = "vit_tiny_patch16_224"
    student: str = "efficientnet_b0"
    image_size: int = 160
    batch_size: int = 16
    bits: int = 64
    clusters: int = 10
    hidden_dim: int = 1000
    teacher_kwargs: dict = field(default_factory=dict)
    student_kwargs: dict = field(default_factory=dict)


#: ``--quick``: timm's test models at 64 px (seconds, not minutes).
QUICK = StepSetup(teacher="test_vit", student="test_efficientnet", image_size=64, batch_size=8, bits=32, clusters=4,
                  hidden_dim=64)
#: Full run: paper-like pair (ViT teacher, EfficientNet-B0 student, MLP head 1280 -> 1000 -> 64) at a size
#: that 2 shared CPU cores step through in seconds. Override with --teacher/--student/--image-size/--batch-size.
FULL = StepSetup()


# --------------------------------------------------------------------------------------------
# The loop-based BRCD loss (the public code's structure, the intended semantics)
# --------------------------------------------------------------------------------------------


def loop_brcd_loss(student_codes: torch.Tensor, teacher_codes: torch.Tensor, teacher_aug_codes: torch.Tensor,
                   pseudo_labels: torch.Tensor, masks: torch.Tensor, centroids: torch.Tensor, *,
                   temperature: float = 0.3, alpha: float = 0.8) -> torch.Tensor:
    """BRCD loss with per-sample / per-row Python loops (public-code style, intended rule).

    Same definition as :func:`brcd.losses.brcd_loss` with every switch on (mask, false negatives,
    offset positives, both positive terms): masked codes in Z, ĉ'_k = nearest centroid of the
    *unmasked* t'_k, α_k = 1 when ĉ'_k ≠ c_k, false negatives get −1000 added (exp underflows to
    exactly 0, i.e. removed), cross-entropy averaged over the 2B rows. Written independently of the
    project's loss so the two can be checked against each other.
    """
    s = student_codes.float()
    t = teacher_codes.detach().float()
    tp = teacher_aug_codes.detach().float()
    b = s.shape[0]
    n = 2 * b
    labels = [int(c) for c in pseudo_labels]

    # per-sample nearest-centroid assignment of the teacher's view-2 code
    assigned = []
    mu = centroids.double()
    for k in range(b):
        d = ((tp[k].double()[None, :] - mu) ** 2).sum(dim=1)
        assigned.append(int(torch.argmin(d)))

    # per-row mask construction (each row gets the mask of its image's cluster)
    row_masks = torch.stack([masks[labels[k]].float() for k in range(b)])
    z = torch.cat([s * row_masks, tp * row_masks], dim=0)
    sim = F.cosine_similarity(z.unsqueeze(1), z.unsqueeze(0), dim=2)  # (2B, 2B)

    # per-pair positives, with the offset-positive filter
    positives = []
    for k in range(b):
        a_k = 1.0 if assigned[k] != labels[k] else alpha
        individual = F.cosine_similarity(s[k:k + 1], t[k:k + 1], dim=1)[0]
        structural = sim[k, k + b]
        positives.append((a_k * individual + (1.0 - a_k) * structural) / temperature)

    # per-row false-negative mask and cross-entropy
    column_labels = labels + assigned  # student columns: c_b; teacher-view columns: ĉ'_b
    row_losses = []
    for a in range(n):
        k = a % b
        partner = (a + b) % n
        penalty = torch.zeros(n)
        keep = []
        for col in range(n):
            if col == a or col == partner:
                continue
            keep.append(col)
            if column_labels[col] == labels[k]:
                penalty[col] = -1000.0
        keep_idx = torch.tensor(keep)
        negatives = sim[a, keep_idx] / temperature + penalty[keep_idx]
        pos = positives[k]
        row = torch.cat([pos.view(1), negatives])
        row_losses.append(-pos + torch.logsumexp(row, dim=0))
    return torch.stack(row_losses).mean()


# --------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------


def synthetic_clusters(clusters: int, bits: int, n_images: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A plausible cluster artifact: centroids = per-bit means of ±1 codes (agreement varies per bit),
    margin-0.5 masks (about half the bits kept), a pseudo-label per training position."""
    rng = np.random.default_rng(seed)
    centres = np.where(rng.random((clusters, bits)) < 0.5, -1.0, 1.0)
    flip = rng.uniform(0.0, 0.5, (clusters, bits))
    centroids = (centres * (1.0 - 2.0 * flip)).astype(np.float32)
    masks = (np.abs(centroids) > 0.5).astype(np.float32)
    labels = rng.integers(0, clusters, n_images).astype(np.int64)
    return {"centroids": centroids, "masks": masks, "labels": labels}


def build_models(setup: StepSetup, seed: int = 0):
    """(teacher, student) with the project's defaults (frozen backbones, channels_last CNN student)."""
    from brcd.config import ModelConfig
    from brcd.models.nets import create_hashing_model

    torch.manual_seed(seed)
    teacher = create_hashing_model(ModelConfig(backbone=setup.teacher, bits=setup.bits, head="linear",
                                               freeze_backbone=True, model_kwargs=dict(setup.teacher_kwargs)))
    torch.manual_seed(seed + 1)
    student = create_hashing_model(ModelConfig(backbone=setup.student, bits=setup.bits, head="mlp",
                                               hidden_dim=setup.hidden_dim, freeze_backbone=True, channels_last=True,
                                               model_kwargs=dict(setup.student_kwargs)))
    return teacher.eval(), student.train()


def _teacher_kwargs(setup: StepSetup) -> StepSetup:
    """ViTs get ``img_size`` so that non-224 image sizes work (random init: nothing to resize)."""
    if "vit" in setup.teacher and "img_size" not in setup.teacher_kwargs:
        setup = copy.deepcopy(setup)
        setup.teacher_kwargs["img_size"] = setup.image_size
    return setup


class NaiveStep:
    """The naive / public-code-like step on its own copy of the student (same initial weights)."""

    def __init__(self, student, teacher, clusters: dict[str, np.ndarray], *, input_graph: bool, lr: float = 1e-3,
                 temperature: float = 0.3, alpha: float = 0.8, kl_weight: float = 1e-3):
        self.student = copy.deepcopy(student)
        # plain modules: undo channels_last (the public code uses default NCHW tensors)
        self.student.backbone.to(memory_format=torch.contiguous_format)
        self.student.channels_last = False
        self.student.train()
        self.teacher = teacher
        self.optimizer = torch.optim.Adam([p for p in self.student.parameters() if p.requires_grad], lr=lr)
        self.input_graph = input_graph
        self.labels = torch.as_tensor(clusters["labels"])
        self.masks = torch.as_tensor(clusters["masks"])
        self.centroids = torch.as_tensor(clusters["centroids"])
        self.temperature, self.alpha, self.kl_weight = temperature, alpha, kl_weight

    def _forward(self, model, images: torch.Tensor):
        # No no_grad, no HashingModel.features: the backbone runs as a plain module with autograd on.
        x = images.clone().requires_grad_(self.input_graph)
        return model.forward_features(model.backbone(x))

    def __call__(self, batch) -> float:
        from brcd.losses import teacher_objective

        v1, v2, pos = batch
        if self.input_graph:
            t1, t2 = self._forward(self.teacher, v1), self._forward(self.teacher, v2)  # graph built, never used
        else:
            with torch.no_grad():  # the public code's teacher
                t1, t2 = self._forward(self.teacher, v1), self._forward(self.teacher, v2)
        s1, s2 = self._forward(self.student, v1), self._forward(self.student, v2)  # two forwards
        own, _ = teacher_objective(s1.logits, s2.logits, s1.codes, s2.codes, self.temperature, self.kl_weight)
        kd = loop_brcd_loss(s1.codes, t1.codes.detach(), t2.codes.detach(), self.labels[pos], self.masks,
                            self.centroids, temperature=self.temperature, alpha=self.alpha)
        loss = own + kd
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


def project_step_fn(student, teacher, clusters: dict[str, np.ndarray], *, lr: float = 1e-3):
    """``batch -> loss`` running :meth:`brcd.engine.DistillTask.train_step` (the project's step)."""
    from brcd.builders import build_objective
    from brcd.config import DistillConfig
    from brcd.engine import DistillTask, EvalSets

    empty = torch.utils.data.TensorDataset(torch.zeros(1, 3, 8, 8), torch.zeros(1, dtype=torch.long))
    eval_sets = EvalSets(empty, empty, np.eye(1, dtype=np.float32), np.eye(1, dtype=np.float32), topk=None)
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr)
    task = DistillTask(student, optimizer, teacher, eval_sets, teacher_db_codes=np.ones((1, student.bits[-1]), np.int8),
                       objective=build_objective(DistillConfig()), pseudo_labels=clusters["labels"],
                       centroids=clusters["centroids"], masks_by_length={student.bits[-1]: clusters["masks"]})
    student.train()
    return lambda batch: task.train_step(batch)["loss/total"]


def _loss_microbench(bits: int, clusters: int, batch_sizes: tuple[int, ...], repeats: int, timer: str = "wall") -> list[dict]:
    """Forward + backward of the BRCD loss alone: vectorised vs loops, same inputs, same value."""
    from brcd.losses import brcd_loss

    rows = []
    for b in batch_sizes:
        g = torch.Generator().manual_seed(b)
        art = synthetic_clusters(clusters, bits, b, seed=b)
        logits = torch.randn(b, bits, generator=g)
        t = torch.where(torch.randn(b, bits, generator=g) >= 0, 1.0, -1.0)
        tp = torch.where(torch.rand(b, bits, generator=g) < 0.85, t, -t)
        labels = torch.as_tensor(art["labels"])
        masks, centroids = torch.as_tensor(art["masks"]), torch.as_tensor(art["centroids"])

        def vec():
            s = logits.clone().requires_grad_(True)
            loss, _ = brcd_loss(s, t, tp, labels, masks, centroids, temperature=0.3, alpha=0.8)
            loss.backward()
            return float(loss.detach())

        def loop():
            s = logits.clone().requires_grad_(True)
            loss = loop_brcd_loss(s, t, tp, labels, masks, centroids, temperature=0.3, alpha=0.8)
            loss.backward()
            return float(loss.detach())

        best = {"vec": float("inf"), "loop": float("inf")}
        values = {}
        vec(), loop()  # warm-up
        inner = {"vec": 5, "loop": 1}  # the vectorised loss takes ~1 ms: time several calls per sample
        for _ in range(repeats):
            for key, fn in (("vec", vec), ("loop", loop)):
                clock = time.perf_counter if timer == "wall" else time.process_time
                t0 = clock()
                for _ in range(inner[key]):
                    values[key] = fn()
                best[key] = min(best[key], (clock() - t0) / inner[key])
        if not np.isclose(values["vec"], values["loop"], rtol=1e-5, atol=1e-6):
            raise AssertionError(f"BRCD loss mismatch at B={b}: vectorised {values['vec']!r} vs loop {values['loop']!r}")
        rows.append({"benchmark": BENCH, "name": f"BRCD loss alone, forward+backward, B={b}, {bits} bits: brcd_loss (vectorised)",
                     "value": best["vec"] * 1e3, "unit": "ms" if timer == "wall" else "CPU ms",
                     "ratio": best["loop"] / best["vec"],
                     "note": f"loop version {best['loop'] * 1e3:.1f} ms; ratio = loop / vectorised (best of {repeats}); "
                             f"loss {values['vec']:.6f} vs loop {values['loop']:.6f}"})
    return rows


# --------------------------------------------------------------------------------------------
# Benchmark
# --------------------------------------------------------------------------------------------


def run(quick: bool = False, repeats: int | None = None, setup: StepSetup | None = None,
        loss_batches: tuple[int, ...] | None = None, *, threads: int | None = None, timer: str = "wall") -> list[dict]:
    """Time the three steps in interleaved rounds; returns result rows.

    ``threads``: torch intra-op threads for the measurement (``None``: as set). ``timer``: what the
    ``value``/``ratio`` columns use, ``"wall"`` (wall-clock) or ``"cpu"`` (process CPU time: with
    ``threads=1`` the steady measure of work on a machine shared with other jobs); the other one is
    given in the note. Raises ``AssertionError`` when the loss values differ (rtol 1e-4): the
    implementations would then not compute the same objective and the timing would be meaningless.
    """
    from .report import check_timer, load_string, torch_threads

    check_timer(timer)
    setup = _teacher_kwargs(setup or (QUICK if quick else FULL))
    repeats = repeats if repeats is not None else (2 if quick else 3)
    loss_batches = loss_batches if loss_batches is not None else ((8,) if quick else (16, 64))
    with torch_threads(threads) as n_threads:
        return _run(setup, repeats, loss_batches, quick, timer, n_threads, load_string)


def _run(setup: StepSetup, repeats: int, loss_batches, quick: bool, timer: str, n_threads: int, load_string) -> list[dict]:
    B, S = setup.batch_size, setup.image_size
    art = synthetic_clusters(setup.clusters, setup.bits, B)
    teacher, student = build_models(setup)

    naive = NaiveStep(student, teacher, art, input_graph=True)
    public = NaiveStep(student, teacher, art, input_graph=False)
    project = project_step_fn(student, teacher, art)  # last: DistillTask freezes / evals the teacher in place
    steps = {"project": project, "naive": naive, "public": public}

    g = torch.Generator().manual_seed(123)

    def make_batch():
        return (torch.randn(B, 3, S, S, generator=g), torch.randn(B, 3, S, S, generator=g), torch.arange(B))

    # step 0 (warm-up) compares the losses from identical weights; later steps keep comparing
    # (identical updates keep the heads identical up to rounding).
    losses: dict[str, list[float]] = {k: [] for k in steps}
    wall: dict[str, list[float]] = {k: [] for k in steps}
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    batch = make_batch()
    for key, fn in steps.items():
        losses[key].append(fn(batch))
    load_before = load_string()
    t_start = time.perf_counter()
    order = list(steps)
    for r in range(repeats):
        batch = make_batch()
        for key in order[r % 3:] + order[:r % 3]:  # rotate the order every round
            w0, c0 = time.perf_counter(), time.process_time()
            losses[key].append(steps[key](batch))
            wall[key].append(time.perf_counter() - w0)
            cpu[key].append(time.process_time() - c0)
    elapsed = time.perf_counter() - t_start
    load_after = load_string()

    diffs = {}
    for key in ("naive", "public"):
        a, b = np.array(losses["project"]), np.array(losses[key])
        diffs[key] = float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-12)))
        if not np.allclose(a, b, rtol=1e-4, atol=1e-6):
            raise AssertionError(f"loss mismatch project vs {key}: {a.tolist()} vs {b.tolist()}")

    main_t, other_t = (wall, cpu) if timer == "wall" else (cpu, wall)
    other_name = "CPU time" if timer == "wall" else "wall-clock"
    best = {k: min(v) for k, v in main_t.items()}
    med = {k: statistics.median(v) for k, v in main_t.items()}
    obest = {k: min(v) for k, v in other_t.items()}
    unit = "ms/step" if timer == "wall" else "CPU ms/step"
    tag = (f"teacher {setup.teacher}, student {setup.student}, B={B} (2 views -> {2 * B} images/network), {S} px, "
           f"{setup.bits} bits, K={setup.clusters}")
    load = f"load {load_before} -> {load_after}; {n_threads} torch thread(s)"

    def other(key):
        return (f"{other_name} {obest[key] * 1e3:.0f} ms -> {other_name} ratio {obest[key] / obest['project']:.2f}")

    rows = [
        {"benchmark": BENCH, "name": f"project: DistillTask.train_step ({tag})", "value": best["project"] * 1e3,
         "unit": unit,
         "note": f"best of {repeats} interleaved rounds (median {med['project'] * 1e3:.0f} ms); {B / best['project']:.1f} "
                 f"training images per {'second' if timer == 'wall' else 'CPU-second'}; {other_name} "
                 f"{obest['project'] * 1e3:.0f} ms; {load}"},
        {"benchmark": BENCH, "name": "naive: autograd through frozen nets (images requires_grad), 1 forward per view, loop BRCD loss",
         "value": best["naive"] * 1e3, "unit": unit, "ratio": best["naive"] / best["project"],
         "note": f"ratio = naive / project = project speed-up (median ratio {med['naive'] / med['project']:.2f}); "
                 f"{other('naive')}; no channels_last"},
        {"benchmark": BENCH, "name": "public-code-like: teacher no_grad, no input graph, 1 forward per view, loop BRCD loss",
         "value": best["public"] * 1e3, "unit": unit, "ratio": best["public"] / best["project"],
         "note": f"ratio = public-like / project (median ratio {med['public'] / med['project']:.2f}); "
                 f"{other('public')}; no channels_last"},
        {"benchmark": BENCH, "name": "loss value, first step (identical weights): project vs naive vs public-like",
         "value": losses["project"][0], "unit": "", "project_loss": losses["project"][0],
         "naive_loss": losses["naive"][0], "public_loss": losses["public"][0],
         "note": f"naive {losses['naive'][0]:.7f}, public-like {losses['public'][0]:.7f}; max rel. diff over "
                 f"{len(losses['project'])} steps: naive {diffs['naive']:.1e}, public-like {diffs['public']:.1e}"},
    ]
    rows += _loss_microbench(setup.bits, setup.clusters, loss_batches, repeats=3 if quick else 5, timer=timer)
    rows.append({"benchmark": BENCH, "name": "timed section wall time", "value": elapsed, "unit": "s",
                 "note": f"{repeats} rounds x 3 steps after 1 warm-up step each; timer {timer}; {load}"})
    return rows


def main(argv: list[str] | None = None) -> None:
    from .report import THREADS, bench_main, timer_option

    def run_args(args) -> list[dict]:
        setup = copy.deepcopy(QUICK if args.quick else FULL)
        for key in ("teacher", "student", "image_size", "batch_size"):
            if getattr(args, key) is not None:
                setattr(setup, key, getattr(args, key))
        return run(args.quick, args.repeats, setup, threads=args.threads, timer=args.timer)

    bench_main(__doc__, run_args, argv,
               ("--repeats", {"type": int, "default": None, "help": "timed rounds (default 3; quick 2)"}),
               ("--teacher", {"default": None}), ("--student", {"default": None}),
               ("--image-size", {"type": int, "default": None}), ("--batch-size", {"type": int, "default": None}),
               THREADS, timer_option("clock of the value/ratio columns (cpu: process CPU time, steady with --threads 1 "
                                     "on a busy machine)"), quick_help="timm test models at 64 px, batch 8")

if __name__ == "__main__":
    main()
