"""Poses CSV loading (DESIGN.md §2): column aliases, path resolution, camera filter, errors."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from helpers import SHARED, requires_shared, write_csv, write_jpeg, write_poses
from vprkit.cli import VPRError
from vprkit.tables.places import EARTH_RADIUS_M, latlon_to_xyz, load_poses


def _images(folder: Path, n: int, sub: str = "images") -> list[str]:
    rels = [f"{sub}/im{i}.jpg" for i in range(n)]
    for i, rel in enumerate(rels):
        write_jpeg(folder / rel, seed=i)
    return rels


# --------------------------------------------------------------------------------------------
# columns and aliases
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("image_col", ["image_path", "image", "path", "filename", "file", "IMAGE", " Filename "])
def test_image_column_aliases(tmp_path, image_col):
    rels = _images(tmp_path, 2)
    csv = write_csv(tmp_path / "p.csv", [image_col, "easting", "northing"], [[rels[0], 1, 2], [rels[1], 3, 4]])
    table = load_poses(csv)
    assert table.paths == [str(tmp_path / r) for r in rels]


@pytest.mark.parametrize("lat_col, lon_col", [("lat", "lon"), ("latitude", "longitude"), ("lat", "lng"),
                                              ("LAT", "Lon"), ("Latitude", "LONGITUDE"), ("Lat", "LNG")])
def test_latlon_aliases(tmp_path, lat_col, lon_col):
    rels = _images(tmp_path, 2)
    csv = write_csv(tmp_path / "p.csv", ["image_path", lat_col, lon_col],
                    [[rels[0], 31.26, 34.80], [rels[1], -33.5, -70.6]])
    table = load_poses(csv)
    assert table.coord_kind == "latlon"
    expected = latlon_to_xyz(np.array([31.26, -33.5]), np.array([34.80, -70.6]))
    np.testing.assert_allclose(table.xyz, expected, rtol=0, atol=1e-6)
    assert np.allclose(np.linalg.norm(table.xyz, axis=1), EARTH_RADIUS_M)


@pytest.mark.parametrize("x_col, y_col", [("easting", "northing"), ("utm_east", "utm_north"), ("x", "y"),
                                          ("Easting", "NORTHING"), ("UTM_East", "utm_North"), ("X", "Y")])
def test_metric_aliases(tmp_path, x_col, y_col):
    rels = _images(tmp_path, 2)
    csv = write_csv(tmp_path / "p.csv", ["image_path", x_col, y_col],
                    [[rels[0], 500000.5, 5000000.25], [rels[1], 500010, 5000020]])
    table = load_poses(csv)
    assert table.coord_kind == "metric"
    np.testing.assert_array_equal(table.xyz, [[500000.5, 5000000.25, 0.0], [500010, 5000020, 0.0]])
    assert np.linalg.norm(table.xyz[1] - table.xyz[0]) == pytest.approx(np.hypot(9.5, 19.75))


def test_latlon_wins_over_metric_and_first_image_alias_wins(tmp_path):
    rels = _images(tmp_path, 1)
    write_jpeg(tmp_path / "other.jpg", seed=9)
    csv = write_csv(tmp_path / "p.csv", ["file", "image_path", "x", "y", "lat", "lon"],
                    [["other.jpg", rels[0], 1, 2, 10.0, 20.0]])
    table = load_poses(csv)
    assert table.coord_kind == "latlon"
    assert table.paths == [str(tmp_path / rels[0])]  # image_path comes first in the alias list


def test_optional_columns_kept(tmp_path):
    rels = _images(tmp_path, 2)
    csv = write_csv(tmp_path / "p.csv", ["image_path", "x", "y", "Camera", "place_id", "condition"],
                    [[rels[0], 0, 0, "c1", 7, "day"], [rels[1], 5, 0, "c2", 8, "night"]])
    table = load_poses(csv)
    assert table.cameras.tolist() == ["c1", "c2"]
    assert table.labels.tolist() == ["7", "8"]
    assert table.conditions.tolist() == ["day", "night"]
    assert len(table) == 2 and len(table.frame) == 2


# --------------------------------------------------------------------------------------------
# paths
# --------------------------------------------------------------------------------------------
def test_relative_paths_resolve_against_csv_folder_not_cwd(tmp_path, monkeypatch):
    data = tmp_path / "data"
    csv = write_poses(data, [(0, 0), (3, 4)])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    table = load_poses(csv)
    assert all(Path(p).is_file() for p in table.paths)
    assert [Path(p).parent for p in table.paths] == [data / "images"] * 2


def test_relative_paths_resolve_against_image_root(tmp_path):
    root = tmp_path / "photos"
    rels = _images(root, 2, sub="sub")
    csv = write_csv(tmp_path / "csvs" / "p.csv", ["image_path", "x", "y"], [[rels[0], 0, 0], [rels[1], 1, 1]])
    with pytest.raises(VPRError, match="none of its 2 image files exists .*check --image_root") as info:
        load_poses(csv)  # not next to the CSV
    assert "--on_bad_image skip" not in str(info.value)  # skipping every row would fail too
    table = load_poses(csv, image_root=root)
    assert table.paths == [str(root / r) for r in rels]


def test_absolute_paths_kept(tmp_path):
    image = write_jpeg(tmp_path / "abs" / "a.jpg", seed=1)
    csv = write_csv(tmp_path / "csvs" / "p.csv", ["image_path", "x", "y"], [[str(image), 0, 0]])
    assert load_poses(csv, image_root=tmp_path / "nowhere").paths == [str(image)]


def test_check_images_false_skips_the_file_check(poses_csv):
    csv = poses_csv([(0, 0), (1, 1)], images=False)
    table = load_poses(csv, check_images=False)
    assert len(table) == 2
    with pytest.raises(VPRError):
        load_poses(csv)


# --------------------------------------------------------------------------------------------
# camera filter
# --------------------------------------------------------------------------------------------
def test_camera_filter_keeps_only_that_camera(tmp_path):
    cams = ["A", "B", "A", "C", "B", "A"]
    csv = write_poses(tmp_path, [(i * 10.0, 0) for i in range(6)], cameras=cams)
    table = load_poses(csv, camera_id="A")
    assert len(table) == 3
    assert table.cameras.tolist() == ["A"] * 3
    np.testing.assert_array_equal(table.xyz[:, 0], [0.0, 20.0, 50.0])
    assert [Path(p).name for p in table.paths] == ["poses_000.jpg", "poses_002.jpg", "poses_005.jpg"]
    assert len(load_poses(csv)) == 6


def test_camera_filter_with_camera_alias_and_numeric_ids(tmp_path):
    csv = write_poses(tmp_path, [(0, 0), (1, 0), (2, 0)], cameras=["1", "2", "1"],
                      columns=("image", "x", "y", "CAMERA"))
    assert len(load_poses(csv, camera_id="1")) == 2


def test_unknown_camera_lists_cameras_present(tmp_path):
    csv = write_poses(tmp_path, [(0, 0), (1, 0), (2, 0)], cameras=["phoneA", "phoneB", "phoneA"])
    with pytest.raises(VPRError) as info:
        load_poses(csv, camera_id="phoneC")
    message = str(info.value)
    assert "phoneC" in message and "phoneA" in message and "phoneB" in message


def test_camera_filter_without_camera_column(tmp_path):
    csv = write_poses(tmp_path, [(0, 0)])
    with pytest.raises(VPRError, match="camera"):
        load_poses(csv, camera_id="A")


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------
def test_missing_position_column_hints_closest_name(tmp_path):
    rels = _images(tmp_path, 1)
    csv = write_csv(tmp_path / "p.csv", ["image_path", "latitud", "longitude"], [[rels[0], 1.0, 2.0]])
    with pytest.raises(VPRError) as info:
        load_poses(csv)
    message = str(info.value)
    assert "'latitud'" in message and "'latitude'" in message
    assert str(csv) in message


def test_missing_image_column_hints_closest_name(tmp_path):
    csv = write_csv(tmp_path / "p.csv", ["imag_path", "x", "y"], [["a.jpg", 1.0, 2.0]])
    with pytest.raises(VPRError) as info:
        load_poses(csv)
    assert "'imag_path'" in str(info.value) and "'image_path'" in str(info.value)


def test_non_numeric_coordinate_names_row_and_column(tmp_path):
    rels = _images(tmp_path, 3)
    csv = write_csv(tmp_path / "p.csv", ["image_path", "lat", "lon"],
                    [[rels[0], 31.0, 34.0], [rels[1], 31.0, "34,8E"], [rels[2], 31.0, 34.0]])
    with pytest.raises(VPRError) as info:
        load_poses(csv)
    message = str(info.value)
    assert "row 3" in message  # header is line 1, so the second data row is line 3
    assert "'lon'" in message and "34,8E" in message


def test_empty_coordinate_is_an_error(tmp_path):
    rels = _images(tmp_path, 2)
    csv = write_csv(tmp_path / "p.csv", ["image_path", "x", "y"], [[rels[0], 1, 2], [rels[1], "", 3]])
    with pytest.raises(VPRError, match=r"row 3.*'x'"):
        load_poses(csv)


def test_error_rows_are_file_lines_after_camera_filter(tmp_path):
    """Row numbers in messages must point at the line of the file the user edits, also when
    --camera_id dropped rows before the check."""
    cams = ["A", "B", "A", "B"]
    csv = write_poses(tmp_path, [(0, 0), (1, 0), (2, 0), (3, 0)], cameras=cams)
    lines = csv.read_text().splitlines()
    cells = lines[4].split(",")  # file line 5 = 4th data row, camera B
    cells[1] = "oops"
    lines[4] = ",".join(cells)
    csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(VPRError, match="row 5"):
        load_poses(csv, camera_id="B")


def test_missing_image_file_names_row(tmp_path):
    csv = write_poses(tmp_path, [(0, 0), (1, 0), (2, 0)])
    missing = tmp_path / "images" / "poses_001.jpg"
    missing.unlink()
    with pytest.raises(VPRError) as info:
        load_poses(csv)
    message = str(info.value)
    assert "row 3" in message and str(missing) in message


def test_duplicate_rows(tmp_path):
    rels = _images(tmp_path, 2)
    csv = write_csv(tmp_path / "p.csv", ["image_path", "x", "y"],
                    [[rels[0], 0, 0], [rels[1], 1, 1], [rels[0], 0, 0]])
    with pytest.raises(VPRError) as info:
        load_poses(csv)
    assert "row 4" in str(info.value) and "twice" in str(info.value)


def test_duplicate_detected_on_resolved_path(tmp_path):
    rels = _images(tmp_path, 1)
    csv = write_csv(tmp_path / "p.csv", ["image_path", "x", "y"],
                    [[rels[0], 0, 0], [str(tmp_path / rels[0]), 0, 0]])
    with pytest.raises(VPRError, match="row 3"):
        load_poses(csv)


@pytest.mark.parametrize("second", ["absolute", "./images/im0.jpg", "images/../images/im0.jpg"])
def test_duplicate_detected_when_the_csv_is_given_relative(tmp_path, monkeypatch, second):
    """The CSV named relative to the working directory: its relative rows stay relative paths,
    and the same image listed absolute (or spelt otherwise) is still the same image."""
    rels = _images(tmp_path, 1)
    other = str(tmp_path / rels[0]) if second == "absolute" else second
    write_csv(tmp_path / "p.csv", ["image_path", "x", "y"], [[rels[0], 0, 0], [other, 0, 0]])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(VPRError, match="row 3.*listed twice"):
        load_poses("p.csv")


@pytest.mark.parametrize("lat, lon, what", [(95.0, 10.0, "latitude"), (-90.5, 10.0, "latitude"),
                                            (10.0, 181.0, "longitude"), (10.0, -200.0, "longitude")])
def test_latlon_out_of_range(tmp_path, lat, lon, what):
    rels = _images(tmp_path, 2)
    csv = write_csv(tmp_path / "p.csv", ["image_path", "lat", "lon"], [[rels[0], 1.0, 1.0], [rels[1], lat, lon]])
    with pytest.raises(VPRError, match=rf"row 3.*{what}"):
        load_poses(csv)


def test_a_metric_coordinate_beyond_the_earth_is_one_line_not_an_overflow_warning(tmp_path, capfd):
    rels = _images(tmp_path, 2)
    csv = write_csv(tmp_path / "p.csv", ["image_path", "easting", "northing"], [[rels[0], 1e300, 0], [rels[1], 3, 4]])
    with pytest.raises(VPRError, match=r"row 2, column 'easting': 1e\+300 m is beyond"):
        load_poses(csv)
    assert capfd.readouterr().err == ""


def test_latlon_at_the_limits_accepted(tmp_path):
    rels = _images(tmp_path, 2)
    csv = write_csv(tmp_path / "p.csv", ["image_path", "lat", "lon"], [[rels[0], 90.0, 180.0], [rels[1], -90.0,
                                                                                                -180.0]])
    assert len(load_poses(csv)) == 2


def test_empty_file(tmp_path):
    csv = tmp_path / "p.csv"
    csv.write_text("")
    with pytest.raises(VPRError, match="empty"):
        load_poses(csv)


def test_header_only(tmp_path):
    csv = write_csv(tmp_path / "p.csv", ["image_path", "lat", "lon"], [])
    with pytest.raises(VPRError, match="no rows"):
        load_poses(csv)


def test_missing_csv(tmp_path):
    with pytest.raises(VPRError, match="not found"):
        load_poses(tmp_path / "nope.csv")


def test_subset_keeps_everything_aligned(tmp_path):
    csv = write_poses(tmp_path, [(i, 2 * i) for i in range(5)], cameras=list("abcde"))
    table = load_poses(csv)
    sub = table.subset(np.array([4, 1]))
    assert sub.cameras.tolist() == ["e", "b"]
    np.testing.assert_array_equal(sub.xyz[:, :2], [[4, 8], [1, 2]])
    assert sub.paths == [table.paths[4], table.paths[1]]
    assert sub.frame["camera_id"].tolist() == ["e", "b"]


# --------------------------------------------------------------------------------------------
# real data
# --------------------------------------------------------------------------------------------
@requires_shared
def test_real_bgu_campus_camera_filter():
    csv = SHARED / "bgu_campus" / "all.csv"
    every = load_poses(csv, check_images=False)
    a = load_poses(csv, camera_id="phoneA", check_images=False)
    b = load_poses(csv, camera_id="phoneB", check_images=False)
    assert (len(every), len(a), len(b)) == (1475, 849, 626)
    assert set(a.cameras) == {"phoneA"} and set(b.cameras) == {"phoneB"}
    assert every.coord_kind == "latlon"
    # the campus is about 330 m x 75 m: no two images more than ~1 km apart
    span = every.xyz.max(0) - every.xyz.min(0)
    assert np.linalg.norm(span) < 1000.0


@requires_shared
def test_real_val_csv_images_exist():
    table = load_poses(SHARED / "bgu_campus" / "val.csv")
    assert len(table) == 95
    assert all(os.path.isfile(p) for p in table.paths)


@requires_shared
def test_real_gardens_point_metric():
    table = load_poses(SHARED / "gardens_point_mini" / "database_night.csv")
    assert table.coord_kind == "metric" and len(table) == 10
    steps = np.linalg.norm(np.diff(table.xyz, axis=0), axis=1)
    np.testing.assert_allclose(steps, 10.0)
