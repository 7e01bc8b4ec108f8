"""The four stages in Ray Train local mode (num_workers=0): outputs, skipping finished stages; the CLI parser stays light."""

import json

from conftest import tiny_config
from pipelines.stages import Run, distill_stage, evaluate_stage, teacher_stage


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
    assert (trained_run / "precision_recall.png").stat().st_size > 0
    distill_stage(run)
    assert "already distilled" in capsys.readouterr().out


def test_cli_help_does_not_import_torch_or_ray():
    """`brcd --help` and every subcommand's parser are built without importing torch or Ray (13 s
    on this machine before; the heavy imports happen when a command runs)."""
    import ast
    import subprocess
    import sys

    code = ("import sys, pipelines.cli as c; p = c.build_parser(); "
            "print(sorted(m for m in ('torch', 'ray', 'timm', 'torchvision', 'sklearn', 'mlflow') if m in sys.modules)); "
            "print(sorted(p._subparsers._group_actions[0].choices))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == "[]", out[0]
    assert {"demo", "teacher", "compare", "tune", "register", "pull", "encode", "search", "bench"} <= set(ast.literal_eval(out[1]))
