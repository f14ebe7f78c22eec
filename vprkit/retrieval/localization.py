"""The localization view of an evaluation with positions: how far off the top-1 match is.

Recall@N says whether a right image was retrieved; a GPS user asks how many metres the top
match is from the query. From what an evaluation already has (database and query positions as
metric xyz, the ranked database indices and similarities per query) this module computes

- R@1 at distance thresholds (5, 10, 25, 50, 100 m): the share of ALL evaluated queries whose
  top-1 database image lies within the threshold;
- the median, 75th and 90th percentile of the top-1 error in metres;
- a two-panel figure of several variants (raw / PCA-whitened / trained): R@1 against threshold
  and the cumulative distribution of the top-1 error.

The precision-recall curve of the top-1 similarity (VPR-Bench's AUC-PR) needs no positions and
lives in vprkit.retrieval.pr_curve.

Pure numpy / scikit-learn; matplotlib is imported only when a figure is drawn, through its
object API (no pyplot, so no GUI backend and no global figure state). No torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from vprkit.cli import write_png

LOCALIZATION_THRESHOLDS_M: tuple[float, ...] = (5, 10, 25, 50, 100)
PERCENTILES: dict[str, float] = {"median": 50.0, "p75": 75.0, "p90": 90.0}


# ============================================================================================
# Numbers
# ============================================================================================
def _top1_column(ranked_or_top1: np.ndarray, what: str) -> np.ndarray:
    """The first column of a Q x K ranking, or a length-Q vector as it is."""
    array = np.asarray(ranked_or_top1)
    if array.ndim == 2:
        if array.shape[1] == 0:
            raise ValueError(f"{what}: the ranking has no columns (K = 0)")
        return array[:, 0]
    if array.ndim != 1:
        raise ValueError(f"{what}: expected a length-Q vector or a Q x K ranking, got shape {array.shape}")
    return array


def top1_errors_m(db_xyz: np.ndarray, query_xyz: np.ndarray, top1: np.ndarray) -> np.ndarray:
    """Distance in metres from each query to its top-1 database image: the straight line in the
    xyz frame (latlon_to_xyz / metric_to_xyz), the distance the pair rule compares with
    pos_threshold_m. `top1` holds one database index per query, or a Q x K ranking (its first
    column is used)."""
    db_xyz = np.asarray(db_xyz, dtype=np.float64)
    query_xyz = np.asarray(query_xyz, dtype=np.float64)
    top1 = _top1_column(top1, "top1").astype(np.int64)
    if len(top1) != len(query_xyz):
        raise ValueError(f"top1 has {len(top1)} entries for {len(query_xyz)} queries")
    if len(top1) and (top1.min() < 0 or top1.max() >= len(db_xyz)):
        raise ValueError(f"top1 holds database indices outside 0..{len(db_xyz) - 1} (a search that found nothing?)")
    return np.linalg.norm(db_xyz[top1] - query_xyz, axis=1)


def recall_at_thresholds(errors_m: np.ndarray,
                         thresholds: Sequence[float] = LOCALIZATION_THRESHOLDS_M) -> dict[float, float]:
    """R@1 at each distance threshold: the share of ALL evaluated queries whose top-1 lies within
    it (error <= threshold, the `<=` of the pair rule); NaN for no queries.

    The denominator is every query, including those with no database image within the
    threshold (they count as misses), exactly as RecallResult.recalls[1] from evaluate_retrieval
    (recall_at_n averages over all queries). So with correctness decided by distance,
    recall_at_thresholds(errors, [pos_threshold_m]) equals RecallResult's Recall@1 at that
    threshold. When correctness is decided by place labels, the two differ: this view only
    looks at distance."""
    errors = np.asarray(errors_m, dtype=np.float64)
    if errors.size == 0:
        return {float(t): float("nan") for t in thresholds}
    return {float(t): float(np.mean(errors <= t)) for t in thresholds}


def top1_error_percentiles(errors_m: np.ndarray) -> dict[str, float]:
    """{"median", "p75", "p90"} of the top-1 error in metres (numpy's default linear
    interpolation between order statistics); NaN for no queries."""
    errors = np.asarray(errors_m, dtype=np.float64)
    if errors.size == 0:
        return {name: float("nan") for name in PERCENTILES}
    values = np.percentile(errors, list(PERCENTILES.values()))
    return {name: float(v) for name, v in zip(PERCENTILES, values)}


# ============================================================================================
# The result
# ============================================================================================
def _threshold_key(threshold_m: float) -> str:
    """5.0 -> "5", 2.5 -> "2.5": the JSON key of a threshold in metres."""
    return f"{float(threshold_m):g}"


def _json_number(value: float) -> float | None:
    """NaN (undefined) as JSON null: json.dumps would write NaN, which is not JSON."""
    return None if value is None or not math.isfinite(value) else float(value)


@dataclass
class LocalizationResult:
    """The localization view of one evaluation (see the module docstring)."""

    recall_at_threshold_m: dict[float, float]    # threshold (m) -> R@1 over all queries
    top1_error_m: dict[str, float]               # "median", "p75", "p90" -> metres
    errors_m: np.ndarray                         # Q: metres from each query to its top-1
    pos_threshold_m: float                       # the evaluation's positive threshold

    @property
    def num_queries(self) -> int:
        return len(self.errors_m)

    def to_json(self) -> dict[str, Any]:
        """The keys `--output_json` holds: recall_at_threshold_m ({"5": r, ...}), top1_error_m
        ({"median", "p75", "p90"} in metres); undefined values are null."""
        return {
            "recall_at_threshold_m": {_threshold_key(t): _json_number(r)
                                      for t, r in self.recall_at_threshold_m.items()},
            "top1_error_m": {name: _json_number(v) for name, v in self.top1_error_m.items()},
        }


def localization_from_ranking(
    db_xyz: np.ndarray, q_xyz: np.ndarray, ranked_or_top1: np.ndarray, pos_threshold_m: float,
    thresholds: Sequence[float] = LOCALIZATION_THRESHOLDS_M,
) -> LocalizationResult:
    """The localization view from an evaluation's ranking: `ranked_or_top1` is Q x K database
    indices best first (RecallResult.top_indices) or the top-1 index per query."""
    errors = top1_errors_m(db_xyz, q_xyz, ranked_or_top1)
    return LocalizationResult(
        recall_at_threshold_m=recall_at_thresholds(errors, thresholds),
        top1_error_m=top1_error_percentiles(errors),
        errors_m=errors, pos_threshold_m=float(pos_threshold_m),
    )


# ============================================================================================
# The figure
# ============================================================================================
def _errors_of(curve: LocalizationResult | np.ndarray) -> np.ndarray:
    errors = curve.errors_m if isinstance(curve, LocalizationResult) else curve
    return np.asarray(errors, dtype=np.float64)


def _fmt_m(metres: float) -> str:
    return "-" if not math.isfinite(metres) else f"{metres:.0f} m" if metres >= 10 else f"{metres:.1f} m"


def draw_localization_figure(curves: Mapping[str, LocalizationResult | np.ndarray], path: str | Path,
                             title: str, thresholds: Sequence[float] = LOCALIZATION_THRESHOLDS_M) -> Path:
    """Write a two-panel PNG of one or more named variants (e.g. raw / pca_whitened / trained):
    left, R@1 against the distance threshold (log scale, 1 m to a few hundred m, markers at
    `thresholds`); right, the cumulative distribution of the top-1 error with its median, p75 and
    p90 marked. Legend below the panels, title above them; written atomically. Returns path."""
    from matplotlib.figure import Figure  # lazily, and without pyplot: no GUI backend is touched
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, PercentFormatter

    if not curves:
        raise ValueError("draw_localization_figure: no variants to draw")
    path = Path(path)
    named = {name: np.sort(_errors_of(curve)) for name, curve in curves.items()}
    pos_thresholds = sorted({c.pos_threshold_m for c in curves.values() if isinstance(c, LocalizationResult)})

    fig = Figure(figsize=(13, 5.6), layout="constrained")
    ax_recall, ax_cdf = fig.subplots(1, 2)
    x_max = max(300.0, 3.0 * max(thresholds))
    grid = np.geomspace(1.0, x_max, 400)
    all_errors = np.concatenate([e for e in named.values() if e.size] or [np.zeros(1)])
    # The CDF panel shows the body of the distribution: cut at the largest 95th percentile of
    # the variants (far outliers, kilometres in a city, would squash every curve to the left).
    cdf_max = max((float(np.percentile(e, 95)) for e in named.values() if e.size), default=1.0)
    cdf_max = max(cdf_max * 1.15, 1.0)
    percent_marks = {"median": ("o", 50.0), "p75": ("s", 75.0), "p90": ("^", 90.0)}

    for i, (name, errors) in enumerate(named.items()):
        color = f"C{i % 10}"
        if errors.size == 0:
            ax_recall.plot([], [], color=color, label=f"{name} (no queries)")
            continue
        recall = np.searchsorted(errors, grid, side="right") / errors.size * 100
        at = recall_at_thresholds(errors, thresholds)
        pct = top1_error_percentiles(errors)
        label = f"{name}: median {_fmt_m(pct['median'])}, p90 {_fmt_m(pct['p90'])}"
        ax_recall.plot(grid, recall, color=color, lw=2, label=label)
        ax_recall.plot(list(at), [v * 100 for v in at.values()], "o", color=color, ms=6)
        # ECDF as a step: share of queries with error <= x
        share = np.arange(1, errors.size + 1) / errors.size * 100
        ax_cdf.step(np.concatenate([[0.0], errors]), np.concatenate([[0.0], share]), where="post", color=color, lw=2)
        for key, (marker, _) in percent_marks.items():
            ax_cdf.plot(pct[key], PERCENTILES[key], marker, color=color, ms=7, mec="white", mew=0.8)

    for threshold in thresholds:
        ax_recall.axvline(threshold, color="0.85", lw=0.8, zorder=0)
    for pos in pos_thresholds:
        ax_recall.axvline(pos, color="0.35", lw=1.2, ls="--", zorder=0)
        ax_recall.annotate(f"eval threshold {pos:g} m", (pos, 1.5), xytext=(4, 0), textcoords="offset points",
                           fontsize=8, color="0.3", rotation=90, va="bottom")
    ax_recall.set_xscale("log")
    ax_recall.set_xlim(1.0, x_max)
    ax_recall.set_xticks([1, *thresholds, x_max])
    ax_recall.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax_recall.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax_recall.set_xlabel("distance threshold (m), log scale")
    ax_recall.set_ylabel("R@1: queries with top-1 within threshold")
    ax_recall.set_title("Recall@1 against distance threshold")

    for _, level in percent_marks.values():
        ax_cdf.axhline(level, color="0.8", lw=0.8, ls=":", zorder=0)
    ax_cdf.set_xlim(0, cdf_max)
    beyond = int((all_errors > cdf_max).sum())
    cut = (f"\n(axis cut at {cdf_max:.0f} m; beyond it: {beyond} of the {all_errors.size} errors of all variants)"
           if beyond else "")
    ax_cdf.set_xlabel(f"top-1 error (m): distance from the query to its top-1 match{cut}")
    ax_cdf.set_ylabel("share of queries with top-1 error ≤ x")
    ax_cdf.set_title("Cumulative distribution of top-1 error")
    markers = [Line2D([], [], ls="", marker=m, color="0.3", label=k) for k, (m, _) in percent_marks.items()]
    ax_cdf.legend(handles=markers, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small",
                  title="percentile", title_fontsize="small")  # beside the panel, off the curves

    for ax in (ax_recall, ax_cdf):
        ax.set_ylim(0, 100)
        ax.yaxis.set_major_formatter(PercentFormatter(100))
        ax.grid(alpha=0.3)
    fig.legend(*ax_recall.get_legend_handles_labels(), loc="outside lower center",
               ncols=min(len(named), 3), fontsize="small")
    fig.suptitle(title, fontsize=13, fontweight="bold")
    return write_png(fig, path)


# ============================================================================================
# From an evaluation's result (eval_trained.py, run_experiment.py)
# ============================================================================================
def localization_of_result(result: Any, db_xyz: np.ndarray | None,
                           q_xyz: np.ndarray | None) -> LocalizationResult | None:
    """The localization view of an evaluation (a vprkit.retrieval.evaluation.RecallResult: top_indices,
    pos_threshold_m), or None when the database or the queries have no positions (a labels-only
    evaluation: there is no distance to measure)."""
    if db_xyz is None or q_xyz is None:
        return None
    return localization_from_ranking(db_xyz, q_xyz, result.top_indices, result.pos_threshold_m)


def localization_json(localization: LocalizationResult | None) -> dict[str, Any]:
    """The `--output_json` keys of the localization view; both null without positions (labels only)."""
    if localization is not None:
        return localization.to_json()
    return {"recall_at_threshold_m": None, "top1_error_m": None}


def localization_lines(localization: LocalizationResult | None) -> str:
    """Two printable lines: R@1 at each distance threshold, and the top-1 error percentiles."""
    if localization is None:
        return "localization: no positions (labels only): no distances to report"
    recalls = "  ".join(f"{t:g} m {r:.3f}" for t, r in localization.recall_at_threshold_m.items())
    error = localization.top1_error_m
    return (f"  R@1 within   {recalls}\n"
            f"  top-1 error  median {_fmt_m(error['median'])}, p75 {_fmt_m(error['p75'])}, p90 {_fmt_m(error['p90'])}")
