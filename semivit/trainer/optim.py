"""AdamW with differential LR (backbone = 10% of the head) or layer-wise LR decay (timm's helper),
no weight decay on biases/norms, and a per-step cosine schedule (with or without restarts)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def _no_decay_names(backbone: nn.Module) -> set[str]:
    fn = getattr(backbone, "no_weight_decay", None)
    return set(fn()) if callable(fn) else set()


def layer_scales(backbone: nn.Module, decay: float) -> dict[str, float]:
    """LR scale of every backbone parameter under layer-wise decay, by the rule of the MAE /
    Semi-ViT reference code (``util/lr_decay.py``): with L blocks, the embeddings (patch_embed,
    cls_token, pos_embed) are layer 0, block i is layer i + 1, everything after the blocks (the
    final norm) is layer L + 1, and layer j trains at ``decay^(L + 1 - j)`` - so the last block
    gets ``decay`` and only what follows it (and the head, outside the backbone) the full LR.
    Written here because timm's ``param_groups_layer_decay`` counts one layer fewer (its last
    block trains at the full LR).  A backbone without ``blocks`` falls back to timm's grouping."""
    blocks = getattr(backbone, "blocks", None)
    if blocks is None:
        from timm.optim import param_groups_layer_decay

        out = {}
        ids = {id(p): n for n, p in backbone.named_parameters()}
        for g in param_groups_layer_decay(backbone, weight_decay=0.0, layer_decay=decay):
            for p in g["params"]:
                out[ids[id(p)]] = g.get("lr_scale", 1.0)
        return {n: out.get(n, 1.0) for n, _ in backbone.named_parameters()}
    n_blocks = len(blocks)
    out = {}
    for n, _ in backbone.named_parameters():
        head = n.split(".")[0]
        if head == "blocks":
            layer = int(n.split(".")[1]) + 1
        elif head in ("patch_embed", "cls_token", "pos_embed", "reg_token", "dist_token"):
            layer = 0
        else:
            layer = n_blocks + 1
        out[n] = decay ** (n_blocks + 1 - layer)
    return out


def param_groups(model: nn.Module, lr: float, backbone_lr_mult: float, weight_decay: float,
                 layer_decay=None) -> list[dict]:
    """Groups for a :class:`~semivit.models.networks.Classifier`.

    - head: LR ``lr``; backbone: ``lr * backbone_lr_mult``; the freshly initialised parts of a
      hybrid backbone (``fresh_parameter_names()``) train at the head's ``lr``;
    - or, when ``layer_decay`` is set, each backbone layer at ``lr * scale`` (:func:`layer_scales`:
      the embeddings lowest, the last block ``lr * decay``) and the head at ``lr``.  This *replaces* ``backbone_lr_mult`` as in BEiT/MAE/Semi-ViT; multiplying
      the two would start the top block at a tenth of the paper's rate;
    - weight decay ``weight_decay`` on weights, 0 on biases, normalisation weights (any 1-d
      tensor) and the backbone's ``no_weight_decay()`` tensors (pos_embed, cls_token).
    Each group carries ``name`` for logging and tests.
    """
    groups: list[dict] = []
    backbone, head = model.backbone, model.head
    skip = _no_decay_names(backbone)
    if layer_decay is not None:
        scales = layer_scales(backbone, layer_decay)
        buckets: dict[tuple[float, bool], list] = {}
        for n, p in backbone.named_parameters():
            if p.requires_grad:
                buckets.setdefault((scales[n], p.ndim <= 1 or n in skip), []).append(p)
        for (scale, nd), params in sorted(buckets.items()):
            groups.append({"name": "backbone" + ("_no_decay" if nd else ""), "params": params,
                           "lr": lr * scale, "lr_scale": scale, "weight_decay": 0.0 if nd else weight_decay})
    else:
        # A hybrid's transformer is freshly initialised: it trains at the head's LR; only the
        # pretrained stem gets the reduced backbone LR (see HybridViT.fresh_parameter_names).
        fresh_fn = getattr(backbone, "fresh_parameter_names", None)
        fresh = set(fresh_fn()) if callable(fresh_fn) else set()
        buckets: dict[tuple[bool, bool], list] = {}
        for n, p in backbone.named_parameters():
            if not p.requires_grad:
                continue
            buckets.setdefault((n in fresh, p.ndim <= 1 or n in skip), []).append(p)
        for (is_fresh, nd), params in sorted(buckets.items()):
            groups.append({"name": ("backbone_fresh" if is_fresh else "backbone") + ("_no_decay" if nd else ""),
                           "params": params, "lr": lr if is_fresh else lr * backbone_lr_mult,
                           "weight_decay": 0.0 if nd else weight_decay})
    hd, hnd = [], []
    for _, p in head.named_parameters():
        (hnd if p.ndim <= 1 else hd).append(p)
    groups += [
        {"name": "head", "params": hd, "lr": lr, "weight_decay": weight_decay},
        {"name": "head_no_decay", "params": hnd, "lr": lr, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, train_cfg, lr=None) -> torch.optim.AdamW:
    groups = param_groups(model, lr or train_cfg.lr, train_cfg.backbone_lr_mult,
                          train_cfg.weight_decay, train_cfg.layer_decay)
    # The fused kernel updates all tensors of a group at once: ~5x faster than the per-tensor
    # loop on CPU, which matters when the model is small and the step is cheap.
    return torch.optim.AdamW(groups, lr=lr or train_cfg.lr, fused=True)


class OptimizerStep:
    """One optimiser step, the same in the supervised loop (:func:`semivit.trainer.engine.fit`)
    and MAE pre-training: zero the gradients; backward - through a GradScaler when CUDA trains
    in fp16 AMP (``precision`` auto or amp on a CUDA device, where autocast runs fp16); clip the
    gradient norm (unscaled first) when ``grad_clip``; the optimiser's step; the scheduler's.
    ``optimizer`` and ``scheduler`` may be replaced between steps (unfreezing builds new ones);
    the scaler carries over."""

    def __init__(self, optimizer, device, precision: str, grad_clip: float = 0.0, scheduler=None):
        self.optimizer, self.scheduler, self.grad_clip = optimizer, scheduler, grad_clip
        use_scaler = torch.device(device).type == "cuda" and precision in ("auto", "amp")
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None

    def __call__(self, loss: torch.Tensor, model: nn.Module) -> None:
        opt = self.optimizer
        opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if self.grad_clip:
                self.scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)
            self.scaler.step(opt)
            self.scaler.update()
        else:
            loss.backward()
            if self.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)
            opt.step()
        if self.scheduler is not None:
            self.scheduler.step()

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and (state or {}).get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def build_scheduler(optimizer, train_cfg, steps_per_epoch: int, epochs: Optional[int] = None):
    """Cosine from each group's LR down to ``min_lr``, stepped per batch: with
    ``restart_epochs`` CosineAnnealingWarmRestarts whose first cycle lasts that many epochs;
    with ``restart_epochs: None`` one decay over the ``epochs`` (default ``train.epochs``) left
    after the warm-up.  With ``warmup_epochs`` a linear warm-up (torch's LinearLR) comes first."""
    sched = torch.optim.lr_scheduler
    warm = int(round(train_cfg.warmup_epochs * steps_per_epoch))
    if train_cfg.restart_epochs is None:
        total = (epochs or train_cfg.epochs) * steps_per_epoch
        cosine = sched.CosineAnnealingLR(optimizer, T_max=max(1, total - warm), eta_min=train_cfg.min_lr)
    else:
        cosine = sched.CosineAnnealingWarmRestarts(
            optimizer, T_0=max(1, train_cfg.restart_epochs * steps_per_epoch), eta_min=train_cfg.min_lr
        )
    if warm <= 0:
        return cosine
    linear = sched.LinearLR(optimizer, start_factor=1.0 / (warm + 1), end_factor=1.0, total_iters=warm)
    return sched.SequentialLR(optimizer, [linear, cosine], milestones=[warm])
