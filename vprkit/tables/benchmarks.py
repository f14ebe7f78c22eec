"""The field's benchmark layouts read as PlaceTables, so every flag that takes a poses CSV takes them too.

- **`@`-named image folders** (gmberton/VPR-datasets-downloader: Pitts30k, Tokyo 24/7, MSLS, St Lucia,
  SF-XL, Nordland, ...): every image under the folder (searched recursively, like
  VPR-methods-evaluation) is named
  `@UTM_east@UTM_north@zone_number@zone_letter@lat@lon@pano_id@tile@heading@pitch@roll@height@timestamp@note@.jpg`.
  Positions are the UTM east/north fields, in metres (coord_kind "metric"), as VPR-methods-evaluation
  reads them; lat/lon are not used (Nordland leaves them and the zone empty). A folder whose images
  name two UTM zones (zone number and hemisphere) is an error: UTM metres of two zones are not
  comparable, and a benchmark is one zone. A `note` whose first word names a condition (MSLS:
  `night_forward_cph`) becomes the `condition` (others: "unknown").
- **MSLS city folders** (mapillary/mapillary_sls): `postprocessed.csv` (`,key,easting,northing,
  unique_cluster,control_panel,night,view_direction`: UTM metres, `night` -> condition night/day) or
  `raw.csv` (`,key,lon,lat,ca,captured_at,pano`: lat/lon), images at `images/{key}.jpg`; the folder
  itself (query/ or database/) reads its postprocessed.csv. Panoramas (`pano` True in raw.csv) are
  left out, as MSLS's own loader and the downloader do. MSLS has no place labels: positives by distance.
- **GSV-Cities dataframes** (amaralibey/gsv-cities): `Dataframes/{city}.csv` (`place_id, year, month,
  northdeg, city_id, lat, lon, panoid`), images at `Images/{city_id}/{name}` with the name built as
  GSVCitiesDataset.get_img_name does; place labels `{city_id}_{place_id:07d}` (the name's prefix, so
  two cities' place 13 differ), positions lat/lon.

`load_benchmark` returns None for anything else (a plain poses CSV); `vprkit.tables.load.load_table`
dispatches here. Errors are one-line VPRErrors naming the file.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from vprkit.cli import VPRError
from vprkit.tables.images import find_images, image_suffixes
from vprkit.tables.places import PlaceTable, check_on_bad_image, poses_table, read_csv_table

AT_FIELDS = ("utm_east", "utm_north", "utm_zone_number", "utm_zone_letter", "lat", "lon", "pano_id", "tile",
             "heading", "pitch", "roll", "height", "timestamp", "note")
AT_PATTERN = "@" + "@".join(("UTM_east", "UTM_north", "zone_number", "zone_letter", *AT_FIELDS[4:])) + "@.jpg"

# Words a downloader `note` starts with that name a capture condition (MSLS writes day/night first).
CONDITION_WORDS = frozenset({"day", "night", "dawn", "dusk", "sunset", "sunny", "sun", "rain", "rainy", "snow",
                             "snowy", "overcast", "cloudy", "fog", "summer", "autumn", "fall", "winter", "spring"})
UNKNOWN_CONDITION = "unknown"

# The columns of an @-folder's poses frame (also what make_poses.py writes for such a folder). No
# lat/lon columns: the loaders would take them before easting/northing, and the UTM fields are the
# positions (VPR-methods-evaluation's, and Nordland's only ones).
AT_FRAME_COLUMNS = ("image_path", "easting", "northing", "utm_zone", "pano_id", "heading", "timestamp", "note")

MSLS_FILES = ("postprocessed.csv", "raw.csv")
MSLS_POSTPROCESSED_COLUMNS = ("key", "easting", "northing", "night")
MSLS_RAW_COLUMNS = ("key", "lat", "lon")
GSV_COLUMNS = ("place_id", "year", "month", "northdeg", "city_id", "lat", "lon", "panoid")


# ============================================================================================
# @-named folders (VPR-datasets-downloader)
# ============================================================================================
@dataclass(frozen=True)
class AtName:
    """The fields of one downloader image name (empty strings where the name leaves them out)."""

    east: float
    north: float
    zone: str          # e.g. "17T"; "" where the name has none (Nordland)
    hemisphere: str    # "N", "S" or "" (from the zone letter: C-M south, N-X north)
    fields: dict[str, str]

    @property
    def zone_key(self) -> str:
        """What must agree for two UTM positions to be comparable: the zone number and the
        hemisphere (the letter's 8-degree latitude band does not change the coordinates)."""
        number = self.fields.get("utm_zone_number", "")
        return f"{int(number)}{self.hemisphere}" if number else ""

    @property
    def condition(self) -> str | None:
        word = self.fields.get("note", "").strip().lower().replace("-", "_").split("_")[0]
        return word if word in CONDITION_WORDS else None


def parse_at_name(path: str | Path) -> AtName:
    """The fields of a file named `@UTM_east@UTM_north@...@note@.jpg`; a name without two finite
    UTM numbers first is a VPRError naming the file."""
    name = Path(path).name
    parts = name.split("@")
    if not name.startswith("@") or len(parts) < 4:
        raise VPRError(f"image {path}: not named like VPR-datasets-downloader's {AT_PATTERN}; rename it or move it "
                       f"out of the folder (a folder of photos with EXIF GPS: run make_poses.py PHOTO_DIR first)")
    fields = dict(zip(AT_FIELDS, (p.strip() for p in parts[1:-1])))
    coordinates = []
    for key in ("utm_east", "utm_north"):
        try:
            value = float(fields[key])
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise VPRError(f"image {path}: {key} '{fields[key]}' is not a number; the name must start with "
                           f"@UTM_east@UTM_north@ ({AT_PATTERN})")
        coordinates.append(value)
    number, letter = fields.get("utm_zone_number", ""), fields.get("utm_zone_letter", "").upper()
    if number and not number.isdigit():
        raise VPRError(f"image {path}: UTM zone number '{number}' is not a whole number ({AT_PATTERN})")
    hemisphere = _hemisphere(letter)
    zone = f"{int(number)}{letter}" if number else ""
    return AtName(coordinates[0], coordinates[1], zone, hemisphere, fields)


def at_folder_images(folder: Path) -> list[Path]:
    """The images of an @-named folder (recursive, sorted); a folder without images is an error."""
    images = find_images(folder)
    if not images:
        raise VPRError(f"folder {folder}: no image files ({', '.join(image_suffixes())}) in it or its subfolders; "
                       f"give a folder of @UTM_east@UTM_north@...@.jpg images (VPR-datasets-downloader), "
                       f"or a poses CSV")
    return images


def _hemisphere(letter: str) -> str:
    """The hemisphere of a UTM latitude band letter: C-M south, N-X north ("" without one)."""
    return "" if not letter else ("N" if letter.upper() >= "N" else "S")


def utm_zone_keys(table: PlaceTable) -> set[str]:
    """The UTM zones (AtName.zone_key: number and hemisphere) of a table's `utm_zone` column (an
    @-named folder, or make_poses.py's CSV of one); empty without the column or a zone in it."""
    if "utm_zone" not in table.frame.columns:
        return set()
    zones = table.frame["utm_zone"].dropna().astype(str).str.strip().str.upper().str.extract(r"^(\d+)([A-Z]?)$")
    return {f"{int(number)}{_hemisphere(letter)}" for number, letter in zones.dropna().itertuples(index=False)}


def has_at_names(images: list[Path]) -> bool:
    """Some image is @-named: a downloader folder (make_poses.py reads its names, not EXIF)."""
    return any(image.name.startswith("@") for image in images)


def at_folder_frame(folder: str | Path, relative_to: Path | None = None) -> pd.DataFrame:
    """The poses frame of an @-named folder: one row per image (AT_FRAME_COLUMNS, plus `condition`
    when some note names one); image paths absolute, or relative to `relative_to` (make_poses.py)."""
    folder = Path(folder)
    images = at_folder_images(folder)
    names = [parse_at_name(image) for image in images]
    zones: dict[str, Path] = {}
    for image, name in zip(images, names):
        key = name.zone_key
        if key and key not in zones:
            zones[key] = image.relative_to(folder)
    if len(zones) > 1:
        (a, first), (b, second) = list(zones.items())[:2]
        raise VPRError(f"folder {folder}: images in {len(zones)} UTM zones ({a}: {first}; {b}: {second}); UTM metres "
                       f"of different zones are not comparable: give one zone's images per folder")
    paths = [Path(os.path.relpath(p.resolve(), relative_to)).as_posix() if relative_to else str(p) for p in images]
    frame = pd.DataFrame({
        "image_path": paths,
        "easting": [n.east for n in names],
        "northing": [n.north for n in names],
        "utm_zone": [n.zone for n in names],
        **{column: [n.fields.get(column, "") for n in names] for column in AT_FRAME_COLUMNS[4:]},
    })
    conditions = [n.condition for n in names]
    if any(conditions):
        frame["condition"] = [c or UNKNOWN_CONDITION for c in conditions]
    return frame


def load_at_folder(folder: str | Path, camera_id: str | None = None, on_bad_image: str = "error") -> PlaceTable:
    folder = Path(folder)
    return poses_table(at_folder_frame(folder), folder, folder, "the folder", camera_id, on_bad_image=on_bad_image)


# ============================================================================================
# MSLS city folders
# ============================================================================================
def _require_columns(frame: pd.DataFrame, path: Path, columns: tuple[str, ...], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise VPRError(f"{path}: no column(s) {', '.join(missing)}; not {what} (expected {', '.join(columns)})")


def _msls_non_panoramas(frame: pd.DataFrame, raw: pd.DataFrame | None) -> pd.DataFrame:
    """The rows whose image is not a panorama by raw.csv's `pano` column (all rows without it)."""
    if raw is None or "pano" not in raw.columns or "key" not in raw.columns:
        return frame
    pano = raw.set_index("key")["pano"].astype(str).str.strip().str.lower() == "true"
    panoramas = set(pano.index[pano.to_numpy()])
    return frame[~frame["key"].isin(panoramas)]


def msls_frame(path: Path) -> pd.DataFrame:
    """The poses frame of an MSLS postprocessed.csv or raw.csv (see the module docstring)."""
    frame = read_csv_table(path, "MSLS CSV")
    raw_path = path.with_name("raw.csv")
    if path.name == "postprocessed.csv":
        _require_columns(frame, path, MSLS_POSTPROCESSED_COLUMNS, "an MSLS postprocessed.csv")
        raw = read_csv_table(raw_path, "MSLS CSV") if raw_path.is_file() else None
    else:
        _require_columns(frame, path, MSLS_RAW_COLUMNS, "an MSLS raw.csv")
        raw = frame
    frame = _msls_non_panoramas(frame, raw)
    if frame.empty:
        raise VPRError(f"{path}: every image is a panorama (raw.csv column pano); nothing left to evaluate")
    out = pd.DataFrame({"image_path": [f"images/{key}.jpg" for key in frame["key"].astype(str)]}, index=frame.index)
    for column in ("easting", "northing", "lat", "lon", "key", "view_direction", "captured_at"):
        if column in frame.columns and not (column in ("lat", "lon") and "easting" in frame.columns):
            out[column] = frame[column]
    if "night" in frame.columns:
        night = frame["night"].astype(str).str.strip().str.lower()
        out["condition"] = night.map({"true": "night", "false": "day"}).fillna(UNKNOWN_CONDITION)
    return out


def load_msls(path: Path, image_root: str | Path | None = None, camera_id: str | None = None,
              on_bad_image: str = "error") -> PlaceTable:
    root = Path(image_root) if image_root else path.parent
    return poses_table(msls_frame(path), path, root, "--image_root" if image_root else "the MSLS folder",
                       camera_id, on_bad_image=on_bad_image)


# ============================================================================================
# GSV-Cities dataframes
# ============================================================================================
def gsv_image_name(city: str, place_id: int, year: int, month: int, northdeg: int, lat: object, lon: object,
                   panoid: str) -> str:
    """The file name GSVCitiesDataset.get_img_name builds from a row (lat/lon as Python prints them)."""
    return (f"{city}_{str(place_id).zfill(7)}_{str(year).zfill(4)}_{str(month).zfill(2)}_{str(northdeg).zfill(3)}"
            f"_{lat}_{lon}_{panoid}.jpg")


def gsv_frame(path: Path) -> pd.DataFrame:
    """The poses frame of a GSV-Cities Dataframes/{city}.csv; image paths relative to the
    dataset's base folder (the one holding Dataframes/ and Images/)."""
    frame = read_csv_table(path, "GSV-Cities CSV")
    _require_columns(frame, path, GSV_COLUMNS, "a GSV-Cities dataframe")
    rows = frame[list(GSV_COLUMNS)].itertuples(index=False)  # the cells' own types, as the dataset's iterrows
    names = [f"Images/{r.city_id}/" + gsv_image_name(r.city_id, r.place_id, r.year, r.month, r.northdeg,
                                                     r.lat, r.lon, r.panoid) for r in rows]
    out = frame.copy()
    out.insert(0, "image_path", names)
    out["place_id"] = [f"{c}_{str(p).zfill(7)}" for c, p in zip(frame["city_id"], frame["place_id"])]
    return out


def is_gsv_csv(path: Path) -> bool:
    try:
        header = pd.read_csv(path, nrows=0, encoding="utf-8-sig").columns
    except Exception:  # noqa: BLE001 - not readable here: load_poses says why
        return False
    return set(GSV_COLUMNS) <= set(header)


def load_gsv(path: Path, image_root: str | Path | None = None, camera_id: str | None = None,
             on_bad_image: str = "error") -> PlaceTable:
    root = Path(image_root) if image_root else path.resolve().parent.parent
    return poses_table(gsv_frame(path), path, root, "--image_root" if image_root else "the GSV-Cities folder",
                       camera_id, on_bad_image=on_bad_image)


# ============================================================================================
# Dispatch
# ============================================================================================
def load_benchmark(path: str | Path, image_root: str | Path | None = None, camera_id: str | None = None,
                   on_bad_image: str = "error") -> PlaceTable | None:
    """The table of a benchmark layout at `path`, or None when it is none (a plain poses CSV)."""
    check_on_bad_image(on_bad_image)
    path = Path(path)
    if path.is_dir():
        for name in MSLS_FILES:
            if (path / name).is_file():
                return load_msls(path / name, image_root, camera_id, on_bad_image)
        if any((path / part / name).is_file() for part in ("query", "database") for name in MSLS_FILES):
            raise VPRError(f"folder {path}: an MSLS city; give its query/ or database/ folder (one per flag)")
        at_folder_images(path)  # a folder without images: that error first
        return load_at_folder(path, camera_id, on_bad_image)
    if path.is_file() and path.name in MSLS_FILES:
        return load_msls(path, image_root, camera_id, on_bad_image)
    if path.is_file() and path.suffix.lower() == ".csv" and is_gsv_csv(path):
        return load_gsv(path, image_root, camera_id, on_bad_image)
    return None
