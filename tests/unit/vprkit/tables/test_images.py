"""vprkit.tables.images on real files written by Pillow: photos stored rotated with an EXIF orientation
decode to their upright pixels (and the same effnet_lite0 feature), EXIF GPS / time / camera."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image
from PIL.TiffImagePlugin import IFDRational

from helpers import SHARED
from helpers.exif_photos import (BEER_SHEVA, NEW_YORK, NEW_YORK_DEGREES, STORE_TRANSPOSE, SYDNEY, asymmetric_image, dms,
                                 photo_exif, save_photo)
from vprkit.cli import VPRError
from vprkit.tables.images import PhotoExif, camera_name, exif_timestamp, open_rgb, read_photo_exif

REAL_PHOTO = SHARED / "bgu_campus" / "images" / "20251222_094711.jpg"


def upright_picture() -> Image.Image:
    """A real phone photo (portrait 192x256) when the shared data is there, else a synthetic one."""
    if REAL_PHOTO.is_file():
        with Image.open(REAL_PHOTO) as image:
            return image.convert("RGB")
    return asymmetric_image(96, 128)


def rotated_copy(tmp_path, upright: Image.Image, orientation: int, suffix: str):
    """The picture stored as a camera stores it: pixels turned, the orientation tag saying how to turn them back."""
    return save_photo(tmp_path / f"o{orientation}{suffix}", upright.transpose(STORE_TRANSPOSE[orientation]),
                      photo_exif(orientation=orientation))


@pytest.mark.parametrize("orientation", [3, 6, 8, 2])
def test_rotated_png_decodes_to_the_upright_pixels(tmp_path, orientation):
    upright = upright_picture()
    path = rotated_copy(tmp_path, upright, orientation, ".png")  # lossless: the same pixels exactly
    with Image.open(path) as raw:
        assert raw.size == (upright.size if orientation in (2, 3) else upright.size[::-1])
        assert not np.array_equal(np.asarray(raw.convert("RGB")), np.asarray(upright))  # stored turned
    decoded = open_rgb(path)
    assert decoded.mode == "RGB" and decoded.size == upright.size
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(upright))


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_rotated_jpeg_decodes_like_its_upright_copy(tmp_path, orientation):
    upright = upright_picture()
    rotated = open_rgb(rotated_copy(tmp_path, upright, orientation, ".jpg"))
    straight = open_rgb(save_photo(tmp_path / "upright.jpg", upright))
    assert rotated.size == straight.size
    difference = np.abs(np.asarray(rotated, dtype=np.int16) - np.asarray(straight, dtype=np.int16))
    assert difference.mean() < 3.0  # JPEG re-encoding noise only; sideways would be ~50


def test_open_rgb_converts_grey_and_alpha_to_rgb(tmp_path):
    grey = tmp_path / "grey.png"
    Image.new("LA", (5, 4), (200, 128)).save(grey)
    image = open_rgb(grey)
    assert image.mode == "RGB" and image.size == (5, 4) and image.getpixel((0, 0)) == (200, 200, 200)


def test_open_rgb_leaves_untagged_images_alone(tmp_path):
    upright = asymmetric_image()
    np.testing.assert_array_equal(np.asarray(open_rgb(save_photo(tmp_path / "plain.png", upright))),
                                  np.asarray(upright))


@pytest.fixture(scope="module")
def effnet_lite0():
    vpr = pytest.importorskip("trainable_vpr")
    try:
        return vpr.create_backbone("effnet_lite0")
    except (ImportError, VPRError) as exc:
        pytest.skip(f"effnet_lite0 weights not available: {exc}")


@pytest.mark.parametrize("suffix, min_cosine", [(".png", 0.9999), (".jpg", 0.995)])
def test_rotated_photo_gets_the_feature_of_its_upright_copy(tmp_path, effnet_lite0, suffix, min_cosine):
    """Lossless: the same pixels, so the same feature; JPEG: the two files are encoded apart
    (quality 95), which alone moves the feature by about 0.001 (issue 13 measured 0.9986)."""
    import torch

    import trainable_vpr as vpr
    from vprkit.extraction.preprocessing import backbone_input, image_tensor

    info = effnet_lite0.info
    mean, std = torch.tensor(info.mean).view(1, 3, 1, 1), torch.tensor(info.std).view(1, 3, 1, 1)
    upright = upright_picture()
    rotated_path = rotated_copy(tmp_path, upright, 6, suffix)
    with Image.open(rotated_path) as raw:
        sideways = raw.convert("RGB")  # what a decoder without the orientation feeds the network
    images = [open_rgb(save_photo(tmp_path / f"upright{suffix}", upright)), open_rgb(rotated_path), sideways]
    with torch.no_grad():
        inputs = torch.cat([backbone_input(image_tensor(i)[None], info.image_size, mean, std) for i in images])
        features = vpr.backbone_descriptor(effnet_lite0.model, inputs)
    features = torch.nn.functional.normalize(features, dim=1)
    upright_cos, sideways_cos = (features[1:] @ features[0]).tolist()
    print(f"{suffix}: cosine to the upright copy: orientation applied {upright_cos:.4f}, ignored {sideways_cos:.4f}")
    assert upright_cos > min_cosine
    assert sideways_cos < 0.95


def test_gps_in_both_hemispheres(tmp_path):
    cases = {"beer_sheva.jpg": (BEER_SHEVA, 31.26, 34.80), "sydney.png": (SYDNEY, -33.87, 151.21),
             "new_york.webp": (NEW_YORK, *NEW_YORK_DEGREES)}
    for name, (gps, lat, lon) in cases.items():
        exif = read_photo_exif(save_photo(tmp_path / name, exif=photo_exif(**gps)))
        assert exif is not None, name
        assert abs(exif.lat - lat) < 1e-6 and abs(exif.lon - lon) < 1e-6, (name, exif)


def test_time_and_camera(tmp_path):
    path = save_photo(tmp_path / "a.jpg", exif=photo_exif(**BEER_SHEVA, make="samsung", model="SM-S911B",
                                                         taken="2023:12:22 16:05:11", modified="2024:01:02 10:00:00"))
    assert read_photo_exif(path) == PhotoExif(lat=pytest.approx(31.26), lon=pytest.approx(34.80),
                                              timestamp="2023-12-22T16:05:11", camera_id="samsung SM-S911B")
    only_modified = save_photo(tmp_path / "b.jpg", exif=photo_exif(**SYDNEY, modified="2024:01:02 10:00:00"))
    exif = read_photo_exif(only_modified)
    assert exif.timestamp == "2024-01-02T10:00:00" and exif.camera_id is None


@pytest.mark.parametrize("make, model, expected", [
    ("Canon", "Canon EOS R6", "Canon EOS R6"), ("DJI", "FC3170", "DJI FC3170"), (None, "Pixel 7", "Pixel 7"),
    ("Apple\x00", None, "Apple"), (b"  ", None, None), (None, None, None)])
def test_camera_name(make, model, expected):
    assert camera_name(make, model) == expected


@pytest.mark.parametrize("value, expected", [
    ("2023:12:22 16:05:11", "2023-12-22T16:05:11"), ("2023:12:22 16:05:11\x00", "2023-12-22T16:05:11"),
    ("0000:00:00 00:00:00", None), ("    :  :     :  :  ", None), ("2023-12-22", None), (None, None)])
def test_exif_timestamp(value, expected):
    assert exif_timestamp(value) == expected


@pytest.mark.parametrize("gps", [
    {},                                                              # no GPS IFD at all
    dict(BEER_SHEVA, lat_ref=None),                                  # hemisphere unknown
    dict(BEER_SHEVA, lon_ref="X"),
    dict(BEER_SHEVA, lon=None),                                      # latitude only
    dict(BEER_SHEVA, lat=(IFDRational(31, 1), IFDRational(15, 0), IFDRational(0, 1))),  # zero denominator
    dict(BEER_SHEVA, lat=dms(0, 0, 0), lon=dms(0, 0, 0)),            # a receiver without a fix
    dict(BEER_SHEVA, lat=dms(95, 0, 0)),                             # beyond the pole
])
def test_photos_without_a_usable_position_give_none(tmp_path, gps):
    assert read_photo_exif(save_photo(tmp_path / "p.jpg", exif=photo_exif(**gps, make="Canon",
                                                                          taken="2023:12:22 16:05:11"))) is None


def test_gps_seconds_as_fractions(tmp_path):
    gps = dict(SYDNEY, lat=dms(33, 52, Fraction(1234, 100)))
    exif = read_photo_exif(save_photo(tmp_path / "p.jpg", exif=photo_exif(**gps)))
    assert math.isclose(exif.lat, -(33 + 52 / 60 + 12.34 / 3600), abs_tol=1e-9)


def test_unreadable_file_is_a_vpr_error_naming_it(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(VPRError, match="broken.jpg: not a readable image"):
        read_photo_exif(broken)
