"""Decoding photos as they are meant to be seen, and reading where and when they were taken.

Phones (and many cameras) store the sensor's pixels as read out and record how to turn them in the
EXIF Orientation tag; a decoder that ignores it feeds the network a sideways or upside-down picture
(issue 13: cosine 0.64 between a photo's feature and its upright copy's, 0.9986 once applied).
`open_rgb` is the one place images are decoded: the orientation applied, then RGB.
`DECODE_TAG` names this decoding, for cache keys: features decoded before it are never served.

`read_photo_exif` reads the GPS position, the capture time and the camera from EXIF with Pillow
(no other dependency), for `make_poses.py`; `read_capture_time` the capture time alone, to order
a folder of route frames (vprkit.routes.frames).
"""
from __future__ import annotations

import datetime as dt
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from PIL import ExifTags, Image, ImageOps

from vprkit.cli import VPRError

# Part of every feature-cache key: change it whenever decoding changes what pixels a file gives.
DECODE_TAG = "exif-upright"

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp")
PLUGIN_SUFFIXES = (".heic", ".heif")  # only where a Pillow plugin (e.g. pillow-heif) registered them


def image_suffixes() -> tuple[str, ...]:
    """The suffixes to look for: the common ones, plus HEIC/HEIF where Pillow can open them."""
    registered = Image.registered_extensions()
    return IMAGE_SUFFIXES + tuple(s for s in PLUGIN_SUFFIXES if s in registered)


def find_images(folder: Path) -> list[Path]:
    """Image files under `folder` and its subfolders by suffix (any case), hidden names left
    out, in sorted order (make_poses.py, benchmark folders)."""
    suffixes = image_suffixes()
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / f for f in files if not f.startswith(".") and Path(f).suffix.lower() in suffixes]
    return sorted(found)


def open_rgb(path: str | Path) -> Image.Image:
    """The image at `path` upright (its EXIF orientation applied) as an RGB image, fully loaded
    (the file is closed on return). Raises what Pillow raises for an unreadable file."""
    with Image.open(path) as image:
        upright = ImageOps.exif_transpose(image)  # a transposed copy, or a plain copy for orientation 1 / none
        return upright.convert("RGB")


@dataclass(frozen=True)
class PhotoExif:
    """What a photo's EXIF says about where, when and with what it was taken.

    lat, lon: WGS84 degrees, signed (south and west negative);
    timestamp: local capture time "YYYY-MM-DDTHH:MM:SS" (DateTimeOriginal, else DateTime), or None;
    camera_id: "Make Model" (Model alone when it already starts with Make), or None.
    """

    lat: float
    lon: float
    timestamp: str | None
    camera_id: str | None


def _read_exif(path: str | Path) -> tuple[Image.Exif, Mapping[int, Any], Mapping[int, Any]]:
    """(IFD0, GPS IFD, Exif IFD) of a photo; VPRError naming the file when it is not a readable image."""
    try:
        with Image.open(path) as image:
            exif = image.getexif()
            return exif, exif.get_ifd(ExifTags.IFD.GPSInfo), exif.get_ifd(ExifTags.IFD.Exif)
    except (OSError, ValueError, SyntaxError) as exc:  # Pillow's errors for a broken or non-image file
        raise VPRError(f"{path}: not a readable image "
                       f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def read_capture_time(path: str | Path) -> dt.datetime | None:
    """When a photo was taken (local time, as the camera recorded it): DateTimeOriginal with its
    SubSecTimeOriginal fraction (frames a fraction of a second apart), else DateTime with SubSecTime;
    None when neither is recorded. Raises VPRError naming the file when it is not a readable image."""
    exif, _, details = _read_exif(path)
    for value, subsec in ((details.get(ExifTags.Base.DateTimeOriginal), details.get(ExifTags.Base.SubsecTimeOriginal)),
                          (exif.get(ExifTags.Base.DateTime), details.get(ExifTags.Base.SubsecTime))):
        stamp = exif_timestamp(value)
        if stamp is not None:
            digits = "".join(c for c in (_text(subsec) or "") if c.isdigit())
            fraction = float(f"0.{digits}") if digits else 0.0
            return dt.datetime.fromisoformat(stamp) + dt.timedelta(seconds=fraction)
    return None


def read_photo_exif(path: str | Path) -> PhotoExif | None:
    """The GPS position, capture time and camera of a photo, or None when it has no usable GPS
    position (no GPS tags, a missing hemisphere reference, a zero denominator, 0/0, out of range).
    Raises VPRError naming the file when it is not a readable image."""
    exif, gps, details = _read_exif(path)
    position = gps_position(gps)
    if position is None:
        return None
    timestamp = (exif_timestamp(details.get(ExifTags.Base.DateTimeOriginal))
                 or exif_timestamp(exif.get(ExifTags.Base.DateTime)))
    camera = camera_name(exif.get(ExifTags.Base.Make), exif.get(ExifTags.Base.Model))
    return PhotoExif(lat=position[0], lon=position[1], timestamp=timestamp, camera_id=camera)


def gps_position(gps: Mapping[int, Any]) -> tuple[float, float] | None:
    """(lat, lon) in signed degrees from a GPS IFD, or None when it holds no usable position."""
    lat = _signed_degrees(gps.get(ExifTags.GPS.GPSLatitude), gps.get(ExifTags.GPS.GPSLatitudeRef), "N", "S")
    lon = _signed_degrees(gps.get(ExifTags.GPS.GPSLongitude), gps.get(ExifTags.GPS.GPSLongitudeRef), "E", "W")
    if lat is None or lon is None or abs(lat) > 90 or abs(lon) > 180:
        return None
    if lat == 0 and lon == 0:  # what receivers without a fix write; no photo set is taken at "Null Island"
        return None
    return lat, lon


def _signed_degrees(value: Any, ref: Any, positive: str, negative: str) -> float | None:
    """Degrees from EXIF's (degrees, minutes, seconds) rationals and an N/S or E/W reference."""
    hemisphere = _text(ref)
    if hemisphere is None or hemisphere[:1].upper() not in (positive, negative):
        # without its reference the sign is unknown: guessing would put the photo on the wrong side of the Earth
        return None
    parts = value if isinstance(value, (tuple, list)) else (value,)
    numbers = [_rational(part) for part in parts[:3]]
    if not numbers or any(n is None or n < 0 for n in numbers):
        return None
    degrees = sum(n / 60**i for i, n in enumerate(numbers))  # type: ignore[operator]
    return -degrees if hemisphere[:1].upper() == negative else degrees


def _rational(value: Any) -> float | None:
    """A finite float from an EXIF rational (Pillow's IFDRational, a (num, den) pair or a number)."""
    try:
        if isinstance(value, (tuple, list)) and len(value) == 2:
            number = float(value[0]) / float(value[1])
        else:
            number = float(value)  # IFDRational with denominator 0 gives nan
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return number if math.isfinite(number) else None


def exif_timestamp(value: Any) -> str | None:
    """EXIF's "YYYY:MM:DD HH:MM:SS" as ISO "YYYY-MM-DDTHH:MM:SS" (the poses CSV's timestamp_local),
    or None for a missing, blank or invalid value (cameras write "0000:00:00 00:00:00")."""
    text = _text(value)
    if not text:
        return None
    try:
        return dt.datetime.strptime(text[:19], "%Y:%m:%d %H:%M:%S").isoformat()
    except ValueError:
        return None


def camera_name(make: Any, model: Any) -> str | None:
    """"Make Model" of a camera; Model alone when it already names the maker ("Canon Canon EOS R6"
    otherwise); None when neither is recorded."""
    make_text, model_text = _text(make), _text(model)
    if make_text and model_text and model_text.lower().startswith(make_text.lower()):
        return model_text
    return " ".join(part for part in (make_text, model_text) if part) or None


def _text(value: Any) -> str | None:
    """An EXIF ASCII value as a stripped string (bytes decoded, NULs removed), or None."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    text = str(value).replace("\x00", "").strip()
    return text or None
