"""The pool graph as the product builds it (``ensemble.graph: pool``, the quick preset's default;
the stage ``graph`` of ``ssl train``) on finished label-efficiency runs: does it give what
benchmarks/graph_predict.py measured for the same runs, and what does it add to the same ensemble?

For each work directory (one seed): a hard-linked copy of the run (by default ``C-default``, the
default ``ssl train`` of that seed: stage 1 + stage 2 + stage 3) gets the quick preset's
``ensemble.*`` graph settings and the stage ``graph`` (RUN/graph.npz, timed); then the dev and test
splits are scored through semivit.trainer.infer.ensemble_predict - the run's ensemble.json with the
graph (what ``ssl eval RUN`` and the export serve) and without it (``graph=False``), the same
member outputs.  Paired per seed, 95% t interval; the test split is reported only.

    python benchmarks/product_graph.py --work /tmp/gp/s0 ... /tmp/gp/s4 --fraction 0.1 \\
        --reference benchmarks/results/graph_predict.json --out benchmarks/results/product_graph
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sklearn.metrics import f1_score  # noqa: E402

from semivit import config as cfgmod  # noqa: E402
from semivit.trainer.infer import ensemble_predict  # noqa: E402
from semivit.trainer.pipeline import run_stages  # noqa: E402
from semivit.trainer.run import Run  # noqa: E402
from label_efficiency import Scorer, commit, cpu_name, short_verdict, t_interval, write_md  # noqa: E402


def one_seed(work: Path, fraction: float, run_name: str, scratch: Path) -> dict:
    runs_dir = sorted(work.glob(f"runs-*-f{fraction:g}-s*"))
    if not runs_dir:
        raise SystemExit(f"error: no runs-*-f{fraction:g}-s* in {work}")
    src = (runs_dir[0] / run_name).resolve()
    if not (src / "ensemble.json").is_file():
        raise SystemExit(f"error: {src} has no ensemble.json")
    dst = scratch / work.name / run_name
    shutil.rmtree(dst, ignore_errors=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, dst, copy_function=os.link, ignore=shutil.ignore_patterns("graph.npz", "export", "eval"))
    cfg, data = cfgmod.load_run_config(dst)
    quick = cfgmod.resolve(preset="quick").ensemble  # the product's default graph settings
    cfg = cfg.model_copy(update={"ensemble": cfg.ensemble.model_copy(update={
        k: getattr(quick, k) for k in ("graph", "graph_neighbors", "graph_alpha", "graph_share")})})
    run = Run(dst, cfg, data)
    t0 = time.time()
    run_stages(run, ["graph"], check_needs=False)
    graph_s = time.time() - t0
    meta = json.loads(str(np.load(dst / "graph.npz")["meta"]))
    out = {"work": str(work), "run": str(src), "graph_seconds": round(graph_s, 1),
           "graph": {k: meta[k] for k in ("neighbors", "alpha", "share", "labeled", "pool", "pool_reached")},
           "splits": {}}
    for split in ("dev", "test"):
        sc = Scorer(data / split, run.classes, cfg.model.img_size)
        x = run.stem_features(sc.images, tta=True, what=split)
        t1 = time.time()
        with_graph = ensemble_predict(dst, x, tta=True, device=run.device)
        graph_pred_s = time.time() - t1
        without = ensemble_predict(dst, x, tta=True, device=run.device, graph=False)

        def f1(p):
            return round(float(f1_score(sc.y, p.argmax(1), average="macro")), 4)

        def per_class(p):
            return [round(float(x), 4) for x in f1_score(sc.y, p.argmax(1), average=None, labels=range(len(run.classes)))]

        out["splits"][split] = {"images": int(len(sc.y)), "ensemble": f1(without), "ensemble_graph": f1(with_graph),
                                "classes": list(run.classes), "per_class_f1_ensemble": per_class(without),
                                "per_class_f1_ensemble_graph": per_class(with_graph),
                                "accuracy_ensemble": round(float((without.argmax(1) == sc.y).mean()), 4),
                                "accuracy_ensemble_graph": round(float((with_graph.argmax(1) == sc.y).mean()), 4),
                                "argmax_changed": int((with_graph.argmax(1) != without.argmax(1)).sum()),
                                "seconds_with_graph": round(graph_pred_s, 1)}
        print(f"{work.name} {split}: ensemble {out['splits'][split]['ensemble']:.4f} -> with the pool graph "
              f"{out['splits'][split]['ensemble_graph']:.4f}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", nargs="*", type=Path, default=[], help="label_efficiency.py --work dirs, one per seed")
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--run", default="C-default", help="the run in each work directory (default: the default ssl train)")
    ap.add_argument("--reference", type=Path, default=None,
                    help="a graph_predict JSON: its per-seed scores of the same ensemble with and without the graph")
    ap.add_argument("--control", type=Path, default=None,
                    help="a label_efficiency JSON with the compute-matched (g) on the same stage 1: paired too")
    ap.add_argument("--control-steps", type=Path, default=None,
                    help="a label_efficiency JSON whose (b) per seed is this run (its optimiser steps: (g) must have as many)")
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/product_graph"), help="where the run copies go")
    ap.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    ap.add_argument("--seeds-from", type=Path, default=None,
                    help="re-summarise the per-seed scores of an earlier OUT.json instead of computing them")
    args = ap.parse_args()
    t0 = time.time()
    earlier = json.loads(args.seeds_from.read_text()) if args.seeds_from else {}
    if earlier:
        seeds = earlier["seeds"]
    elif args.work:
        seeds = [one_seed(w, args.fraction, args.run, args.scratch) for w in args.work]
    else:
        ap.error("give --work (one directory per seed) or --seeds-from")
    paired = []
    for split, metric in itertools.product(("dev", "test"), ("macro F1", "accuracy")):
        a, b = ("ensemble_graph", "ensemble") if metric == "macro F1" else ("accuracy_ensemble_graph", "accuracy_ensemble")
        d = [s["splits"][split][a] - s["splits"][split][b] for s in seeds]
        m, lo, hi = t_interval(d)
        paired.append({"split": split, "metric": metric, "a": "ensemble + pool graph", "b": "ensemble", "n": len(d),
                       "diff_mean": round(m, 4), "ci_low": round(lo, 4), "ci_high": round(hi, 4),
                       "per_seed": [round(x, 4) for x in d]})
    control = None
    if args.control:
        by_seed = {r["seed"]: r for r in json.loads(args.control.read_text())["runs"] if r["fraction"] == args.fraction}
        ids = [int(str(s["work"]).rstrip("/").rsplit("s", 1)[-1]) for s in seeds]
        steps = None
        if args.control_steps:  # (g) must have at least (b)'s optimiser steps, seed for seed
            b_by = {r["seed"]: r for r in json.loads(args.control_steps.read_text())["runs"] if r["fraction"] == args.fraction}
            steps = [b_by[i]["test"]["b"]["steps"] for i in ids]
            for s, i in zip(seeds, ids):
                if [b_by[i][sp]["b"]["macro_f1"] for sp in ("dev", "test")] != [s["splits"][sp]["ensemble"] for sp in ("dev", "test")]:
                    raise SystemExit(f"error: seed {i}: (b) of {args.control_steps} is not this run's ensemble")
        control = {"file": str(args.control), "g_steps": [by_seed[i]["test"]["g"]["steps"] for i in ids], "b_steps": steps}
        # seeds where (g) is NOT compute-matched to this run (fewer optimiser steps): said in the output
        control["g_fewer_steps_at_seeds"] = [i for i, g, b in zip(ids, control["g_steps"], steps or control["g_steps"]) if g < b]
        for split, metric in itertools.product(("dev", "test"), ("macro F1", "accuracy")):
            a, k = ("ensemble_graph", "macro_f1") if metric == "macro F1" else ("accuracy_ensemble_graph", "accuracy")
            d = [s["splits"][split][a] - by_seed[i][split]["g"][k] for s, i in zip(seeds, ids)]
            m, lo, hi = t_interval(d)
            paired.append({"split": split, "metric": metric, "a": "ensemble + pool graph", "b": "g (control file)",
                           "n": len(d), "diff_mean": round(m, 4), "ci_low": round(lo, 4), "ci_high": round(hi, 4),
                           "per_seed": [round(x, 4) for x in d]})
    reference = None
    if args.reference:
        ref = json.loads(args.reference.read_text())
        name = f"cand_{args.run[2:]}" if args.run.startswith("C-") else args.run.lower()
        row = next(r for r in ref["chosen"] if r["ensemble"] == name and r["mode"] == "pool")
        reference = {"file": str(args.reference), "ensemble": name, "setting": {k: row[k] for k in ("neighbors", "alpha", "share")},
                     **{f"{sp}_{k}": row[f"{sp}_{v}"] for sp in ("dev", "test")
                        for k, v in (("graph", "per_seed"), ("ensemble", "base_per_seed"))}}
    summary = {sp: {k: round(float(np.mean([s["splits"][sp][k] for s in seeds])), 4)
                    for k in ("ensemble", "ensemble_graph", "accuracy_ensemble", "accuracy_ensemble_graph")}
               for sp in ("dev", "test")}
    sha = commit()
    doc = {"benchmark": "product_graph", "command": earlier.get("command", " ".join(sys.argv)),
           "commit": earlier.get("commit", sha), "machine": earlier.get("machine", cpu_name()),
           "wall_seconds": earlier.get("wall_seconds", round(time.time() - t0, 1)), "fraction": args.fraction,
           "run": args.run,
           **({"summarised_by": " ".join(sys.argv), "summarised_at_commit": sha} if earlier else {}),
           "seeds": seeds, "summary": summary, "paired": paired, "reference": reference, "control": control}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(doc, indent=1))
    lines = ["# The pool graph as `ssl train` builds it (`benchmarks/product_graph.py`)", "",
             f"Machine: {doc['machine']}. Commit `{doc['commit']}`. Wall time {doc['wall_seconds']:.0f} s "
             f"(no training: the stage `graph` and scoring). Fraction {args.fraction:g}; run `{args.run}` of "
             f"{len(seeds)} seeds.  Graph: {seeds[0]['graph']['neighbors']} neighbours, alpha "
             f"{seeds[0]['graph']['alpha']:g}, the ensemble's share {seeds[0]['graph']['share']:g} (the quick preset's).", "",
             "| seed dir | nodes (labeled + pool) | stage `graph` s | dev: ensemble | dev: + graph | test: ensemble | test: + graph | test arg-max changed |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for s in seeds:
        dv, ts = s["splits"]["dev"], s["splits"]["test"]
        lines.append(f"| {Path(s['work']).name} | {s['graph']['labeled']} + {s['graph']['pool']} | {s['graph_seconds']:.0f} "
                     f"| {dv['ensemble']:.4f} | {dv['ensemble_graph']:.4f} | {ts['ensemble']:.4f} | {ts['ensemble_graph']:.4f} "
                     f"| {ts['argmax_changed']} of {ts['images']} |")
    if "per_class_f1_ensemble" in seeds[0]["splits"]["test"]:
        cls = seeds[0]["splits"]["test"]["classes"]
        lines += ["", "Per-class test F1, mean over the seeds (ensemble -> + pool graph): " + ", ".join(
            f"{c} {np.mean([s['splits']['test']['per_class_f1_ensemble'][i] for s in seeds]):.3f} -> "
            f"{np.mean([s['splits']['test']['per_class_f1_ensemble_graph'][i] for s in seeds]):.3f}"
            for i, c in enumerate(cls))]
    lines += ["", "| split | ensemble macro F1 | + pool graph | accuracy | + pool graph |", "|---|---:|---:|---:|---:|"]
    for sp in ("dev", "test"):
        m = summary[sp]
        lines.append(f"| {sp} | {m['ensemble']:.4f} | {m['ensemble_graph']:.4f} | {m['accuracy_ensemble']:.4f} "
                     f"| {m['accuracy_ensemble_graph']:.4f} |")
    if control:
        lines += ["", f"`g (control file)`: the compute-matched supervised control of `{control['file']}` on the same stage 1 "
                  f"(optimiser steps per seed {control['g_steps']}" + (f"; this run's {control['b_steps']})" if control["b_steps"] else ")")
                  + (f"; **not compute-matched at seed(s) {control['g_fewer_steps_at_seeds']}: (g) has fewer steps there** "
                     "(it was matched to another candidate's stage 3)" if control["g_fewer_steps_at_seeds"] else "")]
    lines += ["", "Paired (per seed; 95% t interval, sample SD):", "",
              "| split | metric | a | b | a - b | 95% CI | per seed | verdict |", "|---|---|---|---|---:|---|---|---|"]
    for p in paired:
        v = short_verdict(p)
        lines.append(f"| {p['split']} | {p['metric']} | {p['a']} | {p['b']} | {p['diff_mean']:+.4f} | {p['ci_low']:+.4f} to {p['ci_high']:+.4f} "
                     f"| {', '.join(f'{x:+.4f}' for x in p['per_seed'])} | {v} |")
    if reference:
        lines += ["", f"The same ensembles in `{reference['file']}` ({reference['ensemble']}, mode pool, setting "
                  f"{reference['setting']}), per seed:", "",
                  "| split | ensemble there | here | + graph there | here |", "|---|---|---|---|---|"]
        for sp in ("dev", "test"):
            lines.append(f"| {sp} | {reference[f'{sp}_ensemble']} | {[s['splits'][sp]['ensemble'] for s in seeds]} "
                         f"| {reference[f'{sp}_graph']} | {[s['splits'][sp]['ensemble_graph'] for s in seeds]} |")
    write_md(args.out, lines, doc, earlier, sha)


if __name__ == "__main__":
    main()
