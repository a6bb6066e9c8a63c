"""Prediction speed benchmark (issue 7).

For one ensemble, on the same images (the ELPV demo data's held-out test split: 300x300 greyscale
PNGs, decoded and resized to the model's size), with the same batch size and thread count:

  raw_ort       ONNX Runtime session (the backend ``ssl predict`` uses) on pre-decoded uint8
                arrays: the model's own throughput, per degradation level
  e2e           ``ssl predict DIR`` as a user runs it (a new process: interpreter start, model
                load, discovery, decoding in worker processes, batching, CSV writing); images/s
                over the whole wall time, and the steady part (model load excluded)
  overhead      1 - e2e steady images/s / raw_ort images/s: what the pipeline costs
  decode        the decode pool alone (workers, load_rgb resize), images/s
  torch_eager   the same ensemble as a PyTorch EnsembleModel on the same arrays, same batch and
                threads, and the largest probability difference to ONNX Runtime

Models: ``--run RUN`` (a trained run; exported with ``ssl export`` unless RUN/export exists), else
the first quick-preset run found under runs/ or /tmp, else (saying so in the results) a tiny-preset
run trained here AND the quick preset's architecture (10 x vit_hybrid_lite0 at 128 px) with
untrained weights - inference cost does not depend on the weights' values.

Usage:
    python benchmarks/predict_speed.py [--run RUN] [--images 656] [--batch 32] [--threads 1 2]

Results: benchmarks/results/predict_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from semivit.serve.backends import open_backend, physical_cores  # noqa: E402
from semivit.serve.loader import DecodePool  # noqa: E402
from semivit.utils import cpu_count, read_json  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


# ------------------------------------------------------------------------------------------ setup

def loads(run: Path) -> bool:
    """The run's checkpoints load with the current model code (older runs may predate a change)."""
    from semivit.models.checkpoint import load_checkpoint

    try:
        load_checkpoint(run / read_json(run / "ensemble.json")["members"][0]["path"])
        return True
    except Exception as e:  # noqa: BLE001
        print(f"skipping {run}: its checkpoints do not load with this code ({str(e).splitlines()[0]})")
        return False


def find_quick_run() -> Path | None:
    cands = list((ROOT / "runs").glob("*/ensemble.json")) + list(Path("/tmp").glob("*/ensemble.json"))
    for ens in sorted(cands, key=lambda p: p.stat().st_mtime, reverse=True):
        cfg = ens.parent / "config.yaml"
        if cfg.is_file() and "preset: quick" in cfg.read_text() and loads(ens.parent):
            return ens.parent
    return None


def stratified(files: list, n: int) -> list:
    """``n`` of ``files`` evenly spaced over the sorted list: the demo's test split is sorted by
    class folder, so this keeps every class in its share of the split (the first ``n`` files were
    all of the first class, and the macro F1 of any engine on them was at most 1/classes).
    Deterministic; all of ``files`` when ``n`` covers them."""
    if n >= len(files):
        return list(files)
    return [files[i] for i in np.linspace(0, len(files) - 1, n).round().astype(int)]


def demo_images(work: Path, n: int, source: Path | None = None) -> Path:
    """``n`` images of the demo data's held-out test split (``source``: another DIR/<class>/
    tree), classes in proportion (:func:`stratified`), as symlinks under work/ in that order."""
    from semivit.data.demo import write_demo
    from semivit.data.discover import discover_images

    if source is None:
        demo = work / "demo"
        if not (demo / "test").is_dir():
            write_demo(demo, labeled_fraction=0.2, seed=0)
        source = demo / "test"
    # a new name: a directory of the old first-n selection (one class) must not be reused
    imgs = work / f"test_{n}_stratified"
    if not imgs.is_dir():
        files = stratified(discover_images(source).files, n)
        imgs.mkdir(parents=True)
        for i, f in enumerate(files):
            os.symlink(Path(f).resolve(), imgs / f"{i:05d}_{f.name}")
    return imgs


def tiny_run(work: Path) -> Path:
    from semivit import config as cfgmod
    from semivit.trainer.pipeline import run_training

    run = work / "tiny_run"
    if not (run / "ensemble.json").is_file():
        run_training(data=work / "demo", out=run, cfg=cfgmod.resolve(preset="tiny"))
    return run


def untrained_quick_run(work: Path, members: int = 10) -> Path:
    """The quick preset's architecture: its pretrained frozen stem (shared by the members, as in a
    trained quick run, so the ensemble runs it once) and untrained transformers and heads, with
    the preset's config.yaml (a run that speed.py's training rows can train)."""
    from semivit import config as cfgmod
    from semivit.data.demo import CLASS_NAMES
    from semivit.models.checkpoint import save_checkpoint
    from semivit.models.ensemble import write_ensemble
    from semivit.models.networks import build_model

    run = work / "quick_arch_untrained"
    if (run / "ensemble.json").is_file() and (run / "config.yaml").is_file():
        return run
    cfg = cfgmod.resolve(preset="quick")
    run.mkdir(parents=True, exist_ok=True)
    # the run's config, as `ssl train` writes it: speed.py's training rows build the model from it
    cfgmod.save(cfg, run / "config.yaml")
    entries = []
    for k in range(members):
        stage = "stage1" if k < members // 2 else "stage3"
        rel = f"{stage}/fold{k % (members // 2)}/best.pt"
        model = build_model(cfg.model, len(CLASS_NAMES)).eval()  # quick: pretrained stem (offline package)
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(run / rel, model, cfg.model, list(CLASS_NAMES))
        entries.append({"name": rel.rsplit("/", 1)[0], "path": rel, "val_macro_f1": 0.5 + 0.01 * k})
    write_ensemble(run, entries, list(CLASS_NAMES), cfg.model.img_size)
    return run


def mini_export(run: Path, out: Path) -> Path:
    """meta.json + the three level graphs, without the exporter's verification (which needs the
    run's data): used only for the untrained architecture."""
    import math

    import torch

    from semivit.models.ensemble import EnsembleModel, load_members, read_ensemble

    doc = read_ensemble(run)
    models, weights, entries = load_members(run, doc)
    m = len(models)
    k = math.ceil(m / 2)
    top = sorted(sorted(range(m), key=lambda i: -weights[i])[:k])
    specs = [("full", "model.onnx", True, list(range(m))), ("no_tta", "levels/no_tta.onnx", False, list(range(m))),
             (f"top{k}_no_tta", f"levels/top{k}_no_tta.onnx", False, top)]
    try:
        from semivit.export.graph import export_graph
    except ImportError:
        export_graph = None
    s = doc["img_size"]
    for _, f, tta, idx in specs:
        ens = EnsembleModel([models[i] for i in idx], [weights[i] for i in idx], tta=tta,
                            mean=doc["mean"], std=doc["std"]).eval()
        (out / f).parent.mkdir(parents=True, exist_ok=True)
        if export_graph is not None:
            export_graph(ens, out / f, s, exporter="torchscript")
        else:
            torch.onnx.export(ens, (torch.zeros(2, s, s, 3, dtype=torch.uint8),), str(out / f), dynamo=False,
                              input_names=["images"], output_names=["probs", "label"], opset_version=18,
                              dynamic_axes={"images": {0: "n"}, "probs": {0: "n"}, "label": {0: "n"}})
    meta = {"classes": doc["classes"], "img_size": s, "mean": doc["mean"], "std": doc["std"], "tta": True,
            "members": [{"name": e["name"], "weight": w} for e, w in zip(entries, weights)],
            "levels": [{"name": n, "file": f, "tta": t, "members": len(i)} for n, f, t, i in specs],
            "note": "benchmark mini-export (no verification)"}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return out


def export_of(run: Path, work: Path, untrained: bool) -> Path:
    if (run / "export" / "meta.json").is_file():
        return run / "export"
    out = work / f"export_{run.name}"
    if (out / "meta.json").is_file():
        return out
    if untrained:
        return mini_export(run, out)
    from semivit.export.exporter import export_run

    return export_run(run, out=out)


# ------------------------------------------------------------------------------------------ measurements

def decode_arrays(paths: list[str], size: int, batch: int) -> np.ndarray:
    """Every one of ``paths`` decoded, in order (row i is paths[i]: the labels follow the paths)."""
    pool = DecodePool(paths, size, batch, workers=0)
    chunks = []
    while (c := pool.next()) is not None:
        if c.errors:
            raise SystemExit(f"benchmark image {paths[c.errors[0][0]]} does not decode: {c.errors[0][1]}")
        chunks.append(c.images)
    return np.concatenate(chunks)


def throughput(fn, images: np.ndarray, batch: int, min_seconds: float = 5.0, min_batches: int = 2) -> float:
    """Images/s of ``fn`` on full batches of ``images`` (cycled), after one warm-up batch."""
    fn(images[:batch])  # warm-up (first-run allocations)
    n, k, t0 = 0, 0, time.perf_counter()
    while k < min_batches or time.perf_counter() - t0 < min_seconds:
        s = (k * batch) % max(1, len(images) - batch + 1)
        fn(images[s:s + batch])
        n, k = n + batch, k + 1
    return n / (time.perf_counter() - t0)


def measure_decode(paths: list[str], size: int, batch: int, workers: int) -> float:
    t0 = time.perf_counter()
    pool = DecodePool(paths, size, batch, workers=workers)
    n = 0
    while (c := pool.next()) is not None:
        n += c.stop - c.start
    pool.close()
    return n / (time.perf_counter() - t0)


def measure_e2e(images_dir: Path, export: Path, work: Path, batch: int, threads: int,
                backend: str = "onnxruntime") -> dict:
    """``ssl predict`` in a new process; ``export`` is what --model gets (a RUN for --backend torch)."""
    out = work / "e2e.json"
    script = Path(sys.executable).parent / "ssl"
    cmd = [str(script)] if script.exists() else [sys.executable, "-c", "from semivit.cli import main; main()"]
    env = {**os.environ, "SEMIVIT_QUIET": "1"}
    t0 = time.perf_counter()
    r = subprocess.run([*cmd, "predict", str(images_dir), "--model", str(export), "--out", str(out), "--force",
                        "--batch-size", str(batch), "--backend", backend, "--format", "json"],
                       env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"ssl predict failed: {r.stderr}")
    s = json.loads(out.read_text())["summary"]
    after_load = s["ok"] / max(1e-9, s["seconds"] - s["load_seconds"])
    # steady: the prediction loop alone (decode ahead, batches through the engine, rows written);
    # older summaries without loop_seconds: everything but the model load
    steady = s["ok"] / s["loop_seconds"] if s.get("loop_seconds") else after_load
    return {"images": s["images"], "ok": s["ok"], "wall_seconds": round(wall, 3),
            "images_per_s_wall": round(s["ok"] / wall, 2), "command_seconds": s["seconds"],
            "model_load_seconds": s["load_seconds"], "loop_seconds": s.get("loop_seconds"),
            "images_per_s_steady": round(steady, 2), "images_per_s_after_load": round(after_load, 2),
            "provider": s["provider"], "threads_note": f"ssl predict uses physical cores = {threads}"}


def measure_time_limit(images_dir: Path, export: Path, work: Path, batch: int, limit: float) -> dict:
    """``ssl predict --time-limit`` set so that the full level cannot finish: where it steps down."""
    out = work / "time_limit.json"
    script = Path(sys.executable).parent / "ssl"
    cmd = [str(script)] if script.exists() else [sys.executable, "-c", "from semivit.cli import main; main()"]
    t0 = time.perf_counter()
    r = subprocess.run([*cmd, "predict", str(images_dir), "--model", str(export), "--out", str(out), "--force",
                        "--batch-size", str(batch), "--backend", "onnxruntime", "--format", "json",
                        "--time-limit", f"{limit:.1f}"], env={**os.environ, "SEMIVIT_QUIET": "1"},
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode not in (0, 1):
        raise RuntimeError(f"ssl predict --time-limit failed: {r.stderr}")
    s = json.loads(out.read_text())["summary"]
    return {"time_limit": round(limit, 1), "wall_seconds": round(wall, 2), "images": s["images"], "ok": s["ok"],
            "timeouts": s["timeouts"], "per_level": {lv["name"]: lv["images"] for lv in s["levels"]},
            "steps": s["steps"]}


def bench_model(label: str, run: Path, export: Path, images_dir: Path, work: Path, batch: int,
                threads_list: list[int], untrained: bool, reps: int = 3, e2e_seconds: float = 60.0) -> dict:
    """Every measurement ``reps`` times, interleaved (A B C A B C ...), best and all runs kept: on a
    shared box the best run is the one least disturbed by other jobs."""
    import torch

    meta = read_json(export / "meta.json")
    size = int(meta["img_size"])
    paths = sorted(str(p) for p in images_dir.iterdir())
    arrays = decode_arrays(paths, size, batch)
    ort = {th: open_backend(export, "onnxruntime-cpu", threads=th) for th in threads_list}
    eager = {th: open_backend(run, "torch", threads=th) for th in threads_list}
    levels = [lv.name for lv in ort[threads_list[0]].levels]
    runs: dict[str, list[float]] = {}

    def record(key: str, value: float) -> None:
        runs.setdefault(key, []).append(round(value, 2))

    for _ in range(reps):
        for w in sorted({0, 1, cpu_count()}):
            key = "main_process" if w == 0 else f"pool_{w}_workers"
            if w == 0:
                t = time.perf_counter()
                decode_arrays(paths, size, batch)
                record(f"decode/{key}", len(paths) / (time.perf_counter() - t))
            else:
                record(f"decode/{key}", measure_decode(paths, size, batch, w))
        for th in threads_list:
            for i, name in enumerate(levels):
                ort[th].set_level(i)
                record(f"ort/{th}/{name}", throughput(ort[th].predict, arrays, batch))
            # torch.set_num_threads is process-wide: the backend set it when it was opened, and
            # opening the next one changed it for all of them - set it again before measuring
            torch.set_num_threads(th)
            record(f"torch/{th}", throughput(eager[th].predict, arrays, batch))
    best = {k: max(v) for k, v in runs.items()}
    res = {"label": label, "run": str(run), "export": str(export), "untrained_weights": untrained,
           "img_size": size, "members": len(meta["members"]), "tta": meta.get("tta", True),
           "images": len(paths), "batch": batch, "repetitions": reps, "all_runs": runs,
           "decode_images_per_s": {k.split("/", 1)[1]: v for k, v in best.items() if k.startswith("decode/")},
           "raw_ort": {f"{th}_threads": {n: best[f"ort/{th}/{n}"] for n in levels} for th in threads_list},
           "torch_eager": {f"{th}_threads": best[f"torch/{th}"] for th in threads_list}, "ort_vs_torch": {}}
    x = arrays[:batch]
    for th in threads_list:
        ort[th].set_level(0)
        torch.set_num_threads(th)
        res["ort_vs_torch"][f"{th}_threads"] = {
            "speedup": round(best[f"ort/{th}/full"] / best[f"torch/{th}"], 2),
            "max_abs_prob_diff": float(np.abs(ort[th].predict(x)[0] - eager[th].predict(x)[0]).max())}
    del ort, eager
    th = physical_cores()
    # end to end on as many images as the model does in ~e2e_seconds (the whole set when fast)
    raw = res["raw_ort"].get(f"{th}_threads", {}).get("full") or next(iter(res["raw_ort"].values()))["full"]
    n_e2e = int(min(len(paths), max(4 * batch, raw * e2e_seconds)))
    e2e_dir = demo_images(work, n_e2e) if n_e2e < len(paths) else images_dir
    e2e_runs = [measure_e2e(e2e_dir, export, work, batch, th) for _ in range(2)]
    res["e2e"] = max(e2e_runs, key=lambda r: r["images_per_s_wall"])
    res["e2e"]["runs_images_per_s_wall"] = [r["images_per_s_wall"] for r in e2e_runs]
    # a limit at ~60% of what the full level needs for these images: it must step down part-way
    need = e2e_runs[0]["model_load_seconds"] + 1.0 + n_e2e / (raw * 0.9)
    res["time_limit"] = measure_time_limit(e2e_dir, export, work, batch, max(5.0, 0.6 * need))
    res["time_limit"]["full_level_would_need_s"] = round(need, 1)
    if f"{th}_threads" in res["raw_ort"]:
        e = res["e2e"]
        e["raw_ort_images_per_s_same_threads"] = raw
        e["pipeline_overhead_steady"] = round(1 - e["images_per_s_steady"] / raw, 3)
        e["pipeline_overhead_wall"] = round(1 - e["images_per_s_wall"] / raw, 3)
        # the slower of the two stages bounds the pipeline: how close does it get to that?
        dec = max(res["decode_images_per_s"].values())
        e["bottleneck"] = "decoding" if dec < raw else "model"
        e["steady_vs_bottleneck"] = round(e["images_per_s_steady"] / min(raw, dec), 3)
    return res


# ------------------------------------------------------------------------------------------ report

def machine_info() -> dict:
    import onnx
    import onnxruntime
    import PIL
    import torch

    cpu = "?"
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = "?"
    try:
        kb = int(next(ln.split()[1] for ln in open("/proc/meminfo") if ln.startswith("MemTotal")))
        mem = f"{kb / 2**20:.1f} GiB"
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = "?"
    return {"cpu": cpu, "physical_cores": physical_cores(), "usable_cpus": cpu_count(), "memory": mem,
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__, "numpy": np.__version__,
            "pillow": PIL.__version__, "git_commit": commit, "load_average_start": os.getloadavg()}


def _threads(key: str) -> str:
    n = key.split("_")[0]
    return f"{n} thread" + ("" if n == "1" else "s")


def write_md(doc: dict, path: Path) -> None:
    m = doc["machine"]
    lines = ["# Prediction speed (`ssl predict`)", "",
             f"Machine: {m['cpu']}, {m['physical_cores']} physical cores ({m['usable_cpus']} usable), {m['memory']}; "
             f"{m['platform']}; Python {m['python']}, torch {m['torch']}, onnxruntime {m['onnxruntime']}, "
             f"onnx {m['onnx']}; commit {m['git_commit']}.",
             f"Load average at start {tuple(round(x, 1) for x in m['load_average_start'])}, at end "
             f"{tuple(round(x, 1) for x in doc['load_average_end'])}: the box is shared with other jobs, so every "
             "number is the best of several interleaved runs (all runs are in the JSON) - the run least "
             "disturbed by the other jobs; expect a quiet machine to be faster still.",
             f"Benchmark wall time: {doc['wall_seconds']:.0f} s.  Command: `{doc['command']}`.", ""]
    if doc.get("note"):
        lines += [f"**Note:** {doc['note']}", ""]
    for r in doc["models"]:
        e = r["e2e"]
        lines += [f"## {r['label']}", "",
                  f"{r['members']} members, {r['img_size']} px, TTA {'on' if r['tta'] else 'off'}; images from the ELPV "
                  f"test split (300x300 greyscale PNG): {r['images']} for decoding and the raw sessions, "
                  f"{e['images']} end to end; batch {r['batch']}"
                  + ("; **untrained weights** (same compute as trained)" if r["untrained_weights"] else "") + ".", "",
                  "| measurement | images/s |", "|---|---:|"]
        for th, lv in r["raw_ort"].items():
            for name, v in lv.items():
                lines.append(f"| raw ONNX Runtime, level {name}, {_threads(th)} (pre-decoded arrays) | {v:.1f} |")
        for th, v in r["torch_eager"].items():
            sp = r["ort_vs_torch"][th]
            lines.append(f"| PyTorch eager, full, {_threads(th)} (same arrays, batch) | {v:.1f} "
                         f"(ORT {sp['speedup']:.2f}x; max abs prob diff {sp['max_abs_prob_diff']:.1e}) |")
        for k, v in r["decode_images_per_s"].items():
            lines.append(f"| decode + resize only, {k.replace('_', ' ')} | {v:.1f} |")
        lines += [f"| `ssl predict` end to end, whole wall time ({e['wall_seconds']:.2f} s, model load "
                  f"{e['model_load_seconds']:.2f} s) | {e['images_per_s_wall']:.1f} |",
                  f"| `ssl predict` steady state (model load excluded) | {e['images_per_s_steady']:.1f} |", ""]
        tl = r.get("time_limit")
        if tl:
            lines += [f"`ssl predict --time-limit {tl['time_limit']}` on the {tl['images']} end-to-end images (the full "
                      f"level would need about {tl['full_level_would_need_s']} s): finished in {tl['wall_seconds']:.1f} s "
                      f"wall; images per level "
                      + ", ".join(f"{k} {v}" for k, v in tl["per_level"].items())
                      + f"; timeouts {tl['timeouts']}"
                      + ("; stepped down " + ", ".join(f"to {st['level']} with {st['images_left']} images left"
                                                     for st in tl["steps"]) if tl["steps"] else "") + ".", ""]
        if "pipeline_overhead_steady" in e and e["pipeline_overhead_steady"] < 0:
            lines += [f"End to end ({e['images_per_s_steady']:.1f} images/s steady) came out faster than the raw session "
                      f"measured inside the benchmark process at the same {physical_cores()} threads "
                      f"({e['raw_ort_images_per_s_same_threads']:.1f}), a process that also holds the other sessions "
                      "and the PyTorch models, on a box shared with other jobs: the pipeline's overhead is below what "
                      "this measurement resolves. "
                      f"Backend: {e['provider']}.", ""]
        elif "pipeline_overhead_steady" in e:
            lines += [f"Pipeline overhead vs the raw session at the same threads: {100 * e['pipeline_overhead_steady']:.0f}% "
                      f"steady state, {100 * e['pipeline_overhead_wall']:.0f}% over the whole command. "
                      f"The slower stage here is {e['bottleneck']} (alone: {min(max(r['decode_images_per_s'].values()), e['raw_ort_images_per_s_same_threads']):.1f} "
                      f"images/s); the pipeline's steady state reaches {100 * e['steady_vs_bottleneck']:.0f}% of it "
                      f"(decoding and the model share the same cores). Backend: {e['provider']}.", ""]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="a trained run (default: a quick run found, else tiny + quick-arch)")
    ap.add_argument("--images", type=int, default=656)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, nargs="+", default=None)
    ap.add_argument("--work", type=Path, default=Path("/tmp/semivit-predict-bench"))
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    t0 = time.perf_counter()
    os.environ.setdefault("SEMIVIT_QUIET", "1")
    args.work.mkdir(parents=True, exist_ok=True)
    threads = args.threads or sorted({1, physical_cores()})
    script = Path(sys.argv[0]).resolve()
    script = script.relative_to(ROOT).as_posix() if script.is_relative_to(ROOT) else sys.argv[0]
    doc = {"command": "python " + " ".join([script, *sys.argv[1:]]),
           "machine": machine_info(), "models": []}
    images = demo_images(args.work, args.images)
    run = args.run or find_quick_run()
    if run is not None:
        ens = read_json(Path(run) / "ensemble.json")
        cfg = (Path(run) / "config.yaml").read_text()
        preset = "quick" if "preset: quick" in cfg else ("tiny" if "preset: tiny" in cfg else "?")
        stages = sorted({m.get("stage", "?") for m in ens["members"]})
        models = [(f"{Path(run).name}: trained {preset}-preset run, {len(ens['members'])} members "
                   f"({', '.join(stages)})", Path(run), False)]
        if len(ens["members"]) < 10 and preset == "quick":
            doc["note"] = (f"the quick-preset run found ({run}) holds {len(ens['members'])} members, not the full "
                           "ensemble's 10: the quick preset's 10-member architecture is measured too (its shared "
                           "pretrained stem, untrained transformers: inference cost does not depend on the weights' "
                           "values)")
            models.append(("quick preset architecture, 10 members (untrained weights)",
                           untrained_quick_run(args.work), True))
    else:
        doc["note"] = ("no quick-preset run existed when this ran: measured a tiny-preset run trained here on the "
                       "demo data, and the quick preset's architecture (10 x vit_hybrid_lite0, 128 px: the shared "
                       "pretrained stem, untrained transformers), whose inference cost is that of a trained quick run")
        models = [("tiny preset run (trained here)", tiny_run(args.work), False),
                  ("quick preset architecture, 10 members (untrained weights)", untrained_quick_run(args.work), True)]
    for label, r, untrained in models:
        print(f"== {label}: {r}", flush=True)
        exp = export_of(r, args.work, untrained)
        res = bench_model(label, r, exp, images, args.work, args.batch, threads, untrained)
        print(json.dumps(res, indent=1), flush=True)
        doc["models"].append(res)
    doc["load_average_end"] = os.getloadavg()
    doc["wall_seconds"] = round(time.perf_counter() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "predict_speed.json").write_text(json.dumps(doc, indent=1) + "\n")
    write_md(doc, args.out / "predict_speed.md")
    print(f"wrote {args.out / 'predict_speed.json'} and .md")


if __name__ == "__main__":
    main()
