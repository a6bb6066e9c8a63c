"""pseudo.propagate: spread - label spreading over the stage-1 members' embeddings of labeled +
unlabeled images, mixed with the teacher's probabilities before stage 2's rule and soft targets."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import invoke, one_line_error, retrain_on, soft_targets_after_retrain
from semivit import config
from semivit.pseudo.propagate import joint_embedding, mix_with_spread, spread


def _blobs():
    """Two tight clusters on a circle, one labeled image each; the pool: 6 images near each."""
    rng = np.random.default_rng(0)
    centres = np.array([[1.0, 0.0], [0.0, 1.0]])
    labeled = centres.copy()
    pool = np.concatenate([c + 0.02 * rng.standard_normal((6, 2)) for c in centres])
    return labeled, np.array([0, 1]), pool, np.repeat([0, 1], 6)


def test_spread_labels_each_cluster_with_its_labeled_neighbour():
    labeled, labels, pool, truth = _blobs()
    dist = spread(labeled, labels, pool, n_classes=3, neighbors=3, alpha=0.5)
    assert dist.shape == (12, 3)
    assert (dist.argmax(1) == truth).all()
    assert (dist[:, 2] == 0).all()  # no labeled image of class 2: no mass from the graph


def test_an_image_the_graph_does_not_reach_keeps_the_teachers_probabilities():
    labeled, labels, pool, truth = _blobs()
    # 5 images far away: their 4 nearest neighbours are each other - a component with no label
    far = np.array([-50.0, -50.0]) + 0.1 * np.random.default_rng(1).standard_normal((5, 2))
    dist = spread(labeled, labels, np.concatenate([pool, far]), n_classes=2, neighbors=4, alpha=0.5)
    assert (dist[-5:] == 0).all() and (dist[:-5].sum(1) > 0).all()
    assert (dist[:-5].argmax(1) == truth).all()
    teacher = np.tile([[0.3, 0.7]], (17, 1))
    out = mix_with_spread(teacher, dist, teacher_share=0.2)
    np.testing.assert_allclose(out.probs[-5:], teacher[-5:], atol=1e-6)
    assert out.reached == 12


def test_mixing_weights_and_the_changed_count():
    teacher = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    dist = np.array([[0.0, 2.0], [0.0, 1.0], [0.0, 1.0]])  # rows are renormalised before mixing
    out = mix_with_spread(teacher, dist, teacher_share=0.5)
    np.testing.assert_allclose(out.probs, [[0.45, 0.55], [0.3, 0.7], [0.1, 0.9]], atol=1e-6)
    assert out.changed == 2 and out.reached == 3
    np.testing.assert_allclose(mix_with_spread(teacher, dist, 1.0).probs, teacher, atol=1e-6)


def test_joint_embedding_gives_every_member_the_same_say():
    a = np.array([[3.0, 4.0], [0.0, 2.0]])
    b = np.array([[100.0, 0.0, 0.0], [0.0, 0.0, 0.5]])
    j = joint_embedding([a, b])
    np.testing.assert_allclose(np.linalg.norm(j, axis=1), 1.0)
    np.testing.assert_allclose(j[0], np.array([0.6, 0.8, 1.0, 0.0, 0.0]) / np.sqrt(2))


def _member_outputs(run_dir: Path, paths: list[Path], tta: bool):
    """(val macro F1, probabilities, embeddings) of every stage-1 member on ``paths`` - computed
    here member by member, not through stage 2's code."""
    from semivit.data.dataset import decode_many
    from semivit.models.checkpoint import load_checkpoint
    from semivit.models.ensemble import members_from_stages
    from semivit.trainer.infer import predict_arrays

    out = []
    for m in members_from_stages(run_dir, ["stage1"]):
        model, doc = load_checkpoint(run_dir / m["path"])
        images = decode_many(paths, int(doc["model"]["img_size"])).images
        p, e = predict_arrays(model, images, tta=tta, with_embeddings=True)
        out.append((m["val_macro_f1"], p, e))
    return out


def _joint(members, rows=slice(None)):
    """The members' embeddings of ``rows``, each L2-normalised, concatenated, / sqrt(members) -
    written out here, not taken from semivit.pseudo.propagate."""
    vs = [e[rows] / np.linalg.norm(e[rows], axis=1, keepdims=True) for _, _, e in members]
    return np.concatenate(vs, 1) / np.sqrt(len(vs))


def test_stage2_soft_targets_are_the_teacher_mixed_with_label_spreading(tiny_run, tiny_data_shared, tmp_path):
    """Recomputed from scratch: the members' probabilities and embeddings of the labeled images
    and the pool, scikit-learn's LabelSpreading on them, the teacher's share 0.4."""
    from sklearn.semi_supervised import LabelSpreading

    from semivit.data.layout import load_train

    sets = ["pseudo.threshold_mode=all", "pseudo.soft=true", "pseudo.train={epochs: 1, early_stopping: false}",
            "pseudo.propagate=spread", "pseudo.propagate_neighbors=5", "pseudo.propagate_alpha=0.3",
            "pseudo.propagate_mix=0.4"]
    cfg = config.resolve(preset="tiny", overrides=sets)
    out = tmp_path / "RUN"
    rows, classes, got = soft_targets_after_retrain(tiny_run, tiny_data_shared, out, cfg)
    pool = [tiny_data_shared / r["image"] for r in rows]
    lab = load_train(tiny_data_shared, cfg.data.labels_csv)
    pool_m = _member_outputs(out, pool, cfg.pseudo.tta)
    lab_m = _member_outputs(out, lab.paths, cfg.pseudo.tta)
    f1 = np.asarray([f for f, _, _ in pool_m])
    teacher = sum(w * p for w, (_, p, _) in zip(f1 / f1.sum(), pool_m))

    x = np.concatenate([_joint(lab_m), _joint(pool_m)])
    y = np.concatenate([lab.labels, -np.ones(len(pool), int)])
    ls = LabelSpreading(kernel="knn", n_neighbors=5, alpha=0.3, max_iter=200, tol=1e-4).fit(x, y)
    sp = np.zeros_like(teacher)
    sp[:, ls.classes_] = ls.label_distributions_[len(lab):]
    want = 0.4 * teacher + 0.6 * sp / sp.sum(1, keepdims=True)
    np.testing.assert_allclose(got, want / want.sum(1, keepdims=True), atol=1e-5)
    assert np.abs(got - teacher).max() > 1e-2  # the graph moved the targets
    rec = json.loads((out / "pseudo" / "stats.json").read_text())["propagate"]
    assert rec["neighbors"] == 5 and rec["teacher_share"] == 0.4 and rec["reached"] == len(pool)
    assert rec["argmax_changed"] == int((got.argmax(1) != teacher.argmax(1)).sum())
    report = (out / "report.md").read_text()
    assert (f"Label spreading (5 neighbours, alpha 0.3, the teacher's share 0.4): the graph reached {len(pool)} of "
            f"{len(pool)} unlabeled images and changed the arg-max of {rec['argmax_changed']}.") in report


@pytest.mark.parametrize("case", ["ema", "fold", "view", "rule", "cap", "align", "none"])
def test_propagate_with_a_strategy_that_ignores_it_fails_in_one_line_before_training(case, tiny_data, tmp_path):
    soft = ["pseudo.threshold_mode=all", "pseudo.soft=true"]
    per_fold = ["pseudo.propagate=spread", "pseudo.propagate_labels=fold"]
    sets = {"ema": ["ssl.method=ema-teacher", "pseudo.propagate=spread"],
            "fold": ["pseudo.teacher=fold", "pseudo.propagate=spread"],
            "view": soft + ["pseudo.targets=view", "pseudo.propagate=spread"],
            "rule": ["pseudo.threshold_mode=global"] + per_fold,
            "cap": soft + ["pseudo.max_per_class=3"] + per_fold,
            "align": soft + ["pseudo.align=prior"] + per_fold,
            "none": ["pseudo.propagate_labels=fold"]}[case]
    want = {"ema": "pseudo.propagate=spread needs ssl.method: pseudo-label",
            "fold": "pseudo.propagate=spread needs pseudo.teacher: ensemble",
            "view": "pseudo.propagate=spread needs pseudo.targets: image",
            "rule": "pseudo.propagate_labels=fold needs pseudo.threshold_mode: all",
            "cap": "pseudo.propagate_labels=fold needs no pseudo.max_per_class",
            "align": "pseudo.propagate_labels=fold needs pseudo.align: none",
            "none": "pseudo.propagate_labels=fold needs pseudo.propagate: spread"}[case]
    args = [a for s in sets for a in ("--set", s)]
    res = invoke("train", tiny_data, "--preset", "tiny", *args, "--out", tmp_path / "RUN")
    line = one_line_error(res)
    assert want in line, line
    assert not list((tmp_path / "RUN").glob("stage1/fold*/done.json"))


def test_fold_mode_spreads_only_the_training_folds_labels_to_each_student(tiny_run, tiny_data_shared, tmp_path):
    """pseudo.propagate_labels: fold - stage 2 saves, per fold k, the teacher mixed with labels
    spread from the labeled images outside fold k (recomputed here with scikit-learn), and fold
    k's student is handed exactly those targets, row for row with pseudo_labels.csv."""
    from sklearn.semi_supervised import LabelSpreading

    from semivit.data.layout import load_train
    from semivit.data.folds import load_or_make
    from semivit.trainer.methods import pseudo_label_retrain
    from semivit.trainer.run import open_run

    sets = ["pseudo.threshold_mode=all", "pseudo.soft=true", "pseudo.train={epochs: 1, early_stopping: false}",
            "pseudo.propagate=spread", "pseudo.propagate_labels=fold", "pseudo.propagate_neighbors=40",
            "pseudo.propagate_alpha=0.3", "pseudo.propagate_mix=0.4"]
    cfg = config.resolve(preset="tiny", overrides=sets)
    out = tmp_path / "RUN"
    retrain_on(tiny_run, tiny_data_shared, out, cfg)
    with np.load(out / "pseudo" / "propagate_folds.npz") as z:
        names, table = [str(n) for n in z["images"]], z["probs"]
    assert table.shape[0] == cfg.cv.folds
    pool = [tiny_data_shared / n for n in names]
    lab = load_train(tiny_data_shared, cfg.data.labels_csv)
    folds = np.asarray(load_or_make(out / "folds.json", lab, cfg.cv.folds, cfg.seed))
    pool_m = _member_outputs(out, pool, cfg.pseudo.tta)
    lab_m = _member_outputs(out, lab.paths, cfg.pseudo.tta)
    f1 = np.asarray([f for f, _, _ in pool_m])
    teacher = sum(w * p for w, (_, p, _) in zip(f1 / f1.sum(), pool_m))

    for k in range(cfg.cv.folds):
        train = folds != k
        x = np.concatenate([_joint(lab_m, train), _joint(pool_m)])
        y = np.concatenate([lab.labels[train], -np.ones(len(pool), int)])
        ls = LabelSpreading(kernel="knn", n_neighbors=40, alpha=0.3, max_iter=200, tol=1e-4).fit(x, y)
        sp = np.zeros_like(teacher)
        sp[:, ls.classes_] = ls.label_distributions_[train.sum():]
        want = 0.4 * teacher + 0.6 * sp / sp.sum(1, keepdims=True)
        np.testing.assert_allclose(table[k], want / want.sum(1, keepdims=True), atol=1e-5)
    # 40 neighbours reach across the colours, so which labels are clamped shows in the targets
    # (slightly: the tiny data's colours are easy); spreading every label would make them equal
    assert np.abs(table[0] - table[1]).max() > 1e-4
    # stage 3 hands fold k's student fold k's table, in pseudo_labels.csv's row order
    run = open_run(out, cfg, tiny_data_shared)
    plan = pseudo_label_retrain(run)
    with open(out / "pseudo" / "pseudo_labels.csv", newline="") as f:
        rows = [r["image"] for r in csv.DictReader(f)]
    for k in range(cfg.cv.folds):
        got = plan.per_fold(k).extra.labels
        np.testing.assert_allclose(got, table[k][[names.index(r) for r in rows]], atol=1e-6)
