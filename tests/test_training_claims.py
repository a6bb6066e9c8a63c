"""README's training claims, each observed: undecodable files land in RUN/skipped.csv, the same
seed gives bit-identical results, and train.sampler / train.freeze_epochs / mixup / CutMix
really change what the loop does."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from semivit import config
from semivit.cli import app
from semivit.data.dataset import ArrayDataset
from semivit.models.networks import build_model
from semivit.trainer import engine
from semivit.trainer.losses import FocalLoss

from conftest import make_data

BROKEN = {  # file -> what is wrong with it
    "train/red/broken.png": b"\x89PNG\r\n\x1a\n this is not really a PNG",
    "train/green/empty.jpg": b"",
    "unlabeled/batch1/text_as_image.png": b"field notes, not pixels",
}


def _train(data: Path, out: Path, *extra: str):
    res = CliRunner().invoke(app, ["train", str(data), "--preset", "tiny", "--stages", "supervised",
                                   "--out", str(out), *extra])
    assert res.exit_code == 0, (res.output, res.exception)
    return res


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The same data (with three undecodable files) trained twice with the same seed."""
    root = tmp_path_factory.mktemp("claims")
    data = make_data(root / "DATA", n_train=8, n_unlabeled=6, n_test=0)
    for rel, content in BROKEN.items():
        (data / rel).write_bytes(content)
    a, b = root / "A", root / "B"
    _train(data, a)
    _train(data, b)
    return data, a, b


def _skipped(run: Path) -> list[dict]:
    with open(run / "skipped.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_undecodable_files_are_recorded_in_skipped_csv_once(two_runs):
    from semivit.trainer.run import open_run

    data, a, _ = two_runs
    labeled_broken = sorted(r for r in BROKEN if r.startswith("train/"))
    rows = _skipped(a)  # stage 1 decoded the labeled images only
    assert sorted(r["image"] for r in rows) == labeled_broken  # exactly these, by their DATA path
    assert all(r["reason"].strip() for r in rows)
    listed = json.dumps(json.loads((a / "folds.json").read_text()))
    assert not any(Path(rel).name in listed for rel in BROKEN)  # skipped, not trained on
    _train(data, a)  # a resumed run decodes again: still one row per file
    assert sorted(r["image"] for r in _skipped(a)) == labeled_broken
    paths, images = open_run(a, config.resolve(preset="tiny"), data).unlabeled  # the stages that use it
    assert len(paths) == len(images) == 6  # the 6 good unlabeled images; the broken one is out
    assert sorted(r["image"] for r in _skipped(a)) == sorted(BROKEN)


def test_same_seed_gives_bit_identical_training(two_runs):
    _, a, b = two_runs
    assert (a / "folds.json").read_bytes() == (b / "folds.json").read_bytes()
    for k in (0, 1):
        fa, fb = a / "stage1" / f"fold{k}", b / "stage1" / f"fold{k}"
        ra, rb = (list(csv.DictReader(open(f / "metrics.csv"))) for f in (fa, fb))
        for row in ra + rb:
            row.pop("seconds")
        assert ra == rb, k  # losses, F1, accuracy and LR of every epoch, to the printed digit
        assert np.load(fa / "val_probs.npy").tobytes() == np.load(fb / "val_probs.npy").tobytes()
        sa, sb = (torch.load(f / "best.pt", weights_only=False)["state_dict"] for f in (fa, fb))
        assert all(torch.equal(sa[n], sb[n]) for n in sa), k


# ----------------------------------------------------------------------------- the loop's options
def _cfg(**over):
    return config.resolve(preset="tiny", overrides=[f"{k}={v}" for k, v in over.items()])


def test_balanced_sampler_draws_classes_equally_often():
    labels = np.array([0] * 90 + [1] * 10)
    ds = ArrayDataset(np.zeros((100, 8, 8, 3), np.uint8), labels)

    def drawn(sampler: str) -> np.ndarray:
        loader = engine._labeled_loader(ds, _cfg(**{"train.sampler": sampler}).train, seed=0)
        ys = np.concatenate([y.numpy() for _ in range(10) for _, y, _, _ in loader])
        return np.bincount(ys, minlength=2) / len(ys)

    random, balanced = drawn("random"), drawn("balanced")
    assert random[1] == pytest.approx(0.1, abs=0.02)  # the data's share
    assert balanced[1] == pytest.approx(0.5, abs=0.06)  # each class equally often


def _fit(monkeypatch, tmp_path, criterion=None, **over):
    """fit() on random tiny images; returns (result, backbone/head states at each epoch's end)."""
    snaps = []

    def snapshot_predict(model, images, **kw):  # called once per epoch, after its last step
        snaps.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return np.full((len(images), 3), 1 / 3, np.float32)

    monkeypatch.setattr(engine, "predict_arrays", snapshot_predict)
    cfg = _cfg(**over)
    torch.manual_seed(0)
    model = build_model(cfg.model, 3, pretrained=False)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    rng = np.random.default_rng(0)
    ds = ArrayDataset(rng.integers(0, 255, (32, 32, 32, 3), dtype=np.uint8), rng.integers(0, 3, 32))
    res = engine.fit(model, ds, np.zeros((6, 32, 32, 3), np.uint8), np.array([0, 1, 2] * 2), cfg,
                     criterion or FocalLoss(), torch.device("cpu"), out_dir=tmp_path)
    return res, start, snaps


def _changed(a: dict, b: dict, prefix: str) -> bool:
    return any(not torch.equal(a[n], b[n]) for n in a if n.startswith(prefix))


def test_freeze_epochs_trains_only_the_head_first(monkeypatch, tmp_path):
    _, start, snaps = _fit(monkeypatch, tmp_path, **{"train.epochs": 2, "train.freeze_epochs": 1})
    after1, after2 = snaps
    assert not _changed(start, after1, "backbone."), "the backbone moved during the frozen epoch"
    assert _changed(start, after1, "head.")
    assert _changed(after1, after2, "backbone.")  # unfrozen in epoch 2
    # without freezing the backbone moves in the first epoch already
    _, start, snaps = _fit(monkeypatch, tmp_path, **{"train.epochs": 1})
    assert _changed(start, snaps[0], "backbone.")


class RecordingLoss(FocalLoss):
    def __init__(self):
        super().__init__(gamma=0.0)
        self.targets = []

    def forward(self, logits, target, sample_weight=None):
        if logits.requires_grad:  # training steps only, not the validation loss
            self.targets.append(target.detach().clone())
        return super().forward(logits, target, sample_weight)


@pytest.mark.parametrize("mix", [{"train.mixup_alpha": 0.8}, {"train.cutmix_alpha": 1.0}])
def test_mixup_and_cutmix_give_the_loss_soft_targets(monkeypatch, tmp_path, mix):
    crit = RecordingLoss()
    _fit(monkeypatch, tmp_path, crit, **{"train.epochs": 1, **mix})
    assert crit.targets and all(t.ndim == 2 and t.shape[1] == 3 for t in crit.targets)
    t = torch.cat(crit.targets)
    assert torch.allclose(t.sum(1), torch.ones(len(t)), atol=1e-5)
    assert ((t > 0.01) & (t < 0.99)).any(), "no mixed (soft) target: nothing was mixed"
    plain = RecordingLoss()
    _fit(monkeypatch, tmp_path, plain, **{"train.epochs": 1})
    assert plain.targets and all(t.ndim == 1 for t in plain.targets)  # hard labels without mixing
