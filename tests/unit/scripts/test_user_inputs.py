"""Issue 13, users' real inputs, with real files: phone photos stored rotated (EXIF orientation),
labelled image sets without positions end to end, training sets with nothing to learn from,
images shared between splits, a wrong --image_root, embeddings parquets that name their
backbone, and a hub endpoint that refuses connections (real processes)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import (REPO, SHARED, TINY, TINY_MODEL, assert_one_line_error, place_positions, requires_shared,
                      run_main, write_csv, write_jpeg, write_poses)
from helpers.exif_photos import STORE_TRANSPOSE
import eval_trained
import train_vpr
from vprkit.cli import VPRError
from vprkit.cli.extraction_settings import ExtractionSettings
from vprkit.extraction.cache import FeatureCache
from vprkit.extraction.features import extract_features
from vprkit.tables.pairs import check_trainable, has_pair_beyond
from vprkit.tables.places import load_poses
from vprkit.tables.load import load_table


def picture_captions(result, database, queries, q: int, top: int) -> tuple[str, list[str], str]:
    """(query caption, match captions, legend) of query q in the retrieval picture."""
    from vprkit.retrieval.predictions import evaluation_rows

    rows, legend = evaluation_rows(result, database, queries, result.num_queries, top)
    return rows[q].query_caption, [caption for _, caption, _ in rows[q].matches], legend


def _options(tmp_path: Path) -> ExtractionSettings:
    return ExtractionSettings(cache_dir=str(tmp_path / "cache"), num_workers=0, device="cpu", extract_batch_size=4)


# --------------------------------------------------------------------------------------------
# EXIF orientation
# --------------------------------------------------------------------------------------------
@requires_shared
def test_a_photo_stored_rotated_gives_the_feature_of_its_upright_copy(tmp_path):
    """A real phone photo, saved upright and saved rotated with EXIF orientation 6 (as phones
    store it): through effnet_lite0 and the cache the two features agree; read sideways they
    would not (cosine 0.64 in the issue)."""
    from PIL import ExifTags, Image

    import trainable_vpr as vpr

    photo = sorted((SHARED / "bgu_campus" / "images").glob("*.jpg"))[0]
    with Image.open(photo) as image:
        upright = image.convert("RGB")
    upright.save(tmp_path / "upright.jpg", quality=95)
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    upright.transpose(STORE_TRANSPOSE[6]).save(tmp_path / "rotated.jpg", quality=95, exif=exif)
    upright.transpose(STORE_TRANSPOSE[6]).save(tmp_path / "sideways.jpg", quality=95)  # the same pixels, no tag
    csv = write_csv(tmp_path / "poses.csv", ["image_path", "x", "y"],
                    [["upright.jpg", 0, 0], ["rotated.jpg", 0, 0], ["sideways.jpg", 0, 0]])
    backbone = vpr.create_backbone("effnet_lite0")
    features = extract_features(backbone, load_poses(csv), _options(tmp_path))
    again = extract_features(backbone, load_poses(csv), _options(tmp_path))  # served by the cache
    np.testing.assert_array_equal(features, again)
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    assert unit[0] @ unit[1] > 0.995
    assert unit[0] @ unit[2] < 0.95  # the check could fail: the stored pixels alone are another picture


def test_the_cache_key_covers_the_decoding(tmp_path, tiny_backbone, monkeypatch):
    """Features decoded before EXIF orientation was applied live under another key: never served."""
    import vprkit.extraction.cache

    now = FeatureCache(tmp_path, tiny_backbone.info).dir
    assert '"decode": "exif-upright"' in (now / "config.json").read_text()
    monkeypatch.setattr(vprkit.extraction.cache, "DECODE_TAG", "as-stored")
    assert FeatureCache(tmp_path, tiny_backbone.info).dir != now


# --------------------------------------------------------------------------------------------
# labels-only image CSVs, end to end
# --------------------------------------------------------------------------------------------
def _labelled_csv(folder: Path, name: str, places: int, per_place: int, seed: int, column: str = "place_id") -> Path:
    rows = []
    for p in range(places):
        for i in range(per_place):
            rel = f"images/{Path(name).stem}_{p}_{i}.jpg"
            write_jpeg(folder / rel, seed=seed * 1000 + p * 10 + i)
            rows.append([rel, f"hall_{p}"])
    return write_csv(folder / name, ["image_path", column], rows)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelled")
    return types_namespace(root=root, train=_labelled_csv(root, "train.csv", 5, 4, 1),
                           val=_labelled_csv(root, "val.csv", 5, 1, 2),
                           test=_labelled_csv(root, "test.csv", 5, 2, 3, column="building_id"))


def types_namespace(**values):
    import types

    return types.SimpleNamespace(**values)


def test_a_labels_only_csv_loads_without_positions(labelled):
    table = load_poses(labelled.train)
    assert table.xyz is None and table.coord_kind == "none"
    assert table.labels.tolist()[:5] == ["hall_0"] * 4 + ["hall_1"]


def test_a_labels_only_csv_trains_evaluates_and_speaks_in_labels(labelled, tmp_path, capsys):
    out = tmp_path
    common = [*TINY, "--cache_dir", str(out / "cache")]
    result = train_vpr.main(["--train_csv", str(labelled.train), "--val_csv", str(labelled.val), *common,
                             "--epochs", "2", "--batch_size", "8", "--images_per_place", "2",
                             "--log_dir", str(out / "logs"), "--checkpoint_dir", str(out / "models")])
    assert result.checkpoint.is_file() and 0.0 <= result.best_recall[1] <= 1.0
    log = pd.read_csv(result.log_file)
    assert (log.loc[log.event == "epoch", "avg_train_loss"] > 0).all()  # something to learn from
    predictions, picture = out / "pred.csv", out / "plots"
    report = eval_trained.main(["--model_path", str(result.checkpoint), "--db_csv", str(labelled.train),
                                "--test_csv", str(labelled.test), *common, "--save_predictions", str(predictions),
                                "--visualize", "2", "--plot_dir", str(picture)])
    assert report.result.by_label and report.result.num_queries == 10
    frame = pd.read_csv(predictions)
    assert {"query_label", "db_label"} <= set(frame.columns)
    assert frame.distance_m.isna().all()  # written as empty cells: no positions
    assert (frame.correct == (frame.query_label == frame.db_label)).all()
    assert ",," in predictions.read_text().splitlines()[1]
    assert len(list(picture.glob("*_retrievals.png"))) == 1
    query_caption, captions, legend = picture_captions(
        report.result, load_poses(labelled.train), load_poses(labelled.test), 0, 5)
    assert query_caption == "query hall_0" and legend == "green: same place label"
    top = report.result.top_indices[0, :5]
    assert captions == [f"#{r + 1}  {load_poses(labelled.train).labels[i]}" for r, i in enumerate(top)]
    assert not any(" m" in c for c in captions)


def test_gps_supervision_on_a_labels_only_csv_is_one_line(labelled, tmp_path, capsys):
    code, err = run_main(capsys, train_vpr.main, [
        "--train_csv", str(labelled.train), "--val_csv", str(labelled.val), *TINY, "--supervision", "gps",
        "--log_dir", str(tmp_path / "logs"), "--checkpoint_dir", str(tmp_path / "models")])
    assert_one_line_error(code, err, "train.csv", "no positions", "--supervision auto or labels")
    assert not (tmp_path / "logs").exists()


def test_labelled_captions_keep_metres_only_with_positions(tmp_path, tiny_backbone):
    """Labels and positions: the caption names the label and the distance; GPS only: metres."""
    from vprkit.retrieval.evaluation import EvalReport, evaluate_retrieval

    xy = place_positions(2, 2)
    csv = write_poses(tmp_path, xy, images=False)
    frame = pd.read_csv(csv).assign(place_id=["a", "a", "b", "b"])
    frame.to_csv(csv, index=False)
    table = load_poses(csv, check_images=False)
    descriptors = np.eye(4, dtype=np.float32)
    labelled = EvalReport("x", evaluate_retrieval(descriptors, table.xyz, descriptors, table.xyz, 25.0,
                                                  db_labels=table.labels, q_labels=table.labels))
    query, captions, legend = picture_captions(labelled.result, table, table, 0, 2)
    assert query == "query a" and captions[0] == "#1  a  0 m" and legend == "green: same place label within 25 m"
    gps = EvalReport("x", evaluate_retrieval(descriptors, table.xyz, descriptors, table.xyz, 25.0))
    query, captions, legend = picture_captions(gps.result, table, table, 0, 2)
    assert query == "query" and captions[0] == "#1  0 m" and legend == "green: within 25 m"


# --------------------------------------------------------------------------------------------
# nothing to learn from; the same images in two splits
# --------------------------------------------------------------------------------------------
def test_every_row_at_one_spot_is_one_line_naming_the_threshold_before_any_output(tmp_path, capsys):
    train = write_poses(tmp_path, [(0.0, 0.0)] * 12, name="train.csv")
    val = write_poses(tmp_path, [(0.0, 0.0)] * 3, name="val.csv")
    code, err = run_main(capsys, train_vpr.main, [
        "--train_csv", str(train), "--val_csv", str(val), *TINY, "--cache_dir", str(tmp_path / "cache"),
        "--log_dir", str(tmp_path / "logs"), "--checkpoint_dir", str(tmp_path / "models")])
    assert_one_line_error(code, err, "train.csv", "--neg_threshold_m 100", "no negatives")
    assert not any((tmp_path / d).exists() for d in ("logs", "models", "cache"))


def test_images_all_within_the_negative_threshold_have_no_negatives(tmp_path):
    xy = place_positions(3, 4, spacing_m=40.0)  # places 40 m apart: positives, but nothing beyond 100 m
    table = load_poses(write_poses(tmp_path, xy, images=False), check_images=False)
    check_trainable(table, 25.0)  # positives exist
    with pytest.raises(VPRError, match=r"no two images lie more than --neg_threshold_m 100 m apart"):
        check_trainable(table, 25.0, neg_threshold_m=100.0)
    check_trainable(table, 25.0, neg_threshold_m=50.0)  # 80 m apart at the ends: negatives


def test_one_label_has_no_negatives(tmp_path):
    csv = write_csv(tmp_path / "one.csv", ["image_path", "label"], [[f"{i}.jpg", "lobby"] for i in range(4)])
    with pytest.raises(VPRError, match="every image has the place label 'lobby'.*no negatives"):
        table = load_poses(csv, check_images=False)
        check_trainable(table, 25.0, table.labels, 100.0)


@pytest.mark.parametrize("seed", range(5))
def test_pair_beyond_agrees_with_all_pairs(seed):
    rng = np.random.default_rng(seed)
    xyz = np.c_[rng.uniform(0, 60, size=(40, 2)), np.zeros(40)]
    brute = np.linalg.norm(xyz[:, None] - xyz[None], axis=2).max()
    for radius in (brute - 0.01, brute + 0.01, 30.0, 90.0):
        assert has_pair_beyond(xyz, radius) == (brute > radius)
    # the ball around the first point holds everything, yet two points lie beyond the radius
    ring = np.array([[0.0, 0, 0], [9.0, 0, 0], [-9.0, 0, 0]])
    assert has_pair_beyond(ring, 10.0) and not has_pair_beyond(ring, 18.0)


def test_the_same_images_in_train_and_val_give_one_warning_line(tmp_path, capsys):
    train = write_poses(tmp_path, place_positions(4, 3), name="train.csv")
    frame = pd.read_csv(train)
    frame.iloc[[0, 3, 6]].to_csv(tmp_path / "val.csv", index=False)  # three training images again
    common = [*TINY, "--cache_dir", str(tmp_path / "cache"), "--epochs", "1", "--batch_size", "8"]
    capsys.readouterr()
    train_vpr.main(["--train_csv", str(train), "--val_csv", str(tmp_path / "val.csv"), *common,
                    "--log_dir", str(tmp_path / "logs"), "--checkpoint_dir", str(tmp_path / "models")])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "3 of the 3 validation images" in warnings[0] and "train.csv" in warnings[0]
    eval_trained.main(["--baseline", *common[:-4], "--db_csv", str(train), "--test_csv", str(tmp_path / "val.csv")])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "3 of the 3 query images" in warnings[0]


# --------------------------------------------------------------------------------------------
# every image missing or unreadable
# --------------------------------------------------------------------------------------------
def test_a_wrong_image_root_does_not_suggest_skipping(tmp_path, capsys):
    train = write_poses(tmp_path / "data", place_positions(4, 3), name="train.csv")
    val = write_poses(tmp_path / "data", place_positions(4, 1), name="val.csv")
    for on_bad_image in ("error", "skip"):
        code, err = run_main(capsys, train_vpr.main, [
            "--train_csv", str(train), "--val_csv", str(val), *TINY, "--image_root", str(tmp_path / "elsewhere"),
            "--on_bad_image", on_bad_image, "--log_dir", str(tmp_path / "logs"),
            "--checkpoint_dir", str(tmp_path / "models")])
        assert_one_line_error(code, err, "train.csv", "none of its 12 image files exists", "check --image_root")
        assert "--on_bad_image skip" not in err


def test_every_image_unreadable_does_not_suggest_skipping(tmp_path, tiny_backbone):
    csv = write_poses(tmp_path, place_positions(2, 3), images=False)
    (tmp_path / "images").mkdir()
    for i in range(6):
        (tmp_path / "images" / f"poses_{i:03d}.jpg").write_text("not a picture")
    with pytest.raises(VPRError, match="nor can any of the first 4; check --image_root") as info:
        extract_features(tiny_backbone, load_poses(csv), _options(tmp_path))
    assert "--on_bad_image skip" not in str(info.value)


# --------------------------------------------------------------------------------------------
# embeddings parquets name their backbone
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """--export_parquet of the tiny backbone's features of a train and a val CSV."""
    root = tmp_path_factory.mktemp("export")
    train = write_poses(root, place_positions(5, 4, seed=1), name="train.csv", seed=1)
    val = write_poses(root, place_positions(5, 1, seed=2), name="val.csv", seed=2)
    eval_trained.main(["--baseline", *TINY, "--cache_dir", str(root / "cache"), "--db_csv", str(train),
                       "--test_csv", str(val), "--export_parquet", str(root / "emb")])
    return root / "emb"


def _train_parquet_argv(folder: Path, out: Path, *flags: str) -> list[str]:
    return ["--train_parquet", str(folder / "train.parquet"), "--val_parquet", str(folder / "val.parquet"),
            "--epochs", "1", "--batch_size", "8", "--device", "cpu", "--log_dir", str(out / "logs"),
            "--checkpoint_dir", str(out / "models"), *flags]


def test_export_writes_the_backbone_and_training_is_named_after_it(exported, tmp_path):
    import pyarrow.parquet as pq

    assert set(pq.read_table(exported / "train.parquet").column("backbone").to_pylist()) == {TINY_MODEL}
    assert load_table(exported / "train.parquet").backbone == TINY_MODEL
    result = train_vpr.main(_train_parquet_argv(exported, tmp_path))  # no --model: the default is not used
    assert result.run_id.startswith("timm_test_efficientnet_seed42_")
    assert result.checkpoint.name == f"{result.run_id}.pth"
    assert result.run_id.startswith("timm_test_efficientnet_seed42_")
    saved = torch.load(result.checkpoint, weights_only=True)
    assert saved["backbone"]["name"] == TINY_MODEL and saved["config"]["model"] == TINY_MODEL
    summary = pd.read_csv(tmp_path / "logs" / "training_summary.csv")
    assert summary.model.tolist() == [TINY_MODEL]


def test_a_model_that_contradicts_the_parquet_is_one_line(exported, tmp_path, capsys):
    code, err = run_main(capsys, train_vpr.main, _train_parquet_argv(exported, tmp_path, "--model", "effnet_lite0"))
    assert_one_line_error(code, err, "--model effnet_lite0", "train.parquet", TINY_MODEL)
    assert not (tmp_path / "logs").exists()


def test_a_parquet_without_backbone_names_the_run_embeddings(exported, tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    for name in ("train.parquet", "val.parquet"):
        pd.read_parquet(exported / name).drop(columns="backbone").to_parquet(folder / name)
    result = train_vpr.main(_train_parquet_argv(folder, tmp_path))
    assert result.checkpoint.name == f"{result.run_id}.pth" and result.run_id.startswith("embeddings_seed42_")
    assert torch.load(result.checkpoint, weights_only=True)["backbone"]["name"] == "embeddings"


def test_two_backbones_in_one_parquet_is_an_error(exported, tmp_path):
    frame = pd.read_parquet(exported / "train.parquet")
    frame.loc[0, "backbone"] = "effnet_lite0"
    frame.to_parquet(tmp_path / "mixed.parquet")
    with pytest.raises(VPRError, match="names 2 backbones"):
        load_table(tmp_path / "mixed.parquet")


# --------------------------------------------------------------------------------------------
# the hub, asked where HF_ENDPOINT says (real processes)
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_refusing_hub_endpoint_is_one_line_naming_it_within_seconds(tmp_path):
    with socket.socket() as probe:  # a port nobody listens on: connections are refused
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    train = write_poses(tmp_path, place_positions(4, 3), name="train.csv")
    val = write_poses(tmp_path, place_positions(4, 1), name="val.csv")
    env = {k: v for k, v in os.environ.items() if k.upper() not in
           ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")}
    env.update(OMP_NUM_THREADS="1", HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf"))  # no cached weights
    data = ["--device", "cpu", "--cache_dir", str(tmp_path / "cache")]
    commands = {
        "train": ["train_vpr.py", "--train_csv", str(train), *data, "--val_csv", str(val), "--model", "dinov2_b",
                  "--log_dir", str(tmp_path / "logs"), "--checkpoint_dir", str(tmp_path / "models")],
        "eval": ["eval_trained.py", "--db_csv", str(train), *data, "--test_csv", str(val), "--baseline", "--model",
                 "dinov2_b"],
    }
    start = time.perf_counter()
    procs = {name: subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name, argv in commands.items()}
    for proc in procs.values():
        _, err = proc.communicate(timeout=120)
        assert_one_line_error(proc.returncode, err, "--model dinov2_b", f"cannot reach {endpoint}: connection refused")
    # Loose: on a loaded 2-core machine importing torch and timm alone takes 10-30 s per process.
    # The probe's own time (about 0.1 s here) is bounded in-process by
    # test_backbones.test_offline_download_fails_fast_naming_the_offline_choices (< 5 s).
    assert time.perf_counter() - start < 110
