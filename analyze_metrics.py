"""Plot and summarise training logs (DESIGN.md §6).

    python analyze_metrics.py logs/RUN.csv        # one run: plots/RUN_plots.png + printed summary
    python analyze_metrics.py logs/               # every run: per-run figures, plots/comparison_{data}.png,
                                                  #   plots/logs_runs_summary.csv (joined with training_summary.csv)
    python analyze_metrics.py logs/experiment_20250101_120000.csv   # plots/<stem>_bars.png
    python analyze_metrics.py --study sqlite:///tune.db --study_name NAME   # plots/study_NAME.png

A folder's runs are compared in groups of comparable runs (same --train_csv, --val_csv,
--pos_threshold_m and --supervision, read from training_summary.csv), one figure per group,
plots/comparison_{data}.png, each run labelled by the settings that differ within its group.

A run log has one row per event (batch / epoch / validation) with the columns LOG_COLUMNS.
A run still being written, or stopped mid-epoch, is plotted as far as it goes; a partially
written last line is left out. Recalls are fractions in the CSV files and shown in percent.
"""
from __future__ import annotations

import fnmatch
import io
import math
import sys
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: figures are only written to files
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from vprkit.cli import CliParser, VPRError, atomic_write, check_writable_dir, run_cli  # noqa: E402
from vprkit.configs import AnalyzeConfig  # noqa: E402
from vprkit.places import numeric_column  # noqa: E402
from vprkit.settings import config_parser, parse_config  # noqa: E402
from vprkit.plots import (RunCurve, plot_batch_loss, plot_epoch_losses, plot_loss_parts,  # noqa: E402
                          show_no_data, show_text_panel)
from vprkit.plots import data_name, plot_comparison, plot_experiment_bars, plot_study, recall_scale, save_figure  # noqa: E402
from vprkit.runlog import (EXPERIMENT_COLUMNS, LOG_COLUMNS, EXPERIMENT_REQUIRED, SUMMARY_RESULT_COLUMNS,  # noqa: E402
                           TRAINING_SUMMARY_NAME, experiment_recalls, safe_name)

EXPERIMENT_PATTERN = "experiment_*.csv"
DEFAULT_SMOOTH = 50
RECALL_COLUMNS = ["val_r1", "val_r5", "val_r10"]
# Runs are comparable when they trained and validated on the same data with the same positive
# rule; within such a group each run is labelled by the settings that differ (LABEL_SKIP: never).
GROUP_COLUMNS = ["train_csv", "val_csv", "pos_threshold_m", "supervision"]
LABEL_SKIP = {"run_id", "seed", *GROUP_COLUMNS, "log_dir", "output_dir", "checkpoint_dir", "cache_dir", "device",
              "num_workers", "extract_batch_size",
              "resume", "config", "no_cache", "image_root", "debug", "tensorboard"}
TABLE_WIDTH = 100


def build_parser() -> CliParser:
    return config_parser(AnalyzeConfig, "Plot and summarise VPR training logs, folders of runs and experiment CSVs.",
                         config_file=False)


def parse_args(argv: Sequence[str] | None) -> AnalyzeConfig:
    return parse_config(build_parser(), AnalyzeConfig, argv, layered=False)


# ============================================================================================
# Finding the inputs
# ============================================================================================
@dataclass
class Inputs:
    """What one command line asks for: run logs, experiment CSVs and the folder's training summary."""

    run_logs: list[Path]
    experiment_csvs: list[Path]
    training_summary: Path | None
    is_folder: bool


def find_inputs(path: Path, runs_pattern: str | None) -> Inputs:
    if path.is_dir():
        return find_inputs_in_folder(path, runs_pattern)
    if not path.is_file():
        raise VPRError(f"{path}: no such file or folder; give a run log (logs/RUN.csv), an experiment CSV "
                       f"or a folder of them")
    if runs_pattern is not None:
        raise VPRError(f"--runs {runs_pattern!r} chooses runs in a folder; give the folder ({path.parent}/) "
                       f"instead of {path}")
    if path.name == TRAINING_SUMMARY_NAME:
        raise VPRError(f"{path}: this is the summary of all runs, not a run log; give its folder ({path.parent}/) "
                       f"to compare the runs")
    header = csv_header(path)
    if is_experiment_header(header):
        return Inputs([], [path], None, is_folder=False)
    missing = [c for c in LOG_COLUMNS if c not in header]
    if missing:
        shown = ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else "")
        raise VPRError(
            f"{path}: not a run log (missing columns {shown}) nor an experiment CSV; "
            f"give a log written by train_vpr.py (logs/RUN.csv) or a logs/ folder"
        )
    return Inputs([path], [], None, is_folder=False)


def find_inputs_in_folder(folder: Path, runs_pattern: str | None) -> Inputs:
    csv_files = sorted(folder.glob("*.csv"))
    if not csv_files:
        raise VPRError(f"{folder}: no CSV files in this folder; give the logs/ folder that train_vpr.py writes, "
                       f"or one log file")
    summary = folder / TRAINING_SUMMARY_NAME
    is_experiment_name = [fnmatch.fnmatch(p.name, EXPERIMENT_PATTERN) for p in csv_files]
    experiments = [p for p, named in zip(csv_files, is_experiment_name)
                   if named and is_experiment_header(csv_header(p, quiet=True))]
    run_logs = [p for p, named in zip(csv_files, is_experiment_name)
                if not named and p.name != TRAINING_SUMMARY_NAME and set(LOG_COLUMNS) <= set(csv_header(p, quiet=True))]
    if runs_pattern is not None:
        chosen = [p for p in run_logs if fnmatch.fnmatch(p.name, runs_pattern) or fnmatch.fnmatch(p.stem, runs_pattern)]
        if not chosen:
            available = ", ".join(p.name for p in run_logs) or "none"
            raise VPRError(f"{folder}: no run log matches --runs {runs_pattern!r}; run logs there: {available}")
        run_logs = chosen
    if not run_logs and not experiments:
        raise VPRError(
            f"{folder}: no run logs among its {len(csv_files)} CSV file(s) (a run log has the columns "
            f"{', '.join(LOG_COLUMNS[:4])}, ...); give the logs/ folder that train_vpr.py writes"
        )
    return Inputs(run_logs, experiments, summary if summary.is_file() else None, is_folder=True)


def csv_header(path: Path, quiet: bool = False) -> list[str]:
    """The column names on a CSV's first line ([] for an unreadable file when quiet)."""
    try:
        with open(path, encoding="utf-8") as handle:
            first_line = handle.readline()
    except (OSError, UnicodeDecodeError):
        if quiet:
            return []
        raise VPRError(f"{path}: not a readable text CSV; give a run log written by train_vpr.py") from None
    if not first_line.strip():
        if quiet:
            return []
        raise VPRError(f"{path}: the file is empty; give a run log that train_vpr.py has started writing")
    return [name.strip() for name in first_line.rstrip("\r\n").split(",")]


def is_experiment_header(header: Sequence[str]) -> bool:
    return set(EXPERIMENT_REQUIRED) <= set(header)


# ============================================================================================
# Reading CSV files (tolerant of a file still being written)
# ============================================================================================
def read_csv_text(path: Path) -> pd.DataFrame:
    """Read a CSV that another process may still be appending to.

    A last line without its newline and with fewer cells than the header was cut off while
    being written: it is left out. Anything else that does not parse is an error.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise VPRError(f"{path}: not a readable text CSV; give a CSV written by train_vpr.py") from None
    except OSError as exc:
        raise VPRError(f"{path}: cannot be read ({exc.strerror})") from None
    lines = text.splitlines(keepends=True)
    if not lines or not lines[0].strip():
        raise VPRError(f"{path}: the file is empty; give a CSV with a header row")
    width = lines[0].count(",")
    if len(lines) > 1 and not lines[-1].endswith("\n") and lines[-1].count(",") < width:
        text = "".join(lines[:-1])  # a partially written last line
    try:
        return pd.read_csv(io.StringIO(text), skipinitialspace=True)
    except pd.errors.ParserError as exc:
        problem = str(exc).splitlines()[0].strip()
        raise VPRError(f"{path}: not a readable CSV ({problem}); fix or remove the broken line") from None


@dataclass
class RunLog:
    """A run log split by event; epochs holds the epoch and validation rows joined on epoch."""

    run_id: str
    path: Path
    batches: pd.DataFrame
    epochs: pd.DataFrame


def read_run_log(path: Path) -> RunLog:
    frame = read_csv_text(path)
    missing = [c for c in LOG_COLUMNS if c not in frame.columns]
    if missing:
        raise VPRError(f"{path}: not a run log (missing columns {', '.join(missing)}); "
                       f"give a log written by train_vpr.py")
    for column in LOG_COLUMNS:
        if column not in ("timestamp", "event"):
            frame[column] = numeric_column(frame, column, path, required=False)
    event = frame["event"].astype(str).str.strip()
    batches = frame[event == "batch"].reset_index(drop=True)
    epoch_rows = frame[(event == "epoch") & frame["epoch"].notna()]
    validation_rows = frame[(event == "validation") & frame["epoch"].notna()]
    if batches.empty and epoch_rows.empty and validation_rows.empty:
        raise VPRError(f"{path}: no batch, epoch or validation rows yet; run it again once training has logged a batch")
    epochs = pd.merge(
        epoch_rows[["epoch", "avg_train_loss", "avg_triplet_loss", "avg_contrastive_loss", "epoch_time"]]
        .drop_duplicates("epoch", keep="last"),
        validation_rows[["epoch", "val_loss", *RECALL_COLUMNS, "val_time"]].drop_duplicates("epoch", keep="last"),
        on="epoch", how="outer",
    ).sort_values("epoch", ignore_index=True)
    epochs["epoch"] = epochs["epoch"].astype(int)
    epochs["completed"] = epochs["epoch"].isin(epoch_rows["epoch"])
    return RunLog(run_id=path.stem, path=path, batches=batches, epochs=epochs)


def read_training_summary(path: Path | None) -> pd.DataFrame | None:
    """The configuration of every run in training_summary.csv (last row per run_id), or None."""
    if path is None:
        return None
    table = read_csv_text(path)
    if "run_id" not in table.columns:
        raise VPRError(f"{path}: no run_id column; it should be the training_summary.csv that train_vpr.py appends to")
    table["run_id"] = table["run_id"].astype(str)
    return table.drop_duplicates("run_id", keep="last")


def read_experiment_csv(path: Path) -> pd.DataFrame:
    table = read_csv_text(path)
    missing = [c for c in EXPERIMENT_REQUIRED if c not in table.columns]
    if missing:
        raise VPRError(f"{path}: not an experiment CSV (missing columns {', '.join(missing)}); "
                       f"expected {', '.join(EXPERIMENT_COLUMNS)}")
    for column in experiment_recalls(table.columns):
        table[column] = numeric_column(table, column, path, required=False)
    table["model"] = table["model"].astype(str)
    table["variant"] = table["variant"].astype(str).str.strip()
    if table.empty:
        raise VPRError(f"{path}: the experiment CSV has a header but no rows")
    return table


# ============================================================================================
# Summaries
# ============================================================================================
@dataclass
class RunSummary:
    """One run as read from its log; names match training_summary.csv where the meaning does."""

    run_id: str
    epochs_run: int               # completed epochs (an epoch row was logged)
    batches_logged: int
    unfinished_epoch: bool        # batches logged after the last completed epoch
    best_epoch: int | None        # highest val R@1 (earliest on ties)
    best_val_r1: float | None
    best_val_r5: float | None     # R@5 and R@10 at the best epoch
    best_val_r10: float | None
    untrained_val_r1: float | None        # epoch 0: train_vpr.py validates the head before training
    final_train_loss: float | None        # averages of the last completed epoch
    final_triplet_loss: float | None
    final_contrastive_loss: float | None
    final_val_loss: float | None          # of the last validation (empty when it could not be computed)
    last_batch_loss: float | None
    train_time_s: float           # epoch_time of completed epochs + batch_time of an unfinished one
    val_time_s: float
    total_time_s: float
    log_file: str


def summarize_run(log: RunLog) -> RunSummary:
    completed = log.epochs[log.epochs["completed"]]
    validated = log.epochs.dropna(subset=["val_r1"])
    best = validated.loc[validated["val_r1"].idxmax()] if not validated.empty else None
    untrained = validated[validated["epoch"] == 0]
    last_epoch = completed.iloc[-1] if not completed.empty else None
    last_validation = validated.iloc[-1] if not validated.empty else None
    unfinished = unfinished_batches(log)
    train_time = float(completed["epoch_time"].sum() + unfinished["batch_time"].sum())
    val_time = float(log.epochs["val_time"].sum())
    return RunSummary(
        run_id=log.run_id,
        epochs_run=len(completed),
        batches_logged=len(log.batches),
        unfinished_epoch=not unfinished.empty,
        best_epoch=None if best is None else int(best["epoch"]),
        best_val_r1=value_or_none(best, "val_r1"),
        best_val_r5=value_or_none(best, "val_r5"),
        best_val_r10=value_or_none(best, "val_r10"),
        untrained_val_r1=None if untrained.empty else float(untrained["val_r1"].iloc[0]),
        final_train_loss=value_or_none(last_epoch, "avg_train_loss"),
        final_triplet_loss=value_or_none(last_epoch, "avg_triplet_loss"),
        final_contrastive_loss=value_or_none(last_epoch, "avg_contrastive_loss"),
        final_val_loss=value_or_none(last_validation, "val_loss"),
        last_batch_loss=None if log.batches.empty else value_or_none(log.batches.iloc[-1], "train_loss"),
        train_time_s=round(train_time, 3),
        val_time_s=round(val_time, 3),
        total_time_s=round(train_time + val_time, 3),
        log_file=str(log.path),
    )


def unfinished_batches(log: RunLog) -> pd.DataFrame:
    """Batch rows logged after the last completed epoch (a run in progress or stopped mid-epoch)."""
    completed = log.epochs.loc[log.epochs["completed"], "epoch"]
    if completed.empty:
        return log.batches
    return log.batches[log.batches["epoch"] > completed.max()]


def value_or_none(row: pd.Series | None, column: str) -> float | None:
    if row is None or pd.isna(row[column]):
        return None
    return float(row[column])


def runs_summary_table(summaries: list[RunSummary], training_summary: pd.DataFrame | None) -> pd.DataFrame:
    """One row per run: run_id, the configuration from training_summary.csv, then what the log says.

    Results computed from the log replace training_summary's own (same names); its wall_time_s
    and checkpoint come last. Runs missing from training_summary.csv get empty configuration cells.
    """
    table = pd.DataFrame([asdict(s) for s in summaries])
    if training_summary is None:
        return table
    extra_columns = [c for c in training_summary.columns if c not in table.columns]
    joined = table.merge(training_summary[["run_id", *extra_columns]], on="run_id", how="left")
    joined[extra_columns] = joined[extra_columns].convert_dtypes()  # seed stays 42, not 42.0, next to empty cells
    config = [c for c in extra_columns if c not in SUMMARY_RESULT_COLUMNS]
    trailing = [c for c in extra_columns if c in SUMMARY_RESULT_COLUMNS]
    return joined[["run_id", *config, *[c for c in table.columns if c != "run_id"], *trailing]]


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def format_number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def run_summary_lines(summary: RunSummary, scale: float) -> list[str]:
    """The summary of one run as text lines (printed, and shown in the run's figure)."""
    if summary.best_epoch is None:
        best = "no validation yet"
    else:
        recalls = " / ".join(f"{v * scale:.1f}" for v in (summary.best_val_r1, summary.best_val_r5,
                                                           summary.best_val_r10) if v is not None)
        best = f"{recalls} % at epoch {summary.best_epoch}"
    epochs = f"{summary.epochs_run} completed, {summary.batches_logged} batches logged"
    if summary.unfinished_epoch:
        epochs += f"; epoch {summary.epochs_run + 1} unfinished"
    if summary.final_train_loss is None:
        final = f"no completed epoch yet; last batch loss {format_number(summary.last_batch_loss)}"
    else:
        final = (f"train {format_number(summary.final_train_loss)} "
                 f"(triplet {format_number(summary.final_triplet_loss)}, "
                 f"contrastive {format_number(summary.final_contrastive_loss)})")
    lines = [
        f"run                {summary.run_id}",
        f"epochs             {epochs}",
        f"best val R@1/5/10  {best}",
        f"final losses       {final}",
        f"final val loss     {format_number(summary.final_val_loss)}",
        f"total time         {format_duration(summary.total_time_s)} (train {format_duration(summary.train_time_s)}, "
        f"validation {format_duration(summary.val_time_s)})",
    ]
    if summary.untrained_val_r1 is not None:
        lines.insert(3, f"before training    val R@1 {summary.untrained_val_r1 * scale:.1f} % "
                        f"(epoch 0, untrained head)")
    return lines


@dataclass
class RunGroup:
    """Runs that are comparable: same training and validation data, same positive rule."""

    title: str              # what they share, for headings (the data as recorded)
    stem: str               # the same as a file-name stem
    table: pd.DataFrame     # their rows of the runs table, with a `label` column: what differs
    figure_title: str = ""  # the title, the data named by folder and file (vprkit.plots.data_name)


def comparable_groups(table: pd.DataFrame) -> list[RunGroup]:
    """Group the runs by GROUP_COLUMNS (from training_summary.csv); runs it does not record
    (no row, or an older summary without those columns) form one group of their own."""
    keys = [c for c in GROUP_COLUMNS if c in table.columns]
    key = table[keys].astype(object).where(table[keys].notna(), "").astype(str).agg("|".join, axis=1) \
        if keys else pd.Series([""] * len(table), index=table.index)
    groups, stems = [], set()
    for value in dict.fromkeys(key):
        rows = table[key == value].copy()
        first = dict(zip(keys, value.split("|"))) if value.strip("|") else {}
        if first.get("train_csv"):
            train, val = Path(first["train_csv"]), Path(first.get("val_csv") or "-")
            threshold = f"{float(first['pos_threshold_m']):g} m" if first.get("pos_threshold_m") else "threshold ?"
            rule = f" | positives within {threshold}" + \
                (f" | {first['supervision']}" if first.get("supervision") not in (None, "", "gps") else "")
            title = f"train {train} | val {val}{rule}"
            figure_title = f"train {data_name(train)} | val {data_name(val)}{rule}"
            stem = safe_name(f"{train.parent.name}_{train.stem}_{val.stem}_{threshold.replace(' ', '')}")
        else:
            title, stem = "runs whose data training_summary.csv does not record", "unrecorded_data"
            figure_title = title
        stem = next(f"{stem}_{n}" if n else stem for n in range(len(table) + 1)
                    if (f"{stem}_{n}" if n else stem) not in stems)
        stems.add(stem)
        rows["label"] = run_labels(rows)
        groups.append(RunGroup(title, stem, rows, figure_title))
    return groups


def _cell(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def run_labels(rows: pd.DataFrame) -> list[str]:
    """Each run named by the settings that differ within its group (model bare, others
    key=value); seed, then run id, are added where that still leaves two runs alike."""
    config = [c for c in rows.columns if c not in LABEL_SKIP and c not in SUMMARY_RESULT_COLUMNS
              and c not in RunSummary.__dataclass_fields__ and c != "label"]
    differing = [c for c in config if rows[c].astype(str).nunique() > 1]
    labels = [" ".join(_cell(row[c]) if c == "model" else f"{c}={_cell(row[c])}" for c in differing if pd.notna(row[c]))
              for _, row in rows.iterrows()]
    if "model" in rows.columns and "model" not in differing:
        labels = [(f"{row['model']} " if pd.notna(row["model"]) else "") + label
                  for label, (_, row) in zip(labels, rows.iterrows())]
    for extra in ("seed", "run_id"):
        counts = pd.Series(labels).value_counts()
        if (counts > 1).any() and extra in rows.columns:
            labels = [f"{label} {extra}={_cell(row[extra])}".strip()
                      if counts[label] > 1 and pd.notna(row[extra]) else label
                      for label, (_, row) in zip(labels, rows.iterrows())]
    return [" ".join(label.split()) or run_id for label, run_id in zip(labels, rows["run_id"])]


def printable_group(group: RunGroup) -> tuple[str, str]:
    """The group's runs as a table at most TABLE_WIDTH characters wide, and the settings all
    its runs share (shown once). time is the run's wall time from training_summary.csv (the
    whole run: backbone, feature extraction, epochs, validation, checkpoints); a * marks the
    log's sum of epoch and validation times (runs the summary does not have), which leaves out
    model loading and feature extraction and so is shorter."""
    table = group.table
    config = [c for c in table.columns if c not in {"run_id", "label", "model", *LABEL_SKIP,
                                                     *RunSummary.__dataclass_fields__, *SUMMARY_RESULT_COLUMNS}]
    shared = [c for c in config if len(table) > 1 and table[c].notna().any() and table[c].nunique() == 1]
    scale = recall_scale(table[["best_val_r1", "best_val_r5", "best_val_r10"]])
    wall = table["wall_time_s"] if "wall_time_s" in table.columns else pd.Series([None] * len(table), index=table.index)
    header = (f"{'epochs':>6} {'best':>4} {'R@1 %':>6} {'R@5 %':>6} {'R@10 %':>6} "
              f"{'train_loss':>10} {'val_loss':>8} {'time':>9}")
    width = TABLE_WIDTH - len(header) - 1
    lines = [f"{'run':<{width}} {header}"]
    for _, row in table.iterrows():
        label = row["label"] if len(row["label"]) <= width else row["label"][: width - 1] + "~"
        epochs = f"{row['epochs_run']}{'+' if row['unfinished_epoch'] else ''}"
        best = "-" if pd.isna(row["best_epoch"]) else str(int(row["best_epoch"]))
        recalls = " ".join(f"{'-' if pd.isna(v) else f'{v * scale:.1f}':>6}"
                           for v in (row["best_val_r1"], row["best_val_r5"], row["best_val_r10"]))
        seconds = pd.to_numeric(pd.Series([wall[row.name]]), errors="coerce").iloc[0]
        time_text = format_duration(float(seconds)) if pd.notna(seconds) else format_duration(row["total_time_s"]) + "*"
        lines.append(f"{label:<{width}} {epochs:>6} {best:>4} {recalls} {format_number(row['final_train_loss']):>10} "
                     f"{format_number(row['final_val_loss']):>8} {time_text:>9}")
    shared_line = ", ".join(f"{c}={_cell(table[c].dropna().iloc[0])}" for c in shared)
    return "\n".join(lines), shared_line


# ============================================================================================
# Figures
# ============================================================================================
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


# ============================================================================================
# main
# ============================================================================================
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


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.study:
        plot_dir = check_writable_dir(args.plot_dir, "--plot_dir")
        print(f"study figure {plot_tuning_study(args.study, args.study_name, plot_dir)}")
        if not args.path:
            return
    inputs = find_inputs(Path(args.path), args.runs)
    training_summary = read_training_summary(inputs.training_summary)  # checked before any figure is written
    output_dir = check_writable_dir(args.plot_dir, "--plot_dir")

    # 1. every run: read its log, summarise it, draw its figure
    logs: list[RunLog] = []
    summaries: list[RunSummary] = []
    for log_path in inputs.run_logs:
        try:
            log = read_run_log(log_path)
        except VPRError as exc:
            if not inputs.is_folder:
                raise
            print(f"warning: skipped {exc}", file=sys.stderr)  # one bad log does not stop the comparison
            continue
        summary = summarize_run(log)
        figure = plot_run(log, summary, output_dir, args.smooth)
        logs.append(log)
        summaries.append(summary)
        if inputs.is_folder:
            print(f"{summary.run_id}: {figure}")
        else:
            print("\n".join(run_summary_lines(summary, recall_scale(log.epochs[RECALL_COLUMNS]))))
            print(f"figure             {figure}")
    if inputs.is_folder and inputs.run_logs and not logs:
        raise VPRError(f"{args.path}: none of its {len(inputs.run_logs)} run log(s) could be read "
                       f"(see the warnings above)")

    # 2. a folder: compare the runs that are comparable, labelled by what differs
    if inputs.is_folder and logs:
        table = runs_summary_table(summaries, training_summary)
        groups = comparable_groups(table)
        table = pd.concat([g.table for g in groups]).sort_index()
        by_run = {log.run_id: log for log in logs}
        for group in groups:
            print(f"\n{group.title}: {len(group.table)} run(s)")
            text, shared = printable_group(group)
            if shared:
                print(textwrap.fill(f"same for all runs: {shared}", TABLE_WIDTH, subsequent_indent="  "))
            print(text)
            curves = [RunCurve(row["label"], by_run[row["run_id"]].epochs.dropna(subset=["val_r1"])["epoch"].to_numpy(),
                               by_run[row["run_id"]].epochs.dropna(subset=["val_r1"])["val_r1"].to_numpy(),
                               None if pd.isna(row["best_val_r1"]) else row["best_val_r1"], bar_text(row))
                      for _, row in group.table.iterrows()]
            figure = plot_comparison(curves, f"Comparable runs: {group.figure_title}",
                                     output_dir / f"comparison_{group.stem}.png")
            print(f"comparison figure {figure}")
        table_path = output_dir / f"{safe_name(Path(args.path).resolve().name)}_runs_summary.csv"
        atomic_write(table_path, lambda tmp: table.to_csv(tmp, index=False))
        print("\nepochs: completed (+ one unfinished); recalls at the best epoch; time: the run's wall time\n"
              f"(* from its log: epochs and validation only)\nsummary table {table_path}")

    # 3. experiment CSVs: raw / PCA-whitened / trained recall per model
    for experiment_path in inputs.experiment_csvs:
        table = read_experiment_csv(experiment_path)
        figure = plot_experiment_bars(table, experiment_path.name, output_dir / f"{experiment_path.stem}_bars.png")
        print(f"\nexperiment {experiment_path} (recall in %)\n{experiment_table_text(table)}\nfigure {figure}")


if __name__ == "__main__":
    run_cli(main)
