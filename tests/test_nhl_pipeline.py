"""NHL in the engine and the pipeline: nested teacher / distillation steps, adaptive weights really
applied, the shared offset-positive assignment, per-length masks, DDP equivalence, and a nested
distillation run on the demo data that reports every length (local mode)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import TensorDataset

from brcd import clustering, engine, io
from brcd.builders import build_objective
from brcd.config import ConfigError, DistillConfig, ModelConfig, NHLConfig, load_config
from brcd.engine import DistillTask, EvalSets, TeacherTask
from brcd.losses import brcd_logits, brcd_loss, nearest_centroid
from brcd.models.nets import create_hashing_model

BITS, B, K, SIZE = [4, 8, 16], 8, 3, 16


def nested_teacher(bits=BITS):
    # trainable and LayerNorm-only (exact under DDP on CPU), as in test_engine
    torch.manual_seed(2)
    return create_hashing_model(ModelConfig(backbone="test_vit", bits=bits, head="linear", freeze_backbone=False,
                                            model_kwargs={"img_size": SIZE, "patch_size": 4}))


def nested_student(bits=BITS):
    torch.manual_seed(1)
    return create_hashing_model(ModelConfig(backbone="test_resnet", bits=bits, head="mlp", hidden_dim=32))


def batch():
    g = torch.Generator().manual_seed(3)
    v1, v2 = torch.randn(B, 3, SIZE, SIZE, generator=g), torch.randn(B, 3, SIZE, SIZE, generator=g)
    return v1, v2, torch.arange(B)


def clusters(lmax=BITS[-1]):
    g = np.random.default_rng(4)
    return {
        "labels": g.integers(0, K, size=B),
        "masks": (g.random((K, lmax)) > 0.3).astype(np.float32),
        "centroids": g.choice([-1.0, 1.0], size=(K, lmax)).astype(np.float32) * 0.8,
    }


def eval_sets():
    g = torch.Generator().manual_seed(5)
    ds = TensorDataset(torch.randn(6, 3, SIZE, SIZE, generator=g), torch.arange(6))
    labels = np.eye(3, dtype=np.float32)[[0, 1, 2, 0, 1, 2]]
    return EvalSets(ds, ds, labels, labels, topk=None)


def sgd(model):
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)


def teacher_task(model, nhl=None):
    return TeacherTask(model, sgd(model), eval_sets(), temperature=0.3, kl_weight=0.001, nhl=nhl)


def distill_task(model, nhl=None, method="brcd", bits=BITS):
    c = clusters(bits[-1])
    return DistillTask(model, sgd(model), nested_teacher(bits), eval_sets(),
                       objective=build_objective(DistillConfig(method=method)),
                       teacher_db_codes=np.ones((6, bits[-1]), np.int8), pseudo_labels=c["labels"],
                       masks_by_length={L: c["masks"][:, :L] for L in bits}, centroids=c["centroids"], nhl=nhl)


def weighted_total(terms, bits, cascade_weight=1.0):
    """Σ_k w_k (base_k + λ D_k) rebuilt from the logged terms."""
    return sum(terms[f"loss/nhl/weight/{L}"] * (terms[f"loss/nhl/base/{L}"]
                                                + cascade_weight * terms.get(f"loss/nhl/cascade/{L}", 0.0))
               for L in bits)


# --------------------------------------------------------------------------------------------
# engine steps
# --------------------------------------------------------------------------------------------


def test_nested_teacher_step_trains_every_length_and_validates_per_length():
    model = nested_teacher()
    before = model.head.last_linear.weight.detach().clone()
    task = teacher_task(model)
    assert task.nested and task.bits == BITS
    terms = task.train_step(batch())
    for L in BITS:
        assert {f"loss/contrastive/{L}", f"loss/kl/{L}", f"loss/nhl/base/{L}", f"loss/nhl/weight/{L}"} <= set(terms)
    assert f"loss/nhl/cascade/{BITS[0]}" in terms and f"loss/nhl/cascade/{BITS[-1]}" not in terms
    assert terms["loss/total"] == pytest.approx(weighted_total(terms, BITS), rel=1e-5)
    moved = (model.head.last_linear.weight.detach() - before).abs().sum(dim=1)
    assert bool((moved > 0).all())  # rows of every length (the longest's own rows included) were trained
    val = task.validate()
    assert set(val) == {"map", *(f"map@{L}" for L in BITS)}
    assert val["map"] == pytest.approx(np.mean([val[f"map@{L}"] for L in BITS]))


def test_single_length_tasks_keep_their_terms_and_metrics():
    task = teacher_task(nested_teacher(bits=16))
    assert not task.nested
    assert set(task.train_step(batch())) == {"loss/contrastive", "loss/kl", "loss/total"}
    assert set(task.validate()) == {"map"}
    d = distill_task(nested_student(bits=16), bits=[16])
    assert not d.nested and set(d.validate()) == {"map_symmetric", "map_asymmetric"}
    assert "loss/brcd" in d.train_step(batch())


def test_nested_distillation_step_shares_the_assignment_and_validates_per_length():
    task = distill_task(nested_student())
    terms = task.train_step(batch())
    for L in BITS:
        assert {f"loss/brcd/{L}", f"loss/contrastive/{L}", f"loss/nhl/weight/{L}"} <= set(terms)
    assert terms["loss/total"] == pytest.approx(weighted_total(terms, BITS), rel=1e-5)
    # ĉ' is computed once on the 16-bit teacher view-2 code and shared: every length sees the same
    # views leaving their cluster (pseudo-labels are shared too)
    left = {terms[f"loss/stat_left_cluster_fraction/{L}"] for L in BITS}
    assert len(left) == 1
    # the masks of each length are the ones given for it
    assert all(torch.equal(task.masks_by_length[L], torch.as_tensor(clusters()["masks"][:, :L])) for L in BITS)
    val = task.validate()
    for name in ("map_symmetric", "map_asymmetric"):
        assert val[name] == pytest.approx(np.mean([val[f"{name}@{L}"] for L in BITS]))
    # baselines train nested students too (per-length prefixes)
    assert "loss/kd/8" in distill_task(nested_student(), method="kd").train_step(batch())


def test_adaptive_weights_are_applied(monkeypatch):
    """Force a conflict (the longest code's gradient made opposite to the shortest's on their shared
    rows, through the gradient reducer hook) and check the step uses the lowered weight."""
    def conflicting(grads):
        g = grads.clone()
        g[-1] = -10.0 * grads[0]
        return g

    monkeypatch.setattr(engine, "nested_grad_reducer", lambda: conflicting)
    adaptive = teacher_task(nested_teacher()).train_step(batch())
    w = [adaptive[f"loss/nhl/weight/{L}"] for L in BITS]
    assert adaptive["loss/nhl/conflicts"] >= 1 and w[-1] < w[0] and sum(w) == pytest.approx(len(BITS), rel=1e-5)
    assert adaptive["loss/total"] == pytest.approx(weighted_total(adaptive, BITS), rel=1e-5)
    # the same step without adaptive weights: all ones, total = plain sum, a different loss
    plain = teacher_task(nested_teacher(), nhl=NHLConfig(adaptive=False)).train_step(batch())
    assert all(plain[f"loss/nhl/weight/{L}"] == 1.0 for L in BITS)
    assert plain["loss/total"] == pytest.approx(weighted_total(plain, BITS), rel=1e-5)
    assert plain["loss/total"] != pytest.approx(adaptive["loss/total"], rel=1e-3)
    # and without the cascade no cascade term is logged
    nocascade = teacher_task(nested_teacher(), nhl={"cascade": False, "adaptive": False}).train_step(batch())
    assert not any(k.startswith("loss/nhl/cascade/") for k in nocascade) and nocascade["loss/nhl/cascade"] == 0.0


# --------------------------------------------------------------------------------------------
# BRCD's assignment override, per-length masks, config
# --------------------------------------------------------------------------------------------


def test_brcd_assigned_override():
    g = torch.Generator().manual_seed(7)
    s, t, tp = (torch.randn(B, 16, generator=g).sign() for _ in range(3))
    c = clusters()
    labels, masks, mu = torch.as_tensor(c["labels"]), torch.as_tensor(c["masks"]), torch.as_tensor(c["centroids"])
    own = brcd_logits(s, t, tp, labels, masks, mu)
    same = brcd_logits(s, t, tp, labels, masks, mu, assigned=nearest_centroid(tp, mu))
    assert torch.equal(own.assigned, same.assigned) and torch.equal(own.logits, same.logits)
    forced = brcd_logits(s, t, tp, labels, masks, mu, assigned=labels)  # no view leaves its cluster
    assert not forced.left_cluster.any() and torch.equal(forced.column_labels[B:], labels)
    loss, stats = brcd_loss(s, t, tp, labels, masks, mu, assigned=labels)
    assert float(stats["offset_fraction"]) == 0.0 and torch.isfinite(loss)
    with pytest.raises(ValueError, match="assigned"):
        brcd_loss(s, t, tp, labels, masks, mu, assigned=torch.full((B,), K))


def test_nested_masks_follow_the_rule_per_length():
    from brcd.clustering import masks_by_length as nested_masks

    rng = np.random.default_rng(0)
    codes = np.where(rng.random((60, 16)) < np.linspace(0.05, 0.5, 16), -1, 1).astype(np.int8)
    art = SimpleNamespace(codes=codes, labels=rng.integers(0, 3, 60), num_clusters=3)
    margin = nested_masks(art, BITS, margin=0.5)
    assert all(np.array_equal(margin[L], margin[16][:, :L]) for L in BITS)  # margin rule: prefixes
    ratio = nested_masks(art, BITS, mask_ratio=0.25)
    for L in BITS:  # ratio rule: the ratio holds at every length
        assert (ratio[L].sum(axis=1) == L - clustering.num_masked_bits(0.25, L)).all()
        assert np.array_equal(ratio[L], clustering.bit_masks(codes[:, :L], art.labels, 3, mask_ratio=0.25))


def test_nhl_config_section():
    cfg = load_config("demo_nested")
    assert cfg.student.model.bits == cfg.teacher.model.bits == [8, 16, 32] and cfg.nhl.adaptive and cfg.nhl.cascade
    assert load_config("demo").nhl == NHLConfig()  # harmless defaults for single-length configs
    with pytest.raises(ConfigError, match="nhl.cascade_weight"):
        load_config("demo", ["nhl.cascade_weight=-1"])
    with pytest.raises(ConfigError, match="nhl"):
        load_config("demo", ["nhl.adaptiv=true"])


# --------------------------------------------------------------------------------------------
# DDP: two workers with the adaptive weights equal one worker with the global batch
# --------------------------------------------------------------------------------------------


def _one_step(kind, model, rows):
    task = teacher_task(model) if kind == "teacher" else distill_task(model)
    v1, v2, pos = batch()
    terms = task.train_step((v1[rows], v2[rows], pos[rows]))
    m = model.module if hasattr(model, "module") else model
    return terms, {k: v.detach().clone() for k, v in m.trainable_state_dict().items()}


def _worker(rank, world, init, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        for kind, make in (("teacher", nested_teacher), ("distill", nested_student)):
            ddp = torch.nn.parallel.DistributedDataParallel(make())
            half = B // world
            terms, params = _one_step(kind, ddp, slice(rank * half, (rank + 1) * half))
            if rank == 0:
                io.save_state_dict(f"{out}.{kind}", params, metadata={"terms": json.dumps(terms)})
    finally:
        dist.destroy_process_group()


def test_nested_two_workers_equal_one_worker(tmp_path):
    out = str(tmp_path / "rank0")
    # fork: the workers inherit the imported modules (spawning re-imports torch and timm: ~1 min here)
    mp.start_processes(_worker, args=(2, f"file://{tmp_path}/init", out), nprocs=2, join=True, start_method="fork")
    from safetensors import safe_open

    for kind, make in (("teacher", nested_teacher), ("distill", nested_student)):
        terms_1, params_1 = _one_step(kind, make(), slice(0, B))
        with safe_open(f"{out}.{kind}", "pt") as f:
            terms_2 = json.loads(f.metadata()["terms"])
        for L in BITS:  # same adaptive weights from the all-reduced gradients
            assert terms_2[f"loss/nhl/weight/{L}"] == pytest.approx(terms_1[f"loss/nhl/weight/{L}"], rel=1e-4)
        assert terms_2["loss/total"] == pytest.approx(terms_1["loss/total"], rel=1e-5)
        params_2 = io.load_state_dict(f"{out}.{kind}")
        for k in params_1:
            torch.testing.assert_close(params_2[k], params_1[k], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# the pipeline on the demo data (local mode)
# --------------------------------------------------------------------------------------------


@pytest.mark.ray
def test_nested_distillation_run_reports_every_length(tmp_path, ray_local, capsys):
    from conftest import tiny_config
    from pipelines.stages import Run, clusters_stage, distill_stage, evaluate_stage, teacher_stage

    bits = [8, 16, 32]
    cfg = tiny_config(f"teacher.model.bits={bits}", f"student.model.bits={bits}", "clusters.mask_ratio=0.25",
                      "clusters.margin=null")
    run = Run(cfg, tmp_path / "nested")
    teacher = teacher_stage(run)
    best = teacher["history"][teacher["best_epoch"]["map"] - 1]
    assert {f"map@{L}" for L in bits} <= set(best)
    info = clusters_stage(run)
    assert set(info["kept_bits_per_cluster_by_length"]) == {"8", "16", "32"}
    assert {len(v) for v in info["kept_bits_per_cluster_by_length"].values()} == {cfg.clusters.num_clusters}
    distilled = distill_stage(run)
    assert set(distilled["best"]) == {"map_symmetric", "map_asymmetric"}
    last = distilled["history"][-1]
    assert {f"map_{p}@{L}" for p in ("symmetric", "asymmetric") for L in bits} <= set(last)
    assert {f"loss/nhl/weight/{L}" for L in bits} <= set(last)
    results = evaluate_stage(run)
    saved = json.loads((run.output / "results.json").read_text())
    for key in ("teacher_map", "student_map_symmetric", "student_map_asymmetric"):
        per = [saved[f"{key}@{L}"] for L in bits]
        assert all(0 <= v <= 1 for v in per)
        assert saved[key] == pytest.approx(np.mean(per)) and saved[key] == results[key]
    assert saved["bits"] == bits and saved["student_images_per_second"] > 0
    table = (run.output / "results.md").read_text()
    assert "mean of 8/16/32 bits" in table and "32 bits: student mAP asymmetric" in table
    out = capsys.readouterr().out
    assert "w=[" in out and "(8: " in out
