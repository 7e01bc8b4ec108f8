"""The view bank: seeded views regenerate exactly, and a training step that reads the frozen networks'
outputs from the bank is the live step on the same views (loss and head gradients), for the teacher,
BRCD, the baselines and nested codes, in one process and under 2 DDP workers."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from torch.utils.data import default_collate

from brcd import io
from conftest import NATURAL_VIEWS
from brcd.bank import BankViews, ViewBank, ViewRenderer, bank_outputs, frozen_networks, render_view, view_pairs, view_seed
from brcd.builders import build_objective
from brcd.config import DistillConfig, ModelConfig
from brcd.data.transforms import augmentation
from brcd.engine import DistillTask, EvalSets, TeacherTask, encode_dataset, encode_features
from brcd.models.nets import create_hashing_model

N, A, SIZE, SEED, K = 12, 4, 16, 7, 3


def images():
    g = np.random.default_rng(0)
    return [Image.fromarray(g.integers(0, 255, (20, 20, 3), dtype=np.uint8)) for _ in range(N)]


def renderer(imgs=None):
    imgs = imgs or images()
    return ViewRenderer(imgs.__getitem__, N, augmentation(SIZE), A, SEED)


def vit(bits, seed, frozen=False, head="linear"):
    torch.manual_seed(seed)
    return create_hashing_model(ModelConfig(backbone="test_vit", bits=bits, head=head, hidden_dim=24,
                                            freeze_backbone=frozen, model_kwargs={"img_size": SIZE, "patch_size": 4}))


def empty_eval():
    ds = torch.utils.data.TensorDataset(torch.zeros(2, 3, SIZE, SIZE), torch.arange(2))
    return EvalSets(ds, ds, np.eye(2, dtype=np.float32), np.eye(2, dtype=np.float32), topk=None)


# --------------------------------------------------------------------------------------------
# views
# --------------------------------------------------------------------------------------------


def test_a_view_is_a_function_of_image_and_seed_and_leaves_the_global_rng_alone():
    img, aug = images()[0], augmentation(SIZE)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a, b = render_view(aug, img, 5), render_view(aug, img, 5)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG stream is untouched
    assert torch.equal(a, b)
    assert not torch.equal(a, render_view(aug, img, 6))
    r = renderer()
    assert torch.equal(r.view(3, 1), render_view(aug, images()[3], view_seed(SEED, 3, 1)))
    assert len({view_seed(SEED, i, v) for i in range(50) for v in range(8)}) == 400


def test_view_pairs_are_distinct_seeded_and_cover_every_view():
    pos = np.arange(2000)
    p = view_pairs(SEED, 3, pos, A)
    assert p.shape == (2000, 2) and (p[:, 0] != p[:, 1]).all() and p.min() == 0 and p.max() == A - 1
    np.testing.assert_array_equal(p, view_pairs(SEED, 3, pos, A))  # resumable: same epoch, same pairs
    assert (view_pairs(SEED, 4, pos, A) != p).any(axis=1).mean() > 0.5  # a new epoch draws new pairs
    counts = np.bincount(p.ravel(), minlength=A) / p.size
    np.testing.assert_allclose(counts, 1 / A, atol=0.03)
    assert (view_pairs(SEED, 0, pos, 2) == [[0, 1]]).all(1).mean() == pytest.approx(0.5, abs=0.05)
    with pytest.raises(ValueError, match="views must be >= 2"):
        view_pairs(SEED, 0, pos, 1)


# --------------------------------------------------------------------------------------------
# bank step == live step on the same views
# --------------------------------------------------------------------------------------------


def _clusters(bits):
    g = np.random.default_rng(4)
    L = max(bits)
    centroids = g.choice([-1.0, 1.0], size=(K, L)).astype(np.float32) * 0.8
    masks = {b: (g.random((K, b)) > 0.3).astype(np.float32) for b in bits}
    return g.integers(0, K, size=N), centroids, masks


def _distill(method, bits, student, teacher, bank=None):
    labels, centroids, masks = _clusters(bits)
    opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.0)
    return DistillTask(student, opt, teacher, empty_eval(), objective=build_objective(DistillConfig(method=method)),
                       teacher_db_codes=np.ones((2, max(bits)), np.int8), pseudo_labels=labels, centroids=centroids,
                       masks_by_length=masks, bank=bank)


def _grads(model):
    m = model.module if hasattr(model, "module") else model
    return {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.requires_grad}


def _batch(rows, r):
    return default_collate([BankViews(N, A, SEED, r)[i] for i in rows])


def _compare(live_terms, bank_terms, live_grads, bank_grads):
    assert set(live_terms) == set(bank_terms)
    for k in live_terms:
        assert bank_terms[k] == pytest.approx(live_terms[k], rel=1e-4, abs=1e-6), k
    assert set(live_grads) == set(bank_grads) and live_grads
    for k in live_grads:
        torch.testing.assert_close(bank_grads[k], live_grads[k], rtol=1e-3, atol=1e-6)
    return max(abs(bank_terms[k] - live_terms[k]) for k in live_terms)


CASES = [("brcd", [16], True), ("brcd", [8, 16], True), ("kd", [16], True), ("rkd", [16], True),
         ("no_kd", [16], True), ("brcd", [16], False)]


@pytest.mark.parametrize("method,bits,frozen_student", CASES)
def test_distillation_step_from_the_bank_equals_the_live_step_on_the_same_views(method, bits, frozen_student):
    r = renderer()
    teacher = vit(bits, 1, frozen=True).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = vit(bits, 2, frozen=frozen_student, head="mlp")
    nets = frozen_networks("distill", teacher=teacher, student=student)
    assert set(nets) == ({"teacher_logits", "student_features"} if frozen_student else {"teacher_logits"})
    bank = ViewBank(bank_outputs(r, nets, 0, N * A, batch_size=5), A, N)
    rows = list(range(N))
    batch = _batch(rows, r)  # (view a1, view a2, pos, a1, a2), the views regenerated from their seeds
    live_student, bank_student = student, copy.deepcopy(student)
    live = _distill(method, bits, live_student, teacher)
    live_terms = live.train_step(batch[:3])
    banked = _distill(method, bits, bank_student, teacher, bank)
    bank_batch = batch[2:] if frozen_student else batch
    bank_terms = banked.train_step(bank_batch)
    _compare(live_terms, bank_terms, _grads(live_student), _grads(bank_student))
    if method == "brcd":  # the cluster machinery was really exercised
        assert live_terms["loss/brcd" if len(bits) == 1 else "loss/brcd/16"] != 0


def test_teacher_step_from_the_bank_equals_the_live_step_on_the_same_views():
    r = renderer()
    live_model = vit(16, 3, frozen=True)
    bank_model = copy.deepcopy(live_model)
    bank = ViewBank(bank_outputs(r, frozen_networks("teacher", teacher=live_model), 0, N * A), A, N)
    batch = _batch(range(N), r)
    tasks = [TeacherTask(m, torch.optim.SGD(m.head.parameters(), lr=0.0), empty_eval(), temperature=0.3,
                         kl_weight=0.001, bank=b) for m, b in ((live_model, None), (bank_model, bank))]
    live_terms = tasks[0].train_step(batch[:3])
    bank_terms = tasks[1].train_step(batch[2:])
    _compare(live_terms, bank_terms, _grads(live_model), _grads(bank_model))
    assert frozen_networks("teacher", teacher=vit(16, 3, frozen=False)) == {}


def test_a_bank_without_the_stage_s_entries_is_refused():
    r = renderer()
    teacher = vit([16], 1, frozen=True)
    only_student = ViewBank(bank_outputs(r, {"student_features": teacher.features}, 0, N * A), A, N)
    with pytest.raises(ValueError, match="no teacher_logits"):
        _distill("brcd", [16], vit([16], 2, frozen=True, head="mlp"), teacher, only_student)
    with pytest.raises(ValueError, match="expected 12 images x 4 views"):
        ViewBank({"teacher_logits": np.zeros((N * A - 1, 16), np.float32)}, A, N)


def _ddp_worker(rank: int, world: int, init: str, out: str, method: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        r = renderer()
        teacher = vit([16], 1, frozen=True)
        student = vit([16], 2, frozen=True, head="mlp")
        bank = ViewBank(bank_outputs(r, frozen_networks("distill", teacher=teacher, student=student), 0, N * A), A, N)
        rows = list(range(rank * N // world, (rank + 1) * N // world))
        batch = _batch(rows, r)
        results = {}
        for name, b, s in (("live", None, student), ("bank", bank, copy.deepcopy(student))):
            ddp = torch.nn.parallel.DistributedDataParallel(s)
            terms = _distill(method, [16], ddp, teacher, b).train_step(batch[:3] if b is None else batch[2:])
            results[name] = {"loss": torch.tensor(terms["loss/total"]), **_grads(ddp)}
        if rank == 0:
            io.save_state_dict(out, {f"{n}.{k}": v for n, d in results.items() for k, v in d.items()})
    finally:
        dist.destroy_process_group()


def test_two_ddp_workers_from_the_bank_equal_live_workers_and_one_worker_with_the_global_batch(tmp_path):
    out = tmp_path / "rank0.safetensors"
    mp.spawn(_ddp_worker, args=(2, f"file://{tmp_path}/init", str(out), "brcd"), nprocs=2, join=True)
    got = io.load_state_dict(out)
    r = renderer()
    teacher, student = vit([16], 1, frozen=True), vit([16], 2, frozen=True, head="mlp")
    bank = ViewBank(bank_outputs(r, frozen_networks("distill", teacher=teacher, student=student), 0, N * A), A, N)
    one = _distill("brcd", [16], student, teacher, bank).train_step(_batch(range(N), r)[2:])
    one_grads = _grads(student)
    for name in ("live", "bank"):
        # the contrastive batch is the global one: 2 x N/2 == 1 x N, and DDP averages the gradients
        assert float(got[f"{name}.loss"]) == pytest.approx(one["loss/total"], rel=1e-4)
        for k, g in one_grads.items():
            torch.testing.assert_close(got[f"{name}.{k}"], g, rtol=1e-3, atol=1e-6)


# --------------------------------------------------------------------------------------------
# exact feature caches
# --------------------------------------------------------------------------------------------


def test_codes_from_a_feature_cache_are_bit_for_bit_the_live_codes():
    model = vit([8, 16], 4, frozen=True)
    x = torch.randn(40, 3, SIZE, SIZE)
    ds = torch.utils.data.TensorDataset(x, torch.arange(40))
    feats = torch.cat([model.features(x[i:i + 7]) for i in range(0, 40, 7)]).numpy()  # other batching
    live = encode_dataset(model, ds, batch_size=16)
    np.testing.assert_array_equal(encode_features(model, feats), live)
    np.testing.assert_array_equal(encode_features(model, feats, bits=8), encode_dataset(model, ds, bits=8))
    es = EvalSets(ds, ds, np.eye(40, dtype=np.float32), np.eye(40, dtype=np.float32), topk=None,
                  query_features=feats, database_features=feats)
    q, db = es.encode(model, "cpu")
    np.testing.assert_array_equal(q, live)
    task = TeacherTask(model, torch.optim.SGD(model.head.parameters(), lr=0.1), es, temperature=0.3, kl_weight=0.0)
    es_live = EvalSets(ds, ds, es.query_labels, es.database_labels, topk=None)
    assert task.validate() == TeacherTask(model, task.optimizer, es_live, temperature=0.3, kl_weight=0.0).validate()


# --------------------------------------------------------------------------------------------
# the pipeline: stages trained from banks, caches, resume, refusal
# --------------------------------------------------------------------------------------------

BANKED = ["teacher.model.freeze_backbone=true", "bank.enabled=true", "bank.views=4", "data.train=128",
          "teacher.optim.batch_size=16", "distill.optim.batch_size=16", *NATURAL_VIEWS]


@pytest.fixture(scope="module")
def banked_run(tmp_path_factory):
    from conftest import start_ray, tiny_config
    from pipelines.stages import Run, clusters_stage, distill_stage, evaluate_stage, teacher_stage

    start_ray()
    out = tmp_path_factory.mktemp("banked")
    run = Run(tiny_config(*BANKED), out)
    import contextlib
    import io as _io

    log = _io.StringIO()
    with contextlib.redirect_stdout(log):
        teacher_stage(run)
        clusters_stage(run)
        distill_stage(run)
        results = evaluate_stage(run)
    return run, results, log.getvalue()


def test_the_stages_train_from_view_banks_and_say_what_they_cached(banked_run):
    from brcd.shards import open_sharded

    run, results, log = banked_run
    banks = sorted(p.name.split("-")[0] for p in run.layout.bank_root.glob("*-*") if not p.name.startswith("features"))
    assert banks == ["distill", "teacher"]
    for role, entries in (("teacher", {"teacher_features"}), ("distill", {"teacher_logits", "student_features"})):
        (folder,) = run.layout.bank_root.glob(f"{role}-*")
        cols = open_sharded(folder)
        assert set(cols) == entries and all(len(c) == 128 * 4 for c in cols.values())
        assert f"[{role}] view bank: 128 images x 4 views of" in log
    assert "frozen forward passes" in log and "cached frozen-backbone features" in log
    assert 0 <= results["student_map_asymmetric"] <= 1 and results["teacher_map"] > 0


def test_auto_weighs_the_bank_against_every_run_that_reads_it(banked_run, capsys):
    """bank.enabled=auto: 128 images x 4 views = 512 forwards; a live run makes 2 epochs x 3 steps x 16 x 2
    = 192, so the bank halves the frozen work from 6 runs (a tuning job's trials) on, not for one."""
    from conftest import tiny_config
    from pipelines.ray.bank_job import plan_bank
    from pipelines.stages import Run

    run, _, _ = banked_run
    auto = Run(tiny_config(*BANKED, "bank.enabled=auto"), run.output)
    assert plan_bank(auto, "distill") is None and plan_bank(auto, "distill", runs=5) is None
    assert "would not halve the 5 live runs' 960" in capsys.readouterr().out
    plan = plan_bank(auto, "distill", runs=6)
    assert plan is not None and plan.folder == plan_bank(run, "distill").folder


def test_cached_teacher_codes_are_bit_for_bit_the_live_encode_job(banked_run, tmp_path):
    """Teacher codes (clusters, evaluation) from the frozen backbone's feature caches equal the codes
    of the live Ray Train encode job on the same teacher."""
    import shutil

    from conftest import tiny_config
    from pipelines.stages import Run, teacher_codes

    run, _, _ = banked_run
    live_dir = tmp_path / "live"
    shutil.copytree(run.output / "data", live_dir / "data")
    shutil.copytree(run.teacher_dir, live_dir / "teacher", ignore=shutil.ignore_patterns("teacher_codes*"))
    live = teacher_codes(Run(tiny_config(*BANKED, "bank.enabled=false"), live_dir))
    cached = teacher_codes(run)
    for part in ("train", "validation", "query", "database"):
        np.testing.assert_array_equal(cached[part], live[part])


def test_an_interrupted_bank_build_resumes_from_its_finished_shards_and_a_foreign_bank_is_refused(
        banked_run, tmp_path, monkeypatch, capsys):
    import dataclasses

    from brcd.io import ArtifactError
    from brcd.shards import shard_marker
    import pipelines.ray.bank_job as pb

    run, _, _ = banked_run
    plan = pb.plan_bank(run, "distill")
    complete = pb.open_bank(pb.ensure_bank(run, plan))  # already built by the stage: nothing recomputed
    assert "all 1 shards already" in capsys.readouterr().out
    monkeypatch.setattr(pb, "bank_rows_per_shard", lambda views: 32 * views)  # 4 shards of 32 images
    plan = dataclasses.replace(plan, folder=tmp_path / "bank")
    handle = pb.ensure_bank(run, plan)
    shard_marker(plan.folder, 2).unlink()  # as if the build had died while writing shard 2
    with pytest.raises(ArtifactError, match="incomplete: 1 of 4 shards missing"):
        pb.open_bank(handle)
    capsys.readouterr()
    pb.ensure_bank(run, plan)
    assert "resuming: 3/4 shards already" in capsys.readouterr().out
    rows = np.arange(0, 128, 7), np.arange(0, 128, 7) % 4
    torch.testing.assert_close(pb.open_bank(handle).take("teacher_logits", *rows), complete.take("teacher_logits", *rows))
    foreign = dict(handle, fingerprint={**handle["fingerprint"], "views": 8})
    with pytest.raises(ArtifactError, match="views"):
        pb.open_bank(foreign)


def test_bank_settings_are_validated_in_one_line():
    from brcd.config import ConfigError, load_config

    for override, message in (("bank.views=1", "bank.views must be >= 2"), ("bank.enabled=maybe", "bank.enabled"),
                              ("bank.actors=-1", "bank.actors must be >= 0")):
        with pytest.raises(ConfigError, match=message):
            load_config("demo", [override])
    assert load_config("demo", ["bank.enabled=false"]).bank.enabled is False


@pytest.mark.ray
def test_a_tune_trial_with_every_network_frozen_trains_heads_on_the_shared_bank_without_a_train_group(
        banked_run, tmp_path, capsys):
    """The bank is built once by the driver; the trial reads it and distils in its own process on half
    a CPU (no Ray Train run under DIR/ray for it), and reports its validations to Tune."""
    import shutil

    from conftest import tiny_config
    from pipelines import tune as T

    run, _, _ = banked_run
    out = tmp_path / "job"
    shutil.copytree(run.output, out, ignore=shutil.ignore_patterns("ray", "ray_tmp", "student", "trials"))
    cfg = tiny_config(*BANKED, "resources.num_workers=1", "distill.optim.epochs=2")
    space = T.parse_space({"params": {"mask_ratio": {"grid": [0.25]}},
                           "search": {"algorithm": "grid", "num_samples": 1,
                                      "asha": {"grace_period": 1, "reduction_factor": 2}}})
    assert T._trial_resources(cfg, space, heads=True) == {"cpu": T.HEADS_ONLY_TRIAL_CPUS}
    (bank_dir,) = (out / "bank").glob("distill-*")
    built = {p.name: p.stat().st_mtime_ns for p in bank_dir.iterdir()}
    summary = T.tune_main(cfg, out, space)
    printed = capsys.readouterr().out  # the driver's lines (a trial's own lines reach the terminal, not capsys)
    (row,) = summary.rows
    assert row["status"] == "terminated" and row["epochs_run"] == 2 and row["best_map_asymmetric"] > 0
    assert "4 trial(s) at a time, heads only on the view bank, 0.5 CPU each" in printed  # 2 CPUs / 0.5
    assert {p.name: p.stat().st_mtime_ns for p in bank_dir.iterdir()} == built  # shared, not rebuilt
    ray_runs = [p.name for p in (out / "ray").glob("*")] if (out / "ray").exists() else []
    assert not [n for n in ray_runs if n.startswith("trial-")], ray_runs  # no Train run for the trial
    assert (out / "trials" / row["trial_id"] / "best_map_asymmetric.safetensors").exists()
