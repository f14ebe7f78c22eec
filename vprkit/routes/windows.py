"""Causal windows over a route: the `seq_len` frames that end at each row.

Window i holds the rows of i's segment (drive, cut at large gaps) up to and including i, in
route order, the last column being i itself: a vehicle localises online with the frames it has
seen. The first frames of a segment have fewer than `seq_len` frames before them; their window
repeats the segment's first frame on the left (edge padding), so every row has a window and the
sequence rows are scored over the same queries as the single-frame rows.

`step` > 1 takes every step-th frame (row i, i - step, ...): the window of a drive `step` times
faster (the learned sequence descriptor trains on such windows for velocity robustness).
"""
from __future__ import annotations

import numpy as np

from vprkit.routes.order import Route


def segment_span(route: Route) -> tuple[np.ndarray, np.ndarray]:
    """(first, last): int64 [N] the first and the last row of each row's segment.

    Rows are contiguous per segment and in order (route_of checks it)."""
    n = len(route)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    change = np.flatnonzero(route.drive[1:] != route.drive[:-1]) + 1
    starts = np.r_[0, change].astype(np.int64)
    ends = np.r_[change - 1, n - 1].astype(np.int64)
    lengths = np.diff(np.r_[starts, n])
    return np.repeat(starts, lengths), np.repeat(ends, lengths)


def causal_windows(route: Route, seq_len: int, step: int = 1) -> np.ndarray:
    """int64 [N, seq_len] table row indices; row i's window ends at i (column -1 == i)."""
    if seq_len < 1 or step < 1:
        raise ValueError(f"seq_len and step must be >= 1, got {seq_len} and {step}")
    rows = np.arange(len(route), dtype=np.int64)
    # The frame k steps back is row i - k while it stays in i's segment; otherwise the segment's first row.
    first, _ = segment_span(route)
    back = np.arange(seq_len - 1, -1, -1, dtype=np.int64) * step
    return np.maximum(rows[:, None] - back[None, :], first[:, None])
