"""Dev check (issue 13): does feeding the frozen EfficientNet-Lite0 stem the normalisation its weights
expect (mean = std = 0.5, timm's pretrained_cfg) instead of ImageNet's raise stage-1 macro F1?
Scored on the dev split carved from the unlabeled pool (never the test split).

Run as it was for benchmarks/results/dev_normalisation.json (the code before model.mean/std
existed, commit 9a9d4a8, so the script patches Preprocess's default for "half"):

    git worktree add /tmp/old 9a9d4a8 && cd /tmp/old
    for n in imagenet half; do OMP_NUM_THREADS=1 PYTHONPATH=$PWD python ../path/to/benchmarks/dev_normalisation.py $n 0,1,2 0.1; done

With the current code the same choice is a config key: --set model.mean=[0.485,0.456,0.406]
--set model.std=[0.229,0.224,0.225] (ImageNet) against the default (what the weights expect)."""
import csv, json, os, shutil, sys, time
from pathlib import Path
import numpy as np
sys.path.insert(0, os.getcwd())
norm = sys.argv[1]; seeds = [int(s) for s in sys.argv[2].split(",")]; frac = float(sys.argv[3])
import semivit.data.dataset as ds
if norm == "half":
    ds.Preprocess.__init__.__defaults__ = ((0.5,) * 3, (0.5,) * 3, False)
from semivit import config as cfgmod
from semivit.data.demo import write_demo
from semivit.data.layout import load_eval
from semivit.data.dataset import decode_many
from semivit.trainer.pipeline import run_training
from semivit.trainer.ensemble import ensemble_predict
from semivit.trainer.evaluate import classification_metrics
from semivit.utils import read_json
sys.path.insert(0, "/work/wt-13/benchmarks")
work = Path("/tmp/semivit-dev")
out = {}
for seed in seeds:
    data = work / f"data-elpv-f{frac:g}-s{seed}"
    if not (data / "dev").is_dir():
        write_demo(data, labeled_fraction=frac, seed=seed, test_seed=0)
        from sklearn.model_selection import train_test_split
        rows = list(csv.DictReader(open(data / "unlabeled_truth.csv")))
        keep, dev = train_test_split(np.arange(len(rows)), test_size=0.15, stratify=[r["label"] for r in rows], random_state=seed + 7)
        st = data / ".dev.partial"
        for i in dev:
            d = st / rows[i]["label"] / Path(rows[i]["image"]).name; d.parent.mkdir(parents=True, exist_ok=True)
            os.replace(data / rows[i]["image"], d)
        with open(data / "unlabeled_truth.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0])); w.writeheader(); w.writerows(rows[i] for i in sorted(keep))
        os.replace(st, data / "dev")
    cfg = cfgmod.resolve(preset="quick", seed=seed)
    run = work / f"norm-{norm}-f{frac:g}-s{seed}"
    t0 = time.time()
    run_training(data, run, cfg, stages="supervised")
    classes = read_json(run / "ensemble.json")["classes"]
    ls = load_eval(data / "dev", classes); dec = decode_many(ls.paths, 128)
    from semivit.trainer.run import open_run
    r = open_run(run, cfg, data)
    p = ensemble_predict(run, r.stem_features(dec.images, tta=True), stages=["stage1"], tta=True)
    m = classification_metrics(ls.labels[dec.ok], p, classes)
    oof = [read_json(run / "stage1" / f"fold{k}" / "done.json")["val_macro_f1"] for k in range(5)]
    out[seed] = {"dev_macro_f1": round(m["macro_f1"], 4), "dev_acc": round(m["accuracy"], 4), "val_f1_mean": round(float(np.mean(oof)), 4), "s": round(time.time() - t0)}
    print(norm, seed, out[seed], flush=True)
print(json.dumps({norm: out}))
