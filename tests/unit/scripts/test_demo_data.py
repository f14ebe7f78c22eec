"""The built-in demo data set (demo_route.py): which pictures each CSV holds, where they were
taken, day and night, determinism, reuse of a complete data set, and the command line.
Small num_places keeps each case to a second or two."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import demo_data
from vprkit.tables import demo_route
from vprkit.tables.pairs import nearest_distance_m
from vprkit.tables.places import latlon_to_xyz, load_poses
from vprkit.tables.demo_route import CSV_COLUMNS, SPLITS, generate_demo_dataset
from vprkit.cli import VPRError

NUM_PLACES, SPACING_M = 10, 18.0
STRETCHES = {"train": range(5), "val": range(5, 7), "test": range(7, 10), "all": range(10)}  # 50/20/30 %


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    start = time.perf_counter()
    data = generate_demo_dataset(out, seed=3, num_places=NUM_PLACES, spacing_m=SPACING_M)
    return data, time.perf_counter() - start


def _rows(data, split: str) -> pd.DataFrame:
    rows = pd.read_csv(data.csvs[split])
    rows["drive"] = [Path(p).parent.name for p in rows.image_path]
    rows["place"] = [int(Path(p).stem) for p in rows.image_path]
    rows["xyz"] = list(latlon_to_xyz(rows.lat.to_numpy(), rows.lon.to_numpy()))
    return rows


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_each_csv_holds_its_drives_over_its_stretch(demo):
    data, seconds = demo
    assert demo_route.stretches(NUM_PLACES) == STRETCHES
    expected = {  # (drive, places)
        "database": {(demo_route.DAY_A.name, p) for p in STRETCHES["all"]},
        "train": {(d.name, p) for d in (demo_route.DAY_A, demo_route.NIGHT_A,
                                        demo_route.NIGHT_A2) for p in STRETCHES["train"]}
        | {(demo_route.DAY_A.name, p) for p in STRETCHES["val"]},
        "val": {(d.name, p) for d in (demo_route.DAY_B, demo_route.NIGHT_B) for p in STRETCHES["val"]},
        "test": {(d.name, p) for d in (demo_route.DAY_B, demo_route.NIGHT_B) for p in STRETCHES["test"]},
    }
    for split in SPLITS:
        rows = _rows(data, split)
        assert tuple(pd.read_csv(data.csvs[split]).columns) == CSV_COLUMNS
        assert set(zip(rows.drive,
                       rows.place)) == expected[split] and len(rows) == len(expected[split]) == data.counts[split]
        assert set(rows.camera_id) == {"side"}
        assert all(not Path(p).is_absolute() and (data.root / p).is_file() for p in rows.image_path)
    assert data.num_images == 10 + (3 * 5 + 2) + 2 * 2 + 2 * 3  # rows: day A pictures are in two CSVs
    assert len(list(data.root.rglob("*.jpg"))) == 10 + 2 * 5 + 2 * 5  # day A, nights A, drive B: written once
    assert seconds < 10, f"{seconds:.1f} s for {data.num_images} rows"


def test_database_is_day_training_has_both_conditions_queries_both(demo):
    data, _ = demo
    conditions = {split: sorted(set(_rows(data, split).condition)) for split in SPLITS}
    assert conditions == {"database": ["day"], "train": ["day", "night"], "val": ["day", "night"], "test": ["day",
                                                                                                            "night"]}
    assert conditions == data.conditions
    table = load_poses(data.train_csv)  # the suite's own loader reads the condition column
    assert sorted(set(table.conditions)) == ["day", "night"]


def test_night_pictures_are_darker_and_bluer(demo):
    data, _ = demo
    rows = pd.concat([_rows(data, "train"), _rows(data, "test")])
    means = {}
    for condition, group in rows.groupby("condition"):
        pixels = []
        for path in group.image_path:
            with Image.open(data.root / path) as image:
                assert image.format == "JPEG" and image.size == (256, 192)
                pixels.append(np.asarray(image, np.float32).reshape(-1, 3).mean(0))
        means[condition] = np.mean(pixels, axis=0)
    assert means["night"].mean() < 0.6 * means["day"].mean()
    assert means["night"][2] > means["night"][0]  # blue over red by night


def test_places_lie_along_the_route_spacing_apart(demo):
    data, _ = demo
    rows = pd.concat([_rows(data, split) for split in SPLITS])
    origin = latlon_to_xyz(np.array([demo_route.ORIGIN_LATLON[0]]), np.array([demo_route.ORIGIN_LATLON[1]]))[0]
    along = np.array([np.linalg.norm(x - origin) for x in rows.xyz])
    error = along - rows.place.to_numpy() * SPACING_M  # GPS noise of 1 m (sd) along the route
    assert np.abs(error).max() < 5.0 and 0.3 < error.std() < 2.0, error
    database = _rows(data, "database").sort_values("place")
    steps = np.linalg.norm(np.diff(np.stack(database.xyz), axis=0), axis=1)
    assert np.all(np.abs(steps - SPACING_M) < 7.0), steps
    # every val and test query has its place's database picture within the 25 m positive radius
    for split in ("val", "test"):
        nearest = nearest_distance_m(np.stack(database.xyz), np.stack(_rows(data, split).xyz))
        assert nearest.max() < 8.0


def test_route_latlon_is_metric():
    lat, lon = demo_route.route_latlon(np.array([0.0, 500.0, 1500.0]))
    xyz = latlon_to_xyz(lat, lon)
    assert np.allclose(np.linalg.norm(xyz[1:] - xyz[0], axis=1), [500.0, 1500.0], atol=0.001)
    assert np.allclose((lat[0], lon[0]), demo_route.ORIGIN_LATLON, rtol=0, atol=1e-12)


def test_same_seed_gives_byte_identical_files_other_seed_differs(tmp_path):
    a = generate_demo_dataset(tmp_path / "a", seed=7, num_places=4)
    b = generate_demo_dataset(tmp_path / "b", seed=7, num_places=4)
    c = generate_demo_dataset(tmp_path / "c", seed=8, num_places=4)
    snap_a, snap_b, snap_c = _snapshot(a.root), _snapshot(b.root), _snapshot(c.root)
    assert len(snap_a) == 4 + 2 * 2 + 2 * 2 + len(SPLITS) + 1  # day A, nights A, drive B, CSVs, manifest
    assert snap_a == snap_b
    picture = f"images/{demo_route.DAY_A.name}/001.jpg"
    assert snap_c[picture] != snap_a[picture] and snap_c["test.csv"] != snap_a["test.csv"]


def test_complete_data_set_is_reused_other_parameters_or_a_lost_file_regenerate(tmp_path):
    assert generate_demo_dataset(tmp_path, seed=1, num_places=5).generated
    reference = _snapshot(tmp_path)
    again = generate_demo_dataset(tmp_path, seed=1, num_places=5)
    assert not again.generated and again.counts == json.loads((tmp_path / "manifest.json").read_text())["counts"]

    smaller = generate_demo_dataset(tmp_path, seed=1, num_places=4)
    assert smaller.generated and not (tmp_path / "images" / demo_route.DAY_A.name / "004.jpg").exists()  # stale
    assert generate_demo_dataset(tmp_path, seed=1, num_places=5).generated
    assert _snapshot(tmp_path) == reference

    (tmp_path / "images" / demo_route.NIGHT_B.name / "004.jpg").unlink()  # a file lost
    assert generate_demo_dataset(tmp_path, seed=1, num_places=5).generated
    (tmp_path / demo_route.MANIFEST_NAME).unlink()  # killed before the manifest was written
    assert generate_demo_dataset(tmp_path, seed=1, num_places=5).generated
    assert _snapshot(tmp_path) == reference
    assert generate_demo_dataset(tmp_path, seed=1, num_places=5, force=True).generated


@pytest.mark.parametrize("kwargs, flag", [(dict(num_places=3), "--num_places"), (dict(spacing_m=0.0), "--spacing_m"),
                                          (dict(seed=-1), "--seed")])
def test_rejects_bad_parameters(tmp_path, kwargs, flag):
    with pytest.raises(VPRError, match=flag):
        generate_demo_dataset(tmp_path, **kwargs)


@pytest.mark.parametrize("argv, says", [(["--nonsense"], "unrecognized arguments: --nonsense"),
                                        (["--num_places", "2"], "--num_places must be at least 4")])
@pytest.mark.slow
def test_command_line_answers_a_bad_flag_with_one_line_and_exit_code_2(tmp_path, argv, says):
    done = subprocess.run([sys.executable, str(Path(demo_data.__file__)), str(tmp_path / "out"), *argv],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and says in done.stderr and done.stderr.startswith("error: ")
