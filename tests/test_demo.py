"""The embedded ELPV demo data, written by write_demo (a small stratified subset: fast)."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from semivit.data.decode import load_rgb
from semivit.data.demo import CLASS_NAMES, elpv_index, write_demo
from semivit.data.layout import load_eval, load_train, read_truth, unlabeled_pool
from semivit.errors import UserError

LIMIT = 120


def _listing(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _per_class(folder: Path) -> dict[str, int]:
    return {c: len(list((folder / c).glob("*.png"))) if (folder / c).is_dir() else 0 for c in CLASS_NAMES}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "d"
    write_demo(out, seed=0, limit=LIMIT)
    return out


def test_limited_demo_layout_and_counts(demo):
    doc = json.loads((demo / "demo.json").read_text())
    counts = doc["counts"]
    assert doc["params"] == {"dataset": "elpv", "labeled_fraction": 0.2, "seed": 0,
                             "test_fraction": 0.25, "limit": LIMIT}
    assert "CC BY-NC-SA 4.0" in doc["license"] and (demo / "LICENSE.txt").is_file()
    assert _per_class(demo / "train") == counts["train"]
    assert _per_class(demo / "test") == counts["test"]
    with open(demo / "unlabeled_truth.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert Counter(r["label"] for r in rows) == Counter({k: v for k, v in counts["unlabeled"].items() if v})
    unl = sorted(p.relative_to(demo).as_posix() for p in (demo / "unlabeled").iterdir())
    assert unl == sorted(r["image"] for r in rows)
    total = sum(sum(c.values()) for c in counts.values())
    assert total == LIMIT
    assert len(_listing(demo)) == LIMIT + 3  # + demo.json, LICENSE.txt, unlabeled_truth.csv
    # every class is present in the labeled and the test split
    assert all(v > 0 for v in counts["train"].values()) and all(v > 0 for v in counts["test"].values())
    # held-out, labeled and unlabeled images are disjoint
    names = [p.name for p in demo.rglob("*.png")]
    assert len(names) == len(set(names)) == LIMIT


def test_limited_demo_labels_are_the_true_ones(demo):
    _, names, labels, _ = elpv_index()
    truth = {n: CLASS_NAMES[y] for n, y in zip(names, labels)}
    for split in ("train", "test"):
        for p in (demo / split).rglob("*.png"):
            assert truth[p.name] == p.parent.name
    for image, label in read_truth(demo, "unlabeled_truth.csv").items():
        assert truth[Path(image).name] == label


def test_limited_demo_loads_through_the_layout(demo):
    ls = load_train(demo)
    assert ls.classes == CLASS_NAMES
    assert len(unlabeled_pool(demo)) == sum(json.loads((demo / "demo.json").read_text())["counts"]["unlabeled"].values())
    assert load_eval(demo, classes=CLASS_NAMES).classes == CLASS_NAMES
    img = load_rgb(ls.paths[0])
    assert img.shape == (300, 300, 3)  # ELPV: 300x300 greyscale -> RGB
    assert np.array_equal(img[..., 0], img[..., 1])


def test_demo_is_deterministic_for_a_seed(demo, tmp_path):
    again = tmp_path / "again"
    write_demo(again, seed=0, limit=LIMIT)
    assert _listing(again) == _listing(demo)
    assert (again / "unlabeled_truth.csv").read_text() == (demo / "unlabeled_truth.csv").read_text()
    other = tmp_path / "other"
    write_demo(other, seed=1, limit=LIMIT)
    assert _listing(other) != _listing(demo)


def test_demo_is_idempotent(demo):
    before = {p: p.stat().st_mtime_ns for p in demo.rglob("*")}
    counts = write_demo(demo, seed=0, limit=LIMIT)
    assert counts == json.loads((demo / "demo.json").read_text())["counts"]
    assert {p: p.stat().st_mtime_ns for p in demo.rglob("*")} == before


def test_demo_refuses_a_foreign_directory_and_changes_nothing(tmp_path, demo):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        write_demo(foreign, seed=0, limit=LIMIT)
    assert _listing(foreign) == ["notes.txt"] and (foreign / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no staging left behind
    # A demo directory made with other parameters is foreign too.
    before = _listing(demo)
    with pytest.raises(UserError, match="not empty"):
        write_demo(demo, seed=5, limit=LIMIT)
    assert _listing(demo) == before
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        write_demo(afile, limit=LIMIT)


def test_demo_into_an_existing_empty_directory(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    counts = write_demo(out, seed=0, limit=LIMIT, labeled_fraction=0.5)
    assert _per_class(out / "train") == counts["train"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_demo_bad_parameters(tmp_path):
    with pytest.raises(UserError, match="labeled-fraction"):
        write_demo(tmp_path / "a", labeled_fraction=0)
    with pytest.raises(UserError, match="labeled-fraction"):
        write_demo(tmp_path / "a", labeled_fraction=1.5)
    with pytest.raises(UserError):  # too small to keep every class in train/ and test/
        write_demo(tmp_path / "b", limit=20)
    with pytest.raises(UserError, match="without"):
        write_demo(tmp_path / "c", limit=40)
    assert list(tmp_path.iterdir()) == []


def test_labeled_fraction_one_leaves_no_unlabeled(tmp_path):
    counts = write_demo(tmp_path / "all", labeled_fraction=1.0, limit=LIMIT)
    assert sum(counts["unlabeled"].values()) == 0
    assert list((tmp_path / "all" / "unlabeled").iterdir()) == []
    assert (tmp_path / "all" / "unlabeled_truth.csv").read_text().strip() == "image,label,cell_type"
