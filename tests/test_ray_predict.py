"""`ssl predict --engine ray`: a Ray Data pipeline on a local Ray instance gives the local
engine's rows; the time limit holds; without Ray it is a one-line error.

One local Ray instance (2 CPUs, no dashboard) serves the whole module; the models are the small
hand-built ONNX exports of test_predict.py (milliseconds to build)."""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest
from PIL import Image

from semivit.serve.predict import run_predict
from test_predict import cli, fake_export, make_fake_export, mixed_dir, one_line_error, read_rows  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'semivit[ray]')")
    pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'ray[data]')")
    import signal

    sigterm = signal.getsignal(signal.SIGTERM)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    signal.signal(signal.SIGTERM, sigterm)  # Ray's handler (sys.exit) must not outlive it in pytest


def test_ray_engine_rows_equal_the_local_engine(ray_local, mixed_dir, fake_export, tmp_path):
    local = run_predict(mixed_dir, fake_export, out=tmp_path / "local.csv", quiet=True)
    dist = run_predict(mixed_dir, fake_export, out=tmp_path / "ray.csv", engine="ray", quiet=True)
    a, b = read_rows(tmp_path / "local.csv"), read_rows(tmp_path / "ray.csv")
    assert list(a[0]) == list(b[0])  # the same columns, in the same order
    assert [r["path"] for r in a] == [r["path"] for r in b]  # one row per file, the same order
    statuses = {r["path"]: r["status"] for r in b}
    assert statuses["corrupt.jpg"] == statuses["empty.png"] == statuses["text.jpg"] == "error"
    assert sum(s == "ok" for s in statuses.values()) == 6
    pcols = [c for c in a[0] if c.startswith("p_")]
    for ra, rb in zip(a, b):
        assert {k: v for k, v in ra.items() if k not in pcols + ["confidence"]} == \
               {k: v for k, v in rb.items() if k not in pcols + ["confidence"]}, (ra, rb)
        if ra["status"] == "ok":
            pa = np.array([float(ra[c]) for c in pcols + ["confidence"]])
            pb = np.array([float(rb[c]) for c in pcols + ["confidence"]])
            np.testing.assert_allclose(pb, pa, atol=1e-5, rtol=0)
    assert (dist.ok, dist.errors, dist.timeouts) == (local.ok, local.errors, local.timeouts) == (6, 3, 0)
    assert dist.backend == "ray" and "CPUExecutionProvider" in dist.provider


N_SLOW = 300
SLOW_SECONDS = 60.0  # all N_SLOW images at the full level, one thread: far beyond the limit below


@pytest.fixture(scope="module")
def slow_dir_and_export(tmp_path_factory):
    """N_SLOW 16 px PNGs and an export whose full level takes ~SLOW_SECONDS for all of them here."""
    import onnxruntime as ort

    root = tmp_path_factory.mktemp("ray_slow")
    rng = np.random.default_rng(3)
    for i in range(N_SLOW):
        (root / "IN").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "IN" / f"{i:04d}.png")
    work = 16
    exp = make_fake_export(root / "EXPORT", img_size=16, work=work)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1  # as in the actors
    sess = ort.InferenceSession(str(exp / "model.onnx"), so, providers=["CPUExecutionProvider"])
    batch = rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)
    sess.run(None, {"images": batch})
    t = time.perf_counter()
    for _ in range(3):
        sess.run(None, {"images": batch})
    per_image = (time.perf_counter() - t) / 48
    work = int(np.clip(np.ceil(work * SLOW_SECONDS / (N_SLOW * per_image)), 16, 8000))  # cost is linear in work
    return root / "IN", make_fake_export(root / "EXPORT", img_size=16, work=work)


def test_ray_engine_time_limit_turns_rows_not_reached_into_timeouts(ray_local, slow_dir_and_export, tmp_path):
    images, export = slow_dir_and_export
    # Ray Data takes ~5-8 s here to start the pipeline (actor processes, imports) on a quiet
    # machine, over 14 s with the 2 cores oversubscribed 3x (a CI run beside two benchmarks)
    limit = 24.0
    t = time.time()
    # small batches (~0.8 s each): some come back before the deadline however busy the machine is
    s = run_predict(images, export, out=tmp_path / "p.csv", engine="ray", time_limit=limit, batch_size=4,
                    quiet=True)
    in_place = (tmp_path / "p.csv").stat().st_mtime - t  # the pipeline is stopped after the commit
    rows = read_rows(tmp_path / "p.csv")
    assert len(rows) == N_SLOW and len({r["path"] for r in rows}) == N_SLOW
    assert {r["status"] for r in rows} <= {"ok", "timeout"}
    assert s.timeouts > 0 and s.ok > 0 and s.ok + s.timeouts == N_SLOW, (s.ok, s.timeouts)
    assert sum(r["status"] == "timeout" for r in rows) == s.timeouts
    assert in_place <= limit + 1.0, in_place


def test_ray_engine_without_ray_is_one_line_error(mixed_dir, fake_export, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    code, out = cli(str(mixed_dir), "--model", str(fake_export), "--out", str(tmp_path / "p.csv"), "--engine", "ray")
    assert "pip install" in one_line_error(code, out)
    assert not (tmp_path / "p.csv").exists()


def test_address_needs_the_ray_engine(mixed_dir, fake_export, tmp_path):
    code, out = cli(str(mixed_dir), "--model", str(fake_export), "--out", str(tmp_path / "p.csv"),
                    "--address", "ray://head:10001")
    assert "--engine ray" in one_line_error(code, out)


def test_actor_plan_gpu_actors_when_the_cluster_has_gpus():
    from semivit.errors import UserError
    from semivit.serve.ray_engine import _plan

    assert _plan("auto", gpus=4, cpus=32) == ("onnxruntime-cuda", 1.0, 4)  # one GPU per actor
    assert _plan("onnxruntime", gpus=0, cpus=8) == ("onnxruntime-cpu", 0.0, 4)  # half the CPUs
    assert _plan("auto", gpus=0, cpus=1) == ("onnxruntime-cpu", 0.0, 1)
    assert _plan("tensorrt", gpus=2, cpus=8) == ("onnxruntime-tensorrt", 1.0, 2)
    assert _plan("openvino", gpus=2, cpus=8) == ("openvino", 0.0, 4)  # a CPU backend stays on CPUs
    for backend, gpus in (("tensorrt", 0), ("torch", 1)):
        with pytest.raises(UserError):
            _plan(backend, gpus=gpus, cpus=8)
