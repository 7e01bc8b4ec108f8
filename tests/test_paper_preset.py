"""The paper's preset ``cifar10_vitb16_effb0`` run end to end through the CLI: teacher -> clusters ->
distill -> evaluate -> register, on a CIFAR-10 folder in the official batch layout and at the
protocol's sizes (50,000 train + 10,000 test images: 5,000 train, 5,000 validation, 5,000 query,
50,000 database).

Only what cannot run here is overridden: timm's tiny test models stand in for ViT-B/16 and
EfficientNet-B0 (no download: ``pretrained=false``), at 16 px, one epoch per training stage, one
CPU Ray Train worker, a 2-view bank built in the driver (``bank.actors=0``). Everything else is the preset's: frozen backbones (so the view bank and the exact
feature caches are taken), the linear / MLP-on-logits heads, 64 bits, K=10, mAP@1000, MLflow
tracking and registration in the run folder's SQLite database.

The images are synthetic but class-dependent (a per-class colour and stripe pattern plus noise), so
the models' mAPs must be well above chance.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import chance_map
from test_data import _Py2StylePickler

PRESET = "cifar10_vitb16_effb0"
SIZE = 16  # test_vit: 16 px, 4 px patches (16 tokens); test_efficientnet takes any size
NUM_CLASSES, PER_BATCH = 10, 10_000
PARTS = ("train", "validation", "query", "database")


def _class_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 ``(N, 3072)`` CIFAR rows (channel planes, row-major): class ``c`` = its own colour +
    stripes of its own orientation and period + uniform noise, in int16 arithmetic (fast: 60,000
    images in about 2 s). Survives the crops, flips and colour jitter of the views well enough for a
    frozen random backbone to tell the classes apart."""
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)
    base = np.random.default_rng(1234).integers(50, 206, size=(NUM_CLASSES, 3)).astype(np.int16)
    angles = np.linspace(0, np.pi, NUM_CLASSES, endpoint=False)
    periods = np.array([4, 8] * (NUM_CLASSES // 2), dtype=np.float32)
    pattern = np.stack([45 * np.sin(2 * np.pi / t * (np.cos(a) * xx + np.sin(a) * yy))
                        for a, t in zip(angles, periods)]).round().astype(np.int16)  # (C, 32, 32)
    img = rng.integers(0, 64, size=(len(labels), 3, 32, 32), dtype=np.uint8).astype(np.int16)
    img += base[labels][:, :, None, None] - 32
    img += pattern[labels][:, None]
    return np.clip(img, 0, 255).astype(np.uint8).reshape(len(labels), 3072)


def _dump(obj: dict, path: Path) -> None:
    """As the official Python 2 batches were written: protocol 2, byte-string keys."""
    with open(path, "wb") as fh:
        _Py2StylePickler(fh, protocol=2).dump(obj)


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    """``cifar-10-batches-py`` at the official sizes: data_batch_1..5 and test_batch of 10,000
    images each (1,000 per class, shuffled) and batches.meta."""
    root = tmp_path_factory.mktemp("cifar") / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    names = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]
    for k, name in enumerate(names):
        labels = rng.permutation(np.repeat(np.arange(NUM_CLASSES), PER_BATCH // NUM_CLASSES))
        label = f"training batch {k + 1} of 5" if k < 5 else "testing batch 1 of 1"
        _dump({b"batch_label": label.encode(), b"labels": labels.tolist(), b"data": _class_images(labels, rng),
               b"filenames": [f"img_{k}_{i}.png".encode() for i in range(PER_BATCH)]}, root / name)
    classes = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    _dump({b"num_cases_per_batch": PER_BATCH, b"label_names": classes, b"num_vis": 3072}, root / "batches.meta")
    return root


def _overrides(root: Path) -> list[str]:
    """Tiny stand-ins for what needs a GPU or a download; the preset's method settings stay.
    ``bank.actors=0`` builds the banks and feature caches in the driver: on 2 cores each Ray Data
    actor pool (9 of them here) takes about 25 s to start, which would triple the test's time
    (the actor path is tests/test_encode_ray.py's)."""
    return [
        f"data.root={root}", f"data.image_size={SIZE}", "data.loader_workers=0",
        "teacher.model.backbone=test_vit", "teacher.model.pretrained=false",
        f"teacher.model.model_kwargs={{img_size: {SIZE}, patch_size: 4}}",
        "student.model.backbone=test_efficientnet", "student.model.pretrained=false",
        "teacher.optim.epochs=1", "distill.optim.epochs=1",
        "resources.num_workers=1", "resources.use_gpu=false", "resources.bf16=false", "resources.cpus_per_worker=1",
        "bank.enabled=true", "bank.views=2", "bank.actors=0",
    ]


@pytest.mark.ray
def test_paper_preset_runs_end_to_end(cifar_root, tmp_path, ray_local, capsys, monkeypatch):
    from brcd.config import load_config
    from brcd.layout import RunLayout
    from pipelines.cli import main
    from pipelines.stages import Run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the run folder's sqlite
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    out = tmp_path / "run"
    sets = [a for o in _overrides(cifar_root) for a in ("--set", o)]
    cfg = load_config(PRESET, _overrides(cifar_root))
    # the preset's own settings, untouched by the overrides
    assert (cfg.teacher.model.freeze_backbone, cfg.student.model.freeze_backbone) == (True, True)
    assert (cfg.teacher.model.head, cfg.student.model.head, cfg.student.model.head_input) == ("linear", "mlp", "logits")
    assert (cfg.teacher.model.bits, cfg.student.model.bits, cfg.clusters.num_clusters, cfg.data.topk) == (64, 64, 10, 1000)
    assert (cfg.distill.method, cfg.distill.alpha, cfg.tracking.tracking_uri) == ("brcd", 0.8, None)

    for stage in ("teacher", "clusters", "distill", "evaluate"):
        assert main([stage, "-c", PRESET, "--output", str(out), *sets]) == 0, stage
    assert main(["register", "--output", str(out)]) == 0
    printed = capsys.readouterr().out

    layout = RunLayout(out)
    results = json.loads(layout.results_json.read_text())
    assert (results["num_queries"], results["num_database"], results["bits"], results["topk"]) == (5000, 50000, 64, 1000)
    run = Run(cfg, out, write_config=False)
    sizes = {p: len(run.bundle.split.indices(p)) for p in PARTS}
    assert sizes == {"train": 5000, "validation": 5000, "query": 5000, "database": 50000}
    assert np.all(run.bundle.labels("train").sum(0) == 500)  # 500 per class
    # Measured (class-dependent images, 1 epoch): teacher 1.00, symmetric 1.00, asymmetric 0.70;
    # chance (random 64-bit codes on this split) 0.10. A random student head scores chance in
    # asymmetric search: that margin is the one that says distillation worked.
    chance = chance_map(run.bundle.labels("query"), run.bundle.labels("database"), 64, 1000)
    assert 0.05 < chance < 0.15, chance
    assert results["teacher_map"] > chance + 0.6, (results["teacher_map"], chance)
    assert results["student_map_symmetric"] > chance + 0.6, (results["student_map_symmetric"], chance)
    assert results["student_map_asymmetric"] > chance + 0.3, (results["student_map_asymmetric"], chance)

    # The view banks (teacher: its frozen backbone's features of 5,000 images x 2 views; distill: the
    # teacher's logits and the frozen student backbone's 1000-way logits) and the exact feature caches
    # of both frozen backbones were built with the preset's sizes ...
    from brcd.shards import open_sharded

    folders = {p.name.rsplit("-", 1)[0]: p for p in layout.bank_root.iterdir() if p.is_dir()}
    caches = {f"features-teacher-{p}": sizes[p] for p in PARTS} | {f"features-student-{p}": sizes[p]
                                                                       for p in ("validation", "query", "database")}
    assert set(folders) == {"teacher", "distill", *caches}, sorted(folders)
    banks = {name: open_sharded(folders[name]) for name in ("teacher", "distill")}
    assert {k: c.shape for k, c in banks["teacher"].items()} == {"teacher_features": (10000, 64)}
    assert {k: c.shape for k, c in banks["distill"].items()} == {"teacher_logits": (10000, 64),
                                                                "student_features": (10000, 1000)}
    for name, n in caches.items():
        assert open_sharded(folders[name])["features"].shape == (n, 64 if "teacher" in name else 1000), name
    # ... and the stages took them: training from the banks, validation, the teacher's codes and the
    # evaluation on the cached features (heads only: no Ray Train job but the two training runs)
    assert "[teacher] view bank: 5000 images x 2 views of teacher_features" in printed
    assert "[distill] view bank: 5000 images x 2 views of teacher_logits, student_features" in printed
    assert "[teacher] validation encodes the teacher's cached frozen-backbone features" in printed
    assert "[distill] validation encodes the student's cached frozen-backbone features" in printed
    assert "[teacher] encoding train / validation / query / database from the frozen backbone's feature caches" in printed
    assert sorted(p.name.split("-")[0] for p in layout.ray_storage.iterdir()) == ["distill", "teacher"]

    # every stage tracked, and the student registered, in the run folder's MLflow database
    from mlflow import MlflowClient

    uri = f"sqlite:///{layout.mlflow_db}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("brcd-cifar10")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert {n: r.info.status for n, r in runs.items()} == dict.fromkeys(["teacher", "clusters", "distill", "evaluate"],
                                                                        "FINISHED")
    version = client.get_model_version_by_alias(cfg.tracking.model_name, "champion")
    assert str(version.version) == "1" and f"registered {cfg.tracking.model_name} version 1" in printed
    assert version.run_id == runs["distill"].info.run_id
    assert version.tags["dataset"] == "cifar10" and version.tags["bits"] == "64"
    assert float(version.tags["map_asymmetric"]) == pytest.approx(results["student_map_asymmetric"], abs=1e-5)
    assert layout.registered_json.is_file()
