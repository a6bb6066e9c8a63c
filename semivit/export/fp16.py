"""FP32 -> FP16 ONNX graph with the I/O kept (uint8 ``images`` in, float32 ``probs`` and int64
``label`` out), for TensorRT 11, which builds strongly typed networks only (no FP16 builder flag).

Written with onnx helpers rather than onnxconverter-common's ``convert_float_to_float16``: that
converter leaves ``Cast(to=FLOAT)`` nodes untouched, so on this graph (whose first op casts the
uint8 images to float) it produces a graph that fails type checking.  The conversion here is
small because the graph is ours: every float32 tensor becomes float16 - initializers, Constant
and ConstantOfShape values, Cast targets - and one Cast back to float32 is appended before
``probs``.  LayerNormalization computes its statistics in float32 whatever its input type
(``stash_type`` = 1, the default), Softmax of FP16 logits is exact enough for class
probabilities, and the weighted average of probabilities in [0, 1] loses ~1e-3 at most.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from semivit.export.graph import save_model

F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16


def _half(t: TensorProto) -> TensorProto:
    if t.data_type != F32:
        return t
    arr = numpy_helper.to_array(t).astype(np.float32)
    arr = np.clip(arr, -65504.0, 65504.0).astype(np.float16)  # +-inf would poison masks/scales
    out = numpy_helper.from_array(arr, t.name)
    return out


def _constant_to_tensor(n: onnx.NodeProto) -> None:
    """Constant(value_float[s]=...) -> Constant(value=<float32 tensor>), converted next."""
    for a in list(n.attribute):
        if a.name in ("value_float", "value_floats"):
            vals = [a.f] if a.name == "value_float" else list(a.floats)
            arr = np.asarray(vals[0] if a.name == "value_float" else vals, dtype=np.float32)
            n.attribute.remove(a)
            n.attribute.append(helper.make_attribute("value", numpy_helper.from_array(arr)))


def convert_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return an FP16 copy of ``model`` (weights loaded) keeping the graph's I/O types."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    for i, t in enumerate(g.initializer):
        g.initializer[i].CopyFrom(_half(t))
    for n in g.node:
        if n.op_type == "Constant":
            _constant_to_tensor(n)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == F32:
                a.t.CopyFrom(_half(a.t))
            elif a.name == "to" and n.op_type == "Cast" and a.i == F32:
                a.i = F16
            elif a.name == "dtype" and a.i == F32:  # EyeLike, RandomNormal... (unused, but typed)
                a.i = F16
    # keep float outputs float32: rename the producer's tensor and cast it back
    for out in g.output:
        if out.type.tensor_type.elem_type != F32:
            continue
        inner = out.name + "_fp16"
        for n in g.node:
            for j, o in enumerate(n.output):
                if o == out.name:
                    n.output[j] = inner
            for j, x in enumerate(n.input):
                if x == out.name:
                    n.input[j] = inner
        g.node.append(helper.make_node("Cast", [inner], [out.name], to=F32, name=f"{out.name}_to_fp32"))
    del g.value_info[:]  # stale float32 annotations; the checker's shape inference redoes them
    for vi in g.input:  # float inputs stay float32 only if cast inside; ours is uint8
        if vi.type.tensor_type.elem_type == F32:
            raise ValueError(f"float32 graph input {vi.name!r} is not supported by this conversion")
    return model


def convert_file(src: Path, dst: Path) -> None:
    """FP16 copy of the graph at ``src`` written to ``dst`` (external data when ``src`` has it)."""
    src, dst = Path(src), Path(dst)
    external = any(t.data_location == TensorProto.EXTERNAL
                   for t in onnx.load(str(src), load_external_data=False).graph.initializer)
    half = convert_model(onnx.load(str(src)))
    save_model(half, dst, external)
    onnx.checker.check_model(str(dst), full_check=not external)
