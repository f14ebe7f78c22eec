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

--head seqnet --seq_len L trains the learned sequence descriptor on routes (docs/training.md,
"Sequence head"): windows of L cached frame descriptors, its start chosen on val, the fusion
weight with sequence matching chosen on val; the checkpoint is a sequence checkpoint.
"""
from __future__ import annotations

from typing import Sequence

import trainable_vpr as vpr
from trainable_vpr.runs import resumed_config
from trainable_vpr.sequence_run import train_head
from trainable_vpr.training import NO_GAIN, TrainResult
from vprkit.cli import CliParser, run_cli
from vprkit.cli.settings import config_parser, given_settings, parse_config


def build_parser() -> CliParser:
    return config_parser(vpr.TrainConfig, __doc__.split("\n\n")[0],
                         optional=("train_csv", "val_csv"))  # --resume CKPT alone needs neither


def parse_args(argv: Sequence[str] | None) -> vpr.TrainConfig:
    parser = build_parser()
    return parse_config(parser, vpr.TrainConfig, argv, then=lambda args, config: resumed_or_new(config, parser, argv))


def resumed_or_new(config: vpr.TrainConfig, parser: CliParser, argv: Sequence[str] | None) -> vpr.TrainConfig:
    """--resume CKPT: the checkpoint's settings with the resumable ones given now; else a new run,
    which needs both tables."""
    if config.resume:
        return resumed_config(config.resume, config, given_settings(parser, argv))
    missing = [f"--{name}" for name in ("train_csv", "val_csv") if not getattr(config, name)]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)} (or --resume CKPT)")
    return config


def main(argv: Sequence[str] | None = None) -> TrainResult:
    config = parse_args(argv)
    result = train_head(config)
    print(f"best val R@1 {result.best_recall[1]:.3f} R@5 {result.best_recall[5]:.3f} R@10 {result.best_recall[10]:.3f} "
          f"at epoch {result.best_epoch}{NO_GAIN if result.best_epoch == 0 else ''}; checkpoint {result.checkpoint} "
          f"(copied to {result.latest_alias}); log {result.log_file}; "
          f"{result.wall_time_s:.1f} s")
    return result


if __name__ == "__main__":
    run_cli(main)
