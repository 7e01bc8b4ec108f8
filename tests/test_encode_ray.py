"""`brcd encode --actors N` (sharded parquet written by Ray Data encoder actors) gives the codes of
the single-process `brcd encode`, bit for bit; resumes; `brcd search` and read_codes_parquet read the folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from brcd.config import ModelConfig
from brcd.models.encoder import HashEncoder, encode_images_to_parquet, export_model, read_codes_parquet
from brcd.models.nets import create_hashing_model
from brcd.shards import shard_marker, shard_parquet
from pipelines.cli import main

N_IMAGES, BATCH, SHARD = 10, 2, 2


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """A tiny exported model and a folder of PNG images in two sub-folders."""
    root = tmp_path_factory.mktemp("collection")
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="test_resnet", bits=16, head="mlp", hidden_dim=32)
    model = create_hashing_model(cfg).eval()
    with torch.no_grad():  # a non-trivial head so codes differ between images
        for p in model.head.parameters():
            p.normal_(0, 1)
    model_dir = export_model(root / "model", model, cfg, {"image_size": 32})
    images = np.random.default_rng(0).integers(0, 256, size=(N_IMAGES, 36, 40, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        (root / "images" / f"d{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / "images" / f"d{i % 2}" / f"{i}.png")
    single = encode_images_to_parquet(HashEncoder.from_dir(model_dir), root / "images", root / "single.parquet",
                                      batch_size=BATCH)
    return root, model_dir, read_codes_parquet(single)


def _encode(root, model_dir, out, *extra):
    return main(["encode", "--model", str(model_dir), "--images", str(root / "images"), "--output", str(out),
                 "--batch-size", str(BATCH), "--shard-rows", str(SHARD), *extra])


def _assert_same(got, want):
    np.testing.assert_array_equal(got[0], want[0])
    assert got[1] == want[1] and got[3] == want[3] == 16
    np.testing.assert_array_equal(got[2], want[2])


@pytest.mark.ray
def test_encode_on_ray_actors_equals_single_process(collection, tmp_path, ray_local, capsys):
    root, model_dir, want = collection
    assert len(np.unique(want[2], axis=0)) > 3  # the codes tell images apart
    out = tmp_path / "codes"
    assert _encode(root, model_dir, out, "--actors", "2") == 0
    text = capsys.readouterr().out
    assert "[encode] 5/5 shards, 10/10 images, " in text and " images/s, ETA 0s" in text, text
    assert f"encoded 10 images to 16-bit codes in 5 shards (5 computed by 2 Ray actor(s), " in text, text
    _assert_same(read_codes_parquet(out), want)
    writers = {json.loads(shard_marker(out, i).read_text())["pid"] for i in range(5)}
    assert len(writers) == 2 and os.getpid() not in writers  # written by both actors, not by the driver
    ids, _, packed, bits = read_codes_parquet(shard_parquet(out, 3))  # one shard is a codes file on its own
    np.testing.assert_array_equal(ids, [6, 7])
    np.testing.assert_array_equal(packed, want[2][6:8])

    # a lost shard is recomputed on resume (here in-process), the others are kept
    shard_marker(out, 3).unlink()
    assert _encode(root, model_dir, out, "--actors", "0") == 0
    text = capsys.readouterr().out
    assert f"[encode] resuming: 4/5 shards already in {out}" in text and "(1 computed by in this process" in text, text
    _assert_same(read_codes_parquet(out), want)

    query = want[1][4]
    assert main(["search", "--model", str(model_dir), "--index", str(out), "--query", query, "-k", "3"]) == 0
    hits = capsys.readouterr().out.splitlines()
    assert hits[0] == f"query {query} (10 codes, 16 bits)"
    assert hits[2].split()[1] == "0"  # the query's own code is in the sharded index at distance 0


def test_encode_sharded_refuses_bad_arguments(collection, tmp_path, capsys):
    root, model_dir, _ = collection
    assert _encode(root, model_dir, tmp_path / "a", "--actors", "0", "--shard-rows", "3") == 2
    assert "--shard-rows 3 must be a positive multiple of --batch-size 2" in capsys.readouterr().err
    assert _encode(root, model_dir, tmp_path / "b", "--actors", "0") == 0  # in-process shards
    capsys.readouterr()
    (root / "images" / "d0" / "0.png").rename(tmp_path / "moved.png")  # another collection into the same folder
    try:
        assert _encode(root, model_dir, tmp_path / "b", "--actors", "0") == 2
        err = capsys.readouterr().err
        assert "holds the shards of another job (images (stored 10, now 9); images_sha256" in err, err
    finally:
        (tmp_path / "moved.png").rename(root / "images" / "d0" / "0.png")
    with pytest.raises(Exception, match="incomplete: 1 of 5 shards missing"):
        shard_marker(tmp_path / "b", 0).unlink()
        read_codes_parquet(tmp_path / "b")
    Path(tmp_path / "f").write_text("")
    assert _encode(root, model_dir, tmp_path / "f", "--actors", "0") == 2
    assert "is a file; on Ray --output names a folder" in capsys.readouterr().err
