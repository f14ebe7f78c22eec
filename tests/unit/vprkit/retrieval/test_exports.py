"""vprkit.retrieval.exports: descriptors as VPR-methods-evaluation's .npy and hloc's global-feats.h5, and hloc
retrieval pairs; each read back with the library (or the reader logic) that defines the format."""
from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from vprkit.cli import VPRError
from vprkit.retrieval.exports import (DATABASE_NPY, HLOC_GLOBAL_FEATURES, QUERIES_NPY, image_folder_and_names,
                                      retrieval_pairs_text, save_descriptors, write_hloc_global_features,
                                      write_retrieval_pairs)


from helpers.hloc import hloc_get_descriptors, hloc_list_h5_names, hloc_parse_retrieval  # noqa: E402


def make_images(root: Path, names: list[str]) -> list[str]:
    paths = []
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        paths.append(str(path))
    return paths


def test_names_are_relative_to_the_common_folder_and_distinct(tmp_path):
    db = make_images(tmp_path / "test", ["database/@1@2@.jpg", "database/b.jpg"])
    q = make_images(tmp_path / "test", ["queries/@1@2@.jpg"])
    root, names = image_folder_and_names(db + q)
    assert root == tmp_path / "test"
    assert names == ["database/@1@2@.jpg", "database/b.jpg", "queries/@1@2@.jpg"]
    root, names = image_folder_and_names(db[:1])
    assert (root, names) == (tmp_path / "test" / "database", ["@1@2@.jpg"])


def test_relative_paths_count_from_the_working_directory(tmp_path, monkeypatch):
    make_images(tmp_path, ["imgs/a.jpg", "imgs/sub/b.jpg"])
    monkeypatch.chdir(tmp_path)
    root, names = image_folder_and_names(["imgs/a.jpg", os.path.join("imgs", "sub", "b.jpg")])
    assert root == tmp_path / "imgs" and names == ["a.jpg", "sub/b.jpg"]


def test_save_descriptors_reads_back_with_numpy_and_hlocs_reader(tmp_path):
    rng = np.random.default_rng(0)
    db_paths = make_images(tmp_path / "test", ["database/x@1@.jpg", "database/deep/y.jpg", "database/z.png"])
    q_paths = make_images(tmp_path / "test", ["queries/x@1@.jpg", "queries/w.jpg"])
    db = rng.normal(size=(3, 16))
    q = rng.normal(size=(2, 16)).astype(np.float32)
    image_dir, files = save_descriptors(tmp_path / "out", db_paths, q_paths, db, q)
    assert image_dir == tmp_path / "test"
    assert sorted(f.name for f in files) == sorted([DATABASE_NPY, QUERIES_NPY, HLOC_GLOBAL_FEATURES])
    db_back, q_back = np.load(tmp_path / "out" / DATABASE_NPY), np.load(tmp_path / "out" / QUERIES_NPY)
    assert db_back.dtype == np.float32 and q_back.dtype == np.float32
    np.testing.assert_array_equal(db_back, db.astype(np.float32))  # row order = the input table
    np.testing.assert_array_equal(q_back, q)

    h5 = tmp_path / "out" / HLOC_GLOBAL_FEATURES
    expected = ["database/x@1@.jpg", "database/deep/y.jpg", "database/z.png", "queries/x@1@.jpg", "queries/w.jpg"]
    assert sorted(hloc_list_h5_names(h5)) == sorted(expected)
    with h5py.File(h5, "r") as fd:
        assert fd["database/deep/y.jpg"]["global_descriptor"].dtype == np.float16
        assert isinstance(fd["database"], h5py.Group) and isinstance(fd["database/deep"], h5py.Group)  # nested groups
    got = hloc_get_descriptors(h5, expected)
    np.testing.assert_allclose(got, np.concatenate([db, q]).astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(got, np.concatenate([db, q]), rtol=2e-3, atol=2e-3)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporary files left


def test_an_image_in_both_tables_is_one_group(tmp_path):
    paths = make_images(tmp_path, ["a.jpg", "b.jpg"])
    desc = np.eye(2, dtype=np.float32)
    save_descriptors(tmp_path / "out", paths, paths[:1], desc, desc[:1])
    assert sorted(hloc_list_h5_names(tmp_path / "out" / HLOC_GLOBAL_FEATURES)) == ["a.jpg", "b.jpg"]


def test_an_unwritable_folder_is_one_line_and_leaves_nothing(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    paths = make_images(tmp_path, ["a.jpg"])
    with pytest.raises(VPRError, match=r"--save_descriptors .*file.*cannot write"):
        save_descriptors(blocker / "out", paths, paths, np.ones((1, 4)), np.ones((1, 4)))
    with pytest.raises(VPRError, match=r"--pairs .*cannot write"):
        write_retrieval_pairs(blocker / "pairs.txt", ["q.jpg"], ["a.jpg"], np.array([[0]]))
    assert blocker.read_text() == "not a folder"


def test_a_failed_write_leaves_no_half_file(tmp_path, monkeypatch):
    import h5py as real

    target = tmp_path / HLOC_GLOBAL_FEATURES
    target.write_bytes(b"old")

    class Broken:
        def __init__(self, *a, **k):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(real, "File", Broken)
    with pytest.raises(VPRError, match="No space left on device"):
        write_hloc_global_features(target, ["a.jpg"], np.ones((1, 4)))
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == [HLOC_GLOBAL_FEATURES]


def test_retrieval_pairs_in_rank_order_as_hloc_parses_them(tmp_path):
    top = np.array([[2, 0], [1, 2]])
    path = write_retrieval_pairs(tmp_path / "pairs.txt", ["queries/q0.jpg", "queries/q1.jpg"],
                                 ["db/a.jpg", "db/b.jpg", "db/c.jpg"], top)
    assert path.read_text() == ("queries/q0.jpg db/c.jpg\nqueries/q0.jpg db/a.jpg\n"
                                "queries/q1.jpg db/b.jpg\nqueries/q1.jpg db/c.jpg\n")
    assert hloc_parse_retrieval(path) == {"queries/q0.jpg": ["db/c.jpg", "db/a.jpg"],
                                          "queries/q1.jpg": ["db/b.jpg", "db/c.jpg"]}


def test_a_name_with_a_space_is_refused(tmp_path):
    with pytest.raises(VPRError, match="'db/my photo.jpg'.*whitespace"):
        retrieval_pairs_text(["q.jpg"], ["db/my photo.jpg"], np.array([[0]]))
