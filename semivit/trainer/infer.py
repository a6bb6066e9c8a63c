"""Batched inference helpers shared by validation, pseudo-labelling, eval and export checks."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from semivit.data.dataset import Preprocess
from semivit.errors import UserError
from semivit.models.checkpoint import load_checkpoint
from semivit.models.ensemble import ensemble_weights, members_from_stages, read_ensemble
from semivit.models.networks import features_input


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CPU, fp16 AMP on CUDA (``auto``), or nothing (``fp32``)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if device.type == "cuda":
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    if precision in ("auto", "bf16"):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()  # "amp" asked on CPU: fp32


@torch.no_grad()
def predict_arrays(model: nn.Module, images: np.ndarray, batch_size: int = 64,
                   device: Optional[torch.device] = None, tta: bool = False,
                   with_embeddings: bool = False, precision: str = "fp32"):
    """Softmax probabilities (N, C) for uint8 NHWC ``images`` (or cached frozen-stem
    :class:`~semivit.trainer.stem_cache.StemFeatures`); with ``tta`` the mean of the image and
    its horizontal mirror.  With ``with_embeddings`` also the penultimate features (averaged
    over the TTA views)."""
    from semivit.trainer.stem_cache import StemFeatures

    device = device or torch.device("cpu")
    pre = Preprocess.for_model(model, channels_last_input=True).to(device)
    cached = isinstance(images, StemFeatures)
    if cached and tta and images.flip is None:
        raise ValueError("flip TTA on cached stem features needs their mirrored features")
    was_training = model.training
    model.eval()
    probs, embs = [], []
    for s in range(0, len(images), batch_size):
        if cached:  # frozen-stem features (see stem_cache): the mirror's come precomputed
            x = torch.from_numpy(images.orig[s:s + batch_size]).to(device)
            views = [x, torch.from_numpy(images.flip[s:s + batch_size]).to(device)] if tta else [x]
        else:
            x = pre(torch.from_numpy(np.ascontiguousarray(images[s:s + batch_size])).to(device))
            views = [x, x.flip(3)] if tta else [x]
        p_sum, e_sum = 0, 0
        with autocast(device, precision), features_input(model, cached):
            for v in views:
                if with_embeddings:
                    logits, emb = model.forward_with_embedding(v)
                    e_sum = e_sum + emb.float()
                else:
                    logits = model(v)
                p_sum = p_sum + torch.softmax(logits.float(), dim=1)
        probs.append((p_sum / len(views)).cpu().numpy())
        if with_embeddings:
            embs.append((e_sum / len(views)).cpu().numpy())
    model.train(was_training)
    n_cls = getattr(model, "num_classes", None)
    out = np.concatenate(probs) if probs else np.zeros((0, n_cls or 0), np.float32)
    if with_embeddings:
        return out, (np.concatenate(embs) if embs else np.zeros((0, 0), np.float32))
    return out


@torch.no_grad()
def ensemble_predict(run_dir: Path, images: np.ndarray, stages: Optional[Sequence[str]] = None,
                     tta: bool = True, batch_size: int = 64, device=None,
                     with_embeddings: bool = False, weighting: str = "f1", progress=None,
                     graph: bool = True):
    """Weighted-ensemble probabilities of the members of ``stages`` (default: ensemble.json).

    With ``with_embeddings`` also returns each member's penultimate embeddings (list of arrays);
    ``progress(done, total)`` is called after each member.  The run's ensemble (``stages`` None)
    ends in its pool graph when it has one (RUN/graph.npz, semivit.models.pool_graph) and
    ``graph`` is true - the probabilities the exported graph serves.
    """
    from semivit.models.pool_graph import graph_for, read_graph

    if stages is None:
        entries = read_ensemble(run_dir)["members"]
        weights = [m["weight"] for m in entries]
    else:
        entries = members_from_stages(run_dir, stages)
        if not entries:
            raise UserError(f"{run_dir} has no trained members in {', '.join(stages)}")
        weights = list(ensemble_weights([m["val_macro_f1"] for m in entries], weighting))
    pool_graph, graph_idx = graph_for(read_graph(run_dir) if graph and stages is None else None,
                                      [m["name"] for m in entries])
    probs, embs = None, []
    for i, (m, w) in enumerate(zip(entries, weights)):
        model, _ = load_checkpoint(Path(run_dir) / m["path"])
        if device is not None:
            model.to(device)
        emb = with_embeddings or i in graph_idx
        out = predict_arrays(model, images, batch_size=batch_size, device=device, tta=tta, with_embeddings=emb)
        p = out[0] if emb else out
        embs.append(out[1] if emb else None)
        probs = p * w if probs is None else probs + p * w
        if progress is not None:
            progress(i + 1, len(entries))
    if pool_graph is not None:
        probs = pool_graph.mix_arrays(probs, [embs[i] for i in graph_idx])
    return (probs, embs) if with_embeddings else probs
