#!/usr/bin/env python3
"""A new route the head never saw: how training and database-side adaptation combine (issue 18 §3).

    nice -n 10 .venv/bin/python bench/held_out_places.py --cache_dir CACHE        # effnet_lite0, seeds 1 2 3

bgu_campus cut in two along its long axis (the first principal axis of train.csv's positions):
route A (below the median) is the user's own data, route B (more than --gap_m beyond the median,
so no B place has a positive in A) is a new route the user maps later. The head trains on
train.csv's A images and chooses its epoch and start on val.csv's A queries against them; the
test is route B: database train.csv's B images (phone A, GPS-tagged, day and night), queries
test.csv's B images (phone B, another day and night). R@1 at --threshold_m. Rows:
  raw; PCA-whitened fitted on A (what the trained head's start carries) or on B's database
  (unsupervised database-side adaptation); learned whitening from A's pairs (shrinkage s chosen
  on A's val), the same with its rotation refitted on B's database (Whitening.refit_rotation),
  and learned whitening from B's database's own GPS pairs (the map is GPS-tagged: supervised
  adaptation without a query label; s as chosen on A); the default trained head (mean ± std over
  seeds), its output PCA-whitened on B's database (eval_trained --pca_whiten), and its output
  learned-whitened on B's database pairs.
Nothing is chosen on route B: it only reports.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import trainable_vpr as vpr  # noqa: E402
from recall_bgu import quiet_train, run_line  # noqa: E402
from trainable_vpr.model import PlaceDescriptor  # noqa: E402
from vprkit.retrieval.evaluation import evaluate_retrieval, fit_pca_whitening, l2_normalise  # noqa: E402
from vprkit.cli.extraction_settings import ExtractionSettings  # noqa: E402
from vprkit.extraction.features import extract_features  # noqa: E402
from vprkit.tables.pairs import positive_pairs  # noqa: E402
from vprkit.tables.places import load_poses  # noqa: E402
from vprkit.retrieval.whitening import choose_shrinkage, fit_learned_whitening  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "bgu_campus"


def route_masks(train_xyz: np.ndarray, gap_m: float):
    """A function giving, for positions, (in route A, in route B) along train.csv's long axis."""
    centre = train_xyz.mean(axis=0)
    axis = np.linalg.svd(train_xyz - centre, full_matrices=False)[2][0]
    median = float(np.median((train_xyz - centre) @ axis))

    def masks(xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        along = (xyz - centre) @ axis
        return along < median, along > median + gap_m
    return masks


def subset_csv(source: Path, mask: np.ndarray, out: Path) -> Path:
    frame = pd.read_csv(source)
    frame[mask].to_csv(out, index=False)
    return out


def trained_head(seed: int, args: argparse.Namespace, csvs: dict[str, Path], out: Path) -> PlaceDescriptor:
    config = vpr.TrainConfig(train_csv=str(csvs["train"]), val_csv=str(csvs["val"]), image_root=str(args.data),
                             model=args.model, seed=seed, epochs=args.epochs, pos_threshold_m=args.threshold_m,
                             cache_dir=args.cache_dir, log_dir=str(out / "logs"), checkpoint_dir=str(out / "models"))
    result = quiet_train(config)
    print(run_line(f"trained on A, seed {seed}", result), flush=True)
    return PlaceDescriptor.from_checkpoint(result.checkpoint, with_backbone=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--model", default="effnet_lite0")
    parser.add_argument("--cache_dir", default=str(REPO / ".cache" / "features"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--threshold_m", type=float, default=25.0)
    parser.add_argument("--gap_m", type=float, default=25.0, help="route B starts this far beyond the median")
    parser.add_argument("--dim", type=int, default=256)
    args = parser.parse_args()

    tables = {s: load_poses(args.data / f"{s}.csv") for s in ("train", "val", "test")}
    features = {s: extract_features(vpr.create_backbone(args.model), t, ExtractionSettings(cache_dir=args.cache_dir), s)
                for s, t in tables.items()}
    masks = route_masks(tables["train"].xyz, args.gap_m)
    route = {s: masks(t.xyz) for s, t in tables.items()}
    a_train, a_val = features["train"][route["train"][0]], features["val"][route["val"][0]]
    a_train_xyz, a_val_xyz = tables["train"].xyz[route["train"][0]], tables["val"].xyz[route["val"][0]]
    b_db, b_q = features["train"][route["train"][1]], features["test"][route["test"][1]]
    b_db_xyz, b_q_xyz = tables["train"].xyz[route["train"][1]], tables["test"].xyz[route["test"][1]]
    t = args.threshold_m
    print(f"route A: {len(a_train)} training images, {len(a_val)} val queries; route B: {len(b_db)} database "
          f"images, {len(b_q)} test queries ({args.gap_m:g} m gap)", flush=True)

    def r1_of(db: np.ndarray, queries: np.ndarray) -> float:
        return evaluate_retrieval(db, b_db_xyz, queries, b_q_xyz, t).recalls[1]

    def r1(describe) -> float:
        return r1_of(describe(b_db), describe(b_q))

    choice = choose_shrinkage(a_train, positive_pairs(a_train_xyz, None, t), a_train_xyz, a_val, a_val_xyz, t,
                              args.dim)
    learned_a = choice.whitening
    learned_b = fit_learned_whitening(b_db, positive_pairs(b_db_xyz, None, t), args.dim, choice.shrinkage)
    rows = [("raw", None, r1(l2_normalise)),
            ("PCA-whitened, fitted on A", None, r1(fit_pca_whitening(a_train, args.dim))),
            ("PCA-whitened, fitted on B's database", None, r1(fit_pca_whitening(b_db, args.dim))),
            (f"learned-whitened on A's pairs (s = {choice.shrinkage:g}, chosen on A's val)", None,
             r1(learned_a.apply)),
            ("  the same, rotation refitted on B's database", None, r1(learned_a.refit_rotation(b_db).apply)),
            ("learned-whitened on B's database pairs", None, r1(learned_b.apply))]
    with tempfile.TemporaryDirectory(prefix="held_out_places-") as tmp:
        out = Path(tmp)
        csvs = {s: subset_csv(args.data / f"{s}.csv", route[s][0], out / f"{s}_A.csv") for s in ("train", "val")}
        for seed in args.seeds:
            model = trained_head(seed, args, csvs, out)
            head_db, head_q = model.describe_features(b_db), model.describe_features(b_q)
            rows.append(("default trained on A", seed, r1_of(head_db, head_q)))
            pca = fit_pca_whitening(head_db, args.dim)
            rows.append(("  its output PCA-whitened on B's database", seed, r1_of(pca(head_db), pca(head_q))))
            lw = fit_learned_whitening(head_db, positive_pairs(b_db_xyz, None, t), args.dim, choice.shrinkage)
            rows.append(("  its output learned-whitened on B's database pairs", seed,
                         r1_of(lw.apply(head_db), lw.apply(head_q))))
    frame = pd.DataFrame(rows, columns=["row", "seed", "R@1"])
    stats = frame.groupby("row", sort=False)["R@1"].agg(["mean", "std", "count"])
    print(f"\nroute B ({args.model}, R@1 at {t:g} m; trained rows mean ± std over seeds {args.seeds}):")
    for name, row in stats.iterrows():
        spread = f" ± {row['std']:.3f}" if row["count"] > 1 else ""
        print(f"  {name:<62} {row['mean']:.3f}{spread}")


if __name__ == "__main__":
    main()
