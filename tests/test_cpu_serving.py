"""CPU serving: the OpenVINO backends (`--backend openvino`, `openvino-bf16`) - agreement with ONNX
Runtime FP32 on real images, what really runs, the one-line error without the optional extra -
and the serving candidates `ssl export` builds, gates and times for `ssl predict --backend auto`."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from semivit.cli import app
from semivit.data.dataset import decode_many
from semivit.export import candidates as candmod, verify
from semivit.export.meta import read_meta, write_meta
from semivit.serve.backends import BackendUnavailable, open_backend
from semivit.utils import cpu_has_bf16
from semivit.errors import UserError

FAST = {"SEMIVIT_ONNX_EXPORTER": "torchscript"}


def cli(*args, env=None):
    return CliRunner().invoke(app, [str(a) for a in args], env={**FAST, **(env or {})})


QUICK_ROUNDS = 0.05  # seconds per timing round for the tiny model (the export's default: 2 s)


@pytest.fixture(autouse=True)
def _quick_timing(monkeypatch):
    monkeypatch.setattr(candmod, "TIME_SECONDS", QUICK_ROUNDS)


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ov") / "RUN"
    shutil.copytree(tiny_run, run)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(candmod, "TIME_SECONDS", QUICK_ROUNDS)
        res = cli("export", run, "--candidates", "auto")
    assert res.exit_code == 0, res.output
    return run / "export"


@pytest.fixture(scope="module")
def run_dir(exported) -> Path:
    return exported.parent


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


def test_split_rows_covers_every_row_once_in_order():
    from semivit.serve.ov_session import split_rows

    for n in (1, 2, 3, 7, 32):
        for parts in (1, 2, 3, 8):
            sl = split_rows(n, parts)
            assert len(sl) == min(n, parts) and all(s.stop > s.start for s in sl)
            assert [i for s in sl for i in range(s.start, s.stop)] == list(range(n))
            sizes = [s.stop - s.start for s in sl]
            assert max(sizes) - min(sizes) <= 1


def test_openvino_streams_split_the_batch_and_give_the_same_rows(exported, real_images, monkeypatch):
    """Two single-threaded streams run parts of each batch at once: the same numbers, in the same
    order, as one stream, at every batch size (also one smaller than the streams)."""
    pytest.importorskip("openvino", reason="the optional extra openvino is not installed")
    one = open_backend(exported, "openvino", threads=2, streams=1)
    assert "2 threads in 1 stream" in one.describe(), one.describe()
    be = open_backend(exported, "openvino", threads=2, streams=2)
    assert "2 threads in 2 streams" in be.describe() and len(be._requests[0]) == 2, be.describe()
    for n in (len(real_images), 5, 1):
        p1, y1 = one.predict(real_images[:n])
        p2, y2 = be.predict(real_images[:n])
        assert p2.shape == p1.shape and np.abs(p2 - p1).max() <= 1e-5 and (y2 == y1).all()
    # never more streams than threads
    assert "1 thread in 1 stream" in open_backend(exported, "openvino", threads=1, streams=2).describe()
    # the default: one stream per thread; SEMIVIT_OV_STREAMS overrides, a bad value is one line
    from semivit.serve import ov_session

    monkeypatch.delenv("SEMIVIT_OV_STREAMS", raising=False)
    assert ov_session.default_streams(2) == 2
    monkeypatch.setenv("SEMIVIT_OV_STREAMS", "1")
    assert ov_session.default_streams(2) == 1
    monkeypatch.setenv("SEMIVIT_OV_STREAMS", "lots")
    with pytest.raises(UserError, match="SEMIVIT_OV_STREAMS"):
        open_backend(exported, "openvino")


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


# ----------------------------------------------------------------------------- candidates
def _has(mod: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(mod) is not None


def test_export_builds_gates_and_times_the_candidates(exported):
    meta = read_meta(exported)
    serving = meta["serving"]
    rows = {r["name"]: r for r in serving["candidates"]}
    assert list(rows) == [c.name for c in candmod.all_candidates()]
    assert rows["onnxruntime-cpu"]["status"] == "accepted" and rows["onnxruntime-cpu"]["drop"] == 0
    for name, r in rows.items():
        if r["status"] == "accepted":
            assert r["images_per_s"] > 0 and r["drop"] <= candmod.TOLERANCE and r["runs"], r  # the gate is one-sided
            assert (exported / r["file"]).is_file() and r["file"] in meta["files"]
        else:
            assert r["file"] is None and r["reason"], r
    for name in ("onnxruntime-int8", "onnxruntime-int8-qdq"):  # ORT always applies: built and scored
        assert rows[name]["status"] in ("accepted", "refused"), rows[name]
        assert rows[name]["macro_f1"] is not None or "too far from FP32" in rows[name]["reason"], rows[name]
    if not _has("openvino"):
        assert rows["openvino"]["status"] == "skipped" and "openvino is not installed" in rows["openvino"]["reason"]
    else:
        assert rows["openvino"]["status"] == "accepted"  # FP32: the same numbers as ORT FP32
    # the choice: the fastest accepted candidate, and the reason says so with the numbers
    accepted = [r for r in rows.values() if r["status"] == "accepted"]
    assert serving["auto"] == max(accepted, key=lambda r: r["images_per_s"])["name"]
    assert f"{rows[serving['auto']]['images_per_s']:.1f} images/s" in serving["why"]
    assert serving["gate"]["tolerance"] == candmod.TOLERANCE and serving["machine"]["cpu"]
    # each accepted candidate was timed in a process of its own: not this one, not another's
    pids = [r["timing_pid"] for r in accepted]
    assert all(r["timing"] == "one process per candidate" for r in accepted), accepted
    assert len(set(pids)) == len(pids) and os.getpid() not in pids and all(isinstance(p, int) for p in pids), pids
    assert serving["timing"]["method"].startswith("one process per candidate"), serving["timing"]
    assert not (exported / ".timing").exists()
    for r in rows.values():  # refused or skipped candidates leave no file behind
        if r["status"] != "accepted" and r["name"] != "onnxruntime-cpu":
            f = next(c.file for c in candmod.all_candidates() if c.name == r["name"])
            if f == rows["onnxruntime-cpu"]["file"]:
                continue  # the OpenVINO FP32/bf16 candidates read the FP32 graph itself: it stays
            assert not (exported / f).exists()


def _predict_json(export: Path, data: Path, out: Path, *extra) -> dict:
    res = cli("predict", data, "--model", export, "--format", "json", "--out", out, *extra)
    assert res.exit_code == 0, res.output
    return json.loads(out.read_text())["summary"], res.output


def test_predict_auto_runs_the_backend_chosen_at_export(exported, tiny_data_shared, tmp_path):
    meta = read_meta(exported)
    summary, output = _predict_json(exported, tiny_data_shared / "test", tmp_path / "a.json")
    assert summary["backend"] == meta["serving"]["auto"], output
    assert f"backend: {meta['serving']['auto']} - " in output and "chosen at export: fastest of" in output
    # another accepted candidate recorded as the choice (a copy of the export): predict follows it
    others = [r["name"] for r in meta["serving"]["candidates"]
              if r["status"] == "accepted" and r["name"] != meta["serving"]["auto"]]
    if not others:
        pytest.skip("only one candidate passed the gate here")
    copy = tmp_path / "export"
    shutil.copytree(exported, copy)
    doc = read_meta(copy)
    doc["serving"] = {**doc["serving"], "auto": others[0], "why": "recorded by the test"}
    doc.pop("files")
    doc.pop("format")
    write_meta(copy, doc)
    summary, output = _predict_json(copy, tiny_data_shared / "test", tmp_path / "b.json")
    assert summary["backend"] == others[0] and "chosen at export: recorded by the test" in output, output


def _gate_setup(exported, run_dir, tmp_path, monkeypatch, bad):
    """(model, members, data, work): the run's ensemble and labeled images, a copy of the export
    without ``bad``'s file, and candidate ``bad`` made to predict class 0 for every image."""
    from semivit.models.ensemble import EnsembleModel, load_members, read_ensemble

    doc = read_ensemble(run_dir)
    models, _, members = load_members(run_dir, doc)
    model = EnsembleModel(models, [m["weight"] for m in members], tta=doc.get("tta", True) is not False,
                          mean=doc["mean"], std=doc["std"]).eval()
    data = verify.load_run_images(run_dir, doc["classes"], int(doc["img_size"]))
    work = tmp_path / "export"
    shutil.copytree(exported, work)
    (work / next(c.file for c in candmod.all_candidates() if c.name == bad)).unlink(missing_ok=True)
    real_run = candmod._run_candidate

    def run(c, *a, **k):
        p, t = real_run(c, *a, **k)
        if c.name == bad:  # every member says class 0
            t = np.zeros_like(t)
            t[..., 0] = 1.0 / t.shape[0]
            p = t.sum(0)
        return p, t

    monkeypatch.setattr(candmod, "_run_candidate", run)
    return model, members, data, work


def test_a_candidate_that_fails_the_gate_is_never_chosen(exported, run_dir, tmp_path, monkeypatch):
    """The static-QDQ candidate is made to predict class 0 for every image (its macro F1 falls)
    and to time as by far the fastest: it must be refused, its file deleted, and never chosen."""
    bad = "onnxruntime-int8-qdq"
    model, members, data, work = _gate_setup(exported, run_dir, tmp_path, monkeypatch, bad)
    real_time = candmod._time

    def timing(export_dir, meta, accepted, images, threads):
        real_time(export_dir, meta, accepted, images[:4], threads)
        for c in accepted:
            c.report["images_per_s"] = 1e6 if c.name == bad else 1.0

    monkeypatch.setattr(candmod, "_time", timing)
    meta = read_meta(work)
    serving = candmod.build(work, meta, model, members, data, selection=[bad])
    rows = {r["name"]: r for r in serving["candidates"]}
    assert rows[bad]["status"] == "refused" and rows[bad]["drop"] > candmod.TOLERANCE, rows[bad]
    assert serving["auto"] == "onnxruntime-cpu" and not (work / "model.int8-qdq.onnx").exists()
    # and choose() on its own: an accepted-but-slower candidate beats a faster refused one
    c1, c2 = candmod.all_candidates()[:2]
    c1.status, c1.report = "accepted", {"images_per_s": 10.0, "macro_f1": 0.5, "macro_f1_fp32": 0.5}
    c2.status, c2.report = "refused", {"images_per_s": 99.0, "macro_f1": 0.1, "macro_f1_fp32": 0.5}
    assert candmod.choose([c1, c2], 0.01)["auto"] == c1.name


def test_a_candidate_whose_members_cannot_be_told_apart_is_refused_not_failed(exported, run_dir, tmp_path,
                                                                              monkeypatch, capsys):
    """Static QDQ INT8 can move every member's output so far that none is nearest its own FP32
    member (seen on the quick preset's ELPV export): it cannot be scored out of fold, so the
    gate refuses it with the numbers - it is not an error of the export."""
    bad = "onnxruntime-int8-qdq"
    model, members, data, work = _gate_setup(exported, run_dir, tmp_path, monkeypatch, bad)
    real_order = candmod._ordered_terms

    def shuffled(ref, terms, probs):
        return real_order(ref, terms[::-1].copy(), probs)  # member k's output where member n-1-k's was

    monkeypatch.setattr(candmod, "_ordered_terms", shuffled)
    serving = candmod.build(work, read_meta(work), model, members, data, selection=[bad])
    rows = {r["name"]: r for r in serving["candidates"]}
    r = rows[bad]
    assert r["status"] == "refused" and r["macro_f1"] is None and "too far from FP32" in r["reason"], r
    assert "arg-max agrees with FP32 on" in r["reason"] and r["file"] is None
    assert serving["auto"] != bad and not (work / "model.int8-qdq.onnx").exists()
    err = capsys.readouterr().err
    assert f"candidate {bad}: failed" not in err and f"candidate {bad}: refused - its members" in err, err


def test_export_log_says_what_each_candidate_does_as_it_goes(exported, run_dir, tmp_path, monkeypatch, capsys):
    """While the candidates are built, gated and timed, one line per step: the plan, the FP32
    reference's macro F1, each candidate's gate result (macro F1 vs FP32, passes or refused and
    why) as soon as it is scored - before the timing starts -, the timing step, then one summary
    line per candidate (images/s) and the choice."""
    bad, other = "onnxruntime-int8-qdq", "onnxruntime-int8"
    model, members, data, work = _gate_setup(exported, run_dir, tmp_path, monkeypatch, bad)
    real_time, before_timing = candmod._time, []

    def timing(*a, **k):
        before_timing.append(capsys.readouterr().err)
        return real_time(*a, **k)

    monkeypatch.setattr(candmod, "_time", timing)
    capsys.readouterr()
    serving = candmod.build(work, read_meta(work), model, members, data, selection=[other, bad])
    rows = {r["name"]: r for r in serving["candidates"]}
    early = before_timing[0].splitlines()
    late = capsys.readouterr().err.splitlines()
    ref = rows["onnxruntime-cpu"]
    f1 = "out-of-fold macro F1"
    assert early[0] == ("serving candidates: onnxruntime-cpu, onnxruntime-int8, onnxruntime-int8-qdq - build each, "
                        f"gate it (macro F1 within {candmod.TOLERANCE} of FP32), time those that pass ..."), early
    assert early[1] == (f"candidate onnxruntime-cpu: the FP32 reference - {f1} {ref['macro_f1']:.4f} on {len(data.labels)} "
                        "labeled images (each by the members that never trained on it)"), early
    for line, name in zip(early[2:], (other, bad)):
        r = rows[name]
        verdict = (f"<= {candmod.TOLERANCE}): passes the gate" if r["status"] == "accepted"
                   else f"> {candmod.TOLERANCE}): refused, its file is deleted")
        assert line == (f"candidate {name}: built in {r['build_seconds']:.1f} s; {f1} {r['macro_f1']:.4f} vs FP32 "
                        f"{ref['macro_f1']:.4f} (drop {r['drop']:+.4f} {verdict}"), early
    assert rows[bad]["status"] == "refused" and len(early) == 5, early
    accepted = [n for n, r in rows.items() if r["status"] == "accepted"]
    assert early[4].startswith(f"timing {len(accepted)} candidate{'s' if len(accepted) > 1 else ''} that passed the "
                               f"gate: {len(data.labels)} images in batches of {candmod.TIME_BATCH}, "), early
    assert late[0:3] == [f"candidate {n}: {r['status']} - {f1} {r['macro_f1']:.4f} vs FP32 {ref['macro_f1']:.4f} "
                         f"(drop {r['drop']:+.4f})" + (f", {r['images_per_s']:.1f} images/s" if r.get("images_per_s") else "")
                         + (f" ({r['reason']})" if r["reason"] else "") for n, r in rows.items()], late
    assert "images/s" in late[0] and "images/s" not in late[2] and f"macro F1 drops {rows[bad]['drop']:.4f}" in late[2]
    assert late[3] == f"backend auto: {serving['auto']} - {serving['why']}" and len(late) == 4, late


CRASHES = {  # a timing process that dies: at start-up (a segfault), or answering its first round
    "start": "import ctypes; ctypes.string_at(0)",
    "round": ("import json, os, sys; os.write(1, (json.dumps({'ready': True, 'runs': 'fake', 'pid': os.getpid()})"
              " + chr(10)).encode()); sys.stdin.readline(); sys.stderr.write('boom in round 1' + chr(10)); os.abort()"),
}


@pytest.mark.parametrize("when", sorted(CRASHES))
def test_a_candidate_whose_timing_process_crashes_fails_and_auto_picks_another(run_dir, tmp_path, monkeypatch, when):
    """The FP32 reference's timing process crashes; the dynamic-INT8 candidate (made to pass the
    gate: it returns the reference's predictions) is timed in its own: the export succeeds, the
    reference is recorded as failed with why (one warning line), and auto is the INT8 candidate."""
    real_cmd, real_run = candmod._timing_command, candmod._run_candidate

    def command(name, *a, **k):
        if name == candmod.REFERENCE:
            return [sys.executable, "-c", CRASHES[when]]
        return real_cmd(name, *a, **k)

    def run(c, export_dir, ref, *a, **k):
        if c.name == "onnxruntime-int8":
            return ref.probs, ref.terms  # the reference's own numbers: it passes the gate
        return real_run(c, export_dir, ref, *a, **k)

    monkeypatch.setattr(candmod, "_timing_command", command)
    monkeypatch.setattr(candmod, "_run_candidate", run)
    out = tmp_path / "E"
    res = cli("export", run_dir, "--out", out, "--candidates", "onnxruntime-int8")
    assert res.exit_code == 0, res.output
    serving = read_meta(out)["serving"]
    rows = {r["name"]: r for r in serving["candidates"]}
    ref, q = rows[candmod.REFERENCE], rows["onnxruntime-int8"]
    how = "was killed by SIGSEGV" if when == "start" else "was killed by SIGABRT (boom in round 1)"
    assert ref["status"] == "failed" and ref["reason"] == f"its timing process {how}", ref
    assert "images_per_s" not in ref
    assert q["status"] == "accepted" and q["images_per_s"] > 0 and q["timing_pid"] != os.getpid(), q
    assert serving["auto"] == "onnxruntime-int8" and "fastest of 1 candidate " in serving["why"], serving
    warnings = [ln for ln in res.output.splitlines() if ln.startswith("warning:")]
    assert warnings == [f"warning: candidate {candmod.REFERENCE}: failed - its timing process {how}"], res.output
    assert (out / "model.onnx").is_file() and (out / "model.int8.onnx").is_file() and not (out / ".timing").exists()


def test_candidates_option_errors_and_none(run_dir, tmp_path):
    res = cli("export", run_dir, "--out", tmp_path / "E", "--candidates", "onnxruntime-cpu,tflite")
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and "unknown tflite" in lines[0], res.output
    assert not (tmp_path / "E").exists()


# ----------------------------------------------------------------------------- contention defaults
def test_cpu_runtime_defaults_passive_openmp_and_cores_from_affinity(monkeypatch):
    import os

    from semivit import utils

    env: dict = {}
    assert utils.cpu_runtime_defaults(env) == env
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"
    n = int(env["OMP_NUM_THREADS"])
    assert 1 <= n <= len(os.sched_getaffinity(0))
    # the affinity mask caps the count (a process pinned to one CPU gets one thread)
    monkeypatch.setattr(utils.os, "sched_getaffinity", lambda pid: {0})
    assert utils.physical_core_count() == 1
    # what the user set is kept
    env = {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "ACTIVE"}
    assert utils.cpu_runtime_defaults(env) == {} and env == {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "ACTIVE"}
    # training keeps OpenMP's own (spinning) wait policy: its thread governor handles contention
    env = {}
    assert set(utils.cpu_runtime_defaults(env, training=True)) == {"OMP_NUM_THREADS"}


@pytest.mark.parametrize("argv,policy", [(["predict", "--help"], "PASSIVE"), (["--help"], "PASSIVE"),
                                         (["train", "--help"], "None"), (["refresh", "--help"], "None")])
def test_ssl_entry_point_sets_the_openmp_defaults_before_torch(tmp_path, argv, policy):
    import os
    import subprocess

    code = (f"import os, sys; sys.argv = ['ssl', *{argv!r}]\n"
            "from semivit import cli\n"
            "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
            "print('ENV', os.environ.get('OMP_WAIT_POLICY'), os.environ.get('OMP_NUM_THREADS'), 'torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    line = [ln for ln in out.splitlines() if ln.startswith("ENV")][-1].split()
    assert line[1] == policy and int(line[2]) >= 1 and line[3] == "False", out


_FAULTS = ("import os, resource, sys\n"
           "from semivit import cli\n"
           "sys.argv = ['ssl', '--help']\n"
           "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
           "import torch\n"
           "torch.set_num_threads(1)\n"
           "x = torch.ones(4096, 4096)\n"
           "for _ in range(3):\n    (x * 2).sum()\n"  # warm-up: the heap grows once
           "r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
           "for _ in range(50):\n    (x * 2).sum()\n"  # 64 MiB temporaries, as the stem's conv activations
           "print('FAULTS', resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)\n")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt: Linux only")
def test_ssl_keeps_freed_memory_so_large_temporaries_do_not_fault_their_pages_in_again():
    """``ssl`` tells glibc to keep freed blocks (semivit.utils.keep_freed_memory): 50 temporaries
    of 64 MiB (above glibc's largest mmap threshold, 32 MiB: the size of the stem's activations
    on a batch of images) then reuse the same memory instead of an mmap + page faults + munmap
    each; with SEMIVIT_MALLOC=system (glibc's defaults) every one faults its 16,384 pages in again."""
    import os
    import subprocess

    def faults(extra: dict) -> int:
        env = {k: v for k, v in os.environ.items() if k != "SEMIVIT_MALLOC"} | extra
        out = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True,
                             timeout=120).stdout
        return int([ln for ln in out.splitlines() if ln.startswith("FAULTS")][-1].split()[1])

    kept, system = faults({}), faults({"SEMIVIT_MALLOC": "system"})
    assert system > 50 * 16_000 and kept < system // 10, (kept, system)  # measured: 49 k vs 819 k


def test_member_terms_are_located_in_a_shared_stem_ensemble(tmp_path):
    """The accuracy gate scores images out of fold from each member's term in the graph; with the
    quick preset's hybrids the members share one stem, and the check that the graph's terms are
    the members' must run the stem first (it used to feed pixels to stem-less members)."""
    import onnx
    import torch

    from semivit import config
    from semivit.export import int8 as int8mod
    from semivit.export.graph import export_graph
    from semivit.models.ensemble import EnsembleModel
    from semivit.models.networks import build_model

    cfg = config.resolve(preset="quick", overrides=["model.img_size=32", "model.kwargs={embed_dim: 32, depth: 1, "
                                                    "num_heads: 2}", "model.head_hidden=16"])
    torch.manual_seed(0)
    ens = EnsembleModel([build_model(cfg.model, 3).eval() for _ in range(3)], [1, 2, 3]).eval()
    assert ens.stem is not None
    path = tmp_path / "m.onnx"
    export_graph(ens, path, 32, exporter="torchscript")
    names = int8mod.member_terms(onnx.load(str(path)))
    imgs = np.random.default_rng(0).integers(0, 255, (6, 32, 32, 3), dtype=np.uint8)
    _, terms, _ = int8mod.run_members(path, names, imgs)
    assert int8mod._terms_match_members(terms, ens, imgs)
    assert not int8mod._terms_match_members(terms[::-1], ens, imgs)  # the order matters


def test_export_candidates_record_renders_every_candidate(exported, tmp_path):
    """benchmarks/export_candidates.py writes the export's serving record with every candidate's
    gate result and images/s, and the auto choice."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "benchmarks"))
    spec = importlib.util.spec_from_file_location("export_candidates", root / "benchmarks" / "export_candidates.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main([str(exported), "--export-seconds", "12.5", "--out", str(tmp_path / "ec")])
    md = (tmp_path / "ec.md").read_text()
    serving = read_meta(exported)["serving"]
    for c in serving["candidates"]:
        assert f"| {c['name']} |" in md
    assert f"`--backend auto`: **{serving['auto']}**" in md and "Export wall time 12.5 s" in md
    assert json.loads((tmp_path / "ec.json").read_text())["serving"] == serving
