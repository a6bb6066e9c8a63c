"""Inference backends behind one interface, chosen by name from a registry.

Every backend takes uint8 images (N, S, S, 3), already resized with
:func:`semivit.data.decode.load_rgb`, and returns (probabilities float32 (N, C), labels int64 (N,)).
Each has ``levels``: the degradation steps of :mod:`semivit.serve.scheduler`, most expensive
first (full ensemble with TTA -> no TTA -> fewer members), and ``set_level(i)``.

Names (``open_backend(model, name)``):

    tensorrt              native TensorRT engine (EXPORT/model.engine + engine.json)
    onnxruntime-tensorrt  ONNX Runtime, TensorRT execution provider
    onnxruntime-cuda      ONNX Runtime, CUDA execution provider
    onnxruntime-cpu       ONNX Runtime, CPU execution provider
    onnxruntime-int8      ONNX Runtime CPU on the export's dynamic-INT8 graph (model.int8.onnx)
    onnxruntime-int8-qdq  ONNX Runtime CPU on the export's static QDQ INT8 graph (model.int8-qdq.onnx)
    openvino              OpenVINO CPU, FP32 (optional extra `openvino`)
    openvino-bf16         OpenVINO CPU with the bf16 inference-precision hint (native bf16 CPUs only)
    openvino-int8         OpenVINO CPU on the export's NNCF INT8 IR (model.ov-int8.xml)
    torch                 PyTorch eager on the run's checkpoints (CUDA when available)

and the command line's choices on top of them:

    auto         the first that opens of tensorrt (if an engine exists), onnxruntime-cuda (if a
                 GPU and the CUDA provider exist), the CPU backend `ssl export` chose (meta.json
                 "serving": the fastest candidate within the accuracy gate on the exporting
                 machine), onnxruntime-cpu, torch; each one skipped is printed with its reason,
                 and the one chosen says which provider really runs
    onnxruntime  onnxruntime-cuda when onnxruntime-gpu and an NVIDIA GPU are present, else -cpu
    tensorrt     the native engine when EXPORT/model.engine exists, else onnxruntime-tensorrt

A GPU backend whose session silently fell back to the CPU is an error (BackendUnavailable),
never a quiet slowdown.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from semivit.errors import UserError
from semivit.integrity import ExportTampered
from semivit.serve.resolve import ModelRef, resolve_model_dir
from semivit.utils import cpu_name, physical_core_count, warn


class BackendUnavailable(UserError):
    """This backend cannot run here (missing package, no GPU, provider fell back, no file)."""


@dataclass(frozen=True)
class Level:
    """One degradation step: which graph/members, with or without flip TTA."""

    name: str
    tta: bool
    members: int
    file: Optional[str] = None  # graph or engine file, relative to the export directory
    member_names: tuple[str, ...] = ()  # torch: the members used (empty = all)

    @property
    def cost(self) -> int:
        """Relative compute per image: forward passes of one member."""
        return max(1, self.members) * (2 if self.tta else 1)

    def describe(self) -> str:
        return f"{self.name} (TTA {'on' if self.tta else 'off'}, {self.members} members)"


class Backend:
    """Base class.  Subclasses set ``name``, fill ``levels`` and implement ``_activate``/``_run``."""

    name = "base"

    def __init__(self, ref: ModelRef):
        self.ref = ref
        self.classes = list(ref.classes)
        self.img_size = int(ref.img_size)
        self.levels: list[Level] = []
        self.level = 0
        self.load_seconds: dict[int, float] = {}  # level -> seconds its activation took
        self.why: Optional[str] = None  # why ``auto`` picked this backend, when the export chose it

    def level_file(self, i: int) -> Path:
        """The graph file of level ``i`` in the export directory; BackendUnavailable if it is gone."""
        path = self.ref.export_dir / self.levels[i].file
        if not path.is_file():
            raise BackendUnavailable(f"cannot load the model: {path} does not exist")
        return path

    # -- interface ---------------------------------------------------------------------------
    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        images = np.ascontiguousarray(images, dtype=np.uint8)
        s = self.img_size
        if images.ndim != 4 or images.shape[1:] != (s, s, 3):
            raise ValueError(f"expected uint8 images (N, {s}, {s}, 3), got {images.shape}")
        if len(images) == 0:
            return np.zeros((0, len(self.classes)), np.float32), np.zeros(0, np.int64)
        probs, labels = self._run(images)
        return np.asarray(probs, dtype=np.float32), np.asarray(labels, dtype=np.int64).reshape(-1)

    def set_level(self, i: int) -> None:
        if not 0 <= i < len(self.levels):
            raise IndexError(f"level {i} out of range (0..{len(self.levels) - 1})")
        if i not in self.load_seconds:
            import time

            self._check_file(self.levels[i])
            t = time.perf_counter()
            self._activate(i)
            self.load_seconds[i] = time.perf_counter() - t
        else:
            self._activate(i)
        self.level = i

    def load_estimate(self, i: int) -> float:
        """Seconds that ``set_level(i)`` is expected to take (0 when already loaded)."""
        return 0.0

    def _check_file(self, level: "Level") -> None:
        """A graph/engine of an export is hashed right before its first load and must match
        meta.json's ``files`` (semivit.integrity) - whichever backend loads it."""
        if level.file and self.ref.export_dir is not None and level.file in (self.ref.meta.get("files") or {}):
            from semivit.integrity import check_files

            check_files(self.ref.export_dir, self.ref.meta, [level.file])

    def describe(self) -> str:
        return self.name

    def close(self) -> None:
        pass

    # -- to implement ------------------------------------------------------------------------
    def _activate(self, i: int) -> None:
        raise NotImplementedError

    def _run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


# --- helpers shared by the backends ---------------------------------------------------------

def physical_cores() -> int:
    """Physical cores this process may use: /proc/cpuinfo cores, capped by affinity and cgroup quota."""
    return physical_core_count()


def default_threads() -> int:
    """Inference threads: ``SEMIVIT_THREADS`` when set, else one per physical core.  (On a box
    shared with other jobs, 1 can beat one-per-core: see benchmarks/results/predict_speed.md.)"""
    env = os.environ.get("SEMIVIT_THREADS", "").strip()
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise UserError(f"SEMIVIT_THREADS must be a whole number, not {env!r}") from None
    return physical_cores()


def has_nvidia_gpu() -> bool:
    """Cheap check (no CUDA initialisation): an NVIDIA driver with at least one GPU."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return (gpus.is_dir() and any(gpus.iterdir())) or Path("/dev/nvidia0").exists()


def export_levels(ref: ModelRef) -> list[Level]:
    """Degradation levels of an export: meta.json "levels" whose files exist, else the one graph."""
    meta, levels = ref.meta, []
    for lv in meta.get("levels") or []:
        f = lv.get("file")
        if f and (ref.export_dir / f).is_file():
            levels.append(Level(str(lv["name"]), bool(lv.get("tta", False)),
                                int(lv.get("members") or len(meta.get("members", [])) or 1), f))
        elif f:
            warn(f"{ref.export_dir}: level {lv.get('name')} lists {f}, which is missing; not used")
    if not levels:
        levels = [Level("full", bool(meta.get("tta", True)), len(meta.get("members", [])) or 1, "model.onnx")]
    return levels


def first_line(e: BaseException) -> str:
    s = str(e).strip()
    return re.sub(r"\s+", " ", s.splitlines()[0])[:300] if s else type(e).__name__


# --- registry -------------------------------------------------------------------------------

_REGISTRY: dict[str, Callable[..., Backend]] = {}


def register_backend(name: str):
    def deco(factory):
        _REGISTRY[name] = factory
        return factory

    return deco


def _ensure_registered() -> None:
    # Importing the modules registers them; none imports its heavy runtime at module level.
    from semivit.serve import ort_session, ov_session, torch_eager, trt_engine  # noqa: F401


def backend_names() -> list[str]:
    _ensure_registered()
    return sorted(_REGISTRY) + ["auto", "onnxruntime"]


def _candidates(ref: ModelRef, name: str) -> list[str]:
    if name == "auto":
        order = []
        if ref.export_dir is not None:
            if (ref.export_dir / "model.engine").is_file():
                order.append("tensorrt")
            if has_nvidia_gpu() and _ort_has("CUDAExecutionProvider"):
                order.append("onnxruntime-cuda")
            chosen = export_choice(ref)
            if chosen and chosen in _REGISTRY:
                order.append(chosen)
            if "onnxruntime-cpu" not in order:
                order.append("onnxruntime-cpu")
        if ref.run_dir is not None:
            order.append("torch")
        return order
    if name == "onnxruntime":
        return ["onnxruntime-cuda" if has_nvidia_gpu() and _ort_has("CUDAExecutionProvider") else "onnxruntime-cpu"]
    if name == "tensorrt" and ref.export_dir is not None and not (ref.export_dir / "model.engine").is_file():
        return ["onnxruntime-tensorrt"]
    return [name]


def export_choice(ref: ModelRef) -> Optional[str]:
    """The CPU backend ``ssl export`` chose for ``auto`` (meta.json ``serving.auto``), if any."""
    serving = ref.meta.get("serving") if ref.export_dir is not None else None
    return serving.get("auto") if isinstance(serving, dict) else None


def _choice_reason(ref: ModelRef, name: str) -> Optional[str]:
    serving = ref.meta.get("serving") or {}
    if name != serving.get("auto"):
        return None
    why = serving.get("why") or "chosen at export"
    here = cpu_name()
    there = (serving.get("machine") or {}).get("cpu")
    if there and there != here:
        why += f" (measured on {there}; this CPU is {here})"
    return why


def _ort_has(provider: str) -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return provider in ort.get_available_providers()


def open_backend(model: Union[Path, str, ModelRef], name: str = "auto", **options) -> Backend:
    """Open ``model`` (a path or a resolved :class:`ModelRef`) with the backend ``name``.

    ``options`` go to the backend (e.g. ``threads=``).  Raises :class:`UserError` (one line)
    when it cannot be opened; with ``auto`` every candidate that failed is named in the message.
    """
    _ensure_registered()
    ref = model if isinstance(model, ModelRef) else resolve_model_dir(Path(model))
    if name not in _REGISTRY and name not in ("auto", "onnxruntime"):
        raise UserError(f"unknown backend {name!r}; choose from {', '.join(backend_names())}")
    names = _candidates(ref, name)
    if not names:
        raise UserError(f"no backend can serve {ref.describe()}")
    failures = []
    for i, n in enumerate(names):
        try:
            backend = _REGISTRY[n](ref, **options)
            backend.why = _choice_reason(ref, n) if name == "auto" else None
            return backend
        except UserError as e:
            if name != "auto" or isinstance(e, ExportTampered):  # a tampered export is refused, not worked around
                raise
            failures.append(f"{n}: {e}")
            if i + 1 < len(names):
                warn(f"backend {n} not used: {e}; trying {names[i + 1]}")
    raise UserError("no backend could open the model - " + "; ".join(failures))
