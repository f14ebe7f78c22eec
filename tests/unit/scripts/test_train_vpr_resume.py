"""Settings layers (flags > VPR_* environment > --config TOML > defaults) with one-line errors,
and long runs: --resume gives exactly the uninterrupted run, periodic validation and saving."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pandas as pd
import pytest
import torch

from helpers import REPO, write_embeddings_parquet
import train_vpr
from vprkit.cli.configs import FRAME_TRAINING_DEFAULTS
from trainable_vpr import training
import trainable_vpr.checkpoints
import trainable_vpr as vpr
from trainable_vpr.checkpoints import checkpoint_path, save_checkpoint
from vprkit.cli import VPRError


# --------------------------------------------------------------------------------------------
# configuration layers
# --------------------------------------------------------------------------------------------
def _toml(tmp_path, text: str):
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_precedence_flags_over_environment_over_file_over_defaults(tmp_path, monkeypatch):
    config_file = _toml(tmp_path, """
[paths]
train_csv = "file_train.parquet"
val_csv = "file_val.parquet"
[model]
head = "mlp"
output_dim = 64          # an alias of projection_dim
use_layer_norm = false
[training]
epochs = 5
lr = 0.01
triplet_margin = 0.2
[logging]
log_dir = "file_logs"
[tune.space]
lr = { low = 1e-4, high = 1e-2 }   # read by tune_vpr.py only
""")
    monkeypatch.setenv("VPR_EPOCHS", "3")
    monkeypatch.setenv("VPR_LR", "0.02")
    monkeypatch.setenv("VPR_USE_RESIDUAL", "false")
    config = train_vpr.parse_args(["--config", str(config_file), "--lr", "0.5", "--val_parquet", "flag_val.parquet"])
    assert config.lr == 0.5                     # flag > environment > file
    assert config.epochs == 3                   # environment > file
    assert config.use_residual is False         # environment > default
    assert config.head == "mlp" and config.projection_dim == 64 and config.use_layer_norm is False  # file > default
    assert config.triplet_margin == 0.2 and config.log_dir == "file_logs"
    assert config.train_csv == "file_train.parquet" and config.val_csv == "flag_val.parquet"
    assert config.batch_size == FRAME_TRAINING_DEFAULTS["batch_size"] == 32  # default (of a single-frame head)
    monkeypatch.delenv("VPR_EPOCHS")
    assert train_vpr.parse_args(["--config", str(config_file)]).epochs == 5


@pytest.mark.parametrize("text, message", [
    ("[training]\nepocs = 3\n", r"\[training\] epocs: unknown setting \(did you mean epochs\?\)"),
    ("[training]\nepochs = \"three\"\n", r"\[training\] epochs = 'three': expected an integer"),
    ("[training]\nepochs = 2.5\n", r"epochs = 2.5: expected an integer"),
    ("[model]\nhead = \"transformer\"\n", r"\[model\] head = 'transformer': choose one of projection, residual, mlp"),
    ("[model]\nuse_residual = \"yes please\"\n", r"use_residual = 'yes please': expected true or false"),
    ("[optimiser]\nlr = 1.0\n", r"unknown section \[optimiser\]"),
    ("[training\nlr = 1\n", r"not valid TOML"),
    ("[training]\nepochs = 0\n", r"--epochs 0: must be at least 1"),
])
def test_bad_config_file_is_one_line_naming_it(tmp_path, text, message):
    path = _toml(tmp_path, text)
    with pytest.raises(VPRError, match=message) as info:
        train_vpr.parse_args(["--config", str(path), "--train_csv", "t.csv", "--val_csv", "v.csv"])
    assert "\n" not in str(info.value)


def test_bad_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("VPR_LR", "fast")
    with pytest.raises(VPRError, match="VPR_LR = 'fast': expected a number"):
        train_vpr.parse_args(["--train_csv", "t.csv", "--val_csv", "v.csv"])


@pytest.mark.slow
def test_cli_bad_config_key_exits_2_with_one_line(tmp_path):
    path = _toml(tmp_path, "[training]\nbatchsize = 8\n")
    done = subprocess.run([sys.executable, str(REPO / "train_vpr.py"), "--config", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "batchsize" in lines[0] and "did you mean batch_size" in lines[0], done.stderr
    assert "Traceback" not in done.stderr


# --------------------------------------------------------------------------------------------
# resume
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def parquets(tmp_path_factory):
    root = tmp_path_factory.mktemp("emb")
    return (write_embeddings_parquet(root / "train.parquet", n_places=6, per_place=5, seed=1),
            write_embeddings_parquet(root / "val.parquet", n_places=6, per_place=2, seed=2))


def _config(parquets, out, **changes) -> vpr.TrainConfig:
    train, val = parquets
    return dataclasses.replace(vpr.TrainConfig(
        train_csv=str(train), val_csv=str(val), model="emb", epochs=4, batch_size=8, dropout=0.2, head="mlp",
        hidden_dim=32, projection_dim=8, lr=1e-3, lr_schedule="cosine", seed=5, device="cpu",
        log_dir=str(out / "logs"), checkpoint_dir=str(out / "models")), **changes)


class Stop(Exception):
    """Stands for the run being killed."""


def _stop_after(epoch_to_stop: int):
    def callback(epoch, result):
        if epoch == epoch_to_stop:
            raise Stop
    return callback


COMPARED = ["event", "epoch", "batch", "train_loss", "triplet_loss", "contrastive_loss", "avg_train_loss",
            "avg_triplet_loss", "avg_contrastive_loss", "val_loss", "val_r1", "val_r5", "val_r10"]


@pytest.mark.parametrize("sampler", ["hard", "ucb"])
def test_resumed_run_equals_the_uninterrupted_run(parquets, tmp_path, sampler):
    extra = {"neg_sampler": sampler, "ucb_warmup_samples": 30}
    whole = training.train(_config(parquets, tmp_path / "whole", **extra))

    interrupted = _config(parquets, tmp_path / "parts", **extra)
    with pytest.raises(Stop):
        training.train(interrupted, on_validation=_stop_after(2))
    [last] = (tmp_path / "parts" / "models").glob("emb_seed5_*_last.pth")  # named by the run id
    saved = vpr.load_checkpoint(last)  # weights_only=True
    assert saved["epochs_completed"] == 2
    assert last == checkpoint_path(interrupted.checkpoint_dir, saved["run_id"], "last")
    assert saved["resume"]["random_states"]["numpy"]["state"]["state"] > 2**64  # a 128-bit Python int survived
    from_checkpoint_alone = train_vpr.parse_args(["--resume", str(last)])  # every setting from the checkpoint
    assert from_checkpoint_alone == dataclasses.replace(interrupted, resume=str(last))
    resumed = training.train(from_checkpoint_alone)
    assert resumed.run_id == saved["run_id"] and resumed.checkpoint.parent == last.parent

    assert str(resumed.log_file) == saved["log_file"]  # the interrupted run's log, continued
    logs = [pd.read_csv(r.log_file) for r in (whole, resumed)]
    columns = COMPARED + (["ucb_stats"] if sampler == "ucb" else [])
    pd.testing.assert_frame_equal(logs[0][columns], logs[1][columns], check_exact=True)
    for kind in ("final", ""):
        a = torch.load(checkpoint_path(whole.checkpoint.parent, whole.run_id, kind), weights_only=True)
        b = torch.load(checkpoint_path(resumed.checkpoint.parent, resumed.run_id, kind), weights_only=True)
        assert a["model_state_dict"].keys() == b["model_state_dict"].keys()
        for name, tensor in a["model_state_dict"].items():
            assert torch.equal(tensor, b["model_state_dict"][name]), (kind, name)
        for key in ("best_val_recall", "best_val_epoch", "best_val_loss", "early_stopped", "epoch"):
            assert a[key] == b[key], (kind, key)
    assert (whole.best_recall, whole.best_epoch, whole.epochs_run) == (resumed.best_recall, resumed.best_epoch, 4)


def test_extending_a_finished_run_keeps_one_summary_row_with_the_total_wall_time(parquets, tmp_path):
    first = training.train(_config(parquets, tmp_path, epochs=1))
    extended = training.train(train_vpr.parse_args(["--resume", str(first.final_checkpoint), "--epochs", "2"]))
    assert extended.run_id == first.run_id and extended.epochs_run == 2
    table = pd.read_csv(tmp_path / "logs" / "training_summary.csv")
    assert table.run_id.tolist() == [first.run_id] and table.epochs_run.tolist() == [2]
    assert table.wall_time_s[0] == pytest.approx(first.wall_time_s + extended.wall_time_s, abs=0.02)


def test_resume_refuses_other_settings_and_plain_checkpoints(parquets, tmp_path, monkeypatch):
    config = _config(parquets, tmp_path, epochs=1)
    result = training.train(config)
    final = str(result.final_checkpoint)
    # beside --resume: what resume allows changes the run's settings, anything else is one line
    extended = train_vpr.parse_args(["--resume", final, "--epochs", "3", "--num_workers", "2", "--lr", "0.001"])
    assert (extended.epochs, extended.num_workers, extended.lr, extended.head) == (3, 2, 1e-3, "mlp")
    with pytest.raises(VPRError, match=r"--lr 0.5 would change the run \(it used 0.001\); resume may change only"):
        train_vpr.parse_args(["--resume", final, "--lr", "0.5"])
    with pytest.raises(VPRError, match=r"--head residual would change the run \(it used mlp\)"):
        train_vpr.parse_args(["--resume", final, "--head", "residual"])  # the default, given explicitly
    monkeypatch.setenv("VPR_SEED", "6")
    with pytest.raises(VPRError, match=r"--seed 6 would change the run \(it used 5\)"):
        train_vpr.parse_args(["--resume", final])
    monkeypatch.delenv("VPR_SEED")
    with pytest.raises(VPRError, match=r"required: --train_csv, --val_csv \(or --resume CKPT\)"):
        train_vpr.parse_args(["--epochs", "2"])
    with pytest.raises(VPRError, match="the run used --lr 0.001, not 0.5"):
        training.train(dataclasses.replace(config, lr=0.5, resume=str(result.final_checkpoint)))
    with pytest.raises(VPRError, match="not a resumable checkpoint"):
        training.train(dataclasses.replace(config, resume=str(result.checkpoint)))


def test_validate_and_save_every_n_epochs_and_early_stop_fields(parquets, tmp_path, monkeypatch):
    config = _config(parquets, tmp_path, epochs=5, validate_every_n_epochs=2, save_every_n_epochs=3)
    saved_epochs = []
    original = save_checkpoint

    def spy(path, payload):
        saved_epochs.append((path.name, payload["epochs_completed"]))
        original(path, payload)

    validated = []
    monkeypatch.setattr(trainable_vpr.checkpoints, "save_checkpoint", spy)
    result = training.train(config, on_validation=lambda epoch, r: validated.append(epoch))
    log = pd.read_csv(result.log_file)
    assert log[log.event == "validation"].epoch.tolist() == [0, 2, 4, 5]  # and after the last epoch
    assert validated == [2, 4, 5]
    assert [e for name, e in saved_epochs if name.endswith("_last.pth")] == [0, 3]  # at the start, then every 3
    final = vpr.load_checkpoint(result.final_checkpoint)
    assert final["epochs_completed"] == 5 and final["early_stopped"] is False
    val = log[log.event == "validation"]
    assert final["best_val_loss"] == pytest.approx(val.val_loss.min(), rel=1e-5)
    assert final["best_val_epoch"] == result.best_epoch


def test_early_stopping_is_recorded(parquets, tmp_path):
    config = _config(parquets, tmp_path, epochs=6, lr=1e-12, early_stopping_patience=1)  # nothing improves
    result = training.train(config)
    final = vpr.load_checkpoint(result.final_checkpoint)
    assert result.early_stopped and final["early_stopped"] is True and result.epochs_run < 6


def test_example_config_file_is_valid():
    config = train_vpr.parse_args(["--config", str(REPO / "config.toml")])
    assert config.model == "effnet_lite0" and config.neg_sampler == "hard" and config.projection_dim == 256


def test_eval_trained_reads_the_same_layers(tmp_path, monkeypatch):
    import eval_trained

    monkeypatch.setenv("VPR_POS_THRESHOLD_M", "40")
    path = _toml(tmp_path, "[paths]\ntrain_csv = \"db.csv\"\ntest_csv = \"q.csv\"\n"
                           "[training]\nepochs = 3  # a training key: skipped\n")
    args = eval_trained.parse_args(["--config", str(path), "--baseline", "--model", "effnet_lite0",
                                    "--recall_at", "1", "3"])
    assert (args.db_csv, args.test_csv, args.pos_threshold_m, args.recall_at) == ("db.csv", "q.csv", 40.0, [1, 3])
