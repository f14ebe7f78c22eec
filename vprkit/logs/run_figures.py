"""The figures analyze_metrics.py draws of one run (losses, validation recall, epoch times), of an
experiment table and of a tuning study; the panels they are made of are vprkit/logs/plots.py."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures are only written to files
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from vprkit.cli import VPRError  # noqa: E402
from vprkit.logs.plots import (  # noqa: E402
    plot_batch_loss,
    plot_epoch_losses,
    plot_loss_parts,
    plot_study,
    recall_scale,
    save_figure,
    show_no_data,
    show_text_panel,
)
from vprkit.logs.run_summary import (  # noqa: E402
    RECALL_COLUMNS,
    RunLog,
    RunSummary,
    format_duration,
    run_summary_lines,
    unfinished_batches,
)
from vprkit.logs.runlog import experiment_recalls, safe_name  # noqa: E402

DEFAULT_SMOOTH = 50


def smoothing_window(num_batches: int, requested: int | None) -> int:
    """The user's window, else DEFAULT_SMOOTH, shrunk to a fifth of the batches for short logs."""
    if requested is not None:
        return max(1, min(requested, num_batches))
    return max(1, min(DEFAULT_SMOOTH, num_batches // 5))


def batch_positions(batches: pd.DataFrame, last_epoch_unfinished: bool) -> np.ndarray:
    """x of each batch in epochs: the last batch of epoch e sits at e, aligned with the epoch's row.

    An unfinished last epoch is spaced like the longest epoch before it, so it shows how far it got.
    """
    if batches.empty:
        return np.zeros(0)
    epoch = batches["epoch"].ffill().fillna(1).to_numpy()
    index_in_epoch = batches.groupby(epoch).cumcount().to_numpy() + 1
    batches_per_epoch = pd.Series(epoch).value_counts()
    if last_epoch_unfinished and len(batches_per_epoch) > 1:
        last = epoch[-1]
        batches_per_epoch[last] = max(batches_per_epoch[last], batches_per_epoch.drop(last).max())
    return epoch - 1 + index_in_epoch / batches_per_epoch[epoch].to_numpy()


def plot_run(log: RunLog, summary: RunSummary, output_dir: Path, smooth: int | None) -> Path:
    fig, axes = plt.subplots(3, 2, figsize=(15, 13), layout="constrained")
    (ax_loss, ax_parts), (ax_epoch, ax_recall), (ax_time, ax_text) = axes
    x = batch_positions(log.batches, summary.unfinished_epoch)
    window = smoothing_window(len(log.batches), smooth)
    scale = recall_scale(log.epochs[RECALL_COLUMNS])

    plot_batch_loss(ax_loss, x, log.batches, window)
    plot_loss_parts(ax_parts, x, log.batches, log.epochs, window)
    plot_epoch_losses(ax_epoch, log.epochs)
    plot_validation_recall(ax_recall, log.epochs, summary, scale)
    plot_epoch_times(ax_time, log.epochs, unfinished_batches(log), summary)
    show_text_panel(ax_text, "Summary", run_summary_lines(summary, scale))

    # one x range for all panels; epoch 0 is train_vpr.py's validation of the untrained head
    left = -0.5 if (log.epochs["epoch"] <= 0).any() else 0.0
    right = max([1.0, *x[-1:], *log.epochs["epoch"], summary.epochs_run + summary.unfinished_epoch]) + 0.5
    for ax in (ax_loss, ax_parts, ax_epoch, ax_recall, ax_time):
        ax.set_xlim(left, right)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
    fig.suptitle(f"Training run {summary.run_id}", fontsize=15, fontweight="bold")
    return save_figure(fig, output_dir / f"{summary.run_id}_plots.png")


def plot_validation_recall(ax: Axes, epochs: pd.DataFrame, summary: RunSummary, scale: float) -> None:
    title = "Validation recall"
    rows = epochs.dropna(subset=["val_r1"])
    if rows.empty:
        show_no_data(ax, title, "no validation yet")
        return
    for column, label, marker in zip(RECALL_COLUMNS, ("R@1", "R@5", "R@10"), ("o", "s", "^")):
        ax.plot(rows["epoch"], rows[column] * scale, marker=marker, label=label)
    untrained = rows[rows["epoch"] == 0]
    if not untrained.empty:
        ax.axhline(untrained["val_r1"].iloc[0] * scale, color="C0", linestyle="--", linewidth=1, alpha=0.6,
                   label=f"R@1 of the untrained head (epoch 0): {untrained['val_r1'].iloc[0] * scale:.1f}%")
    best_r1 = summary.best_val_r1 * scale
    ax.axvline(summary.best_epoch, color="0.5", linestyle=":", linewidth=1.2)
    ax.plot([summary.best_epoch], [best_r1], marker="*", markersize=18, color="gold", markeredgecolor="black",
            linestyle="none", label=f"best R@1 {best_r1:.1f}% (epoch {summary.best_epoch})", zorder=5)
    ax.set_title(title)
    ax.set_ylabel("recall (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")


def plot_epoch_times(ax: Axes, epochs: pd.DataFrame, unfinished: pd.DataFrame, summary: RunSummary) -> None:
    title = "Time per epoch"
    train = epochs["epoch_time"].fillna(0).to_numpy()
    validation = epochs["val_time"].fillna(0).to_numpy()
    partial = float(unfinished["batch_time"].sum()) if not unfinished.empty else 0.0
    peak = max([*(train + validation), partial, 0.0])
    if peak == 0.0:
        show_no_data(ax, title, "no epoch times logged yet")
        return
    unit, divisor = ("minutes", 60.0) if peak > 300 else ("seconds", 1.0)
    if len(epochs):
        ax.bar(epochs["epoch"], train / divisor, color="C0", label="training")
        ax.bar(epochs["epoch"], validation / divisor, bottom=train / divisor, color="C1", label="validation")
    if partial > 0:
        ax.bar([summary.epochs_run + 1], [partial / divisor], color="C0", alpha=0.35, hatch="//", edgecolor="C0",
               label="unfinished epoch (batches so far)")
    ax.set_title(f"{title} (total {format_duration(summary.total_time_s)})")
    ax.set_ylabel(unit)
    ax.set_ylim(0, peak / divisor * 1.3)  # headroom for the legend above the bars
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", ncols=3, fontsize="small")


def bar_text(row: pd.Series) -> str:
    if pd.isna(row["best_val_r1"]):
        return "no validation yet"
    scale = recall_scale(pd.Series([row["best_val_r1"]]))
    return (f"{row['best_val_r1'] * scale:.1f}% "
            f"(epoch {int(row['best_epoch'])}{', unfinished' if row['unfinished_epoch'] else ''})")


def experiment_table_text(table: pd.DataFrame) -> str:
    recalls = experiment_recalls(table.columns)
    scale = recall_scale(table[recalls])
    shown = table[["model", "variant", *recalls]].copy()
    shown[recalls] = shown[recalls] * scale
    if "delta_r1_vs_raw" in table.columns:
        shown["delta_r1_vs_raw"] = pd.to_numeric(table["delta_r1_vs_raw"], errors="coerce") * scale
    return shown.to_string(index=False, float_format=lambda v: f"{v:.1f}", na_rep="-")


def plot_tuning_study(storage: str, name: str | None, output_dir: Path) -> Path:
    """PLOTS/study_{name}.png from an optuna storage (optuna imported here only)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        names = optuna.get_all_study_names(storage)
    except Exception as exc:  # noqa: BLE001 - a bad URL or file: which exception depends on the backend
        raise VPRError(f"--study {storage}: not an optuna storage ({str(exc).splitlines()[0][:120]}); "
                       f"give e.g. sqlite:///tune.db") from None
    if name is None and len(names) != 1:
        raise VPRError(f"--study {storage}: holds {len(names)} studies ({', '.join(names) or 'none'}); "
                       f"pick one with --study_name")
    if name is not None and name not in names:
        raise VPRError(f"--study_name {name}: not in {storage}; its studies: {', '.join(names) or 'none'}")
    study = optuna.load_study(study_name=name or names[0], storage=storage)
    return plot_study(study, output_dir / f"study_{safe_name(study.study_name)}.png")
