"""Cross-modal hashing (docs/CROSSMODAL.md): DCC against brute force, the losses against loop
references, S, the data loaders and their errors, DDP equivalence (2-process gloo), the CLI end to end."""

from __future__ import annotations

import itertools
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from brcd.crossmodal.affinity import joint_semantic_affinity, reconstruct_similarity, teacher_affinity
from brcd.crossmodal.data import (check_pairs, digits_pairs, load_mat_pairs, read_mat_matrix, split_query_database,
                                  synthetic_tags)
from brcd.crossmodal.dcc import dcc_column, dcc_terms, dcc_update
from brcd.losses.asymmetric import asymmetric_grad, asymmetric_loss, asymmetric_objective
from brcd.losses.djsrh import djsrh_loss

# --------------------------------------------------------------------------------------------
# DCC and the asymmetric objective
# --------------------------------------------------------------------------------------------


def _problem(n=4, bits=3, m=2, seed=0, gamma=0.7):
    g = torch.Generator().manual_seed(seed)
    u = torch.tanh(torch.randn(m, bits, generator=g, dtype=torch.float64))
    v = torch.tanh(torch.randn(m, bits, generator=g, dtype=torch.float64))
    s = torch.where(torch.rand(n, n, generator=g) > 0.5, 1.0, -1.0).double()
    s = torch.triu(s) + torch.triu(s, 1).T
    omega = torch.randperm(n, generator=g)[:m]
    b0 = torch.where(torch.rand(n, bits, generator=g) > 0.5, 1.0, -1.0).double()
    return u, v, s[omega], omega, b0, gamma


def _loop_objective(u, v, b, s, omega, gamma):
    """J by explicit loops over every (i, j) pair."""
    m, bits = u.shape
    total = 0.0
    for i in range(m):
        for j in range(b.shape[0]):
            total += (float(u[i] @ b[j]) - bits * float(s[i, j])) ** 2 + (float(v[i] @ b[j]) - bits * float(s[i, j])) ** 2
        total += gamma * (float(((b[omega[i]] - u[i]) ** 2).sum()) + float(((b[omega[i]] - v[i]) ** 2).sum()))
    return total


def _all_sign_matrices(rows, cols):
    for signs in itertools.product((-1.0, 1.0), repeat=rows * cols):
        yield torch.tensor(signs, dtype=torch.float64).view(rows, cols)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dcc_columns_are_exact_minimisers_and_never_increase_the_objective(seed):
    u, v, s, omega, b, gamma = _problem(seed=seed)
    n, bits = b.shape
    objective = lambda codes: float(asymmetric_objective(u, v, codes, s, omega, gamma=gamma))  # noqa: E731
    best = min(objective(c) for c in _all_sign_matrices(n, bits))  # 4,096 codes
    q, w = dcc_terms(u, v, s, omega, n, gamma=gamma)
    value = objective(b)
    for sweep in range(4):
        for l in range(bits):
            # brute force over the 2^n values of column l, the other columns fixed
            candidates = []
            for col in _all_sign_matrices(n, 1):
                c = b.clone()
                c[:, l] = col[:, 0]
                candidates.append(objective(c))
            b[:, l] = dcc_column(b, q, w, l)
            new = objective(b)
            assert new == pytest.approx(min(candidates), rel=1e-12, abs=1e-9)
            assert new <= value + 1e-9
            value = new
    assert value >= best - 1e-9
    # dcc_update = the same sweeps
    u2, v2, s2, omega2, b2, _ = _problem(seed=seed)
    assert torch.equal(dcc_update(b2, u2, v2, s2, omega2, gamma=gamma, sweeps=4), b)


def test_dcc_tie_keeps_the_current_value_and_bad_codes_are_refused():
    n, bits = 3, 2
    b = torch.tensor([[1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]])
    zero = torch.zeros(1, bits)
    # u = v = 0 and gamma = 0: every argument is 0 -> nothing changes
    out = dcc_update(b, zero, zero, torch.ones(1, n), torch.tensor([0]), gamma=0.0)
    assert torch.equal(out, b)
    with pytest.raises(ValueError, match=r"codes must be in \{-1, \+1\}"):
        dcc_update(b * 0.5, zero, zero, torch.ones(1, n), torch.tensor([0]), gamma=0.0)
    with pytest.raises(ValueError, match="similarity must be"):
        dcc_update(b, zero, zero, torch.ones(2, n), torch.tensor([0]), gamma=0.0)


def test_asymmetric_objective_and_gradient_against_loops_and_autograd():
    u, v, s, omega, b, gamma = _problem(n=6, bits=4, m=3, seed=3)
    assert float(asymmetric_objective(u, v, b, s, omega, gamma=gamma)) == pytest.approx(
        _loop_objective(u, v, b, s, omega, gamma), rel=1e-12)
    uu, vv = u.clone().requires_grad_(True), v.clone().requires_grad_(True)
    asymmetric_objective(uu, vv, b, s, omega, gamma=gamma).backward()
    du, dv = asymmetric_grad(u, v, b, s, omega, gamma=gamma)
    torch.testing.assert_close(uu.grad, du)
    torch.testing.assert_close(vv.grad, dv)
    # loop gradient of one entry
    i, k, bits = 1, 2, b.shape[1]
    ref = sum(2 * (float(u[i] @ b[j]) - bits * float(s[i, j])) * float(b[j, k]) for j in range(b.shape[0]))
    ref += 2 * gamma * (float(u[i, k]) - float(b[omega[i], k]))
    assert float(du[i, k]) == pytest.approx(ref, rel=1e-12)
    assert float(asymmetric_loss(u, v, b, s, omega, gamma=gamma)) == pytest.approx(
        _loop_objective(u, v, b, s, omega, gamma) / (3 * 6), rel=1e-12)
    with pytest.raises(ValueError, match="omega must index"):
        asymmetric_objective(u, v, b, s, omega + 100, gamma=gamma)
    with pytest.raises(ValueError, match="gamma must be a finite number >= 0"):
        asymmetric_objective(u, v, b, s, omega, gamma=-1)


# --------------------------------------------------------------------------------------------
# Teacher loss, affinities, S
# --------------------------------------------------------------------------------------------


def test_djsrh_loss_against_a_loop_reference_and_gradcheck():
    g = torch.Generator().manual_seed(0)
    bi = torch.tanh(torch.randn(5, 4, generator=g, dtype=torch.float64))
    bt = torch.tanh(torch.randn(5, 4, generator=g, dtype=torch.float64))
    a = torch.rand(5, 5, generator=g, dtype=torch.float64)
    a = (a + a.T) / 2
    mu, w = 1.5, (0.1, 1.0, 0.3)

    def cos(x, y):
        return float(x @ y) / (float(x.norm()) * float(y.norm()))

    ref = 0.0
    for wk, (x, y) in zip(w, ((bi, bi), (bi, bt), (bt, bt))):
        ref += wk * sum((cos(x[i], y[j]) - mu * float(a[i, j])) ** 2 for i in range(5) for j in range(5)) / 25
    got = djsrh_loss(bi, bt, a, mu=mu, lambda_ii=w[0], lambda_it=w[1], lambda_tt=w[2])
    assert float(got) == pytest.approx(ref, rel=1e-12)
    assert torch.autograd.gradcheck(lambda x, y: djsrh_loss(x, y, a, mu=mu), (bi.clone().requires_grad_(True),
                                                                          bt.clone().requires_grad_(True)))
    with pytest.raises(ValueError, match=r"affinity must be a \(5, 5\) tensor"):
        djsrh_loss(bi, bt, a[:4, :4])


def test_joint_affinity_against_a_loop_reference():
    g = torch.Generator().manual_seed(1)
    fi, ft = torch.randn(6, 3, generator=g), torch.rand(6, 5, generator=g)
    beta, eta = 0.6, 0.4
    got = joint_semantic_affinity(fi, ft, beta=beta, eta=eta).double()
    n = 6
    cos = lambda x, y: float(x @ y) / (float(x.norm()) * float(y.norm()))  # noqa: E731
    st = np.array([[beta * cos(fi[i], fi[j]) + (1 - beta) * cos(ft[i], ft[j]) for j in range(n)] for i in range(n)])
    ref = (1 - eta) * st + eta * np.array([[sum(st[i, k] * st[j, k] for k in range(n)) / n for j in range(n)]
                                           for i in range(n)])
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-6)
    assert torch.equal(got, got.T)


@pytest.mark.parametrize("source", ["codes", "features", "both"])
@pytest.mark.parametrize("rule", ["topk", "threshold", "continuous"])
def test_reconstructed_similarity_is_symmetric(source, rule):
    g = torch.Generator().manual_seed(2)
    a = teacher_affinity(torch.randn(30, 8, generator=g), torch.randn(30, 8, generator=g), source)
    assert torch.allclose(a, a.T, atol=1e-6) and a.abs().max() <= 1 + 1e-6
    s = reconstruct_similarity(a, rule=rule, k=5, threshold=0.1)
    assert torch.equal(s, s.T)
    if rule != "continuous":
        assert set(s.unique().tolist()) <= {-1.0, 1.0} and bool((s.diag() == 1).all())
    if rule == "topk":  # each row has at least its k nearest as positives (OR-symmetrised)
        assert int((s > 0).sum(1).min()) >= 5


def test_topk_rule_against_a_loop_reference():
    a = torch.tensor([[1.0, 0.9, 0.1, 0.2], [0.9, 1.0, 0.3, 0.3], [0.1, 0.3, 1.0, 0.8], [0.2, 0.3, 0.8, 1.0]])
    s = reconstruct_similarity(a, rule="topk", k=2)
    ref = -np.ones((4, 4))
    for i in range(4):
        order = sorted(range(4), key=lambda j: (-float(a[i, j]), j))[:2]
        for j in order:
            ref[i, j] = ref[j, i] = 1
    np.fill_diagonal(ref, 1)
    np.testing.assert_array_equal(s.numpy(), ref)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def test_digits_pairs_are_real_images_with_seeded_synthetic_tags():
    d = digits_pairs(image_size=16, seed=3)
    assert d.images.shape == (1797, 3, 16, 16) and 0 <= d.images.min() and d.images.max() <= 1
    assert d.tags.shape == (1797, 10 * 4 + 24) and d.labels.shape == (1797, 10)
    assert (d.tags.sum(1) >= 1).all() and (d.labels.sum(1) == 1).all()
    assert np.array_equal(d.tags, digits_pairs(image_size=16, seed=3).tags)
    assert not np.array_equal(d.tags, digits_pairs(image_size=16, seed=4).tags)
    classes = d.labels.argmax(1)
    own = d.tags[np.arange(1797)[:, None], classes[:, None] * 4 + np.arange(4)]
    assert 0.5 < own.mean() < 0.62  # keep_prob 0.5 plus the random extra tags that land there


def test_synthetic_tags_keep_every_true_tag_at_keep_prob_one():
    tags, vocab = synthetic_tags(np.array([0, 1, 2]), 3, tags_per_class=2, noise_tags=1, keep_prob=1.0, extra_tags=0.0,
                                 seed=0)
    np.testing.assert_array_equal(tags, np.array([[1, 1, 0, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1, 0]]))
    assert vocab[-1] == "noise0"


def _write_dataset(root, n, vocab, labels, *, key_tags="YAll", key_labels="LAll", missing=None, zero=False):
    import scipy.io
    from PIL import Image

    (root / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        name = f"img/{i}.png"
        if i != missing:
            Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(root / name)
        lines.append(name + " 0 1")
    (root / "images.txt").write_text("\n".join(lines) + "\n")
    tags = np.zeros((n, vocab)) if zero else (rng.random((n, vocab)) < 0.1).astype(np.float64)
    lab = (rng.random((n, labels)) < 0.3).astype(np.uint8)
    scipy.io.savemat(root / "tags.mat", {key_tags: tags})
    scipy.io.savemat(root / "labels.mat", {key_labels: lab})


@pytest.mark.parametrize("dataset, vocab, labels", [("mirflickr", 1386, 24), ("nuswide", 1000, 10), ("nuswide", 1000, 21)])
def test_mat_loaders_read_the_shipped_format(tmp_path, dataset, vocab, labels):
    from brcd.crossmodal.data import load_images

    _write_dataset(tmp_path, 5, vocab, labels)
    d = load_mat_pairs(tmp_path, dataset)
    assert d.tags.shape == (5, vocab) and d.labels.shape == (5, labels) and len(d.paths) == 5
    imgs = load_images(d.paths, 8)
    assert imgs.shape == (5, 3, 8, 8) and imgs.dtype == np.float32


@pytest.mark.parametrize("case, needle", [
    ("width", "tag vectors have 1000 entries, expected 1386"),
    ("missing", "pair 2: image img/2.png (line 3 of images.txt) does not exist"),
    ("zero", "empty vocabulary (the tag matrix is all zero"),
    ("key", "tags.mat has no matrix 'YAll'; it has XAll"),
    ("labels", "mirflickr labels.mat: 10 labels, expected 24"),
    ("hdf5", "is not a readable MATLAB v7.3 (HDF5) file"),
])
def test_mat_loaders_bad_input_one_line_errors(tmp_path, case, needle):
    kwargs = {"width": dict(vocab=1000), "missing": dict(missing=2), "zero": dict(zero=True),
              "key": dict(key_tags="XAll"), "labels": dict(labels=10)}.get(case, {})
    spec = {"vocab": 1386, "labels": 24} | {k: kwargs.pop(k) for k in ("vocab", "labels") if k in kwargs}
    _write_dataset(tmp_path, 4, spec["vocab"], spec["labels"], **kwargs)
    if case == "hdf5":
        (tmp_path / "tags.mat").write_bytes(b"MATLAB 7.3 MAT-file, Platform: GLNXA64" + b" " * 90 + b"\x89HDF\r\n")
    with pytest.raises((ValueError, FileNotFoundError)) as exc:
        load_mat_pairs(tmp_path, "mirflickr")
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_check_pairs_errors():
    with pytest.raises(ValueError, match=r"empty vocabulary \(the tag matrix has 0 columns\)"):
        check_pairs(np.zeros((3, 0)), np.ones((3, 2)), 3)
    with pytest.raises(ValueError, match="2 images for 3 tag rows"):
        check_pairs(np.ones((3, 4)), np.ones((3, 2)), 2)
    with pytest.raises(ValueError, match="2 label rows for 3 tag rows"):
        check_pairs(np.ones((3, 4)), np.ones((2, 2)), 3)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_mat_matrix("/nonexistent/tags.mat", "YAll")
    q, db = split_query_database(10, 3, 0)
    assert len(q) == 3 and len(db) == 7 and not set(q) & set(db)
    with pytest.raises(ValueError, match="query size 10 must be in"):
        split_query_database(10, 10, 0)


def test_crossmodal_config_errors_are_one_line():
    from brcd.config import ConfigError, load_config

    for override, needle in (("crossmodal.similarity.rule=knn", "crossmodal.similarity.rule: 'knn' is not allowed"),
                             ("crossmodal.data.source=mirflickr", "crossmodal.data.root is required"),
                             ("crossmodal.teacher.beta=2", "crossmodal.teacher.beta must be in [0, 1]"),
                             ("crossmodal.student.bitz=3", "unknown key 'crossmodal.student.bitz'")):
        with pytest.raises(ConfigError) as exc:
            load_config("demo_crossmodal", [override])
        assert needle in str(exc.value) and "\n" not in str(exc.value)


# --------------------------------------------------------------------------------------------
# DDP equivalence: 2 gloo processes vs one process on the whole batch
# --------------------------------------------------------------------------------------------

TEACHER = SimpleNamespace(bits=6, hidden_dim=16, epochs=1, batch_size=12, lr=1e-2, alpha=1.0, mu=1.5, lambda_ii=0.1,
                          lambda_it=1.0, lambda_tt=0.1)
STUDENT = SimpleNamespace(bits=6, hidden_dim=16, outer_iters=2, inner_epochs=1, sample_size=14, batch_size=7, lr=1e-2,
                          gamma=5.0, dcc_sweeps=2)


def _tiny_inputs():
    g = torch.Generator().manual_seed(0)
    feats, tags = torch.randn(23, 5, generator=g).double(), (torch.rand(23, 9, generator=g) < 0.3).double()
    aff = joint_semantic_affinity(feats, tags, beta=0.5, eta=0.3).double()
    return feats, tags, aff, reconstruct_similarity(aff, rule="topk", k=4).double()


def _train_both():
    from brcd.crossmodal.train import train_student, train_teacher

    torch.set_default_dtype(torch.float64)
    feats, tags, aff, sim = _tiny_inputs()
    t = train_teacher(feats, tags, aff, TEACHER, seed=0)
    s = train_student(feats, tags, sim, STUDENT, seed=0)
    return {"teacher": {k: v.clone() for k, v in t["image"].state_dict().items()},
            "student": {k: v.clone() for k, v in s["image"].state_dict().items()} | {
                f"text.{k}": v.clone() for k, v in s["text"].state_dict().items()},
            "codes": s["codes"].clone(), "history": s["history"]}


def _ddp_worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.save(_train_both(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_workers_train_what_one_process_trains(tmp_path):
    """Teacher and student (SGD steps, DCC on rank 0 + broadcast) under a 2-process gloo group equal
    one process on the same global batches: same weights (to float64 rounding), identical B."""
    previous = torch.get_default_dtype()
    try:
        single = _train_both()
    finally:
        torch.set_default_dtype(previous)
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.equal(got["codes"], single["codes"])
        for part in ("teacher", "student"):
            for k, v in single[part].items():
                torch.testing.assert_close(got[part][k], v, rtol=1e-9, atol=1e-10)
        for h, ref in zip(got["history"], single["history"]):
            assert h["objective_after_dcc"] <= h["objective_before_dcc"]
            assert h["objective_after_dcc"] == pytest.approx(ref["objective_after_dcc"], rel=1e-9)


# --------------------------------------------------------------------------------------------
# End to end: the README command, small
# --------------------------------------------------------------------------------------------

SMALL = ["--set", "crossmodal.teacher.epochs=15", "--set", "crossmodal.student.outer_iters=4",
         "--set", "crossmodal.student.inner_epochs=1", "--set", "crossmodal.data.query=100", "--workers", "0"]


def _doc_lines(doc: str, prefix: str) -> list[str]:
    """The `brcd` lines of a doc's bash blocks that start with ``prefix`` (comments dropped)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / doc).read_text()
    lines = [line.split(" #")[0].strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)
             for line in block.replace("\\\n", " ").splitlines()]
    return [line for line in lines if line.startswith(prefix)]


def test_cli_crossmodal_end_to_end(tmp_path, capsys, monkeypatch):
    """`brcd crossmodal -c demo_crossmodal --output runs/crossmodal` as README.md and docs/CROSSMODAL.md show
    it (small sizes, local mode: no Ray started): results JSON with I->T / T->I of the three models, one MLflow
    run per stage, a second run skips the finished seed; then the documented encode / search lines."""
    import shlex

    from pipelines.cli import main

    monkeypatch.chdir(tmp_path)
    command = "brcd crossmodal -c demo_crossmodal --output runs/crossmodal"
    assert command in _doc_lines("README.md", "brcd crossmodal") and command in _doc_lines("docs/CROSSMODAL.md", command)
    out = tmp_path / "runs" / "crossmodal"
    assert main([*shlex.split(command)[1:], *SMALL]) == 0
    summary = json.loads((out / "crossmodal_results.json").read_text())
    assert set(summary["maps"]) == {"teacher", "student", "student_no_teacher"}
    for model, tasks in summary["maps"].items():
        for task in ("i2t", "t2i", "i2i", "t2t"):
            assert 0.0 <= tasks[task]["mean"] <= 1.0
    # above chance (~0.1 on 10 balanced digit classes): measured i2t/t2i 0.134, i2i 0.22, t2t 0.32 at this budget
    teacher = {t: summary["maps"]["teacher"][t]["mean"] for t in ("i2t", "t2i", "i2i", "t2t")}
    assert min(teacher["i2t"], teacher["t2i"]) > 0.12 and min(teacher["i2i"], teacher["t2t"]) > 0.16, teacher
    assert summary["num_queries"] == 100 and summary["num_database"] == 1697
    assert (out / "crossmodal_results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    seed_dir = out / "crossmodal" / "seed0"
    codes = np.load(seed_dir / "student" / "codes.npz")["codes"]
    assert codes.shape == (1697, 32) and set(np.unique(codes)) <= {-1, 1}
    assert sorted(p.name for p in (seed_dir / "student").iterdir()) == [
        "codes.npz", "history.json", "image.safetensors", "text.safetensors"]
    history = json.loads((seed_dir / "student" / "history.json").read_text())
    assert all(h["objective_after_dcc"] <= h["objective_before_dcc"] for h in history)
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("brcd-demo-crossmodal")
    names = sorted(r.info.run_name for r in client.search_runs([exp.experiment_id]))
    assert names == sorted(["crossmodal-demo_crossmodal", "crossmodal-teacher-seed0", "crossmodal-student-seed0",
                            "crossmodal-student_no_teacher-seed0"])
    capsys.readouterr()
    assert main([*shlex.split(command)[1:], *SMALL]) == 0
    assert "already done" in capsys.readouterr().out
    _search_across_modalities(out, capsys)


@pytest.mark.ray
def test_two_ray_train_workers_give_the_mAPs_of_one_process(tmp_path, ray_local):
    """The job on 2 Ray Train workers (DDP over gloo, S and B broadcast from rank 0) and in local mode:
    the same twelve mAPs (float32 sums in another order differ in the last bits; a short run keeps that
    away from the third decimal)."""
    from pipelines.cli import main

    short = ["--set", "crossmodal.teacher.epochs=2", "--set", "crossmodal.student.outer_iters=2",
             "--set", "crossmodal.student.inner_epochs=1", "--set", "crossmodal.data.query=100",
             "--set", "tracking.enabled=false"]
    maps = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        assert main(["crossmodal", "-c", "demo_crossmodal", "--output", str(out), "--workers", str(workers), *short]) == 0
        maps[workers] = json.loads((out / "crossmodal_results.json").read_text())["maps"]
    for model, tasks in maps[0].items():
        for task, v in tasks.items():
            assert maps[2][model][task]["mean"] == pytest.approx(v["mean"], abs=2e-3), (model, task)


def _hits(text: str) -> list[list[int]]:
    """The ids `brcd search` printed, per query."""
    out: list[list[int]] = []
    for line in text.splitlines():
        if line.startswith("query "):
            out.append([])
        elif out and line.split() and line.split()[0].isdigit():
            out[-1].append(int(line.split()[2]))
    return out


def _search_across_modalities(out, capsys):
    """docs/CROSSMODAL.md's `brcd encode` / `brcd search` lines as written (the README's are among them), with
    the registered student and its exported folder: images and texts encoded into codes parquets, text queries
    against the image database, image queries against the text database, text queries against B; plus
    `brcd pull`. The codes are the model's own."""
    import shlex

    from PIL import Image

    from brcd.codes import unpack_codes
    from brcd.crossmodal.data import digits_pairs
    from brcd.crossmodal.export import load_crossmodal
    from brcd.models.encoder import read_codes_parquet
    from pipelines.cli import main

    export = out / "crossmodal" / "export"
    model = load_crossmodal(export)
    db = model.database
    data = digits_pairs(image_size=32, seed=0)
    ids = db["ids"][:6]
    np.save("db_tags.npy", data.tags[ids])
    np.save("queries.npy", data.tags[ids[:3]])
    os.mkdir("photos")
    for j in ids:
        Image.fromarray((data.images[j].transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(f"photos/{j:05d}.png")
    for i in (1, 2):
        Image.open(f"photos/{ids[i - 1]:05d}.png").save(f"photo{i}.png")
    assert main(["pull", "models:/brcd-crossmodal@champion", "--run-dir", str(out), "--output", "pulled"]) == 0
    assert "cross-modal" in capsys.readouterr().out
    np.testing.assert_array_equal(load_crossmodal("pulled").database["codes"], db["codes"])

    lines = _doc_lines("docs/CROSSMODAL.md", "brcd encode") + _doc_lines("docs/CROSSMODAL.md", "brcd search")
    readme = [c for c in _doc_lines("README.md", "brcd ") if "crossmodal@" in c or "crossmodal/export" in c]
    assert len(lines) == 5 and readme and set(readme) <= set(lines), (lines, readme)
    printed = []
    for line in lines:
        capsys.readouterr()
        assert main(shlex.split(line)[1:]) == 0, line
        printed.append(capsys.readouterr().out)
    _, paths, packed, bits = read_codes_parquet("text_codes.parquet")
    assert bits == 32 and paths[0] == "db_tags.npy#0"
    np.testing.assert_array_equal(unpack_codes(packed, 32), db["text_codes"][:6])
    _, _, packed, _ = read_codes_parquet("image_codes.parquet")
    assert (unpack_codes(packed, 32) == db["image_codes"][:6]).mean() > 0.95  # PNG round trip of the pixels
    text_to_image, image_to_text, text_to_pairs = printed[2:]
    assert text_to_image.count("(text query; image_codes.parquet: 6 codes") == 3
    assert [sorted(h) for h in _hits(text_to_image)] == [list(range(6))] * 3  # -k 10 > 6 codes: all of them
    assert image_to_text.count("(image query; text_codes.parquet: 6 codes") == 2
    # the nearest pair code of each stored text is at distance min d(g(y), B)
    assert text_to_pairs.count("(text query; the model's pairs: 1697 codes") == 3
    b = db["codes"].astype(np.int32)
    best = ((32 - db["text_codes"][:3].astype(np.int32) @ b.T) // 2).min(axis=1)
    got = [int(line.split()[1]) for line in text_to_pairs.splitlines() if line.split()[:1] == ["1"]]
    assert got == best.tolist()
    # the sharded path (what Ray encoder actors run; --actors 0: the same predictor in this process)
    assert main(["encode", "--model", str(export), "--images", "photos", "--output", "shards", "--actors", "0",
                 "--shard-rows", "128"]) == 0
    _, paths_s, packed_s, bits_s = read_codes_parquet("shards")
    _, paths_1, packed_1, _ = read_codes_parquet("image_codes.parquet")
    assert bits_s == 32 and paths_s == paths_1 and np.array_equal(packed_s, packed_1)
    np.save("wide.npy", np.ones((2, 65), dtype=np.float32))  # the model's vocabulary has 64 words
    capsys.readouterr()
    assert main(["search", "--model", str(export), "--query-tags", "wide.npy", "--database", "pairs"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tag vectors must be (N, 64) for this model (its vocabulary), got shape (2, 65)" in err[0]


def test_image_models_refuse_text_options_in_one_line(tmp_path, capsys):
    """--tags / --query-tags / --database need a cross-modal model; --actors cannot encode tags."""
    from brcd.config import ModelConfig
    from brcd.models.encoder import export_model
    from brcd.models.nets import create_hashing_model
    from pipelines.cli import main

    mc = ModelConfig(backbone="test_resnet", bits=16, head="mlp", hidden_dim=32)
    folder = export_model(tmp_path / "m", create_hashing_model(mc), mc, {"image_size": 32})
    np.save(tmp_path / "t.npy", np.ones((2, 5), dtype=np.float32))
    for argv, needle in (
        (["encode", "--model", str(folder), "--tags", str(tmp_path / "t.npy"), "--output", str(tmp_path / "c.parquet")],
         "is an image model; --tags needs a cross-modal model"),
        (["search", "--model", str(folder), "--query-tags", str(tmp_path / "t.npy"), "--database", "pairs"],
         "is an image model; --database needs a cross-modal model"),
        (["encode", "--model", str(folder), "--tags", str(tmp_path / "t.npy"), "--output", str(tmp_path / "c"),
          "--actors", "0"], "--tags encodes in this process"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err


def test_tag_files_npy_and_mat_and_hdf5(tmp_path):
    """Query / database tag matrices: .npy, .mat:KEY (v7, dense and sparse) and MATLAB v7.3 (HDF5, stored
    column-major behind a 512-byte userblock, dense and sparse as MATLAB writes them)."""
    import h5py
    import scipy.io
    import scipy.sparse

    from brcd.crossmodal.data import read_tag_matrix

    tags = (np.random.default_rng(0).random((5, 7)) < 0.3).astype(np.float32)
    np.save(tmp_path / "t.npy", tags)
    scipy.io.savemat(tmp_path / "t.mat", {"YAll": tags, "Q": scipy.sparse.csc_matrix(tags)})
    np.testing.assert_array_equal(read_tag_matrix(str(tmp_path / "t.npy")), tags)
    np.testing.assert_array_equal(read_tag_matrix(str(tmp_path / "t.mat")), tags)
    np.testing.assert_array_equal(read_tag_matrix(f"{tmp_path / 't.mat'}:Q"), tags)
    sp = scipy.sparse.csc_matrix(tags)
    with h5py.File(tmp_path / "h.mat", "w", userblock_size=512) as fh:
        fh.create_dataset("YAll", data=tags.T.astype(np.float64))
        g = fh.create_group("S")
        g.attrs["MATLAB_sparse"] = np.uint64(tags.shape[0])
        for k, v in (("data", sp.data), ("ir", sp.indices.astype(np.uint64)), ("jc", sp.indptr.astype(np.uint64))):
            g.create_dataset(k, data=v)
    with open(tmp_path / "h.mat", "r+b") as fh:
        fh.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Tue Dec  1 2026 HDF5 schema 1.00 .")
    np.testing.assert_array_equal(read_tag_matrix(str(tmp_path / "h.mat")), tags)
    np.testing.assert_array_equal(read_tag_matrix(f"{tmp_path / 'h.mat'}:S"), tags)
    for spec, needle in ((f"{tmp_path / 'h.mat'}:Z", "h.mat has no matrix 'Z'; it has S, YAll"),
                         (str(tmp_path / "t.txt"), "does not exist"),
                         (str(tmp_path / "t.npy") + "x", "does not exist")):
        with pytest.raises((ValueError, FileNotFoundError), match=needle):
            read_tag_matrix(spec)
    (tmp_path / "t.csv").write_text("1,0\n")
    with pytest.raises(ValueError, match="must be a .npy array or a .mat file"):
        read_tag_matrix(str(tmp_path / "t.csv"))


def test_timm_extractor_from_a_local_weights_file_travels_with_the_export(tmp_path):
    """image_weights loads the backbone from a local file (no download); the exported folder carries those
    weights, so the loaded model encodes images exactly as the networks did in training."""
    import torch

    from brcd.config import ConfigError, load_config
    from brcd.crossmodal.export import export_crossmodal, load_crossmodal
    from brcd.crossmodal.nets import HashMLP, codes_of, create_feature_extractor, extract_features
    from brcd.io import save_state_dict
    from brcd.models.nets import create_backbone

    torch.manual_seed(5)
    save_state_dict(tmp_path / "bb.safetensors", create_backbone("test_resnet").state_dict())
    ext, width = create_feature_extractor("test_resnet", 32, weights=str(tmp_path / "bb.safetensors"))
    random_ext, _ = create_feature_extractor("test_resnet", 32)
    images = np.random.default_rng(0).random((6, 3, 32, 32), dtype=np.float32)
    feats = extract_features(ext, images)
    assert not torch.allclose(feats, extract_features(random_ext, images))
    torch.manual_seed(0)
    f, g = HashMLP(width, 16, 32), HashMLP(7, 16, 32)
    db = {"codes": np.ones((2, 16), np.int8), "image_codes": np.ones((2, 16), np.int8),
          "text_codes": np.ones((2, 16), np.int8), "ids": np.arange(2)}
    folder = export_crossmodal(tmp_path / "m", f, g, extractor="test_resnet", image_size=32, database=db,
                               extractor_module=ext)
    model = load_crossmodal(folder)
    np.testing.assert_array_equal(model.encode_images(images), codes_of(f, feats))
    with pytest.raises(ConfigError, match="need a timm image_backbone, not pixels"):
        load_config("demo_crossmodal", [f"crossmodal.teacher.image_weights={tmp_path / 'bb.safetensors'}"])
    with pytest.raises(ConfigError, match="crossmodal.teacher.image_weights: file .* does not exist"):
        load_config("demo_crossmodal", ["crossmodal.teacher.image_backbone=test_resnet",
                                        "crossmodal.teacher.image_weights=/nonexistent.safetensors"])


def test_limit_takes_a_seeded_subset_and_memory_is_checked_before_the_slow_work(monkeypatch):
    """crossmodal.data.limit: a seeded subset of pairs (the export's ids are the source rows); a database
    whose n x n matrices cannot fit fails at once with one line naming the limit that would."""
    from brcd.config import ConfigError, load_config
    from brcd.crossmodal import flow
    from brcd.crossmodal.data import limit_pairs

    data = digits_pairs(image_size=8, seed=0)
    a, b = limit_pairs(data, 300, seed=1), limit_pairs(data, 300, seed=1)
    assert len(a) == 300 and np.array_equal(a.rows, b.rows) and np.all(np.diff(a.rows) > 0)
    np.testing.assert_array_equal(a.tags, data.tags[a.rows])
    assert not np.array_equal(limit_pairs(data, 300, seed=2).rows, a.rows)
    assert limit_pairs(data, None, seed=1) is data and limit_pairs(data, 5000, seed=1) is data
    cfg = load_config("demo_crossmodal", ["crossmodal.data.limit=400", "crossmodal.data.query=100",
                                          "crossmodal.data.image_size=8"])
    p = flow.prepare(cfg, 0)
    assert len(p.database_index) == 300 and len(p.query_index) == 100
    assert set(p.database_rows) <= set(range(1797)) and len(set(p.database_rows)) == 300
    with pytest.raises(ConfigError, match="limit must leave a database of at least 2 pairs"):
        load_config("demo_crossmodal", ["crossmodal.data.limit=251"])
    flow.check_memory(1000, 2, available=10 * 2**30)  # 0.14 GiB: fits
    with pytest.raises(ValueError) as exc:
        flow.check_memory(20_000, 2, available=24 * 2**30)
    msg = str(exc.value)
    assert "20,000 database pairs need about 55.9 GiB" in msg and "set crossmodal.data.limit (about 13,1" in msg
    assert "\n" not in msg
    monkeypatch.setattr(flow, "available_memory", lambda: 2**20)  # 1 MiB: even the demo cannot fit
    with pytest.raises(ValueError, match="1,547 database pairs need about"):
        flow.prepare(load_config("demo_crossmodal"), 0)
