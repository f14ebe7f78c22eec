"""Figures name their data by folder and file (bgu_campus/train.csv), never by the absolute path
the run was given: analyze_metrics' comparison figure of comparable runs (issue 20, section 5)."""
from __future__ import annotations

from pathlib import Path

import analyze_metrics  # noqa: E402
from vprkit.logs.plots import data_name  # noqa: E402
from vprkit.logs.runlog import LOG_COLUMNS  # noqa: E402

T = "2025-01-01T12:00:00"
LOG = "\n".join([
    ",".join(LOG_COLUMNS),
    f"{T},batch,1,1,3.0,0.4,2.88,1.0,,,,,,,,,",
    f"{T},epoch,1,,,,,,2.8,0.35,2.695,2.5,,,,,",
    f"{T},validation,1,,,,,,,,,,2.9,0.40,0.60,0.70,0.5",
]) + "\n"


def test_data_name_keeps_the_folder_and_file_only():
    assert data_name("/home/someone/data/bgu_campus/train.csv") == "bgu_campus/train.csv"
    assert data_name(Path("demo_data/val.csv")) == "demo_data/val.csv"
    assert data_name("train.csv") == "train.csv"


def test_comparison_figure_title_has_no_absolute_path(tmp_path, monkeypatch, capsys):
    data = tmp_path / "deep" / "place" / "bgu_campus"
    logs = tmp_path / "logs"
    logs.mkdir()
    run_id = "effnet_lite0_seed42_20250101_120000"
    (logs / f"{run_id}.csv").write_text(LOG)
    (logs / "training_summary.csv").write_text(
        "run_id,model,seed,train_csv,val_csv,pos_threshold_m,supervision,best_val_r1,wall_time_s\n"
        f"{run_id},effnet_lite0,42,{data / 'train.csv'},{data / 'val.csv'},25,gps,0.4,3.0\n")
    titles: list[str] = []
    real = analyze_metrics.plot_comparison

    def spy(curves, title, path):
        titles.append(title)
        return real(curves, title, path)

    monkeypatch.setattr(analyze_metrics, "plot_comparison", spy)
    analyze_metrics.main([str(logs), "--plot_dir", str(tmp_path / "plots")])
    assert titles == ["Comparable runs: train bgu_campus/train.csv | val bgu_campus/val.csv | positives within 25 m"]
    assert (tmp_path / "plots" / "comparison_bgu_campus_train_val_25m.png").is_file()
    # the console heading still names the data as the summary recorded it
    assert f"train {data / 'train.csv'}" in capsys.readouterr().out
