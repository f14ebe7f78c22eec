#!/usr/bin/env python3
"""What the feature cache buys: an epoch on cached features against an epoch that runs the
frozen backbone on every training image.

    .venv/bin/python bench/bench_training.py                 # 256 images of bgu_campus train.csv
    .venv/bin/python bench/bench_training.py --num_images 0  # all 849

The no-cache epoch must extract every training image again: its extra cost is one
extract_features(..., cache_dir=None) over the training images (decode, resize, normalise,
forward; effnet_lite0, batch 32, num_workers as train_vpr's default). The cached epoch is
the training loop's own epoch (trainable_vpr/training.py) on cached features: epoch_batches
(embed with the current head, mine hard
negatives, build place batches) + train_one_epoch (forward, hybrid loss, AdamW step, CSV log
rows), with the default configuration (DESIGN.md §4) and the same images. Validation is
measured separately (it is the same with and without the cache once features exist).

Reported (medians over repeats, extraction and epochs alternating so load bursts hit both):
  extract_s / cached_epoch_s   how many cached epochs one no-cache epoch's extraction costs
                               (target >= 50)
  (extract_s + cached_epoch_s) / cached_epoch_s   the full no-cache epoch over the cached one
  head training throughput     samples/s of train_one_epoch on cached features

--without_malloc_fix turns off the module's allocator setting (see bench_extraction.py): slower
extraction, so a higher ratio.

Writes bench/results/training.csv (training_without_malloc_fix.csv with --without_malloc_fix).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

from trainable_vpr.data import Split, TrainingData  # noqa: E402
from trainable_vpr.runs import new_run  # noqa: E402
from trainable_vpr.training import epoch_batches, hybrid_loss, train_one_epoch, validate  # noqa: E402
import trainable_vpr as vpr  # noqa: E402
from bench_extraction import set_allocator  # noqa: E402
from vprkit.cli import atomic_write  # noqa: E402
from vprkit.cli.extraction_settings import ExtractionSettings, extraction_settings  # noqa: E402
from vprkit.extraction.features import extract_features  # noqa: E402
from vprkit.tables.places import load_poses  # noqa: E402
from vprkit.logs.runlog import CsvLogger  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "bgu_campus"
OUT_DIR = REPO / "bench" / "results"


def quiet():
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    return stack


def training_bench_parser(description: str) -> argparse.ArgumentParser:
    """The flags every training benchmark shares: the data, how many training rows, the backbone."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--num_images", type=int, default=256, help="first N training rows (0: all)")
    parser.add_argument("--model", default="effnet_lite0")
    return parser


def main() -> None:
    parser = training_bench_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="no-cache extractions (medians)")
    parser.add_argument("--epochs", type=int, default=5, help="cached epochs per repeat")
    parser.add_argument("--num_workers", type=int, default=vpr.TrainConfig.num_workers)
    parser.add_argument("--without_malloc_fix", action="store_true",
                        help="glibc's default allocator behaviour (the module keeps freed memory for reuse on CPU)")
    parser.add_argument("--out_dir", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    malloc_fix = set_allocator(args.without_malloc_fix)

    with tempfile.TemporaryDirectory(prefix="bench_training_") as tmp:
        tmp = Path(tmp)
        config = vpr.TrainConfig(train_csv=str(args.data / "train.csv"), val_csv=str(args.data / "val.csv"),
                                 model=args.model, device="cpu", num_workers=args.num_workers,
                                 cache_dir=str(tmp / "cache"), log_dir=str(tmp / "logs"),
                                 checkpoint_dir=str(tmp / "models"))
        vpr.validate_train_config(config)
        vpr.set_determinism(config.seed)
        train = load_poses(config.train_csv)
        val = load_poses(config.val_csv)
        if args.num_images:
            train = train.subset(np.arange(min(args.num_images, len(train))))
        n = len(train)
        backbone = vpr.create_backbone(config.model)
        cached = extraction_settings(config)
        no_cache = ExtractionSettings(extract_batch_size=config.extract_batch_size, num_workers=config.num_workers,
                                         device=config.device, cache_dir=None)
        with quiet():
            extract_features(backbone, train.subset(np.arange(min(n, 32))), no_cache)  # warm-up
            train_features = extract_features(backbone, train, cached, "train")   # fills the cache
            val_features = extract_features(backbone, val, cached, "val")
        split = lambda table, features: Split.of(table, features, False, config.pos_threshold_m)  # noqa: E731
        data = TrainingData(backbone.info.as_dict(), split(train, train_features), split(val, val_features))
        place_of = data.train.places
        run = new_run(config, data)  # head, optimizer, schedule, triplet miner, random generators
        loss_fn = hybrid_loss(config)
        logger = CsvLogger(tmp / "logs" / "bench.csv")
        print(f"{n} training images ({len(np.unique(place_of))} GPS places), {config.model}, head {config.head}, "
              f"batch {config.batch_size}, num_workers {config.num_workers}, torch threads {torch.get_num_threads()}, "
              f"malloc fix {'on' if malloc_fix else 'off'}",
              flush=True)

        def cached_epoch(epoch: int) -> tuple[float, float, float, int]:
            start = time.perf_counter()
            batches = epoch_batches(config, run.head, data.train, run.rng)
            middle = time.perf_counter()
            train_one_epoch(epoch, run.head, run.optimizer, run.scheduler, loss_fn, data.train, batches,
                                      config, run.generator, logger, run.miner)
            end = time.perf_counter()
            return end - start, middle - start, end - middle, int(sum(len(b) for b in batches))

        cached_epoch(0)  # warm-up (first backward allocates, pml imports)
        extract_times, epoch_times, batching_times, step_times = [], [], [], []
        samples, read_times, val_times = [], [], []
        epoch = 1
        for rep in range(args.repeats):
            with quiet():
                start = time.perf_counter()
                extract_features(backbone, train, no_cache, "train")
                extract_times.append(time.perf_counter() - start)
                start = time.perf_counter()
                extract_features(backbone, train, cached, "train")
                read_times.append(time.perf_counter() - start)
            for _ in range(args.epochs):
                total, batching, steps, count = cached_epoch(epoch)
                epoch += 1
                epoch_times.append(total)
                batching_times.append(batching)
                step_times.append(steps)
                samples.append(count)
            with quiet():
                start = time.perf_counter()
                validate(epoch, run.head, loss_fn, data, config, logger)
                val_times.append(time.perf_counter() - start)
            print(f"repeat {rep + 1}/{args.repeats}: extraction {extract_times[-1]:.2f} s, cached epochs "
                  f"{', '.join(f'{t * 1000:.0f}' for t in epoch_times[-args.epochs:])} ms", flush=True)
        logger.close()

    med = statistics.median
    extract_s, epoch_s = med(extract_times), med(epoch_times)
    throughput = med([c / s for c, s in zip(samples, step_times)])
    rows = [
        {"measure": "no-cache extraction of the training images", "seconds": extract_s,
         "per_image_ms": 1000 * extract_s / n},
        {"measure": "cached epoch (epoch_batches + train_one_epoch)", "seconds": epoch_s,
         "per_image_ms": 1000 * epoch_s / n},
        {"measure": "  of which epoch_batches (embed, hard negatives, batches)", "seconds": med(batching_times)},
        {"measure": "  of which train_one_epoch", "seconds": med(step_times)},
        {"measure": "validation (val queries vs train database, val loss)", "seconds": med(val_times)},
        {"measure": "reading the training features from a warm cache", "seconds": med(read_times)},
        {"measure": "ratio extraction / cached epoch", "value": extract_s / epoch_s},
        {"measure": "ratio (extraction + cached epoch) / cached epoch", "value": (extract_s + epoch_s) / epoch_s},
        {"measure": "head training throughput (samples/s, train_one_epoch)", "value": throughput},
        {"measure": "epoch throughput incl. batch building (images/s)", "value": n / epoch_s},
    ]
    import pandas as pd

    pd.set_option("display.width", 200)
    frame = pd.DataFrame(rows)
    frame.insert(1, "images", n)
    frame["repeats"] = f"{args.repeats} extractions, {len(epoch_times)} epochs"
    frame["malloc_fix"] = malloc_fix
    args.out_dir.mkdir(parents=True, exist_ok=True)
    name = "training.csv" if malloc_fix else "training_without_malloc_fix.csv"
    atomic_write(args.out_dir / name, lambda p: frame.to_csv(p, index=False))
    print("\n" + frame.round(4).to_string(index=False))
    ratio = extract_s / epoch_s
    print(f"\nno-cache epoch costs {ratio:.0f}x a cached epoch in extraction alone (target >= 50: "
          f"{'met' if ratio >= 50 else 'NOT met'}); head training {throughput:.0f} samples/s")
    print(f"table: {args.out_dir / name}")


if __name__ == "__main__":
    main()
