"""Serving candidates: which engine and precision `ssl predict --backend auto` runs on this machine.

``ssl export`` builds every candidate that applies here, scores each with the INT8 accuracy gate
(out-of-fold macro F1 on the run's labeled images within ``TOLERANCE`` of ONNX Runtime FP32; see
:mod:`semivit.export.int8` for how an image is scored only by members that never trained on it),
times those that pass on the run's images with the very backend class ``ssl predict`` opens - each
in a process of its own (:mod:`semivit.serve.timing`: engines sharing one process disturb each
other's thread pools), rounds interleaved over the candidates - and records the fastest in
meta.json (``serving``), with the whole table and the reasons:

    onnxruntime-cpu       ONNX Runtime FP32 (model.onnx) - the reference, always a candidate
    onnxruntime-int8      ONNX Runtime, dynamic INT8 (MatMul/Gemm, weights per tensor)
    onnxruntime-int8-qdq  ONNX Runtime, static QDQ INT8: Conv stem + MatMul/Gemm, weights per
                          channel, activations calibrated (MinMax) on the run's training images
    openvino              OpenVINO FP32 on model.onnx                      (extra `openvino`)
    openvino-bf16         OpenVINO, bf16 inference-precision hint           (native bf16 CPUs only)
    openvino-int8         OpenVINO INT8 IR quantised by NNCF (transformer mode, calibrated on the
                          run's training images)                           (needs `nncf`)

A candidate that cannot be built here is recorded as ``skipped`` with the reason (package
missing, no native bf16); one that fails the gate as ``refused`` and its file is deleted; neither
can be chosen.

The log says what happens as it happens, one line per step: which candidates will be built, the
FP32 reference's macro F1, each candidate's build time and gate result (macro F1 vs FP32, passes
or refused and why) as soon as it is scored, the timing step, then one summary line per candidate
(status, macro F1 vs FP32, images/s, why) and the choice.  Quantised candidates replace only the ``full`` level; the lower degradation levels
of ``--time-limit`` run the FP32 level graphs with the same engine.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import select
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import onnx

from semivit.errors import UserError
from semivit.export import int8 as int8mod
from semivit.export.verify import RunImages, interleaved_subset, ort_session
from semivit.utils import cpu_flags, cpu_has_bf16, cpu_has_vnni, cpu_name, info, warn

TOLERANCE = int8mod.TOLERANCE  # the same gate as --int8: macro F1 may drop by at most 0.01
TIME_IMAGES = 64  # timed images per round (two batches of 32)
TIME_BATCH = 32
TIME_ROUNDS = 3  # interleaved over the candidates; the best round counts
CALIBRATION_IMAGES = 128
REFERENCE = "onnxruntime-cpu"
OV_INT8_IR = "model.ov-int8.xml"


@dataclass
class Candidate:
    name: str  # the backend's registry name (ssl predict --backend NAME)
    engine: str
    precision: str
    file: str  # the full level's model file, relative to EXPORT
    status: str = "pending"  # accepted | refused | skipped | failed
    reason: str = ""
    report: dict = field(default_factory=dict)

    def row(self) -> dict:
        return {"name": self.name, "engine": self.engine, "precision": self.precision,
                "file": self.file if self.status == "accepted" else None, "status": self.status,
                "reason": self.reason, **self.report}


def all_candidates() -> list[Candidate]:
    return [
        Candidate(REFERENCE, "onnxruntime", "fp32", "model.onnx"),
        Candidate("onnxruntime-int8", "onnxruntime", "int8 dynamic (MatMul/Gemm, per-tensor weights)", "model.int8.onnx"),
        Candidate("onnxruntime-int8-qdq", "onnxruntime",
                  "int8 static QDQ (Conv stem + MatMul/Gemm, per-channel weights, calibrated)", "model.int8-qdq.onnx"),
        Candidate("openvino", "openvino", "fp32", "model.onnx"),
        Candidate("openvino-bf16", "openvino", "bf16 inference hint", "model.onnx"),
        Candidate("openvino-int8", "openvino", "int8 (NNCF, transformer mode, calibrated)", OV_INT8_IR),
    ]


def parse_selection(spec: Optional[str]) -> Optional[list[str]]:
    """``--candidates``: ``auto`` (None: all that apply), ``none`` ([]: FP32 only, no choice
    recorded) or a comma list of names (the FP32 reference is always included)."""
    if spec is None or spec.strip() in ("", "auto"):
        return None
    if spec.strip() == "none":
        return []
    names = [s.strip() for s in spec.split(",") if s.strip()]
    known = [c.name for c in all_candidates()]
    bad = [n for n in names if n not in known]
    if bad:
        raise UserError(f"--candidates: unknown {', '.join(bad)}; choose from auto, none or {', '.join(known)}")
    return names


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _why_not(c: Candidate) -> Optional[str]:
    """Why the candidate does not apply on this machine (None: it does)."""
    if c.engine == "openvino" and not _has("openvino"):
        return "openvino is not installed (pip install 'semivit[openvino]')"
    if c.name == "openvino-bf16" and not cpu_has_bf16():
        return "this CPU has no native bf16 (no avx512_bf16 / amx_bf16 in /proc/cpuinfo)"
    if c.name == "openvino-int8" and not _has("nncf"):
        return "nncf (OpenVINO's quantiser) is not installed (pip install 'semivit[openvino]')"
    return None


# ----------------------------------------------------------------------------- building
def _quiet():
    """NNCF and the ONNX quantisers print progress bars and warnings of their own."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    stack.callback(root.setLevel, level)
    return stack


def _build_ov_int8(members_graph: Path, dst: Path, calib: np.ndarray) -> None:
    """NNCF post-training quantisation of the OpenVINO model read from the FP32 graph (the copy
    exposing the members' terms, so the gate can score it the same way), saved as IR."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # nncf's import of torch extras
    import nncf
    import openvino as ov

    nncf.set_log_level(logging.ERROR)
    model = ov.Core().read_model(str(members_graph))
    batches = [np.ascontiguousarray(calib[s:s + 8]) for s in range(0, len(calib), 8)]
    with _quiet():
        q = nncf.quantize(model, nncf.Dataset(batches), model_type=nncf.ModelType.TRANSFORMER,
                          subset_size=len(batches))
    ov.save_model(q, str(dst), compress_to_fp16=False)


# ----------------------------------------------------------------------------- scoring
def _ov_members(path: Path, names: list[str], images: np.ndarray, precision: str, threads: Optional[int],
                batch: int = int8mod.EVAL_BATCH):
    from semivit.serve.ov_session import compile_model

    is_ir = path.suffix == ".xml"
    compiled = compile_model(path, precision, threads, extra_outputs=() if is_ir else names)
    req = compiled.create_infer_request()
    outs = [compiled.output("probs")] + [compiled.output(n) for n in names]
    probs, terms = [], []
    for s in range(0, len(images), batch):
        req.infer({0: np.ascontiguousarray(images[s:s + batch])})
        probs.append(req.get_tensor(outs[0]).data.copy())
        terms.append(np.stack([req.get_tensor(o).data.copy() for o in outs[1:]]))
    return np.concatenate(probs), np.concatenate(terms, axis=1)


@dataclass
class _Reference:
    names: list[str]
    probs: np.ndarray
    terms: np.ndarray
    weights: np.ndarray
    folds: list
    oof: bool  # score out of fold (members' terms located and folds known)
    how: str
    n_cls: int
    y: np.ndarray = None
    mask: np.ndarray = None
    f1: float = 0.0


def _predictions(ref: _Reference, probs: np.ndarray, terms: Optional[np.ndarray], data: RunImages):
    if ref.oof and terms is not None:
        return int8mod.oof_predictions(terms, ref.weights, ref.folds, data.folds)
    return probs.argmax(1), np.ones(len(probs), dtype=bool)


def _reference(fp32: Path, model, members: list[dict], data: RunImages) -> tuple[_Reference, Path]:
    names = int8mod.member_terms(onnx.load(str(fp32), load_external_data=False))
    p32, t32, _ = int8mod.run_members(fp32, names, data.images)
    with_outputs = int8mod._with_outputs(fp32, names)  # after run_members, which deletes its own copy
    weights = np.asarray([m["weight"] for m in members], dtype=np.float64)
    folds = [m.get("fold") for m in members]
    oof = int8mod._terms_match_members(t32[:, :8], model, data.images[:8]) and any(f is not None for f in folds)
    how = ("out-of-fold: each labeled image scored by the ensemble members validated on its fold "
           "(weights renormalised), i.e. by members that never trained on it") if oof else (
        "all labeled images, whole ensemble (members' folds unknown): optimistic, training images")
    ref = _Reference(names, p32, t32, weights / weights.sum(), folds, oof, how, p32.shape[1])
    ref.y, ref.mask = _predictions(ref, p32, t32, data)
    ref.f1 = int8mod.macro_f1(data.labels[ref.mask], ref.y[ref.mask], ref.n_cls)
    return ref, with_outputs


class _Unmatched(Exception):
    """A quantised graph's member outputs are so far from FP32's that none is nearest its own
    FP32 member: it cannot be scored out of fold, and fails the gate."""

    def __init__(self, probs: np.ndarray):
        super().__init__("its members' outputs are too far from FP32's to tell which is which")
        self.probs = probs


def _ordered_terms(ref: _Reference, terms: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """A quantised graph's terms in the FP32 member order (each nearest to its FP32 term)."""
    if terms.shape[0] != len(ref.names):
        raise UserError("its ensemble sum differs from the FP32 graph's; cannot score it")
    err = np.abs(terms[:, None] - ref.terms[None]).mean(axis=(2, 3))
    if not (err.argmin(1) == np.arange(len(ref.names))).all():
        raise _Unmatched(probs)
    return terms


def _unmatched_report(ref: _Reference, probs: np.ndarray) -> dict:
    """The gate's verdict on an :class:`_Unmatched` candidate: refused, with how far it is."""
    return {"macro_f1": None, "macro_f1_fp32": ref.f1, "drop": None, "accepted": False,
            "argmax_agreement": float((probs.argmax(1) == ref.probs.argmax(1)).mean()),
            "max_abs_prob_diff": float(np.abs(probs - ref.probs).max())}


def score(ref: _Reference, probs: np.ndarray, terms: Optional[np.ndarray], data: RunImages,
          tolerance: float) -> dict:
    y, mask = _predictions(ref, probs, terms, data)
    f1 = int8mod.macro_f1(data.labels[mask], y[mask], ref.n_cls)
    drop = ref.f1 - f1
    return {"macro_f1": f1, "macro_f1_fp32": ref.f1, "drop": drop, "accepted": bool(drop <= tolerance),
            "argmax_agreement": float((probs.argmax(1) == ref.probs.argmax(1)).mean()),
            "max_abs_prob_diff": float(np.abs(probs - ref.probs).max())}


def _run_candidate(c: Candidate, export_dir: Path, ref: _Reference, with_outputs: Path, data: RunImages,
                   threads: Optional[int]):
    """(probs, member terms in FP32 order or None) of candidate ``c`` on the run's images."""
    path = export_dir / c.file
    if c.engine == "onnxruntime":
        if c.file == "model.onnx":
            return ref.probs, ref.terms
        names = int8mod.member_terms(onnx.load(str(path), load_external_data=False))
        if not ref.oof:
            p, _, _ = int8mod.run_members(path, [], data.images)
            return p, None
        p, t, _ = int8mod.run_members(path, names, data.images)
        return p, _ordered_terms(ref, t, p)
    precision = "bf16" if c.name == "openvino-bf16" else "fp32"
    src = path if c.file.endswith(".xml") else with_outputs
    p, t = _ov_members(src, ref.names, data.images, precision, threads)
    return p, (t if ref.oof else None)


# ----------------------------------------------------------------------------- timing
TIME_SECONDS = 2.0  # least seconds of timing per round and candidate (whole passes over the images)
TIME_LOAD_TIMEOUT = 600.0  # seconds a timing process may take to open and warm up its backend
TIME_ROUND_TIMEOUT = 300.0  # ... and to answer one round
TIMING = "one process per candidate"


class _TimingFailed(Exception):
    pass


def _timing_command(name: str, work: Path, export_dir: Path, batch: int, threads: Optional[int]) -> list[str]:
    """The process that times candidate ``name``: :mod:`semivit.serve.timing`."""
    return [sys.executable, "-m", "semivit.serve.timing", "--export", str(export_dir), "--meta", str(work / "meta.json"),
            "--backend", name, "--images", str(work / "images.npy"), "--batch", str(batch),
            "--threads", str(threads or 0), "--seconds", str(TIME_SECONDS)]


class _Timer:
    """One candidate's timing process: started, asked for rounds line by line, closed."""

    def __init__(self, name: str, cmd: list[str], work: Path, env: dict):
        self.name, self.buf = name, b""
        self.err_path = work / f"{name}.stderr"
        with open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env,
                                         bufsize=0)

    def read(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _TimingFailed(f"its timing process gave no answer within {timeout:.0f} s")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    raise _TimingFailed(self._died())
                self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        try:
            return json.loads(line)
        except ValueError:
            raise _TimingFailed(f"its timing process answered {line[:80]!r}") from None

    def round(self, timeout: float) -> float:
        try:
            self.proc.stdin.write(b"round\n")
        except OSError:  # a broken pipe: it has died
            raise _TimingFailed(self._died()) from None
        doc = self.read(timeout)
        if not doc.get("images_per_s"):
            raise _TimingFailed(f"its timing process answered {doc}")
        return float(doc["images_per_s"])

    def _died(self) -> str:
        try:
            rc = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            rc = None
        how = "closed its output" if rc is None else (
            f"was killed by {_signal_name(-rc)}" if rc < 0 else f"exited with status {rc}")
        last = [ln.strip() for ln in self.err_path.read_text(errors="replace").splitlines() if ln.strip()][-1:]
        return f"its timing process {how}" + (f" ({last[0][:200]})" if last else "")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # EOF: it closes its backend and exits
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()


def _signal_name(n: int) -> str:
    import signal

    try:
        return signal.Signals(n).name
    except ValueError:
        return f"signal {n}"


def _timing_env() -> dict:
    """The environment ``ssl predict`` runs in (the OpenMP defaults of the ``ssl`` entry point)
    and this semivit importable."""
    import semivit
    from semivit.utils import cpu_runtime_defaults

    env = dict(os.environ)
    cpu_runtime_defaults(env)
    root = str(Path(semivit.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def _time(export_dir: Path, meta: dict, accepted: list[Candidate], images: np.ndarray, threads: Optional[int]) -> None:
    """images/s of each accepted candidate, each timed in a process of its own
    (:mod:`semivit.serve.timing`, opening the backend ``ssl predict`` opens), so no engine's
    thread pools share a process with another's; rounds interleaved over the candidates, one
    process computing at a time (a passing load burst hits them all alike), best round.  A
    candidate whose process fails is ``failed`` (one warning), never the export."""
    work = Path(export_dir) / ".timing"
    timers: dict[str, _Timer] = {}

    def fail(c: Candidate, why: str) -> None:
        c.status, c.reason = "failed", why
        warn(f"candidate {c.name}: failed - {c.reason}")
        t = timers.pop(c.name, None)
        if t is not None:
            t.close()

    try:
        work.mkdir(exist_ok=True)
        np.save(work / "images.npy", np.ascontiguousarray(images))
        (work / "meta.json").write_text(json.dumps(meta, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
        env = _timing_env()
        for c in accepted:  # all load at once (loading is not timed); rounds start when all are ready
            try:
                timers[c.name] = _Timer(c.name, _timing_command(c.name, work, Path(export_dir), TIME_BATCH, threads),
                                        work, env)
            except OSError as e:
                fail(c, f"its timing process could not start ({e})")
        for c in accepted:
            if c.name not in timers:
                continue
            try:
                doc = timers[c.name].read(TIME_LOAD_TIMEOUT)
            except _TimingFailed as e:
                fail(c, str(e))
                continue
            if "error" in doc:
                fail(c, f"cannot be opened for serving: {doc['error']}")
                continue
            c.report.update({"runs": doc.get("runs"), "timing": TIMING, "timing_pid": doc.get("pid")})
        best: dict[str, float] = {}
        for _ in range(TIME_ROUNDS):
            for c in accepted:
                if c.name not in timers:
                    continue
                try:
                    best[c.name] = max(best.get(c.name, 0.0), timers[c.name].round(TIME_ROUND_TIMEOUT))
                except _TimingFailed as e:
                    fail(c, str(e))
        for c in accepted:
            if c.name in timers and c.name in best:
                c.report["images_per_s"] = round(best[c.name], 2)
    finally:
        for t in timers.values():
            t.close()
        shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------- the whole step
def build(export_dir: Path, meta: dict, model, members: list[dict], data: RunImages,
          selection: Optional[list[str]] = None, int8_report: Optional[dict] = None,
          tolerance: Optional[float] = None, threads: Optional[int] = None) -> dict:
    """Build, gate and time the candidates in ``export_dir`` (the export's temporary directory,
    whose ``model.onnx`` and level graphs are written and verified); returns meta.json's
    ``serving`` document.  Files of candidates that are not accepted are deleted."""
    from semivit.serve.backends import default_threads

    t0 = time.perf_counter()
    tolerance = TOLERANCE if tolerance is None else tolerance
    threads = threads or default_threads()
    export_dir = Path(export_dir)
    cands = [c for c in all_candidates() if selection is None or c.name == REFERENCE or c.name in selection]
    info(f"serving candidates: {', '.join(c.name for c in cands)} - build each, gate it (macro F1 within "
         f"{tolerance} of FP32), time those that pass ...")
    fp32 = export_dir / "model.onnx"
    ref, with_outputs = _reference(fp32, model, members, data)
    how = "each by the members that never trained on it" if ref.oof else "whole ensemble, training images: optimistic"
    info(f"candidate {REFERENCE}: the FP32 reference - {_f1_name(ref)} {ref.f1:.4f} on {int(ref.mask.sum())} "
         f"labeled images ({how})")
    calib = interleaved_subset(data, CALIBRATION_IMAGES)
    try:
        for c in cands:
            why = _why_not(c)
            if why:
                c.status, c.reason = "skipped", why
                info(f"candidate {c.name}: skipped - {why}")
                continue
            t = time.perf_counter()
            try:
                if c.name == "onnxruntime-int8" and int8_report is not None:
                    if not int8_report.get("accepted"):  # --int8 already scored and refused it
                        c.status, c.reason = "refused", "refused by the --int8 check"
                        c.report = {"macro_f1": int8_report["macro_f1_int8"], "drop": int8_report["drop"]}
                        info(f"candidate {c.name}: refused by the --int8 check - macro F1 "
                             f"{c.report['macro_f1']:.4f}, drop {c.report['drop']:+.4f} > {tolerance}")
                        continue
                elif c.name == "onnxruntime-int8":
                    with _quiet():
                        int8mod.quantize(fp32, export_dir / c.file)
                elif c.name == "onnxruntime-int8-qdq":
                    with _quiet():
                        int8mod.quantize(fp32, export_dir / c.file, calibration=calib)
                elif c.name == "openvino-int8":
                    _build_ov_int8(with_outputs, export_dir / c.file, calib)
                built = time.perf_counter() - t
                try:
                    probs, terms = _run_candidate(c, export_dir, ref, with_outputs, data, threads)
                    c.report = score(ref, probs, terms, data, tolerance)
                except _Unmatched as e:
                    c.report = _unmatched_report(ref, e.probs)
                    c.reason = (f"{e} (its arg-max agrees with FP32 on {c.report['argmax_agreement']:.1%} of the "
                                f"labeled images, max |dp| {c.report['max_abs_prob_diff']:.3f})")
                c.report["build_seconds"] = round(built, 1)
            except Exception as e:  # noqa: BLE001 - one candidate failing must not fail the export
                c.status, c.reason = "failed", f"{type(e).__name__}: {_message(e)}"
                warn(f"candidate {c.name}: failed - {c.reason}")
                continue
            c.status = "accepted" if c.report["accepted"] else "refused"
            if c.status == "refused" and c.report["drop"] is not None:
                c.reason = f"macro F1 drops {c.report['drop']:.4f} > {tolerance}"
            if c.name != REFERENCE:
                info(_gate_line(c, ref, tolerance))
    finally:
        with_outputs.unlink(missing_ok=True)
    accepted = [c for c in cands if c.status == "accepted"]
    timed = data.images[:TIME_IMAGES]
    info(f"timing {len(accepted)} candidate{'s' if len(accepted) != 1 else ''} that passed the gate: "
         f"{len(timed)} images in batches of {TIME_BATCH}, {threads} thread{'s' if threads != 1 else ''}, "
         f"best of {TIME_ROUNDS} interleaved rounds of >= {TIME_SECONDS:g} s, each candidate in a process of its own ...")
    _time(export_dir, meta, accepted, timed, threads)
    doc = choose(cands, tolerance)
    for c in cands:  # only accepted candidates' files stay (model.onnx always does)
        if c.status != "accepted" and c.file != "model.onnx":
            _remove(export_dir / c.file)
        info(_line(c, _f1_name(ref)))
    doc.update({
        "gate": {"metric": "macro F1", "tolerance": tolerance, "reference": f"{REFERENCE} (FP32)",
                 "validation": ref.how, "images": int(ref.mask.sum())},
        "timing": {"images": int(len(timed)), "batch": TIME_BATCH, "rounds": TIME_ROUNDS, "threads": threads,
                   "seconds_per_round": TIME_SECONDS, "method": f"{TIMING} (python -m semivit.serve.timing), "
                   "one computing at a time",
                   "statistic": "best of the interleaved rounds, images/s, with the backend ssl predict opens"},
        "machine": {"cpu": cpu_name(), "threads": threads, "bf16": cpu_has_bf16(), "vnni": cpu_has_vnni(),
                    "flags": sorted(f for f in cpu_flags() if f.startswith(("avx512", "amx", "avx_vnni")))},
        "seconds": round(time.perf_counter() - t0, 1),
    })
    info(f"backend auto: {doc['auto']} - {doc['why']}")
    return doc


def choose(cands: list[Candidate], tolerance: float) -> dict:
    """The fastest accepted, timed candidate; never one that failed the gate or was not timed."""
    timed = [c for c in cands if c.status == "accepted" and c.report.get("images_per_s")]
    ref = next((c for c in cands if c.name == REFERENCE), None)
    if not timed:
        return {"auto": REFERENCE, "why": "no candidate could be timed; ONNX Runtime FP32 by default",
                "candidates": [c.row() for c in cands]}
    best = max(timed, key=lambda c: c.report["images_per_s"])
    ips = best.report["images_per_s"]
    why = (f"fastest of {len(timed)} candidate{'s' if len(timed) > 1 else ''} within the accuracy gate (macro F1 within {tolerance} of FP32) "
           f"on this machine: {ips:.1f} images/s")
    if ref is not None and ref.report.get("images_per_s") and best is not ref:
        why += f", {ips / ref.report['images_per_s']:.2f}x ONNX Runtime FP32 ({ref.report['images_per_s']:.1f})"
    why += f"; macro F1 {best.report['macro_f1']:.4f} vs FP32 {best.report['macro_f1_fp32']:.4f}"
    return {"auto": best.name, "why": why, "candidates": [c.row() for c in cands]}


def cleanup(export_dir: Path) -> None:
    """Remove every candidate's file (after a failed candidates step): only FP32 stays."""
    for c in all_candidates():
        if c.file != "model.onnx":
            _remove(Path(export_dir) / c.file)
    for p in Path(export_dir).glob(".*.members.onnx"):
        p.unlink(missing_ok=True)


def _message(e: BaseException) -> str:
    """One line of an exception's message (OpenVINO's first lines are a source location)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.strip().startswith("Exception from")]
    return (lines[0] if lines else "")[:200]


def _remove(path: Path) -> None:
    for p in (path, Path(str(path) + ".data"), path.with_suffix(".bin") if path.suffix == ".xml" else None):
        if p is not None:
            p.unlink(missing_ok=True)


def _f1_name(ref: _Reference) -> str:
    return "out-of-fold macro F1" if ref.oof else "macro F1"


def _gate_line(c: Candidate, ref: _Reference, tolerance: float) -> str:
    """The accuracy gate's result for one candidate, as soon as it is scored."""
    r = c.report
    built = "runs model.onnx" if c.file == "model.onnx" else f"built in {r.get('build_seconds', 0):.1f} s"
    if r["macro_f1"] is None:  # could not be scored out of fold (_Unmatched)
        return f"candidate {c.name}: {built}; refused, its file is deleted - {c.reason}"
    s = f"candidate {c.name}: {built}; {_f1_name(ref)} {r['macro_f1']:.4f} vs FP32 "
    s += f"{r['macro_f1_fp32']:.4f} (drop {r['drop']:+.4f} "
    if c.status == "accepted":
        return s + f"<= {tolerance}): passes the gate"
    return s + f"> {tolerance}): refused, its file is deleted"


def _line(c: Candidate, f1_name: str = "macro F1") -> str:
    """The summary line of one candidate (after timing): status, macro F1 vs FP32, images/s, why."""
    r = c.report
    if c.status in ("skipped", "failed") or r.get("macro_f1") is None:
        return f"candidate {c.name}: {c.status} - {c.reason}"
    s = f"candidate {c.name}: {c.status} - {f1_name} {r.get('macro_f1', float('nan')):.4f}"
    if r.get("macro_f1_fp32") is not None:
        s += f" vs FP32 {r['macro_f1_fp32']:.4f}"
    s += f" (drop {r.get('drop', 0):+.4f})"
    if r.get("images_per_s"):
        s += f", {r['images_per_s']:.1f} images/s"
    return s + (f" ({c.reason})" if c.reason else "")
