"""The numbers a refresh compares, and the smoke test that a version's export predicts.

Validation metric (``val_macro_f1``): the macro F1 of the pooled out-of-fold predictions of a
version's retrained members (stage 3; stage 1 for a run without stage 3) on the ORIGINAL labeled
images, true labels only.  Every version made by a refresh keeps its parent's folds.json, so the
current version and a candidate are scored on exactly the same images with the same fold split,
and each image is predicted by the member that did not train on it.  (The full ensemble cannot be
scored on the labeled set honestly: each stage-1 member trained on the other folds.)

Holdout metric (``holdout.macro_f1``): the full weighted ensemble on the registry's fixed labeled
holdout (never trained on), when the registry has one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from semivit.utils import read_json


def retrained_stage(run_dir: Path) -> str:
    run_dir = Path(run_dir)
    return "stage3" if (run_dir / "stage3" / "oof_probs.npy").is_file() else "stage1"


def fold_labels(run_dir: Path) -> tuple[np.ndarray, list[str]]:
    doc = read_json(Path(run_dir) / "folds.json")
    classes = list(doc["classes"])
    return np.asarray([classes.index(it["label"]) for it in doc["items"]], dtype=np.int64), classes


def val_metrics(run_dir: Path, stage: Optional[str] = None) -> dict:
    """Out-of-fold macro F1 of ``stage``'s members on the labeled images (see module doc)."""
    from semivit.metrics import classification_metrics
    from semivit.models.ensemble import members_from_stages

    run_dir = Path(run_dir)
    stage = stage or retrained_stage(run_dir)
    y, classes = fold_labels(run_dir)
    probs = np.load(run_dir / stage / "oof_probs.npy")
    if len(probs) != len(y):
        raise RuntimeError(f"{run_dir}/{stage}/oof_probs.npy has {len(probs)} rows for {len(y)} labeled images")
    m = classification_metrics(y, probs, classes)
    members = members_from_stages(run_dir, [stage])
    return {"stage": stage, "macro_f1": round(m["macro_f1"], 6), "accuracy": round(m["accuracy"], 6),
            "n_images": m["n_images"],
            "per_class_f1": {c: round(v["f1"], 6) for c, v in m["per_class"].items()},
            "members": {mm["name"]: round(float(mm["val_macro_f1"]), 6) for mm in members},
            "member_mean": round(float(np.mean([mm["val_macro_f1"] for mm in members])), 6) if members else None}


def holdout_metrics(run_dir: Path, holdout: Optional[Path]) -> Optional[dict]:
    if holdout is None:
        return None
    from semivit.evaluate import evaluate

    rep = evaluate(Path(run_dir), Path(holdout))
    return {"dir": str(holdout), "macro_f1": round(rep["macro_f1"], 6), "accuracy": round(rep["accuracy"], 6),
            "n_images": rep["n_images"]}


def version_metrics(run_dir: Path, holdout: Optional[Path]) -> dict:
    return {"val": val_metrics(run_dir), "holdout": holdout_metrics(run_dir, holdout)}


def compare(candidate: dict, current: dict, tolerance: float, current_name: str) -> dict:
    """Gate: promote iff the candidate's validation macro F1 is not below the current version's by
    more than ``tolerance`` AND (with a holdout) neither is its holdout macro F1.  A negative
    tolerance demands an improvement of at least -tolerance."""
    out = {"against": current_name, "tolerance": tolerance, "checks": []}
    c_val, p_val = candidate["val"]["macro_f1"], current["val"]["macro_f1"]
    out["checks"].append({"metric": "val_macro_f1", "candidate": c_val, "current": p_val,
                          "delta": round(c_val - p_val, 6), "passed": c_val >= p_val - tolerance - 1e-12})
    ch, ph = candidate.get("holdout"), current.get("holdout")
    if ch is not None and ph is not None:
        out["checks"].append({"metric": "holdout_macro_f1", "candidate": ch["macro_f1"], "current": ph["macro_f1"],
                              "delta": round(ch["macro_f1"] - ph["macro_f1"], 6),
                              "passed": ch["macro_f1"] >= ph["macro_f1"] - tolerance - 1e-12})
    out["passed"] = all(c["passed"] for c in out["checks"])
    words = [f"{c['metric']} {c['candidate']:.4f} vs {c['current']:.4f} ({c['delta']:+.4f})" for c in out["checks"]]
    rule = f"tolerance {tolerance:g}" if tolerance >= 0 else f"an improvement of at least {-tolerance:g} required"
    out["reason"] = ("passed: " if out["passed"] else "below the bar: ") + "; ".join(words) + f" [{rule}]"
    return out


def smoke_predict(vdir: Path, n: int = 2) -> np.ndarray:
    """Load a version's export and predict ``n`` synthetic images; raise if anything is off."""
    vdir = Path(vdir)
    export = vdir / "export"
    meta = read_json(export / "meta.json")
    size, n_cls = int(meta["img_size"]), len(meta["classes"])
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    try:
        from semivit.serve.backends import open_backend
    except ImportError:  # serve not installed yet: plain onnxruntime
        open_backend = None
    if open_backend is not None:
        probs = np.asarray(open_backend(export, "onnxruntime").predict(images)[0])
    else:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(export / "model.onnx"), providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        x = images if "uint8" in inp.type else images.astype(np.float32)
        probs = np.asarray(sess.run(None, {inp.name: x})[0])
    if probs.shape != (n, n_cls) or not np.all(np.isfinite(probs)) or not np.allclose(probs.sum(1), 1, atol=1e-3):
        raise RuntimeError(f"export predicted bad probabilities (shape {probs.shape})")
    return probs
