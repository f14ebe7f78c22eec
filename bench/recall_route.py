#!/usr/bin/env python3
"""Routes: does a learned sequence descriptor beat training-free sequence matching? (issue 24)

    nice -n 10 .venv/bin/python bench/recall_route.py               # effnet_lite0, L 1 5 10 20, seeds 1 2 3
    nice -n 10 .venv/bin/python bench/recall_route.py --choices     # + the head's design choices at L 10, 20
    nice -n 10 .venv/bin/python bench/recall_route.py --speed       # + matching vs single-frame search, 10k x 100k

On ../shared/data/nordland_route (winter queries against the summer map; train.csv both seasons,
val.csv against val_db.csv, the development test queries.csv against database.csv), frame
descriptors extracted once through the feature cache. Per window length L, R@1 / R@5 at 25 m on
the development test and R@1 on val:
  one_frame     the frame descriptor alone (raw, the frozen backbone's);
  window_mean   the mean of the window's L2-normalised raw frame descriptors;
  seq_match     training-free sequence matching (vprkit.routes.matching) over the frame descriptor
                (raw or learned-whitened, each shrinkage) and velocity range (1 or 0.8-1.25) best
                on val;
  seq_start     the untrained sequence head (trainable_vpr.seqnet; its frame start chosen on val);
  seq_head      the trained head alone (trainable_vpr.sequence_training, the epoch chosen on val;
                mean over --seeds, with the standard deviation), and its epoch time;
  seq_trained   the trained head fused with seq_match (trainable_vpr.fusion: the head shortlists
                --shortlist windows, z-scored head similarity + w x z-scored matching score, w
                chosen on val from FUSION_WEIGHTS; w = 0 is seq_head).
--choices trains variants of the head (frame start, temporal kernel, projection size, frame
dropout, stride augmentation, learning rate, SeqNet's full Conv1d) and prints val and test R@1 of
each. Everything is chosen on val; test only reports. Writes bench/results/recall_route*.csv.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import trainable_vpr as vpr  # noqa: E402
from trainable_vpr.seqnet import SeqHeadConfig, fit_frame_whitenings, start_sequence_head  # noqa: E402
from trainable_vpr.sequence_training import (RouteFrames, SeqTrainConfig, SequenceResult,  # noqa: E402
                                             choose_sequence_start, train_sequence_head, window_recall)
from trainable_vpr.fusion import choose_fusion_weight, shortlist_scores  # noqa: E402
from trainable_vpr.sequence_run import choose_matching, frame_candidates  # noqa: E402
from vprkit.cli import atomic_write  # noqa: E402
from vprkit.retrieval.evaluation import evaluate_retrieval, l2_normalise  # noqa: E402
from vprkit.cli.extraction_settings import ExtractionSettings  # noqa: E402
from vprkit.extraction.features import extract_features  # noqa: E402
from vprkit.tables.places import load_poses  # noqa: E402
from vprkit.routes.matching import SeqMatchConfig, matches_recall, sequence_match  # noqa: E402
from vprkit.routes.order import route_of  # noqa: E402
from vprkit.retrieval.whitening import SHRINKAGE_GRID, Whitening  # noqa: E402
from vprkit.routes.windows import causal_windows  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "nordland_route"
SPLITS = ("train", "val", "val_db", "queries", "database")
THRESHOLD_M = 25.0
VELOCITIES = {"v 1": (1.0, 1.0), "v 0.8-1.25": (0.8, 1.25)}  # seq_match's velocity ranges (chosen on val)
EVALS = {"val": ("val", "val_db"), "test": ("queries", "database")}  # (queries, database) splits
# --choices: each variant changes the default head (SeqHeadConfig) or training (SeqTrainConfig)
CHOICES: dict[str, tuple[dict, dict]] = {
    "default": ({}, {}),
    "lr 3e-4": ({}, {"lr": 3e-4}),
    "lr 1e-4": ({}, {"lr": 1e-4}),
    "kernel 3 (temporal conv)": ({"kernel": 3}, {}),
    "d 64": ({"proj_dim": 64}, {}),
    "d 256": ({"proj_dim": 256}, {}),
    "frame dropout 0.2": ({"frame_dropout": 0.2}, {}),
    "steps 1,2 (stride aug.)": ({}, {"steps": (1, 2)}),
    "projection trained too, lr 1e-4": ({}, {"train_projection": True, "lr": 1e-4}),
    "full Conv1d (SeqNet), lr 1e-4": ({"arch": "full"}, {"lr": 1e-4}),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--model", default="effnet_lite0")
    parser.add_argument("--seq_lens", type=int, nargs="+", default=[1, 5, 10, 20])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--proj_dim", type=int, default=128)
    parser.add_argument("--kernel", type=int, default=0, help="temporal conv width (0: none; best on val at L=10)")
    parser.add_argument("--shortlist", type=int, default=50, help="windows the head shortlists for fusion")
    parser.add_argument("--max_gap", type=float, default=10.0, help="frames: a larger gap cuts a drive")
    parser.add_argument("--choices", action="store_true", help="also the design-choice table (see above)")
    parser.add_argument("--speed", action="store_true",
                        help="also time sequence matching against single-frame search at 10k x 100k (synthetic)")
    parser.add_argument("--choice_lens", type=int, nargs="+", default=[10, 20])
    parser.add_argument("--cache_dir", default=str(REPO / ".cache" / "features"))
    parser.add_argument("--out_dir", type=Path, default=REPO / "bench" / "results")
    return parser.parse_args()


def load_route(args: argparse.Namespace) -> dict[str, RouteFrames]:
    """Every split's frame descriptors (through the cache), route order and positions."""
    tables = {s: load_poses(args.data / f"{s}.csv") for s in SPLITS}
    backbone = vpr.create_backbone(args.model)
    options = ExtractionSettings(cache_dir=args.cache_dir)
    return {s: RouteFrames(extract_features(backbone, t, options, s), route_of(t, args.max_gap), t.xyz)
            for s, t in tables.items()}


def recalls(db: np.ndarray, q: np.ndarray, data: dict[str, RouteFrames], queries: str, database: str) -> dict:
    result = evaluate_retrieval(db, data[database].xyz, q, data[queries].xyz, THRESHOLD_M, (1, 5))
    return result.recalls


def frozen_rows(data: dict[str, RouteFrames], seq_len: int) -> list[dict]:
    """one_frame and window_mean: val and test R@1 / R@5."""
    frames = {s: l2_normalise(d.features) for s, d in data.items()}
    described = {"one_frame": frames,
                 "window_mean": {s: f[causal_windows(data[s].route, seq_len)].mean(1) for s, f in frames.items()}}
    rows = []
    for name, desc in described.items():
        row = {"L": seq_len, "method": name, "seed": None}
        for split, (queries, database) in EVALS.items():
            r = recalls(desc[database], desc[queries], data, queries, database)
            row.update({f"{split}_r1": r[1], f"{split}_r5": r[5]})
        rows.append(row)
    return rows


def frame_descriptors(data: dict[str, RouteFrames],
                      whitenings: dict[float, Whitening]) -> dict[str, dict[str, np.ndarray]]:
    """seq_match's frame descriptor candidates (trainable_vpr.sequence_run.frame_candidates: raw and
    learned-whitened, fitted on train.csv's cross-season pairs, --proj_dim dims, each shrinkage of
    the grid), every split."""
    return {name: {s: (l2_normalise(d.features) if w is None else w.apply(d.features)) for s, d in data.items()}
            for name, w in frame_candidates(whitenings).items()}


@dataclass
class MatchChoice:
    """seq_match as val chose it: the frame descriptor (name, every split) and the matching config."""

    frames: str
    desc: dict[str, np.ndarray]
    config: SeqMatchConfig


def seq_match_row(data: dict[str, RouteFrames], frames: dict[str, dict[str, np.ndarray]],
                  whitenings: dict[float, Whitening], seq_len: int) -> tuple[dict, MatchChoice]:
    """The frame descriptor and velocity range with the best val R@1 (sequence_run.choose_matching;
    a tie: the earlier), its row."""
    configs = {velocity: SeqMatchConfig(seq_len, *VELOCITIES[velocity]) for velocity in VELOCITIES}
    name, velocity, scores = choose_matching(data["val"], data["val_db"], frame_candidates(whitenings), configs,
                                             THRESHOLD_M)
    choice = MatchChoice(name, frames[name], configs[velocity])
    matches = sequence_match(choice.desc["queries"], data["queries"].route, choice.desc["database"],
                             data["database"].route, choice.config, k=5)
    test = matches_recall(matches, data["database"].xyz, data["queries"].xyz, THRESHOLD_M, (1, 5))
    return ({"L": seq_len, "method": "seq_match", "seed": None, "val_r1": scores[(name, velocity)],
             "test_r1": test[1], "test_r5": test[5], "start": f"{name}, {velocity}"}, choice)


def fused_row(seq_len: int, seed: int, head, data: dict[str, RouteFrames], match: MatchChoice,
              shortlist: int) -> dict:
    """seq_trained: the head's top-`shortlist` windows re-scored with seq_match, w chosen on val."""
    lists = {split: shortlist_scores(head, data[queries], data[database], match.desc[queries], match.desc[database],
                                     match.config, THRESHOLD_M, shortlist)
             for split, (queries, database) in EVALS.items()}
    choice = choose_fusion_weight(*lists["val"].choice_inputs())
    row = {"L": seq_len, "method": "seq_trained", "seed": seed, "fusion_w": choice.weight}
    for split, found in lists.items():
        r = found.recalls(choice.weight, (1, 5))
        row.update({f"{split}_r1": r[1], f"{split}_r5": r[5]})
    return row


def head_row(name: str, seq_len: int, seed: int | None, head, data: dict[str, RouteFrames], **extra) -> dict:
    val = window_recall(head, data["val"], data["val_db"], THRESHOLD_M, (1, 5)).recalls
    test = window_recall(head, data["queries"], data["database"], THRESHOLD_M, (1, 5)).recalls
    return {"L": seq_len, "method": name, "seed": seed, "val_r1": val[1], "val_r5": val[5], "test_r1": test[1],
            "test_r5": test[5], **extra}


def train_seeds(base: SeqHeadConfig, train_config: SeqTrainConfig, data: dict[str, RouteFrames],
                seeds: list[int], whitening: Whitening | None) -> list[SequenceResult]:
    results = []
    for seed in seeds:
        head = start_sequence_head(base, data["train"].features, data["train"].xyz, THRESHOLD_M, seed, whitening)
        results.append(train_sequence_head(data["train"], data["val"], data["val_db"], head, train_config, seed))
    return results


def sequence_rows(args: argparse.Namespace, data: dict[str, RouteFrames], seq_len: int,
                  match: MatchChoice, whitenings: dict[float, Whitening]) -> tuple[list[dict], SeqHeadConfig]:
    """seq_start (frame start chosen on val), seq_head and seq_trained (fused) per seed."""
    config = SeqHeadConfig(seq_len=seq_len, frame_dim=data["train"].features.shape[1], proj_dim=args.proj_dim,
                           kernel=args.kernel)
    head, config, scores = choose_sequence_start(config, data["train"], data["val"], data["val_db"], THRESHOLD_M,
                                                 whitenings=whitenings)
    print(f"L={seq_len}: start chosen on val: {config.frame_start} s={config.shrinkage}; "
          + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()), flush=True)
    rows = [head_row("seq_start", seq_len, None, head, data, start=config.frame_start, shrinkage=config.shrinkage)]
    train_config = SeqTrainConfig(epochs=args.epochs)
    whitening = whitenings.get(config.shrinkage)
    for seed, result in zip(args.seeds, train_seeds(config, train_config, data, args.seeds, whitening)):
        rows.append(head_row("seq_head", seq_len, seed, result.head, data, best_epoch=result.best_epoch,
                             epoch_s=result.epoch_seconds, start=config.frame_start, shrinkage=config.shrinkage))
        rows.append(fused_row(seq_len, seed, result.head, data, match, args.shortlist))
        curve = " ".join(f"{r:.3f}" for r in [result.start_val_r1, *result.val_r1])
        print(f"L={seq_len} seed {seed}: val R@1 by epoch {curve}, kept epoch {result.best_epoch}, "
              f"{result.epoch_seconds:.1f} s/epoch", flush=True)
    return rows, config


def choice_rows(args: argparse.Namespace, data: dict[str, RouteFrames], seq_len: int,
                chosen: SeqHeadConfig, whitenings: dict[float, Whitening]) -> list[dict]:
    """Each CHOICES variant of the head at this L, trained per seed (val and test R@1)."""
    rows = []
    for name, (head_change, train_change) in CHOICES.items():
        tick = time.perf_counter()
        config = dataclasses.replace(chosen, **head_change)
        train_config = dataclasses.replace(SeqTrainConfig(epochs=args.epochs), **train_change)
        whitening = whitenings.get(config.shrinkage) if config.proj_dim == chosen.proj_dim else None
        for seed, result in zip(args.seeds, train_seeds(config, train_config, data, args.seeds, whitening)):
            rows.append(head_row(name, seq_len, seed, result.head, data, best_epoch=result.best_epoch,
                                 epoch_s=result.epoch_seconds, start_val_r1=result.start_val_r1))
        done = pd.DataFrame([r for r in rows if r["method"] == name])
        print(f"L={seq_len} {name}: val R@1 {done['val_r1'].mean():.3f}, test R@1 {done['test_r1'].mean():.3f}, "
              f"{time.perf_counter() - tick:.0f} s", flush=True)
    return rows


def summary(rows: list[dict]) -> pd.DataFrame:
    """Mean (and std over seeds) per L and method."""
    frame = pd.DataFrame(rows)
    columns = [c for c in ("val_r1", "test_r1", "test_r5", "best_epoch", "epoch_s", "fusion_w") if c in frame]
    grouped = frame.groupby(["L", "method"], sort=False)
    out = grouped[columns].mean()
    out["test_r1_std"] = grouped["test_r1"].std()
    out["seeds"] = grouped.size()
    return out.round(3)


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)  # on a shared 2-core machine 1 thread trained 10x faster than 2 (contention)
    faiss.omp_set_num_threads(1)
    data = load_route(args)
    whitenings = fit_frame_whitenings(data["train"].features, data["train"].xyz, THRESHOLD_M, args.proj_dim,
                                      SHRINKAGE_GRID)
    frames = frame_descriptors(data, whitenings)
    rows, choices = [], []
    for seq_len in args.seq_lens:
        rows += frozen_rows(data, seq_len)
        match_row, match = seq_match_row(data, frames, whitenings, seq_len)
        print(f"L={seq_len}: seq_match chosen on val: {match_row['start']}", flush=True)
        rows.append(match_row)
        seq, chosen = sequence_rows(args, data, seq_len, match, whitenings)
        rows += seq
        if args.choices and seq_len in args.choice_lens:
            choices += choice_rows(args, data, seq_len, chosen, whitenings)
    write_csv(pd.DataFrame(rows), args.out_dir / "recall_route.csv")
    print(summary(rows).to_string())
    if choices:
        write_csv(pd.DataFrame(choices), args.out_dir / "recall_route_choices.csv")
        print(summary(choices).to_string())
    if args.speed:
        from seq_matching_speed import speed_report  # the speed bench beside this file

        print(speed_report(10_000, 100_000, 256, SeqMatchConfig(10)))


if __name__ == "__main__":
    main()
