"""Run logs read (tolerant of a file still being written) and summarised: one run's summary, the
table of runs, and groups of comparable runs labelled by the settings that differ (analyze_metrics.py)."""
from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd

from vprkit.cli import VPRError
from vprkit.logs.plots import data_name, recall_scale
from vprkit.logs.runlog import (
    EXPERIMENT_COLUMNS,
    EXPERIMENT_REQUIRED,
    LOG_COLUMNS,
    SUMMARY_RESULT_COLUMNS,
    experiment_recalls,
    safe_name,
)
from vprkit.tables.places import numeric_column

RECALL_COLUMNS = ["val_r1", "val_r5", "val_r10"]


# rule; within such a group each run is labelled by the settings that differ (LABEL_SKIP: never).
GROUP_COLUMNS = ["train_csv", "val_csv", "pos_threshold_m", "supervision"]


LABEL_SKIP = {"run_id", "seed", *GROUP_COLUMNS, "log_dir", "output_dir", "checkpoint_dir", "cache_dir", "device",
              "num_workers", "extract_batch_size",
              "resume", "config", "no_cache", "image_root", "debug", "tensorboard"}


TABLE_WIDTH = 100


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


def recall_by_seq_len(paths: Sequence[Path]) -> dict[str, dict[int, float]]:
    """R@1 against the window length, {"{model} {variant}": {seq_len: R@1}}, from experiment CSVs
    whose JSON beside them records a --seq_len (run_experiment on routes: models[m].sequence); one
    experiment per length, its single-frame rows counted at its length too. Experiments without
    such a record are left out."""
    out: dict[str, dict[int, float]] = {}
    for path in paths:
        try:
            record = json.loads(Path(path).with_suffix(".json").read_text())
        except (OSError, ValueError):
            continue
        table = read_experiment_csv(Path(path))
        for model, entry in (record.get("models") or {}).items():
            seq_len = (entry.get("sequence") or {}).get("seq_len") if isinstance(entry, dict) else None
            if not seq_len:
                continue
            for variant, r1 in table[table["model"] == model].set_index("variant")["recall@1"].items():
                out.setdefault(f"{model} {variant}", {})[int(seq_len)] = float(r1)
    return out


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
    figure_title: str = ""  # the title, the data named by folder and file (vprkit.logs.plots.data_name)


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
