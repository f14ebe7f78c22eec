"""The localization view (vprkit.retrieval.localization): top-1 error in metres, R@1 at distance thresholds,
percentiles, the JSON keys, the figure, and its agreement
with evaluate_retrieval's Recall@1."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from helpers import haversine_m
from vprkit.retrieval.evaluation import evaluate_retrieval
from vprkit.tables.places import latlon_to_xyz, metric_to_xyz
from helpers import REPO
from vprkit.retrieval.localization import (LOCALIZATION_THRESHOLDS_M, draw_localization_figure,
                                           localization_from_ranking, recall_at_thresholds, top1_error_percentiles,
                                           top1_errors_m)

# Database on a line at 0, 10, 20, 40 m; four queries and their top-1 database image.
DB_X = np.array([0.0, 10.0, 20.0, 40.0])
Q_X = np.array([3.0, 14.0, 21.0, 30.0])
TOP1 = np.array([0, 3, 1, 2])
# errors by hand: |3-0| = 3, |14-40| = 26, |21-10| = 11, |30-20| = 10 (exactly on the 10 m threshold)
HAND_ERRORS = [3.0, 26.0, 11.0, 10.0]


def line_xyz(x: np.ndarray) -> np.ndarray:
    return metric_to_xyz(x, np.zeros_like(x))


def test_top1_errors_on_a_line_by_hand():
    errors = top1_errors_m(line_xyz(DB_X), line_xyz(Q_X), TOP1)
    np.testing.assert_allclose(errors, HAND_ERRORS)
    # a Q x K ranking gives the same errors from its first column
    ranking = np.column_stack([TOP1, (TOP1 + 1) % 4])
    np.testing.assert_allclose(top1_errors_m(line_xyz(DB_X), line_xyz(Q_X), ranking), HAND_ERRORS)


def test_top1_error_on_latlon_is_the_great_circle_distance():
    db = latlon_to_xyz(np.array([31.2620]), np.array([34.8010]))
    query = latlon_to_xyz(np.array([31.2625]), np.array([34.8016]))
    expected = haversine_m(31.2620, 34.8010, 31.2625, 34.8016)
    assert top1_errors_m(db, query, np.array([0]))[0] == pytest.approx(expected, abs=1e-3)


def test_recall_at_thresholds_by_hand():
    # sorted errors 3, 10, 11, 26: within 5 m 1 of 4; within 10 m 2 (10 counts: <=); 25 m 3; 50 and 100 m all
    recall = recall_at_thresholds(np.array(HAND_ERRORS), LOCALIZATION_THRESHOLDS_M)
    assert recall == {5.0: 0.25, 10.0: 0.5, 25.0: 0.75, 50.0: 1.0, 100.0: 1.0}
    assert all(np.isnan(v) for v in recall_at_thresholds(np.zeros(0)).values())


def test_percentiles_by_hand():
    # numpy's linear interpolation on sorted 3, 10, 11, 26: position p/100 * (n - 1) = 0.03 p
    # median: position 1.5 -> 10 + 0.5 * (11 - 10) = 10.5
    # p75:    position 2.25 -> 11 + 0.25 * (26 - 11) = 14.75
    # p90:    position 2.7 -> 11 + 0.7 * (26 - 11) = 21.5
    got = top1_error_percentiles(np.array(HAND_ERRORS))
    assert got == pytest.approx({"median": 10.5, "p75": 14.75, "p90": 21.5})


def test_result_and_its_json_keys():
    result = localization_from_ranking(line_xyz(DB_X), line_xyz(Q_X), TOP1, pos_threshold_m=10.0)
    payload = result.to_json()
    assert set(payload) == {"recall_at_threshold_m", "top1_error_m"}
    assert payload["recall_at_threshold_m"] == {"5": 0.25, "10": 0.5, "25": 0.75, "50": 1.0, "100": 1.0}
    assert payload["top1_error_m"] == pytest.approx({"median": 10.5, "p75": 14.75, "p90": 21.5})
    json.dumps(payload, allow_nan=False)  # valid JSON
    # no queries: undefined values are written as null, not NaN
    nothing = localization_from_ranking(line_xyz(DB_X), np.zeros((0, 3)), np.zeros(0, int), pos_threshold_m=1.0)
    assert nothing.to_json()["top1_error_m"] == {"median": None, "p75": None, "p90": None}
    json.dumps(nothing.to_json(), allow_nan=False)


def test_out_of_range_top1_is_refused():
    with pytest.raises(ValueError, match="outside 0..3"):
        top1_errors_m(line_xyz(DB_X), line_xyz(Q_X), np.array([0, 1, 2, -1]))
    with pytest.raises(ValueError, match="3 entries for 4 queries"):
        top1_errors_m(line_xyz(DB_X), line_xyz(Q_X), np.array([0, 1, 2]))


def synthetic_evaluation(pos_threshold_m: float):
    """Descriptors that follow position plus noise; some queries far from every database image."""
    rng = np.random.default_rng(3)
    db_xy = rng.uniform(0, 300, size=(120, 2))
    q_xy = np.vstack([db_xy[:40] + rng.normal(0, 8, size=(40, 2)), rng.uniform(400, 500, size=(8, 2))])
    db_xyz, q_xyz = metric_to_xyz(*db_xy.T), metric_to_xyz(*q_xy.T)
    basis = rng.normal(size=(2, 16))
    describe = lambda xy: np.sin(xy @ basis / 60.0) + rng.normal(0, 0.15, size=(len(xy), 16))  # noqa: E731
    result = evaluate_retrieval(describe(db_xy), db_xyz, describe(q_xy), q_xyz, pos_threshold_m=pos_threshold_m)
    return result, db_xyz, q_xyz


@pytest.mark.parametrize("pos_threshold_m", [10.0, 25.0])
def test_agrees_with_recall_at_1_of_evaluate_retrieval(pos_threshold_m):
    result, db_xyz, q_xyz = synthetic_evaluation(pos_threshold_m)
    assert result.num_queries_without_positive > 0  # the denominator question matters here
    assert 0.0 < result.recalls[1] < 1.0
    view = localization_from_ranking(db_xyz, q_xyz, result.top_indices, pos_threshold_m)
    assert view.recall_at_threshold_m[pos_threshold_m] == result.recalls[1]
    np.testing.assert_allclose(view.errors_m, result.top_distances_m[:, 0])


def test_figure_with_three_variants(tmp_path):
    result, db_xyz, q_xyz = synthetic_evaluation(25.0)
    trained = localization_from_ranking(db_xyz, q_xyz, result.top_indices, 25.0)
    rng = np.random.default_rng(0)
    curves = {"raw": trained.errors_m * 3 + 5, "pca_whitened": rng.exponential(40, size=48), "trained": trained}
    path = draw_localization_figure(curves, tmp_path / "plots" / "run_localization.png", "synthetic: 3 variants")
    assert path == tmp_path / "plots" / "run_localization.png"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    with pytest.raises(ValueError, match="no variants"):
        draw_localization_figure({}, tmp_path / "empty.png", "nothing")


@pytest.mark.slow
def test_importing_the_module_does_not_import_torch_or_matplotlib():
    code = ("import vprkit.retrieval.localization, sys; "
            "assert 'torch' not in sys.modules, 'torch'; assert 'matplotlib' not in sys.modules, 'matplotlib'")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
