"""RUN/report.md with PNGs: per-stage metrics, learning curves, pseudo-label statistics, the UMAP
plot, ensemble weights, wall time per stage, and - when DATA/test/ exists - the held-out scores
of the stage-1 ensemble and of the full ensemble (reported only; never used to choose anything).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import yaml

from semivit.metrics import classification_metrics, plot_confusion
from semivit.models.ensemble import ensemble_weights, members_from_stages, read_ensemble
from semivit.utils import atomic_write_json, atomic_write_text, read_json


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _history(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def plot_learning_curves(run_dir: Path, stages: list[str], path: Path) -> bool:
    plt = _plt()
    stages = [s for s in stages if list(Path(run_dir, s).glob("fold*/metrics.csv"))]
    if not stages:
        return False
    fig, axes = plt.subplots(len(stages), 2, figsize=(11, 3.4 * len(stages)), squeeze=False)
    for row, stage in enumerate(stages):
        for mpath in sorted(Path(run_dir, stage).glob("fold*/metrics.csv")):
            h = _history(mpath)
            ep = [r["epoch"] for r in h]
            axes[row][0].plot(ep, [r["val_macro_f1"] for r in h], marker=".", label=mpath.parent.name)
            axes[row][1].plot(ep, [r["train_loss"] for r in h], marker=".", label=f"{mpath.parent.name} train")
            axes[row][1].plot(ep, [r["val_loss"] for r in h], ls="--", alpha=0.6, label=f"{mpath.parent.name} val")
        axes[row][0].set_title(f"{stage}: validation macro F1 per fold")
        axes[row][1].set_title(f"{stage}: loss (solid train, dashed validation)")
        for ax in axes[row]:
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
        axes[row][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_per_class_f1(per_class: dict, path: Path, title: str) -> None:
    plt = _plt()
    names = list(per_class)
    fig, ax = plt.subplots(figsize=(1.1 * len(names) + 3, 3.2))
    vals = [per_class[n]["f1"] for n in names]
    ax.bar(names, vals, color="tab:blue")
    for i, v in enumerate(vals):
        ax.text(i, v + 0.01, f"{v:.2f}", ha="center", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("F1")
    ax.set_title(title, fontsize=10)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def heldout_scores(run) -> dict:
    """Score the stage-1 ensemble and the full ensemble on DATA/test/ (if present).

    Per-member probabilities are computed once (flip TTA) and combined per ensemble.
    """
    from semivit.data.dataset import decode_many
    from semivit.data.layout import load_eval
    from semivit.models.checkpoint import load_checkpoint
    from semivit.trainer.infer import predict_arrays

    test_dir = run.data / "test"
    if not test_dir.is_dir():
        return {}
    ls = load_eval(run.data, run.classes)
    dec = decode_many(ls.paths, run.cfg.model.img_size)
    y = ls.labels[dec.ok]
    members = members_from_stages(run.dir, ["stage1", "stage3"])
    inputs = run.stem_features(dec.images, tta=True, what="test images")  # the stem runs once, not per member
    from semivit.models.pool_graph import graph_for, read_graph

    pool_graph, graph_idx = graph_for(read_graph(run.dir), [m["name"] for m in members])
    graph_names = [members[i]["name"] for i in graph_idx]
    probs, embs = {}, {}
    for m in members:
        model, _ = load_checkpoint(run.dir / m["path"])
        out = predict_arrays(model.to(run.device), inputs, device=run.device, tta=True,
                             with_embeddings=m["name"] in graph_names)
        probs[m["name"]], embs[m["name"]] = out if m["name"] in graph_names else (out, None)
    out = {"n_images": int(len(y)), "members": {}}
    for m in members:
        out["members"][m["name"]] = classification_metrics(y, probs[m["name"]], run.classes)["macro_f1"]
    groups = {"stage1_ensemble": [m for m in members if m["stage"] == "stage1"],
              "stage3_ensemble": [m for m in members if m["stage"] == "stage3"],
              "full_ensemble": members}
    for name, ms in groups.items():
        if not ms:
            continue
        w = ensemble_weights([m["val_macro_f1"] for m in ms], run.cfg.ensemble.weighting)
        p = sum(wi * probs[m["name"]] for wi, m in zip(w, ms))
        out[name] = classification_metrics(y, p, run.classes)
        if name == "full_ensemble" and pool_graph is not None:  # what the export serves
            g = pool_graph.mix_arrays(p, [embs[n] for n in graph_names])
            out["full_graph"] = classification_metrics(y, g, run.classes)
    return out


def write_report(run) -> Path:
    from semivit.models.pool_graph import read_graph

    d = run.dir
    lines = [f"# semivit run report: `{d.name}`", ""]
    ens = read_ensemble(d) if (d / "ensemble.json").is_file() else None
    timings = yaml.safe_load((d / "timings.yaml").read_text()) if (d / "timings.yaml").is_file() else {}
    cfg = run.cfg
    lines += [f"- data: `{run.data}` - {len(run.labeled)} labeled images, classes "
              + ", ".join(f"{c} ({n})" for c, n in zip(run.classes, run.labeled.counts())),
              f"- preset `{cfg.preset}`, model `{cfg.model.name}` at {cfg.model.img_size} px, "
              f"{cfg.cv.folds} folds, method `{cfg.ssl.method}`, pre-training `{cfg.pretrain.method}`, seed {cfg.seed}",
              "- wall time per stage (s): " + (", ".join(f"{k} {v:.0f}" for k, v in timings.items()) or "n/a"), ""]

    # per-stage metrics
    lines += ["## Validation (true labels only)", "",
              "| stage | fold | val macro F1 | val acc | best epoch | epochs run | train samples (+pseudo) | seconds |",
              "|---|---|---|---|---|---|---|---|"]
    oof = {}
    for stage in ("stage1", "stage3"):
        for done in sorted(Path(d, stage).glob("fold*/done.json")):
            s = read_json(done)
            lines.append(f"| {stage} | {s['fold']} | {s['val_macro_f1']:.4f} | {s['val_acc']:.4f} | {s['best_epoch']} | "
                         f"{s['epochs_run']} | {s['train_samples']} (+{s['extra_samples']}) | {s['seconds']:.0f} |")
        if (d / stage / "oof_probs.npy").is_file():
            p = np.load(d / stage / "oof_probs.npy")
            if len(p) == len(run.labeled):
                oof[stage] = classification_metrics(run.labeled.labels, p, run.classes)
    lines.append("")
    for stage, m in oof.items():
        lines.append(f"- {stage} out-of-fold macro F1 on the labeled set: **{m['macro_f1']:.4f}** (accuracy {m['accuracy']:.4f})")
    majority = float(np.bincount(run.labeled.labels).max() / len(run.labeled))
    k = len(run.classes)
    # always predicting the majority class: its F1 is 2p/(1+p), every other class scores 0
    lines += [f"- majority-class baseline: accuracy {majority:.4f}, macro F1 {2 * majority / (1 + majority) / k:.4f}", ""]
    if plot_learning_curves(d, ["stage1", "stage3"], d / "learning_curves.png"):
        lines += ["![learning curves](learning_curves.png)", ""]
    if (d / "pretrain" / "loss.png").is_file():
        lines += ["## Stage 0: MAE pre-training", "", "![MAE reconstruction loss](pretrain/loss.png)", ""]

    # pseudo-labels
    stats_path = d / "pseudo" / "stats.json"
    if stats_path.is_file():
        st = read_json(stats_path)
        if st.get("thresholds"):  # pseudo.threshold_mode: oof
            rule = ("per-class thresholds from the stage-1 out-of-fold predictions (lowest confidence at which a "
                    f"class's predictions are >= {cfg.pseudo.target_precision:.0%} right): "
                    + ", ".join(f"{c} {t if t is not None else 'none (never that precise)'}"
                                for c, t in st["thresholds"].items())
                    + f"; cluster cores of clusters with purity >= {cfg.pseudo.purity}, for the classes that have a "
                      "threshold")
        else:
            rule = f"threshold {cfg.pseudo.threshold}, cluster cores of clusters with purity >= {cfg.pseudo.purity}"
        cap = f"; at most {cfg.pseudo.max_per_class} per class" if cfg.pseudo.max_per_class else ""
        lines += ["## Pseudo-labels (stage 2)", "",
                  f"{st.get('selected', 0)} of {st.get('unlabeled', 0)} unlabeled images pseudo-labeled ({rule}{cap}).", "",
                  "| source | count | precision vs held-back truth |", "|---|---|---|"]
        truth = st.get("truth", {})
        for src, n in st.get("by_source", {}).items():
            prec = truth.get("by_source", {}).get(src, {}).get("precision")
            lines.append(f"| {src} | {n} | {prec if prec is not None else 'n/a'} |")
        lines += ["", "| class | count | precision |", "|---|---|---|"]
        for c, n in st.get("by_class", {}).items():
            prec = truth.get("by_class", {}).get(c, {}).get("precision")
            lines.append(f"| {c} | {n} | {prec if prec is not None else 'n/a'} |")
        prop = st.get("propagate")
        if truth.get("scored"):
            who = "the teacher mixed with label spreading" if prop else "the stage-1 ensemble"
            lines.append(f"\nOverall pseudo-label precision {truth['precision']:.4f}; {who}'s accuracy "
                         f"on the whole unlabeled pool {truth.get('pool_accuracy', float('nan')):.4f}"
                         + (f" (the teacher alone: {truth['teacher_pool_accuracy']:.4f})"
                            if "teacher_pool_accuracy" in truth else "") + ".")
        if prop:
            per_fold = (f"; fold k's student learns labels spread from its training folds only (arg-max changed per fold: "
                        f"{', '.join(map(str, prop['fold_argmax_changed']))})" if prop.get("fold_argmax_changed") else "")
            lines.append(f"\nLabel spreading ({prop['neighbors']} neighbours, alpha {prop['alpha']:g}, the teacher's "
                         f"share {prop['teacher_share']:g}): the graph reached {prop['reached']} of "
                         f"{st.get('unlabeled', 0)} unlabeled images and changed the arg-max of {prop['argmax_changed']}"
                         f"{per_fold}.")
        if st.get("clusters"):
            lines += ["", "Clusters: " + "; ".join(f"{c['majority']} n={c['size']} purity {c['purity']:.2f}"
                                                   + (" (pure)" if c["pure"] else "") for c in st["clusters"])]
        if (d / "pseudo" / "umap.png").is_file():
            lines += ["", "![UMAP](pseudo/umap.png)"]
        lines.append("")

    # ensemble
    if ens:
        lines += ["## Ensemble", "", f"Weights: {ens['formula']}.", "", "| member | val macro F1 | weight |", "|---|---|---|"]
        lines += [f"| {m['name']} | {m['val_macro_f1']:.4f} | {m['weight']:.4f} |" for m in ens["members"]]
        lines.append("")
        gdoc = read_graph(d)
        if gdoc is not None:
            lines += [f"Pool graph (`ensemble.graph: pool`, RUN/graph.npz): {gdoc['labeled']} labeled + {gdoc['pool']} "
                      f"unlabeled images as nodes in the embedding of {', '.join(gdoc['members'])}; label spreading "
                      f"({gdoc['neighbors']} neighbours, alpha {gdoc['alpha']:g}) reached {gdoc['pool_reached']} of the "
                      f"pool.  A prediction mixes the labels of its {gdoc['neighbors']} nearest nodes with the "
                      f"ensemble's probabilities (the ensemble's share {gdoc['share']:g}).", ""]

    # held-out test
    held = heldout_scores(run) if ens else {}
    if held:
        atomic_write_json(d / "heldout.json", held)
        lines += ["## Held-out test split (DATA/test, reported only)", "",
                  "| ensemble | members | macro F1 | accuracy |", "|---|---|---|---|"]
        for name, label in (("stage1_ensemble", "stage 1 (supervised)"), ("stage3_ensemble", "stage 3 only"),
                            ("full_ensemble", "full (all members)"),
                            ("full_graph", "full + pool graph (what `ssl predict` serves)")):
            if name in held:
                n = len([m for m in ens["members"] if name.startswith("full") or m["stage"] == name.split("_")[0]])
                lines.append(f"| {label} | {n} | {held[name]['macro_f1']:.4f} | {held[name]['accuracy']:.4f} |")
        served = "full_graph" if "full_graph" in held else "full_ensemble"
        what = "full ensemble + pool graph" if served == "full_graph" else "full ensemble"
        final = held[served]
        plot_confusion(final["confusion_matrix"], run.classes, d / "confusion.png",
                       f"{what} on held-out test: macro F1 {final['macro_f1']:.3f}")
        plot_per_class_f1(final["per_class"], d / "per_class_f1.png", f"{what}: per-class F1 (held-out test)")
        lines += ["", "![confusion matrix](confusion.png) ![per-class F1](per_class_f1.png)", ""]
    path = d / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
