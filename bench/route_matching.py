#!/usr/bin/env python3
"""Training-free sequence matching on the shared railway route (issue 24 item 2), no training.

    .venv/bin/python bench/route_matching.py --cache_dir /tmp/route_cache

Winter queries (queries.csv) against the summer map (database.csv), the development test of
../shared/data/nordland_route; frozen effnet_lite0 frame descriptors (the backbone's own vector,
eval_trained --baseline's path, through the feature cache). Per --seq_len: R@1 / R@5 at 25 m of
one frame (faiss) and of sequence matching (vprkit.routes.matching) at velocity 1 only and over
--seq_velocity MIN MAX. Writes {out_dir}/route_matching.csv, the similarity matrix with the
matched path (the longest window, the velocity range) and R@1 against the window length.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainable_vpr.model import describe_table, load_model  # noqa: E402
from vprkit.cli import atomic_write  # noqa: E402
from vprkit.evaluation import evaluate_retrieval, l2_normalise  # noqa: E402
from vprkit.features import ExtractionSettings  # noqa: E402
from vprkit.places import load_poses  # noqa: E402
from vprkit.routes.figures import draw_recall_by_seq_len, draw_similarity_path  # noqa: E402
from vprkit.routes.matching import SeqMatchConfig, matches_recall, sequence_match  # noqa: E402
from vprkit.routes.order import route_of  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "nordland_route"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--model", default="effnet_lite0")
    parser.add_argument("--cache_dir", default=str(REPO / ".cache" / "features"))
    parser.add_argument("--seq_len", type=int, nargs="+", default=[1, 5, 10, 20])
    parser.add_argument("--seq_velocity", type=float, nargs=2, default=[0.8, 1.25], metavar=("MIN", "MAX"))
    parser.add_argument("--max_gap", type=float, default=5, help="frames; a larger gap in frame_index cuts a drive")
    parser.add_argument("--pos_threshold_m", type=float, default=25.0)
    parser.add_argument("--out_dir", type=Path, default=REPO / "bench" / "results")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    tables = {s: load_poses(args.data / f"{s}.csv") for s in ("queries", "database")}
    settings = ExtractionSettings(cache_dir=args.cache_dir)
    model = load_model(None, args.model, settings)
    desc = {s: l2_normalise(describe_table(model, t, settings, s)[1]) for s, t in tables.items()}
    routes = {s: route_of(t, args.max_gap) for s, t in tables.items()}
    q_xyz, db_xyz = tables["queries"].xyz, tables["database"].xyz
    single = evaluate_retrieval(desc["database"], db_xyz, desc["queries"], q_xyz, args.pos_threshold_m, (1, 5))
    velocity_sets = {"velocity 1": (1.0, 1.0), "velocities {:g}-{:g}".format(*args.seq_velocity): args.seq_velocity}
    rows, by_len = [], {"one frame": {}}
    for seq_len in args.seq_len:
        rows.append(dict(method="one frame", seq_len=seq_len, **{f"R@{n}": r for n, r in single.recalls.items()}))
        by_len["one frame"][seq_len] = single.recalls[1]
        for name, (v_min, v_max) in velocity_sets.items():
            config = SeqMatchConfig(seq_len, v_min, v_max)
            matches = sequence_match(desc["queries"], routes["queries"], desc["database"], routes["database"],
                                     config, k=5)
            recalls = matches_recall(matches, db_xyz, q_xyz, args.pos_threshold_m, (1, 5))
            method = f"sequence matching, {name}"
            rows.append(dict(method=method, seq_len=seq_len, **{f"R@{n}": r for n, r in recalls.items()}))
            by_len.setdefault(method, {})[seq_len] = recalls[1]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows)
    atomic_write(args.out_dir / "route_matching.csv", lambda p: frame.to_csv(p, index=False))
    truth = np.linalg.norm(db_xyz[None] - q_xyz[:, None], axis=2).argmin(axis=1)  # 338 x 338: small data only
    draw_similarity_path(desc["queries"], desc["database"], matches.index[:, 0], truth,
                         args.out_dir / "route_similarity_path.png",
                         title=f"{args.data.name}: winter queries x summer map, L = {args.seq_len[-1]}")
    draw_recall_by_seq_len(by_len, args.out_dir / "route_recall_by_seq_len.png",
                           title=f"{args.data.name} dev test, R@1 at {args.pos_threshold_m:g} m ({args.model})")
    print(f"R@1 / R@5 at {args.pos_threshold_m:g} m, {args.data.name} queries.csv (winter) vs database.csv (summer), "
          f"{args.model} frozen frame descriptors")
    frame["cell"] = [f"{a:.3f} / {b:.3f}" for a, b in zip(frame["R@1"], frame["R@5"])]
    print(frame.pivot_table(index="method", columns="seq_len", values="cell", aggfunc="first", sort=False).to_string())
    print(f"rows and figures in {args.out_dir}")


if __name__ == "__main__":
    main()
