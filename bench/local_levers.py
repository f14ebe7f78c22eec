#!/usr/bin/env python3
"""Issue 18 §3(b) and §3(c) on bgu_campus: --head netvlad against the training-free vlad row, and
--train_blocks N against the default head; val and test R@1 at 25 m and the time per epoch of each
lever relative to the default head, measured in this one run.

    nice -n 10 .venv/bin/python bench/local_levers.py --cache_dir /work/cache_local --epochs 5 --seeds 42

Database train.csv; queries val.csv (chooses the epoch, as training does) and test.csv. Rows:
  raw (the backbone's own vector), vlad (training-free, --feature_layer, K=32: the vlad row),
  default (the residual head on the raw vector), netvlad (started at the vlad row),
  train_blocks (the last N blocks + the default head, --backbone_lr).
Each trained row is its best checkpoint (by val R@1), described through the model object.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import train_vpr  # noqa: E402
import trainable_vpr as vpr  # noqa: E402
from trainable_vpr.model import PlaceDescriptor, describe_table  # noqa: E402
from vprkit.evaluation import evaluate_retrieval  # noqa: E402
from vprkit.features import ExtractionSettings  # noqa: E402
from vprkit.places import load_poses  # noqa: E402
from vprkit.pooling import PoolingConfig  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "bgu_campus"


def recall_at_1(model: PlaceDescriptor, options: ExtractionSettings, split: str) -> float:
    database, queries = load_poses(DATA / "train.csv"), load_poses(DATA / f"{split}.csv")
    _, db = describe_table(model, database, options, "database")
    _, q = describe_table(model, queries, options, split)
    return evaluate_retrieval(db, database.xyz, q, queries.xyz, 25.0).recalls[1]


def epoch_time(log_file: Path) -> float:
    log = pd.read_csv(log_file)
    return float(log[log.event == "epoch"].epoch_time.mean())


def main() -> None:
    global DATA
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "bgu_campus"),
                        help="the bgu_campus folder")
    parser.add_argument("--model", default="effnet_lite0")
    parser.add_argument("--cache_dir", required=True)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--feature_layer", type=int, default=-2)
    parser.add_argument("--train_blocks", type=int, default=1)
    parser.add_argument("--backbone_lr", type=float, default=1e-5)
    args = parser.parse_args()
    DATA = Path(args.data)
    out = Path(tempfile.mkdtemp(prefix="local_levers-"))
    base = vpr.TrainConfig(train_csv=str(DATA / "train.csv"), val_csv=str(DATA / "val.csv"), model=args.model,
                           epochs=args.epochs, device="cpu", cache_dir=args.cache_dir, log_dir=str(out / "logs"),
                           checkpoint_dir=str(out / "models"))
    options = ExtractionSettings(device="cpu", cache_dir=args.cache_dir)
    vlad = PoolingConfig("vlad", args.feature_layer, 32)
    frozen = {"raw": PlaceDescriptor.baseline(args.model, None, 0, PoolingConfig(), (), options),
              "vlad": PlaceDescriptor.baseline(args.model, None, 0, vlad,
                                               load_poses(DATA / "train.csv").paths, options)}
    rows = [{"row": name, "seed": "-", "val_r1": recall_at_1(m, options, "val"),
             "test_r1": recall_at_1(m, options, "test"), "epoch_s": np.nan} for name, m in frozen.items()]
    levers = {"default": {},
              "netvlad": {"head": "netvlad", "pooling": "vlad", "feature_layer": args.feature_layer},
              f"train_blocks_{args.train_blocks}": {"train_blocks": args.train_blocks,
                                                    "backbone_lr": args.backbone_lr}}
    for seed in args.seeds:
        for name, changes in levers.items():
            config = dataclasses.replace(base, seed=seed, **changes)
            result = train_vpr.train(config)
            model = PlaceDescriptor.from_checkpoint(result.checkpoint)
            rows.append({"row": name, "seed": seed, "val_r1": result.best_recall[1],
                         "untrained_val_r1": result.untrained_r1,
                         "best_epoch": result.best_epoch, "test_r1": recall_at_1(model, options, "test"),
                         "epoch_s": epoch_time(result.log_file)})
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    default_epoch = table[table.row == "default"].epoch_s.mean()
    table["epoch_vs_default"] = table.epoch_s / default_epoch
    print(f"\nbgu_campus, {args.model}, database train.csv, R@1 at 25 m, {args.epochs} epochs "
          f"(feature_layer {args.feature_layer}, train_blocks {args.train_blocks}, backbone_lr {args.backbone_lr:g}):")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
