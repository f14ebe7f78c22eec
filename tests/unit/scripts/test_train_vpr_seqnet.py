"""train_vpr.py --head seqnet on a tiny synthetic route (two drives of the tiny model's images):
the run log (epoch 0 = the start's val R@1, recomputed here by hand), the sequence checkpoint
(loaded by SequenceDescriptor.from_checkpoint, its val windows score the summary's best R@1), the
summary row, and the one-line errors."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

import train_vpr
import tune_vpr
from helpers import SHARED, TINY, assert_one_line_error, requires_shared, run_main
from helpers.routes import write_route_images, write_route_parquet
from trainable_vpr.checkpoints import load_checkpoint
from trainable_vpr.fusion import FUSION_WEIGHTS
from trainable_vpr.model import PlaceDescriptor, describe_table
from trainable_vpr.sequence_model import SequenceDescriptor
from vprkit.cli.extraction_settings import ExtractionSettings
from vprkit.tables.places import load_poses

SEQ_LEN, EPOCHS = 3, 2


@pytest.fixture(scope="module")
def route(tmp_path_factory):
    root = tmp_path_factory.mktemp("route")
    return {"root": root, "train": write_route_images(root, "train", 0, 16),
            "val": write_route_images(root, "val", 16, 8, ("winter",)),
            "val_db": write_route_images(root, "val_db", 16, 8, ("summer",))}


def _argv(route, tmp_path, *extra) -> list[str]:
    return ["--train_csv", str(route["train"]), "--val_csv", str(route["val"]), "--val_db_csv", str(route["val_db"]),
            *TINY, "--head", "seqnet", "--seq_len", str(SEQ_LEN), "--epochs", str(EPOCHS), "--batch_size", "8",
            "--cache_dir", str(route["root"] / "cache"), "--log_dir", str(tmp_path / "logs"),
            "--checkpoint_dir", str(tmp_path / "models"), *extra]


def _windows(n: int) -> np.ndarray:
    """Causal windows of one drive of n frames, padded with its first frame (by hand)."""
    return np.array([[max(0, i - k) for k in range(SEQ_LEN - 1, -1, -1)] for i in range(n)])


def _r1(q: np.ndarray, db: np.ndarray, q_x: np.ndarray, db_x: np.ndarray) -> float:
    top = np.argmax(q @ db.T, axis=1)
    return float(np.mean(np.abs(db_x[top] - q_x) <= 25.0))


def test_seqnet_run_logs_its_start_trains_and_hands_over_a_sequence_checkpoint(route, tmp_path, capsys):
    result = train_vpr.main(_argv(route, tmp_path, "--head_start", "raw"))
    out = capsys.readouterr().out
    assert "epoch 0 (untrained sequence head)" in out and "fusion weight chosen on val" in out

    # epoch 0 by hand: the raw start's window descriptor is the window's L2-normalised frames, concatenated
    settings = ExtractionSettings(cache_dir=str(route["root"] / "cache"), num_workers=0, device="cpu")
    frozen = PlaceDescriptor.baseline(TINY[1], "random", 32)
    tables = {s: load_poses(route[s]) for s in ("val", "val_db")}
    frames = {s: describe_table(frozen, t, settings)[1] for s, t in tables.items()}
    desc = {s: f[_windows(len(f))].reshape(len(f), -1) / math.sqrt(SEQ_LEN) for s, f in frames.items()}
    start_r1 = _r1(desc["val"], desc["val_db"], tables["val"].xyz[:, 0], tables["val_db"].xyz[:, 0])

    log = pd.read_csv(result.log_file)
    validation = log[log.event == "validation"]
    assert validation.epoch.tolist() == list(range(EPOCHS + 1))
    assert validation.val_r1.iloc[0] == pytest.approx(start_r1, abs=1e-6)
    assert (log.event == "epoch").sum() == EPOCHS and log[log.event == "epoch"].avg_train_loss.notna().all()
    assert log[log.event == "data"].head_start.iloc[0].startswith("raw; raw=")
    assert result.untrained_r1 == pytest.approx(start_r1, abs=1e-6)
    assert result.best_recall[1] == pytest.approx(validation.val_r1.max(), abs=1e-6)
    assert result.best_recall[1] >= start_r1

    checkpoint = load_checkpoint(result.checkpoint, kind="sequence")
    assert checkpoint["sequence"]["seq_len"] == SEQ_LEN and checkpoint["run_id"] == result.run_id
    assert checkpoint["sequence"]["fusion_weight"] in FUSION_WEIGHTS
    assert checkpoint["chosen"]["head_start"]["chosen"] == "raw"
    assert checkpoint["epoch"] == result.best_epoch
    model = SequenceDescriptor.from_checkpoint(result.checkpoint)
    windows = {s: model.describe_windows(t, settings=settings) for s, t in tables.items()}
    assert _r1(windows["val"], windows["val_db"], tables["val"].xyz[:, 0], tables["val_db"].xyz[:, 0]) == \
        pytest.approx(result.best_recall[1], abs=1e-6)

    summary = pd.read_csv(tmp_path / "logs" / "training_summary.csv")
    assert len(summary) == 1 and summary.run_id.iloc[0] == result.run_id
    assert summary["head"].iloc[0] == "seqnet" and summary["seq_len"].iloc[0] == SEQ_LEN
    assert summary.untrained_val_r1.iloc[0] == pytest.approx(start_r1, abs=1e-6)
    assert summary.checkpoint.iloc[0] == str(result.checkpoint)
    assert summary.lr.iloc[0] == pytest.approx(1e-3)  # the sequence head's default


@pytest.mark.parametrize("extra, words", [
    (["--seq_len", "1"], ("--head seqnet", "--seq_len L, 2 or more")),
    (["--train_blocks", "1"], ("--head seqnet", "not with --train_blocks")),
    (["--seq_steps", "0"], ("--seq_steps 0",)),
])
def test_bad_seqnet_flags_are_one_line(route, tmp_path, capsys, extra, words):
    code, err = run_main(capsys, train_vpr.main, _argv(route, tmp_path, *extra))
    assert_one_line_error(code, err, *words)
    assert not (tmp_path / "logs").exists()


def test_a_table_that_is_not_a_route_is_one_line(route, tmp_path, capsys):
    plain = route["root"] / "plain_val.csv"
    pd.read_csv(route["val"]).drop(columns=["frame_index"]).to_csv(plain, index=False)
    argv = _argv(route, tmp_path)
    argv[argv.index(str(route["val"]))] = str(plain)
    code, err = run_main(capsys, train_vpr.main, argv)
    assert_one_line_error(code, err, "plain_val.csv", "not a route")
    assert not (tmp_path / "logs").exists()


def test_tune_vpr_tunes_the_sequence_head(tmp_path):
    pytest.importorskip("optuna")
    data = {s: write_route_parquet(tmp_path / f"{s}.parquet", *args)
            for s, args in {"train": (0, 16), "val": (16, 8, ("winter",)), "val_db": (16, 8, ("summer",))}.items()}
    config = tmp_path / "tune.toml"
    config.write_text("[tune.space]\nlr = { low = 1e-4, high = 1e-2, log = true }\n")
    summary = tune_vpr.main(["--config", str(config), "--train_parquet", str(data["train"]), "--val_parquet",
                             str(data["val"]), "--val_db_parquet", str(data["val_db"]), "--model", "emb", "--head",
                             "seqnet", "--seq_len", "3", "--epochs", "2", "--batch_size", "8", "--log_dir",
                             str(tmp_path / "logs"), "--study_name", "seq", "--n_trials", "2"])
    trials = pd.concat([pd.read_csv(p) for p in (tmp_path / "logs").glob("seq_trial*/training_summary.csv")])
    assert len(trials) == 2 and set(trials["head"]) == {"seqnet"}
    # each trial's value is its run's best val R@1 over the trained epochs
    logs = [pd.read_csv(p) for p in trials.log_file]
    best = max(log[(log.event == "validation") & (log.epoch > 0)].val_r1.max() for log in logs)
    assert summary["best_value"] == pytest.approx(best)


@requires_shared
def test_seqnet_on_nordland_beats_its_start(tmp_path):
    data = SHARED / "nordland_route"
    result = train_vpr.main(["--train_csv", str(data / "train.csv"), "--val_csv", str(data / "val.csv"),
                             "--val_db_csv", str(data / "val_db.csv"), "--model", "effnet_lite0", "--head", "seqnet",
                             "--seq_len", "10", "--epochs", "3", "--log_dir", str(tmp_path / "logs"),
                             "--checkpoint_dir", str(tmp_path / "models")])
    assert result.best_recall[1] >= result.untrained_r1
    assert result.best_recall[1] > 0.1  # windows of 10 frames across seasons: far above one frame's ~0.03
