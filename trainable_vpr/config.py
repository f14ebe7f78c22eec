"""The training configuration (stored in every checkpoint) and its checks."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from vprkit.cli import VPRError
from vprkit.features import (
    ExtractionSettings,
    validate_extraction_flags,
)
from vprkit.places import is_parquet
from vprkit.settings import check_choices, registered
from vprkit.settings import flag as _flag
from vprkit.tensorboard_log import require_tensorboard

from trainable_vpr.backbones import BACKBONES, _spec_for
from trainable_vpr.heads import HEADS
from trainable_vpr.losses import LOSS_DISTANCES

SUPERVISIONS = ("auto", "gps", "labels")


HEAD_STARTS = ("auto", "raw", "pca_whitened", "learned_whitened")


NEG_SAMPLERS = ("hard", "random", "ucb")


@registered
@dataclass
class TrainConfig(ExtractionSettings):
    """Every training setting, in one place: argparse flags are generated from it (the shared image and
    extraction flags come from ExtractionSettings), and every checkpoint stores it."""

    # data
    train_csv: str = _flag(None, "poses CSV, benchmark folder (vprkit.benchmarks) or embeddings parquet of the training images (also the validation database)",
                           "data", required=True, aliases=("--train_parquet",))
    val_csv: str = _flag(None, "poses CSV, benchmark folder (vprkit.benchmarks) or embeddings parquet of the validation queries (chooses the best epoch)",
                         "data", required=True, aliases=("--val_parquet",))
    val_db_csv: str | None = _flag(None, "poses CSV, benchmark folder or embeddings parquet of the validation database "
                                   "the val queries are searched in (default: --train_csv); e.g. the day map for night "
                                   "val queries, so validation measures the user's task", "data",
                                   aliases=("--val_db_parquet",))
    supervision: str = _flag("auto", "which images show the same place: gps (positions), labels (place_id/building_id/"
                             "label, gated by positions when present) or auto (labels when every table has them)",
                             "data", choices=SUPERVISIONS)
    # model
    model: str = _flag("dinov2_b", f"backbone: {', '.join(BACKBONES)} or timm:ARCH", "model")
    head: str = _flag("residual", "residual (starts as PCA-whitening, learns a correction), projection (the seed head) "
                      "or mlp (Linear-LayerNorm-GELU-Linear with a skip connection)", "model", choices=tuple(HEADS))
    projection_dim: int = _flag(256, "output descriptor dimension", "model", aliases=("--output_dim",))
    head_start: str = _flag("auto", "residual head: its linear map starts as raw (the identity: the raw descriptor "
                            "at its own dimension), pca_whitened (PCA-whitening of the training features, "
                            "--projection_dim), learned_whitened (whitening learned from the training set's positive "
                            "pairs, shrinkage chosen on val R@1, --projection_dim) or auto (the best of them on val "
                            "R@1); the untrained head is exactly that frozen descriptor", "model",
                            choices=HEAD_STARTS)
    hidden_dim: int = _flag(512, "hidden width of the residual and mlp heads", "model")
    dropout: float = _flag(0.1, "dropout in the head", "model")
    use_residual: bool = _flag(True, "mlp head: add a skip connection from the input", "model")
    use_layer_norm: bool = _flag(True, "mlp head: LayerNorm after the hidden layer", "model")
    # training
    epochs: int = _flag(15, "training epochs")
    lr: float = _flag(1e-4, "AdamW learning rate")
    batch_size: int = _flag(32, "images per batch (training and extraction)")  # in [training], unlike extraction's
    images_per_place: int = _flag(4, "images of each place in a training batch")
    weight_decay: float = _flag(1e-4, "AdamW weight decay")
    seed: int = _flag(42, "random seed (same seed, same machine: same losses)")
    pos_threshold_m: float = _flag(25.0, "positives: images within this many metres")
    neg_threshold_m: float = _flag(100.0, "negatives: images beyond this many metres (between: ignored)")
    triplet_margin: float = _flag(0.5, "triplet loss margin")
    contrastive_temperature: float = _flag(0.07, "InfoNCE temperature")
    triplet_weight: float = _flag(0.3, "weight of the triplet loss")
    contrastive_weight: float = _flag(1.0, "weight of the multi-positive InfoNCE loss")
    hard_neg_ratio: float = _flag(0.5, "share of hard negatives (far in metres, near in embedding space)")
    positive_selection: str = _flag("gps", "gps: every image within pos_threshold_m is a positive; feature: only "
                                    "the positive_top_k GPS positives most similar in frozen features (NetVLAD style)",
                                    choices=("gps", "feature"))
    positive_top_k: int = _flag(2, "with --positive_selection feature: positives kept per anchor in a batch")
    lr_schedule: str = _flag("constant", "constant or cosine (decay to 0 over the run)", choices=("constant", "cosine"))
    early_stopping_patience: int = _flag(0, "stop after this many validations without a better R@1 (0: never)")
    loss_distance: str = _flag("euclidean", "triplet distance on normalised embeddings: euclidean or cosine (1 - cos)",
                               choices=LOSS_DISTANCES)
    neg_sampler: str = _flag("hard", "triplet negatives: hard (hard_neg_ratio of them the hardest, the rest random), "
                             "random, or ucb (a UCB1 bandit picks the difficulty band per draw)",
                             choices=NEG_SAMPLERS)
    ucb_bands: int = _flag(3, "ucb: difficulty bands of similarity rank (ignored with --difficulty_parquet)")
    ucb_exploration_constant: float = _flag(2.0, "ucb: c in mean + sqrt(c ln N / n)")
    ucb_warmup_samples: int = _flag(1000, "ucb: draws spread round-robin over the bands before UCB1 decides")
    difficulty_parquet: str | None = _flag(None, "ucb: external bands, a parquet of image_id, neighbor_building_ids, "
                                           "neighbor_bands (needs place labels)", "data")
    validate_every_n_epochs: int = _flag(1, "validate (and maybe save the best checkpoint) every N epochs and after the last")
    save_every_n_epochs: int = _flag(1, "write the resumable _last checkpoint every N epochs")
    resume: str | None = _flag(None, "continue the run of this _last (or _final) checkpoint: head, optimizer, scheduler, "
                               "random states, best metrics and patience are restored, the log is continued", "system")
    # system and outputs
    log_dir: str = _flag("logs", "folder of run logs and training_summary.csv", "system")
    output_dir: str = _flag("trained_models", "folder of checkpoints", "system")
    tensorboard: bool = _flag(False, "also write TensorBoard scalars (loss parts, val R@N, learning rate per epoch; "
                              "flags and best val R@1 as hparams) under LOG_DIR/tensorboard/RUN_ID (needs the "
                              "tensorboard package)", "system")


def validate_train_config(config: TrainConfig) -> None:
    """Flag combinations that cannot train, caught before any work is done."""
    validate_extraction_flags(config)
    if config.tensorboard:
        require_tensorboard()  # before anything is written
    check_choices(config)  # a config built in code (run_experiment, tune_vpr, tests) is checked like parsed flags
    if config.epochs <= 0:
        raise VPRError(f"--epochs {config.epochs}: must be at least 1")
    if config.batch_size < 4:
        raise VPRError(f"--batch_size {config.batch_size}: a batch needs at least 4 images (two places of two images)")
    if config.images_per_place < 2 or config.images_per_place > config.batch_size // 2:
        raise VPRError(f"--images_per_place {config.images_per_place}: must be between 2 and batch_size / 2 ({config.batch_size // 2})")
    if config.pos_threshold_m <= 0 or config.pos_threshold_m >= config.neg_threshold_m:
        raise VPRError(f"--pos_threshold_m {config.pos_threshold_m:g} must be > 0 and below --neg_threshold_m {config.neg_threshold_m:g}")
    if config.lr <= 0:
        raise VPRError(f"--lr {config.lr:g}: must be positive")
    if not 0.0 <= config.hard_neg_ratio <= 1.0:
        raise VPRError(f"--hard_neg_ratio {config.hard_neg_ratio:g}: must be between 0 and 1")
    if not 0.0 <= config.dropout < 1.0:
        raise VPRError(f"--dropout {config.dropout:g}: must be in [0, 1)")
    if config.positive_top_k < 1:
        raise VPRError(f"--positive_top_k {config.positive_top_k}: must be at least 1")
    if config.early_stopping_patience < 0:
        raise VPRError(f"--early_stopping_patience {config.early_stopping_patience}: must be 0 (off) or more")
    for name in ("validate_every_n_epochs", "save_every_n_epochs", "ucb_bands", "projection_dim", "hidden_dim"):
        if getattr(config, name) < 1:
            raise VPRError(f"--{name} {getattr(config, name)}: must be at least 1")
    if config.ucb_warmup_samples < 0 or config.ucb_exploration_constant < 0:
        raise VPRError("--ucb_warmup_samples and --ucb_exploration_constant must be 0 or more")
    if config.difficulty_parquet and config.neg_sampler != "ucb":
        raise VPRError(f"--difficulty_parquet {config.difficulty_parquet}: only used with --neg_sampler ucb")
    if config.val_db_csv and is_parquet(config.val_db_csv) != is_parquet(config.train_csv):
        raise VPRError(f"--val_db_csv {config.val_db_csv}: give the same kind of input as --train_csv "
                       f"({'an embeddings parquet' if is_parquet(config.train_csv) else 'images: a poses CSV or folder'})")
    if config.pooling != "backbone" and (is_parquet(config.train_csv) or is_parquet(config.val_csv)):
        raise VPRError(f"--pooling {config.pooling}: embeddings parquets hold descriptors already pooled; "
                       f"drop --pooling or train on poses CSVs (images)")
    if not (is_parquet(config.train_csv) or is_parquet(config.val_csv)):
        _spec_for(config.model)  # embeddings need no backbone: --model only names the run


def effective_hard_neg_ratio(config: TrainConfig) -> float:
    """--neg_sampler random means no hard negatives, in batches and triplets alike."""
    return 0.0 if config.neg_sampler == "random" else config.hard_neg_ratio


def set_determinism(seed: int) -> None:
    """Same seed, same machine: same numbers."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if hasattr(torch.backends, "cudnn"):
        torch.backends.cudnn.benchmark = False
