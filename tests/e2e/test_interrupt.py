"""Interruptions (issue "reliability"): Ctrl-C / SIGTERM save a resumable checkpoint and close
the log; after SIGTERM or kill -9 mid-epoch, --resume completes the run with exactly the numbers
of an uninterrupted run. Real processes, real signals, on small embeddings parquets."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from helpers import REPO, write_embeddings_parquet
import trainable_vpr as vpr
from vprkit.logs.runlog import TRAINING_SUMMARY_NAME

EPOCHS = 6
COMPARED = ["event", "epoch", "batch", "train_loss", "triplet_loss", "contrastive_loss", "avg_train_loss",
            "val_loss", "val_r1", "val_r5", "val_r10"]


@pytest.fixture(scope="module")
def parquets(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("interrupt_data")
    # 40 places x 10 images, batches of 8: 50 steps an epoch, long enough to be caught mid-epoch
    return (write_embeddings_parquet(root / "train.parquet", n_places=40, per_place=10, dim=16, seed=1),
            write_embeddings_parquet(root / "val.parquet", n_places=40, per_place=2, dim=16, seed=2))


def _argv(parquets, out: Path, *extra: str) -> list[str]:
    train, val = parquets
    return [sys.executable, "train_vpr.py", "--train_parquet", str(train), "--val_parquet", str(val), "--model", "emb",
            "--epochs", str(EPOCHS), "--batch_size", "8", "--head", "mlp", "--hidden_dim", "32",
            "--projection_dim", "8",
            "--lr", "1e-3", "--lr_schedule", "cosine", "--seed", "3", "--device", "cpu",
            "--log_dir", str(out / "logs"), "--checkpoint_dir", str(out / "models"), *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def uninterrupted(parquets, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole")
    done = subprocess.run(_argv(parquets, out), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def _batch_rows_of_epoch(log_dir: Path, epoch: int) -> int:
    logs = list(log_dir.glob("emb_seed3_*.csv"))
    if not logs:
        return 0
    lines = logs[0].read_text().splitlines()[1:]
    return sum(1 for line in lines if line.split(",")[1:3] == ["batch", str(epoch)])


def _stop_mid_epoch(parquets, out: Path, sig: int, epoch: int = 3) -> subprocess.CompletedProcess:
    """Start a run, wait until it is a few batches into `epoch`, send `sig`, wait for the end."""
    process = subprocess.Popen(_argv(parquets, out), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while _batch_rows_of_epoch(out / "logs", epoch) < 5:
        assert process.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline, "the run never reached the epoch to interrupt"
        time.sleep(0.005)
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=120)
    assert _batch_rows_of_epoch(out / "logs", epoch) < 50, "the signal came after the epoch had ended"
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _final_numbers(out: Path) -> tuple[pd.DataFrame, dict]:
    log = pd.read_csv(next((out / "logs").glob("emb_seed3_*.csv")))
    [final_path] = (out / "models").glob("emb_seed3_*_final.pth")  # named by the run id
    final = torch.load(final_path, weights_only=True)
    return log, final


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_resume_after_a_signal_mid_epoch_ends_like_the_uninterrupted_run(parquets, uninterrupted, tmp_path, sig):
    stopped = _stop_mid_epoch(parquets, tmp_path, sig)
    [last] = (tmp_path / "models").glob("emb_seed3_*_last.pth")
    if sig == signal.SIGTERM:
        assert stopped.returncode == 130, stopped.stderr[-2000:]
        assert "Traceback" not in stopped.stderr
        assert f"--resume {last}" in stopped.stderr  # says how to go on
        assert vpr.load_checkpoint(last)["epochs_completed"] == 2  # the epoch it was in is redone
        assert (tmp_path / "logs").glob("*.csv")
        assert next((tmp_path / "logs").glob("emb_*.csv")).read_text().endswith("\n")
    else:
        assert stopped.returncode == -signal.SIGKILL
    assert not list((tmp_path / "models").glob("*_final.pth"))

    # the checkpoint alone continues the run: every setting (data, folders, seed...) comes from it
    resumed = subprocess.run([sys.executable, "train_vpr.py", "--resume", str(last)], cwd=REPO, env=_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    (log_a, final_a), (log_b, final_b) = _final_numbers(uninterrupted), _final_numbers(tmp_path)
    pd.testing.assert_frame_equal(log_a[COMPARED], log_b[COMPARED], check_exact=True)
    for key in ("best_val_recall", "best_val_epoch", "best_val_loss", "epochs_completed"):
        assert final_a[key] == final_b[key], key
    for name, tensor in final_a["model_state_dict"].items():
        assert torch.equal(tensor, final_b["model_state_dict"][name]), name
    summary = pd.read_csv(tmp_path / "logs" / TRAINING_SUMMARY_NAME)
    assert len(summary) == 1 and summary["epochs_run"].tolist() == [EPOCHS]  # one row, from the finished run
