#!/usr/bin/env python3
"""Train a place-recognition head on a frozen backbone with GPS supervision.

    python train_vpr.py --train_csv data/train.csv --val_csv data/val.csv --model effnet_lite0

Steps: load the poses CSVs, extract (or read from the cache) the frozen backbone's features,
then per epoch: mine hard negatives with the current head, build batches of several images
per place, minimise the hybrid triplet + multi-positive InfoNCE loss, validate (val queries
against the train database) and keep the checkpoint of the best validation Recall@1.
Writes logs/{run}.csv, a row of logs/training_summary.csv and trained_models/trained_*.pth.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

import trainable_vpr as vpr


@dataclass
class TrainResult:
    run_id: str
    best_recall: dict[int, float]
    best_epoch: int
    epochs_run: int
    wall_time_s: float
    checkpoint: Path
    log_file: Path
    skipped_images: int = 0  # left out by --on_bad_image skip


@dataclass
class TrainingData:
    """Cached backbone features with positions: all that training needs after extraction."""

    backbone: vpr.BackboneInfo
    train: vpr.PlaceTable
    val: vpr.PlaceTable
    train_features: np.ndarray
    val_features: np.ndarray

    @property
    def skipped_images(self) -> int:
        return len(self.train.skipped) + len(self.val.skipped)


def parse_args(argv: Sequence[str] | None) -> vpr.TrainConfig:
    parser = vpr.CliParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    vpr.add_config_args(parser)
    vpr.add_debug_flag(parser)
    config = vpr.config_from_args(vpr.parse_with_recipe(parser, argv))
    vpr.validate_train_config(config)
    return config


def load_splits(config: vpr.TrainConfig) -> tuple[vpr.PlaceTable, vpr.PlaceTable]:
    """Poses of both splits, checked: every CSV problem is found here, before any output."""
    train = vpr.load_poses(config.train_csv, config.image_root, config.camera_id, on_bad_image=config.on_bad_image)
    val = vpr.load_poses(config.val_csv, config.image_root, config.camera_id, on_bad_image=config.on_bad_image)
    check_splits(config, train, val)
    return train, val


def check_splits(config: vpr.TrainConfig, train: vpr.PlaceTable, val: vpr.PlaceTable) -> None:
    """Places with positives to learn from, and validation queries with a training image nearby."""
    vpr.check_trainable(train, config.pos_threshold_m)
    vpr.check_query_split(train, val, config.pos_threshold_m)


def check_outputs(config: vpr.TrainConfig) -> Path:
    """Writable output folders and a summary this run can append to; returns the log folder."""
    log_dir = vpr.check_writable_dir(config.log_dir, "--log_dir")
    vpr.check_writable_dir(config.output_dir, "--output_dir")
    vpr.read_summary_table(log_dir / vpr.TRAINING_SUMMARY_NAME)
    return log_dir


def extract_training_data(config: vpr.TrainConfig, train: vpr.PlaceTable, val: vpr.PlaceTable) -> TrainingData:
    """The frozen backbone's features of both splits (through the cache); with --on_bad_image
    skip, images that cannot be decoded are left out, and the splits checked again."""
    backbone = vpr.create_backbone(config.model, config.weights, config.image_size)
    options = vpr.extraction_options(config)
    train, train_features = vpr.extract_table(backbone, train, options, "train", config.on_bad_image)
    val, val_features = vpr.extract_table(backbone, val, options, "val", config.on_bad_image)
    check_splits(config, train, val)
    return TrainingData(backbone.info, train, val, train_features, val_features)


def head_config_for(config: vpr.TrainConfig, in_dim: int) -> dict:
    return {"type": config.head, "in_dim": in_dim, "projection_dim": config.projection_dim,
            "hidden_dim": config.hidden_dim, "dropout": config.dropout}


def initial_head(config: vpr.TrainConfig, data: TrainingData) -> torch.nn.Module:
    """A fresh head; the residual head starts as PCA-whitening of the training features."""
    torch.manual_seed(config.seed)
    head = vpr.build_head(head_config_for(config, data.train_features.shape[1]))
    if isinstance(head, vpr.ResidualHead):
        head.init_pca_whitening(data.train_features)
    return head


def epoch_batches(config: vpr.TrainConfig, head: torch.nn.Module, data: TrainingData, place_of: np.ndarray,
                  rng: np.random.Generator) -> list[np.ndarray]:
    """This epoch's batches: places mixed with hard-negative places mined with the current head."""
    hard_places = None
    if config.hard_neg_ratio > 0:
        embeddings = vpr.embed(head, data.train_features)
        hard = vpr.mine_hard_negatives(embeddings, data.train.xyz, config.neg_threshold_m)
        hard_places = vpr.hard_negative_places(place_of, hard)
    num_batches = math.ceil(len(data.train) / config.batch_size)
    return vpr.make_place_batches(place_of, config.batch_size, config.images_per_place, num_batches, rng,
                                  hard_places, config.hard_neg_ratio)


def batch_loss(head: torch.nn.Module, loss_fn: vpr.HybridLoss, features: np.ndarray, xyz: np.ndarray,
               batch: np.ndarray, config: vpr.TrainConfig, generator: torch.Generator) -> vpr.LossParts:
    frozen = torch.from_numpy(features[batch])
    pos_mask, neg_mask = vpr.batch_pair_masks(torch.from_numpy(xyz[batch]), config.pos_threshold_m, config.neg_threshold_m)
    if config.positive_selection == "feature":
        pos_mask = vpr.select_positives_by_feature(pos_mask, frozen, config.positive_top_k)
    return loss_fn(head(frozen), pos_mask, neg_mask, generator)


def train_one_epoch(epoch: int, head, optimizer, scheduler, loss_fn, data: TrainingData, batches: list[np.ndarray],
                    config: vpr.TrainConfig, generator: torch.Generator, logger: vpr.CsvLogger) -> dict[str, float]:
    head.train()
    sums = np.zeros(3)
    start = time.perf_counter()
    for number, batch in enumerate(batches, start=1):
        tick = time.perf_counter()
        parts = batch_loss(head, loss_fn, data.train_features, data.train.xyz, batch, config, generator)
        optimizer.zero_grad(set_to_none=True)
        parts.total.backward()
        optimizer.step()
        scheduler.step()
        values = np.array([parts.total.item(), parts.triplet.item(), parts.contrastive.item()])
        sums += values
        logger.log("batch", epoch=epoch, batch=number, train_loss=values[0], triplet_loss=values[1],
                   contrastive_loss=values[2], batch_time=time.perf_counter() - tick)
    averages = dict(zip(("avg_train_loss", "avg_triplet_loss", "avg_contrastive_loss"), sums / max(len(batches), 1)))
    logger.log("epoch", epoch=epoch, epoch_time=time.perf_counter() - start, **averages)
    return averages


@torch.no_grad()
def validation_loss(head, loss_fn: vpr.HybridLoss, data: TrainingData, config: vpr.TrainConfig) -> float:
    """The training loss on fixed batches of validation images (same batches every epoch)."""
    head.eval()
    place_of = vpr.cluster_places(data.val.xyz, config.pos_threshold_m)
    try:
        batches = vpr.make_place_batches(place_of, config.batch_size, config.images_per_place,
                                         math.ceil(len(data.val) / config.batch_size), np.random.default_rng(config.seed))
    except vpr.VPRError:
        return float("nan")  # no validation place has two images: no loss to compute
    generator = torch.Generator().manual_seed(config.seed)
    losses = [batch_loss(head, loss_fn, data.val_features, data.val.xyz, b, config, generator).total.item() for b in batches]
    return float(np.mean(losses)) if losses else float("nan")


def validate(epoch: int, head, loss_fn, data: TrainingData, config: vpr.TrainConfig, logger: vpr.CsvLogger) -> vpr.RecallResult:
    """Val queries against the train database (DESIGN.md §7), plus the validation loss."""
    start = time.perf_counter()
    val_loss = validation_loss(head, loss_fn, data, config)
    result = vpr.evaluate_retrieval(vpr.embed(head, data.train_features), data.train.xyz,
                                    vpr.embed(head, data.val_features), data.val.xyz, config.pos_threshold_m)
    logger.log("validation", epoch=epoch, val_loss=val_loss, val_r1=result.recalls[1], val_r5=result.recalls[5],
               val_r10=result.recalls[10], val_time=time.perf_counter() - start)
    return result


def lr_scheduler(optimizer: torch.optim.Optimizer, config: vpr.TrainConfig, batches_per_epoch: int):
    """Constant, or cosine decay to 0 over all the run's steps."""
    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, config.epochs * batches_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def checkpoint_payload(head, config: vpr.TrainConfig, data: TrainingData, recall: dict[int, float], epoch: int,
                       run_id: str) -> dict:
    return {
        "model_state_dict": {k: v.detach().clone() for k, v in head.state_dict().items()},
        "head_config": head_config_for(config, data.train_features.shape[1]),
        "backbone": data.backbone.as_dict(),
        "config": dataclasses.asdict(config),
        "best_val_recall": {f"recall@{n}": r for n, r in recall.items()},
        "epoch": epoch,
        "epochs_completed": epoch,
        "run_id": run_id,
    }


def train(config: vpr.TrainConfig) -> TrainResult:
    """The whole training job; returns where its results are."""
    started = time.perf_counter()
    vpr.set_determinism(config.seed)
    train_table, val_table = load_splits(config)
    log_dir = check_outputs(config)
    data = extract_training_data(config, train_table, val_table)
    place_of = vpr.cluster_places(data.train.xyz, config.pos_threshold_m)

    head = initial_head(config, data)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = lr_scheduler(optimizer, config, math.ceil(len(data.train) / config.batch_size))
    loss_fn = vpr.HybridLoss(config.triplet_margin, config.contrastive_temperature, config.triplet_weight,
                             config.contrastive_weight, config.hard_neg_ratio)
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)

    run_id = vpr.new_run_id(config.model, config.seed, log_dir)
    logger = vpr.CsvLogger(log_dir / f"{run_id}.csv")
    logger.log("data", skipped_images=data.skipped_images)
    checkpoint = vpr.checkpoint_path(config.output_dir, config.model, config.seed)
    print(f"run {run_id}: {len(data.train)} train / {len(data.val)} val images"
          f"{f' ({data.skipped_images} bad images skipped)' if data.skipped_images else ''}, "
          f"{len(np.unique(place_of))} places, log {logger.path}", flush=True)
    # Epoch 0 validates the untrained head: with --head residual that is PCA-whitening, so the
    # best checkpoint is never worse on validation than the strongest frozen baseline.
    result = validate(0, head, loss_fn, data, config, logger)
    best_recall, best_epoch, stale, epoch = result.recalls, 0, 0, 0
    vpr.save_checkpoint(checkpoint, checkpoint_payload(head, config, data, best_recall, 0, run_id))
    print(f"epoch 0 (untrained head)  val R@1 {result.recalls[1]:.3f} R@5 {result.recalls[5]:.3f} "
          f"R@10 {result.recalls[10]:.3f}", flush=True)
    try:
        for epoch in range(1, config.epochs + 1):
            batches = epoch_batches(config, head, data, place_of, rng)
            averages = train_one_epoch(epoch, head, optimizer, scheduler, loss_fn, data, batches, config, generator, logger)
            result = validate(epoch, head, loss_fn, data, config, logger)
            improved = result.recalls[1] > best_recall[1]
            stale = 0 if improved else stale + 1
            if improved:
                best_recall, best_epoch = result.recalls, epoch
                vpr.save_checkpoint(checkpoint, checkpoint_payload(head, config, data, best_recall, epoch, run_id))
            print(f"epoch {epoch}/{config.epochs}  loss {averages['avg_train_loss']:.4f} "
                  f"(triplet {averages['avg_triplet_loss']:.4f}, contrastive {averages['avg_contrastive_loss']:.4f})  "
                  f"val R@1 {result.recalls[1]:.3f} R@5 {result.recalls[5]:.3f} R@10 {result.recalls[10]:.3f}"
                  f"{'  * best, saved' if improved else ''}", flush=True)
            if config.early_stopping_patience and stale >= config.early_stopping_patience:
                print(f"early stop: no better val R@1 for {stale} epochs", flush=True)
                break
    finally:
        logger.close()

    result = TrainResult(run_id, best_recall, best_epoch, epoch, time.perf_counter() - started, checkpoint, logger.path,
                         data.skipped_images)
    vpr.append_summary_row(log_dir / vpr.TRAINING_SUMMARY_NAME, summary_row(config, result))
    return result


def summary_row(config: vpr.TrainConfig, result: TrainResult) -> dict:
    return {
        "run_id": result.run_id, "model": config.model, "seed": config.seed,
        **{k: v for k, v in dataclasses.asdict(config).items() if k not in ("model", "seed")},
        "best_val_r1": result.best_recall[1], "best_val_r5": result.best_recall[5], "best_val_r10": result.best_recall[10],
        "best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "skipped_images": result.skipped_images,
        "wall_time_s": round(result.wall_time_s, 2),
        "checkpoint": str(result.checkpoint), "log_file": str(result.log_file),
    }


def main(argv: Sequence[str] | None = None) -> TrainResult:
    config = parse_args(argv)
    result = train(config)
    print(f"best val R@1 {result.best_recall[1]:.3f} R@5 {result.best_recall[5]:.3f} R@10 {result.best_recall[10]:.3f} "
          f"at epoch {result.best_epoch}; checkpoint {result.checkpoint}; log {result.log_file}; "
          f"{result.wall_time_s:.1f} s")
    return result


if __name__ == "__main__":
    vpr.run_cli(main)
