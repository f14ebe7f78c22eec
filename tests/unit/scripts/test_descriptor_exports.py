"""eval_trained.py --save_descriptors and localize.py --pairs end to end on tiny data: the files
read back with numpy / h5py as VPR-methods-evaluation and hloc read them, hold the evaluated
variant's descriptors in table order, and bad folders are one-line errors."""
from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from helpers import TINY_MODEL, assert_one_line_error, run_main, write_jpeg
from helpers import TINY_OPTIONS as TINY
from helpers.tiny_dataset import write_tiny_dataset
from helpers.hloc import hloc_get_descriptors, hloc_list_h5_names, hloc_parse_retrieval

import eval_trained
import localize
import train_vpr
import trainable_vpr as vpr
from vprkit.cli.extraction_settings import ExtractionSettings
from vprkit.extraction.features import extract_features
from vprkit.tables.places import load_poses


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exports")
    paths = write_tiny_dataset(root)
    paths["root"], paths["cache"] = root, root / "cache"
    return paths


def eval_argv(data, out: Path, *extra: str) -> list[str]:
    return ["--db_csv", str(data["train"]), "--test_csv", str(data["test"]), "--cache_dir", str(data["cache"]),
            *TINY, "--save_descriptors", str(out), *extra]


def read_npy(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    return np.load(folder / "database_descriptors.npy"), np.load(folder / "queries_descriptors.npy")


def expected_names(data) -> tuple[list[str], list[str]]:
    """hloc names: relative to the folder holding every image (here data/images)."""
    db = [Path(p).name for p in pd.read_csv(data["train"])["image_path"]]
    q = [Path(p).name for p in pd.read_csv(data["test"])["image_path"]]
    return db, q


def test_baseline_descriptors_npy_and_hloc_h5(data, tmp_path):
    out, pred = tmp_path / "desc", tmp_path / "pred.csv"
    report = eval_trained.main(eval_argv(data, out, "--baseline", "--model", TINY_MODEL,
                                         "--save_predictions", str(pred)))
    db, q = read_npy(out)
    assert db.dtype == np.float32 and q.dtype == np.float32
    assert db.shape[0] == 20 and q.shape[0] == 11 and db.shape[1] == q.shape[1] > 0
    # the saved descriptors are the evaluated ones, rows in table order: searching them gives the same top-1
    top1 = np.argmax(q @ db.T, axis=1)
    np.testing.assert_array_equal(top1, report.result.top_indices[:, 0])
    frame = pd.read_csv(pred)
    train_images = pd.read_csv(data["train"])["image_path"].map(lambda p: Path(p).name).to_numpy()
    first = frame[frame["rank"] == 1].sort_values("query_index")
    assert list(first["db_image"].map(lambda p: Path(p).name)) == list(train_images[top1])

    h5 = out / "global-feats.h5"
    db_names, q_names = expected_names(data)
    assert sorted(hloc_list_h5_names(h5)) == sorted(db_names + q_names)  # hloc's reader finds every image
    np.testing.assert_allclose(hloc_get_descriptors(h5, db_names), db, atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(hloc_get_descriptors(h5, q_names), q, atol=2e-3, rtol=2e-3)
    with h5py.File(h5, "r") as fd:
        assert fd[q_names[0]]["global_descriptor"].dtype == np.float16


def features_of(data, csv: str) -> np.ndarray:
    """The tiny backbone's raw features of a table, extracted independently of eval_trained."""
    backbone = vpr.create_backbone(TINY_MODEL, "random", 32)
    options = ExtractionSettings(num_workers=0, device="cpu", cache_dir=str(data["cache"]))
    return extract_features(backbone, load_poses(data[csv]), options)


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_baseline_saves_the_normalised_raw_features_in_table_order(data, tmp_path):
    eval_trained.main(eval_argv(data, tmp_path, "--baseline", "--model", TINY_MODEL))
    db, q = read_npy(tmp_path)
    np.testing.assert_allclose(db, unit_rows(features_of(data, "train")), atol=1e-5)
    np.testing.assert_allclose(q, unit_rows(features_of(data, "test")), atol=1e-5)


def test_trained_checkpoint_saves_the_heads_output(data, tmp_path):
    out = tmp_path / "trained"
    result = train_vpr.main([
        "--train_csv", str(data["train"]), "--val_csv", str(data["val"]), "--model", TINY_MODEL, *TINY,
        "--epochs", "1", "--batch_size", "8", "--images_per_place", "2", "--projection_dim", "16",
        "--cache_dir", str(data["cache"]), "--log_dir", str(tmp_path / "logs"),
        "--checkpoint_dir", str(tmp_path / "models")])
    report = eval_trained.main(["--model_path", str(result.checkpoint), "--db_csv", str(data["train"]), "--test_csv",
                                str(data["test"]), "--cache_dir", str(data["cache"]), "--num_workers", "0",
                                "--device", "cpu", "--save_descriptors", str(out)])
    db, q = read_npy(out)
    assert db.shape == (20, 16) and q.shape == (11, 16)
    head = vpr.head_from_checkpoint(vpr.load_checkpoint(result.checkpoint))
    np.testing.assert_allclose(db, unit_rows(vpr.embed(head, features_of(data, "train"))), atol=1e-5)
    np.testing.assert_allclose(q, unit_rows(vpr.embed(head, features_of(data, "test"))), atol=1e-5)
    np.testing.assert_array_equal(np.argmax(q @ db.T, axis=1), report.result.top_indices[:, 0])
    db_names, _ = expected_names(data)
    np.testing.assert_allclose(hloc_get_descriptors(out / "global-feats.h5", db_names), db, atol=2e-3)


def test_unwritable_folder_is_one_line_before_any_work(capsys, data, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, err = run_main(capsys, eval_trained.main,
                         eval_argv(data, blocker / "desc", "--baseline", "--model", TINY_MODEL))
    assert_one_line_error(code, err, "--save_descriptors", "cannot write")
    assert blocker.read_text() == "x"


def test_existing_descriptor_files_are_kept_unless_overwrite(capsys, data, tmp_path):
    """One rule for every output a flag names (as export_model.py --output): an existing file is
    replaced only with --overwrite, checked before any work."""
    out = tmp_path / "desc"
    eval_trained.main(eval_argv(data, out, "--baseline", "--model", TINY_MODEL))
    (out / "queries_descriptors.npy").write_bytes(b"keep me")
    code, err = run_main(capsys, eval_trained.main, eval_argv(data, out, "--baseline", "--model", TINY_MODEL))
    assert_one_line_error(code, err, "--save_descriptors", "database_descriptors.npy", "--overwrite")
    assert (out / "queries_descriptors.npy").read_bytes() == b"keep me"
    eval_trained.main(eval_argv(data, out, "--baseline", "--model", TINY_MODEL, "--overwrite"))
    assert read_npy(out)[1].ndim == 2


def test_localize_existing_output_is_kept_unless_overwrite(capsys, scene, tmp_path):
    (tmp_path / "m.csv").write_text("keep me")
    code, err = run_main(capsys, localize.main, localize_argv(scene, tmp_path))
    assert_one_line_error(code, err, "--output", "m.csv", "--overwrite")
    assert (tmp_path / "m.csv").read_text() == "keep me"
    assert len(localize.main(localize_argv(scene, tmp_path, "--overwrite"))) == len(pd.read_csv(tmp_path / "m.csv"))


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    """db.csv: 4 distinct images; photos/: copies of database images 1 and 2 (their top-1)."""
    root = tmp_path_factory.mktemp("pairs")
    rows = []
    for i in range(4):
        write_jpeg(root / f"db/{i}.jpg", seed=700 + 13 * i, size=40)
        rows.append({"image_path": f"db/{i}.jpg", "easting": 600_000.0 + 500 * i, "northing": 3_500_000.0})
    pd.DataFrame(rows).to_csv(root / "db.csv", index=False)
    (root / "photos").mkdir()
    shutil.copy(root / "db/1.jpg", root / "photos/a.jpg")
    shutil.copy(root / "db/2.jpg", root / "photos/b.jpg")
    return root


def localize_argv(scene: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["--baseline", "--model", TINY_MODEL, "--db_csv", str(scene / "db.csv"), "--query", str(scene / "photos"),
            "--output", str(tmp_path / "m.csv"), "--cache_dir", str(scene / "cache"), *TINY, *extra]


def test_localize_pairs_are_hlocs_retrieval_pairs(scene, tmp_path):
    pairs = tmp_path / "out" / "pairs-netvlad.txt"
    frame = localize.main(localize_argv(scene, tmp_path, "--top_k", "3", "--pairs", str(pairs)))
    retrieval = hloc_parse_retrieval(pairs)
    assert list(retrieval) == ["photos/a.jpg", "photos/b.jpg"]  # names relative to the images' common folder
    assert [v[0] for v in retrieval.values()] == ["db/1.jpg", "db/2.jpg"]  # identical pixels: top-1
    assert all(len(v) == 3 for v in retrieval.values())
    # the same top-k, in the same rank order, as the matches CSV
    expected = [f"photos/{Path(q).name} db/{Path(d).name}" for q, d in zip(frame["query_image"], frame["db_image"])]
    assert pairs.read_text().splitlines() == expected


def test_localize_unwritable_pairs_is_one_line(capsys, scene, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, err = run_main(capsys, localize.main, localize_argv(scene, tmp_path, "--pairs", str(blocker / "p.txt")))
    assert_one_line_error(code, err, "--pairs", "cannot write")
    assert not (tmp_path / "m.csv").exists()
