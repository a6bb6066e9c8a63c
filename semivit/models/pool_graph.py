"""The unlabeled pool at prediction time (``ensemble.graph: pool``; issue 13).

After training, labels spread (semivit.pseudo.propagate: scikit-learn's LabelSpreading) over a
k-nearest-neighbour graph of the labeled images and the unlabeled pool, in the stage-1 members'
joint embedding (each member's head.hidden output, L2-normalised, concatenated, / sqrt(members)).
Every graph node keeps its class distribution (RUN/graph.npz).  A new image is embedded by the
same members, takes the mean distribution of its k nearest nodes (cosine similarity: the rows are
unit vectors, so the nearest by cosine are the nearest by Euclidean distance), and that is mixed
with the ensemble's probabilities: ``p = share x ensemble + (1 - share) x graph``, renormalised; a
query whose k nodes the spreading never reached keeps the ensemble's probabilities.

:class:`PoolGraph` is the torch module :class:`~semivit.models.ensemble.EnsembleModel` ends with,
so the ONNX export keeps ONE graph (MatMul, TopK, Gather, mean, mix) and every serving backend
applies it.  benchmarks/graph_predict.py measured the same method with scikit-learn's
NearestNeighbors and :func:`semivit.pseudo.propagate.mixture` (tests/test_pool_graph.py holds the
two to each other).

File format (numpy ``.npz``, no pickles): ``nodes`` float32 (N, D) unit rows - the labeled images
first, then the pool; ``dist`` float32 (N, C) each node's spread distribution, row-normalised (a
row of zeros: not reached); ``members`` the stage-1 member names whose embeddings form D, in
order; ``meta`` one JSON string (format, neighbors, alpha, share, counts).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from semivit.errors import UserError

GRAPH_FILE = "graph.npz"
GRAPH_FORMAT = "semivit-graph/1"


class PoolGraph(nn.Module):
    """(ensemble probabilities (N, C), member embeddings [(N, D_i)]) -> mixed probabilities."""

    def __init__(self, nodes: np.ndarray, dist: np.ndarray, neighbors: int, share: float):
        super().__init__()
        nodes = np.asarray(nodes, dtype=np.float32)
        dist = np.asarray(dist, dtype=np.float64)
        mass = dist.sum(1, keepdims=True)
        dist = np.where(mass > 0, dist / np.where(mass > 0, mass, 1.0), 0.0)
        # stored transposed: the similarity is one MatMul against a constant (D, N)
        self.register_buffer("nodes_t", torch.from_numpy(np.ascontiguousarray(nodes.T)))
        self.register_buffer("dist", torch.from_numpy(dist.astype(np.float32)))
        self.neighbors = max(1, min(int(neighbors), len(nodes)))
        self.share = float(share)

    @staticmethod
    def joint(embs: Sequence[torch.Tensor]) -> torch.Tensor:
        """semivit.pseudo.propagate.joint_embedding, in torch (inside the exported graph)."""
        # sqrt(sum(e^2)), not e.norm(): ONNX ReduceL2 stops ONNX Runtime's symbolic shape
        # inference (which the INT8 quantizer runs); ReduceSum does not
        parts = [e / torch.sqrt((e * e).sum(dim=1, keepdim=True)).clamp_min(1e-12) for e in embs]
        return torch.cat(parts, dim=1) / float(np.sqrt(len(parts)))

    def neighbours_mean(self, embs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Each query's mean node distribution over its k most similar nodes (N, C)."""
        sim = self.joint(embs) @ self.nodes_t
        idx = torch.topk(sim, self.neighbors, dim=1).indices  # (N, k)
        # index_select (ONNX Gather), not dist[idx] (GatherND: ONNX Runtime's symbolic shape
        # inference, which the INT8 quantizer runs, cannot follow it)
        rows = torch.index_select(self.dist, 0, idx.reshape(-1))
        return rows.reshape(idx.shape[0], self.neighbors, -1).mean(dim=1)

    def forward(self, probs: torch.Tensor, embs: Sequence[torch.Tensor]) -> torch.Tensor:
        g = self.neighbours_mean(embs)
        mass = g.sum(dim=1, keepdim=True)
        spread = torch.where(mass > 0, g / mass.clamp_min(1e-12), probs)
        p = self.share * probs + (1.0 - self.share) * spread
        return p / p.sum(dim=1, keepdim=True)


    @torch.no_grad()
    def mix_arrays(self, probs: np.ndarray, embs: Sequence[np.ndarray], chunk: int = 1024) -> np.ndarray:
        """:meth:`forward` on numpy arrays (training-side scoring: ``ssl eval RUN``, the run report),
        ``chunk`` rows at a time (their chunk x nodes similarities, not all images' at once)."""
        t = torch.from_numpy(np.asarray(probs, np.float32))
        e = [torch.from_numpy(np.asarray(x, np.float32)) for x in embs]
        return np.concatenate([self(t[s:s + chunk], [x[s:s + chunk] for x in e]).numpy()
                               for s in range(0, len(t), chunk)]) if len(t) else np.asarray(probs, np.float32)


def write_graph(path: Path, nodes: np.ndarray, dist: np.ndarray, members: Sequence[str], **meta) -> None:
    from semivit.utils import atomic_path

    doc = {"format": GRAPH_FORMAT, **meta}
    with atomic_path(Path(path)) as tmp, open(tmp, "wb") as f:
        np.savez(f, nodes=np.asarray(nodes, np.float32), dist=np.asarray(dist, np.float32),
                 members=np.asarray(list(members), dtype=str), meta=np.asarray(json.dumps(doc)))


def read_graph(run_dir: Path) -> Optional[dict]:
    """RUN/graph.npz as {nodes, dist, members, **meta}, or None when the run has none."""
    path = Path(run_dir) / GRAPH_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            doc = json.loads(str(z["meta"]))
            out = {**doc, "nodes": z["nodes"], "dist": z["dist"], "members": [str(m) for m in z["members"]]}
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user-facing problem
        raise UserError(f"{path} is not a readable semivit graph ({type(e).__name__}: {e}); "
                        f"rebuild it: ssl train ... --stages graph") from None
    if out.get("format") != GRAPH_FORMAT:
        raise UserError(f"{path} is not a semivit graph file (format {out.get('format')!r})")
    return out


def graph_for(doc: Optional[dict], member_names: Sequence[str]) -> tuple[Optional[PoolGraph], list[int]]:
    """(the module, the indices in ``member_names`` of the graph's members) when every member
    the graph embeds with is among ``member_names``; else (None, [])."""
    if doc is None:
        return None, []
    names = list(member_names)
    if not set(doc["members"]) <= set(names):
        return None, []
    return (PoolGraph(doc["nodes"], doc["dist"], doc["neighbors"], doc["share"]),
            [names.index(m) for m in doc["members"]])
