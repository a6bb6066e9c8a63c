"""EMA-Teacher with probabilistic pseudo mixup (stage 3) and MAE pre-training (stage 0):
the formulas on hand-made numbers, then one tiny end-to-end run of each."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from semivit import config as cfgmod
from semivit.trainer.ema_teacher import (EMATeacherPolicy, ema_update, mix_batch, mixed_targets,
                                         pair_index, prob_mix_params, pseudo_mask)
from semivit.trainer.losses import FocalLoss
from semivit.trainer.mae import MAE, num_kept, random_masking


# ----------------------------------------------------------------------------- pseudo mixup
def test_prob_mix_ratio_and_mask_follow_the_formula():
    conf = torch.tensor([0.9, 0.3, 0.6, 0.75, 0.2])
    j = pair_index(5)
    assert j.tolist() == [4, 3, 2, 1, 0]
    lam, conf_mixed = prob_mix_params(conf, j)
    o = conf.tolist()
    for i in range(5):
        assert lam[i].item() == pytest.approx(o[i] / (o[i] + o[4 - i]))
        assert conf_mixed[i].item() == pytest.approx(max(o[i], o[4 - i]))
    assert lam[2].item() == pytest.approx(0.5)  # the middle sample pairs with itself
    # mask o*_i >= tau = 0.7: 0.2 counts (mixed with 0.9, lambda 0.18), so does 0.3 (with 0.75);
    # 0.6, mixed with itself, does not
    assert (conf_mixed >= 0.7).tolist() == [True, True, False, True, True]
    assert lam[4].item() == pytest.approx(0.2 / 1.1)


def test_mask_with_one_threshold_is_equation_5_and_per_class_thresholds_generalise_it():
    conf = torch.tensor([0.9, 0.3, 0.6, 0.75, 0.2])
    pseudo = torch.tensor([0, 1, 2, 1, 0])
    j = pair_index(5)
    _, conf_mixed = prob_mix_params(conf, j)
    for tau in (0.25, 0.5, 0.7, 0.8, 0.95):
        mask = pseudo_mask(conf, pseudo, torch.full((3,), tau), j)
        assert mask.tolist() == (conf_mixed >= tau).float().tolist()
    # per class: class 0 from 0.95, class 1 from 0.7, class 2 never (no calibrated threshold)
    thr = torch.tensor([0.95, 0.7, float("inf")])
    assert pseudo_mask(conf, pseudo, thr).tolist() == [0, 0, 0, 1, 0]  # only 0.75 of class 1 passes
    assert pseudo_mask(conf, pseudo, thr, j).tolist() == [0, 1, 0, 1, 0]  # ... and its partner


def test_mixup_images_and_targets_follow_the_formula():
    x = torch.stack([torch.full((3, 4, 4), float(v)) for v in (1.0, 2.0, 3.0, 4.0)])
    conf = torch.tensor([0.8, 0.4, 0.9, 0.1])
    j = pair_index(4)
    lam, _ = prob_mix_params(conf, j)
    mixed, lam_eff = mix_batch(x, lam, j, torch.zeros(4, dtype=torch.bool))
    assert torch.allclose(lam_eff, lam)
    for i in range(4):
        expect = lam[i] * x[i] + (1 - lam[i]) * x[3 - i]
        assert torch.allclose(mixed[i], expect)
    y = mixed_targets(torch.tensor([0, 1, 2, 1]), lam, j, 3)
    assert torch.allclose(y[0], torch.tensor([lam[0], 1 - lam[0], 0.0]))  # class 0 mixed with class 1
    assert torch.allclose(y.sum(1), torch.ones(4))


@pytest.mark.parametrize("seed", range(5))
def test_cutmix_ratio_is_corrected_to_the_pasted_area(seed):
    np.random.seed(seed)
    n, size = 6, 20
    x = torch.zeros(n, 3, size, size)
    x[n // 2:] = 1.0  # partners j = n-1-i of the first half are all ones
    lam = torch.tensor([0.9, 0.5, 0.15, 0.7, 0.3, 0.05])  # small lambdas: big boxes, often clipped
    mixed, lam_eff = mix_batch(x, lam, pair_index(n), torch.ones(n, dtype=torch.bool))
    for i in range(n // 2):
        pasted = float((mixed[i, 0] == 1.0).float().mean())
        assert lam_eff[i].item() == pytest.approx(1.0 - pasted, abs=1e-6)
        assert torch.all(mixed[i, 0] == mixed[i, 1])  # the same box in every channel


class _Fixed(nn.Module):
    """A 'teacher' that outputs the given probabilities, and a 'student' with uniform logits."""

    def __init__(self, probs=None, num_classes=3):
        super().__init__()
        self.probs, self.num_classes = probs, num_classes
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        if self.probs is None:
            return torch.zeros(len(x), self.num_classes) + 0 * self.w
        return torch.log(self.probs)


def test_policy_masks_by_mixed_confidence():
    cfg = cfgmod.resolve("tiny", overrides=["ssl.threshold=0.7", "ssl.unlabeled_weight=5", "ssl.cutmix_alpha=0"])
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.3, 0.35, 0.35], [0.2, 0.6, 0.2], [0.1, 0.1, 0.8]])
    student = _Fixed()
    policy = EMATeacherPolicy(student, np.zeros((4, 8, 8, 3), np.uint8), cfg, FocalLoss(gamma=0.0),
                              torch.device("cpu"))
    policy.teacher = _Fixed(probs)
    batch = ((torch.zeros(4, 3, 8, 8, dtype=torch.uint8),) * 2, None, None, None)
    loss = policy.loss(student, batch, lambda t: t.float(), 0)
    # uniform student logits: every sample's CE is log 3 whatever its soft target.  o = (.9, .35,
    # .6, .8), partners (3, 2, 1, 0): o* = (.9, .6, .6, .9) -> 2 of 4 pass tau = 0.7.
    assert loss.item() == pytest.approx(5 * 2 / 4 * math.log(3), rel=1e-5)
    assert policy.stats()["u_mask_rate"] == 0.5


def test_labeled_stream_under_a_policy_is_not_a_replay():
    """The unlabeled loader drives the epoch, so the labeled loader is re-iterated: every pass
    must reshuffle and re-augment (itertools.cycle would replay the first pass's batches)."""
    from torch.utils.data import DataLoader

    from semivit.trainer.engine import _forever

    data = torch.arange(8.0)
    loader = DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    it = _forever(loader)
    passes = [torch.cat([next(it) for _ in range(2)]).tolist() for _ in range(4)]
    assert all(sorted(p) == data.tolist() for p in passes)
    assert len({tuple(p) for p in passes}) > 1


# ----------------------------------------------------------------------------- EMA
def test_ema_update_matches_the_formula():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    student = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    student.train()(torch.randn(8, 3))  # moves the student's BatchNorm statistics
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    m = 0.9
    ema_update(teacher, student, m)
    s = student.state_dict()
    for name, _ in teacher.named_parameters():
        assert torch.allclose(teacher.state_dict()[name], m * before[name] + (1 - m) * s[name])
    for name, buf in teacher.named_buffers():
        assert torch.equal(buf, s[name]), name  # running_mean, running_var, num_batches_tracked


# ----------------------------------------------------------------------------- MAE
def _tiny_vit():
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32,
                             patch_size=8, embed_dim=32, depth=1, num_heads=2)


@pytest.mark.parametrize("ratio,kept", [(0.75, 4), (0.5, 8), (0.9, 2)])
def test_mae_masking_keeps_the_stated_share(ratio, kept):
    assert num_kept(16, ratio) == kept
    ids_keep, ids_restore, mask = random_masking(7, 16, ratio, torch.Generator().manual_seed(1))
    assert ids_keep.shape == (7, kept)
    assert torch.all(mask.sum(1) == 16 - kept)
    for b in range(7):
        assert len(set(ids_keep[b].tolist())) == kept
        assert torch.all(mask[b, ids_keep[b]] == 0)
    assert not torch.equal(mask[0], mask[1])  # per-sample masks


@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_loss_only_on_masked_patches(norm_pix):
    torch.manual_seed(0)
    mae = MAE(_tiny_vit(), 32, decoder_dim=16, decoder_depth=1, norm_pix_loss=norm_pix).eval()
    x = torch.randn(2, 3, 32, 32)
    loss, pred, mask = mae(x, 0.75, torch.Generator().manual_seed(0))
    vis = int((mask[0] == 0).nonzero()[0])
    hid = int((mask[0] == 1).nonzero()[0])

    def poke(idx):  # change the target pixels of patch idx of image 0
        y = x.clone()
        r, c = divmod(idx, 4)
        y[0, :, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] += torch.randn(3, 8, 8) * 3
        return y

    assert mae.loss(poke(vis), pred, mask).item() == pytest.approx(loss.item(), abs=1e-7)
    assert abs(mae.loss(poke(hid), pred, mask).item() - loss.item()) > 1e-4


def _pred_changes_when_masked_pixels_change(mae, size):
    x = torch.randn(2, 3, size, size)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731 - the same mask twice
    _, pred, mask = mae(x, 0.75, g())
    y = x + 5 * mae.pixel_mask(mask) * torch.randn_like(x)  # only the masked cells change
    _, pred2, _ = mae(y, 0.75, g())
    return not torch.allclose(pred, pred2, atol=1e-5)


def test_mae_encoder_does_not_see_masked_patches():
    with torch.no_grad():
        assert not _pred_changes_when_masked_pixels_change(MAE(_tiny_vit(), 32, 16, 1).eval(), 32)


def test_hybrid_mae_pixel_masking_stops_the_stem_leak():
    import timm

    import semivit.models.networks  # noqa: F401 - registers vit_hybrid_lite0

    torch.manual_seed(0)
    hybrid = timm.create_model("vit_hybrid_lite0", pretrained=False, num_classes=0, img_size=64,
                               embed_dim=32, depth=1, num_heads=2)
    with torch.no_grad():
        leaky = MAE(hybrid, 64, 16, 1, mask_input=False).eval()
        assert leaky.conv_stem and leaky.patch == 16
        assert _pred_changes_when_masked_pixels_change(leaky, 64)  # the CNN sees the masked cells
        leaky.mask_input = True
        assert not _pred_changes_when_masked_pixels_change(leaky, 64)


# ----------------------------------------------------------------------------- end to end
def _train(*args):
    from typer.testing import CliRunner

    from semivit.cli import app

    r = CliRunner().invoke(app, ["train", *args])
    assert r.exit_code == 0, (r.output, r.exception)
    return r


def _state(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def test_ema_teacher_end_to_end(tiny_data, tmp_path, monkeypatch):
    """Stage 3 as EMA-Teacher: fold k's student and teacher start from stage-1 fold k's best
    weights, pseudo-labels pass the threshold (mask rate > 0) and add a loss, the teacher
    moves away from its start, and the stage trains its fixed number of epochs."""
    import csv

    from semivit.trainer import ema_teacher

    starts = []  # (fold seed, the student's state when the policy is made)
    orig_init = ema_teacher.EMATeacherPolicy.__init__

    def recording_init(self, student, *args, **kwargs):
        starts.append((kwargs.get("seed"), {k: v.detach().clone() for k, v in student.state_dict().items()}))
        orig_init(self, student, *args, **kwargs)

    monkeypatch.setattr(ema_teacher.EMATeacherPolicy, "__init__", recording_init)
    run = tmp_path / "run"
    _train(str(tiny_data), "--preset", "tiny", "--set", "ssl.method=ema-teacher", "--out", str(run))
    assert not (run / "pseudo" / "pseudo_labels.csv").exists()  # online pseudo-labels only
    ens = json.loads((run / "ensemble.json").read_text())
    stages = [m["stage"] for m in ens["members"]]
    assert stages.count("stage1") == 2 and stages.count("stage3") == 2
    assert abs(sum(m["weight"] for m in ens["members"]) - 1) < 1e-6

    cfg = cfgmod.resolve("tiny", overrides=["ssl.method=ema-teacher"])
    assert [seed for seed, _ in starts] == [100, 101]  # one policy per fold, in fold order
    for k, (_, start) in enumerate(starts):
        s1 = _state(run / "stage1" / f"fold{k}" / "best.pt")
        other = _state(run / "stage1" / f"fold{1 - k}" / "best.pt")
        assert all(torch.equal(start[n], s1[n]) for n in s1), f"fold {k} did not start from stage-1 fold {k}"
        assert not all(torch.equal(start[n], other[n]) for n in other)
        teacher = _state(run / "stage3" / f"fold{k}" / "best.pt")
        moved = max(float((teacher[n].float() - s1[n].float()).abs().max())
                    for n, v in s1.items() if v.is_floating_point() and "running" not in n)
        assert moved > 1e-6, f"fold {k}: the teacher never moved from the stage-1 weights"
        rows = list(csv.DictReader(open(run / "stage3" / f"fold{k}" / "metrics.csv")))
        assert len(rows) == cfgmod.ssl_train_config(cfg).epochs  # fixed epochs, no early stop
        assert all(float(r["u_mask_rate"]) > 0 and float(r["u_loss"]) > 0 for r in rows), rows
        ck = torch.load(run / "stage3" / f"fold{k}" / "best.pt", weights_only=False)
        assert ck["stage"] == "stage3"
    held = json.loads((run / "heldout.json").read_text())
    assert "stage3_ensemble" in held and "full_ensemble" in held


def test_mae_pretrain_end_to_end_and_resume(tiny_data, tmp_path, monkeypatch):
    from semivit.models.networks import build_model
    from semivit.trainer import folds

    at_step0 = []  # each stage-1 fold model's backbone when training starts
    orig_fit = folds.fit

    def recording_fit(model, *args, **kwargs):
        at_step0.append({k: v.detach().clone() for k, v in model.backbone.state_dict().items()})
        return orig_fit(model, *args, **kwargs)

    monkeypatch.setattr(folds, "fit", recording_fit)
    run = tmp_path / "run"
    args = [str(tiny_data), "--preset", "tiny", "--set", "pretrain.method=mae",
            "--stages", "pretrain,supervised", "--out", str(run)]
    _train(*args)
    pre = run / "pretrain"
    for name in ("encoder.pt", "loss.csv", "loss.png", "last.pt"):
        assert (pre / name).is_file(), name
    assert (pre / "loss.csv").read_text().splitlines()[0].startswith("epoch,loss")
    enc = torch.load(pre / "encoder.pt", weights_only=True)["state_dict"]

    # the encoder loads strictly into a fresh backbone through model.weights
    cfg = cfgmod.resolve("tiny", overrides=[f"model.weights={pre / 'encoder.pt'}"])
    model = build_model(cfg.model, 3)
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, enc[k]), k
    # every stage-1 fold started from it: its backbone equals the encoder at step 0
    assert len(at_step0) == 2
    for state in at_step0:
        assert state.keys() == enc.keys()
        for k, v in enc.items():
            assert torch.equal(state[k], v), k
    assert "pretrain" in (run / "timings.yaml").read_text()
    monkeypatch.setattr(folds, "fit", orig_fit)

    # resume: with encoder.pt gone, a rerun finishes from last.pt (no epoch retrained)
    (pre / "encoder.pt").unlink()
    r = _train(*args)
    assert "resuming MAE after epoch 1/1" in r.output.replace("\n", " ")
    enc2 = torch.load(pre / "encoder.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(enc[k], enc2[k]) for k in enc)


def test_hybrid_mae_then_ema_teacher_with_stem_cache(tiny_data, tmp_path, monkeypatch):
    """The quick preset's path in small: MAE on the CNN-stem hybrid, stage 1 on cached frozen-stem
    features of the MAE encoder, EMA-Teacher stage 3 on pixels, all members in the ensemble."""
    from semivit.trainer import folds

    at_step0 = []  # (stage dir, backbone state) when each fold's training starts
    orig_fit = folds.fit

    def recording_fit(model, *args, **kwargs):
        at_step0.append((kwargs["out_dir"].parent.name,
                         {k: v.detach().clone() for k, v in model.backbone.state_dict().items()}))
        return orig_fit(model, *args, **kwargs)

    monkeypatch.setattr(folds, "fit", recording_fit)
    run = tmp_path / "run"
    _train(str(tiny_data), "--preset", "tiny", "--set", "model.name=vit_hybrid_lite0",
           "--set", "model.kwargs={embed_dim: 32, depth: 1, num_heads: 2}", "--set", "train.cache_views=2",
           "--set", "ssl.method=ema-teacher", "--set", "ssl.threshold_mode=oof", "--set", "pretrain.method=mae",
           "--out", str(run))
    enc = torch.load(run / "pretrain" / "encoder.pt", weights_only=True)["state_dict"]
    stage1 = [state for stage, state in at_step0 if stage == "stage1"]
    assert len(stage1) == 2  # both stage-1 folds started from the MAE encoder, stem included
    for state in stage1:
        assert state.keys() == enc.keys() and all(torch.equal(state[k], v) for k, v in enc.items())
    ens = json.loads((run / "ensemble.json").read_text())
    assert sorted(m["stage"] for m in ens["members"]) == ["stage1", "stage1", "stage3", "stage3"]
    assert "stage3_ensemble" in json.loads((run / "heldout.json").read_text())


def test_mae_pretrain_is_reproducible(tiny_data, tmp_path):
    """The same seed, the same MAE encoder: its augmentation is seeded (per epoch, so a resumed run
    draws what an uninterrupted one does) - unseeded, albumentations drew from the OS."""
    encs = []
    for name in ("a", "b"):
        _train(str(tiny_data), "--preset", "tiny", "--set", "pretrain.method=mae", "--set", "pretrain.epochs=2",
               "--stages", "pretrain", "--out", str(tmp_path / name))
        encs.append(torch.load(tmp_path / name / "pretrain" / "encoder.pt", weights_only=True)["state_dict"])
    assert encs[0].keys() == encs[1].keys()
    assert all(torch.equal(encs[0][k], encs[1][k]) for k in encs[0])
