"""Native TensorRT backend: EXPORT/model.engine (a raw serialized engine) run with the tensorrt
Python runtime, device buffers held as torch CUDA tensors (no pycuda needed).

Before deserializing, EXPORT/engine.json (written by :mod:`semivit.export.tensorrt`: ``tensorrt``,
``gpu``, ``compute_capability``, ``onnx_sha256``, ``profile``) is checked against this machine: the
TensorRT version the engine was built with (engines are tied to it), the GPU's compute capability,
and the ONNX graph it came from (against meta.json's ``files`` record, no re-hashing); a mismatch
is a clear one-line error that says to rebuild with ``ssl export RUN --trt`` on this machine
(``--backend auto`` then goes on to ONNX Runtime, saying why).

Written from the TensorRT 10 Python API (IRuntime.deserialize_cuda_engine,
ICudaEngine.num_io_tensors/get_tensor_name/get_tensor_mode/get_tensor_dtype/
get_tensor_profile_shape, IExecutionContext.set_input_shape/set_tensor_address/execute_async_v3).
"""

from __future__ import annotations

import json
from typing import Optional

import numpy as np

from semivit.serve.backends import Backend, BackendUnavailable, Level, export_levels, first_line, register_backend
from semivit.serve.resolve import ModelRef


def _first(d: dict, *keys):
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    return None


def _capability(value) -> Optional[tuple[int, int]]:
    if value is None:
        return None
    if isinstance(value, (list, tuple)) and len(value) >= 2:
        return int(value[0]), int(value[1])
    s = str(value).lower().replace("sm_", "").replace("sm", "")
    if "." in s:
        a, b = s.split(".")[:2]
        return int(a), int(b)
    if s.isdigit() and len(s) >= 2:
        return int(s[:-1]), int(s[-1])
    return None


def check_engine_info(info: dict, trt_version: str, capability: tuple[int, int], gpu_name: str,
                      onnx_sha256: Optional[str] = None) -> None:
    """Raise BackendUnavailable when engine.json says the engine was built for something else."""
    built_trt = _first(info, "tensorrt_version", "tensorrt", "trt_version")
    built_cc = _capability(_first(info, "compute_capability", "gpu_compute_capability", "sm"))
    built_gpu = _first(info, "gpu_name", "gpu", "device_name") or "?"
    rebuild = "rebuild it here with `ssl export RUN --trt`"
    if built_trt is not None and str(built_trt) != str(trt_version):
        raise BackendUnavailable(f"model.engine was built with TensorRT {built_trt}, this machine has "
                                 f"{trt_version}; {rebuild}")
    if built_cc is not None and tuple(built_cc) != tuple(capability):
        raise BackendUnavailable(f"model.engine was built for {built_gpu} (compute capability "
                                 f"{built_cc[0]}.{built_cc[1]}), this GPU is {gpu_name} "
                                 f"({capability[0]}.{capability[1]}); {rebuild}")
    built_sha = _first(info, "onnx_sha256", "source_sha256")
    if built_sha and onnx_sha256 and built_sha != onnx_sha256:
        raise BackendUnavailable(f"model.engine was built from a different model.onnx than the one beside it; {rebuild}")


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, ref: ModelRef, **_ignored):
        super().__init__(ref)
        if ref.export_dir is None:
            raise BackendUnavailable("the tensorrt backend needs an export directory with model.engine")
        engine_path = ref.export_dir / "model.engine"
        if not engine_path.is_file():
            raise BackendUnavailable(f"no {engine_path} (build it on a GPU with `ssl export RUN --trt`)")
        try:
            import tensorrt as trt
        except ImportError:
            raise BackendUnavailable("the tensorrt Python package is not installed") from None
        try:
            import torch
        except ImportError:
            raise BackendUnavailable("the tensorrt backend uses torch for CUDA buffers; torch is missing") from None
        if not torch.cuda.is_available():
            raise BackendUnavailable("no CUDA GPU is available for the TensorRT engine")
        info_path = ref.export_dir / "engine.json"
        if not info_path.is_file():
            raise BackendUnavailable(f"{engine_path} has no engine.json beside it (cannot check what it was "
                                     f"built for); rebuild with `ssl export RUN --trt`")
        self.info = json.loads(info_path.read_text())
        self.trt, self.torch = trt, torch
        cap = torch.cuda.get_device_capability(0)
        self.gpu = torch.cuda.get_device_name(0)
        files = ref.meta.get("files") if isinstance(ref.meta.get("files"), dict) else {}
        sha = files.get("model.onnx")  # meta.json's record vs engine.json's: no re-hashing of a big graph
        check_engine_info(self.info, trt.__version__, cap, self.gpu, sha)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        full = export_levels(ref)[0]
        self.levels = [Level(full.name, full.tta, full.members, "model.engine")]
        for lv in self.info.get("levels") or []:  # optional extra engines for the degradation steps
            f = lv.get("file")
            if f and (ref.export_dir / f).is_file():
                self.levels.append(Level(lv["name"], bool(lv.get("tta", False)), int(lv.get("members", 1)), f))
        self._ctx: dict[int, tuple] = {}
        self.stream = torch.cuda.Stream()
        self.set_level(0)

    def _activate(self, i: int) -> None:
        if i in self._ctx:
            return
        trt = self.trt
        path = self.ref.export_dir / self.levels[i].file
        try:
            engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        except Exception as e:  # noqa: BLE001
            raise BackendUnavailable(f"cannot deserialize {path}: {first_line(e)}") from None
        if engine is None:
            raise BackendUnavailable(f"TensorRT could not deserialize {path} (version or GPU mismatch?); "
                                     f"rebuild it with `ssl export RUN --trt`")
        names = [engine.get_tensor_name(k) for k in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1:
            raise BackendUnavailable(f"{path}: expected one input (images), found {inputs}")
        outputs = ["probs", "label"] if {"probs", "label"} <= set(outputs) else outputs[:2]
        profile = self.info.get("profile") or {}
        if i == 0 and profile.get("max"):
            max_batch = int(profile["max"][0])
        else:
            max_batch = int(engine.get_tensor_profile_shape(inputs[0], 0)[2][0])
        context = engine.create_execution_context()
        if context is None:
            raise BackendUnavailable(f"{path}: could not create an execution context (out of GPU memory?)")
        self._ctx[i] = (engine, context, inputs[0], outputs, max_batch)

    def _torch_dtype(self, dt):
        trt, torch = self.trt, self.torch
        table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
                 trt.DataType.INT32: torch.int32, trt.DataType.UINT8: torch.uint8, trt.DataType.BOOL: torch.bool}
        if hasattr(trt.DataType, "INT64"):
            table[trt.DataType.INT64] = torch.int64
        if hasattr(trt.DataType, "BF16"):
            table[trt.DataType.BF16] = torch.bfloat16
        return table[dt]

    def _run(self, images: np.ndarray):
        torch = self.torch
        engine, ctx, inp, outs, max_batch = self._ctx[self.level]
        probs_all, labels_all = [], []
        with torch.cuda.stream(self.stream):
            for s in range(0, len(images), max_batch):
                x = torch.from_numpy(images[s:s + max_batch]).to("cuda", non_blocking=True)
                x = x.to(self._torch_dtype(engine.get_tensor_dtype(inp)))
                ctx.set_input_shape(inp, tuple(x.shape))
                ctx.set_tensor_address(inp, x.data_ptr())
                bufs = []
                for name in outs:
                    shape = tuple(ctx.get_tensor_shape(name))
                    buf = torch.empty(shape, dtype=self._torch_dtype(engine.get_tensor_dtype(name)), device="cuda")
                    ctx.set_tensor_address(name, buf.data_ptr())
                    bufs.append(buf)
                if not ctx.execute_async_v3(self.stream.cuda_stream):
                    raise RuntimeError("TensorRT execute_async_v3 failed")
                self.stream.synchronize()
                probs_all.append(bufs[0].float().cpu().numpy())
                labels_all.append(bufs[1].cpu().numpy() if len(bufs) > 1 else bufs[0].argmax(1).cpu().numpy())
        return np.concatenate(probs_all), np.concatenate(labels_all)

    def describe(self) -> str:
        return f"tensorrt {self.trt.__version__} engine on {self.gpu}"


@register_backend("tensorrt")
def _tensorrt(ref: ModelRef, **kw) -> TensorRTBackend:
    return TensorRTBackend(ref, **kw)
