"""The localization view wired into eval_trained.py and run_experiment.py, against a
hand-computed example: each query IS a database image (same file, so its top-1 is that image,
similarity 1) placed a chosen distance away from where the database says it is, so the top-1
errors are known exactly."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers import TINY_MODEL, write_jpeg
from helpers import TINY_OPTIONS as TINY

import eval_trained  # noqa: E402

ERRORS_M = [3.0, 8.0, 20.0, 40.0, 150.0]  # query i is ERRORS_M[i] metres east of database image i


def write_example(root: Path) -> dict[str, Path]:
    """db.csv: 8 distinct images 1 km apart on a line; queries.csv: the first five of those
    images (same files), each ERRORS_M[i] east of its database position."""
    rows = []
    for i in range(8):
        write_jpeg(root / f"images/db_{i}.jpg", seed=1000 + 37 * i, size=40)
        rows.append({"image_path": f"images/db_{i}.jpg", "easting": 500_000.0 + 1000.0 * i, "northing": 4_000_000.0})
    db = pd.DataFrame(rows)
    queries = db.iloc[: len(ERRORS_M)].copy()
    queries["easting"] += ERRORS_M
    paths = {"db": root / "db.csv", "queries": root / "queries.csv"}
    db.to_csv(paths["db"], index=False)
    queries.to_csv(paths["queries"], index=False)
    return paths


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    root = tmp_path_factory.mktemp("loc_example")
    paths = write_example(root)
    out = root / "out"
    argv = ["--baseline", "--model", TINY_MODEL, "--db_csv", str(paths["db"]), "--test_csv", str(paths["queries"]),
            *TINY, "--cache_dir", str(root / "cache"), "--pos_threshold_m", "25", "--output_json", str(out / "r.json"),
            "--save_predictions", str(out / "p.csv"), "--localization", "--plot_dir", str(out / "plots")]
    report = eval_trained.main(argv)
    return report, paths, out


def test_json_holds_hand_computed_localization(example):
    report, _, out = example
    np.testing.assert_array_equal(report.result.top_indices[:, 0], np.arange(5))  # each query finds its own image
    payload = json.loads((out / "r.json").read_text())
    # errors 3, 8, 20, 40, 150 m: within 5 m one of five, 10 m two, 25 m three, 50 and 100 m four
    assert payload["recall_at_threshold_m"] == pytest.approx({"5": 0.2, "10": 0.4, "25": 0.6, "50": 0.8, "100": 0.8},
                                                             abs=1e-6)
    # sorted errors 3 8 20 40 150: median 20, p75 at rank 3 = 40, p90 at rank 3.6 = 40 + 0.6 * 110 = 106
    assert payload["top1_error_m"] == pytest.approx({"median": 20.0, "p75": 40.0, "p90": 106.0}, abs=1e-3)
    assert payload["recall@1"] == pytest.approx(payload["recall_at_threshold_m"]["25"])  # same rule at 25 m
    # every top-1 similarity is 1 up to float noise here; the PR summary is checked by hand on parquets below
    top1 = pd.read_csv(out / "p.csv").query("rank == 1")
    assert list(top1["correct"]) == [True, True, True, False, False]
    assert 0.0 < payload["auc_pr"] <= 1.0 and "pr_auc" not in payload


def test_top1_pr_hand_computed_on_embeddings_with_positions(tmp_path):
    """Database: unit vectors e0..e4 at 1 km spacing; query i = cos(t) e_i + sin(t) e_9 at
    ERRORS_M[i] from database image i, so its top-1 is image i with similarity cos(t) = SIMS[i].
    Ranked by similarity: 0.9 right, 0.8 right, 0.7 wrong, 0.6 wrong, 0.5 right (within 25 m).
    Points (recall, precision): (0, 1) added, t 0.9 (1/3, 1), 0.8 (2/3, 1), 0.7 (2/3, 2/3),
    0.6 (2/3, 1/2), 0.5 (1, 3/5). Trapezoids: 1/3 + 1/3 + 0 + 0 + (1/2 + 3/5)/2 * 1/3 = 51/60;
    recall at 100 % precision 2/3 (t 0.8). The curve CSV and figure are written with --pr_curve."""
    sims = [0.9, 0.8, 0.5, 0.7, 0.6]
    eye = np.eye(10, dtype=np.float32)
    east = 500_000.0 + 1000.0 * np.arange(5)
    db = pd.DataFrame({"image_id": [f"d{i}" for i in range(5)], "embedding": list(eye[:5]),
                       "easting": east, "northing": 4_000_000.0})
    queries = pd.DataFrame({"image_id": [f"q{i}" for i in range(5)],
                            "embedding": [(s * eye[i] + np.sqrt(1 - s * s) * eye[9]).astype(np.float32)
                                          for i, s in enumerate(sims)],
                            "easting": east + ERRORS_M, "northing": 4_000_000.0})
    db.to_parquet(tmp_path / "db.parquet", index=False)
    queries.to_parquet(tmp_path / "q.parquet", index=False)
    out = tmp_path / "r.json"
    eval_trained.main(["--baseline", "--db_parquet", str(tmp_path / "db.parquet"), "--test_parquet",
                       str(tmp_path / "q.parquet"), "--pos_threshold_m", "25", "--output_json", str(out),
                       "--device", "cpu", "--pr_curve", "--plot_dir", str(tmp_path / "plots")])
    payload = json.loads(out.read_text())
    assert payload["auc_pr"] == pytest.approx(51 / 60, abs=1e-6)
    assert payload["recall_at_100_precision"] == pytest.approx(2 / 3, abs=1e-6)
    curve = pd.read_csv(tmp_path / "plots" / "raw_embeddings_q_pr.csv")
    assert list(curve.columns) == ["precision", "recall", "threshold"]
    assert curve["recall"].tolist() == pytest.approx([0, 1 / 3, 2 / 3, 2 / 3, 2 / 3, 1], abs=1e-6)
    assert curve["precision"].tolist() == pytest.approx([1, 1, 1, 2 / 3, 1 / 2, 3 / 5], abs=1e-6)
    assert (tmp_path / "plots" / "raw_embeddings_q_pr.png").read_bytes()[:4] == b"\x89PNG"
    assert payload["top1_error_m"] == pytest.approx({"median": 20.0, "p75": 40.0, "p90": 106.0}, abs=1e-3)
    assert payload["recall_at_threshold_m"]["25"] == pytest.approx(0.6)


def test_localization_picture_is_named_after_what_it_shows(example):
    from PIL import Image

    _, _, out = example
    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert pngs == ["raw_timm_test_efficientnet_queries_localization.png"]
    with Image.open(out / "plots" / pngs[0]) as image:
        assert image.width > 800 and image.height > 400


def test_no_picture_without_the_flag(example, tmp_path):
    _, paths, _ = example
    plots = tmp_path / "plots"
    eval_trained.main(["--baseline", "--model", TINY_MODEL, "--db_csv", str(paths["db"]), "--test_csv",
                       str(paths["queries"]), *TINY, "--no_cache", "--plot_dir", str(plots)])
    assert not plots.exists() or not list(plots.iterdir())


def test_labels_only_evaluation_has_null_distances(tmp_path):
    from helpers import write_embeddings_parquet

    db = write_embeddings_parquet(tmp_path / "db.parquet", seed=0)
    q = write_embeddings_parquet(tmp_path / "q.parquet", seed=1)
    out = tmp_path / "r.json"
    eval_trained.main(["--baseline", "--db_parquet", str(db), "--test_parquet", str(q), "--output_json", str(out),
                       "--device", "cpu", "--localization", "--plot_dir", str(tmp_path / "plots")])
    payload = json.loads(out.read_text())
    assert payload["recall_at_threshold_m"] is None and payload["top1_error_m"] is None
    assert payload["correct_by"] == "label"
    assert 0.0 < payload["auc_pr"] <= 1.0  # the top-1 PR needs no distances: by label here
    assert not list((tmp_path / "plots").glob("*.png"))


def test_run_experiment_draws_its_variants_on_one_figure(tmp_path, capsys):
    """run_experiment: one localization PNG beside the experiment CSV (same stem), the median
    top-1 error of each variant printed, the raw one equal to eval_trained --baseline's."""
    import run_experiment
    from helpers.tiny_dataset import write_tiny_dataset

    data = write_tiny_dataset(tmp_path / "data")
    logs, cache = tmp_path / "logs", tmp_path / "cache"
    run_experiment.main(["--train_csv", str(data["train"]), "--val_csv", str(data["val"]), "--test_csv",
                         str(data["test"]),
                         "--models", TINY_MODEL, *TINY, "--epochs", "1", "--batch_size", "8", "--images_per_place", "2",
                         "--projection_dim", "16", "--cache_dir", str(cache), "--log_dir", str(logs),
                         "--checkpoint_dir", str(tmp_path / "models")])
    printed = capsys.readouterr().out
    [csv_path] = logs.glob("experiment_*.csv")
    figure = csv_path.with_name(f"{csv_path.stem}_localization.png")
    assert figure.is_file() and figure.stat().st_size > 10_000
    assert csv_path.with_name(f"{csv_path.stem}_pr.png").is_file()  # every variant's top-1 PR curve
    table = pd.read_csv(csv_path)
    assert table[["auc_pr", "recall_at_100_precision"]].apply(lambda c: c.between(0, 1)).all().all()
    medians = {line.split()[1]: float(line.split("median")[1].split()[0])
               for line in printed.splitlines() if line.startswith(f"  {TINY_MODEL} ") and "median" in line}
    assert set(medians) == {"raw", "pca_whitened", "learned_whitened", "start", "trained", "trained_whitened"}
    out = tmp_path / "raw.json"
    eval_trained.main(["--baseline", "--model", TINY_MODEL, "--db_csv", str(data["train"]), "--test_csv",
                       str(data["test"]), *TINY, "--cache_dir", str(cache), "--output_json", str(out)])
    assert medians["raw"] == pytest.approx(json.loads(out.read_text())["top1_error_m"]["median"], abs=0.05)
