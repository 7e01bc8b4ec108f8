"""`brcd compare`: rows from one shared teacher, the method table, resuming finished rows."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_config
from pipelines.commands import compare as cmp
from pipelines import stages

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

    monkeypatch.setattr(stages, "distill_stage", boom)
    monkeypatch.setattr(stages, "evaluate_stage", boom)
    again = cmp.compare(cfg, trained_run, seeds=1, methods="brcd_released,no_kd")
    assert again["runs_trained"] == 0 and again["runs_reused"] == 2
    assert again["rows"] == rows


# --------------------------------------------------------------------------------------------
# nested codes (NHL): one nested student vs separate single-length students
# --------------------------------------------------------------------------------------------


def _nested_result():
    """A hand-made nested compare result: lengths 8/16, teacher + brcd over two seeds, timings."""
    rows = [
        {"method": "teacher", "seed": 0, "map_symmetric": 0.5, "map_asymmetric": 0.5,
         "per_length": {"teacher_map@8": 0.4, "teacher_map@16": 0.6}},
        {"method": "brcd", "seed": 0, "distill_seconds": 10.0, "distill_cpu_seconds": 8.0,
         "per_length": {"student_map_symmetric@8": 0.30, "student_map_symmetric@16": 0.40,
                        "student_map_asymmetric@8": 0.35, "student_map_asymmetric@16": 0.45}},
        {"method": "brcd", "seed": 1, "distill_seconds": 14.0, "distill_cpu_seconds": 12.0,
         "per_length": {"student_map_symmetric@8": 0.34, "student_map_symmetric@16": 0.40,
                        "student_map_asymmetric@8": 0.31, "student_map_asymmetric@16": 0.47}},
    ]
    return {"bits": [8, 16], "rows": rows, "teacher_seconds": 30.0, "teacher_cpu_seconds": 20.0,
            "clusters_seconds": 2.0, "clusters_cpu_seconds": 1.5}


def _single_result(bits, teacher, sym, asym, t_teacher, t_distill):
    rows = [{"method": "teacher", "seed": 0, "map_symmetric": teacher, "map_asymmetric": teacher}]
    rows += [{"method": "brcd", "seed": s, "map_symmetric": a, "map_asymmetric": b, "distill_seconds": d,
              "distill_cpu_seconds": d / 2} for s, (a, b, d) in enumerate(zip(sym, asym, t_distill))]
    return {"bits": bits, "rows": rows, "teacher_seconds": t_teacher, "teacher_cpu_seconds": t_teacher / 2,
            "clusters_seconds": 1.0, "clusters_cpu_seconds": None}


def test_nested_vs_separate_numbers_against_hand_arithmetic(tmp_path):
    from brcd import plots
    from pipelines.commands import compare_nested as cn

    singles = {8: _single_result(8, 0.35, [0.20, 0.26], [0.22, 0.24], 25.0, [9.0, 11.0]),
               16: _single_result(16, 0.65, [0.44, 0.42], [0.50, 0.46], 27.0, [12.0, 12.0])}
    report = cn.nested_vs_separate(_nested_result(), singles)
    assert report["lengths"] == [8, 16]
    q = {(e["method"], e["bits"]): e for e in report["quality"]}
    assert set(q) == {("teacher", 8), ("teacher", 16), ("brcd", 8), ("brcd", 16)}
    e = q[("brcd", 8)]
    assert e["nested"]["symmetric"]["mean"] == pytest.approx(0.32)
    assert e["nested"]["symmetric"]["std"] == pytest.approx(0.02 * 2 ** 0.5)  # sample std of 0.30, 0.34
    assert e["nested"]["asymmetric"]["mean"] == pytest.approx(0.33)
    assert e["separate"]["symmetric"]["mean"] == pytest.approx(0.23)
    assert e["delta"]["symmetric"] == pytest.approx(0.32 - 0.23)
    assert e["delta"]["asymmetric"] == pytest.approx(0.33 - 0.23)
    t16 = q[("teacher", 16)]  # teacher: the nested prefix vs the 16-bit teacher, same in both paradigms
    assert t16["nested"]["asymmetric"]["mean"] == 0.6 and t16["separate"]["symmetric"]["mean"] == 0.65
    assert t16["nested"]["symmetric"]["std"] == 0.0

    time = report["time"]
    assert time["nested"]["teacher"] == 30.0 and time["nested"]["distill:brcd"] == pytest.approx(12.0)
    assert time["separate_sum"]["teacher"] == pytest.approx(52.0)
    assert time["separate_sum"]["distill:brcd"] == pytest.approx(10.0 + 12.0)
    assert time["ratio"]["teacher"] == pytest.approx(30.0 / 52.0)
    assert time["separate_sum"]["clusters_cpu"] is None and time["ratio"]["clusters_cpu"] is None  # not measured
    assert time["pipeline"]["nested"] == pytest.approx(30 + 2 + 12)
    assert time["pipeline"]["separate_sum"] == pytest.approx(52 + 2 + 22)
    assert time["pipeline"]["ratio"] == pytest.approx(44 / 76)
    assert time["pipeline_cpu"]["separate_sum"] is None  # a part of it (clusters CPU) was not measured

    md = cn.markdown(report)
    assert "| brcd | 8 | 0.3200 ± 0.0283 | 0.2300 ± 0.0424 | +0.0900 |" in md
    assert "Training time" in md and "**0.58**" in md  # the pipeline ratio 44/76
    png = plots.plot_nested_vs_separate(report, tmp_path / "n.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    only_nested = cn.nested_vs_separate(_nested_result())  # without --separate: per-length table only
    assert "separate" not in only_nested["time"] and all("separate" not in e for e in only_nested["quality"])
    assert "Training time" not in cn.markdown(only_nested)
    with pytest.raises(ValueError, match=r"separate runs at \[32\] bits"):
        cn.nested_vs_separate(_nested_result(), {32: singles[16]})
    broken = _nested_result()
    del broken["rows"][1]["per_length"]["student_map_asymmetric@16"]
    with pytest.raises(ValueError, match="student_map_asymmetric@16"):
        cn.nested_vs_separate(broken)


def test_separate_needs_a_nested_config_and_fails_before_ray(tmp_path, capsys, monkeypatch):
    import pipelines.ray.cluster as ray_utils
    from pipelines.commands import compare_nested as cn
    from pipelines.cli import main

    with pytest.raises(ValueError, match="demo_nested"):
        cn.check_separate(tiny_config())
    single = cn.single_length_config(tiny_config("teacher.model.bits=[8,16]", "student.model.bits=[8,16]"), 16)
    assert single.teacher.model.bits == 16 and single.student.model.bits == 16 and single.name.endswith("-16bits")

    def no_ray(*a, **k):
        raise AssertionError("Ray was started for a command that cannot run")

    monkeypatch.setattr(ray_utils, "init_ray", no_ray)
    assert main(["compare", "-c", "demo", "--output", str(tmp_path), "--separate"]) == 2
    err = capsys.readouterr().err
    assert "--separate compares one nested student" in err and len(err.strip().splitlines()) == 1


def test_compare_nested_vs_separate_end_to_end(tmp_path, ray_local, monkeypatch):
    """A nested [8, 16] comparison with --separate on the tiny demo: per-length rows for both
    paradigms, single-length pipelines under separate/, the time table, and a resumed second call."""
    from pipelines.commands import compare_nested as cn

    cfg = tiny_config("teacher.model.bits=[8,16]", "student.model.bits=[8,16]", "distill.optim.epochs=1",
                      "clusters.num_clusters=2", "clusters.k_range=[2,2]",  # tiny teachers: few distinct codes
                      "tracking.enabled=true", "tracking.experiment=nested-compare")
    out = tmp_path / "cmp"
    result = cmp.compare(cfg, out, seeds=1, methods="brcd", separate=True)

    report = json.loads((out / "compare.json").read_text())["nested_vs_separate"]
    assert report == result["nested_vs_separate"] and report["lengths"] == [8, 16]
    q = {(e["method"], e["bits"]): e for e in report["quality"]}
    assert set(q) == {("teacher", 8), ("teacher", 16), ("brcd", 8), ("brcd", 16)}
    nested_row = next(r for r in result["rows"] if r["method"] == "brcd")
    for L in (8, 16):
        single = json.loads((out / "separate" / f"bits{L}" / "compare.json").read_text())
        assert single["bits"] == L and single["teacher_fingerprint"] != result["teacher_fingerprint"]
        s_row = next(r for r in single["rows"] if r["method"] == "brcd")
        for p in ("symmetric", "asymmetric"):
            assert q[("brcd", L)]["separate"][p]["mean"] == pytest.approx(s_row[f"map_{p}"])
            assert q[("brcd", L)]["nested"][p]["mean"] == pytest.approx(
                nested_row["per_length"][f"student_map_{p}@{L}"])
            assert 0.0 <= q[("brcd", L)]["nested"][p]["mean"] <= 1.0
    # the nested row's headline numbers are the means over its lengths
    assert nested_row["map_symmetric"] == pytest.approx(
        sum(nested_row["per_length"][f"student_map_symmetric@{L}"] for L in (8, 16)) / 2)
    t = report["time"]
    assert t["nested"]["teacher"] > 0 and t["separate_sum"]["teacher"] > 0
    assert t["pipeline"]["ratio"] > 0 and t["pipeline_cpu"]["ratio"] > 0  # local mode: CPU measured too
    md = (out / "compare.md").read_text()
    assert "per-length mAP" in md and "Training time" in md and "| brcd | 16 |" in md
    assert (out / cn.NESTED_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # one MLflow store for the whole comparison, the single-length ones included
    from mlflow import MlflowClient

    assert not list((out / "separate").rglob("mlflow.db"))
    uri = f"sqlite:///{out.resolve() / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    names = {r.info.run_name for r in client.search_runs([client.get_experiment_by_name("nested-compare").experiment_id])}
    assert {f"compare-{cfg.name}", f"compare-{cfg.name}-8bits", f"compare-{cfg.name}-16bits"} <= names

    def boom(*a, **k):
        raise AssertionError("a finished row was run again")

    monkeypatch.setattr(stages, "distill_stage", boom)
    monkeypatch.setattr(stages, "evaluate_stage", boom)
    again = cmp.compare(cfg, out, seeds=1, methods="brcd", separate=True)
    assert again["runs_trained"] == 0
    assert again["nested_vs_separate"]["quality"] == report["quality"]
