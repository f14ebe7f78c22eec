"""Figures of analyze_metrics.py that take plain tables: the comparison of comparable runs, the
raw / PCA-whitened / trained bars of an experiment, and a tuning study (trial values, parameter
importance). matplotlib with the Agg backend; no torch (analyze_metrics.py must start fast)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: figures are only written to files
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from vprkit.cli import VPRError, write_png  # noqa: E402
from vprkit.logs.runlog import EXPERIMENT_VARIANTS, experiment_recalls  # noqa: E402

VARIANT_LABELS = {"raw": "raw", "pca_whitened": "PCA-whitened", "vlad": "VLAD (training-free)", "trained": "trained",
                  "trained_whitened": "trained + database whitening"}
LOSS_COLORS = {"train": "C0", "triplet": "C1", "contrastive": "C2", "val": "C3"}


def save_figure(fig: Figure, path: Path) -> Path:
    write_png(fig, path)
    plt.close(fig)
    return path


def data_name(path: str | Path) -> str:
    """A data file as a figure names it: its folder and file name (`bgu_campus/train.csv`), never
    the absolute path it was given as (long, and it names the user's machine)."""
    path = Path(path)
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def recall_scale(values: pd.Series | pd.DataFrame) -> float:
    """100 to show recalls in percent: they are fractions (DESIGN.md §7); values > 1 are percent already."""
    return 1.0 if np.any(np.asarray(values, dtype=float) > 1.0) else 100.0


@dataclass
class RunCurve:
    """One run of a comparison: its label (what differs from the other runs), validation R@1
    per epoch (fractions) and the text beside its best-R@1 bar."""

    label: str
    epochs: np.ndarray
    val_r1: np.ndarray
    best_r1: float | None
    bar_text: str


def plot_comparison(runs: Sequence[RunCurve], title: str, path: Path) -> Path:
    """Validation R@1 per epoch for every run (legend beside the panel, off the curves), and
    each run's best R@1 as a bar (best on top)."""
    scale = recall_scale(np.concatenate([r.val_r1 for r in runs] or [np.zeros(1)]))
    palette = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20").colors
    colors = {r.label: palette[i % len(palette)] for i, r in enumerate(runs)}
    fig, (ax_curves, ax_bars) = plt.subplots(1, 2, figsize=(17, max(5.5, 2.5 + 0.35 * len(runs))), layout="constrained",
                                             gridspec_kw={"width_ratios": [3, 2]})
    for run in runs:
        ax_curves.plot(run.epochs, run.val_r1 * scale, marker="o", markersize=4, color=colors[run.label],
                       label=run.label)
    ax_curves.set_title("Validation R@1 per epoch")
    ax_curves.set_xlabel("epoch")
    ax_curves.set_ylabel("R@1 (%)")
    ax_curves.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_curves.grid(alpha=0.3)
    ax_curves.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncols=2 if len(runs) > 3 else 1,
                     fontsize="small")  # below the panel: never over the curves
    ranked = sorted(runs, key=lambda r: -1.0 if r.best_r1 is None else r.best_r1)
    best = [0.0 if r.best_r1 is None else r.best_r1 * scale for r in ranked]
    bars = ax_bars.barh([r.label for r in ranked], best, color=[colors[r.label] for r in ranked])
    ax_bars.bar_label(bars, labels=[r.bar_text for r in ranked], padding=3, fontsize="small")
    ax_bars.set_xlim(0, max([*best, 1.0]) * 1.35)
    ax_bars.set_title("Best validation R@1 per run (best on top)")
    ax_bars.set_xlabel("R@1 (%)")
    ax_bars.grid(axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=13, fontweight="bold")
    return save_figure(fig, path)


def plot_experiment_bars(table: pd.DataFrame, name: str, path: Path) -> Path:
    """Raw / PCA-whitened / trained recall per model, one panel per R@N."""
    models = list(dict.fromkeys(table["model"]))
    variants = [v for v in EXPERIMENT_VARIANTS if v in set(table["variant"])]
    variants += [v for v in dict.fromkeys(table["variant"]) if v not in variants]
    recalls = experiment_recalls(table.columns)
    scale = recall_scale(table[recalls])
    width = 0.8 / len(variants)
    centers = np.arange(len(models))
    fig, axes = plt.subplots(1, len(recalls), figsize=(max(4.5 * len(recalls), 3.2 * len(models) + 4), 5.5),
                             sharey=True, layout="constrained", squeeze=False)
    axes = axes[0]
    for ax, column in zip(axes, recalls):
        values = table.pivot_table(index="model", columns="variant", values=column, aggfunc="last")
        for i, variant in enumerate(variants):
            heights = values.reindex(index=models, columns=variants)[variant].to_numpy() * scale
            bars = ax.bar(centers + (i - (len(variants) - 1) / 2) * width, np.nan_to_num(heights), width,
                          color=f"C{i}", label=VARIANT_LABELS.get(variant, variant))
            ax.bar_label(bars, labels=["" if np.isnan(h) else f"{h:.1f}" for h in heights], fontsize=8, padding=2)
        ax.set_title(column.replace("recall", "Recall"))
        ax.set_xticks(centers, models, rotation=20 if len(models) > 3 else 0)
        ax.set_xlabel("model")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("recall (%)")
    top = np.nanmax(table[recalls].to_numpy(dtype=float)) * scale
    axes[0].set_ylim(0, (top if np.isfinite(top) and top > 0 else 100.0) * 1.12)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=len(variants))
    fig.suptitle(f"Recall per model: raw vs PCA-whitened vs trained descriptors ({name})", fontsize=13,
                 fontweight="bold")
    return save_figure(fig, path)


# ============================================================================================
# Panels of a run's figure (analyze_metrics.plot_run)
# ============================================================================================
def show_no_data(ax: Axes, title: str, message: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="0.4", fontsize=11)
    ax.set_yticks([])


def batches_text(count: int) -> str:
    return f"{count} batch" if count == 1 else f"{count} batches"


def smoothed(values: pd.Series, window: int) -> pd.Series:
    """Centred moving average (NaN cells skipped), so a curve is not shifted behind its data."""
    return values.rolling(window, center=True, min_periods=1).mean()


def plot_batch_loss(ax: Axes, x: np.ndarray, batches: pd.DataFrame, window: int) -> None:
    title = "Batch loss (weighted triplet + contrastive)"
    if batches["train_loss"].notna().sum() == 0:
        show_no_data(ax, title, "no batches logged yet")
        return
    ax.plot(x, batches["train_loss"], color=LOSS_COLORS["train"], alpha=0.25, linewidth=0.8, label="per batch")
    ax.plot(x, smoothed(batches["train_loss"], window), color=LOSS_COLORS["train"], linewidth=2,
            label=f"moving average ({batches_text(window)})")
    ax.set_title(title)
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")


def plot_loss_parts(ax: Axes, x: np.ndarray, batches: pd.DataFrame, epochs: pd.DataFrame, window: int) -> None:
    """Contrastive (left axis) and triplet (right axis) parts: per batch, smoothed, epoch averages.

    The two parts live on different scales, so each gets its own y axis in its own colour.
    """
    title = "Loss parts (unweighted): per batch, moving average, epoch average"
    parts = [("contrastive", "contrastive_loss", "avg_contrastive_loss"),
             ("triplet", "triplet_loss", "avg_triplet_loss")]
    parts = [p for p in parts if batches[p[1]].notna().any() or epochs[p[2]].notna().any()]
    if not parts:
        show_no_data(ax, title, "no batches logged yet")
        return
    handles = []
    for axis, (name, batch_column, epoch_column) in zip([ax, ax.twinx()], parts):
        color = LOSS_COLORS[name]
        axis.plot(x, batches[batch_column], color=color, alpha=0.2, linewidth=0.8)
        handles += axis.plot(x, smoothed(batches[batch_column], window), color=color, linewidth=2,
                             label=f"{name} (moving average, {batches_text(window)})")
        averages = epochs.dropna(subset=[epoch_column])
        if not averages.empty:
            handles += axis.plot(averages["epoch"] - 0.5, averages[epoch_column], color=color, marker="o", markersize=5,
                                 markeredgecolor="black", linestyle="none", label=f"{name} (epoch average, mid-epoch)")
        axis.set_ylabel(f"{name} loss", color=color)
        axis.tick_params(axis="y", colors=color)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, loc="upper right", fontsize="small")


def plot_epoch_losses(ax: Axes, epochs: pd.DataFrame) -> None:
    title = "Loss per epoch: training average vs validation"
    curves = [
        ("avg_train_loss", "train (epoch average)", LOSS_COLORS["train"], "o"),
        ("val_loss", "validation", LOSS_COLORS["val"], "s"),
    ]
    drawn = False
    for column, label, color, marker in curves:
        rows = epochs.dropna(subset=[column])
        if not rows.empty:
            ax.plot(rows["epoch"], rows[column], marker=marker, color=color, label=label)
            drawn = True
    if not drawn:
        show_no_data(ax, title, "no completed epoch yet")
        return
    ax.set_title(title)
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")


def show_text_panel(ax: Axes, title: str, lines: list[str]) -> None:
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.02, 0.95, "\n".join(lines), transform=ax.transAxes, va="top", ha="left", family="monospace",
            fontsize=10, linespacing=1.6, wrap=True)


# ============================================================================================
# A tuning study
# ============================================================================================
def study_importance(study: Any) -> tuple[dict[str, float], str]:
    """(parameter -> importance, how it was computed): optuna.importance (fANOVA needs at least
    two completed trials and scikit-learn) where it works, else {} (the figure then shows a
    per-parameter scatter instead)."""
    try:
        from optuna.importance import get_param_importances

        return dict(get_param_importances(study)), "optuna.importance (fANOVA)"
    except Exception as exc:  # noqa: BLE001 - too few trials, one distinct value, a missing extra...
        return {}, f"not available ({type(exc).__name__})"


def plot_study(study: Any, path: Path) -> Path:
    """Left: each completed trial's value in trial order with the best so far; right: parameter
    importance as bars, or (importance not computable) each parameter's values against the
    trial value, one small panel per parameter."""
    trials = [t for t in study.trials if t.value is not None]
    if not trials:

        raise VPRError(f"study {study.study_name}: no completed trial yet; run tune_vpr.py first")
    maximize = study.direction.name == "MAXIMIZE"
    numbers = np.array([t.number for t in trials])
    values = np.array([t.value for t in trials], dtype=float)
    best_so_far = (np.maximum if maximize else np.minimum).accumulate(values)
    importance, how = study_importance(study)
    params = sorted({p for t in trials for p in t.params})
    scatter = not importance and params
    fig = plt.figure(figsize=(14, 5.5), layout="constrained")
    left, right = fig.subfigures(1, 2, width_ratios=[1, 1])
    ax = left.subplots()
    ax.plot(numbers, values, "o", color="C0", label="trial value")
    ax.step(numbers, best_so_far, where="post", color="C3", lw=2, label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("objective")
    ax.set_title(f"Trial values ({'maximised' if maximize else 'minimised'})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncols=2, fontsize="small")
    if importance:
        ax_imp = right.subplots()
        names = list(importance)[::-1]
        ax_imp.barh(names, [importance[n] for n in names], color="C2")
        ax_imp.set_xlabel("importance (share of the objective's variance)")
        ax_imp.set_title(f"Parameter importance: {how}")
        ax_imp.grid(axis="x", alpha=0.3)
    elif scatter:
        axes = np.atleast_1d(right.subplots(1, len(params), sharey=True))
        for ax_p, param in zip(axes, params):
            shown = [(t.params[param], t.value) for t in trials if param in t.params]
            xs = [x for x, _ in shown]
            if all(isinstance(x, (int, float)) for x in xs):
                ax_p.plot(xs, [v for _, v in shown], "o", color="C1")
                if min(xs) > 0 and max(xs) / min(xs) > 50:
                    ax_p.set_xscale("log")
            else:
                ax_p.plot([str(x) for x in xs], [v for _, v in shown], "o", color="C1")
            ax_p.set_xlabel(param)
            ax_p.grid(alpha=0.3)
        right.suptitle(f"Objective against each parameter (importance {how})", fontsize=11)
    best = study.best_trial
    fig.suptitle(f"Tuning study {study.study_name}: {len(trials)} completed trial(s), best {best.value:.4g} "
                 f"(trial {best.number})", fontsize=13, fontweight="bold")
    return save_figure(fig, path)
