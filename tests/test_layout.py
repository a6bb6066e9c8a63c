"""DATA layouts (class folders, labels.csv), the unlabeled pool, eval sets and folds.json."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import TINY_CLASSES, class_image, make_data, write_image
from semivit.data.folds import load_or_make, make_folds
from semivit.data.layout import load_eval, load_train, read_truth, unlabeled_pool
from semivit.errors import UserError


# --------------------------------------------------------------------------- training layouts
def test_class_folder_layout(tiny_data):
    ls = load_train(tiny_data)
    assert ls.classes == TINY_CLASSES
    assert len(ls) == 36 and ls.counts() == [12, 12, 12]
    assert ls.labels.dtype == np.int64
    for i in range(len(ls)):  # every image carries the label of its folder
        assert ls.paths[i].parent.name == ls.classes[ls.labels[i]]
        assert ls.rel(i) == f"train/{ls.classes[ls.labels[i]]}/{ls.paths[i].name}"
    assert not any("unlabeled" in str(p) or "/test/" in str(p) for p in ls.paths)


def test_class_folders_ignore_non_images_and_hidden(tiny_data):
    (tiny_data / "train" / "red" / "notes.txt").write_text("x")
    write_image(tiny_data / "train" / "red" / ".hidden.png")
    write_image(tiny_data / "train" / ".trash" / "x.png")  # hidden class folder: not a class
    write_image(tiny_data / "train" / "red" / "sub" / "nested.PNG")  # nested: still red
    ls = load_train(tiny_data)
    assert ls.classes == TINY_CLASSES
    assert ls.counts() == [12, 12, 13]


def test_class_folder_without_images_is_an_error(tiny_data):
    (tiny_data / "train" / "purple").mkdir()
    with pytest.raises(UserError, match="purple"):
        load_train(tiny_data)


def test_labels_csv_layout(tmp_path):
    data = make_data(tmp_path / "D", layout="csv", n_unlabeled=0, n_test=0)
    ls = load_train(data)
    assert ls.classes == TINY_CLASSES
    assert ls.counts() == [12, 12, 12]
    assert ls.rel(0).startswith("images/")
    rows = (data / "labels.csv").read_text().splitlines()[1:]
    got = {ls.rel(i): ls.classes[ls.labels[i]] for i in range(len(ls))}
    assert got == dict(r.split(",") for r in rows)


def test_labels_csv_with_bom_and_spaced_header(tmp_path):
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.jpg")
    (tmp_path / "labels.csv").write_bytes("\ufeffImage , Label\na.png,x\nb.jpg,y\n".encode("utf-8"))
    ls = load_train(tmp_path)
    assert ls.classes == ["x", "y"] and ls.labels.tolist() == [0, 1]


def test_labels_csv_missing_file_names_line_and_file(tmp_path):
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.png")
    (tmp_path / "labels.csv").write_text("image,label\na.png,cat\nb.png,dog\nmissing/c.png,cat\n")
    with pytest.raises(UserError) as e:
        load_train(tmp_path)
    msg = str(e.value)
    assert "line 4" in msg and "missing/c.png" in msg and "labels.csv" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("header", ["path,label", "image,class", "image", "filename;label"])
def test_labels_csv_bad_columns(tmp_path, header):
    write_image(tmp_path / "a.png")
    (tmp_path / "labels.csv").write_text(f"{header}\na.png,cat\n")
    with pytest.raises(UserError, match="columns 'image' and 'label'"):
        load_train(tmp_path)


def test_labels_csv_other_errors(tmp_path):
    write_image(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("x")
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("image,label\n")
    with pytest.raises(UserError, match="no rows"):
        load_train(tmp_path)
    csv_path.write_text("image,label\na.png,\n")
    with pytest.raises(UserError, match="line 2: empty"):
        load_train(tmp_path)
    csv_path.write_text("image,label\na.png,cat\nnotes.txt,dog\n")
    with pytest.raises(UserError, match="line 3: not an image"):
        load_train(tmp_path)
    csv_path.write_text("image,label\na.png,cat\n")
    with pytest.raises(UserError, match="at least 2 classes"):
        load_train(tmp_path)


def test_labels_csv_duplicate_row_is_an_error(tmp_path):
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.png")
    (tmp_path / "labels.csv").write_text("image,label\na.png,cat\nb.png,dog\n./a.png,dog\n")
    with pytest.raises(UserError, match="line 4.*line 2"):
        load_train(tmp_path)


def test_labels_csv_wins_over_train_folders(tiny_data):
    write_image(tiny_data / "extra" / "one.png", class_image("red", np.random.default_rng(1)))
    write_image(tiny_data / "extra" / "two.png", class_image("blue", np.random.default_rng(2)))
    (tiny_data / "labels.csv").write_text("image,label\nextra/one.png,red\nextra/two.png,blue\n")
    ls = load_train(tiny_data)
    assert len(ls) == 2 and ls.classes == ["blue", "red"]


def test_missing_or_empty_data_dir(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_train(tmp_path / "nope")
    with pytest.raises(UserError, match="neither train"):
        load_train(tmp_path)
    (tmp_path / "train").mkdir()
    with pytest.raises(UserError, match="no class folders"):
        load_train(tmp_path)


# --------------------------------------------------------------------------- eval layouts
def test_load_eval_test_subdir(tiny_data):
    ls = load_eval(tiny_data)
    assert ls.classes == TINY_CLASSES and ls.counts() == [6, 6, 6]
    assert all(ls.rel(i).startswith("test/") for i in range(len(ls)))


def test_load_eval_prefers_test_split_over_training_labels_csv(tmp_path):
    data = make_data(tmp_path / "D", layout="csv", n_unlabeled=0, n_test=3)
    ls = load_eval(data)
    assert all(ls.rel(i).startswith("test/") for i in range(len(ls))), "scored on training images"
    assert ls.counts() == [3, 3, 3]


def test_load_eval_class_dirs_directly(tiny_data):
    ls = load_eval(tiny_data / "test")
    assert ls.counts() == [6, 6, 6]
    assert ls.rel(0) == f"blue/{ls.paths[0].name}"


def test_load_eval_labels_csv(tmp_path):
    for name, c in [("a.png", "red"), ("b.png", "blue"), ("c.png", "red")]:
        write_image(tmp_path / name)
    (tmp_path / "labels.csv").write_text("image,label\na.png,red\nb.png,blue\nc.png,red\n")
    ls = load_eval(tmp_path, classes=TINY_CLASSES)
    assert ls.classes == TINY_CLASSES  # the model's order, not the CSV's
    assert ls.labels.tolist() == [2, 0, 2]
    assert ls.counts() == [1, 0, 2]


def test_load_eval_uses_model_class_order(tiny_data):
    model_classes = ["red", "green", "blue"]
    ls = load_eval(tiny_data, classes=model_classes)
    assert ls.classes == model_classes
    for i in range(len(ls)):
        assert ls.paths[i].parent.name == model_classes[ls.labels[i]]


def test_load_eval_subset_of_model_classes(tiny_data):
    shutil.rmtree(tiny_data / "test" / "green")
    ls = load_eval(tiny_data, classes=TINY_CLASSES)
    assert ls.classes == TINY_CLASSES and ls.counts() == [6, 0, 6]


def test_load_eval_unknown_classes_are_an_error(tiny_data, tmp_path):
    write_image(tiny_data / "test" / "purple" / "p.png")
    with pytest.raises(UserError, match="purple"):
        load_eval(tiny_data, classes=TINY_CLASSES)
    d = tmp_path / "csv"
    write_image(d / "a.png")
    (d / "labels.csv").write_text("image,label\na.png,orange\n")
    with pytest.raises(UserError, match="orange"):
        load_eval(d, classes=TINY_CLASSES)


def test_load_eval_missing_dir(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_eval(tmp_path / "nope")


# --------------------------------------------------------------------------- unlabeled pool
def test_unlabeled_pool_any_depth(tiny_data):
    pool = unlabeled_pool(tiny_data)
    rel = [p.relative_to(tiny_data).as_posix() for p in pool]
    assert len(pool) == 24
    assert rel == sorted(rel)
    assert any(r.startswith("unlabeled/batch1/deeper/") for r in rel)
    assert any(r.count("/") == 1 for r in rel)
    truth = read_truth(tiny_data, "unlabeled_truth.csv")
    assert set(truth) == set(rel)
    assert sorted(truth.values()) == sorted(TINY_CLASSES * 8)


def test_unlabeled_pool_cap_is_a_deterministic_subset(tiny_data):
    full = unlabeled_pool(tiny_data)
    a = unlabeled_pool(tiny_data, max_items=10, seed=3)
    assert len(a) == 10 and set(a) <= set(full)
    assert a == unlabeled_pool(tiny_data, max_items=10, seed=3)
    assert a == sorted(a, key=full.index)
    assert a != unlabeled_pool(tiny_data, max_items=10, seed=4)


def test_no_unlabeled_folder_is_an_empty_pool(tmp_path):
    assert unlabeled_pool(tmp_path) == []
    assert read_truth(tmp_path, "unlabeled_truth.csv") == {}


# --------------------------------------------------------------------------- folds
def _labels(counts):
    return np.concatenate([np.full(n, k) for k, n in enumerate(counts)]).astype(np.int64)


def test_folds_are_stratified():
    y = _labels([50, 25, 10])
    fold = make_folds(y, 5, seed=0)
    assert fold.shape == y.shape and set(fold.tolist()) == set(range(5))
    for k in range(5):
        np.testing.assert_array_equal(np.bincount(y[fold == k], minlength=3), [10, 5, 2])


def test_folds_deterministic_for_a_seed():
    y = _labels([30, 20, 10])
    a, b = make_folds(y, 5, seed=7), make_folds(y, 5, seed=7)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, make_folds(y, 5, seed=8))


def test_folds_too_few_images():
    with pytest.raises(UserError, match="cannot make 5 folds"):
        make_folds(_labels([2, 2]), 5, seed=0)
    with pytest.raises(UserError, match="fewer than 5"):
        make_folds(_labels([3, 3]), 5, seed=0)  # 6 images but no class reaches 5
    fold = make_folds(_labels([10, 2]), 5, seed=0)  # a small class only warns
    assert set(fold.tolist()) == set(range(5))


def test_folds_json_written_and_reused(tiny_data, tmp_path):
    ls = load_train(tiny_data)
    path = tmp_path / "run" / "folds.json"
    first = load_or_make(path, ls, 3, seed=1)
    doc = json.loads(path.read_text())
    assert doc["folds"] == 3 and doc["seed"] == 1 and doc["classes"] == TINY_CLASSES
    assert [it["image"] for it in doc["items"]] == [ls.rel(i) for i in range(len(ls))]
    assert [it["fold"] for it in doc["items"]] == first.tolist()
    for k in range(3):
        assert np.bincount(ls.labels[first == k], minlength=3).tolist() == [4, 4, 4]
    # Reused as saved: another seed does not change the split of an existing run.
    again = load_or_make(path, ls, 3, seed=99)
    np.testing.assert_array_equal(first, again)
    # ...and the saved split wins even when the file was edited by hand.
    doc["items"][0]["fold"] = (doc["items"][0]["fold"] + 1) % 3
    path.write_text(json.dumps(doc))
    assert load_or_make(path, ls, 3, seed=1)[0] == doc["items"][0]["fold"]


def test_folds_json_mismatch_is_an_error(tiny_data, tmp_path):
    ls = load_train(tiny_data)
    path = tmp_path / "folds.json"
    load_or_make(path, ls, 3, seed=0)
    with pytest.raises(UserError, match="other data"):
        load_or_make(path, ls, 4, seed=0)  # other cv.folds
    with pytest.raises(UserError, match="other data"):
        load_or_make(path, ls.subset(range(len(ls) - 1)), 3, seed=0)  # other images
    relabelled = ls.subset(range(len(ls)))
    relabelled.labels = relabelled.labels.copy()
    relabelled.labels[0] = (relabelled.labels[0] + 1) % 3
    with pytest.raises(UserError, match="other data"):
        load_or_make(path, relabelled, 3, seed=0)  # other labels
    path.write_text("{not json")
    with pytest.raises(UserError, match="not a valid folds file"):
        load_or_make(path, ls, 3, seed=0)
    path.write_text('{"folds": 3}')
    with pytest.raises(UserError, match="not a valid folds file"):
        load_or_make(path, ls, 3, seed=0)
