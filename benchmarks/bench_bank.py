"""Benchmark: the view bank (frozen networks paid once) vs live augmentations.

1. **Cost of the paper's schedules on CPU** (random-initialised real architectures: frozen ViT-B/16
   teacher with a linear head, frozen EfficientNet-B0 student with an MLP head, 224 px, a few dozen
   images). Measured side by side in one run: a live distillation step (render 2 x B views, teacher
   and student backbone forwards, heads, loss, Adam), a bank step on the same batch (heads, loss,
   Adam), and the bank build per view (render + frozen forwards), timed in interleaved rounds (best
   of each). The cost of E epochs is composed
   from them: live = E x steps x live step; bank(A) = images x A x build per view + E x steps x bank
   step. Same for teacher training (E = 200, frozen ViT-B/16 + linear head). Running 400 live
   ViT-B/16 epochs on 2 cores would take hours; the unit costs are what the ratio needs.
2. **Equivalence**: the largest |loss difference| between a bank step and the live step on the same
   regenerated views (every loss term).
3. **Quality on the digits data** (full mode): teacher (trained backbone, live), then distillation of
   a frozen ``test_efficientnet`` student with live views and with banks of A in {4, 8, 16, 32}
   views, 3 seeds; symmetric and asymmetric mAP of each.

Usage: ``brcd bench --only bank [--quick]`` (section ``bench_bank`` of ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate

BENCH = "bench_bank: view bank vs live augmentations"


def _images(n: int, size: int) -> list[Image.Image]:
    g = np.random.default_rng(0)
    return [Image.fromarray(g.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def _models(quick: bool, image_size: int):
    from brcd.config import ModelConfig
    from brcd.models.nets import create_hashing_model

    if quick:
        t = ModelConfig(backbone="test_vit", bits=64, head="linear", model_kwargs={"img_size": image_size, "patch_size": 8})
        s = ModelConfig(backbone="test_efficientnet", bits=64, head="mlp", hidden_dim=1000)
    else:
        t = ModelConfig(backbone="vit_base_patch16_224", bits=64, head="linear")
        s = ModelConfig(backbone="efficientnet_b0", bits=64, head="mlp", hidden_dim=1000)
    torch.manual_seed(0)
    teacher = create_hashing_model(t).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    torch.manual_seed(1)
    student = create_hashing_model(s)
    return teacher, student


def _interleaved(fns: dict, rounds: int) -> dict[str, float]:
    """Best time of each function over ``rounds`` rounds in which they take turns (order rotated), so a
    burst of load on a shared machine hits all of them, not one."""
    names = list(fns)
    best = dict.fromkeys(names, float("inf"))
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def _cost_rows(quick: bool) -> list[dict]:
    from brcd.bank import BankViews, ViewBank, ViewRenderer, bank_outputs, frozen_networks
    from brcd.builders import build_objective
    from brcd.config import DistillConfig
    from brcd.data.transforms import augmentation
    from brcd.engine import DistillTask, EvalSets, TeacherTask

    size = 32 if quick else 224
    n_images, batch, rounds = (16, 8, 2) if quick else (32, 16, 3)
    imgs = _images(n_images, 40 if quick else 256)
    teacher, student = _models(quick, size)
    renderer = ViewRenderer(imgs.__getitem__, n_images, augmentation(size), 2, seed=0)
    rows_for_build = list(range(0, 2 * batch))
    nets = frozen_networks("distill", teacher=teacher, student=student)
    timed = {"distill build": lambda: bank_outputs(renderer, nets, 0, len(rows_for_build), batch_size=batch)}
    bank = ViewBank(bank_outputs(renderer, nets, 0, n_images * 2, batch_size=batch), 2, n_images)
    k = 4
    g = np.random.default_rng(1)
    labels = g.integers(0, k, n_images)
    centroids = g.choice([-1.0, 1.0], size=(k, 64)).astype(np.float32)
    masks = {64: (g.random((k, 64)) > 0.3).astype(np.float32)}
    empty = torch.utils.data.TensorDataset(torch.zeros(2, 3, size, size), torch.arange(2))
    es = EvalSets(empty, empty, np.eye(2, dtype=np.float32), np.eye(2, dtype=np.float32), topk=None)

    def distill(model, b):
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], 1e-4)
        return DistillTask(model, opt, teacher, es, objective=build_objective(DistillConfig()),
                           teacher_db_codes=np.ones((2, 64), np.int8), pseudo_labels=labels, centroids=centroids,
                           masks_by_length=masks, bank=b)

    views = BankViews(n_images, 2, 0, renderer)  # live: the regenerated views
    ids = BankViews(n_images, 2, 0)  # bank: positions and view pairs only
    positions = list(range(batch))
    live_task, bank_task = distill(copy.deepcopy(student), None), distill(copy.deepcopy(student), bank)
    # equivalence first (same weights, same views), then timing
    ref_batch = default_collate([views[i] for i in positions])
    live_terms = distill(copy.deepcopy(student), None).train_step(ref_batch[:3])
    bank_terms = distill(copy.deepcopy(student), bank).train_step(ref_batch[2:])
    diff_distill = max(abs(live_terms[t] - bank_terms[t]) for t in live_terms)
    timed["distill live"] = lambda: live_task.train_step(default_collate([views[i] for i in positions])[:3])
    timed["distill bank"] = lambda: bank_task.train_step(default_collate([ids[i] for i in positions]))

    # teacher training: frozen ViT backbone + linear head
    t_model = copy.deepcopy(teacher)
    t_model.head.requires_grad_(True)
    tnets = frozen_networks("teacher", teacher=t_model)
    timed["teacher build"] = lambda: bank_outputs(renderer, tnets, 0, len(rows_for_build), batch_size=batch)
    tbank = ViewBank(bank_outputs(renderer, tnets, 0, n_images * 2, batch_size=batch), 2, n_images)

    def teacher_task(model, b):
        return TeacherTask(model, torch.optim.Adam(model.head.parameters(), 1e-4), es, temperature=0.3,
                           kl_weight=0.001, bank=b)

    tl, tb = teacher_task(copy.deepcopy(t_model), None), teacher_task(copy.deepcopy(t_model), tbank)
    lt = teacher_task(copy.deepcopy(t_model), None).train_step(ref_batch[:3])
    bt = teacher_task(copy.deepcopy(t_model), tbank).train_step(ref_batch[2:])
    diff_teacher = max(abs(lt[t] - bt[t]) for t in lt)
    timed["teacher live"] = lambda: tl.train_step(default_collate([views[i] for i in positions])[:3])
    timed["teacher bank"] = lambda: tb.train_step(default_collate([ids[i] for i in positions]))
    best = _interleaved(timed, rounds)
    per_view_distill = best["distill build"] / len(rows_for_build)
    per_view_teacher = best["teacher build"] / len(rows_for_build)
    t_live, t_bank, t_live_t, t_bank_t = (best[k] for k in ("distill live", "distill bank", "teacher live", "teacher bank"))

    label = ("test_vit / test_efficientnet, 32 px" if quick else "ViT-B/16 / EfficientNet-B0, 224 px")
    out: list[dict] = []
    steps = n_images // batch
    for stage, epochs, live_step, bank_step, per_view in (("distill", 400, t_live, t_bank, per_view_distill),
                                                          ("teacher", 200, t_live_t, t_bank_t, per_view_teacher)):
        live_cost = epochs * steps * live_step
        what = label if stage == "distill" else label.split(" / ")[0] + label[label.index(","):]
        out.append({"benchmark": BENCH, "name": f"{stage}: live step ({what}, batch {batch})", "value": live_step,
                    "unit": "s"})
        out.append({"benchmark": BENCH, "name": f"{stage}: bank step (same batch)", "value": bank_step, "unit": "s"})
        out.append({"benchmark": BENCH, "name": f"{stage}: bank build per view", "value": per_view, "unit": "s"})
        out.append({"benchmark": BENCH, "name": f"{stage}: {epochs} epochs x {n_images} images, live", "value": live_cost,
                    "unit": "s"})
        for a in (16, 32):
            build = n_images * a * per_view
            bank_cost = build + epochs * steps * bank_step
            out.append({"benchmark": BENCH, "name": f"{stage}: {epochs} epochs, bank A={a} (build {build:.0f} s included)",
                        "value": bank_cost, "unit": "s"})
            out.append({"benchmark": BENCH, "name": f"{stage}: compute saved, A={a} (live / bank)",
                        "value": live_cost / bank_cost, "unit": "x"})
    out.append({"benchmark": BENCH, "name": "max |loss difference| bank vs live step, same views (distill, every term)",
                "value": diff_distill, "unit": ""})
    out.append({"benchmark": BENCH, "name": "max |loss difference| bank vs live step, same views (teacher)",
                "value": diff_teacher, "unit": ""})
    return out


def _quality_rows(quick: bool) -> list[dict]:
    """Symmetric / asymmetric mAP on digits: live views vs banks of A views (same teacher per seed)."""
    from pipelines.ray.cluster import ray_session

    seeds = [0] if quick else [0, 1, 2]
    views = [4] if quick else [4, 8, 16, 32]
    base = ["teacher.model.backbone=test_resnet", "student.model.backbone=test_efficientnet",
            "student.model.freeze_backbone=true", "resources.num_workers=0", "tracking.enabled=false",
            "teacher.optim.batch_size=64", "distill.optim.batch_size=64"]
    if quick:
        base += ["data.train=128", "data.query=60", "data.validation=60", "teacher.optim.epochs=1",
                 "distill.optim.epochs=2", "distill.optim.validate_every=1", "clusters.n_init=2", "clusters.k_range=[2,3]"]
    root = Path(tempfile.mkdtemp(prefix="bench-bank-"))
    results: dict[str, list[tuple[float, float]]] = {}
    with ray_session(root, num_cpus=2):
        for seed in seeds:
            _quality_seed(seed, root, base, views, results)
    rows = []
    for name, vals in results.items():
        sym, asym = [v[0] for v in vals], [v[1] for v in vals]
        spread = lambda x: statistics.stdev(x) if len(x) > 1 else 0.0  # noqa: E731
        rows.append({"benchmark": BENCH, "name": f"digits mAP symmetric, {name} ({len(vals)} seeds, mean; sd {spread(sym):.4f})",
                     "value": float(np.mean(sym)), "unit": ""})
        rows.append({"benchmark": BENCH, "name": f"digits mAP asymmetric, {name} ({len(vals)} seeds, mean; sd {spread(asym):.4f})",
                     "value": float(np.mean(asym)), "unit": ""})
    return rows


def _quality_seed(seed: int, root: Path, base: list[str], views: list[int],
                  results: dict[str, list[tuple[float, float]]]) -> None:
    """One seed: teacher and clusters once, then the live student and one per bank size."""
    from brcd.config import load_config
    from pipelines.stages import Run, clusters_stage, distill_stage, evaluate_stage, teacher_stage

    out = root / f"seed{seed}"
    variants = [("live", ["bank.enabled=false"])] + [(f"A={a}", ["bank.enabled=true", f"bank.views={a}"]) for a in views]
    run = Run(load_config("demo", base + [f"seed={seed}"]), out)
    teacher_stage(run)
    clusters_stage(run)
    for name, sets in variants:
        vrun = Run(load_config("demo", base + [f"seed={seed}"] + sets), out, write_config=False)
        sdir = out / f"student-{name}"
        distill_stage(vrun, student_dir=sdir, tag=f"distill {name}")
        r = evaluate_stage(vrun, student_dir=sdir, write=False)
        results.setdefault(name, []).append((r["student_map_symmetric"], r["student_map_asymmetric"]))


def run(quick: bool = False, *, quality: bool = True) -> list[dict]:
    rows = _cost_rows(quick)
    if quality:
        rows += _quality_rows(quick)
    return rows


if __name__ == "__main__":
    from benchmarks.report import bench_main

    bench_main(__doc__, lambda a: run(a.quick, quality=not a.no_quality), None,
               ("--no-quality", {"action": "store_true"}), write=False)
