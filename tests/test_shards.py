"""brcd.shards (the sharded output folder) and pipelines.ray.batch_inference in-process (num_actors=0):
written values against the arrays computed in one piece, resume after lost / truncated shards,
refusals of incomplete and foreign folders. The Ray path is tested through `brcd encode --actors`
(tests/test_encode_ray.py)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from brcd.io import ArtifactError
from brcd.shards import (
    FINGERPRINT_JSON, finished_shards, open_sharded, plan_shards, shard_marker, shard_npy, shard_parquet, start_sharded,
)
from pipelines.ray.batch_inference import run_sharded_inference

N, SHARD = 23, 5  # 5 shards, the last one short
FP = {"model": "abc123", "inputs": 23}


def reference(start: int, stop: int) -> dict[str, np.ndarray]:
    """Every column a function of the row number, so any misplaced row shows."""
    rows = np.arange(start, stop)
    return {
        "code": ((rows[:, None] * 7 + np.arange(3)) % 256).astype(np.uint8),  # (n, 3) uint8: fixed-size binary
        "score": (rows * 0.5).astype(np.float32),
        "emb": (rows[:, None, None] + np.arange(6).reshape(2, 3)).astype(np.float64),
        "name": np.array([f"img{r}" * (1 + r % 3) for r in rows]),  # str of varying width per shard
    }


class Predictor:
    calls: list[tuple[int, int]] = []  # in-process runs only: the rows each call computed

    def __init__(self, offset: int = 0, fail_at: int | None = None):
        self.offset, self.fail_at = offset, fail_at

    def __call__(self, start: int, stop: int) -> dict[str, np.ndarray]:
        if self.fail_at is not None and start <= self.fail_at < stop:
            raise RuntimeError(f"boom at row {self.fail_at}")
        Predictor.calls.append((start, stop))
        out = reference(start + self.offset, stop + self.offset)
        return out


@pytest.fixture(autouse=True)
def _clear_calls():
    Predictor.calls = []


def run(out, writer="npy", **kwargs):
    return run_sharded_inference(out, N, SHARD, Predictor, kwargs, fingerprint=FP, writer=writer, num_actors=0,
                                 progress=None)


def test_plan_shards_covers_every_row_once():
    assert plan_shards(0, 5) == []
    assert plan_shards(10, 3) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert plan_shards(6, 6) == [(0, 6)] and plan_shards(2, 9) == [(0, 2)]
    for bad in ((-1, 3), (5, 0), (5, 1.5), (True, 2)):
        with pytest.raises(ValueError, match="must be a"):
            plan_shards(*bad)


@pytest.mark.parametrize("writer", ["npy", "parquet"])
def test_written_columns_equal_the_one_piece_arrays(tmp_path, writer):
    summary = run(tmp_path / "out", writer)
    assert (summary["shards"], summary["computed_shards"], summary["skipped_shards"]) == (5, 5, 0)
    assert sorted(Predictor.calls) == plan_shards(N, SHARD)
    out = open_sharded(tmp_path / "out", expect_fingerprint=FP)
    ref = reference(0, N)
    assert list(out) == list(ref) and out.num_rows == N and out.fingerprint == FP
    for name, want in ref.items():
        col = out[name]
        assert col.shape == want.shape and len(col) == N and col.dtype == want.dtype, (name, col.shape, col.dtype)
        np.testing.assert_array_equal(col.to_array(), want)
        # across shards, out of order, with duplicates, as a 2-D index array, and empty
        idx = np.array([[22, 0, 5], [4, 4, 21]])
        np.testing.assert_array_equal(col.take(idx), want[idx])
        np.testing.assert_array_equal(col.take([]), want[:0])
        with pytest.raises(IndexError, match="row 23 is out of range"):
            col.take([3, 23])
    if writer == "npy":
        assert isinstance(out["code"]._shard(1), np.memmap)  # mmap: rows are read on demand
        assert shard_npy(tmp_path / "out", 0, "code").is_file()
    else:  # every shard is a self-describing parquet file carrying the fingerprint
        import pyarrow.parquet as pq

        schema = pq.read_schema(shard_parquet(tmp_path / "out", 4))
        assert schema.metadata[b"model"] == b"abc123" and schema.metadata[b"inputs"] == b"23"
        assert str(schema.field("code").type) == "fixed_size_binary[3]"


def test_resume_redoes_only_lost_or_truncated_shards(tmp_path):
    out = tmp_path / "out"
    run(out)
    before = {name: col.to_array() for name, col in open_sharded(out).items()}
    shard_marker(out, 1).unlink()  # died after its files, before the marker
    path = shard_npy(out, 3, "emb")  # a file truncated after the marker (disk full, partial copy)
    path.write_bytes(path.read_bytes()[:-8])
    (out / ".shard-00002.code.npy.x.tmp").write_bytes(b"half")  # a killed writer's temporary file
    assert finished_shards(out) == [0, 2, 4]
    with pytest.raises(ArtifactError, match=r"incomplete: 2 of 5 shards missing \(first: shard 1, rows 5..10\); run the same job again"):
        open_sharded(out)
    Predictor.calls = []
    summary = run(out)
    assert sorted(Predictor.calls) == [(5, 10), (15, 20)]
    assert (summary["computed_shards"], summary["skipped_shards"]) == (2, 3)
    assert not list(out.glob(".*.tmp"))
    for name, col in open_sharded(out).items():
        np.testing.assert_array_equal(col.to_array(), before[name])
    Predictor.calls = []
    assert run(out)["computed_shards"] == 0 and Predictor.calls == []


def test_failed_job_leaves_finished_shards_and_refuses_to_open(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom at row 12"):
        run(out, fail_at=12)
    assert finished_shards(out) == [0, 1]
    with pytest.raises(ArtifactError, match="3 of 5 shards missing"):
        open_sharded(out)
    run(out)
    assert finished_shards(out) == [0, 1, 2, 3, 4]


def test_foreign_folder_is_refused_naming_the_keys(tmp_path):
    out = tmp_path / "out"
    run(out)
    with pytest.raises(ArtifactError, match=r"another job \(model \(stored \"abc123\", now \"zzz\"\)\); write to another folder"):
        run_sharded_inference(out, N, SHARD, Predictor, {}, fingerprint={**FP, "model": "zzz"}, num_actors=0, progress=None)
    with pytest.raises(ArtifactError, match=r"num_rows \(stored 23, now 24\); shard_rows \(stored 5, now 6\)"):
        start_sharded(out, FP, num_rows=24, shard_rows=6)
    with pytest.raises(ArtifactError, match=r"writer \(stored \"npy\", now \"parquet\"\)"):
        start_sharded(out, FP, num_rows=N, shard_rows=SHARD, writer="parquet")
    with pytest.raises(ArtifactError, match=r"written by another job \(inputs \(stored 23, now 7\)\)"):
        open_sharded(out, expect_fingerprint={**FP, "inputs": 7})
    # a marker left by another job in the folder (fingerprint.json replaced) is not trusted
    record = json.loads((out / FINGERPRINT_JSON).read_text())
    record["fingerprint"]["model"] = "other"
    (out / FINGERPRINT_JSON).write_text(json.dumps(record))
    assert finished_shards(out) == []
    (out / FINGERPRINT_JSON).unlink()
    with pytest.raises(ArtifactError, match="shard files but no fingerprint.json"):
        start_sharded(out, FP, num_rows=N, shard_rows=SHARD)
    with pytest.raises(ArtifactError, match="not a sharded output folder"):
        open_sharded(out)


def test_bad_predictor_output_is_a_one_line_error(tmp_path):
    class Short(Predictor):
        def __call__(self, start, stop):
            return {"code": np.zeros((stop - start - 1, 2))}

    class Pickled(Predictor):
        def __call__(self, start, stop):
            return {"obj": np.array([object()] * (stop - start))}

    with pytest.raises(ValueError, match=r"shard 0 \(rows 0..5\): column 'code' has shape \(4, 2\), expected 5 rows"):
        run_sharded_inference(tmp_path / "a", N, SHARD, Short, {}, fingerprint=FP, num_actors=0, progress=None)
    with pytest.raises(ValueError, match="object array"):
        run_sharded_inference(tmp_path / "b", N, SHARD, Pickled, {}, fingerprint=FP, num_actors=0, progress=None)
    with pytest.raises(ValueError, match="writer must be one of npy, parquet"):
        run_sharded_inference(tmp_path / "c", N, SHARD, Predictor, {}, fingerprint=FP, writer="csv", num_actors=0)
    assert not shard_marker(tmp_path / "a", 0).exists()


def test_progress_lines_count_shards_and_rate(tmp_path):
    lines: list[str] = []
    run_sharded_inference(tmp_path / "out", N, SHARD, Predictor, {}, fingerprint=FP, num_actors=0, label="bank",
                          unit="images", progress=lines.append)
    assert lines[-1].startswith("[bank] 5/5 shards, 23/23 images, ") and " images/s, ETA 0s" in lines[-1], lines
    shard_marker(tmp_path / "out", 4).unlink()
    lines.clear()
    run_sharded_inference(tmp_path / "out", N, SHARD, Predictor, {}, fingerprint=FP, num_actors=0, label="bank",
                          progress=lines.append)
    assert lines[0] == f"[bank] resuming: 4/5 shards already in {tmp_path / 'out'}"
    assert lines[-1].startswith("[bank] 5/5 shards, 23/23 rows")
    assert os.getpid() == json.loads(shard_marker(tmp_path / "out", 4).read_text())["pid"]
