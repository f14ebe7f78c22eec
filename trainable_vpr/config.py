"""The training configuration (stored in every checkpoint) and the configs of the scripts that apply a model
(evaluation, localize, the experiment, tuning), each with its checks."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from trainable_vpr.backbones import BACKBONES, DEFAULT_LOCAL_FEATURES_PER_IMAGE, _spec_for
from trainable_vpr.heads import HEADS, LOCAL_HEADS
from trainable_vpr.seqnet import SEQ_HEAD
from trainable_vpr.losses import LOSS_DISTANCES
from vprkit.cli import VPRError, check_new_file, check_writable_dir
from vprkit.cli.configs import (
    DEFAULT_POS_THRESHOLD_M,
    SUPERVISIONS,  # noqa: F401 (re-exported by trainable_vpr)
    DatabaseTable,
    Overwrite,
    PlotDir,
    PosThreshold,
    RecallAt,
    RouteFigure, RouteFolder,  # eval's similarity figure; localize's folder of frames
    RouteSettings,
    SequenceHeadSettings,
    StudyName,
    Supervision,
    TestTable,
)
from vprkit.cli.extraction_settings import POOLING_HELP, ExtractionSettings, validate_extraction_flags
from vprkit.retrieval.exports import DESCRIPTOR_FILES
from vprkit.tables.places import is_parquet
from vprkit.extraction.pooling import POOLINGS
from vprkit.cli.settings import check_choices, registered
from vprkit.cli.settings import flag as _flag
from vprkit.logs.tensorboard_log import require_tensorboard

DEFAULT_MODEL = "dinov2_b"  # the backbone a training run uses when --model is not given
DEFAULT_HEAD = "residual"
DEFAULT_SUPERVISION = "auto"
HEAD_STARTS = ("auto", "raw", "pca_whitened", "learned_whitened")
POOLING_AUTO = "auto"  # training only: the best frozen start of every pooling (trainable_vpr.starts.choose_pooling)
NEG_SAMPLERS = ("hard", "random", "ucb")


# ============================================================================================
# Groups shared by training and the scripts that apply a model (vprkit/cli/configs.py has the rest)
# ============================================================================================
@dataclass
class BackboneName:
    model: str | None = _flag(None, f"backbone: {', '.join(BACKBONES)} or timm:ARCH "
                                    f"(training: default {DEFAULT_MODEL}; "
                                    "with --model_path: checked against the checkpoint's)", "model")


@dataclass
class HeadName:
    head: str | None = _flag(None, "residual (starts as PCA-whitening, learns a correction), "
                             "projection (the seed head), "
                             "mlp (Linear-LayerNorm-GELU-Linear with a skip connection) or netvlad (a learnable VLAD "
                             "over the cached local features of --feature_layer, started at --pooling vlad's "
                             "vocabulary: epoch 0 is the training-free VLAD; needs --pooling vlad; output K x C, "
                             f"--projection_dim unused); training: default "
                             f"{DEFAULT_HEAD}; with --model_path: checked against the checkpoint's; seqnet: the "
                             "learned sequence descriptor over windows of --seq_len frames (docs/training.md)",
                             "model", choices=(*HEADS, SEQ_HEAD))


@dataclass
class ModelSource(BackboneName):
    """What describes the images: a trained checkpoint, or a raw frozen backbone (--baseline)."""

    model_path: str | None = _flag(None, "a trained checkpoint (its backbone, pooling and head come from it)", "model")
    baseline: bool = _flag(False, "the raw frozen backbone given by --model (with --pooling), no head", "model")

    def check_model_source(self, needs_model: bool = True) -> None:
        if bool(self.model_path) == bool(self.baseline):
            raise VPRError("give either --model_path CKPT or --baseline --model NAME; see --help")
        if self.baseline and not self.model and needs_model:
            raise VPRError("--baseline needs --model NAME; see --help")


@registered
@dataclass
class TrainConfig(ExtractionSettings, BackboneName, HeadName, Supervision, PosThreshold, RouteSettings,
                  SequenceHeadSettings):
    """Every training setting, in one place: argparse flags are generated from it (the shared image and
    extraction flags come from ExtractionSettings, the backbone, head, supervision and positive
    radius from the shared groups, their defaults filled in here), and every checkpoint stores it."""

    # data
    train_csv: str = _flag(None, "poses CSV, benchmark folder (vprkit.tables.benchmarks) or embeddings parquet of the "
                           "training images (also the validation database)",
                           "data", required=True, aliases=("--train_parquet",))
    val_csv: str = _flag(None, "poses CSV, benchmark folder (vprkit.tables.benchmarks) or embeddings parquet of the "
                         "validation queries (chooses the best epoch)",
                         "data", required=True, aliases=("--val_parquet",))
    val_db_csv: str | None = _flag(None, "poses CSV, benchmark folder or embeddings parquet of the validation database "
                                   "the val queries are searched in (default: --train_csv); e.g. the day map for night "
                                   "val queries, so validation measures the user's task", "data",
                                   aliases=("--val_db_parquet",))
    # model
    pooling: str = _flag("backbone", f"{POOLING_HELP}; training also takes auto (a new residual-head run on "
                         "images): backbone, gem and vlad (at --feature_layer, --vlad_clusters) each extracted once "
                         "and given its best frozen start (--head_start) on val R@1; the run trains on the best one, "
                         "and its checkpoint, log and summary record that pooling",
                         "model", choices=(*POOLINGS, POOLING_AUTO))  # ExtractionSettings' field, one choice more
    local_features_per_image: int = _flag(DEFAULT_LOCAL_FEATURES_PER_IMAGE, "--head netvlad: the most local features "
                                          "cached per image (float16); an image with more positions keeps a fixed "
                                          "seeded sample of them (printed)", "model")
    projection_dim: int = _flag(256, "output descriptor dimension", "model", aliases=("--output_dim",))
    head_start: str = _flag("auto", "residual head: its linear map starts as raw (the identity: the raw descriptor "
                            "at its own dimension), pca_whitened (PCA-whitening of the training features, "
                            "--projection_dim), learned_whitened (whitening learned from the training set's positive "
                            "pairs, shrinkage chosen on val R@1, --projection_dim) or auto (the best of them on val "
                            "R@1); the untrained head is exactly that frozen descriptor", "model",
                            choices=HEAD_STARTS)
    train_blocks: int = _flag(0, "train the backbone's last N blocks (ViT blocks; EfficientNet/ResNet blocks; ConvNeXt "
                              "stages) with the head, at cache speed: their input is cached once (float16); 0: frozen",
                              "model")
    backbone_lr: float = _flag(1e-5, "AdamW learning rate of the blocks trained by --train_blocks", "model")
    hidden_dim: int = _flag(None, "hidden width of the residual and mlp heads (default: 512; seqnet's per-frame "
                            "head: 256)", "model")
    dropout: float = _flag(0.1, "dropout in the head", "model")
    use_residual: bool = _flag(True, "mlp head: add a skip connection from the input", "model")
    use_layer_norm: bool = _flag(True, "mlp head: LayerNorm after the hidden layer", "model")
    # training
    epochs: int = _flag(15, "training epochs", resumable=True)
    lr: float = _flag(None, "AdamW learning rate (default: 1e-4; --head seqnet: 1e-3)")
    batch_size: int = _flag(None, "images per training batch, default 32 (--head seqnet: windows, default 64) "
                            "(places x --images_per_place; extraction has "
                            "--extract_batch_size)")
    images_per_place: int = _flag(None, "images of each place in a training batch (default: 4; --head seqnet: 2)")
    weight_decay: float = _flag(1e-4, "AdamW weight decay")
    seed: int = _flag(42, "random seed (same seed, same machine: same losses)")
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
    early_stopping_patience: int = _flag(0, "stop after this many validations without a better R@1 (0: never)",
                                         resumable=True)
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
    augment_views: int = _flag(0, "K augmented views per training image (random crop, colour jitter, night-like "
                               "darkening on every second), extracted once and cached; each step a batch row reads "
                               "the original or one of its K views, uniformly (0: off; never for validation, "
                               "database or queries)")
    validate_every_n_epochs: int = _flag(1, "validate (and maybe save the best checkpoint) every N epochs and after "
                                         "the last", resumable=True)
    save_every_n_epochs: int = _flag(1, "write the resumable _last checkpoint every N epochs", resumable=True)
    resume: str | None = _flag(None, "continue the run of this _last (or _final) checkpoint: head, optimizer, "
                               "scheduler, random states, best metrics and patience are restored, the log is "
                               "continued", "system", resumable=True)
    # system and outputs
    log_dir: str = _flag("logs", "folder of run logs and training_summary.csv", "system", resumable=True)
    checkpoint_dir: str = _flag("trained_models", "folder of checkpoints", "system", deprecated=("--output_dir",),
                                resumable=True)
    tensorboard: bool = _flag(False, "also write TensorBoard scalars (loss parts, val R@N, learning rate per epoch; "
                              "flags and best val R@1 as hparams) under LOG_DIR/tensorboard/RUN_ID (needs the "
                              "tensorboard package)", "system", resumable=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        # the shared groups leave these None (an evaluation takes them from its checkpoint); training's defaults:
        self.model = self.model or DEFAULT_MODEL
        self.head = self.head or DEFAULT_HEAD
        self.supervision = self.supervision or DEFAULT_SUPERVISION
        self.pos_threshold_m = DEFAULT_POS_THRESHOLD_M if self.pos_threshold_m is None else self.pos_threshold_m
        self.fill_training_defaults(self.head == SEQ_HEAD)

    def validate(self) -> None:
        validate_train_config(self)

    @classmethod
    def from_saved(cls, saved: dict[str, Any], **changes: Any) -> TrainConfig:
        """The config a checkpoint stores, from any version of this suite: keys of fields that were
        renamed are read under their new names, unknown keys are left out."""
        renamed = {"output_dir": "checkpoint_dir"}
        names = {f.name for f in dataclasses.fields(cls)}
        values = {renamed.get(k, k): v for k, v in saved.items()}
        return cls(**{k: v for k, v in values.items() if k in names}, **changes)


def validate_train_config(config: TrainConfig) -> None:
    """Flag combinations that cannot train, caught before any work is done."""
    if config.pooling == POOLING_AUTO:
        check_pooling_auto(config)
        config = dataclasses.replace(config, pooling="vlad")  # --feature_layer, --vlad_clusters checked as vlad's
    validate_extraction_flags(config)
    config.check_route_settings()
    if config.head == SEQ_HEAD:
        config.check_sequence_head()
    if config.tensorboard:
        require_tensorboard()  # before anything is written
    check_choices(config)  # a config built in code (run_experiment, tune_vpr, tests) is checked like parsed flags
    if config.epochs <= 0:
        raise VPRError(f"--epochs {config.epochs}: must be at least 1")
    if config.batch_size < 4:
        raise VPRError(f"--batch_size {config.batch_size}: a batch needs at least 4 images (two places of two images)")
    if config.images_per_place < 2 or config.images_per_place > config.batch_size // 2:
        raise VPRError(f"--images_per_place {config.images_per_place}: must be between 2 and batch_size / 2 "
                       f"({config.batch_size // 2})")
    if config.pos_threshold_m <= 0 or config.pos_threshold_m >= config.neg_threshold_m:
        raise VPRError(f"--pos_threshold_m {config.pos_threshold_m:g} must be > 0 and below --neg_threshold_m "
                       f"{config.neg_threshold_m:g}")
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
    if config.train_blocks < 0 or config.backbone_lr <= 0:
        raise VPRError(f"--train_blocks {config.train_blocks} / --backbone_lr {config.backbone_lr:g}: give 0 or more "
                       f"blocks and a positive learning rate")
    if config.train_blocks and (config.pooling != "backbone" or config.head in LOCAL_HEADS
                                or is_parquet(config.train_csv) or config.positive_selection == "feature"):
        raise VPRError(f"--train_blocks {config.train_blocks}: only with --pooling backbone, a descriptor head "
                       f"(residual, projection, mlp), images (not embeddings parquets) and --positive_selection gps")
    if config.augment_views and (config.train_blocks or config.head in LOCAL_HEADS):
        raise VPRError(f"--augment_views {config.augment_views}: not yet with --train_blocks or --head netvlad "
                       f"(their cache holds local features per image); drop one of them")
    if config.head in LOCAL_HEADS:
        if config.pooling != "vlad":
            raise VPRError(f"--head {config.head}: a learnable VLAD starts from --pooling vlad's vocabulary; add "
                           f"--pooling vlad (with --feature_layer and --vlad_clusters)")
        if config.positive_selection == "feature":
            raise VPRError(f"--positive_selection feature: not with --head {config.head} (its input is local "
                           f"features, not descriptors); use --positive_selection gps")
        if config.local_features_per_image < 1:
            raise VPRError(f"--local_features_per_image {config.local_features_per_image}: must be at least 1")
    if config.difficulty_parquet and config.neg_sampler != "ucb":
        raise VPRError(f"--difficulty_parquet {config.difficulty_parquet}: only used with --neg_sampler ucb")
    if config.val_db_csv and is_parquet(config.val_db_csv) != is_parquet(config.train_csv):
        kind = "an embeddings parquet" if is_parquet(config.train_csv) else "images: a poses CSV or folder"
        raise VPRError(f"--val_db_csv {config.val_db_csv}: give the same kind of input as --train_csv ({kind})")
    if config.augment_views < 0:
        raise VPRError(f"--augment_views {config.augment_views}: must be 0 (off) or more")
    if config.augment_views and (is_parquet(config.train_csv) or is_parquet(config.val_csv)):
        raise VPRError(f"--augment_views {config.augment_views}: embeddings parquets have no images to augment; "
                       f"drop --augment_views or train on poses CSVs (images)")
    if config.pooling != "backbone" and (is_parquet(config.train_csv) or is_parquet(config.val_csv)):
        raise VPRError(f"--pooling {config.pooling}: embeddings parquets hold descriptors already pooled; "
                       f"drop --pooling or train on poses CSVs (images)")
    if not (is_parquet(config.train_csv) or is_parquet(config.val_csv)):
        _spec_for(config.model)  # embeddings need no backbone: --model only names the run


def check_pooling_auto(config: TrainConfig) -> None:
    """--pooling auto compares the residual head's frozen starts on images, before a new run."""
    why = (f"--head {config.head}" if config.head != "residual" else
           f"--train_blocks {config.train_blocks}" if config.train_blocks else
           "embeddings parquets (their descriptors are pooled already)"
           if is_parquet(config.train_csv) or is_parquet(config.val_csv) else
           "--resume (the run keeps its checkpoint's pooling)" if config.resume else None)
    if why:
        raise VPRError(f"--pooling auto: only for a new run of the residual head (--head residual, --train_blocks 0) "
                       f"on images, not with {why}; give --pooling backbone, gem or vlad")


# ============================================================================================
# The scripts that apply a model: evaluation, the experiment, tuning, localize
# ============================================================================================
@registered
@dataclass
class EvalConfig(ExtractionSettings, ModelSource, HeadName, DatabaseTable, TestTable, Supervision, PosThreshold,
                 RecallAt, PlotDir, Overwrite, RouteSettings, RouteFigure):
    """eval_trained.py: Recall@N of a checkpoint or a raw backbone on a database and queries."""

    pca_whiten: int = _flag(0, "PCA-whiten to DIM dims, fitted on the database at indexing time: the raw features "
                            "(--baseline) or the trained head's output (--model_path)", "model", metavar="DIM")
    output_json: str | None = _flag(None, "write the results as JSON here", "outputs")
    save_predictions: str | None = _flag(None, "write each query's top-N retrievals here", "outputs", metavar="CSV")
    visualize: int = _flag(0, "draw K queries with their top-5 retrievals in --plot_dir", "outputs", metavar="K")
    localization: bool = _flag(False, "draw the localization view (R@1 against distance threshold, cumulative top-1 "
                               "error) as PLOT_DIR/{variant}_{model}[_{checkpoint}]_{queries}_localization.png (also "
                               "drawn with --visualize)", "outputs")
    pr_curve: bool = _flag(False, "write the top-1 precision-recall curve (VPR-Bench) as PLOT_DIR/{variant}_{model}"
                           "[_{checkpoint}]_{queries}_pr.csv (precision, recall, threshold) and _pr.png (also with "
                           "--visualize)", "outputs")
    export_parquet: str | None = _flag(None, "write the raw backbone features of the database and the queries as "
                                       "embeddings parquets DIR/{csv name}.parquet (input for --train_parquet)",
                                       "outputs", metavar="DIR")
    save_descriptors: str | None = _flag(None, "write the evaluated descriptors as DIR/database_descriptors.npy and "
                                         "queries_descriptors.npy (L2-normalised float32, table row order, as "
                                         "VPR-methods-evaluation) and hloc's DIR/global-feats.h5 (names relative to "
                                         "the images' common folder)", "outputs", metavar="DIR")

    def validate(self) -> None:
        self.check_model_source(needs_model=not is_parquet(self.db_csv))
        self.check_recall_at()
        self.check_pos_threshold()
        self.check_route_settings()
        if self.pca_whiten < 0:
            raise VPRError(f"--pca_whiten {self.pca_whiten}: must be 0 (off) or a number of dimensions")
        validate_extraction_flags(self)
        check_choices(self)
        if self.pooling != "backbone" and is_parquet(self.db_csv):
            raise VPRError(f"--pooling {self.pooling}: embeddings parquets hold descriptors already pooled; "
                           "drop --pooling")
        for path, flag in ((self.output_json, "--output_json"), (self.save_predictions, "--save_predictions")):
            check_new_file(path, self.overwrite, flag)
        if self.visualize > 0 or self.localization or self.pr_curve or self.route_figure:
            check_writable_dir(self.plot_dir, "--plot_dir")
        if self.save_descriptors:
            folder = check_writable_dir(self.save_descriptors, "--save_descriptors")
            for name in DESCRIPTOR_FILES:
                check_new_file(folder / name, self.overwrite, "--save_descriptors")


@registered
@dataclass
class LocalizeConfig(ExtractionSettings, ModelSource, DatabaseTable, PosThreshold, Overwrite, RouteFolder):
    """localize.py: top-k matches and a position estimate for new photos."""

    query: str | None = _flag(None, "a folder of photos (in --order), or a CSV with an image column (no positions "
                              "needed; --seq_len > 1: an order column)", "data", required=True, metavar="PHOTOS_OR_CSV")
    top_k: int = _flag(5, "database matches per query (those within --pos_threshold_m of the top-1 share in the "
                       "position estimate)", "data")
    output: str | None = _flag(None, "the matches, one row per query and rank", "outputs", required=True, metavar="CSV")
    picture: str | None = _flag(None, "draw each query with its top-k matches here", "outputs", metavar="PNG")
    picture_queries: int = _flag(8, "at most N queries in --picture", "outputs", metavar="N")
    pairs: str | None = _flag(None, "write hloc's retrieval pairs here: `query db` per line, the top-k of each query, "
                              "names relative to the images' common folder", "outputs", metavar="TXT")

    def validate(self) -> None:
        self.check_model_source()
        if self.top_k < 1:
            raise VPRError(f"--top_k {self.top_k}: must be at least 1")
        self.check_pos_threshold()
        self.check_route_settings()
        if is_parquet(self.db_csv):
            raise VPRError(f"--db_csv {self.db_csv}: localize.py matches photos, so the database must be images "
                           "(a poses CSV), not an embeddings parquet")
        validate_extraction_flags(self)
        for path, flag in ((self.output, "--output"), (self.picture, "--picture"), (self.pairs, "--pairs")):
            check_new_file(path, self.overwrite, flag)


@registered
@dataclass
class ExportConfig(ExtractionSettings, ModelSource, DatabaseTable, Overwrite, RouteSettings):
    """export_model.py: the whole descriptor as one file (--db_csv: where a --baseline --pooling vlad
    fits its vocabulary)."""

    output: str | None = _flag(None, "the model file to write: FILE.pt2 (torch.export) or FILE.onnx (ONNX)", "outputs",
                               required=True)

    def validate(self) -> None:
        self.check_model_source()
        validate_extraction_flags(self)
        self.check_route_settings()


@registered
@dataclass
class ExperimentConfig(TrainConfig, DatabaseTable, TestTable, RecallAt):
    """run_experiment.py: every training flag (but --model), the final test and the backbones to compare."""

    demo: bool = _flag(False, "generate the built-in synthetic route under demo_data/ and run on it with effnet_lite0",
                       "experiment")
    models: list[str] = _flag(  # noqa: RUF009 (flag() gives a list default a default_factory)
        [DEFAULT_MODEL], f"backbones to compare: {', '.join(BACKBONES)} or timm:ARCH", "experiment",
        aliases=("--model",))

    def train_config(self, model: str) -> TrainConfig:
        """The training config of one backbone."""
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        return TrainConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names and k != "model"},
                           model=model)

    def validate(self) -> None:
        missing = [f"--{name}" for name in ("train_csv", "val_csv", "test_csv") if not getattr(self, name)]
        if missing:
            raise VPRError(f"missing {', '.join(missing)} (or use --demo); see --help")
        if sorted(set(self.recall_at)) != sorted(self.recall_at) or 1 not in self.recall_at:
            raise VPRError("--recall_at must list distinct values including 1; see --help")
        self.check_recall_at()
        for model in self.models:  # every backbone's flags checked before the first one runs for long
            validate_train_config(self.train_config(model))


DEFAULT_STUDY_NAME = "vpr_tune"


@registered
@dataclass
class TuneConfig(TrainConfig, StudyName):
    """tune_vpr.py: every training flag (the base of each trial) and the study's own."""

    storage: str | None = _flag(None, "Optuna storage URL (default: sqlite:///{log_dir}/{study}.db)", "tuning")
    n_trials: int = _flag(20, "trials this invocation runs, shared by its workers", "tuning")
    n_jobs: int = _flag(1, "local worker processes", "tuning")
    sampler_seed: int | None = _flag(None, "seed of the TPE sampler, + worker index (default: --seed); give each "
                                     "SLURM task its own", "tuning")
    config: str | None = None  # the --config file the settings were read from (its [tune.space]); not a flag

    def __post_init__(self) -> None:
        super().__post_init__()
        self.study_name = self.study_name or DEFAULT_STUDY_NAME

    def validate(self) -> None:
        if self.n_trials < 1 or self.n_jobs < 1:
            raise VPRError(f"--n_trials {self.n_trials} and --n_jobs {self.n_jobs}: both must be at least 1")
        validate_train_config(self.train_config())

    def train_config(self) -> TrainConfig:
        """The base training config of every trial."""
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        return TrainConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})


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
