"""Writing real photo files with EXIF tags (orientation, GPS, capture time, camera) with Pillow,
for the tests of vprkit.tables.images and make_poses.py."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image
from PIL.TiffImagePlugin import IFDRational

# What exif_transpose does for each orientation, inverted: storing upright.transpose(STORE[o])
# with orientation o makes a file whose upright view is `upright` (EXIF 2.3, tag 0x0112).
STORE_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    6: Image.Transpose.ROTATE_90,   # shown after ROTATE_270 (90 degrees clockwise)
    8: Image.Transpose.ROTATE_270,  # shown after ROTATE_90
}


def asymmetric_image(width: int = 48, height: int = 32, seed: int = 0) -> Image.Image:
    """A smooth RGB picture whose every rotation and mirror image differs (gradients plus a blob
    in one corner): JPEG keeps it close, so decoded copies can be compared pixel by pixel."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    rng = np.random.default_rng(seed)
    red = 255 * x / (width - 1)
    green = 255 * y / (height - 1)
    blue = (200 * np.exp(-(((x - 0.2 * width) ** 2) + ((y - 0.25 * height) ** 2)) / (0.02 * width * height))
            + rng.uniform(0, 40))
    return Image.fromarray(np.stack([red, green, blue], axis=2).clip(0, 255).astype(np.uint8))


def dms(degrees: int, minutes: int, seconds: float | Fraction) -> tuple[IFDRational, IFDRational, IFDRational]:
    """EXIF's (degrees, minutes, seconds) rationals."""
    sec = Fraction(seconds).limit_denominator(10_000)
    return IFDRational(degrees, 1), IFDRational(minutes, 1), IFDRational(sec.numerator, sec.denominator)


def photo_exif(*, orientation: int | None = None, lat: tuple | None = None, lat_ref: str | None = None,
               lon: tuple | None = None, lon_ref: str | None = None, make: str | None = None,
               model: str | None = None, taken: str | None = None, modified: str | None = None) -> Image.Exif:
    """An EXIF block: Orientation, Make, Model and DateTime in IFD0, DateTimeOriginal in the Exif
    IFD, GPSLatitude(Ref)/GPSLongitude(Ref) in the GPS IFD; None leaves a tag out."""
    exif = Image.Exif()
    for tag, value in ((ExifTags.Base.Orientation, orientation), (ExifTags.Base.Make, make),
                       (ExifTags.Base.Model, model), (ExifTags.Base.DateTime, modified)):
        if value is not None:
            exif[tag] = value
    if taken is not None:
        exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.DateTimeOriginal] = taken
    gps_tags = ((ExifTags.GPS.GPSLatitude, lat), (ExifTags.GPS.GPSLatitudeRef, lat_ref),
                (ExifTags.GPS.GPSLongitude, lon), (ExifTags.GPS.GPSLongitudeRef, lon_ref))
    if any(value is not None for _, value in gps_tags):
        gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
        for tag, value in gps_tags:
            if value is not None:
                gps[tag] = value
    return exif


def save_photo(path: Path, image: Image.Image | None = None, exif: Image.Exif | None = None, **save: object) -> Path:
    """Write `image` (default: asymmetric_image()) with `exif` in the format of path's suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = image if image is not None else asymmetric_image()
    options: dict[str, object] = {"quality": 95} if path.suffix.lower() in (".jpg", ".jpeg") else {}
    if exif is not None:
        options["exif"] = exif.tobytes()  # bytes: Pillow's PNG writer skips an Exif object without IFD0 tags
    image.save(path, **options, **save)
    return path


# Two cities in opposite hemispheres, with their positions in EXIF's DMS form (exact in decimal).
BEER_SHEVA = dict(lat=dms(31, 15, 36), lat_ref="N", lon=dms(34, 48, 0), lon_ref="E")  # 31.26 N, 34.80 E
SYDNEY = dict(lat=dms(33, 52, 12), lat_ref="S", lon=dms(151, 12, 36), lon_ref="E")    # 33.87 S, 151.21 E
NEW_YORK = dict(lat=dms(40, 42, Fraction(4605, 100)), lat_ref="N", lon=dms(74, 0, Fraction(2151, 100)), lon_ref="W")
NEW_YORK_DEGREES = (40 + 42 / 60 + 46.05 / 3600, -(74 + 0 / 60 + 21.51 / 3600))  # 40.7127916..., -74.0059750
