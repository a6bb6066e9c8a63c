"""Names that live in registries - pseudo-label threshold rules, retrain strategies, pre-training
methods, stages - are what the config accepts, and a new registration plugs in without an edit
anywhere else (the label-efficiency work adds rules and strategies this way)."""

from __future__ import annotations

import numpy as np
import pytest

from semivit import config
from semivit.errors import UserError
from semivit.pseudo import rules
from semivit.pseudo.rules import RuleInputs, threshold_rule
from semivit.pseudo.select import label_pool
from semivit.trainer import methods, stages
from semivit.trainer.pipeline import parse_stages


@pytest.mark.parametrize("key, value, names", [
    ("pseudo.threshold_mode", "flexmatch", rules.rule_names),
    ("ssl.threshold_mode", "top", rules.rule_names),
    ("ssl.method", "noisy-student", methods.retrain_names),
    ("pretrain.method", "simclr", methods.pretrain_names),
])
def test_a_name_not_in_its_registry_is_a_one_line_error_listing_the_choices(key, value, names):
    choices = ", ".join(names())
    assert {"global", "oof"} <= set(rules.rule_names()) and "ema-teacher" in methods.retrain_names()
    with pytest.raises(UserError) as e:
        config.resolve(preset="tiny", overrides=[f"{key}={value}"])
    msg = str(e.value)
    assert "\n" not in msg and key in msg and f"choose from {choices}" in msg and repr(value) in msg


def test_a_registered_threshold_rule_is_accepted_by_the_config_and_applied_by_label_pool(monkeypatch):
    monkeypatch.setattr(rules, "_RULES", dict(rules._RULES))  # the registration ends with the test

    @threshold_rule("top1")
    def top1(inp: RuleInputs) -> np.ndarray:
        """Per class, the confidence of the pool's most confident prediction of that class."""
        conf, pred = inp.pool_probs.max(1), inp.pool_probs.argmax(1)
        return np.array([conf[pred == c].max() if (pred == c).any() else np.inf for c in range(inp.num_classes)])

    cfg = config.resolve(preset="tiny", overrides=["pseudo.threshold_mode=top1", "pseudo.cluster=false"])
    probs = np.array([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.3, 0.6, 0.1], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1]])
    pool = label_pool(probs, [np.zeros((5, 2))], cfg.pseudo, seed=0)
    assert pool.thresholds.tolist() == [0.9, 0.7, np.inf]
    assert pool.labels.index.tolist() == [0, 3]  # one per class that has a prediction, the top one
    # the global rule on the same pool (tiny's 0.3) takes all five
    glob = label_pool(probs, [np.zeros((5, 2))], cfg.pseudo.model_copy(update={"threshold_mode": "global"}), 0)
    assert glob.labels.index.tolist() == [0, 1, 2, 3, 4]


def test_a_registered_retrain_strategy_is_accepted_and_its_needs_decide_the_stages(monkeypatch):
    monkeypatch.setattr(methods, "_RETRAIN", dict(methods._RETRAIN))

    @methods.retrain_method("online-only", needs=("supervised",))
    def online_only(run):  # pragma: no cover - never trained here
        raise AssertionError

    cfg = config.resolve(preset="tiny", overrides=["ssl.method=online-only"])
    assert parse_stages(None, cfg) == ["supervised", "retrain"]  # no stage 2: the strategy needs none
    assert stages.get_stage("retrain").needs(cfg) == ("supervised",)
    base = config.resolve(preset="tiny")
    assert parse_stages(None, base) == ["supervised", "pseudo", "retrain"]
    assert stages.get_stage("retrain").needs(base) == ("supervised", "pseudo")


def test_stage_choices_come_from_the_registry():
    cfg = config.resolve(preset="tiny", overrides=["pretrain.method=mae"])
    assert stages.stage_names() == ["pretrain", "supervised", "pseudo", "retrain", "graph"]
    assert parse_stages("retrain,pretrain", cfg) == ["pretrain", "retrain"]  # registry order
    with pytest.raises(UserError, match="unknown stage 'fine-tune' \\(choose from pretrain,supervised,pseudo,retrain,graph\\)"):
        parse_stages("fine-tune", cfg)
    with pytest.raises(UserError, match="--stages pretrain needs a pre-training method"):
        parse_stages("pretrain", config.resolve(preset="tiny"))
    # the pool graph: a stage of the quick preset (its default), not of the tiny one unless asked
    with pytest.raises(UserError, match="--stages graph needs the pool graph: --set ensemble.graph=pool"):
        parse_stages("graph", config.resolve(preset="tiny"))
    assert parse_stages(None, config.resolve(preset="quick")) == ["supervised", "pseudo", "retrain", "graph"]
    assert parse_stages(None, config.resolve(preset="lite0")) == ["supervised", "pseudo", "retrain"]
