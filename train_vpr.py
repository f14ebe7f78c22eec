#!/usr/bin/env python3
"""Train a place-recognition head on a frozen backbone with GPS or place-label supervision.

    python train_vpr.py --train_csv data/train.csv --val_csv data/val.csv --model effnet_lite0
    python train_vpr.py --train_parquet emb/train.parquet --val_parquet emb/val.parquet --head mlp
    python train_vpr.py --resume trained_models/effnet_lite0_seed42_20250101_120000_last.pth

Steps: load the poses CSVs (extract, or read from the cache, the frozen backbone's features)
or the embeddings parquets, then per epoch: mine hard negatives with the current head, build
batches of several images per place, minimise the hybrid triplet + multi-positive InfoNCE
loss, validate (val queries against the train database), keep the checkpoint of the best
validation Recall@1 and a resumable _last checkpoint. Every file is named by the run id
({model}_seed{seed}_{time}): logs/{run_id}.csv, trained_models/{run_id}.pth (best),
{run_id}_last.pth and {run_id}_final.pth, and a row of logs/training_summary.csv pointing at
them; a finished run also refreshes trained_models/trained_{model}_seed{seed}.pth, a copy of
its best checkpoint (the latest run of that model and seed). --resume CKPT alone continues a
run: its settings come from the checkpoint.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

import trainable_vpr as vpr
from trainable_vpr import blocks as trained_blocks
from trainable_vpr import checkpoints
from trainable_vpr.data import Split, TrainingData, extract_training_data, load_splits, named_after_embeddings
from trainable_vpr.checkpoints import (checkpoint_path, checkpoint_payload, latest_alias_path, random_states,
                                       refresh_latest_alias, restore_random_states)
from vprkit.augment import view_picks
from vprkit.cli import CliParser, VPRError, check_writable_dir, run_cli, sigterm_as_interrupt
from vprkit.evaluation import RecallResult, evaluate_retrieval
from vprkit.features import (distributed_rank_and_world)
from vprkit.runlog import (CsvLogger, LOG_COLUMNS, LOG_EXTRA_COLUMNS, LOG_OPTIONAL_COLUMNS, TRAINING_SUMMARY_NAME,
                           append_summary_row, new_run_id, read_summary_table)
from vprkit.tensorboard_log import TensorBoardLog, tensorboard_dir
from vprkit.settings import config_from_args, config_parser, given_settings, parse_layered
from vprkit.miners import BatchMiner, Miner, UCBMiner, load_difficulty_parquet


@dataclass
class TrainResult:
    run_id: str
    best_recall: dict[int, float]
    best_epoch: int
    epochs_run: int
    wall_time_s: float
    checkpoint: Path
    log_file: Path
    final_checkpoint: Path | None = None
    early_stopped: bool = False
    skipped_images: int = 0  # left out by --on_bad_image skip
    untrained_r1: float = math.nan  # val R@1 of the untrained head (epoch 0): what training must beat
    head_start: dict[str, Any] | None = None  # the residual head's start (StartChoice.record()), None for other heads
    start_head: torch.nn.Module | None = None  # the untrained head itself (run_experiment's `start` row)
    # every untrained start compared (--head_start auto), by name: run_experiment's rows reuse them
    start_candidates: dict[str, torch.nn.Module] = dataclasses.field(default_factory=dict)


@dataclass
class TrainState:
    """Where a run stands after an epoch: what --resume restores besides weights and random states."""

    epoch: int = 0
    best_recall: dict[int, float] = dataclasses.field(default_factory=dict)
    best_epoch: int = 0
    best_val_loss: float = math.inf
    stale: int = 0
    early_stopped: bool = False
    untrained_r1: float = math.nan  # val R@1 at epoch 0 (before training)

    def as_checkpoint(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "best_recall": {str(n): r for n, r in self.best_recall.items()}}

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any]) -> "TrainState":
        return cls(**{**saved, "best_recall": {int(n): float(r) for n, r in saved["best_recall"].items()}})


# Settings that may change when a run is resumed (more epochs, another machine, other output
# folders); any other difference would make the resumed run a different run. `--resume CKPT`
# alone takes every setting from the checkpoint; a flag beside it may change only these.
RESUMABLE_CHANGES = {"resume", "epochs", "early_stopping_patience", "save_every_n_epochs", "validate_every_n_epochs",
                     "device", "num_workers", "cache_dir", "no_cache", "log_dir", "checkpoint_dir", "precision",
                     "extract_batch_size", "tensorboard"}

# Called after each validation with (epoch, result); it may raise to stop the run (tune_vpr.py prunes so).
ValidationCallback = Callable[[int, RecallResult], None]


def build_parser() -> CliParser:
    return config_parser(vpr.TrainConfig, __doc__.split("\n\n")[0],
                         optional=("train_csv", "val_csv"))  # --resume CKPT alone needs neither


def parse_args(argv: Sequence[str] | None) -> vpr.TrainConfig:
    parser = build_parser()
    args = parse_layered(parser, argv)
    if args.resume:
        config = resumed_config(args.resume, config_from_args(args, vpr.TrainConfig), given_settings(parser, argv))
    else:
        missing = [f"--{name}" for name in ("train_csv", "val_csv") if not getattr(args, name)]
        if missing:
            parser.error(f"the following arguments are required: {', '.join(missing)} (or --resume CKPT)")
        config = config_from_args(args, vpr.TrainConfig)
    vpr.validate_train_config(config)
    return config


def resumed_config(path: str, parsed: vpr.TrainConfig, given: set[str]) -> vpr.TrainConfig:
    """The checkpoint's whole configuration, with the settings given now (flags, VPR_* variables,
    --config) that resume may change (RESUMABLE_CHANGES); any other given setting that differs
    from the run's stops with one line naming it."""
    saved = vpr.load_checkpoint(path)
    if "resume" not in saved:
        raise VPRError(f"--resume {path}: not a resumable checkpoint; give the run's _last or _final checkpoint")
    fields = {f.name for f in dataclasses.fields(vpr.TrainConfig)}
    values = dataclasses.asdict(vpr.TrainConfig.from_saved(saved["config"]))
    for name in sorted(given & fields):
        now = getattr(parsed, name)
        if name in RESUMABLE_CHANGES:
            values[name] = now
        elif now != values[name]:
            raise VPRError(f"--resume {path}: --{name} {now} would change the run (it used {values[name]}); "
                           f"resume may change only --{', --'.join(sorted(RESUMABLE_CHANGES - {'resume'}))}")
    values["resume"] = path
    return vpr.TrainConfig(**values)


def check_outputs(config: vpr.TrainConfig) -> Path:
    """Writable output folders and a summary this run can append to; returns the log folder."""
    log_dir = check_writable_dir(config.log_dir, "--log_dir")
    check_writable_dir(config.checkpoint_dir, "--checkpoint_dir")
    read_summary_table(log_dir / TRAINING_SUMMARY_NAME)
    return log_dir


def head_config_for(config: vpr.TrainConfig, in_dim: int) -> vpr.HeadConfig:
    """in_dim: the width of the features (a local feature's channels for --head netvlad)."""
    return vpr.HeadConfig(config.head, in_dim, config.projection_dim, config.hidden_dim, config.dropout,
                          config.use_residual, config.use_layer_norm,
                          clusters=config.vlad_clusters if config.head in vpr.LOCAL_HEADS else 0)


def initial_head(config: vpr.TrainConfig, data: TrainingData) -> tuple[torch.nn.Module, vpr.HeadConfig,
                                                                        vpr.StartChoice | None]:
    """A fresh head, its config and, for the residual head, its start (trainable_vpr.starts): the
    frozen descriptor --head_start names (auto: the best on val R@1 of raw, PCA-whitened and learned
    whitening), which the untrained head reproduces exactly."""
    if getattr(data, "tail", None) is not None:  # the head starts on the frozen descriptors, then trains with the tail
        frozen = {name: dataclasses.replace(split, features=vpr.embed(data.tail, split.features))
                  for name, split in (("train", data.train), ("val", data.val), ("val_db", data.val_db))
                  if split is not None}
        head, head_config, choice = initial_head(config, dataclasses.replace(data, **frozen, tail=None))
        return trained_blocks.BlocksAndHead(data.tail, head), head_config, choice
    torch.manual_seed(config.seed)
    head_config = head_config_for(config, data.train.features.shape[-1])  # netvlad: a local feature's channels
    if config.head in vpr.LOCAL_HEADS:
        head = vpr.build_head(head_config)
        head.init_vocabulary(data.vocabulary)
        print(f"netvlad head start: the VLAD vocabulary (K={config.vlad_clusters}, assignment scale "
              f"{vpr.NETVLAD_ASSIGNMENT_SCALE:g}): epoch 0 is the training-free --pooling vlad", flush=True)
        return head, head_config, None
    if config.head != "residual":
        return vpr.build_head(head_config), head_config, None
    choice = vpr.choose_start(config.head_start, head_config, start_fit_data(config, data),
                              lambda head: val_recall(head, data, config).recalls[1], config.seed)
    print(f"residual head start: {choice.text()} (--head_start {config.head_start}; val queries against "
          f"{config.val_db_csv or 'the training images'})", flush=True)
    return choice.chosen.head, choice.chosen.head_config, choice


def start_fit_data(config: vpr.TrainConfig, data: TrainingData) -> vpr.FitData:
    """What the head's starts are fitted on (training features, their pairs) and chosen on (val
    queries against the validation database)."""
    database, val = data.val_database, data.val
    return vpr.FitData(data.train.features, data.train.xyz, data.train.labels, database.features, database.xyz,
                       database.labels, val.features, val.xyz, val.labels, config.pos_threshold_m)


def val_recall(head: torch.nn.Module, data: TrainingData, config: vpr.TrainConfig) -> RecallResult:
    """Val queries against the validation database (--val_db_csv, else the training images;
    DESIGN.md §7), through the head."""
    database = data.val_database
    return evaluate_retrieval(vpr.embed(head, database.features), database.xyz, vpr.embed(head, data.val.features),
                              data.val.xyz, config.pos_threshold_m, db_labels=database.labels,
                              q_labels=data.val.labels)


def resolved_pooling(config: vpr.TrainConfig, tables: tuple | None = None) -> tuple[vpr.TrainConfig,
                                                                                     vpr.PoolingChoice | None]:
    """--pooling auto: the config of the pooling whose start scores best on validation
    (trainable_vpr.starts.choose_pooling), each candidate extracted (through the cache) and its start
    chosen as initial_head does; any other --pooling: the config as is. `tables`: load_splits'."""
    if config.pooling != vpr.POOLING_AUTO:
        return config, None
    train_table, val_table, by_label, val_db_table = tables or load_splits(config)

    prepared: dict[str, tuple[TrainingData, vpr.StartChoice, torch.Tensor]] = {}

    def start_of(candidate: vpr.TrainConfig) -> vpr.StartChoice:
        print(f"pooling auto: candidate {candidate.pooling}", flush=True)
        data = extract_training_data(candidate, train_table, val_table, by_label, None, val_db_table)
        start = initial_head(candidate, data)[2]
        prepared[candidate.pooling] = (data, start, torch.get_rng_state())  # the state a run's initial_head leaves
        return start

    choice = vpr.choose_pooling(config, start_of)
    choice.prepared = prepared[choice.chosen]  # train() goes on from the winner's data and start, not again
    print(choice.text(), flush=True)
    vpr.set_determinism(config.seed)  # the run draws what a run given the chosen --pooling draws
    return vpr.pooling_candidate(config, choice.chosen), choice


def hybrid_loss(config: vpr.TrainConfig) -> vpr.HybridLoss:
    return vpr.HybridLoss(config.triplet_margin, config.contrastive_temperature, config.triplet_weight,
                          config.contrastive_weight, config.loss_distance)


def triplet_miner(config: vpr.TrainConfig) -> Miner:
    """--neg_sampler ucb: a UCB1 bandit picks each negative's difficulty band; hard / random: the
    hardest in-batch negative for a share hard_neg_ratio of the triplets, random for the rest."""
    if config.neg_sampler != "ucb":
        return BatchMiner(vpr.effective_hard_neg_ratio(config))
    difficulty = load_difficulty_parquet(config.difficulty_parquet) if config.difficulty_parquet else None
    return UCBMiner(config.ucb_bands, config.ucb_exploration_constant, config.ucb_warmup_samples, difficulty)


def epoch_batches(config: vpr.TrainConfig, head: torch.nn.Module, split: Split,
                  rng: np.random.Generator) -> list[np.ndarray]:
    """This epoch's batches: places mixed with hard-negative places mined with the current head."""
    hard_places = None
    ratio = vpr.effective_hard_neg_ratio(config)
    if ratio > 0:
        embeddings = vpr.embed(head, split.features)
        hard = vpr.mine_hard_negatives(embeddings, split.xyz, config.neg_threshold_m, labels=split.labels,
                                       pos_threshold_m=config.pos_threshold_m)
        hard_places = vpr.hard_negative_places(split.places, hard)
    num_batches = math.ceil(len(split) / config.batch_size)
    return vpr.make_place_batches(split.places, config.batch_size, config.images_per_place, num_batches, rng,
                                  hard_places, ratio)


def batch_loss(head: torch.nn.Module, loss_fn: vpr.HybridLoss, split: Split, batch: np.ndarray, config: vpr.TrainConfig,
               generator: torch.Generator, miner: Miner, picks: np.ndarray | None = None) -> vpr.LossParts:
    """The hybrid loss of one batch on the miner's triplets; the miner is rewarded with their losses.
    `picks`: the view each row reads (--augment_views; None: the originals)."""
    frozen = torch.from_numpy(split.batch_features(batch, picks))
    xyz, labels = split.take(batch)
    pos_mask, neg_mask = vpr.batch_pair_masks(xyz, config.pos_threshold_m, config.neg_threshold_m, labels)
    if config.positive_selection == "feature":
        pos_mask = vpr.select_positives_by_feature(pos_mask, frozen, config.positive_top_k)
    embeddings = trained_blocks.distributed_batch_embeddings(head, frozen, *training_world(head))
    # difficulty tables are keyed by these
    ids, place_labels = [split.table.paths[i] for i in batch], split.table.labels
    triplets = miner.mine(embeddings.detach(), pos_mask, neg_mask, generator, ids,
                          None if place_labels is None else place_labels[batch])
    parts = loss_fn(embeddings, pos_mask, neg_mask, triplets)
    miner.reward(parts.triplet_items, config.triplet_margin)
    return parts


def training_world(head: torch.nn.Module) -> tuple[int, int]:
    """(rank, world) of a --train_blocks run under torchrun (every rank trains its share of each
    batch); (0, 1) otherwise (rank 0 alone trains a head on the cache)."""
    if isinstance(head, trained_blocks.BlocksAndHead):
        return distributed_rank_and_world()
    return 0, 1


def train_one_epoch(epoch: int, head, optimizer, scheduler, loss_fn, split: Split, batches: list[np.ndarray],
                    config: vpr.TrainConfig, generator: torch.Generator, logger: CsvLogger,
                    miner: Miner) -> dict[str, float]:
    head.train()
    sums = np.zeros(3)
    start = time.perf_counter()
    for number, batch in enumerate(batches, start=1):
        tick = time.perf_counter()
        picks = None if split.views is None else view_picks(config.seed, epoch, number, len(batch),
                                                            config.augment_views)
        parts = batch_loss(head, loss_fn, split, batch, config, generator, miner, picks)
        optimizer.zero_grad(set_to_none=True)
        parts.total.backward()
        trained_blocks.all_reduce_gradients(head, training_world(head)[1])
        optimizer.step()
        scheduler.step()
        values = np.array([parts.total.item(), parts.triplet.item(), parts.contrastive.item()])
        sums += values
        logger.log("batch", epoch=epoch, batch=number, train_loss=values[0], triplet_loss=values[1],
                   contrastive_loss=values[2], batch_time=time.perf_counter() - tick)
    averages = dict(zip(("avg_train_loss", "avg_triplet_loss", "avg_contrastive_loss"), sums / max(len(batches), 1)))
    stats = miner.stats()
    extra = {"ucb_stats": stats} if stats is not None else {}
    logger.log("epoch", epoch=epoch, epoch_time=time.perf_counter() - start, **averages, **extra)
    return averages


@torch.no_grad()
def validation_loss(head, loss_fn: vpr.HybridLoss, split: Split, config: vpr.TrainConfig) -> float:
    """The training loss on fixed batches of validation images (same batches every epoch)."""
    head.eval()
    try:
        batches = vpr.make_place_batches(split.places, config.batch_size, config.images_per_place,
                                         math.ceil(len(split) / config.batch_size), np.random.default_rng(config.seed))
    except VPRError:
        return float("nan")  # no validation place has two images: no loss to compute
    generator = torch.Generator().manual_seed(config.seed)
    miner = BatchMiner(vpr.effective_hard_neg_ratio(config))  # fixed: a bandit learns from training batches only
    losses = [batch_loss(head, loss_fn, split, b, config, generator, miner).total.item() for b in batches]
    return float(np.mean(losses)) if losses else float("nan")


def validate(epoch: int, head, loss_fn, data: TrainingData, config: vpr.TrainConfig,
             logger: CsvLogger) -> tuple[RecallResult, float]:
    """Val queries against the validation database (DESIGN.md §7), plus the validation loss."""
    start = time.perf_counter()
    val_loss = validation_loss(head, loss_fn, data.val, config)
    result = val_recall(head, data, config)
    logger.log("validation", epoch=epoch, val_loss=val_loss, val_r1=result.recalls[1], val_r5=result.recalls[5],
               val_r10=result.recalls[10], val_time=time.perf_counter() - start)
    return result, val_loss


def lr_scheduler(optimizer: torch.optim.Optimizer, config: vpr.TrainConfig, batches_per_epoch: int):
    """Constant, or cosine decay to 0 over all the run's steps."""
    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, config.epochs * batches_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


@dataclass
class Run:
    """The moving parts of one training run, in one place for checkpoints and resume."""

    config: vpr.TrainConfig
    data: TrainingData
    head: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    miner: Miner
    rng: np.random.Generator
    generator: torch.Generator
    state: TrainState
    head_config: vpr.HeadConfig | None = None
    start: dict[str, Any] | None = None  # StartChoice.record() of a residual head (resumed: the checkpoint's)
    start_head: torch.nn.Module | None = None  # the untrained head (a copy; None when resumed)
    start_candidates: dict[str, torch.nn.Module] = dataclasses.field(default_factory=dict)  # untrained, by name
    run_id: str = ""
    log_file: Path = Path()
    tensorboard: TensorBoardLog | None = None  # --tensorboard: fed the log's rows (CsvLogger on_row)

    def checkpoint_file(self, kind: str = "") -> Path:
        """This run's checkpoint: the best ("" kind), "last" or "final" (named by its run id)."""
        return checkpoint_path(self.config.checkpoint_dir, self.run_id, kind)

    def checkpoint(self, epoch: int, resumable: bool) -> dict[str, Any]:
        """The head at `epoch` with the run's best metrics; resumable adds optimizer,
        scheduler, random and miner states (the _last and _final checkpoints)."""
        state = self.state
        progress = {
            "best_val_recall": {f"recall@{n}": r for n, r in state.best_recall.items()},
            "best_val_epoch": state.best_epoch,
            "best_val_loss": state.best_val_loss,
            "early_stopped": state.early_stopped,
            "epoch": epoch,
            "epochs_completed": state.epoch,
            **({"head_start": self.start} if self.start is not None else {}),
        }
        resume = None if not resumable else {
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "random_states": random_states(self.rng, self.generator), "train_state": state.as_checkpoint(),
            "sampler": self.miner.state_dict(),
        }
        blocks = isinstance(self.head, trained_blocks.BlocksAndHead)
        payload = checkpoint_payload(self.head.head if blocks else self.head, self.head_config,
                                     self.data.backbone, self.config, progress, self.run_id, self.log_file,
                                     self.data.vocabulary, resume)
        if blocks:  # only the trained blocks' modules, beside the head
            payload["trained_blocks"] = trained_blocks.trained_blocks_payload(self.head.tail)
        return payload

    @property
    def head_in_dim(self) -> int:
        """The head's input width: the features' (the descriptor's with --train_blocks)."""
        if isinstance(self.head, trained_blocks.BlocksAndHead):
            return int(self.data.backbone["feature_dim"])
        return int(self.data.train.features.shape[-1])

    def restore(self, saved: dict[str, Any], path: str) -> None:
        """Continue the run saved in a resumable checkpoint `saved`, read from `path` (same
        settings, checked)."""
        if "resume" not in saved:
            raise VPRError(f"--resume {path}: not a resumable checkpoint; give the run's _last or _final checkpoint")
        changed = [k for k, v in saved["config"].items()
                   if k not in RESUMABLE_CHANGES and getattr(self.config, k, v) != v]
        if changed:
            key = changed[0]
            raise VPRError(f"--resume {path}: the run used --{key} {saved['config'][key]}, not "
                               f"{getattr(self.config, key)}; resume with the run's settings")
        vpr.check_input_dim(saved["head_config"], self.head_in_dim, self.config.train_csv)
        if isinstance(self.head, trained_blocks.BlocksAndHead):
            self.head.head.load_state_dict(saved["model_state_dict"])
            self.head.tail.load_state_dict(saved["trained_blocks"]["state_dict"])
        else:
            self.head.load_state_dict(saved["model_state_dict"])
        self.optimizer.load_state_dict(saved["resume"]["optimizer"])
        self.scheduler.load_state_dict(saved["resume"]["scheduler"])
        restore_random_states(saved["resume"]["random_states"], self.rng, self.generator)
        self.miner.load_state_dict(saved["resume"]["sampler"])
        self.state = TrainState.from_checkpoint(saved["resume"]["train_state"])
        self.run_id, self.log_file = saved["run_id"], Path(saved["log_file"])
        self.start = saved.get("head_start")


def print_config(config: vpr.TrainConfig) -> None:
    """The resolved configuration (flags > environment > config file > defaults), at the start."""
    print("config: " + " ".join(f"{k}={v}" for k, v in dataclasses.asdict(config).items()), flush=True)


def new_run(config: vpr.TrainConfig, data: TrainingData, resumed: dict | None = None,
            start: vpr.StartChoice | None = None) -> Run:
    """A fresh head, optimizer, schedule, triplet miner and random generators. A resumed run's head
    is rebuilt from its checkpoint's head config (its start was chosen when the run began); `start`:
    the residual head's start chosen already (--pooling auto), else initial_head chooses it.
    --train_blocks: the trained blocks and the head, the blocks at --backbone_lr."""
    if resumed is not None:
        head_config, choice = vpr.HeadConfig.from_dict(resumed["head_config"]), None
        head = vpr.build_head(head_config)
        if data.tail is not None:
            head = trained_blocks.BlocksAndHead(data.tail, head)
    elif start is not None:
        head, head_config, choice = start.chosen.head, start.chosen.head_config, start
    else:
        head, head_config, choice = initial_head(config, data)
    groups: list[dict[str, Any]] = [{"params": list(head.parameters()), "lr": config.lr}]
    if isinstance(head, trained_blocks.BlocksAndHead):
        for param in head.tail.parameters():
            param.requires_grad_(True)
        groups = [{"params": list(head.head.parameters()), "lr": config.lr},
                  {"params": list(head.tail.parameters()), "lr": config.backbone_lr}]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = lr_scheduler(optimizer, config, math.ceil(len(data.train) / config.batch_size))
    run = Run(config, data, head, optimizer, scheduler, triplet_miner(config), np.random.default_rng(config.seed),
              torch.Generator().manual_seed(config.seed), TrainState(), head_config,
              None if choice is None else choice.record())
    run.start_head = None if choice is None else copy.deepcopy(choice.chosen.head)
    if choice is not None:  # the chosen head trains in place: its untrained copy stands for it
        run.start_candidates = {name: run.start_head if c is choice.chosen else c.head
                                for name, c in choice.candidates.items()}
    return run


def open_log(run: Run, loss_fn: vpr.HybridLoss, log_dir: Path, resumed: dict | None = None) -> CsvLogger:
    """Resumed: restore the run and continue its log. New: a new log, whose epoch 0 validates
    the untrained head (with --head residual that is PCA-whitening, so the best checkpoint is
    never worse on validation than the strongest frozen baseline)."""
    config = run.config
    columns = LOG_COLUMNS + LOG_EXTRA_COLUMNS + (LOG_OPTIONAL_COLUMNS if run.miner.stats() is not None else [])
    if config.resume:
        run.restore(resumed, config.resume)
        open_tensorboard(run, log_dir)
        logger = CsvLogger(run.log_file, columns, continue_after_epoch=run.state.epoch, on_row=run.tensorboard)
        earlier_best = Path(config.resume).parent / run.checkpoint_file().name
        if not run.checkpoint_file().exists() and earlier_best.is_file():  # resumed into another --checkpoint_dir
            refresh_latest_alias(earlier_best, run.checkpoint_file())
        print(f"run {run.run_id}: resumed after epoch {run.state.epoch} from {config.resume}, log {logger.path}",
              flush=True)
        return logger
    run.run_id = new_run_id(config.model, config.seed, log_dir, config.checkpoint_dir)
    open_tensorboard(run, log_dir)
    logger = CsvLogger(log_dir / f"{run.run_id}.csv", columns, on_row=run.tensorboard)
    run.log_file = logger.path
    skipped = run.data.skipped_images
    logger.log("data", epoch=0, skipped_images=skipped, val_database=config.val_db_csv or config.train_csv,
               head_start=start_text(run.start))
    val_db = f" against {len(run.data.val_db)} val database images" if run.data.val_db is not None else ""
    print(f"run {run.run_id}: {len(run.data.train)} train / {len(run.data.val)} val images{val_db}"
          f"{f' ({skipped} bad images skipped)' if skipped else ''}, "
          f"{len(np.unique(run.data.train.places))} places, log {logger.path}", flush=True)
    result, val_loss = validate(0, run.head, loss_fn, run.data, config, logger)
    print(validation_queries_line(result), flush=True)
    run.state = TrainState(best_recall=result.recalls, best_val_loss=math.inf if math.isnan(val_loss) else val_loss,
                           untrained_r1=result.recalls[1])
    checkpoints.save_checkpoint(run.checkpoint_file(), run.checkpoint(0, resumable=False))
    started_as = f": {run.start['label']}" if run.start else ""
    print(f"epoch 0 (untrained head{started_as})  val R@1 {result.recalls[1]:.3f} R@5 {result.recalls[5]:.3f} "
          f"R@10 {result.recalls[10]:.3f}", flush=True)
    return logger


def start_text(start: dict[str, Any] | None) -> str:
    """The start record in one cell: "learned_whitened; raw=0.505 pca_whitened=0.568 learned_whitened=0.663"."""
    if not start:
        return ""
    pooling = start.get("pooling")  # --pooling auto: "; pooling gem; backbone=0.6630 gem=0.6800 vlad=0.6000"
    return (f"{start['chosen']}; " + " ".join(f"{name}={r1:.4f}" for name, r1 in start["val_r1"].items())
            + (f"; pooling {pooling['chosen']}; " + " ".join(f"{name}={r1:.4f}" for name, r1 in
                                                           pooling["val_r1"].items()) if pooling else ""))


def open_tensorboard(run: Run, log_dir: Path) -> None:
    """--tensorboard: the run's SummaryWriter under {log_dir}/tensorboard/{run_id}."""
    if run.config.tensorboard:
        run.tensorboard = TensorBoardLog(tensorboard_dir(log_dir, run.run_id),
                                         purge_step=run.state.epoch + 1 if run.config.resume else None)
        print(f"tensorboard: {run.tensorboard.folder}", flush=True)


def validation_queries_line(result: RecallResult) -> str:
    """e.g. "val: 95 queries, 26 without a positive within 10 m": those no head can get right."""
    rule = "in the database with their label" if result.by_label else f"within {result.pos_threshold_m:g} m"
    return f"val: {result.num_queries} queries, {result.num_queries_without_positive} without a positive {rule}"


def record_validation(run: Run, epoch: int, result: RecallResult, val_loss: float) -> bool:
    """Update best metrics and patience; save the best checkpoint. Returns whether R@1 improved."""
    state = run.state
    improved = result.recalls[1] > state.best_recall[1]
    state.stale = 0 if improved else state.stale + 1
    if not math.isnan(val_loss):
        state.best_val_loss = min(state.best_val_loss, val_loss)
    if improved:
        state.best_recall, state.best_epoch = result.recalls, epoch
        checkpoints.save_checkpoint(run.checkpoint_file(), run.checkpoint(epoch, resumable=False))
    patience = run.config.early_stopping_patience
    state.early_stopped = bool(patience and state.stale >= patience)
    return improved


def train_and_validate(run: Run, epoch: int, loss_fn: vpr.HybridLoss, logger: CsvLogger) -> RecallResult | None:
    """One epoch: batches mined with the current head, the optimiser steps and, when due,
    validation (saving a new best checkpoint); prints the epoch's line. The validation result,
    or None when this epoch is not validated."""
    config, data = run.config, run.data
    batches = epoch_batches(config, run.head, data.train, run.rng)
    if run.tensorboard is not None:  # the rate this epoch starts with (the schedule steps per batch)
        run.tensorboard.learning_rate(epoch, run.optimizer.param_groups[0]["lr"])
    averages = train_one_epoch(epoch, run.head, run.optimizer, run.scheduler, loss_fn, data.train, batches, config,
                               run.generator, logger, run.miner)
    run.state.epoch = epoch
    message = (f"epoch {epoch}/{config.epochs}  loss {averages['avg_train_loss']:.4f} "
               f"(triplet {averages['avg_triplet_loss']:.4f}, contrastive {averages['avg_contrastive_loss']:.4f})")
    result = None
    if epoch % config.validate_every_n_epochs == 0 or epoch == config.epochs:
        result, val_loss = validate(epoch, run.head, loss_fn, data, config, logger)
        improved = record_validation(run, epoch, result, val_loss)
        message += (f"  val R@1 {result.recalls[1]:.3f} R@5 {result.recalls[5]:.3f} R@10 {result.recalls[10]:.3f}"
                    f"{'  * best, saved' if improved else ''}")
    print(message, flush=True)
    return result


def train(config: vpr.TrainConfig, on_validation: ValidationCallback | None = None,
          pooling: vpr.PoolingChoice | None = None) -> TrainResult:
    """The whole training job; returns where its results are. `pooling`: a --pooling auto choice
    made already (resolved_pooling; `config` then has its pooling), else made here."""
    started = time.perf_counter()
    vpr.set_determinism(config.seed)
    print_config(config)
    if config.train_blocks and distributed_rank_and_world()[0] != 0:
        # torchrun: every rank trains its share of each batch; rank 0 alone writes the run's files
        import tempfile

        scratch = tempfile.mkdtemp(prefix="vpr-rank-")
        config = dataclasses.replace(config, log_dir=scratch, checkpoint_dir=scratch, tensorboard=False)
    train_table, val_table, by_label, val_db_table = load_splits(config)
    config = named_after_embeddings(config, train_table, val_table)
    log_dir = check_outputs(config)
    if pooling is None:
        config, pooling = resolved_pooling(config, (train_table, val_table, by_label, val_db_table))
    resumed = vpr.load_checkpoint(config.resume) if config.resume else None  # read once
    start = None
    if pooling is not None and pooling.prepared is not None:  # --pooling auto: extracted and started already
        data, start, rng_state = pooling.prepared
        torch.set_rng_state(rng_state)
    else:
        data = extract_training_data(config, train_table, val_table, by_label, resumed, val_db_table)
    run = new_run(config, data, resumed, start)
    if pooling is not None:  # --pooling auto: every candidate's score beside the start (log, summary, checkpoint)
        run.start = {**run.start, "pooling": pooling.record()}
    loss_fn = hybrid_loss(config)
    logger = open_log(run, loss_fn, log_dir, resumed)
    best_path, last_path, final_path = (run.checkpoint_file(kind) for kind in ("", "last", "final"))
    state = run.state
    # The run as of its last completed epoch: what Ctrl-C or SIGTERM saves (a resumed run then
    # logs exactly what the uninterrupted run logs). Saved at once, so that even a kill -9
    # during the first epoch leaves a checkpoint to resume from.
    snapshot = copy.deepcopy(run.checkpoint(state.epoch, resumable=True))
    if not config.resume:
        checkpoints.save_checkpoint(last_path, snapshot)
    try:
        with sigterm_as_interrupt():
            for epoch in range(state.epoch + 1, config.epochs + 1):
                result = train_and_validate(run, epoch, loss_fn, logger)
                snapshot = copy.deepcopy(run.checkpoint(epoch, resumable=True))
                if epoch % config.save_every_n_epochs == 0:
                    checkpoints.save_checkpoint(last_path, snapshot)
                if result is not None and on_validation is not None:
                    on_validation(epoch, result)
                if state.early_stopped:
                    print(f"early stop: no better val R@1 for {state.stale} validations", flush=True)
                    break
            if run.tensorboard is not None:
                run.tensorboard.hparams(dataclasses.asdict(config), state.best_recall[1])
    except KeyboardInterrupt:
        checkpoints.save_checkpoint(last_path, snapshot)
        done = snapshot["epochs_completed"]
        print(f"interrupted in epoch {done + 1}: the run as of epoch {done} is saved in {last_path}; "
              f"continue it with --resume {last_path}", file=sys.stderr, flush=True)
        raise
    finally:
        logger.close()
        if run.tensorboard is not None:
            run.tensorboard.close()

    checkpoints.save_checkpoint(final_path, run.checkpoint(state.epoch, resumable=True))
    if state.best_epoch == 0:
        print(f"no epoch beat the untrained head (val R@1 {state.best_recall[1]:.3f} at epoch 0): "
              f"{best_path} holds the untrained head", flush=True)
    refresh_latest_alias(best_path, latest_alias_path(config.checkpoint_dir, config.model, config.seed))
    result = TrainResult(run.run_id, state.best_recall, state.best_epoch, state.epoch, time.perf_counter() - started,
                         best_path, run.log_file, final_path, state.early_stopped, data.skipped_images,
                         state.untrained_r1, run.start, run.start_head, run.start_candidates)
    append_summary_row(log_dir / TRAINING_SUMMARY_NAME, summary_row(config, result))
    return result


def summary_row(config: vpr.TrainConfig, result: TrainResult) -> dict:
    return {
        "run_id": result.run_id, "model": config.model, "seed": config.seed,
        **{k: v for k, v in dataclasses.asdict(config).items() if k not in ("model", "seed")},
        "best_val_r1": result.best_recall[1], "best_val_r5": result.best_recall[5],
        "best_val_r10": result.best_recall[10],
        "untrained_val_r1": result.untrained_r1,
        "head_start": start_text(result.head_start),
        "best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "skipped_images": result.skipped_images,
        "wall_time_s": round(result.wall_time_s, 2),
        "checkpoint": str(result.checkpoint), "log_file": str(result.log_file),
    }


def main(argv: Sequence[str] | None = None) -> TrainResult:
    config = parse_args(argv)
    result = train(config)
    print(f"best val R@1 {result.best_recall[1]:.3f} R@5 {result.best_recall[5]:.3f} R@10 {result.best_recall[10]:.3f} "
          f"at epoch {result.best_epoch}{NO_GAIN if result.best_epoch == 0 else ''}; checkpoint {result.checkpoint} "
          f"(copied to {latest_alias_path(config.checkpoint_dir, config.model, config.seed)}); log {result.log_file}; "
          f"{result.wall_time_s:.1f} s")
    return result


# Said when the best checkpoint is the untrained head (epoch 0): training added nothing on validation.
NO_GAIN = " (no epoch beat the untrained head)"


if __name__ == "__main__":
    run_cli(main)
