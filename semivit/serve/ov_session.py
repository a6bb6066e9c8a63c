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

Threads and streams: one thread per usable physical core (``SEMIVIT_THREADS`` overrides), as
that many single-threaded *streams* (OpenVINO's throughput mode): a batch is split into one part
per stream and the parts run at once, each on its own infer request.  No parallel region then
spans two cores, so no thread waits at a barrier for a sibling that another process has
descheduled.  benchmarks/results/speed.md (quick preset's ensemble, bf16, batch 32, 2-core Xeon
with AMX): 2 streams x 1 thread 213.6 images/s against 189.3 for 1 stream x 2 threads, and 92.4
vs 83.8 beside one busy process per core (its contention section).  CPU
pinning is off: on a shared box a pinned thread waits for its own core while another one is
idle.  ``streams=1`` (or ``SEMIVIT_OV_STREAMS=1``) gives the latency configuration.  One
compiled model per degradation level, compiled when the level is first used; the lower levels
are the export's FP32 graphs with the same precision hint.  :meth:`describe` reads back what
really runs: the precision the compiled model's matmuls execute in, the threads and streams.
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
from semivit.utils import cpu_has_bf16, env_int

INT8_IR = "model.ov-int8.xml"
INSTALL = "pip install 'semivit[openvino]'"


def import_openvino():
    """The ``openvino`` module, or a one-line BackendUnavailable naming the extra."""
    try:
        import openvino as ov
    except ImportError:
        raise BackendUnavailable(f"the openvino backend needs the openvino package ({INSTALL})") from None
    return ov


def default_streams(threads: int) -> int:
    """``SEMIVIT_OV_STREAMS`` when set, else one stream per thread (each stream single-threaded)."""
    n = env_int("SEMIVIT_OV_STREAMS", 1, what="a positive whole number")
    return threads if n is None else n


def compile_config(precision: str, threads: int, streams: int = 1) -> dict:
    """The CPU plugin settings every semivit OpenVINO model is compiled with: ``threads`` in all,
    shared by ``streams`` streams (1: the latency configuration)."""
    streams = max(1, min(int(streams), int(threads)))
    return {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
            "INFERENCE_NUM_THREADS": int(threads), "NUM_STREAMS": streams,
            "PERFORMANCE_HINT": "LATENCY" if streams == 1 else "THROUGHPUT", "ENABLE_CPU_PINNING": False}


def compile_model(path: Path, precision: str = "fp32", threads: Optional[int] = None, extra_outputs=(),
                  streams: int = 1):
    """Read ``path`` (ONNX or IR) and compile it for the CPU; ``extra_outputs``: tensor names
    to expose as outputs too (the export's accuracy gate reads the members' terms)."""
    ov = import_openvino()
    core = ov.Core()
    model = core.read_model(str(path))
    if extra_outputs:
        model.add_outputs(list(extra_outputs))
    return core.compile_model(model, "CPU", compile_config(precision, threads or default_threads(), streams))


def split_rows(n: int, parts: int) -> list[slice]:
    """``n`` rows cut into at most ``parts`` contiguous, non-empty slices of near-equal size."""
    parts = max(1, min(int(parts), n))
    bounds = [round(k * n / parts) for k in range(parts + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


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
    def __init__(self, ref: ModelRef, precision: str = "fp32", threads: Optional[int] = None,
                 streams: Optional[int] = None, **_ignored):
        super().__init__(ref)
        self.ov = import_openvino()
        if ref.export_dir is None:
            raise BackendUnavailable(f"{ref.run_dir} has no export (run `ssl export {ref.run_dir}` first)")
        if precision == "bf16" and not cpu_has_bf16():
            raise BackendUnavailable("this CPU has no native bf16 (no avx512_bf16 / amx_bf16 flag in /proc/cpuinfo)")
        self.precision = precision
        self.name = "openvino" if precision == "fp32" else f"openvino-{precision}"
        self.threads = int(threads or default_threads())
        self.streams = max(1, min(int(streams or default_streams(self.threads)), self.threads))
        self.levels = export_levels(ref)
        if precision == "int8":
            if not (ref.export_dir / INT8_IR).is_file():
                raise BackendUnavailable(f"{ref.export_dir} has no OpenVINO INT8 model ({INT8_IR}); "
                                         "`ssl export` writes one when nncf is installed and it passes the gate")
            full = self.levels[0]
            self.levels[0] = Level(full.name, full.tta, full.members, INT8_IR)
        self._compiled: dict[int, object] = {}
        self._requests: dict[int, object] = {}  # level -> AsyncInferQueue, one request per stream
        self._has_label: dict[int, bool] = {}
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
            compiled = compile_model(path, self._hint(i), self.threads, streams=self.streams)
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
        try:
            n_req = max(1, int(compiled.get_property("NUM_STREAMS")))
        except Exception:  # noqa: BLE001 - older plugins: one request per stream asked for
            n_req = self.streams
        self._requests[i] = self.ov.AsyncInferQueue(compiled, n_req)
        self._has_label[i] = any("label" in o.get_names() for o in compiled.outputs)

    def load_estimate(self, i: int) -> float:
        if i in self._compiled:
            return 0.0
        size = (self.ref.export_dir / self.levels[i].file).stat().st_size
        return size / self._bytes_per_s if self._bytes_per_s else 1.0

    def _run(self, images: np.ndarray):
        """The batch cut into one part per stream, the parts run at once (OpenVINO's
        AsyncInferQueue, one request per stream), gathered in order.  (More, smaller parts - a
        slowed stream taking fewer - measured slower: 197 vs 224 images/s with 4 parts for 2
        streams, batch 32.)"""
        compiled, queue = self._compiled[self.level], self._requests[self.level]
        parts = split_rows(len(images), len(queue))
        out_p, out_l = [None] * len(parts), [None] * len(parts)
        has_label = self._has_label.get(self.level, True)

        def done(req, k):
            out_p[k] = req.get_tensor(compiled.output("probs")).data.copy()
            out_l[k] = req.get_tensor(compiled.output("label")).data.copy() if has_label else out_p[k].argmax(1)

        queue.set_callback(done)
        for k, sl in enumerate(parts):
            queue.start_async({0: images[sl]}, k)
        queue.wait_all()
        return np.concatenate(out_p), np.concatenate(out_l)

    def describe(self) -> str:
        compiled = self._compiled[self.level]
        try:
            hint = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
            threads = int(compiled.get_property("INFERENCE_NUM_THREADS"))
            streams = int(compiled.get_property("NUM_STREAMS"))
        except Exception:  # noqa: BLE001
            hint, threads, streams = "?", self.threads, self.streams
        prec = runtime_precisions(compiled)
        ran = ", ".join(f"{n} {p}" for p, n in sorted(prec.items(), key=lambda kv: -kv[1])) or "unknown"
        what = "INT8 IR (NNCF)" if self.levels[self.level].file == INT8_IR else Path(self.levels[self.level].file).name
        return (f"openvino {self.ov.__version__.split('-')[0]} CPU {what}, inference precision {hint} "
                f"(matmul/conv nodes: {ran}), {threads} thread{'' if threads == 1 else 's'} in "
                f"{streams} stream{'' if streams == 1 else 's'}")

    def close(self) -> None:
        self._requests.clear()
        self._compiled.clear()


# The OpenVINO backends by name: the precision each compiles for.
for _name, _precision in (("openvino", "fp32"), ("openvino-bf16", "bf16"), ("openvino-int8", "int8")):
    register_backend(_name)(functools.partial(OpenVinoBackend, precision=_precision))
