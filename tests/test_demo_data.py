"""The built-in synthetic demo data set (demo_data.py): CSV contract, GPS geometry,
determinism, the skip-if-complete logic, and speed. Small num_places keeps it to seconds."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import demo_data  # noqa: E402
from demo_data import CSV_COLUMNS, SPLITS, TRAVERSALS, generate_demo_dataset, haversine_m, local_to_latlon, place_of  # noqa: E402

NUM_PLACES = 6
SPACING_M = 18.0


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    start = time.perf_counter()
    data = generate_demo_dataset(out, seed=3, num_places=NUM_PLACES, spacing_m=SPACING_M)
    return data, time.perf_counter() - start


def _all_rows(data) -> pd.DataFrame:
    frames = [pd.read_csv(path).assign(split=split) for split, path in data.csvs.items()]
    rows = pd.concat(frames, ignore_index=True)
    rows["traversal"] = [Path(p).parent.name for p in rows.image_path]
    rows["place"] = [place_of(p) for p in rows.image_path]
    return rows


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generation_is_fast(demo):
    data, seconds = demo
    assert data.generated
    # ~45 ms an image on one core here; generous for a loaded CI machine.
    assert seconds / data.num_images < 0.3, f"{seconds:.1f} s for {data.num_images} images"


def test_csvs_have_the_contract_columns_and_one_row_per_image(demo):
    data, _ = demo
    for split in SPLITS:
        frame = pd.read_csv(data.csvs[split])
        assert tuple(frame.columns) == CSV_COLUMNS
        traversals = [t for t in TRAVERSALS if t.split == split]
        assert len(frame) == NUM_PLACES * len(traversals) == data.counts[split]
        assert set(frame.condition) == {t.condition for t in traversals} == set(data.conditions[split])
        assert set(frame.camera_id) == {"front"}
        assert frame.image_path.is_unique
        for relative in frame.image_path:
            assert not Path(relative).is_absolute()
            assert (data.root / relative).is_file()
    assert {s: len(pd.read_csv(p)) for s, p in data.csvs.items()} == data.counts
    assert data.counts["train"] > data.counts["val"] > 0 and data.counts["test"] > 0


def test_csvs_load_with_the_suite_loader(demo):
    tv = pytest.importorskip("trainable_vpr")
    data, _ = demo
    table = tv.load_poses(data.train_csv)  # relative paths resolve against the CSV folder
    assert len(table) == data.counts["train"] and table.coord_kind and table.conditions is not None
    assert set(table.conditions) == set(data.conditions["train"])
    tv.check_same_coord_kind(table, tv.load_poses(data.test_csv))


def test_images_are_small_jpegs_and_night_is_darker(demo):
    data, _ = demo
    rows = _all_rows(data)
    brightness = {}
    for condition, group in rows.groupby("condition"):
        values = []
        for relative in group.image_path:
            with Image.open(data.root / relative) as image:
                assert image.format == "JPEG" and image.mode == "RGB" and image.size == (256, 192)
                values.append(np.asarray(image, np.float32).mean())
            assert (data.root / relative).stat().st_size < 60_000
        brightness[condition] = np.mean(values)
    assert brightness["day"] > brightness["dusk"] > brightness["night"]


def test_same_place_is_within_a_few_metres_across_traversals(demo):
    data, _ = demo
    rows = _all_rows(data)
    assert set(rows.traversal) == {t.name for t in TRAVERSALS}
    spreads = []
    for _, group in rows.groupby("place"):
        lat, lon = group.lat.to_numpy(), group.lon.to_numpy()
        d = haversine_m(lat[:, None], lon[:, None], lat[None, :], lon[None, :])
        spreads.append(d.max())
    assert max(spreads) < 10.0, spreads  # viewpoint jitter + GPS noise (<= 2.5 m) + lane changes
    assert np.median(spreads) < 8.0


def test_consecutive_places_are_more_than_10_m_apart(demo):
    data, _ = demo
    rows = _all_rows(data)
    for _, group in rows.groupby("traversal"):
        group = group.sort_values("place")
        assert group.place.tolist() == list(range(NUM_PLACES))
        lat, lon = group.lat.to_numpy(), group.lon.to_numpy()
        steps = haversine_m(lat[:-1], lon[:-1], lat[1:], lon[1:])
        assert steps.min() > 10.0, steps
        assert np.all(np.abs(steps - SPACING_M) < 8.0), steps


def test_route_starts_at_the_origin_and_latlon_is_metre_accurate():
    lat0, lon0 = demo_data.ORIGIN_LATLON
    for east, north in [(100.0, 0.0), (0.0, -250.0), (700.0, 900.0)]:
        lat, lon = local_to_latlon(east, north)
        assert abs(float(haversine_m(lat0, lon0, lat, lon)) - np.hypot(east, north)) < 1e-3
    # neighbouring points far from the origin keep their metric spacing too
    lat, lon = local_to_latlon(np.array([1500.0, 1518.0]), np.array([800.0, 800.0]))
    assert abs(float(haversine_m(lat[0], lon[0], lat[1], lon[1])) - 18.0) < 1e-3
    world = demo_data.describe_world(seed=0, num_places=10, spacing_m=SPACING_M)
    assert np.allclose(world.route.point(0.0), 0.0, atol=1e-6)
    along = np.diff(world.route.point(np.arange(10) * SPACING_M), axis=0)
    assert np.allclose(np.linalg.norm(along, axis=1), SPACING_M, atol=0.1)  # arc ~ chord on gentle bends


def test_same_seed_gives_byte_identical_files_other_seed_differs(tmp_path):
    a = generate_demo_dataset(tmp_path / "a", seed=7, num_places=3)
    b = generate_demo_dataset(tmp_path / "b", seed=7, num_places=3)
    c = generate_demo_dataset(tmp_path / "c", seed=8, num_places=3)
    snap_a, snap_b, snap_c = _snapshot(a.root), _snapshot(b.root), _snapshot(c.root)
    assert snap_a.keys() == snap_b.keys() and len(snap_a) == a.num_images + 4  # + 3 CSVs + manifest
    assert snap_a == snap_b
    assert snap_c["test.csv"] != snap_a["test.csv"]
    assert snap_c["images/2023-05-14_day/001.jpg"] != snap_a["images/2023-05-14_day/001.jpg"]


def test_complete_data_set_is_reused_not_regenerated(tmp_path):
    first = generate_demo_dataset(tmp_path, seed=1, num_places=2)
    assert first.generated
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    again = generate_demo_dataset(tmp_path, seed=1, num_places=2)
    assert not again.generated
    assert again.counts == first.counts and again.train_csv == first.train_csv
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == before
    assert generate_demo_dataset(tmp_path, seed=1, num_places=2, force=True).generated


def test_other_parameters_or_an_interrupted_run_regenerate(tmp_path):
    generate_demo_dataset(tmp_path, seed=1, num_places=3)
    reference = _snapshot(tmp_path)

    smaller = generate_demo_dataset(tmp_path, seed=1, num_places=2)  # other parameters
    assert smaller.generated and smaller.counts["test"] == 2
    assert not (tmp_path / "images" / TRAVERSALS[-1].name / "002.jpg").exists()  # stale images removed

    generate_demo_dataset(tmp_path, seed=1, num_places=3)
    assert _snapshot(tmp_path) == reference

    (tmp_path / "images" / TRAVERSALS[0].name / "001.jpg").unlink()  # a file lost
    assert generate_demo_dataset(tmp_path, seed=1, num_places=3).generated
    assert _snapshot(tmp_path) == reference

    (tmp_path / demo_data.MANIFEST_NAME).unlink()  # killed before the manifest was written
    assert generate_demo_dataset(tmp_path, seed=1, num_places=3).generated

    manifest = json.loads((tmp_path / demo_data.MANIFEST_NAME).read_text())
    manifest["version"] = demo_data.GENERATOR_VERSION - 1  # made by an older generator
    (tmp_path / demo_data.MANIFEST_NAME).write_text(json.dumps(manifest))
    assert generate_demo_dataset(tmp_path, seed=1, num_places=3).generated
    assert _snapshot(tmp_path) == reference


@pytest.mark.parametrize("kwargs", [dict(num_places=1), dict(spacing_m=0.0), dict(seed=-1)])
def test_rejects_bad_parameters(tmp_path, kwargs):
    with pytest.raises(ValueError):
        generate_demo_dataset(tmp_path, **kwargs)
