"""Speed benchmark (issue 9): inference and training throughput, one report.

Every inference number is measured on the same images (the ELPV demo data's held-out test split:
300x300 greyscale PNGs, decoded and resized once to the model's size), with the same batch size and
the same thread count, by the functions of ``benchmarks/predict_speed.py`` (imported, not copied).
The report is a list of small section objects (``SECTION_LIST``: key, title, ``run(ctx) -> dict``,
``md(dict) -> lines``).  Sections (``--sections``, default all):

  flops      FLOPs per image of the served ensemble (torch's FlopCounterMode: stem + members x views)
  peak       this CPU's matmul peak in the same run: fp32 and bf16 (torch), int8 (torch._int_mm and
             ONNX Runtime MatMulInteger), large square matmuls, same threads
  peers      every engine side by side on the same ensemble, batch, threads and uint8 input, each
             in its own process (benchmarks/engines.py; a thread count or OpenMP setting is
             process-global): PyTorch eager fp32, bf16 autocast, torch.compile, ONNX Runtime FP32
             with and without the transformer optimizer's fusions, ONNX Runtime INT8 dynamic and
             static QDQ, OpenVINO FP32 / bf16 / INT8; images/s, achieved GFLOP/s and share of the
             peak of the engine's precision, agreement with ORT FP32, macro F1 on the test labels;
             the default ``ssl predict`` path (the export's ``serving.auto``) against them
  ort_torch  ONNX Runtime vs PyTorch eager on the same exported ensemble (level ``full``), images/s,
             and the largest probability difference between the two
  int8       FP32 ``model.onnx`` vs its INT8 dynamic quantisation (EXPORT/model.int8.onnx when
             ``ssl export`` kept one, else quantised here with the same routine): images/s,
             file size, arg-max agreement and macro F1 against FP32 (and against the test labels)
  tta        with vs without flip TTA: the export's degradation levels (full, no_tta, top{k}_no_tta)
  batch      batch-size sweep of the ONNX Runtime session (level full): images/s and ms per batch
  e2e        ``ssl predict DIR`` as a user runs it (new process, default backend auto) vs the same
             engine raw on pre-decoded arrays, and vs ``--backend torch`` on the run's checkpoints
  contention throughput alone and beside one busy CPU-bound process per usable core (a fair share
             is 0.5x): the default predict path, ONNX Runtime FP32, PyTorch eager and a training
             loop with OpenMP's default and passive wait policies; each in its own process
  train      training throughput on CPU: the semivit trainer (``trainer.engine.fit``, as
             ``trainer.folds.train_fold`` calls it) vs a bare hand-written torch loop on the same
             model (``build_model``), same images, batch size and number of steps; with the frozen
             stem's feature cache (``train.cache_views``) and without it; the trainer's overhead in %
  bf16       bare training steps with bf16 autocast vs fp32 on CPU (and the CPU's bf16 flags)
  scaling    ``ssl predict`` wall time on 1000, 2000, 4000 images (symlinks to the 2624 ELPV images,
             cycled) and a linearity check (time per image at the largest vs the smallest size; R^2
             of a linear fit)
  gpu        TensorRT vs ONNX Runtime CUDA vs PyTorch CUDA when ``torch.cuda.is_available()``;
             otherwise the results say that there was no GPU (nothing is estimated)

Model: ``--run RUN`` (a trained run; exported into WORK unless RUN/export exists); without it, the
quick preset's architecture (10 x vit_hybrid_lite0 at 128 px: the shared pretrained stem, untrained
transformers and heads) - inference and training cost do not depend on the weights' values, but
INT8's agreement and F1 on untrained weights say little, and the results say so.  Training uses the
run's config (the quick preset without ``--run``) on the demo data's labeled images.

Every throughput is the best of ``--reps`` interleaved runs (all runs kept in the JSON): on a shared
machine the best is the run least disturbed by other jobs.

Usage:
    python benchmarks/speed.py [--run RUN] [--images 656] [--batch 32] [--threads N]
                               [--batches 1 8 32 64] [--scaling 1000 2000 4000]
                               [--train-steps 12] [--sections ort_torch int8 ...] [--work DIR]
    python benchmarks/speed.py --quick      # smoke test: few images and steps (results in WORK)

Results: benchmarks/results/speed.{json,md,png} (with --quick: WORK/results/ unless --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import predict_speed as ps  # noqa: E402  (puts the repository root on sys.path too)

from semivit.serve.backends import first_line, open_backend, physical_cores  # noqa: E402
from semivit.utils import cpu_has_bf16, cpu_has_vnni, cpu_name, read_json  # noqa: E402

BF16_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile", "avx512f", "avx512_vnni", "amx_int8")


# ------------------------------------------------------------------------------------------ context

@dataclass
class Ctx:
    """What every section shares: the model, its export, the decoded test images, the settings."""

    args: argparse.Namespace
    work: Path
    run: Path
    export: Path
    untrained: bool
    meta: dict
    images_dir: Path
    arrays: np.ndarray  # decoded test images (N, S, S, 3) uint8
    labels: Optional[np.ndarray]  # their true classes, when the model's classes are the demo's
    threads: int
    batch: int
    reps: int
    min_seconds: float
    ort: object = None  # the ONNX Runtime CPU backend on the export, opened once
    cache: dict = field(default_factory=dict)  # measurements reused by later sections
    results: dict = field(default_factory=dict)  # each finished section's JSON, by key

    @property
    def size(self) -> int:
        return int(self.meta["img_size"])


def best_of(tasks: dict[str, Callable[[], float]], reps: int) -> tuple[dict, dict]:
    """Run every task ``reps`` times, interleaved (A B C A B C ...): (best per task, all runs)."""
    runs: dict[str, list[float]] = {k: [] for k in tasks}
    for _ in range(reps):
        for k, fn in tasks.items():
            runs[k].append(round(float(fn()), 2))
    return {k: max(v) for k, v in runs.items()}, runs


def tiled(arrays: np.ndarray, n: int) -> np.ndarray:
    """At least ``n`` images: the test images repeated (for batches larger than the set)."""
    return arrays if len(arrays) >= n else np.resize(arrays, (n, *arrays.shape[1:]))


def ort_ips(c: Ctx, level: int = 0, batch: Optional[int] = None) -> float:
    """Images/s of the raw ONNX Runtime CPU session at ``level`` (the backend ``ssl predict`` uses)."""
    b = batch or c.batch
    c.ort.set_level(level)
    return ps.throughput(c.ort.predict, tiled(c.arrays, 2 * b), b, min_seconds=c.min_seconds)


def predict_all(fn: Callable[[np.ndarray], np.ndarray], arrays: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([fn(arrays[s:s + batch]) for s in range(0, len(arrays), batch)])


def graph_bytes(path: Path) -> int:
    data = Path(f"{path}.data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


# ------------------------------------------------------------------------------------------ 1 ORT vs torch

def sec_ort_torch(c: Ctx) -> dict:
    eager = open_backend(c.run, "torch", threads=c.threads, device="cpu")
    c.ort.set_level(0)
    best, runs = best_of({"onnxruntime": lambda: ort_ips(c, 0),
                          "torch_eager": lambda: ps.throughput(eager.predict, tiled(c.arrays, 2 * c.batch), c.batch,
                                                               min_seconds=c.min_seconds)}, c.reps)
    c.cache[("ort", 0, c.batch)] = best["onnxruntime"]
    c.ort.set_level(0)
    x = c.arrays[:c.batch]
    diff = float(np.abs(c.ort.predict(x)[0] - eager.predict(x)[0]).max())
    res = {"level": c.ort.levels[0].name, "batch": c.batch, "threads": c.threads,
           "images_per_s": best, "runs": runs,
           "speedup_ort_over_torch": round(best["onnxruntime"] / best["torch_eager"], 2),
           "max_abs_prob_diff": diff, "torch": eager.describe(), "onnxruntime": c.ort.describe()}
    del eager
    return res


# ------------------------------------------------------------------------------------------ 2 INT8

def dynamo_full_graph(c: Ctx, out: Path) -> Path:
    """The full level (all members, flip TTA) exported with torch's dynamo exporter, as `ssl export`
    exports it: predict_speed's mini-export of the untrained architecture uses the TorchScript
    exporter, whose graphs ONNX Runtime's quantisation pre-processing cannot shape-infer."""
    from semivit.export.graph import export_graph
    from semivit.models.ensemble import EnsembleModel, load_members, read_ensemble

    if not out.is_file():
        doc = read_ensemble(c.run)
        models, weights, _ = load_members(c.run, doc)
        ens = EnsembleModel(models, weights, tta=True, mean=doc["mean"], std=doc["std"]).eval()
        export_graph(ens, out, c.size, exporter="dynamo")
    return out


def int8_graph(c: Ctx) -> tuple[Path, Path, str]:
    """(FP32 graph, its INT8 quantisation, where they come from)."""
    fp32, own = c.export / "model.onnx", c.export / "model.int8.onnx"
    if own.is_file():
        return fp32, own, "EXPORT/model.int8.onnx, written (and accepted) by `ssl export --int8`"
    from semivit.export.int8 import quantize

    d = c.work / f"int8_{c.export.name}"
    d.mkdir(parents=True, exist_ok=True)
    source = ("quantised here with semivit.export.int8.quantize, the routine `ssl export --int8` uses "
              "(without its accept/refuse check on the run's validation folds)")
    if c.meta.get("exporter") != "dynamo":
        # not quantisable as is (and a failed attempt leaves temporary files in the working directory)
        fp32 = dynamo_full_graph(c, d / "model.onnx")
        source += (", from a dynamo export of the full level (the export's own graph came from the TorchScript "
                   "exporter, which the quantiser's shape inference rejects)")
    dst = d / "model.int8.onnx"
    if not dst.is_file() or dst.stat().st_mtime < fp32.stat().st_mtime:
        t0 = time.perf_counter()
        quantize(fp32, dst)
        c.cache["int8_quantize_seconds"] = round(time.perf_counter() - t0, 1)
    return fp32, dst, source


def sec_int8(c: Ctx) -> dict:
    from sklearn.metrics import f1_score

    from semivit.metrics import macro_f1

    fp32, int8, source = int8_graph(c)
    c.ort.set_level(0)
    # both graphs in sessions with the exact options of the backend `ssl predict` uses
    sess = {k: c.ort.ort.InferenceSession(str(p), sess_options=c.ort._options(), providers=["CPUExecutionProvider"])
            for k, p in (("fp32", fp32), ("int8", int8))}
    fns = {k: (lambda x, s=s: s.run(["probs"], {"images": np.ascontiguousarray(x)})[0]) for k, s in sess.items()}
    best, runs = best_of({k: (lambda f=f: ps.throughput(f, tiled(c.arrays, 2 * c.batch), c.batch,
                                                        min_seconds=c.min_seconds)) for k, f in fns.items()}, c.reps)
    p32, p8 = (predict_all(fns[k], c.arrays, c.batch) for k in ("fp32", "int8"))
    n_cls = p32.shape[1]
    y32, y8 = p32.argmax(1), p8.argmax(1)
    res = {"source": source, "fp32_file": str(fp32), "int8_file": str(int8), "batch": c.batch, "threads": c.threads,
           "images_per_s": best, "runs": runs, "speedup_int8": round(best["int8"] / best["fp32"], 2),
           "bytes": {"fp32": graph_bytes(fp32), "int8": graph_bytes(int8)},
           "images": int(len(c.arrays)), "argmax_agreement": float((y32 == y8).mean()),
           # over the classes either graph predicts (a class neither predicts is no disagreement)
           "macro_f1_int8_vs_fp32_labels": float(f1_score(y32, y8, average="macro", labels=np.union1d(y32, y8))),
           "max_abs_prob_diff": float(np.abs(p32 - p8).max()), "untrained_weights": c.untrained}
    res["size_ratio"] = round(res["bytes"]["int8"] / res["bytes"]["fp32"], 3)
    if "int8_quantize_seconds" in c.cache:
        res["quantize_seconds"] = c.cache["int8_quantize_seconds"]
    if c.labels is not None:
        res["macro_f1_vs_truth"] = {"fp32": macro_f1(c.labels, y32, n_cls), "int8": macro_f1(c.labels, y8, n_cls)}
    return res


# ------------------------------------------------------------------------------------------ 3 TTA

def sec_tta(c: Ctx) -> dict:
    levels = c.ort.levels
    best, runs = best_of({lv.name: (lambda i=i: ort_ips(c, i)) for i, lv in enumerate(levels)}, c.reps)
    c.cache[("ort", 0, c.batch)] = max(best[levels[0].name], c.cache.get(("ort", 0, c.batch), 0))
    res = {"batch": c.batch, "threads": c.threads, "runs": runs,
           "levels": [{"name": lv.name, "tta": lv.tta, "members": lv.members, "forward_passes_per_image": lv.cost,
                       "images_per_s": best[lv.name]} for lv in levels]}
    by = {lv.name: best[lv.name] for lv in levels}
    if "full" in by and "no_tta" in by:
        res["no_tta_speedup"] = round(by["no_tta"] / by["full"], 2)
    return res


# ------------------------------------------------------------------------------------------ 4 batch sweep

def sec_batch(c: Ctx) -> dict:
    batches = c.args.batches
    best, runs = best_of({str(b): (lambda b=b: ort_ips(c, 0, b)) for b in batches}, c.reps)
    rows = [{"batch": b, "images_per_s": best[str(b)], "ms_per_batch": round(1000 * b / best[str(b)], 2)}
            for b in batches]
    for r in rows:
        c.cache[("ort", 0, r["batch"])] = max(r["images_per_s"], c.cache.get(("ort", 0, r["batch"]), 0))
    top = max(rows, key=lambda r: r["images_per_s"])
    return {"level": c.ort.levels[0].name, "threads": c.threads, "rows": rows, "runs": runs,
            "best_batch": top["batch"], "batch1_vs_best": round(rows[0]["images_per_s"] / top["images_per_s"], 3)}


# ------------------------------------------------------------------------------------------ 5 end to end

E2E_IMAGES = 1024


def sec_e2e(c: Ctx) -> dict:
    """`ssl predict` (default --backend auto: the engine the export chose) vs that same engine
    raw on pre-decoded arrays in this process; and the same command on PyTorch eager."""
    reps = max(1, min(2, c.reps))
    # ssl predict on E2E_IMAGES ELPV files (a few seconds of work: the steady rate is not start-up)
    e2e_dir = scaling_images(c.work, max(E2E_IMAGES, len(c.arrays)))
    e2e_runs = [ps.measure_e2e(e2e_dir, c.export, c.work, c.batch, c.threads, backend="auto")
                for _ in range(reps)]
    e = max(e2e_runs, key=lambda r: r["images_per_s_wall"])
    raw_be = open_backend(c.export, "auto", threads=c.threads)
    raw_be.set_level(0)
    raw, _ = best_of({"raw": lambda: ps.throughput(raw_be.predict, tiled(c.arrays, 2 * c.batch), c.batch,
                                                   min_seconds=c.min_seconds)}, c.reps)
    raw = raw["raw"]
    raw_desc = raw_be.describe()
    e["raw_backend"] = f"{raw_be.name} - {raw_desc}"
    raw_be.close()
    e["same_backend_as_raw"] = raw_desc.split(" (")[0] in e["provider"]
    torch_runs = [ps.measure_e2e(e2e_dir, c.run, c.work, c.batch, c.threads, backend="torch") for _ in range(reps)]
    e["torch_backend"] = max(torch_runs, key=lambda r: r["images_per_s_wall"])
    e["torch_backend"]["runs_images_per_s_wall"] = [r["images_per_s_wall"] for r in torch_runs]
    return {**e, "runs_images_per_s_wall": [r["images_per_s_wall"] for r in e2e_runs], "batch": c.batch,
            "raw_session_images_per_s": raw, "overhead_steady": round(1 - e["images_per_s_steady"] / raw, 3),
            "overhead_wall": round(1 - e["images_per_s_wall"] / raw, 3),
            "vs_torch_wall": round(e["images_per_s_wall"] / e["torch_backend"]["images_per_s_wall"], 2),
            "vs_torch_steady": round(e["images_per_s_steady"] / e["torch_backend"]["images_per_s_steady"], 2)}


# ------------------------------------------------------------------------------------------ 6/7 training

@dataclass
class TrainSetup:
    cfg: object  # semivit Config, batch size possibly overridden
    images: np.ndarray  # steps * batch uint8 NHWC
    labels: np.ndarray
    classes: list
    steps: int
    batch: int
    frozen_stem: bool = False  # the model reads tokens from a frozen CNN stem (the quick preset's hybrid)
    views: Optional[np.ndarray] = None  # cached frozen-stem features (N, 1 + cache_views, C, h, w)
    cache_seconds: Optional[float] = None
    source: str = ""


def train_setup(c: Ctx) -> TrainSetup:
    if "train" in c.cache:
        return c.cache["train"]
    import torch

    from semivit import config as cfgmod
    from semivit.data.dataset import decode_many
    from semivit.data.layout import load_train

    if c.untrained:
        cfg = cfgmod.resolve(preset="quick")
    else:
        from semivit.config import load_run_config

        cfg = load_run_config(c.run)[0]
    batch = c.args.train_batch or cfg.train.batch_size
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"batch_size": batch, "num_workers": 0})})
    steps = c.args.train_steps
    n = steps * batch
    torch.set_num_threads(c.threads)
    ls = load_train(c.work / "demo")
    dec = decode_many(ls.paths[:n], cfg.model.img_size)
    images = tiled(dec.images, n)[:n]
    labels = np.resize(ls.labels[dec.ok], n)
    ts = TrainSetup(cfg, images, labels, list(ls.classes), steps, batch,
                    source=f"{len(dec.ok)} labeled images of the demo data's train split"
                           + (f", repeated to {n}" if len(dec.ok) < n else ""))
    from semivit.models.networks import build_model, frozen_stem

    stem = frozen_stem(build_model(cfg.model, len(ts.classes)))
    ts.frozen_stem = stem is not None
    if stem is not None and cfg.train.cache_views:
        from semivit.data import transforms
        from semivit.trainer.stem_cache import augmented_views

        t0 = time.perf_counter()
        ts.views = augmented_views(stem.eval(), images, transforms.build(cfg.train.augment, cfg.model.img_size, seed=0),
                                   cfg.train.cache_views, torch.device("cpu"), cfg.train.precision)
        ts.cache_seconds = time.perf_counter() - t0
    c.cache["train"] = ts
    return ts


def bf16_for(cfg) -> bool:
    """The precision the trainer uses on CPU (trainer.infer.autocast): bf16 for auto and bf16."""
    return cfg.train.precision in ("auto", "bf16")


def bare_loop(ts: TrainSetup, features: bool, bf16: bool, steps: Optional[int] = None) -> float:
    """A hand-written loop on the same model: AdamW, cross-entropy, no augmentation, no sampler,
    no scheduler, no validation.  Timed from the optimiser's creation to the last step's end.
    ``features``: feed the cached stem features (view 0) through the model's stem pass-through."""
    import torch
    import torch.nn.functional as F

    from semivit.data.dataset import Preprocess
    from semivit.models.networks import build_model, features_input

    model = build_model(ts.cfg.model, len(ts.classes)).train()
    pre = Preprocess()
    if features:
        x_all = torch.from_numpy(np.ascontiguousarray(ts.views[:, 0]))
    else:
        x_all = torch.from_numpy(np.ascontiguousarray(ts.images)).permute(0, 3, 1, 2)
    y_all = torch.from_numpy(ts.labels.astype(np.int64))
    steps = steps or ts.steps
    b = ts.batch
    t0 = time.perf_counter()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=ts.cfg.train.lr)
    with features_input(model, features):
        for s in range(steps):
            xb = x_all[s * b:(s + 1) * b]
            xb = xb if features else pre(xb)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(xb)
            loss = F.cross_entropy(logits.float(), y_all[s * b:(s + 1) * b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return steps * b / (time.perf_counter() - t0)


def trainer_fit(ts: TrainSetup, features: bool) -> float:
    """``trainer.engine.fit`` for one epoch of ``ts.steps`` steps, built as ``train_fold`` builds it
    (dataset, class-balanced focal loss, config's sampler/augmentation/scheduler/precision),
    validating on 2 images.  Timed: the whole fit() call (model construction excluded)."""
    import torch

    from semivit.data import transforms
    from semivit.data.dataset import ArrayDataset
    from semivit.trainer.engine import fit
    from semivit.trainer.losses import build_loss
    from semivit.models.networks import build_model

    cfg, n_cls = ts.cfg, len(ts.classes)
    weights = np.ones(len(ts.labels), dtype=np.float32)
    if features:
        from semivit.trainer.stem_cache import CachedViewsDataset, StemFeatures

        ds = CachedViewsDataset(ts.views, ts.labels, weights, generator=torch.Generator().manual_seed(0))
        val = StemFeatures(ts.views[:2, 0])
    else:
        augment = transforms.build(cfg.train.augment, cfg.model.img_size, seed=0)
        ds = ArrayDataset(ts.images, ts.labels, weights, augment)
        val = ts.images[:2]
    criterion = build_loss(cfg.train, np.bincount(ts.labels, minlength=n_cls))
    model = build_model(cfg.model, n_cls)
    t0 = time.perf_counter()
    res = fit(model, ds, val, ts.labels[:2], cfg, criterion, torch.device("cpu"), desc="speed benchmark", seed=0,
              epochs=1)
    dt = time.perf_counter() - t0
    assert res.epochs_run == 1
    return ts.steps * ts.batch / dt


def sec_train(c: Ctx) -> dict:
    ts = train_setup(c)
    bf16 = bf16_for(ts.cfg)
    cached = ts.views is not None
    bare_loop(ts, False, bf16, steps=1)  # warm-up: first-use kernels and allocations, not timed
    tasks = {"trainer_pixels": lambda: trainer_fit(ts, False), "bare_pixels": lambda: bare_loop(ts, False, bf16)}
    if cached:
        bare_loop(ts, True, bf16, steps=1)
        tasks = {"trainer_cached": lambda: trainer_fit(ts, True), "bare_cached": lambda: bare_loop(ts, True, bf16),
                 **tasks}
    best, runs = best_of(tasks, c.reps)
    res = {"model": ts.cfg.model.name, "img_size": ts.cfg.model.img_size, "batch": ts.batch, "steps": ts.steps,
           "images": ts.source, "threads": c.threads, "precision": "bf16 autocast" if bf16 else "fp32",
           "config_precision": ts.cfg.train.precision, "cache_views": ts.cfg.train.cache_views,
           "augment": ts.cfg.train.augment, "loss": ts.cfg.train.loss, "sampler": ts.cfg.train.sampler,
           "images_per_s": best, "runs": runs,
           "as_configured": "trainer_cached" if cached else "trainer_pixels", "frozen_stem": ts.frozen_stem}
    pairs = [("cached", "trainer_cached", "bare_cached"), ("pixels", "trainer_pixels", "bare_pixels")]
    res["overhead_pct"] = {k: round(100 * (best[b] / best[t] - 1), 1) for k, t, b in pairs if t in best}
    if cached:
        n_views = ts.views.shape[1]
        res["cache_build"] = {"seconds": round(ts.cache_seconds, 2), "images": int(len(ts.images)),
                              "views_per_image": int(n_views),
                              "stem_forwards_per_s": round(len(ts.images) * n_views / ts.cache_seconds, 1)}
        res["cached_vs_pixels_trainer_speedup"] = round(best["trainer_cached"] / best["trainer_pixels"], 2)
    return res


def cpu_flags() -> dict:
    try:
        flags = set(next(ln.split(":", 1)[1].split() for ln in open("/proc/cpuinfo") if ln.startswith("flags")))
    except (OSError, StopIteration):
        return {}
    return {f: f in flags for f in BF16_FLAGS}


def sec_bf16(c: Ctx) -> dict:
    import torch

    ts = train_setup(c)
    modes = [("pixels", False)] + ([("cached", True)] if ts.views is not None else [])
    tasks = {}
    for name, feats in modes:
        for prec, on in (("fp32", False), ("bf16", True)):
            bare_loop(ts, feats, on, steps=1)  # warm-up
            tasks[f"{name}_{prec}"] = (lambda f=feats, o=on: bare_loop(ts, f, o))
    best, runs = best_of(tasks, c.reps)
    return {"model": ts.cfg.model.name, "img_size": ts.cfg.model.img_size, "batch": ts.batch, "steps": ts.steps,
            "threads": c.threads, "loop": "bare hand-written loop (see train)", "images_per_s": best, "runs": runs,
            "bf16_speedup": {name: round(best[f"{name}_bf16"] / best[f"{name}_fp32"], 2) for name, _ in modes},
            "cpu_flags": cpu_flags(), "onednn_bf16_supported": bool(torch.backends.mkldnn.is_available()
                                                                    and torch.ops.mkldnn._is_mkldnn_bf16_supported())}


# ------------------------------------------------------------------------------------------ 8 scaling

def scaling_images(work: Path, n: int) -> Path:
    """``n`` files in a directory: symlinks to the ELPV package's 2624 images, cycled."""
    from semivit.data.demo import elpv_index

    d = work / f"scaling_{n}"
    if not d.is_dir():
        root, names, _, _ = elpv_index()
        tmp = work / f".scaling_{n}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for i in range(n):
            name = names[i % len(names)]
            os.symlink(root / name, tmp / f"{i:05d}_{name}")
        tmp.rename(d)
    return d


def sec_scaling(c: Ctx) -> dict:
    rows = []
    for n in sorted(c.args.scaling):
        e = ps.measure_e2e(scaling_images(c.work, n), c.export, c.work, c.batch, c.threads)
        rows.append({"images": n, "ok": e["ok"], "wall_seconds": e["wall_seconds"],
                     "command_seconds": e["command_seconds"], "model_load_seconds": e["model_load_seconds"],
                     "ms_per_image_wall": round(1000 * e["wall_seconds"] / n, 2),
                     "images_per_s_wall": e["images_per_s_wall"], "provider": e["provider"]})
    res = {"batch": c.batch, "threads": c.threads, "rows": rows,
           "images": "symlinks to the 2624 ELPV images (300x300 greyscale PNG), cycled"}
    if len(rows) >= 2:
        x = np.array([r["images"] for r in rows], float)
        y = np.array([r["wall_seconds"] for r in rows], float)
        slope, intercept = np.polyfit(x, y, 1)
        pred = slope * x + intercept
        ss = float(((y - y.mean()) ** 2).sum())
        res["fit"] = {"seconds_per_image": round(float(slope), 5), "intercept_seconds": round(float(intercept), 2),
                      "r2": round(1 - float(((y - pred) ** 2).sum()) / ss, 5) if ss > 0 else None}
        res["per_image_largest_vs_smallest"] = round(rows[-1]["ms_per_image_wall"] / rows[0]["ms_per_image_wall"], 3)
    return res


# ------------------------------------------------------------------------------------------ 10 GPU

def sec_gpu(c: Ctx) -> dict:
    import torch

    if not torch.cuda.is_available():
        why = "this PyTorch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        return {"available": False, "note": f"no GPU on this machine ({why}): nothing measured"}
    batches = c.args.batches
    res = {"available": True, "gpu": torch.cuda.get_device_name(0), "batches": batches, "backends": {}}
    c.ort.set_level(0)
    ref = c.ort.predict(c.arrays[:c.batch])[0]

    def open_trt():
        from semivit.export import tensorrt

        tensorrt.require()
        gexp = c.work / f"export_gpu_{c.export.name}"  # a copy: the engine is never added to the run's export
        if not (gexp / "meta.json").is_file():
            shutil.copytree(c.export, gexp)
        if not (gexp / "model.engine").is_file():
            tensorrt.build_and_verify(gexp, c.arrays[:64], c.size, max(batches))
        return open_backend(gexp, "tensorrt")

    openers = {"tensorrt": open_trt,
               "onnxruntime-cuda": lambda: open_backend(c.export, "onnxruntime-cuda"),
               "torch-cuda": lambda: open_backend(c.run, "torch", device="cuda")}
    for name, opener in openers.items():
        try:
            be = opener()
            be.set_level(0)
            best, runs = best_of({str(b): (lambda b=b: ps.throughput(be.predict, tiled(c.arrays, 2 * b), b,
                                                                      min_seconds=c.min_seconds)) for b in batches},
                                 c.reps)
            diff = float(np.abs(be.predict(c.arrays[:c.batch])[0] - ref).max())
            res["backends"][name] = {"describe": be.describe(), "images_per_s": best, "runs": runs,
                                     "max_abs_prob_diff_vs_ort_cpu": diff}
            be.close()
            del be
        except Exception as e:  # noqa: BLE001 - recorded, never estimated
            res["backends"][name] = {"error": f"{type(e).__name__}: {first_line(e)}"}
    return res


# ------------------------------------------------------------------------------------------ know the limit

ENGINES_PY = Path(__file__).resolve().parent / "engines.py"


def child(args: list[str], env: Optional[dict] = None, timeout: float = 1800) -> dict:
    """benchmarks/engines.py in its own process (its own thread pools and OpenMP settings): the
    last stdout line's JSON, or {"error": ...}."""
    e = {**os.environ, "SEMIVIT_QUIET": "1", **(env or {})}
    e = {k: v for k, v in e.items() if v is not None}
    try:
        r = subprocess.run([sys.executable, str(ENGINES_PY), *map(str, args)], env=e, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        tail = [ln for ln in r.stderr.strip().splitlines() if ln.strip()][-1:] or ["no output"]
        return {"error": f"exit {r.returncode}: {tail[0][:300]}"}
    return json.loads(lines[-1])


def thread_env(threads: int) -> dict:
    """A child's threads, and the OpenMP wait policy `ssl` itself sets (semivit.utils.cpu_runtime_defaults)."""
    return {"OMP_NUM_THREADS": str(threads), "SEMIVIT_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}


def sec_flops(c: Ctx) -> dict:
    """FLOPs per image of the served ensemble (TTA on): torch's FlopCounterMode on one batch of
    the exported EnsembleModel (matmuls, convolutions, attention; 2 per multiply-add)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from semivit.models.ensemble import load_ensemble

    model, _ = load_ensemble(c.run, tta=True)
    x = torch.from_numpy(np.ascontiguousarray(c.arrays[:2]))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    counter = FlopCounterMode(display=False)
    # the math attention kernel: its matmuls are counted like any other (a fused CPU attention
    # kernel would be missed by the counter)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model.eval()(x)
    by_op = {str(k).replace("aten.", "").split(".")[0]: int(v)
             for k, v in counter.get_flop_counts().get("Global", {}).items()}
    total = counter.get_total_flops() / len(x)
    gemm = sum(v for k, v in by_op.items() if k in ("mm", "addmm", "bmm", "matmul", "linear", "baddbmm")) / len(x)
    conv = sum(v for k, v in by_op.items() if "conv" in k) / len(x)
    attn = sum(v for k, v in by_op.items() if "attention" in k) / len(x)
    return {"flops_per_image": total, "gflops_per_image": round(total / 1e9, 3),
            "gemm_flops_per_image": gemm, "conv_flops_per_image": conv, "attention_flops_per_image": attn,
            "gemm_share": round((gemm + attn) / total, 3) if total else None, "by_op_per_batch_of_2": by_op,
            "members": len(model.members), "tta_views": 2 if model.tta else 1,
            "shared_stem": model.stem is not None,
            "counted": "torch.utils.flop_counter.FlopCounterMode on the EnsembleModel the export was made from "
                       "(uint8 in, TTA on); elementwise ops, softmax and LayerNorm are not counted"}


def sec_peak(c: Ctx) -> dict:
    n = 1024 if c.args.quick else 2048
    r = child(["peak", "--threads", c.threads, "--n", n, "--seconds", 1.0 if c.args.quick else 4.0],
              env=thread_env(c.threads))
    r["bf16_native"] = cpu_has_bf16()
    r["vnni"] = cpu_has_vnni()
    r["cpu_capability"] = torch_capability()
    return r


def torch_capability() -> str:
    try:
        import torch

        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # noqa: BLE001
        return "?"


# ------------------------------------------------------------------------------------------ peers

PEER_LABELS = {"torch-eager": "PyTorch eager fp32", "torch-bf16": "PyTorch bf16 autocast",
               "torch-compile": "torch.compile (inductor)", "ort-fp32": "ONNX Runtime FP32 (as served)",
               "ort-fp32-fused": "ONNX Runtime FP32, transformer-optimizer fusions",
               "ort-int8": "ONNX Runtime INT8 dynamic", "ort-int8-qdq": "ONNX Runtime INT8 static QDQ",
               "ov-fp32": "OpenVINO FP32", "ov-bf16": "OpenVINO bf16 hint", "ov-int8": "OpenVINO INT8 (NNCF)",
               "ov-bf16-1stream": "OpenVINO bf16 hint, one stream of all threads (latency mode)"}
SERVE_TO_PEER = {"onnxruntime-cpu": "ort-fp32", "onnxruntime-int8": "ort-int8", "onnxruntime-int8-qdq": "ort-int8-qdq",
                 "openvino": "ov-fp32", "openvino-bf16": "ov-bf16", "openvino-int8": "ov-int8", "torch": "torch-eager"}


def arrays_npy(c: Ctx) -> Path:
    p = c.work / f"arrays_{c.images_dir.name}_{c.size}.npy"  # of these very images (not only as many)
    if not p.is_file():
        np.save(p, c.arrays)
    return p


def _peak_for(c: Ctx, precision: str) -> Optional[float]:
    peak = c.results.get("peak") or {}
    return (peak.get("peak") or {}).get(precision)


def sec_peers(c: Ctx) -> dict:
    import importlib.util

    has_ov = importlib.util.find_spec("openvino") is not None
    engines = [e for e in (c.args.peers or list(PEERS_DEFAULT))]
    res = {"batch": c.batch, "threads": c.threads, "images": int(len(c.arrays)), "reps": max(2, min(c.reps, 3)),
           "engines": {}, "input": "the same uint8 NHWC test images, batches of the same size, in every engine"}
    x = arrays_npy(c)
    for e in engines:
        if e.startswith("ov-") and not has_ov:
            res["engines"][e] = {"error": "openvino is not installed (pip install 'semivit[openvino]')"}
            continue
        if e.startswith("ov-bf16") and not cpu_has_bf16():
            res["engines"][e] = {"error": "this CPU has no native bf16"}
            continue
        print(f"   peer {e}", flush=True)
        probs = c.work / f"probs_{e}.npy"
        probs.unlink(missing_ok=True)
        r = child([e, "--export", c.export, "--run", c.run, "--images", x, "--batch", c.batch, "--threads", c.threads,
                   "--reps", res["reps"], "--probs", probs, "--work", c.work / "engines"], env=thread_env(c.threads),
                  timeout=c.args.peer_timeout)
        if "error" not in r and probs.is_file():
            r["_probs"] = np.load(probs)
        res["engines"][e] = r
    if c.labels is not None:
        res["test_images_per_class"] = dict(zip(c.meta["classes"], np.bincount(
            c.labels, minlength=len(c.meta["classes"])).tolist()))
    ref = res["engines"].get("ort-fp32", {}).get("_probs")
    flops = (c.results.get("flops") or {}).get("flops_per_image")
    for e, r in res["engines"].items():
        p = r.pop("_probs", None)
        if p is None:
            continue
        if ref is not None and len(ref) == len(p):
            r["max_abs_prob_diff_vs_ort_fp32"] = float(np.abs(p - ref).max())
            r["argmax_agreement_vs_ort_fp32"] = float((p.argmax(1) == ref.argmax(1)).mean())
        if c.labels is not None:
            r.update(score_test(c.labels, p))
        if flops:
            r["gflops_per_s"] = round(r["images_per_s"] * flops / 1e9, 1)
            pk = _peak_for(c, "int8" if r["precision"] == "int8" else r["precision"])
            if pk:
                r["share_of_peak"] = round(r["gflops_per_s"] / pk, 3)
    ok = {e: r["images_per_s"] for e, r in res["engines"].items() if "images_per_s" in r}
    auto = (c.meta.get("serving") or {}).get("auto", "onnxruntime-cpu")
    res["default_path"] = {"backend": auto, "peer": SERVE_TO_PEER.get(auto)}
    if ok:
        best = max(ok, key=ok.get)
        res["fastest"] = best
        d = ok.get(SERVE_TO_PEER.get(auto))
        if d:
            res["default_path"].update({
                "images_per_s": d, "vs_torch_eager": round(d / ok["torch-eager"], 2) if "torch-eager" in ok else None,
                "vs_ort_fp32": round(d / ok["ort-fp32"], 2) if "ort-fp32" in ok else None,
                "vs_fastest": round(d / ok[best], 3)})
    return res


PEERS_DEFAULT = ("torch-eager", "torch-bf16", "torch-compile", "ort-fp32", "ort-fp32-fused", "ort-int8",
                 "ort-int8-qdq", "ov-fp32", "ov-bf16", "ov-int8", "ov-bf16-1stream")


# ------------------------------------------------------------------------------------------ contention

def busy_processes(n: int) -> list:
    """``n`` CPU-bound competitors (a pure-Python loop each: one busy core apiece)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def stop(procs: list) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def alone_and_loaded(name: str, argv: list, env: dict, cores: int) -> dict:
    """One workload (benchmarks/engines.py ``argv`` in its own process, ``env`` on top of the
    parent's) alone, then beside ``cores`` busy processes (started before it): both results and,
    when both ran, the median images/s over their passes and the ratio loaded / alone."""
    alone = child(argv, env=env)
    procs = busy_processes(cores)
    try:
        time.sleep(0.5)
        loaded = child(argv, env=env)
    finally:
        stop(procs)
    row = {"workload": name, "alone": alone, "loaded": loaded}
    if "runs" in alone and "runs" in loaded:
        a, b = float(np.median(alone["runs"])), float(np.median(loaded["runs"]))
        row.update({"alone_images_per_s": round(a, 2), "loaded_images_per_s": round(b, 2), "ratio": round(b / a, 3)})
    return row


def sec_contention(c: Ctx) -> dict:
    """Throughput alone and beside one busy process per usable core (fair share: 0.5x), for the
    default predict path, ONNX Runtime with and without thread spinning, PyTorch eager and the
    training loop with OpenMP's default and passive wait policies."""
    from semivit.utils import cpu_count

    cores = cpu_count()
    secs = 3.0 if c.args.quick else 10.0
    x = arrays_npy(c)
    auto = (c.meta.get("serving") or {}).get("auto", "onnxruntime-cpu")
    peer = SERVE_TO_PEER.get(auto, "ort-fp32")
    common = ["--export", c.export, "--run", c.run, "--images", x, "--batch", c.batch, "--threads", c.threads,
              "--reps", 1, "--seconds", secs, "--work", c.work / "engines"]
    unset = {"OMP_WAIT_POLICY": None}
    workloads = {
        f"predict default path ({auto})": ([peer, *common], {}),
        **({"OpenVINO bf16, one stream of all threads (latency mode)": (["ov-bf16-1stream", *common], {})}
           if auto == "openvino-bf16" else {}),
        "ONNX Runtime FP32, no spinning (as served)": (["ort-fp32", *common], {}),
        "PyTorch eager, OMP wait policy default": (["torch-eager", *common], unset),
        "PyTorch eager, OMP_WAIT_POLICY=PASSIVE": (["torch-eager", *common], {"OMP_WAIT_POLICY": "PASSIVE"}),
        "training as `ssl train` runs it (OpenMP default wait policy, thread governor)":
            (["train", *common, "--steps", 2, "--governor"], unset),
        f"training, {c.threads} threads fixed, OMP wait policy default": (["train", *common, "--steps", 2], unset),
        f"training, {c.threads} threads fixed, OMP_WAIT_POLICY=PASSIVE": (["train", *common, "--steps", 2],
                                                              {"OMP_WAIT_POLICY": "PASSIVE"}),
        "training, 1 thread": (["train", *common, "--steps", 2, "--threads", 1], unset),
        # `torchrun --nproc-per-node N ssl train`: no OpenMP barrier inside a step
        f"training, {c.threads} data-parallel ranks x 1 thread (DDP over gloo, as torchrun runs it)":
            (["train-ddp", *common, "--steps", 2], unset),
    }
    rows = []
    for name, (argv, env) in workloads.items():
        print(f"   contention: {name}", flush=True)
        rows.append(alone_and_loaded(name, argv, {**thread_env(c.threads), **env}, cores))
    return {"competitors": cores, "competitor": "python -c 'while True: pass' (one busy core each)",
            "seconds_per_measurement": secs, "threads": c.threads, "batch": c.batch, "rows": rows,
            "statistic": "median images/s over the passes of each measurement", "fair_share": 0.5, "target": 0.4}


# ------------------------------------------------------------------------------------------ report

def machine(start: bool = True) -> dict:
    import matplotlib
    import timm

    m = ps.machine_info()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ps.ROOT,
                           capture_output=True, text=True).stdout.strip()
    up = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    m.update({"uptime_start": up, "cpu_name": cpu_name(), "timm": timm.__version__, "matplotlib": matplotlib.__version__, "git_dirty": bool(dirty),
              "cpu_flags": cpu_flags(), "cpu_count_os": os.cpu_count(), "machine": platform.machine()})
    return m


def _ips(v: float) -> str:
    return f"{v:.1f}" if v < 1000 else f"{v:.0f}"


def _th(n: int) -> str:
    return ps._threads(f"{n}_threads")  # "1 thread", "2 threads"


def md_ort_torch(r: dict) -> list[str]:
    b = r["images_per_s"]
    return ["| engine | images/s |", "|---|---:|",
            f"| ONNX Runtime CPU ({r['onnxruntime']}) | {_ips(b['onnxruntime'])} |",
            f"| PyTorch eager ({r['torch']}) | {_ips(b['torch_eager'])} |", "",
            f"ONNX Runtime runs the same ensemble {r['speedup_ort_over_torch']:.3g}x as fast as PyTorch eager "
            f"(level {r['level']}, batch {r['batch']}, {_th(r['threads'])}); their probabilities differ by at most "
            f"{r['max_abs_prob_diff']:.1e}."]


def md_int8(r: dict) -> list[str]:
    b, by = r["images_per_s"], r["bytes"]
    lines = ["| graph | images/s | size | macro F1 vs test labels |", "|---|---:|---:|---:|"]
    truth = r.get("macro_f1_vs_truth", {})
    for k in ("fp32", "int8"):
        f1 = f"{truth[k]:.4f}" if k in truth else "-"
        lines.append(f"| {k.upper()} | {_ips(b[k])} | {by[k] / 1e6:.1f} MB | {f1} |")
    caveat = ("; the weights are untrained, so the agreement and F1 figures say little about INT8's accuracy on a "
              "trained ensemble (docs/export.md has a trained run's; or rerun with --run)"
              if r["untrained_weights"] else "")
    lines += ["", f"INT8 graph: {r['source']}.  On the {r['images']} test images: arg-max agreement with FP32 "
                  f"{100 * r['argmax_agreement']:.1f}%, macro F1 of INT8's labels against FP32's (over the classes "
                  f"either predicts) {r['macro_f1_int8_vs_fp32_labels']:.4f}, largest probability difference "
                  f"{r['max_abs_prob_diff']:.1e}.", "",
              f"INT8 runs {r['speedup_int8']:.2f}x as fast as FP32 from a file {r['size_ratio']:.2f}x the size "
              f"(batch {r['batch']}, {_th(r['threads'])}){caveat}."]
    return lines


def md_tta(r: dict) -> list[str]:
    lines = ["| level | flip TTA | members | forward passes / image | images/s |", "|---|---|---:|---:|---:|"]
    for lv in r["levels"]:
        lines.append(f"| {lv['name']} | {'on' if lv['tta'] else 'off'} | {lv['members']} | "
                     f"{lv['forward_passes_per_image']} | {_ips(lv['images_per_s'])} |")
    lines.append("")
    if "no_tta_speedup" in r:
        lines.append(f"Dropping flip TTA (full -> no_tta) makes the session {r['no_tta_speedup']:.2f}x as fast, "
                     f"against the 2x its halved forward passes promise (batch {r['batch']}, {_th(r['threads'])}).")
    else:
        lines.append("This export has no no_tta level (exported with --no-tta, or one member): nothing to compare.")
    return lines


def md_batch(r: dict) -> list[str]:
    lines = ["| batch | images/s | ms / batch |", "|---:|---:|---:|"]
    lines += [f"| {x['batch']} | {_ips(x['images_per_s'])} | {x['ms_per_batch']:.1f} |" for x in r["rows"]]
    return lines + ["", f"Throughput peaks at batch {r['best_batch']}; batch {r['rows'][0]['batch']} reaches "
                        f"{100 * r['batch1_vs_best']:.0f}% of the peak (level {r['level']}, {_th(r['threads'])})."]


def md_e2e(r: dict) -> list[str]:
    if not r.get("same_backend_as_raw", True):
        why = f" - but `ssl predict` ran on {r['provider']}, not on the CPU session it is compared with"
    elif r["overhead_steady"] < 0:
        why = (" (above 100%: the session measured inside the benchmark process, which also holds the other sections' "
               "models, came out slower)")
    else:
        why = " (decoding, batching and writing the results share the cores with the model)"
    lines = ["| measurement | images/s |", "|---|---:|",
             f"| raw engine, pre-decoded arrays ({r.get('raw_backend', 'ONNX Runtime session')}) | "
             f"{_ips(r['raw_session_images_per_s'])} |",
            f"| `ssl predict` (default --backend auto) whole wall time ({r['wall_seconds']:.2f} s, model load "
            f"{r['model_load_seconds']:.2f} s) | {_ips(r['images_per_s_wall'])} |",
            *([f"| `ssl predict` after the model load (interpreter start, discovery and writing included) | "
               f"{_ips(r['images_per_s_after_load'])} |"] if r.get("images_per_s_after_load") else []),
            f"| `ssl predict` steady state (its prediction loop: decoding ahead, batches, rows written) | "
            f"{_ips(r['images_per_s_steady'])} |",
            *([f"| `ssl predict --backend torch --model RUN` (PyTorch eager on the checkpoints) whole wall time "
               f"({r['torch_backend']['wall_seconds']:.2f} s, model load {r['torch_backend']['model_load_seconds']:.2f} s)"
               f" | {_ips(r['torch_backend']['images_per_s_wall'])} |",
               f"| `ssl predict --backend torch` steady state | {_ips(r['torch_backend']['images_per_s_steady'])} |"]
              if r.get("torch_backend") else []), "",
            f"On {r['ok']} images (batch {r['batch']}) `ssl predict` reaches {100 * (1 - r['overhead_steady']):.0f}% "
            f"of the raw engine's images/s in its steady state and {100 * (1 - r['overhead_wall']):.0f}% over the "
            f"whole command{why}; backend {r['provider']}."]
    if r.get("torch_backend"):
        t = r["torch_backend"]
        lines += ["", f"The same command with PyTorch eager instead of the export: "
                  f"{_ips(t['images_per_s_steady'])} images/s steady, {_ips(t['images_per_s_wall'])} over the whole "
                  f"command - the export's default path makes `ssl predict` "
                  f"{r['images_per_s_steady'] / max(1e-9, t['images_per_s_steady']):.2f}x as fast steady and "
                  f"{r['images_per_s_wall'] / max(1e-9, t['images_per_s_wall']):.2f}x over the whole command "
                  f"({t['provider']})."]
    return lines


TRAIN_ROWS = {
    "trainer_cached": "semivit trainer, cached stem features (`train.cache_views`)",
    "bare_cached": "bare torch loop, cached stem features",
    "trainer_pixels": "semivit trainer, images through the stem every step (`train.cache_views=0`)",
    "bare_pixels": "bare torch loop, images through the stem every step",
}
NO_STEM_ROWS = {"trainer_pixels": "semivit trainer, images", "bare_pixels": "bare torch loop, images"}


def md_train(r: dict) -> list[str]:
    lines = ["| loop | images/s | trainer overhead |", "|---|---:|---:|"]
    for k, text in TRAIN_ROWS.items():
        text = text if r["frozen_stem"] else NO_STEM_ROWS.get(k, text)
        if k in r["images_per_s"]:
            kind = k.split("_")[1]
            ov = f"{r['overhead_pct'][kind]:+.1f}%" if k.startswith("trainer") and kind in r["overhead_pct"] else ""
            mark = " - as configured" if k == r["as_configured"] else ""
            lines.append(f"| {text}{mark} | {_ips(r['images_per_s'][k])} | {ov} |")
    lines += ["", f"{r['model']} at {r['img_size']} px, batch {r['batch']}, {r['steps']} steps on {r['images']}, "
                  f"{_th(r['threads'])}, {r['precision']} (config precision {r['config_precision']}).  The trainer's "
                  "number is the whole `fit()` call for one epoch (data loader with per-sample indexing and "
                  f"collation, {r['augment']} augmentation on pixels / a random cached view per image, {r['loss']} "
                  f"loss with class weights, {r['sampler']} sampler, LR schedule, progress bar, validation on 2 "
                  "images, copy of the best state); the bare loop's is AdamW + cross-entropy on pre-stacked tensors, "
                  "from the optimiser's creation to the last step.  Overhead = bare images/s / trainer images/s - 1 "
                  "(the extra time per image)."]
    if "cache_build" in r:
        cb = r["cache_build"]
        lines += ["", f"Building the feature cache for these {cb['images']} images ({cb['views_per_image']} views "
                      f"each: the plain image + {cb['views_per_image'] - 1} augmented) took {cb['seconds']:.1f} s "
                      f"({cb['stem_forwards_per_s']:.0f} stem forwards/s); `ssl train` builds it once per run and "
                      "every fold, epoch and stage reuses it, so it is not in the per-step numbers."]
    speedup = r.get("cached_vs_pixels_trainer_speedup")
    lines += ["", "The trainer's overhead over a bare loop doing the same work is "
              + " and ".join(f"{v:+.1f}% with {k} inputs" for k, v in r["overhead_pct"].items())
              + (f"; the feature cache makes the trainer {speedup:.1f}x as fast per step." if speedup else ".")]
    return lines


def md_bf16(r: dict) -> list[str]:
    lines = ["| inputs | fp32 images/s | bf16 autocast images/s | bf16 speedup |", "|---|---:|---:|---:|"]
    for name, sp in r["bf16_speedup"].items():
        lines.append(f"| {name} | {_ips(r['images_per_s'][f'{name}_fp32'])} | "
                     f"{_ips(r['images_per_s'][f'{name}_bf16'])} | {sp:.2f}x |")
    flags = ", ".join(f for f, on in r["cpu_flags"].items() if on) or "none of " + ", ".join(r["cpu_flags"])
    return lines + ["", f"Bare training loop, {r['model']} at {r['img_size']} px, batch {r['batch']}, "
                        f"{r['steps']} steps, {_th(r['threads'])}; CPU flags: {flags}; oneDNN bf16 supported: "
                        f"{r['onednn_bf16_supported']}.  bf16 autocast is "
                        + " and ".join(f"{sp:.2f}x as fast as fp32 with {n} inputs"
                                       for n, sp in r["bf16_speedup"].items()) + "."]


def md_scaling(r: dict) -> list[str]:
    lines = ["| images | wall s | model load s | ms / image (wall) | images/s (wall) |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {x['images']} | {x['wall_seconds']:.1f} | {x['model_load_seconds']:.2f} | "
              f"{x['ms_per_image_wall']:.1f} | {_ips(x['images_per_s_wall'])} |" for x in r["rows"]]
    lines.append("")
    if "fit" in r:
        f, ratio = r["fit"], r["per_image_largest_vs_smallest"]
        r2 = "n/a" if f["r2"] is None else f"{f['r2']:.4f}"
        verdict = ("grows linearly with the number of images" if f["r2"] is not None and f["r2"] >= 0.99
                   else "is not a clean linear function of the number of images")
        why = (" (the fixed start-up cost spread over more images)" if ratio < 0.9 else
               " (the per-image cost grows with the run)" if ratio > 1.1 else "")
        lines.append(f"`ssl predict` wall time {verdict} (fit {1000 * f['seconds_per_image']:.1f} ms per image "
                     f"{f['intercept_seconds']:+.1f} s, R^2 {r2}); time per image at {r['rows'][-1]['images']} "
                     f"images is {ratio:.2f}x that at {r['rows'][0]['images']}{why} ({r['images']}; batch "
                     f"{r['batch']}).")
    return lines


def md_gpu(r: dict) -> list[str]:
    if not r.get("available"):
        return [f"**{r['note']}.**"]
    bs = r["batches"]
    lines = [f"GPU: {r['gpu']}.", "",
             "| backend | " + " | ".join(f"batch {b}" for b in bs) + " | max abs prob diff vs ORT CPU |",
             "|---|" + "---:|" * (len(bs) + 1)]
    for name, v in r["backends"].items():
        if "error" in v:
            lines.append(f"| {name} | " + " | ".join("-" for _ in bs) + f" | not measured: {v['error']} |")
        else:
            lines.append(f"| {name} ({v['describe']}) | " + " | ".join(_ips(v["images_per_s"][str(b)]) for b in bs)
                         + f" | {v['max_abs_prob_diff_vs_ort_cpu']:.1e} |")
    ok = {k: max(v["images_per_s"].values()) for k, v in r["backends"].items() if "error" not in v}
    if ok:
        top = max(ok, key=ok.get)
        lines += ["", f"Fastest on this GPU: {top} at {_ips(ok[top])} images/s (best batch); the images/s include "
                      "copying the uint8 batch to the GPU and the probabilities back."]
    else:
        lines += ["", "No GPU backend could run here (reasons above): nothing measured."]
    return lines


def md_flops(r: dict) -> list[str]:
    return [f"The served ensemble ({r['members']} members x {r['tta_views']} TTA views"
            + (", the shared frozen stem once per view" if r["shared_stem"] else "") + f") costs "
            f"**{r['gflops_per_image']:.3f} GFLOP per image**: matmuls (linear layers and attention) "
            f"{r['gemm_flops_per_image'] / 1e9:.3f}, convolutions {r['conv_flops_per_image'] / 1e9:.3f} GFLOP "
            f"(matmul share {100 * (r['gemm_share'] or 0):.0f}%).  Counted with {r['counted']}."]


def md_peak(r: dict) -> list[str]:
    if "error" in r:
        return [f"Not measured: {r['error']}"]
    rows = [("fp32", "torch.mm", "fp32_torch"), ("fp32", "ONNX Runtime MatMul", "fp32_ort_matmul"),
            ("bf16", "torch.mm (oneDNN)", "bf16_torch"), ("int8", "torch._int_mm", "int8_torch_int_mm"),
            ("int8", "ONNX Runtime MatMulInteger (u8 x s8)", "int8_ort_matmulinteger")]
    lines = ["| precision | kernel | GFLOP/s (GOP/s for int8) |", "|---|---|---:|"]
    lines += [f"| {p} | {k} | {r[key]:.0f} |" for p, k, key in rows if isinstance(r.get(key), (int, float))]
    pk = r["peak"]
    return lines + ["", f"Square {r['n']} x {r['n']} matmuls, {_th(r['threads'])}, best call over a few seconds.  "
                        f"Peak used below: fp32 {pk['fp32']:.0f}, bf16 {pk['bf16']:.0f}, int8 {pk['int8']:.0f} "
                        f"GFLOP/s (native bf16: {r['bf16_native']}, VNNI: {r['vnni']}, torch CPU capability "
                        f"{r['cpu_capability']})."]


def md_peers(r: dict) -> list[str]:
    lines = ["| engine | precision | images/s | x eager | GFLOP/s | share of peak | max abs dp vs ORT FP32 | "
             "arg-max agreement | test macro F1 |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    eng = r["engines"]
    eager = eng.get("torch-eager", {}).get("images_per_s")
    for e, v in eng.items():
        label = PEER_LABELS.get(e, e)
        if "images_per_s" not in v:
            lines.append(f"| {label} | {PRECISION_OF.get(e, '')} | not measured: {v.get('error')} | | | | | | |")
            continue
        extra = f" (compile {v['compile_seconds']:.0f} s)" if "compile_seconds" in v else ""
        f1 = f"{v['macro_f1_test']:.4f}" if "macro_f1_test" in v else "-"
        dp = f"{v['max_abs_prob_diff_vs_ort_fp32']:.1e}" if "max_abs_prob_diff_vs_ort_fp32" in v else "-"
        ag = f"{100 * v['argmax_agreement_vs_ort_fp32']:.1f}%" if "argmax_agreement_vs_ort_fp32" in v else "-"
        share = f"{100 * v['share_of_peak']:.0f}%" if "share_of_peak" in v else "-"
        gf = f"{v['gflops_per_s']:.0f}" if "gflops_per_s" in v else "-"
        lines.append(f"| {label}{extra} | {v['precision']} | {_ips(v['images_per_s'])} | "
                     f"{v['images_per_s'] / eager:.2f}x | {gf} | {share} | {dp} | {ag} | {f1} |" if eager else
                     f"| {label}{extra} | {v['precision']} | {_ips(v['images_per_s'])} | - | {gf} | {share} | {dp} | {ag} | {f1} |")
    d = r.get("default_path", {})
    lines += ["", f"Each engine in its own process ({_th(r['threads'])}, batch {r['batch']}, {r['images']} test images, "
                  f"best of {r['reps']} full passes; {r['input']}).  Share of peak: achieved GFLOP/s (images/s x the "
                  "ensemble's FLOPs per image) over the measured matmul peak of the precision the engine runs in."]
    if r.get("test_images_per_class"):
        lines[-1] += (" Test macro F1: the engine's labels of those images against their true classes ("
                      + ", ".join(f"{k} {v}" for k, v in r["test_images_per_class"].items())
                      + "; evenly spaced over the class-sorted test split, so every class keeps its share).")
    if d.get("images_per_s"):
        lines += ["", f"Default `ssl predict --backend auto` path on this export: **{d['backend']}** "
                      f"({_ips(d['images_per_s'])} images/s): {d['vs_torch_eager']}x PyTorch eager fp32, "
                      f"{d['vs_ort_fp32']}x ONNX Runtime FP32, {100 * d['vs_fastest']:.0f}% of the fastest engine "
                      f"measured here ({PEER_LABELS.get(r['fastest'], r['fastest'])})."]
    return lines


PRECISION_OF = {"torch-eager": "fp32", "torch-bf16": "bf16", "torch-compile": "fp32", "ort-fp32": "fp32",
                "ort-fp32-fused": "fp32", "ort-int8": "int8", "ort-int8-qdq": "int8", "ov-fp32": "fp32",
                "ov-bf16": "bf16", "ov-int8": "int8", "ov-bf16-1stream": "bf16"}


def md_contention(r: dict) -> list[str]:
    lines = ["| workload | alone images/s | beside busy processes | ratio |", "|---|---:|---:|---:|"]
    for row in r["rows"]:
        if "ratio" in row:
            lines.append(f"| {row['workload']} | {_ips(row['alone_images_per_s'])} | "
                         f"{_ips(row['loaded_images_per_s'])} | {row['ratio']:.2f}x |")
        else:
            err = row["alone"].get("error") or row["loaded"].get("error")
            lines.append(f"| {row['workload']} | not measured: {err} | | |")
    return lines + ["", f"Beside {r['competitors']} competitors ({r['competitor']}), one per usable core: a fair share "
                        f"is {r['fair_share']}x, the target >= {r['target']}x.  {_th(r['threads'])}, batch "
                        f"{r['batch']}, about {r['seconds_per_measurement']:.0f} s per measurement; {r['statistic']}."]


@dataclass(frozen=True)
class Section:
    """One part of the report: ``run(ctx) -> dict`` (the JSON) and ``md(dict) -> lines``."""

    key: str
    title: str
    run: Callable[["Ctx"], dict]
    md: Callable[[dict], list[str]]


SECTION_LIST = [
    Section("flops", "1. Work per image: FLOPs of the ensemble", sec_flops, md_flops),
    Section("peak", "2. This CPU's matmul peak", sec_peak, md_peak),
    Section("peers", "3. Every engine side by side (same ensemble, batch, threads, uint8 input)", sec_peers, md_peers),
    Section("ort_torch", "4. ONNX Runtime vs PyTorch eager (in one process)", sec_ort_torch, md_ort_torch),
    Section("int8", "5. FP32 vs INT8 (dynamic)", sec_int8, md_int8),
    Section("tta", "6. With vs without TTA", sec_tta, md_tta),
    Section("batch", "7. Batch-size sweep (ONNX Runtime CPU)", sec_batch, md_batch),
    Section("e2e", "8. `ssl predict` end to end vs the raw session", sec_e2e, md_e2e),
    Section("contention", "9. Under contention: one busy process per core", sec_contention, md_contention),
    Section("train", "10. Training throughput: semivit trainer vs a bare loop", sec_train, md_train),
    Section("bf16", "11. bf16 autocast vs fp32 training on CPU", sec_bf16, md_bf16),
    Section("scaling", "12. Scaling of `ssl predict` with the number of images", sec_scaling, md_scaling),
    Section("gpu", "13. GPU: TensorRT vs ONNX Runtime CUDA vs PyTorch CUDA", sec_gpu, md_gpu),
]
SECTIONS = tuple(x.key for x in SECTION_LIST)


def write_md(doc: dict, path: Path) -> None:
    m, mod = doc["machine"], doc["model"]
    lines = ["# Speed (`benchmarks/speed.py`)", "", "Machine and run (item 9 of the issue):", "",
             f"Machine: {m['cpu']}, {m['physical_cores']} physical cores ({m['usable_cpus']} usable), {m['memory']}; "
             f"{m['platform']}; Python {m['python']}, torch {m['torch']}, onnxruntime {m['onnxruntime']}, "
             f"onnx {m['onnx']}, timm {m['timm']}; commit {m['git_commit']}"
             + (" (with uncommitted changes)." if m["git_dirty"] else "."),
             f"`uptime` at start: `{m.get('uptime_start', '')}`; at end: `{doc.get('uptime_end', '')}`.  "
             f"Load average at start {tuple(round(x, 1) for x in m['load_average_start'])}, at end "
             f"{tuple(round(x, 1) for x in doc['load_average_end'])}"
             + (f" on {m['usable_cpus']} usable CPUs: **the machine was shared with other jobs during this run; "
                "compare only ratios measured in it**; " if max(m['load_average_start'][0], doc['load_average_end'][0])
                > 0.5 * m['usable_cpus'] + 0.5 else "; ")
             + (f"each throughput is the best of {doc['settings']['reps']} interleaved runs (all in the JSON)."
                if doc["settings"]["reps"] > 1 else "one run per throughput."),
             f"Benchmark wall time: {doc['wall_seconds']:.0f} s (per section: "
             + ", ".join(f"{k} {v:.0f} s" for k, v in doc["section_seconds"].items())
             + f").  Command: `{doc['command']}`.", "",
             f"Model: {mod['description']}; export {mod['export']} ({mod['members']} members, {mod['img_size']} px).  "
             f"Images: {doc['settings']['images']} of the ELPV test split (300x300 greyscale PNG); batch "
             f"{doc['settings']['batch']}, {_th(doc['settings']['threads'])} unless a section says otherwise.", ""]
    if mod["untrained_weights"]:
        lines += ["**Untrained weights**: the quick preset's architecture with its pretrained stem and untrained "
                  "transformers and heads.  Inference and training cost do not depend on the weights' values, so every "
                  "speed here is that of a trained quick run; only INT8's agreement/F1 figures need a trained run.", ""]
    if doc.get("quick"):
        lines += ["**Smoke run (`--quick`)**: few images and steps, short timings: not for quoting.", ""]
    if not doc.get("complete", True):
        lines += ["**Incomplete run**: written after each section; the run stopped (or is still running) after "
                  + ", ".join(doc["sections"]) + ".", ""]
    for sec in SECTION_LIST:
        key = sec.key
        if key not in doc["sections"]:
            continue
        r = doc["sections"][key]
        lines += [f"## {sec.title}", ""]
        if "error" in r and key not in ("gpu", "peak"):
            lines += [f"Failed: `{r['error']}`", ""]
            continue
        lines += sec.md(r) + [""]
        if key == "scaling" and doc.get("plot"):
            lines += [f"![batch sweep and scaling]({doc['plot']})", ""]
    path.write_text("\n".join(lines) + "\n")


def write_plot(doc: dict, path: Path) -> bool:
    s = doc["sections"]
    batch, scale = s.get("batch", {}), s.get("scaling", {})
    if "rows" not in batch and "rows" not in scale:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    if "rows" in batch:
        xs = [r["batch"] for r in batch["rows"]]
        a.plot(xs, [r["images_per_s"] for r in batch["rows"]], "o-",
               label=f"ONNX Runtime CPU, {_th(batch['threads'])}")
        for name, v in s.get("gpu", {}).get("backends", {}).items():
            if "error" not in v:
                a.plot(xs, [v["images_per_s"][str(x)] for x in xs], "s--", label=name)
        if len(a.get_lines()) > 1:
            a.set_yscale("log")
        a.set_xscale("log", base=2)
        a.set_xticks(xs, [str(x) for x in xs])
        a.set_xlabel("batch size")
        a.set_ylabel("images/s")
        a.set_title(f"Batch sweep (level {batch['level']})")
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    else:
        a.text(0.5, 0.5, "batch sweep not measured", ha="center", transform=a.transAxes)
    if "rows" in scale:
        xs = np.array([r["images"] for r in scale["rows"]], float)
        b.plot(xs, [r["wall_seconds"] for r in scale["rows"]], "o", label="ssl predict wall time")
        if "fit" in scale:
            f = scale["fit"]
            grid = np.linspace(0, xs.max(), 50)
            b.plot(grid, f["seconds_per_image"] * grid + f["intercept_seconds"], "-", alpha=0.6,
                   label=f"linear fit, R^2 = {f['r2']}")
        b.set_xlabel("images")
        b.set_ylabel("seconds")
        b.set_title("Scaling of ssl predict")
        b.set_xlim(left=0)
        b.set_ylim(bottom=0)
        b.legend(fontsize=8)
        b.grid(alpha=0.3)
    else:
        b.text(0.5, 0.5, "scaling not measured", ha="center", transform=b.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------ main

def image_paths(images_dir: Path) -> list[str]:
    """The test images in the one order every section decodes, labels and scores them."""
    return sorted(str(p) for p in images_dir.iterdir())


def test_labels(paths: list[str], classes: list[str]) -> Optional[np.ndarray]:
    """The class of each of ``paths`` (its folder in the demo data: the symlink's target's
    parent), when the model knows it."""
    idx = {c: i for i, c in enumerate(classes)}
    names = [Path(p).resolve().parent.name for p in paths]
    return np.array([idx[n] for n in names]) if all(n in idx for n in names) else None


def load_test_set(images_dir: Path, meta: dict, batch: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(decoded images, their true classes or None): row i of both is the i-th of image_paths."""
    paths = image_paths(images_dir)
    return ps.decode_arrays(paths, int(meta["img_size"]), batch), test_labels(paths, list(meta["classes"]))


def score_test(labels: np.ndarray, probs: np.ndarray) -> dict:
    """Macro F1 of ``probs``' arg-max (one row per test image, in order) against the test labels,
    over the model's classes (``ssl eval``'s metric)."""
    from semivit.metrics import macro_f1

    if len(probs) != len(labels):
        return {"macro_f1_test_error": f"{len(probs)} predictions for {len(labels)} test images"}
    return {"macro_f1_test": macro_f1(labels, probs.argmax(1), probs.shape[1])}


def model_source(args, work: Path) -> tuple[Path, bool, str]:
    if args.run is not None:
        run = Path(args.run)
        if not (run / "ensemble.json").is_file():
            raise SystemExit(f"{run} is not a trained run (no ensemble.json)")
        if not ps.loads(run):
            raise SystemExit(f"{run}: its checkpoints do not load with this code")
        ens = read_json(run / "ensemble.json")
        return run, False, f"trained run {run} ({len(ens['members'])} members)"
    members = 2 if args.quick else 10
    run = ps.untrained_quick_run(work / "quick_smoke" if args.quick else work, members=members)
    return run, True, f"the quick preset's architecture, {members} x vit_hybrid_lite0 at 128 px, untrained weights"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="a trained run (default: the quick architecture, untrained weights)")
    ap.add_argument("--images", type=int, help="test images for the inference sections (default 656; quick 32)")
    ap.add_argument("--batch", type=int, help="inference batch size (default 32; quick 8)")
    ap.add_argument("--threads", type=int, help="threads for every session and for training (default: physical cores)")
    ap.add_argument("--batches", type=int, nargs="+", help="batch sweep (default 1 8 32 64; quick 1 8)")
    ap.add_argument("--scaling", type=int, nargs="+",
                    help="ssl predict image counts (default 1000 2000 4000; quick 16 32)")
    ap.add_argument("--train-steps", type=int, help="training steps per measurement (default 12; quick 2)")
    ap.add_argument("--train-batch", type=int, help="training batch size (default: the config's; quick 8)")
    ap.add_argument("--reps", type=int, help="interleaved repetitions, best kept (default 3; quick 1)")
    ap.add_argument("--min-seconds", type=float,
                    help="least seconds per inference throughput run (default 5; quick 0.5)")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), metavar="SECTION",
                    help=f"subset of: {' '.join(SECTIONS)}")
    ap.add_argument("--peer-timeout", type=float, default=600.0,
                    help="seconds one engine of the peers section may take, compile included (default 600)")
    ap.add_argument("--peers", nargs="+", help="engines of the peers section (default: all of benchmarks/engines.py)")
    ap.add_argument("--quick", action="store_true", help="smoke mode: few images and steps, results under WORK")
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default /tmp/semivit-speed-bench)")
    ap.add_argument("--out", type=Path, default=None, help="results directory (default benchmarks/results)")
    args = ap.parse_args(argv)
    q = args.quick
    defaults = {"images": 32 if q else 656, "batch": 8 if q else 32, "batches": [1, 8] if q else [1, 8, 32, 64],
                "scaling": [16, 32] if q else [1000, 2000, 4000], "train_steps": 2 if q else 12,
                "train_batch": 8 if q else None, "reps": 1 if q else 3, "min_seconds": 0.5 if q else 5.0,
                "threads": physical_cores(), "work": Path("/tmp/semivit-speed-bench" + ("-quick" if q else ""))}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.out is None:
        args.out = args.work / "results" if q else ps.RESULTS
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    t_start = time.perf_counter()
    os.environ.setdefault("SEMIVIT_QUIET", "1")
    os.environ["SEMIVIT_THREADS"] = str(args.threads)  # `ssl predict` subprocesses: the same thread count
    args.work.mkdir(parents=True, exist_ok=True)
    script = Path(sys.argv[0]).resolve()
    script = script.relative_to(ps.ROOT).as_posix() if script.is_relative_to(ps.ROOT) else sys.argv[0]
    doc = {"command": "python " + " ".join([script, *(sys.argv[1:] if argv is None else argv)]),
           "machine": machine(), "quick": args.quick, "sections": {}, "section_seconds": {}}
    images_dir = ps.demo_images(args.work, args.images)
    run, untrained, description = model_source(args, args.work)
    print(f"== model: {description}", flush=True)
    export = ps.export_of(run, args.work / "quick_smoke" if untrained and args.quick else args.work, untrained)
    meta = read_json(export / "meta.json")
    arrays, labels = load_test_set(images_dir, meta, args.batch)
    c = Ctx(args=args, work=args.work, run=run, export=export, untrained=untrained, meta=meta, images_dir=images_dir,
            arrays=arrays, labels=labels, threads=args.threads, batch=args.batch,
            reps=args.reps, min_seconds=args.min_seconds)
    c.ort = open_backend(export, "onnxruntime-cpu", threads=args.threads)
    doc["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    doc["model"] = {"description": description, "run": str(run), "export": str(export), "untrained_weights": untrained,
                    "members": len(meta["members"]), "img_size": int(meta["img_size"]),
                    "levels": [lv.name for lv in c.ort.levels]}
    for sec in SECTION_LIST:
        key = sec.key
        if key not in args.sections:
            continue
        print(f"== {key}", flush=True)
        t0 = time.perf_counter()
        try:
            doc["sections"][key] = c.results[key] = sec.run(c)
        except Exception as e:  # noqa: BLE001 - one failed section must not lose the others
            traceback.print_exc()
            doc["sections"][key] = {"error": f"{type(e).__name__}: {first_line(e)}"}
        doc["section_seconds"][key] = round(time.perf_counter() - t0, 1)
        print(json.dumps({k: v for k, v in doc["sections"][key].items() if k != "runs"}, default=str), flush=True)
        _write(doc, args, t_start, partial=True)  # after every section: a stopped run keeps what it measured
    _write(doc, args, t_start, partial=False)
    print(f"wrote {args.out / 'speed.json'}, speed.md" + (", speed.png" if doc.get("plot") else ""))


def _write(doc: dict, args, t_start: float, partial: bool) -> None:
    doc["load_average_end"] = os.getloadavg()
    doc["uptime_end"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    doc["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    doc["complete"] = not partial
    args.out.mkdir(parents=True, exist_ok=True)
    if not partial and write_plot(doc, args.out / "speed.png"):
        doc["plot"] = "speed.png"
    (args.out / "speed.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    write_md(doc, args.out / "speed.md")


if __name__ == "__main__":
    main()
