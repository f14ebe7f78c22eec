#!/usr/bin/env python3
"""Localize new photos against a database: top-k matches and a position estimate per photo.

    python localize.py --model_path trained_models/RUN.pth --db_csv data/train.csv \\
        --query new_photos/ --output matches.csv --top_k 5 --picture matches.png
    python localize.py --baseline --model effnet_lite0 --db_csv data/train.csv --query photos.csv --output m.csv

The queries need no ground truth: a folder of photos (.jpg, .jpeg, .png, .bmp, .webp, .tif,
.tiff; not recursive) or a CSV with an image column (image_path, image, path, ...; relative paths
resolve against the CSV's folder). The database is a poses CSV (DESIGN.md §2); its images go
through the checkpoint's backbone once (feature cache shared with training and evaluation).

matches.csv has one row per (query, rank): query_image, rank, db_image, similarity, the
database row's position as written in its CSV (db_lat/db_lon, or db_<x>/db_<y> for easting /
northing, x / y ...) and place label (db_label) where it has them, and the query's position
estimate est_lat/est_lon (or est_<x>/est_<y>) with est_support on every row of that query.

The estimate: the similarity-weighted mean position of those top-k matches that lie within
--pos_threshold_m (default: the checkpoint's, else 25 m) of the top-1 match. With --top_k 1 it is
the top-1's position; with more it averages the matches that agree with the top-1, so one
stray match far away does not pull the estimate off (a plain weighted mean would), while
near-duplicates around the top-1 refine it. est_support says how many matches it averages.

Routes (--seq_len L > 1, DESIGN.md §8): every query frame is localised from its causal window of
L frames. The queries are a folder of frames in --order (name: numbers in names as numbers;
exif_time: EXIF capture time; vprkit.routes.frames) or a CSV with an order column, the database a
route (both checked before any extraction). A single-frame checkpoint or --baseline: sequence
matching over the frame descriptors; a sequence checkpoint of that L: its window descriptor fused
with matching by the weight val chose (SequenceDescriptor.search). matches.csv then also
has window_first, window_last (the frame itself) and window_frames (fewer at a drive start), and
similarity is the ranking's score.

    python localize.py --model_path trained_models/SEQUENCE_RUN.pth --seq_len 10 --db_csv route.csv \
        --query frames/ --order exif_time --output matches.csv
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch.nn as nn

import trainable_vpr as vpr
from trainable_vpr.checkpoints import pos_threshold_of
from trainable_vpr.model import PlaceDescriptor, describe_table
from trainable_vpr.sequence_model import SequenceDescriptor, load_route_model
from vprkit.cli import CliParser, VPRError, atomic_write, run_cli
from vprkit.retrieval.evaluation import exact_search
from vprkit.retrieval.exports import check_pair_names, image_folder_and_names, write_retrieval_pairs
from vprkit.cli.extraction_settings import ExtractionSettings, extraction_settings
from vprkit.extraction.features import extract_table
from vprkit.tables.places import (IMAGE_COLUMNS, LATLON_COLUMNS, METRIC_COLUMNS, PlaceTable, find_column,
                                  find_column_pair, read_csv_table)
from vprkit.tables.load import load_table
from vprkit.retrieval.predictions import draw_retrievals, frame_rows, predictions_frame
from vprkit.cli.settings import config_parser, parse_config
from vprkit.routes.frames import ordered_frames
from vprkit.routes.matching import SeqMatchConfig, sequence_match
from vprkit.routes.order import Route, route_of
from vprkit.routes.windows import causal_windows

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def build_parser() -> CliParser:
    return config_parser(vpr.LocalizeConfig, __doc__.split("\n\n")[0], skip=("camera_id",))


def parse_args(argv: Sequence[str] | None) -> vpr.LocalizeConfig:
    return parse_config(build_parser(), vpr.LocalizeConfig, argv)


# ============================================================================================
# Inputs
# ============================================================================================
def query_table(query: str, order: str = "name") -> PlaceTable:
    """The query photos: every image file of a folder (not recursive) in route order (`order`:
    file names, or EXIF capture times; vprkit.routes.frames), or the rows of a CSV with an image
    column (its other columns kept: an order column makes it a route). No positions."""
    path = Path(query)
    if path.is_dir():
        paths = [str(p) for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        if not paths:
            raise VPRError(f"--query {path}: no images in this folder ({', '.join(IMAGE_SUFFIXES)}); "
                           f"give a folder of photos or a CSV of image paths")
        frame = ordered_frames(paths, order, f"--query {path}")
    elif path.is_file():
        frame = read_csv_table(path, "query CSV")
        column = find_column(frame.columns, IMAGE_COLUMNS)
        if column is None:
            raise VPRError(f"--query {path}: no image column; expected one of {', '.join(IMAGE_COLUMNS)}")
        if frame.empty:
            raise VPRError(f"--query {path}: no rows; list the photos to localize")
        frame = frame.drop(columns=column).assign(image_path=[
            p if Path(p).is_absolute() else str(path.parent / p) for p in frame[column].astype(str)])
    else:
        raise VPRError(f"--query {path}: no such folder or file; give a folder of photos or a CSV of image paths")
    paths = list(frame["image_path"])
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise VPRError(f"--query {path}: image {missing[0]} not found ({len(missing)} missing); fix the path")
    frame = frame.reset_index(drop=True)
    cameras = frame["camera_id"].astype(str).to_numpy() if "camera_id" in frame.columns else None
    return PlaceTable(source=str(path), paths=paths, xyz=None, coord_kind="none", frame=frame, cameras=cameras)


def table_route(table: PlaceTable, flag: str, max_gap: float | None) -> Route:
    """The route order of a table (vprkit.routes.order.route_of), its errors naming the flag."""
    try:
        return route_of(table, max_gap)
    except VPRError as error:
        raise VPRError(f"{flag} {error}") from None


# ============================================================================================
# Matching and the position estimate
# ============================================================================================
def estimate_positions(db_xyz: np.ndarray, top: np.ndarray, scores: np.ndarray,
                       pos_threshold_m: float) -> tuple[np.ndarray, np.ndarray]:
    """(Q x 3 estimated xyz, Q support counts): per query the similarity-weighted mean of its
    top-k database positions that lie within pos_threshold_m of its top-1 (the top-1 always
    does). Weights are the similarities, floored at a small positive value so that a match with
    similarity <= 0 still counts a little rather than subtracting."""
    positions = db_xyz[top]                                              # Q x k x 3
    near = np.linalg.norm(positions - positions[:, :1], axis=2) <= pos_threshold_m
    weights = np.where(near, np.maximum(scores.astype(np.float64), 1e-6), 0.0)  # float64: positions are ~1e6 m
    estimate = (weights[:, :, None] * positions).sum(axis=1) / weights.sum(axis=1, keepdims=True)
    return estimate, near.sum(axis=1)


def xyz_to_latlon(xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of latlon_to_xyz for a point off the sphere (a mean of points on it): its
    direction's latitude and longitude in degrees."""
    x, y, z = np.asarray(xyz, dtype=np.float64).T
    return np.degrees(np.arctan2(z, np.hypot(x, y))), np.degrees(np.arctan2(y, x))


def matches_frame(database: PlaceTable, queries: PlaceTable, top: np.ndarray, scores: np.ndarray,
                  pos_threshold_m: float) -> pd.DataFrame:
    """The prediction table (vprkit.retrieval.predictions) plus the database rows' positions as written and
    the position estimates, see the module docstring."""
    frame = predictions_frame(database, queries, top, scores)
    q_index, db_index = frame["query_index"].to_numpy(), frame["db_index"].to_numpy()
    columns = find_column_pair(database.frame.columns, LATLON_COLUMNS) or \
        find_column_pair(database.frame.columns, METRIC_COLUMNS)
    if columns is not None and database.xyz is not None:
        names = ("lat", "lon") if database.coord_kind == "latlon" else columns
        for name, column in zip(names, columns):
            frame[f"db_{name}"] = database.frame[column].to_numpy()[db_index]
        estimate, support = estimate_positions(database.xyz, top, scores, pos_threshold_m)
        first, second = xyz_to_latlon(estimate) if database.coord_kind == "latlon" else (estimate[:, 0], estimate[:, 1])
        frame[f"est_{names[0]}"] = first[q_index]
        frame[f"est_{names[1]}"] = second[q_index]
        frame["est_support"] = support[q_index]
    return frame


@dataclass
class Search:
    """What was searched (the tables, less unreadable images under --on_bad_image skip) and what
    it found: top [Q, k] database rows, best first, and their scores."""

    database: PlaceTable
    queries: PlaceTable
    top: np.ndarray
    scores: np.ndarray


def search_frames(model: PlaceDescriptor, database: PlaceTable, queries: PlaceTable, args: vpr.LocalizeConfig,
                  options: ExtractionSettings) -> Search:
    """Single-frame descriptors; with --seq_len > 1 sequence matching over them (each query by its
    window)."""
    database, db_desc = describe_table(model, database, options, "database", args.on_bad_image)
    queries, q_desc = describe_table(model, queries, options, "queries", args.on_bad_image)
    if not args.sequences:
        return Search(database, queries, *exact_search(db_desc, q_desc, args.top_k))
    return match_windows(q_desc, table_route(queries, "--query", args.seq_max_gap), db_desc,
                         table_route(database, "--db_csv", args.seq_max_gap), queries, database,
                         args.seq_match_config(), args.top_k)


def match_windows(q_desc: np.ndarray, q_route: Route, db_desc: np.ndarray, db_route: Route, queries: PlaceTable,
                  database: PlaceTable, config: SeqMatchConfig, top_k: int) -> Search:
    """Sequence matching's top_k end rows of every query (vprkit.routes.matching)."""
    matches = sequence_match(q_desc, q_route, db_desc, db_route, config, k=min(top_k, len(database)))
    return Search(database, queries, matches.index, matches.score)


def search_windows(model: SequenceDescriptor, database: PlaceTable, queries: PlaceTable, args: vpr.LocalizeConfig,
                   options: ExtractionSettings) -> Search:
    """A sequence checkpoint: each query's window descriptor shortlists database windows, fused with
    sequence matching over the frame descriptors by the weight val chose (trainable_vpr.fusion);
    without a trained head, sequence matching alone with the checkpoint's settings."""
    found = {}
    for name, table in (("database", database), ("queries", queries)):
        table, features = extract_table(model.frame.frozen, table, options, name, args.on_bad_image)
        route = table_route(table, "--db_csv" if name == "database" else "--query", max_gap(args, model))
        found[name] = (table, route, model.frames_from_features(features), features)
    (database, db_route, db_frames, db_features), (queries, q_route, q_frames, q_features) = found.values()
    matches = model.search(q_features, q_route, db_features, db_route, min(args.top_k, len(database)))
    return Search(database, queries, matches.index, matches.score)


def max_gap(args: vpr.LocalizeConfig, model: nn.Module) -> float | None:
    """--seq_max_gap, else a sequence checkpoint's, else the order column's default (route_of)."""
    if args.seq_max_gap is not None or not isinstance(model, SequenceDescriptor):
        return args.seq_max_gap
    return model.max_gap


def with_windows(frame: pd.DataFrame, queries: PlaceTable, windows: np.ndarray) -> pd.DataFrame:
    """The matches with the window each query was localised with: its first and last frame (the
    query itself) and how many frames it really has (fewer at the start of a drive)."""
    q_index = frame["query_index"].to_numpy()
    paths = np.asarray(queries.paths)
    lengths = np.array([len(np.unique(w)) for w in windows])
    at = frame.columns.get_loc("query_image") + 1
    frame.insert(at, "window_frames", lengths[q_index])
    frame.insert(at, "window_last", paths[windows[q_index, -1]])
    frame.insert(at, "window_first", paths[windows[q_index, 0]])
    return frame


# ============================================================================================
# main
# ============================================================================================
def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    args = parse_args(argv)
    queries = query_table(args.query, args.order)
    database = load_table(args.db_csv, args.image_root, on_bad_image=args.on_bad_image)
    if args.sequences:  # both must be routes: checked before any extraction
        table_route(database, "--db_csv", args.seq_max_gap)
        table_route(queries, "--query", args.seq_max_gap)
    if args.pairs:  # a name hloc cannot read: refused before any extraction or file
        check_pair_names(image_folder_and_names([*database.paths, *queries.paths])[1])
    options = extraction_settings(args)
    # a sequence checkpoint with --seq_len L, else a single-frame one or the baseline (vlad: fitted on the database)
    model, checkpoint = load_route_model(args.model_path, args.model, options, args.seq_len, database.paths)
    threshold = pos_threshold_of(args.pos_threshold_m, checkpoint)
    if isinstance(model, SequenceDescriptor):
        found = search_windows(model, database, queries, args, options)
    else:
        found = search_frames(model, database, queries, args, options)
    database, queries, top = found.database, found.queries, found.top
    frame = matches_frame(database, queries, top, found.scores, threshold)
    if args.sequences:
        windows = causal_windows(table_route(queries, "--query", max_gap(args, model)), args.seq_len)
        frame = with_windows(frame, queries, windows)
    atomic_write(args.output, lambda p: frame.to_csv(p, index=False))
    if args.pairs:
        image_dir, names = image_folder_and_names([*database.paths, *queries.paths])
        write_retrieval_pairs(args.pairs, names[len(database):], names[:len(database)], top)
        print(f"wrote {args.pairs} (hloc retrieval pairs, names relative to {image_dir})")
    estimated = "with position estimates" if any(c.startswith("est_") for c in frame.columns) else "(no positions)"
    how = ""
    if args.sequences:
        how = f", each by its window of {args.seq_len} frames ({search_name(model)})"
    print(f"{len(queries)} queries x top-{top.shape[1]} of {len(database)} database images{how} {estimated}: "
          f"wrote {args.output}")
    if args.picture:
        name = Path(args.model_path).name if args.model_path else f"raw {args.model}"
        title = (f"{name}: photos of {Path(args.query).name} and their top-{top.shape[1]} matches in "
                 f"{Path(args.db_csv).name}")
        print(f"wrote {draw_retrievals(frame_rows(frame, args.picture_queries), Path(args.picture), title)}")
    return frame


def search_name(model: nn.Module) -> str:
    """How the windows were matched, for the summary line."""
    if not isinstance(model, SequenceDescriptor) or model.head is None:
        return "sequence matching"
    if model.fusion_weight is None:
        return "the learned sequence descriptor"
    return f"the learned sequence descriptor fused with sequence matching, weight {model.fusion_weight:g}"


if __name__ == "__main__":
    run_cli(main)
