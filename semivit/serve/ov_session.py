"""OpenVINO backends (CPU): the export's ``model.onnx`` read by OpenVINO unchanged.

    openvino        FP32 (inference-precision hint f32: the same numbers as ONNX Runtime FP32
                    to ~1e-6)
    openvino-bf16   the bf16 inference-precision hint: matmuls and convolutions in bf16, only
                    where this CPU has native bf16 (AVX512-BF16 or AMX-BF16, read from
                    /proc/cpuinfo at run time); elsewhere the backend is unavailable, never a
                    silently emulated slow path
    openvino-int8   the INT8 IR that ``ssl export`` quantised with NNCF (``model.ov-int8.xml``),
                    when it passed the export's accuracy gate

OpenVINO is an optional extra (``pip install 'semivit[openvino]'``); without it every name here is
a one-line :class:`BackendUnavailable` (exit code 2 at the command line).

Threads: one per usable physical core (``SEMIVIT_THREADS`` overrides), one stream, CPU pinning
off: on a box shared with other work, pinned threads wait for their own core while another one
is idle (see benchmarks/results/speed.md, contention).  One compiled model per degradation
level, compiled when the level is first used; the lower levels are the export's FP32 graphs with
the same precision hint.  :meth:`describe` reads back what really runs: the precision the
compiled model's matmuls execute in, the number of threads and streams.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Optional

import numpy as np

from semivit.serve.backends import (Backend, BackendUnavailable, Level, default_threads, export_levels, first_line,
                                    register_backend)
from semivit.serve.resolve import ModelRef
from semivit.utils import cpu_has_bf16

INT8_IR = "model.ov-int8.xml"
INSTALL = "pip install 'semivit[openvino]'"


def import_openvino():
    """The ``openvino`` module, or a one-line BackendUnavailable naming the extra."""
    try:
        import openvino as ov
    except ImportError:
        raise BackendUnavailable(f"the openvino backend needs the openvino package ({INSTALL})") from None
    return ov


def compile_config(precision: str, threads: int) -> dict:
    """The CPU plugin settings every semivit OpenVINO model is compiled with."""
    return {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
            "INFERENCE_NUM_THREADS": int(threads), "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
            "ENABLE_CPU_PINNING": False}


def compile_model(path: Path, precision: str = "fp32", threads: Optional[int] = None, extra_outputs=()):
    """Read ``path`` (ONNX or IR) and compile it for the CPU; ``extra_outputs``: tensor names
    to expose as outputs too (the export's accuracy gate reads the members' terms)."""
    ov = import_openvino()
    core = ov.Core()
    model = core.read_model(str(path))
    if extra_outputs:
        model.add_outputs(list(extra_outputs))
    return core.compile_model(model, "CPU", compile_config(precision, threads or default_threads()))


def runtime_precisions(compiled, op_types=("MatMul", "FullyConnected", "Convolution")) -> dict:
    """{runtime precision: count} of the compute-heavy nodes of the compiled (executed) graph."""
    out: dict = {}
    try:
        for op in compiled.get_runtime_model().get_ordered_ops():
            rt = op.get_rt_info()
            layer = rt["layerType"].astype(str) if "layerType" in rt else op.get_type_name()
            if layer in op_types and "runtimePrecision" in rt:
                p = rt["runtimePrecision"].astype(str)
                out[p] = out.get(p, 0) + 1
    except Exception:  # noqa: BLE001 - introspection only; never fails the backend
        pass
    return out


class OpenVinoBackend(Backend):
    def __init__(self, ref: ModelRef, precision: str = "fp32", threads: Optional[int] = None, **_ignored):
        super().__init__(ref)
        self.ov = import_openvino()
        if ref.export_dir is None:
            raise BackendUnavailable(f"{ref.run_dir} has no export (run `ssl export {ref.run_dir}` first)")
        if precision == "bf16" and not cpu_has_bf16():
            raise BackendUnavailable("this CPU has no native bf16 (no avx512_bf16 / amx_bf16 flag in /proc/cpuinfo)")
        self.precision = precision
        self.name = "openvino" if precision == "fp32" else f"openvino-{precision}"
        self.threads = int(threads or default_threads())
        self.levels = export_levels(ref)
        if precision == "int8":
            if not (ref.export_dir / INT8_IR).is_file():
                raise BackendUnavailable(f"{ref.export_dir} has no OpenVINO INT8 model ({INT8_IR}); "
                                         "`ssl export` writes one when nncf is installed and it passes the gate")
            full = self.levels[0]
            self.levels[0] = Level(full.name, full.tta, full.members, INT8_IR)
        self._compiled: dict[int, object] = {}
        self._requests: dict[int, object] = {}
        self._bytes_per_s: Optional[float] = None
        self.set_level(0)

    def _hint(self, i: int) -> str:
        # the INT8 IR's own non-quantised ops stay in f32; the lower (FP32 graph) levels of the
        # int8 backend run f32 too
        return "bf16" if self.precision == "bf16" else "fp32"

    def _activate(self, i: int) -> None:
        if i in self._compiled:
            return
        path = self.level_file(i)
        t = time.perf_counter()
        try:
            compiled = compile_model(path, self._hint(i), self.threads)
        except BackendUnavailable:
            raise
        except Exception as e:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses of its own
            raise BackendUnavailable(f"OpenVINO cannot load the model {path}: {first_line(e)}") from None
        inputs = compiled.inputs
        if len(inputs) != 1 or inputs[0].get_element_type() != self.ov.Type.u8:
            raise BackendUnavailable(f"{path}: expected one uint8 input (images NHWC)")
        dt = time.perf_counter() - t
        if dt > 0:
            self._bytes_per_s = path.stat().st_size / dt
        self._compiled[i] = compiled
        self._requests[i] = compiled.create_infer_request()

    def load_estimate(self, i: int) -> float:
        if i in self._compiled:
            return 0.0
        size = (self.ref.export_dir / self.levels[i].file).stat().st_size
        return size / self._bytes_per_s if self._bytes_per_s else 1.0

    def _run(self, images: np.ndarray):
        compiled, req = self._compiled[self.level], self._requests[self.level]
        req.infer({0: images})
        probs = req.get_tensor(compiled.output("probs")).data.copy()
        try:
            labels = req.get_tensor(compiled.output("label")).data.copy()
        except RuntimeError:
            labels = probs.argmax(1)
        return probs, labels

    def describe(self) -> str:
        compiled = self._compiled[self.level]
        try:
            hint = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
            threads = int(compiled.get_property("INFERENCE_NUM_THREADS"))
        except Exception:  # noqa: BLE001
            hint, threads = "?", self.threads
        prec = runtime_precisions(compiled)
        ran = ", ".join(f"{n} {p}" for p, n in sorted(prec.items(), key=lambda kv: -kv[1])) or "unknown"
        what = "INT8 IR (NNCF)" if self.levels[self.level].file == INT8_IR else Path(self.levels[self.level].file).name
        return (f"openvino {self.ov.__version__.split('-')[0]} CPU {what}, inference precision {hint} "
                f"(matmul/conv nodes: {ran}), {threads} thread{'' if threads == 1 else 's'}")

    def close(self) -> None:
        self._requests.clear()
        self._compiled.clear()


# The OpenVINO backends by name: the precision each compiles for.
for _name, _precision in (("openvino", "fp32"), ("openvino-bf16", "bf16"), ("openvino-int8", "int8")):
    register_backend(_name)(functools.partial(OpenVinoBackend, precision=_precision))
