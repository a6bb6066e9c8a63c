"""The typed config: seed-recipe defaults, presets, file + --set precedence, errors, save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from semivit import config as C
from semivit.errors import UserError


def test_defaults_are_the_seed_recipe():
    cfg = C.Config()
    assert cfg.model.name == "vit_base_patch16_224.augreg_in21k_ft_in1k"
    assert cfg.model.img_size == 224
    assert cfg.model.head_dropout == 0.4
    t = cfg.train
    assert (t.epochs, t.batch_size) == (50, 8)
    assert t.lr == 1e-4 and t.backbone_lr_mult == 0.1 and t.min_lr == 1e-6
    assert t.weight_decay == 0.01
    assert t.loss == "focal" and t.focal_gamma == 2.0 and t.class_balance_beta == 0.9999
    assert t.patience == 5 and t.min_delta == 0.001
    assert cfg.pseudo.threshold == 0.96 and cfg.pseudo.purity == 0.9 and cfg.pseudo.cluster
    assert cfg.cv.folds == 5
    assert cfg.ssl.method == "pseudo-label" and cfg.pretrain.method == "none"
    assert cfg.ensemble.weighting == "f1"


def test_seed_preset_equals_defaults():
    cfg = C.resolve(preset="seed")
    assert cfg.model_dump(exclude={"preset"}) == C.Config().model_dump(exclude={"preset"})
    assert cfg.preset == "seed"


def test_default_preset_is_quick():
    cfg = C.resolve()
    assert cfg.preset == "quick" == C.DEFAULT_PRESET
    assert cfg.model.img_size == C.PRESETS["quick"]["model"]["img_size"]
    assert cfg.train.epochs == C.PRESETS["quick"]["train"]["epochs"]
    # keys the preset leaves alone keep the seed recipe
    assert cfg.pseudo.threshold == 0.96 and cfg.cv.folds == 5 and cfg.train.focal_gamma == 2.0


def test_tiny_preset():
    cfg = C.resolve(preset="tiny")
    assert cfg.preset == "tiny"
    assert cfg.model.img_size <= 64 and cfg.train.epochs <= 3 and cfg.cv.folds == 2
    assert cfg.model.pretrained is False
    assert cfg.model.kwargs == C.PRESETS["tiny"]["model"]["kwargs"]


def test_every_preset_validates():
    for name in C.PRESETS:
        assert C.resolve(preset=name).preset == name


def test_unknown_preset():
    with pytest.raises(UserError, match="unknown preset 'huge'"):
        C.resolve(preset="huge")


def test_config_file_then_set_precedence(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("preset: tiny\ntrain:\n  epochs: 7\n  batch_size: 3\nmodel:\n  img_size: 48\n")
    cfg = C.resolve(config_file=f)
    assert cfg.preset == "tiny"  # the file chose the preset
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.model.img_size) == (7, 3, 48)
    assert cfg.cv.folds == 2  # from the preset, untouched by the file
    cfg = C.resolve(config_file=f, overrides=["train.epochs=9", "train.epochs=11"])
    assert cfg.train.epochs == 11  # --set beats the file; the last --set wins
    assert cfg.train.batch_size == 3
    cfg = C.resolve(preset="quick", config_file=f, overrides=["cv.folds=4"])
    assert cfg.preset == "quick"  # an explicit --preset beats the file's
    assert cfg.train.epochs == 7 and cfg.cv.folds == 4
    cfg = C.resolve(config_file=f, overrides=["train.batch_size=5"], seed=42, device="cpu")
    assert cfg.seed == 42 and cfg.device == "cpu" and cfg.train.batch_size == 5


def test_explicit_options_beat_set():
    cfg = C.resolve(preset="tiny", overrides=["seed=1"], seed=2)
    assert cfg.seed == 2
    assert C.resolve(preset="tiny", overrides=["seed=1"], seed=None).seed == 1


def test_design_set_keys(tmp_path):
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"x")
    cfg = C.resolve(preset="tiny", overrides=[
        "model.name=resnet18", "model.img_size=96", f"model.weights={weights}", "train.epochs=3",
        "train.batch_size=4", "cv.folds=3", "pseudo.threshold=0.8", "ssl.method=ema-teacher",
        "pretrain.method=mae",
    ])
    assert cfg.model.name == "resnet18" and cfg.model.img_size == 96
    assert cfg.model.weights == weights and isinstance(cfg.model.weights, Path)
    assert cfg.train.epochs == 3 and cfg.train.batch_size == 4 and cfg.cv.folds == 3
    assert cfg.pseudo.threshold == 0.8
    assert cfg.ssl.method == "ema-teacher" and cfg.pretrain.method == "mae"
    assert C.resolve(overrides=["ssl.method=pseudo-label", "pretrain.method=none"]).ssl.method == "pseudo-label"


def test_set_parses_yaml_values():
    cfg = C.resolve(preset="tiny", overrides=["model.kwargs={depth: 2, num_heads: 4}",
                                              "pseudo.max_per_class=null", "train.grad_clip=1.5",
                                              "pseudo.cluster=false"])
    assert cfg.model.kwargs == {"depth": 2, "num_heads": 4}  # kwargs replaced, not merged
    assert cfg.pseudo.max_per_class is None and cfg.train.grad_clip == 1.5 and cfg.pseudo.cluster is False


@pytest.mark.parametrize("item,key", [
    ("train.epocs=3", "train.epocs"),
    ("modle.name=x", "modle"),
    ("nonsense=1", "nonsense"),
    ("train.epochs.deep=1", "train.epochs.deep"),
])
def test_unknown_key_names_the_key(item, key):
    with pytest.raises(UserError) as e:
        C.resolve(overrides=[item])
    msg = str(e.value)
    assert "unknown config key" in msg and f"'{key}'" in msg and "\n" not in msg


@pytest.mark.parametrize("item,key", [
    ("train.epochs=abc", "train.epochs"),
    ("train.epochs=0", "train.epochs"),
    ("train.batch_size=2.5", "train.batch_size"),
    ("model.img_size=[1,2]", "model.img_size"),
    ("pseudo.threshold=1.5", "pseudo.threshold"),
    ("ssl.method=fixmatch", "ssl.method"),
    ("pretrain.method=simclr", "pretrain.method"),
    ("cv.folds=1", "cv.folds"),
    ("device=tpu", "device"),
])
def test_bad_value_names_the_key_and_value(item, key):
    with pytest.raises(UserError) as e:
        C.resolve(overrides=[item])
    msg = str(e.value)
    assert f"bad value for '{key}'" in msg and "\n" not in msg
    assert item.split("=", 1)[1].split(",")[0].strip("[") in msg  # the given value is shown
    assert f"--set {item}" in msg  # and where it came from


def test_missing_weights_path_names_the_key(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(UserError) as e:
        C.resolve(overrides=[f"model.weights={missing}"])
    msg = str(e.value)
    assert "model.weights" in msg and "not found" in msg and str(missing) in msg


def test_malformed_set_items():
    with pytest.raises(UserError, match="KEY=VALUE"):
        C.resolve(overrides=["train.epochs"])
    with pytest.raises(UserError, match="empty key"):
        C.resolve(overrides=["train..epochs=3"])
    with pytest.raises(UserError, match="empty key"):
        C.resolve(overrides=["=3"])


def test_config_file_errors(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        C.resolve(config_file=tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        C.resolve(config_file=bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="mapping"):
        C.resolve(config_file=bad)
    bad.write_text("train:\n  epochz: 3\n")
    with pytest.raises(UserError, match=r"unknown config key 'train.epochz' \(config file"):
        C.resolve(config_file=bad)
    bad.write_text("train:\n  lr: -1\n")
    with pytest.raises(UserError, match="bad value for 'train.lr'"):
        C.resolve(config_file=bad)


def test_save_then_load_round_trips(tmp_path):
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"x")
    cfg = C.resolve(preset="tiny", overrides=["train.epochs=4", f"model.weights={weights}",
                                              "ssl.method=ema-teacher"], seed=123)
    path = tmp_path / "run" / "config.yaml"
    C.save(cfg, path)
    doc = yaml.safe_load(path.read_text())
    assert doc["seed"] == 123
    assert doc["config"]["seed"] == 123 and doc["config"]["preset"] == "tiny"
    versions = doc["versions"]
    for pkg in ("python", "torch", "numpy", "semivit"):
        assert versions.get(pkg), pkg
    import torch

    assert versions["torch"].split("+")[0] == torch.__version__.split("+")[0]
    back = C.load(path)
    assert back == cfg
    # A saved run config is also a valid --config file.
    assert C.resolve(config_file=path) == cfg
    import os

    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # like a plain open(), not mkstemp's 0600


def test_load_of_a_bad_saved_config(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"config": {"train": {"epochs": "many"}}, "seed": 0}))
    with pytest.raises(UserError, match="train.epochs"):
        C.load(path)


def test_parse_override():
    assert C.parse_override("a.b=3") == (["a", "b"], 3)
    assert C.parse_override("a=x=y") == (["a"], "x=y")
    assert C.parse_override("a=") == (["a"], None)
    assert C.parse_override(" a.b =0.5") == (["a", "b"], 0.5)
