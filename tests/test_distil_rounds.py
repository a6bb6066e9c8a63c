"""Iterated distillation (``pseudo.rounds``): round r > 1 relabels the unlabeled pool with the
ensemble of stage 1 + round r-1's students and trains new students on it; round 1 is the
one-round run's stage 3; the last round's students are the ensemble's second half; a rerun
resumes inside a round; a refresh retrains in one round."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import retrain_on
from semivit import config
from semivit.errors import UserError

SOFT = ["pseudo.threshold_mode=all", "pseudo.soft=true", "pseudo.weight=one", "pseudo.cluster=false",
        "pseudo.train={epochs: 2, early_stopping: false}"]


def _derived(tiny_run, data, out, overrides):
    cfg = config.resolve(preset="tiny", overrides=SOFT + overrides)
    retrain_on(tiny_run, data, out, cfg)
    return cfg


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def test_round_dirs_name_each_round():
    from semivit.trainer.methods import distil_rounds, round_dirs

    assert round_dirs(1, 1) == ("pseudo", "stage3", "stage1")
    assert round_dirs(1, 3) == ("pseudo", "stage3_round1", "stage1")
    assert round_dirs(2, 3) == ("pseudo_round2", "stage3_round2", "stage3_round1")
    assert round_dirs(3, 3) == ("pseudo_round3", "stage3", "stage3_round2")
    assert distil_rounds(config.resolve(preset="tiny", overrides=["pseudo.rounds=3"])) == 3
    # the EMA-Teacher pseudo-labels online: one stage 3 whatever pseudo.rounds says
    assert distil_rounds(config.resolve(preset="tiny", overrides=["pseudo.rounds=3", "ssl.method=ema-teacher"])) == 1
    with pytest.raises(UserError, match="rounds"):
        config.resolve(preset="tiny", overrides=["pseudo.rounds=0"])


def test_two_rounds_relabel_with_stage1_and_round1_and_resume(tiny_run, tiny_data_shared, tmp_path, monkeypatch):
    from semivit.trainer import folds as folds_mod
    from semivit.trainer import pseudo as pseudo_mod
    from semivit.trainer.infer import ensemble_predict
    from semivit.trainer.pipeline import pseudo_extra, run_training
    from semivit.trainer.run import open_run

    trained: list = []  # (stage dir, fold, round, the extra labels it trained on)
    real_train_fold = folds_mod.train_fold

    def spy(run, stage, k, extra=None, **kw):
        trained.append((stage, k, run.distil_round, None if extra is None else np.array(extra.labels)))
        return real_train_fold(run, stage, k, extra=extra, **kw)

    monkeypatch.setattr(folds_mod, "train_fold", spy)
    one = tmp_path / "one"
    _derived(tiny_run, tiny_data_shared, one, [])
    two = tmp_path / "two"
    cfg = _derived(tiny_run, tiny_data_shared, two, ["pseudo.rounds=2"])
    folds = cfg.cv.folds
    ran = [(s, k, r) for s, k, r, _ in trained[folds:]]
    assert ran == [("stage3_round1", k, 1) for k in range(folds)] + [("stage3", k, 2) for k in range(folds)]

    # round 1 is the one-round run's stage 3: same targets, same seeds, same weights
    for k in range(folds):
        np.testing.assert_array_equal(trained[k][3], trained[folds + k][3])
        a, b = _weights(one / "stage3" / f"fold{k}" / "best.pt"), _weights(two / "stage3_round1" / f"fold{k}" / "best.pt")
        assert all(torch.equal(a[n], b[n]) for n in a)
    # round 2 learns the ensemble of stage 1 + round 1's students, not stage 1's again
    run = open_run(two, cfg, tiny_data_shared, create=False)
    _, images = run.unlabeled
    expected = ensemble_predict(two, images, stages=["stage1", "stage3_round1"], tta=cfg.pseudo.tta,
                                weighting=cfg.ensemble.weighting)
    round2 = pseudo_extra(run, "pseudo_round2").labels
    np.testing.assert_allclose(round2, expected, atol=2e-5)
    assert np.abs(round2 - pseudo_extra(run, "pseudo").labels).max() > 1e-3
    for k in range(folds):
        np.testing.assert_array_equal(trained[2 * folds + k][3][-len(round2):], round2)
    # the round-2 students start from other seeds than round 1's (round 1 keeps stage 3's)
    from semivit.trainer.folds import fold_seed

    seeds = {r: [fold_seed(cfg, d, k, r) for k in range(folds)] for r, d in ((1, "stage3_round1"), (2, "stage3"))}
    assert seeds[1] == [fold_seed(cfg, "stage3", k) for k in range(folds)] and not set(seeds[1]) & set(seeds[2])
    # the ensemble: stage 1 + the last round (as many members as one round gives)
    members = [m["name"] for m in json.loads((two / "ensemble.json").read_text())["members"]]
    assert members == [f"stage1/fold{k}" for k in range(folds)] + [f"stage3/fold{k}" for k in range(folds)]

    # a rerun after a kill inside round 2: only the unfinished fold trains, nothing is relabeled
    (two / "stage3" / "fold1" / "done.json").unlink()
    relabels = []
    monkeypatch.setattr(pseudo_mod, "run_pseudo", lambda *a, **kw: relabels.append(kw))
    trained.clear()
    run_training(tiny_data_shared, two, cfg, stages="retrain")
    assert [(s, k, r) for s, k, r, _ in trained] == [("stage3", 1, 2)] and relabels == []


def test_a_refresh_retrains_in_one_round(tiny_run, tmp_path):
    from semivit.refresh.build import candidate_config

    run = tmp_path / "RUN"
    shutil.copytree(tiny_run, run)
    config.save(config.resolve(preset="tiny", overrides=["pseudo.rounds=3"]), run / "config.yaml")
    assert config.resolve(config_file=run / "config.yaml").pseudo.rounds == 3
    assert candidate_config(run, []).pseudo.rounds == 1
    assert candidate_config(run, ["train.epochs=3"]).train.epochs == 3  # other keys pass through
