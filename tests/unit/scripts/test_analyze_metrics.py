"""Tests for analyze_metrics.py on small hand-written logs (DESIGN.md §6)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from helpers import REPO as ROOT

import analyze_metrics  # noqa: E402
from vprkit.logs.run_figures import batch_positions, smoothing_window
from vprkit.logs.run_summary import read_run_log, summarize_run

from vprkit.cli import VPRError, run_cli  # noqa: E402
from vprkit.logs.runlog import EXPERIMENT_COLUMNS  # noqa: E402
from vprkit.logs.runlog import CsvLogger, append_summary_row  # noqa: E402
from helpers.run_logs import HEADER, LOG, T, assert_png, with_recalls, write  # noqa: E402

BATCHES_ONLY = f"""{HEADER}
{T},batch,1,1,3.0,0.4,2.88,1.25,,,,,,,,,
{T},batch,1,2,2.6,0.3,2.51,1.5,,,,,,,,,
{T},batch,1,3,2.4,0.3,2.31,0.75,,,,,,,,,
"""

# LOG, then epoch 4 stopped after one batch while writing the second (no newline at the end).
INTERRUPTED = LOG + f"{T},batch,4,1,1.7,0.1,1.67,2.0,,,,,,,,,\n{T},batch,4,2,1.2"

EXPERIMENT = "\n".join([
    ",".join(EXPERIMENT_COLUMNS),
    "dinov2_b,raw,0.61,0.74,0.79,0.0",
    "dinov2_b,pca_whitened,0.66,0.79,0.84,0.05",
    "dinov2_b,trained,0.72,0.85,0.90,0.11",
    "effnet_lite0,raw,0.41,0.54,0.59,0.0",
    "effnet_lite0,trained,0.58,0.71,0.76,0.17",  # no pca_whitened row: that bar is left out
]) + "\n"


# --------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------
def test_summary_numbers_from_hand_written_log(tmp_path):
    summary = summarize_run(read_run_log(write(tmp_path / "dinov2_b_seed42_20250101_120000.csv", LOG)))

    assert summary.run_id == "dinov2_b_seed42_20250101_120000"
    assert (summary.epochs_run, summary.batches_logged, summary.unfinished_epoch) == (3, 6, False)
    assert summary.best_epoch == 2  # tie with epoch 3 on R@1: the earlier epoch
    assert (summary.best_val_r1, summary.best_val_r5, summary.best_val_r10) == pytest.approx((0.55, 0.75, 0.80))
    assert summary.final_train_loss == pytest.approx(1.9)
    assert summary.final_triplet_loss == pytest.approx(0.2)
    assert summary.final_contrastive_loss == pytest.approx(1.84)
    assert summary.final_val_loss == pytest.approx(2.6)
    assert summary.last_batch_loss == pytest.approx(1.8)
    assert summary.train_time_s == pytest.approx(7.5)
    assert summary.val_time_s == pytest.approx(2.0)
    assert summary.total_time_s == pytest.approx(9.5)


def test_single_run_writes_its_figure_and_prints_the_summary(tmp_path, capsys):
    log = write(tmp_path / "logs" / "run_a.csv", LOG)
    analyze_metrics.main([str(log), "--plot_dir", str(tmp_path / "plots")])

    assert_png(tmp_path / "plots" / "run_a_plots.png")
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["run_a_plots.png"]
    out = capsys.readouterr().out
    assert "55.0 / 75.0 / 80.0 % at epoch 2" in out
    assert "train 1.9 (triplet 0.2, contrastive 1.84)" in out
    assert "9.5s (train 7.5s, validation 2.0s)" in out


def test_log_with_only_batch_rows(tmp_path, capsys):
    log = write(tmp_path / "first_epoch.csv", BATCHES_ONLY)
    summary = summarize_run(read_run_log(log))
    assert (summary.epochs_run, summary.batches_logged, summary.unfinished_epoch) == (0, 3, True)
    assert summary.best_epoch is None and summary.best_val_r1 is None and summary.final_train_loss is None
    assert summary.last_batch_loss == pytest.approx(2.4)
    assert summary.train_time_s == pytest.approx(3.5)  # the batch times so far
    assert summary.val_time_s == 0

    analyze_metrics.main([str(log), "--plot_dir", str(tmp_path / "plots")])
    assert_png(tmp_path / "plots" / "first_epoch_plots.png")
    out = capsys.readouterr().out
    assert "no validation yet" in out and "epoch 1 unfinished" in out


def test_interrupted_epoch_with_a_partially_written_last_line(tmp_path):
    log = read_run_log(write(tmp_path / "stopped.csv", INTERRUPTED))
    summary = summarize_run(log)

    assert summary.batches_logged == 7  # the cut-off line "…,batch,4,2,1.2" is not a batch
    assert summary.last_batch_loss == pytest.approx(1.7)
    assert (summary.epochs_run, summary.unfinished_epoch, summary.best_epoch) == (3, True, 2)
    assert summary.final_train_loss == pytest.approx(1.9)  # of the last completed epoch
    assert summary.train_time_s == pytest.approx(7.5 + 2.0)  # plus the unfinished epoch's batch

    analyze_metrics.main([str(tmp_path / "stopped.csv"), "--plot_dir", str(tmp_path / "plots")])
    assert_png(tmp_path / "plots" / "stopped_plots.png")


def test_reads_what_train_vpr_writes(tmp_path, capsys):
    """Written through trainable_vpr's own writers, as train_vpr.py does: epoch 0 validates the
    untrained head; training never beats it, so the best epoch is 0 (train_vpr keeps that checkpoint)."""
    logs = tmp_path / "logs"
    logger = CsvLogger(logs / "dinov2_s_seed3_20250105_101010.csv")
    logger.log("validation", epoch=0, val_loss=4.0, val_r1=0.5, val_r5=0.7, val_r10=0.8, val_time=1.0)
    for epoch, r1 in ((1, 0.45), (2, 0.5)):
        for batch in (1, 2):
            logger.log("batch", epoch=epoch, batch=batch, train_loss=3.0, triplet_loss=0.2, contrastive_loss=2.94,
                       batch_time=0.25)
        logger.log("epoch", epoch=epoch, epoch_time=0.5, avg_train_loss=3.0 - epoch, avg_triplet_loss=0.2,
                   avg_contrastive_loss=2.94 - epoch)
        logger.log("validation", epoch=epoch, val_loss=float("nan"), val_r1=r1, val_r5=0.7, val_r10=0.8, val_time=1.0)
    logger.close()
    append_summary_row(logs / "training_summary.csv", {
        "run_id": "dinov2_s_seed3_20250105_101010", "model": "dinov2_s", "seed": 3, "lr": 1e-4, "best_val_r1": 0.5})

    summary = summarize_run(read_run_log(logs / "dinov2_s_seed3_20250105_101010.csv"))
    assert (summary.best_epoch, summary.best_val_r1, summary.untrained_val_r1) == (0, 0.5, 0.5)
    assert (summary.epochs_run, summary.unfinished_epoch, summary.final_val_loss) == (2, False, None)
    assert summary.final_train_loss == pytest.approx(1.0) and summary.total_time_s == pytest.approx(4.0)

    analyze_metrics.main([str(logs), "--plot_dir", str(tmp_path / "plots")])
    assert_png(tmp_path / "plots" / "dinov2_s_seed3_20250105_101010_plots.png")
    table = pd.read_csv(tmp_path / "plots" / "logs_runs_summary.csv")
    assert table.loc[0, "lr"] == pytest.approx(1e-4) and table.loc[0, "best_epoch"] == 0


def test_batch_positions_end_each_epoch_at_its_number():
    finished = pd.DataFrame({"epoch": [1, 1, 1, 1, 2, 2]})
    assert batch_positions(finished, False).tolist() == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.5, 2.0])
    # an unfinished epoch 3 after one of its four batches: a quarter of the way
    running = pd.DataFrame({"epoch": [1, 1, 1, 1, 2, 2, 2, 2, 3]})
    assert batch_positions(running, True).tolist() == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25])


def test_smoothing_window_shrinks_for_short_logs_unless_given():
    assert smoothing_window(405, None) == 50
    assert smoothing_window(30, None) == 6
    assert smoothing_window(3, None) == 1
    assert smoothing_window(405, 10) == 10
    assert smoothing_window(6, 10) == 6


# --------------------------------------------------------------------------------------------
# A folder of runs, and experiment CSVs
# --------------------------------------------------------------------------------------------
def make_logs_folder(folder: Path) -> None:
    write(folder / "dinov2_b_seed42_20250101_120000.csv", LOG)
    write(folder / "dinov2_b_seed7_20250101_130000.csv",
          with_recalls(LOG, "2.5,0.55,0.75,0.80", "2.5,0.65,0.80,0.90"))
    write(folder / "resnet50_seed1_20250102_090000.csv", BATCHES_ONLY)
    write(folder / "notes.csv", "a,b\n1,2\n")  # not a run log: skipped
    write(folder / "just_started.csv", HEADER + "\n")  # a run log without rows yet: skipped with a warning
    write(folder / "experiment_20250103_100000.csv", EXPERIMENT)
    write(folder / "training_summary.csv", "\n".join([
        "run_id,model,seed,epochs,lr,batch_size,projection_dim,best_val_r1,best_val_r5,best_val_r10,"
        "best_epoch,epochs_run,wall_time_s,checkpoint,log_file",
        # an older row for the same run_id: the last one counts
        "dinov2_b_seed42_20250101_120000,dinov2_b,42,3,0.5,32,128,0.1,0.2,0.3,1,1,5.0,old.pth,x.csv",
        "dinov2_b_seed42_20250101_120000,dinov2_b,42,3,0.0001,32,256,0.55,0.75,0.8,2,3,12.5,a.pth,x.csv",
        "dinov2_b_seed7_20250101_130000,dinov2_b,7,3,0.0003,32,512,0.65,0.8,0.9,2,3,13.0,b.pth,y.csv",
        "deleted_run_20240101_000000,resnet50,1,3,0.001,32,256,0.1,0.2,0.3,1,3,10.0,c.pth,z.csv",
    ]) + "\n")


@pytest.mark.slow
def test_folder_of_runs_writes_figures_comparison_and_summary_table(tmp_path, capsys):
    make_logs_folder(tmp_path / "logs")
    plots = tmp_path / "plots"
    analyze_metrics.main([str(tmp_path / "logs"), "--plot_dir", str(plots)])

    assert_png(plots / "comparison_unrecorded_data.png")
    for run in ("dinov2_b_seed42_20250101_120000", "dinov2_b_seed7_20250101_130000", "resnet50_seed1_20250102_090000"):
        assert_png(plots / f"{run}_plots.png")
    assert_png(plots / "experiment_20250103_100000_bars.png", min_kb=15)
    assert not (plots / "notes_plots.png").exists() and not (plots / "training_summary_plots.png").exists()

    table = pd.read_csv(plots / "logs_runs_summary.csv").set_index("run_id")
    assert sorted(table.index) == ["dinov2_b_seed42_20250101_120000", "dinov2_b_seed7_20250101_130000",
                                   "resnet50_seed1_20250102_090000"]
    assert list(table.columns[:6]) == ["model", "seed", "epochs", "lr", "batch_size", "projection_dim"]
    seed42, seed7, resnet = (table.loc[r] for r in table.index.sort_values())
    assert (seed42["lr"], seed42["projection_dim"], seed42["seed"]) == (0.0001, 256, 42)  # the newer row
    assert (seed7["lr"], seed7["projection_dim"]) == (0.0003, 512)
    assert pd.isna(resnet["lr"]) and pd.isna(resnet["model"])  # not in training_summary.csv
    assert (seed42["best_val_r1"], seed42["best_epoch"]) == (pytest.approx(0.55), 2)
    assert (seed7["best_val_r1"], seed7["best_epoch"]) == (pytest.approx(0.65), 2)
    assert pd.isna(resnet["best_val_r1"]) and resnet["epochs_run"] == 0
    assert seed42["checkpoint"] == "a.pth" and seed42["total_time_s"] == pytest.approx(9.5)

    out, err = capsys.readouterr()
    assert "same for all runs: epochs=3, batch_size=32" in out
    assert "deleted_run" not in out
    assert err.startswith("warning: skipped") and "just_started.csv" in err and err.count("\n") == 1
    assert not (plots / "just_started_plots.png").exists()


@pytest.mark.slow
def test_runs_pattern_chooses_the_runs(tmp_path, capsys):
    make_logs_folder(tmp_path / "logs")
    plots = tmp_path / "plots"
    analyze_metrics.main([str(tmp_path / "logs"), "--runs", "*seed7*", "--plot_dir", str(plots)])

    table = pd.read_csv(plots / "logs_runs_summary.csv")
    assert table["run_id"].tolist() == ["dinov2_b_seed7_20250101_130000"]
    assert not (plots / "dinov2_b_seed42_20250101_120000_plots.png").exists()

    with pytest.raises(VPRError, match=r"no run log matches --runs 'convnext\*'.*dinov2_b_seed42"):
        analyze_metrics.main([str(tmp_path / "logs"), "--runs", "convnext*", "--plot_dir", str(plots)])


def test_experiment_csv_becomes_a_grouped_bar_chart(tmp_path, capsys):
    experiment = write(tmp_path / "logs" / "experiment_20250103_100000.csv", EXPERIMENT)
    analyze_metrics.main([str(experiment), "--plot_dir", str(tmp_path / "plots")])

    assert_png(tmp_path / "plots" / "experiment_20250103_100000_bars.png", min_kb=15)
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["experiment_20250103_100000_bars.png"]
    lines = capsys.readouterr().out.splitlines()
    trained = next(line for line in lines if "effnet_lite0" in line and "trained" in line).split()
    assert trained[2:] == ["58.0", "71.0", "76.0", "17.0"]  # recalls and ΔR@1 in percent


# --------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit code 2, no traceback
# --------------------------------------------------------------------------------------------
BAD_INPUTS = {
    "missing file": (None, "no such file or folder"),
    "binary file": (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "not a readable text CSV"),
    "empty file": ("", "the file is empty"),
    "poses CSV": ("image_path,lat,lon\na.jpg,45.0,7.0\n", "not a run log (missing columns timestamp, event"),
    "header only": (HEADER + "\n", "no batch, epoch or validation rows yet"),
    "broken line": (LOG.replace("2.2,0.25,2.125,2.0,,,,,", "2.2,0.25,2.125,2.0,,,,,,,,,,"), "not a readable CSV"),
    "text in a number column": (LOG.replace("2.5,0.55,0.75,0.80", "2.5,high,0.75,0.80"),
                                "row 9, column 'val_r1': 'high' is not a number"),
    "other events only": (f"{HEADER}\n{T},started,,,,,,,,,,,,,,,\n", "no batch, epoch or validation rows yet"),
    "experiment with text recall": (EXPERIMENT.replace("0.61,", "61%,"),
                                    "row 2, column 'recall@1': '61%' is not a number"),
    "experiment without recall columns": ("model,variant,r1\nx,raw,0.5\n", "not a run log"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_file_is_one_clear_line_and_exit_code_2(tmp_path, capsys, case):
    content, message = BAD_INPUTS[case]
    path = tmp_path / "run.csv"
    if content is not None:
        write(path, content)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(analyze_metrics.main, [str(path), "--plot_dir", str(tmp_path / "plots")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: {path}") and message in err


@pytest.mark.parametrize("files, message", [
    ({}, "no CSV files in this folder"),
    ({"training_summary.csv": "run_id,model\na,b\n", "notes.csv": "a,b\n1,2\n"}, "no run logs among its 2 CSV file(s)"),
])
def test_folder_without_run_logs_is_an_error(tmp_path, capsys, files, message):
    folder = tmp_path / "logs"
    folder.mkdir()
    for name, text in files.items():
        write(folder / name, text)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(analyze_metrics.main, [str(folder), "--plot_dir", str(tmp_path / "plots")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {folder}") and message in err


@pytest.mark.slow
def test_command_line_error_has_no_traceback(tmp_path):
    """The real script, as a user runs it: exit code 2 and one line on stderr."""
    bad = write(tmp_path / "poses.csv", "image_path,lat,lon\na.jpg,45.0,7.0\n")
    result = subprocess.run(
        [sys.executable, str(ROOT / "analyze_metrics.py"), str(bad), "--plot_dir", str(tmp_path / "plots")],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert str(bad) in result.stderr and "train_vpr.py" in result.stderr


def test_other_bad_inputs_name_the_file_or_flag(tmp_path, capsys):
    """Files that are ours but not what the command needs, and outputs that cannot be written."""
    make_logs_folder(tmp_path / "logs")
    not_a_folder = write(tmp_path / "regular_file", "x\n")
    broken_summary = tmp_path / "broken"
    make_logs_folder(broken_summary)
    write(broken_summary / "training_summary.csv", "model,seed\nx,1\n")
    plots = ["--plot_dir", str(tmp_path / "plots")]
    cases = [
        ([str(tmp_path / "logs" / "training_summary.csv"), *plots], "the summary of all runs, not a run log"),
        ([str(broken_summary), *plots], "training_summary.csv: no run_id column"),
        ([str(tmp_path / "logs"), "--plot_dir", str(not_a_folder / "plots")], "--plot_dir"),
        ([str(tmp_path / "logs"), "--smooth", "0", *plots], "--smooth 0"),
        ([str(tmp_path / "logs"), "--smooth", "ten", *plots], "argument --smooth: invalid int value: 'ten'"),
        ([str(tmp_path / "logs"), *plots, "--runs"], "argument --runs: expected one argument"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(analyze_metrics.main, argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, err
        assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
        assert message in err, (message, err)
    assert not (tmp_path / "plots").exists(), "a command stopped on bad input wrote figures"
