"""Plot and summarise training logs (DESIGN.md §6).

    python analyze_metrics.py logs/RUN.csv        # one run: plots/RUN_plots.png + printed summary
    python analyze_metrics.py logs/               # every run: per-run figures, plots/comparison_{data}.png,
                                                  #   plots/logs_runs_summary.csv (joined with training_summary.csv)
    python analyze_metrics.py logs/experiment_20250101_120000.csv   # plots/<stem>_bars.png
    python analyze_metrics.py --study sqlite:///tune.db --study_name NAME   # plots/study_NAME.png

A folder holding run_experiment.py's experiments on a route at several --seq_len (one experiment
per length, each with its JSON) also gets plots/{folder}_recall_by_seq_len.png: R@1 against
the window length, one line per model and variant (vprkit.routes.figures.draw_recall_by_seq_len).

A folder's runs are compared in groups of comparable runs (same --train_csv, --val_csv,
--pos_threshold_m and --supervision, read from training_summary.csv), one figure per group,
plots/comparison_{data}.png, each run labelled by the settings that differ within its group.

A run log has one row per event (batch / epoch / validation) with the columns LOG_COLUMNS.
A run still being written, or stopped mid-epoch, is plotted as far as it goes; a partially
written last line is left out. Recalls are fractions in the CSV files and shown in percent.
"""
from __future__ import annotations

import fnmatch
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: figures are only written to files
import pandas as pd  # noqa: E402

from vprkit.cli import CliParser, VPRError, atomic_write, check_writable_dir, run_cli  # noqa: E402
from vprkit.cli.configs import AnalyzeConfig  # noqa: E402
from vprkit.cli.settings import config_parser, parse_config  # noqa: E402
from vprkit.logs.plots import RunCurve, plot_comparison, plot_experiment_bars, recall_scale  # noqa: E402
from vprkit.logs.run_figures import bar_text, experiment_table_text, plot_run, plot_tuning_study  # noqa: E402
from vprkit.logs.run_summary import (RECALL_COLUMNS, TABLE_WIDTH, RunLog, RunSummary, comparable_groups,  # noqa: E402
                                     printable_group, read_experiment_csv, read_run_log, read_training_summary,
                                     recall_by_seq_len, run_summary_lines, runs_summary_table, summarize_run)
from vprkit.routes.figures import draw_recall_by_seq_len  # noqa: E402
from vprkit.logs.runlog import EXPERIMENT_REQUIRED, LOG_COLUMNS, TRAINING_SUMMARY_NAME, safe_name  # noqa: E402


EXPERIMENT_PATTERN = "experiment_*.csv"


def build_parser() -> CliParser:
    return config_parser(AnalyzeConfig, "Plot and summarise VPR training logs, folders of runs and experiment CSVs.",
                         config_file=False)


def parse_args(argv: Sequence[str] | None) -> AnalyzeConfig:
    return parse_config(build_parser(), AnalyzeConfig, argv, layered=False)


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

    # 4. route experiments of several --seq_len: R@1 against the window length, every method
    by_len = recall_by_seq_len(inputs.experiment_csvs)
    if len({n for lengths in by_len.values() for n in lengths}) > 1:
        path = output_dir / f"{safe_name(Path(args.path).resolve().stem)}_recall_by_seq_len.png"
        figure = draw_recall_by_seq_len(by_len, path, f"R@1 by window length ({Path(args.path).name})")
        print(f"\nR@1 by --seq_len of {len(by_len)} method(s): {figure}")


if __name__ == "__main__":
    run_cli(main)
