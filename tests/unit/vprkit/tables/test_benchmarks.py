"""Benchmark layouts as inputs (issue 19 §1): folders of @-named images exactly as
gmberton/VPR-datasets-downloader names them, MSLS city folders, GSV-Cities dataframes; read by
load_table (so by every --*_csv flag), by make_poses.py, and end to end by eval_trained --baseline."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

import eval_trained
import localize
import make_poses
from helpers import TINY, assert_one_line_error, haversine_m, run_main, write_csv, write_jpeg
from vprkit.tables.benchmarks import parse_at_name
from vprkit.cli import VPRError
from vprkit.tables.places import latlon_to_xyz
from vprkit.tables.load import load_table

def coord(num: float, left: int, right: int) -> str:
    """The downloader's util.format_coord: `left` integer digits (sign included), `right` decimals."""
    return f"{float(num):0={left + right + 1}.{right}f}"


def downloader_name(east: float, north: float, zone: int, letter: str, lat: float, lon: float, pano_id: str = "",
                    tile: str = "", heading: str = "", timestamp: str = "", note: str = "") -> str:
    """A name as util.get_dst_image_name writes it (roll, height and pitch left empty)."""
    return (f"@{coord(east, 7, 2)}@{coord(north, 7, 2)}@{zone:02d}@{letter}@{coord(lat, 3, 5)}@{coord(lon, 4, 5)}"
            f"@{pano_id}@{tile}@{heading}@@@@{timestamp}@{note}@.jpg")


def nordland_name(index: int) -> str:
    """download_nordland.py's name: UTM east 0, north 2.38 m per frame, no zone, no lat/lon."""
    return f"@0@{coord(index * 25 / 10.5, 5, 1)}@@@@@{index}@@@@@@@@.jpg"


def write_folder(folder: Path, names: list[str], seed: int = 0) -> Path:
    for i, name in enumerate(names):
        write_jpeg(folder / name, seed=seed * 1000 + i)
    return folder


# Four places 100 m apart in Pittsburgh's zone 17T; database 2 images per place, queries 1 per
# place plus one query 1 km from every database image (no positive: a miss).
EAST0, NORTH0 = 584_425.35, 4_477_255.86


def msls_like_names(kind: str) -> list[str]:
    if kind == "database":
        spots = [(p * 100.0 + dx, 0.0) for p in range(4) for dx in (0.0, 3.0)]
        notes = ["day_forward_cph"] * len(spots)
    else:
        spots = [(p * 100.0 + 5.0, 2.0) for p in range(4)] + [(1000.0, 1000.0)]
        notes = ["night_forward_cph", "day_sideways_cph", "night_backward_cph", "day_forward_cph", "night_forward_cph"]
    return [downloader_name(EAST0 + dx, NORTH0 + dy, 17, "T", 40.44 + dy * 1e-5, -79.99 + dx * 1e-5,
                            pano_id=f"key{kind[0]}{i:03d}", timestamp="20170512", note=note)
            for i, ((dx, dy), note) in enumerate(zip(spots, notes))]


def pairwise(xyz: np.ndarray) -> np.ndarray:
    return np.linalg.norm(xyz[:, None] - xyz[None], axis=2)


# --------------------------------------------------------------------------------------------
# @-named folders
# --------------------------------------------------------------------------------------------
def test_downloader_name_fields_are_read_as_written():
    name = downloader_name(584425.354, 4477255.861, 17, "T", 40.44222, -79.99531, pano_id="abc_DEF-1",
                           tile="03", heading="090", timestamp="20170512_081500", note="night_forward_cph")
    assert name == ("@0584425.35@4477255.86@17@T@040.44222@-079.99531@abc_DEF-1@03@090@@@@20170512_081500"
                    "@night_forward_cph@.jpg")
    parsed = parse_at_name(name)
    assert (parsed.east, parsed.north, parsed.zone, parsed.hemisphere) == (584425.35, 4477255.86, "17T", "N")
    assert parsed.fields["pano_id"] == "abc_DEF-1" and parsed.fields["heading"] == "090"
    assert parsed.condition == "night"
    nordland = parse_at_name(nordland_name(7))
    assert nordland_name(7) == "@0@00016.7@@@@@7@@@@@@@@.jpg"
    assert (nordland.east, nordland.north, nordland.zone, nordland.condition) == (0.0, 16.7, "", None)


def test_at_folder_positions_are_the_utm_metres_and_notes_give_conditions(tmp_path):
    names = msls_like_names("queries")
    folder = write_folder(tmp_path / "queries" / "sub", names).parent  # searched recursively
    table = load_table(folder)
    assert table.coord_kind == "metric" and len(table) == 5
    parsed = [parse_at_name(n) for n in sorted(names)]
    assert [Path(p).name for p in table.paths] == sorted(names)
    utm = np.array([[p.east, p.north] for p in parsed])
    np.testing.assert_allclose(pairwise(table.xyz), pairwise(np.c_[utm, np.zeros(5)]), atol=1e-6)
    np.testing.assert_allclose(table.xyz[:, :2], utm)
    assert table.conditions.tolist() == [p.condition for p in parsed]
    assert sorted(set(table.conditions)) == ["day", "night"]
    assert table.labels is None


def test_nordland_like_folder_without_lat_lon_or_zone(tmp_path):
    folder = write_folder(tmp_path / "winter", [nordland_name(i) for i in (0, 1, 11, 12)])
    table = load_table(folder)
    assert table.coord_kind == "metric" and table.conditions is None
    north = np.sort(table.xyz[:, 1])
    np.testing.assert_allclose(north, [0.0, 2.4, 26.2, 28.6])  # frames 10 apart are within 25 m, 11 apart not
    assert pairwise(table.xyz)[0, 1] == pytest.approx(2.4)


def test_folder_across_two_utm_zones_is_an_error_but_two_latitude_bands_are_not(tmp_path):
    band = write_folder(tmp_path / "band", [downloader_name(EAST0, NORTH0, 17, "S", 40, -80),
                                            downloader_name(EAST0, NORTH0 + 9, 17, "T", 40, -80)])
    assert len(load_table(band)) == 2
    zones = write_folder(tmp_path / "zones", [downloader_name(EAST0, NORTH0, 17, "T", 40, -80),
                                              downloader_name(EAST0, NORTH0, 18, "T", 40, -78)])
    with pytest.raises(VPRError, match=r"2 UTM zones \(17N: @.*; 18N: @.*\).*not comparable") as exc:
        load_table(zones)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("bad, words", [
    ("IMG_0001.jpg", ["IMG_0001.jpg", "not named like VPR-datasets-downloader's"]),
    ("@east@4477255.86@17@T@@@@@@@@@@@.jpg", ["@east@4477255.86", "utm_east 'east' is not a number"]),
    ("@584425.35@@17@T@@@@@@@@@@@.jpg", ["utm_north '' is not a number"]),
])
def test_a_badly_named_image_is_one_line_naming_the_file(tmp_path, capsys, bad, words):
    folder = write_folder(tmp_path / "db", msls_like_names("database")[:2] + [bad])
    with pytest.raises(VPRError) as exc:
        load_table(folder)
    assert str(folder / bad) in str(exc.value)
    for word in words:
        assert word in str(exc.value)
    code, err = run_main(capsys, make_poses.main, [str(folder), "--output", str(tmp_path / "poses.csv")])
    assert_one_line_error(code, err, bad, *words)
    assert not (tmp_path / "poses.csv").exists()


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(VPRError, match="no image files"):
        load_table(tmp_path / "empty")


def test_make_poses_on_a_downloader_folder_writes_the_same_table(tmp_path, capsys):
    folder = write_folder(tmp_path / "queries", msls_like_names("queries"))
    output = tmp_path / "out" / "queries.csv"
    make_poses.main([str(folder), "--output", str(output)])
    assert "wrote 5 rows" in capsys.readouterr().out
    with open(output, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows[0]["image_path"].startswith("../queries/@")  # relative to the CSV's folder
    assert {"lat", "lon"}.isdisjoint(rows[0])  # positions from the UTM fields only
    from_csv, from_folder = load_table(output), load_table(folder)
    assert from_csv.coord_kind == from_folder.coord_kind == "metric"
    np.testing.assert_allclose(from_csv.xyz, from_folder.xyz)
    assert from_csv.conditions.tolist() == from_folder.conditions.tolist()
    assert [Path(p).resolve() for p in from_csv.paths] == [Path(p).resolve() for p in from_folder.paths]


# --------------------------------------------------------------------------------------------
# MSLS city folders
# --------------------------------------------------------------------------------------------
def write_msls_city(folder: Path) -> Path:
    """A query/ folder of an MSLS city: postprocessed.csv, raw.csv (one panorama), images/{key}.jpg."""
    keys = ["k0", "k1", "k2", "pano3"]
    utm = [(584425.0, 4477255.0), (584435.0, 4477255.0), (584425.0, 4477295.0), (584426.0, 4477256.0)]
    write_csv(folder / "postprocessed.csv", ["", "key", "easting", "northing", "unique_cluster", "control_panel",
                                             "night", "view_direction"],
              [[i, k, e, n, 7, 0, night, "Forward"] for i, (k, (e, n), night)
               in enumerate(zip(keys, utm, ["False", "True", "False", "False"]))])
    write_csv(folder / "raw.csv", ["", "key", "lon", "lat", "ca", "captured_at", "pano"],
              [[i, k, -79.99 + i * 1e-4, 40.44, 90.0, 1494579600000, pano] for i, (k, pano)
               in enumerate(zip(keys, ["False", "False", "False", "True"]))])
    for i, key in enumerate(keys):
        write_jpeg(folder / "images" / f"{key}.jpg", seed=i)
    return folder


def test_msls_postprocessed_gives_utm_positions_night_conditions_and_drops_panoramas(tmp_path):
    city = write_msls_city(tmp_path / "train_val" / "cph" / "query")
    for source in (city, city / "postprocessed.csv"):
        table = load_table(source)
        assert [Path(p).name for p in table.paths] == ["k0.jpg", "k1.jpg", "k2.jpg"]
        assert all(Path(p).is_file() for p in table.paths)
        assert table.coord_kind == "metric"
        np.testing.assert_allclose(pairwise(table.xyz)[0], [0.0, 10.0, 40.0])
        assert table.conditions.tolist() == ["day", "night", "day"]
        assert table.labels is None  # MSLS's positives are by distance


def test_msls_city_folder_itself_says_which_subfolder_to_give(tmp_path):
    write_msls_city(tmp_path / "cph" / "query")
    with pytest.raises(VPRError, match="an MSLS city; give its query/ or database/ folder"):
        load_table(tmp_path / "cph")


def test_msls_raw_csv_gives_lat_lon(tmp_path):
    city = write_msls_city(tmp_path / "query")
    table = load_table(city / "raw.csv")
    assert table.coord_kind == "latlon" and len(table) == 3
    np.testing.assert_allclose(table.xyz, latlon_to_xyz(np.full(3, 40.44), -79.99 + np.arange(3) * 1e-4))


def test_msls_csv_without_its_columns_is_an_error(tmp_path):
    write_csv(tmp_path / "postprocessed.csv", ["", "key", "x"], [[0, "k0", 1]])
    with pytest.raises(VPRError, match=r"postprocessed.csv: no column\(s\) easting, northing, night"):
        load_table(tmp_path / "postprocessed.csv")


# --------------------------------------------------------------------------------------------
# GSV-Cities dataframes
# --------------------------------------------------------------------------------------------
GSV_ROWS = [  # place_id, year, month, northdeg, city_id, lat, lon, panoid
    (13, 2016, 7, 90, "London", 51.5074, -0.1278, "pAnO_1"),
    (13, 2019, 11, 270, "London", 51.50741, -0.12781, "pAnO-2"),
    (140, 2008, 3, 5, "London", 51.52, -0.1, "x3"),
]


def test_gsv_cities_dataframe_rebuilds_the_dataset_image_paths_and_labels(tmp_path):
    base = tmp_path / "gsv_cities"
    csv_path = write_csv(base / "Dataframes" / "London.csv",
                         ["place_id", "year", "month", "northdeg", "city_id", "lat", "lon", "panoid"], GSV_ROWS)
    expected = ["London_0000013_2016_07_090_51.5074_-0.1278_pAnO_1.jpg",   # GSVCitiesDataset.get_img_name
                "London_0000013_2019_11_270_51.50741_-0.12781_pAnO-2.jpg",
                "London_0000140_2008_03_005_51.52_-0.1_x3.jpg"]
    for i, name in enumerate(expected):
        write_jpeg(base / "Images" / "London" / name, seed=i)
    table = load_table(csv_path)
    assert [Path(p).relative_to(base).as_posix() for p in table.paths] == [f"Images/London/{n}" for n in expected]
    assert table.labels.tolist() == ["London_0000013", "London_0000013", "London_0000140"]
    assert table.coord_kind == "latlon"
    assert pairwise(table.xyz)[0, 1] == pytest.approx(haversine_m(51.5074, -0.1278, 51.50741, -0.12781), abs=1e-3)


def test_gsv_cities_missing_image_names_the_rebuilt_path(tmp_path):
    csv_path = write_csv(tmp_path / "Dataframes" / "London.csv",
                         ["place_id", "year", "month", "northdeg", "city_id", "lat", "lon", "panoid"], GSV_ROWS)
    with pytest.raises(VPRError, match=r"none of its 3 image files exists \(e.g. .*Images/London/London_0000013_2016"):
        load_table(csv_path)


# --------------------------------------------------------------------------------------------
# end to end: eval_trained --baseline on a downloaded benchmark's test/database and test/queries
# --------------------------------------------------------------------------------------------
def test_eval_trained_baseline_on_downloader_folders(tmp_path, capsys):
    test = tmp_path / "pitts_like" / "images" / "test"
    write_folder(test / "database", msls_like_names("database"), seed=1)
    write_folder(test / "queries", msls_like_names("queries"), seed=2)
    report = eval_trained.main(["--baseline", *TINY, "--db_csv", str(test / "database"),
                                "--test_csv", str(test / "queries"), "--recall_at", "1", "8",
                                "--cache_dir", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    assert "5 queries, 1 without a database image within 25 m (counted as misses)" in out
    assert "R@1" in out and "R@8" in out
    # R@8 = every database image retrieved: exactly the 4 queries with a positive out of 5
    assert report.result.recalls[8] == pytest.approx(0.8)
    assert report.result.num_queries_without_positive == 1
    assert "night" in out and "day" in out  # the condition breakdown from the notes


def test_localize_takes_a_downloader_folder_as_database(tmp_path, capsys):
    database = write_folder(tmp_path / "database", msls_like_names("database"), seed=1)
    queries = write_folder(tmp_path / "queries", msls_like_names("queries")[:2], seed=2)
    frame = localize.main(["--baseline", *TINY, "--db_csv", str(database), "--query", str(queries), "--top_k", "2",
                           "--output", str(tmp_path / "matches.csv"), "--cache_dir", str(tmp_path / "cache")])
    assert len(frame) == 4 and {"db_easting", "db_northing", "est_easting"} <= set(frame.columns)
    assert set(frame["db_easting"]) <= {parse_at_name(n).east for n in msls_like_names("database")}


def test_database_and_queries_in_two_utm_zones_are_refused_before_any_work(tmp_path, capsys):
    """The same UTM metres in zone 17 and in zone 18 are 500 km apart: no recall is printed."""
    database = write_folder(tmp_path / "database", msls_like_names("database"), seed=1)
    queries = write_folder(tmp_path / "queries", [name.replace("@17@T@", "@18@T@") for name in
                                                  msls_like_names("queries")], seed=2)
    argv = ["--baseline", *TINY, "--db_csv", str(database), "--test_csv", str(queries),
            "--cache_dir", str(tmp_path / "cache")]
    code, err = run_main(capsys, eval_trained.main, argv)
    assert_one_line_error(code, err, "UTM zone 18N", "17N", "not comparable")
    assert not (tmp_path / "cache").exists()
