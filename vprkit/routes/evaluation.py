"""Sequence evaluation: a route's queries against a route database by training-free sequence
matching (matching.py) over any frame descriptors, reported as every ranking of the suite is
(vprkit.retrieval.evaluation.ranking_report: one recall function, the same report, JSON,
predictions, localization view and PR curve as single frames).

A query is its causal window ending at its row; its top-k are database END rows (the frame
the window localises); correctness is decided on the end rows' positions (or labels) by the
pair rule, so a sequence row and a single-frame row count the same queries.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from vprkit.retrieval.evaluation import Descriptors, EvalReport, l2_normalise, ranking_report
from vprkit.routes.matching import SeqMatchConfig, SeqMatches, sequence_match
from vprkit.routes.order import Route
from vprkit.tables.pairs import nearest_reference
from vprkit.tables.places import PlaceTable


def sequence_matches(descriptors: Descriptors, db_route: Route, q_route: Route, config: SeqMatchConfig,
                     k: int) -> SeqMatches:
    """The top-k database end rows of every query window (k at most the database's rows; the
    matching's shortlist is at least k, so every query gets k)."""
    return sequence_match(l2_normalise(descriptors.queries), q_route, l2_normalise(descriptors.database), db_route,
                          config, k=max(1, min(k, len(descriptors.database))))


def evaluate_sequence(name: str, descriptors: Descriptors, database: PlaceTable, queries: PlaceTable,
                      db_route: Route, q_route: Route, config: SeqMatchConfig, pos_threshold_m: float,
                      recall_at: Sequence[int], supervision: str = "auto") -> tuple[EvalReport, SeqMatches]:
    """Sequence matching over these frame descriptors, scored by the rule training used: the
    report (top_scores: the sequence scores) and the matches."""
    matches = sequence_matches(descriptors, db_route, q_route, config, max(recall_at))
    report = ranking_report(name, matches.index, matches.score, database, queries, pos_threshold_m, recall_at,
                            supervision)
    return report, matches


def true_rows(database: PlaceTable, queries: PlaceTable, pos_threshold_m: float) -> np.ndarray:
    """int [Nq]: each query's nearest database row, -1 beyond pos_threshold_m or without positions
    (the true path of the similarity figure)."""
    if database.xyz is None or queries.xyz is None:
        return np.full(len(queries), -1, dtype=np.int64)
    distance, row = nearest_reference(database.xyz, queries.xyz)
    return np.where(distance <= pos_threshold_m, row, -1).astype(np.int64)


@dataclass
class RouteEvaluation:
    """A sequence evaluation: its report, the ranking behind it, the frame descriptors matching ran
    over, the tables, the matching settings and (a learned sequence descriptor) the fusion weight."""

    report: EvalReport
    matches: SeqMatches
    frames: Descriptors
    database: PlaceTable
    queries: PlaceTable
    config: SeqMatchConfig
    max_gap: float | None = None
    fusion_weight: float | None = None

    def settings(self) -> dict[str, Any]:
        """What the JSON records: seq_len, the velocity range, the shortlist, the gap limit (None:
        the order unit's default) and the fusion weight (None: no learned descriptor)."""
        weight = self.fusion_weight
        return {"seq_len": self.config.seq_len, "seq_velocity": [self.config.v_min, self.config.v_max],
                "seq_shortlist": self.config.shortlist, "seq_max_gap": self.max_gap,
                "fusion_weight": weight if weight is None or np.isfinite(weight) else "inf"}

    def draw(self, path: str | Path, title: str) -> Path:
        """The frame similarity matrix with each query's top-1 end row and its true row."""
        from vprkit.routes.figures import draw_similarity_path

        truth = true_rows(self.database, self.queries, self.report.result.pos_threshold_m)
        return draw_similarity_path(l2_normalise(self.frames.queries), l2_normalise(self.frames.database),
                                    self.matches.index[:, 0], truth, path, title=title)
