"""A folder of frames as a route: the frames' order from their file names or their EXIF capture times.

A camera or a phone writes a drive as numbered files (frame_000123.jpg) or as photos whose EXIF
says when each was taken. `ordered_frames` turns such a list of files into a route table's rows:
`image_path` plus an order column `route_of` (order.py) reads, in route order:

- order "name": file names compared with their numbers as numbers (frame_9 before frame_10, as a
  person reads them), then the folder; `frame_index` 0, 1, 2... (one step per frame, no gaps);
- order "exif_time": the capture time (vprkit.tables.images.read_capture_time: DateTimeOriginal
  with its sub-second fraction, else DateTime); `timestamp` in seconds (the gap limit is then in
  seconds). A frame without a capture time, or two frames with the same one, is one line naming
  the files (order them by name instead, or give a CSV with an order column).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import pandas as pd

from vprkit.cli import VPRError
from vprkit.tables.images import read_capture_time

FRAME_ORDERS = ("name", "exif_time")


def natural_key(path: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key of a file name with its digit runs compared as numbers ("f9" < "f10"), then its path."""
    parts = re.split(r"(\d+)", Path(path).name.lower())
    return (*((0, int(p)) if p.isdigit() else (1, p) for p in parts if p), (1, str(path)))


def ordered_frames(paths: Sequence[str], order: str, source: str) -> pd.DataFrame:
    """The frames `paths` in route order: a frame with `image_path` and `frame_index` (order "name")
    or `timestamp` in seconds (order "exif_time"). `source` names the folder in errors."""
    if order == "name":
        ordered = sorted(paths, key=natural_key)
        return pd.DataFrame({"image_path": ordered, "frame_index": range(len(ordered))})
    if order != "exif_time":
        raise VPRError(f"--order {order}: choose one of {', '.join(FRAME_ORDERS)}")
    times = {}
    for path in paths:
        taken = read_capture_time(path)
        if taken is None:
            raise VPRError(f"{source}: {Path(path).name} has no EXIF capture time (DateTimeOriginal or DateTime); "
                           f"order the frames by --order name, or give a CSV with a timestamp column")
        times[path] = taken
    ordered = sorted(paths, key=lambda p: (times[p], natural_key(p)))
    for before, after in zip(ordered, ordered[1:]):
        if times[before] == times[after]:
            raise VPRError(f"{source}: {Path(before).name} and {Path(after).name} have the same EXIF capture time "
                           f"({times[before].isoformat()}); order the frames by --order name, or give a CSV with "
                           f"a frame_index column")
    start = times[ordered[0]] if ordered else None
    seconds = [(times[p] - start).total_seconds() for p in ordered]
    return pd.DataFrame({"image_path": ordered, "timestamp": seconds})
