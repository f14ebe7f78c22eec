#!/usr/bin/env python3
"""What --augment_views K costs: an epoch that samples views against one on the originals
(K=0), and the one-off extraction of the views, measured in one run.

    .venv/bin/python bench/bench_augment.py                 # 256 images of bgu_campus train.csv, K=3
    .venv/bin/python bench/bench_augment.py --num_images 0  # all 849

An epoch is the training loop's own (trainable_vpr/training.py: epoch_batches + train_one_epoch,
the default configuration) on
cached features; the K=0 and K epochs alternate, on the same head and optimizer, so load bursts
hit both. The views' extraction (decode, augment, resize, forward, cache write) is timed once per
view, cold, into a temporary cache.

Reported: epoch_K / epoch_0 (sampling views only gathers other rows: about 1), the extraction
of one view and of all K views in cached epochs (the one-off cost, paid once per data set and
recipe, shared by every later run and seed). Writes bench/results/augment.csv.
"""
from __future__ import annotations

import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

from trainable_vpr.data import Split, TrainingData  # noqa: E402
from trainable_vpr.runs import new_run  # noqa: E402
from trainable_vpr.training import epoch_batches, hybrid_loss, train_one_epoch  # noqa: E402
from bench_training import OUT_DIR, quiet, training_bench_parser  # noqa: E402  (one home for the benches' data path and quiet runs)
import trainable_vpr as vpr  # noqa: E402
from vprkit.extraction.augment import AugmentedView  # noqa: E402
from vprkit.cli import atomic_write  # noqa: E402
from vprkit.extraction.features import extract_features  # noqa: E402
from vprkit.cli.extraction_settings import extraction_settings  # noqa: E402
from vprkit.tables.places import load_poses  # noqa: E402
from vprkit.logs.runlog import CsvLogger  # noqa: E402


def main() -> None:
    parser = training_bench_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--views", type=int, default=3, help="K")
    parser.add_argument("--epochs", type=int, default=6, help="epochs of each kind (alternating)")
    parser.add_argument("--cache_dir", default=None, help="a cache holding the originals (default: a temporary one)")
    parser.add_argument("--out_dir", type=Path, default=OUT_DIR)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_augment_") as tmp:
        tmp = Path(tmp)
        config = vpr.TrainConfig(train_csv=str(args.data / "train.csv"), val_csv=str(args.data / "val.csv"),
                                 model=args.model, device="cpu", augment_views=args.views,
                                 cache_dir=args.cache_dir or str(tmp / "cache"), log_dir=str(tmp / "logs"),
                                 checkpoint_dir=str(tmp / "models"))
        vpr.validate_train_config(config)
        vpr.set_determinism(config.seed)
        train, val = load_poses(config.train_csv), load_poses(config.val_csv)
        if args.num_images:
            train = train.subset(np.arange(min(args.num_images, len(train))))
        n = len(train)
        backbone = vpr.create_backbone(config.model)
        with quiet():
            train_features = extract_features(backbone, train, extraction_settings(config), "train")
            val_features = extract_features(backbone, val, extraction_settings(config), "val")
        view_cache = dataclasses.replace(extraction_settings(config), cache_dir=str(tmp / "views"))
        view_times = []
        views = []
        for k in range(1, args.views + 1):  # each view cold (a view is extracted once, then cached)
            with quiet():
                start = time.perf_counter()
                views.append(extract_features(backbone, train, view_cache, f"view {k}", view=AugmentedView(k)))
                view_times.append(time.perf_counter() - start)
        split = lambda table, features: Split.of(table, features, False, config.pos_threshold_m)  # noqa: E731
        plain = split(train, train_features)
        augmented = dataclasses.replace(plain, views=np.stack(views))
        data = TrainingData(backbone.info.as_dict(), plain, split(val, val_features))
        run = new_run(config, data)
        loss_fn = hybrid_loss(config)
        logger = CsvLogger(tmp / "logs" / "bench.csv")
        no_views = dataclasses.replace(config, augment_views=0)

        def epoch(number: int, with_views: bool) -> float:
            start = time.perf_counter()
            chosen = augmented if with_views else plain
            batches = epoch_batches(config, run.head, chosen, run.rng)
            train_one_epoch(number, run.head, run.optimizer, run.scheduler, loss_fn, chosen, batches,
                                      config if with_views else no_views, run.generator, logger, run.miner)
            return time.perf_counter() - start

        epoch(0, False)  # warm-up
        plain_times, view_epoch_times = [], []
        for number in range(1, args.epochs + 1):
            plain_times.append(epoch(2 * number - 1, False))
            view_epoch_times.append(epoch(2 * number, True))
        logger.close()

    med = statistics.median
    epoch_0, epoch_k, view_s = med(plain_times), med(view_epoch_times), med(view_times)
    rows = [
        {"measure": "epoch on the originals (K=0)", "seconds": epoch_0},
        {"measure": f"epoch sampling from K={args.views} views", "seconds": epoch_k},
        {"measure": "extraction of one view (cold)", "seconds": view_s, "per_image_ms": 1000 * view_s / n},
        {"measure": f"ratio epoch K={args.views} / epoch K=0", "value": epoch_k / epoch_0},
        {"measure": "ratio one view's extraction / epoch K=0", "value": view_s / epoch_0},
        {"measure": f"ratio all {args.views} views' extraction / epoch K=0 (one-off)",
         "value": sum(view_times) / epoch_0},
    ]
    import pandas as pd

    frame = pd.DataFrame(rows)
    frame.insert(1, "images", n)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out_dir / "augment.csv", lambda p: frame.to_csv(p, index=False))
    print(f"{n} training images, {args.model}, K={args.views}, {args.epochs} epochs of each kind")
    print(frame.round(4).to_string(index=False))
    print(f"table: {args.out_dir / 'augment.csv'}")


if __name__ == "__main__":
    main()
