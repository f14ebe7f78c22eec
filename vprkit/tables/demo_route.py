"""Built-in demo data set: one street seen by day and by night, made offline in seconds.

`run_experiment.py --demo` and `demo_data.py` call `generate_demo_dataset(out_dir)`. It shows what training is
for: the frozen backbone finds a place again under the light it was mapped in and is confused when
the light changes; the head is fitted on day/night pictures of some places and tested at others.

The world is 2-D: a camera looks sideways at a street facade (buildings with their own colours,
window grids, doors, shop signs and roofs; trees and street lamps) while driving along a straight
route that starts in Pittsburgh, PA. Places are `spacing_m` apart and a picture spans 32 m of
facade, so neighbouring pictures overlap. Each picture has viewpoint jitter (along the street,
height, zoom, roll) and sensor noise, sometimes a parked car in front; GPS is the true position
plus about a metre of noise, written as WGS84 lat/lon. By night the walls are dark and blue,
a random set of windows is lit (a different set each night), lamps glow and some signs shine.

The route is cut into three stretches of places: training (half), validation, test.
- database.csv: every place by day (drive A): the map that test queries are searched in.
- train.csv:    the training places by day (drive A) and on two nights, the day/night pairs a head
                learns from, plus the validation places by day (train_vpr's validation database).
- val.csv:      the validation places, drive B, by day and by night (chooses the epoch).
- test.csv:     the test places, drive B, by day and by night: day queries measure recognition
                under the mapping light, night queries under the other one.
Columns: image_path, lat, lon, camera_id, condition (no place label: supervision is GPS).
Images are `images/<drive>/<place:03d>.jpg`. A `manifest.json` (parameters, counts) is written
last: a later call with the same parameters returns at once; an interrupted one starts over.
Same parameters -> byte-identical files (on the same numpy / Pillow build).
"""
from __future__ import annotations

import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from vprkit.cli import VPRError, atomic_write
from vprkit.tables.places import EARTH_RADIUS_M  # no torch: the generator stays quick to start

GENERATOR_VERSION = 2  # bump when the pictures or CSVs change for the same parameters
MANIFEST_NAME = "manifest.json"
CSV_COLUMNS = ("image_path", "lat", "lon", "camera_id", "condition")
CAMERA_ID = "side"
ORIGIN_LATLON = (40.44062, -79.99589)  # Market Square, Pittsburgh
ROUTE_BEARING_DEG = 80.0  # clockwise from north: the street runs east by north
VIEW_W_M, GROUND_M, SKY_M = 32.0, 4.0, 26.0  # facade span of a picture; strip from -4 m to 26 m
PX_PER_M = 10  # strip resolution; pictures sample it at about 8 px/m (default size)
MARGIN_M = 30.0  # facade drawn before the first and after the last place (view and jitter)
SPLIT_SHARES = {"val": 0.2, "test": 0.3}  # of the places; the rest (first stretch) train


@dataclass(frozen=True)
class Drive:
    """One pass of the camera along the route, by day or by night."""

    name: str  # its image folder
    condition: str  # "day" or "night"


DAY_A, NIGHT_A, NIGHT_A2 = (Drive("2024-05-14_day", "day"), Drive("2024-05-14_night", "night"),
                            Drive("2024-06-20_night", "night"))
DAY_B, NIGHT_B = Drive("2024-09-02_day", "day"), Drive("2024-09-02_night", "night")
DRIVES = (DAY_A, NIGHT_A, NIGHT_A2, DAY_B, NIGHT_B)
CONTENTS: dict[str, tuple[tuple[Drive, str], ...]] = {  # each CSV: which drive's pictures of which stretch
    "database": ((DAY_A, "all"),),
    "train": ((DAY_A, "train"), (NIGHT_A, "train"), (NIGHT_A2, "train"), (DAY_A, "val")),
    "val": ((DAY_B, "val"), (NIGHT_B, "val")),
    "test": ((DAY_B, "test"), (NIGHT_B, "test")),
}
SPLITS = tuple(CONTENTS)
Colour = tuple[float, float, float]
WALLS = [(0.61, 0.29, 0.21), (0.71, 0.38, 0.25), (0.85, 0.79, 0.64), (0.79, 0.71, 0.54), (0.91, 0.76, 0.75),
         (0.73, 0.83, 0.76), (0.77, 0.83, 0.91), (0.94, 0.88, 0.66), (0.60, 0.60, 0.59), (0.78, 0.77, 0.74),
         (0.37, 0.50, 0.58), (0.30, 0.42, 0.33), (0.95, 0.95, 0.92), (0.45, 0.35, 0.30)]
SIGNS = [(0.75, 0.22, 0.17), (0.15, 0.68, 0.38), (0.17, 0.44, 0.73), (0.95, 0.77, 0.06), (0.56, 0.27, 0.68),
         (0.90, 0.49, 0.13), (0.09, 0.63, 0.52), (0.13, 0.13, 0.13)]


@dataclass(frozen=True)
class Building:
    x0: float  # metres along the route
    x1: float
    floors: int
    floor_h: float
    wall: Colour
    trim: Colour
    cols: int  # window columns
    win_w: float  # window size as a fraction of its grid cell
    win_h: float
    roof: str  # "flat", "cornice" or "gable"
    door: float  # door position, a fraction of the width
    sign: Colour | None  # a shop front with a sign band, else None
    uid: int  # seeds the lit windows at night


@dataclass(frozen=True)
class Street:
    buildings: tuple[Building, ...]
    trees: tuple[float, ...]  # positions along the route (m)
    lamps: tuple[float, ...]
    x_start: float  # the strip's first metre


def _near(rng: np.random.Generator, colour: Colour, spread: float = 0.05) -> Colour:
    return tuple(float(np.clip(c + rng.normal(0, spread), 0.02, 0.98)) for c in colour)  # type: ignore[return-value]


def describe_street(seed: int, length_m: float) -> Street:
    """Buildings 6-16 m wide side by side (a few gaps), trees and lamps, along [-MARGIN, length + MARGIN]."""
    rng = np.random.default_rng([seed, 1])
    buildings, x, uid = [], -MARGIN_M, 0
    while x < length_m + MARGIN_M:
        width = float(rng.uniform(6, 16))
        floors = int(rng.integers(2, 7))
        wall = _near(rng, WALLS[rng.integers(len(WALLS))])
        buildings.append(Building(
            x0=x, x1=x + width, floors=floors, floor_h=float(rng.uniform(2.9, 3.6)), wall=wall,
            trim=_near(rng, (0.93, 0.91, 0.87)) if rng.random() < 0.6 else tuple(c * 0.55 for c in wall),
            cols=max(1, int(width / rng.uniform(2.2, 3.8))), win_w=float(rng.uniform(0.35, 0.75)),
            win_h=float(rng.uniform(0.4, 0.7)), roof=str(rng.choice(["flat", "cornice", "gable"])),
            door=float(rng.uniform(0.15, 0.85)), sign=SIGNS[rng.integers(len(SIGNS))] if rng.random() < 0.45 else None,
            uid=uid))
        x += width + (float(rng.uniform(3, 8)) if rng.random() < 0.12 else 0.0)  # an alley now and then
        uid += 1
    trees = np.cumsum(rng.uniform(12, 45, size=int(length_m / 12) + 10)) - MARGIN_M
    lamps = np.arange(-MARGIN_M, length_m + MARGIN_M, 24.0) + rng.uniform(0, 24)
    return Street(tuple(buildings), tuple(float(t) for t in trees if t < length_m + MARGIN_M),
                  tuple(float(v) for v in lamps), -MARGIN_M)


def _rgb(colour: Sequence[float]) -> tuple[int, int, int]:
    return tuple(int(round(255 * min(1.0, max(0.0, c)))) for c in colour)  # type: ignore[return-value]


def _by_night(colour: Sequence[float]) -> Colour:
    """A surface lit only by the city glow: dark, low contrast, blue."""
    return tuple(0.45 * c + tint for c, tint in zip(colour, (0.0, 0.02, 0.06)))  # type: ignore[return-value]


def render_strip(street: Street, length_m: float, night: bool, drive_seed: Sequence[int]) -> Image.Image:
    """The whole facade as one image, PX_PER_M pixels a metre; ground level at GROUND_M from the bottom.
    By night, which windows are lit depends on `drive_seed` (one set per night drive)."""
    width, height = int((length_m + 2 * MARGIN_M) * PX_PER_M), int((SKY_M + GROUND_M) * PX_PER_M)
    paint: Callable[[Sequence[float]], tuple[int, int, int]] = (lambda c: _rgb(_by_night(c))) if night else _rgb
    sky = (np.linspace((0.01, 0.02, 0.06), (0.04, 0.05, 0.12), height) if night
           else np.linspace((0.45, 0.65, 0.92), (0.8, 0.88, 0.95), height))
    strip = Image.fromarray(np.repeat((sky * 255).astype(np.uint8)[:, None], width, axis=1))
    glow = Image.new("RGB", (width, height)) if night else None
    draw, lights = ImageDraw.Draw(strip), (ImageDraw.Draw(glow) if glow else None)

    def box(x0: float, z0: float, x1: float, z1: float) -> list[float]:  # metres -> strip pixels
        return [(x0 - street.x_start) * PX_PER_M, height - (z1 + GROUND_M) * PX_PER_M,
                (x1 - street.x_start) * PX_PER_M - 1, height - (z0 + GROUND_M) * PX_PER_M - 1]

    for b in street.buildings:
        lit = np.random.default_rng([*drive_seed, b.uid]).random(b.floors * b.cols + 1) < 0.2
        top = b.floors * b.floor_h
        draw.rectangle(box(b.x0, 0, b.x1, top), fill=paint(b.wall))
        if b.roof == "cornice":
            draw.rectangle(box(b.x0 - 0.3, top, b.x1 + 0.3, top + 0.6), fill=paint(b.trim))
        elif b.roof == "gable":
            x0, z_peak, x1, z_base = box(b.x0, top, b.x1, top + min(4.0, (b.x1 - b.x0) / 3))
            draw.polygon([(x0, z_base), (x1, z_base), ((x0 + x1) / 2, z_peak)],
                         fill=paint(tuple(c * 0.7 for c in b.trim)))
        cell = (b.x1 - b.x0) / b.cols
        door = b.x0 + b.door * (b.x1 - b.x0)
        for floor in range(1 if b.sign else 0, b.floors):
            for col in range(b.cols):
                x = b.x0 + (col + 0.5) * cell
                if floor == 0 and abs(x - door) < cell / 2 + 0.6:
                    continue  # the door's place
                z = (floor + 0.5) * b.floor_h
                w, h = cell * b.win_w / 2, b.floor_h * b.win_h / 2
                draw.rectangle(box(x - w - 0.15, z - h - 0.15, x + w + 0.15, z + h + 0.15), fill=paint(b.trim))
                on = night and lit[floor * b.cols + col]
                pane = (1.0, 0.8, 0.45) if on else (0.18, 0.22, 0.28)
                draw.rectangle(box(x - w, z - h, x + w, z + h), fill=_rgb(pane) if on else paint(pane))
                if not night:  # sky reflected in the upper pane
                    draw.rectangle(box(x - w, z + h * 0.2, x + w, z + h), fill=_rgb((0.42, 0.52, 0.62)))
                if on:
                    lights.rectangle(box(x - w, z - h, x + w, z + h), fill=(150, 110, 50))
        if b.sign:  # shop window, sign band with "letters", door
            draw.rectangle(box(b.x0 + 0.5, 0.3, b.x1 - 0.5, 2.6), fill=paint((0.2, 0.24, 0.28)))
            shines = night and lit[-1]
            sign = (1.0, 1.0, 0.95) if shines else b.sign
            draw.rectangle(box(b.x0 + 0.3, 2.7, b.x1 - 0.3, 3.5 if b.floor_h > 3.4 else 3.3),
                           fill=_rgb(b.sign) if shines else paint(b.sign))
            letters = np.random.default_rng([b.uid, 7]).uniform(0.3, 0.9, size=int((b.x1 - b.x0) / 0.8))
            for k, size in enumerate(letters):
                x = b.x0 + 0.8 + k * 0.8
                if x + 0.5 < b.x1 - 0.6:
                    draw.rectangle(box(x, 2.85, x + 0.5 * size, 3.15),
                                   fill=_rgb(sign) if shines else paint((0.97, 0.97, 0.97)))
            if shines:
                lights.rectangle(box(b.x0, 2.7, b.x1, 3.4), fill=_rgb(b.sign))
        draw.rectangle(box(door - 0.6, 0, door + 0.6, 2.3), fill=paint(tuple(c * 0.45 for c in b.trim)))
    for t in street.trees:
        draw.rectangle(box(t - 0.2, 0, t + 0.2, 3.0), fill=paint((0.3, 0.22, 0.15)))
        draw.ellipse(box(t - 2.2, 2.4, t + 2.2, 6.6), fill=paint((0.22, 0.42, 0.18)))
    for lamp in street.lamps:
        draw.rectangle(box(lamp - 0.08, 0, lamp + 0.08, 5.0), fill=paint((0.25, 0.25, 0.27)))
        draw.rectangle(box(lamp - 0.35, 4.8, lamp + 0.35, 5.2),
                       fill=_rgb((1.0, 0.9, 0.6)) if night else paint((0.3, 0.3, 0.3)))
        if night:
            lights.ellipse(box(lamp - 4, 0, lamp + 4, 7), fill=(120, 90, 45))
    draw.rectangle(box(street.x_start, -GROUND_M, street.x_start + width / PX_PER_M, 0), fill=paint((0.55, 0.55, 0.53)))
    if glow is None:
        return strip
    glow = glow.filter(ImageFilter.GaussianBlur(12))
    return Image.fromarray(np.clip(np.asarray(strip, np.int16) + np.asarray(glow, np.int16), 0, 255).astype(np.uint8))


def take_picture(strip: Image.Image, street: Street, s_m: float, night: bool, balance: np.ndarray,
                 rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """The camera at `s_m` metres along the route: an affine view of the strip (jittered along the
    street, in height, zoom and roll), maybe a parked car in front, exposure, colour balance, noise."""
    w, h = size
    along, up, zoom, roll = (rng.normal(0, 1.0), rng.normal(0, 0.4), math.exp(rng.normal(0, 0.05)),
                             math.radians(rng.normal(0, 1.2)))
    k = zoom * VIEW_W_M * PX_PER_M / w  # strip pixels per picture pixel
    centre_z = -1.5 + VIEW_W_M * h / w / 2 + up  # the picture's bottom edge shows the pavement 1.5 m below ground
    cx, cy = (s_m + along - street.x_start) * PX_PER_M, strip.height - (centre_z + GROUND_M) * PX_PER_M
    a, b, d, e = k * math.cos(roll), -k * math.sin(roll), k * math.sin(roll), k * math.cos(roll)
    picture = strip.transform(size, Image.Transform.AFFINE,
                              (a, b, cx - a * w / 2 - b * h / 2, d, e, cy - d * w / 2 - e * h / 2),
                              resample=Image.Resampling.BILINEAR)
    if rng.random() < 0.3:  # a parked car hides part of the ground floor
        scale, x = w / VIEW_W_M, rng.uniform(-0.1, 0.9) * w
        body = _rgb(_near(rng, SIGNS[rng.integers(len(SIGNS))], 0.1))
        car = ImageDraw.Draw(picture)
        car.rectangle([x, h - 1.4 * scale, x + 4.4 * scale, h - 0.3 * scale],
                      fill=tuple(c // 6 for c in body) if night else body)
        car.rectangle([x + 1.0 * scale, h - 2.0 * scale, x + 3.4 * scale, h - 1.4 * scale], fill=(20, 24, 30))
    gain = math.exp(rng.normal(0, 0.15 if night else 0.08))
    pixels = (np.asarray(picture, np.float32) * balance * gain
              + rng.normal(0, 4.0 if night else 2.0, (h, w, 1)).astype(np.float32))
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))


def stretches(num_places: int) -> dict[str, range]:
    """Consecutive places of each stretch: training first, then validation, then test."""
    n_val, n_test = (max(1, round(num_places * SPLIT_SHARES[s])) for s in ("val", "test"))
    n_train = num_places - n_val - n_test
    return {"all": range(num_places), "train": range(n_train), "val": range(n_train, n_train + n_val),
            "test": range(n_train + n_val, num_places)}


def route_latlon(s_m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Metres along the route to WGS84 degrees: the point `s_m` along the great circle leaving
    the origin at ROUTE_BEARING_DEG (the spherical destination formula: distances are exact)."""
    lat0, lon0, bearing = (math.radians(v) for v in (*ORIGIN_LATLON, ROUTE_BEARING_DEG))
    d = np.asarray(s_m, np.float64) / EARTH_RADIUS_M
    lat = np.arcsin(math.sin(lat0) * np.cos(d) + math.cos(lat0) * np.sin(d) * math.cos(bearing))
    lon = lon0 + np.arctan2(math.sin(bearing) * np.sin(d) * math.cos(lat0), np.cos(d) - math.sin(lat0) * np.sin(lat))
    return np.degrees(lat), np.degrees(lon)


@dataclass
class DemoDataset:
    """Where a generated demo data set lives and what it holds."""

    root: Path
    num_places: int
    counts: dict[str, int]  # images per split
    conditions: dict[str, list[str]]  # conditions per split
    params: dict = field(default_factory=dict)
    generated: bool = False  # False when an existing complete data set was reused

    @property
    def csvs(self) -> dict[str, Path]:
        return {split: self.root / f"{split}.csv" for split in SPLITS}

    db_csv = property(lambda self: self.csvs["database"])
    train_csv = property(lambda self: self.csvs["train"])
    val_csv = property(lambda self: self.csvs["val"])
    test_csv = property(lambda self: self.csvs["test"])

    @property
    def num_images(self) -> int:
        return sum(self.counts.values())


def _write(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def _complete_manifest(root: Path, params: dict) -> dict | None:
    """The manifest of a complete data set with these parameters in root, else None."""
    try:
        manifest = json.loads((root / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("version") != GENERATOR_VERSION or manifest.get("params") != params:
        return None
    files = [root / f"{split}.csv" for split in SPLITS] + [root / f for f in manifest.get("images", [])]
    return manifest if all(f.is_file() for f in files) else None


def _dataset(root: Path, manifest: dict, generated: bool) -> DemoDataset:
    return DemoDataset(root, manifest["params"]["num_places"], dict(manifest["counts"]),
                       {k: list(v) for k, v in manifest["conditions"].items()}, dict(manifest["params"]), generated)


def generate_demo_dataset(out_dir: str | Path, seed: int = 0, num_places: int = 72, spacing_m: float = 18.0,
                          image_size: tuple[int, int] = (256, 192), jpeg_quality: int = 88, force: bool = False,
                          progress: Callable[[str], None] | None = None) -> DemoDataset:
    """Write the demo data set into out_dir (see the module docstring) and describe it. Returns at
    once, writing nothing, when out_dir holds a complete one made with the same parameters and
    generator version (unless force). `progress`, if given, receives one line per drive."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise VPRError(f"--seed must be a non-negative integer, got {seed!r}")
    if num_places < 4:
        raise VPRError(f"--num_places must be at least 4 (training, validation and test places), got {num_places}")
    if not spacing_m > 0:
        raise VPRError(f"--spacing_m must be positive, got {spacing_m}")
    root = Path(out_dir)
    params = {"seed": int(seed), "num_places": int(num_places), "spacing_m": float(spacing_m),
              "image_size": [int(image_size[0]), int(image_size[1])], "jpeg_quality": int(jpeg_quality)}
    manifest = None if force else _complete_manifest(root, params)
    if manifest is not None:
        return _dataset(root, manifest, generated=False)

    start = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST_NAME).unlink(missing_ok=True)  # incomplete until the manifest is back
    length_m = (num_places - 1) * spacing_m
    street, places = describe_street(seed, length_m), stretches(num_places)
    strips: dict[tuple[str, int], Image.Image] = {}
    shots: dict[tuple[Drive, int], str] = {}  # (drive, place) -> its CSV row
    rows: dict[str, list[str]] = {split: [] for split in SPLITS}
    for split, parts in CONTENTS.items():
        for drive, stretch in parts:
            number, night = DRIVES.index(drive), drive.condition == "night"
            key = (drive.condition, number if night else 0)  # by day every drive sees the same facade
            if key not in strips:
                strips[key] = render_strip(street, length_m, night, (seed, number))
            balance = 1 + np.random.default_rng([seed, number, 2]).normal(0, 0.04, 3).astype(np.float32)
            for place in places[stretch]:
                if (drive, place) not in shots:
                    rng = np.random.default_rng([seed, number, 3, place])
                    relative = f"images/{drive.name}/{place:03d}.jpg"
                    picture = take_picture(strips[key], street, place * spacing_m, night, balance, rng,
                                           tuple(image_size))
                    buffer = io.BytesIO()
                    picture.save(buffer, format="JPEG", quality=jpeg_quality)
                    _write(root / relative, buffer.getvalue())
                    lat, lon = route_latlon(place * spacing_m + rng.normal(0, 1.0))  # GPS noise
                    shots[drive, place] = f"{relative},{lat:.7f},{lon:.7f},{CAMERA_ID},{drive.condition}"
                rows[split].append(shots[drive, place])
        if progress:
            progress(f"demo data: {split}.csv: {len(rows[split])} images")
    images = [row.split(",")[0] for row in shots.values()]
    keep = set(images)
    for stale in sorted(root.glob("images/*/*.jpg")):  # from other parameters or an older generator
        if stale.relative_to(root).as_posix() not in keep:
            stale.unlink()
    for split in SPLITS:
        _write(root / f"{split}.csv", "\n".join([",".join(CSV_COLUMNS), *rows[split], ""]).encode())
    manifest = {"version": GENERATOR_VERSION, "params": params, "counts": {s: len(rows[s]) for s in SPLITS},
                "conditions": {s: sorted({d.condition for d, _ in parts}) for s, parts in CONTENTS.items()},
                "stretches": {s: [r.start, r.stop] for s, r in places.items()}, "images": images}
    _write(root / MANIFEST_NAME, (json.dumps(manifest, indent=1) + "\n").encode())
    if progress:
        progress(f"demo data: {len(images)} images in {root} ({time.perf_counter() - start:.1f} s)")
    return _dataset(root, manifest, generated=True)
