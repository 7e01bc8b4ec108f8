"""Distillation objectives (``brcd.builders``): one per ``distill.method``, built once from the
config, the same function for single-length and nested codes; and the task's cluster inputs."""

from __future__ import annotations

import typing

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from brcd import losses
from brcd.builders import DISTILL_OBJECTIVES, build_objective
from brcd.config import DistillConfig, ModelConfig, OptimConfig
from brcd.engine import DistillTask, EvalSets, LengthBatch, fit
from brcd.models.nets import create_hashing_model

B, L, K, SIZE = 8, 16, 3, 16


def length_batch() -> LengthBatch:
    g = torch.Generator().manual_seed(0)
    sl1, sl2, tl1 = (torch.randn(B, L, generator=g) for _ in range(3))
    tc1, tc2 = torch.sign(tl1), torch.sign(torch.randn(B, L, generator=g))
    masks = (torch.rand(K, L, generator=g) > 0.3).float()
    centroids = torch.sign(torch.randn(K, L, generator=g)) * 0.8
    return LengthBatch(sl1, sl2, torch.sign(sl1), torch.sign(sl2), tl1, tc1, tc2,
                       pseudo_labels=torch.randint(0, K, (B,), generator=g), masks=masks, centroids=centroids)


def test_every_configurable_method_has_an_objective():
    methods = typing.get_args(typing.get_type_hints(DistillConfig)["method"])
    assert set(methods) == set(DISTILL_OBJECTIVES)
    assert build_objective(DistillConfig(method="brcd")).needs_clusters
    assert not build_objective(DistillConfig(method="brcd", released=True)).shares_assignment
    assert not any(build_objective(DistillConfig(method=m)).needs_clusters for m in methods if m != "brcd")


def test_brcd_objective_is_the_student_total_of_the_losses_module():
    b = length_batch()
    cfg = DistillConfig(alpha=0.6, brcd_weight=0.7, use_false_negatives=False,
                        optim=OptimConfig(temperature=0.4, kl_weight=0.01))
    loss, terms = build_objective(cfg)(b)
    ref, ref_terms = losses.distillation_objective(
        b.student_logits1, b.student_logits2, b.student_codes1, b.student_codes2, b.teacher_codes1, b.teacher_codes2,
        b.pseudo_labels, b.masks, b.centroids, temperature=0.4, kl_weight=0.01, brcd_weight=0.7, alpha=0.6,
        use_false_negatives=False)
    assert torch.equal(loss, ref)
    assert torch.equal(terms["brcd"], ref_terms["brcd"]) and torch.equal(terms["contrastive"], ref_terms["contrastive"])
    assert {"stat_offset_fraction", "stat_kept_bit_fraction"} <= set(terms)


@pytest.mark.parametrize("method", sorted(losses.BASELINES))
def test_baseline_objectives(method):
    b = length_batch()
    loss, terms = build_objective(DistillConfig(method=method, baseline_weight=0.5))(b)
    own, _ = losses.teacher_objective(b.student_logits1, b.student_logits2, b.student_codes1, b.student_codes2,
                                      temperature=0.3, kl_weight=0.001)
    teacher = b.teacher_logits1 if method == "kd" else b.teacher_codes1
    assert torch.equal(loss, own + 0.5 * losses.BASELINES[method](b.student_logits1, teacher))
    assert set(terms) == {"contrastive", "kl", "total", method}
    no_kd, no_kd_terms = build_objective(DistillConfig(method="no_kd"))(b)
    assert torch.equal(no_kd, own) and set(no_kd_terms) == {"contrastive", "kl", "total"}


def _task(method="brcd", **clusters):
    torch.manual_seed(1)
    student = create_hashing_model(ModelConfig(backbone="test_resnet", bits=L, head="mlp", hidden_dim=32))
    teacher = create_hashing_model(ModelConfig(backbone="test_vit", bits=L, head="linear",
                                               model_kwargs={"img_size": SIZE, "patch_size": 4}))
    ds = TensorDataset(torch.zeros(2, 3, SIZE, SIZE), torch.arange(2))
    eval_sets = EvalSets(ds, ds, np.eye(2, dtype=np.float32), np.eye(2, dtype=np.float32), topk=None)
    opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.1)
    return DistillTask(student, opt, teacher, eval_sets, objective=build_objective(DistillConfig(method=method)),
                       teacher_db_codes=np.ones((2, L), np.int8), **clusters)


def test_the_task_checks_its_cluster_inputs():
    ok = {"pseudo_labels": np.zeros(B, np.int64), "centroids": np.ones((K, L), np.float32)}
    with pytest.raises(ValueError, match="run `brcd clusters` first"):
        _task(**ok)
    with pytest.raises(ValueError, match=r"lacks the 16-bit masks \(has \[8\]\)"):
        _task(**ok, masks_by_length={8: np.ones((K, 8), np.float32)})
    with pytest.raises(ValueError, match=r"masks_by_length\[16\] has shape \(2, 16\), expected \(3, 16\)"):
        _task(**ok, masks_by_length={16: np.ones((2, L), np.float32)})
    assert _task("kd").masks_by_length == {}  # baselines need no clusters


def test_log_every_prints_running_means_inside_the_epoch(tmp_path):
    task = _task("no_kd")
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(4 * B, 3, SIZE, SIZE, generator=g), torch.randn(4 * B, 3, SIZE, SIZE, generator=g),
                         torch.arange(4 * B))
    lines: list[str] = []
    fit(task, DataLoader(data, batch_size=B), epochs=1, validate_every=1, patience=1, checkpoint_root=tmp_path,
        progress=lines.append, log_every=2)
    steps = [ln for ln in lines if " step " in ln]
    assert len(steps) == 1 and steps[0].startswith("[distill] epoch 1/1 step 2/4 | ") and "contrastive=" in steps[0]
    assert lines[-1].startswith("[distill] epoch 1/1 | ")  # the epoch line still closes the epoch
