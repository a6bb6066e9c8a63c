"""benchmarks/gpu_speed.py's own code, on the CPU (the GPU rows need a lent GPU): the partial last
batch is padded to the batch size (a CUDA graph has one shape) and cut back, the images keep
their classes, `--device cpu` runs the whole script on the tiny run with a report that says what
was measured, and a CUDA-only variant on the CPU is a recorded error, not a crash."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import gpu_speed as gs  # noqa: E402


def test_predict_all_pads_the_last_batch_to_one_shape_and_cuts_it_back():
    seen = []

    def fn(x):
        seen.append(len(x))
        return x[:, :1, 0, 0].astype(np.float32)  # one "probability" per image: its first pixel

    x = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1).repeat(3, axis=3)
    out = gs.predict_all(fn, x, 4)
    assert seen == [4, 4, 4] and out[:, 0].tolist() == list(range(10))


def test_quality_agreement_and_largest_difference():
    ref = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    probs = np.array([[0.8, 0.2], [0.3, 0.7], [0.4, 0.6]])
    q = gs.quality(probs, ref, None)
    assert q["agreement_vs_fp32"] == round(2 / 3, 4) and abs(q["max_abs_prob_diff_vs_fp32"] - 0.2) < 1e-9


def test_cpu_smoke_run_writes_a_report(tiny_run, tiny_data_shared, tmp_path):
    out = tmp_path / "OUT"
    code = gs.main(["--device", "cpu", "--run", str(tiny_run), "--images", str(tiny_data_shared / "test"),
                    "--variants", "fp32", "fp16-graph", "--batches", "4", "--reps", "1", "--min-seconds", "0.05",
                    "--work", str(tmp_path / "W"), "--out", str(out), "--name", "g"])
    assert code == 0
    doc = json.loads((out / "g.json").read_text())
    v = doc["sections"]["variants"]
    assert v["fp32"]["agreement_vs_fp32"] == 1.0 and v["fp32"]["images_per_s"]["4"] > 0
    assert "macro_f1_test" in v["fp32"]  # the images kept their classes (DIR/<class>/...)
    assert v["fp16-graph"]["error"] == "RuntimeError: fp16-graph needs CUDA"
    assert doc["sections"]["e2e"]["exit"] == 0 and doc["images"] == 3 * 6
    md = (out / "g.md").read_text()
    assert "| fp32 |" in md and "fp16-graph needs CUDA" in md


def test_no_gpu_no_report(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gs.main(["--images", str(tmp_path), "--out", str(tmp_path / "OUT")]) == 2
    assert not (tmp_path / "OUT").exists()
