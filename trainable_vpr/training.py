"""The training loop: per epoch mine hard negatives with the current head, build batches of
several images per place, minimise the hybrid loss, validate (val queries against the validation
database), keep the best and a resumable _last checkpoint; `train(config)` is the whole job
(train_vpr.py's, run_experiment's and tune_vpr's). A run's parts (state, start, optimiser,
checkpoints, resume) are in trainable_vpr/runs.py."""
from __future__ import annotations

import copy
import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import trainable_vpr as vpr
from trainable_vpr import blocks as trained_blocks
from trainable_vpr import checkpoints
from trainable_vpr.checkpoints import latest_alias_path, refresh_latest_alias
from trainable_vpr.data import Split, TrainingData, extract_training_data, load_splits, named_after_embeddings
from trainable_vpr.runs import (Run, TrainState, new_run, open_tensorboard, resolved_pooling, start_text,
                                val_recall)
from vprkit.extraction.augment import view_picks
from vprkit.cli import VPRError, check_writable_dir, sigterm_as_interrupt
from vprkit.retrieval.evaluation import RecallResult
from vprkit.extraction.device import distributed_rank_and_world
from trainable_vpr.miners import BatchMiner, Miner
from vprkit.logs.runlog import (CsvLogger, LOG_COLUMNS, LOG_EXTRA_COLUMNS, LOG_OPTIONAL_COLUMNS, TRAINING_SUMMARY_NAME,
                                append_summary_row, new_run_id, read_summary_table)


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
    latest_alias: Path | None = None  # trained_models/trained_{model}_seed{seed}.pth, the copy of the best checkpoint


# Called after each validation with (epoch, result); it may raise to stop the run (tune_vpr.py prunes so).
ValidationCallback = Callable[[int, RecallResult], None]


# Said when the best checkpoint is the untrained head (epoch 0): training added nothing on validation.
NO_GAIN = " (no epoch beat the untrained head)"


def check_outputs(config: vpr.TrainConfig) -> Path:
    """Writable output folders and a summary this run can append to; returns the log folder."""
    log_dir = check_writable_dir(config.log_dir, "--log_dir")
    check_writable_dir(config.checkpoint_dir, "--checkpoint_dir")
    read_summary_table(log_dir / TRAINING_SUMMARY_NAME)
    return log_dir


def hybrid_loss(config: vpr.TrainConfig) -> vpr.HybridLoss:
    return vpr.HybridLoss(config.triplet_margin, config.contrastive_temperature, config.triplet_weight,
                          config.contrastive_weight, config.loss_distance)


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


def print_config(config: vpr.TrainConfig) -> None:
    """The resolved configuration (flags > environment > config file > defaults), at the start."""
    print("config: " + " ".join(f"{k}={v}" for k, v in dataclasses.asdict(config).items()), flush=True)


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
    alias = latest_alias_path(config.checkpoint_dir, config.model, config.seed)
    refresh_latest_alias(best_path, alias)
    result = TrainResult(run.run_id, state.best_recall, state.best_epoch, state.epoch, time.perf_counter() - started,
                         best_path, run.log_file, final_path, state.early_stopped, data.skipped_images,
                         state.untrained_r1, run.start, run.start_head, run.start_candidates, alias)
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
