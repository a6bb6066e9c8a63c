"""PyTorch ensemble -> one ONNX graph: the exporter (dynamo first, TorchScript as fallback), the
external-data decision, metadata_props, and small read-only inspections of a saved graph.

Graph contract (the serving engine relies on it):
    input  ``images``  uint8   [N, S, S, 3]   (N dynamic; RGB, already resized to S x S)
    output ``probs``   float32 [N, C]         weighted ensemble probabilities (rows sum to 1)
    output ``label``   int64   [N]            arg-max of ``probs``
"""

from __future__ import annotations

import io
import json
import warnings
from collections import Counter
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Optional

import onnx
import torch
from torch import nn

from semivit.errors import UserError

OPSET = 18  # >= 17 keeps LayerNormalization one op; 18 is the dynamo exporter's native opset
INPUT, OUTPUTS = "images", ("probs", "label")
# A serialized protobuf cannot pass 2 GiB.  Weights are nearly all of a ViT graph's bytes, so the
# decision is made on the parameter byte count, with a margin for the graph and metadata.
PROTO_LIMIT_BYTES = int(0.9 * 2**31)


def param_bytes(model: nn.Module) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def needs_external_data(model: nn.Module) -> bool:
    return param_bytes(model) > PROTO_LIMIT_BYTES


def _example(img_size: int) -> torch.Tensor:
    # batch 2, not 1: torch.export specialises a dimension whose example size is 1
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (2, img_size, img_size, 3), dtype=torch.uint8, generator=g)


def _export_dynamo(model: nn.Module, path: Path, img_size: int, external: bool) -> None:
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    quiet = io.StringIO()
    with warnings.catch_warnings(), redirect_stdout(quiet), redirect_stderr(quiet):
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(model, (_example(img_size),), dynamo=True, opset_version=OPSET,
                                 input_names=[INPUT], output_names=list(OUTPUTS),
                                 dynamic_shapes={INPUT: {0: batch}}, verbose=False)
        prog.save(str(path), external_data=external)


def _export_torchscript(model: nn.Module, path: Path, img_size: int) -> None:
    axes = {INPUT: {0: "batch"}, OUTPUTS[0]: {0: "batch"}, OUTPUTS[1]: {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (_example(img_size),), str(path), dynamo=False, opset_version=OPSET,
                          input_names=[INPUT], output_names=list(OUTPUTS), dynamic_axes=axes,
                          do_constant_folding=True)


def export_graph(model: nn.Module, path: Path, img_size: int, exporter: str = "auto") -> dict:
    """Export ``model`` (uint8 NHWC -> (probs, label)) to ``path``.

    ``exporter``: ``auto`` tries torch's dynamo exporter and falls back to the TorchScript one
    when it fails; ``dynamo`` / ``torchscript`` force one.  Weights go to ``<name>.data`` beside the
    graph (external-data format) when they pass the protobuf limit.  Returns what was done.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    external = needs_external_data(model)
    info = {"opset": OPSET, "external_data": external, "param_bytes": param_bytes(model)}
    with torch.no_grad():
        if exporter in ("auto", "dynamo"):
            try:
                _export_dynamo(model, path, img_size, external)
                info["exporter"] = "dynamo"
            except Exception as e:  # noqa: BLE001 - any exporter failure -> the other exporter
                if exporter == "dynamo":
                    raise
                msg = (str(e).strip().splitlines() or [""])[0][:300]
                info["dynamo_error"] = f"{type(e).__name__}: {msg}"
                _clean(path)
        if "exporter" not in info:
            _export_torchscript(model, path, img_size)
            info["exporter"] = "torchscript"
    _consolidate(path, external)
    _strip_debug(path)
    check_graph(path)
    return info


def _strip_debug(path: Path) -> None:
    """Drop per-node debug metadata (the dynamo exporter stores source stack traces with local
    paths on every node: half the file for a small model, and nothing a deployment needs)."""
    model = onnx.load(str(path), load_external_data=False)
    for n in model.graph.node:
        del n.metadata_props[:]
        n.doc_string = ""
    onnx.save_model(model, str(path))


def data_file(path: Path) -> Path:
    return Path(str(path) + ".data")


def _clean(path: Path) -> None:
    for p in (path, data_file(path)):
        if p.exists():
            p.unlink()


def _consolidate(path: Path, external: bool) -> None:
    """One layout whatever the exporter wrote: weights inline, or all in ``<name>.data``.

    The TorchScript exporter writes one external file per large tensor; the dynamo exporter
    may write a ``.data`` file even for small graphs.  Rewrite to the chosen layout.
    """
    model = onnx.load(str(path), load_external_data=False)
    uses_external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    if not uses_external and not external:
        return
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    if not external or locations != {data_file(path).name}:
        model = onnx.load(str(path), load_external_data=True)
        for loc in locations:
            p = path.parent / loc
            if p.exists() and p != path:
                p.unlink()
        save_model(model, path, external)


def save_model(model: onnx.ModelProto, path: Path, external: bool) -> None:
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_file(path).name, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def check_graph(path: Path) -> None:
    """onnx.checker on the *path* (works past 2 GiB with external data) plus the I/O contract."""
    try:
        onnx.checker.check_model(str(path))
    except Exception as e:  # noqa: BLE001
        raise UserError(f"exported graph {path.name} fails onnx.checker: {str(e).splitlines()[0]}") from None
    model = onnx.load(str(path), load_external_data=False)
    ins = [(i.name, i.type.tensor_type.elem_type) for i in model.graph.input]
    outs = [(o.name, o.type.tensor_type.elem_type) for o in model.graph.output]
    want_in = [(INPUT, onnx.TensorProto.UINT8)]
    want_out = [(OUTPUTS[0], onnx.TensorProto.FLOAT), (OUTPUTS[1], onnx.TensorProto.INT64)]
    if ins != want_in or outs != want_out:
        raise UserError(f"exported graph {path.name} has I/O {ins} -> {outs}, expected {want_in} -> {want_out}")


def set_metadata(path: Path, props: dict) -> None:
    """Write ``props`` into the graph's metadata_props (values JSON-encoded unless strings).

    The weights are not touched: a graph with external data keeps its ``.data`` file as is.
    """
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    del model.metadata_props[:]
    for k, v in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v if isinstance(v, str) else json.dumps(v)
    model.producer_name = "semivit"
    onnx.save_model(model, str(path))


def read_metadata(path: Path) -> dict:
    model = onnx.load(str(path), load_external_data=False)
    out = {}
    for p in model.metadata_props:
        try:
            out[p.key] = json.loads(p.value)
        except ValueError:
            out[p.key] = p.value
    return out


# ----------------------------------------------------------------------------- inspection
def op_counts(path: Path) -> Counter:
    model = onnx.load(str(path), load_external_data=False)
    return Counter(n.op_type for n in model.graph.node)


def flip_slices(path: Path) -> int:
    """How many Slice nodes reverse an axis (step -1): the horizontal-flip TTA pattern.

    Both exporters lower ``torch.flip`` to ``Slice(starts=-1, ends=-big, axes=[a], steps=[-1])``;
    the steps are constants (initializers or Constant nodes).
    """
    model = onnx.load(str(path), load_external_data=False)
    consts = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = a.t
    count = 0
    for n in model.graph.node:
        if n.op_type == "Slice" and len(n.input) >= 5 and n.input[4] in consts:
            t = consts[n.input[4]]
            if t.data_location != onnx.TensorProto.EXTERNAL:
                steps = onnx.numpy_helper.to_array(t).reshape(-1).tolist()
                if any(s < 0 for s in steps):
                    count += 1
    return count


def member_count(path: Path) -> int:
    """Distinct ensemble members whose weights the graph holds (initializers ``members.<i>.*``,
    the PyTorch parameter names both exporters keep)."""
    model = onnx.load(str(path), load_external_data=False)
    return len({t.name.split(".")[1] for t in model.graph.initializer
                if t.name.startswith("members.") and t.name.split(".")[1].isdigit()})


def describe(path: Path) -> dict:
    ops = op_counts(path)
    return {"nodes": int(sum(ops.values())), "layer_norm_nodes": int(ops.get("LayerNormalization", 0)),
            "softmax_nodes": int(ops.get("Softmax", 0)), "flip_slices": flip_slices(path),
            "member_weight_sets": member_count(path)}
