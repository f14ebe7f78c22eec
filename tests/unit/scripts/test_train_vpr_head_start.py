"""The residual head starts exactly at a frozen descriptor chosen on validation (issue 18 §2, §3d),
and validation can search another database (--val_db_csv, issue 18 §1). Synthetic embeddings
parquets: no backbone, seconds per run."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import train_vpr
from trainable_vpr.training import TrainResult
import trainable_vpr as vpr
from vprkit.retrieval.evaluation import evaluate_retrieval, fit_pca_whitening, l2_normalise
from vprkit.tables.pairs import positive_pairs
from vprkit.retrieval.whitening import choose_shrinkage
from helpers import assert_one_line_error, place_positions, run_main

DIM = 24
N_PLACES = 12


def write_split(path: Path, per_place: int, seed: int, shift: float = 0.0, places: range | None = None) -> Path:
    """Places along a line (300 m apart), each a random centre plus strong noise along a few
    shared nuisance directions (what whitening removes) and isotropic noise; `shift` moves every
    row along one "night" direction."""
    centres = np.random.default_rng(123).normal(size=(N_PLACES, DIM))
    nuisance = np.random.default_rng(7).normal(size=(3, DIM))
    rng = np.random.default_rng(seed)
    places = np.arange(N_PLACES) if places is None else np.asarray(places)
    place = np.repeat(places, per_place)
    rows = (centres[place] + 2.5 * rng.normal(size=(len(place), 3)) @ nuisance
            + 0.5 * rng.normal(size=(len(place), DIM)) + shift * nuisance[0])
    xy = place_positions(N_PLACES, per_place, seed=seed).reshape(N_PLACES, per_place, 2)[places].reshape(-1, 2)
    frame = pd.DataFrame({"image_id": [f"img_{seed}_{i:04d}" for i in range(len(place))],
                          "embedding": list(rows.astype(np.float32)), "easting": xy[:, 0], "northing": xy[:, 1]})
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=False)
    return path


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    root = tmp_path_factory.mktemp("starts")
    return {"train": write_split(root / "train.parquet", 5, seed=1),
            "val": write_split(root / "val.parquet", 2, seed=2, shift=1.5),
            "val_db": write_split(root / "val_db.parquet", 2, seed=3),
            "root": root}


def train(splits, out: Path, *extra: str) -> TrainResult:
    return train_vpr.main(["--train_parquet", str(splits["train"]), "--val_parquet", str(splits["val"]),
                           "--model", "synthetic", "--epochs", "1", "--batch_size", "8", "--projection_dim", "8",
                           "--hidden_dim", "16", "--device", "cpu", "--num_workers", "0",
                           "--log_dir", str(out / "logs"),
                           "--checkpoint_dir", str(out / "models"), *extra])


def table(path: Path):
    from vprkit.tables.load import load_table

    return load_table(str(path))


def frozen_val_r1(splits, start: str, dim: int = 8, database: str = "train") -> float:
    """The frozen descriptor's val R@1, computed without the head (numpy)."""
    train, val, db = table(splits["train"]), table(splits["val"]), table(splits[database])
    if start == "raw":
        project = l2_normalise
    elif start == "pca_whitened":
        project = fit_pca_whitening(train.embeddings, dim)
    else:
        pairs = positive_pairs(train.xyz, None, 25.0, seed=42)
        project = choose_shrinkage(train.embeddings, pairs, db.xyz, val.embeddings, val.xyz, 25.0, dim,
                                   database=db.embeddings).whitening.apply
    return evaluate_retrieval(project(db.embeddings), db.xyz, project(val.embeddings), val.xyz, 25.0).recalls[1]


def epoch0_r1(result: TrainResult) -> float:
    log = pd.read_csv(result.log_file)
    return float(log.loc[(log.event == "validation") & (log.epoch == 0), "val_r1"].iloc[0])


@pytest.mark.parametrize("start", ["raw", "pca_whitened", "learned_whitened"])
@pytest.mark.parametrize("database", ["train", "val_db"])
def test_untrained_head_reproduces_its_start_exactly(splits, tmp_path, start, database):
    extra = ["--val_db_parquet", str(splits["val_db"])] if database == "val_db" else []
    result = train(splits, tmp_path, "--head_start", start, "--lr", "1e-12", *extra)
    expected = frozen_val_r1(splits, start, database=database)
    assert epoch0_r1(result) == pytest.approx(expected, abs=1e-6)  # the log keeps 6 digits
    assert result.untrained_r1 == expected
    assert result.head_start["chosen"] == start
    assert result.head_start["val_r1"][start] == expected
    # the kept checkpoint is that start (lr 1e-12: nothing improves) and says so
    checkpoint = vpr.load_checkpoint(result.checkpoint)
    assert result.best_epoch == 0 and checkpoint["head_start"]["chosen"] == start
    assert checkpoint["config"]["val_db_csv"] == (str(splits["val_db"]) if extra else None)
    head = vpr.head_from_checkpoint(checkpoint)
    train_features = table(splits["train"]).embeddings
    out = vpr.embed(head, train_features)
    if start == "raw":  # the identity: the raw descriptor at its own dimension, not cut to --projection_dim
        assert out.shape[1] == DIM
        np.testing.assert_allclose(out, l2_normalise(train_features), atol=1e-6)
    else:
        assert out.shape[1] == 8


def test_auto_keeps_the_best_candidate_and_records_every_one(splits, tmp_path):
    result = train(splits, tmp_path, "--lr", "1e-12")
    scores = {s: frozen_val_r1(splits, s) for s in vpr.START_NAMES}
    assert result.head_start["val_r1"] == pytest.approx(scores, abs=0)
    best = max(scores.values())
    assert scores[result.head_start["chosen"]] == best
    assert result.untrained_r1 == best
    log = pd.read_csv(result.log_file)
    data = log.loc[log.event == "data"].iloc[0]
    assert data["head_start"].startswith(result.head_start["chosen"] + ";")
    assert data["val_database"] == str(splits["train"])
    summary = pd.read_csv(tmp_path / "logs" / "training_summary.csv")
    assert summary["head_start"].iloc[0] == data["head_start"]
    assert np.isnan(summary["val_db_csv"].iloc[0])


def test_candidates_differ_on_this_data(splits):
    # otherwise the tests above could not tell one start from another
    scores = [frozen_val_r1(splits, s) for s in vpr.START_NAMES]
    assert len(set(scores)) == 3, scores


def test_val_db_changes_what_validation_searches(splits, tmp_path):
    on_train = train(splits, tmp_path / "a", "--head_start", "raw", "--lr", "1e-12")
    on_db = train(splits, tmp_path / "b", "--head_start", "raw", "--lr", "1e-12",
                  "--val_db_parquet", str(splits["val_db"]))
    assert on_train.untrained_r1 == frozen_val_r1(splits, "raw", database="train")
    assert on_db.untrained_r1 == frozen_val_r1(splits, "raw", database="val_db")
    log = pd.read_csv(on_db.log_file)
    assert log.loc[log.event == "data", "val_database"].iloc[0] == str(splits["val_db"])


def test_val_db_without_positives_for_the_val_queries_is_one_line(splits, tmp_path, capsys):
    far = write_split(tmp_path / "far.parquet", 2, seed=4)
    frame = pd.read_parquet(far)
    frame["easting"] += 100_000.0
    frame.to_parquet(far, index=False)
    code, err = run_main(capsys, train_vpr.main, [
        "--train_parquet", str(splits["train"]), "--val_parquet", str(splits["val"]), "--val_db_parquet", str(far),
        "--log_dir", str(tmp_path / "logs"), "--checkpoint_dir", str(tmp_path / "models")])
    assert_one_line_error(code, err, "far.parquet", "val.parquet")
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_val_db_of_another_kind_is_one_line(splits, tmp_path, capsys):
    code, err = run_main(capsys, train_vpr.main, [
        "--train_parquet", str(splits["train"]), "--val_parquet", str(splits["val"]), "--val_db_csv", "db.csv",
        "--log_dir", str(tmp_path / "logs"), "--checkpoint_dir", str(tmp_path / "models")])
    assert_one_line_error(code, err, "--val_db_csv", "parquet")


def test_resume_keeps_the_start(splits, tmp_path):
    first = train(splits, tmp_path, "--head_start", "raw", "--lr", "1e-3")
    last = first.checkpoint.with_name(first.checkpoint.stem + "_last.pth")
    resumed = train_vpr.main(["--resume", str(last), "--epochs", "2"])
    checkpoint = vpr.load_checkpoint(resumed.final_checkpoint)
    assert checkpoint["head_config"]["identity_base"] is True
    assert checkpoint["head_start"]["chosen"] == "raw"
    assert resumed.epochs_run == 2


@pytest.mark.parametrize("scores, chosen", [
    ({"raw": 0.6, "pca_whitened": 0.5, "learned_whitened": 0.5}, "raw"),
    ({"raw": 0.5, "pca_whitened": 0.5, "learned_whitened": 0.5}, "pca_whitened"),  # ties: PCA-whitening
    ({"raw": 0.4, "pca_whitened": 0.5, "learned_whitened": 0.55}, "learned_whitened"),
    ({"raw": 0.6, "pca_whitened": 0.5, "learned_whitened": 0.6}, "learned_whitened"),  # ties: learned before raw
])
def test_choice_is_the_best_score_ties_to_the_preference(splits, scores, chosen):
    train, val = table(splits["train"]), table(splits["val"])
    fit = vpr.FitData(train.embeddings, train.xyz, None, train.embeddings, train.xyz, None, val.embeddings, val.xyz,
                      None, 25.0)
    config = vpr.HeadConfig("residual", DIM, projection_dim=8, hidden_dim=16)
    def score(head):  # which start a head is: by its base
        if isinstance(head.base, torch.nn.Identity):
            return scores["raw"]
        pca = vpr.start_head("pca_whitened", config, fit).head
        return scores["pca_whitened" if torch.equal(head.base.weight, pca.base.weight) else "learned_whitened"]
    choice = vpr.choose_start("auto", config, fit, score)
    assert choice.chosen.name == chosen
    assert {n: c.val_r1 for n, c in choice.candidates.items()} == scores


@pytest.mark.slow
@pytest.mark.parametrize("start, frozen", [("raw", "raw"), ("pca_whitened", "pca_whitened"),
                                           ("learned_whitened", "learned_whitened")])
def test_experiment_trained_row_equals_the_start_when_nothing_improves(splits, tmp_path, start, frozen):
    import run_experiment

    test = write_split(tmp_path / "test.parquet", 2, seed=5, shift=1.0)
    table_ = run_experiment.main([
        "--train_parquet", str(splits["train"]), "--val_parquet", str(splits["val"]), "--test_parquet", str(test),
        "--models", "synthetic", "--epochs", "1", "--lr", "1e-12", "--batch_size", "8", "--projection_dim", "8",
        "--hidden_dim", "16", "--head_start", start, "--log_dir", str(tmp_path / "logs"),
        "--checkpoint_dir", str(tmp_path / "models")])
    rows = table_.set_index("variant")
    assert set(rows.index) >= {"raw", "pca_whitened", "learned_whitened", "start", "trained"}
    recalls = [c for c in rows.columns if c.startswith("recall@")]
    # database = the training images: the frozen row fitted there, the start and the kept head agree to the digit
    assert rows.loc["trained", recalls].tolist() == rows.loc["start", recalls].tolist()
    assert rows.loc["start", recalls].tolist() == rows.loc[frozen, recalls].tolist()


@pytest.mark.slow
def test_experiment_with_another_database_keeps_trained_equal_to_start(splits, tmp_path):
    import run_experiment

    test = write_split(tmp_path / "test.parquet", 2, seed=5, shift=1.0)
    table_ = run_experiment.main([
        "--train_parquet", str(splits["train"]), "--val_parquet", str(splits["val"]), "--test_parquet", str(test),
        "--db_parquet", str(splits["val_db"]), "--val_db_parquet", str(splits["val_db"]),
        "--models", "synthetic", "--epochs", "1", "--lr", "1e-12", "--batch_size", "8", "--projection_dim", "8",
        "--hidden_dim", "16", "--log_dir", str(tmp_path / "logs"), "--checkpoint_dir", str(tmp_path / "models")])
    rows = table_.set_index("variant")
    recalls = [c for c in rows.columns if c.startswith("recall@")]
    assert rows.loc["trained", recalls].tolist() == rows.loc["start", recalls].tolist()
    record = __import__("json").loads(next((tmp_path / "logs").glob("experiment_*.json")).read_text())
    assert record["val_db_csv"] == str(splits["val_db"])
    assert record["models"]["synthetic"]["head_start"]["chosen"] in vpr.START_NAMES
