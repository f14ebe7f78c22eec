"""Sequence evaluation of the models the suite makes (issue 24): a sequence checkpoint's windows
fused with matching (eval_trained, run_experiment's seq_trained and seq_start rows), and sequence
matching over the frozen frame descriptor and velocity range val chooses (run_experiment's
seq_match row). Everything is reported as single frames are (vprkit.routes.evaluation).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from vprkit.retrieval.evaluation import Descriptors, ranking_report
from vprkit.routes.evaluation import RouteEvaluation, evaluate_sequence
from vprkit.routes.matching import SeqMatchConfig
from vprkit.routes.order import Route, route_of
from vprkit.tables.places import PlaceTable

from trainable_vpr.seqnet import start_sequence_head
from trainable_vpr.sequence_model import SequenceDescriptor


@dataclass
class RouteSplit:
    """One search over routes: the database and query tables and their routes."""

    database: PlaceTable
    queries: PlaceTable
    db_route: Route
    q_route: Route

    @classmethod
    def of(cls, database: PlaceTable, queries: PlaceTable, max_gap: float | None) -> "RouteSplit":
        """Both tables' routes (vprkit.routes.order.route_of: one line naming the file or row if not)."""
        return cls(database, queries, route_of(database, max_gap), route_of(queries, max_gap))


def evaluate_sequence_model(name: str, sequence: SequenceDescriptor, features: Descriptors, split: RouteSplit,
                            pos_threshold_m: float, recall_at: Sequence[int],
                            supervision: str = "auto") -> RouteEvaluation:
    """A sequence model on a route split, from the frozen frame features of its tables, ranked by
    SequenceDescriptor.search (its window descriptors shortlist, its matching re-ranks by its
    fusion weight; no head: sequence matching) and scored as every ranking is."""
    matches = sequence.search(features.queries, split.q_route, features.database, split.db_route,
                              min(max(recall_at), len(split.database)))
    report = ranking_report(name, matches.index, matches.score, split.database, split.queries, pos_threshold_m,
                            recall_at, supervision)
    frames = Descriptors(sequence.frames_from_features(features.database),
                         sequence.frames_from_features(features.queries))
    return RouteEvaluation(report, matches, frames, split.database, split.queries, sequence.match,
                           sequence.max_gap, sequence.fusion_weight)


@dataclass
class SeqMatchChoice:
    """What val chose for the seq_match row: the frame descriptor, the matching settings, and the
    val R@1 of every (descriptor, velocity range) candidate."""

    frames: str
    config: SeqMatchConfig
    val_r1: dict[str, float]

    def record(self) -> dict[str, object]:
        return {"frames": self.frames, "seq_velocity": [self.config.v_min, self.config.v_max],
                "val_r1": dict(self.val_r1)}


def velocity_ranges(config: SeqMatchConfig) -> list[tuple[float, float]]:
    """The velocity ranges val chooses from: 1 (the map's speed) and the flags' range."""
    return list(dict.fromkeys([(1.0, 1.0), (config.v_min, config.v_max)]))


def choose_seq_match(candidates: dict[str, Descriptors], val: RouteSplit, config: SeqMatchConfig,
                     pos_threshold_m: float, supervision: str = "auto") -> SeqMatchChoice:
    """The frame descriptor (of `candidates`, val descriptors by name, in order) and velocity
    range with the best val R@1 of sequence matching; a tie goes to the earlier candidate."""
    scores: dict[str, float] = {}
    best: tuple[float, str, SeqMatchConfig] | None = None
    for name, descriptors in candidates.items():
        for v_min, v_max in velocity_ranges(config):
            candidate = dataclasses.replace(config, v_min=v_min, v_max=v_max)
            report, _ = evaluate_sequence(name, descriptors, val.database, val.queries, val.db_route, val.q_route,
                                          candidate, pos_threshold_m, (1,), supervision)
            r1 = report.result.recalls[1]
            scores[f"{name}, v {v_min:g}-{v_max:g}"] = r1
            if best is None or r1 > best[0]:
                best = (r1, name, candidate)
    if best is None:
        raise ValueError("no frame descriptor to choose sequence matching's from")
    return SeqMatchChoice(best[1], best[2], scores)


def untrained(model: SequenceDescriptor, train_features: np.ndarray, train_xyz: np.ndarray, pos_threshold_m: float,
              seed: int) -> SequenceDescriptor:
    """A trained sequence model's start (run_experiment's seq_start): its head rebuilt untrained from
    the training frames as the run started it (start_sequence_head: its config's frame start and
    shrinkage, the run's seed), its frame part and matching kept, no fusion (the descriptor alone)."""
    if model.head is None:
        raise ValueError("a training-free sequence model has no start to rebuild")
    head = start_sequence_head(model.head.config, train_features, train_xyz, pos_threshold_m, seed)
    return SequenceDescriptor(model.frame, head, model.match, model.max_gap, None, model.source)
