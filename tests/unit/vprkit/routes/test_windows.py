"""Route order rules and causal windows on small hand-made tables."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from vprkit.cli import VPRError
from vprkit.tables.places import PlaceTable
from vprkit.routes.order import route_of
from vprkit.routes.windows import causal_windows


def table(**columns) -> PlaceTable:
    frame = pd.DataFrame(columns)
    n = len(frame)
    return PlaceTable(source="route.csv", paths=[f"{i}.png" for i in range(n)], xyz=np.zeros((n, 3)),
                      coord_kind="metric", frame=frame)


def test_windows_are_causal_and_padded_at_each_drive_start():
    route = route_of(table(frame_index=[1, 2, 3, 4, 10, 11, 12], traversal=["a"] * 4 + ["b"] * 3), max_gap=5)
    assert route.drive.tolist() == [0, 0, 0, 0, 1, 1, 1]
    windows = causal_windows(route, 3)
    assert windows.tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 2], [1, 2, 3], [4, 4, 4], [4, 4, 5], [4, 5, 6]]


def test_a_large_gap_cuts_the_drive_and_a_small_one_does_not():
    route = route_of(table(frame_index=[1, 3, 20, 21]), max_gap=2)
    assert route.drive.tolist() == [0, 0, 1, 1]
    assert causal_windows(route, 2).tolist() == [[0, 0], [0, 1], [2, 2], [2, 3]]


def test_the_default_gap_is_10_frames_or_5_seconds():
    assert route_of(table(frame_index=[0, 10, 21, 22])).drive.tolist() == [0, 0, 1, 1]
    assert route_of(table(time_s=[0.0, 5.0, 10.5, 11.0])).drive.tolist() == [0, 0, 1, 1]


def test_without_a_traversal_each_camera_is_a_drive_cut_at_time_gaps():
    t = table(timestamp=["2026-01-01T10:00:00", "2026-01-01T10:00:01", "2026-01-01T10:05:00", "2026-01-01T10:00:00"])
    t.cameras = np.array(["front", "front", "front", "rear"])
    route = route_of(t, max_gap=30)
    assert route.unit == "s"
    assert route.drive.tolist() == [0, 0, 1, 2]
    assert route.key[1] - route.key[0] == pytest.approx(1.0)


@pytest.mark.parametrize("frames, drives, message", [
    ([1, 2, 2], ["a"] * 3, r"route\.csv: row 4: 'frame_index' 2 repeats row 3's 2 in drive 'a'"),
    ([1, 3, 2], ["a"] * 3, r"row 4: 'frame_index' 2 goes back from row 3's 3"),
    ([1, 1, 2], ["a", "b", "a"], r"row 4: drive 'a' continues after rows of another drive \(it started at row 2\)"),
])
def test_bad_orders_name_the_row(frames, drives, message):
    with pytest.raises(VPRError, match=message):
        route_of(table(frame_index=frames, traversal=drives), max_gap=10)


def test_a_table_without_an_order_column_is_not_a_route():
    with pytest.raises(VPRError, match="route.csv: not a route: no order column"):
        route_of(table(easting=[1.0, 2.0]), max_gap=10)


def test_a_non_numeric_order_names_its_row():
    with pytest.raises(VPRError, match="row 3: column 'frame_index' is not a number"):
        route_of(table(frame_index=["1", "x"]), max_gap=10)


def test_seq_len_one_is_the_frame_itself():
    route = route_of(table(frame_index=np.arange(5)), max_gap=1)
    assert np.array_equal(causal_windows(route, 1)[:, 0], np.arange(5))
