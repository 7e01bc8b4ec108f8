from pathlib import Path

import pytest

from brcd.config import ConfigError, list_presets, load_config, save_config


@pytest.mark.parametrize("preset", list_presets())
def test_presets_load(preset):
    cfg = load_config(preset)
    assert cfg.teacher.model.bits == cfg.student.model.bits


def test_paper_preset_values():
    cfg = load_config("cifar10_vitb16_effb0")
    assert cfg.teacher.model.backbone == "vit_base_patch16_224" and cfg.teacher.model.freeze_backbone
    assert cfg.student.model.backbone == "efficientnet_b0" and cfg.student.model.head == "mlp"
    assert (cfg.teacher.model.bits, cfg.distill.optim.temperature, cfg.distill.alpha) == (64, 0.3, 0.8)
    assert (cfg.clusters.margin, cfg.clusters.num_clusters) == (0.5, 10)


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_partial_sections_merge_over_defaults(tmp_path):
    cfg = load_config(write(tmp_path, "student:\n  model:\n    bits: 64\n"))
    # the student's own defaults (MLP head, small backbone) survive a partial section
    assert cfg.student.model.head == "mlp" and cfg.student.model.bits == 64


@pytest.mark.parametrize("text, overrides, bits", [
    ("teacher:\n  model:\n    bits: 16\n", [], 16),  # a config that only describes the teacher
    ("teacher:\n  model:\n    bits: 16\nstudent:\n  model:\n    head: linear\n", [], 16),
    ("teacher:\n  model:\n    bits: 16\n", ["teacher.model.bits=[8, 16]"], [8, 16]),
    ("student: {}\n", ["teacher.model.bits=24"], 24),
])
def test_student_bits_follow_the_teacher_when_unset(tmp_path, text, overrides, bits):
    cfg = load_config(write(tmp_path, text), overrides)
    assert cfg.teacher.model.bits == bits and cfg.student.model.bits == bits
    assert load_config(save_config(cfg, tmp_path / "saved.yaml")) == cfg


@pytest.mark.parametrize(
    "text, needle",
    [
        ("teacher:\n  model:\n    bitz: 32\n", "unknown key 'teacher.model.bitz' (did you mean 'teacher.model.bits'?)"),
        ("distill:\n  alpha: high\n", "distill.alpha: expected a number"),
        ("teacher:\n  model:\n    bits: 32\nstudent:\n  model:\n    bits: 64\n",
         "teacher.model.bits 32 and student.model.bits 64 differ"),
        ("teacher:\n  checkpoint: /nope/teacher.safetensors\n", "teacher.checkpoint: file /nope/teacher.safetensors does not exist"),
        ("clusters:\n  mask_ratio: 0.3\n", "exactly one of margin and mask_ratio"),
        ("data:\n  source: imagenet\n", "data.source: 'imagenet' is not allowed"),
        ("resources:\n  use_gpu: 1\n", "resources.use_gpu: expected true/false"),
        ("data: [1, 2\n", "YAML"),
    ],
)
def test_one_line_errors(tmp_path, text, needle):
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, text))
    msg = str(exc.value)
    assert needle in msg and "\n" not in msg


def test_overrides_and_roundtrip(tmp_path):
    cfg = load_config("demo", ["distill.alpha=0.5", "clusters.num_clusters=7", "clusters.margin=null", "clusters.mask_ratio=0.25"])
    assert (cfg.distill.alpha, cfg.clusters.num_clusters, cfg.clusters.mask_ratio) == (0.5, 7, 0.25)
    path = save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(path) == cfg
    assert cfg.flat()["distill.alpha"] == 0.5


def test_unknown_preset():
    with pytest.raises(ConfigError, match="presets: .*demo"):
        load_config("no_such_preset")
