"""Fusion of a learned sequence descriptor with training-free sequence matching (issue 24, item 4).

The learned descriptor shortlists (its top-K database windows per query, faiss); sequence
matching scores the same K candidates; both scores are z-scored per query over its shortlist and
combined: fused = z(descriptor) + w x z(matching). w = 0 is the descriptor alone (its ranking is
unchanged), w = inf matching alone on the shortlist (a re-ranking). `choose_fusion_weight` picks w
from a small grid on validation queries (never on test): the best R@1, a tie going to the smaller
w (the descriptor the head was trained for). `shortlist_scores` gives both scores of a head's
shortlist; `choose_fusion_weight(*shortlist.choice_inputs())` on val, `shortlist.recalls(w)` on test.
`fused_search` does the whole search with a chosen w (SequenceDescriptor.search: localize.py,
eval_trained.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from vprkit.retrieval.evaluation import exact_search, recall_at_n
from vprkit.routes.matching import SeqMatchConfig, match_scores
from vprkit.routes.order import Route

from trainable_vpr.seqnet import SeqNetHead
from trainable_vpr.sequence_training import RouteFrames, window_recall

FUSION_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, float("inf"))


def zscore_rows(scores: np.ndarray) -> np.ndarray:
    """Each row minus its mean, over its standard deviation (a constant row becomes 0)."""
    scores = np.asarray(scores, dtype=np.float64)
    std = scores.std(axis=1, keepdims=True)
    return (scores - scores.mean(axis=1, keepdims=True)) / np.where(std > 0, std, 1.0)


def fuse_scores(descriptor: np.ndarray, matching: np.ndarray, weight: float) -> np.ndarray:
    """[Q, K] fused scores of a shortlist (higher = better); weight inf: matching alone."""
    if np.isinf(weight):
        return zscore_rows(matching)
    return zscore_rows(descriptor) + weight * zscore_rows(matching)


def rerank(candidates: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(candidates, scores) [Q, K] sorted by score, best first (a tie keeps the shortlist's order)."""
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(candidates, order, axis=1), np.take_along_axis(scores, order, axis=1)


@dataclass
class FusionChoice:
    """The chosen weight and every grid weight's validation R@1."""

    weight: float
    val_r1: dict[float, float]


def choose_fusion_weight(descriptor: np.ndarray, matching: np.ndarray, correct: np.ndarray,
                         grid: Sequence[float] = FUSION_WEIGHTS) -> FusionChoice:
    """The weight of `grid` whose fused ranking has the best R@1 on these (validation) queries.

    descriptor, matching: [Q, K] scores of each query's K shortlisted database windows;
    correct: bool [Q, K], whether each candidate is a positive of the query (the pair rule)."""
    if not len(grid):
        raise ValueError("the fusion weight grid is empty")
    correct = np.asarray(correct, dtype=bool)
    scores = {}
    for weight in sorted(set(float(w) for w in grid)):
        top = np.argmax(fuse_scores(descriptor, matching, weight), axis=1)  # first best: the shortlist's order
        scores[weight] = float(correct[np.arange(len(correct)), top].mean()) if len(correct) else float("nan")
    best = max(scores, key=lambda w: (scores[w], -w))
    return FusionChoice(best, scores)


@dataclass
class Shortlist:
    """A sequence head's top-K database windows per query with both scores: candidates [Q, K]
    (database rows, i.e. window ends), descriptor and matching scores [Q, K], correct [Q, K]."""

    candidates: np.ndarray
    descriptor: np.ndarray
    matching: np.ndarray
    correct: np.ndarray

    def choice_inputs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(descriptor, matching, correct): choose_fusion_weight's arguments."""
        return self.descriptor, self.matching, self.correct

    def recalls(self, weight: float, recall_at: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
        """Recall@N of the shortlist re-ranked by the fused score at `weight`."""
        return recall_at_n(rerank(self.correct, fuse_scores(self.descriptor, self.matching, weight))[0], recall_at)


def shortlist_scores(head: SeqNetHead, queries: RouteFrames, database: RouteFrames, match_queries: np.ndarray,
                     match_database: np.ndarray, match_config: SeqMatchConfig, pos_threshold_m: float,
                     shortlist: int = 50) -> Shortlist:
    """The head's top-`shortlist` windows of every query (faiss) and their sequence-matching
    scores (vprkit.routes.matching.match_scores over the frame descriptors `match_queries` /
    `match_database`, the ones seq_match uses); correct by the end frames' positions. The shortlist
    is at most the database."""
    found = window_recall(head, queries, database, pos_threshold_m, (1, min(shortlist, len(database.features))))
    matching = match_scores(match_queries, queries.route, match_database, database.route, found.top_indices,
                            match_config)
    return Shortlist(found.top_indices, found.top_scores, matching, found.correct)
def fused_search(q_windows: np.ndarray, db_windows: np.ndarray, q_frames: np.ndarray, q_route: Route,
                 db_frames: np.ndarray, db_route: Route, config: SeqMatchConfig, weight: float | None,
                 k: int) -> tuple[np.ndarray, np.ndarray]:
    """(top [Q, k] database end rows, their scores [Q, k]) of a learned sequence descriptor fused
    with sequence matching: the window descriptors' top-`config.shortlist` (at least k; exact
    inner product), re-scored by matching over the frame descriptors on the same candidates and
    fused with `weight` (module docstring; None: the descriptor's ranking and cosines alone)."""
    k = min(k, len(db_windows))
    if weight is None:
        return exact_search(db_windows, q_windows, k)
    candidates, descriptor = exact_search(db_windows, q_windows, min(max(config.shortlist, k), len(db_windows)))
    matching = match_scores(q_frames, q_route, db_frames, db_route, candidates, config)
    top, scores = rerank(candidates, fuse_scores(descriptor, matching, weight))
    return top[:, :k], scores[:, :k].astype(np.float32)
