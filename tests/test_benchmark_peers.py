"""benchmarks/speed.py's peers section and benchmarks/engines.py on the tiny run: the test images
it scores keep every class, each engine's test macro F1 is ``ssl eval``'s on the same images, and
the quantised peers build their models with the export's own calibration set."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_CLASSES, invoke

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import engines  # noqa: E402
import predict_speed as ps  # noqa: E402
import speed as sp  # noqa: E402

FAST = {"SEMIVIT_ONNX_EXPORTER": "torchscript"}


@pytest.fixture(scope="module")
def export(tiny_run, tmp_path_factory) -> Path:
    """An FP32-only export of a copy of the tiny run (no quantised candidates in it)."""
    run = tmp_path_factory.mktemp("peers") / "RUN"
    shutil.copytree(tiny_run, run)
    res = invoke("export", run, "--candidates", "none", env=FAST)
    assert res.exit_code == 0, res.output
    return run / "export"


def test_benchmark_test_images_keep_every_class(tiny_data_shared, tmp_path):
    """Fewer test images than the split (speed.py --images 64 of 656): every class keeps its share.
    The first n of the class-sorted split were all of one class, capping macro F1 at 1/classes."""
    src = tiny_data_shared / "test"  # 3 classes x 6 images, sorted by class folder
    d = ps.demo_images(tmp_path, 6, source=src)
    labels = sp.test_labels(sp.image_paths(d), TINY_CLASSES)
    assert np.bincount(labels, minlength=3).tolist() == [2, 2, 2]
    every = sp.test_labels(sp.image_paths(ps.demo_images(tmp_path, 100, source=src)), TINY_CLASSES)
    assert np.bincount(every).tolist() == [6, 6, 6]


def test_peers_test_macro_f1_is_ssl_evals_on_the_same_images(export, tiny_data_shared, tmp_path):
    """The peers section end to end on every test image (18, batch 4: a partial last batch) with
    the served ONNX Runtime FP32 engine in its own process: its test macro F1 must be exactly what
    ``ssl eval`` reports for the export on those images."""
    src = tiny_data_shared / "test"
    meta = json.loads((export / "meta.json").read_text())
    images_dir = ps.demo_images(tmp_path, 18, source=src)
    arrays, labels = sp.load_test_set(images_dir, meta, 4)
    assert len(arrays) == len(labels) == 18
    args = argparse.Namespace(peers=["ort-fp32"], peer_timeout=300.0)
    c = sp.Ctx(args=args, work=tmp_path, run=export.parent, export=export, untrained=False, meta=meta,
               images_dir=images_dir, arrays=arrays, labels=labels, threads=1, batch=4, reps=1, min_seconds=0.0)
    res = sp.sec_peers(c)
    r = res["engines"]["ort-fp32"]
    assert "error" not in r, r
    assert res["test_images_per_class"] == {k: 6 for k in TINY_CLASSES}

    report = tmp_path / "eval.json"
    ev = invoke("eval", export, src, "--out", report)
    assert ev.exit_code == 0, ev.output
    doc = json.loads(report.read_text())
    assert doc["n_images"] == 18
    assert r["macro_f1_test"] == pytest.approx(doc["macro_f1"], abs=1e-12), (r, doc["macro_f1"])


def test_quantised_peer_is_built_with_the_exports_calibration_images(export, tmp_path, monkeypatch):
    """engines.py builds the static-QDQ INT8 model the export would (the export has none): the same
    calibration images as candidates.build() - the class-interleaved subset of the run's labeled
    images - and the result opens and predicts with the backend `ssl predict` uses."""
    from semivit.export import candidates as cm
    from semivit.export import int8 as int8mod
    from semivit.export import verify
    from semivit.serve.backends import open_backend

    run = export.parent
    seen = []
    real = int8mod.quantize

    def quantize(src, dst, **kw):
        seen.append(kw.get("calibration"))
        return real(src, dst, **kw)

    monkeypatch.setattr(int8mod, "quantize", quantize)
    d = engines._quantised_export("ort-int8-qdq", export, run, tmp_path)
    assert d != export and (d / "model.int8-qdq.onnx").is_file()
    meta = json.loads((export / "meta.json").read_text())
    data = verify.load_run_images(run, meta["classes"], int(meta["img_size"]))
    expected = verify.interleaved_subset(data, cm.CALIBRATION_IMAGES)
    assert len(seen) == 1 and seen[0] is not None and np.array_equal(seen[0], expected)
    p, y = open_backend(d, "onnxruntime-int8-qdq", threads=1).predict(data.images[:5])
    assert p.shape == (5, len(meta["classes"])) and np.allclose(p.sum(1), 1, atol=1e-4)


def test_data_parallel_training_loop_averages_gradients_over_its_ranks(tiny_run, tmp_path):
    """speed.py's contention row for `torchrun` training: two single-threaded ranks, each on its
    half of every batch, end with the same weights (DDP averaged the gradients) and report the
    global batch's images/s."""
    x = np.random.default_rng(0).integers(0, 255, (8, 32, 32, 3), dtype=np.uint8)
    r = engines.train_loop_ddp(tiny_run, x, ranks=2, batch=4, steps=1, seconds=0.0, work=tmp_path)
    assert r["ranks"] == 2 and r["threads"] == 1 and r["batch"] == 4
    assert r["weights_agree"] is True
    assert len(r["runs"]) >= 2 and min(r["runs"]) > 0
    assert not list(tmp_path.iterdir())  # the rendezvous store is cleaned up


def test_untrained_quick_architecture_is_a_run_the_training_rows_can_train(tmp_path):
    """speed.py without --run measures the quick preset's untrained architecture; its contention
    rows train that run, so it must carry the preset's config.yaml (it once had none, and every
    training row failed)."""
    run = ps.untrained_quick_run(tmp_path, members=2)
    from semivit.config import load_run_config, resolve

    cfg = load_run_config(run)[0]
    assert cfg.model == resolve(preset="quick").model
    size = cfg.model.img_size
    x = np.random.default_rng(0).integers(0, 255, (2, size, size, 3), dtype=np.uint8)
    r = engines.train_loop(run, x, threads=1, batch=2, steps=1, seconds=0.0)
    assert len(r["runs"]) >= 1 and min(r["runs"]) > 0
