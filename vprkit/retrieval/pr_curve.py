"""The precision-recall curve of the top-1 match, as VPR-Bench defines it (Zaffar et al., IJCV 2021;
github.com/MubarizZaffar/VPR-Bench, performance_comparison.py).

Definition implemented (the same as VPR-Bench's code):

- every evaluated query is one sample, queries without any positive in the database included
  (their top-1 cannot be correct, so they are always negatives, exactly as VPR-Bench's
  `compute_matches` marks a query whose retrieved image is not in its ground truth);
- its score is the similarity of its top-1 database image, its label whether that top-1 is a
  positive by the pair rule (RecallResult.correct[:, 0]: within pos_threshold_m, or of the
  query's place label);
- at a threshold t the system accepts every query whose top-1 similarity is >= t:
  precision(t) = correct accepted / accepted, recall(t) = correct accepted / all queries whose
  top-1 is correct (scikit-learn's `precision_recall_curve(correct, similarity)`, VPR-Bench's
  call). So the lowest threshold has recall 1 and precision = R@1 over all queries; tied
  similarities are one threshold; the curve ends at scikit-learn's added point (recall 0,
  precision 1), which has no threshold;
- AUC-PR = `sklearn.metrics.auc(recall, precision)`: the trapezoid rule over those points,
  the added point included (VPR-Bench's `compute_auc_PR`);
- recall at 100 % precision = the largest recall of a point whose precision is 1, so 0 when the
  most similar top-1 is wrong (VPR-Bench's `recall_at_precision_one` in `compute_extendedprecision`).

This is not the robotics convention of recall = correct accepted / queries with a positive
(e.g. VPR_Tutorial's createPR), whose highest recall is R@1 on those queries: VPR-Bench's curve
is that one with its recall axis divided by the share of correct top-1 matches.
Undefined cases: no query gives empty arrays and NaN; no correct top-1 (recall is 0 / 0) gives
precision 0 at every threshold, recall NaN, NaN AUC-PR and NaN recall at 100 % precision.

Pure numpy / scikit-learn; matplotlib only when a figure is drawn (object API, no pyplot).
"""
from __future__ import annotations

import math
import textwrap
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vprkit.cli import write_png

if TYPE_CHECKING:
    import pandas as pd


@dataclass
class Top1PR:
    """The top-1 precision-recall curve of one evaluation (see the module docstring).
    precision[i], recall[i] hold at thresholds[i]; precision and recall have one more entry,
    last, the added point (recall 0, precision 1) (scikit-learn's order: thresholds increasing)."""

    precision: np.ndarray
    recall: np.ndarray
    thresholds: np.ndarray
    auc_pr: float                   # trapezoid rule over (recall, precision); NaN when undefined
    recall_at_100_precision: float  # largest recall at precision 1; NaN when undefined
    num_queries: int
    num_correct: int                # queries whose top-1 is correct (the recall denominator)

    def summary(self) -> dict[str, float | None]:
        """{"auc_pr", "recall_at_100_precision"}: the JSON / experiment CSV keys; NaN as None."""
        return {"auc_pr": _finite_or_none(self.auc_pr),
                "recall_at_100_precision": _finite_or_none(self.recall_at_100_precision)}

    def frame(self) -> pd.DataFrame:
        """A pandas DataFrame (precision, recall, threshold), one row per point from the highest
        threshold down; the added point (recall 0, precision 1) first, with an empty threshold."""
        import pandas as pd

        thresholds = np.append(self.thresholds, np.nan) if len(self.precision) else self.thresholds
        return pd.DataFrame({"precision": self.precision[::-1], "recall": self.recall[::-1],
                             "threshold": thresholds[::-1]})


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _fmt(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) else "-"


def top1_pr_curve(top1_similarity: np.ndarray, top1_correct: np.ndarray) -> Top1PR:
    """The top-1 precision-recall curve from one similarity and one correctness flag per query
    (Q x K arrays: the first column is used)."""
    from sklearn.metrics import auc, precision_recall_curve

    scores = np.asarray(top1_similarity, dtype=np.float64)
    correct = np.asarray(top1_correct, dtype=bool)
    scores = scores[:, 0] if scores.ndim == 2 else scores
    correct = correct[:, 0] if correct.ndim == 2 else correct
    if scores.shape != correct.shape or scores.ndim != 1:
        raise ValueError(f"top1_similarity has shape {scores.shape}, top1_correct {correct.shape}: one value per query")
    if scores.size == 0:
        empty = np.zeros(0)
        return Top1PR(empty, empty, empty, math.nan, math.nan, 0, 0)
    num_correct = int(correct.sum())
    with warnings.catch_warnings():  # no correct top-1: scikit-learn warns, and its recall is replaced below
        warnings.simplefilter("ignore")
        precision, recall, thresholds = precision_recall_curve(correct, scores)
    if num_correct == 0:
        recall = np.full_like(recall, np.nan)
        return Top1PR(precision, recall, thresholds, math.nan, math.nan, len(scores), 0)
    at_one = recall[precision == 1.0]  # never empty: the added point (recall 0, precision 1)
    return Top1PR(precision, recall, thresholds, float(auc(recall, precision)), float(at_one.max()),
                  len(scores), num_correct)


def top1_pr_of_result(result: Any) -> Top1PR:
    """The curve of an evaluation (a vprkit.retrieval.evaluation.RecallResult): its top-1 similarities and
    the pair rule's verdict on each top-1 (by distance or by place label, as the evaluation)."""
    return top1_pr_curve(result.top_scores, result.correct)


def pr_line(curve: Top1PR) -> str:
    """One printable line: AUC-PR and recall at 100 % precision."""
    return (f"  top-1 PR     AUC-PR {_fmt(curve.auc_pr)} (trapezoid), recall at 100% precision "
            f"{_fmt(curve.recall_at_100_precision)} ({curve.num_correct} of {curve.num_queries} top-1 correct)")


def draw_pr_figure(curves: Mapping[str, Top1PR], path: str | Path, title: str) -> Path:
    """One PNG with each named curve (precision against recall, as steps between the points
    the area is computed from), AUC-PR and recall at 100 % precision in the legend. Atomic."""
    from matplotlib.figure import (
        Figure,  # lazily, and without pyplot: no GUI backend is touched
    )

    if not curves:
        raise ValueError("draw_pr_figure: no curves to draw")
    fig = Figure(figsize=(7, 6), layout="constrained")
    ax = fig.subplots()
    for i, (name, curve) in enumerate(curves.items()):
        label = f"{name}: AUC-PR {_fmt(curve.auc_pr)}, R@100%P {_fmt(curve.recall_at_100_precision)}"
        ax.plot(curve.recall[::-1], curve.precision[::-1], color=f"C{i % 10}", lw=2, marker=".", ms=3, label=label)
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall (correct top-1 accepted / all correct top-1)")
    ax.set_ylabel("precision (correct / accepted top-1 matches)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize="small")
    ax.set_title(textwrap.fill(title, 80), fontsize=10)  # long data names wrap instead of leaving the figure
    return write_png(fig, Path(path))
