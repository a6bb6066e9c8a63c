"""Fold workers (semivit.trainer.fold_workers): a stage's folds trained side by side, one forked
process with one thread each - the same folds as one at a time, errors and deaths reported."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import invoke, one_line_error
from semivit import config
from semivit.errors import UserError
from semivit.trainer import fold_workers as fw
from semivit.trainer import folds

HYBRID = ["model.name=vit_hybrid_lite0", "model.pretrained=true", "model.kwargs={embed_dim: 32, depth: 1, num_heads: 2}",
          "train.cache_views=2", "pseudo.cluster=false", "pseudo.soft=true", "cv.folds=3"]


def _cfg(*sets):
    return config.resolve(preset="tiny", overrides=list(sets))


def _record_calls(monkeypatch, log: Path, hook=None):
    """folds.train_fold, wrapped: each call appends (fold, pid, torch threads) to ``log`` (the
    children are forked, so the wrapper is theirs too); ``hook(k)`` runs first."""
    real = folds.train_fold

    def spy(run, stage, k, **kw):
        with open(log, "a") as f:
            f.write(json.dumps({"stage": stage, "k": k, "pid": os.getpid(), "threads": torch.get_num_threads()}) + "\n")
        if hook is not None:
            hook(k)
        return real(run, stage, k, **kw)

    monkeypatch.setattr(folds, "train_fold", spy)


def _calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_fold_workers_train_the_one_thread_folds_exactly(tiny_data_shared, tmp_path, monkeypatch):
    """Stage 1 and stage 3 (soft targets on the hybrid's stem cache: the stem views of the pool
    are computed in the parent before the forks) with 2 workers: every fold trained in a child
    process of its own with one thread, and every fold's validation probabilities and weights
    equal to the one-at-a-time run's."""
    from semivit.models.checkpoint import load_checkpoint
    from semivit.trainer.pipeline import run_training

    from semivit.trainer.run import Run

    log, views_log = tmp_path / "calls.jsonl", tmp_path / "views.txt"
    _record_calls(monkeypatch, log)
    real_views = Run.augmented_views

    def views_spy(self, images, seed, what):
        with open(views_log, "a") as f:
            f.write(f"{os.getpid()} {what}\n")
        return real_views(self, images, seed, what)

    monkeypatch.setattr(Run, "augmented_views", views_spy)
    assert torch.get_num_threads() == 1  # conftest: the one-at-a-time run is the one-thread run
    for w in (1, 2):
        run_training(tiny_data_shared, tmp_path / f"w{w}", _cfg(*HYBRID, f"train.fold_workers={w}"))
    # the stem views (labeled images once per run, the pool once per stage 3) are computed once,
    # by the parent: never again in each worker
    views = views_log.read_text().splitlines()
    assert views == [f"{os.getpid()} labeled images", f"{os.getpid()} stage3 unlabeled images"] * 2, views
    calls = _calls(log)
    one, two = calls[:6], calls[6:]
    assert [c["pid"] for c in one] == [os.getpid()] * 6
    assert len(two) == 6 and os.getpid() not in {c["pid"] for c in two}
    assert len({c["pid"] for c in two}) == 6  # a process per fold
    assert {c["threads"] for c in two} == {1}
    for stage in ("stage1", "stage3"):
        for k in range(3):
            a, b = tmp_path / "w1" / stage / f"fold{k}", tmp_path / "w2" / stage / f"fold{k}"
            assert np.array_equal(np.load(a / "val_probs.npy"), np.load(b / "val_probs.npy"))
            ma, _ = load_checkpoint(a / "best.pt")
            mb, _ = load_checkpoint(b / "best.pt")
            for (n, x), (_, y) in zip(ma.state_dict().items(), mb.state_dict().items()):
                assert torch.equal(x, y), (stage, k, n)
            assert json.loads((a / "done.json").read_text())["fold_worker"] is False
            assert json.loads((b / "done.json").read_text())["fold_worker"] is True
    assert (tmp_path / "w2" / "stage1" / "oof.csv").is_file()
    assert json.loads((tmp_path / "w2" / "ensemble.json").read_text())["members"]


def _stage_run(tmp_path, data, workers: int = 2, folds_n: int = 3):
    from semivit.trainer.run import open_run

    return open_run(tmp_path / "RUN", _cfg(f"cv.folds={folds_n}", f"train.fold_workers={workers}"), data)


def test_resume_trains_only_the_missing_folds(tiny_data_shared, tmp_path, monkeypatch):
    run = _stage_run(tmp_path, tiny_data_shared)
    folds.run_stage(run, "stage1")
    (run.dir / "stage1" / "fold1" / "done.json").unlink()
    (run.dir / "stage1" / "fold2" / "done.json").unlink()
    log = tmp_path / "calls.jsonl"
    _record_calls(monkeypatch, log)
    out = folds.run_stage(run, "stage1")
    assert sorted(c["k"] for c in _calls(log)) == [1, 2]
    assert [s["fold"] for s in out] == [0, 1, 2]


def _fails_at(monkeypatch, tmp_path, data, fold: int, fail):
    """A 3-fold stage-1 run whose fold ``fold`` calls ``fail()`` in its worker before training."""
    _record_calls(monkeypatch, tmp_path / "calls.jsonl", lambda k: fail() if k == fold else None)
    return _stage_run(tmp_path, data)


def _raise(e: BaseException):
    raise e


def test_a_user_error_in_a_fold_is_the_stage_error(tiny_data_shared, tmp_path, monkeypatch):
    run = _fails_at(monkeypatch, tmp_path, tiny_data_shared, 1,
                    lambda: _raise(UserError("fold 1 cannot train: a scripted user error")))
    with pytest.raises(UserError, match="a scripted user error"):
        folds.run_stage(run, "stage1")
    assert not (run.dir / "stage1" / "fold1" / "done.json").exists()


def test_a_crash_in_a_fold_names_the_fold_and_keeps_its_traceback(tiny_data_shared, tmp_path, monkeypatch):
    run = _fails_at(monkeypatch, tmp_path, tiny_data_shared, 0, lambda: _raise(ZeroDivisionError("scripted crash")))
    with pytest.raises(fw.FoldWorkerError, match=r"stage1 fold 1 failed: scripted crash") as e:
        folds.run_stage(run, "stage1")
    tb = (run.dir / "stage1" / "fold0" / "worker_error.txt").read_text()
    assert "ZeroDivisionError" in tb and "_raise" in tb and "ZeroDivisionError" in e.value.details


def test_a_killed_worker_is_reported_with_its_signal(tiny_data_shared, tmp_path, monkeypatch):
    run = _fails_at(monkeypatch, tmp_path, tiny_data_shared, 2, lambda: os.kill(os.getpid(), signal.SIGKILL))
    with pytest.raises(fw.FoldWorkerError, match=r"stage1 fold 3: its worker process died \(killed by SIGKILL"):
        folds.run_stage(run, "stage1")
    assert not (run.dir / "stage1" / "fold2" / "done.json").exists()


def test_an_error_in_the_parent_stops_the_running_folds(tiny_data_shared, tmp_path, monkeypatch):
    """The refresh's stop check runs in the parent before each fold starts: when it raises, a fold
    still training beside it is stopped, not left running."""
    log = tmp_path / "calls.jsonl"
    _record_calls(monkeypatch, log, lambda k: time.sleep(60))
    run = _stage_run(tmp_path, tiny_data_shared)

    def before_fold(k):
        if k == 1:
            deadline = time.time() + 20
            while not _calls(log) and time.time() < deadline:  # fold 0's child has started
                time.sleep(0.05)
            raise UserError("stop requested")

    t0 = time.time()
    with pytest.raises(UserError, match="stop requested"):
        folds.run_stage(run, "stage1", folds.FoldPlan(before_fold=before_fold))
    assert time.time() - t0 < 30
    child = _calls(log)[0]["pid"]
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)


def test_a_killed_parent_takes_its_fold_workers_with_it(tiny_data_shared, tmp_path):
    """SIGKILL the process that runs the stage (no cleanup: what the OOM killer does): its fold
    workers die too (PR_SET_PDEATHSIG) instead of training on into the run a rerun resumes."""
    pids = tmp_path / "pids.txt"
    script = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import conftest  # one thread, quiet
        from semivit import config
        from semivit.trainer import folds
        from semivit.trainer.run import open_run

        def slow(run, stage, k, **kw):
            with open({str(pids)!r}, "a") as f:
                f.write(f"{{os.getpid()}}\\n")
            time.sleep(120)

        folds.train_fold = slow
        cfg = config.resolve(preset="tiny", overrides=["train.fold_workers=2"])
        folds.run_stage(open_run({str(tmp_path / "RUN")!r}, cfg, {str(tiny_data_shared)!r}), "stage1")
    """)
    p = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "SEMIVIT_QUIET": "1"})
    deadline = time.time() + 60
    while (not pids.exists() or len(pids.read_text().split()) < 2) and time.time() < deadline:
        time.sleep(0.1)
    children = [int(x) for x in pids.read_text().split()]
    assert len(children) == 2
    p.kill()
    p.wait()
    deadline = time.time() + 10
    alive = children
    while alive and time.time() < deadline:
        alive = [c for c in children if _alive(c)]
        time.sleep(0.1)
    assert not alive


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by init) is not running
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("asked, device, todo, env, dist, want", [
    ("auto", "cpu", 5, {"OMP_NUM_THREADS": "2"}, False, 2),
    ("auto", "cpu", 5, {"OMP_NUM_THREADS": "4"}, False, 4),
    ("auto", "cpu", 3, {"OMP_NUM_THREADS": "8"}, False, 3),  # no more workers than folds left
    ("auto", "cpu", 5, {"OMP_NUM_THREADS": "1"}, False, 1),  # the user gave the process one thread
    ("auto", "cpu", 5, {"OMP_NUM_THREADS": "2", "SEMIVIT_TRAIN_THREADS": "2"}, False, 1),  # threads fixed
    ("auto", "cpu", 1, {"OMP_NUM_THREADS": "2"}, False, 1),  # one fold left
    ("auto", "cuda", 5, {"OMP_NUM_THREADS": "2"}, False, 1),  # a GPU trains one fold at a time
    ("auto", "cpu", 5, {"OMP_NUM_THREADS": "2"}, True, 1),  # torchrun: ranks share each fold
    (3, "cpu", 5, {"OMP_NUM_THREADS": "1"}, False, 3),  # asked for: as many
    (3, "cpu", 2, {}, False, 2),
    (1, "cpu", 5, {"OMP_NUM_THREADS": "2"}, False, 1),
])
def test_worker_count(monkeypatch, asked, device, todo, env, dist, want):
    from semivit.trainer import distributed

    monkeypatch.setattr(distributed, "current", lambda: SimpleNamespace(enabled=dist))
    cfg = SimpleNamespace(train=SimpleNamespace(fold_workers=asked))
    assert fw.worker_count(cfg, torch.device(device), todo, environ=env) == want


def test_bad_fold_workers_is_one_line_error(tiny_data_shared, tmp_path):
    res = invoke("train", tiny_data_shared, "--preset", "tiny", "--out", tmp_path / "RUN", "--set", "train.fold_workers=0")
    assert "train.fold_workers" in one_line_error(res)


def test_resume_with_another_worker_count_is_the_same_run(tiny_data_shared, tmp_path):
    from semivit.trainer.run import open_run

    open_run(tmp_path / "RUN", _cfg("train.fold_workers=1"), tiny_data_shared)
    run = open_run(tmp_path / "RUN", _cfg("train.fold_workers=2"), tiny_data_shared)  # no "different config" error
    assert run.cfg.train.fold_workers == 2
    with pytest.raises(UserError, match="different config"):
        open_run(tmp_path / "RUN", _cfg("train.fold_workers=2", "train.lr=0.5"), tiny_data_shared)


def test_dataloader_workers_inside_fold_workers(tiny_data_shared, tmp_path):
    """train.num_workers > 0: a fold worker starts its DataLoader's worker processes (a daemonic
    child could not)."""
    from semivit.trainer.run import open_run

    run = open_run(tmp_path / "RUN", _cfg("train.fold_workers=2", "train.num_workers=1"), tiny_data_shared)
    out = folds.run_stage(run, "stage1")
    assert [s["fold_worker"] for s in out] == [True, True]


def test_fold_workers_is_a_run_wide_key(tiny_data_shared, tmp_path):
    for key in ("pseudo.train", "ssl.ema.train"):
        with pytest.raises(UserError, match="fold_workers is set for the whole run"):
            _cfg(f"{key}={{fold_workers: 2}}")


def test_the_stem_is_built_without_touching_the_global_random_generator(tiny_data_shared, tmp_path):
    """A fold's initial weights depend on its seed alone: building the frozen stem (done by the
    parent before fold workers fork, or by the first fold of a resumed run) draws nothing from
    torch's global generator."""
    from semivit.trainer.run import open_run
    from semivit.utils import seed_everything

    run = open_run(tmp_path / "RUN", _cfg(*HYBRID), tiny_data_shared)
    seed_everything(7)
    want = torch.rand(4)
    seed_everything(7)
    assert run.stem is not None
    assert torch.equal(torch.rand(4), want)


def test_ema_teacher_folds_are_the_same_with_fold_workers(tiny_data_shared, tmp_path):
    """ssl.method=ema-teacher (stage 3 on pixels, a teacher and an unlabeled loader per fold): the
    folds trained by 2 workers equal the one-at-a-time folds - which needs the EMA-Teacher's weak
    and strong augmentations seeded (unseeded, albumentations drew from the OS: no two runs agreed)."""
    from semivit.trainer.pipeline import run_training

    for w in (1, 2):
        run_training(tiny_data_shared, tmp_path / f"w{w}", _cfg("ssl.method=ema-teacher", f"train.fold_workers={w}"))
    for k in range(2):
        a, b = (np.load(tmp_path / f"w{w}" / "stage3" / f"fold{k}" / "val_probs.npy") for w in (1, 2))
        assert np.array_equal(a, b), k
        assert json.loads((tmp_path / "w2" / "stage3" / f"fold{k}" / "done.json").read_text())["fold_worker"]
