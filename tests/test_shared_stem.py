"""Frozen-stem hybrids: the training feature cache and the ensemble's shared stem (one stem
computation for all members, in PyTorch and in the exported ONNX graph)."""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from semivit import config
from semivit.data.dataset import Preprocess
from semivit.models.ensemble import EnsembleModel
from semivit.trainer.infer import predict_arrays
from semivit.models.networks import build_model, frozen_stem
from semivit.trainer.stem_cache import CachedViewsDataset, StemFeatures, augmented_views, features

SMALL = ["model.img_size=32", "model.kwargs={embed_dim: 32, depth: 1, num_heads: 2}", "model.head_hidden=16"]


def hybrids(n, seed=0):
    cfg = config.resolve(preset="quick", overrides=SMALL)
    torch.manual_seed(seed)
    return [build_model(cfg.model, 3).eval() for _ in range(n)], cfg


def reference(members, weights, images):
    """Weighted mean over members of the mean over the image and its mirror, member by member."""
    x = Preprocess(channels_last_input=True)(torch.from_numpy(images))
    w = np.asarray(weights) / np.sum(weights)
    with torch.no_grad():
        return sum(wi * 0.5 * (torch.softmax(m(x), 1) + torch.softmax(m(x.flip(3)), 1))
                   for wi, m in zip(w, members)).numpy()


def test_ensemble_runs_one_shared_stem_and_matches_the_members():
    members, _ = hybrids(3)
    ens = EnsembleModel(members, [1, 2, 3]).eval()
    assert ens.stem is not None
    assert all(isinstance(m.backbone.patch_embed.backbone, torch.nn.Identity) for m in ens.members)
    assert frozen_stem(members[0]) is not None  # the caller's members are not modified
    imgs = np.random.default_rng(0).integers(0, 255, (5, 32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        probs, label = ens(torch.from_numpy(imgs))
    np.testing.assert_allclose(probs.numpy(), reference(members, [1, 2, 3], imgs), atol=1e-6)
    assert (label.numpy() == probs.numpy().argmax(1)).all()


def test_members_with_different_stems_keep_their_own():
    members, _ = hybrids(2)
    with torch.no_grad():
        frozen_stem(members[1])[0].weight.add_(0.01)
    assert EnsembleModel(members, [1, 1]).stem is None


def test_exported_graph_holds_one_stem(tmp_path):
    from semivit.export.graph import export_graph

    members, _ = hybrids(3)
    one = EnsembleModel(members[:1], [1]).eval()
    three = EnsembleModel(members, [1, 2, 3]).eval()
    convs = {}
    for name, model in (("one", one), ("three", three)):
        path = tmp_path / f"{name}.onnx"
        export_graph(model, path, 32, exporter="torchscript")
        convs[name] = sum(n.op_type == "Conv" for n in onnx.load(str(path)).graph.node)
    # one stem in both graphs; the 3-member graph adds only the members' 1x1 token projections
    assert convs["three"] == convs["one"] + 2
    imgs = np.random.default_rng(1).integers(0, 255, (17, 32, 32, 3), dtype=np.uint8)
    sess = ort.InferenceSession(str(tmp_path / "three.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(["probs"], {"images": imgs})[0]
    np.testing.assert_allclose(got, reference(members, [1, 2, 3], imgs), atol=1e-4)


def test_cached_features_give_the_same_predictions_as_pixels():
    members, cfg = hybrids(1)
    model = members[0]
    imgs = np.random.default_rng(2).integers(0, 255, (6, 32, 32, 3), dtype=np.uint8)
    feats = features(frozen_stem(model), imgs, torch.device("cpu"), tta=True)
    assert isinstance(feats, StemFeatures) and feats.orig.dtype == np.float32
    np.testing.assert_allclose(predict_arrays(model, feats, tta=True), predict_arrays(model, imgs, tta=True), atol=1e-5)


def test_augmented_views_and_dataset():
    members, cfg = hybrids(1)
    stem = frozen_stem(members[0])
    imgs = np.random.default_rng(3).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    from semivit.data import transforms

    views = augmented_views(stem, imgs, transforms.build("light", 32, seed=0), 3, torch.device("cpu"))
    assert views.shape[:2] == (4, 4)
    np.testing.assert_allclose(views[:, 0], features(stem, imgs, torch.device("cpu")).orig, atol=1e-6)
    assert not np.allclose(views[:, 1], views[:, 0])  # augmented views differ from the plain one
    ds = CachedViewsDataset(views, np.array([0, 1, 2, 0]), generator=torch.Generator().manual_seed(0))
    picked = {int(np.argmin([np.abs(ds[0][0].numpy() - views[0, v]).sum() for v in range(4)])) for _ in range(40)}
    assert len(picked) > 1  # different epochs see different views


def test_stem_cache_shows_its_progress_in_views_and_keeps_the_views(monkeypatch, capsys):
    """In a log file (plain lines, here one per batch): what is computed at once, then the count of
    stem passes ("views") as they go, then done; and the views are the ones the cache computed
    view by view before it had progress (each image's augmentation drawn in the same order)."""
    from semivit.data import transforms

    monkeypatch.delenv("SEMIVIT_QUIET", raising=False)
    monkeypatch.setenv("SEMIVIT_PROGRESS", "plain")
    monkeypatch.setenv("SEMIVIT_LOG_EVERY", "0")  # a line at every batch
    members, _ = hybrids(1)
    stem, cpu = frozen_stem(members[0]), torch.device("cpu")
    imgs = np.random.default_rng(4).integers(0, 255, (5, 32, 32, 3), dtype=np.uint8)
    views = augmented_views(stem, imgs, transforms.build("light", 32, seed=0), 2, cpu, batch_size=2,
                            desc="stem features (stage3 unlabeled images)")
    lines = capsys.readouterr().err.splitlines()
    status = " | 5 images x 3 views (plain + 2 augmented)"
    assert re.fullmatch(r"\d\d:\d\d:\d\d stem features \(stage3 unlabeled images\): 0/15 views \(0%\) "
                        r"elapsed 0:00:00" + re.escape(status), lines[0]), lines
    assert [int(re.search(r": (\d+)/15 views \(", ln).group(1)) for ln in lines] == [0, 2, 4, 5, 7, 9, 10, 12, 14, 15, 15]
    assert all(ln.endswith(status) for ln in lines), lines
    assert re.search(r": 15/15 views \(100%\) elapsed \S+ done" + re.escape(status) + "$", lines[-1]), lines
    t = transforms.build("light", 32, seed=0)
    before = [features(stem, imgs, cpu).orig] + [features(stem, np.stack([t(image=i)["image"] for i in imgs]), cpu).orig
                                                 for _ in range(2)]
    # same images and augmentations; only the batch split differs (float accumulation order: ~2e-5)
    np.testing.assert_allclose(views, np.stack(before, axis=1), rtol=1e-4, atol=1e-4)
    capsys.readouterr()
    features(stem, imgs[:4], cpu, tta=True, desc="stem features (unlabeled pool)")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].endswith("stem features (unlabeled pool): 0/8 views (0%) elapsed 0:00:00 | 4 images x 2 views (plain + mirror)")
    assert "8/8 views (100%)" in lines[-1] and "done" in lines[-1], lines


TUNED = ["model.img_size=32", "model.kwargs={embed_dim: 32, depth: 1, num_heads: 2, tune_stem_stages: 1}",
         "model.head_hidden=16"]


def test_tuned_stem_trains_its_last_stage_and_keeps_the_rest_frozen_cached_and_shared():
    """``tune_stem_stages: 1``: the stem's last stage starts from ImageNet's weights and trains,
    the stages before it stay frozen - cached features and one shared stem in the ensemble -
    and the ensemble's probabilities are still each member's on pixels."""
    from semivit.models.networks import TunedStem

    cfg = config.resolve(preset="quick", overrides=TUNED)
    torch.manual_seed(0)
    members = [build_model(cfg.model, 3) for _ in range(2)]
    plain, _ = hybrids(1)
    full, tuned = plain[0].backbone.patch_embed.backbone, members[0].backbone.patch_embed.backbone
    assert isinstance(tuned, TunedStem)
    # the same ImageNet weights, split: stages 0..3 frozen, stage 4 (the 112-channel one) trains
    for k, v in full.state_dict().items():
        i, rest = k.split(".", 1)
        mine = tuned[0].state_dict()[k] if int(i) < 2 + 4 else tuned[1].state_dict()[f"{int(i) - 6}.{rest}"]
        assert torch.equal(v, mine), k
    trainable = {n for n, p in members[0].named_parameters() if p.requires_grad}
    assert any(n.startswith("backbone.patch_embed.backbone.1.") for n in trainable)
    assert not any(n.startswith("backbone.patch_embed.backbone.0.") for n in trainable)
    assert frozen_stem(members[0]) is tuned[0]
    # one optimiser step moves the tail, not the frozen stages
    m = members[1].train()
    before = {k: v.clone() for k, v in m.backbone.patch_embed.backbone.state_dict().items()}
    x = Preprocess(channels_last_input=True)(torch.from_numpy(
        np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)))
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    torch.nn.functional.cross_entropy(m(x), torch.tensor([0, 1, 2, 0])).backward()
    opt.step()
    after = m.backbone.patch_embed.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("0."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("1.") and after[k].is_floating_point())
    members = [mm.eval() for mm in members]
    ens = EnsembleModel(members, [1, 2]).eval()
    assert ens.stem is not None  # the frozen stages, run once
    assert all(isinstance(mm.backbone.patch_embed.backbone[1], torch.nn.Sequential) for mm in ens.members)
    imgs = np.random.default_rng(1).integers(0, 255, (5, 32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        probs, _ = ens(torch.from_numpy(imgs))
    np.testing.assert_allclose(probs.numpy(), reference(members, [1, 2], imgs), atol=1e-5)
    feats = features(frozen_stem(members[1]), imgs, torch.device("cpu"), tta=True)
    np.testing.assert_allclose(predict_arrays(members[1], feats, tta=True), predict_arrays(members[1], imgs, tta=True),
                               atol=1e-5)
