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


def causal_windows(route: Route, seq_len: int, step: int = 1) -> np.ndarray:
    """int64 [N, seq_len] table row indices; row i's window ends at i (column -1 == i)."""
    if seq_len < 1 or step < 1:
        raise ValueError(f"seq_len and step must be >= 1, got {seq_len} and {step}")
    n = len(route)
    rows = np.arange(n, dtype=np.int64)
    # Rows are contiguous per segment and in order (route_of checks it), so the frame k steps
    # back is row i - k while it stays in i's segment; otherwise the segment's first row.
    first = np.zeros(n, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, route.drive[1:] != route.drive[:-1]]) if n else np.zeros(0, np.int64)
    first[starts] = starts
    first = np.maximum.accumulate(first) if n else first
    back = np.arange(seq_len - 1, -1, -1, dtype=np.int64) * step
    return np.maximum(rows[:, None] - back[None, :], first[:, None])
