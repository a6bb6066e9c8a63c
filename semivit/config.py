"""One typed config.  The defaults are the seeds' recipe; presets and overrides go on top.

Resolution order (later wins): defaults -> preset -> ``--config FILE`` -> ``--set key=value``.
Validation is pydantic's (``extra="forbid"`` everywhere, so a typo is an error that names the
key); :func:`resolve` turns every validation problem into one :class:`UserError` line.
"""

from __future__ import annotations

import copy
import platform
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from semivit.errors import UserError


def _registered(value: str, names: list[str]) -> str:
    """Names that live in a registry (threshold rules, retrain and pre-training methods) are
    checked against it, so a new registration is accepted without editing the config."""
    if value not in names:
        raise ValueError(f"choose from {', '.join(names)}")
    return value


def _threshold_rules() -> list[str]:
    from semivit.pseudo.rules import rule_names

    return rule_names()


DEVICES = ("auto", "cpu", "cuda")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class DataConfig(_Section):
    labels_csv: str = "labels.csv"  # relative to DATA; used when present instead of train/<class>/
    truth_file: str = "unlabeled_truth.csv"  # demo data: true labels of unlabeled/, only for scoring
    max_unlabeled: Optional[int] = Field(None, ge=0)  # cap the unlabeled pool (None: all)
    decode_workers: int = Field(0, ge=0)  # 0: one per CPU core


class ModelConfig(_Section):
    name: str = "vit_base_patch16_224.augreg_in21k_ft_in1k"
    img_size: int = Field(224, ge=16, le=1024)
    pretrained: bool = True  # timm hub weights (needs network); offline use `weights`
    weights: Optional[Path] = None  # local checkpoint for the backbone
    kwargs: dict[str, Any] = Field(default_factory=dict)  # passed to timm.create_model
    head_hidden: int = Field(512, ge=1)
    head_dropout: float = Field(0.4, ge=0.0, lt=1.0)
    drop_path: float = Field(0.0, ge=0.0, lt=1.0)
    # Input normalisation (x/255 - mean)/std.  None: what the backbone's weights expect - timm's
    # pretrained config for the model name (0.5/0.5 for the augreg ViTs and EfficientNet-Lite0,
    # so also for the hybrid's Lite0 stem), ImageNet's for a name timm has no config for.
    mean: Optional[tuple[float, float, float]] = None
    std: Optional[tuple[float, float, float]] = None

    @field_validator("weights")
    @classmethod
    def _weights_exist(cls, v: Optional[Path]) -> Optional[Path]:
        if v is not None and not Path(v).expanduser().is_file():
            raise ValueError(f"file not found: {v}")
        return None if v is None else Path(v).expanduser()


class TrainConfig(_Section):
    epochs: int = Field(50, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-4, gt=0)  # head LR; scheduler starts here
    backbone_lr_mult: float = Field(0.1, gt=0, le=1)  # backbone LR = 10% of the head's
    min_lr: float = Field(1e-6, ge=0)
    # CosineAnnealingWarmRestarts T_0 (epochs); None: one cosine decay over the whole run after
    # the warm-up (no restart), as MAE / Semi-ViT schedule it
    restart_epochs: Optional[int] = Field(10, ge=1)
    warmup_epochs: float = Field(0.0, ge=0)  # linear LR warm-up before the cosine schedule
    weight_decay: float = Field(0.01, ge=0)
    # Layer-wise LR decay (BEiT / MAE / Semi-ViT): block i of L trains at lr * decay^(L - i), the
    # head at lr.  It *replaces* backbone_lr_mult (not multiplied by it), as in those papers.
    layer_decay: Optional[float] = Field(None, gt=0, le=1)
    loss: Literal["focal", "ce"] = "focal"
    focal_gamma: float = Field(2.0, ge=0)
    class_balance_beta: Optional[float] = Field(0.9999, ge=0, lt=1)  # None: no class weights
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    sampler: Literal["random", "balanced"] = "random"
    mixup_alpha: float = Field(0.0, ge=0)  # 0 disables
    cutmix_alpha: float = Field(0.0, ge=0)
    mix_prob: float = Field(1.0, ge=0, le=1)
    freeze_epochs: int = Field(0, ge=0)  # head-only warm-up (seed 03)
    freeze_lr: float = Field(1e-3, gt=0)
    early_stopping: bool = True  # False: train the fixed number of epochs (patience unused)
    patience: int = Field(5, ge=1)
    min_delta: float = Field(0.001, ge=0)
    augment: Literal["seed", "light", "none"] = "seed"
    # Frozen-stem models only (the quick preset's hybrid): train on stem features of this many
    # augmented views per image, computed once per run (0: run the stem at every step).
    cache_views: int = Field(0, ge=0)
    precision: Literal["auto", "fp32", "bf16", "amp"] = "auto"  # auto: bf16 CPU, fp16 AMP CUDA
    num_workers: int = Field(0, ge=0)
    # CPU: folds of a stage trained at once, one process and one thread each (auto: one per core
    # this process may use; 1: one fold at a time with every thread).  semivit.trainer.fold_workers
    fold_workers: Any = "auto"

    @field_validator("fold_workers")
    @classmethod
    def _fold_workers(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().lower() == "auto":
            return "auto"
        try:
            n = int(v)
        except (TypeError, ValueError):
            n = 0
        if isinstance(v, bool) or n < 1 or (not isinstance(v, str) and n != v):
            raise ValueError("should be 'auto' or a whole number >= 1")
        return n
    grad_clip: Optional[float] = Field(None, gt=0)


class CVConfig(_Section):
    folds: int = Field(5, ge=2, le=20)


def _train_overrides(v: dict[str, Any]) -> dict[str, Any]:
    """A partial ``train.*`` (one stage's own settings): known keys with valid values."""
    unknown = sorted(set(v) - set(TrainConfig.model_fields))
    if unknown:
        raise ValueError(f"'{unknown[0]}' is not a train.* key")
    if "fold_workers" in v:  # read once for the whole run (semivit.trainer.fold_workers)
        raise ValueError("fold_workers is set for the whole run: use train.fold_workers")
    try:
        TrainConfig.model_validate({**TrainConfig().model_dump(), **v})
    except ValidationError as e:
        first = e.errors()[0]
        raise ValueError(f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None
    return v


class PseudoConfig(_Section):
    threshold: float = Field(0.96, gt=0, le=1)
    # The selection rule, by name (semivit.pseudo.rules' registry).  "global": one threshold for
    # every class (the seed's rule).  "oof": per class, the lowest confidence at which the stage-1
    # out-of-fold predictions of that class reach `target_precision` (with >= `min_support` of
    # them); a class that never does gets none.  "quota": per class its `quota` x pool x labeled
    # prior most confident predictions (CReST/DASO).  "freematch": FreeMatch's self-adaptive class
    # thresholds.  "all": every prediction (soft-target distillation with soft: true).
    threshold_mode: str = "global"  # a rule of semivit.pseudo.rules
    target_precision: float = Field(0.9, gt=0, le=1)
    min_support: int = Field(5, ge=1)
    quota: float = Field(0.5, gt=0, le=1)  # "quota": share of the pool pseudo-labeled
    tta: bool = True
    cluster: bool = True
    purity: float = Field(0.9, gt=0, le=1)
    core_fraction: float = Field(0.1, gt=0, le=1)  # share of a pure cluster taken as its core
    umap_neighbors: int = Field(15, ge=2)
    max_per_class: Optional[int] = Field(None, ge=1)
    soft: bool = False
    # soft targets: "ce" = cross-entropy to the teacher's probabilities (the labeled rows keep
    # train.loss); "same" = train.loss (focal, class weights) on them too
    soft_loss: Literal["ce", "same"] = "ce"
    weight: Literal["confidence", "one"] = "confidence"
    # distribution alignment (ReMixMatch, Berthelot et al. 2020): "prior" rescales the pool's
    # ensemble probabilities class by class so that their mean over the pool equals the labeled
    # class prior (p * prior / mean_pool(p), rows renormalised) before any rule, cluster or soft
    # target sees them - a teacher whose class-balanced loss over-predicts the rare classes hands
    # on calibrated soft targets.  "none": the ensemble's probabilities as they are.
    align: Literal["none", "prior"] = "none"
    # stage 3's batches: the share of each batch drawn from the labeled images (with replacement;
    # the epoch keeps the length of labels + extra samples, so the optimiser steps do not change).
    # None: labeled and extra samples in proportion to their numbers, so with 196 labels and 1,506
    # soft targets a batch holds ~12% labels and the labels are seen ~15 times in 15 epochs, where
    # a supervised model of as many steps sees them ~180 times (FixMatch's separate labeled batch).
    labeled_share: Optional[float] = Field(None, gt=0, lt=1)
    # whose predictions stage 3's fold-k student learns from.  "ensemble": stage 2's (the stage-1
    # ensemble, whose members 2..5 trained on fold k's labels, so the student's validation score on
    # fold k - its epoch choice and its ensemble weight - has seen those labels).  "fold": stage-1
    # fold k's model alone (trained without fold k): the same images, its probabilities (soft), its
    # arg-max (hard) and its confidence (weights); fold k's validation stays unseen.
    teacher: Literal["ensemble", "fold"] = "ensemble"
    # soft targets per what the student sees.  "image": one target per image (stage 2's
    # probabilities: the teacher on the plain image, + its mirror with pseudo.tta) whichever cached augmented view the
    # student trains on.  "view": consistent teaching (Beyer et al. 2022, "Knowledge distillation:
    # a good teacher is patient and consistent"): the teacher ensemble predicts every cached view
    # of every pool image, and the student learns view v's prediction when it trains on view v.
    # Needs ssl.method: pseudo-label, soft targets, teacher: ensemble, align: none and the stem-feature
    # cache (train.cache_views with a frozen-stem hybrid model); a refresh's accepted inbox images
    # are relabeled per view by the same teacher.
    targets: Literal["image", "view"] = "image"
    # where stage 3's fold-k student starts: "backbone" (the pre-trained backbone, as stage 1 did)
    # or "stage1" (stage-1 fold k's best model, then fine-tuned on labels + pseudo-labels - Semi-ViT's
    # semi-supervised fine-tuning starts from the supervised model the same way; ssl.method:
    # ema-teacher always starts from stage 1)
    init: Literal["backbone", "stage1"] = "backbone"
    # stochastic depth of stage 3's students (pseudo-label retraining) when it differs from
    # model.drop_path (None: the same as stage 1) - Noisy Student's noised student: the students
    # learn the teacher's targets through more noise than the teacher had
    drop_path: Optional[float] = Field(None, ge=0.0, lt=1.0)
    # iterated distillation (Noisy Student's rounds): stage 3 runs this many times; round r > 1
    # relabels the unlabeled pool with the ensemble of stage 1 + round r-1's students
    # (RUN/pseudo_round<r>/) and trains new students on it.  The last round's students are
    # RUN/stage3 (the ensemble: stage 1 + them, still 10 models); earlier rounds stay in
    # RUN/stage3_round<r> for the record.  Each round costs one more stage 3.
    rounds: int = Field(1, ge=1, le=10)
    # co-teachers: other finished runs on the same classes (e.g. an EfficientNet-Lite0 fine-tuned
    # end to end: ``ssl train DATA --preset lite0 --stages supervised --out RUN_CNN``)
    # whose stage-1 models join the teacher ensemble that labels the unlabeled pool in stage 2,
    # each on the pool decoded at its own resolution and normalised its own way; every teacher
    # member is weighted by its validation macro F1 among all of them (ensemble.weighting).  A
    # teacher of another architecture makes other mistakes than the ViTs it teaches.  They teach
    # only: the deployed ensemble stays stage 1 + stage 3.  Paths absolute or relative to the
    # working directory; needs ssl.method: pseudo-label with pseudo.teacher: ensemble and
    # pseudo.targets: image.
    extra_teachers: list[str] = Field(default_factory=list)
    # label spreading (semivit.pseudo.propagate): "spread" lets the labels flow from the labeled
    # images through a k-nearest-neighbour graph of the stage-1 members' embeddings of labeled +
    # unlabeled images (scikit-learn's LabelSpreading, `propagate_neighbors`, `propagate_alpha`),
    # and mixes the result with the teacher's probabilities (`propagate_mix`: the teacher's share)
    # before the rule, the cluster cores and the soft targets read them.  Stage 2 only: needs
    # ssl.method: pseudo-label, pseudo.teacher: ensemble, pseudo.targets: image; a refresh's inbox
    # images are labeled by the ensemble alone.  "none": the teacher's probabilities as they are.
    propagate: Literal["none", "spread"] = "none"
    # whose labels spread: "all" (every labeled image: one set of targets for every student) or
    # "fold" (fold k's student learns targets spread from its training folds' labels only, so its
    # own validation labels never reach the pool images it trains on - with "all" a validation
    # image's label flows straight into its neighbours' targets and inflates the validation score
    # that picks the student's epoch and its ensemble weight).  Stage 2's pseudo_labels.csv keeps
    # the "all" targets; the per-fold ones are RUN/pseudo/propagate_folds.npz.  "fold" needs
    # threshold_mode: all, no max_per_class and align: none (which images are taken, and the
    # alignment, are stage 2's, made with every label).
    propagate_labels: Literal["all", "fold"] = "all"
    propagate_neighbors: int = Field(15, ge=1)
    propagate_alpha: float = Field(0.5, gt=0, lt=1)
    propagate_mix: float = Field(0.5, ge=0, le=1)
    # stage 3 (``ssl.method: pseudo-label``) trains with ``train.*`` overridden by these keys,
    # e.g. {epochs: 15, restart_epochs: 15, patience: 5} when stage 1 trains longer than the
    # retraining on labels + pseudo-labels needs (empty: stage 1's ``train.*`` as it is)
    train: dict[str, Any] = Field(default_factory=dict)

    @field_validator("train")
    @classmethod
    def _train_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _train_overrides(v)

    @field_validator("threshold_mode")
    @classmethod
    def _rule(cls, v: str) -> str:
        return _registered(v, _threshold_rules())


class LossConfig(_Section):
    """A loss as :func:`semivit.trainer.losses.build_loss` builds it (the ``train.*`` loss keys)."""

    loss: Literal["focal", "ce"] = "ce"
    focal_gamma: float = Field(2.0, ge=0)
    class_balance_beta: Optional[float] = Field(None, ge=0, lt=1)  # None: no class weights
    label_smoothing: float = Field(0.1, ge=0, lt=1)


# The EMA-Teacher stage's training, where it differs from seed 01's stage 1 (``train.*``): Semi-ViT
# (seed 05) Appendix, Table 13 "Semi-supervised fine-tuning settings", column "10% labels" (the
# self-pretrained ViT-S/B setting closest to ours: a pretrained ViT fine-tuned on a few labels).
SEMI_VIT_TRAIN: dict[str, Any] = {
    "epochs": 100,  # Table 13: training epochs 100 (S/B/L); fixed, no early stopping
    "early_stopping": False,
    "warmup_epochs": 5,  # Table 13: warmup epochs 5
    "restart_epochs": None,  # Table 13: cosine decay (one decay, no restarts)
    "weight_decay": 0.05,  # Table 13 and section 4: AdamW, weight decay 0.05
    "layer_decay": 0.75,  # Table 13: layer-wise lr decay 0.75 (replaces backbone_lr_mult)
    # Table 13: base learning rate 1e-3 (B), scaled by the appendix's linear rule
    # lr = base_lr x batchsize_l / 256 with seed 01's labeled batch of 8
    "lr": 1e-3 * 8 / 256,
    # Section 2.3: L_l is the standard cross-entropy; Table 13: label smoothing 0.1,
    # mixup 0.8, cutmix 1.0 (timm's Mixup, "as the implementation of [69]", section 4)
    "loss": "ce",
    "class_balance_beta": None,
    "label_smoothing": 0.1,
    "mixup_alpha": 0.8,
    "cutmix_alpha": 1.0,
    "mix_prob": 1.0,
}


class EMAConfig(_Section):
    """What ``ssl.method: ema-teacher`` trains stage 3 with (docs/ema_mae.md lists every
    deviation from the paper).  ``train`` overrides ``train.*`` keys for that stage only; the
    other ``train.*`` keys (batch size, precision, augment, ...) are stage 1's."""

    train: dict[str, Any] = Field(default_factory=lambda: dict(SEMI_VIT_TRAIN))
    # Equation (2): L_u = 1/N_u sum_i [o_i >= tau] CE(x_i^s, y_i) over all N_u unlabeled images,
    # with Table 13's label smoothing 0.1; no class weights (the paper has none)
    unlabeled_loss: LossConfig = Field(default_factory=LossConfig)

    @field_validator("train")
    @classmethod
    def _train_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _train_overrides(v)


class SSLConfig(_Section):
    method: str = "pseudo-label"  # a stage-3 strategy of semivit.trainer.methods
    # EMA momentum decay m of equation (1): 0.999, the appendix's "Settings on Other Datasets"
    # value for datasets smaller than ImageNet (ImageNet: 0.9999)
    ema_momentum: float = Field(0.999, gt=0, lt=1)
    threshold: float = Field(0.5, gt=0, le=1)  # confidence threshold tau: Table 13, 0.5 (S/B)
    # "global": `threshold` for every class (the paper).  "oof": per class, calibrated like
    # pseudo.threshold_mode=oof (pseudo.target_precision, pseudo.min_support) on the stage-1
    # out-of-fold predictions of the other folds.  (Any rule of semivit.pseudo.rules.)
    threshold_mode: str = "global"
    unlabeled_weight: float = Field(5.0, ge=0)  # mu: section 4, 5
    unlabeled_ratio: int = Field(5, ge=1)  # N_u = ratio * N_l per batch: section 4, 5
    prob_mixup: bool = True  # section 3.3
    mixup_alpha: float = Field(0.8, ge=0)  # Table 13: mixup 0.8 (on the unlabeled side too, section 3)
    cutmix_alpha: float = Field(1.0, ge=0)  # Table 13: cutmix 1.0
    epochs: Optional[int] = Field(None, ge=1)  # shorthand that wins over ssl.ema.train.epochs
    # Appendix "Data Augmentation": weak = RandomResizedCrop + flip + ColorJitter(0.4); strong =
    # the labeled data's augmentations (here seed 01's list)
    weak_augment: str = "semi-vit-weak"  # teacher's view (transforms registry)
    strong_augment: str = "seed"  # student's view
    ema: EMAConfig = Field(default_factory=EMAConfig)

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        from semivit.trainer.methods import retrain_names

        return _registered(v, retrain_names())

    @field_validator("threshold_mode")
    @classmethod
    def _rule(cls, v: str) -> str:
        return _registered(v, _threshold_rules())


class PretrainConfig(_Section):
    method: str = "none"  # "none" or a pre-training method of semivit.trainer.methods

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        from semivit.trainer.methods import pretrain_names

        return _registered(v, pretrain_names())

    epochs: int = Field(100, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1.5e-4, gt=0)
    mask_ratio: float = Field(0.75, gt=0, lt=1)
    decoder_dim: int = Field(128, ge=8)
    decoder_depth: int = Field(2, ge=1)
    norm_pix_loss: bool = True
    weight_decay: float = Field(0.05, ge=0)  # MAE's
    mask_input: bool = True  # CNN-stem (hybrid) ViTs: zero the masked cells' pixels before the stem
    freeze_stem: bool = True  # keep a pretrained CNN stem (weights and BN statistics) fixed in MAE


class EnsembleConfig(_Section):
    weighting: Literal["f1", "equal"] = "f1"
    # The unlabeled pool at PREDICTION time (semivit.models.pool_graph): "pool" - after training,
    # labels spread (scikit-learn's LabelSpreading, `graph_neighbors`, `graph_alpha`) over a
    # k-nearest-neighbour graph of the labeled images + the unlabeled pool in the stage-1 members'
    # joint embedding (RUN/graph.npz, the stage "graph"); a new image takes the mean spread
    # distribution of its `graph_neighbors` nearest nodes, mixed with the ensemble's
    # probabilities (`graph_share`: the ensemble's weight).  Inside the exported graph too.
    graph: Literal["none", "pool"] = "none"
    graph_neighbors: int = Field(7, ge=1)
    graph_alpha: float = Field(0.8, gt=0, lt=1)
    graph_share: float = Field(0.5, ge=0, le=1)


class Config(_Section):
    preset: str = "seed"
    seed: int = 0
    device: Literal[DEVICES] = "auto"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    cv: CVConfig = Field(default_factory=CVConfig)
    pseudo: PseudoConfig = Field(default_factory=PseudoConfig)
    ssl: SSLConfig = Field(default_factory=SSLConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    ensemble: EnsembleConfig = Field(default_factory=EnsembleConfig)


# Presets: partial dicts applied on top of the defaults (the defaults *are* the seed recipe).
PRESETS: dict[str, dict[str, Any]] = {
    "seed": {},
    "quick": {
        "model": {
            "name": "vit_hybrid_lite0",  # frozen ImageNet EfficientNet-Lite0 stem + 4-block ViT
            "img_size": 128,
            "pretrained": True,
            "head_hidden": 256,
            "drop_path": 0.1,
        },
        "train": {
            # stage 1: 40 epochs, one cosine decay, no early stop (the best epoch on the fold's
            # validation images is kept), chosen on the dev split over the old 15 epochs with
            # early stopping: the default ssl train's dev macro F1 +0.03 over 5 seeds
            # (benchmarks/results/stage1_epochs_dev.md); stage 3 keeps 15 (pseudo.train below)
            "epochs": 40,
            "batch_size": 32,
            "lr": 1e-3,  # the ViT part starts from scratch: 1e-4 barely moves it in ~150 steps
            "restart_epochs": 40,
            "patience": 40,
            "warmup_epochs": 1,
            "augment": "light",
            "cache_views": 8,
            "precision": "auto",
        },
        # Ensemble distillation, chosen on the dev split (README Results, "How the distillation
        # default was chosen"): the stage-1 ensemble's probabilities on EVERY unlabeled image are
        # soft targets (cross-entropy, weight one) for the noised stage-3 students.  Per-class
        # thresholds (oof) and per-class quotas scored lower on dev; no cluster cores needed.
        # labeled_share 0.75: three quarters of every stage-3 batch are labeled images (best mean
        # dev macro F1 of 0.75, 0.5 and proportional, benchmarks/results/label_efficiency.md).
        "pseudo": {"threshold_mode": "all", "soft": True, "weight": "one", "cluster": False,
                   "max_per_class": None, "target_precision": 0.9, "labeled_share": 0.75,
                   "train": {"epochs": 15, "restart_epochs": 15, "patience": 5}},
        # MAE: lr is absolute (not MAE's base-lr x batch/256 rule), 1e-3 measured on ELPV
        "pretrain": {"epochs": 10, "batch_size": 64, "lr": 1e-3},
        # EMA-Teacher, CPU-sized (the rest is the paper's, docs/ema_mae.md): 3 epochs over the
        # unlabeled pool (~72 steps) instead of 100, warm-up 5% of them as the paper's 5 of 100,
        # and stage 1's lr (the paper's scaled 1.25e-4 is close to the 1e-4 that barely moves the
        # from-scratch ViT part, see train.lr above); m = 0.97 keeps the EMA horizon 1/(1-m) ~ 40%
        # of the run (0.999 would leave the teacher ~93% stage 1); N_u = 2 N_l (5 N_l: 2.5x the
        # unlabeled images, each a teacher and a student pass on pixels, per step)
        "ssl": {"ema_momentum": 0.97, "unlabeled_ratio": 2,
                "ema": {"train": {"epochs": 3, "warmup_epochs": 0.15, "lr": 1e-3}}},
        # The pool graph at prediction time, its setting chosen on the dev split among 36 (k 7/15/30,
        # alpha 0.2/0.5/0.8, the ensemble's share 0/0.25/0.5/0.75) for the default ensemble: dev
        # macro F1 0.4890 vs 0.4787 without it, 5 seeds (benchmarks/results/graph_predict.md)
        "ensemble": {"graph": "pool", "graph_neighbors": 7, "graph_alpha": 0.8, "graph_share": 0.5},
    },
    "tiny": {
        "model": {
            "name": "vit_tiny_patch16_224",
            "img_size": 32,
            "pretrained": False,
            "kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2},
            "head_hidden": 16,
        },
        # fp32: for a model this small bf16 autocast costs more in casts than it saves
        "train": {"epochs": 2, "batch_size": 16, "lr": 1e-3, "augment": "light", "patience": 2,
                  "precision": "fp32"},
        "cv": {"folds": 2},
        "pseudo": {"threshold": 0.3, "umap_neighbors": 5},
        "pretrain": {"epochs": 1, "batch_size": 16, "decoder_dim": 16, "decoder_depth": 1},
        "ssl": {"ema_momentum": 0.99, "unlabeled_ratio": 1, "threshold": 0.3,
                "ema": {"train": {"epochs": 2, "warmup_epochs": 0, "lr": 1e-3}}},
    },
}
DEFAULT_PRESET = "quick"


def _lite0_preset() -> dict[str, Any]:
    """``lite0``: the competent CNN baseline of benchmarks/label_efficiency.py, arm (f): the
    quick preset with ImageNet EfficientNet-Lite0 fine-tuned end to end instead of the hybrid
    ViT - 192 px, the [-1, 1] input normalisation its TF-ported weights expect, one learning rate
    for the whole network (1e-3) and 40 epochs, both chosen on validation folds of the labeled
    pool (ELPV, 10% labels; benchmarks/results/label_efficiency_f_lite0.json, lite0_lr).  Train
    it with ``--stages supervised`` as a co-teacher (pseudo.extra_teachers) or as a baseline."""
    return _deep_merge(PRESETS["quick"], {
        "model": {"name": "tf_efficientnet_lite0", "kwargs": {}, "pretrained": True, "img_size": 192,
                  "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
        "train": {"cache_views": 0, "lr": 1e-3, "backbone_lr_mult": 1.0, "epochs": 40, "restart_epochs": 40,
                  "early_stopping": False, "warmup_epochs": 1, "augment": "light", "batch_size": 32},
        # a plain fine-tune: the baseline gets no unlabeled image (and no setting was chosen for it)
        "ensemble": {"graph": "none"}})


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "kwargs":
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<root>"
    if first["type"] == "extra_forbidden":
        return f"unknown config key '{key}' ({source})"
    msg = first["msg"].removeprefix("Value error, ")
    given = first.get("input")
    shown = "" if isinstance(given, (dict, list)) else f" (got {given!r})"
    return f"bad value for '{key}': {msg}{shown} ({source})"


PRESETS["lite0"] = _lite0_preset()


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], parsed value).  Values are parsed as YAML scalars/lists."""
    if "=" not in item:
        raise UserError(f"--set expects KEY=VALUE, got '{item}'")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"--set has an empty key in '{item}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set_path(d: dict, path: list[str], value: Any, source: str) -> None:
    cur = d
    for i, part in enumerate(path[:-1]):
        nxt = cur.get(part)
        if nxt is None:
            nxt = cur[part] = {}
        if not isinstance(nxt, dict):
            raise UserError(f"unknown config key '{'.'.join(path)}' ({source})")
        cur = nxt
    cur[path[-1]] = value


def load_yaml(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of keys")
    # A RUN/config.yaml holds {config: ..., versions: ..., seed: ...}: take the config part.
    if "config" in data and isinstance(data["config"], dict):
        data = data["config"]
    return data


def resolve(
    preset: Optional[str] = None,
    config_file: Optional[Path] = None,
    overrides: Optional[list[str]] = None,
    **explicit: Any,
) -> Config:
    """Build the config: defaults -> preset -> file -> ``--set`` -> explicit CLI options."""
    file_data = load_yaml(config_file) if config_file else {}
    name = preset or file_data.get("preset") or DEFAULT_PRESET
    if name not in PRESETS:
        raise UserError(f"unknown preset '{name}' (choose from {', '.join(PRESETS)})")
    merged = _deep_merge(Config().model_dump(mode="python"), PRESETS[name])
    merged["preset"] = name
    source = f"preset {name}"
    try:
        Config.model_validate(merged)
    except ValidationError as e:  # a broken preset is a bug, but say where
        raise UserError(_format_error(e, source)) from None
    if file_data:
        file_data = {k: v for k, v in file_data.items() if k != "preset"}
        merged = _deep_merge(merged, file_data)
        source = f"config file {config_file}"
        _validate(merged, source)
    for item in overrides or []:
        path, value = parse_override(item)
        _set_path(merged, path, value, f"--set {item}")
        _validate(merged, f"--set {item}")
    for key, value in explicit.items():
        if value is not None:
            _set_path(merged, key.split("."), value, f"option {key}")
    return _validate(merged, "command-line options")


def ssl_train_config(cfg: Config) -> TrainConfig:
    """``train.*`` with the EMA-Teacher stage's ``ssl.ema.train`` overrides on top."""
    return TrainConfig.model_validate({**cfg.train.model_dump(), **cfg.ssl.ema.train})


def retrain_train_config(cfg: Config) -> TrainConfig:
    """``train.*`` with the pseudo-label retraining's ``pseudo.train`` overrides on top."""
    return TrainConfig.model_validate({**cfg.train.model_dump(), **cfg.pseudo.train})


def _validate(d: dict, source: str) -> Config:
    try:
        return Config.model_validate(d)
    except ValidationError as e:
        raise UserError(_format_error(e, source)) from None


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("semivit", "torch", "timm", "onnx", "onnxruntime", "albumentations",
                "umap-learn", "scikit-learn", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def save(cfg: Config, path: Path, extra: Optional[dict] = None) -> None:
    """Write the resolved config with the package versions and the seed (RUN/config.yaml)."""
    from semivit.utils import atomic_write_text

    from semivit.kinds import RUN_FORMAT

    doc = {
        "format": RUN_FORMAT,  # what makes RUN a semivit run (semivit.kinds), not the file name
        "config": cfg.model_dump(mode="json"),
        "seed": cfg.seed,
        **(extra or {}),
        "versions": package_versions(),
        "machine": {"platform": platform.platform(), "processor": platform.machine()},
    }
    atomic_write_text(Path(path), yaml.safe_dump(doc, sort_keys=False))


def load(path: Path) -> Config:
    return _validate(load_yaml(path), f"config file {path}")


def saved_run_config(saved: dict, path: Path) -> Config:
    """The Config of a RUN/config.yaml already recognised by semivit.kinds.read_run_yaml."""
    try:
        return Config.model_validate(saved["config"])
    except ValidationError as e:  # a damaged config, or one from a newer semivit
        raise UserError(f"{path}: the saved run config does not load ({' '.join(str(e).split())[:200]})") from None


def load_run_config(run_dir: Path) -> tuple[Config, Path]:
    from semivit.kinds import read_run_yaml

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a semivit run (no config.yaml)")
    saved = read_run_yaml(run_dir)
    return saved_run_config(saved, path), Path(saved.get("data", "."))
