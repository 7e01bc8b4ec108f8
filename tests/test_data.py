"""Tests for brcd.data: sources, restricted CIFAR unpickling, splits, transforms, datasets.

All data is written by the tests into tmp_path (or is scikit-learn's embedded digits).
"""

from __future__ import annotations

import logging
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from brcd.data import (
    ConcatSource,
    CorruptImageError,
    EvalDataset,
    Split,
    TwoViewDataset,
    TwoViewTransform,
    UnsafePickleError,
    build_data,
    cifar10_source,
    cifar10_split,
    digits_source,
    eval_transform,
    image_folder_source,
    labels_for,
    list_file_source,
    list_split,
    load_or_create_split,
    load_split,
    random_split,
    read_cifar_batch,
    save_split,
    scan_images,
    split_files,
)
from brcd.io import ArtifactError, load_arrays, save_arrays

torch.set_num_threads(1)

# --------------------------------------------------------------------------------------------
# helpers that write small datasets
# --------------------------------------------------------------------------------------------


class _Py2StylePickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote for the official CIFAR batches: byte strings as py2
    ``str`` opcodes and the numpy-1 module path ``numpy.core.multiarray._reconstruct``."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes

    def save_global(self, obj, name=None) -> None:  # noqa: ANN001
        name = name or obj.__name__
        module = "numpy.core.multiarray" if name == "_reconstruct" else "numpy"
        self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())
        self.memoize(obj)


def _cifar_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)


def write_cifar(root: Path, per_batch: int = 4, n_test: int = 20, py2_style: bool = False) -> Path:
    """Official layout: data_batch_1..5 (5 x per_batch images), test_batch, batches.meta."""
    root.mkdir(parents=True, exist_ok=True)

    def dump(obj: dict, path: Path) -> None:
        with open(path, "wb") as fh:
            if py2_style:
                _Py2StylePickler(fh, protocol=2).dump({k.encode(): v for k, v in obj.items()})
            else:
                pickle.dump(obj, fh, protocol=4)

    for b in range(1, 6):
        labels = [(b * per_batch + i) % 10 for i in range(per_batch)]
        dump({"data": _cifar_images(per_batch, b), "labels": labels, "batch_label": f"b{b}"}, root / f"data_batch_{b}")
    dump({"data": _cifar_images(n_test, 99), "labels": [i % 10 for i in range(n_test)]}, root / "test_batch")
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    dump({"label_names": names, "num_vis": 3072}, root / "batches.meta")
    return root


def write_png(path: Path, seed: int, size: int = 8, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8)).save(path)
    return path


def write_truncated_png(path: Path, seed: int = 0) -> Path:
    write_png(path, seed, size=32)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


# --------------------------------------------------------------------------------------------
# CIFAR-10 batches
# --------------------------------------------------------------------------------------------


def test_cifar_batches_load_with_layout_and_class_names(tmp_path: Path) -> None:
    root = write_cifar(tmp_path / "cifar-10-batches-py")
    train, test = cifar10_source(root, train=True), cifar10_source(root, train=False)
    assert (len(train), len(test), train.num_classes) == (20, 20, 10)
    assert train.class_names[0] == "airplane" and train.class_names[9] == "truck"
    assert train.labels.dtype == np.float32 and np.all(train.labels.sum(1) == 1)
    # pixel (r, c) channel k of row i is data[i, k*1024 + r*32 + c]
    raw = _cifar_images(4, 1)
    img = np.asarray(train.load(1))
    assert img.shape == (32, 32, 3) and train.load(1).mode == "RGB"
    assert img[5, 7, 2] == raw[1, 2 * 1024 + 5 * 32 + 7]
    assert np.argmax(train.labels[1]) == 5  # batch 1: labels (4 + i) % 10
    assert train.names[4] == "data_batch_2[0]"


def test_cifar_official_python2_style_pickles_load(tmp_path: Path) -> None:
    root = write_cifar(tmp_path / "c", py2_style=True)
    raw = (root / "data_batch_1").read_bytes()
    assert b"numpy.core.multiarray\n_reconstruct" in raw and b"_codecs" not in raw
    batch = read_cifar_batch(root / "data_batch_1")
    assert set(batch) >= {"data", "labels"} and batch["data"].dtype == np.uint8
    src = cifar10_source(root, train=False)
    assert len(src) == 20 and src.class_names[3] == "cat"


def test_cifar_batches_saved_by_python3_with_protocol_2_load(tmp_path: Path) -> None:
    """Python 3's protocol 2 stores bytes as _codecs.encode(str, "latin1"): allowed, as a pure
    str -> bytes conversion (PyTorch's weights-only unpickler allows it too)."""
    root = tmp_path / "c"
    root.mkdir()
    data = _cifar_images(10, 3)
    with open(root / "test_batch", "wb") as fh:
        pickle.dump({b"data": data, b"labels": list(range(10)), b"batch_label": b"testing batch 1 of 1"}, fh, protocol=2)
    assert b"_codecs" in (root / "test_batch").read_bytes()
    batch = read_cifar_batch(root / "test_batch")
    assert batch["batch_label"] == b"testing batch 1 of 1"
    np.testing.assert_array_equal(batch["data"], data)
    assert len(cifar10_source(root, train=False)) == 10
    # _codecs.encode is only ever a str -> bytes conversion: anything else is refused
    crafted = (b"\x80\x02}q\x00X\x04\x00\x00\x00dataq\x01c_codecs\nencode\nq\x02K\x01X\x06\x00\x00\x00latin1"
               b"q\x03\x86q\x04Rq\x05s.")
    (root / "bad").write_bytes(crafted)
    with pytest.raises(UnsafePickleError, match="_codecs.encode"):
        read_cifar_batch(root / "bad")


class _Evil:
    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


def test_crafted_pickles_are_refused(tmp_path: Path) -> None:
    evil = _Evil()
    evil.marker = str(tmp_path / "pwned")
    bad = tmp_path / "data_batch_1"
    bad.write_bytes(pickle.dumps({"data": evil}, protocol=2))
    with pytest.raises(UnsafePickleError, match=r"system is not allowed.*refusing"):
        read_cifar_batch(bad)
    assert not (tmp_path / "pwned").exists()
    # object arrays can carry arbitrary objects: refused too
    obj = tmp_path / "obj_batch"
    obj.write_bytes(pickle.dumps({"data": np.array([1, "a"], dtype=object)}, protocol=4))
    with pytest.raises(UnsafePickleError):
        read_cifar_batch(obj)
    # a refused batch inside a CIFAR folder surfaces as the same error
    root = write_cifar(tmp_path / "c")
    (root / "test_batch").write_bytes(pickle.dumps({"data": evil}, protocol=4))
    with pytest.raises(UnsafePickleError, match="test_batch"):
        cifar10_source(root, train=False)


def test_cifar_missing_folder_and_files(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match="download CIFAR-10 python version and extract to") as info:
        cifar10_source(missing, train=True)
    msg = str(info.value)
    assert str(missing) in msg and "data_batch_1" in msg and "test_batch" in msg and "\n" not in msg
    root = write_cifar(tmp_path / "c")
    (root / "data_batch_3").unlink()
    with pytest.raises(ValueError, match="lacks data_batch_3"):
        cifar10_source(root, train=True)
    assert len(cifar10_source(root, train=False)) == 20  # test set does not need the train batches


def test_cifar_class_without_images_is_an_error(tmp_path: Path) -> None:
    root = tmp_path / "c"
    root.mkdir()
    with open(root / "test_batch", "wb") as fh:
        pickle.dump({"data": _cifar_images(5, 0), "labels": [0, 1, 2, 3, 4]}, fh, protocol=4)
    with pytest.raises(ValueError, match="have no images"):
        cifar10_source(root, train=False)


# --------------------------------------------------------------------------------------------
# image folders, list files, corrupt images
# --------------------------------------------------------------------------------------------


def test_image_folder_sorted_labels_and_rgb(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    for k, cls in enumerate(["cat", "ant", "bee"]):
        for j in range(2):
            write_png(root / cls / f"{j}.png", seed=10 * k + j, mode="L" if cls == "bee" else "RGB")
    (root / "ant" / "notes.txt").write_text("not an image")
    src = image_folder_source(root)
    assert src.class_names == ["ant", "bee", "cat"] and len(src) == 6
    assert [Path(n).parent.name for n in src.names] == ["ant", "ant", "bee", "bee", "cat", "cat"]
    np.testing.assert_array_equal(np.argmax(src.labels, 1), [0, 0, 1, 1, 2, 2])
    im = src.load(2)  # a greyscale PNG comes back as RGB
    assert im.mode == "RGB" and im.size == (8, 8)
    assert image_folder_source(root).names == src.names  # deterministic


def test_image_folder_empty_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        image_folder_source(tmp_path / "empty")
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"noimg has no images"):
        image_folder_source(tmp_path / "noimg")
    write_png(tmp_path / "partial" / "a" / "x.png", 0)
    (tmp_path / "partial" / "b").mkdir()
    with pytest.raises(ValueError, match=r"\['b'\] have no images"):
        image_folder_source(tmp_path / "partial")
    with pytest.raises(ValueError, match="does not exist"):
        image_folder_source(tmp_path / "absent")


def test_list_file_source_and_label_width_errors(tmp_path: Path) -> None:
    for i in range(3):
        write_png(tmp_path / "img" / f"{i}.png", i)
    (tmp_path / "train.txt").write_text("img/0.png 1 0 1\n\nimg/1.png 0 1 0\nimg/2.png 0 0 1\n")
    src = list_file_source(tmp_path, "train.txt")
    assert len(src) == 3 and src.num_classes == 3
    np.testing.assert_array_equal(src.labels[0], [1, 0, 1])
    assert src.names[1] == str(tmp_path / "img" / "1.png") and src.load(1).mode == "RGB"
    (tmp_path / "bad.txt").write_text("img/0.png 1 0 1\nimg/1.png 0 1 0\nimg/2.png 0 1\n")
    with pytest.raises(ValueError, match=r"bad\.txt:3: 2 label values but line 1 has 3") as info:
        list_file_source(tmp_path, "bad.txt")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"train\.txt:1: 3 label values but num_classes=4"):
        list_file_source(tmp_path, "train.txt", num_classes=4)
    (tmp_path / "nolab.txt").write_text("img/0.png 1 0 2\n")
    with pytest.raises(ValueError, match=r"nolab\.txt:1: labels must be 0 or 1"):
        list_file_source(tmp_path, "nolab.txt")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="names no images"):
        list_file_source(tmp_path, "empty.txt")


def test_corrupt_image_error_scan_and_skip(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "imgs"
    for j in range(3):
        write_png(root / "a" / f"{j}.png", j)
    bad = write_truncated_png(root / "a" / "1.png")
    src = image_folder_source(root)
    with pytest.raises(CorruptImageError, match=str(bad)) as info:
        src.load(1)
    assert isinstance(info.value, ValueError) and info.value.path == str(bad)
    assert scan_images(src) == [str(bad)]
    tf = eval_transform(8, resize_then_crop=False)
    with pytest.raises(CorruptImageError):
        EvalDataset(src, np.arange(3), tf, on_corrupt="error")[1]
    ds = EvalDataset(src, np.arange(3), tf, on_corrupt="skip")
    with caplog.at_level(logging.WARNING, logger="brcd.data"):
        x1, pos = ds[1]
        x1_again, _ = ds[1]
    assert pos == 1  # the requested position, so pseudo-label lookups stay aligned
    torch.testing.assert_close(x1, ds[2][0])  # replaced by the next readable item
    torch.testing.assert_close(x1, x1_again)
    warnings = [r for r in caplog.records if str(bad) in r.getMessage()]
    assert len(warnings) == 1 and "Traceback" not in caplog.text
    with pytest.raises(ValueError, match="on_corrupt"):
        EvalDataset(src, np.arange(3), tf, on_corrupt="ignore")


# --------------------------------------------------------------------------------------------
# splits
# --------------------------------------------------------------------------------------------


def _labels(n: int = 600, c: int = 6, seed: int = 0) -> np.ndarray:
    return np.eye(c, dtype=np.float32)[np.random.default_rng(seed).integers(0, c, n)]


def test_random_split_determinism_disjointness_and_strata() -> None:
    lab = _labels()
    a = random_split(lab, 0, query=60, validation=60, train=200)
    b = random_split(lab, 0, query=60, validation=60, train=200)
    c = random_split(lab, 1, query=60, validation=60, train=200)
    for part in ("train", "validation", "query", "database"):
        np.testing.assert_array_equal(getattr(a, part), getattr(b, part))
        assert getattr(a, part).dtype == np.int64
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert not np.array_equal(a.query, c.query)
    assert a.sizes == {"train": 200, "validation": 60, "query": 60, "database": 480}
    assert not set(a.query) & set(a.validation) and not set(a.query) & set(a.database)
    assert set(a.train) <= set(a.database)
    # stratified: query class counts track the class proportions (largest remainder rounding)
    expected = lab.sum(0) * 60 / len(lab)
    assert np.all(np.abs(lab[a.query].sum(0) - expected) < 1.0 + 1e-6)
    with pytest.raises(ValueError, match="leave no database images"):
        random_split(lab, 0, query=300, validation=300, train=10)
    with pytest.raises(ValueError, match="train=1000 exceeds the database size"):
        random_split(lab, 0, query=60, validation=60, train=1000)


def test_cifar10_protocol_sizes_on_synthetic_labels() -> None:
    rng = np.random.default_rng(0)
    tr = np.repeat(np.arange(10), 5000)
    te = rng.permutation(np.repeat(np.arange(10), 1000))
    s = cifar10_split(tr, te, seed=3)
    assert s.sizes == {"train": 5000, "validation": 5000, "query": 5000, "database": 50000}
    assert s.segments == (("train", 50000), ("test", 10000)) and s.labels.shape == (60000, 10)
    np.testing.assert_array_equal(s.database, np.arange(50000))
    assert s.train.max() < 50000 and np.all(np.bincount(tr[s.train], minlength=10) == 500)
    assert s.query.min() >= 50000 and s.validation.min() >= 50000
    assert not set(s.query) & set(s.validation) and s.segment_offset("test") == 50000
    np.testing.assert_array_equal(np.argmax(s.labels_of("query"), 1), te[s.query - 50000])
    assert cifar10_split(tr, te, seed=3).fingerprint == s.fingerprint
    assert cifar10_split(tr, te, seed=4).fingerprint != s.fingerprint
    with pytest.raises(ValueError, match="fewer than train_per_class=501"):
        cifar10_split(tr[:5010], te, seed=0, train_per_class=501)


def test_list_split_validation_modes() -> None:
    q, db, tr = _labels(50, 4, 1), _labels(300, 4, 2), _labels(100, 4, 3)
    s = list_split(q, db, 0, train_labels=tr)
    assert s.segments == (("train", 100), ("query", 50), ("database", 300))
    np.testing.assert_array_equal(s.validation, s.query)
    np.testing.assert_array_equal(s.query, np.arange(100, 150))
    np.testing.assert_array_equal(s.train, np.arange(100))
    np.testing.assert_array_equal(s.database, np.arange(150, 450))
    carved = list_split(q, db, 0, train_labels=tr, validation=10)
    assert carved.sizes["validation"] == 10 and carved.sizes["query"] == 40
    assert not set(carved.validation) & set(carved.query)
    nus = list_split(q, db, 0, train=120)  # no train list: train drawn from the database
    assert nus.segments == (("query", 50), ("database", 300)) and set(nus.train) <= set(nus.database)
    with pytest.raises(ValueError, match="set train"):
        list_split(q, db, 0)


def test_saved_split_reused_and_mismatches_refused(tmp_path: Path) -> None:
    lab = _labels()
    calls = []

    def create() -> Split:
        calls.append(1)
        return random_split(lab, 0, query=60, validation=60, train=200)

    path = tmp_path / "split"
    first = load_or_create_split(path, create, labels=lab)
    npz, manifest = split_files(path)
    assert npz.name == "split.npz" and manifest.exists()
    again = load_or_create_split(path, create, labels=lab, expected_fingerprint=first.fingerprint)
    assert len(calls) == 1 and again.fingerprint == first.fingerprint
    np.testing.assert_array_equal(again.train, first.train)
    with pytest.raises(ArtifactError, match="expected 0000") as info:
        load_or_create_split(path, create, expected_fingerprint="0000")
    assert "\n" not in str(info.value)
    with pytest.raises(ArtifactError, match="made for other data"):
        load_split(path, labels=_labels(seed=5))
    with pytest.raises(ArtifactError, match="made with seed=0, but seed=1"):
        load_split(path, expect={"seed": 1})
    # tampering with the arrays is detected against the manifest fingerprint
    arrays = load_arrays(npz)
    arrays["train"] = arrays["train"][::-1].copy()
    save_arrays(npz, **arrays)
    with pytest.raises(ArtifactError, match="does not match its manifest"):
        load_split(path)
    # a bare .npz path keeps the manifest beside it
    save_split(first, tmp_path / "other.npz")
    assert (tmp_path / "other.json").exists() and load_split(tmp_path / "other.npz").fingerprint == first.fingerprint


# --------------------------------------------------------------------------------------------
# transforms, datasets, build_data
# --------------------------------------------------------------------------------------------


def test_two_view_transform_shapes_and_views_differ() -> None:
    torch.manual_seed(0)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    v1, v2 = TwoViewTransform(32)(img)
    assert v1.shape == v2.shape == (3, 32, 32) and v1.dtype == torch.float32
    assert not torch.allclose(v1, v2)
    tiny1, tiny2 = TwoViewTransform(2)(img)  # blur kernel shrinks for tiny images
    assert tiny1.shape == (3, 2, 2)
    assert eval_transform(32, resize_then_crop=False)(img).shape == (3, 32, 32)
    assert eval_transform(32, resize_then_crop=True)(img).shape == (3, 32, 32)
    with pytest.raises(ValueError, match="image_size"):
        TwoViewTransform(0)


def test_digits_source() -> None:
    src = digits_source()
    assert len(src) == 1797 and src.num_classes == 10 and src.in_memory
    im = src.load(0)
    assert im.mode == "RGB" and im.size == (8, 8)
    arr = np.asarray(im)
    assert arr.dtype == np.uint8 and src.images.max() == 255 and np.array_equal(arr[..., 0], arr[..., 2])
    assert src.labels.shape == (1797, 10) and np.all(src.labels.sum(1) == 1)
    assert np.all(src.labels.sum(0) > 170)


def test_build_data_digits_datasets_and_seed_guard(tmp_path: Path) -> None:
    b = build_data(source="digits", image_size=16, seed=0, split_path=tmp_path / "split")
    assert b.split.sizes == {"train": 1000, "validation": 200, "query": 200, "database": 1397}
    ds = b.train_dataset()
    v1, v2, pos = ds[7]
    assert v1.shape == (3, 16, 16) and pos == 7 and ds.items.cache is not None  # pre-resized once
    x, pos = b.eval_dataset("query")[3]
    assert x.shape == (3, 16, 16) and pos == 3
    np.testing.assert_array_equal(b.labels("query"), labels_for(b.source, b.split.query))
    again = build_data(source="digits", image_size=16, seed=0, split_path=tmp_path / "split")
    assert again.split.fingerprint == b.split.fingerprint
    with pytest.raises(ArtifactError, match="seed=0, but seed=1"):
        build_data(source="digits", seed=1, split_path=tmp_path / "split")
    with pytest.raises(ArtifactError, match="params="):
        build_data(source="digits", seed=0, query=100, split_path=tmp_path / "split")
    with pytest.raises(ValueError, match="unknown data source"):
        build_data(source="mnist")


def test_build_data_cifar_and_list_files_positions(tmp_path: Path) -> None:
    root = write_cifar(tmp_path / "c")
    b = build_data(source="cifar10", root=root, image_size=8, train_per_class=1, validation=10)
    assert isinstance(b.source, ConcatSource) and b.split.sizes["database"] == 20
    assert b.split.sizes == {"train": 10, "validation": 10, "query": 10, "database": 20}
    q0 = int(b.split.query[0])
    assert b.source.locate(q0)[0] == "test"
    np.testing.assert_array_equal(np.asarray(b.source.load(q0)), np.asarray(cifar10_source(root, False).load(q0 - 20)))
    img, _ = b.eval_dataset("query")[0]
    assert img.shape == (3, 8, 8)
    v1, v2, pos = TwoViewDataset(b.source, b.split.train, TwoViewTransform(8))[2]
    assert v1.shape == (3, 8, 8) and pos == 2

    lroot = tmp_path / "lists"
    lines = {name: [] for name in ("train", "test", "database")}
    for i in range(12):
        rel = f"img/{i}.png"
        write_png(lroot / rel, i)
        lab = " ".join("1" if k == i % 3 else "0" for k in range(3))
        lines["database" if i < 8 else "test"].append(f"{rel} {lab}")
        if i < 4:
            lines["train"].append(f"{rel} {lab}")
    for name, ls in lines.items():
        (lroot / f"{name}.txt").write_text("\n".join(ls) + "\n")
    lb = build_data(source="list_files", root=lroot, image_size=8, split_path=tmp_path / "ls")
    assert lb.split.segments == (("train", 4), ("query", 4), ("database", 8))
    np.testing.assert_array_equal(lb.split.validation, lb.split.query)
    x, pos = lb.eval_dataset("database")[0]
    assert x.shape == (3, 8, 8) and lb.resize_then_crop
    nus = build_data(source="list_files", root=lroot, list_files={"train": None}, train=5, validation=2)
    assert nus.split.sizes == {"train": 5, "validation": 2, "query": 2, "database": 8}
