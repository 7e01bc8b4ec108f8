"""`brcd compare`: rows from one shared teacher, the method table, resuming finished rows."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_config
from pipelines import compare as cmp

EXPECTED = {
    "teacher", "no_kd", "kd", "rkd", "pkt", "sp", "crd", "brcd_released", "brcd_no_mask",
    "brcd_no_false_negatives", "brcd_no_offset_positives", "brcd_no_structural", "brcd_no_individual", "brcd",
}


def test_method_table_covers_exactly_the_fourteen_names():
    assert set(cmp.METHODS) == EXPECTED and len(cmp.METHODS) == 14
    assert cmp.METHODS["teacher"] is None
    base = tiny_config()
    for name in EXPECTED - {"teacher"}:
        cfg = cmp.method_config(base, name, seed=7)
        assert cfg.seed == 7 and cfg.data.seed == base.data.seed  # run seed varies, split seed does not
        d = cfg.distill
        if name.startswith("brcd"):
            switches = {"mask": d.use_mask, "false_negatives": d.use_false_negatives,
                        "offset_positives": d.use_offset_positives, "structural": d.use_structural,
                        "individual": d.use_individual}
            off = {k for k, v in switches.items() if not v}
            assert d.method == "brcd"
            assert d.released == (name == "brcd_released")
            assert off == ({name[len("brcd_no_"):]} if name.startswith("brcd_no_") else set())
        else:
            assert d.method == name
    # a base config with a switch already off does not leak into the full method
    assert cmp.method_config(tiny_config("distill.use_mask=false"), "brcd", 0).distill.use_mask
    with pytest.raises(ValueError, match="unknown method"):
        cmp.parse_methods("brcd,brdc")
    assert cmp.parse_methods("brcd,no_kd") == ["teacher", "no_kd", "brcd"]


def test_cli_wiring_and_typo_fails_before_ray(tmp_path, capsys):
    from pipelines.cli import build_parser, main

    args = build_parser().parse_args(["compare", "-c", "demo", "--output", str(tmp_path), "--seeds", "2",
                                      "--methods", "brcd,no_kd"])
    assert args.func is cmp.cmd_compare and args.seeds == 2 and args.methods == "brcd,no_kd"
    assert main(["compare", "-c", "demo", "--output", str(tmp_path), "--methods", "brcd,brdc"]) == 2
    assert "unknown method(s) brdc" in capsys.readouterr().err


def test_compare_rows_shared_teacher_and_resume(trained_run, monkeypatch):
    cfg = tiny_config("distill.optim.epochs=1", "distill.optim.max_steps_per_epoch=2")
    teacher_fp_before = (trained_run / "teacher" / "stage.json").read_text()
    result = cmp.compare(cfg, trained_run, seeds=1, methods="teacher,brcd_released,no_kd")

    rows = json.loads((trained_run / "compare.json").read_text())["rows"]
    assert rows == result["rows"]
    assert [(r["method"], r["seed"]) for r in rows] == [("teacher", 0), ("no_kd", 0), ("brcd_released", 0)]
    for r in rows:
        assert {"method", "seed", "map_symmetric", "map_asymmetric", "precision_at_k"} <= set(r)
        assert 0.0 <= r["map_symmetric"] <= 1.0 and 0.0 <= r["map_asymmetric"] <= 1.0
        assert set(r["precision_at_k"]) == {"symmetric", "asymmetric"}
    teacher = rows[0]
    assert teacher["map_asymmetric"] == teacher["map_symmetric"]
    # every student came from the one teacher; the teacher was neither retrained nor replaced
    assert {r["teacher"] for r in rows} == {result["teacher_fingerprint"]}
    assert (trained_run / "teacher" / "stage.json").read_text() == teacher_fp_before
    for m in ("no_kd", "brcd_released"):
        assert (trained_run / "students" / m / "seed0" / "stage.json").exists()
    md = (trained_run / "compare.md").read_text()
    assert "*teacher* (reference)" in md and "brcd_released" in md and "±" in md
    assert (trained_run / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # second invocation: finished rows are read back, nothing is distilled or evaluated again
    def boom(*a, **k):
        raise AssertionError("a finished row was run again")

    monkeypatch.setattr(cmp, "distill_stage", boom)
    monkeypatch.setattr(cmp, "evaluate_stage", boom)
    again = cmp.compare(cfg, trained_run, seeds=1, methods="brcd_released,no_kd")
    assert again["runs_trained"] == 0 and again["runs_reused"] == 2
    assert again["rows"] == rows
