"""Write a poses CSV from the EXIF GPS of a folder of photos (phones, drones, cameras).

    python make_poses.py PHOTO_DIR --output PHOTO_DIR/poses.csv
    python train_vpr.py --train_csv PHOTO_DIR/poses.csv ...

Walks PHOTO_DIR and its subfolders (hidden files and folders left out) for images (.jpg, .jpeg,
.png, .tif, .tiff, .webp, and .heic/.heif where a Pillow plugin reads them; any case), in sorted
order, and writes one row per photo with a GPS position:

    image_path, lat, lon, camera_id, timestamp_local

image_path is relative to the output CSV's folder, which is where the scripts resolve it when no
`--image_root` is given: the CSV works as it is, wherever it is written (don't pass --image_root
with it). lat/lon are WGS84 degrees (south and west negative); camera_id is the EXIF Make and Model
("unknown" if not recorded); timestamp_local is the EXIF capture time, YYYY-MM-DDTHH:MM:SS (empty if
not recorded).

A folder of @-named images as VPR-datasets-downloader writes them
(@UTM_east@UTM_north@zone_number@zone_letter@lat@lon@pano_id@tile@heading@pitch@roll@height@timestamp@note@.jpg)
is read from the names instead of EXIF: image_path, easting, northing (the UTM fields, metres),
utm_zone, pano_id, heading, timestamp, note, and condition where a note names one (MSLS day/night).
The scripts also take such a folder directly wherever they take a poses CSV.

Photos without GPS, and files that are not readable images, are left out: one warning line each
with their count. A folder with no GPS-tagged photo is an error. The CSV is written atomically;
an existing file is kept unless --overwrite.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from vprkit.tables.benchmarks import at_folder_frame, has_at_names
from vprkit.cli import CliParser, VPRError, atomic_write, check_new_file, run_cli
from vprkit.cli.configs import MakePosesConfig
from vprkit.tables.images import PhotoExif, find_images, image_suffixes, read_photo_exif
from vprkit.cli.settings import config_parser, parse_config

CSV_COLUMNS = ("image_path", "lat", "lon", "camera_id", "timestamp_local")
UNKNOWN_CAMERA = "unknown"  # camera_id of photos without Make/Model (an empty cell would read back as "nan")


@dataclass
class PhotoScan:
    """The GPS-tagged photos of a folder, and what was left out."""

    photos: list[tuple[Path, PhotoExif]] = field(default_factory=list)
    without_gps: list[Path] = field(default_factory=list)
    unreadable: list[Path] = field(default_factory=list)


def build_parser() -> CliParser:
    return config_parser(MakePosesConfig, __doc__, config_file=False, formatter=argparse.RawDescriptionHelpFormatter)


def parse_args(argv: Sequence[str] | None) -> MakePosesConfig:
    return parse_config(build_parser(), MakePosesConfig, argv, layered=False)


def scan_photos(paths: Sequence[Path]) -> PhotoScan:
    scan = PhotoScan()
    for path in paths:
        try:
            exif = read_photo_exif(path)
        except VPRError:
            scan.unreadable.append(path)
            continue
        if exif is None:
            scan.without_gps.append(path)
        else:
            scan.photos.append((path, exif))
    return scan


def warn_left_out(scan: PhotoScan, folder: Path) -> None:
    """One warning line per kind of photo left out, with its count and an example."""
    total = len(scan.photos) + len(scan.without_gps) + len(scan.unreadable)
    for files, why in ((scan.without_gps, "have no GPS position in their EXIF"),
                       (scan.unreadable, "are not readable images")):
        if files:
            print(f"warning: {len(files)} of {total} image files in {folder} {why}; left out "
                  f"(e.g. {files[0].relative_to(folder).as_posix()})", file=sys.stderr)


def csv_rows(scan: PhotoScan, csv_folder: Path) -> list[list[str]]:
    """The CSV rows, image paths relative to the CSV's folder (POSIX separators)."""
    return [[Path(os.path.relpath(path.resolve(), csv_folder)).as_posix(), repr(exif.lat), repr(exif.lon),
             exif.camera_id or UNKNOWN_CAMERA, exif.timestamp or ""] for path, exif in scan.photos]


def write_poses_csv(path: Path, rows: list[list[str]]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(CSV_COLUMNS)
            writer.writerows(rows)

    atomic_write(path, write)


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(argv)
    folder, output = Path(args.photo_dir), Path(args.output)
    if not folder.is_dir():
        raise VPRError(f"PHOTO_DIR {folder}: {'not a folder' if folder.exists() else 'folder not found'}")
    check_new_file(output, args.overwrite, "--output")

    images = find_images(folder)
    if not images:
        raise VPRError(f"PHOTO_DIR {folder}: no image files ({', '.join(image_suffixes())}) in it or its subfolders")
    if has_at_names(images):  # a benchmark folder (VPR-datasets-downloader): positions from the names
        frame = at_folder_frame(folder, relative_to=output.resolve().parent)
        atomic_write(output, lambda p: frame.to_csv(p, index=False))
        print(f"wrote {len(frame)} rows to {output} (positions from the @UTM_east@UTM_north@ file names)")
        return output
    scan = scan_photos(images)
    if not scan.photos:
        raise VPRError(f"PHOTO_DIR {folder}: none of its {len(images)} image files has a GPS position in its EXIF "
                       f"({len(scan.without_gps)} without GPS, {len(scan.unreadable)} unreadable); "
                       "a poses CSV needs positions")
    warn_left_out(scan, folder)

    write_poses_csv(output, csv_rows(scan, output.resolve().parent))
    print(f"wrote {len(scan.photos)} rows to {output}")
    return output


if __name__ == "__main__":
    run_cli(main)
