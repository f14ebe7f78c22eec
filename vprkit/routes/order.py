"""The order of a route table: which drive each row belongs to and where it stands in it.

A table is a route when it has an order column: a frame index or a timestamp (the usual names
are accepted, as for positions). Drives are the values of a `traversal` (or `sequence_id`)
column; without one, a drive is one camera's rows (or the whole table without cameras), cut
where the gap between consecutive frames exceeds `max_gap` (in the order column's units:
frames, or seconds for a timestamp). With a traversal column, the same cut splits a drive into
segments too: a window never spans a gap larger than `max_gap` (see windows.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from vprkit.cli import VPRError
from vprkit.tables.places import PlaceTable, find_column

FRAME_COLUMNS = ("frame_index", "frame", "frame_id", "frame_number", "seq_index")
TIME_COLUMNS = ("timestamp", "time", "datetime", "time_s", "t")
DRIVE_COLUMNS = ("traversal", "sequence_id", "sequence", "drive", "drive_id", "run")
# the largest step inside a segment when --seq_max_gap is not given, per unit of the order column
DEFAULT_MAX_GAP = {"frame": 10.0, "s": 5.0}


@dataclass(frozen=True)
class Route:
    """The order of a table's rows, row by row (index i is the table's row i).

    drive: int [N] the segment each row belongs to (a drive, cut at gaps larger than max_gap);
    key: float [N] the order value (frame index, or seconds for a timestamp);
    unit: "frame" or "s"; drive_names: the name of each segment's drive.
    """

    drive: np.ndarray
    key: np.ndarray
    unit: str
    drive_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.drive)


def _file_row(frame: pd.DataFrame, row: int) -> int:
    """The 1-based line of a data row in its CSV (header is line 1)."""
    return int(row) + 2


def _order_key(frame: pd.DataFrame, source: str) -> tuple[np.ndarray, str, str]:
    column = find_column(frame.columns, FRAME_COLUMNS)
    if column is not None:
        values = pd.to_numeric(frame[column], errors="coerce")
        unit = "frame"
    else:
        column = find_column(frame.columns, TIME_COLUMNS)
        if column is None:
            raise VPRError(
                f"{source}: not a route: no order column; add a frame index ({', '.join(FRAME_COLUMNS)}) "
                f"or a timestamp ({', '.join(TIME_COLUMNS)})")
        raw = frame[column]
        values = pd.to_numeric(raw, errors="coerce")
        if values.isna().any() and not raw.isna().all():
            parsed = pd.to_datetime(raw, errors="coerce", utc=True, format="mixed")
            values = (parsed - pd.Timestamp(0, tz="UTC")).dt.total_seconds()
        unit = "s"
    bad = np.flatnonzero(~np.isfinite(values.to_numpy(dtype=np.float64, na_value=np.nan)))
    if len(bad):
        raise VPRError(f"{source}: row {_file_row(frame, bad[0])}: column '{column}' is not a number or time "
                       f"({frame[column].iloc[bad[0]]!r}); give every row its order")
    return values.to_numpy(dtype=np.float64), unit, column


def _drive_names(table: PlaceTable) -> np.ndarray:
    column = find_column(table.frame.columns, DRIVE_COLUMNS)
    if column is not None:
        return table.frame[column].astype(str).to_numpy()
    if table.cameras is not None:
        return np.asarray(table.cameras).astype(str)
    return np.full(len(table), "route", dtype=object)


def route_of(table: PlaceTable, max_gap: float | None = None) -> Route:
    """The route order of `table`, checked: one line naming the row for a bad order.
    `max_gap` None: DEFAULT_MAX_GAP of the order column's unit (10 frames, or 5 seconds).

    Within a drive, rows must appear in strictly increasing order (a duplicate or a step back is
    an error: it names both rows), and a drive's rows must be contiguous in the table (rows of
    drives interleaved are an error). A gap larger than `max_gap` cuts the drive into segments.
    """
    source = table.source
    key, unit, column = _order_key(table.frame, source)
    max_gap = DEFAULT_MAX_GAP[unit] if max_gap is None else max_gap
    names = _drive_names(table)
    segment = np.zeros(len(table), dtype=np.int64)
    segment_names: list[str] = []
    seen: dict[str, int] = {}
    for row in range(len(table)):
        name = names[row]
        new_drive = row == 0 or names[row - 1] != name
        if new_drive:
            if name in seen:
                raise VPRError(
                    f"{source}: row {_file_row(table.frame, row)}: drive '{name}' continues after rows of another "
                    f"drive (it started at row {_file_row(table.frame, seen[name])}); keep each drive's rows "
                    f"together, in order")
            seen[name] = row
            segment_names.append(name)
        else:
            step = key[row] - key[row - 1]
            if step <= 0:
                what = "repeats" if step == 0 else "goes back from"
                raise VPRError(
                    f"{source}: row {_file_row(table.frame, row)}: '{column}' {key[row]:g} {what} row "
                    f"{_file_row(table.frame, row - 1)}'s {key[row - 1]:g} in drive '{name}'; sort each drive by "
                    f"'{column}' and drop duplicate frames")
            if step > max_gap:
                segment_names.append(name)
        segment[row] = len(segment_names) - 1
    return Route(drive=segment, key=key, unit=unit, drive_names=tuple(segment_names))
