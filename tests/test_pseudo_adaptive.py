"""Class-adaptive pseudo-label rules (quota, freematch, all) and distribution alignment on
scripted probability matrices, the soft-target loss, and each end to end on a tiny run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import retrain_on
from semivit import config
from semivit.errors import UserError
from semivit.pseudo.adaptive import align_to_prior, freematch_thresholds, quota_thresholds
from semivit.pseudo.rules import RuleInputs, class_thresholds, rule_names
from semivit.pseudo.select import label_pool, select
from semivit.trainer.losses import FocalLoss


def _pool(counts, conf_hi=0.9, conf_lo=0.4, n_cls=4, seed=0):
    """A pool where class c has counts[c] predictions, confidences spread in [conf_lo, conf_hi]."""
    rng = np.random.default_rng(seed)
    rows = []
    for c, n in enumerate(counts):
        for conf in rng.uniform(conf_lo, conf_hi, n):
            p = np.full(n_cls, (1 - conf) / (n_cls - 1))
            p[c] = conf
            rows.append(p)
    return np.asarray(rows)


def test_rules_are_registered_and_validated_by_the_config():
    assert {"global", "oof", "quota", "freematch", "all"} <= set(rule_names())
    for name in ("quota", "freematch", "all"):
        assert config.resolve(preset="tiny", overrides=[f"pseudo.threshold_mode={name}"]).pseudo.threshold_mode == name


def test_quota_gives_every_class_its_prior_share():
    # the classifier predicts the majority class far more than its labeled share
    probs = _pool([400, 30, 20, 150])
    prior = np.array([0.4, 0.2, 0.1, 0.3])  # labeled class shares
    thr = quota_thresholds(probs, prior, share=0.25)  # budget 150 -> 60, 30, 15, 45
    pl = select(probs, thr)
    got = np.bincount(pl.label, minlength=4)
    assert got.tolist() == [60, 30, 15, 45]
    # each class keeps its MOST confident predictions
    for c in range(4):
        mine = probs[probs.argmax(1) == c, c]
        assert pl.confidence[pl.label == c].min() >= np.sort(mine)[::-1][got[c] - 1] - 1e-12


def test_quota_takes_all_of_a_class_with_fewer_predictions_and_none_of_an_absent_one():
    probs = _pool([100, 3, 0, 50])
    thr = quota_thresholds(probs, np.array([0.25, 0.25, 0.25, 0.25]), share=0.4)  # 15.3 -> 15 each
    got = np.bincount(select(probs, thr).label, minlength=4)
    assert got.tolist() == [15, 3, 0, 15] and np.isinf(thr[2])


def test_freematch_lowers_the_bar_for_rarely_predicted_classes():
    probs = _pool([300, 20, 10, 100], conf_hi=0.95, conf_lo=0.5)
    thr = freematch_thresholds(probs)
    tau = probs.max(1).mean()
    assert thr[0] == pytest.approx(tau)  # the most predicted class gets the global level
    assert thr[2] < thr[1] < thr[3] < thr[0]  # ordered by how much mass the pool gives the class
    local = probs.mean(0)
    assert thr == pytest.approx(tau * local / local.max())
    assert np.bincount(select(probs, thr).label, minlength=4)[2] == 10  # all of the rare class pass


def test_alignment_makes_the_pool_mean_the_labeled_prior():
    # a teacher that over-predicts the rare classes 2 and 3 (as a class-balanced loss does)
    probs = _pool([40, 30, 20, 10], conf_hi=0.9, conf_lo=0.4)
    prior = np.array([60.0, 25.0, 10.0, 5.0])  # counts: normalised inside
    before = probs.mean(0)
    q = align_to_prior(probs, prior)
    assert q.shape == probs.shape and np.allclose(q.sum(1), 1.0)
    assert np.allclose(q.mean(0), prior / prior.sum(), atol=1e-5)
    assert not np.allclose(before, prior / prior.sum(), atol=0.05)  # the test moved something
    # one class-wise factor per class: every row is p * w renormalised, the same w for all rows
    w = q / probs
    w = w / w[:, :1]
    assert np.allclose(w, w[0], rtol=1e-6)
    assert (w[0, 1:] < 1).all()  # the over-predicted classes scaled down relative to class 0
    # a pool already at the prior stays as it is
    assert np.allclose(align_to_prior(probs, before), probs, atol=1e-9)
    # a class with prior 0 gets nothing
    assert np.allclose(align_to_prior(probs, [1, 1, 1, 0])[:, 3], 0)


def test_label_pool_aligns_before_the_rule_reads_the_probabilities():
    probs = _pool([40, 30, 20, 10])
    labels = np.repeat(np.arange(4), [60, 25, 10, 5])
    cal = lambda: (np.zeros((len(labels), 4)), labels)  # noqa: E731 - the labeled counts are what align reads
    cfg = config.resolve(preset="tiny", overrides=["pseudo.threshold_mode=all", "pseudo.cluster=false",
                                                   "pseudo.align=prior"]).pseudo
    pool = label_pool(probs, [probs], cfg, 0, calibration=cal)
    assert np.allclose(pool.probs.mean(0), [0.6, 0.25, 0.1, 0.05], atol=1e-5)
    assert np.array_equal(pool.labels.label, pool.probs.argmax(1))  # selection read the aligned matrix
    assert np.bincount(pool.labels.label, minlength=4)[3] < 10  # fewer rare-class arg-maxes than before
    plain = label_pool(probs, [probs], cfg.model_copy(update={"align": "none"}), 0, calibration=cal)
    assert np.array_equal(plain.probs, probs)
    with pytest.raises(UserError, match="labeled class counts"):
        label_pool(probs, [probs], cfg, 0, calibration=None)


def test_all_selects_every_prediction_and_rules_need_a_pool():
    probs = _pool([5, 5, 5, 5])
    cfg = config.resolve(preset="tiny").pseudo
    thr = class_thresholds("all", RuleInputs(4, 0.5, cfg, probs, None))
    assert len(select(probs, thr).index) == 20
    for name in ("quota", "freematch", "all"):
        if name == "all":
            continue
        with pytest.raises(UserError, match="pool"):
            class_thresholds(name, RuleInputs(4, 0.5, cfg, None, None))


def test_soft_target_loss_equals_cross_entropy_on_one_hot_targets():
    torch.manual_seed(0)
    logits, y = torch.randn(16, 4), torch.randint(0, 4, (16,))
    onehot = F.one_hot(y, 4).float()
    ce = FocalLoss(gamma=0.0)
    assert torch.allclose(ce(logits, onehot), F.cross_entropy(logits, y), atol=1e-6)
    soft = torch.softmax(torch.randn(16, 4), 1)
    want = -(soft * F.log_softmax(logits, 1)).sum(1).mean()  # cross-entropy to soft targets
    assert torch.allclose(ce(logits, soft), want, atol=1e-6)


@pytest.mark.parametrize("rule,sets", [
    ("quota", ["pseudo.quota=0.5", "pseudo.cluster=false"]),
    ("freematch", ["pseudo.cluster=false"]),
    ("all", ["pseudo.soft=true", "pseudo.weight=one", "pseudo.cluster=false"]),
    ("all", ["pseudo.soft=true", "pseudo.weight=one", "pseudo.cluster=false", "pseudo.align=prior"]),
])
def test_rule_end_to_end_on_a_tiny_run(rule, sets, tiny_run, tiny_data_shared, tmp_path, capsys):
    """Stage 2-3 with the rule on the shared tiny run's stage 1 (cluster cores off, so the rule alone
    selects): the thresholds stage 2 recorded are the ones it applied, and stage 3 trained on
    exactly the selected images."""
    import csv
    import json

    from semivit.pseudo.rules import run_calibration

    cfg = config.resolve(preset="tiny", overrides=[f"pseudo.threshold_mode={rule}"] + sets)
    out = tmp_path / "RUN"
    retrain_on(tiny_run, tiny_data_shared, out, cfg)
    stats = json.loads((out / "pseudo" / "stats.json").read_text())
    with open(out / "pseudo" / "predictions.csv", newline="") as f:
        preds = list(csv.DictReader(f))
    classes = json.loads((out / "ensemble.json").read_text())["classes"]
    # the thresholds recorded are the rule's on the pool's ensemble probabilities (confidence of the
    # predicted class, as predictions.csv has them, is enough to check the selection)
    thr = [np.inf if stats["thresholds"][c] is None else stats["thresholds"][c] for c in classes]
    chosen = [p for p in preds if float(p["confidence"]) >= thr[classes.index(p["pred"])] - 1e-4]
    assert stats["selected"] == len(chosen) == sum(int(p["selected"]) for p in preds)
    if rule == "all":
        assert stats["selected"] == stats["unlabeled"] and stats["by_source"] == {"threshold": stats["unlabeled"]}
        log = capsys.readouterr().err  # the log says distillation in words, not "threshold 24" / "0.0"
        n, agree = stats["unlabeled"], 100 * stats["truth"]["precision"]
        assert (f"soft targets: the stage-1 ensemble's probabilities on all {n} unlabeled images (distillation, "
                f"no threshold); its argmax agrees with held-back truth on {agree:.1f}%") in log, log
        assert "per-class thresholds" not in log and f"(threshold {n})" not in log, log
        assert f"+ {n} soft-target (distillation) images per fold pool" in log, log
    if rule == "quota":  # balanced labels (12 per class), 0.5 of the pool: k = 0.5 x 24 / 3 = 4 per class
        _, labels = run_calibration(out)
        assert np.bincount(labels).tolist() == [12, 12, 12] and stats["unlabeled"] == 24
        for c in classes:
            assert stats["by_class"][c] == min(4, sum(p["pred"] == c for p in preds))
    if "pseudo.align=prior" in sets:  # the soft targets written (and trained on) average to the labeled prior
        _, labels = run_calibration(out)
        prior = np.bincount(labels, minlength=len(classes)) / len(labels)
        with open(out / "pseudo" / "pseudo_labels.csv", newline="") as f:
            soft = np.asarray([[float(r[f"p_{c}"]) for c in classes] for r in csv.DictReader(f)])
        assert np.allclose(soft.mean(0), prior, atol=1e-4)
        assert list(stats["align"]["pool_mean_after"].values()) == pytest.approx(prior.tolist(), abs=1e-3)
        assert "distribution alignment: the pool's mean probability per class" in log  # (read in the rule == "all" branch above)
    done = [json.loads((out / "stage3" / f"fold{k}" / "done.json").read_text()) for k in range(cfg.cv.folds)]
    assert all(d["extra_samples"] == stats["selected"] for d in done)
    assert len(json.loads((out / "ensemble.json").read_text())["members"]) == 2 * cfg.cv.folds


def test_distillation_loss_is_cross_entropy_on_soft_rows_and_the_configured_loss_on_labeled_rows():
    from semivit.trainer.losses import DistillationLoss

    torch.manual_seed(0)
    hard = FocalLoss(gamma=2.0, class_weights=torch.tensor([0.5, 1.0, 2.0, 1.5]))
    loss = DistillationLoss(hard)
    logits = torch.randn(8, 4)
    y = torch.randint(0, 4, (8,))
    onehot = F.one_hot(y, 4).float()
    soft = torch.softmax(torch.randn(8, 4), 1)
    assert torch.allclose(loss(logits, y), hard(logits, y))  # index targets: the configured loss
    assert torch.allclose(loss(logits, onehot), hard(logits, onehot), atol=1e-6)
    mixed = torch.cat([onehot[:4], soft[4:]])
    want = torch.cat([hard.per_sample(logits[:4], onehot[:4]),
                      -(soft[4:] * F.log_softmax(logits[4:], 1)).sum(1)]).mean()
    assert torch.allclose(loss(logits, mixed), want, atol=1e-6)


def test_distillation_optimum_is_the_teacher_and_focal_is_not():
    """At logits = log(teacher) the soft cross-entropy's gradient vanishes (the student can match
    the teacher); the class-weighted focal loss's does not (it would learn a distorted teacher)."""
    from semivit.trainer.losses import DistillationLoss

    teacher = torch.tensor([[0.6, 0.25, 0.1, 0.05]])
    focal = FocalLoss(gamma=2.0, class_weights=torch.tensor([0.5, 1.0, 2.0, 1.5]))
    for crit, vanishes in ((DistillationLoss(focal), True), (focal, False)):
        logits = teacher.log().clone().requires_grad_(True)
        crit(logits, teacher).backward()
        assert (logits.grad.abs().max() < 1e-6) == vanishes


def test_stage2_summary_line_says_what_each_rule_does():
    """Under ``all`` the line names soft targets (distillation) or hard labels on every image and the
    argmax agreement with truth; the other rules keep their count per source and precision."""
    from semivit.trainer.pseudo import summary_line

    stats = {"unlabeled": 1575, "selected": 1575, "by_source": {"threshold": 1575},
             "truth": {"scored": 1575, "precision": 0.6013}}
    soft = config.resolve(preset="tiny", overrides=["pseudo.threshold_mode=all", "pseudo.soft=true"]).pseudo
    assert summary_line(stats, soft) == ("soft targets: the stage-1 ensemble's probabilities on all 1575 unlabeled "
                                         "images (distillation, no threshold); its argmax agrees with held-back "
                                         "truth on 60.1%")
    hard = config.resolve(preset="tiny", overrides=["pseudo.threshold_mode=all", "pseudo.soft=false"]).pseudo
    assert summary_line(stats, hard).startswith("pseudo-labels: the stage-1 ensemble's predicted class on all 1575 "
                                                "unlabeled images (all rule: no threshold, hard labels)")
    capped = config.resolve(preset="tiny", overrides=["pseudo.threshold_mode=all", "pseudo.soft=true",
                                                      "pseudo.max_per_class=400"]).pseudo
    line = summary_line({**stats, "selected": 1200, "truth": {}}, capped)
    assert "probabilities on 1200 of 1575 unlabeled images (at most 400 per predicted class)" in line
    assert "truth" not in line  # no held-back truth: nothing claimed
    oof = config.resolve(preset="tiny", overrides=["pseudo.threshold_mode=oof"]).pseudo
    few = {"unlabeled": 1575, "selected": 300, "by_source": {"threshold": 250, "cluster": 50},
           "truth": {"scored": 300, "precision": 0.9}}
    assert summary_line(few, oof) == ("pseudo-labels: 300 of 1575 (threshold 250, cluster 50); "
                                      "precision vs held-back truth 0.900")


def test_pseudo_train_overrides_stage_3s_training_only(tiny_run, tiny_data_shared, tmp_path):
    """``pseudo.train`` sets stage 3's own train.* keys (here: 1 epoch, no early stopping) while
    stage 1 keeps train.*; a key that is not a train.* key is a one-line config error."""
    import json

    from semivit.errors import UserError

    cfg = config.resolve(preset="tiny", overrides=["pseudo.threshold_mode=all", "pseudo.soft=true",
                                                   "pseudo.cluster=false", "train.epochs=2",
                                                   "pseudo.train={epochs: 1, early_stopping: false}"])
    assert cfg.train.epochs == 2 and cfg.pseudo.train == {"epochs": 1, "early_stopping": False}
    out = tmp_path / "RUN"
    retrain_on(tiny_run, tiny_data_shared, out, cfg)
    done = [json.loads((out / "stage3" / f"fold{k}" / "done.json").read_text()) for k in range(cfg.cv.folds)]
    assert [d["epochs_run"] for d in done] == [1] * cfg.cv.folds, done
    with pytest.raises(UserError, match="not a train"):
        config.resolve(preset="tiny", overrides=["pseudo.train={epoch: 3}"])
    with pytest.raises(UserError, match="epochs"):
        config.resolve(preset="tiny", overrides=["pseudo.train={epochs: 0}"])


def test_draw_weights_give_the_labeled_part_its_share():
    """``pseudo.labeled_share``: labeled rows make the configured share of the draw probability,
    uniform inside each part, or in the balanced sampler's proportions inside each part."""
    from semivit.trainer.engine import draw_weights

    w = draw_weights(10, 90, 0.5)
    assert w.sum() == pytest.approx(1.0)
    assert w[:10].sum() == pytest.approx(0.5) and w[10:].sum() == pytest.approx(0.5)
    assert np.allclose(w[:10], 0.05) and np.allclose(w[10:], 0.5 / 90)
    within = np.r_[np.ones(5), 3 * np.ones(5), np.ones(90)]  # a rare class weighted 3x by 'balanced'
    wb = draw_weights(10, 90, 0.25, within=within)
    assert wb[:10].sum() == pytest.approx(0.25) and wb[5] == pytest.approx(3 * wb[0])
    assert draw_weights(4, 0, 0.5)[:4].sum() == pytest.approx(1.0)  # no extra rows: labels only


def test_labeled_share_sets_the_labeled_part_of_stage_3_batches(tiny_run, tiny_data_shared, tmp_path):
    """Stage 3 with ``pseudo.labeled_share`` draws labeled rows at that share (measured over the
    fold's draws; without it they come in proportion to their number) and takes the same optimiser
    steps; stage 1, which has no extra samples, is untouched.  A share outside (0, 1) is a one-line
    config error."""
    import json

    from semivit.errors import UserError

    def stage3(sets, name):
        cfg = config.resolve(preset="tiny", overrides=["pseudo.threshold_mode=all", "pseudo.soft=true",
                                                       "pseudo.weight=one", "pseudo.cluster=false",
                                                       "pseudo.train={epochs: 4, early_stopping: false}"] + sets)
        out = tmp_path / name
        retrain_on(tiny_run, tiny_data_shared, out, cfg)
        return [json.loads((out / "stage3" / f"fold{k}" / "done.json").read_text()) for k in range(cfg.cv.folds)]

    mixed, plain = stage3(["pseudo.labeled_share=0.8"], "mixed"), stage3([], "plain")
    for m, p in zip(mixed, plain):
        n_lab = m["train_samples"] - m["extra_samples"]
        assert m["extra_samples"] > 0 and n_lab / m["train_samples"] < 0.6  # proportional would be < 0.6
        assert m["labeled_share"] == 0.8 and abs(m["labeled_draws"] - 0.8) < 0.12, m
        assert p["labeled_share"] is None and p["labeled_draws"] is None
        assert m["steps"] == p["steps"]
    for bad in ("1.0", "0", "-0.2"):
        with pytest.raises(UserError, match="labeled_share"):
            config.resolve(preset="tiny", overrides=[f"pseudo.labeled_share={bad}"])


def test_fold_teacher_relabels_each_fold_by_its_own_stage1_model(tiny_run, tiny_data_shared, tmp_path, monkeypatch):
    """``pseudo.teacher: fold``: fold k's soft targets are stage-1 fold k's probabilities, so the
    F1-weighted mean of the folds' targets is stage 2's ensemble (written independently to
    pseudo_labels.csv) while the folds differ; hard labels are each fold's arg-max; stage 3's fold
    k trains on exactly those.  A teacher that is not a known name is a one-line config error."""
    import json

    from semivit.errors import UserError
    from semivit.models.ensemble import ensemble_weights
    from semivit.trainer import folds as folds_mod
    from semivit.trainer.pipeline import FoldTeacher, pseudo_extra
    from semivit.trainer.run import open_run

    trained: dict = {}  # (soft, fold) -> the extra labels stage 3 trained fold k on
    real_train_fold = folds_mod.train_fold

    def spy(run, stage, k, extra=None, **kw):
        if stage == "stage3":
            trained[(run.cfg.pseudo.soft, k)] = np.array(extra.labels)
        return real_train_fold(run, stage, k, extra=extra, **kw)

    monkeypatch.setattr(folds_mod, "train_fold", spy)

    base = ["pseudo.threshold_mode=all", "pseudo.weight=one", "pseudo.cluster=false",
            "pseudo.train={epochs: 2, early_stopping: false}", "pseudo.teacher=fold"]
    for soft in ("true", "false"):
        cfg = config.resolve(preset="tiny", overrides=base + [f"pseudo.soft={soft}"])
        out = tmp_path / f"soft-{soft}"
        retrain_on(tiny_run, tiny_data_shared, out, cfg)
        run = open_run(out, cfg, tiny_data_shared, create=False)
        extra = pseudo_extra(run)
        teach = FoldTeacher(run, extra)
        folds = [teach.probs(k) for k in range(cfg.cv.folds)]
        f1s = [json.loads((out / "stage1" / f"fold{k}" / "done.json").read_text())["val_macro_f1"]
               for k in range(cfg.cv.folds)]
        assert max(np.abs(f - folds[0]).max() for f in folds[1:]) > 1e-3  # every fold its own teacher
        for k in range(cfg.cv.folds):
            labels = teach(k).labels
            if soft == "true":
                np.testing.assert_allclose(labels, folds[k], atol=1e-6)
            else:
                assert labels.dtype == np.int64 and (labels == folds[k].argmax(1)).all()
            assert (out / "stage3" / f"fold{k}" / "done.json").is_file()
            np.testing.assert_array_equal(trained[(soft == "true", k)], labels)
        if soft == "true":
            ens = sum(w * f for w, f in zip(ensemble_weights(f1s), folds))
            np.testing.assert_allclose(ens, extra.labels, atol=2e-5)
    with pytest.raises(UserError, match="teacher"):
        config.resolve(preset="tiny", overrides=["pseudo.teacher=student"])


def test_mix_soft_mixes_inputs_targets_and_weights_with_one_lambda():
    """Soft-target mixup: lam ~ Beta(alpha, alpha) from the given generator, example i with N-1-i,
    targets stay probability vectors; alpha 0 or a miss of mix_prob leaves the batch as it is."""
    import torch

    from semivit.trainer.engine import mix_soft

    x = torch.arange(4, dtype=torch.float32).reshape(4, 1)
    y = torch.eye(4)[:, :3].clone()
    y[3] = torch.tensor([0.2, 0.3, 0.5])
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    g = np.random.default_rng(7)
    g.random()  # the mix_prob draw comes first
    lam = float(g.beta(0.4, 0.4))
    xm, ym, wm = mix_soft(x, y, w, 0.4, rng=np.random.default_rng(7))
    assert torch.allclose(xm[:, 0], torch.tensor([lam * 0 + (1 - lam) * 3, lam * 1 + (1 - lam) * 2,
                                                  lam * 2 + (1 - lam) * 1, lam * 3 + (1 - lam) * 0]))
    assert torch.allclose(ym[0], lam * y[0] + (1 - lam) * y[3]) and torch.allclose(ym.sum(1), torch.ones(4))
    assert torch.allclose(wm, lam * w + (1 - lam) * w.flip(0))
    assert mix_soft(x, y, w, 0.0)[0] is x
    assert mix_soft(x, y, w, 0.4, prob=0.0, rng=np.random.default_rng(7))[1] is y


def test_stage3_mixup_reaches_the_soft_targets(tiny_run, tiny_data_shared, tmp_path, monkeypatch):
    """pseudo.train.mixup_alpha > 0 with soft targets: stage 3's batches go through mix_soft (timm's
    Mixup takes integer labels only)."""

    from semivit import config
    from semivit.trainer import engine

    calls = []
    real = engine.mix_soft

    def spy(x, y, w, alpha, prob=1.0, rng=None):
        calls.append((tuple(y.shape), alpha))
        return real(x, y, w, alpha, prob, rng)

    monkeypatch.setattr(engine, "mix_soft", spy)
    cfg = config.resolve(preset="tiny", overrides=["pseudo.threshold_mode=all", "pseudo.soft=true",
                                                   "pseudo.train={epochs: 1, early_stopping: false, mixup_alpha: 0.4}"])
    out = tmp_path / "RUN"
    retrain_on(tiny_run, tiny_data_shared, out, cfg)
    assert calls and all(len(s) == 2 and a == 0.4 for s, a in calls), calls[:3]
    assert (out / "ensemble.json").is_file()


def test_cached_views_dataset_returns_the_drawn_views_own_target():
    """Per-view soft targets (N, V, C): the sample's target is the one of the view it returns."""
    import torch

    from semivit.trainer.stem_cache import CachedViewsDataset

    n, v, c = 5, 4, 3
    views = np.zeros((n, v, 1, 2, 2), np.float32)
    views += np.arange(v, dtype=np.float32)[None, :, None, None, None]  # the feature says which view
    labels = np.random.default_rng(0).dirichlet(np.ones(c), size=(n, v)).astype(np.float32)
    ds = CachedViewsDataset(views, labels, generator=torch.Generator().manual_seed(0))
    drawn = set()
    for _ in range(40):
        for i in range(n):
            x, y, _, idx = ds[i]
            k = int(x[0, 0, 0])
            drawn.add(k)
            assert idx == i and torch.allclose(y, torch.from_numpy(labels[i, k]))
    assert drawn == set(range(v))


def test_view_targets_are_the_teacher_on_each_view_end_to_end(tiny_data_shared, tmp_path, monkeypatch):
    """pseudo.targets=view on the hybrid model's stem cache: stage 3 trains on (N, 1 + views, C)
    targets - the labeled rows one-hot in every view, every pool row the stage-1 ensemble's
    prediction on that very cached view (no flip), which differs from view to view - and the run
    finishes with its 2 x folds members.  The config refuses it without what it needs."""
    import json

    from semivit.errors import UserError
    from semivit.models.ensemble import ensemble_weights, members_from_stages
    from semivit.models.checkpoint import load_checkpoint
    from semivit.trainer import folds
    from semivit.trainer.infer import predict_arrays
    from semivit.trainer.pipeline import run_training
    from semivit.trainer.stem_cache import StemFeatures

    from semivit.trainer import pipeline

    seen, teacher_calls = [], []
    real_fit, real_targets = folds.fit, pipeline.view_targets

    def spy(model, train_ds, *a, **kw):
        seen.append((kw["out_dir"].parent.name, train_ds))
        return real_fit(model, train_ds, *a, **kw)

    def spy_targets(run, views, teacher):
        teacher_calls.append(teacher)
        return real_targets(run, views, teacher)

    monkeypatch.setattr(folds, "fit", spy)
    monkeypatch.setattr(pipeline, "view_targets", spy_targets)
    sets = ["model.name=vit_hybrid_lite0", "model.pretrained=true", "model.kwargs={embed_dim: 32, depth: 1, num_heads: 2}",
            "train.cache_views=2",
            "pseudo.cluster=false", "pseudo.threshold_mode=all", "pseudo.soft=true", "pseudo.weight=one",
            "pseudo.targets=view", "pseudo.train={epochs: 1, early_stopping: false}"]
    cfg = config.resolve(preset="tiny", overrides=sets)
    out = tmp_path / "RUN"
    run = run_training(tiny_data_shared, out, cfg)
    stage3 = [ds for stage, ds in seen if stage == "stage3"]
    assert len(stage3) == cfg.cv.folds
    ds = stage3[0]
    n_lab = int(json.loads((out / "stage3" / "fold0" / "done.json").read_text())["train_samples"]
                - json.loads((out / "stage3" / "fold0" / "done.json").read_text())["extra_samples"])
    assert ds.labels.shape == (len(ds.views), 3, 3)
    lab = ds.labels[:n_lab]
    assert np.all(lab == lab[:, :1]) and np.all(lab.max(2) == 1.0)  # one-hot, the same in every view
    extra_views = ds.views[n_lab:]
    members = members_from_stages(out, ["stage1"])
    w = ensemble_weights([m["val_macro_f1"] for m in members], cfg.ensemble.weighting)
    want = np.zeros(ds.labels[n_lab:].shape, np.float32)
    for m, wm in zip(members, w):
        model, _ = load_checkpoint(out / m["path"])
        for v in range(extra_views.shape[1]):
            want[:, v] += wm * predict_arrays(model, StemFeatures(np.ascontiguousarray(extra_views[:, v])))
    assert np.allclose(ds.labels[n_lab:], want, atol=1e-4)
    assert np.abs(ds.labels[n_lab:, 1:] - ds.labels[n_lab:, :1]).max() > 1e-3  # augmented views get their own
    assert teacher_calls == [("stage1",)]  # computed once, shared by every fold
    assert np.array_equal(stage3[1].labels[-len(extra_views):], ds.labels[n_lab:])
    assert len(json.loads((out / "ensemble.json").read_text())["members"]) == 2 * cfg.cv.folds
    assert run.dir == out

    # benchmarks/view_teacher.py rebuilds exactly those targets from the finished run, and scores them
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import view_teacher

    _, image_targets, truth, vt = view_teacher.pool_targets(out)
    assert np.allclose(vt, ds.labels[n_lab:], atol=1e-6)
    assert np.array_equal(image_targets, ds.labels[n_lab:, 0]) is False  # stage 2's: plain + mirror
    s = view_teacher.summary("RUN", run.classes, image_targets, truth, vt)
    stats = json.loads((out / "pseudo" / "stats.json").read_text())
    assert s["agreement"]["image_targets"] == pytest.approx(stats["truth"]["precision"], abs=1e-4)
    assert s["agreement"]["view0_plain"] == pytest.approx(float((vt[:, 0].argmax(1) == truth).mean()), abs=1e-4)
    assert sum(c["named"] for c in s["per_class"]["augmented_views"].values()) == len(truth) * (vt.shape[1] - 1)

    from semivit.trainer.methods import check_view_targets

    for bad, why in ((["pseudo.soft=false"], "pseudo.soft: true"), (["pseudo.teacher=fold"], "pseudo.teacher: ensemble"),
                     (["pseudo.align=prior"], "pseudo.align: none"), (["ssl.method=ema-teacher"], "ssl.method: pseudo-label")):
        with pytest.raises(UserError, match=why):
            check_view_targets(config.resolve(preset="tiny", overrides=sets + bad), cached=lambda: True)
    with pytest.raises(UserError, match="stem-feature cache"):
        check_view_targets(config.resolve(preset="tiny", overrides=sets), cached=lambda: False)


@pytest.mark.parametrize("init", ["stage1", "backbone"])
def test_stage3_students_start_where_pseudo_init_says(init, tiny_run, tiny_data_shared, tmp_path, monkeypatch):
    """pseudo.init=stage1: fold k's student starts from stage-1 fold k's best weights (every
    tensor equal at its first step); backbone (the default): it does not."""

    import torch

    from semivit.models.checkpoint import load_checkpoint
    from semivit.trainer import folds

    at_start = []
    real_fit = folds.fit

    def spy(model, *a, **kw):
        at_start.append((kw["out_dir"].name, {k: v.detach().clone() for k, v in model.state_dict().items()}))
        return real_fit(model, *a, **kw)

    monkeypatch.setattr(folds, "fit", spy)
    cfg = config.resolve(preset="tiny", overrides=["pseudo.threshold_mode=all", "pseudo.soft=true", f"pseudo.init={init}",
                                                   "pseudo.train={epochs: 1, early_stopping: false}"])
    out = tmp_path / "RUN"
    retrain_on(tiny_run, tiny_data_shared, out, cfg)
    assert [name for name, _ in at_start] == [f"fold{k}" for k in range(cfg.cv.folds)]
    for k, (_, state) in enumerate(at_start):
        ref, _ = load_checkpoint(out / "stage1" / f"fold{k}" / "best.pt")
        same = all(torch.equal(state[n], v) for n, v in ref.state_dict().items())
        assert same == (init == "stage1"), (k, init)



def test_view_targets_without_the_stem_cache_fail_before_anything_trains(tiny_data, tmp_path):
    """ssl train with pseudo.targets=view on the tiny preset (no frozen stem, no cache): one line,
    exit 2, and no stage has trained."""
    from conftest import invoke, one_line_error

    res = invoke("train", tiny_data, "--preset", "tiny", "--set", "pseudo.threshold_mode=all", "--set", "pseudo.soft=true",
                 "--set", "pseudo.targets=view", "--out", tmp_path / "RUN")
    line = one_line_error(res)
    assert "pseudo.targets=view needs the stem-feature cache" in line, line
    assert not list((tmp_path / "RUN").glob("stage1/fold*/done.json"))


@pytest.mark.parametrize("drop_path", [None, 0.3])
def test_stage3_students_get_their_own_stochastic_depth(drop_path, tiny_run, tiny_data_shared, tmp_path, monkeypatch):
    """pseudo.drop_path: stage 3's students are built with that stochastic depth (every block's
    DropPath), stage 1 keeps model.drop_path; the students' checkpoints record it.  None (the
    default): the students are built as stage 1 was."""
    from timm.layers import DropPath

    from semivit.models.checkpoint import load_checkpoint
    from semivit.trainer import folds

    built = []
    real_fit = folds.fit

    def spy(model, *a, **kw):
        built.append(sorted({round(m.drop_prob, 4) for m in model.modules() if isinstance(m, DropPath)}))
        return real_fit(model, *a, **kw)

    monkeypatch.setattr(folds, "fit", spy)
    # two blocks: timm's stochastic-depth rule gives block i the rate i / (depth - 1) x drop_path
    sets = ["model.kwargs={patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}",
            "pseudo.threshold_mode=all", "pseudo.soft=true", "model.drop_path=0.1",
            "pseudo.train={epochs: 1, early_stopping: false}"] + ([] if drop_path is None else [f"pseudo.drop_path={drop_path}"])
    cfg = config.resolve(preset="tiny", overrides=sets)
    out = tmp_path / "RUN"
    retrain_on(tiny_run, tiny_data_shared, out, cfg)
    want = 0.1 if drop_path is None else drop_path
    assert built == [[want]] * cfg.cv.folds  # the second block's DropPath (the first block's rate is 0)
    _, meta = load_checkpoint(out / "stage3" / "fold0" / "best.pt")
    assert meta["model"]["drop_path"] == want
