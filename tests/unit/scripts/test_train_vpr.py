"""train_vpr.py end to end on a tiny synthetic data set (files written, determinism), its
command-line errors (exit code 2, one line, no traceback) and the checkpoint helpers."""
from __future__ import annotations

import csv
import math
import os
import re
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import TINY_MODEL, TINY_SIZE, place_positions, run_processes_at_once, write_poses
import train_vpr
import trainable_vpr as vpr
from trainable_vpr.checkpoints import FORMAT_VERSION, save_checkpoint
from vprkit.cli import VPRError, run_cli
from vprkit.retrieval.evaluation import evaluate_retrieval
from vprkit.cli.extraction_settings import ExtractionSettings
from vprkit.extraction.features import extract_features
from vprkit.tables.pairs import check_trainable, cluster_places, neighbours_within
from vprkit.tables.places import PlaceTable, load_poses, metric_to_xyz

EPOCHS, BATCH, N_PLACES, PER_PLACE = 2, 8, 8, 5
BATCHES_PER_EPOCH = math.ceil(N_PLACES * PER_PLACE / BATCH)
CHECKPOINT_KEYS = {"model_state_dict", "backbone", "config", "best_val_recall", "epoch", "epochs_completed",
                   "format_version"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """40 training images of 8 places (300 m apart) and 16 validation images, two per place
    (the validation loss is computed on batches of validation places: they need pairs)."""
    root = tmp_path_factory.mktemp("data")
    train = write_poses(root, place_positions(N_PLACES, PER_PLACE, seed=1), name="train.csv", seed=1)
    val = write_poses(root, place_positions(N_PLACES, 2, seed=2), name="val.csv", seed=2)
    return types.SimpleNamespace(root=root, train=train, val=val, cache=root / "cache")


def _argv(dataset, out: Path, seed: int = 42, *extra: str) -> list[str]:
    return [
        "--train_csv", str(dataset.train), "--val_csv", str(dataset.val),
        "--model", TINY_MODEL, "--weights", "random", "--image_size", str(TINY_SIZE),
        "--epochs", str(EPOCHS), "--batch_size", str(BATCH), "--num_workers", "0", "--device", "cpu",
        "--seed", str(seed), "--cache_dir", str(dataset.cache),
        "--log_dir", str(out / "logs"), "--checkpoint_dir", str(out / "models"), *extra,
    ]


@pytest.fixture(scope="module")
def run42(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("run42")
    result = train_vpr.main(_argv(dataset, out, 42))
    return types.SimpleNamespace(out=out, result=result, log=pd.read_csv(result.log_file, dtype={"event": str}))


def _losses(log: pd.DataFrame) -> pd.DataFrame:
    return log.loc[log.event == "batch", ["epoch", "batch", "train_loss", "triplet_loss", "contrastive_loss"]]


# --------------------------------------------------------------------------------------------
# files a run writes (DESIGN.md §6)
# --------------------------------------------------------------------------------------------
def test_log_csv_columns_and_events(run42):
    log_file = Path(run42.result.log_file)
    assert log_file.parent == run42.out / "logs"
    assert re.fullmatch(r"timm_test_efficientnet_seed42_\d{8}_\d{6}(_\d+)?\.csv", log_file.name), log_file.name
    with open(log_file, newline="") as handle:
        header = next(csv.reader(handle))
    assert header == [
        "timestamp", "event", "epoch", "batch", "train_loss", "triplet_loss", "contrastive_loss",
        "batch_time", "avg_train_loss", "avg_triplet_loss", "avg_contrastive_loss", "epoch_time",
        "val_loss", "val_r1", "val_r5", "val_r10", "val_time", "skipped_images", "val_database", "head_start",
    ]
    log = run42.log
    assert set(log.event) == {"data", "batch", "epoch", "validation"}
    data = log[log.event == "data"]
    assert len(data) == 1 and data.index[0] == 0 and data.skipped_images.iloc[0] == 0
    assert log.loc[log.event != "data", "skipped_images"].isna().all()
    batches = log[log.event == "batch"]
    assert len(batches) == EPOCHS * BATCHES_PER_EPOCH
    assert batches.groupby("epoch").batch.apply(list).to_dict() == {
        e: list(range(1, BATCHES_PER_EPOCH + 1)) for e in range(1, EPOCHS + 1)}
    assert log[log.event == "epoch"].epoch.tolist() == list(range(1, EPOCHS + 1))
    assert set(range(1, EPOCHS + 1)) <= set(log[log.event == "validation"].epoch)
    assert (log.timestamp.diff().dropna() >= 0).all()


def test_log_values_are_consistent(run42):
    log = run42.log
    batches = log[log.event == "batch"]
    for col in ("train_loss", "triplet_loss", "contrastive_loss", "batch_time"):
        assert batches[col].notna().all() and (batches[col] >= 0).all(), col
    assert (batches.contrastive_loss > 0).all()  # every batch has positives and negatives here
    # total = 0.3 * triplet + 1.0 * contrastive (defaults), to the 6 digits logged
    np.testing.assert_allclose(batches.train_loss, 0.3 * batches.triplet_loss + batches.contrastive_loss, rtol=1e-4)
    # batch rows leave epoch and validation columns empty
    assert batches[["avg_train_loss", "epoch_time", "val_loss", "val_r1", "val_time"]].isna().all().all()
    epochs = log[log.event == "epoch"].set_index("epoch")
    for epoch, rows in batches.groupby("epoch"):
        assert epochs.loc[epoch, "avg_train_loss"] == pytest.approx(rows.train_loss.mean(), rel=1e-4)
        assert epochs.loc[epoch, "avg_triplet_loss"] == pytest.approx(rows.triplet_loss.mean(), rel=1e-4, abs=1e-6)
        assert epochs.loc[epoch, "avg_contrastive_loss"] == pytest.approx(rows.contrastive_loss.mean(), rel=1e-4)
    assert epochs[["train_loss", "val_r1"]].isna().all().all() and (epochs.epoch_time > 0).all()
    val = log[log.event == "validation"]
    assert val[["val_r1", "val_r5", "val_r10", "val_time"]].notna().all().all()
    assert ((0 <= val.val_r1) & (val.val_r1 <= val.val_r5) & (val.val_r5 <= val.val_r10) & (val.val_r10 <= 1)).all()
    assert val[["train_loss", "avg_train_loss"]].isna().all().all()
    # validation places have two images each: the validation loss is defined
    assert val.val_loss.notna().all() and (val.val_loss > 0).all()


def test_training_summary_row(run42):
    summary = pd.read_csv(run42.out / "logs" / "training_summary.csv")
    assert len(summary) == 1
    row = summary.iloc[0]
    result = run42.result
    assert row.run_id == result.run_id == Path(result.log_file).stem
    assert row.model == TINY_MODEL and row.seed == 42
    # the whole configuration
    for name, value in (("epochs", EPOCHS), ("batch_size", BATCH), ("lr", 1e-4), ("pos_threshold_m", 25.0),
                        ("neg_threshold_m", 100.0), ("triplet_margin", 0.5), ("contrastive_temperature", 0.07),
                        ("projection_dim", 256), ("hard_neg_ratio", 0.5), ("image_size", TINY_SIZE)):
        assert row[name] == pytest.approx(value), name
    assert Path(row.train_csv).name == "train.csv" and Path(row.val_csv).name == "val.csv"
    val = run42.log[run42.log.event == "validation"]
    assert row.best_val_r1 == pytest.approx(val.val_r1.max(), abs=1e-6)
    best = val[val.val_r1 == val.val_r1.max()].iloc[0]
    assert row.best_epoch == best.epoch
    assert row.best_val_r5 == pytest.approx(best.val_r5, abs=1e-6)
    assert row.epochs_run == EPOCHS and row.wall_time_s > 0
    assert Path(row.checkpoint).is_file() and Path(row.log_file).is_file()


def test_summary_appends_one_row_per_run(dataset, tmp_path):
    for seed in (1, 2):
        train_vpr.main(_argv(dataset, tmp_path, seed, "--epochs", "1"))
    summary = pd.read_csv(tmp_path / "logs" / "training_summary.csv")
    assert summary.seed.tolist() == [1, 2] and summary.run_id.is_unique


def test_two_runs_of_one_model_and_seed_keep_their_own_files(dataset, tmp_path, capsys):
    """Nothing replaced: each run's best, _last and _final checkpoints and log stay, each summary
    row loads the weights of its own run, and trained_{model}_seed{seed}.pth is a copy of the
    latest run's best."""
    first = train_vpr.main(_argv(dataset, tmp_path, 7, "--epochs", "1", "--lr", "1e-3", "--head", "mlp"))
    second = train_vpr.main(_argv(dataset, tmp_path, 7, "--epochs", "1", "--lr", "3e-2", "--head", "mlp"))
    assert first.run_id != second.run_id
    models = tmp_path / "models"
    assert sorted(p.name for p in models.glob("*.pth")) == sorted(
        [f"{r.run_id}{kind}.pth" for r in (first, second) for kind in ("", "_last", "_final")]
        + [f"trained_{TINY_MODEL.replace(':', '_')}_seed7.pth"])
    summary = pd.read_csv(tmp_path / "logs" / "training_summary.csv")
    assert summary.run_id.tolist() == [first.run_id, second.run_id]
    finals = {}
    for row in summary.itertuples():
        checkpoint = vpr.load_checkpoint(row.checkpoint)
        assert checkpoint["run_id"] == row.run_id and checkpoint["log_file"] == row.log_file
        assert Path(row.log_file) == tmp_path / "logs" / f"{row.run_id}.csv"
        assert checkpoint["config"]["lr"] == row.lr  # the weights this row trained
        finals[row.run_id] = vpr.load_checkpoint(models / f"{row.run_id}_final.pth")["model_state_dict"]
    weights = [next(iter(finals[r.run_id].values())) for r in (first, second)]
    assert not torch.equal(*weights)  # two different heads, both kept
    alias = vpr.load_checkpoint(models / f"trained_{TINY_MODEL.replace(':', '_')}_seed7.pth")
    latest = vpr.load_checkpoint(second.checkpoint)
    assert alias["run_id"] == second.run_id
    assert all(torch.equal(t, latest["model_state_dict"][k]) for k, t in alias["model_state_dict"].items())


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def test_checkpoint_contents(run42):
    path = run42.result.checkpoint
    assert Path(path) == run42.out / "models" / f"{run42.result.run_id}.pth"  # named by the run id
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert CHECKPOINT_KEYS <= set(checkpoint)
    assert checkpoint["format_version"] == FORMAT_VERSION
    backbone = checkpoint["backbone"]
    assert backbone["name"] == TINY_MODEL and backbone["arch"] == "test_efficientnet"
    assert backbone["weights"] == "random:seed0" and backbone["image_size"] == TINY_SIZE
    config = checkpoint["config"]
    assert config["seed"] == 42 and config["epochs"] == EPOCHS and config["model"] == TINY_MODEL
    summary = pd.read_csv(run42.out / "logs" / "training_summary.csv").iloc[0]
    assert checkpoint["best_val_recall"]["recall@1"] == pytest.approx(summary.best_val_r1)
    assert checkpoint["best_val_recall"]["recall@10"] == pytest.approx(summary.best_val_r10)
    assert checkpoint["epoch"] == summary.best_epoch
    assert 0 <= checkpoint["epochs_completed"] <= EPOCHS


def test_checkpoint_holds_the_head_only(run42):
    checkpoint = torch.load(run42.result.checkpoint, map_location="cpu", weights_only=True)
    head = vpr.build_head(checkpoint["head_config"])
    head_state = head.state_dict()
    assert set(checkpoint["model_state_dict"]) == set(head_state)
    stored = sum(t.numel() for t in _tensors(checkpoint))
    assert stored == sum(t.numel() for t in head_state.values()), "tensors besides the head's were saved"
    backbone = vpr.create_backbone(TINY_MODEL, weights="random", image_size=TINY_SIZE)
    backbone_names = set(backbone.model.state_dict())
    assert not backbone_names & set(checkpoint["model_state_dict"])


def test_checkpoint_reproduces_logged_recall(run42, dataset):
    """The saved head, on the cached features, gives the best validation recall it was saved for."""
    checkpoint = vpr.load_checkpoint(run42.result.checkpoint)
    head = vpr.head_from_checkpoint(checkpoint)
    backbone = vpr.create_backbone(TINY_MODEL, weights="random", image_size=TINY_SIZE)
    options = ExtractionSettings(extract_batch_size=BATCH, num_workers=0, device="cpu", cache_dir=str(dataset.cache))
    train, val = load_poses(dataset.train), load_poses(dataset.val)
    result = evaluate_retrieval(vpr.embed(head, extract_features(backbone, train, options)), train.xyz,
                                    vpr.embed(head, extract_features(backbone, val, options)), val.xyz, 25.0)
    for n in (1, 5, 10):
        assert result.recalls[n] == pytest.approx(checkpoint["best_val_recall"][f"recall@{n}"], abs=1e-9)


# --------------------------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------------------------
def test_same_seed_same_losses(run42, dataset, tmp_path):
    again = train_vpr.main(_argv(dataset, tmp_path, 42))
    log = pd.read_csv(again.log_file)
    first, second = _losses(run42.log), _losses(log)
    assert len(first) == len(second) == EPOCHS * BATCHES_PER_EPOCH
    pd.testing.assert_frame_equal(first.reset_index(drop=True), second.reset_index(drop=True), check_exact=True)
    v1 = run42.log.loc[run42.log.event == "validation", ["val_loss", "val_r1"]].reset_index(drop=True)
    v2 = log.loc[log.event == "validation", ["val_loss", "val_r1"]].reset_index(drop=True)
    pd.testing.assert_frame_equal(v1, v2, check_exact=True)


def test_other_seed_other_losses(run42, dataset, tmp_path):
    other = train_vpr.main(_argv(dataset, tmp_path, 7))
    first, second = _losses(run42.log), _losses(pd.read_csv(other.log_file))
    assert not np.allclose(first.train_loss.to_numpy(), second.train_loss.to_numpy())


# --------------------------------------------------------------------------------------------
# positives check
# --------------------------------------------------------------------------------------------
def _check(xyz, pos=25.0):
    """Whether check_trainable accepts these positions (some place has two images)."""
    table = PlaceTable(source="t.csv", paths=[f"{i}.jpg" for i in range(len(xyz))], xyz=xyz, coord_kind="metric",
                       frame=pd.DataFrame(index=range(len(xyz))))
    try:
        check_trainable(table, pos)
    except VPRError:
        return False
    return True


def test_check_trainable_rejects_images_all_beyond_threshold():
    xyz = metric_to_xyz(np.arange(10) * 30.0, np.zeros(10))
    assert not _check(xyz)


def test_check_trainable_accepts_positive_pairs_across_cell_boundaries():
    """Pairs 1 m apart do have positives, wherever they lie relative to clustering cells."""
    cell = 25.0 / math.sqrt(3.0)
    x = np.concatenate([[k * 20 * cell - 0.5, k * 20 * cell + 0.5] for k in range(1, 6)])
    xyz = metric_to_xyz(x, np.full(len(x), 0.5 * cell))
    assert neighbours_within(xyz, xyz[:1], 25.0)[0].size == 2  # a positive exists
    assert _check(xyz)  # must not claim "no two images lie within 25 m"
    labels = cluster_places(xyz, 25.0)
    assert np.bincount(labels).max() >= 2  # and the clustering groups some pair


# --------------------------------------------------------------------------------------------
# command-line errors: exit code 2, one line on stderr starting with "error:", no traceback
# --------------------------------------------------------------------------------------------
def _cli_cases(root: Path, good_train: Path, good_val: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (train_vpr.py arguments, text the error line must contain)."""
    cases: dict[str, tuple[list[str], str]] = {}

    def base(train: Path, *extra: str) -> list[str]:
        return ["--train_csv", str(train), "--val_csv", str(good_val), "--model", TINY_MODEL, "--weights", "random",
                "--image_size", str(TINY_SIZE), "--epochs", "1", "--batch_size", "8", "--num_workers", "0",
                "--device", "cpu", "--cache_dir", str(root / "cache"), "--log_dir", str(root / "logs"),
                "--checkpoint_dir", str(root / "models"), *extra]

    # a column name with a typo
    frame = pd.read_csv(good_train).rename(columns={"easting": "eastin"})
    typo = root / "typo" / "train.csv"
    typo.parent.mkdir()
    frame.assign(image_path=[str(good_train.parent / p) for p in frame.image_path]).to_csv(typo, index=False)
    cases["missing_column"] = (base(typo), "'eastin' -> 'easting'")
    # a camera that is not in the CSV
    cams = write_poses(root / "cams", place_positions(4, 3), name="train.csv", cameras=["phoneA", "phoneB"] * 6)
    cases["unknown_camera"] = (base(cams, "--camera_id", "phoneZ"), "phoneA, phoneB")
    # an image file that is missing
    gone = write_poses(root / "gone", place_positions(4, 3), name="train.csv")
    (root / "gone" / "images" / "train_004.jpg").unlink()
    cases["missing_image"] = (base(gone), "row 6")
    # a coordinate that is not a number
    bad = write_poses(root / "bad", place_positions(4, 3), name="train.csv")
    lines = bad.read_text().splitlines()
    lines[3] = lines[3].rsplit(",", 1)[0] + ",12 m"
    bad.write_text("\n".join(lines) + "\n")
    cases["non_numeric"] = (base(bad), "row 4, column 'northing'")
    # every image more than pos_threshold_m from every other
    far = write_poses(root / "far", [(i * 40.0, 0.0) for i in range(12)], name="train.csv")
    cases["no_positives"] = (base(far), "pos_threshold_m")
    cases["pos_ge_neg"] = (base(good_train, "--pos_threshold_m", "100", "--neg_threshold_m", "100"),
                           "--pos_threshold_m")
    cases["epochs_0"] = (base(good_train, "--epochs", "0"), "--epochs")
    return cases


CLI_CASES = ["missing_column", "unknown_camera", "missing_image", "non_numeric", "no_positives", "pos_ge_neg",
             "epochs_0"]
# One real process per stage that can fail (CSV loading, flag validation, after extraction):
# every process pays torch's import (~5 s of CPU), so the full list runs in-process below.
SUBPROCESS_CASES = ["missing_column", "epochs_0", "no_positives"]


def _assert_one_error_line(rc, out: str, err: str, expected: str) -> None:
    assert "Traceback" not in err and "Traceback" not in out
    assert rc == 2, err
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, err
    assert expected in error_lines[0], error_lines[0]
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert lines == error_lines, f"stderr holds more than the error line: {lines}"


@pytest.fixture(scope="module")
def cli_cases(dataset, tmp_path_factory):
    return _cli_cases(tmp_path_factory.mktemp("cli"), dataset.train, dataset.val)


@pytest.fixture(scope="module")
def cli_runs(cli_cases):
    """`python train_vpr.py ...` as a real process per case, all started at once."""
    runs = run_processes_at_once({name: ["train_vpr.py", *cli_cases[name][0]] for name in SUBPROCESS_CASES})
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_cli_bad_input_subprocess(cli_runs, cli_cases, case):
    rc, out, err = cli_runs[case]
    _assert_one_error_line(rc, out, err, cli_cases[case][1])


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_bad_input(cli_cases, case, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:  # own cache: features are extracted, as in a first run
        run_cli(train_vpr.main, [*cli_cases[case][0], "--cache_dir", str(tmp_path / "cache")])
    captured = capsys.readouterr()
    _assert_one_error_line(exit_info.value.code, captured.out, captured.err, cli_cases[case][1])


def test_cli_cases_cover_the_list(dataset, tmp_path):
    assert sorted(_cli_cases(tmp_path, dataset.train, dataset.val)) == sorted(CLI_CASES)


def test_run_cli_in_process_and_debug_flag(dataset, capsys):
    args = ["--train_csv", str(dataset.train), "--val_csv", str(dataset.val), "--epochs", "0"]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_vpr.main, args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["error: --epochs 0: must be at least 1"]
    with pytest.raises(SystemExit):
        run_cli(train_vpr.main, [*args, "--debug"])
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1] == "error: --epochs 0: must be at least 1"


# --------------------------------------------------------------------------------------------
# checkpoint helpers
# --------------------------------------------------------------------------------------------
class _RunsCode:
    """Unpickling this object would run a command (what weights_only=True must refuse)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _valid_payload(head: torch.nn.Module) -> dict:
    return {"model_state_dict": head.state_dict(),
            "head_config": {"type": "projection", "in_dim": 16, "projection_dim": 8, "hidden_dim": 32, "dropout": 0.1},
            "backbone": {"name": TINY_MODEL}, "config": {"seed": 1}, "best_val_recall": {"recall@1": 0.5},
            "epoch": 1, "epochs_completed": 1}


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    head = vpr.ProjectionHead(16, 8, 0.1).eval()
    path = tmp_path / "sub" / "ck.pth"
    save_checkpoint(path, _valid_payload(head))
    assert [p.name for p in path.parent.iterdir()] == ["ck.pth"]  # no temporary file left
    checkpoint = vpr.load_checkpoint(path)
    assert checkpoint["format_version"] == FORMAT_VERSION
    x = torch.randn(4, 16)
    assert torch.equal(vpr.head_from_checkpoint(checkpoint)(x), head(x))


def test_load_checkpoint_truncated(tmp_path):
    head = vpr.ProjectionHead(16, 8, 0.1)
    path = tmp_path / "ck.pth"
    save_checkpoint(path, _valid_payload(head))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(VPRError, match="truncated"):
        vpr.load_checkpoint(path)
    path.write_bytes(b"")
    with pytest.raises(VPRError):
        vpr.load_checkpoint(path)


def test_load_checkpoint_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({**_valid_payload(vpr.ProjectionHead(16, 8, 0.1)), "extra": _RunsCode(marker)}, path)
    with pytest.raises(VPRError, match="refused"):
        vpr.load_checkpoint(path)
    assert not marker.exists()


def test_load_checkpoint_newer_format(tmp_path):
    path = tmp_path / "new.pth"
    torch.save({**_valid_payload(vpr.ProjectionHead(16, 8, 0.1)), "format_version": FORMAT_VERSION + 1}, path)
    with pytest.raises(VPRError, match="newer"):
        vpr.load_checkpoint(path)


def test_load_checkpoint_not_ours(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    with pytest.raises(VPRError, match="not a checkpoint of this suite"):
        vpr.load_checkpoint(path)
    with pytest.raises(VPRError, match="not found"):
        vpr.load_checkpoint(tmp_path / "missing.pth")
