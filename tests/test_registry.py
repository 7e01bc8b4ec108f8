"""brcd.mlflow.registry: export -> log (models-from-code pyfunc) -> register -> pull -> encode, without pickles."""

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from brcd.codes import unpack_codes
from brcd.config import ModelConfig
from brcd.data.transforms import eval_transform
from brcd.io import ArtifactError
from brcd.models.nets import create_hashing_model
from brcd.models.encoder import HashEncoder, encode_images_to_parquet, export_model, pickle_files, read_codes_parquet
from brcd.mlflow.registry import load_encoder, load_pyfunc, log_student, pull, register_student
from brcd.mlflow.tracking import Tracker, default_tracking_uri

IMAGE_SIZE = 32
MODEL_TAGS = {"teacher": "test_vit", "dataset": "digits", "bits": 16, "map_symmetric": 0.5, "map_asymmetric": 0.6}


def _reference_codes(model, images):
    """The in-memory model's codes: eval transform + HashingModel.encode."""
    tf = eval_transform(IMAGE_SIZE, False)
    return model.encode(torch.stack([tf(img) for img in images])).numpy()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="test_resnet", bits=16, head="mlp", hidden_dim=32)
    model = create_hashing_model(cfg).eval()
    with torch.no_grad():  # a non-trivial head so codes are not all one value
        for p in model.head.parameters():
            p.normal_(0, 1)
    model_dir = export_model(
        tmp_path_factory.mktemp("export") / "student", model, cfg,
        {"image_size": IMAGE_SIZE, "teacher": "test_vit", "dataset": "digits"},
    )
    images = np.random.default_rng(0).integers(0, 256, size=(6, 40, 36, 3), dtype=np.uint8)
    return SimpleNamespace(cfg=cfg, model=model, dir=model_dir, images=images, codes=_reference_codes(model, images))


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny):
    """One SQLite store for the module: a run, the logged pyfunc and one registered version."""
    out = tmp_path_factory.mktemp("mlflow")
    uri = default_tracking_uri(out, str(out / "mlflow.db"))
    tracker = Tracker(uri, "brcd-registry-test")
    run_id = tracker.start_run("distill")
    assert run_id, tracker.disabled_reason
    model_uri = log_student(tracker, run_id, tiny.dir, tags={"bits": 16})
    assert model_uri and model_uri.startswith("models:/"), tracker.disabled_reason
    version = register_student(model_uri, "brcd-student", "champion", MODEL_TAGS, tracking_uri=uri)
    tracker.end_run(run_id)
    return SimpleNamespace(out=out, uri=uri, tracker=tracker, run_id=run_id, model_uri=model_uri, version=version)


# ---- export / local folder ---------------------------------------------------------------------


def test_export_writes_safetensors_and_json(tiny):
    assert sorted(p.name for p in tiny.dir.iterdir()) == ["model.json", "model.safetensors"]
    spec = json.loads((tiny.dir / "model.json").read_text())
    assert spec["bits"] == [16] and spec["image_size"] == IMAGE_SIZE
    assert spec["model"]["backbone"] == "test_resnet" and spec["model"]["pretrained"] is False
    assert spec["mean"] == pytest.approx([0.485, 0.456, 0.406]) and spec["info"]["teacher"] == "test_vit"


def test_encoder_from_folder_matches_in_memory_model(tiny):
    enc = HashEncoder.from_dir(tiny.dir)
    codes = enc.encode(tiny.images, batch_size=4)
    assert codes.dtype == np.int8 and codes.shape == (6, 16)
    assert len(np.unique(codes, axis=0)) > 1
    np.testing.assert_array_equal(codes, tiny.codes)
    np.testing.assert_array_equal(enc.encode(list(tiny.images)), tiny.codes)  # list of HWC arrays


def test_export_refuses_head_only_weights(tiny, tmp_path):
    with pytest.raises(ValueError, match="full model.state_dict"):
        export_model(tmp_path / "m", tiny.model.trainable_state_dict(), tiny.cfg, {"image_size": IMAGE_SIZE})
    assert not (tmp_path / "m" / "model.json").exists()


def test_tampered_weights_are_detected(tiny, tmp_path):
    export_model(tmp_path / "m", tiny.model, tiny.cfg, {"image_size": IMAGE_SIZE})
    other = create_hashing_model(tiny.cfg)
    from brcd.io import save_state_dict

    save_state_dict(tmp_path / "m" / "model.safetensors", other.state_dict())
    with pytest.raises(ArtifactError, match="does not match the hash"):
        HashEncoder.from_dir(tmp_path / "m")


# ---- MLflow: log, register, pull -------------------------------------------------------------


def test_logged_model_is_linked_and_registered(store):
    client = store.tracker.client
    mv = client.get_model_version_by_alias("brcd-student", "champion")
    assert str(mv.version) == store.version
    assert mv.tags == {k: str(v) for k, v in MODEL_TAGS.items()}
    run = client.get_run(store.run_id)
    model_id = store.model_uri.split("/")[-1]
    assert model_id in [o.model_id for o in run.outputs.model_outputs]
    logged = client.get_logged_model(model_id)
    assert logged.experiment_id == run.info.experiment_id  # not MLflow's "Default" experiment
    # the model's artifacts live under the output folder, next to the database
    assert (store.out / "mlartifacts" / "models" / model_id / "artifacts" / "MLmodel").is_file()


def test_pull_and_codes_equal_in_memory_model(store, tiny, tmp_path):
    cwd_db = Path.cwd() / "mlflow.db"
    cwd_db_existed = cwd_db.exists()
    folder = pull("models:/brcd-student@champion", tmp_path / "pulled", tracking_uri=store.uri)
    assert {"model.json", "model.safetensors"} <= {p.name for p in folder.iterdir()}
    provenance = json.loads((folder / "registry.json").read_text())
    assert provenance["version"] == store.version and provenance["tags"]["dataset"] == "digits"
    np.testing.assert_array_equal(load_encoder(folder).encode(tiny.images), tiny.codes)
    # straight from the registry URI (pulled to a temporary folder)
    enc = load_encoder("models:/brcd-student@champion", tracking_uri=store.uri)
    np.testing.assert_array_equal(enc.encode(tiny.images), tiny.codes)
    assert cwd_db.exists() == cwd_db_existed  # never falls back to MLflow's default ./mlflow.db


def test_pyfunc_is_code_not_pickle(store, tiny, tmp_path, monkeypatch):
    import mlflow

    local = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=store.tracker.client.get_logged_model(store.model_uri.split("/")[-1]).artifact_location,
            dst_path=str(tmp_path), tracking_uri=store.uri,
        )
    )
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    assert "mlflow_model.py" in files and "MLmodel" in files
    assert pickle_files(local) == [] and not any("python_model.pkl" in f for f in files), files
    mlmodel = (local / "MLmodel").read_text()
    assert "model_code_path" in mlmodel and "python_model.pkl" not in mlmodel
    signature = mlflow.models.Model.load(str(local)).signature
    assert signature.inputs.to_dict()[0]["tensor-spec"] == {"dtype": "uint8", "shape": (-1, -1, -1, 3)}
    assert signature.params.to_dict()[0]["name"] == "bits"
    example = json.loads((local / "input_example.json").read_text())
    assert np.asarray(example).shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)

    # refuse any pickle while loading: models-from-code does not need one
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    pyfunc = mlflow.pyfunc.load_model(str(local))
    np.testing.assert_array_equal(pyfunc.predict(tiny.images), tiny.codes)
    # the python model itself also takes file paths (MLflow's signature check admits arrays only)
    for i, img in enumerate(tiny.images[:2]):
        Image.fromarray(img).save(tmp_path / f"{i}.png")
    frame = pd.DataFrame({"path": [str(tmp_path / f"{i}.png") for i in range(2)]})
    np.testing.assert_array_equal(pyfunc.unwrap_python_model().predict(None, frame), tiny.codes[:2])

    pyfunc = load_pyfunc("models:/brcd-student@champion", tracking_uri=store.uri)
    out = pyfunc.predict(tiny.images, params={"bits": 16})
    assert out.dtype == np.int8
    np.testing.assert_array_equal(out, tiny.codes)


def test_unknown_name_or_alias_gives_one_line_error(store, tmp_path):
    with pytest.raises(ValueError, match=r"registered model 'nope' does not exist .*registered models: brcd-student"):
        pull("models:/nope@champion", tmp_path / "x", tracking_uri=store.uri)
    with pytest.raises(ValueError, match=r"model 'brcd-student' has no alias 'staging' in registry sqlite:.*; its aliases: champion"):
        load_encoder("models:/brcd-student@staging", tracking_uri=store.uri)
    with pytest.raises(ValueError, match="has no version '99'"):
        pull("models:/brcd-student/99", tmp_path / "x", tracking_uri=store.uri)
    with pytest.raises(ValueError, match="neither a model folder"):
        load_encoder(tmp_path)


def test_log_student_with_dead_tracker_returns_none(tiny, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    tracker = Tracker("http://127.0.0.1:9", "brcd")
    with caplog.at_level(logging.WARNING, logger="brcd.mlflow.tracking"):
        assert log_student(tracker, tracker.start_run("x"), tiny.dir) is None
        assert log_student(tracker, "some-run", tiny.dir) is None
    assert len(caplog.records) == 1


# ---- parquet -------------------------------------------------------------------------------


def test_encode_images_to_parquet_roundtrip(tiny, tmp_path):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    names = [f"sub/{i}.png" if i % 2 else f"{i}.png" for i in range(len(tiny.images))]
    for name, img in zip(names, tiny.images):
        Image.fromarray(img).save(folder / name)
    enc = load_encoder(tiny.dir)

    out = encode_images_to_parquet(enc, folder, tmp_path / "codes.parquet", batch_size=4)
    ids, paths, packed, bits = read_codes_parquet(out)
    assert bits == 16 and packed.shape == (6, 2) and packed.dtype == np.uint8
    np.testing.assert_array_equal(ids, np.arange(6))
    assert paths == sorted(str(p) for p in folder.rglob("*.png"))
    by_path = {str(folder / n): c for n, c in zip(names, tiny.codes)}  # PNG is lossless
    np.testing.assert_array_equal(unpack_codes(packed, bits), np.stack([by_path[p] for p in paths]))

    schema = pq.read_schema(out)
    assert schema.field("id").type == pa.int64() and schema.field("code").type == pa.binary(2)
    assert schema.metadata[b"bits"] == b"16"

    # a list file (paths relative to its folder) gives the same codes in list order
    (folder / "list.txt").write_text("".join(f"{n} 0 1\n" for n in names) + "\n")
    out2 = encode_images_to_parquet(enc, folder / "list.txt", tmp_path / "codes2.parquet", batch_size=64)
    _, paths2, packed2, _ = read_codes_parquet(out2)
    assert paths2 == [str(folder / n) for n in names]
    np.testing.assert_array_equal(unpack_codes(packed2, 16), tiny.codes)
    assert not list(tmp_path.glob(".codes*.tmp"))  # atomic: no leftovers

    with pytest.raises(ValueError, match="do not exist"):
        encode_images_to_parquet(enc, [folder / "missing.png"], tmp_path / "c3.parquet")
    assert not (tmp_path / "c3.parquet").exists()


def test_nested_bits_through_the_pyfunc_class(tmp_path):
    from brcd.mlflow.mlflow_model import BrcdHashingModel

    cfg = ModelConfig(backbone="test_resnet", bits=[8, 16], head="linear")
    model_dir = export_model(tmp_path / "nested", create_hashing_model(cfg), cfg, {"image_size": 16})
    pyfunc = BrcdHashingModel()
    pyfunc.load_context(SimpleNamespace(artifacts={"model_dir": str(model_dir)}))
    images = np.random.default_rng(1).integers(0, 256, size=(3, 20, 20, 3), dtype=np.uint8)
    full = pyfunc.predict(None, images)
    assert full.shape == (3, 16)
    np.testing.assert_array_equal(pyfunc.predict(None, images, params={"bits": 8}), full[:, :8])
    with pytest.raises(ValueError, match=r"emits \[8, 16\] bits"):
        pyfunc.predict(None, images, params={"bits": 12})

    empty = encode_images_to_parquet(pyfunc.encoder, [], tmp_path / "empty.parquet")
    ids, paths, packed, bits = read_codes_parquet(empty)
    assert (len(ids), paths, packed.shape, bits) == (0, [], (0, 2), 16)
