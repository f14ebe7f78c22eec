"""vprkit.routes.frames on real files: a folder's frames ordered by name (numbers as numbers) or by
EXIF capture time (sub-seconds included), and the one-line errors of an unusable time order."""
from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
from PIL import ExifTags

from helpers.exif_photos import photo_exif, save_photo
from vprkit.cli import VPRError
from vprkit.routes.frames import natural_key, ordered_frames
from vprkit.routes.order import route_of
from vprkit.tables.images import read_capture_time
from vprkit.tables.places import PlaceTable


def timed_photo(path, taken: str | None, subsec: str | None = None, modified: str | None = None):
    exif = photo_exif(taken=taken, modified=modified)
    if subsec is not None:
        exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.SubsecTimeOriginal] = subsec
    return str(save_photo(path, exif=exif))


def test_names_sort_with_their_numbers_as_numbers():
    names = ["f10.jpg", "f9.jpg", "f100.jpg", "f1.jpg", "a.jpg"]
    assert sorted(names, key=natural_key) == ["a.jpg", "f1.jpg", "f9.jpg", "f10.jpg", "f100.jpg"]
    frame = ordered_frames([f"/x/{n}" for n in names], "name", "--query /x")
    assert [p.rsplit("/", 1)[1] for p in frame["image_path"]] == ["a.jpg", "f1.jpg", "f9.jpg", "f10.jpg", "f100.jpg"]
    assert frame["frame_index"].tolist() == [0, 1, 2, 3, 4]


def test_capture_time_with_sub_seconds_and_the_datetime_fallback(tmp_path):
    assert read_capture_time(timed_photo(tmp_path / "a.jpg", "2024:05:01 10:00:00", "25")) == \
        dt.datetime(2024, 5, 1, 10, 0, 0, 250000)
    assert read_capture_time(timed_photo(tmp_path / "b.jpg", None, modified="2024:05:01 10:00:07")) == \
        dt.datetime(2024, 5, 1, 10, 0, 7)
    assert read_capture_time(timed_photo(tmp_path / "c.jpg", None)) is None


def test_exif_time_orders_against_the_names_and_gives_seconds(tmp_path):
    # names in the reverse of the capture order; two frames within one second, told apart by SubSecTimeOriginal
    paths = [timed_photo(tmp_path / "z.jpg", "2024:05:01 10:00:00", "5"),
             timed_photo(tmp_path / "y.jpg", "2024:05:01 10:00:00", "75"),
             timed_photo(tmp_path / "x.jpg", "2024:05:01 10:00:02")]
    frame = ordered_frames(paths, "exif_time", "--query frames")
    assert [p.rsplit("/", 1)[1] for p in frame["image_path"]] == ["z.jpg", "y.jpg", "x.jpg"]
    np.testing.assert_allclose(frame["timestamp"], [0.0, 0.25, 1.5])  # 10:00:00.5, .75, 02
    table = PlaceTable("frames", list(frame["image_path"]), None, "none", frame)
    route = route_of(table, 1.0)  # seconds: the 1.25 s step cuts the drive
    assert route.unit == "s" and route.drive.tolist() == [0, 0, 1]


@pytest.mark.parametrize("case, words", [
    ("no time", ["b.jpg has no EXIF capture time", "--order name"]),
    ("same time", ["a.jpg and b.jpg have the same EXIF capture time", "2024-05-01T10:00:00"]),
])
def test_an_unusable_time_order_is_one_line_naming_the_files(tmp_path, case, words):
    paths = [timed_photo(tmp_path / "a.jpg", "2024:05:01 10:00:00"),
             timed_photo(tmp_path / "b.jpg", None if case == "no time" else "2024:05:01 10:00:00")]
    with pytest.raises(VPRError) as error:
        ordered_frames(paths, "exif_time", "--query frames")
    message = str(error.value)
    assert "\n" not in message and message.startswith("--query frames: ")
    assert all(w in message for w in words), message
