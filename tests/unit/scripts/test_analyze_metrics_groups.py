"""analyze_metrics.py: comparable runs grouped by their data and threshold, labelled by what
differs, a table that fits 100 columns with the summary's wall time, no torch at start-up, and
the tuning-study figure."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import analyze_metrics
from vprkit.logs.run_summary import run_labels
from helpers import REPO
from helpers.run_logs import LOG, assert_png, with_recalls, write

SUMMARY_HEADER = ("run_id,model,seed,train_csv,val_csv,pos_threshold_m,supervision,head,lr,epochs,output_dir,"
                  "best_val_r1,best_val_r5,best_val_r10,best_epoch,epochs_run,wall_time_s,checkpoint,log_file")


def make_mixed_folder(folder: Path) -> None:
    """Four runs: three on bgu at 10 m (two heads of one model, one other model), one on the
    demo at 25 m; the log's epoch+validation time of every run is 9.5 s, the wall time 18.8 s."""
    runs = {
        "effnet_lite0_seed42_20250101_120000": "effnet_lite0,42,bgu/train.csv,bgu/val.csv,10,gps,residual,0.001",
        "effnet_lite0_seed42_20250101_130000": "effnet_lite0,42,bgu/train.csv,bgu/val.csv,10,gps,mlp,0.001",
        "dinov2_b_seed42_20250101_140000": "dinov2_b,42,bgu/train.csv,bgu/val.csv,10,gps,residual,0.001",
        "effnet_lite0_seed42_20250101_150000":
            "effnet_lite0,42,demo_data/train.csv,demo_data/val.csv,25,gps,residual,0.001",
    }
    rows = [SUMMARY_HEADER]
    for i, (run_id, config) in enumerate(runs.items()):
        write(folder / f"{run_id}.csv", with_recalls(LOG, "2.5,0.55,0.75,0.80", f"2.5,0.{6 + i}5,0.80,0.90"))
        rows.append(f"{run_id},{config},3,out{i},0.6,0.8,0.9,2,3,18.8,{run_id}.pth,{run_id}.csv")
    write(folder / "training_summary.csv", "\n".join(rows) + "\n")


@pytest.mark.slow
def test_runs_grouped_by_data_and_labelled_by_what_differs(tmp_path, capsys):
    make_mixed_folder(tmp_path / "logs")
    plots = tmp_path / "plots"
    analyze_metrics.main([str(tmp_path / "logs"), "--plot_dir", str(plots)])
    assert_png(plots / "comparison_bgu_train_val_10m.png")
    assert_png(plots / "comparison_demo_data_train_val_25m.png")
    assert not (plots / "comparison.png").exists()
    table = pd.read_csv(plots / "logs_runs_summary.csv").set_index("run_id")
    assert table.loc["effnet_lite0_seed42_20250101_120000", "label"] == "effnet_lite0 head=residual"
    assert table.loc["effnet_lite0_seed42_20250101_130000", "label"] == "effnet_lite0 head=mlp"
    assert table.loc["dinov2_b_seed42_20250101_140000", "label"] == "dinov2_b head=residual"
    assert table.loc["effnet_lite0_seed42_20250101_150000", "label"] == "effnet_lite0"  # alone in its group
    out = capsys.readouterr().out
    assert "train bgu/train.csv | val bgu/val.csv | positives within 10 m: 3 run(s)" in out
    assert "train demo_data/train.csv | val demo_data/val.csv | positives within 25 m: 1 run(s)" in out
    assert all(len(line) <= 100 for line in out.splitlines() if str(plots) not in line), out  # paths aside
    rows = [line for line in out.splitlines() if line.startswith(("effnet_lite0 ", "dinov2_b "))]
    assert len(rows) == 4
    # the time column is the summary's wall time (18.8 s), not the log's epochs + validation (9.5 s)
    assert all(line.split()[-1] == "18.8s" for line in rows), rows
    assert "run_id" not in out.split("positives within 10 m")[1].split("\n")[1]  # the header names runs by label


def test_labels_fall_back_to_seed_when_only_the_seed_differs():
    rows = pd.DataFrame({"run_id": ["a", "b"], "model": ["m", "m"], "seed": [1, 2], "lr": [0.1, 0.1]})
    assert run_labels(rows) == ["m seed=1", "m seed=2"]


@pytest.mark.slow
def test_no_torch_at_start_up():
    proc = subprocess.run([sys.executable, "-X", "importtime", "analyze_metrics.py", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "matplotlib" in imported or "pandas" in imported  # the importtime output was read
    assert not {name for name in imported if name == "torch" or name.startswith("torch.")}
    assert "optuna" not in imported


@pytest.mark.slow
def test_study_figure_from_a_sqlite_study(tmp_path, capsys):
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{tmp_path / 'tune.db'}"
    study = optuna.create_study(study_name="tiny", storage=storage, direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: -(t.suggest_float("lr", 1e-5, 1e-2, log=True) - 1e-3) ** 2
                   + 0.01 * t.suggest_int("dim", 16, 64), n_trials=8)
    optuna.create_study(study_name="other", storage=storage)
    plots = tmp_path / "plots"
    analyze_metrics.main(["--study", storage, "--study_name", "tiny", "--plot_dir", str(plots)])
    assert_png(plots / "study_tiny.png")
    assert "study figure" in capsys.readouterr().out
    with pytest.raises(analyze_metrics.VPRError, match="holds 2 studies"):
        analyze_metrics.main(["--study", storage, "--plot_dir", str(plots)])
    with pytest.raises(analyze_metrics.VPRError, match="--study_name nope: not in"):
        analyze_metrics.main(["--study", storage, "--study_name", "nope", "--plot_dir", str(plots)])
