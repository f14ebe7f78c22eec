#!/usr/bin/env python3
"""Learned whitening (vprkit.retrieval.whitening) against the frozen rows, on bgu_campus. No training.

    .venv/bin/python bench/learned_whitening.py --cache_dir /work/ref/cache

Features: --model's frozen descriptors (the cache). Database train.csv; queries val.csv,
test.csv, queries.csv; at 25 m and 10 m; R@1/5/10. Rows:
  raw, pca_whitened (256 d, fitted on train.csv),
  learned (256 d, pairs of train.csv by the pair rule at the row's threshold, shrinkage chosen
  on val.csv R@1 at that threshold), learned_whitened_rotation (the same with the rotation's
  components whitened: s = 1 is pca_whitened), and the database-side probe: since bgu's
  database IS the training set (refitting on it changes nothing), the probe fits on train.csv's
  day rows only and searches the whole train.csv (day + night): learned fitted on day rows, the
  same with its rotation refitted on the searched database (shrinkage chosen on val.csv
  against that database, each way), and PCA-whitening fitted on day rows / on the database.
Nothing is chosen on test.csv or queries.csv.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import trainable_vpr as vpr  # noqa: E402
from vprkit.retrieval.evaluation import evaluate_retrieval, fit_pca_whitening  # noqa: E402
from vprkit.cli.extraction_settings import ExtractionSettings  # noqa: E402
from vprkit.extraction.features import extract_features  # noqa: E402
from vprkit.tables.pairs import positive_pairs  # noqa: E402
from vprkit.tables.places import load_poses  # noqa: E402
from vprkit.retrieval.whitening import SHRINKAGE_GRID, choose_shrinkage  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "bgu_campus"
QUERY_SPLITS = ("val", "test", "queries")
THRESHOLDS_M = (25.0, 10.0)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA, help="folder with train/val/test/queries CSVs")
    parser.add_argument("--model", default="effnet_lite0")
    parser.add_argument("--cache_dir", default=str(REPO / ".cache" / "features"))
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--grid", type=float, nargs="+", default=list(SHRINKAGE_GRID))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    tables = {s: load_poses(args.data / f"{s}.csv") for s in ("train", *QUERY_SPLITS)}
    backbone = vpr.create_backbone(args.model)
    options = ExtractionSettings(cache_dir=args.cache_dir)
    feats = {s: extract_features(backbone, t, options, s) for s, t in tables.items()}
    train = tables["train"]
    day = np.asarray(train.conditions) == "day"

    rows: list[dict] = []

    def add(variant: str, threshold: float, project, db_feats: np.ndarray = feats["train"]) -> None:
        db = project(db_feats)
        for split in QUERY_SPLITS:
            res = evaluate_retrieval(db, train.xyz, project(feats[split]), tables[split].xyz, threshold, (1, 5, 10))
            rows.append({"variant": variant, "split": split, "threshold_m": threshold,
                         **{f"R@{n}": r for n, r in res.recalls.items()}})

    for threshold in THRESHOLDS_M:
        add("raw", threshold, lambda x: x)
        add("pca_whitened", threshold, fit_pca_whitening(feats["train"], args.dim))
        start = time.perf_counter()
        pairs = positive_pairs(train.xyz, None, threshold)
        print(f"{threshold:g} m: {len(pairs[0])} positive pairs in train.csv ({time.perf_counter() - start:.1f} s)")
        for name, whiten in (("learned", False), ("learned_whitened_rotation", True)):
            start = time.perf_counter()
            choice = choose_shrinkage(feats["train"], pairs, train.xyz, feats["val"], tables["val"].xyz, threshold,
                                      args.dim, args.grid, whiten)
            print(f"  {name}: val R@1 by shrinkage {fmt_grid(choice.val_r1)} -> s = {choice.shrinkage:g} "
                  f"({len(args.grid)} fits in {time.perf_counter() - start:.1f} s)")
            add(name, threshold, choice.whitening.apply)

        # database-side probe: fit on the day rows, search the whole database
        day_index = np.flatnonzero(day)
        day_pairs = positive_pairs(train.xyz[day], None, threshold)
        add("probe: pca_whitened fit on day rows", threshold, fit_pca_whitening(feats["train"][day], args.dim))
        add("probe: pca_whitened fit on database", threshold, fit_pca_whitening(feats["train"], args.dim))
        for name, refit in (("probe: learned fit on day rows", False), ("probe: learned day rows + db refit", True)):
            choice = choose_shrinkage(feats["train"][day_index], day_pairs, train.xyz, feats["val"], tables["val"].xyz,
                                      threshold, args.dim, args.grid, database=feats["train"], refit_on_database=refit)
            print(f"  {name}: val R@1 by shrinkage {fmt_grid(choice.val_r1)} -> s = {choice.shrinkage:g}")
            add(name, threshold, choice.whitening.apply)

    frame = pd.DataFrame(rows)
    frame["cell"] = [f"{a:.3f}/{b:.3f}/{c:.3f}" for a, b, c in zip(frame["R@1"], frame["R@5"], frame["R@10"])]
    frame["column"] = frame["split"] + " " + frame["threshold_m"].map(lambda t: f"{t:g} m")
    table = frame.pivot_table(index="variant", columns="column", values="cell", aggfunc="first", sort=False)
    print(f"\nR@1/R@5/R@10 on {args.data.name} ({args.model}, {args.dim} d; database train.csv; "
          f"shrinkage chosen on val.csv)")
    with pd.option_context("display.width", 250, "display.max_columns", 20):
        for threshold in THRESHOLDS_M:
            print("\n" + table[[f"{s} {threshold:g} m" for s in QUERY_SPLITS]].to_string())


def fmt_grid(scores: dict[float, float]) -> str:
    return " ".join(f"{s:g}:{r:.3f}" for s, r in scores.items())


if __name__ == "__main__":
    main()
