"""Engine: global-batch equivalence under DDP, resume, best checkpoints per paradigm, NaN stop."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset

from brcd import io
from brcd.builders import build_objective
from brcd.config import DistillConfig, ModelConfig
from brcd.engine import (
    DistillTask,
    EvalSets,
    NonFiniteLossError,
    TeacherTask,
    fit,
    latest_checkpoint,
    load_state,
)
from brcd.models.nets import create_hashing_model

B, BITS, K, SIZE = 8, 16, 3, 16


def student():
    torch.manual_seed(1)
    return create_hashing_model(ModelConfig(backbone="test_resnet", bits=BITS, head="mlp", hidden_dim=32))


def teacher():
    # trainable and LayerNorm-only: per-worker BatchNorm statistics would (rightly) break equivalence on CPU
    torch.manual_seed(2)
    return create_hashing_model(ModelConfig(backbone="test_vit", bits=BITS, head="linear", freeze_backbone=False,
                                            model_kwargs={"img_size": SIZE, "patch_size": 4}))


def batch():
    g = torch.Generator().manual_seed(3)
    v1, v2 = torch.randn(B, 3, SIZE, SIZE, generator=g), torch.randn(B, 3, SIZE, SIZE, generator=g)
    return v1, v2, torch.arange(B)


def clusters():
    g = np.random.default_rng(4)
    return {
        "labels": g.integers(0, K, size=B),
        "masks": (g.random((K, BITS)) > 0.3).astype(np.float32),
        "centroids": g.choice([-1.0, 1.0], size=(K, BITS)).astype(np.float32) * 0.8,
    }


def empty_eval():
    ds = TensorDataset(torch.zeros(2, 3, SIZE, SIZE), torch.arange(2))
    return EvalSets(ds, ds, np.eye(2, dtype=np.float32), np.eye(2, dtype=np.float32), topk=None)


def distill_task(model, opt):
    c = clusters()
    return DistillTask(model, opt, teacher(), empty_eval(), objective=build_objective(DistillConfig()),
                       teacher_db_codes=np.ones((2, BITS), np.int8), pseudo_labels=c["labels"],
                       masks_by_length={BITS: c["masks"]}, centroids=c["centroids"])


def teacher_task(model, opt):
    return TeacherTask(model, opt, empty_eval(), temperature=0.3, kl_weight=0.001)


def one_step(kind: str, model, rows: slice, task_out: list | None = None):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    task = (distill_task if kind == "distill" else teacher_task)(model, opt)
    if task_out is not None:
        task_out.append(task)
    v1, v2, pos = batch()
    terms = task.train_step((v1[rows], v2[rows], pos[rows]))
    m = model.module if hasattr(model, "module") else model
    return terms["loss/total"], {k: v.detach().clone() for k, v in m.trainable_state_dict().items()}


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _worker(rank: int, world: int, init: str, kind: str, out: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model = student() if kind == "distill" else teacher()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        half = B // world
        loss, params = one_step(kind, ddp, slice(rank * half, (rank + 1) * half))
        if rank == 0:
            io.save_state_dict(out, params, metadata={"loss": repr(loss)})
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["distill", "teacher"])
def test_two_workers_equal_one_worker_with_the_global_batch(tmp_path, kind):
    """N workers x batch B/N (codes gathered, gradient on the local part, DDP averaging) make
    exactly the update one worker makes with the whole batch B."""
    model, tasks = student() if kind == "distill" else teacher(), []
    before = _state(model)
    loss_1, params_1 = one_step(kind, model, slice(0, B), tasks)
    out = tmp_path / "rank0.safetensors"
    mp.spawn(_worker, args=(2, f"file://{tmp_path}/init", kind, str(out)), nprocs=2, join=True)
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        loss_2 = float(f.metadata()["loss"])
    params_2 = io.load_state_dict(out)
    assert loss_2 == pytest.approx(loss_1, rel=1e-5)
    for k in params_1:
        torch.testing.assert_close(params_2[k], params_1[k], rtol=1e-4, atol=1e-5)
    # The equality above is only worth something if the step moved the weights: every trainable
    # parameter changed, and nothing else did (frozen backbone, BatchNorm buffers, the teacher).
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(params_1) == trainable and trainable
    unmoved = [k for k in trainable if torch.equal(params_1[k], before[k])]
    assert not unmoved, f"one SGD step left these trainable parameters unchanged: {unmoved}"
    after = _state(model)
    moved = [k for k in after if k not in trainable and not torch.equal(after[k], before[k])]
    assert not moved, f"frozen parameters or buffers changed: {moved}"
    if kind == "distill":
        assert len(trainable) < len(dict(model.named_parameters())), "the student's backbone should be frozen"
        frozen_teacher = teacher()
        assert all(torch.equal(v, frozen_teacher.state_dict()[k]) for k, v in tasks[0].teacher.state_dict().items())


# --------------------------------------------------------------------------------------------
# fit(): resume, best checkpoints, NaN
# --------------------------------------------------------------------------------------------


class ToyTask(TeacherTask):
    """A teacher task whose validation metric follows a script, to drive model selection."""

    def __init__(self, model, opt, script):
        super().__init__(model, opt, empty_eval(), temperature=0.3, kl_weight=0.001)
        self.script, self.calls, self.steps = list(script), 0, 0

    def train_step(self, b):
        self.steps += 1
        return super().train_step(b)

    def validate(self):
        self.calls += 1
        return {"map": self.script[self.calls - 1]}


def loader():
    v1, v2, pos = batch()
    return DataLoader(TensorDataset(v1, v2, pos), batch_size=4, drop_last=True)


def make_toy(script):
    model = teacher()
    return ToyTask(model, torch.optim.Adam([p for p in model.parameters() if p.requires_grad], 1e-3), script)


def test_resume_continues_from_last_checkpoint_not_from_scratch(tmp_path):
    first = make_toy([0.1, 0.2, 0.3, 0.4])
    fit(first, loader(), epochs=2, validate_every=1, patience=5, checkpoint_root=tmp_path)
    last = latest_checkpoint(tmp_path)
    assert last is not None and last.name == "epoch=0002"
    # "interrupted" after epoch 2: a new process resumes with the full schedule of 4 epochs
    second = make_toy([0.3, 0.4])
    loop = fit(second, loader(), epochs=4, validate_every=1, patience=5, checkpoint_root=tmp_path, resume_from=last)
    assert loop.epoch == 4
    assert second.steps == 2 * 2  # only epochs 3 and 4 were trained (2 steps each)
    assert [h["epoch"] for h in loop.history] == [1, 2, 3, 4]
    # the resumed weights are the checkpoint's, not a fresh init
    resumed = make_toy([])
    load_state(last, resumed.model, resumed.optimizer)
    assert not all(torch.equal(a, b) for a, b in zip(resumed.model.state_dict().values(), teacher().state_dict().values()))


def test_best_checkpoint_per_metric_and_early_stopping(tmp_path):
    task = make_toy([0.5, 0.7, 0.6, 0.65, 0.2, 0.9])
    loop = fit(task, loader(), epochs=6, validate_every=1, patience=3, checkpoint_root=tmp_path)
    assert loop.best == {"map": 0.7} and loop.best_epoch == {"map": 2}
    assert loop.stopped_early and loop.epoch == 5  # three validations without improvement
    last = latest_checkpoint(tmp_path)
    best = io.load_state_dict(last / "best_map.safetensors")  # carried forward from epoch 2
    epoch2 = io.load_state_dict(tmp_path / "epoch=0002" / "best_map.safetensors")
    assert all(torch.equal(best[k], epoch2[k]) for k in best)


def test_nan_loss_stops_with_step_and_cause(tmp_path):
    task = make_toy([0.5])
    with torch.no_grad():
        task.model.head.net.weight.fill_(float("nan"))  # diverged weights -> NaN loss at the first step
    with pytest.raises(NonFiniteLossError, match=r"at step 1 .*lower optim.lr"):
        fit(task, loader(), epochs=1, validate_every=1, patience=3, checkpoint_root=tmp_path)
    assert latest_checkpoint(tmp_path) is None  # nothing half-written to trust


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    task = make_toy([0.5])
    fit(task, loader(), epochs=1, validate_every=1, patience=3, checkpoint_root=tmp_path)
    other = create_hashing_model(ModelConfig(backbone="test_resnet", bits=BITS, freeze_backbone=False))
    with pytest.raises(io.ArtifactError, match="another architecture"):
        load_state(latest_checkpoint(tmp_path), other, None)


def test_read_only_cluster_arrays_are_copied_without_a_warning():
    """Arrays a Ray worker gets from the object store are read-only; the task copies them (torch
    would otherwise warn 'array is not writable' on every worker and share the read-only memory)."""
    import warnings

    c = clusters()
    for a in c.values():
        a.setflags(write=False)
    model = student()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        task = DistillTask(model, opt, teacher(), empty_eval(), objective=build_objective(DistillConfig()),
                           teacher_db_codes=np.ones((2, BITS), np.int8), pseudo_labels=c["labels"],
                           masks_by_length={BITS: c["masks"]}, centroids=c["centroids"])
    for name, t in (("masks", task.masks_by_length[BITS]), ("centroids", task.centroids)):
        assert not np.shares_memory(t.numpy(), c[name]) and torch.equal(t, torch.from_numpy(c[name].copy()))
