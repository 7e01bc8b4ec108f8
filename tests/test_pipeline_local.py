"""The four stages in Ray Train local mode (num_workers=0): outputs, skipping finished stages; the CLI parser stays light."""

import json

import pytest

from conftest import check_results_beat_chance, tiny_config
from pipelines.stages import Run, distill_stage, evaluate_stage, teacher_codes, teacher_stage


def test_distill_and_evaluate_from_a_trained_teacher(trained_run, capsys):
    run = Run(tiny_config(), trained_run)
    teacher_stage(run)  # finished with the same settings -> skipped
    assert "already trained" in capsys.readouterr().out
    info = distill_stage(run)
    assert set(info["best"]) == {"map_symmetric", "map_asymmetric"}
    assert (trained_run / "student" / "best_map_symmetric.safetensors").exists()
    results = evaluate_stage(run)
    saved = json.loads((trained_run / "results.json").read_text())
    for key in ("teacher_map", "student_map_symmetric", "student_map_asymmetric",
                "teacher_images_per_second", "student_images_per_second"):
        assert 0 <= saved[key] and saved[key] == results[key]
    q_labels, db_labels = run.bundle.labels("query"), run.bundle.labels("database")
    assert (saved["num_queries"], saved["num_database"], saved["bits"]) == (len(q_labels), len(db_labels), run.cfg.student.model.bits)
    # Measured on this config (seeds 0-2): chance 0.106, teacher 0.160-0.166, student symmetric
    # 0.138-0.176; the margins leave room for that spread.
    check_results_beat_chance(saved, run, teacher_margin=0.03, symmetric_margin=0.015)
    # results.json's teacher mAP is the one of the teacher's stored query and database codes
    from brcd.evaluation import mean_average_precision

    codes = teacher_codes(run)
    assert saved["teacher_map"] == pytest.approx(
        mean_average_precision(codes["query"], codes["database"], q_labels, db_labels, saved["topk"]), abs=1e-12)
    # each paradigm's best checkpoint is the best validation epoch of the history
    stage = json.loads((trained_run / "student" / "stage.json").read_text())
    for metric in ("map_symmetric", "map_asymmetric"):
        assert stage["best"][metric] == max(h[metric] for h in stage["history"] if metric in h)
    assert (trained_run / "precision_recall.png").stat().st_size > 0
    # the classic training-free baselines on raw pixels stand beside the models (fitted on train only)
    from brcd import training_free

    assert saved["training_free_method"] in training_free.METHODS and 0 < saved["training_free_map"] <= 1
    assert {r["method"] for r in saved["training_free"]} == set(training_free.METHODS)
    assert saved["training_free_map"] == max(r["map_symmetric"] for r in saved["training_free"])
    assert "training-free: " in (trained_run / "results.md").read_text()
    assert 0 <= saved["bit_agreement"] <= 1 and len(saved["bit_agreement_per_bit"]) == run.cfg.student.model.bits
    distill_stage(run)
    assert "already distilled" in capsys.readouterr().out


def test_cli_help_does_not_import_torch_or_ray():
    """`brcd --help` and every subcommand's parser are built without importing torch or Ray: the
    heavy imports (seconds) happen when a command runs."""
    import ast
    import subprocess
    import sys

    code = ("import sys, pipelines.cli as c; p = c.build_parser(); "
            "print(sorted(m for m in ('torch', 'ray', 'timm', 'torchvision', 'sklearn', 'mlflow') if m in sys.modules)); "
            "print(sorted(p._subparsers._group_actions[0].choices))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == "[]", out[0]
    assert {"demo", "teacher", "compare", "tune", "register", "pull", "encode", "search", "bench"} <= set(ast.literal_eval(out[1]))
