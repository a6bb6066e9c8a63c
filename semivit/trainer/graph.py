"""The stage ``graph`` (``ensemble.graph: pool``): RUN/graph.npz, the labeled images and the
unlabeled pool as nodes of a k-nearest-neighbour graph in the stage-1 members' joint embedding,
each with its label-spreading distribution.  What predicting does with it:
semivit.models.pool_graph."""

from __future__ import annotations

import numpy as np

from semivit.utils import info

# A pool larger than this contributes a seeded random subset of its images as nodes: the node
# matrix lives inside the exported ONNX graph (N x members x head_hidden float32: 20,000 nodes of
# the quick preset's 5 x 256 are 100 MB) and every prediction multiplies against it.
MAX_POOL_NODES = 20_000


def build_graph(run) -> dict:
    """Embed the labeled images and the pool with the stage-1 members (flip TTA as stage 2 does:
    ``pseudo.tta``), spread the labels, write RUN/graph.npz; returns its meta."""
    from semivit.models.ensemble import members_from_stages
    from semivit.models.pool_graph import GRAPH_FILE, write_graph
    from semivit.pseudo.propagate import joint_embedding, spread_all
    from semivit.trainer.infer import ensemble_predict

    cfg, ecfg = run.cfg, run.cfg.ensemble
    tta = cfg.pseudo.tta
    names = [m["name"] for m in members_from_stages(run.dir, ["stage1"])]

    def embed(images, what):
        x = run.stem_features(images, tta=tta, what=what)
        return ensemble_predict(run.dir, x, stages=["stage1"], tta=tta, device=run.device, with_embeddings=True,
                                weighting=cfg.ensemble.weighting, graph=False)[1]

    _, pool_images = run.unlabeled
    if len(pool_images) > MAX_POOL_NODES:
        keep = np.sort(np.random.default_rng(cfg.seed).choice(len(pool_images), MAX_POOL_NODES, replace=False))
        info(f"graph: {MAX_POOL_NODES} of the {len(pool_images)} unlabeled images as nodes (seeded subset)")
        pool_images = pool_images[keep]
    lab = joint_embedding(embed(run.images, "labeled images"))
    pool = joint_embedding(embed(pool_images, "unlabeled pool")) if len(pool_images) else lab[:0]
    labels = np.asarray(run.labeled.labels)
    dist = spread_all(lab, labels, pool, len(run.classes), ecfg.graph_neighbors, ecfg.graph_alpha)
    reached = int((dist[len(lab):].sum(1) > 0).sum())
    meta = {"neighbors": ecfg.graph_neighbors, "alpha": ecfg.graph_alpha, "share": ecfg.graph_share,
            "labeled": len(lab), "pool": len(pool), "pool_reached": reached, "tta": tta,
            "dim": int(lab.shape[1])}
    write_graph(run.dir / GRAPH_FILE, np.concatenate([lab, pool]), dist, names, **meta)
    info(f"graph: {len(lab)} labeled + {len(pool)} unlabeled images as nodes ({ecfg.graph_neighbors} "
         f"neighbours, alpha {ecfg.graph_alpha:g}; spreading reached {reached} of the pool); a prediction "
         f"mixes its nearest nodes' labels with the ensemble's (ensemble share {ecfg.graph_share:g})")
    return meta
