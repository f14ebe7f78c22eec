"""The top-1 precision-recall curve (vprkit.retrieval.pr_curve), VPR-Bench's definition, checked by hand:
points, AUC-PR by the trapezoid rule, recall at 100 % precision, edge cases, CSV and figure."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from vprkit.retrieval.evaluation import evaluate_retrieval
from vprkit.tables.places import metric_to_xyz
from vprkit.retrieval.pr_curve import draw_pr_figure, pr_line, top1_pr_curve, top1_pr_of_result

# Five queries: top-1 similarity and whether that top-1 is a positive by the pair rule.
SCORES = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
CORRECT = np.array([True, False, True, True, False])  # 3 correct top-1: the recall denominator
# By hand, accepting the top-1 when similarity >= t (TP, FP -> precision TP/(TP+FP), recall TP/3):
#   t = 0.9: 1, 0 -> P 1,   R 1/3
#   t = 0.8: 1, 1 -> P 1/2, R 1/3
#   t = 0.7: 2, 1 -> P 2/3, R 2/3
#   t = 0.6: 3, 1 -> P 3/4, R 1
#   t = 0.5: 3, 2 -> P 3/5, R 1      (lowest threshold: precision = R@1 = 3/5)
# plus the added point R 0, P 1 (no threshold).
HAND_POINTS = [(None, 1.0, 0.0), (0.9, 1.0, 1 / 3), (0.8, 1 / 2, 1 / 3), (0.7, 2 / 3, 2 / 3),
               (0.6, 3 / 4, 1.0), (0.5, 3 / 5, 1.0)]  # (threshold, precision, recall), highest threshold first
# Trapezoids along recall: [0, 1/3] (1 + 1)/2 * 1/3 = 24/72; [1/3, 1/3] 0;
# [1/3, 2/3] (1/2 + 2/3)/2 * 1/3 = 14/72; [2/3, 1] (2/3 + 3/4)/2 * 1/3 = 17/72; [1, 1] 0
HAND_AUC = 55 / 72            # 0.7639 (average precision would be (1 + 2/3 + 3/4)/3 = 0.806)
HAND_R_AT_100P = 1 / 3        # the largest recall with precision 1 (t = 0.9)


def test_hand_computed_example():
    curve = top1_pr_curve(SCORES, CORRECT)
    frame = curve.frame()
    assert list(frame.columns) == ["precision", "recall", "threshold"]
    assert len(frame) == len(HAND_POINTS)
    for row, (threshold, precision, recall) in zip(frame.itertuples(), HAND_POINTS):
        assert (row.precision, row.recall) == pytest.approx((precision, recall))
        assert np.isnan(row.threshold) if threshold is None else row.threshold == pytest.approx(threshold)
    assert curve.auc_pr == pytest.approx(HAND_AUC)
    assert curve.recall_at_100_precision == pytest.approx(HAND_R_AT_100P)
    assert (curve.num_queries, curve.num_correct) == (5, 3)
    assert curve.summary() == pytest.approx({"auc_pr": HAND_AUC, "recall_at_100_precision": HAND_R_AT_100P})
    assert "AUC-PR 0.764" in pr_line(curve) and "3 of 5" in pr_line(curve)


def test_query_order_does_not_matter_and_q_by_k_uses_the_first_column():
    order = np.array([3, 0, 4, 1, 2])
    shuffled = top1_pr_curve(SCORES[order], CORRECT[order])
    assert shuffled.auc_pr == pytest.approx(HAND_AUC)
    ranking_scores = np.column_stack([SCORES, SCORES - 0.05])
    ranking_correct = np.column_stack([CORRECT, ~CORRECT])  # the second column must be ignored
    assert top1_pr_curve(ranking_scores, ranking_correct).auc_pr == pytest.approx(HAND_AUC)


def test_all_correct():
    curve = top1_pr_curve(np.array([0.9, 0.5, 0.5]), np.array([True, True, True]))
    # precision 1 everywhere: recall 1/3 at 0.9, 1 at 0.5 (a tie: one threshold) -> area 1
    assert curve.auc_pr == pytest.approx(1.0)
    assert curve.recall_at_100_precision == pytest.approx(1.0)
    assert np.allclose(curve.precision, 1.0)


def test_none_correct_is_undefined_not_a_number():
    curve = top1_pr_curve(np.array([0.9, 0.5, 0.5]), np.array([False, False, False]))
    assert np.isnan(curve.auc_pr) and np.isnan(curve.recall_at_100_precision)
    assert np.all(np.isnan(curve.recall))
    assert curve.summary() == {"auc_pr": None, "recall_at_100_precision": None}
    assert curve.num_correct == 0 and "AUC-PR -" in pr_line(curve)


def test_ties_are_one_threshold():
    # {0.9, 0.9}: one right, one wrong, accepted together -> P 1/2, R 1/2; then 0.5 -> P 2/3, R 1
    # area: [0, 1/2] (1 + 1/2)/2 * 1/2 = 3/8; [1/2, 1] (1/2 + 2/3)/2 * 1/2 = 7/24 -> 2/3
    curve = top1_pr_curve(np.array([0.9, 0.9, 0.5]), np.array([True, False, True]))
    assert curve.thresholds.tolist() == [0.5, 0.9]
    assert curve.auc_pr == pytest.approx(2 / 3)
    assert curve.recall_at_100_precision == 0.0  # the most similar top-1s are not all right


def test_most_similar_wrong_gives_zero_recall_at_full_precision():
    curve = top1_pr_curve(np.array([0.95, 0.9, 0.8]), np.array([False, True, True]))
    assert curve.recall_at_100_precision == 0.0
    # points R 0 P 1 | t .95: P 0, R 0 | t .9: P 1/2, R 1/2 | t .8: P 2/3, R 1
    # area: 0 + (0 + 1/2)/2 * 1/2 + (1/2 + 2/3)/2 * 1/2 = 1/8 + 7/24 = 5/12
    assert curve.auc_pr == pytest.approx(5 / 12)


def test_no_queries_and_bad_shapes():
    empty = top1_pr_curve(np.zeros(0), np.zeros(0, bool))
    assert empty.num_queries == 0 and np.isnan(empty.auc_pr) and empty.frame().empty
    with pytest.raises(ValueError, match="one value per query"):
        top1_pr_curve(np.zeros(3), np.zeros(2, bool))


def test_queries_without_a_positive_are_negatives():
    # database at x = 0 and 100 m; queries at 1 m (positive within 25 m) and at 500 m (none):
    # the far query's top-1 is wrong, so it lowers precision, and the recall denominator is 1
    db = metric_to_xyz(np.array([0.0, 100.0]), np.zeros(2))
    queries = metric_to_xyz(np.array([1.0, 500.0]), np.zeros(2))
    desc_db = np.array([[1.0, 0.0], [0.0, 1.0]])
    desc_q = np.array([[0.6, 0.8], [0.0, 1.0]])  # query 0's top-1 is db 1 (0.8 > 0.6), 99 m away: wrong
    result = evaluate_retrieval(desc_db, db, desc_q, queries, pos_threshold_m=25.0, recall_at=(1,))
    assert result.num_queries_without_positive == 1
    curve = top1_pr_of_result(result)
    assert curve.num_queries == 2 and curve.num_correct == 0  # both top-1s wrong: undefined
    desc_q = np.array([[0.8, 0.6], [0.0, 1.0]])  # query 0 -> db 0 (0.8, right); query 1 -> db 1 (1.0, wrong)
    curve = top1_pr_of_result(evaluate_retrieval(desc_db, db, desc_q, queries, pos_threshold_m=25.0, recall_at=(1,)))
    # t = 1.0: P 0, R 0 | t = 0.8: P 1/2, R 1 -> area (0 + 1/2)/2 * 1 = 1/4, recall at 100 % precision 0
    assert curve.num_correct == 1
    assert curve.auc_pr == pytest.approx(0.25, abs=1e-6)
    assert curve.recall_at_100_precision == 0.0


def test_csv_and_figure(tmp_path):
    path = tmp_path / "x_pr.csv"
    top1_pr_curve(SCORES, CORRECT).frame().to_csv(path, index=False)
    back = pd.read_csv(path)
    assert back["recall"].tolist() == pytest.approx([r for _, _, r in HAND_POINTS])
    assert back["threshold"].isna().tolist() == [True] + [False] * 5  # the added point has no threshold
    curves = {"raw": top1_pr_curve(SCORES, CORRECT), "trained": top1_pr_curve(SCORES, np.ones(5, bool)),
              "none right": top1_pr_curve(SCORES, np.zeros(5, bool))}
    png = draw_pr_figure(curves, tmp_path / "x_pr.png", "three curves")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_pr.csv", "x_pr.png"]  # no temporary file left
    with pytest.raises(ValueError):
        draw_pr_figure({}, tmp_path / "none.png", "none")


@pytest.mark.slow
def test_importing_the_module_does_not_import_torch_or_matplotlib():
    import subprocess
    import sys

    from helpers import REPO

    code = ("import vprkit.retrieval.pr_curve, sys; "
            "assert 'torch' not in sys.modules, 'torch'; assert 'matplotlib' not in sys.modules, 'matplotlib'")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
