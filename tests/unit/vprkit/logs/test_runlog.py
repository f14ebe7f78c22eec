"""Safe files: whole files or none (temporary file, then rename), a training summary that
concurrent runs append to without losing or mixing rows (a file lock), and an unreadable
summary found before a run starts rather than after it."""
from __future__ import annotations

import multiprocessing
import pickle
from pathlib import Path

import pandas as pd
import pytest
import torch

from helpers import TINY_MODEL, TINY_SIZE, place_positions, write_poses
import train_vpr
import trainable_vpr as vpr
import vprkit.logs.runlog
from trainable_vpr.checkpoints import save_checkpoint
from vprkit.cli import VPRError, atomic_write
from vprkit.logs.runlog import append_summary_row, new_run_id

ROWS_PER_WRITER = 30


def _append_rows(path: str, writer: str, count: int, start_together) -> None:
    start_together.wait(timeout=60)
    for i in range(count):
        row = {"run_id": f"{writer}_{i:03d}", "writer": writer, "i": i}
        if writer == "b":
            row["b_only"] = f"b{i}"  # a row with a new column widens the table
        append_summary_row(path, row)


@pytest.mark.slow
def test_two_processes_appending_at_once_keep_every_row_exactly_once(tmp_path):
    path = tmp_path / "logs" / "training_summary.csv"
    context = multiprocessing.get_context("fork")  # the children share the imported modules: no 5 s import each
    barrier = context.Barrier(2)
    writers = [context.Process(target=_append_rows, args=(str(path), name, ROWS_PER_WRITER, barrier)) for name in "ab"]
    for process in writers:
        process.start()
    for process in writers:
        process.join(timeout=120)
        assert process.exitcode == 0
    table = pd.read_csv(path)
    expected = sorted(f"{w}_{i:03d}" for w in "ab" for i in range(ROWS_PER_WRITER))
    assert sorted(table.run_id) == expected and table.run_id.is_unique
    for writer in "ab":  # each writer's rows in its own order, with its own cells
        rows = table[table.writer == writer]
        assert rows.i.tolist() == list(range(ROWS_PER_WRITER))
    b_rows = table[table.writer == "b"]
    assert (b_rows.b_only == [f"b{i}" for i in b_rows.i]).all() and table.loc[table.writer == "a",
                                                                              "b_only"].isna().all()
    assert path.read_text().count("run_id") == 1  # one header
    assert sorted(p.name for p in path.parent.iterdir()) == ["training_summary.csv", "training_summary.csv.lock"]


def test_appending_keeps_the_earlier_rows_as_written(tmp_path):
    path = tmp_path / "training_summary.csv"
    path.write_text("run_id,seed,lr,note\nold,042,1e-04,\"a, b\"\n")
    append_summary_row(path, {"run_id": "new", "seed": 7, "lr": 0.001, "skipped_images": 0})
    lines = path.read_text().splitlines()
    assert lines[:2] == ["run_id,seed,lr,note,skipped_images", "old,042,1e-04,\"a, b\","]
    assert lines[2] == "new,7,0.001,,0"


def test_a_run_written_again_replaces_its_row_in_place_with_the_total_wall_time(tmp_path):
    path = tmp_path / "training_summary.csv"
    for run_id, epochs, seconds in (("a", 2, 10.0), ("b", 3, 5.0), ("a", 4, 2.5)):
        append_summary_row(path, {"run_id": run_id, "epochs_run": epochs, "wall_time_s": seconds})
    table = pd.read_csv(path)
    assert table.run_id.tolist() == ["a", "b"]
    assert table.epochs_run.tolist() == [4, 3] and table.wall_time_s.tolist() == [12.5, 5.0]


@pytest.mark.parametrize("content", ["run_id,a\n1,2,3,4\n\"unclosed\n", "model,seed\nx,1\n", "\xff\xfe\x00binary"])
def test_an_unreadable_summary_is_an_error_and_left_alone(tmp_path, content):
    path = tmp_path / "training_summary.csv"
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(VPRError, match=f"{path}: not a summary table this suite can append to.*move it away"):
        append_summary_row(path, {"run_id": "x"})
    assert path.read_bytes() == content.encode("latin-1")


def test_training_checks_the_summary_before_writing_anything(tmp_path):
    train = write_poses(tmp_path, place_positions(4, 3, seed=1), name="train.csv", seed=1)
    val = write_poses(tmp_path, place_positions(4, 1, seed=2), name="val.csv", seed=2)
    summary = tmp_path / "logs" / "training_summary.csv"
    summary.parent.mkdir()
    summary.write_text("model,seed\nx,1\n")
    with pytest.raises(VPRError, match="training_summary.csv: not a summary table"):
        train_vpr.main(["--train_csv", str(train), "--val_csv", str(val), "--model", TINY_MODEL, "--weights", "random",
                        "--image_size", str(TINY_SIZE), "--num_workers", "0", "--device", "cpu", "--epochs", "1",
                        "--batch_size", "8", "--cache_dir", str(tmp_path / "cache"), "--log_dir", str(summary.parent),
                        "--checkpoint_dir", str(tmp_path / "models")])
    assert [p.name for p in summary.parent.iterdir()] == ["training_summary.csv"]
    assert not (tmp_path / "cache").exists()  # stopped before the extraction


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary_file(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("old\n")

    def fails_halfway(tmp: Path) -> None:
        tmp.write_text("new, but only ha")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(path, fails_halfway)
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["table.csv"]


def test_a_checkpoint_that_fails_to_save_keeps_the_previous_one(tmp_path):
    path = tmp_path / "trained.pth"
    head = vpr.ProjectionHead(16, 8)
    payload = {"model_state_dict": head.state_dict(), "backbone": {"name": TINY_MODEL}, "config": {},
               "head_config": {"type": "projection", "in_dim": 16, "projection_dim": 8, "hidden_dim": 8,
                               "dropout": 0.1}}
    save_checkpoint(path, payload)
    before = path.read_bytes()
    with pytest.raises((pickle.PicklingError, AttributeError)):  # which one depends on the Python version
        save_checkpoint(path, {**payload, "extra": lambda: None})  # a lambda cannot be pickled
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["trained.pth"]
    assert torch.equal(vpr.load_checkpoint(path)["model_state_dict"]["net.0.weight"], head.state_dict()["net.0.weight"])


def test_runs_started_in_the_same_second_get_their_own_logs(tmp_path, monkeypatch):
    monkeypatch.setattr(vprkit.logs.runlog.time, "strftime", lambda fmt: "20250101_120000")
    ids = [new_run_id("m", 1, tmp_path) for _ in range(3)]
    assert ids == ["m_seed1_20250101_120000", "m_seed1_20250101_120000_2", "m_seed1_20250101_120000_3"]
    assert sorted(p.stem for p in tmp_path.iterdir()) == sorted(ids)  # each claimed by creating its file


def test_a_log_of_an_earlier_version_resumes_under_todays_columns(tmp_path):
    """A run log written before columns were added (e.g. val_database, head_start) continues:
    its rows are kept under today's header, the new cells empty; later epochs are dropped."""
    from vprkit.logs.runlog import CsvLogger

    old_columns = ["timestamp", "event", "epoch", "val_r1"]
    log = tmp_path / "run.csv"
    log.write_text("timestamp,event,epoch,val_r1\n1.0,data,0,\n2.0,validation,0,0.5\n3.0,validation,1,0.6\n"
                   "4.0,validation,2,0.7\n")
    logger = CsvLogger(log, [*old_columns, "head_start"], continue_after_epoch=1)
    logger.log("validation", epoch=2, val_r1=0.65, head_start="raw")
    logger.close()
    frame = pd.read_csv(log)
    assert list(frame.columns) == [*old_columns, "head_start"]
    assert frame["val_r1"].tolist()[1:] == [0.5, 0.6, 0.65]  # epoch 2 of the interrupted run replaced
    assert frame["head_start"].isna().tolist() == [True, True, True, False]
    with pytest.raises(VPRError, match="columns differ"):  # a column this run does not have: not the same run
        CsvLogger(log, ["timestamp", "event", "epoch"], continue_after_epoch=1)
