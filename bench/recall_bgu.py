#!/usr/bin/env python3
"""Does training beat the frozen backbone? Raw vs PCA-whitened vs seed recipe vs default recipe.

    .venv/bin/python bench/recall_bgu.py                 # effnet_lite0, seeds 1 2 3
    .venv/bin/python bench/recall_bgu.py --seeds 1 --epochs 5   # a quick look

On ../shared/data/bgu_campus: train on train.csv (phone A), choose the epoch on val.csv
(phone B, another day), report on test.csv and queries.csv (phone B, day and night) at 25 m
and 10 m, with the day / night breakdown. Trained rows are mean ± standard deviation over the
seeds. Each threshold's trained rows come from heads trained with that --pos_threshold_m: on
val.csv at 10 m, heads trained at 10 m score R@1 0.309 (mean of seeds 1-3) against 0.291 for
heads trained at 25 m, so a user who localises to 10 m trains at 10 m. Nothing is tuned on
test.csv. Writes bench/results/recall_bgu.csv.

--pooling_rows adds descriptors pooled from the backbone's local features (--pooling gem / vlad,
K=32): training-free at the last layer (-1) and at layer -2 (EfficientNet-Lite0's 112-channel
14 x 14 stage), each raw and PCA-whitened (256 dims, fitted on train.csv), and the residual head
of each --recipes trained on the pooled descriptors of --train_pooled. val.csv rows (val queries
against train.csv) are printed first: defaults are decided there, never on test.

--levers adds issue 18's levers, each alone on the default recipe (its start chosen by
--head_start auto, i.e. lever (d), learned whitening, wherever val prefers it), trained per
threshold and seed: augment (--augment_views 3), netvlad (--head netvlad on --lever_layer's local
features, started at the vlad row), train_blocks (--train_blocks N at --backbone_lr 1e-5), and
the combination augment+vlad (augmented views of the VLAD --lever_layer descriptor, the default
head on it). `default` is the default recipe again under the same --lever_epochs and
--lever_patience, so each lever's time per epoch is a ratio to it measured in this run.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainable_vpr import training  # noqa: E402
from trainable_vpr.training import TrainResult  # noqa: E402
import trainable_vpr as vpr  # noqa: E402
from trainable_vpr.model import PlaceDescriptor, describe_table  # noqa: E402
from vprkit.cli import atomic_write  # noqa: E402
from vprkit.retrieval.evaluation import Descriptors, evaluate_variant, fit_pca_whitening  # noqa: E402
from vprkit.cli.extraction_settings import ExtractionSettings  # noqa: E402
from vprkit.extraction.features import extract_features  # noqa: E402
from vprkit.tables.pairs import positive_pairs  # noqa: E402
from vprkit.tables.places import PlaceTable, load_poses  # noqa: E402
from vprkit.retrieval.whitening import choose_shrinkage  # noqa: E402
from vprkit.extraction.pooling import PoolingConfig  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "bgu_campus"
SPLITS = ("train", "val", "test", "queries")
THRESHOLDS_M = (25.0, 10.0)
# The seed recipe's flags (bench/seed_recipe.toml, as `--config` gives them to train_vpr.py).
SEED_RECIPE = tomllib.loads((REPO / "bench" / "seed_recipe.toml").read_text())
RECIPES = {"default": {}, "seed": {k: v for section in SEED_RECIPE.values() for k, v in section.items()}}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA, help="folder with train/val/test/queries CSVs")
    parser.add_argument("--model", default="effnet_lite0")
    parser.add_argument("--weights", default=None, help="a weights file (e.g. the DINOv2-S file of "
                        "../shared/tools/dinov2_s_weights.sh); default: the backbone's own")
    parser.add_argument("--image_size", type=int, default=0, help="input size (0: the backbone's default)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--cache_dir", default=str(REPO / ".cache" / "features"))
    parser.add_argument("--out_dir", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--thresholds", type=float, nargs="+", default=list(THRESHOLDS_M), help="metres")
    parser.add_argument("--pooling_rows", action="store_true", help="add the gem / vlad rows (see above)")
    parser.add_argument("--pooled", nargs="*", default=[f"{p}:{layer}" for p, layer in POOLED_ROWS],
                        metavar="POOLING:LAYER", help="with --pooling_rows: the pooled rows")
    parser.add_argument("--train_pooled", nargs="*", default=["vlad:-2", "gem:-2"], metavar="POOLING:LAYER",
                        help="with --pooling_rows: pooled descriptors the recipes are trained on")
    parser.add_argument("--levers", nargs="*", default=[], choices=list(LEVERS),
                        help="issue 18's levers, each alone (see above)")
    parser.add_argument("--lever_layer", type=int, default=-2, help="--feature_layer of the netvlad and augment+vlad "
                        "levers (the VLAD layer val prefers: effnet_lite0 -2, DINOv2-S 8)")
    parser.add_argument("--train_blocks", type=int, default=1, help="N of the train_blocks lever")
    parser.add_argument("--lever_epochs", type=int, default=15, help="epochs of each lever row")
    parser.add_argument("--lever_patience", type=int, default=0, help="--early_stopping_patience of each lever row")
    args = parser.parse_args()
    if args.pooling_rows and not set(args.train_pooled) <= set(args.pooled):
        # checked before any extraction: a --train_pooled spec missing from --pooled died with a KeyError after training
        parser.error(f"--train_pooled {' '.join(sorted(set(args.train_pooled) - set(args.pooled)))} "
                     "must also be in --pooled (or pass --train_pooled with no value)")
    return args


POOLED_ROWS = (("gem", -1), ("gem", -2), ("vlad", -1), ("vlad", -2))
# issue 18's levers: the TrainConfig changes of each (args: --lever_layer, --train_blocks)
LEVERS = {
    "default": lambda args: {},
    "augment": lambda args: {"augment_views": 3},
    "netvlad": lambda args: {"head": "netvlad", "pooling": "vlad", "feature_layer": args.lever_layer},
    "train_blocks": lambda args: {"train_blocks": args.train_blocks, "backbone_lr": 1e-5},
    "augment+vlad": lambda args: {"augment_views": 3, "pooling": "vlad", "feature_layer": args.lever_layer},
}


def pooled_features(pooling: str, layer: int, args: argparse.Namespace, tables: dict[str, PlaceTable],
                    options: ExtractionSettings) -> dict[str, np.ndarray]:
    """Every split pooled as --pooling POOLING --feature_layer LAYER (vocabulary: train.csv)."""
    backbone = vpr.create_pooled_backbone(args.model, args.weights, args.image_size, PoolingConfig(pooling, layer, 32),
                                          tables["train"].paths, options)
    return {s: extract_features(backbone, t, options, s) for s, t in tables.items()}


def recall_rows(name: str, seed: int | None, desc: dict[str, np.ndarray], tables: dict[str, PlaceTable],
                thresholds: tuple[float, ...] = THRESHOLDS_M) -> list[dict]:
    """R@1/5/10 of one variant on test and queries at each threshold, overall and per condition."""
    rows = []
    for split in ("val", "test", "queries"):
        for threshold in thresholds:
            report = evaluate_variant(
                name, Descriptors(desc["train"], desc[split]), tables["train"], tables[split], threshold, (1, 5, 10))
            groups = {"all": report.result.recalls, **report.by_condition}
            for condition, recalls in groups.items():
                rows.append({"variant": name, "seed": seed, "split": split, "threshold_m": threshold,
                             "condition": condition, **{f"R@{n}": r for n, r in recalls.items()}})
    return rows


def quiet_train(config: vpr.TrainConfig) -> TrainResult:
    """training.train without its per-epoch output."""
    with contextlib.redirect_stdout(io.StringIO()):
        return training.train(config)


def run_line(label: str, result: TrainResult, extra: str = "") -> str:
    """One line a bench prints per trained run: the best val R@1, its epoch and the start it trained from."""
    return (f"  {label}: best val R@1 {result.best_recall[1]:.3f} at epoch {result.best_epoch} (start "
            f"{(result.head_start or {}).get('label', '-')}, val R@1 {result.untrained_r1:.3f}){extra}")


def mean_epoch_seconds(log_file: Path) -> float:
    """The mean epoch_time of a run log's epoch rows (training only, no validation)."""
    log = pd.read_csv(log_file)
    return float(log[log.event == "epoch"].epoch_time.mean())


def bench_config(args: argparse.Namespace, seed: int, threshold: float, checkpoint_dir: str,
                 **changes) -> vpr.TrainConfig:
    """A training run on --data's train.csv, chosen on its val.csv, as this bench's flags say."""
    return vpr.TrainConfig(train_csv=str(args.data / "train.csv"), val_csv=str(args.data / "val.csv"),
                           model=args.model, weights=args.weights, image_size=args.image_size, seed=seed,
                           pos_threshold_m=threshold, cache_dir=args.cache_dir, log_dir=str(args.out_dir / "logs"),
                           checkpoint_dir=str(args.out_dir / checkpoint_dir), **changes)


def trained_descriptors(recipe: str, seed: int, threshold: float, args: argparse.Namespace,
                        features: dict[str, np.ndarray],
                        pooling: tuple[str, int] = ("backbone", -1)) -> dict[str, np.ndarray]:
    config = bench_config(args, seed, threshold, f"models_{threshold:g}m_{pooling[0]}{pooling[1]}",
                          **RECIPES[recipe], pooling=pooling[0], feature_layer=pooling[1], epochs=args.epochs)
    result = quiet_train(config)
    print(run_line(f"{recipe} recipe on {pooling[0]} L{pooling[1]}, {threshold:g} m, seed {seed}", result), flush=True)
    model = PlaceDescriptor.from_checkpoint(result.checkpoint, with_backbone=False)  # the features are the cache's
    return {split: model.describe_features(feats) for split, feats in features.items()}


def lever_rows(lever: str, seed: int, threshold: float, args: argparse.Namespace,
               tables: dict[str, PlaceTable], options: ExtractionSettings) -> list[dict]:
    """One lever's trained row: its best checkpoint (by val R@1) described through the model object
    (the lever's own cache: local features, block inputs), with its mean epoch time (s)."""
    config = bench_config(args, seed, threshold, f"models_{threshold:g}m_{lever}", epochs=args.lever_epochs,
                          early_stopping_patience=args.lever_patience, **LEVERS[lever](args))
    result = quiet_train(config)
    epoch_s = mean_epoch_seconds(result.log_file)
    print(run_line(f"lever {lever}, {threshold:g} m, seed {seed}", result, f", {epoch_s:.1f} s an epoch"), flush=True)
    model = PlaceDescriptor.from_checkpoint(result.checkpoint, weights=args.weights)
    with contextlib.redirect_stdout(io.StringIO()):
        descriptors = {s: describe_table(model, t, options, s)[1] for s, t in tables.items()}
    return [{**row, "epoch_s": epoch_s} for row in recall_rows(f"lever {lever}", seed, descriptors, tables,
                                                               (threshold,))]


def learned_whitening(features: dict[str, np.ndarray], tables: dict[str, PlaceTable], threshold: float):
    """Learned whitening (vprkit.retrieval.whitening, 256 d) of train.csv's positive pairs at `threshold`,
    its shrinkage chosen on val.csv R@1 against train.csv (as the head's learned_whitened start)."""
    train = tables["train"]
    choice = choose_shrinkage(features["train"], positive_pairs(train.xyz, None, threshold), train.xyz,
                              features["val"], tables["val"].xyz, threshold, 256)
    print(f"  learned_whitened at {threshold:g} m: shrinkage {choice.shrinkage:g} chosen on val.csv", flush=True)
    return choice.whitening


def summary_table(rows: list[dict]) -> pd.DataFrame:
    """R@1 as mean ± std over seeds: one row per variant, one column per split/threshold/condition."""
    frame = pd.DataFrame(rows)
    stats = (frame.groupby(["variant", "split", "threshold_m", "condition"], sort=False)["R@1"]
             .agg(["mean", "std"]).reset_index())
    stats["cell"] = [f"{m:.3f}" + (f" ± {s:.3f}" if s == s and s > 0 else "")
                     for m, s in zip(stats["mean"], stats["std"])]
    stats["column"] = stats["split"] + " " + stats["threshold_m"].map(lambda t: f"{t:g} m") + " " + stats["condition"]
    return stats.pivot(index="variant", columns="column", values="cell").reindex(
        index=list(dict.fromkeys(frame["variant"])), columns=list(dict.fromkeys(stats["column"])))


def epoch_time_ratios(rows: list[dict]) -> pd.DataFrame:
    """Each lever's mean time per epoch against the default recipe's in the same run (--levers default)."""
    frame = pd.DataFrame([r for r in rows if r.get("epoch_s", np.nan) == r.get("epoch_s", np.nan)])
    seconds = frame.drop_duplicates(["variant", "seed", "threshold_m"]).groupby("variant", sort=False)["epoch_s"].mean()
    return pd.DataFrame({"s per epoch": seconds, "ratio to default": seconds / seconds.get("lever default", np.nan)})


def main() -> None:
    args = parse_args()
    tables = {s: load_poses(args.data / f"{s}.csv") for s in SPLITS}
    backbone = vpr.create_backbone(args.model, args.weights, args.image_size)
    options = ExtractionSettings(cache_dir=args.cache_dir)
    features = {s: extract_features(backbone, t, options, s) for s, t in tables.items()}

    rows = recall_rows("raw", None, features, tables)
    project = fit_pca_whitening(features["train"], 256)
    rows += recall_rows("pca_whitened", None, {s: project(f) for s, f in features.items()}, tables)
    for threshold in args.thresholds:  # learned whitening: train.csv's pairs at the row's threshold, s chosen on val
        whitening = learned_whitening(features, tables, threshold)
        rows += recall_rows("learned_whitened", None, {s: whitening.apply(f) for s, f in features.items()}, tables,
                            (threshold,))
    for recipe in args.recipes:
        for threshold in args.thresholds:
            for seed in args.seeds:
                descriptors = trained_descriptors(recipe, seed, threshold, args, features)
                rows += recall_rows(f"{recipe} recipe", seed, descriptors, tables, (threshold,))
    if args.pooling_rows:
        pooled = {}
        for pooling, layer in ((spec.split(":")[0], int(spec.split(":")[1])) for spec in args.pooled):
            pooled[pooling, layer] = pooled_features(pooling, layer, args, tables, options)
            rows += recall_rows(f"{pooling} L{layer}", None, pooled[pooling, layer], tables)
            project = fit_pca_whitening(pooled[pooling, layer]["train"], 256)
            rows += recall_rows(f"{pooling} L{layer} pca_whitened", None,
                                {s: project(f) for s, f in pooled[pooling, layer].items()}, tables)
        for spec in args.train_pooled:
            pooling, layer = spec.split(":")[0], int(spec.split(":")[1])
            for recipe in args.recipes:
                for threshold in args.thresholds:
                    for seed in args.seeds:
                        descriptors = trained_descriptors(recipe, seed, threshold, args, pooled[pooling, layer],
                                                          (pooling, layer))
                        rows += recall_rows(f"{recipe} recipe on {pooling} L{layer}", seed, descriptors, tables,
                                            (threshold,))

    for lever in args.levers:
        for threshold in args.thresholds:
            for seed in args.seeds:
                rows += lever_rows(lever, seed, threshold, args, tables, options)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out_dir / "recall_bgu.csv", lambda p: pd.DataFrame(rows).to_csv(p, index=False))
    table = summary_table(rows)
    print(f"\nR@1 on bgu_campus ({args.model}; database train.csv; trained rows: mean ± std over seeds {args.seeds})")
    for split in ("val", "test", "queries"):
        cols = [c for c in table.columns if c.startswith(split)]
        print("\n" + table[cols].to_string())
    if args.levers:
        print("\n" + epoch_time_ratios(rows).to_string(float_format=lambda v: f"{v:.2f}"))
    print(f"\nall rows (R@1/5/10 per seed): {args.out_dir / 'recall_bgu.csv'}")


if __name__ == "__main__":
    main()
