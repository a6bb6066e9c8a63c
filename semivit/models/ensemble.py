"""The weighted ensemble: weights from validation macro F1, RUN/ensemble.json, and the
PyTorch module (uint8 NHWC in -> probabilities out) that serving and the ONNX export share.

(Ensemble predictions for training-side code - stage 2, ``ssl eval`` on a run, refresh - are
semivit.trainer.infer.ensemble_predict.)

Weights: w_i = F1_i / sum_j F1_j, where F1_i is member i's best validation macro F1 on its
held-out fold (true labels only).  ``ensemble.weighting: equal`` gives w_i = 1/M.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from semivit.data.dataset import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from semivit.models.checkpoint import load_checkpoint
from semivit.models.networks import drop_frozen_stem, frozen_stem
from semivit.utils import atomic_write_json, read_format_json, read_json

ENSEMBLE_FORMAT = "semivit-ensemble/1"


def ensemble_weights(f1s: Sequence[float], weighting: str = "f1") -> np.ndarray:
    f1s = np.asarray(f1s, dtype=np.float64)
    if weighting == "equal" or f1s.sum() <= 0:
        return np.full(len(f1s), 1.0 / len(f1s))
    return f1s / f1s.sum()


def write_ensemble(run_dir: Path, members: list[dict], classes: list[str], img_size: int,
                   weighting: str = "f1", norm=None) -> dict:
    """members: [{"name", "path" (relative to RUN), "val_macro_f1", ...}] -> RUN/ensemble.json."""
    w = ensemble_weights([m["val_macro_f1"] for m in members], weighting)
    doc = {
        "format": ENSEMBLE_FORMAT,
        "classes": list(classes),
        "img_size": img_size,
        "mean": list(norm[0] if norm else IMAGENET_MEAN),  # the members' (they share one config)
        "std": list(norm[1] if norm else IMAGENET_STD),
        "preprocessing": "decode to RGB, resize full frame to img_size x img_size (bilinear), "
                         "uint8 NHWC; normalisation (x/255 - mean)/std is inside the model",
        "weighting": weighting,
        "formula": "w_i = F1_i / sum_j F1_j (validation macro F1 of each member)" if weighting == "f1"
                   else "w_i = 1 / M",
        "members": [{**m, "weight": float(wi)} for m, wi in zip(members, w)],
        "val_macro_f1_mean": float(np.mean([m["val_macro_f1"] for m in members])),
    }
    atomic_write_json(Path(run_dir) / "ensemble.json", doc)
    return doc


def read_ensemble(run_dir: Path) -> dict:
    path = Path(run_dir) / "ensemble.json"
    return read_format_json(path, ENSEMBLE_FORMAT,
                            f"{run_dir} has no ensemble.json (train it first, or it is not a run directory)",
                            f"{path} is not a semivit ensemble file")


class EnsembleModel(nn.Module):
    """uint8 images (N, H, W, 3) -> (probabilities (N, C), arg-max (N,)).

    Preprocessing (normalisation), horizontal-flip TTA (both views in one batch), every member's
    softmax and the weighted average are all inside, so ONNX export fuses them into one graph.
    """

    def __init__(self, members: Sequence[nn.Module], weights: Sequence[float], tta: bool = True,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, graph: Optional[nn.Module] = None,
                 graph_members: Sequence[int] = ()):
        super().__init__()
        if len(members) != len(weights) or not members:
            raise ValueError("members and weights must be non-empty and of equal length")
        # Members that share one identical frozen stem (the quick preset's hybrids all keep the
        # same ImageNet stem) run it once per image instead of once per member: the stem is
        # most of a hybrid's inference cost, so a 10-member ensemble gets ~10x cheaper.
        stem = _shared_frozen_stem(members)
        if stem is not None:
            self.stem = copy.deepcopy(stem).eval()
            self.stem.frozen = False  # plain inference module (no grad-mode switch in the graph)
            members = [_without_stem(m) for m in members]
        else:
            self.stem = None
        self.members = nn.ModuleList(members)
        w = torch.tensor(list(weights), dtype=torch.float32)
        self.register_buffer("weights", w / w.sum())
        self.tta = tta
        self.pre = Preprocess(mean, std, channels_last_input=True)
        # ensemble.graph: pool (semivit.models.pool_graph): the members at ``graph_members`` also
        # give their embeddings, and the pool graph's neighbours are mixed into the probabilities
        self.pool_graph = graph
        self.graph_members = [int(i) for i in graph_members] if graph is not None else []

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pre(images)
        n = x.shape[0]
        if self.tta:
            x = torch.cat([x, x.flip(3)], dim=0)
        if self.stem is not None:
            x = self.stem(x)
        probs, embs = None, {}
        for i, m in enumerate(self.members):
            if i in self.graph_members:
                logits, e = m.forward_with_embedding(x)
                embs[i] = 0.5 * (e[:n] + e[n:]) if self.tta else e
            else:
                logits = m(x)
            p = torch.softmax(logits, dim=1)
            if self.tta:
                p = 0.5 * (p[:n] + p[n:])
            p = p * self.weights[i]
            probs = p if probs is None else probs + p  # a left-deep Add chain (int8.member_terms)
        if self.pool_graph is not None:
            probs = self.pool_graph(probs, [embs[i] for i in self.graph_members])
        return probs, probs.argmax(dim=1)


def _shared_frozen_stem(members: Sequence[nn.Module]):
    """The frozen stem all ``members`` have with identical weights and statistics, else None."""
    stems = [frozen_stem(m) for m in members]
    if any(s is None for s in stems):
        return None
    ref = stems[0].state_dict()
    for s in stems[1:]:
        sd = s.state_dict()
        if sd.keys() != ref.keys() or any(not torch.equal(sd[k], ref[k]) for k in ref):
            return None
    return stems[0]


def _without_stem(member: nn.Module) -> nn.Module:
    """A copy of a hybrid member that takes stem features (its stem replaced by identity)."""
    clone = copy.deepcopy(member)
    drop_frozen_stem(clone)
    return clone


def load_members(run_dir: Path, doc: Optional[dict] = None, names: Optional[Sequence[str]] = None):
    """(models, weights, member entries) of a run's ensemble, optionally a subset by name."""
    doc = doc or read_ensemble(run_dir)
    entries = [m for m in doc["members"] if names is None or m["name"] in names]
    models = []
    for m in entries:
        model, _ = load_checkpoint(Path(run_dir) / m["path"])
        models.append(model)
    return models, [m["weight"] for m in entries], entries


def load_ensemble(run_dir: Path, tta: bool = True, names: Optional[Sequence[str]] = None,
                  graph: bool = True) -> tuple[EnsembleModel, dict]:
    """The run's EnsembleModel; with ``graph`` and a RUN/graph.npz whose members are all loaded,
    ending in the pool graph (semivit.models.pool_graph)."""
    from semivit.models.pool_graph import graph_for, read_graph

    doc = read_ensemble(run_dir)
    models, weights, entries = load_members(run_dir, doc, names)
    g, idx = graph_for(read_graph(run_dir) if graph else None, [m["name"] for m in entries])
    model = EnsembleModel(models, weights, tta=tta, mean=doc["mean"], std=doc["std"], graph=g,
                          graph_members=idx).eval()
    return model, doc


def members_from_stages(run_dir: Path, stages: Sequence[str]) -> list[dict]:
    """Finished folds of the given stages as ensemble member entries."""
    out = []
    for stage in stages:
        for done in sorted(Path(run_dir, stage).glob("fold*/done.json"), key=lambda p: int(p.parent.name[4:])):
            s = read_json(done)
            out.append({"name": f"{stage}/{done.parent.name}", "path": f"{stage}/{done.parent.name}/best.pt",
                        "stage": stage, "fold": s["fold"], "val_macro_f1": s["val_macro_f1"],
                        "val_acc": s.get("val_acc")})
    return out
