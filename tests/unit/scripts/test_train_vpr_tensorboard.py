"""--tensorboard: scalars beside the CSV run log (vprkit.logs.tensorboard_log), read back with
TensorBoard's own EventAccumulator; the flag in every training script; a one-line error, before
anything is written, when the tensorboard package is missing."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("tensorboard")
from helpers import TINY_MODEL, assert_one_line_error, run_main
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
from helpers import TINY_OPTIONS as TINY
from helpers.tiny_dataset import write_tiny_dataset

import run_experiment
import train_vpr
from trainable_vpr import training
import tune_vpr
from vprkit.cli import VPRError
from vprkit.logs.tensorboard_log import BEST_R1_TAG, TensorBoardLog, hparam_values, require_tensorboard


def events(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar event as TensorBoard reads it: tag -> [(step, value), ...] in written order."""
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def scalars(folder: Path) -> dict[str, dict[int, float]]:
    return {tag: dict(steps) for tag, steps in events(folder).items()}


def test_log_rows_become_scalars_at_their_epoch(tmp_path):
    log = TensorBoardLog(tmp_path / "tb")
    log("data", {"epoch": 0, "skipped_images": 0})  # not a scalar
    log("validation", {"epoch": 0, "val_loss": float("nan"), "val_r1": 0.25, "val_r5": 0.5, "val_r10": 0.75})
    log("batch", {"epoch": 1, "batch": 1, "train_loss": 9.0})  # per batch: the CSV has it, TensorBoard not
    log("epoch", {"epoch": 1, "avg_train_loss": 1.5, "avg_triplet_loss": 0.5, "avg_contrastive_loss": 1.0})
    log("validation", {"epoch": 1, "val_loss": 2.0, "val_r1": 0.5, "val_r5": 0.75, "val_r10": 1.0})
    log.learning_rate(1, 1e-4)
    log.close()
    got = scalars(tmp_path / "tb")
    assert got == {
        "val/recall@1": {0: 0.25, 1: 0.5}, "val/recall@5": {0: 0.5, 1: 0.75}, "val/recall@10": {0: 0.75, 1: 1.0},
        "val/loss": {1: 2.0},  # NaN (no validation loss) left out
        "train/avg_train_loss": {1: 1.5}, "train/avg_triplet_loss": {1: 0.5}, "train/avg_contrastive_loss": {1: 1.0},
        "train/learning_rate": {1: pytest.approx(1e-4)},
    }


def test_hparams_take_scalars_and_strings_only():
    values = hparam_values({"lr": 1e-4, "epochs": 3, "tensorboard": True, "model": "m", "resume": None,
                            "recall_at": [1, 5]})
    assert values == {"lr": 1e-4, "epochs": 3, "tensorboard": True, "model": "m", "resume": "None",
                      "recall_at": "[1, 5]"}


@pytest.fixture
def no_tensorboard(monkeypatch):
    """As if the tensorboard package were not installed (a None entry makes the import fail)."""
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)


def test_missing_package_is_one_line(no_tensorboard):
    with pytest.raises(VPRError, match="--tensorboard needs the tensorboard package: pip install tensorboard"):
        require_tensorboard()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tb")
    paths = write_tiny_dataset(root)
    paths["cache"] = root / "cache"
    return paths


def train_argv(data, tmp_path: Path, *extra: str) -> list[str]:
    """Validated on test.csv (night images, a query without a positive): R@N below 1 and varied."""
    return ["--train_csv", str(data["train"]), "--val_csv", str(data["test"]), "--model", TINY_MODEL, *TINY,
            "--epochs", "2", "--batch_size", "8", "--images_per_place", "2", "--projection_dim", "16",
            "--lr_schedule", "cosine", "--cache_dir", str(data["cache"]), "--log_dir", str(tmp_path / "logs"),
            "--checkpoint_dir", str(tmp_path / "models"), *extra]


def test_missing_package_stops_training_before_anything_is_written(capsys, no_tensorboard, data, tmp_path):
    code, err = run_main(capsys, train_vpr.main, train_argv(data, tmp_path, "--tensorboard"))
    assert_one_line_error(code, err, "--tensorboard", "pip install tensorboard")
    assert not (tmp_path / "logs").exists() and not (tmp_path / "models").exists()


def test_every_training_script_has_the_flag(data, tmp_path):
    assert train_vpr.parse_args(train_argv(data, tmp_path, "--tensorboard")).tensorboard is True
    assert train_vpr.parse_args(train_argv(data, tmp_path)).tensorboard is False
    assert run_experiment.parse_args(train_argv(data, tmp_path, "--test_csv", str(data["test"]),
                                                "--tensorboard")).tensorboard is True
    config, _ = tune_vpr.parse_args(train_argv(data, tmp_path, "--tensorboard"))
    assert config.tensorboard is True


def test_a_run_writes_scalars_that_match_its_csv_log(data, tmp_path):
    result = train_vpr.main(train_argv(data, tmp_path, "--tensorboard"))
    folder = tmp_path / "logs" / "tensorboard" / result.run_id
    got = scalars(folder)
    log = pd.read_csv(result.log_file)
    validation = log[log["event"] == "validation"].set_index("epoch")
    epochs = log[log["event"] == "epoch"].set_index("epoch")
    assert sorted(got["val/recall@1"]) == [0, 1, 2]  # epoch 0: the untrained head
    assert 0 < got["val/recall@1"][0] < got["val/recall@10"][0] < 1  # the columns are told apart
    for epoch, row in validation.iterrows():
        assert got["val/recall@1"][epoch] == pytest.approx(row["val_r1"], abs=1e-5)  # the CSV's 6 digits
        assert got["val/recall@5"][epoch] == pytest.approx(row["val_r5"], abs=1e-5)
        assert got["val/recall@10"][epoch] == pytest.approx(row["val_r10"], abs=1e-5)
    for epoch, row in epochs.iterrows():
        for column in ("avg_train_loss", "avg_triplet_loss", "avg_contrastive_loss"):
            assert got[f"train/{column}"][epoch] == pytest.approx(row[column], rel=1e-5, abs=1e-6)
    # cosine schedule: epoch 1 starts at --lr, epoch 2 half way down (one batch-count per epoch)
    lr = got["train/learning_rate"]
    assert sorted(lr) == [1, 2] and lr[1] == pytest.approx(1e-4) and 0 < lr[2] < lr[1]
    assert lr[2] == pytest.approx(1e-4 * (1 + math.cos(math.pi / 2)) / 2, rel=1e-4)
    # hparams: the run's flags, and its best val R@1 (the summary's)
    assert got[BEST_R1_TAG] == {0: pytest.approx(result.best_recall[1], abs=1e-6)}
    summary = pd.read_csv(tmp_path / "logs" / "training_summary.csv")
    assert got[BEST_R1_TAG][0] == pytest.approx(summary["best_val_r1"].iloc[-1], abs=1e-5)
    acc = EventAccumulator(str(folder))
    acc.Reload()
    start = HParamsPluginData.FromString(acc.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    flags = start.session_start_info.hparams
    assert flags["lr_schedule"].string_value == "cosine" and flags["epochs"].number_value == 2
    assert flags["tensorboard"].number_value == 1 and flags["model"].string_value == TINY_MODEL  # bools as 0/1
    assert "tensorboard" in summary.columns and bool(summary["tensorboard"].iloc[-1])


def test_a_resumed_run_replaces_the_interrupted_epochs(tmp_path):
    """Interrupted in epoch 3 with its last checkpoint at epoch 2: the resumed run's events from
    epoch 3 on replace the interrupted ones (purge_step), so its TensorBoard equals the
    uninterrupted run's, as its CSV log does."""
    import dataclasses

    from helpers import write_embeddings_parquet

    import trainable_vpr as vpr

    train = write_embeddings_parquet(tmp_path / "train.parquet", n_places=6, per_place=5, seed=1)
    val = write_embeddings_parquet(tmp_path / "val.parquet", n_places=6, per_place=2, seed=2)

    def config(out: str) -> vpr.TrainConfig:
        return vpr.TrainConfig(train_csv=str(train), val_csv=str(val), model="emb", epochs=4, batch_size=8,
                               head="mlp", hidden_dim=32, projection_dim=8, lr=1e-2, lr_schedule="cosine", seed=5,
                               device="cpu", save_every_n_epochs=2, tensorboard=True,
                               log_dir=str(tmp_path / out / "logs"), checkpoint_dir=str(tmp_path / out / "models"))

    class Stop(Exception):
        pass

    def stop_at_3(epoch, result):
        if epoch == 3:
            raise Stop

    whole = training.train(config("whole"))
    with pytest.raises(Stop):
        training.train(config("parts"), on_validation=stop_at_3)
    [last] = (tmp_path / "parts" / "models").glob("*_last.pth")
    resumed_config = train_vpr.parse_args(["--resume", str(last)])
    assert resumed_config == dataclasses.replace(config("parts"), resume=str(last))
    resumed = training.train(resumed_config)
    a = events(tmp_path / "whole" / "logs" / "tensorboard" / whole.run_id)
    b = events(tmp_path / "parts" / "logs" / "tensorboard" / resumed.run_id)
    assert sorted(a) == sorted(b) and [step for step, _ in a["val/recall@1"]] == [0, 1, 2, 3, 4]
    for tag in a:  # epoch 3 once, not the interrupted run's and the resumed run's
        assert [s for s, _ in b[tag]] == [s for s, _ in a[tag]], tag
        assert [v for _, v in b[tag]] == pytest.approx([v for _, v in a[tag]], rel=1e-6, abs=1e-7), tag
