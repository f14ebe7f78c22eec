#!/usr/bin/env python3
"""The frozen and closed-form rows of one backbone on bgu_campus (issue 18 section 5). No training.

    .venv/bin/python bench/frozen_bgu.py --cache_dir /work/ref/cache              # effnet_lite0, pooled rows at L-2
    .venv/bin/python bench/frozen_bgu.py --model dinov2_s --weights FILE --image_size 224 \\
        --choose_layer 6 8 10 -1 --cache_dir /work/cache_vit                      # layer chosen on val.csv

Database train.csv; queries val.csv, test.csv, queries.csv; at 25 m and 10 m; R@1/5/10
(recall_bgu.recall_rows: each split overall and per condition). Rows, for each descriptor
D of: raw (the backbone's own vector), gem L{layer}, vlad L{layer} (K = --vlad_clusters, the
vocabulary fitted on train.csv, as eval_trained --baseline fits it on its database):
  D, D pca_whitened (--dim, fitted on train.csv), D learned_whitened (vprkit.retrieval.whitening: pairs of
  train.csv by the pair rule at the row's threshold, the shrinkage chosen on val.csv R@1 at that
  threshold; printed).
--choose_layer: candidate layers for the pooled rows, scored on val.csv only (VLAD, val queries
against train.csv, R@1 at 25 m, only train.csv and val.csv extracted); the best (a tie: the later
candidate given) is the layer of every pooled row (GeM vs VLAD is then read on the val columns). Nothing is chosen on
test.csv or queries.csv. Writes {out_dir}/frozen_bgu_{model}.csv.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from recall_bgu import DATA, SPLITS, THRESHOLDS_M, recall_rows  # noqa: E402
from trainable_vpr.model import describe_table, load_model  # noqa: E402
from vprkit.cli import atomic_write  # noqa: E402
from vprkit.retrieval.evaluation import evaluate_retrieval, fit_pca_whitening  # noqa: E402
from vprkit.cli.extraction_settings import ExtractionSettings  # noqa: E402
from vprkit.tables.pairs import positive_pairs  # noqa: E402
from vprkit.tables.places import PlaceTable, load_poses  # noqa: E402
from vprkit.retrieval.whitening import SHRINKAGE_GRID, choose_shrinkage  # noqa: E402

QUERY_SPLITS = ("val", "test", "queries")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA, help="folder with train/val/test/queries CSVs")
    parser.add_argument("--model", default="effnet_lite0")
    parser.add_argument("--weights", default=None, help="backbone weights FILE (as the scripts' --weights)")
    parser.add_argument("--image_size", type=int, default=0)
    parser.add_argument("--cache_dir", default=str(REPO / ".cache" / "features"))
    parser.add_argument("--feature_layer", type=int, default=-2,
                        help="layer of the pooled rows (without --choose_layer)")
    parser.add_argument("--choose_layer", type=int, nargs="*", default=[], metavar="LAYER",
                        help="candidate layers; the pooled rows use the one with the best VLAD val.csv R@1 at 25 m")
    parser.add_argument("--pooled", nargs="*", default=["gem", "vlad"], choices=["gem", "vlad"])
    parser.add_argument("--vlad_clusters", type=int, default=32)
    parser.add_argument("--dim", type=int, default=256, help="output dimension of both whitenings")
    parser.add_argument("--grid", type=float, nargs="+", default=list(SHRINKAGE_GRID), help="shrinkages tried on val")
    parser.add_argument("--out_dir", type=Path, default=REPO / "bench" / "results")
    return parser.parse_args()


def frozen_features(args: argparse.Namespace, tables: dict[str, PlaceTable], pooling: str = "backbone",
                    layer: int = -1) -> dict[str, np.ndarray]:
    """The baseline descriptors (eval_trained --baseline's path) of every table, through the cache."""
    settings = ExtractionSettings(weights=args.weights, image_size=args.image_size, pooling=pooling,
                                  feature_layer=layer, vlad_clusters=args.vlad_clusters, cache_dir=args.cache_dir)
    model = load_model(None, args.model, settings, fit_on=tables["train"].paths)
    return {split: describe_table(model, table, settings, split)[1] for split, table in tables.items()}


def val_r1(feats: dict[str, np.ndarray], tables: dict[str, PlaceTable], threshold: float = 25.0) -> float:
    result = evaluate_retrieval(feats["train"], tables["train"].xyz, feats["val"], tables["val"].xyz, threshold, (1,))
    return result.recalls[1]


def choose_layer(args: argparse.Namespace, tables: dict[str, PlaceTable]) -> tuple[int, list[dict]]:
    """Each candidate layer's VLAD val.csv R@1 at 25 m (only train.csv and val.csv extracted); the best."""
    subset = {s: tables[s] for s in ("train", "val")}
    scores: list[dict] = []
    for layer in args.choose_layer:
        r1 = val_r1(frozen_features(args, subset, "vlad", layer), subset)
        scores.append({"pooling": "vlad", "layer": layer, "val_r1_25m": r1})
        print(f"  choose: vlad L{layer} val.csv R@1 (25 m) {r1:.3f}", flush=True)
    best = max(reversed(scores), key=lambda s: s["val_r1_25m"])  # ties: the later candidate given
    return int(best["layer"]), scores


def closed_form_rows(name: str, feats: dict[str, np.ndarray], tables: dict[str, PlaceTable],
                     args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    """D, D pca_whitened and D learned_whitened (shrinkage chosen on val per threshold): R@1/5/10 rows."""
    rows = recall_rows(name, None, feats, tables)
    project = fit_pca_whitening(feats["train"], args.dim)
    rows += recall_rows(f"{name} pca_whitened", None, {s: project(f) for s, f in feats.items()}, tables)
    notes = []
    train = tables["train"]
    for threshold in THRESHOLDS_M:
        pairs = positive_pairs(train.xyz, None, threshold)
        choice = choose_shrinkage(feats["train"], pairs, train.xyz, feats["val"], tables["val"].xyz, threshold,
                                  args.dim, args.grid)
        grid = " ".join(f"{s:g}:{r:.3f}" for s, r in choice.val_r1.items())
        notes.append(f"{name} learned_whitened, {threshold:g} m: val R@1 by shrinkage {grid} "
                     f"-> s = {choice.shrinkage:g}")
        print("  " + notes[-1], flush=True)
        rows += [dict(row, shrinkage=choice.shrinkage) for row in recall_rows(
            f"{name} learned_whitened", None, {s: choice.whitening.apply(f) for s, f in feats.items()}, tables,
            (threshold,))]
    return rows, notes


def main() -> None:
    args = parse_args()
    tables = {s: load_poses(args.data / f"{s}.csv") for s in SPLITS}
    layer, layer_scores = args.feature_layer, []
    if args.choose_layer:
        layer, layer_scores = choose_layer(args, tables)
        print(f"layer chosen on val.csv: {layer}", flush=True)

    rows, notes = closed_form_rows("raw", frozen_features(args, tables), tables, args)
    for pooling in args.pooled:
        more, more_notes = closed_form_rows(f"{pooling} L{layer}", frozen_features(args, tables, pooling, layer),
                                            tables, args)
        rows, notes = rows + more, notes + more_notes

    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"frozen_bgu_{args.model}.csv"
    atomic_write(out, lambda p: pd.DataFrame(rows).to_csv(p, index=False))
    frame = pd.DataFrame(rows)
    frame = frame[frame["condition"] == "all"]
    frame["cell"] = [f"{a:.3f} / {b:.3f} / {c:.3f}" for a, b, c in zip(frame["R@1"], frame["R@5"], frame["R@10"])]
    frame["column"] = frame["split"] + " " + frame["threshold_m"].map(lambda t: f"{t:g} m")
    table = frame.pivot_table(index="variant", columns="column", values="cell", aggfunc="first", sort=False)
    print(f"\nR@1 / R@5 / R@10 on {args.data.name} ({args.model}; database train.csv; pooled rows at layer {layer}, "
          f"K = {args.vlad_clusters}; whitening {args.dim} d; shrinkage chosen on val.csv)")
    for line in [f"{s['pooling']} L{s['layer']}: val R@1 25 m {s['val_r1_25m']:.3f}" for s in layer_scores] + notes:
        print("  " + line)
    with pd.option_context("display.width", 250, "display.max_columns", 20):
        for threshold in THRESHOLDS_M:
            print("\n" + table[[f"{s} {threshold:g} m" for s in QUERY_SPLITS]].to_string())
    print(f"\nall rows (per condition): {out}")


if __name__ == "__main__":
    main()
