"""make_poses.py on a real folder of photos written by Pillow with EXIF GPS: the right rows in
both hemispheres, photos without GPS left out with one warning, a CSV the loaders read as it is."""
from __future__ import annotations

import csv

import numpy as np
import pytest

import make_poses
from vprkit.tables.places import latlon_to_xyz, load_poses
from vprkit.tables.load import load_table
from helpers import assert_one_line_error, run_main, run_processes_at_once
from helpers.exif_photos import BEER_SHEVA, NEW_YORK, NEW_YORK_DEGREES, SYDNEY, photo_exif, save_photo

# file -> (EXIF, expected row). Sorted by path, as make_poses walks.
PHOTOS = {
    "campus/IMG_0001.JPG": (photo_exif(**BEER_SHEVA, make="samsung", model="SM-S911B", taken="2023:12:22 16:05:11"),
                            ["campus/IMG_0001.JPG", 31.26, 34.80, "samsung SM-S911B", "2023-12-22T16:05:11"]),
    "campus/night/b.jpeg": (photo_exif(**BEER_SHEVA, make="samsung", model="SM-S911B", orientation=6,
                                       taken="2023:12:22 18:40:00"),
                            ["campus/night/b.jpeg", 31.26, 34.80, "samsung SM-S911B", "2023-12-22T18:40:00"]),
    "harbour.png": (photo_exif(**SYDNEY, make="DJI", model="FC3170", modified="2024:01:05 07:30:00"),
                    ["harbour.png", -33.87, 151.21, "DJI FC3170", "2024-01-05T07:30:00"]),
    "street.webp": (photo_exif(**NEW_YORK), ["street.webp", *NEW_YORK_DEGREES, "unknown", ""]),
}


def photo_folder(folder, *, without_gps: int = 1, broken: int = 1):
    """PHOTOS, plus photos without GPS, broken files, and files that are not images (ignored)."""
    for name, (exif, _) in PHOTOS.items():
        save_photo(folder / name, exif=exif)
    for i in range(without_gps):
        save_photo(folder / f"scans/no_gps_{i}.jpg", exif=photo_exif(make="Canon", model="Canon EOS R6"))
    for i in range(broken):
        (folder / f"broken_{i}.jpg").write_bytes(b"half a file")
    (folder / "notes.txt").write_text("not a photo")
    save_photo(folder / ".thumbnails/IMG_0001.jpg", exif=photo_exif(**SYDNEY))  # hidden: left out
    return folder


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def assert_rows(rows, expected):
    assert rows[0] == list(make_poses.CSV_COLUMNS)
    assert len(rows) - 1 == len(expected)
    for row, want in zip(rows[1:], expected):
        assert row[0] == want[0] and row[3:] == want[3:], (row, want)
        assert abs(float(row[1]) - want[1]) < 1e-6 and abs(float(row[2]) - want[2]) < 1e-6, (row, want)


def test_folder_of_photos_becomes_poses_csv(tmp_path, capsys):
    folder = photo_folder(tmp_path / "photos", without_gps=2, broken=1)
    output = folder / "poses.csv"
    make_poses.main([str(folder), "--output", str(output)])
    out, err = capsys.readouterr()
    assert out.strip() == f"wrote 4 rows to {output}"
    warnings = err.strip().splitlines()
    assert len(warnings) == 2, err
    assert warnings[0].startswith("warning: 2 of 7 image files")
    assert "no GPS" in warnings[0] and "scans/no_gps_0.jpg" in warnings[0]
    assert warnings[1].startswith("warning: 1 of 7 image files") and "not readable" in warnings[1]
    assert_rows(read_rows(output), [want for _, want in PHOTOS.values()])

    table = load_table(output)  # no --image_root: paths resolve against the CSV's folder
    assert table.coord_kind == "latlon"
    assert table.paths == [str(folder / name) for name in PHOTOS]
    expected = np.array([want[1:3] for _, want in PHOTOS.values()], dtype=np.float64)
    np.testing.assert_allclose(table.xyz, latlon_to_xyz(expected[:, 0], expected[:, 1]), atol=0.05)  # metres
    assert list(table.cameras) == [want[3] for _, want in PHOTOS.values()]
    assert load_poses(output).paths == table.paths


def test_csv_outside_the_folder_resolves_too_and_output_is_deterministic(tmp_path, capsys):
    folder = photo_folder(tmp_path / "photos")
    first, second = tmp_path / "lists" / "a.csv", tmp_path / "lists" / "b.csv"
    make_poses.main([str(folder), "--output", str(first)])
    make_poses.main([str(folder), "--output", str(second)])
    assert first.read_bytes() == second.read_bytes()
    assert read_rows(first)[1][0] == "../photos/campus/IMG_0001.JPG"
    assert load_table(first).paths == [str(first.parent / "../photos" / name) for name in PHOTOS]


def test_existing_output_is_kept_unless_overwrite(tmp_path, capsys):
    folder = photo_folder(tmp_path / "photos", without_gps=0, broken=0)
    output = tmp_path / "poses.csv"
    output.write_text("precious\n")
    code, err = run_main(capsys, make_poses.main, [str(folder), "--output", str(output)])
    assert_one_line_error(code, err, str(output), "--overwrite")
    assert output.read_text() == "precious\n"
    make_poses.main([str(folder), "--output", str(output), "--overwrite"])
    assert len(read_rows(output)) == 1 + len(PHOTOS)


@pytest.mark.parametrize("case", ["missing", "empty", "only_text", "bad_flag"])
def test_bad_folders_and_flags_are_one_line(tmp_path, capsys, case):
    folder = tmp_path / "photos"
    if case != "missing":
        folder.mkdir()
    if case == "only_text":
        (folder / "readme.txt").write_text("no photos here")
    argv = [str(folder), "--output", str(tmp_path / "poses.csv")] + (["--ouput", "x"] if case == "bad_flag" else [])
    code, err = run_main(capsys, make_poses.main, argv)
    assert_one_line_error(code, err, "--ouput" if case == "bad_flag" else str(folder))
    assert not (tmp_path / "poses.csv").exists()


@pytest.mark.slow
def test_folder_without_any_gps_is_one_line_exit_2_as_a_real_process(tmp_path):
    folder = photo_folder(tmp_path / "no_gps", without_gps=3, broken=1)
    for name in PHOTOS:
        (folder / name).unlink()
    output = tmp_path / "poses.csv"
    code, out, err = run_processes_at_once({"run": ["make_poses.py", str(folder), "--output", str(output)]})["run"]
    assert_one_line_error(code, err, str(folder), "3 without GPS", "1 unreadable")
    assert out == "" and not output.exists()
