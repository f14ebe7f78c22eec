"""Route figures: the query x database similarity matrix with the matched and the true paths (the
figure route people look at first), and R@1 against the window length for every method.
matplotlib (Agg); no torch."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from vprkit.plots import save_figure  # sets the Agg backend before pyplot is imported

import matplotlib.pyplot as plt  # noqa: E402  isort: skip
from vprkit.routes.matching import RowContrast


def _stretch(rows: np.ndarray, n: int, margin: int) -> slice:
    rows = rows[rows >= 0]
    if len(rows) == 0:
        return slice(0, n)
    return slice(max(0, int(rows.min()) - margin), min(n, int(rows.max()) + margin + 1))


def draw_similarity_path(q_desc: np.ndarray, db_desc: np.ndarray, matched: np.ndarray, truth: np.ndarray,
                         path: str | Path, queries: slice = slice(None), max_pixels: int = 600,
                         title: str = "query x database similarity") -> Path:
    """The row-z-scored similarity (what sequence matching sums) of the queries `queries` against
    the database stretch their matches and true rows fall in, subsampled to at most `max_pixels`
    per side; each query's top-1 matched end row (`matched`, int [Nq], -1 none) and its true
    database row (`truth`, int [Nq], -1 none) drawn on it."""
    rows = np.arange(len(q_desc))[queries]
    matched, truth = np.asarray(matched)[rows], np.asarray(truth)[rows]
    columns = _stretch(np.r_[matched, truth], len(db_desc), margin=max(5, len(rows) // 20))
    q_step = max(1, -(-len(rows) // max_pixels))
    db_step = max(1, -(-(columns.stop - columns.start) // max_pixels))
    q_shown = rows[::q_step]
    db_shown = np.arange(columns.start, columns.stop)[::db_step]
    mean, std = RowContrast.of(db_desc).stats(q_desc[q_shown])
    z = (q_desc[q_shown].astype(np.float64) @ db_desc[db_shown].T.astype(np.float64) - mean[:, None]) / std[:, None]
    fig, ax = plt.subplots(figsize=(7, 6))
    extent = (columns.start - 0.5, columns.stop - 0.5, rows[-1] + 0.5, rows[0] - 0.5)
    image = ax.imshow(z, aspect="auto", cmap="viridis", extent=extent, interpolation="nearest",
                      vmin=np.percentile(z, 1), vmax=np.percentile(z, 99.5))
    fig.colorbar(image, ax=ax, label="similarity, z-scored over the database per query frame")
    has_truth, has_match = truth >= 0, matched >= 0
    ax.plot(truth[has_truth], rows[has_truth], ".", color="white", markersize=3, label="true place")
    hit = has_match & has_truth & (np.abs(matched - truth) <= 1)
    ax.plot(matched[has_match & ~hit], rows[has_match & ~hit], "x", color="red", markersize=3,
            label="matched (top-1), wrong")
    ax.plot(matched[hit], rows[hit], "o", markerfacecolor="none", color="orange", markersize=4,
            label="matched (top-1), within one frame")
    ax.set_xlabel(f"database row (frames {columns.start}-{columns.stop - 1}, every {db_step})")
    ax.set_ylabel(f"query row (every {q_step})")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=7, framealpha=0.7)
    return save_figure(fig, Path(path))


def draw_recall_by_seq_len(recalls: Mapping[str, Mapping[int, float]], path: str | Path,
                           title: str = "R@1 by window length", ylabel: str = "R@1") -> Path:
    """R@1 (or any recall) against the window length, one line per method: {method: {seq_len: R}}."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, by_len in recalls.items():
        lengths = sorted(by_len)
        ax.plot(lengths, [by_len[n] for n in lengths], "o-", label=method)
    all_lengths = sorted({n for by_len in recalls.values() for n in by_len})
    ax.set_xticks(all_lengths)
    ax.set_xlabel("window length (frames, --seq_len)")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return save_figure(fig, Path(path))
