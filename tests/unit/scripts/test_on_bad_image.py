"""--on_bad_image error|skip: error (the default) stops naming the file; skip leaves missing
(load_poses) and undecodable (extraction) images out, counts them, and records the count in
the run log, the training summary and the evaluation JSON."""
from __future__ import annotations

import json
import types

import numpy as np
import pandas as pd
import pytest

from helpers import TINY, TINY_MODEL, place_positions, write_poses
import analyze_metrics
import eval_trained
import run_experiment
import train_vpr
import trainable_vpr as vpr
from vprkit.cli import VPRError
from vprkit.cli.extraction_settings import ExtractionSettings
from vprkit.extraction.features import extract_features, extract_table
from vprkit.tables.places import load_poses
from vprkit.cli.settings import config_from_args


def _options(tmp_path, cache: bool = True) -> ExtractionSettings:
    return ExtractionSettings(extract_batch_size=4, num_workers=0, device="cpu",
                                 cache_dir=str(tmp_path / "cache") if cache else None)


@pytest.fixture
def bad_table(tmp_path) -> types.SimpleNamespace:
    """10 images, of which #3 is text and #7 a truncated JPEG."""
    csv = write_poses(tmp_path / "data", [(i * 30.0, 0.0) for i in range(10)])
    table = load_poses(csv)
    (tmp_path / "data" / "images" / "poses_003.jpg").write_text("not an image")
    jpeg = tmp_path / "data" / "images" / "poses_007.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:150])
    return types.SimpleNamespace(csv=csv, table=table, bad=[table.paths[3], table.paths[7]],
                                 good_rows=[0, 1, 2, 4, 5, 6, 8, 9])


def test_missing_images_are_left_out_and_counted_at_load_time(tmp_path, capsys):
    csv = write_poses(tmp_path, [(i * 30.0, 0.0) for i in range(6)])
    for i in (1, 4):
        (tmp_path / "images" / f"poses_{i:03d}.jpg").unlink()
    with pytest.raises(VPRError, match=r"row 3: image file .*poses_001.jpg not found .*2 missing in all"):
        load_poses(csv)
    table = load_poses(csv, on_bad_image="skip")
    assert len(table) == 4 and [p.rsplit("_", 1)[1] for p in table.paths] == ["000.jpg", "002.jpg", "003.jpg",
                                                                              "005.jpg"]
    np.testing.assert_array_equal(table.xyz[:, 0], [0.0, 60.0, 90.0, 150.0])  # positions stay with their images
    assert [reason for _, reason in table.skipped] == ["row 3: file not found", "row 6: file not found"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"warning: {csv}: skipped 2 bad image(s)" in err and "poses_001.jpg" in err


@pytest.mark.parametrize("cache", [True, False], ids=["cache", "no_cache"])
def test_undecodable_images_are_left_out_of_table_and_features(tmp_path, bad_table, tiny_backbone, capsys, cache):
    options = _options(tmp_path, cache)
    with pytest.raises(VPRError, match="poses_003.jpg: cannot be read as an image"):
        extract_table(tiny_backbone, bad_table.table, options)
    table, features = extract_table(tiny_backbone, bad_table.table, options, "x", "skip")
    assert table.paths == [bad_table.table.paths[i] for i in bad_table.good_rows]
    assert [image for image, _ in table.skipped] == bad_table.bad
    reasons = [reason for _, reason in table.skipped]  # the decoder's words
    assert reasons[0].startswith("UnidentifiedImageError") and "truncated" in reasons[1].lower(), reasons
    assert features.shape == (8, tiny_backbone.info.feature_dim) and np.isfinite(features).all()
    # the same numbers as extracting the good images alone: rows stay aligned
    good = extract_features(tiny_backbone, bad_table.table.subset(np.array(bad_table.good_rows)),
                                _options(tmp_path / "other", cache))
    np.testing.assert_allclose(features, good, rtol=1e-5, atol=1e-6)
    assert "skipped 2 bad image(s)" in capsys.readouterr().err


def test_skipped_images_are_tried_again_and_counted_again_through_the_cache(tmp_path, bad_table, tiny_backbone, capsys):
    options = _options(tmp_path)
    extract_table(tiny_backbone, bad_table.table, options, "x", "skip")
    capsys.readouterr()
    table, _ = extract_table(tiny_backbone, bad_table.table, options, "x", "skip")
    out = capsys.readouterr().out
    assert "8/10 from cache, extracting 2" in out  # never cached: a fixed file is picked up next time
    assert len(table.skipped) == 2


def test_nothing_left_is_an_error(tmp_path, tiny_backbone):
    csv = write_poses(tmp_path, [(0.0, 0.0), (1.0, 0.0)])
    for path in (tmp_path / "images").iterdir():
        path.write_text("text")
    with pytest.raises(VPRError, match="every image was skipped"):
        extract_table(tiny_backbone, load_poses(csv), _options(tmp_path), "x", "skip")


# --------------------------------------------------------------------------------------------
# the scripts
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> types.SimpleNamespace:
    """train: 6 places x 4 images, one missing and one text file; val: 6 images, one truncated."""
    root = tmp_path_factory.mktemp("skip")
    train = write_poses(root, place_positions(6, 4, seed=1), name="train.csv", seed=1)
    val = write_poses(root, place_positions(6, 1, seed=2), name="val.csv", seed=2)
    (root / "images" / "train_005.jpg").unlink()
    (root / "images" / "train_010.jpg").write_text("not an image")
    jpeg = root / "images" / "val_002.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:150])
    return types.SimpleNamespace(root=root, train=train, val=val)


def test_training_records_the_skipped_count_in_log_and_summary(data, tmp_path, capsys):
    argv = ["--train_csv", str(data.train), "--val_csv", str(data.val), *TINY, "--epochs", "1", "--batch_size", "8",
            "--cache_dir", str(tmp_path / "cache"), "--log_dir", str(tmp_path / "logs"),
            "--checkpoint_dir", str(tmp_path / "models")]
    with pytest.raises(VPRError, match="train_005.jpg not found"):
        train_vpr.main(argv)
    result = train_vpr.main([*argv, "--on_bad_image", "skip"])
    captured = capsys.readouterr()
    assert result.skipped_images == 3
    assert "22 train / 5 val images (3 bad images skipped)" in captured.out
    assert captured.err.count("warning:") == 3  # missing at load time; text file and truncated JPEG at extraction
    log = pd.read_csv(result.log_file)
    assert log.loc[log.event == "data", "skipped_images"].tolist() == [3]
    summary = pd.read_csv(tmp_path / "logs" / "training_summary.csv")
    assert summary.skipped_images.tolist() == [3] and summary.on_bad_image.tolist() == ["skip"]
    # the log and summary stay readable by analyze_metrics.py
    analyze_metrics.main([str(tmp_path / "logs"), "--plot_dir", str(tmp_path / "plots")])
    runs = pd.read_csv(tmp_path / "plots" / "logs_runs_summary.csv")
    assert runs.run_id.tolist() == [result.run_id] and runs.skipped_images.tolist() == [3]


def test_skipping_that_leaves_no_place_with_two_images_stops_before_any_output(tmp_path, capsys):
    train = write_poses(tmp_path, place_positions(3, 2, seed=1), name="train.csv", seed=1)
    val = write_poses(tmp_path, place_positions(3, 1, seed=2), name="val.csv", seed=2)
    for i in (1, 3, 5):  # one image of each place
        (tmp_path / "images" / f"train_{i:03d}.jpg").write_text("not an image")
    argv = ["--train_csv", str(train), "--val_csv", str(val), *TINY, "--epochs", "1", "--batch_size", "4",
            "--images_per_place", "2", "--cache_dir", str(tmp_path / "cache"), "--log_dir", str(tmp_path / "logs"),
            "--checkpoint_dir", str(tmp_path / "models"), "--on_bad_image", "skip"]
    with pytest.raises(VPRError, match="no place has two images"):
        train_vpr.main(argv)
    assert not list((tmp_path / "logs").iterdir()) and not list((tmp_path / "models").iterdir())


def test_evaluation_reports_the_skipped_count(data, tmp_path, capsys):
    out = tmp_path / "r.json"
    eval_trained.main(["--baseline", "--db_csv", str(data.train), "--test_csv", str(data.val), *TINY,
                       "--cache_dir", str(tmp_path / "cache"), "--on_bad_image", "skip", "--output_json", str(out)])
    payload = json.loads(out.read_text())
    assert payload["num_queries"] == 5
    assert payload["settings"]["skipped_images"] == {"database": 2, "queries": 1}
    assert "skipped bad images (--on_bad_image skip): 2 database, 1 queries" in capsys.readouterr().out


def test_run_experiment_passes_the_flag_to_training_and_evaluation():
    args = run_experiment.parse_args(["--train_csv", "a.csv", "--val_csv", "b.csv", "--test_csv", "c.csv",
                                      "--models", TINY_MODEL, "--on_bad_image", "skip"])
    assert args.on_bad_image == "skip"
    assert config_from_args(args, vpr.TrainConfig, model=TINY_MODEL).on_bad_image == "skip"
