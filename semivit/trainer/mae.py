"""Stage 0: masked-autoencoder (MAE, He et al. 2022) pre-training of the ViT backbone on all
images - labeled and unlabeled, never DATA/test/ - as seed 05's pipeline starts.

- Random masking per sample: exactly ``round(L * (1 - mask_ratio))`` of the L patch tokens are
  kept (``pretrain.mask_ratio`` 0.75); the encoder (the backbone itself: its patch_embed, prefix
  tokens, pos_embed, blocks, norm) sees only those; a light decoder (``decoder_dim``,
  ``decoder_depth``, fixed 2-D sin-cos positions, a shared mask token) predicts the pixels of
  every patch; the loss is the mean squared error over the *masked* patches only, on per-patch
  normalised pixels when ``norm_pix_loss``.
- CNN-stem ViTs (the quick preset's ``vit_hybrid_lite0``: timm HybridEmbed over the
  EfficientNet-Lite0 stem at stride 16): a "patch" is a 16x16 pixel cell of the stride-16 map.
  Dropping tokens after the stem alone would leak - the CNN's receptive field spans the masked
  cells - so with ``pretrain.mask_input`` (default) the masked cells' pixels are also set to zero
  (the mean colour after normalisation) before the stem.  ``pretrain.freeze_stem`` keeps a
  pretrained stem (weights and BatchNorm statistics) fixed: MAE trains the transformer on it.
- Writes RUN/pretrain/encoder.pt (the backbone's state dict, loadable with ``model.weights``),
  loss.csv and loss.png; RUN/pretrain/last.pt after every epoch, from which a rerun resumes.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from torch.utils.data import DataLoader

from semivit.data import transforms
from semivit.data.dataset import ArrayDataset, Preprocess
from semivit.errors import UserError
from semivit.progress import progress_bar
from semivit.trainer.infer import autocast
from semivit.trainer.optim import OptimizerStep
from semivit.utils import atomic_path, atomic_write_csv, info, seed_everything

ENCODER_FORMAT = "semivit-encoder/1"


def num_kept(num_patches: int, mask_ratio: float) -> int:
    return max(1, min(num_patches, int(round(num_patches * (1.0 - mask_ratio)))))


def random_masking(batch: int, num_patches: int, mask_ratio: float, generator=None, device=None):
    """Per-sample random masking.  Returns (ids_keep (B, K), ids_restore (B, L), mask (B, L) with
    1 = masked), K = :func:`num_kept`."""
    noise = torch.rand(batch, num_patches, generator=generator).to(device)
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    keep = num_kept(num_patches, mask_ratio)
    mask = torch.ones(batch, num_patches, device=device)
    mask[:, :keep] = 0
    return ids_shuffle[:, :keep], ids_restore, torch.gather(mask, 1, ids_restore)


def _heads(dim: int) -> int:
    h = max(1, dim // 32)
    while dim % h:
        h -= 1
    return h


class MAE(nn.Module):
    """A timm :class:`VisionTransformer` encoder + a light MAE decoder."""

    def __init__(self, encoder: nn.Module, img_size: int, decoder_dim: int = 128, decoder_depth: int = 2,
                 norm_pix_loss: bool = True, mask_input: bool = True):
        super().__init__()
        if not isinstance(encoder, VisionTransformer) or not hasattr(encoder, "patch_embed"):
            raise UserError(f"MAE pre-training needs a ViT backbone (patch_embed, pos_embed, blocks); "
                            f"{type(encoder).__name__} is not one")
        self.encoder = encoder
        self.grid = tuple(int(g) for g in encoder.patch_embed.grid_size)
        if img_size % self.grid[0] or img_size % self.grid[1]:
            raise UserError(f"MAE: image size {img_size} is not a multiple of the token grid {self.grid}")
        self.patch = img_size // self.grid[0]
        self.num_patches = self.grid[0] * self.grid[1]
        self.conv_stem = hasattr(encoder.patch_embed, "backbone")  # timm HybridEmbed
        self.mask_input = mask_input
        self.norm_pix_loss = norm_pix_loss
        dim = encoder.embed_dim
        self.decoder_embed = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, decoder_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("decoder_pos", build_sincos2d_pos_embed(list(self.grid), decoder_dim).unsqueeze(0))
        self.decoder_blocks = nn.Sequential(*[Block(decoder_dim, _heads(decoder_dim), mlp_ratio=4.0, qkv_bias=True)
                                              for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch * self.patch * 3)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in [self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred]:
            m.apply(_init_weights)

    # -- pixels <-> patches
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, L, p*p*3), patches in row-major token order."""
        b, c, p = imgs.shape[0], imgs.shape[1], self.patch
        gh, gw = self.grid
        x = imgs.reshape(b, c, gh, p, gw, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(b, gh * gw, p * p * c)

    def pixel_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, L) token mask -> (B, 1, H, W) pixel mask (1 = masked)."""
        b = mask.shape[0]
        m = mask.reshape(b, 1, *self.grid)
        return m.repeat_interleave(self.patch, dim=2).repeat_interleave(self.patch, dim=3)

    # -- encoder / decoder
    def forward_encoder(self, x: torch.Tensor, ids_keep: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        if self.conv_stem and self.mask_input:
            x = x * (1.0 - self.pixel_mask(mask).to(x.dtype))
        t = enc.patch_embed(x)
        b, d = t.shape[0], t.shape[-1]
        t = t.reshape(b, -1, d)
        npre = enc.num_prefix_tokens
        prefix = [tok.expand(b, -1, -1) for tok in (enc.cls_token, enc.reg_token) if tok is not None]
        if enc.pos_embed is not None:
            if enc.no_embed_class:
                t = t + enc.pos_embed
            else:
                t = t + enc.pos_embed[:, npre:]
                if prefix:
                    prefix = [torch.cat(prefix, dim=1) + enc.pos_embed[:, :npre]]
        t = torch.gather(t, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
        if prefix:
            t = torch.cat(prefix + [t], dim=1)
        t = enc.norm_pre(enc.pos_drop(t))
        t = enc.norm(enc.blocks(t))
        return t[:, npre:]

    def forward_decoder(self, visible: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        y = self.decoder_embed(visible)
        b, k, d = y.shape
        y = torch.cat([y, self.mask_token.to(y.dtype).expand(b, self.num_patches - k, -1)], dim=1)
        y = torch.gather(y, 1, ids_restore.unsqueeze(-1).expand(-1, -1, d))
        y = self.decoder_norm(self.decoder_blocks(y + self.decoder_pos))
        return self.decoder_pred(y)

    def loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the masked patches only (1 in ``mask``)."""
        target = self.patchify(imgs.float())
        if self.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        per_patch = ((pred.float() - target) ** 2).mean(-1)
        return (per_patch * mask).sum() / mask.sum().clamp_min(1)

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, generator=None):
        ids_keep, ids_restore, mask = random_masking(len(imgs), self.num_patches, mask_ratio, generator, imgs.device)
        pred = self.forward_decoder(self.forward_encoder(imgs, ids_keep, mask), ids_restore)
        return self.loss(imgs, pred, mask), pred, mask


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------- training
def _optimizer(mae: MAE, lr: float, weight_decay: float) -> torch.optim.AdamW:
    skip = {f"encoder.{n}" for n in getattr(mae.encoder, "no_weight_decay", lambda: set())()} | {"mask_token"}
    decay, no_decay = [], []
    for n, p in mae.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or n in skip else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95), fused=True)


def lr_at(step: int, total: int, base: float, warmup_frac: float = 0.05) -> float:
    """Linear warm-up over the first 5% of steps (MAE: 40 of 800 epochs), then cosine to 0."""
    warm = max(1, int(total * warmup_frac))
    if step < warm:
        return base * (step + 1) / warm
    return base * 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def _freeze_stem(mae: MAE) -> None:
    stem = mae.encoder.patch_embed.backbone
    for p in stem.parameters():
        p.requires_grad_(False)
    stem.eval()


def run_mae(run) -> Path:
    """MAE on run.images + the unlabeled images; writes RUN/pretrain/{encoder.pt,loss.csv,loss.png}."""
    from semivit.models.networks import create_backbone, normalization

    cfg, pcfg = run.cfg, run.cfg.pretrain
    out = run.stage_dir("pretrain")
    images = run.images
    if len(run.unlabeled[1]):
        images = np.concatenate([images, run.unlabeled[1]])
    seed_everything(cfg.seed * 1000 + 900)
    device = run.device
    backbone = create_backbone(cfg.model, cfg.model.pretrained)
    mae = MAE(backbone, cfg.model.img_size, pcfg.decoder_dim, pcfg.decoder_depth, pcfg.norm_pix_loss,
              pcfg.mask_input).to(device)
    stem_pretrained = cfg.model.pretrained or cfg.model.weights is not None
    frozen = mae.conv_stem and pcfg.freeze_stem and stem_pretrained
    if frozen:
        _freeze_stem(mae)
    opt = _optimizer(mae, pcfg.lr, pcfg.weight_decay)
    optimizer_step = OptimizerStep(opt, device, cfg.train.precision)  # the schedule is lr_at(), set per step
    bs = min(pcfg.batch_size, len(images))
    steps = len(images) // bs
    total = steps * pcfg.epochs
    history, start = [], 0
    last = out / "last.pt"
    if last.is_file():
        ck = torch.load(last, map_location="cpu", weights_only=False)
        mae.load_state_dict(ck["mae"])
        opt.load_state_dict(ck["optimizer"])
        optimizer_step.load_state_dict(ck.get("step"))
        history, start = ck["history"], ck["epoch"]
        info(f"pretrain: resuming MAE after epoch {start}/{pcfg.epochs}")
    info(f"pretrain: MAE on {len(images)} images ({len(run.images)} labeled + {len(images) - len(run.images)} "
         f"unlabeled), {mae.num_patches} patches of {mae.patch}px, mask ratio {pcfg.mask_ratio}"
         + (", CNN stem frozen" if frozen else ""))
    pre = Preprocess(*normalization(cfg.model)).to(device)
    with progress_bar() as bar:
        task = bar.add_task("pretrain (MAE)", total=total, completed=start * steps, status="")
        for epoch in range(start, pcfg.epochs):
            t0 = time.time()
            mae.train()
            if frozen:
                mae.encoder.patch_embed.backbone.eval()
            g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)  # per epoch: resume-reproducible
            # the augmentation seeded per epoch too (unseeded, albumentations draws from the OS)
            ds = ArrayDataset(images, transform=transforms.build("weak", cfg.model.img_size, seed=cfg.seed * 1000 + 900 + epoch))
            loader = DataLoader(ds, batch_size=bs, shuffle=True, drop_last=True, generator=g,
                                num_workers=cfg.train.num_workers)
            total_loss = 0.0
            for i, (x, _, _, _) in enumerate(loader):
                lr = lr_at(epoch * steps + i, total, pcfg.lr)
                for group in opt.param_groups:
                    group["lr"] = lr
                x = pre(x.to(device, non_blocking=True))
                with autocast(device, cfg.train.precision):
                    loss, _, _ = mae(x, pcfg.mask_ratio, generator=g)
                optimizer_step(loss, mae)
                total_loss += float(loss.detach())
                bar.update(task, advance=1, status=f"loss {total_loss / (i + 1):.4f}")
            history.append({"epoch": epoch + 1, "loss": round(total_loss / max(steps, 1), 6), "lr": lr,
                            "seconds": round(time.time() - t0, 2)})
            atomic_write_csv(out / "loss.csv", history)
            with atomic_path(last) as tmp:
                torch.save({"mae": mae.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                            "history": history, "step": optimizer_step.state_dict()}, tmp)
    enc = out / "encoder.pt"
    with atomic_path(enc) as tmp:
        torch.save({"state_dict": {k: v.detach().cpu() for k, v in mae.encoder.state_dict().items()},
                    "format": ENCODER_FORMAT, "model_name": cfg.model.name, "img_size": cfg.model.img_size,
                    "epochs": pcfg.epochs, "mask_ratio": pcfg.mask_ratio}, tmp)
    _plot(history, out / "loss.png")
    info(f"pretrain: encoder saved to {enc} (final reconstruction loss {history[-1]['loss']:.4f}); "
         f"reuse it with --set model.weights={enc}")
    return enc


def _plot(history: list[dict], path: Path) -> None:
    from semivit.trainer.report import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.plot([r["epoch"] for r in history], [r["loss"] for r in history], marker=".")
    ax.set_xlabel("epoch")
    ax.set_ylabel("masked-patch MSE")
    ax.set_title("MAE pre-training: reconstruction loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
