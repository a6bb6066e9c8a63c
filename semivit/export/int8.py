"""INT8 graph for CPU serving: ONNX Runtime dynamic quantization, accepted only when it keeps
macro F1 on the run's validation data.

Why dynamic (weights INT8 per tensor, activations quantised on the fly) and not static QDQ:
a ViT's weights are almost all in MatMul/Gemm, which is where dynamic quantization acts, and its
activations (post-LayerNorm, attention, GELU) have outliers that fixed calibrated scales clip; it
needs no calibration set, so no images of the run leak into the graph.  Conv (the hybrid stem) is
left in FP32: ConvInteger is slower than FP32 Conv on ONNX Runtime's CPU kernels.  One property to
know: activation scales are computed per batch, so an image's probabilities can move by a few
1e-3 with the other images in its batch.

Validation data: every labeled image validates in exactly one CV fold (RUN/folds.json), and each
member records the fold it was validated on, so each image is scored by the members that never
trained on it (their weights renormalised) - the ensemble's out-of-fold macro F1, computed the same
way for FP32 and INT8 from the members' weighted outputs inside each graph.  When the members'
outputs cannot be located in the graph, or no member has a fold, the whole ensemble is scored on
all labeled images instead, and meta.json says so.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
import torch

from semivit.errors import UserError
from semivit.export.verify import RunImages, ort_session
from semivit.utils import info

TOLERANCE = 0.01  # largest accepted macro-F1 drop, INT8 vs FP32
OP_TYPES = ["MatMul", "Gemm"]
EVAL_BATCH = 32


class Int8Refused(UserError):
    """INT8 lost too much macro F1; the FP32 export is complete, the INT8 graph was not kept."""


class _Calibration:
    """ONNX Runtime's CalibrationDataReader protocol over uint8 image batches."""

    def __init__(self, images: np.ndarray, batch: int = 8):
        self.batches = [np.ascontiguousarray(images[s:s + batch]) for s in range(0, len(images), batch)]
        self.i = 0

    def get_next(self):
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return {"images": self.batches[self.i - 1]}

    def rewind(self):
        self.i = 0


STATIC_OP_TYPES = ["Conv", "MatMul", "Gemm"]  # the Conv stem included; softmax and the ensemble sum stay FP32


def quantize(src: Path, dst: Path, calibration: Optional[np.ndarray] = None) -> None:
    """``src`` -> ``dst`` dynamically quantised, after ONNX Runtime's recommended pre-processing
    (symbolic shape inference and graph optimisation; the dynamo exporter's graphs fail the
    quantizer's own repeated shape inference without it).

    With ``calibration`` (uint8 images, the run's training images): static QDQ instead -
    weights QInt8 per output channel, activations QUInt8 with MinMax ranges calibrated on those
    images, Conv (the stem), MatMul and Gemm quantised (the QDQ format ONNX Runtime fuses into
    integer kernels on VNNI CPUs)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    external = any(t.data_location == onnx.TensorProto.EXTERNAL
                   for t in onnx.load(str(src), load_external_data=False).graph.initializer)
    pre = dst.with_name(f".{dst.stem}.pre.onnx")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer warns through the root logger
    src, dst, pre = Path(src).resolve(), Path(dst).resolve(), pre.resolve()
    try:
        # The pre-processing's symbolic shape inference leaves sym_shape_infer_temp.onnx (and a
        # .data file) in the *current directory* when it fails: run it where that cannot litter.
        with tempfile.TemporaryDirectory(prefix="semivit-int8-") as scratch, contextlib.chdir(scratch):
            quant_pre_process(str(src), str(pre), skip_optimization=external, save_as_external_data=external,
                              all_tensors_to_one_file=True, external_data_location=f"{pre.name}.data")
            exclude = graph_nodes_to_exclude(onnx.load(str(pre), load_external_data=False))
            if calibration is None:
                quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=OP_TYPES,
                                 per_channel=False, use_external_data_format=external, nodes_to_exclude=exclude)
            else:
                quantize_static(str(pre), str(dst), _Calibration(calibration), quant_format=QuantFormat.QDQ,
                                op_types_to_quantize=STATIC_OP_TYPES, per_channel=True, nodes_to_exclude=exclude,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                calibrate_method=CalibrationMethod.MinMax, use_external_data_format=external)
    finally:
        root.setLevel(level)
        for p in (pre, Path(f"{pre}.data")):
            p.unlink(missing_ok=True)
    if not external:
        model = onnx.load(str(dst))
        model.producer_name = "semivit"
        onnx.save_model(model, str(dst))


# ----------------------------------------------------------------------------- member outputs
def member_terms(model: onnx.ModelProto) -> list[str]:
    """The tensors summed into ``probs``: each member's weighted probabilities, in order.

    EnsembleModel sums ``w_0 p_0 + w_1 p_1 + ...``, a left-deep chain of Add nodes, which is
    ``probs`` itself - or, with the pool graph at its end (semivit.models.pool_graph), the last
    input of the graph's final Where (``where(reached, spread, ensemble)``).  Callers check the
    terms against the PyTorch members (:func:`_terms_match_members`) before trusting them.
    """
    producer = {o: n for n in model.graph.node for o in n.output}

    def leaves(name: str) -> list[str]:
        n = producer.get(name)
        if n is not None and n.op_type == "Identity":
            return leaves(n.input[0])
        if n is not None and n.op_type == "Add":
            return leaves(n.input[0]) + leaves(n.input[1])
        return [name]

    wheres = [n for n in model.graph.node if n.op_type == "Where"]
    if producer.get("probs") is not None and producer["probs"].op_type == "Div" and wheres:
        # the pool graph: torch.where(reached, spread, probs) - its last input is the ensemble sum
        return leaves(wheres[-1].input[2])
    return leaves("probs")


def graph_nodes_to_exclude(model: onnx.ModelProto) -> list[str]:
    """The pool graph's similarity MatMul (against its node matrix, ``pool_graph.nodes_t``): kept
    in FP32 - a nearest-neighbour search on INT8 similarities could reorder close neighbours, and
    the accuracy gate scores the members' terms, not the graph's neighbours."""
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and any("nodes_t" in i for i in n.input)]


def _with_outputs(path: Path, names: list[str]) -> Path:
    """A copy of the graph beside it (so external data still resolves) exposing ``names``."""
    model = onnx.load(str(path), load_external_data=False)
    for name in names:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    out = path.with_name(f".{path.stem}.members.onnx")
    onnx.save_model(model, str(out))
    return out


def run_members(path: Path, names: list[str], images: np.ndarray, batch: int = EVAL_BATCH):
    """(probs, member terms [M, N, C], seconds) of the graph at ``path`` on ``images``."""
    tmp = _with_outputs(path, names)
    try:
        sess = ort_session(tmp)
        sess.run(None, {"images": images[:batch]})  # warm-up, not timed
        probs, terms = [], []
        t0 = time.perf_counter()
        for s in range(0, len(images), batch):
            out = sess.run(["probs", *names], {"images": np.ascontiguousarray(images[s:s + batch])})
            probs.append(out[0])
            terms.append(np.stack(out[1:]) if names else np.zeros((0, *out[0].shape), np.float32))
        seconds = time.perf_counter() - t0
    finally:
        tmp.unlink(missing_ok=True)
    return np.concatenate(probs), np.concatenate(terms, axis=1), seconds


@torch.no_grad()
def _terms_match_members(terms: np.ndarray, model, images: np.ndarray, atol: float = 1e-4) -> bool:
    """Are the graph's terms w_i * p_i of the PyTorch members, in order (independent check)?
    Members that share the ensemble's frozen stem (``model.stem``) get its features, as in
    ``EnsembleModel.forward``."""
    if terms.shape[0] != len(model.members):
        return False
    x = model.pre(torch.from_numpy(np.ascontiguousarray(images)))
    views = [x, x.flip(3)] if model.tta else [x]
    if getattr(model, "stem", None) is not None:
        views = [model.stem(v) for v in views]
    for i, m in enumerate(model.members):
        p = torch.softmax(m(views[0]), dim=1)
        if model.tta:
            p = 0.5 * (p + torch.softmax(m(views[1]), dim=1))
        if not np.allclose(terms[i], (p * model.weights[i]).numpy(), atol=atol):
            return False
    return True


# ----------------------------------------------------------------------------- scoring
def macro_f1(y: np.ndarray, pred: np.ndarray, n_cls: int) -> float:
    """semivit's macro F1 (one definition for training, the INT8 gate and the candidates)."""
    from semivit.metrics import macro_f1 as _f1

    return float(_f1(y, pred, n_cls))


def oof_predictions(terms: np.ndarray, weights: np.ndarray, member_folds: list[Optional[int]],
                    image_folds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Arg-max of the out-of-fold ensemble per image and a mask of images that have one."""
    preds = np.full(terms.shape[1], -1, dtype=np.int64)
    for k in np.unique(image_folds):
        idx = [i for i, f in enumerate(member_folds) if f is not None and int(f) == int(k)]
        rows = image_folds == k
        if idx:
            p = terms[idx][:, rows].sum(0) / weights[idx].sum()
            preds[rows] = p.argmax(1)
    return preds, preds >= 0


def evaluate(fp32: Path, int8: Path, model, members: list[dict], data: RunImages) -> dict:
    """Macro F1 of the FP32 and INT8 graphs on the run's validation data, plus speed."""
    from semivit.metrics import macro_f1

    names = member_terms(onnx.load(str(fp32), load_external_data=False))
    p32, t32, s32 = run_members(fp32, names, data.images)
    n_cls = p32.shape[1]
    weights = np.asarray([m["weight"] for m in members], dtype=np.float64)
    weights = weights / weights.sum()
    mapped = _terms_match_members(t32[:, :8], model, data.images[:8])
    folds = [m.get("fold") for m in members]
    if mapped and any(f is not None for f in folds):
        int8_names = member_terms(onnx.load(str(int8), load_external_data=False))
        if len(int8_names) != len(names):
            raise UserError("the INT8 graph's ensemble sum differs from the FP32 graph's; cannot score it")
        p8, t8, s8 = run_members(int8, int8_names, data.images)
        # same member order: each INT8 term is nearest to the FP32 term of the same member
        err = np.abs(t8[:, None] - t32[None]).mean(axis=(2, 3))
        if not (err.argmin(1) == np.arange(len(names))).all():
            raise UserError("cannot match the INT8 graph's member outputs to the FP32 graph's")
        y32, mask = oof_predictions(t32, weights, folds, data.folds)
        y8, _ = oof_predictions(t8, weights, folds, data.folds)
        how = ("out-of-fold: each labeled image scored by the ensemble members validated on its fold "
               "(weights renormalised), i.e. by members that never trained on it")
    else:
        p8, _, s8 = run_members(int8, [], data.images)
        y32, y8, mask = p32.argmax(1), p8.argmax(1), np.ones(len(p32), dtype=bool)
        how = "all labeled images, whole ensemble (members' folds unknown): optimistic, training images"
    y = data.labels[mask]
    f32, f8 = macro_f1(y, y32[mask], n_cls), macro_f1(y, y8[mask], n_cls)
    n = len(data.images)
    return {
        "method": "onnxruntime.quantization.quantize_dynamic (weights QInt8 per tensor; MatMul, Gemm)",
        "validation": how, "images": int(mask.sum()),
        "macro_f1_fp32": f32, "macro_f1_int8": f8, "drop": f32 - f8,
        "argmax_agreement": float((p32.argmax(1) == p8.argmax(1)).mean()),
        "max_abs_prob_diff": float(np.abs(p32 - p8).max()),
        "ms_per_image_fp32": 1000 * s32 / n, "ms_per_image_int8": 1000 * s8 / n, "speed_batch": EVAL_BATCH,
    }


def _size(path: Path) -> int:
    data = Path(str(path) + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def add_int8(export_dir: Path, model, members: list[dict], data: RunImages,
             tolerance: Optional[float] = None) -> dict:
    """Write EXPORT/model.int8.onnx from EXPORT/model.onnx and keep it only if the macro F1 drop
    is <= ``tolerance``; otherwise delete it and raise :class:`Int8Refused` (with the report on
    ``.report``)."""
    tolerance = TOLERANCE if tolerance is None else tolerance
    fp32, int8 = Path(export_dir) / "model.onnx", Path(export_dir) / "model.int8.onnx"
    quantize(fp32, int8)
    report = evaluate(fp32, int8, model, members, data)
    report.update({"file": int8.name, "tolerance": tolerance, "bytes_fp32": _size(fp32), "bytes_int8": _size(int8)})
    report["accepted"] = bool(report["drop"] <= tolerance)
    line = (f"int8: macro F1 {report['macro_f1_int8']:.4f} vs FP32 {report['macro_f1_fp32']:.4f} "
            f"(drop {report['drop']:+.4f}, limit {tolerance}) on {report['images']} validation images; "
            f"{report['bytes_fp32'] / 1e6:.1f} MB -> {report['bytes_int8'] / 1e6:.1f} MB, "
            f"{report['ms_per_image_fp32']:.2f} -> {report['ms_per_image_int8']:.2f} ms/image")
    info(line)
    if not report["accepted"]:
        for p in (int8, Path(str(int8) + ".data")):
            p.unlink(missing_ok=True)
        report["file"] = None
        err = Int8Refused(f"INT8 refused: macro F1 drops {report['drop']:.4f} > {tolerance} "
                          f"({report['macro_f1_fp32']:.4f} -> {report['macro_f1_int8']:.4f}); "
                          "no INT8 graph kept, the FP32 export is complete")
        err.report = report
        raise err
    return report
