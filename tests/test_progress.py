"""Progress without a terminal: whole, readable lines instead of a squeezed rich bar."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from semivit.progress import PlainProgress


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_plain_progress_prints_epoch_lines_timed_lines_and_a_final_line():
    clock, lines = FakeClock(), []
    with PlainProgress(every_s=60, clock=clock, write=lines.append) as bar:
        task = bar.add_task("stage1 fold 1/2", total=100, status="")
        for step in range(50):  # 50 steps of 1 s: under a minute, no line yet
            clock.t += 1
            bar.update(task, advance=1, status=f"loss {1 / (step + 1):.4f}")
        assert lines == []
        bar.update(task, status="epoch 1: F1 0.500 (best 0.500 @ 1)")  # epoch-level: a line now
        assert len(lines) == 1
        assert re.search(r"stage1 fold 1/2: 50/100 \(50%\) elapsed 0:00:50 eta 0:00:50 \| epoch 1: F1 0\.500",
                         lines[0]), lines[0]
        for _ in range(50):  # 50 s more, then 20 s per step: the 60 s interval gives a line
            clock.t += 1
            bar.update(task, advance=0)
        clock.t += 20
        bar.update(task, advance=0)
        assert len(lines) == 2 and "| epoch 1: F1" in lines[1]
        bar.update(task, advance=50, status="loss 0.1")
        bar.update(task, status="epoch 2: F1 0.900 (best 0.900 @ 2)")
    assert len(lines) == 4, lines
    assert "100/100 (100%)" in lines[2] and "epoch 2: F1 0.900" in lines[2]
    assert lines[3].endswith("done | epoch 2: F1 0.900 (best 0.900 @ 2)"), lines[3]
    assert all("…" not in line for line in lines)


def test_disabled_plain_progress_prints_nothing():
    lines = []
    with PlainProgress(write=lines.append, disable=True) as bar:
        t = bar.add_task("x", total=2)
        bar.update(t, status="epoch 1: F1 1.0")
        bar.advance(t, 2)
    assert lines == []


def test_train_with_output_redirected_to_a_file_writes_one_line_per_epoch(tiny_data, tmp_path):
    """``ssl train ... > log.txt 2>&1``: no TTY, so plain lines - one per epoch and fold, whole
    (no rich cell truncated to '…', no bar glyphs), and info lines not hard-wrapped at 80 columns."""
    env = {k: v for k, v in os.environ.items() if k not in ("SEMIVIT_QUIET", "SEMIVIT_PROGRESS", "COLUMNS")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "semivit.cli", "train", str(tiny_data), "--preset", "tiny",
                               "--stages", "supervised", "--out", str(tmp_path / "RUN")],
                              stdout=f, stderr=subprocess.STDOUT, env=env, timeout=600)
    text = log.read_text()
    assert proc.returncode == 0, text
    lines = text.splitlines()
    for fold in (1, 2):
        for epoch in (1, 2):
            pat = re.compile(rf"^\d\d:\d\d:\d\d stage1 fold {fold}/2: \d+/\d+ \(\d+%\) elapsed \S+( eta \S+)? \| "
                             rf"epoch {epoch}: F1 \d\.\d{{3}} \(best \d\.\d{{3}} @ \d\)$")
            assert sum(bool(pat.match(line)) for line in lines) == 1, (fold, epoch, text)
        assert any(re.match(rf"^\d\d:\d\d:\d\d stage1 fold {fold}/2: (\d+)/\1 \(100%\) .*done \|", line)
                   for line in lines), text
    assert "…" not in text and "━" not in text, text
    run_line = [line for line in lines if line.startswith("run ")]
    assert len(run_line) == 1 and "preset tiny" in run_line[0], text  # one line, however long


def test_train_log_shows_the_stem_feature_cache_progress(tiny_data, tmp_path):
    """The quick preset's frozen-stem cache in small (hybrid model, ``train.cache_views=2``): each
    computation of stem features - the labeled images' views before stage 1, the unlabeled pool
    (plain + mirror) before stage 2's predictions, stage 3's unlabeled images' views - writes a
    line saying what it computes at once and a done line with the count of views."""
    env = {k: v for k, v in os.environ.items() if k not in ("SEMIVIT_QUIET", "SEMIVIT_PROGRESS", "COLUMNS")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "semivit.cli", "train", str(tiny_data), "--preset", "tiny",
                               "--set", "model.name=vit_hybrid_lite0", "--set", "model.kwargs={embed_dim: 32, depth: 1, num_heads: 2}",
                               "--set", "train.cache_views=2", "--set", "pseudo.cluster=false",
                               "--out", str(tmp_path / "RUN")],
                              stdout=f, stderr=subprocess.STDOUT, env=env, timeout=600)
    text = log.read_text()
    assert proc.returncode == 0, text
    lines = text.splitlines()
    # 36 labeled images x (plain + 2 augmented), 24 unlabeled x (plain + mirror), the 24 again x 3 for stage 3
    for what, n, views, how in (("labeled images", 36, 3, "plain + 2 augmented"), ("unlabeled pool", 24, 2, "plain + mirror"),
                                ("stage3 unlabeled images", 24, 3, "plain + 2 augmented")):
        status = re.escape(f" | {n} images x {views} views ({how})")
        head = rf"^\d\d:\d\d:\d\d stem features \({what}\): 0/{n * views} views \(0%\) elapsed \S+{status}$"
        done = rf"^\d\d:\d\d:\d\d stem features \({what}\): {n * views}/{n * views} views \(100%\) elapsed \S+ done{status}$"
        assert sum(bool(re.match(head, ln)) for ln in lines) == 1, (what, text)
        assert sum(bool(re.match(done, ln)) for ln in lines) == 1, (what, text)
    first = next(i for i, ln in enumerate(lines) if "stem features (labeled images)" in ln)
    assert first < next(i for i, ln in enumerate(lines) if " stage1 fold 1/2: " in ln)  # before stage 1 trains
