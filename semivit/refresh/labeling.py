"""Pseudo-label the inbox with the current version's ensemble - stage 2's rules, stage 2's code.

The current ensemble (all members of its ensemble.json, flip TTA as ``pseudo.tta``) predicts
every inbox image still to label; a pseudo-label is accepted when the ensemble's confidence is
>= ``pseudo.threshold`` or the image is in the core of a pure UMAP+KMeans cluster (the members'
penultimate embeddings -> semivit.trainer.pseudo.umap_2d -> cluster_cores -> select: the same
functions stage 2 uses, with the current run's ``pseudo.*`` config and ``--set`` overrides).
Clusters are formed over this batch of images when it has at least max(10, 3 x classes).
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
    from semivit.trainer.infer import ensemble_predict
    from semivit.trainer.pseudo import cluster_cores, select, umap_2d

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
        pred = probs.argmax(1)
        clusters = None
        if pcfg.cluster and len(ok) >= max(10, 3 * len(classes)):
            points = umap_2d(np.concatenate(embs, axis=1), pcfg.umap_neighbors, cfg.seed)
            clusters = cluster_cores(points, pred, len(classes), pcfg.purity, pcfg.core_fraction, cfg.seed)
            st.clusters = True
        elif pcfg.cluster:
            info(f"refresh: {len(ok)} images to label - too few for UMAP + KMeans, confidence rule only")
        pl = select(probs, pcfg.threshold, clusters, pcfg.max_per_class)
        chosen = set(pl.index.tolist())
        for i, lab, conf, src in zip(pl.index, pl.label, pl.confidence, pl.source):
            accepted.append({"sha256": ok[i][0], "label": classes[int(lab)], "confidence": float(conf),
                             "source": src, "probs": [round(float(x), 6) for x in probs[i]]})
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
