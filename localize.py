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
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

import trainable_vpr as vpr
from vprkit.checkpoints import EMBEDDINGS_ARCH, check_checkpoint_matches
from vprkit.cli import CliParser, VPRError, atomic_write, run_cli, write_png
from vprkit.configs import DEFAULT_POS_THRESHOLD_M
from vprkit.evaluation import exact_search
from vprkit.features import Backbone, extract_table, extraction_settings, pooling_config
from vprkit.places import (IMAGE_COLUMNS, LATLON_COLUMNS, METRIC_COLUMNS, PlaceTable, _find_column,
                           _find_column_pair, load_poses, read_csv_table)
from vprkit.settings import config_parser, parse_config

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def build_parser() -> CliParser:
    return config_parser(vpr.LocalizeConfig, __doc__.split("\n\n")[0], skip=("camera_id",))


def parse_args(argv: Sequence[str] | None) -> vpr.LocalizeConfig:
    return parse_config(build_parser(), vpr.LocalizeConfig, argv)


# ============================================================================================
# Inputs
# ============================================================================================
def query_table(query: str) -> PlaceTable:
    """The query photos: every image file of a folder (sorted by name, not recursive), or the
    image column of a CSV. No positions (coord_kind "none")."""
    path = Path(query)
    if path.is_dir():
        paths = sorted(str(p) for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise VPRError(f"--query {path}: no images in this folder ({', '.join(IMAGE_SUFFIXES)}); "
                           f"give a folder of photos or a CSV of image paths")
    elif path.is_file():
        frame = read_csv_table(path, "query CSV")
        column = _find_column(frame.columns, IMAGE_COLUMNS)
        if column is None:
            raise VPRError(f"--query {path}: no image column; expected one of {', '.join(IMAGE_COLUMNS)}")
        paths = [p if Path(p).is_absolute() else str(path.parent / p) for p in frame[column].astype(str)]
        if not paths:
            raise VPRError(f"--query {path}: no rows; list the photos to localize")
    else:
        raise VPRError(f"--query {path}: no such folder or file; give a folder of photos or a CSV of image paths")
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise VPRError(f"--query {path}: image {missing[0]} not found ({len(missing)} missing); fix the path")
    return PlaceTable(source=str(path), paths=paths, xyz=None, coord_kind="none",
                      frame=pd.DataFrame({"image_path": paths}))


def backbone_and_head(args: vpr.LocalizeConfig, database_paths: Sequence[str]) -> tuple[Backbone, object | None, float]:
    """The backbone (the checkpoint's, same weights, or --model's), the trained head (None for
    --baseline) and the position threshold."""
    if args.baseline:  # a VLAD vocabulary is fitted on the database
        backbone = vpr.create_pooled_backbone(args.model, args.weights, args.image_size, pooling_config(args),
                                              database_paths, extraction_settings(args))
        return backbone, None, args.pos_threshold_m or DEFAULT_POS_THRESHOLD_M
    checkpoint = vpr.load_checkpoint(args.model_path)
    check_checkpoint_matches(checkpoint, args.model_path, args.model)
    saved = checkpoint["backbone"]
    if saved.get("arch") == EMBEDDINGS_ARCH:
        raise VPRError(f"checkpoint {args.model_path} was trained on precomputed embeddings ({saved['weights']}); "
                       "it has no backbone to turn photos into features")
    backbone = vpr.checkpoint_backbone(checkpoint, args.model_path, args.weights, args.image_size, pooling_config(args))
    threshold = args.pos_threshold_m or checkpoint["config"].get("pos_threshold_m", DEFAULT_POS_THRESHOLD_M)
    return backbone, vpr.head_from_checkpoint(checkpoint), threshold


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
    """One row per (query, rank), see the module docstring."""
    q_count, k = top.shape
    q_index = np.repeat(np.arange(q_count), k)
    db_index = top.ravel()
    frame = pd.DataFrame({
        "query_image": np.asarray(queries.paths)[q_index],
        "rank": np.tile(np.arange(1, k + 1), q_count),
        "db_image": np.asarray(database.paths)[db_index],
        "similarity": scores.ravel().round(5),
    })
    columns = _find_column_pair(database.frame.columns, LATLON_COLUMNS) or \
        _find_column_pair(database.frame.columns, METRIC_COLUMNS)
    if database.labels is not None:
        frame["db_label"] = database.labels[db_index]
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


# ============================================================================================
# The picture
# ============================================================================================
def draw_matches(frame: pd.DataFrame, path: Path, max_queries: int, title: str) -> Path:
    """A grid: each row a query and its top-k matches, captioned with similarity and the
    match's label or position."""
    from matplotlib.figure import Figure  # object API: no GUI backend, no global state

    from vprkit.images import open_rgb

    queries = list(dict.fromkeys(frame["query_image"]))[:max_queries]
    k = int(frame["rank"].max())
    fig = Figure(figsize=(2.3 * (k + 1), 2.5 * len(queries) + 0.6), layout="constrained")
    axes = fig.subplots(len(queries), k + 1, squeeze=False)
    position_columns = [c for c in frame.columns if c.startswith("db_") and c not in ("db_image", "db_label")]
    for r, query in enumerate(queries):
        rows = frame[frame["query_image"] == query].sort_values("rank")
        cells = [(query, f"query {Path(query).name}"[:28])]
        for _, row in rows.iterrows():
            where = str(row["db_label"]) if "db_label" in row else \
                ", ".join(f"{row[c]:.5f}" if "lat" in c or "lon" in c else f"{row[c]:.0f}" for c in position_columns)
            cells.append((row["db_image"], f"#{row['rank']} sim {row['similarity']:.2f}\n{where}"))
        for c in range(k + 1):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(cells):
                ax.axis("off")
                continue
            image = open_rgb(cells[c][0])
            image.thumbnail((320, 320))
            ax.imshow(image)
            ax.set_title(cells[c][1], fontsize=8)
    fig.suptitle(title, fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_png(fig, path, dpi=80)


# ============================================================================================
# main
# ============================================================================================
def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    args = parse_args(argv)
    queries = query_table(args.query)
    database = load_poses(args.db_csv, args.image_root, on_bad_image=args.on_bad_image)
    backbone, head, threshold = backbone_and_head(args, database.paths)
    options = extraction_settings(args)
    database, db_features = extract_table(backbone, database, options, "database", args.on_bad_image)
    queries, q_features = extract_table(backbone, queries, options, "queries", args.on_bad_image)
    if head is not None:
        db_features, q_features = vpr.embed(head, db_features), vpr.embed(head, q_features)
    top, scores = exact_search(db_features, q_features, args.top_k)
    frame = matches_frame(database, queries, top, scores, threshold)
    atomic_write(args.output, lambda p: frame.to_csv(p, index=False))
    estimated = "with position estimates" if any(c.startswith("est_") for c in frame.columns) else "(no positions)"
    print(f"{len(queries)} queries x top-{top.shape[1]} of {len(database)} database images {estimated}: wrote {args.output}")
    if args.picture:
        model = Path(args.model_path).name if args.model_path else f"raw {args.model}"
        print(f"wrote {draw_matches(frame, Path(args.picture), args.picture_queries, f'{model}: photos of {Path(args.query).name} and their top-{top.shape[1]} matches in {Path(args.db_csv).name}')}")
    return frame


if __name__ == "__main__":
    run_cli(main)
