"""run_experiment.py --seq_len L on a tiny route (issue 24): the sequence rows beside today's, what
val chose in the JSON, "what training bought" for sequences; tables that are not routes stop
before anything is written."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

import analyze_metrics
import run_experiment
from helpers import TINY_MODEL, TINY_OPTIONS, assert_one_line_error, run_main
from helpers.routes import write_route_images
from helpers.tiny_dataset import write_tiny_dataset
from vprkit.logs.run_summary import recall_by_seq_len
from vprkit.logs.runlog import EXPERIMENT_VARIANTS


@pytest.fixture(scope="module")
def route(tmp_path_factory) -> dict[str, Path]:
    """Training places 0-11 (both drives), val 12-23 (winter against the summer map), test 24-35."""
    root = tmp_path_factory.mktemp("tiny_route_experiment")
    splits = {"train": (0, ("summer", "winter")), "val": (12, ("winter",)), "val_db": (12, ("summer",)),
              "test": (24, ("winter",)), "db": (24, ("summer",))}
    paths = {name: write_route_images(root, name, first, 12, drives) for name, (first, drives) in splits.items()}
    return {**paths, "root": root, "cache": root / "cache"}


def route_argv(route, out: Path, *extra: str) -> list[str]:
    return ["--train_csv", str(route["train"]), "--val_csv", str(route["val"]), "--val_db_csv", str(route["val_db"]),
            "--test_csv", str(route["test"]), "--db_csv", str(route["db"]), "--models", TINY_MODEL, *TINY_OPTIONS,
            "--cache_dir", str(route["cache"]), "--log_dir", str(out / "logs"), "--checkpoint_dir",
            str(out / "models"), "--epochs", "1", "--batch_size", "8", "--images_per_place", "2",
            "--projection_dim", "8", "--vlad_clusters", "4", *extra]


@pytest.fixture(scope="module")
def experiment(route):
    out = route["root"] / "experiment"
    table = run_experiment.main(route_argv(route, out, "--seq_len", "3"))
    csv_path = next((out / "logs").glob("experiment_*.csv"))
    return table, csv_path, json.loads(csv_path.with_suffix(".json").read_text())


def test_the_sequence_rows_follow_todays(experiment):
    table, csv_path, _ = experiment
    written = pd.read_csv(csv_path)
    variants = written["variant"].tolist()
    assert variants[:len(EXPERIMENT_VARIANTS)] == list(EXPERIMENT_VARIANTS)
    assert variants[len(EXPERIMENT_VARIANTS):] == ["seq_match", "seq_start", "seq_trained"]
    seq = written.set_index("variant").loc["seq_match"]
    assert 0.0 <= seq["recall@1"] <= seq["recall@5"] <= 1.0
    assert seq["delta_r1_vs_raw"] == pytest.approx(seq["recall@1"] - written.set_index("variant").loc["raw",
                                                                                                      "recall@1"])


def test_the_json_records_what_val_chose(experiment):
    _, _, record = experiment
    sequence = record["models"][TINY_MODEL]["sequence"]
    assert sequence["seq_len"] == 3 and sequence["seq_velocity"] == [0.8, 1.25]
    chosen = sequence["seq_match"]
    assert chosen["frames"] in ("raw", "pca_whitened", "learned_whitened", "vlad")
    # every frozen row x both velocity ranges was scored on val, and the chosen one is the best
    assert len(chosen["val_r1"]) == 2 * 4
    best = max(chosen["val_r1"].values())
    key = f"{chosen['frames']}, v {chosen['seq_velocity'][0]:g}-{chosen['seq_velocity'][1]:g}"
    assert chosen["val_r1"][key] == best


def test_what_training_bought_on_routes_adds_up_to_the_table(experiment):
    _, csv_path, record = experiment
    r1 = pd.read_csv(csv_path).set_index("variant")["recall@1"]
    gain = record["models"][TINY_MODEL]["training_gain"]
    assert gain["seq_start_minus_seq_match"] == pytest.approx(r1["seq_start"] - r1["seq_match"], abs=1e-4)
    assert gain["seq_trained_minus_seq_start"] == pytest.approx(r1["seq_trained"] - r1["seq_start"], abs=1e-4)
    best = "seq_match" if r1["seq_match"] >= r1["seq_start"] else "seq_start"
    assert gain["best_free_sequence"] == best
    assert gain["seq_trained_minus_best_free"] == pytest.approx(r1["seq_trained"] - r1[best], abs=1e-4)
    trained = record["models"][TINY_MODEL]["sequence"]["seq_trained"]
    assert Path(trained["checkpoint"]).is_file() and trained["run_id"] in trained["checkpoint"]
    assert {"match_frames", "velocity", "fusion_weight", "head_start"} <= set(trained["chosen"])


def test_single_frame_tables_are_refused_before_anything_is_written(tmp_path, capsys):
    data = write_tiny_dataset(tmp_path / "frames")
    out = tmp_path / "out"
    argv = ["--train_csv", str(data["train"]), "--val_csv", str(data["val"]), "--test_csv", str(data["test"]),
            "--models", TINY_MODEL, *TINY_OPTIONS, "--cache_dir", str(tmp_path / "cache"), "--log_dir",
            str(out / "logs"), "--checkpoint_dir", str(out / "models"), "--seq_len", "3"]
    code, err = run_main(capsys, run_experiment.main, argv)
    assert_one_line_error(code, err, "not a route", "frame index")
    assert not [p for p in out.rglob("*") if p.is_file()]


def test_analyze_metrics_draws_recall_against_seq_len(route, experiment, tmp_path):
    """A second experiment at --seq_len 2 in the same folder: R@1 of every method against the length."""
    _, first_csv, _ = experiment
    out = route["root"] / "experiment"  # the same log folder
    run_experiment.main(route_argv(route, out, "--seq_len", "2"))
    csvs = sorted((out / "logs").glob("experiment_*.csv"))
    assert len(csvs) == 2
    by_len = recall_by_seq_len(csvs)
    first = pd.read_csv(first_csv).set_index("variant")["recall@1"]
    assert set(by_len[f"{TINY_MODEL} seq_match"]) == {2, 3}
    assert by_len[f"{TINY_MODEL} seq_match"][3] == pytest.approx(first["seq_match"])
    assert by_len[f"{TINY_MODEL} raw"][3] == pytest.approx(first["raw"])
    analyze_metrics.main([str(out / "logs"), "--plot_dir", str(tmp_path / "plots")])
    assert (tmp_path / "plots" / "logs_recall_by_seq_len.png").is_file()
