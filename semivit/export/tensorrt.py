"""TensorRT FP16 engine from the exported ONNX graph, with the tensorrt Python API.

FP16, by TensorRT major version:
- TensorRT >= 11 builds strongly typed networks only and has no FP16 builder flag: the graph is
  first converted to FP16 with its I/O kept (uint8 in, float32/int64 out; see
  :mod:`semivit.export.fp16`) and built as is.
- TensorRT 10: the FP32 graph is built with ``BuilderFlag.FP16`` (weakly typed network), which
  lets TensorRT pick FP16 kernels where it judges them accurate.

The engine file EXPORT/model.engine is the raw serialized engine (nothing glued on); what it was
built for sits beside it in EXPORT/engine.json.  An engine only loads on the TensorRT version and
GPU architecture that built it: :func:`check_engine` compares engine.json with the machine and the
ONNX graph, says what differs and rebuilds.  CUDA buffers come from torch.cuda (torch is already
a dependency; the GPU image ships a CUDA build of it).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np

from semivit.errors import UserError
from semivit.utils import atomic_path, atomic_write_json, info, read_json, sha256_file, warn

ENGINE_FORMAT = "semivit-engine/1"
FP16_ATOL = 1e-2  # max |p_trt - p_onnxruntime| accepted for an FP16 engine
FP16_MIN_AGREEMENT = 0.99  # arg-max agreement with ONNX Runtime FP32 (near-ties may flip)
OPT_BATCH = 32


def unavailable_reason() -> Optional[str]:
    """Why a TensorRT engine cannot be built here, or None when it can."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt Python package is not installed (pip install 'semivit[gpu]')"
    except Exception as e:  # noqa: BLE001 - a broken install (missing libnvinfer) raises OSError etc.
        return f"tensorrt fails to import ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    import torch

    if not torch.cuda.is_available():
        why = "this PyTorch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        return f"{why} (TensorRT needs an NVIDIA GPU; buffers come from torch.cuda)"
    return None


def require() -> None:
    reason = unavailable_reason()
    if reason:
        raise UserError(f"--trt needs TensorRT and a CUDA GPU: {reason}")


def trt_major(trt) -> int:
    return int(trt.__version__.split(".")[0])


def machine() -> dict:
    import tensorrt as trt
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return {"tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(0),
            "compute_capability": f"{major}.{minor}"}


def cache_dir() -> Path:
    root = os.environ.get("SEMIVIT_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "semivit"
    return Path(root) / "tensorrt"


def timing_cache_path(m: dict) -> Path:
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{m['tensorrt']}-{m['gpu']}-sm{m['compute_capability']}").strip("-")
    return cache_dir() / f"timing-{slug}.cache"


def profile_for(img_size: int, max_batch: int, opt_batch: int = OPT_BATCH) -> dict:
    shape = lambda n: [n, img_size, img_size, 3]  # noqa: E731
    return {"input": "images", "min": shape(1), "opt": shape(max(1, min(opt_batch, max_batch))), "max": shape(max_batch)}


def _logger(trt):
    return trt.Logger(trt.Logger.WARNING)


def _timing_cache(config, path: Path):
    """The timing cache kept between builds (one per TensorRT version and GPU), or a new one."""
    if path.is_file():
        try:
            return config.create_timing_cache(path.read_bytes())
        except Exception as e:  # noqa: BLE001 - a corrupt cache must not stop the build
            warn(f"ignoring unreadable TensorRT timing cache {path}: {e}")
    return config.create_timing_cache(b"")


def build_engine(onnx_path: Path, engine_path: Path, profile: dict) -> dict:
    """Build ``engine_path`` from ``onnx_path``; returns the engine.json fields of the build."""
    import tensorrt as trt

    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    m = machine()
    logger = _logger(trt)
    builder = trt.Builder(logger)
    source, fp16_graph = onnx_path, None
    if trt_major(trt) >= 11:
        from semivit.export.fp16 import convert_file

        fp16_graph = onnx_path.with_name(f".{onnx_path.stem}.fp16.onnx")
        convert_file(onnx_path, fp16_graph)
        source, how = fp16_graph, "strongly typed network built from the FP16-converted graph (TensorRT >= 11)"
    else:
        how = "BuilderFlag.FP16 on the FP32 graph (TensorRT 10, weakly typed network)"
    try:
        network = builder.create_network(0)  # explicit batch is the only mode since TensorRT 10
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(source)):  # resolves <name>.data beside the graph
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise UserError(f"TensorRT cannot parse {onnx_path.name}: {errors[0] if errors else 'unknown error'}")
        config = builder.create_builder_config()
        if trt_major(trt) < 11:
            config.set_flag(trt.BuilderFlag.FP16)
        opt = builder.create_optimization_profile()
        opt.set_shape(profile["input"], profile["min"], profile["opt"], profile["max"])
        config.add_optimization_profile(opt)
        cache_file = timing_cache_path(m)
        config.set_timing_cache(_timing_cache(config, cache_file), ignore_mismatch=False)
        t0 = time.perf_counter()
        serialized = builder.build_serialized_network(network, config)
        seconds = time.perf_counter() - t0
        if serialized is None:
            raise UserError(f"TensorRT failed to build an engine from {onnx_path.name} (see the TensorRT log above)")
        with atomic_path(engine_path) as tmp:
            tmp.write_bytes(bytes(serialized))  # the raw plan: no header, no framing
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache_file) as tmp:
            tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    finally:
        if fp16_graph is not None:
            fp16_graph.unlink(missing_ok=True)
            Path(str(fp16_graph) + ".data").unlink(missing_ok=True)
    return {"format": ENGINE_FORMAT, **m, "precision": "fp16", "fp16_method": how, "profile": profile,
            "onnx": onnx_path.name, "onnx_sha256": sha256_file(onnx_path), "engine": engine_path.name,
            "engine_sha256": sha256_file(engine_path), "timing_cache": str(cache_file),
            "build_seconds": round(seconds, 1)}


class EngineRunner:
    """Runs a serialized engine on uint8 NHWC batches (torch.cuda buffers, execute_async_v3)."""

    def __init__(self, engine_path: Path):
        import tensorrt as trt
        import torch

        self.trt, self.torch = trt, torch
        self.runtime = trt.Runtime(_logger(trt))
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise EngineMismatch(f"{engine_path} does not load with TensorRT {trt.__version__} on this GPU")
        self.context = self.engine.create_execution_context()

    def _dtype(self, name: str):
        return self.torch.from_numpy(np.zeros(0, dtype=self.trt.nptype(self.engine.get_tensor_dtype(name)))).dtype

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        x = torch.from_numpy(np.ascontiguousarray(images)).cuda()
        self.context.set_input_shape("images", tuple(x.shape))
        outs = {}
        for name in ("probs", "label"):
            shape = tuple(self.context.get_tensor_shape(name))
            outs[name] = torch.empty(shape, dtype=self._dtype(name), device="cuda")
            self.context.set_tensor_address(name, outs[name].data_ptr())
        self.context.set_tensor_address("images", x.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise UserError("TensorRT execution failed")
        stream.synchronize()
        return outs["probs"].float().cpu().numpy(), outs["label"].long().cpu().numpy()


class EngineMismatch(UserError):
    pass


def verify_engine(engine_path: Path, onnx_path: Path, images: np.ndarray, max_batch: int) -> dict:
    """The FP16 engine against ONNX Runtime FP32 on the same images, plus its throughput."""
    from semivit.export.verify import ort_session, run_ort

    runner = EngineRunner(engine_path)
    ref_p, ref_y = run_ort(ort_session(onnx_path), images, 17)
    probs, labels = [], []
    for b in (1, 3, min(17, max_batch)):
        p, y = zip(*[runner(images[s:s + b]) for s in range(0, len(images), b)])
        probs.append(np.concatenate(p))
        labels.append(np.concatenate(y))
    diff = max(float(np.abs(p - ref_p).max()) for p in probs)
    agree = min(float((y == ref_y).mean()) for y in labels)
    batch = min(OPT_BATCH, max_batch)
    x = np.resize(images, (batch, *images.shape[1:]))
    runner(x)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 2.0:
        runner(x)
        n += batch
    return {"reference": "onnxruntime-cpu-fp32", "images": int(len(images)), "max_abs_diff": diff,
            "argmax_agreement": agree, "tolerance": FP16_ATOL, "min_agreement": FP16_MIN_AGREEMENT,
            "passed": bool(diff <= FP16_ATOL and agree >= FP16_MIN_AGREEMENT),
            "throughput_images_per_s": n / (time.perf_counter() - t0), "throughput_batch": batch}


def build_and_verify(export_dir: Path, images: np.ndarray, img_size: int, max_batch: int) -> dict:
    """EXPORT/model.engine + EXPORT/engine.json from EXPORT/model.onnx; fails on a bad engine."""
    export_dir = Path(export_dir)
    doc = build_engine(export_dir / "model.onnx", export_dir / "model.engine", profile_for(img_size, max_batch))
    doc["verification"] = verify_engine(export_dir / "model.engine", export_dir / "model.onnx", images, max_batch)
    v = doc["verification"]
    info(f"tensorrt: FP16 engine for {doc['gpu']} (sm {doc['compute_capability']}, TensorRT {doc['tensorrt']}) "
         f"in {doc['build_seconds']}s; vs ONNX Runtime max |dp| {v['max_abs_diff']:.2e}, arg-max agreement "
         f"{100 * v['argmax_agreement']:.1f}%, {v['throughput_images_per_s']:.0f} images/s at batch {v['throughput_batch']}")
    if not v["passed"]:
        raise UserError(f"TensorRT engine verification failed: max |dp| {v['max_abs_diff']:.2e} "
                        f"(limit {FP16_ATOL}), arg-max agreement {v['argmax_agreement']:.3f} (min {FP16_MIN_AGREEMENT})")
    atomic_write_json(export_dir / "engine.json", doc)
    return doc


def engine_mismatches(export_dir: Path) -> list[str]:
    """What differs between EXPORT/engine.json and this machine / EXPORT/model.onnx (empty: none)."""
    export_dir = Path(export_dir)
    doc_path, engine = export_dir / "engine.json", export_dir / "model.engine"
    if not doc_path.is_file() or not engine.is_file():
        return ["no engine has been built for this export"]
    doc, here = read_json(doc_path), machine()
    out = [f"{k} {doc.get(k)!r} -> {here[k]!r}" for k in ("tensorrt", "gpu", "compute_capability") if doc.get(k) != here[k]]
    onnx_path = export_dir / doc.get("onnx", "model.onnx")
    if onnx_path.is_file() and sha256_file(onnx_path) != doc.get("onnx_sha256"):
        out.append(f"{onnx_path.name} changed since the engine was built")
    if sha256_file(engine) != doc.get("engine_sha256"):
        out.append("model.engine is not the file engine.json describes")
    return out


def check_engine(export_dir: Path, rebuild: bool = True) -> Path:
    """Path of a loadable engine for this machine: rebuilt (with the recorded profile) when
    engine.json does not match the TensorRT version, the GPU, or the ONNX graph, or when the
    engine fails to deserialize.  ``rebuild=False`` raises the clear message instead."""
    require()
    export_dir = Path(export_dir)
    problems = engine_mismatches(export_dir)
    if not problems:
        try:
            EngineRunner(export_dir / "model.engine")
            return export_dir / "model.engine"
        except EngineMismatch as e:
            problems = [str(e)]
    msg = f"TensorRT engine in {export_dir} does not fit this machine: {'; '.join(problems)}"
    if not rebuild:
        raise EngineMismatch(msg + " (rebuild it with `ssl export RUN --trt --force` or check_engine(rebuild=True))")
    warn(msg + "; rebuilding it")
    old = read_json(export_dir / "engine.json") if (export_dir / "engine.json").is_file() else {}
    profile = old.get("profile")
    if profile is None:
        from semivit.export.graph import read_metadata

        size = int(read_metadata(export_dir / "model.onnx")["img_size"])
        profile = profile_for(size, 64)
    tmp = export_dir / ".model.engine.rebuild"
    doc = build_engine(export_dir / "model.onnx", tmp, profile)
    shutil.move(str(tmp), str(export_dir / "model.engine"))
    doc["engine"] = "model.engine"
    doc["rebuilt_because"] = problems
    doc["verification"] = old.get("verification")
    atomic_write_json(export_dir / "engine.json", doc)
    from semivit.export.meta import refresh_hashes

    refresh_hashes(export_dir, ["model.engine", "engine.json"])
    return export_dir / "model.engine"
