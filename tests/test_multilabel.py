"""A multi-label list-file dataset made from real digits (brcd.data.multilabel, `brcd data
multilabel-digits`), and `brcd compare` on it: training-free rows on pixels and on both frozen
inputs, the students' bit agreement, symmetric-only rows in the table."""

import json

import numpy as np
import pytest

from conftest import TINY
from pipelines.cli import main


def _lists(root):
    out = {}
    for name in ("train.txt", "test.txt", "database.txt"):
        rows = [line.split() for line in (root / name).read_text().splitlines() if line.strip()]
        out[name] = ([r[0] for r in rows], np.array([[int(v) for v in r[1:]] for r in rows]))
    return out


def test_cli_writes_a_multilabel_list_dataset(tmp_path, capsys):
    root = tmp_path / "mld"
    assert main(["data", "multilabel-digits", "--output", str(root), "--database", "120", "--query", "30",
                 "--train", "80"]) == 0
    assert "120 database + 30 query images" in capsys.readouterr().out
    lists = _lists(root)
    (db_paths, db), (q_paths, q), (tr_paths, tr) = lists["database.txt"], lists["test.txt"], lists["train.txt"]
    assert (len(db), len(q), len(tr)) == (120, 30, 80) and db.shape[1] == 10
    assert set(db.sum(1)) <= {1, 2} and (db.sum(1) == 2).any()  # 1 or 2 digits, some images multi-label
    assert set(tr_paths) <= set(db_paths) and not set(q_paths) & set(db_paths)
    from brcd.data import list_file_source

    src = list_file_source(root, "database.txt", num_classes=10)
    assert len(src) == 120 and src.load(0).size == (32, 32)
    with pytest.raises(ValueError, match="cannot exceed"):
        from brcd.data.multilabel import write_multilabel_digits

        write_multilabel_digits(tmp_path / "x", database=10, train=11)


@pytest.mark.ray
def test_compare_on_multilabel_list_files(tmp_path, ray_local, capsys):
    from brcd.data.multilabel import write_multilabel_digits

    root = write_multilabel_digits(tmp_path / "mld", database=300, query=60, train=200)
    out = tmp_path / "cmp"
    args = ["compare", "-c", "demo_multilabel", "--output", str(out), "--seeds", "1", "--set", f"data.root={root}",
            "--methods", "pca_itq@pixels,lsh@teacher_features,pca_itq@student_features,brcd"]
    for o in TINY:
        if not o.startswith(("data.query", "data.validation", "data.train")):  # the lists are the split
            args += ["--set", o]
    assert main(args) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "compare.json").read_text())
    methods = [r["method"] for r in result["rows"]]
    assert methods == ["pca_itq@pixels", "lsh@teacher_features", "pca_itq@student_features", "teacher", "brcd"]
    for r in result["rows"][:3]:
        assert 0 < r["map_symmetric"] <= 1 and "map_asymmetric" not in r and r["encode_images_per_second"] > 0
    dims = {r["input"]: r["feature_dims"] for r in result["rows"][:3]}
    assert dims["pixels"] == 3 * 32 * 32 and dims["teacher_features"] != dims["student_features"]
    brcd = result["rows"][-1]
    assert 0 <= brcd["bit_agreement"] <= 1 and 0 <= brcd["map_asymmetric"] <= 1
    md = (out / "compare.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("| pca_itq@pixels"))
    assert line.count("—") >= 4 and "PCA-ITQ on pixels" in line  # symmetric only
    assert "mAP@500" in md and "bit agreement" in md and "[compare] training-free on pixels" in printed
