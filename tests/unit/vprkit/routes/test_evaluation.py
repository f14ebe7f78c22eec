"""Sequence evaluation (vprkit.routes.evaluation) and the one recall function behind every ranking
(vprkit.retrieval.evaluation.score_retrieval): the aliased route a single frame gets wrong, rows
with no candidate, the true path of the figure."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from vprkit.retrieval.evaluation import Descriptors, evaluate_retrieval, score_retrieval
from vprkit.routes.evaluation import RouteEvaluation, evaluate_sequence, true_rows
from vprkit.routes.matching import SeqMatchConfig
from vprkit.routes.order import route_of
from vprkit.tables.places import PlaceTable

PATTERN = [0, 1, 2, 0, 3, 2]  # one-hot descriptor per frame: frame 3 looks like 0, frame 5 like 2


def table(name: str, offset_m: float = 0.0, conditions: bool = False) -> PlaceTable:
    n = len(PATTERN)
    xyz = np.c_[100.0 * np.arange(n) + offset_m, np.zeros(n), np.zeros(n)]
    frame = pd.DataFrame({"image_id": [f"{name}_{i}" for i in range(n)], "frame_index": np.arange(n),
                          "traversal": name})
    return PlaceTable(source=f"{name}.csv", paths=list(frame["image_id"]), xyz=xyz, coord_kind="metric", frame=frame,
                      conditions=np.array(["a", "a", "a", "b", "b", "b"]) if conditions else None)


def test_windows_resolve_the_aliased_frames_and_report_per_condition():
    one_hot = np.eye(4, dtype=np.float32)[PATTERN]
    database, queries = table("summer"), table("winter", offset_m=5.0, conditions=True)
    single = evaluate_retrieval(one_hot, database.xyz, one_hot, queries.xyz, 25.0, (1,))
    assert single.recalls[1] == pytest.approx(4 / 6)
    config = SeqMatchConfig(3, 1.0, 1.0, shortlist=1)  # raised to k, so every query gets k candidates
    report, matches = evaluate_sequence("seq", Descriptors(one_hot, one_hot), database, queries, route_of(database, 10),
                                        route_of(queries, 10), config, 25.0, (1, 3))
    assert matches.index.shape == (6, 3) and (matches.index >= 0).all()
    assert report.result.top_indices[:, 0].tolist() == [0, 1, 2, 3, 4, 5]
    assert report.result.recalls == {1: 1.0, 3: 1.0}
    assert report.result.top_distances_m[:, 0] == pytest.approx(np.full(6, 5.0))
    assert report.by_condition == {"a": {1: 1.0, 3: 1.0}, "b": {1: 1.0, 3: 1.0}}
    evaluation = RouteEvaluation(report, matches, Descriptors(one_hot, one_hot), database, queries, config, 4.0,
                                 float("inf"))
    assert evaluation.settings() == {"seq_len": 3, "seq_velocity": [1.0, 1.0], "seq_shortlist": 1,
                                     "seq_max_gap": 4.0, "fusion_weight": "inf"}


def test_a_row_without_candidate_is_a_miss_with_no_distance():
    db_xyz = np.array([[0.0, 0, 0], [100.0, 0, 0]])
    q_xyz = np.array([[0.0, 0, 0], [100.0, 0, 0]])
    top = np.array([[1, 0], [1, -1]])
    result = score_retrieval(top, np.array([[0.9, 0.5], [0.8, -np.inf]]), db_xyz, q_xyz, 25.0, (1, 2))
    assert result.correct.tolist() == [[False, True], [True, False]]
    assert result.recalls == {1: 0.5, 2: 1.0}
    assert np.isnan(result.top_distances_m[1, 1]) and result.top_distances_m[0, 0] == 100.0


def test_true_rows_are_the_nearest_database_row_within_the_threshold():
    database = table("summer")
    queries = table("winter", offset_m=40.0)
    assert true_rows(database, queries, 50.0).tolist() == [0, 1, 2, 3, 4, 5]
    assert true_rows(database, queries, 30.0).tolist() == [-1] * 6
    no_positions = PlaceTable(source="q", paths=["a"], xyz=None, coord_kind="none", frame=pd.DataFrame({"a": [1]}))
    assert true_rows(database, no_positions, 25.0).tolist() == [-1]
