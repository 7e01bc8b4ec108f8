"""Config composition (``base:``) and keys that must mean what they say."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
import yaml

from brcd.config import BRCDOptions, ConfigError, DistillConfig, check_split_sizes, describe_presets, load_config


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_derived_presets_are_their_base_plus_their_edits():
    demo, nested = load_config("demo"), load_config("demo_nested")
    assert nested.teacher.model.bits == nested.student.model.bits == [8, 16, 32]
    assert (nested.name, nested.tracking.model_name) == ("demo_nested", "brcd-student-nested")
    R = dataclasses.replace
    same = R(nested, name=demo.name, tracking=demo.tracking,
             teacher=R(nested.teacher, model=R(nested.teacher.model, bits=demo.teacher.model.bits,
                                               backbone=demo.teacher.model.backbone),
                       optim=R(nested.teacher.optim, batch_size=demo.teacher.optim.batch_size)),
             student=R(nested.student, model=R(nested.student.model, bits=demo.student.model.bits,
                                               backbone=demo.student.model.backbone,
                                               freeze_backbone=demo.student.model.freeze_backbone)),
             distill=R(nested.distill, optim=R(nested.distill.optim, batch_size=demo.distill.optim.batch_size)))
    assert same == demo
    paper = load_config("cifar10_vitb16_effb0", check_files=False)
    coco = load_config("coco", check_files=False)
    assert (coco.data.source, coco.data.topk, coco.clusters.num_clusters) == ("list", 5000, 20)
    assert (coco.teacher, coco.student, coco.distill) == (paper.teacher, paper.student, paper.distill)
    assert coco.data.image_size == paper.data.image_size == 224  # merged key by key, not replaced
    assert "demo_nested (base: demo)" in describe_presets() and "demo" in describe_presets()


def test_base_is_a_path_relative_to_the_file_or_a_preset(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "common.yaml", "base: demo\ndistill: {alpha: 0.5}\nclusters: {num_clusters: 7}\n")
    child = write(tmp_path / "run.yaml", "base: sub/common.yaml\nclusters: {num_clusters: 9}\n")
    cfg = load_config(child, ["distill.alpha=0.6"])
    assert (cfg.distill.alpha, cfg.clusters.num_clusters) == (0.6, 9)  # override > file > its base
    assert cfg.clusters.margin == load_config("demo").clusters.margin
    assert cfg.teacher == load_config("demo").teacher


@pytest.mark.parametrize("files, needle", [
    ({"a.yaml": "base: nowhere\n"}, "a.yaml: base 'nowhere' is neither a file"),
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"}, "base cycle a.yaml -> b.yaml -> a.yaml"),
    ({"a.yaml": "base: a.yaml\n"}, "base cycle a.yaml -> a.yaml"),
    ({"a.yaml": "base: 3\n"}, "base must be a preset name or a YAML path"),
])
def test_bad_base_is_one_line(tmp_path, files, needle):
    for name, text in files.items():
        write(tmp_path / name, text)
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "a.yaml")
    assert needle in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("source", ["cifar10", "list"])
@pytest.mark.parametrize("key", ["query", "validation", "train"])
def test_split_sizes_rejected_where_the_source_fixes_the_split(tmp_path, source, key):
    cfg = load_config(write(tmp_path / "c.yaml", f"data:\n  source: {source}\n  root: /data\n  {key}: 123\n"))
    with pytest.raises(ConfigError) as exc:
        check_split_sizes(cfg.data)
    msg = str(exc.value)
    assert f"data.{key}=123 is not used by data.source='{source}'" in msg and "remove it" in msg and "\n" not in msg
    # the defaults (what to_dict() writes back) pass, and the sources with a random split use the keys
    check_split_sizes(load_config(write(tmp_path / "ok.yaml", f"data:\n  source: {source}\n  root: /data\n")).data)
    check_split_sizes(load_config(write(tmp_path / "d.yaml", f"data:\n  source: digits\n  {key}: 100\n")).data)


def test_list_source_rejects_split_sizes_when_the_data_opens(tmp_path):
    from brcd.builders import data_bundle

    root = tmp_path / "ds"
    root.mkdir()
    for name in ("train.txt", "test.txt", "database.txt"):
        (root / name).write_text("".join(f"img/{i}.jpg {i % 2} {1 - i % 2}\n" for i in range(6)))
    cfg = load_config("demo", ["data.source=list", f"data.root={root}"])  # demo's query/validation sizes
    with pytest.raises(ConfigError, match="data.query=250 is not used by data.source='list'"):
        data_bundle(cfg, tmp_path / "split")
    ok = load_config("demo", ["data.source=list", f"data.root={root}", "data.query=200", "data.validation=200"])
    assert len(data_bundle(ok, tmp_path / "split").split.indices("train")) == 6


def test_brcd_options_are_the_config_keys_and_the_loss_arguments():
    from brcd.losses import brcd_loss

    loss_args = inspect.signature(brcd_loss).parameters
    config_fields = {f.name: f for f in dataclasses.fields(DistillConfig)}
    for f in dataclasses.fields(BRCDOptions):
        assert loss_args[f.name].default == f.default == config_fields[f.name].default, f.name
    assert BRCDOptions.switches() == ("use_mask", "use_false_negatives", "use_offset_positives", "use_structural",
                                      "use_individual", "released")
    assert DistillConfig(alpha=0.5, use_mask=False).brcd_options() == BRCDOptions(alpha=0.5, use_mask=False)


def test_every_preset_file_is_valid_yaml_with_known_bases():
    from brcd.config import PRESETS_DIR, list_presets

    for name in list_presets():
        base = yaml.safe_load((PRESETS_DIR / f"{name}.yaml").read_text()).get("base")
        assert base is None or base in list_presets()
