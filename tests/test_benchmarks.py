"""Smoke tests of the step / encode / GPU benchmarks and of ``brcd bench`` (tiny models, no timing asserts)."""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a top-level folder of the checkout, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_encode, bench_gpu, bench_step  # noqa: E402

FIELDS = {"benchmark", "name", "value", "unit"}


def test_bench_step_quick_same_loss():
    setup = dataclasses.replace(bench_step.QUICK, image_size=32, batch_size=4)
    rows = bench_step.run(quick=True, repeats=1, setup=setup, loss_batches=(4,))
    assert all(FIELDS <= set(r) for r in rows)
    by_name = {r["name"].split(":")[0]: r for r in rows}
    assert by_name["project"]["unit"] == "ms/step" and by_name["project"]["value"] > 0
    for key in ("naive", "public-code-like"):
        assert by_name[key]["value"] > 0 and by_name[key]["ratio"] > 0
    loss = next(r for r in rows if r["name"].startswith("loss value"))
    assert math.isfinite(loss["project_loss"])
    assert loss["naive_loss"] == pytest.approx(loss["project_loss"], rel=1e-4)
    assert loss["public_loss"] == pytest.approx(loss["project_loss"], rel=1e-4)


def test_loop_brcd_loss_matches_project_loss_with_empty_mask():
    from brcd.losses import brcd_loss

    g = torch.Generator().manual_seed(0)
    b, bits = 6, 16
    art = bench_step.synthetic_clusters(3, bits, b, seed=1)
    masks = torch.as_tensor(art["masks"])
    masks[0] = 0  # a cluster with every bit masked: zero rows, cosine 0, no NaN
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    s = torch.randn(b, bits, generator=g)
    t = torch.where(torch.randn(b, bits, generator=g) >= 0, 1.0, -1.0)
    tp = torch.where(torch.rand(b, bits, generator=g) < 0.8, t, -t)
    cent = torch.as_tensor(art["centroids"])
    ours, _ = brcd_loss(s, t, tp, labels, masks, cent, temperature=0.3, alpha=0.8)
    loop = bench_step.loop_brcd_loss(s, t, tp, labels, masks, cent, temperature=0.3, alpha=0.8)
    assert float(loop) == pytest.approx(float(ours), rel=1e-5)


def test_bench_encode_quick_rows():
    rows = bench_encode.run(quick=True, image_size=32, batch_size=4, rounds=1, students=("test_efficientnet",))
    assert all(FIELDS <= set(r) for r in rows)
    teacher, student = rows[0], rows[1]
    assert teacher["name"].startswith("teacher test_vit") and teacher["unit"] == "images/s" and teacher["value"] > 0
    assert student["name"].startswith("student test_efficientnet") and student["ratio"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_bench_gpu_skips_without_cuda():
    rows = bench_gpu.run(quick=True)
    assert len(rows) == 1 and "skipped" in rows[0]["note"] and "cuda.is_available" in rows[0]["note"]


def test_bench_command_parses_and_finds_the_folder():
    from pipelines.commands import bench as bench_cmd

    parser = argparse.ArgumentParser(prog="brcd")
    bench_cmd.add_commands(parser.add_subparsers(dest="command"), common=None)
    args = parser.parse_args(["bench", "--quick", "--only", "step, encode", "--output", ""])
    assert args.only == "step,encode" and args.quick and args.func is bench_cmd.cmd_bench
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--only", "step,nope"])
    runner = bench_cmd.load_runner()
    assert runner.parse_only(args.only) == ["step", "encode"]


def test_bench_encode_ray_steady_rate_skips_each_actors_first_shard(tmp_path):
    """The steady rate of the encode_ray benchmark, from completion-marker times set by hand."""
    import os

    import numpy as np

    from benchmarks.bench_encode_ray import steady_rate
    from brcd.shards import shard_marker, start_sharded

    job = start_sharded(tmp_path, {"x": 1}, num_rows=50, shard_rows=10)
    for i, t in enumerate([100.0, 101.0, 103.0, 104.0, 107.0]):  # 2 actors: shards 0 and 1 include start-up
        job.write_shard(i, {"v": np.zeros(10)})
        os.utime(shard_marker(tmp_path, i), (t, t))
    assert steady_rate(tmp_path, 2, 10) == pytest.approx(30 / (107 - 101))
    assert steady_rate(tmp_path, 0, 10) == pytest.approx(40 / (107 - 100))  # in-process: one "actor"
    assert math.isnan(steady_rate(tmp_path, 5, 10))


def test_bench_mih_tiny_rows_and_registration():
    """The MIH benchmark on a tiny collection: complete rows, identical answers (it raises otherwise)."""
    from benchmarks import bench_mih, run_all
    from pipelines.commands import bench as bench_cmd

    assert "mih" in bench_cmd.BENCH_NAMES and run_all.BENCHMARKS["mih"] == "benchmarks.bench_mih"
    rows = bench_mih.run(quick=True, n_db=3000, n_queries=6, bits_list=(64,), ks=(1, 10), blocks=2)
    assert all(FIELDS <= set(r) for r in rows) and len(rows) == 2 * (2 + 2)
    speed = [r for r in rows if r["unit"].endswith("ms/query")]
    assert all(r["value"] > 0 and r["ratio"] > 0 and "answers identical" in r["note"] for r in speed)


def test_bench_tune_bank_reads_the_phases_from_the_job_log(tmp_path):
    """The tune_bank benchmark splits a job's wall time at the trials: Tune's last running-time line
    and the bank's build line."""
    from benchmarks.bench_tune_bank import _bank_seconds, _tune_seconds

    log = tmp_path / "job.log"
    log.write_text("[distill] view bank: 1000 images x 16 views of teacher_logits (0.6 MiB, built in 81.5 s); ...\n"
                   "Current time: 2026-12-02 07:30:15. Total running time: 0s\n"
                   "Current time: 2026-12-02 07:31:45. Total running time: 1min 30s\n")
    assert _tune_seconds(log) == 90 and _bank_seconds(log) == 81.5
    log.write_text("[distill] view bank: 1000 images x 16 views of teacher_logits (0.6 MiB, reused); ...\n"
                   "Total running time: 1hr 2min 3s\n")
    assert _tune_seconds(log) == 3723 and _bank_seconds(log) is None
