"""GPU serving speed (issue 16's GPU row): one trained ensemble, the same uint8 images, on an NVIDIA GPU.

Run where a GPU is lent (``device``); on a machine without one it writes nothing and says so.
Sections, each recorded even when it fails:

  env       GPU, driver, CUDA, cuDNN, torch; which of the product's GPU engines can run here and
            why not (ONNX Runtime's CUDA / TensorRT providers, the ``tensorrt`` package)
  peak      the GPU's matmul peak measured in the same run (n x n x n products, CUDA events):
            fp32 (TF32 off), TF32, fp16, bf16
  flops     FLOPs per image of the served ensemble (benchmarks/speed.py's counter: stem + members x views)
  product   the backends ``ssl predict`` can open on a GPU (``tensorrt``, ``onnxruntime-cuda``,
            ``torch`` on cuda), as served; an engine that cannot open here is a row with its reason
  variants  PyTorch on the GPU, same ensemble (flip TTA on), every one fed the uint8 NHWC batch from
            host memory and returning the probabilities to host memory:
              fp32        eager, TF32 off (the reference for agreement)
              tf32        eager, TF32 matmuls / convolutions
              fp16, bf16  eager under torch.autocast
              fp16-graph, bf16-graph   the autocast forward captured once per batch size as a CUDA
                          graph (torch.cuda.CUDAGraph) and replayed: no per-kernel launch cost
              fp16-compile            torch.compile(mode="reduce-overhead") of each member and of the
                          stem (inductor kernels + CUDA graphs), under fp16 autocast; skipped when the
                          time budget (--compile-budget) is spent
            images/s per batch size (best of --reps interleaved runs), achieved TFLOP/s and share of
            the peak of the variant's precision, arg-max agreement with fp32 on every image, max
            |prob difference|, macro F1 on the test labels (reported, never used to choose)
  e2e       ``ssl predict DIR --model RUN --backend torch`` as a new process on the GPU: whole
            command wall time, against the raw torch backend on pre-decoded arrays
  train     optional (--train-data): ``ssl train DATA --device cuda`` wall time, within --train-timeout

Usage (on the GPU machine):
    python benchmarks/gpu_speed.py --run RUN --images DIR/test [--batches 32 256] [--reps 2]
           [--train-data DATA] [--commit HASH] [--out DIR]
Results: OUT/speed_gpu.{json,md} (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import predict_speed as ps  # noqa: E402  (puts the repository root on sys.path too)
import speed  # noqa: E402

from semivit.serve.backends import first_line, open_backend  # noqa: E402
from semivit.utils import read_json  # noqa: E402

T0 = time.perf_counter()
VARIANTS = ("fp32", "tf32", "fp16", "bf16", "fp16-graph", "bf16-graph", "fp16-compile")
PRECISION = {"fp32": "fp32", "tf32": "tf32", "fp16": "fp16", "bf16": "bf16", "fp16-graph": "fp16",
             "bf16-graph": "bf16", "fp16-compile": "fp16"}


# ------------------------------------------------------------------------------------------ sections

def sec_env() -> dict:
    import torch

    r = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
         "gpu": torch.cuda.get_device_name(0), "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
         "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)}
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30).stdout.strip()
        r["nvidia_smi"] = q
    except (OSError, subprocess.TimeoutExpired) as e:
        r["nvidia_smi"] = f"not run: {e}"
    import onnxruntime as ort

    r["onnxruntime"] = ort.__version__
    r["onnxruntime_providers"] = ort.get_available_providers()
    try:
        import tensorrt  # noqa: F401

        r["tensorrt"] = tensorrt.__version__
    except ImportError as e:
        r["tensorrt"] = None
        r["tensorrt_reason"] = f"the tensorrt package is not installed here ({e})"
    return r


def sec_peak(n: int) -> dict:
    """TFLOP/s of an n x n x n matmul per precision: best of 3 timings of 10 products (CUDA events)."""
    import torch

    out = {}
    for name, dtype, tf32 in (("fp32", torch.float32, False), ("tf32", torch.float32, True),
                              ("fp16", torch.float16, False), ("bf16", torch.bfloat16, False)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        a = torch.randn(n, n, device="cuda", dtype=dtype)
        b = torch.randn(n, n, device="cuda", dtype=dtype)
        for _ in range(3):
            a @ b
        best = 0.0
        for _ in range(3):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(10):
                a @ b
            e.record()
            torch.cuda.synchronize()
            best = max(best, 10 * 2 * n ** 3 / (s.elapsed_time(e) / 1e3) / 1e12)
        out[name] = round(best, 1)
        del a, b
    torch.backends.cuda.matmul.allow_tf32 = False
    return {"n": n, "tflops": out, "how": "torch.matmul on random n x n matrices, 10 products timed with CUDA events, "
                                          "best of 3 after 3 warm-ups"}


class Variant:
    """One way of running the ensemble on the GPU: ``__call__(uint8 NHWC numpy) -> probs numpy``."""

    def __init__(self, run: Path, name: str, device: str = "cuda"):
        import torch

        from semivit.models.ensemble import load_ensemble

        self.torch, self.name, self.device = torch, name, device
        if device != "cuda" and (name.endswith("-graph") or name.endswith("-compile") or name == "tf32"):
            raise RuntimeError(f"{name} needs CUDA")
        tf32 = name == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        model, _ = load_ensemble(run, tta=True)
        self.model = model.to(device).eval()
        prec = PRECISION[name]
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(prec)
        self.graphs: dict[int, tuple] = {}  # -graph: batch size -> (graph, static in, static out)
        self.compiled_shapes: set[int] = set()  # -compile: batch sizes already warmed up
        self.compile_seconds = None
        if name.endswith("-compile"):
            for i, m in enumerate(self.model.members):
                self.model.members[i] = torch.compile(m, mode="reduce-overhead", dynamic=False)
            if self.model.stem is not None:
                self.model.stem = torch.compile(self.model.stem, mode="reduce-overhead", dynamic=False)
            self.compile_seconds = 0.0  # compiled lazily per batch size; the first call of each is timed

    def _forward(self, x):
        torch = self.torch
        with torch.inference_mode(), torch.autocast(self.device, dtype=self.dtype or torch.float32,
                                                     enabled=self.dtype is not None):
            return self.model(x)[0].float()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        torch = self.torch
        x = torch.from_numpy(np.ascontiguousarray(images))
        if not self.name.endswith("-graph"):
            if self.name.endswith("-compile") and len(images) not in self.compiled_shapes:
                t = time.perf_counter()
                for _ in range(3):  # reduce-overhead records its CUDA graphs after warm-up calls
                    self._forward(x.to(self.device))
                torch.cuda.synchronize()
                self.compile_seconds += time.perf_counter() - t
                self.compiled_shapes.add(len(images))
            return self._forward(x.to(self.device)).cpu().numpy()
        b = len(images)
        if b not in self.graphs:
            from semivit.serve.torch_eager import capture_cuda_graph

            static_in = x.to("cuda")
            g, static_out = capture_cuda_graph(self._forward, static_in)
            self.graphs[b] = (g, static_in, static_out)
        g, static_in, static_out = self.graphs[b]
        static_in.copy_(x)
        g.replay()
        return static_out.cpu().numpy()

    def close(self) -> None:
        del self.model, self.graphs
        if self.device == "cuda":
            self.torch.cuda.empty_cache()


def load_images(root: Path, size: int, classes: list[str], batch: int):
    """(uint8 images, their classes or None) of every image under ``root`` (DIR/<class>/... as ``ssl
    predict`` finds them), in one sorted order."""
    from semivit.data.discover import discover_images

    paths = sorted(str(p) for p in discover_images(root).files)
    return ps.decode_arrays(paths, size, batch), speed.test_labels(paths, classes)


def predict_all(fn, arrays: np.ndarray, batch: int) -> np.ndarray:
    """Every image's probabilities; the last partial batch padded to ``batch`` (a CUDA graph has one shape)."""
    out = []
    for s in range(0, len(arrays), batch):
        x = arrays[s:s + batch]
        k = len(x)
        if k < batch:
            x = np.concatenate([x, np.repeat(x[-1:], batch - k, axis=0)])
        out.append(fn(x)[:k])
    return np.concatenate(out)


def quality(probs: np.ndarray, ref: np.ndarray | None, labels: np.ndarray | None) -> dict:
    q = {}
    if ref is not None:
        q["agreement_vs_fp32"] = round(float((probs.argmax(1) == ref.argmax(1)).mean()), 4)
        q["max_abs_prob_diff_vs_fp32"] = float(np.abs(probs - ref).max())
    if labels is not None:
        q.update(speed.score_test(labels, probs))
    return q


def sec_variants(args, run: Path, arrays, labels, flops: float | None, peak: dict) -> dict:
    rows, ref = {}, None
    for name in args.variants:
        if name.endswith("-compile") and time.perf_counter() - T0 > args.compile_budget:
            rows[name] = {"error": f"skipped: the run had spent more than {args.compile_budget:.0f} s before it"}
            continue
        try:
            v = Variant(run, name, args.device)
            fns = {str(b): (lambda b=b: ps.throughput(v, speed.tiled(arrays, 2 * b), b,
                                                      min_seconds=args.min_seconds)) for b in args.batches}
            best, runs = speed.best_of(fns, args.reps)
            probs = predict_all(v, arrays, args.batches[0])
            if name == "fp32":
                ref = probs
            row = {"precision": PRECISION[name], "images_per_s": best, "runs": runs, **quality(probs, ref, labels)}
            if v.compile_seconds is not None:
                row["compile_and_capture_seconds"] = round(v.compile_seconds, 1)
            p = (peak.get("tflops") or {}).get(PRECISION[name])
            if flops:
                top = max(best.values())
                row["achieved_tflops"] = round(top * flops / 1e12, 2)
                if p:
                    row["share_of_peak"] = round(top * flops / 1e12 / p, 4)
            rows[name] = row
            v.close()
            del v
        except Exception as e:  # noqa: BLE001 - recorded, never estimated
            traceback.print_exc()
            rows[name] = {"error": f"{type(e).__name__}: {first_line(e)}"}
        print(json.dumps({name: {k: x for k, x in rows[name].items() if k != "runs"}}), flush=True)
    return rows


def sec_product(args, run: Path, export: Path | None, arrays, ref: np.ndarray | None) -> dict:
    res = {}
    openers = {"torch": lambda: open_backend(run, "torch", device=args.device)}
    if args.device == "cuda":
        openers["torch-fp16"] = lambda: open_backend(run, "torch-fp16")
    if export is not None:
        openers["onnxruntime-cuda"] = lambda: open_backend(export, "onnxruntime-cuda")
        openers["tensorrt"] = lambda: open_backend(export, "tensorrt")
    for name, opener in openers.items():
        try:
            be = opener()
            be.set_level(0)
            fns = {str(b): (lambda b=b: ps.throughput(lambda x: be.predict(x)[0], speed.tiled(arrays, 2 * b), b,
                                                      min_seconds=args.min_seconds)) for b in args.batches}
            best, runs = speed.best_of(fns, args.reps)
            probs = predict_all(lambda x: be.predict(x)[0], arrays, args.batches[0])
            res[name] = {"describe": be.describe(), "images_per_s": best, "runs": runs,
                         **quality(probs, ref, None)}
            be.close()
        except Exception as e:  # noqa: BLE001
            res[name] = {"error": f"{type(e).__name__}: {first_line(e)}"}
        print(json.dumps({name: {k: x for k, x in res[name].items() if k != "runs"}}), flush=True)
    return res


def _ssl(argv: list[str], timeout: float) -> tuple[int, float, str]:
    t = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-m", "semivit.cli", *argv], capture_output=True, text=True,
                           timeout=timeout, cwd=ps.ROOT, env={**os.environ, "PYTHONPATH": str(ps.ROOT) + os.pathsep
                                                              + os.environ.get("PYTHONPATH", "")})
        tail = (r.stdout + r.stderr).strip().splitlines()[-12:]
        return r.returncode, time.perf_counter() - t, "\n".join(tail)
    except subprocess.TimeoutExpired:
        return 124, time.perf_counter() - t, f"timed out after {timeout:.0f} s"


def tiled_dir(root: Path, n: int, work: Path) -> Path:
    """``n`` images: every image under ``root`` (the demo split's three folders), cycled, as symlinks."""
    from semivit.data.discover import discover_images

    d = work / f"images_{n}"
    if not d.is_dir():
        files = sorted(discover_images(root).files)
        d.mkdir(parents=True)
        for i in range(n):
            f = Path(files[i % len(files)])
            os.symlink(f.resolve(), d / f"{i:06d}{f.suffix}")
    return d


def e2e_one(args, run: Path, images: Path, n: int, backend: str, raw_ips: float | None) -> dict:
    import re

    out = args.work / f"e2e_{backend}_{n}.csv"
    argv = ["predict", str(images), "--model", str(run), "--backend", backend, "--out", str(out), "--force"]
    _ssl(argv, 300)  # once to warm the file cache and CUDA's module loading, as a user's second run
    code, wall, tail = _ssl(argv, 300)
    r = {"command": "ssl " + " ".join(argv), "backend": backend, "exit": code, "wall_seconds": round(wall, 2),
         "images": n, "images_per_s_whole_command": round(n / wall, 1) if code == 0 else None, "output_tail": tail}
    m = re.search(r"predicted \d+ of \d+ images in ([\d.]+) s .*model load ([\d.]+) s", tail)
    if code == 0 and m:  # `ssl predict`'s own account: the steady state is its time less the model load
        r["predict_seconds"], r["model_load_seconds"] = float(m.group(1)), float(m.group(2))
        r["images_per_s_after_load"] = round(n / max(1e-9, r["predict_seconds"] - r["model_load_seconds"]), 1)
    if code == 0 and raw_ips:
        r["raw_torch_backend_images_per_s"] = raw_ips
        r["whole_command_vs_raw"] = round(n / wall / raw_ips, 3)
        if "images_per_s_after_load" in r:
            r["after_load_vs_raw"] = round(r["images_per_s_after_load"] / raw_ips, 3)
    return r


def sec_e2e(args, run: Path, images: Path, n: int, raw_ips: float | None) -> dict:
    if not args.e2e_backends:
        return e2e_one(args, run, images, n, "torch", raw_ips)
    rows = []
    for count in args.e2e_images or [n]:
        d = images if count == n else tiled_dir(args.tile_from or args.train_data or images, count, args.work)
        for be in args.e2e_backends:
            rows.append(e2e_one(args, run, d, count, be, None))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "output_tail"}), flush=True)
    return {"rows": rows}


def sec_load() -> dict:
    """Where a GPU model load goes, each step in a new process: the interpreter with torch
    imported, then CUDA's context and first kernels."""
    code = ("import time; t=time.perf_counter(); import torch; a=time.perf_counter(); torch.cuda.init(); "
            "x=torch.zeros(1, device='cuda'); torch.cuda.synchronize(); b=time.perf_counter(); "
            "y=(torch.randn(64,64,device='cuda')@torch.randn(64,64,device='cuda')); torch.cuda.synchronize(); "
            "c=time.perf_counter(); print(round(a-t,3), round(b-a,3), round(c-b,3))")
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    wall = time.perf_counter() - t
    parts = r.stdout.split()
    if r.returncode != 0 or len(parts) != 3:
        return {"error": (r.stderr.strip().splitlines() or ["no output"])[-1]}
    return {"process_wall_seconds": round(wall, 2), "import_torch_seconds": float(parts[0]),
            "cuda_context_seconds": float(parts[1]), "first_matmul_seconds": float(parts[2])}


def sec_train(args) -> dict:
    out = args.work / "run_gpu"
    argv = ["train", str(args.train_data), "--out", str(out), "--device", args.device, *args.train_args]
    left = args.deadline - (time.perf_counter() - T0) - 20 if args.deadline else args.train_timeout
    if left < 60:
        return {"command": "ssl " + " ".join(argv), "error": f"skipped: only {left:.0f} s left before --deadline"}
    code, wall, tail = _ssl(argv, min(args.train_timeout, left))
    r = {"command": "ssl " + " ".join(argv), "exit": code, "wall_seconds": round(wall, 1), "output_tail": tail}
    if (out / "timings.yaml").is_file():
        import yaml

        r["stage_seconds"] = yaml.safe_load((out / "timings.yaml").read_text())
    if code == 0 and (Path(args.train_data) / "test").is_dir():
        ev = args.work / "eval_gpu_run.json"
        c2, w2, t2 = _ssl(["eval", str(out), str(Path(args.train_data) / "test"), "--out", str(ev), "--force"], 300)
        r["eval"] = {"exit": c2, "wall_seconds": round(w2, 1)}
        if c2 == 0 and ev.is_file():
            e = read_json(ev)
            r["eval"].update({k: e[k] for k in ("macro_f1", "accuracy", "n_images") if k in e})
        else:
            r["eval"]["output_tail"] = t2
    return r


# ------------------------------------------------------------------------------------------ report

def write_md(doc: dict, path: Path) -> None:
    env, s = doc["sections"].get("env", {}), doc["sections"]
    lines = ["# GPU serving speed (`benchmarks/gpu_speed.py`)", "",
             f"GPU: {env.get('gpu')} (compute capability {env.get('capability')}, {env.get('gpu_memory_gib')} GiB; "
             f"nvidia-smi: {env.get('nvidia_smi')}); torch {env.get('torch')}, CUDA {env.get('cuda')}, cuDNN "
             f"{env.get('cudnn')}; onnxruntime {env.get('onnxruntime')} (providers: "
             f"{', '.join(env.get('onnxruntime_providers') or [])}); TensorRT: {env.get('tensorrt') or 'not installed'}.",
             f"Host: {doc['machine'].get('cpu')}, {doc['machine'].get('usable_cpus')} CPUs.  Commit {doc['commit']}; "
             f"wall time {doc['wall_seconds']:.0f} s.  Command: `{doc['command']}`.", "",
             f"Model: {doc.get('model')}.  Images: the {doc.get('images')} ELPV test images, decoded once to "
             f"{doc.get('img_size')} px uint8; every images/s includes copying the uint8 batch to the GPU and the "
             f"probabilities back; best of {doc['settings']['reps']} interleaved runs.", ""]
    peak = s.get("peak", {})
    if "tflops" in peak:
        lines += ["## Peak", "", "Matmul peak measured in this run (n = %d): " % peak["n"]
                  + ", ".join(f"{k} {v} TFLOP/s" for k, v in peak["tflops"].items()) + ".", ""]
    fl = s.get("flops", {})
    if "gflops_per_image" in fl:
        lines += [f"The ensemble costs {fl['gflops_per_image']} GFLOP per image ({fl['members']} members x "
                  f"{fl['tta_views']} views).", ""]
    bs = doc["settings"]["batches"]
    v = s.get("variants", {})
    if v:
        lines += ["## PyTorch on the GPU, same ensemble", "",
                  "| variant | " + " | ".join(f"batch {b} images/s" for b in bs)
                  + " | TFLOP/s | share of peak | agreement vs fp32 | max abs dp | macro F1 (test) |",
                  "|---|" + "---:|" * (len(bs) + 5)]
        for name, r in v.items():
            if "error" in r:
                lines.append(f"| {name} | " + " | ".join("-" for _ in bs) + f" | - | - | - | - | {r['error']} |")
                continue
            lines.append(f"| {name} | " + " | ".join(speed._ips(r["images_per_s"][str(b)]) for b in bs)
                         + f" | {r.get('achieved_tflops', '-')} | "
                         + (f"{100 * r['share_of_peak']:.1f}% of {r['precision']}" if "share_of_peak" in r else "-")
                         + f" | {r.get('agreement_vs_fp32', '-')} | {r.get('max_abs_prob_diff_vs_fp32', 0):.1e} | "
                         + f"{r.get('macro_f1_test', float('nan')):.4f} |")
        ok = {k: max(r["images_per_s"].values()) for k, r in v.items() if "error" not in r}
        if ok and "fp32" in ok:
            top = max(ok, key=ok.get)
            lines += ["", f"Fastest: {top} at {speed._ips(ok[top])} images/s, {ok[top] / ok['fp32']:.1f}x eager fp32 "
                          f"({speed._ips(ok['fp32'])})."]
        lines.append("")
    p = s.get("product", {})
    if p:
        lines += ["## The product's GPU backends (`ssl predict --backend ...`)", "",
                  "| backend | " + " | ".join(f"batch {b}" for b in bs) + " | agreement vs fp32 |",
                  "|---|" + "---:|" * (len(bs) + 1)]
        for name, r in p.items():
            if "error" in r:
                lines.append(f"| {name} | " + " | ".join("-" for _ in bs) + f" | not measured: {r['error']} |")
            else:
                lines.append(f"| {name} ({r['describe']}) | " + " | ".join(speed._ips(r["images_per_s"][str(b)])
                                                                         for b in bs)
                             + f" | {r.get('agreement_vs_fp32', '-')} |")
        lines.append("")
    e = s.get("e2e", {})
    if "rows" in e:
        lines += ["## `ssl predict` end to end on the GPU", "",
                  "| backend | images | exit | whole command s | images/s whole command | model load s | "
                  "images/s after load |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in e["rows"]:
            lines.append(f"| {r['backend']} | {r['images']} | {r['exit']} | {r['wall_seconds']} | "
                         f"{r.get('images_per_s_whole_command')} | {r.get('model_load_seconds', '-')} | "
                         f"{r.get('images_per_s_after_load', '-')} |")
        lines.append("")
        e = {}
    ld = s.get("load", {})
    if "import_torch_seconds" in ld:
        lines += [f"Load, in a new process: `import torch` {ld['import_torch_seconds']} s, CUDA context "
                  f"{ld['cuda_context_seconds']} s, first matmul {ld['first_matmul_seconds']} s (whole process "
                  f"{ld['process_wall_seconds']} s).", ""]
    if e:
        lines += ["## `ssl predict` end to end on the GPU", "", f"`{e.get('command')}`: exit {e.get('exit')}, "
                  f"{e.get('wall_seconds')} s for {e.get('images')} images"
                  + (f" = {e['images_per_s_whole_command']} images/s, {e.get('whole_command_vs_raw')}x the raw "
                     f"torch backend ({speed._ips(e['raw_torch_backend_images_per_s'])} images/s)"
                     if e.get("images_per_s_whole_command") and e.get("raw_torch_backend_images_per_s") else "")
                  + "."
                  + (f"  After the model load ({e['model_load_seconds']} s, as `ssl predict` reports it): "
                     f"{e['images_per_s_after_load']} images/s, {e.get('after_load_vs_raw')}x the raw backend."
                     if "images_per_s_after_load" in e else ""), ""]
    t = s.get("train", {})
    if t:
        ev = t.get("eval", {})
        lines += ["## `ssl train` on the GPU", "", f"`{t.get('command')}`: exit {t.get('exit')}, "
                  f"{t.get('wall_seconds')} s"
                  + (" (stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in t["stage_seconds"].items()) + ")"
                     if isinstance(t.get("stage_seconds"), dict) else "")
                  + (f"; `ssl eval` on the test split: macro F1 {ev['macro_f1']:.4f}, accuracy {ev['accuracy']:.4f}"
                     if "macro_f1" in ev else "") + ".", "", "```", t.get("output_tail", ""), "```", ""]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="a trained run (default: the run --train-data trains here, else the "
                                             "quick architecture with untrained weights)")
    ap.add_argument("--export", type=Path, help="its export (default RUN/export when present)")
    ap.add_argument("--images", type=Path, required=True, help="DIR/<class>/images: the test split")
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 256])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--min-seconds", type=float, default=2.0)
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--compile-budget", type=float, default=400.0,
                    help="skip torch.compile when the whole run has already taken this many seconds")
    ap.add_argument("--peak-n", type=int, default=8192)
    ap.add_argument("--train-data", type=Path, help="first time `ssl train DATA --device cuda` (its run is measured)")
    ap.add_argument("--train-timeout", type=float, default=300.0)
    ap.add_argument("--train-args", nargs="*", default=[], help="more `ssl train` options (e.g. --preset tiny)")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds this whole run may take (the train section shortens its timeout to fit)")
    ap.add_argument("--commit", default=None, help="the commit measured (when the tree has no .git)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/semivit-gpu-bench"))
    ap.add_argument("--out", type=Path, default=ps.RESULTS)
    ap.add_argument("--skip-variants", action="store_true", help="only env, load and e2e (a second, short call)")
    ap.add_argument("--e2e-backends", nargs="+", default=None, help="`ssl predict --backend` values to time end to end")
    ap.add_argument("--e2e-images", type=int, nargs="+", default=None,
                    help="image counts for e2e (other than the test split's: cycled symlinks to --train-data's images)")
    ap.add_argument("--tile-from", type=Path, help="the images e2e cycles for --e2e-images (default --train-data)")
    ap.add_argument("--name", default="speed_gpu", help="results file stem (OUT/NAME.json, NAME.md)")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cpu: a smoke run of this script's own code where no GPU is (nothing to quote)")
    args = ap.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_speed: no CUDA GPU visible to torch here; nothing measured, nothing written")
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    m = ps.machine_info()
    doc = {"benchmark": "gpu_speed", "command": "python benchmarks/gpu_speed.py " + " ".join(sys.argv[1:]),
           "commit": args.commit or m.get("git_commit") or "?", "machine": m,
           "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "sections": {}}

    def save():
        doc["wall_seconds"] = round(time.perf_counter() - T0, 1)
        (args.out / f"{args.name}.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
        write_md(doc, args.out / f"{args.name}.md")

    def section(key, fn):
        print(f"== {key}", flush=True)
        try:
            doc["sections"][key] = fn()
        except Exception as e:  # noqa: BLE001 - one failed section must not lose the others
            traceback.print_exc()
            doc["sections"][key] = {"error": f"{type(e).__name__}: {first_line(e)}"}
        save()
        return doc["sections"][key]

    if args.device == "cuda":
        section("env", sec_env)
    run = args.run
    if args.train_data:
        tr = section("train", lambda: sec_train(args))
        if run is None and tr.get("exit") == 0:
            run = args.work / "run_gpu"
    untrained = run is None
    if untrained:
        run = ps.untrained_quick_run(args.work)
    ens = read_json(run / "ensemble.json")
    size = int(ens["img_size"])
    export = args.export or (run / "export" if (run / "export" / "meta.json").is_file() else None)
    arrays, labels = load_images(args.images, size, list(ens["classes"]), args.batches[0])
    doc.update({"images": len(arrays), "img_size": size, "untrained_weights": untrained,
                "model": (f"the quick preset's architecture with untrained weights ({len(ens['members'])} members)"
                          if untrained else f"trained run {run} ({len(ens['members'])} members, flip TTA)")})
    raw = None
    if not args.skip_variants:
        peak = section("peak", lambda: sec_peak(args.peak_n)) if args.device == "cuda" else {}
        fl = section("flops", lambda: speed.sec_flops(SimpleNamespace(run=run, arrays=arrays)))
        flops = fl.get("flops_per_image")
        var = section("variants", lambda: sec_variants(args, run, arrays, labels, flops, peak))
        ref = None
        if "error" not in var.get("fp32", {"error": 1}):
            v = Variant(run, "fp32", args.device)
            ref = predict_all(v, arrays, args.batches[0])
            v.close()
        prod = section("product", lambda: sec_product(args, run, export, arrays, ref))
        raw = prod.get("torch", {}).get("images_per_s", {}).get(str(args.batches[0]))
    elif args.device == "cuda":
        section("load", sec_load)
    section("e2e", lambda: sec_e2e(args, run, args.images, len(arrays), raw))
    save()
    print(f"wrote {args.out / args.name}.json, .md ({doc['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
