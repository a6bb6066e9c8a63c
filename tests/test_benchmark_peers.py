"""benchmarks/engines.py (the peers of benchmarks/speed.py) on the tiny run: the quantised peers
build their models with the export's own calibration set."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import invoke

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import engines  # noqa: E402

FAST = {"SEMIVIT_ONNX_EXPORTER": "torchscript"}


@pytest.fixture(scope="module")
def export(tiny_run, tmp_path_factory) -> Path:
    """An FP32-only export of a copy of the tiny run (no quantised candidates in it)."""
    run = tmp_path_factory.mktemp("peers") / "RUN"
    shutil.copytree(tiny_run, run)
    res = invoke("export", run, "--candidates", "none", env=FAST)
    assert res.exit_code == 0, res.output
    return run / "export"


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
