"""The main job on real Ray workers: `brcd demo` with 2 DDP workers (teacher, sharded encoding,
distillation, evaluation), shrunk to a few steps."""

import json

import pytest

from conftest import TINY, check_results_beat_chance, tiny_config
from pipelines.cli import main
from pipelines.stages import Run


@pytest.mark.ray
def test_demo_with_two_workers(tmp_path, ray_local, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--output", str(out), "--workers", "2"]
    for o in TINY:
        if not o.startswith("resources.num_workers"):
            args += ["--set", o]
    assert main(args) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    for key in ("teacher_images_per_second", "student_images_per_second"):
        assert results[key] > 0, key
    # the margins of tests/test_pipeline_local.py (measured there)
    check_results_beat_chance(results, Run(tiny_config(), out, write_config=False),
                              teacher_margin=0.03, symmetric_margin=0.015)
    for key in ("teacher_map", "student_map_symmetric", "student_map_asymmetric"):
        assert f"{results[key]:.4f}" in printed, key  # the printed table is results.json's
    assert "student mAP asymmetric" in printed
    teacher = json.loads((out / "teacher" / "stage.json").read_text())
    assert teacher["epochs"] == 2 and [h["epoch"] for h in teacher["history"]] == [1, 2]
    # both workers trained: Ray kept the reported checkpoints of the 2-worker runs
    assert sorted(p.name for p in (out / "ray").glob("teacher-*/epoch=*")) == ["epoch=0001", "epoch=0002"]
    # nothing the demo wrote lives outside DIR (checked for the well-known spill-over places)
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
