"""The quick preset's model study, under the dev protocol (issue 13).

Each variant of the quick preset's architecture trains the stage-1 supervised ensemble (arm (a) of
benchmarks/label_efficiency.py: 5 folds on the labeled pool) for the same (fraction, seed) data as
the label-efficiency benchmark, and is scored on the DEV split (a stratified share of the training
pool's unlabeled images, never trained on): the dev split ranks the variants.  The test split is
only reported next to it.  Every variant is compared with the preset as it is by the per-seed
paired difference on dev with a 95% t interval (sample SD, ddof=1).

Variants (``--variants``, default all):

  preset    the quick preset: 128 px, Lite0 stem to stride 16 (5 stages, 112 channels, 8x8 tokens), 4 blocks
  r192      192 px (12x12 tokens)
  s32r256   a deeper stem cut at stride 32 (7 stages, 320 channels) at 256 px: 8x8 tokens again
  d2        2 transformer blocks
  d6        6 transformer blocks
  tune1     the stem's last stage (stage 4: 80 -> 112 channels, 3 MBConv blocks) fine-tuned at the
            backbone LR, the stages before it frozen and cached (model.kwargs.tune_stem_stages=1)

Usage (each variant's runs resume; the preset's come from the label-efficiency --work):

    python benchmarks/model_study.py --seeds 0 1 2 3 4 --fraction 0.1 --work /tmp/semivit-model-study \
        [--preset-work /tmp/semivit-bench] [--variants preset r192 ...] [--summarise-only]

(``--preset-work``: reuse a label-efficiency --work's (a) runs of the preset; without it the
preset trains here too.)

Results: benchmarks/results/model_study.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from label_efficiency import commit, cpu_name, t_interval, verdict  # noqa: E402

VARIANTS: dict[str, list[str]] = {
    "preset": [],
    "r192": ["model.img_size=192"],
    "s32r256": ["model.img_size=256", "model.kwargs.stem_depth=7"],
    "d2": ["model.kwargs.depth=2"],
    "d6": ["model.kwargs.depth=6"],
    "tune1": ["model.kwargs.tune_stem_stages=1"],
}


def result_path(work: Path, fraction: float, seed: int) -> Path:
    return work / f"result-elpv-f{fraction:g}-s{seed}.json"


def run_variant(name: str, args) -> None:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "label_efficiency.py"), "--dataset", "elpv",
           "--fractions", f"{args.fraction:g}", "--seeds", *map(str, args.seeds), "--arms", "none",
           "--work", str(args.work / name), "--results", str(args.work / name / "results")]
    for s in VARIANTS[name]:
        cmd += ["--set", s]
    print(f"=== variant {name}: {' '.join(VARIANTS[name]) or 'the preset as it is'}", flush=True)
    subprocess.run(cmd, check=True)


def load(name: str, args) -> dict[int, dict]:
    work = args.preset_work if name == "preset" else args.work / name
    out = {}
    for seed in args.seeds:
        p = result_path(work, args.fraction, seed)
        if p.exists():
            r = json.loads(p.read_text())
            if "a" in r.get("dev", {}):
                out[seed] = {"dev": r["dev"]["a"], "test": r["test"]["a"]}
    return out


def summarise(args) -> dict:
    rows, paired = [], []
    base = load("preset", args)
    for name in args.variants:
        res = load(name, args)
        if not res:
            continue
        row = {"variant": name, "overrides": VARIANTS[name], "n_seeds": len(res), "seeds": sorted(res)}
        for split in ("dev", "test"):
            f1 = [res[s][split]["macro_f1"] for s in sorted(res)]
            acc = [res[s][split]["accuracy"] for s in sorted(res)]
            row[f"{split}_macro_f1_mean"] = round(float(np.mean(f1)), 4)
            row[f"{split}_macro_f1_sd"] = round(float(np.std(f1, ddof=1)), 4) if len(f1) > 1 else None
            row[f"{split}_accuracy_mean"] = round(float(np.mean(acc)), 4)
        row["stage1_seconds_mean"] = round(float(np.mean([res[s]["dev"].get("seconds", 0) for s in res])), 1)
        rows.append(row)
        if name != "preset":
            both = sorted(set(res) & set(base))
            for split in ("dev", "test"):
                d = [res[s][split]["macro_f1"] - base[s][split]["macro_f1"] for s in both]
                if not d:
                    continue
                m, lo, hi = t_interval(d)
                p = {"split": split, "a": name, "b": "preset", "n": len(d), "diff_mean": round(m, 4),
                     "ci_low": round(lo, 4) if np.isfinite(lo) else None,
                     "ci_high": round(hi, 4) if np.isfinite(hi) else None,
                     "per_seed": {str(s): round(x, 4) for s, x in zip(both, d)}}
                p["verdict"] = verdict(p)
                paired.append(p)
    dev_pairs = [p for p in paired if p["split"] == "dev"]
    better = [p["a"] for p in dev_pairs if p["ci_low"] is not None and p["ci_low"] > 0]
    return {"benchmark": "model_study", "fraction": args.fraction, "seeds": args.seeds, "commit": commit(),
            "machine": cpu_name(), "command": "python benchmarks/model_study.py " + " ".join(sys.argv[1:]),
            "chosen_on": "dev", "variants": rows, "paired": paired,
            "decision": (f"{', '.join(better)} beat the preset on dev (interval above zero)" if better else
                         "no variant beat the preset on dev with an interval above zero: the preset stays")}


def write_md(doc: dict, path: Path) -> None:
    lines = [f"# Model study (dev protocol), ELPV {doc['fraction']:g} labels, seeds {doc['seeds']}", "",
             f"commit {doc['commit']}, {doc['machine']}; `{doc['command']}`", "",
             "Stage-1 ensemble (5 folds) of each variant.  The DEV split ranks them; test is reported only.  "
             "'stage-1 s' is wall time with other jobs sharing the cores: a cost indication, not a speed measurement.", "",
             "| variant | overrides | seeds | dev macro F1 | dev acc | test macro F1 | test acc | stage-1 s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in doc["variants"]:
        sd = f" ± {r['dev_macro_f1_sd']:.4f}" if r["dev_macro_f1_sd"] is not None else ""
        tsd = f" ± {r['test_macro_f1_sd']:.4f}" if r["test_macro_f1_sd"] is not None else ""
        lines.append(f"| {r['variant']} | {' '.join(r['overrides']) or '-'} | {r['n_seeds']} | "
                     f"{r['dev_macro_f1_mean']:.4f}{sd} | {r['dev_accuracy_mean']:.4f} | {r['test_macro_f1_mean']:.4f}{tsd} | "
                     f"{r['test_accuracy_mean']:.4f} | {r['stage1_seconds_mean']:.0f} |")
    lines += ["", "Paired differences against the preset (per seed, 95% t interval, ddof=1):", ""]
    lines += [f"- {p['split']}: {p['verdict']}" for p in doc["paired"]]
    lines += ["", f"Decision: {doc['decision']}.", ""]
    path.write_text("\n".join(lines))


def write_png(doc: dict, path: Path) -> None:
    """Dev and test macro F1 (mean, error bar = sample SD) of every variant, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["variants"]
    if not rows:
        return
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(1.3 * len(rows) + 2, 3.6))
    for k, (split, colour) in enumerate((("dev", "tab:blue"), ("test", "tab:grey"))):
        ax.bar(x + (k - 0.5) * 0.38, [r[f"{split}_macro_f1_mean"] for r in rows], 0.38,
               yerr=[r[f"{split}_macro_f1_sd"] or 0 for r in rows], capsize=3, color=colour,
               label=f"{split} (mean, SD ddof=1)" + (" - ranks the variants" if split == "dev" else " - reported only"))
    ax.set_xticks(x, [r["variant"] for r in rows])
    ax.set_ylabel("macro F1, stage-1 ensemble")
    lo = min(r[f"{s}_macro_f1_mean"] for r in rows for s in ("dev", "test"))
    ax.set_ylim(max(0.0, lo - 0.08), None)
    ax.set_title(f"Model study, ELPV {doc['fraction']:g} labels, {len(doc['seeds'])} seeds")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--preset-work", type=Path, default=None,
                    help="a label-efficiency --work holding the preset's (a) runs for these seeds "
                         "(default: train them here, under WORK/preset)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/semivit-model-study"))
    ap.add_argument("--summarise-only", action="store_true")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    t0 = time.time()
    train_preset = args.preset_work is None
    if train_preset:
        args.preset_work = args.work / "preset"
    if not args.summarise_only:
        for name in args.variants:
            if name != "preset" or train_preset:
                run_variant(name, args)
    doc = summarise(args)
    doc["this_invocation_seconds"] = round(time.time() - t0, 1)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "model_study.json").write_text(json.dumps(doc, indent=2) + "\n")
    write_md(doc, args.results / "model_study.md")
    write_png(doc, args.results / "model_study.png")
    print(doc["decision"])


if __name__ == "__main__":
    main()
