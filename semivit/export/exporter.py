"""`ssl export RUN`: the run's ensemble as one verified ONNX graph per degradation level, plus
optional INT8 and TensorRT, written to EXPORT (default RUN/export) atomically.

Everything is written into a hidden temporary directory beside EXPORT and renamed into place at
the end, so an interrupted or failed export never leaves a directory that looks complete.

``--trt`` is checked up front: without TensorRT or a CUDA GPU nothing is exported and the command
fails at once with one line, instead of after minutes of ONNX work whose result the user did not
ask for alone (export without ``--trt`` here, or run the command on the GPU machine).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from semivit.errors import UserError
from semivit.export import graph, levels as levelmod, verify
from semivit.export.meta import write_meta
from semivit.utils import info, sha256_file, warn

EXPORTERS = ("auto", "dynamo", "torchscript")


def _exporter_choice(exporter: Optional[str]) -> str:
    choice = exporter or os.environ.get("SEMIVIT_ONNX_EXPORTER", "auto")
    if choice not in EXPORTERS:
        raise UserError(f"SEMIVIT_ONNX_EXPORTER must be one of {', '.join(EXPORTERS)}, not {choice!r}")
    return choice


def _versions() -> dict:
    import onnx
    import onnxruntime

    import semivit

    return {"semivit": getattr(semivit, "__version__", "?"), "torch": torch.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def _member_entry(m: dict) -> dict:
    keys = ("name", "path", "stage", "fold", "val_macro_f1", "weight")
    return {k: m.get(k) for k in keys}


def export_run(run: Path, out: Optional[Path] = None, trt: bool = False, int8: bool = False, tta: bool = True,
               max_batch: int = 64, force: bool = False, exporter: Optional[str] = None,
               int8_tolerance: Optional[float] = None, on_level: Optional[Callable[[str], None]] = None,
               candidates: Optional[str] = None) -> Path:
    """Export the run's ensemble; returns EXPORT.  See the module docstring and DESIGN.md.
    ``on_level(name)`` is called after each level's graph is written and verified (still in the
    hidden temporary directory): progress for callers, and a deterministic crash point for tests.
    ``candidates``: which serving candidates to build, gate and time for ``--backend auto``
    (``auto``: all that apply here, ``none``: FP32 only, or a comma list; see
    :mod:`semivit.export.candidates`); default ``SEMIVIT_EXPORT_CANDIDATES``, else ``auto``."""
    from semivit.export import candidates as candmod
    from semivit.models.ensemble import EnsembleModel, load_members, read_ensemble
    from semivit.models.pool_graph import graph_for, read_graph

    run = Path(run)
    out = Path(out) if out is not None else run / "export"
    exporter = _exporter_choice(exporter)
    if max_batch < 1:
        raise UserError(f"--max-batch must be >= 1, not {max_batch}")
    doc = read_ensemble(run)  # before anything is written: a clear error for a non-run
    spec = (candidates or os.environ.get("SEMIVIT_EXPORT_CANDIDATES") or "auto").strip()
    selection = candmod.parse_selection(spec)
    if not force and _up_to_date(run, out, tta=tta, int8=int8, trt=trt, candidates=spec):
        info(f"{out} is up to date with {run / 'ensemble.json'} (same options): nothing to do "
             "(--force re-exports)")
        return out
    _check_out(run, out, force)
    if trt:
        from semivit.export import tensorrt

        tensorrt.require()
    t_start = time.perf_counter()
    models, _, entries = load_members(run, doc)
    by_name = dict(zip([m["name"] for m in entries], models))
    size, classes = int(doc["img_size"]), list(doc["classes"])
    gate_all = int8 or selection != []  # the accuracy gates score every labeled image
    data = verify.load_run_images(run, classes, size, limit=None if gate_all else verify.MAX_VERIFY_IMAGES)
    check_images = verify.interleaved_subset(data, verify.MAX_VERIFY_IMAGES)
    plan = levelmod.plan_levels(entries, tta)
    pool_graph = read_graph(run)  # ensemble.graph: pool - ends every level that has its members
    with_graph = []

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    refused = None
    try:
        graphs, checks, exported = {}, {}, {}
        full_model = None
        for level in plan:
            g, g_idx = graph_for(pool_graph, [m["name"] for m in level.members])
            model = EnsembleModel([by_name[m["name"]] for m in level.members], [m["weight"] for m in level.members],
                                  tta=level.tta, mean=doc["mean"], std=doc["std"], graph=g, graph_members=g_idx).eval()
            if g is not None:
                with_graph.append(level.name)
            full_model = full_model or model
            path = tmp / level.file
            info(f"exporting {level.name}: {len(level.members)} members{', flip TTA' if level.tta else ''} ...")
            exported[level.name] = graph.export_graph(model, path, size, exporter=exporter)
            if exported[level.name]["exporter"] == "torchscript" and exporter == "auto":
                warn(f"the dynamo ONNX exporter failed ({exported[level.name]['dynamo_error']}); "
                     "using the TorchScript exporter (meta.json records it)")
                exporter = "torchscript"  # dynamo failed once: do not pay for it again per level
            checks[level.name] = verify.compare(path, model, check_images)
            info(verify.summary_line(level.name, checks[level.name]))
            if not checks[level.name]["passed"]:
                raise UserError(f"verification of the {level.name} graph failed: ONNX Runtime differs from "
                                f"PyTorch (max |dp| {checks[level.name]['max_abs_diff']:.2e}, arg-max agreement "
                                f"{100 * checks[level.name]['argmax_agreement']:.1f}%); nothing was exported")
            graphs[level.file] = graph.describe(path)
            graph.set_metadata(path, {
                "semivit_format": "semivit-export/1", "level": level.name, "classes": classes, "img_size": size,
                "mean": doc["mean"], "std": doc["std"], "tta": level.tta,
                "members": [{"name": m["name"], "weight": m["weight"]} for m in level.members],
                "source_run": str(run.resolve()), "opset": graph.OPSET, "exporter": exported[level.name]["exporter"],
                "verification": {k: checks[level.name][k] for k in ("max_abs_diff", "argmax_agreement", "images", "passed")},
            })
            if on_level is not None:
                on_level(level.name)
        int8_report = None
        if int8:
            from semivit.export import int8 as int8mod

            try:
                int8_report = int8mod.add_int8(tmp, full_model, plan[0].members, data, tolerance=int8_tolerance)
            except int8mod.Int8Refused as e:
                refused, int8_report = e, e.report
        serving = None
        if selection != []:
            try:
                serving = candmod.build(tmp, {"classes": classes, "img_size": size,
                                              "levels": [lv.contract() for lv in plan],
                                              "members": [_member_entry(m) for m in plan[0].members], "tta": tta},
                                        full_model, plan[0].members, data, selection=selection,
                                        int8_report=int8_report, tolerance=int8_tolerance)
            except Exception as e:  # noqa: BLE001 - the FP32 export is complete and verified without them
                why = f"{type(e).__name__}: {candmod._message(e)}"
                warn(f"serving candidates not evaluated ({why}); `--backend auto` serves ONNX Runtime FP32")
                candmod.cleanup(tmp)
                serving = {"auto": candmod.REFERENCE, "why": f"candidates not evaluated: {why}", "error": why,
                           "candidates": []}
            serving["selection"] = spec
        trt_doc = None
        if trt:
            from semivit.export import tensorrt

            trt_doc = tensorrt.build_and_verify(tmp, check_images, size, max_batch)
        first = exported[plan[0].name]
        write_meta(tmp, {
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "source_run": str(run.resolve()),
            "source_ensemble_sha256": sha256_file(run / "ensemble.json"),
            "classes": classes, "img_size": size, "mean": doc["mean"], "std": doc["std"],
            "input": {"name": "images", "dtype": "uint8", "shape": ["N", size, size, 3], "layout": "NHWC, RGB",
                      "preprocessing": doc.get("preprocessing")},
            "outputs": {"probs": {"dtype": "float32", "shape": ["N", len(classes)]},
                        "label": {"dtype": "int64", "shape": ["N"]}},
            "tta": tta, "tta_kind": "horizontal flip, batched inside the graph, mean of the two views' probabilities",
            "weighting": doc.get("weighting"), "formula": doc.get("formula"),
            "members": [_member_entry(m) for m in plan[0].members],
            "levels": [lv.contract() for lv in plan],
            "level_members": {lv.name: [{"name": m["name"], "weight": m["weight"]} for m in lv.members] for lv in plan},
            "opset": graph.OPSET, "exporter": first["exporter"], "dynamo_error": first.get("dynamo_error"),
            "external_data": any(e["external_data"] for e in exported.values()),
            "graphs": graphs, "verification": checks,
            "verification_images": {"count": int(len(check_images)), "source": data.source},
            "graph": _graph_entry(run, pool_graph, with_graph),
            "int8": int8_report, "tensorrt": trt_doc, "serving": serving, "versions": _versions(),
            "seconds": round(time.perf_counter() - t_start, 1),
        })
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    info(f"exported {len(plan[0].members)} members ({', '.join(lv.name for lv in plan)}) to {out} "
         f"in {time.perf_counter() - t_start:.0f}s")
    if refused is not None:
        raise refused
    return out


def _graph_entry(run: Path, doc, levels: list[str]):
    """meta.json ``graph``: the pool graph the levels end in (None: the run has none)."""
    if doc is None:
        return None
    keys = ("neighbors", "alpha", "share", "labeled", "pool", "pool_reached", "tta")
    return {"file": "graph.npz (of the source run; its nodes are inside the ONNX graphs)",
            "sha256": sha256_file(run / "graph.npz"), **{k: doc.get(k) for k in keys},
            "members": doc["members"], "levels": levels,
            "what": "a prediction mixes the mean label-spreading distribution of its nearest labeled + unlabeled "
                    "training images (stage-1 members' embedding) with the ensemble's probabilities; "
                    "share = the ensemble's weight"}


def _up_to_date(run: Path, out: Path, tta: bool, int8: bool, trt: bool, candidates: str = "none") -> bool:
    """EXPORT was made from this very ensemble.json with the options asked for now, so running
    the same command again (a re-run quickstart, a script) is a no-op instead of an error.  An
    export whose meta.json or files no longer match their recorded sha256 is never "up to date":
    that is an error naming the file (semivit.integrity), and ``--force`` rebuilds it."""
    from semivit import integrity
    from semivit.utils import read_json

    try:
        meta = read_json(out / "meta.json")
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict):
        return False
    graph_file = run / "graph.npz"
    same = (meta.get("source_ensemble_sha256") == sha256_file(run / "ensemble.json")
            and (meta.get("graph") or {}).get("sha256") == (sha256_file(graph_file) if graph_file.is_file() else None)
            and bool(meta.get("tta")) == tta
            and (not int8 or bool((meta.get("int8") or {}).get("accepted")))
            and (not trt or bool(meta.get("tensorrt")))
            and ((meta.get("serving") or {}).get("selection") or "none") == candidates)
    if same:
        integrity.check_meta(out, meta)
        integrity.check_files(out, meta)
    return same


def _check_out(run: Path, out: Path, force: bool) -> None:
    """EXPORT may be replaced only with --force, and only when it is an export (or empty):
    ``--force`` must never delete a run, its parent, or an unrelated directory."""
    from semivit.safe_io import check_writable_dir

    check_writable_dir(out.parent, f"--out {out}")  # before minutes of work, not after
    if not out.exists():
        if out.is_symlink():
            raise UserError(f"--out {out} is a dangling symlink; not replacing it (remove it or choose another --out)")
        return
    if not force:
        raise UserError(f"{out} already exists; use --force to replace it (nothing was changed)")
    r, o = run.resolve(), out.resolve()
    if o == r or o in r.parents:
        raise UserError(f"--out {out} would replace the run itself; choose another directory")
    if not out.is_dir() or not ((out / "meta.json").is_file() or not any(out.iterdir())):
        raise UserError(f"{out} exists and is not a semivit export; not replacing it even with --force")


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` (``--force``) is moved aside first and
    deleted only after the new one is in place."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
