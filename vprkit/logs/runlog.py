"""Run logs and summaries: the column contracts that train_vpr.py writes and analyze_metrics.py
reads, run ids, the per-run CSV logger and the locked, atomic summary table. No torch here."""
from __future__ import annotations

import csv
import io
import json
import math
import re
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from vprkit.cli import VPRError, atomic_write


# Column contracts (DESIGN.md §6). analyze_metrics.py reads what train_vpr.py writes.
LOG_COLUMNS = [
    "timestamp", "event", "epoch", "batch", "train_loss", "triplet_loss", "contrastive_loss",
    "batch_time", "avg_train_loss", "avg_triplet_loss", "avg_contrastive_loss", "epoch_time",
    "val_loss", "val_r1", "val_r5", "val_r10", "val_time",
]




# Written after LOG_COLUMNS; readers must not require them (older logs lack them). The `data`
# event, logged once before epoch 0, holds skipped_images: images left out by --on_bad_image skip,
# val_database: the database validation searches (--val_db_csv, else --train_csv), and head_start:
# the residual head's start and every candidate's val R@1 ("learned_whitened; raw=0.5 ..."), with
# --pooling auto also the chosen pooling and each pooling's best start ("...; pooling gem; backbone=0.6 ...").
LOG_EXTRA_COLUMNS = ["skipped_images", "val_database", "head_start"]


# Written after those only by runs that produce them (readers select columns by name):
# ucb_stats, on `epoch` rows of --neg_sampler ucb runs: "pulls=[...]; mean_reward=[...]" per band.
LOG_OPTIONAL_COLUMNS = ["ucb_stats"]


SUMMARY_RESULT_COLUMNS = [
    "best_val_r1", "best_val_r5", "best_val_r10", "untrained_val_r1", "head_start", "best_epoch", "epochs_run",
    "skipped_images", "wall_time_s", "checkpoint", "log_file",
]


TRAINING_SUMMARY_NAME = "training_summary.csv"  # in --log_dir: one row per run


EXPERIMENT_COLUMNS = ["model", "variant", "recall@1", "recall@5", "recall@10", "delta_r1_vs_raw"]


# every experiment CSV has these; the other recall@N columns follow run_experiment's --recall_at
EXPERIMENT_REQUIRED = ("model", "variant", "recall@1")


def experiment_recalls(columns: Sequence[str]) -> list[str]:
    """The recall@N columns of an experiment table, by N (whatever --recall_at run_experiment had)."""
    found = [c for c in columns if re.fullmatch(r"recall@\d+", str(c))]
    return sorted(found, key=lambda c: int(c.split("@")[1]))


# learned_whitened: whitening learned from the training pairs (shrinkage chosen on val); vlad:
# training-free, over local features; start: the untrained head validation chose (fitted on the
# training set); trained_whitened: the head's output whitened on the database
EXPERIMENT_VARIANTS = ("raw", "pca_whitened", "learned_whitened", "vlad", "start", "trained", "trained_whitened")
# routes (--seq_len L > 1): seq_match: sequence matching over the frozen frame descriptor and velocity
# range val chose; seq_start: the untrained sequence head; seq_trained: the sequence model of the run
SEQUENCE_VARIANTS = ("seq_match", "seq_start", "seq_trained")


def safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def new_run_id(model: str, seed: int, log_dir: str | Path, output_dir: str | Path | None = None) -> str:
    """{model}_seed{seed}_{YYYYmmdd_HHMMSS}, with a suffix if that log (or, given output_dir,
    that run's checkpoint) already exists. The log file is created here, exclusively: runs
    started in the same second (tuning workers) get different ids instead of writing into one
    log, and a checkpoint folder shared by several log folders never sees one id twice."""
    base = f"{safe_name(model)}_seed{seed}_{time.strftime('%Y%m%d_%H%M%S')}"
    run_id, n = base, 1
    while True:
        taken = output_dir is not None and (Path(output_dir) / f"{run_id}.pth").exists()
        try:
            if not taken:
                (Path(log_dir) / f"{run_id}.csv").open("x").close()
                return run_id
        except FileExistsError:
            pass
        n += 1
        run_id = f"{base}_{n}"


class CsvLogger:
    """One CSV row per event, flushed as written, so a crashed or running run can be read.

    continue_after_epoch=N continues an existing log (a resumed run): rows of later epochs,
    written after the checkpoint the run resumes from, are dropped first, so the finished log
    equals that of an uninterrupted run. on_row(event, values), when given, sees each row after
    it is written (TensorBoard mirrors the log so: vprkit.logs.tensorboard_log)."""

    def __init__(self, path: str | Path, columns: Sequence[str] = (*LOG_COLUMNS, *LOG_EXTRA_COLUMNS),
                 continue_after_epoch: int | None = None,
                 on_row: Callable[[str, Mapping[str, Any]], None] | None = None):
        self.path, self.columns, self.on_row = Path(path), list(columns), on_row
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if continue_after_epoch is None:
            self._handle = open(self.path, "w", newline="")
            self._writer = csv.writer(self._handle, lineterminator="\n")
            self._writer.writerow(self.columns)
        else:
            self._keep_epochs_up_to(continue_after_epoch)
            self._handle = open(self.path, "a", newline="")
            self._writer = csv.writer(self._handle, lineterminator="\n")
        self._handle.flush()

    def _keep_epochs_up_to(self, last_epoch: int) -> None:
        if not self.path.is_file():
            raise VPRError(f"run log {self.path}: not found; the run to resume wrote it "
                           f"(restore it, or start a new run)")
        rows = list(csv.reader(io.StringIO(self.path.read_text())))
        if not rows or not set(rows[0]) <= set(self.columns):
            raise VPRError(f"run log {self.path}: its columns differ from this run's; resume with the same settings")
        if rows[0] != self.columns:  # a log of an earlier version: its rows under today's columns, new cells empty
            where = {name: i for i, name in enumerate(rows[0])}
            rows = [self.columns] + [[r[where[c]] if c in where and where[c] < len(r) else "" for c in self.columns]
                                     for r in rows[1:] if r]
        epoch = self.columns.index("epoch")
        kept = [rows[0]] + [r for r in rows[1:] if r and r[epoch] and int(r[epoch]) <= last_epoch]
        atomic_write(self.path, lambda p: p.write_text(_csv_text(kept)))

    def log(self, event: str, **values: Any) -> None:
        unknown = set(values) - set(self.columns)
        if unknown:
            raise KeyError(f"not log columns: {sorted(unknown)}")
        row = {"timestamp": f"{time.time():.3f}", "event": event, **values}
        self._writer.writerow([_format_cell(row.get(c)) for c in self.columns])
        self._handle.flush()
        if self.on_row is not None:
            self.on_row(event, values)

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.close()


def _format_cell(value: Any) -> str:
    """A log cell's text: floats to 6 significant digits, NaN and None empty (csv.writer quotes)."""
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def _csv_text(rows: Sequence[Sequence[str]]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue()


def append_summary_row(path: str | Path, row: dict[str, Any]) -> None:
    """Append one run's row to a summary CSV. A file lock serialises concurrent writers
    (tuning workers), and the file is rewritten atomically, so rows never interleave or vanish;
    a row with new columns widens the table instead of breaking it. One row per run: a run_id
    already there (a finished run extended with --resume) has its row replaced, in its place,
    and `wall_time_s` becomes the run's total (the earlier row's plus this one's)."""
    from filelock import FileLock, Timeout

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(path) + ".lock", timeout=120):
            table = read_summary_table(path)
            same = (table["run_id"] == str(row.get("run_id"))).to_numpy() if len(table) else np.zeros(0, bool)
            if same.any() and "wall_time_s" in row and "wall_time_s" in table.columns:
                earlier = pd.to_numeric(table.loc[same, "wall_time_s"], errors="coerce").fillna(0).sum()
                row = {**row, "wall_time_s": round(float(row["wall_time_s"]) + float(earlier), 2)}
            new_row = pd.DataFrame([{k: "" if v is None else str(v) for k, v in row.items()}], dtype=str)
            place = int(np.flatnonzero(same)[0]) if same.any() else len(table)
            table = pd.concat([table.iloc[:place], new_row, table.iloc[place:][~same[place:]]],
                              ignore_index=True)  # text: nothing reformatted
            atomic_write(path, lambda p: table.to_csv(p, index=False))
    except Timeout:
        raise VPRError(f"{path}: still locked by another process after 120 s ({path}.lock); this run's row: "
                       f"{json.dumps(row, default=str)}") from None


def read_summary_table(path: str | Path) -> pd.DataFrame:
    """The rows of a summary CSV as written (text cells, nothing reformatted); empty if there is
    none yet. Checked before a run starts, so a long run never ends on an unreadable summary."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return pd.DataFrame()
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        problem = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise VPRError(f"{path}: not a summary table this suite can append to ({problem}); move it away "
                       f"(a new one is started)") from None
    if "run_id" not in table.columns:
        raise VPRError(f"{path}: not a summary table this suite can append to (no run_id column); move it away "
                       f"(a new one is started)")
    return table
