"""One optimiser step (GradScaler, clipping, scheduler) and one history writer, shared by the
supervised loop and MAE pre-training."""

from __future__ import annotations

import csv
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from semivit import config
from semivit.trainer import optim
from semivit.trainer.optim import OptimizerStep
from semivit.utils import atomic_write_csv


def _param_with_grad(g):
    p = nn.Parameter(torch.zeros(len(g)))
    return p, (p * torch.tensor(g)).sum()  # d loss / d p = g


def test_a_step_clips_the_gradient_norm_steps_and_schedules():
    p, loss = _param_with_grad([30.0, 40.0])  # norm 50
    opt = torch.optim.SGD([p], lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    OptimizerStep(opt, torch.device("cpu"), "fp32", grad_clip=5.0, scheduler=sched)(loss, nn.ParameterList([p]))
    assert torch.allclose(p.detach(), torch.tensor([-3.0, -4.0]))  # clipped to norm 5, lr 1
    assert opt.param_groups[0]["lr"] == 0.5  # the scheduler stepped
    q, loss = _param_with_grad([30.0, 40.0])
    OptimizerStep(torch.optim.SGD([q], lr=1.0), "cpu", "fp32")(loss, nn.ParameterList([q]))
    assert torch.allclose(q.detach(), torch.tensor([-30.0, -40.0]))  # no clipping asked


@pytest.mark.parametrize("device, precision, scaled", [
    ("cuda", "auto", True), ("cuda", "amp", True), ("cuda", "bf16", False), ("cuda", "fp32", False),
    ("cpu", "auto", False), ("cpu", "amp", False),
])
def test_the_grad_scaler_is_on_exactly_where_autocast_runs_fp16(device, precision, scaled):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GradScaler warns when this machine has no CUDA
        step = OptimizerStep(opt, torch.device(device), precision)
    assert (step.scaler is not None) == scaled


def test_the_supervised_loop_and_mae_both_step_through_it(tmp_path, monkeypatch):
    calls = []
    original = OptimizerStep.__call__

    def spy(self, loss, model):
        calls.append(type(model).__name__)
        return original(self, loss, model)

    monkeypatch.setattr(optim.OptimizerStep, "__call__", spy)
    cfg = config.resolve(preset="tiny", overrides=["pretrain.epochs=1", "pretrain.batch_size=4",
                                                  "train.epochs=1", "train.batch_size=4"])
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8)

    from semivit.trainer.mae import run_mae

    run = SimpleNamespace(cfg=cfg, images=images, unlabeled=([], images[:0]), device=torch.device("cpu"),
                          stage_dir=lambda name: (tmp_path / name).mkdir(exist_ok=True) or tmp_path / name)
    run_mae(run)
    assert calls == ["MAE", "MAE"]  # 8 images / batch 4 = 2 steps
    rows = list(csv.DictReader(open(tmp_path / "pretrain" / "loss.csv")))
    assert [r["epoch"] for r in rows] == ["1"]

    from semivit.data.dataset import ArrayDataset
    from semivit.models.networks import build_model
    from semivit.trainer.engine import fit
    from semivit.trainer.losses import FocalLoss

    calls.clear()
    model = build_model(cfg.model, 2)
    ds = ArrayDataset(images, np.array([0, 1] * 4), np.ones(8, np.float32))
    fit(model, ds, images[:4], np.array([0, 1, 0, 1]), cfg, FocalLoss(), torch.device("cpu"), out_dir=tmp_path)
    assert calls == ["Classifier", "Classifier"]  # 8 images / batch 4 = 2 steps
    assert list(csv.DictReader(open(tmp_path / "metrics.csv")))[0]["epoch"] == "1"


def test_one_history_writer_keeps_every_key_any_row_has(tmp_path):
    path = tmp_path / "h.csv"
    atomic_write_csv(path, [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.4, "u_mask_rate": 0.3}])
    rows = list(csv.DictReader(open(path)))
    assert list(rows[0]) == ["epoch", "loss", "u_mask_rate"]
    assert rows[0]["u_mask_rate"] == "" and rows[1]["u_mask_rate"] == "0.3"
    atomic_write_csv(tmp_path / "none.csv", [])
    assert not (tmp_path / "none.csv").exists()
