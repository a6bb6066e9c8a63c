"""Pseudo-label the inbox with the current version's ensemble - stage 2's rules, stage 2's code.

The current ensemble (all members of its ensemble.json, flip TTA as ``pseudo.tta``) predicts
every inbox image still to label, and semivit.pseudo.select.label_pool - the function stage 2
runs - selects with the current run's ``pseudo.*`` config and ``--set`` overrides: a prediction
is accepted when its confidence reaches the threshold of the configured rule
(``pseudo.threshold_mode``: ``global`` = ``pseudo.threshold``; ``oof`` = per class, calibrated on
the current run's stage-1 out-of-fold predictions) or the image is in the core of a pure
UMAP+KMeans cluster.  Clusters are formed over this batch of images when it has at least
max(10, 3 x classes).  The thresholds applied are recorded (history.jsonl, ``labeled``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from semivit.refresh.inbox import Inbox
from semivit.refresh.lock import kill_point
from semivit.utils import info, resolve_device, warn


@dataclass
class LabelStats:
    looked_at: int = 0
    accepted: int = 0
    unconfident: int = 0
    undecodable: int = 0
    missing: int = 0  # content whose file is gone or changed since ingest
    clusters: bool = False
    thresholds: dict = field(default_factory=dict)  # per class, as the configured rule gave them
    by_source: dict = field(default_factory=dict)
    by_class: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def label_inbox(db: Inbox, run_dir: Path, version: str, cfg) -> LabelStats:
    st = LabelStats()
    todo = db.to_label(version)
    present = [(sha, p) for sha, p in todo if p is not None]
    st.missing = len(todo) - len(present)
    if not present:
        return st  # (before importing torch: a refresh with nothing new takes well under a second)
    from semivit.data.dataset import decode_many
    from semivit.models.ensemble import read_ensemble
    from semivit.pseudo.rules import describe, run_calibration
    from semivit.pseudo.select import label_pool
    from semivit.trainer.infer import ensemble_predict

    ens = read_ensemble(run_dir)
    classes, size = ens["classes"], int(ens["img_size"])
    pcfg = cfg.pseudo
    dec = decode_many([p for _, p in present], size, workers=cfg.data.decode_workers)
    why = {str(p): reason for p, reason in dec.failures}
    bad = sorted(set(range(len(present))) - set(dec.ok.tolist()))
    rejected = [(present[i][0], f"undecodable: {why.get(str(present[i][1]), 'unknown')}") for i in bad]
    st.undecodable = len(rejected)
    ok = [present[i] for i in dec.ok]
    st.looked_at = len(ok)
    accepted = []
    if ok:
        probs, embs = ensemble_predict(run_dir, dec.images, stages=None, tta=pcfg.tta, with_embeddings=True,
                                       device=resolve_device(cfg.device))
        pool = label_pool(probs, embs, pcfg, cfg.seed, calibration=lambda: run_calibration(run_dir))
        pl = pool.labels
        st.clusters = pool.clusters is not None
        st.thresholds = describe(pool.thresholds, classes)
        if pcfg.cluster and pool.clusters is None:
            info(f"refresh: {len(ok)} images to label - too few for UMAP + KMeans, confidence rule only")
        chosen = set(pl.index.tolist())
        for i, lab, conf, src in zip(pl.index, pl.label, pl.confidence, pl.source):
            accepted.append({"sha256": ok[i][0], "label": classes[int(lab)], "confidence": float(conf),
                             "source": src, "probs": [round(float(x), 6) for x in pool.probs[i]]})
            st.by_source[src] = st.by_source.get(src, 0) + 1
            st.by_class[classes[int(lab)]] = st.by_class.get(classes[int(lab)], 0) + 1
        rejected += [(ok[i][0], "unconfident") for i in range(len(ok)) if i not in chosen]
        st.unconfident = len(ok) - len(chosen)
    st.accepted = len(accepted)
    if st.undecodable:
        warn(f"refresh: {st.undecodable} inbox files are not decodable images (recorded as rejected)")
    kill_point("pseudo")
    db.record_labels(version, accepted, rejected)
    return st
