"""Inference engines side by side, each measured in its own process (used by benchmarks/speed.py).

Why a process per engine: ``torch.set_num_threads`` (and OpenMP's thread pool, and the wait policy
read from ``OMP_WAIT_POLICY`` at start-up) are process-global, so two engines - or two thread
counts - measured in one process share one setting (predict_speed.py's thread-count bug: both
PyTorch backends ran with the same threads).  Here the thread count and the environment are set
before torch is imported, and nothing else runs in the process.

Every engine takes the same uint8 NHWC batch and returns the ensemble's probabilities:

    torch-eager      PyTorch eager fp32, the run's checkpoints (semivit's torch backend)
    torch-bf16       the same under torch.autocast("cpu", bfloat16)
    torch-compile    torch.compile of the same EnsembleModel (inductor, fixed batch; compile time
                     reported separately, not in images/s)
    ort-fp32         ONNX Runtime CPU on model.onnx, the session `ssl predict` opens (all graph
                     optimisations, no spinning)
    ort-fp32-fused   ONNX Runtime on model.onnx after onnxruntime.transformers' optimizer
                     (model_type vit: attention / LayerNorm / GELU fusions)
    ort-int8         ONNX Runtime dynamic INT8 (the export's model.int8.onnx, else quantised here)
    ort-int8-qdq     ONNX Runtime static QDQ INT8, Conv stem included, per-channel weights,
                     calibrated on the run's training images (the export's, else built here)
    ov-fp32 / ov-bf16 / ov-int8   OpenVINO FP32, bf16 hint, NNCF INT8 (the export's IR, else built),
                     as served: one single-threaded stream per thread
    ov-bf16-1stream  OpenVINO bf16 in one stream of all the threads (the latency configuration)

and two training loops for the contention section: ``train`` (one process, --threads threads or
semivit's thread governor) and ``train-ddp`` (--threads single-threaded data-parallel ranks, DDP
over gloo: what ``torchrun --nproc-per-node N ssl train`` runs).

Usage (one engine, JSON result on stdout's last line):
    python benchmarks/engines.py ENGINE --export EXPORT --run RUN --images X.npy --batch 32
           --threads 2 [--reps 2] [--probs OUT.npy] [--seconds S]

Timing runs full batches only (the images past the last one are left out of images/s); --probs
holds every image's probabilities, in the order of X.npy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ENGINES = ("torch-eager", "torch-bf16", "torch-compile", "ort-fp32", "ort-fp32-fused", "ort-int8",
           "ort-int8-qdq", "ov-fp32", "ov-bf16", "ov-int8", "ov-bf16-1stream")
PRECISION = {"torch-eager": "fp32", "torch-bf16": "bf16", "torch-compile": "fp32", "ort-fp32": "fp32",
             "ort-fp32-fused": "fp32", "ort-int8": "int8", "ort-int8-qdq": "int8", "ov-fp32": "fp32",
             "ov-bf16": "bf16", "ov-int8": "int8", "ov-bf16-1stream": "bf16"}
ROOT = Path(__file__).resolve().parents[1]


def _torch_model(run: Path, threads: int):
    import torch

    from semivit.models.ensemble import load_ensemble

    torch.set_num_threads(threads)
    model, _ = load_ensemble(run, tta=True)
    return torch, model.eval()


def build(engine: str, export: Path, run: Path, threads: int, work: Path, batch: int):
    """(predict(uint8 batch) -> probs, description, extra info dict)."""
    import numpy as np

    info: dict = {}
    if engine.startswith("torch"):
        torch, model = _torch_model(run, threads)
        if engine == "torch-compile":
            # each member (and the shared stem) compiled on its own: the members share one
            # architecture, so dynamo compiles it once and reuses the code for every member
            # (parameters are graph inputs), instead of one huge graph of all of them
            for i, m in enumerate(model.members):
                model.members[i] = torch.compile(m, dynamic=False)
            if model.stem is not None:
                model.stem = torch.compile(model.stem, dynamic=False)
            t = time.perf_counter()
            with torch.no_grad():
                model(torch.zeros((batch, *_size(export), 3), dtype=torch.uint8))
            info["compile_seconds"] = round(time.perf_counter() - t, 1)
        bf16 = engine == "torch-bf16"

        def fn(x):
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                p, _ = model(torch.from_numpy(x))
            return p.float().numpy()

        return fn, f"torch {torch.__version__} {engine.split('-')[1]} ({torch.get_num_threads()} threads)", info
    from semivit.serve.backends import open_backend

    if engine in ("ort-fp32", "ov-fp32", "ov-bf16", "ov-bf16-1stream"):
        name = {"ort-fp32": "onnxruntime-cpu", "ov-fp32": "openvino", "ov-bf16": "openvino-bf16",
                "ov-bf16-1stream": "openvino-bf16"}[engine]
        be = open_backend(export, name, threads=threads, **({"streams": 1} if engine == "ov-bf16-1stream" else {}))
        return (lambda x: be.predict(x)[0]), be.describe(), info
    if engine in ("ort-int8", "ort-int8-qdq", "ov-int8"):
        name = {"ort-int8": "onnxruntime-int8", "ort-int8-qdq": "onnxruntime-int8-qdq", "ov-int8": "openvino-int8"}[engine]
        d = _quantised_export(engine, export, run, work)
        info["model_file_source"] = "the export's (accepted by its gate)" if d == export else f"built here in {d}"
        be = open_backend(d, name, threads=threads)
        return (lambda x: be.predict(x)[0]), be.describe(), info
    if engine == "ort-fp32-fused":
        import onnxruntime as ort

        path = _fused(export, work)
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        from semivit.export.graph import op_counts

        info["fused_ops"] = {k: v for k, v in op_counts(path).items()
                             if k in ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "LayerNormalization",
                                      "FastGelu", "Gelu", "BiasGelu", "MatMul", "FusedMatMul")}
        return (lambda x: sess.run(["probs"], {"images": np.ascontiguousarray(x)})[0]), \
            f"onnxruntime {ort.__version__} CPU, transformer-optimizer fused graph ({threads} threads)", info
    raise SystemExit(f"unknown engine {engine}")


def _size(export: Path) -> tuple[int, int]:
    s = int(json.loads((export / "meta.json").read_text())["img_size"])
    return s, s


def _fused(export: Path, work: Path) -> Path:
    """model.onnx through onnxruntime.transformers' optimizer (model_type vit)."""
    from onnxruntime.transformers.optimizer import optimize_model

    out = work / "model.fused.onnx"
    if not out.is_file() or out.stat().st_mtime < (export / "model.onnx").stat().st_mtime:
        heads, hidden = _vit_dims(export)
        opt = optimize_model(str(export / "model.onnx"), model_type="vit", num_heads=heads, hidden_size=hidden,
                             opt_level=1)
        opt.save_model_to_file(str(out))
    return out


def _vit_dims(export: Path) -> tuple[int, int]:
    """(heads, width) of the members (0, 0: let the optimizer detect them)."""
    try:
        import torch

        from semivit.models.checkpoint import load_checkpoint

        meta = json.loads((export / "meta.json").read_text())
        run = Path(meta["source_run"])
        m, _ = load_checkpoint(run / meta["members"][0]["path"])
        for mod in m.modules():
            if hasattr(mod, "num_heads") and hasattr(mod, "qkv"):
                return int(mod.num_heads), int(mod.qkv.in_features)
        del torch
    except Exception:  # noqa: BLE001
        pass
    return 0, 0


def _quantised_export(engine: str, export: Path, run: Path, work: Path) -> Path:
    """The export when it holds this engine's quantised model, else a copy of the export in WORK
    with it built by the export's own routine (no gate applied: the benchmark measures it)."""
    import shutil

    from semivit.export import candidates as cm

    file = {"ort-int8": "model.int8.onnx", "ort-int8-qdq": "model.int8-qdq.onnx", "ov-int8": cm.OV_INT8_IR}[engine]
    if (export / file).is_file():
        return export
    d = work / f"export_{engine}"
    if (d / file).is_file():
        return d
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(export, d)
    from semivit.export import int8 as int8mod
    from semivit.export import verify

    meta = json.loads((export / "meta.json").read_text())
    # the export's calibration set exactly: all the run's labeled images (as the export's gate
    # loads them), then the same class-interleaved subset candidates.build() takes
    data = verify.load_run_images(run, meta["classes"], int(meta["img_size"]))
    calib = verify.interleaved_subset(data, cm.CALIBRATION_IMAGES)
    with cm._quiet():
        if engine == "ort-int8":
            int8mod.quantize(d / "model.onnx", d / file)
        elif engine == "ort-int8-qdq":
            int8mod.quantize(d / "model.onnx", d / file, calibration=calib)
        else:
            import onnx

            names = int8mod.member_terms(onnx.load(str(d / "model.onnx"), load_external_data=False))
            src = int8mod._with_outputs(d / "model.onnx", names)
            cm._build_ov_int8(src, d / file, calib)
            src.unlink(missing_ok=True)
    return d


def gemm_peak(threads: int, n: int, seconds: float) -> dict:
    """GFLOP/s of large square matmuls (2 n^3 operations each) per precision, best of the timed
    calls: torch fp32 and bf16 (oneDNN), int8 with torch._int_mm and ONNX Runtime MatMulInteger
    (the kernel dynamic INT8 runs).  An integer multiply-add counts as 2 operations, as a float one."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    res: dict = {"n": n, "threads": threads}

    def best(fn) -> float:
        fn()
        t_all, b = time.perf_counter(), float("inf")
        while time.perf_counter() - t_all < seconds:
            t = time.perf_counter()
            fn()
            b = min(b, time.perf_counter() - t)
        return round(2 * n ** 3 / b / 1e9, 1)

    a, b = torch.randn(n, n), torch.randn(n, n)
    res["fp32_torch"] = best(lambda: torch.mm(a, b))
    ab, bb = a.bfloat16(), b.bfloat16()
    res["bf16_torch"] = best(lambda: torch.mm(ab, bb))
    ai, bi = torch.randint(-128, 127, (n, n), dtype=torch.int8), torch.randint(-128, 127, (n, n), dtype=torch.int8)
    try:
        res["int8_torch_int_mm"] = best(lambda: torch._int_mm(ai, bi))
    except Exception as e:  # noqa: BLE001
        res["int8_torch_int_mm_error"] = str(e).splitlines()[0][:200]
    try:
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper

        g = helper.make_graph([helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "mmi",
                              [helper.make_tensor_value_info("A", TensorProto.UINT8, [n, n]),
                               helper.make_tensor_value_info("B", TensorProto.INT8, [n, n])],
                              [helper.make_tensor_value_info("Y", TensorProto.INT32, [n, n])])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        A = np.random.randint(0, 255, (n, n), dtype=np.uint8)
        B = np.random.randint(-128, 127, (n, n), dtype=np.int8)
        res["int8_ort_matmulinteger"] = best(lambda: sess.run(None, {"A": A, "B": B}))
        so2 = ort.SessionOptions()
        so2.intra_op_num_threads, so2.inter_op_num_threads = threads, 1
        g2 = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["Y"])], "mm",
                               [helper.make_tensor_value_info("A", TensorProto.FLOAT, [n, n]),
                                helper.make_tensor_value_info("B", TensorProto.FLOAT, [n, n])],
                               [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [n, n])])
        s2 = ort.InferenceSession(helper.make_model(g2, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString(),
                                  so2, providers=["CPUExecutionProvider"])
        Af, Bf = a.numpy(), b.numpy()
        res["fp32_ort_matmul"] = best(lambda: s2.run(None, {"A": Af, "B": Bf}))
        del onnx
    except Exception as e:  # noqa: BLE001
        res["ort_error"] = str(e).splitlines()[0][:200]
    res["peak"] = {"fp32": max(v for k, v in res.items() if k.startswith("fp32_")),
                   "bf16": res["bf16_torch"],
                   "int8": max([v for k, v in res.items() if k.startswith("int8_") and isinstance(v, float)] or [0.0])}
    return res


def _bare_training(run: Path, x, batch: int, steps: int, wrap=None):
    """The run's model (``wrap``-ped, e.g. in DDP), AdamW and cross-entropy on ``x`` resized to
    ``batch * steps`` images: returns (cfg, bf16, step) where ``step(lo, n)`` trains one
    optimiser step on images lo..lo+n (shared by :func:`train_loop` and :func:`_ddp_rank`)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from semivit.config import load_run_config
    from semivit.data.dataset import Preprocess
    from semivit.models.networks import build_model

    cfg = load_run_config(run)[0]
    classes = json.loads((run / "ensemble.json").read_text())["classes"]
    model = build_model(cfg.model, len(classes), pretrained=False).train()
    model = wrap(model) if wrap else model
    bf16 = cfg.train.precision in ("auto", "bf16")
    pre = Preprocess()
    xs = torch.from_numpy(np.ascontiguousarray(np.resize(x, (batch * steps, *x.shape[1:])))).permute(0, 3, 1, 2)
    ys = torch.from_numpy(np.arange(len(xs)) % len(classes))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(lo: int, n: int) -> None:
        xb = pre(xs[lo:lo + n])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(xb)
        loss = F.cross_entropy(logits.float(), ys[lo:lo + n])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step.model = model
    return cfg, bf16, step


def train_loop(run: Path, x, threads: int, batch: int, steps: int, seconds: float, governor: bool = False) -> dict:
    """A bare training loop (AdamW, cross-entropy, the run's model and precision) on ``x``:
    images/s per pass of ``steps`` steps, passes repeated for ``seconds``.  ``governor``: the
    thread count chosen while it trains by semivit's ThreadGovernor, as ``ssl train`` does
    (its probe steps are counted in the images/s)."""
    import torch

    torch.set_num_threads(threads)
    cfg, bf16, step = _bare_training(run, x, batch, steps)
    gov = None
    if governor:
        from semivit.trainer.threads import ThreadGovernor

        gov = ThreadGovernor(threads)

    def one_pass(k):
        for s in range(k):
            step(s * batch, batch)
            if gov is not None:
                gov.step(batch)

    one_pass(1)  # warm-up
    if gov is not None:
        gov.start()
    runs, t_all = [], time.perf_counter()
    while len(runs) < 2 or time.perf_counter() - t_all < seconds:
        t = time.perf_counter()
        one_pass(steps)
        runs.append(round(steps * batch / (time.perf_counter() - t), 2))
    return {"engine": "train", "precision": "bf16 autocast" if bf16 else "fp32", "model": cfg.model.name,
            "batch": batch, "steps_per_pass": steps, "runs": runs, "images_per_s": max(runs), "threads": threads,
            "governor": gov.summary() if gov is not None else None,
            "describe": f"bare training loop, {cfg.model.name} at {cfg.model.img_size} px, batch {batch} "
                        + (f"(thread governor over {gov.choices}: ended at {gov.current})" if gov is not None
                           else f"({torch.get_num_threads()} threads)")}


def _ddp_rank(rank: int, world: int, store: str, run: Path, x, batch: int, steps: int, seconds: float,
              out: str) -> None:
    """One rank of :func:`train_loop_ddp`: one thread, 1/world of each batch, gradients averaged
    by DistributedDataParallel over gloo (as ``torchrun ... ssl train`` trains on a CPU)."""
    import gc

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(0)
    cfg, bf16, step = _bare_training(run, x, batch, steps, wrap=torch.nn.parallel.DistributedDataParallel)
    model = step.model
    per = batch // world

    def one_pass(k):
        for s in range(k):
            step(s * batch + rank * per, per)  # this rank's share of global batch s

    one_pass(1)  # warm-up
    runs, t_all = [], time.perf_counter()
    while True:
        dist.barrier()
        t = time.perf_counter()
        one_pass(steps)
        dist.barrier()
        runs.append(round(steps * per * world / (time.perf_counter() - t), 2))
        # every rank takes the same decision: rank 0's clock, broadcast
        go = torch.tensor([1 if (len(runs) < 2 or time.perf_counter() - t_all < seconds) else 0])
        dist.broadcast(go, 0)
        if not int(go):
            break
    # each rank trained on other images: equal weights afterwards show the gradients were averaged
    mine = torch.stack([p.detach().double().sum() for p in model.parameters()])
    every = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    if rank == 0:
        Path(out).write_text(json.dumps({
            "weights_agree": all(torch.allclose(every[0], e, rtol=1e-6, atol=1e-6) for e in every[1:]),
            "engine": "train-ddp", "precision": "bf16 autocast" if bf16 else "fp32", "model": cfg.model.name,
            "batch": batch, "steps_per_pass": steps, "runs": runs, "images_per_s": max(runs), "threads": 1,
            "ranks": world, "describe": f"bare training loop, {cfg.model.name} at {cfg.model.img_size} px, "
                                        f"global batch {batch}: {world} data-parallel ranks x 1 thread (DDP, gloo)"}))
    # Tear down in step: DDP's reducer holds the gloo group, so without this the group died at
    # interpreter exit, after the other rank had closed its sockets, and ~1 run in 10 aborted
    # ("terminate called without an active exception").  Drop the model first, then leave together.
    del step, model
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def train_loop_ddp(run: Path, x, ranks: int, batch: int, steps: int, seconds: float, work: Path) -> dict:
    """:func:`train_loop` as ``ranks`` single-threaded data-parallel processes: no OpenMP barrier
    inside a step (each rank's ops run on one thread), one gradient all-reduce per step."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(dir=work) as d:
        out = os.path.join(d, "result.json")
        mp.spawn(_ddp_rank, args=(ranks, os.path.join(d, "store"), run, x, batch, steps, seconds, out),
                 nprocs=ranks, join=True)
        return json.loads(Path(out).read_text())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("engine", choices=ENGINES + ("peak", "train", "train-ddp"))
    ap.add_argument("--export", type=Path)
    ap.add_argument("--run", type=Path)
    ap.add_argument("--images", type=Path, help=".npy of uint8 NHWC images")
    ap.add_argument("--n", type=int, default=2048, help="peak: matrix size")
    ap.add_argument("--steps", type=int, default=4, help="train: steps per pass")
    ap.add_argument("--governor", action="store_true", help="train: threads chosen by semivit's ThreadGovernor")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--reps", type=int, default=2, help="full passes over the images, best kept")
    ap.add_argument("--seconds", type=float, default=0.0, help="keep passing until this many seconds (contention)")
    ap.add_argument("--probs", type=Path, help="write the first pass's probabilities here (.npy)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/semivit-engines"))
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import numpy as np

    a.work.mkdir(parents=True, exist_ok=True)
    if a.engine == "peak":
        print(json.dumps(gemm_peak(a.threads, a.n, max(1.0, a.seconds))))
        return
    x_all = np.load(a.images)
    x = x_all
    if len(x) >= a.batch:  # full batches only: a partial last batch would recompile torch.compile
        x = x[:len(x) // a.batch * a.batch]
    if a.engine == "train":
        print(json.dumps(train_loop(a.run, x, a.threads, a.batch, a.steps, a.seconds, a.governor)))
        return
    if a.engine == "train-ddp":  # --threads ranks of one thread each
        print(json.dumps(train_loop_ddp(a.run, x, a.threads, a.batch, a.steps, a.seconds, a.work)))
        return
    t = time.perf_counter()
    fn, desc, info = build(a.engine, a.export, a.run, a.threads, a.work, a.batch)
    info["load_seconds"] = round(time.perf_counter() - t, 2)
    batches = [np.ascontiguousarray(x[s:s + a.batch]) for s in range(0, len(x), a.batch)]
    fn(batches[0])  # warm-up
    runs, probs, t_all = [], None, time.perf_counter()
    while len(runs) < a.reps or time.perf_counter() - t_all < a.seconds:
        t = time.perf_counter()
        out = [fn(b) for b in batches]
        runs.append(round(len(x) / (time.perf_counter() - t), 2))
        if probs is None:
            probs = np.concatenate(out)
    if a.probs:  # of every image, in order: the images past the last full batch in one padded batch
        rest = x_all[len(x):]
        if len(rest):
            pad = np.concatenate([rest, np.repeat(rest[-1:], a.batch - len(rest), axis=0)])
            probs = np.concatenate([probs, fn(np.ascontiguousarray(pad))[:len(rest)]])
        np.save(a.probs, probs.astype(np.float32))
    print(json.dumps({"engine": a.engine, "precision": PRECISION[a.engine], "describe": desc,
                      "images_per_s": max(runs), "runs": runs, "images": int(len(x)), "batch": a.batch,
                      "threads": a.threads, "pid": os.getpid(), **info}))


if __name__ == "__main__":
    main()
