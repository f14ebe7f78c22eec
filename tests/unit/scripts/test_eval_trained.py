"""eval_trained.py and run_experiment.py end to end (DESIGN.md §6, §7): outputs, a trained
checkpoint, bad inputs as one-line errors (the raw baseline on the real bgu_campus data is in
tests/e2e/test_bgu_campus.py).

The scripts run in-process (main([...]), or run_cli(main, [...]) for exit codes and stderr),
with the tiny random-weight timm model on a tiny synthetic data set; one subprocess checks the
real command line."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import eval_trained  # noqa: E402
import run_experiment  # noqa: E402
import train_vpr  # noqa: E402
import trainable_vpr as vpr  # noqa: E402
from helpers import REPO, TINY_MODEL, assert_one_line_error, run_main  # noqa: E402
from helpers import TINY_OPTIONS as TINY  # noqa: E402
from helpers.tiny_dataset import write_image, write_tiny_dataset  # noqa: E402
from vprkit.retrieval.evaluation import evaluate_retrieval  # noqa: E402
from vprkit.cli.extraction_settings import ExtractionSettings  # noqa: E402
from vprkit.extraction.features import extract_features  # noqa: E402
from vprkit.tables.places import load_poses  # noqa: E402
from vprkit.logs.runlog import EXPERIMENT_VARIANTS, safe_name  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_vpr")
    paths = write_tiny_dataset(root)
    paths["cache"] = root / "cache"
    paths["root"] = root
    return paths


def eval_argv(data, *extra: str, queries: str = "test") -> list[str]:
    return ["--db_csv", str(data["train"]), "--test_csv", str(data[queries]),
            "--cache_dir", str(data["cache"]), *TINY, *extra]


@pytest.fixture(scope="module")
def baseline(data):
    """One --baseline run with every output asked for."""
    out = data["root"] / "baseline"
    paths = {"json": out / "result.json", "predictions": out / "pred.csv", "plots": out / "plots"}
    report = eval_trained.main(eval_argv(
        data, "--baseline", "--model", TINY_MODEL, "--output_json", str(paths["json"]),
        "--save_predictions", str(paths["predictions"]), "--visualize", "2", "--plot_dir", str(paths["plots"])))
    return report, paths


@pytest.fixture(scope="module")
def checkpoint(data) -> Path:
    """A checkpoint of the tiny model, 1 epoch, trained with a 30 m positive threshold."""
    out = data["root"] / "train"
    result = train_vpr.main([
        "--train_csv", str(data["train"]), "--val_csv", str(data["val"]), "--model", TINY_MODEL, *TINY,
        "--epochs", "1", "--batch_size", "8", "--images_per_place", "2", "--projection_dim", "16",
        "--pos_threshold_m", "30", "--cache_dir", str(data["cache"]),
        "--log_dir", str(out / "logs"), "--checkpoint_dir", str(out / "models"),
    ])
    assert result.checkpoint.is_file()
    return result.checkpoint


# --------------------------------------------------------------------------------------------
# --baseline and its outputs
# --------------------------------------------------------------------------------------------
def test_baseline_json_has_the_protocol_fields(baseline, data):
    report, paths = baseline
    payload = json.loads(paths["json"].read_text())
    for key in ("recall@1", "recall@5", "recall@10", "num_queries", "num_queries_without_positive", "settings"):
        assert key in payload, key
    assert payload["num_queries"] == 11
    assert payload["num_queries_without_positive"] == 1  # the query 3 km away
    assert 0.0 <= payload["recall@1"] <= payload["recall@5"] <= payload["recall@10"] <= 10 / 11
    assert payload["recall@1"] == pytest.approx(report.result.recalls[1])
    settings = payload["settings"]
    assert settings["model"] == TINY_MODEL
    assert settings["pos_threshold_m"] == 25.0
    assert settings["recall_at"] == [1, 5, 10]
    assert Path(settings["test_csv"]) == data["test"] and Path(settings["db_csv"]) == data["train"]


def test_baseline_predictions_one_row_per_query_and_rank(baseline, data):
    report, paths = baseline
    frame = pd.read_csv(paths["predictions"])
    for column in ("query_image", "rank", "db_image", "distance_m", "correct"):
        assert column in frame.columns, column
    assert len(frame) == 11 * 10  # 11 queries x top 10 (database of 20)
    assert sorted(frame.groupby("query_image")["rank"].apply(list).iloc[0]) == list(range(1, 11))
    assert (frame.groupby("query_image").size() == 10).all()
    assert frame["correct"].dtype == bool
    assert (frame["correct"] == (frame["distance_m"] <= 25.0)).all()
    # images are real paths of the two CSVs
    train_images = {str(data["root"] / p) for p in pd.read_csv(data["train"])["image_path"]}
    assert set(frame["db_image"]) <= train_images
    # the JSON recalls are what the predictions say
    payload = json.loads(paths["json"].read_text())
    for n in (1, 5, 10):
        hits = frame[frame["rank"] <= n].groupby("query_image")["correct"].any()
        assert hits.mean() == pytest.approx(payload[f"recall@{n}"]), n
    # the far query never has a correct retrieval and is marked as having no positive
    far = frame[frame["query_image"].str.endswith("test_far.jpg")]
    assert len(far) == 10 and not far["correct"].any()
    if "query_has_positive" in frame.columns:
        assert not far["query_has_positive"].any()


def test_condition_breakdown_in_json(baseline, data):
    _, paths = baseline
    payload = json.loads(paths["json"].read_text())
    breakdown = payload["by_condition"]
    assert set(breakdown) == {"day", "night"}
    frame = pd.read_csv(paths["predictions"])
    queries = pd.read_csv(data["test"])
    for condition in ("day", "night"):
        images = {str(data["root"] / p) for p in queries[queries["condition"] == condition]["image_path"]}
        rows = frame[frame["query_image"].isin(images)]
        for n in (1, 5, 10):
            expected = rows[rows["rank"] <= n].groupby("query_image")["correct"].any().mean()
            assert breakdown[condition][f"recall@{n}"] == pytest.approx(expected), (condition, n)


def test_no_condition_breakdown_without_a_condition_column(data, tmp_path):
    frame = pd.read_csv(data["test"]).drop(columns=["condition"])
    frame["image_path"] = [str(data["root"] / p) for p in frame["image_path"]]
    queries = tmp_path / "queries.csv"
    frame.to_csv(queries, index=False)
    out = tmp_path / "r.json"
    eval_trained.main(["--db_csv", str(data["train"]), "--test_csv", str(queries), "--cache_dir", str(data["cache"]),
                       *TINY, "--baseline", "--model", TINY_MODEL, "--output_json", str(out)])
    assert "by_condition" not in json.loads(out.read_text())


def test_visualize_writes_a_png(baseline):
    from PIL import Image

    _, paths = baseline
    pngs = list(paths["plots"].glob("*_retrievals.png"))
    assert len(pngs) == 1
    assert ([p.name for p in paths["plots"].glob("*_localization.png")]
            == ["raw_timm_test_efficientnet_test_localization.png"])
    with Image.open(pngs[0]) as image:
        assert image.format == "PNG"
        assert image.width > 100 and image.height > 100


def test_recall_at_custom_values(data, tmp_path):
    out, pred = tmp_path / "r.json", tmp_path / "p.csv"
    report = eval_trained.main(eval_argv(data, "--baseline", "--model", TINY_MODEL, "--recall_at", "1", "3",
                                         "--output_json", str(out), "--save_predictions", str(pred)))
    payload = json.loads(out.read_text())
    assert "recall@1" in payload and "recall@3" in payload
    assert "recall@5" not in payload and "recall@10" not in payload
    assert payload["settings"]["recall_at"] == [1, 3]
    assert set(report.result.recalls) == {1, 3}
    frame = pd.read_csv(pred)
    assert len(frame) == 11 * 3 and frame["rank"].max() == 3
    hits = frame.groupby("query_image")["correct"].any()
    assert hits.mean() == pytest.approx(payload["recall@3"])


def test_pos_threshold_flag_is_used(data, tmp_path):
    out, pred = tmp_path / "r.json", tmp_path / "p.csv"
    eval_trained.main(eval_argv(data, "--baseline", "--model", TINY_MODEL, "--pos_threshold_m", "400",
                                "--output_json", str(out), "--save_predictions", str(pred)))
    payload = json.loads(out.read_text())
    assert payload["settings"]["pos_threshold_m"] == 400.0
    assert payload["num_queries_without_positive"] == 1  # the far query is 3 km away
    frame = pd.read_csv(pred)
    assert (frame["correct"] == (frame["distance_m"] <= 400.0)).all()
    assert frame["correct"].any() and not frame["correct"].all()


def test_predictions_correct_column_agrees_with_the_distance_column_at_the_threshold(tmp_path):
    """A database image 25.004 m from the query is beyond 25 m (correct False), but the
    predictions CSV rounds distance_m to 2 decimals and writes 25.0: a reader checking
    `correct == (distance_m <= threshold)` finds a contradiction. Fix (eval_trained.py,
    predictions_frame): write distance_m unrounded (or derive both from the same value)."""
    for i, name in enumerate(("q.jpg", "a.jpg", "b.jpg")):
        write_image(tmp_path / name, np.array([60.0 * (i + 1)] * 3), np.random.default_rng(i))
    pd.DataFrame({"image_path": ["a.jpg", "b.jpg"], "easting": [1000.0 + 25.004, 3000.0],
                  "northing": [0.0, 0.0]}).to_csv(tmp_path / "db.csv", index=False)
    # a second query next to b.jpg: queries none of which has a positive are refused as bad input
    pd.DataFrame({"image_path": ["q.jpg", "b.jpg"], "easting": [1000.0, 3001.0],
                  "northing": [0.0, 0.0]}).to_csv(tmp_path / "q.csv", index=False)
    pred = tmp_path / "p.csv"
    eval_trained.main(["--db_csv", str(tmp_path / "db.csv"), "--test_csv", str(tmp_path / "q.csv"), *TINY,
                       "--no_cache", "--baseline", "--model", TINY_MODEL, "--save_predictions", str(pred)])
    frame = pd.read_csv(pred)
    assert len(frame) == 4 and frame.loc[frame["query_index"] == 0, "distance_m"].min() == pytest.approx(25.004)
    assert (frame["correct"] == (frame["distance_m"] <= 25.0)).all(), frame[["db_image", "distance_m", "correct"]]


# --------------------------------------------------------------------------------------------
# a trained checkpoint
# --------------------------------------------------------------------------------------------
def test_trained_checkpoint_evaluates(data, checkpoint, tmp_path):
    out, pred = tmp_path / "r.json", tmp_path / "p.csv"
    report = eval_trained.main(["--model_path", str(checkpoint), "--db_csv", str(data["train"]),
                                "--test_csv", str(data["test"]), "--num_workers", "0", "--device", "cpu",
                                "--cache_dir", str(data["cache"]), "--output_json", str(out),
                                "--save_predictions", str(pred)])
    payload = json.loads(out.read_text())
    assert payload["num_queries"] == 11 and payload["num_queries_without_positive"] == 1
    assert 0.0 <= payload["recall@1"] <= payload["recall@5"] <= payload["recall@10"] <= 1.0
    settings = payload["settings"]
    assert settings["checkpoint"] == str(checkpoint)
    assert settings["model"] == TINY_MODEL
    assert settings["pos_threshold_m"] == 30.0  # the checkpoint's, when --pos_threshold_m is not given
    assert report.name.startswith("trained")
    assert report.result.top_indices.shape == (11, 10)
    frame = pd.read_csv(pred)
    assert (frame["correct"] == (frame["distance_m"] <= 30.0)).all()
    # the evaluation went through the head: same ranking as the head's outputs on the features
    ckpt = vpr.load_checkpoint(checkpoint)
    head = vpr.head_from_checkpoint(ckpt)
    backbone = vpr.create_backbone(TINY_MODEL, "random", 32)
    options = ExtractionSettings(num_workers=0, device="cpu", cache_dir=str(data["cache"]))
    database, queries = load_poses(data["train"]), load_poses(data["test"])
    db_emb = vpr.embed(head, extract_features(backbone, database, options))
    q_emb = vpr.embed(head, extract_features(backbone, queries, options))
    assert db_emb.shape[1] == 16
    expected = evaluate_retrieval(db_emb, database.xyz, q_emb, queries.xyz, 30.0, (1, 5, 10))
    np.testing.assert_array_equal(report.result.top_indices, expected.top_indices)
    assert report.result.recalls == expected.recalls


def test_checkpoint_with_another_model_flag_is_an_error(capsys, data, checkpoint):
    code, err = run_main(capsys, eval_trained.main, eval_argv(data, "--model_path", str(checkpoint), "--model",
                                                              "effnet_lite0"))
    assert_one_line_error(code, err, "effnet_lite0", TINY_MODEL)


def test_checkpoint_whose_head_takes_other_features_is_an_error(capsys, data, checkpoint, tmp_path):
    import torch

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    ckpt["head_config"]["in_dim"] = 128  # the tiny backbone gives 256, and so do the head's weights
    bad = tmp_path / "other_dim.pth"
    torch.save(ckpt, bad)
    code, err = run_main(capsys, eval_trained.main, eval_argv(data, "--model_path", str(bad)))
    assert_one_line_error(code, err, str(bad), "head weights do not fit its head_config", "128", "256")


def test_truncated_checkpoint_is_an_error(capsys, data, checkpoint, tmp_path):
    bad = tmp_path / "truncated.pth"
    blob = checkpoint.read_bytes()
    bad.write_bytes(blob[: len(blob) // 2])
    code, err = run_main(capsys, eval_trained.main, eval_argv(data, "--model_path", str(bad)))
    assert_one_line_error(code, err, str(bad), "truncated")


def test_query_csv_with_a_header_only_is_an_error(capsys, data):
    code, err = run_main(capsys, eval_trained.main, eval_argv(data, "--baseline", "--model", TINY_MODEL,
                                                              queries="empty"))
    assert_one_line_error(code, err, "empty.csv", "no rows")


def test_database_and_queries_in_different_coordinate_kinds_is_an_error(capsys, data):
    code, err = run_main(capsys, eval_trained.main,
                        eval_argv(data, "--baseline", "--model", TINY_MODEL, queries="test_latlon"))
    assert_one_line_error(code, err, "test_latlon.csv", "lat/lon", "easting/northing")


@pytest.mark.slow
def test_command_line_error_exit_code_and_single_line(data, tmp_path):
    """The real entry point: `python eval_trained.py` with a truncated checkpoint."""
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    proc = subprocess.run([sys.executable, "eval_trained.py", *eval_argv(data, "--model_path", str(bad))],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert_one_line_error(proc.returncode, proc.stderr, str(bad))


# --------------------------------------------------------------------------------------------
# run_experiment.py
# --------------------------------------------------------------------------------------------
def test_run_experiment_writes_the_comparison_table(data, tmp_path):
    logs = tmp_path / "logs"
    table = run_experiment.main([
        "--train_csv", str(data["train"]), "--val_csv", str(data["val"]), "--test_csv", str(data["test"]),
        "--models", TINY_MODEL, *TINY, "--epochs", "1", "--batch_size", "8", "--images_per_place", "2",
        "--projection_dim", "16", "--vlad_clusters", "4", "--cache_dir", str(data["cache"]), "--log_dir", str(logs),
        "--checkpoint_dir", str(tmp_path / "models"),
    ])
    written = list(logs.glob("experiment_*.csv"))
    assert len(written) == 1
    frame = pd.read_csv(written[0])
    assert list(frame.columns) == ["model", "variant", "recall@1", "recall@5", "recall@10", "delta_r1_vs_raw", "auc_pr",
                                     "recall_at_100_precision"]
    assert frame["model"].tolist() == [TINY_MODEL] * 7
    assert frame["variant"].tolist() == list(EXPERIMENT_VARIANTS)
    rows = frame.set_index("variant")
    assert rows.loc["raw", "delta_r1_vs_raw"] == 0
    for variant in ("pca_whitened", "vlad", "trained", "trained_whitened"):
        expected = rows.loc[variant, "recall@1"] - rows.loc["raw", "recall@1"]
        assert rows.loc[variant, "delta_r1_vs_raw"] == pytest.approx(expected, abs=1.5e-4), variant
    for n in (1, 5, 10):
        assert frame[f"recall@{n}"].between(0, 1).all()
    assert (frame["recall@1"] <= frame["recall@5"]).all() and (frame["recall@5"] <= frame["recall@10"]).all()
    pd.testing.assert_frame_equal(frame, table.reset_index(drop=True), check_dtype=False, atol=1e-9)
    # the raw row is the same evaluation eval_trained --baseline does
    report = eval_trained.main(eval_argv(data, "--baseline", "--model", TINY_MODEL))
    assert rows.loc["raw", "recall@1"] == pytest.approx(report.result.recalls[1], abs=1e-4)
    # and the trained_whitened row is eval_trained --model_path CKPT --pca_whiten projection_dim
    [checkpoint] = [p for p in (tmp_path / "models").glob("*.pth") if not p.stem.endswith(("_last", "_final"))
                    and not p.name.startswith("trained_")]
    whitened = eval_trained.main(eval_argv(data, "--model_path", str(checkpoint), "--pca_whiten", "16"))
    assert whitened.name.startswith("trained_whitened_")
    assert rows.loc["trained_whitened", "recall@1"] == pytest.approx(whitened.result.recalls[1], abs=1e-4)
    # and the vlad row eval_trained --baseline --pooling vlad (the database is the training set here)
    report = eval_trained.main(eval_argv(data, "--baseline", "--model", TINY_MODEL, "--pooling", "vlad",
                                         "--vlad_clusters", "4"))
    assert report.name.startswith("raw_vlad_")
    assert rows.loc["vlad", "recall@1"] == pytest.approx(report.result.recalls[1], abs=1e-4)


@pytest.mark.slow
def test_visualize_names_the_picture_after_what_it_shows(data, checkpoint, tmp_path):
    """Two checkpoints of one model and seed, the baseline and another query file: four pictures,
    each named after its checkpoint's run id (or the baseline variant) and its queries."""
    second = train_vpr.main([
        "--train_csv", str(data["train"]), "--val_csv", str(data["val"]), "--model", TINY_MODEL, *TINY,
        "--epochs", "1", "--batch_size", "8", "--images_per_place", "2", "--projection_dim", "16", "--lr", "1e-2",
        "--pos_threshold_m", "30", "--cache_dir", str(data["cache"]),
        "--log_dir", str(checkpoint.parent.parent / "logs"), "--checkpoint_dir", str(checkpoint.parent)])
    plots = tmp_path / "plots"
    show = ["--visualize", "1", "--plot_dir", str(plots)]
    for model_path in (checkpoint, second.checkpoint):
        eval_trained.main(eval_argv(data, "--model_path", str(model_path), *show))
    eval_trained.main(eval_argv(data, "--model_path", str(checkpoint), *show, queries="val"))
    eval_trained.main(eval_argv(data, "--baseline", "--model", TINY_MODEL, *show))
    first_id = vpr.load_checkpoint(checkpoint)["run_id"]
    assert sorted(p.name for p in plots.glob("*_retrievals.png")) == sorted([
        f"{first_id}_on_test_retrievals.png", f"{second.run_id}_on_test_retrievals.png",
        f"{first_id}_on_val_retrievals.png", f"raw_{safe_name(TINY_MODEL)}_on_test_retrievals.png"])


@pytest.mark.slow
def test_run_experiment_demo_end_to_end(tmp_path, monkeypatch, capsys):
    """--demo generates the synthetic route (a short one here) and runs raw / PCA / trained on it;
    explicit flags win over the demo's settings, defaults take the demo's."""
    import functools

    from vprkit.tables import demo_route

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run_experiment, "generate_demo_dataset",
                        functools.partial(demo_route.generate_demo_dataset, num_places=16))
    table = run_experiment.main(["--demo", "--models", TINY_MODEL, *TINY, "--epochs", "2", "--batch_size", "8",
                                 "--images_per_place", "2", "--projection_dim", "16", "--vlad_clusters", "4"])
    assert sorted(p.name for p in (tmp_path / "demo_data").glob("*.csv")) == ["database.csv", "test.csv", "train.csv",
                                                                              "val.csv"]
    printed = capsys.readouterr().out
    # the demo says which flags it set (epochs was given, so not that one)
    assert "demo settings (flags you give win): --lr 0.001 --lr_schedule cosine\n" in printed
    assert table["variant"].tolist() == list(EXPERIMENT_VARIANTS)
    assert table[["recall@1", "recall@5", "recall@10"]].stack().between(0, 1).all()
    assert len(list((tmp_path / "logs").glob("experiment_*.csv"))) == 1
    summary = pd.read_csv(tmp_path / "logs" / "training_summary.csv")
    assert summary["epochs"].tolist() == [2]  # given explicitly
    assert summary["lr"].tolist() == [run_experiment.DEMO_SETTINGS["lr"]]  # left at the default
    assert summary["lr_schedule"].tolist() == ["cosine"]
    assert (tmp_path / "trained_models" / f"trained_{safe_name(TINY_MODEL)}_seed42.pth").is_file()  # latest run's copy
    assert Path(summary["checkpoint"].iloc[0]).name == f"{summary['run_id'].iloc[0]}.pth"


def test_demo_settings_apply_only_where_no_flag_is_given(tmp_path, monkeypatch, capsys):
    """The demo's --lr applies when --lr is left out (its default is filled per head, so comparing
    with the parser's default missed it), and a given --lr wins even when it equals the default."""
    import functools

    from vprkit.tables import demo_route

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run_experiment, "generate_demo_dataset",
                        functools.partial(demo_route.generate_demo_dataset, num_places=16))
    assert run_experiment.parse_args(["--demo"]).lr == run_experiment.DEMO_SETTINGS["lr"]
    assert "--lr 0.001" in capsys.readouterr().out
    assert run_experiment.parse_args(["--demo", "--lr", "1e-4"]).lr == 1e-4
    assert "--lr " not in capsys.readouterr().out  # (--lr_schedule still applies)
