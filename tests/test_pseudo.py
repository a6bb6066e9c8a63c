"""Stages 2 and 3: cluster purity, pseudo-label selection, validation hygiene, ensemble weights,
confidence weights reaching the loss, and the tiny end-to-end pipeline with resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from semivit import config
from semivit.cli import app
from semivit.data.dataset import ArrayDataset
from semivit.models.ensemble import ensemble_weights, write_ensemble
from semivit.trainer.losses import FocalLoss
from semivit.pseudo.samples import Extra
from semivit.pseudo.select import cluster_cores, select
from semivit.trainer.pseudo import precision_report

runner = CliRunner()


def _blobs(rng, centres, n=30):
    return np.concatenate([rng.normal(c, 0.2, size=(n, 2)) for c in centres])


def test_purity_filter_drops_an_impure_cluster():
    rng = np.random.default_rng(0)
    pts = _blobs(rng, [(0, 0), (10, 0), (0, 10)])
    pred = np.array([0] * 30 + [1] * 30 + [1, 2] * 15)  # third blob: 50/50 -> impure
    cl = cluster_cores(pts, pred, k=3, purity_min=0.9, core_fraction=0.2, seed=0)
    blob_of = np.repeat([0, 1, 2], 30)
    purity_by_blob = {int(blob_of[np.flatnonzero(cl.assignment == c)[0]]): cl.purity[c] for c in range(3)}
    assert purity_by_blob[0] == 1.0 and purity_by_blob[1] == 1.0 and purity_by_blob[2] == pytest.approx(0.5)
    assert len(cl.cores) == 12 and set(blob_of[cl.cores]) == {0, 1}  # 20% of 30 from each pure blob
    # cores are the members nearest their centroid
    for c in np.unique(cl.assignment[cl.cores]):
        members = np.flatnonzero(cl.assignment == c)
        d = np.linalg.norm(pts[members] - cl.centroids[c], axis=1)
        cores_c = [i for i in cl.cores if cl.assignment[i] == c]
        assert set(cores_c) == set(members[np.argsort(d)[:6]])


def test_cluster_cores_skip_members_that_disagree_with_the_majority():
    rng = np.random.default_rng(1)
    pts = _blobs(rng, [(0, 0), (10, 10)], n=20)
    pred = np.array([0] * 20 + [1] * 20)
    pred[0] = 1  # 95% pure; the odd one is at the blob's centre
    pts[0] = pts[:20].mean(0)
    cl = cluster_cores(pts, pred, k=2, purity_min=0.9, core_fraction=0.5, seed=0)
    assert 0 not in cl.cores and len(cl.cores) == 20


def test_select_combines_threshold_and_cluster_sources_and_caps_per_class():
    probs = np.array([[0.97, 0.02, 0.01], [0.5, 0.4, 0.1], [0.1, 0.88, 0.02], [0.99, 0.005, 0.005],
                      [0.2, 0.2, 0.6]], dtype=np.float32)
    from semivit.pseudo.select import Clusters

    cl = Clusters(assignment=np.array([0, 0, 1, 0, 2]), centroids=np.zeros((3, 2)),
                  majority=np.array([0, 1, 2]), purity=np.ones(3), sizes=np.array([3, 1, 1]),
                  cores=np.array([2, 3]))
    pl = select(probs, 0.96, cl)
    assert pl.index.tolist() == [0, 2, 3]
    assert pl.source == ["threshold", "cluster", "threshold+cluster"]
    assert pl.label.tolist() == [0, 1, 0]
    np.testing.assert_allclose(pl.confidence, [0.97, 0.88, 0.99])
    capped = select(probs, 0.96, cl, max_per_class=1)
    assert capped.index.tolist() == [2, 3]  # class 0 keeps its most confident (index 3)


def test_precision_report_by_source_and_class():
    from semivit.pseudo.select import PseudoLabels

    pl = PseudoLabels(np.array([0, 1, 2, 3]), np.array([0, 1, 1, 0]), np.ones(4),
                      ["threshold", "cluster", "threshold", "cluster"], np.zeros((4, 2)))
    rep = precision_report(pl, [0, 0, 1, None], ["a", "b"])
    assert rep["scored"] == 3 and rep["precision"] == pytest.approx(2 / 3, abs=1e-4)
    assert rep["by_source"]["threshold"] == {"count": 2, "precision": 1.0}
    assert rep["by_source"]["cluster"] == {"count": 1, "precision": 0.0}
    assert rep["by_class"]["b"]["precision"] == 0.5


def test_ensemble_weights_follow_the_formula(tmp_path):
    f1 = [0.5, 0.7, 0.8]
    np.testing.assert_allclose(ensemble_weights(f1), np.array(f1) / sum(f1))
    np.testing.assert_allclose(ensemble_weights(f1, "equal"), [1 / 3] * 3)
    members = [{"name": f"stage1/fold{i}", "path": f"stage1/fold{i}/best.pt", "stage": "stage1", "fold": i,
                "val_macro_f1": v} for i, v in enumerate(f1)]
    doc = write_ensemble(tmp_path, members, ["a", "b"], 32)
    assert [m["weight"] for m in doc["members"]] == pytest.approx([v / 2.0 for v in f1])
    assert json.loads((tmp_path / "ensemble.json").read_text())["formula"].startswith("w_i = F1_i / sum_j F1_j")


@pytest.fixture
def tiny_open_run(tiny_data, tmp_path):
    from semivit.trainer.run import open_run

    cfg = config.resolve(preset="tiny", overrides=["train.epochs=1"])
    return open_run(tmp_path / "run", cfg, tiny_data)


def test_pseudo_labels_never_validate_and_their_confidence_reaches_the_loss(tiny_open_run, monkeypatch):
    import semivit.trainer.folds as folds

    run = tiny_open_run
    size = run.cfg.model.img_size
    # extra images with a marker value no real image has
    extra = Extra(np.full((5, size, size, 3), 7, np.uint8), np.array([0, 1, 2, 0, 1]),
                  np.array([0.97, 0.98, 0.99, 0.965, 0.91], np.float32))
    seen = {}

    class Recorder(FocalLoss):
        def forward(self, logits, target, sample_weight=None):
            if sample_weight is not None:  # training batches (validation loss has no weights)
                seen.setdefault("weights", []).append(sample_weight.detach().clone())
            return super().forward(logits, target, sample_weight)

    monkeypatch.setattr(folds, "build_loss", lambda tcfg, counts: Recorder(gamma=2.0))
    real_fit = folds.fit

    def spy_fit(model, train_ds, val_images, val_labels, *a, **kw):
        seen["train_ds"], seen["val_images"] = train_ds, val_images
        return real_fit(model, train_ds, val_images, val_labels, *a, **kw)

    monkeypatch.setattr(folds, "fit", spy_fit)
    summary = folds.train_fold(run, "stage3", 0, extra=extra)
    val, ds = seen["val_images"], seen["train_ds"]
    assert not any((v == 7).all() for v in val)  # no pseudo-labeled image in validation
    assert len(val) == int((run.folds == 0).sum()) and summary["extra_samples"] == 5
    assert sum((img == 7).all() for img in ds.images) == 5
    np.testing.assert_allclose(ds.weights[-5:], extra.weights)
    batch_weights = torch.cat(seen["weights"]).numpy()
    assert set(np.round(extra.weights, 4)) & set(np.round(batch_weights, 4))  # confidences reached the loss
    assert (batch_weights <= 1.0).all() and (batch_weights < 1.0).any()


def test_tiny_pipeline_end_to_end_and_resume(tiny_data, tmp_path):
    run = tmp_path / "run"
    args = ["train", str(tiny_data), "--preset", "tiny", "--out", str(run), "--set", "pseudo.threshold=0.5"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    for f in ("config.yaml", "folds.json", "ensemble.json", "report.md", "timings.yaml",
              "stage1/fold0/best.pt", "stage1/fold1/metrics.csv", "stage1/oof.csv",
              "pseudo/pseudo_labels.csv", "pseudo/stats.json", "stage3/fold1/best.pt", "heldout.json"):
        assert (run / f).exists(), f
    ens = json.loads((run / "ensemble.json").read_text())
    assert [m["name"] for m in ens["members"]] == ["stage1/fold0", "stage1/fold1", "stage3/fold0", "stage3/fold1"]
    f1 = np.array([m["val_macro_f1"] for m in ens["members"]])
    np.testing.assert_allclose([m["weight"] for m in ens["members"]], f1 / f1.sum(), rtol=1e-6)
    header = (run / "pseudo/pseudo_labels.csv").read_text().splitlines()[0]
    assert header.startswith("image,label,confidence,source")
    stats = json.loads((run / "pseudo/stats.json").read_text())
    assert stats["unlabeled"] == 24 and "truth" in stats
    report = (run / "report.md").read_text()
    assert "out-of-fold macro F1" in report and "Held-out test split" in report
    assert "pseudo-labeled (threshold 0.5, cluster cores of clusters with purity >= 0.9)" in report

    # with per-class OOF thresholds the report names each class's threshold, not the global one
    from semivit import config as cfgmod
    from semivit.trainer.report import write_report
    from semivit.trainer.run import open_run

    stats["thresholds"] = {c: (0.61 if i == 0 else None) for i, c in enumerate(ens["classes"])}
    (run / "pseudo/stats.json").write_text(json.dumps(stats))
    write_report(open_run(run, cfgmod.resolve(preset="tiny", overrides=["pseudo.threshold=0.5"]), tiny_data))
    report = (run / "report.md").read_text()
    assert f"{ens['classes'][0]} 0.61, {ens['classes'][1]} none (never that precise)" in report
    assert "threshold 0.5" not in report

    # resume: an interrupted fold is retrained, finished ones are not
    kept = (run / "stage3/fold0/best.pt").stat().st_mtime_ns
    (run / "stage3/fold1/done.json").unlink()
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert (run / "stage3/fold0/best.pt").stat().st_mtime_ns == kept
    assert (run / "stage3/fold1/done.json").exists()

    # a different config cannot reuse the run directory
    res = runner.invoke(app, args + ["--set", "train.epochs=3"])
    assert res.exit_code == 2 and "different config" in res.output

    # ssl eval on the held-out split
    out = tmp_path / "eval.json"
    res = runner.invoke(app, ["eval", str(run), str(tiny_data), "--out", str(out)])
    assert res.exit_code == 0, res.output
    rep = json.loads(out.read_text())
    assert rep["n_images"] == 18 and out.with_suffix(".png").exists()
    cm = np.array(rep["confusion_matrix"])
    assert cm.sum() == 18 and (cm.sum(1) == 6).all()  # 6 test images per class, rows = truth
    # macro F1 and accuracy are what the confusion matrix says, worked out by hand
    tp = np.diag(cm).astype(float)
    f1 = np.where(cm.sum(0) + cm.sum(1) > 0, 2 * tp / np.maximum(cm.sum(0) + cm.sum(1), 1), 0.0)
    assert rep["macro_f1"] == pytest.approx(f1.mean(), abs=1e-9)
    assert rep["accuracy"] == pytest.approx(tp.sum() / 18, abs=1e-9)
    # and the same ensemble on the same held-out split scored the same during training
    held = json.loads((run / "heldout.json").read_text())["full_ensemble"]
    assert rep["macro_f1"] == pytest.approx(held["macro_f1"], abs=1e-9)
    assert rep["accuracy"] > 1 / 3 + 0.1  # separable colours: well above one-class guessing


def test_oof_thresholds_reach_the_target_precision_per_class():
    from semivit.pseudo.rules import oof_thresholds

    # class 0: right above 0.6, wrong below; class 1: never 90% precise; class 2: too few
    conf0 = np.array([0.9, 0.8, 0.7, 0.65, 0.6, 0.55, 0.5])
    y0 = np.array([0, 0, 0, 0, 0, 1, 1])
    probs, labels = [], []
    for c, y in zip(conf0, y0):
        probs.append([c, (1 - c) / 2, (1 - c) / 2])
        labels.append(y)
    for i in range(6):
        probs.append([0.1, 0.8, 0.1])
        labels.append(i % 2)  # 50% right
    probs.append([0.05, 0.05, 0.9])
    labels.append(2)
    thr = oof_thresholds(np.array(probs), np.array(labels), target_precision=0.9, min_support=3)
    assert thr[0] == pytest.approx(0.6) and np.isinf(thr[1]) and np.isinf(thr[2])
    # used by select(): class 0 at >= 0.6, nothing for classes 1 and 2 (cluster cores included)
    unl = np.array([[0.62, 0.2, 0.18], [0.58, 0.3, 0.12], [0.02, 0.97, 0.01], [0.0, 0.01, 0.99]])
    from semivit.pseudo.select import Clusters

    cl = Clusters(np.array([0, 0, 1, 1]), np.zeros((2, 2)), np.array([0, 1]), np.ones(2), np.array([2, 2]),
                  cores=np.array([1, 2]))
    pl = select(unl, thr, cl)
    assert pl.index.tolist() == [0, 1] and pl.source == ["threshold", "cluster"]
