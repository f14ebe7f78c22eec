"""localize.py: top-k database matches of new photos (no ground truth) with positions and a
position estimate, on a folder of photos; one-line errors for bad inputs."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers import TINY_MODEL, assert_one_line_error, run_main, write_jpeg
from helpers import TINY_OPTIONS as TINY

import localize  # noqa: E402


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """db.csv: 6 distinct images, at 0, 10, 1000, 1010, 2000, 2010 m east (pairs 10 m apart);
    photos/: copies of database images 0 and 3 under new names (same pixels: their top-1)."""
    root = tmp_path_factory.mktemp("localize")
    east = [0.0, 10.0, 1000.0, 1010.0, 2000.0, 2010.0]
    rows = []
    for i, x in enumerate(east):
        write_jpeg(root / f"db/{i}.jpg", seed=500 + 11 * i, size=40)
        rows.append({"image_path": f"db/{i}.jpg", "easting": 600_000.0 + x, "northing": 3_500_000.0,
                     "place_id": f"p{i // 2}"})
    pd.DataFrame(rows).to_csv(root / "db.csv", index=False)
    (root / "photos").mkdir()
    shutil.copy(root / "db/0.jpg", root / "photos/a_new.jpg")
    shutil.copy(root / "db/3.jpg", root / "photos/b_new.jpg")
    (root / "photos/notes.txt").write_text("not a photo")
    return root


def localize_argv(scene: Path, out: Path, *extra: str) -> list[str]:
    return ["--baseline", "--model", TINY_MODEL, "--db_csv", str(scene / "db.csv"), "--query", str(scene / "photos"),
            "--output", str(out), "--cache_dir", str(scene / "cache"), *TINY, *extra]


def test_folder_of_photos_top_k_matches_and_estimates(scene, tmp_path):
    out, picture = tmp_path / "matches.csv", tmp_path / "m.png"
    localize.main(localize_argv(scene, out, "--top_k", "3", "--picture", str(picture)))
    frame = pd.read_csv(out)
    assert len(frame) == 2 * 3  # two photos (notes.txt is not one) x top 3
    assert [Path(p).name for p in frame["query_image"].unique()] == ["a_new.jpg", "b_new.jpg"]
    top1 = frame[frame["rank"] == 1].set_index(frame[frame["rank"] == 1]["query_image"].map(lambda p: Path(p).name))
    # each copy's top-1 is its original, similarity 1, with the original's row: position and label
    assert Path(top1.loc["a_new.jpg", "db_image"]).name == "0.jpg"
    assert Path(top1.loc["b_new.jpg", "db_image"]).name == "3.jpg"
    assert top1["similarity"].to_numpy() == pytest.approx([1.0, 1.0], abs=1e-4)
    assert top1.loc["a_new.jpg", "db_easting"] == 600_000.0 and top1.loc["b_new.jpg", "db_easting"] == 601_010.0
    assert list(top1["db_label"]) == ["p0", "p1"]
    # the estimate: similarity-weighted mean of the top-3 positions within 25 m of the top-1
    for query, rows in frame.groupby("query_image"):
        near = rows[(rows["db_easting"] - rows["db_easting"].iloc[0]).abs() <= 25.0]
        weights = near["similarity"].clip(lower=1e-6)
        expected = (weights * near["db_easting"]).sum() / weights.sum()
        assert rows["est_easting"].iloc[0] == pytest.approx(expected, abs=0.01), query
        assert rows["est_northing"].iloc[0] == pytest.approx(3_500_000.0, abs=0.01)
        assert rows["est_support"].iloc[0] == len(near)
        assert abs(rows["est_easting"].iloc[0] - rows["db_easting"].iloc[0]) <= 10.0  # pulled at most to the neighbour
    assert picture.is_file() and picture.stat().st_size > 5_000


def test_top_1_estimate_is_the_top_1_position_and_latlon_round_trips(scene, tmp_path):
    frame = pd.read_csv(scene / "db.csv")
    latlon = frame.drop(columns=["easting", "northing"]).assign(lat=31.26 + np.arange(6) * 1e-3, lon=34.80)
    latlon["image_path"] = [str(scene / p) for p in latlon["image_path"]]
    latlon.to_csv(tmp_path / "db_latlon.csv", index=False)
    out = tmp_path / "m.csv"
    localize.main(["--baseline", "--model", TINY_MODEL, "--db_csv", str(tmp_path / "db_latlon.csv"), "--query",
                   str(scene / "photos"), "--output", str(out), "--top_k", "1", "--no_cache", *TINY])
    result = pd.read_csv(out)
    assert len(result) == 2 and (result["est_support"] == 1).all()
    np.testing.assert_allclose(result["est_lat"], result["db_lat"], atol=1e-9)
    np.testing.assert_allclose(result["est_lon"], result["db_lon"], atol=1e-9)
    assert result["db_lat"].tolist() == pytest.approx([31.26, 31.263])


def test_csv_of_image_paths_as_queries(scene, tmp_path):
    pd.DataFrame({"image": ["photos/b_new.jpg"]}).to_csv(scene / "q.csv", index=False)
    out = tmp_path / "m.csv"
    localize.main(localize_argv(scene, out, "--top_k", "2") [:7] + ["--query", str(scene / "q.csv"), "--output",
                                                                    str(out),
                  "--cache_dir", str(scene / "cache"), *TINY, "--top_k", "2"])
    frame = pd.read_csv(out)
    assert len(frame) == 2 and Path(frame["db_image"].iloc[0]).name == "3.jpg"


def test_trained_checkpoint(scene, tmp_path):
    import train_vpr
    from helpers.tiny_dataset import write_tiny_dataset

    data = write_tiny_dataset(tmp_path / "data")
    result = train_vpr.main(["--train_csv", str(data["train"]), "--val_csv", str(data["val"]), "--model", TINY_MODEL,
                             *TINY, "--epochs", "1", "--batch_size", "8", "--images_per_place", "2",
                             "--projection_dim", "16", "--cache_dir", str(tmp_path / "cache"),
                             "--log_dir", str(tmp_path / "logs"), "--checkpoint_dir", str(tmp_path / "models")])
    out = tmp_path / "m.csv"
    frame = localize.main(["--model_path", str(result.checkpoint), "--db_csv", str(scene / "db.csv"), "--query",
                           str(scene / "photos"), "--output", str(out), "--cache_dir", str(tmp_path / "cache"),
                           "--num_workers", "0", "--device", "cpu"])
    assert len(frame) == 2 * 5
    top1 = frame[frame["rank"] == 1]
    assert [Path(p).name for p in top1["db_image"]] == ["0.jpg", "3.jpg"]  # identical pixels, through the head too


@pytest.mark.parametrize("case, words", [
    ("missing folder", ["--query", "nowhere", "no such folder"]),
    ("no images", ["--query", "no images in this folder"]),
    ("bad checkpoint", ["checkpoint", "truncated"]),
])
def test_bad_inputs_are_one_line_errors(capsys, scene, tmp_path, case, words):
    out = tmp_path / "m.csv"
    argv = localize_argv(scene, out)
    if case == "missing folder":
        argv[argv.index("--query") + 1] = str(tmp_path / "nowhere")
    elif case == "no images":
        (tmp_path / "empty").mkdir()
        argv[argv.index("--query") + 1] = str(tmp_path / "empty")
    else:
        bad = tmp_path / "bad.pth"
        bad.write_bytes(b"PK\x03\x04 not a checkpoint")
        argv = ["--model_path", str(bad)] + argv[3:]
    code, err = run_main(capsys, localize.main, argv)
    assert_one_line_error(code, err, *words)
    assert not out.exists()


def test_bad_flag_is_one_line(capsys, scene, tmp_path):
    code, err = run_main(capsys, localize.main, localize_argv(scene, tmp_path / "m.csv", "--top_k", "0"))
    assert_one_line_error(code, err, "--top_k")


def test_a_pairs_name_with_a_space_is_refused_before_any_work(capsys, scene, tmp_path, monkeypatch):
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(scene / "db/0.jpg", photos / "my photo.jpg")
    out, pairs = tmp_path / "m.csv", tmp_path / "pairs.txt"
    argv = localize_argv(scene, out, "--pairs", str(pairs))
    argv[argv.index("--query") + 1] = str(photos)
    monkeypatch.setattr(localize, "describe_table", lambda *a: pytest.fail("extracted before checking the names"))
    code, err = run_main(capsys, localize.main, argv)
    assert_one_line_error(code, err, "photos/my photo.jpg'", "whitespace")
    assert not out.exists() and not pairs.exists()
