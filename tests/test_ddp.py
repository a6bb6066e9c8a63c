"""`torchrun --nproc-per-node 2 ... ssl train`: one DistributedDataParallel run (gloo on the CPU).

The ranks are started through a small launcher that makes every write into RUN by a rank other
than 0 fail (open/os.open/rename patched), so a run that finishes proves rank 0 was the only
writer.  Each rank logs the epoch it stopped at on its own stderr ("[rank R/N] ...").
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

pytestmark = pytest.mark.slow

LAUNCHER = textwrap.dedent('''
    import builtins, io, os, sys

    run = os.path.abspath(os.environ["GUARD_RUN"])
    rank = int(os.environ["RANK"])

    def inside(p):
        try:
            return os.path.abspath(os.fsdecode(p)).startswith(run)
        except TypeError:
            return False  # a file descriptor

    if rank != 0:  # every write into RUN by this rank fails the run
        real_open, real_os_open, real_replace, real_rename = builtins.open, os.open, os.replace, os.rename

        def guarded_open(file, mode="r", *a, **k):
            if any(c in mode for c in "wax+") and inside(file):
                raise PermissionError(f"rank {rank} tried to write {file}")
            return real_open(file, mode, *a, **k)

        def guarded_os_open(path, flags, *a, **k):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND) and inside(path):
                raise PermissionError(f"rank {rank} tried to write {path}")
            return real_os_open(path, flags, *a, **k)

        def guarded(real):
            def move(src, dst, *a, **k):
                if inside(dst):
                    raise PermissionError(f"rank {rank} tried to move {src} to {dst}")
                return real(src, dst, *a, **k)
            return move

        builtins.open = io.open = guarded_open
        os.open = guarded_os_open
        os.replace, os.rename = guarded(real_replace), guarded(real_rename)

    if os.environ.get("DISAGREE") and rank == 1:  # a wrong launch: this rank resolves another config
        sys.argv += ["--set", "train.lr=0.5"]
    from semivit.cli import main

    sys.argv = ["ssl"] + sys.argv[1:]
    main()
''')

TRAIN_ARGS = ["--preset", "tiny", "--stages", "supervised", "--set", "train.epochs=6", "--set", "train.patience=1",
              "--set", "train.batch_size=4"]


def torchrun(tmp_path: Path, data: Path, run: Path, disagree: bool = False) -> subprocess.CompletedProcess:
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    env = dict(os.environ, OMP_NUM_THREADS="1", SEMIVIT_QUIET="1", GUARD_RUN=str(run),
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    if disagree:
        env["DISAGREE"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(launcher), "train", str(data), "--out", str(run), *TRAIN_ARGS]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)


STOP = re.compile(r"\[rank (\d)/2\] (stage1) fold (\d)/2: stopped after epoch (\d+) \(best epoch (\d+)")


def test_torchrun_two_ranks_is_one_ddp_run_with_one_writer(tiny_data_shared, tmp_path):
    run = tmp_path / "RUN"
    res = torchrun(tmp_path, tiny_data_shared, run)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]

    # one writer: exactly one set of checkpoints and one report, no rank-local leftovers
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*.pt")) == \
        ["stage1/fold0/best.pt", "stage1/fold1/best.pt"]
    assert (run / "report.md").is_file() and (run / "ensemble.json").is_file()
    assert not (run / ".dist").exists()
    assert yaml.safe_load((run / "config.yaml").read_text())["distributed"] == {"world_size": 2, "backend": "gloo"}

    # the same folds as a single-process run of the same config
    from semivit import config as cfgmod
    from semivit.trainer.run import open_run

    cfg = cfgmod.resolve(preset="tiny", overrides=[a for a in TRAIN_ARGS[4:] if a != "--set"])
    single = open_run(tmp_path / "SINGLE", cfg, tiny_data_shared)
    _ = single.folds
    assert json.loads((run / "folds.json").read_text()) == json.loads((tmp_path / "SINGLE" / "folds.json").read_text())

    # both ranks stopped at the same epoch, the one rank 0 recorded; the ranks split the batches
    stops: dict = {}
    for rank, stage, fold, epoch, best in STOP.findall(out):
        stops.setdefault(int(fold), {})[int(rank)] = (int(epoch), int(best))
    assert sorted(stops) == [1, 2] and all(sorted(v) == [0, 1] for v in stops.values()), out[-3000:]
    folds = np.asarray([item["fold"] for item in json.loads((run / "folds.json").read_text())["items"]])
    for k in (0, 1):
        done = json.loads((run / "stage1" / f"fold{k}" / "done.json").read_text())
        assert stops[k + 1][0] == stops[k + 1][1] == (done["epochs_run"], done["best_epoch"])
        train_n = int((folds != k).sum())
        # 4 per batch: each rank gets half of the fold's training images (drop_last), so half the steps
        assert done["steps"] == done["epochs_run"] * ((train_n // 2) // 4), (done, train_n)
        assert len((run / "stage1" / f"fold{k}" / "metrics.csv").read_text().strip().splitlines()) == \
            1 + done["epochs_run"]
        # validation probabilities of every validation image (the ranks' shares all-reduced)
        probs = np.load(run / "stage1" / f"fold{k}" / "val_probs.npy")
        assert probs.shape == (int((folds == k).sum()), 3) and np.allclose(probs.sum(1), 1, atol=1e-4)


def test_torchrun_ranks_that_disagree_on_the_config_fail_with_one_line(tiny_data_shared, tmp_path):
    run = tmp_path / "RUN"
    res = torchrun(tmp_path, tiny_data_shared, run, disagree=True)
    assert res.returncode != 0
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("error: ")]
    assert lines and all("ranks disagree on the config" in ln for ln in lines), res.stderr[-3000:]
    assert not (run / "config.yaml").exists()  # nothing was written


def test_distributed_balanced_sampler_splits_one_balanced_draw(monkeypatch):
    from semivit.trainer import distributed

    weights = np.r_[np.full(90, 1 / 90), np.full(10, 1 / 10)]  # class 1 is rare
    shares = []
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "_STATE", distributed.Dist(world_size=2, rank=rank, backend="gloo"))
        s = distributed.DistributedWeightedSampler(weights, 100, seed=3)
        s.set_epoch(1)
        shares.append(list(s))
        assert len(shares[-1]) == len(s) == 50
    draw = torch_draw(weights, 100, seed=3 + 1)
    assert shares[0] == draw[0::2] and shares[1] == draw[1::2]  # disjoint halves of one draw
    rare = sum(i >= 90 for i in shares[0] + shares[1])
    assert 30 <= rare <= 70  # balanced: the rare class is about half of the epoch
    monkeypatch.setattr(distributed, "_STATE", distributed.Dist(world_size=2, rank=0, backend="gloo"))
    s.set_epoch(2)
    assert list(s) != shares[0]  # a new epoch reshuffles


def torch_draw(weights, n, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.multinomial(torch.as_tensor(weights, dtype=torch.double), n, replacement=True, generator=g).tolist()
