"""Where images were taken: geometry, poses CSVs, embeddings parquets -> PlaceTable.

Positions become 3-D metric coordinates (latlon_to_xyz / metric_to_xyz) in which a straight-line
distance is metres, so every later step (pairs, mining, evaluation) works in metres alike.
Every reader error is a VPRError naming the file, row and column and saying what to do.
"""
from __future__ import annotations

import difflib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from vprkit.cli import VPRError, atomic_write


EARTH_RADIUS_M = 6_371_008.8  # mean Earth radius (IUGG), metres


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
    backbone: str | None = None  # embeddings parquet: the backbone that made the embeddings, when it says

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
            skipped=list(self.skipped), backbone=self.backbone,
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


def find_column(columns: Sequence[str], aliases: Sequence[str]) -> str | None:
    lower = {c.lower().strip(): c for c in columns}
    for alias in aliases:
        if alias in lower:
            return lower[alias]
    return None


def find_column_pair(columns: Sequence[str], pairs: Sequence[tuple[str, str]]) -> tuple[str, str] | None:
    for a, b in pairs:
        ca, cb = find_column(columns, [a]), find_column(columns, [b])
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


MAX_METRIC_M = 1e8  # easting/northing: 2.5 times round the Earth, far beyond any projected frame


def _positions_from_frame(frame: pd.DataFrame, path: Path) -> tuple[np.ndarray, str]:
    latlon = find_column_pair(frame.columns, LATLON_COLUMNS)
    if latlon:
        lat, lon = (numeric_column(frame, c, path) for c in latlon)
        for name, values, limit in (("latitude", lat, 90.0), ("longitude", lon, 180.0)):
            bad = np.flatnonzero(np.abs(values) > limit)
            if bad.size:
                raise VPRError(f"{path}: row {_file_line(frame, bad[0])}: {name} {values[bad[0]]} "
                               f"is outside ±{limit:g} degrees")
        return latlon_to_xyz(lat, lon), "latlon"
    metric = find_column_pair(frame.columns, METRIC_COLUMNS)
    if metric:
        x, y = (numeric_column(frame, c, path) for c in metric)
        for name, values in zip(metric, (x, y)):  # beyond it, squared distances overflow (a warning, inf)
            bad = np.flatnonzero(np.abs(values) > MAX_METRIC_M)
            if bad.size:
                raise VPRError(f"{path}: row {_file_line(frame, bad[0])}, column '{name}': {values[bad[0]]:g} m is "
                               f"beyond ±{MAX_METRIC_M:g} m, not a position on Earth in metres; fix or remove the row")
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
    """Load a poses CSV (DESIGN.md §2) into a PlaceTable with metric positions, or, for a CSV
    with a place label column and no position columns, labels only (xyz None, coord_kind "none").

    Relative image paths resolve against image_root, else the CSV's folder. Errors name the
    file, row and column and say what to do. A missing image file is an error, or with
    on_bad_image="skip" its row is left out (and counted in the table's `skipped`).
    """
    check_on_bad_image(on_bad_image)
    path = Path(path)
    frame = read_csv_table(path, "poses CSV")
    return poses_table(frame, path, Path(image_root) if image_root else path.parent, "--image_root" if image_root
                       else "the CSV folder", camera_id, check_images, on_bad_image)


def poses_table(frame: pd.DataFrame, path: Path, root: Path, root_name: str, camera_id: str | None = None,
                check_images: bool = True, on_bad_image: str = "error") -> PlaceTable:
    """The PlaceTable of a poses frame (the columns of a poses CSV) read from `path`: relative
    image paths resolve against `root` (named `root_name` in messages). Shared by poses CSVs and
    the benchmark layouts (vprkit.tables.benchmarks), which build such a frame."""
    image_col = find_column(frame.columns, IMAGE_COLUMNS)
    if image_col is None:
        raise VPRError(
            f"{path}: no image column; expected one of {', '.join(IMAGE_COLUMNS)}"
            f"{_closest_name_hint(frame.columns, IMAGE_COLUMNS)}"
        )
    frame = _keep_camera(frame, path, camera_id)
    labels = _label_column(frame, path)
    if labels is not None and not find_column_pair(frame.columns, LATLON_COLUMNS + METRIC_COLUMNS):
        xyz, coord_kind = None, "none"  # labels only: the label pair rule (like a labels-only parquet)
    else:
        xyz, coord_kind = _positions_from_frame(frame, path)
    blank = np.flatnonzero((frame[image_col].isna() | (frame[image_col].astype(str).str.strip() == "")).to_numpy())
    if blank.size:
        raise VPRError(f"{path}: row {_file_line(frame, int(blank[0]))}: no image file in column '{image_col}' "
                       f"({blank.size} such row(s)); fill it in or remove the row")
    paths = [str(p) if os.path.isabs(p) else str(root / p) for p in frame[image_col].astype(str)]
    duplicated = pd.Series([os.path.abspath(p) for p in paths]).duplicated()  # one image however it is spelt
    if duplicated.any():
        row = int(np.flatnonzero(duplicated.to_numpy())[0])
        raise VPRError(f"{path}: row {_file_line(frame, row)}: image {frame[image_col].iloc[row]} is listed twice; "
                       f"remove duplicate rows")
    missing = [row for row, image in enumerate(paths) if check_images and not os.path.isfile(image)]
    resolved = f"relative paths resolve against {root_name} {root}"
    if missing and len(missing) == len(paths):  # a wrong root, not a few bad rows: skipping would leave nothing
        raise VPRError(f"{path}: none of its {len(paths)} image files exists (e.g. {paths[0]}; {resolved}); "
                       f"check --image_root, or move the CSV next to its images")
    if missing and on_bad_image == "error":
        row = missing[0]
        raise VPRError(
            f"{path}: row {_file_line(frame, row)}: image file {paths[row]} not found "
            f"({resolved}; {len(missing)} missing in all); fix the path, or --on_bad_image skip to leave such rows out"
        )

    table = PlaceTable(
        source=str(path), paths=paths, xyz=xyz, coord_kind=coord_kind, frame=frame.reset_index(drop=True),
        cameras=_optional_column(frame, CAMERA_COLUMNS), labels=labels,
        conditions=_optional_column(frame, CONDITION_COLUMNS),
    )
    return table.skip([(paths[row], f"row {_file_line(frame, row)}: file not found") for row in missing])


def _keep_camera(frame: pd.DataFrame, path: Path, camera_id: str | None) -> pd.DataFrame:
    """The rows of --camera_id (all rows when None); keeps the file's row numbers for messages."""
    if camera_id is None:
        return frame
    camera_col = find_column(frame.columns, CAMERA_COLUMNS)
    if camera_col is None:
        raise VPRError(f"{path}: --camera_id {camera_id} given but the file has no camera_id/camera column"
                       f"{_closest_name_hint(frame.columns, CAMERA_COLUMNS)}")
    present = sorted(frame[camera_col].astype(str).unique())
    if camera_id not in present:
        raise VPRError(f"{path}: no rows for --camera_id {camera_id}; cameras present: {', '.join(present)}")
    return frame[frame[camera_col].astype(str) == camera_id]


def _optional_column(frame: pd.DataFrame, aliases: Sequence[str]) -> np.ndarray | None:
    col = find_column(frame.columns, aliases)
    return None if col is None else frame[col].astype(str).to_numpy()


def _label_column(frame: pd.DataFrame, path: Path) -> np.ndarray | None:
    """Place labels (place_id, building_id or label) as strings; an empty cell is an error."""
    col = find_column(frame.columns, LABEL_COLUMNS)
    if col is None:
        return None
    missing = np.flatnonzero(frame[col].isna().to_numpy())
    if missing.size:
        raise VPRError(f"{path}: row {_file_line(frame, missing[0])}: column '{col}' is empty "
                       f"({missing.size} such row(s)); give every row a label or drop the column")
    return frame[col].astype(str).to_numpy()


# Embeddings parquet (DESIGN.md §2): one row per image, an `embedding` list column plus place
# labels and/or positions, and optionally a `backbone` column naming the backbone that made the
# embeddings (the same on every row; --export_parquet writes it); the backbone is skipped. Rows
# are numbered from 1 in messages.
EMBEDDING_COLUMN = "embedding"


# A column, not parquet key-value metadata: visible in any viewer, kept by pandas round trips and
# concatenations, and easy to add to a parquet written by other tools.
BACKBONE_COLUMN = "backbone"


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
        raise VPRError(f"embeddings parquet {path}: not a readable parquet file "
                       f"({str(exc).splitlines()[0][:160]})") from None
    if frame.empty:
        raise VPRError(f"embeddings parquet {path}: no rows")
    # _file_line: row 1 = first
    frame = _keep_camera(frame.set_axis(pd.RangeIndex(-1, len(frame) - 1)), path, camera_id)
    column = find_column(frame.columns, [EMBEDDING_COLUMN])
    if column is None:
        raise VPRError(f"{path}: no '{EMBEDDING_COLUMN}' column (one list of floats per row)"
                       f"{_closest_name_hint(frame.columns, [EMBEDDING_COLUMN])}")
    embeddings = _embedding_matrix(frame[column], path)
    labels = _label_column(frame, path)
    has_positions = bool(find_column_pair(frame.columns, LATLON_COLUMNS + METRIC_COLUMNS))
    if labels is None and not has_positions:
        raise VPRError(f"{path}: neither a label column ({', '.join(LABEL_COLUMNS)}) nor position columns "
                       "(lat/lon, easting/northing, x/y): nothing defines which images show the same place")
    xyz, coord_kind = _positions_from_frame(frame, path) if has_positions else (None, "none")
    id_col = find_column(frame.columns, IMAGE_ID_COLUMNS)
    ids = frame[id_col].astype(str).tolist() if id_col else [f"{path.name}#{i}" for i in range(len(frame))]
    return PlaceTable(source=str(path), paths=ids, xyz=xyz, coord_kind=coord_kind, frame=frame.reset_index(drop=True),
                      cameras=_optional_column(frame, CAMERA_COLUMNS), labels=labels,
                      conditions=_optional_column(frame, CONDITION_COLUMNS), embeddings=embeddings,
                      backbone=_backbone_of(frame, path))


def _backbone_of(frame: pd.DataFrame, path: Path) -> str | None:
    """The `backbone` column's one name (None without the column or with empty cells); two
    names are an error: one head cannot be trained or evaluated on two backbones' embeddings."""
    column = find_column(frame.columns, [BACKBONE_COLUMN])
    if column is None:
        return None
    names = sorted({str(v).strip() for v in frame[column].dropna() if str(v).strip()})
    if len(names) > 1:
        raise VPRError(f"{path}: column '{column}' names {len(names)} backbones ({', '.join(names[:3])}); "
                       f"the embeddings of one file must come from one backbone")
    return names[0] if names else None


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


def export_embeddings_parquet(table: PlaceTable, features: np.ndarray, path: str | Path,
                              backbone: str | None = None) -> Path:
    """Write a table's rows with their descriptors as an embeddings parquet (image_id = the
    image path; positions, labels, camera and condition columns as in the source file; a
    `backbone` column naming the backbone when given)."""
    frame = table.frame.copy()
    frame.insert(0, "image_id", table.paths)
    frame[EMBEDDING_COLUMN] = list(np.asarray(features, dtype=np.float32))
    if backbone:
        frame[BACKBONE_COLUMN] = backbone
    atomic_write(path, lambda p: frame.to_parquet(p, index=False))
    return Path(path)
