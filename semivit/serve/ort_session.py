"""ONNX Runtime backends: CPU, CUDA and TensorRT execution providers.

CPU sessions: intra-op threads = physical cores, inter-op 1, sequential execution, every graph
optimisation.  GPU sessions list the GPU provider first and the CPU provider after it (ONNX
Runtime's normal arrangement for the odd unsupported node); the provider the session *really*
got is read back with ``session.get_providers()`` and a missing GPU provider is an error.

One session per degradation level, created when the level is first used.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np

from semivit.serve.backends import (Backend, BackendUnavailable, Level, export_levels, first_line, default_threads,
                                    register_backend)
from semivit.serve.resolve import ModelRef

# quantised graphs of the full level, written by `ssl export` when they pass its accuracy gate
VARIANT_FILES = {"int8": "model.int8.onnx", "int8-qdq": "model.int8-qdq.onnx"}

PROVIDER = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
            "tensorrt": "TensorrtExecutionProvider"}


def trt_cache_dir() -> Path:
    base = os.environ.get("SEMIVIT_TRT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "semivit", "ort-trt")
    return Path(base)


class OrtBackend(Backend):
    def __init__(self, ref: ModelRef, device: str = "cpu", threads: Optional[int] = None,
                 spinning: bool = False, variant: Optional[str] = None, **_ignored):
        super().__init__(ref)
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendUnavailable("onnxruntime is not installed") from None
        if ref.export_dir is None:
            raise BackendUnavailable(f"{ref.run_dir} has no export (run `ssl export {ref.run_dir}` first)")
        self.ort = ort
        self.device = device
        self.name = f"onnxruntime-{device}"
        primary = PROVIDER[device]
        if primary not in ort.get_available_providers():
            pkg = "onnxruntime-gpu" if device != "cpu" else "onnxruntime"
            raise BackendUnavailable(f"this onnxruntime {ort.__version__} has no {primary} "
                                     f"(available: {', '.join(ort.get_available_providers())}; install {pkg})")
        self.threads = int(threads or default_threads())
        self.spinning = spinning
        self.levels = export_levels(ref)
        self.variant = variant
        if variant is not None:  # a quantised full level; the lower levels stay the FP32 graphs
            self.name = f"onnxruntime-{variant}"
            f = VARIANT_FILES[variant]
            if not (ref.export_dir / f).is_file():
                raise BackendUnavailable(f"{ref.export_dir} has no {f} (`ssl export` writes it when it passes "
                                         "the accuracy gate)")
            full = self.levels[0]
            self.levels[0] = Level(full.name, full.tta, full.members, f)
        self._sessions: dict[int, object] = {}
        self._io: dict[int, tuple[str, list[str]]] = {}
        self._bytes_per_s: Optional[float] = None
        self.set_level(0)

    # -- sessions ----------------------------------------------------------------------------
    def _providers(self) -> list:
        if self.device == "cpu":
            return ["CPUExecutionProvider"]
        if self.device == "cuda":
            return [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
        cache = trt_cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        trt_opts = {"device_id": 0, "trt_fp16_enable": True, "trt_engine_cache_enable": True,
                    "trt_engine_cache_path": str(cache), "trt_timing_cache_enable": True,
                    "trt_timing_cache_path": str(cache)}
        return [("TensorrtExecutionProvider", trt_opts), ("CUDAExecutionProvider", {"device_id": 0}),
                "CPUExecutionProvider"]

    def _options(self):
        ort = self.ort
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3  # errors only; provider fallback is checked explicitly below
        if self.device == "cpu":
            so.intra_op_num_threads = self.threads
            so.inter_op_num_threads = 1
            # Spinning intra-op threads burn the cores the decode workers need between batches.
            so.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        return so

    def _activate(self, i: int) -> None:
        if i in self._sessions:
            return
        path = self.level_file(i)
        t = time.perf_counter()
        try:
            sess = self.ort.InferenceSession(str(path), sess_options=self._options(), providers=self._providers())
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise BackendUnavailable(f"cannot load the model {path}: {first_line(e)}") from None
        got = sess.get_providers()
        want = PROVIDER[self.device]
        if want not in got:
            raise BackendUnavailable(
                f"asked for {want} but the onnxruntime session runs on {', '.join(got)} "
                f"(silent fallback refused; check the CUDA/cuDNN/TensorRT libraries, or use --backend auto)")
        inputs = sess.get_inputs()
        if len(inputs) != 1 or inputs[0].type != "tensor(uint8)":
            raise BackendUnavailable(f"{path}: expected one uint8 input (images NHWC), got "
                                     + ", ".join(f"{x.name}:{x.type}" for x in inputs))
        _check_shapes(path, inputs[0].shape, sess.get_outputs()[0].shape, self.img_size, len(self.classes))
        outs = [o.name for o in sess.get_outputs()]
        names = ["probs", "label"] if {"probs", "label"} <= set(outs) else outs[:2]
        dt = time.perf_counter() - t
        if dt > 0:
            self._bytes_per_s = path.stat().st_size / dt
        self._sessions[i] = sess
        self._io[i] = (inputs[0].name, names)

    def load_estimate(self, i: int) -> float:
        if i in self._sessions:
            return 0.0
        size = (self.ref.export_dir / self.levels[i].file).stat().st_size
        return size / self._bytes_per_s if self._bytes_per_s else 1.0

    @property
    def session(self):
        return self._sessions[self.level]

    def _run(self, images: np.ndarray):
        inp, outs = self._io[self.level]
        res = self.session.run(outs, {inp: images})
        probs = res[0]
        labels = res[1] if len(res) > 1 else probs.argmax(1)
        return probs, labels

    def describe(self) -> str:
        got = self.session.get_providers()[0]
        extra = (f"{self.threads} intra-op thread{'' if self.threads == 1 else 's'}" if self.device == "cpu"
                 else "device 0")
        what = "" if self.variant is None else f" {self.levels[self.level].file}"
        return f"onnxruntime {self.ort.__version__} {got}{what} ({extra})"

    def close(self) -> None:
        self._sessions.clear()


def _check_shapes(path, in_shape, out_shape, size: int, n_classes: int) -> None:
    """The graph must take the img_size and give the classes that meta.json names: a mismatch is
    a bad model (one line at load), not an "inference failed" error row for every image."""
    dims = [d if isinstance(d, int) else None for d in (in_shape or [])]
    if len(dims) == 4 and dims[1:3] != [None, None] and dims[1:3] != [size, size]:
        raise BackendUnavailable(f"bad model: {path} takes {dims[1]}x{dims[2]} images but meta.json says "
                                 f"img_size {size}")
    outs = [d if isinstance(d, int) else None for d in (out_shape or [])]
    if len(outs) == 2 and outs[1] is not None and outs[1] != n_classes:
        raise BackendUnavailable(f"bad model: {path} gives {outs[1]} class probabilities but meta.json names "
                                 f"{n_classes} classes")


# The ONNX Runtime backends by name: (device / execution provider, graph variant).
for _name, _device, _variant in (("onnxruntime-cpu", "cpu", None), ("onnxruntime-cuda", "cuda", None),
                                 ("onnxruntime-tensorrt", "tensorrt", None), ("onnxruntime-int8", "cpu", "int8"),
                                 ("onnxruntime-int8-qdq", "cpu", "int8-qdq")):
    register_backend(_name)(functools.partial(OrtBackend, device=_device, variant=_variant))
