"""OpenVINO backends (`--backend openvino`, `openvino-bf16`): agreement with ONNX Runtime FP32 on
real images, what really runs, and the one-line error without the optional extra."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from semivit.cli import app
from semivit.data.dataset import decode_many
from semivit.export import verify
from semivit.serve.backends import BackendUnavailable, open_backend
from semivit.utils import cpu_has_bf16

FAST = {"SEMIVIT_ONNX_EXPORTER": "torchscript"}


def cli(*args, env=None):
    return CliRunner().invoke(app, [str(a) for a in args], env={**FAST, **(env or {})})


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ov") / "RUN"
    shutil.copytree(tiny_run, run)
    res = cli("export", run)
    assert res.exit_code == 0, res.output
    return run / "export"


@pytest.fixture(scope="module")
def real_images(tiny_data_shared) -> np.ndarray:
    """The held-out test images and the run's labeled ones, decoded at the model's size."""
    paths = sorted((tiny_data_shared / "test").rglob("*.*")) + sorted((tiny_data_shared / "train").rglob("*.*"))
    return decode_many(paths, 32).images


def test_openvino_fp32_agrees_with_onnxruntime_within_the_export_gate(exported, real_images):
    pytest.importorskip("openvino", reason="the optional extra openvino is not installed")
    ort_be, ov_be = open_backend(exported, "onnxruntime-cpu"), open_backend(exported, "openvino")
    for level in range(len(ov_be.levels)):  # every degradation level, at an odd batch size too
        ort_be.set_level(level)
        ov_be.set_level(level)
        for n in (len(real_images), 3):
            p_ort, y_ort = ort_be.predict(real_images[:n])
            p_ov, y_ov = ov_be.predict(real_images[:n])
            assert p_ov.shape == p_ort.shape and p_ov.dtype == np.float32
            assert np.abs(p_ov - p_ort).max() <= verify.FP32_ATOL  # the export's FP32 gate
            assert (y_ov == y_ort).all() and (y_ov == p_ov.argmax(1)).all()
            assert np.allclose(p_ov.sum(1), 1.0, atol=1e-5)
    ov_be.set_level(0)
    desc = ov_be.describe()
    assert ov_be.name == "openvino" and "inference precision f32" in desc and " f32)" in desc, desc


def test_openvino_bf16_runs_in_bf16_where_the_cpu_has_it(exported, real_images):
    pytest.importorskip("openvino", reason="the optional extra openvino is not installed")
    if not cpu_has_bf16():
        with pytest.raises(BackendUnavailable, match="no native bf16"):
            open_backend(exported, "openvino-bf16")
        return
    be = open_backend(exported, "openvino-bf16")
    p, y = be.predict(real_images)
    p_ort, _ = open_backend(exported, "onnxruntime-cpu").predict(real_images)
    diff = np.abs(p - p_ort).max()
    assert 0 < diff < 0.05  # bf16 really ran (not bit-equal to FP32), and stays close
    assert "inference precision bf16" in be.describe() and "bf16)" in be.describe()


def test_predict_backend_openvino_names_what_runs(exported, tiny_data_shared, tmp_path):
    pytest.importorskip("openvino", reason="the optional extra openvino is not installed")
    out = tmp_path / "p.csv"
    res = cli("predict", tiny_data_shared / "test", "--model", exported, "--backend", "openvino", "--out", out)
    assert res.exit_code == 0, res.output
    assert "backend: openvino - openvino " in res.output and "inference precision f32" in res.output
    assert len(out.read_text().splitlines()) == 1 + len(list((tiny_data_shared / "test").rglob("*.*")))


def test_openvino_missing_is_one_line_error_exit_2(exported, tiny_data_shared, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    for name in ("openvino", "openvino-bf16"):
        res = cli("predict", tiny_data_shared / "test", "--model", exported, "--backend", name,
                  "--out", tmp_path / f"{name}.csv")
        lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
        assert res.exit_code == 2 and len(lines) == 1, res.output
        assert lines[0].startswith("error:") and "pip install 'semivit[openvino]'" in lines[0], res.output
        assert not (tmp_path / f"{name}.csv").exists()
