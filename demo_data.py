"""Built-in demo data set: a small synthetic Visual Place Recognition problem, made offline.

`run_experiment.py --demo` calls `generate_demo_dataset(out_dir)`. It needs no download and is
deterministic: the same parameters give byte-identical CSVs and JPEGs (on the same numpy /
Pillow build). The default size (64 places x 5 traversals = 320 JPEGs of 256 x 192, ~5 MB)
takes about 13 s of one CPU core.

The world
---------
A street route of `num_places` places, `spacing_m` apart (default 64 x 18 m, about 1.1 km),
along a gently curving road that starts in Pittsburgh, PA. The street is drawn procedurally in 3-D
from 36 m blocks: rows of buildings on both sides (colour, height, floors, window grid, shop
fronts with signs and awnings), parks with trees, street lamps, road signs, zebra crossings, and
a distant skyline of towers. A few blocks are exact copies of others elsewhere on the route:
perceptual aliasing, different places that look alike.

The traversals
--------------
A forward-facing camera drives the route several times. Each traversal has its own vehicle
(camera height, field of view), lane, and lighting: `day` (sun from a traversal-specific
direction), `dusk` (warm low light, some windows and lamps lit) or `night` (dark facades, a
random set of lit windows per traversal, street lamps, car lights, sensor noise). Every image has
its own viewpoint jitter (along-track and lateral shift, yaw, pitch, roll, zoom), haze, noise and
traffic: parked and moving cars, a passing bus, pedestrians (occluders). GPS is the true camera
position plus a few metres of noise, written as WGS84 lat/lon.

Splits (poses CSVs as in DESIGN.md §2; image paths relative to the CSV folder)
------------------------------------------------------------------------------
- train.csv: the database and the training set: three mapping traversals, day, dusk and night,
  so that GPS positives join each place's looks under all three conditions.
- val.csv:   queries for choosing the epoch: a later night traversal (low, wide-angle camera).
- test.csv:  the final queries: another night traversal (a van: high camera, zoomed, other lane).
Columns: image_path, lat, lon, camera_id, condition. There is deliberately no place label:
supervision comes from GPS. Image files are `images/<traversal>/<place:03d>.jpg`.

A `manifest.json` (parameters, generator version, counts) is written last; a later call with the
same parameters finds it and returns at once, and an interrupted generation (no manifest, or a
file missing) is regenerated.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Bump whenever the pictures or CSVs change for the same parameters: old data sets regenerate.
GENERATOR_VERSION = 1
MANIFEST_NAME = "manifest.json"
CSV_COLUMNS = ("image_path", "lat", "lon", "camera_id", "condition")
SPLITS = ("train", "val", "test")

EARTH_RADIUS_M = 6_371_008.8  # mean Earth radius (IUGG), as trainable_vpr uses
ORIGIN_LATLON = (40.44062, -79.99589)  # Market Square, Pittsburgh (right-hand traffic, like Pitts30k)
ROUTE_START_HEADING = math.radians(100.0)  # 0 = east, counter-clockwise: the route sets off north by west

BLOCK_M = 36.0  # the street is built from blocks of this length; twins copy whole blocks
ROAD_HALF_WIDTH_M = 4.0  # two lanes of 3.5 m and a little gutter
FACADE_OFFSET_M = 7.0  # building line: road + 3 m sidewalk
LANE_CENTRE_M = -1.75  # right-hand traffic: the camera drives in the right lane
VIEW_AHEAD_M = 150.0  # objects farther ahead are not drawn (and mostly lost in haze)
SUPERSAMPLE = 2  # render at twice the size and downsample: anti-aliased edges
LAMP_COLOUR = np.array([1.0, 0.78, 0.5])  # sodium-ish street light falling on surfaces
WARM_LIGHT, COOL_LIGHT = np.array([1.0, 0.82, 0.5]), np.array([0.8, 0.88, 1.0])  # lit windows


# =============================================================================================
# 1. Route geometry and coordinates
# =============================================================================================
@dataclass(frozen=True)
class Route:
    """The road centreline, sampled every `step` metres of arc length from `s_start`."""

    s_start: float
    step: float
    xy: np.ndarray  # (N, 2) metres east / north of the origin
    heading: np.ndarray  # (N,) radians, 0 = east, counter-clockwise; continuous (unwrapped)

    def _index(self, s) -> np.ndarray:
        return (np.asarray(s, dtype=np.float64) - self.s_start) / self.step

    def point(self, s, lateral=0.0) -> np.ndarray:
        """Ground point(s) at arc length s, `lateral` metres to the left of the centreline."""
        i = self._index(s)
        grid = np.arange(len(self.heading))
        x = np.interp(i, grid, self.xy[:, 0])
        y = np.interp(i, grid, self.xy[:, 1])
        h = np.interp(i, grid, self.heading)
        lateral = np.asarray(lateral, dtype=np.float64)
        return np.stack([x - lateral * np.sin(h), y + lateral * np.cos(h)], axis=-1)

    def heading_at(self, s) -> np.ndarray:
        return np.interp(self._index(s), np.arange(len(self.heading)), self.heading)


def make_route(length_m: float, seed: int, step: float = 1.0, before_m: float = 20.0,
               after_m: float = VIEW_AHEAD_M + 40.0) -> Route:
    """A smooth, gently winding road: curvature is a sum of two slow sinusoids (radius >= 75 m;
    the heading stays within a 120° fan, so the road never doubles back), integrated into a
    centreline through the origin (arc length 0)."""
    rng = np.random.default_rng([seed, 101])
    s = np.arange(-before_m, length_m + after_m + step / 2, step)
    amp = rng.uniform([0.004, 0.003], [0.007, 0.006])
    wavelength = rng.uniform([450.0, 170.0], [700.0, 280.0])
    phase = rng.uniform(0, 2 * np.pi, 2)
    curvature = sum(a * np.sin(2 * np.pi * s / w + p) for a, w, p in zip(amp, wavelength, phase))
    heading = ROUTE_START_HEADING + np.cumsum(curvature) * step
    heading -= np.interp(0.0, s, heading) - ROUTE_START_HEADING
    xy = np.cumsum(np.stack([np.cos(heading), np.sin(heading)], axis=1) * step, axis=0)
    xy -= np.array([np.interp(0.0, s, xy[:, 0]), np.interp(0.0, s, xy[:, 1])])
    return Route(s_start=float(s[0]), step=step, xy=xy, heading=heading)


def local_to_latlon(east_m: np.ndarray, north_m: np.ndarray,
                    origin: tuple[float, float] = ORIGIN_LATLON) -> tuple[np.ndarray, np.ndarray]:
    """Metres east/north of `origin` to WGS84 degrees on the sphere (azimuthal equidistant
    inverse): distance and bearing from the origin are exact, local distances correct to far
    better than a millimetre over a few kilometres."""
    lat0, lon0 = np.radians(origin[0]), np.radians(origin[1])
    east_m, north_m = np.asarray(east_m, np.float64), np.asarray(north_m, np.float64)
    d = np.hypot(east_m, north_m) / EARTH_RADIUS_M
    bearing = np.arctan2(east_m, north_m)
    lat = np.arcsin(np.sin(lat0) * np.cos(d) + np.cos(lat0) * np.sin(d) * np.cos(bearing))
    lon = lon0 + np.arctan2(np.sin(bearing) * np.sin(d) * np.cos(lat0), np.cos(d) - np.sin(lat0) * np.sin(lat))
    lon = (np.degrees(lon) + 180.0) % 360.0 - 180.0
    return np.degrees(lat), lon


def haversine_m(lat1, lon1, lat2, lon2) -> np.ndarray:
    """Great-circle distance in metres (vectorised)."""
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dp, dl = p2 - p1, np.radians(np.asarray(lon2) - np.asarray(lon1))
    a = np.sin(dp / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * np.arcsin(np.minimum(1.0, np.sqrt(a)))


# =============================================================================================
# 2. Scene description: what stands along the street (pure data, seeded by block)
# =============================================================================================
Colour = tuple[float, float, float]  # linear-ish RGB albedo, 0..1


def _rgb(hex_code: str) -> Colour:
    return tuple(int(hex_code[i:i + 2], 16) / 255 for i in (1, 3, 5))  # type: ignore[return-value]


WALLS = {
    "brick": [_rgb(c) for c in ("#9c4a35", "#b5603f", "#7e3b2c", "#a8553a")],
    "stone": [_rgb(c) for c in ("#d8c9a3", "#c9b48a", "#e3d7b8", "#bfae8f")],
    "pastel": [_rgb(c) for c in ("#e8c3c0", "#b9d3c2", "#c5d3e8", "#efe0a8", "#f0f0e8")],
    "concrete": [_rgb(c) for c in ("#9a9a96", "#b3b0a8", "#7d8084", "#c7c4bd")],
    "glass": [_rgb(c) for c in ("#5f7f94", "#46606e", "#7b949e", "#3d5560")],
}
SHOP_COLOURS = [_rgb(c) for c in ("#c0392b", "#27ae60", "#2c6fbb", "#f1c40f", "#8e44ad", "#e67e22", "#16a085", "#222222")]
CAR_COLOURS = [_rgb(c) for c in ("#eeeeee", "#1b1b1b", "#8a8d91", "#b02a2a", "#224a8a", "#c9c9c9", "#3b5e3b", "#d8b13a")]
STYLES = {
    # wall family, floors, floor height, bay (m), window width / height as a fraction of bay / floor
    "townhouse": dict(walls="brick", floors=(3, 5), floor_h=3.1, bay=(2.6, 3.4), win=(0.42, 0.58)),
    "terrace": dict(walls="pastel", floors=(2, 4), floor_h=3.0, bay=(2.8, 3.6), win=(0.45, 0.52)),
    "stone": dict(walls="stone", floors=(3, 5), floor_h=3.5, bay=(3.0, 4.0), win=(0.38, 0.6)),
    "office": dict(walls="concrete", floors=(5, 9), floor_h=3.4, bay=(1.8, 2.6), win=(0.7, 0.5)),
    "glass": dict(walls="glass", floors=(6, 12), floor_h=3.6, bay=(1.6, 2.2), win=(0.9, 0.8)),
    "warehouse": dict(walls="brick", floors=(1, 3), floor_h=4.5, bay=(4.0, 6.0), win=(0.5, 0.35)),
}


@dataclass(frozen=True)
class Building:
    uid: int  # seeds per-traversal details (lit windows)
    side: int  # +1 left of the road, -1 right
    s0: float
    s1: float
    setback: float  # metres behind the building line
    depth: float
    height: float
    floors: int
    floor_h: float
    bay: float
    win_w: float  # fraction of the bay
    win_h: float  # fraction of the floor
    wall: Colour
    trim: Colour
    glass: Colour
    shop: Colour | None  # ground-floor shop front with sign band and awning, else None


@dataclass(frozen=True)
class Tree:
    s: float
    lateral: float
    trunk_h: float
    crown_r: float
    colour: Colour


@dataclass(frozen=True)
class Lamp:
    s: float
    lateral: float
    height: float


@dataclass(frozen=True)
class Sign:
    s: float
    lateral: float
    height: float
    width: float
    colour: Colour
    shape: str  # "rect", "round", "triangle"


@dataclass(frozen=True)
class Tower:
    """A distant skyline landmark, in world metres (not tied to the route)."""

    x: float
    y: float
    half: float
    height: float
    colour: Colour
    spire: bool


@dataclass(frozen=True)
class World:
    route: Route
    buildings: tuple[Building, ...]
    trees: tuple[Tree, ...]
    lamps: tuple[Lamp, ...]
    signs: tuple[Sign, ...]
    crossings: tuple[float, ...]  # arc lengths of zebra crossings
    towers: tuple[Tower, ...]
    twins: dict  # block index -> the block it copies (perceptual aliasing)


def _jitter_colour(rng: np.random.Generator, colour: Colour, amount: float = 0.05) -> Colour:
    return tuple(float(np.clip(c + rng.normal(0, amount), 0.02, 0.98)) for c in colour)  # type: ignore[return-value]


def describe_building(rng: np.random.Generator, uid: int, side: int, s0: float, s1: float) -> Building:
    """One building: a style (townhouse, office, ...) with its own colour, height and windows."""
    name = rng.choice(list(STYLES), p=[0.24, 0.2, 0.16, 0.16, 0.1, 0.14])
    style = STYLES[name]
    floors = int(rng.integers(style["floors"][0], style["floors"][1] + 1))
    wall = _jitter_colour(rng, WALLS[style["walls"]][rng.integers(len(WALLS[style["walls"]]))])
    has_shop = name in ("townhouse", "terrace", "stone", "office") and rng.random() < 0.45
    return Building(
        uid=uid, side=side, s0=s0, s1=s1,
        setback=float(rng.choice([0.0, 0.0, 0.0, 0.8, 2.5])),
        depth=float(rng.uniform(8, 14)),
        height=floors * style["floor_h"] + float(rng.uniform(0.3, 1.2)),
        floors=floors, floor_h=style["floor_h"],
        bay=float(rng.uniform(*style["bay"])),
        win_w=style["win"][0] * float(rng.uniform(0.85, 1.1)),
        win_h=style["win"][1] * float(rng.uniform(0.85, 1.1)),
        wall=wall,
        trim=_jitter_colour(rng, (0.92, 0.9, 0.86) if rng.random() < 0.6 else tuple(c * 0.6 for c in wall)),
        glass=_jitter_colour(rng, (0.16, 0.2, 0.24), 0.03),
        shop=SHOP_COLOURS[rng.integers(len(SHOP_COLOURS))] if has_shop else None,
    )


def describe_block_side(rng: np.random.Generator, side: int, s0: float, uid0: int):
    """Buildings (or a small park) along one side of one block [s0, s0 + BLOCK_M)."""
    buildings, trees = [], []
    if rng.random() < 0.15:  # a park: trees behind a low frontage, no buildings
        for k in range(int(rng.integers(3, 6))):
            trees.append(Tree(s=s0 + (k + rng.uniform(0.2, 0.8)) * BLOCK_M / 5,
                              lateral=side * float(rng.uniform(8, 16)), trunk_h=float(rng.uniform(2.5, 4)),
                              crown_r=float(rng.uniform(2.5, 4.5)), colour=_jitter_colour(rng, (0.2, 0.38, 0.16), 0.06)))
        return buildings, trees
    s, k = s0, 0
    while s < s0 + BLOCK_M - 1e-6:
        width = float(rng.uniform(7, 20))
        if s0 + BLOCK_M - (s + width) < 5:  # no sliver at the end of the block
            width = s0 + BLOCK_M - s
        buildings.append(describe_building(rng, uid0 + k, side, s, s + width))
        s, k = s + width, k + 1
    return buildings, trees


def describe_block(seed: int, design: int, index: int):
    """Everything in block `index`, drawn from the random stream of block `design` (a twin block
    has design != index and so copies another block's layout exactly)."""
    rng = np.random.default_rng([seed, 202, design])
    s0 = index * BLOCK_M - BLOCK_M / 2
    uid0 = index * 100
    buildings, trees, signs = [], [], []
    for side in (+1, -1):
        b, t = describe_block_side(rng, side, s0, uid0 + (0 if side > 0 else 50))
        buildings += b
        trees += t
    for _ in range(int(rng.integers(0, 3))):  # street trees on the sidewalk
        side = 1 if rng.random() < 0.5 else -1
        trees.append(Tree(s=s0 + float(rng.uniform(2, BLOCK_M - 2)), lateral=side * float(rng.uniform(5.2, 6.0)),
                          trunk_h=float(rng.uniform(2.2, 3.2)), crown_r=float(rng.uniform(1.6, 2.8)),
                          colour=_jitter_colour(rng, (0.22, 0.42, 0.18), 0.06)))
    if rng.random() < 0.5:
        side = 1 if rng.random() < 0.5 else -1
        shape = str(rng.choice(["rect", "round", "triangle"]))
        colour = {"rect": [_rgb("#1f5fbf"), _rgb("#1e7a3c"), _rgb("#f2f2f2")], "round": [_rgb("#d42a2a")],
                  "triangle": [_rgb("#f0c419"), _rgb("#d42a2a")]}[shape]
        signs.append(Sign(s=s0 + float(rng.uniform(3, BLOCK_M - 3)), lateral=side * 4.6, height=float(rng.uniform(2.2, 3.0)),
                          width=float(rng.uniform(0.7, 1.6)), colour=colour[rng.integers(len(colour))], shape=shape))
    crossing = s0 + float(rng.uniform(4, BLOCK_M - 8)) if rng.random() < 0.2 else None
    lamps = [Lamp(s=s0 + 6.0, lateral=-4.5, height=6.0), Lamp(s=s0 + 24.0, lateral=4.5, height=6.0)]
    return buildings, trees, lamps, signs, crossing


def choose_twins(seed: int, num_blocks: int, fraction: float) -> dict:
    """Block index -> earlier block it copies; twins are at least 6 blocks (~200 m) apart."""
    rng = np.random.default_rng([seed, 303])
    twins: dict[int, int] = {}
    for b in rng.permutation(np.arange(7, num_blocks))[: int(round(fraction * num_blocks))]:
        source = int(rng.integers(0, b - 6))
        if source not in twins and source not in twins.values() and int(b) not in twins.values():
            twins[int(b)] = source  # each block is copied at most once and is no copy itself
    return dict(sorted(twins.items()))


def describe_towers(seed: int, route: Route, length_m: float) -> tuple[Tower, ...]:
    """Skyline landmarks 120-400 m off the route: visible above the street from far away."""
    rng = np.random.default_rng([seed, 404])
    towers = []
    for s in np.arange(0.0, length_m + VIEW_AHEAD_M, 70.0):
        side = 1 if rng.random() < 0.5 else -1
        x, y = route.point(s + rng.uniform(0, 70), side * rng.uniform(120, 400))
        towers.append(Tower(x=float(x), y=float(y), half=float(rng.uniform(8, 18)), height=float(rng.uniform(40, 110)),
                            colour=_jitter_colour(rng, WALLS["concrete"][rng.integers(4)] if rng.random() < 0.6
                                                  else WALLS["glass"][rng.integers(4)]), spire=bool(rng.random() < 0.25)))
    return tuple(towers)


def describe_world(seed: int, num_places: int, spacing_m: float, alias_fraction: float = 0.15) -> World:
    length = (num_places - 1) * spacing_m
    route = make_route(length, seed)
    num_blocks = int(math.ceil((length + VIEW_AHEAD_M + BLOCK_M) / BLOCK_M)) + 1
    twins = choose_twins(seed, num_blocks, alias_fraction)
    parts = [describe_block(seed, twins.get(b, b), b) for b in range(num_blocks)]
    return World(
        route=route,
        buildings=tuple(x for p in parts for x in p[0]),
        trees=tuple(x for p in parts for x in p[1]),
        lamps=tuple(x for p in parts for x in p[2]),
        signs=tuple(x for p in parts for x in p[3]),
        crossings=tuple(p[4] for p in parts if p[4] is not None),
        towers=describe_towers(seed, route, length),
        twins=twins,
    )


# =============================================================================================
# 3. Traversals, conditions and shots (one shot = one image)
# =============================================================================================
@dataclass(frozen=True)
class Traversal:
    name: str  # folder under images/
    split: str  # train / val / test
    condition: str  # day / dusk / night
    lane: float  # camera's lateral position, metres left of the road centre
    camera_height: float
    hfov_deg: float
    gps_sigma_m: float
    camera_id: str = "front"


# The database / training set holds every place under all three conditions, so that GPS
# positives tie a place's day, dusk and night looks together; the queries are later night drives
# with other vehicles, the hardest condition and the one a VPR system most needs to handle.
TRAVERSALS = (
    Traversal("2023-05-14_day", "train", "day", LANE_CENTRE_M, 1.6, 70.0, 0.8),
    Traversal("2023-10-02_dusk", "train", "dusk", LANE_CENTRE_M + 0.5, 1.9, 64.0, 1.5),
    Traversal("2023-11-20_night", "train", "night", LANE_CENTRE_M - 0.3, 1.75, 66.0, 2.0),
    Traversal("2023-12-03_night", "val", "night", LANE_CENTRE_M - 0.4, 1.5, 74.0, 2.0),  # low, wide-angle
    Traversal("2024-01-09_night", "test", "night", LANE_CENTRE_M + 0.9, 2.2, 58.0, 2.0),  # a van, zoomed
)

# Per-image viewpoint jitter (uniform half-ranges or normal sigmas, as named).
ALONG_JITTER_M = 1.2
LATERAL_JITTER_M = 0.5
YAW_SIGMA_DEG = 4.0
PITCH_SIGMA_DEG = 1.0
ROLL_SIGMA_DEG = 1.5
ZOOM_JITTER_DEG = 4.0
GPS_NOISE_CLIP_M = 2.5  # GPS errors are Gaussian (sigma per traversal), at most this far off


@dataclass(frozen=True)
class Lighting:
    name: str
    sky_zenith: Colour
    sky_horizon: Colour
    ground: Colour
    ambient: Colour  # light on every surface
    sun: Colour  # direct light, times the cosine to the sun
    sun_dir: tuple[float, float, float]  # unit vector towards the sun (east, north, up)
    fog: Colour
    visibility_m: float
    lit_window_p: float  # share of windows lit
    shop_open_p: float  # share of shops lit up
    lamps_on: bool
    lamp_strength: float
    glow: float  # strength of the bloom around lights
    noise: float  # sensor noise sigma, in 0..255 units
    blur: float  # Gaussian blur radius in output pixels (motion / focus)


def make_lighting(condition: str, rng: np.random.Generator) -> Lighting:
    """The light of one traversal (sun azimuth and exact tones vary between traversals)."""
    azimuth = rng.uniform(0, 2 * np.pi)
    if condition == "day":
        elev = np.radians(rng.uniform(25, 55))
        return Lighting("day", _rgb("#4f86c6"), _rgb("#c9dcec"), _rgb("#8c8a85"),
                        ambient=(0.55, 0.57, 0.62), sun=(0.55, 0.52, 0.45),
                        sun_dir=(np.cos(elev) * np.cos(azimuth), np.cos(elev) * np.sin(azimuth), np.sin(elev)),
                        fog=_rgb("#c9d6e0"), visibility_m=float(rng.uniform(350, 600)), lit_window_p=0.0, shop_open_p=0.0,
                        lamps_on=False, lamp_strength=0.0, glow=0.0, noise=2.0, blur=0.0)
    if condition == "dusk":
        elev = np.radians(rng.uniform(1, 6))
        return Lighting("dusk", _rgb("#2c2f5e"), _rgb("#e8925a"), _rgb("#4a4350"),
                        ambient=(0.26, 0.22, 0.27), sun=(0.38, 0.2, 0.1),
                        sun_dir=(np.cos(elev) * np.cos(azimuth), np.cos(elev) * np.sin(azimuth), np.sin(elev)),
                        fog=_rgb("#8a6f78"), visibility_m=float(rng.uniform(180, 320)),
                        lit_window_p=float(rng.uniform(0.15, 0.3)), shop_open_p=0.9,
                        lamps_on=True, lamp_strength=0.35, glow=0.6, noise=4.0, blur=0.3)
    if condition == "night":
        return Lighting("night", _rgb("#05070f"), _rgb("#1c2233"), _rgb("#101014"),
                        ambient=(0.05, 0.05, 0.07), sun=(0.0, 0.0, 0.0), sun_dir=(0.0, 0.0, 1.0),
                        fog=_rgb("#171a24"), visibility_m=float(rng.uniform(90, 160)),
                        lit_window_p=float(rng.uniform(0.2, 0.45)), shop_open_p=0.55,
                        lamps_on=True, lamp_strength=0.9, glow=1.0, noise=7.0, blur=0.6)
    raise ValueError(f"unknown condition {condition!r}; expected day, dusk or night")


@dataclass(frozen=True)
class CameraPose:
    x: float
    y: float
    z: float
    yaw: float  # radians, 0 = east, counter-clockwise
    pitch: float
    roll: float
    hfov: float  # radians


@dataclass(frozen=True)
class Vehicle:
    s: float
    lateral: float
    length: float
    width: float
    height: float
    colour: Colour
    oncoming: bool  # driving towards the camera (front towards it) rather than away
    parked: bool = False  # lights off
    bus: bool = False


@dataclass(frozen=True)
class Pedestrian:
    s: float
    lateral: float
    height: float
    colour: Colour


@dataclass(frozen=True)
class Shot:
    traversal: Traversal
    place: int
    s: float  # true arc length of the camera
    pose: CameraPose
    lat: float  # GPS fix (noisy)
    lon: float
    light: Lighting
    key: tuple[int, int]  # (seed, traversal index): seeds what one drive shares (lit windows)
    vehicles: tuple[Vehicle, ...]
    pedestrians: tuple[Pedestrian, ...]


def describe_traffic(rng: np.random.Generator, s_cam: float) -> tuple[tuple[Vehicle, ...], tuple[Pedestrian, ...]]:
    """Cars, sometimes a bus, and pedestrians around the camera: different on every drive."""
    vehicles = []
    for side_lane in (-3.4, 3.4):  # parked cars along both kerbs
        for slot in np.arange(s_cam + 4, s_cam + 60, 6.5):
            if rng.random() < 0.3:
                vehicles.append(Vehicle(float(slot + rng.uniform(-0.5, 0.5)), side_lane, 4.3, 1.8, 1.5,
                                        CAR_COLOURS[rng.integers(len(CAR_COLOURS))], oncoming=side_lane > 0, parked=True))
    if rng.random() < 0.4:  # a car ahead in our lane
        vehicles.append(Vehicle(s_cam + float(rng.uniform(9, 30)), LANE_CENTRE_M, 4.4, 1.8, 1.5,
                                CAR_COLOURS[rng.integers(len(CAR_COLOURS))], oncoming=False))
    for _ in range(int(rng.integers(0, 3))):  # oncoming traffic
        vehicles.append(Vehicle(s_cam + float(rng.uniform(8, 80)), -LANE_CENTRE_M, 4.4, 1.8, 1.5,
                                CAR_COLOURS[rng.integers(len(CAR_COLOURS))], oncoming=True))
    if rng.random() < 0.12:  # a bus passing close by: a big occluder on the left
        vehicles.append(Vehicle(s_cam + float(rng.uniform(3, 10)), -LANE_CENTRE_M, 11.0, 2.5, 3.1,
                                SHOP_COLOURS[rng.integers(len(SHOP_COLOURS))], oncoming=True, bus=True))
    pedestrians = tuple(
        Pedestrian(s_cam + float(rng.uniform(3, 30)), float(rng.choice([-1, 1]) * rng.uniform(4.6, 6.4)),
                   float(rng.uniform(1.55, 1.9)), _jitter_colour(rng, CAR_COLOURS[rng.integers(len(CAR_COLOURS))], 0.1))
        for _ in range(int(rng.integers(0, 5)))
    )
    return tuple(vehicles), pedestrians


def describe_shot(world: World, traversal: Traversal, t_index: int, place: int, spacing_m: float, seed: int) -> Shot:
    """Where the camera of `traversal` really is at `place`, how it looks, what its GPS says."""
    rng = np.random.default_rng([seed, 606, t_index, place])
    light = make_lighting(traversal.condition, np.random.default_rng([seed, 505, t_index]))
    light = replace(light, visibility_m=light.visibility_m * float(rng.uniform(0.5, 1.2)),  # patches of haze
                    noise=light.noise * float(rng.uniform(0.8, 1.3)))
    s = place * spacing_m + float(rng.uniform(-ALONG_JITTER_M, ALONG_JITTER_M))
    lateral = traversal.lane + float(rng.uniform(-LATERAL_JITTER_M, LATERAL_JITTER_M))
    x, y = world.route.point(s, lateral)
    pose = CameraPose(
        x=float(x), y=float(y), z=traversal.camera_height,
        yaw=float(world.route.heading_at(s)) + np.radians(rng.normal(0, YAW_SIGMA_DEG)),
        pitch=np.radians(rng.normal(0, PITCH_SIGMA_DEG)),
        roll=np.radians(rng.normal(0, ROLL_SIGMA_DEG)),
        hfov=np.radians(traversal.hfov_deg + rng.uniform(-ZOOM_JITTER_DEG, ZOOM_JITTER_DEG)),
    )
    noise = rng.normal(0, traversal.gps_sigma_m, 2)
    noise *= min(1.0, GPS_NOISE_CLIP_M / max(float(np.hypot(*noise)), 1e-9))
    lat, lon = local_to_latlon(x + noise[0], y + noise[1])
    vehicles, pedestrians = describe_traffic(rng, s)
    return Shot(traversal, place, s, pose, float(lat), float(lon), light, (seed, t_index), vehicles, pedestrians)


# =============================================================================================
# 4. Rendering: a pinhole camera and a painter's algorithm with PIL polygons
# =============================================================================================
class Camera:
    """World (east, north, up) metres -> pixels for one CameraPose."""

    near = 0.3

    def __init__(self, pose: CameraPose, width: int, height: int):
        cy, sy, cp, sp = math.cos(pose.yaw), math.sin(pose.yaw), math.cos(pose.pitch), math.sin(pose.pitch)
        forward = np.array([cy * cp, sy * cp, sp])
        right = np.array([sy, -cy, 0.0])
        up = np.cross(right, forward)
        cr, sr = math.cos(pose.roll), math.sin(pose.roll)
        self.rot = np.stack([cr * right + sr * up, -sr * right + cr * up, forward])  # rows: camera axes
        self.centre = np.array([pose.x, pose.y, pose.z])
        self.width, self.height = width, height
        self.focal = (width / 2) / math.tan(pose.hfov / 2)

    def to_camera(self, points: np.ndarray) -> np.ndarray:
        return (np.asarray(points, np.float64) - self.centre) @ self.rot.T

    def to_pixels(self, cam: np.ndarray) -> np.ndarray:
        z = cam[..., 2:3]
        return np.concatenate([self.width / 2 + self.focal * cam[..., 0:1] / z,
                               self.height / 2 - self.focal * cam[..., 1:2] / z], axis=-1)

    def sees(self, points: np.ndarray) -> bool:
        """False when a convex object with these corners (k, 3) is surely out of view: all
        corners behind the camera, or all beyond one side of the view frustum."""
        cam = self.to_camera(points)
        x, y, z = cam[:, 0], cam[:, 1], cam[:, 2]
        kx, ky = (self.width / 2) / self.focal, (self.height / 2) / self.focal
        return not ((z < self.near).all() or (x > kx * z).all() or (-x > kx * z).all()
                    or (y > ky * z).all() or (-y > ky * z).all())

    def ray_directions(self, step: int = 1) -> np.ndarray:
        """(H/step, W/step, 3) world directions through the centres of step x step pixel cells."""
        u = ((np.arange(self.width // step) + 0.5) * step - self.width / 2) / self.focal
        v = -((np.arange(self.height // step) + 0.5) * step - self.height / 2) / self.focal
        d = np.stack(np.broadcast_arrays(u[None, :], v[:, None], np.ones((1, 1))), axis=-1)
        return d @ self.rot


def clip_near(cam: np.ndarray, near: float) -> np.ndarray:
    """Sutherland-Hodgman clip of one polygon (k, 3) in camera coordinates against z >= near."""
    out = []
    for a, b in zip(cam, np.roll(cam, -1, axis=0)):
        if a[2] >= near:
            out.append(a)
        if (a[2] >= near) != (b[2] >= near):
            out.append(a + (near - a[2]) / (b[2] - a[2]) * (b - a))
    return np.array(out)


class Painter:
    """Shades, fogs and draws world polygons onto the canvas (and lights onto a glow layer)."""

    def __init__(self, camera: Camera, light: Lighting, lamps: np.ndarray, canvas: Image.Image, glow: Image.Image | None):
        self.cam, self.light, self.lamps = camera, light, lamps  # lamps: (n, 3) lamp heads, world
        self.draw = ImageDraw.Draw(canvas)
        self.glow = ImageDraw.Draw(glow) if glow is not None else None
        self.ambient, self.sun = np.array(light.ambient), np.array(light.sun)
        self.sun_dir, self.fog = np.array(light.sun_dir), np.array(light.fog)

    def shade(self, albedo, normals, centroids) -> np.ndarray:
        """Lambert shading of (n,) surfaces: ambient + sun + nearby street lamps (warm, falling
        off with distance). normals (n, 3) or (3,), centroids (n, 3); returns (n, 3)."""
        centroids = np.asarray(centroids, np.float64).reshape(-1, 3)
        cosine = np.clip(np.asarray(normals, np.float64) @ self.sun_dir, 0, None)
        light = self.ambient + self.sun * np.broadcast_to(cosine, len(centroids))[:, None]
        if self.light.lamps_on and len(self.lamps):
            d2 = np.sum((centroids[:, None, :] - self.lamps[None]) ** 2, axis=-1)
            light = light + self.light.lamp_strength * LAMP_COLOUR * np.sum(30.0 / (30.0 + d2), axis=1)[:, None]
        return np.asarray(albedo, np.float64) * light

    def fogged(self, colour: np.ndarray, depth) -> np.ndarray:
        t = np.exp(-np.asarray(depth, np.float64)[..., None] / self.light.visibility_m)
        return colour * t + self.fog * (1 - t)

    def polygons(self, polys, albedo=None, normals=(0.0, 0.0, 1.0), emissive=None, glow: float = 0.0) -> None:
        """Planar polygons (n, k, 3) in world metres, drawn in the given order. Colours are
        `albedo` lit by the scene, or `emissive` (lights, lit windows) as they are; either one
        colour (3,) or one per polygon (n, 3). `glow` > 0 also paints them onto the bloom layer."""
        polys = np.asarray(polys, np.float64)
        cam = self.cam.to_camera(polys)
        z = cam[..., 2]
        keep = z.max(axis=1) >= self.cam.near
        if not keep.any():
            return
        if emissive is not None:
            colour = np.broadcast_to(np.asarray(emissive, np.float64), (len(polys), 3))[keep]
        else:
            normals = np.asarray(normals, np.float64)
            colour = self.shade(np.broadcast_to(np.asarray(albedo, np.float64), (len(polys), 3))[keep],
                                normals if normals.ndim == 1 else normals[keep], polys[keep].mean(axis=1))
        cam, z = cam[keep], z[keep]
        colour = self.fogged(colour, np.linalg.norm(cam.mean(axis=1), axis=1))
        fills = np.clip(colour * 255 + 0.5, 0, 255).astype(int).tolist()
        glows = np.clip(colour * glow * 255 + 0.5, 0, 255).astype(int).tolist() if glow and self.glow else None
        width, height = self.cam.width, self.cam.height
        crossing = z.min(axis=1) < self.cam.near  # partly behind the camera: clip first
        pixels = self.cam.to_pixels(np.where(crossing[:, None, None], 1.0, cam))
        for i, (px, fill) in enumerate(zip(pixels, fills)):
            if crossing[i]:
                px = self.cam.to_pixels(clip_near(cam[i], self.cam.near))
            if px[:, 0].max() < 0 or px[:, 0].min() > width or px[:, 1].max() < 0 or px[:, 1].min() > height:
                continue
            xy = px.ravel().tolist()
            self.draw.polygon(xy, fill=tuple(fill))
            if glows is not None:
                self.glow.polygon(xy, fill=tuple(glows[i]))

    def polygon(self, points, albedo=None, normal=(0.0, 0.0, 1.0), emissive=None, glow: float = 0.0) -> None:
        """One planar polygon (k, 3): see polygons()."""
        self.polygons(np.asarray(points, np.float64)[None], albedo, normal, emissive, glow)

    def disc(self, centre, radius: float, albedo=None, emissive=None, glow: float = 0.0, glow_size: float = 2.5) -> None:
        """A sphere-ish blob (tree crown, head, lamp) drawn as a screen-space ellipse."""
        centre = np.asarray(centre, np.float64)
        cam = self.cam.to_camera(centre[None])[0]
        if cam[2] < self.cam.near + radius:
            return
        u, v = self.cam.to_pixels(cam)
        r = self.cam.focal * radius / cam[2]
        if u + r < 0 or u - r > self.cam.width or v + r < 0 or v - r > self.cam.height:
            return
        if emissive is not None:
            colour = np.asarray(emissive, np.float64)
        else:  # lit as a surface half facing up, half facing the camera
            colour = self.shade(albedo, 0.5 * np.array([0.0, 0.0, 1.0]) - 0.5 * self.cam.rot[2], centre)[0]
        colour = self.fogged(colour, float(np.linalg.norm(cam)))
        self.draw.ellipse([u - r, v - r, u + r, v + r], fill=_to_8bit(colour))
        if glow and self.glow is not None:
            g = r * glow_size
            self.glow.ellipse([u - g, v - g, u + g, v + g], fill=_to_8bit(colour * glow))


def _to_8bit(colour) -> tuple[int, int, int]:
    c = np.clip(np.asarray(colour, np.float64) * 255.0 + 0.5, 0, 255).astype(int)
    return int(c[0]), int(c[1]), int(c[2])


def render_background(cam: Camera, light: Lighting) -> Image.Image:
    """Sky gradient above the horizon, hazy ground below. Smooth, so computed at a quarter of
    the canvas size and scaled up."""
    d = cam.ray_directions(step=4)
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    elev = np.arcsin(np.clip(d[..., 2], -1, 1))
    t = np.clip(elev / (np.pi / 2), 0, 1)[..., None] ** 0.55
    sky = np.array(light.sky_horizon) * (1 - t) + np.array(light.sky_zenith) * t
    if light.name == "day":  # a soft halo around the sun
        sky = sky + 0.25 * np.clip(d @ np.array(light.sun_dir), 0, 1)[..., None] ** 40
    distance = cam.centre[2] / np.maximum(-d[..., 2], 1e-4)
    fog_t = np.exp(-distance / light.visibility_m)[..., None]
    ground = np.array(light.ground) * np.asarray(light.ambient).mean() * 1.6 * fog_t + np.array(light.fog) * (1 - fog_t)
    rgb = np.where((elev > 0)[..., None], sky, ground)
    image = Image.fromarray((np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8))
    return image.resize((cam.width, cam.height), Image.Resampling.BILINEAR)


def _facade_frame(world: World, b: Building, lateral_extra: float = 0.0):
    """Ground corners of a building's street face, its unit direction, width and inward normal."""
    lateral = b.side * (FACADE_OFFSET_M + b.setback + lateral_extra)
    a, c = world.route.point(b.s0, lateral), world.route.point(b.s1, lateral)
    width = float(np.linalg.norm(c - a))
    along = (c - a) / width
    normal = np.array([along[1], -along[0]]) * b.side  # points towards the road
    return a, c, along, width, normal


def window_rects(b: Building, width: float) -> np.ndarray:
    """(n, 4) window rectangles u0, v0, u1, v1 on a facade (metres along / up the facade)."""
    n_bays = max(1, int(width // b.bay))
    margin = (width - n_bays * b.bay) / 2
    first_floor = 1 if b.shop is not None else 0
    rects = []
    for floor in range(first_floor, b.floors):
        v0 = floor * b.floor_h + b.floor_h * (1 - b.win_h) * 0.55
        for bay in range(n_bays):
            u0 = margin + bay * b.bay + b.bay * (1 - b.win_w) / 2
            rects.append((u0, v0, u0 + b.bay * b.win_w, v0 + b.floor_h * b.win_h))
    return np.array(rects, np.float64).reshape(-1, 4)


def box_walls(footprint, z0: float, z1: float, eye) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The vertical sides of a prism over a convex footprint (k, 2) that face `eye` (x, y):
    quads (m, 4, 3), outward normals (m, 3) and which sides they are (m,; side i runs from
    footprint[i] to footprint[i + 1])."""
    g0 = np.asarray(footprint, np.float64)
    g1 = np.roll(g0, -1, axis=0)
    edge = g1 - g0
    normal = np.stack([edge[:, 1], -edge[:, 0]], axis=1) / np.linalg.norm(edge, axis=1, keepdims=True)
    normal *= np.sign(np.sum(((g0 + g1) / 2 - g0.mean(axis=0)) * normal, axis=1))[:, None]  # outward
    sides = np.flatnonzero(np.sum((np.asarray(eye) - g0) * normal, axis=1) > 0)
    low, high = np.full((len(sides), 1), z0), np.full((len(sides), 1), z1)
    quads = np.stack([np.hstack([g0[sides], low]), np.hstack([g1[sides], low]),
                      np.hstack([g1[sides], high]), np.hstack([g0[sides], high])], axis=1)
    return quads, np.hstack([normal[sides], np.zeros((len(sides), 1))]), sides


def draw_building(p: Painter, world: World, b: Building, drive: tuple[int, int]) -> None:
    """A box with its street face detailed: cornice, door or shop front (glazing, sign, awning),
    windows. End walls are a little darker, so that neighbours of one colour stay apart."""
    a, c, along, width, normal = _facade_frame(world, b)
    back = _facade_frame(world, b, b.depth)
    quads, normals, sides = box_walls([a, c, back[1], back[0]], 0.0, b.height, p.cam.centre[:2])
    p.polygons(quads, np.asarray(b.wall) * np.where(sides == 0, 1.0, 0.85)[:, None], normals)
    if 0 not in sides:  # the street face is turned away
        return
    n3 = np.array([normal[0], normal[1], 0.0])

    def rect(u0, v0, u1, v1, out0=0.0, out1=0.0):  # on the facade, optionally sticking out (awning)
        g = [a + along * u0 + normal * out0, a + along * u1 + normal * out0, a + along * u1 + normal * out1, a + along * u0 + normal * out1]
        return [[*g[0], v0], [*g[1], v0], [*g[2], v1], [*g[3], v1]]

    cornice = rect(0, b.height - 0.6, width, b.height)
    if b.shop is None:
        door = rect(width / 2 - 0.6, 0.0, width / 2 + 0.6, 2.3)
        p.polygons([cornice, door], [b.trim, np.asarray(b.wall) * 0.35], n3)
    else:  # shop front: glazing and sign band (lit after dark), awning
        p.polygons([cornice], b.trim, n3)
        front = [rect(0.5, 0.3, width - 0.5, 2.6), rect(0.3, 2.7, width - 0.3, 3.4)]
        if np.random.default_rng([*drive, b.uid, 1]).random() < p.light.shop_open_p:
            p.polygons(front, emissive=[np.array([1.0, 0.85, 0.6]) * 0.9, np.asarray(b.shop) * 1.3], glow=0.35)
        else:
            p.polygons(front, [b.glass, b.shop], n3)
        p.polygons([rect(0.6, 2.65, width - 0.6, 2.2, 0.0, 1.3)], np.asarray(b.shop) * 0.8)
    draw_windows(p, b, a, along, width, n3, drive)


def draw_windows(p: Painter, b: Building, a, along, width: float, n3, drive: tuple[int, int]) -> None:
    """All windows of one facade; a random subset, different on every traversal, is lit."""
    rects = window_rects(b, width)
    if not len(rects):
        return
    u0, v0, u1, v1 = rects.T
    corners = np.stack([np.stack(c, -1) for c in ((u0, v0), (u1, v0), (u1, v1), (u0, v1))], 1)  # (n, 4, 2)
    quads = np.concatenate([a + corners[..., :1] * along, corners[..., 1:]], axis=-1)  # (n, 4, 3)
    lit = np.random.default_rng([*drive, b.uid]).random(len(rects)) < p.light.lit_window_p
    warm = np.random.default_rng([b.uid, 7]).random(len(rects)) < 0.7  # the kind of bulb is the building's
    reflection = 0.35 * np.array(p.light.sky_horizon) * np.mean(p.light.ambient) / np.maximum(b.glass, 0.05)
    p.polygons(quads[~lit], np.asarray(b.glass) * (1 + reflection), n3)
    p.polygons(quads[lit], emissive=np.where(warm[lit][:, None], WARM_LIGHT, COOL_LIGHT), glow=0.5)


def _ground_quads(route: Route, s: np.ndarray, lateral: tuple[float, float], lift: float = 0.0) -> np.ndarray:
    """(n, 4, 3) flat quads between consecutive arc lengths s, from lateral[0] to lateral[1]."""
    s0, s1 = s[:-1], s[1:]
    ss = np.stack([s0, s1, s1, s0], axis=1)
    ll = np.broadcast_to(np.array([lateral[0], lateral[0], lateral[1], lateral[1]]), ss.shape)
    return np.concatenate([route.point(ss, ll), np.full(ss.shape + (1,), lift)], axis=-1)


def draw_ground(p: Painter, world: World, s_cam: float) -> None:
    """Road, sidewalks, lane markings and zebra crossings, far to near; strips get longer with
    distance (3 m near the camera, 12 m far away)."""
    asphalt, paving, paint = (0.23, 0.23, 0.25), (0.55, 0.53, 0.5), (0.9, 0.9, 0.88)
    d = np.concatenate([np.arange(-4.0, 30.0, 3.0), np.arange(30.0, 80.0, 6.0), np.arange(80.0, VIEW_AHEAD_M + 1, 12.0)])
    s = (s_cam + d)[::-1]
    for lateral, albedo in (((-20.0, -ROAD_HALF_WIDTH_M), paving), ((ROAD_HALF_WIDTH_M, 20.0), paving),
                            ((-ROAD_HALF_WIDTH_M, ROAD_HALF_WIDTH_M), asphalt), ((-3.75, -3.6), paint), ((3.6, 3.75), paint)):
        p.polygons(_ground_quads(world.route, s, lateral, 0.0 if albedo != paint else 0.01), albedo)
    first = math.floor((s_cam - 4) / 9) * 9
    for d0 in np.arange(first, s_cam + VIEW_AHEAD_M, 9.0)[::-1]:  # centre line: 3 m dashes, 6 m gaps
        p.polygons(_ground_quads(world.route, np.array([d0, d0 + 3]), (-0.08, 0.08), 0.01), paint)
    for c in world.crossings:
        if s_cam - 4 < c < s_cam + VIEW_AHEAD_M:
            stripes = [_ground_quads(world.route, np.array([c, c + 3]), (lat, lat + 0.5), 0.02)[0]
                       for lat in np.arange(-ROAD_HALF_WIDTH_M + 0.25, ROAD_HALF_WIDTH_M, 1.0)]
            p.polygons(np.array(stripes), paint)


def _billboard(p: Painter, base_xy, half_width: float, z0: float, z1: float):
    """A vertical quad through base_xy facing the camera (poles, trunks, people)."""
    d = np.asarray(base_xy) - p.cam.centre[:2]
    side = np.array([-d[1], d[0]]) / max(np.linalg.norm(d), 1e-6) * half_width
    b = np.asarray(base_xy)
    return [[*(b - side), z0], [*(b + side), z0], [*(b + side), z1], [*(b - side), z1]]


def draw_tree(p: Painter, world: World, t: Tree) -> None:
    base = world.route.point(t.s, t.lateral)
    p.polygon(_billboard(p, base, 0.18, 0.0, t.trunk_h + t.crown_r * 0.5), (0.3, 0.22, 0.15))
    rng = np.random.default_rng(int(t.s * 1000) % (2**32))
    top = t.trunk_h + t.crown_r
    for k in range(4):
        offset = rng.normal(0, t.crown_r * 0.3, 3)
        shade = 0.75 + 0.12 * k
        p.disc([base[0] + offset[0], base[1] + offset[1], top + offset[2] * 0.6], t.crown_r * (0.8 - 0.08 * k),
               np.asarray(t.colour) * shade)


def draw_lamp(p: Painter, world: World, lamp: Lamp) -> None:
    base = world.route.point(lamp.s, lamp.lateral)
    p.polygon(_billboard(p, base, 0.08, 0.0, lamp.height), (0.25, 0.26, 0.28))
    head = world.route.point(lamp.s, lamp.lateral * 0.85)
    on = p.light.lamps_on
    p.disc([head[0], head[1], lamp.height], 0.35, albedo=(0.6, 0.6, 0.55),
           emissive=np.array([1.0, 0.85, 0.55]) * 1.2 if on else None, glow=1.0 if on else 0.0)


def draw_sign(p: Painter, world: World, sign: Sign) -> None:
    base = world.route.point(sign.s, sign.lateral)
    p.polygon(_billboard(p, base, 0.05, 0.0, sign.height), (0.55, 0.55, 0.55))
    heading = float(world.route.heading_at(sign.s))
    face = np.array([-math.cos(heading), -math.sin(heading), 0.0])  # faces oncoming drivers: us
    across = np.array([-math.sin(heading), math.cos(heading), 0.0]) * sign.width / 2
    centre = np.array([base[0], base[1], sign.height + sign.width / 2])
    if sign.shape == "rect":
        pts = [centre - across - [0, 0, sign.width / 3], centre + across - [0, 0, sign.width / 3],
               centre + across + [0, 0, sign.width / 3], centre - across + [0, 0, sign.width / 3]]
    elif sign.shape == "triangle":
        pts = [centre - across - [0, 0, sign.width / 2.5], centre + across - [0, 0, sign.width / 2.5], centre + [0, 0, sign.width / 2]]
    else:
        ang = np.linspace(0, 2 * np.pi, 12, endpoint=False)
        pts = [centre + across * math.cos(t) + np.array([0, 0, sign.width / 2 * math.sin(t)]) for t in ang]
    boost = 1.6 if p.light.name == "night" else 1.0  # retro-reflective in headlights
    p.polygon(pts, np.asarray(sign.colour) * boost, face)


def draw_vehicle(p: Painter, world: World, v: Vehicle) -> None:
    """A car (body and cabin) or a bus (one tall box with a window band); lights after dark."""
    heading = float(world.route.heading_at(v.s))
    fwd = np.array([math.cos(heading), math.sin(heading)])
    left = np.array([-fwd[1], fwd[0]])
    centre = world.route.point(v.s, v.lateral)
    eye = p.cam.centre[:2]

    def box(length, width, z0, z1, albedo, shift=0.0):
        c = centre + fwd * shift
        footprint = [c + fwd * dl * length / 2 + left * dw * width / 2 for dl, dw in ((-1, -1), (1, -1), (1, 1), (-1, 1))]
        quads, normals, _ = box_walls(footprint, z0, z1, eye)
        roof = np.array([[*g, z1] for g in footprint])[None]
        p.polygons(np.concatenate([quads, roof]), albedo, np.vstack([normals, [0.0, 0.0, 1.0]]))

    if v.bus:
        box(v.length, v.width, 0.3, v.height, v.colour)
        band = [centre + fwd * v.length / 2 * k + left * v.width / 2 * (1 if np.dot(left, eye - centre) > 0 else -1) for k in (-0.9, 0.9)]
        p.polygon([[*band[0], 1.5], [*band[1], 1.5], [*band[1], 2.6], [*band[0], 2.6]], (0.1, 0.12, 0.14))
    else:
        box(v.length, v.width, 0.25, 0.95, v.colour)
        box(v.length * 0.5, v.width * 0.9, 0.95, v.height, (0.12, 0.13, 0.15), shift=-0.2 * v.length * (1 if not v.oncoming else -1))
    if p.light.lamps_on and not v.parked:  # head or tail lights on the end facing the camera
        toward = 1 if np.dot(fwd, eye - centre) > 0 else -1  # +1: the camera sees the +fwd end
        front_seen = (toward > 0) != v.oncoming
        lamp_colour = np.array([1.0, 0.97, 0.85]) if front_seen else np.array([0.9, 0.08, 0.05])
        for dw in (-0.38, 0.38):
            g = centre + fwd * toward * v.length / 2 + left * dw * v.width
            p.disc([g[0], g[1], 0.7], 0.12, emissive=lamp_colour, glow=0.6, glow_size=1.8)


def draw_pedestrian(p: Painter, world: World, person: Pedestrian) -> None:
    base = world.route.point(person.s, person.lateral)
    h = person.height
    p.polygon(_billboard(p, base, 0.16, 0.0, 0.48 * h), (0.12, 0.12, 0.16))
    p.polygon(_billboard(p, base, 0.22, 0.48 * h, 0.86 * h), person.colour)
    p.disc([base[0], base[1], 0.93 * h], 0.11, (0.75, 0.58, 0.46))


def draw_tower(p: Painter, t: Tower) -> None:
    footprint = [np.array([t.x + dx * t.half, t.y + dy * t.half]) for dx, dy in ((-1, -1), (1, -1), (1, 1), (-1, 1))]
    quads, normals, _ = box_walls(footprint, 0.0, t.height, p.cam.centre[:2])
    p.polygons(quads, t.colour, normals)
    if t.spire:
        p.polygon([[*footprint[0], t.height], [*footprint[2], t.height], [t.x, t.y, t.height + 2.5 * t.half]], t.colour)
    if p.light.lamps_on:  # aircraft warning light
        p.disc([t.x, t.y, t.height + (2.5 * t.half if t.spire else 1.0)], 1.2, emissive=(1.0, 0.15, 0.1), glow=1.0)


def building_boxes(world: World, buildings: list[Building]) -> np.ndarray:
    """(n, 8, 3) corners of the buildings' boxes (for view culling)."""
    if not buildings:
        return np.zeros((0, 8, 3))
    s = np.array([[b.s0, b.s1, b.s1, b.s0] for b in buildings])
    lateral = np.array([[b.side * (FACADE_OFFSET_M + b.setback + d) for d in (0.0, 0.0, b.depth, b.depth)] for b in buildings])
    ground = world.route.point(s, lateral)  # (n, 4, 2)
    heights = np.array([b.height for b in buildings])[:, None, None]
    return np.concatenate([np.concatenate([ground, np.zeros_like(ground[..., :1])], -1),
                           np.concatenate([ground, np.broadcast_to(heights, ground[..., :1].shape)], -1)], axis=1)


def render_shot(world: World, shot: Shot, size: tuple[int, int]) -> Image.Image:
    """The picture taken at one shot: sky and skyline, ground, buildings far to near, then
    street furniture, traffic and people far to near; bloom around lights; camera effects."""
    width, height = size[0] * SUPERSAMPLE, size[1] * SUPERSAMPLE
    cam = Camera(shot.pose, width, height)
    light = shot.light
    canvas = render_background(cam, light)
    glow = Image.new("RGB", (width, height)) if light.glow > 0 else None
    near_lamps = [lamp for lamp in world.lamps if -30 < lamp.s - shot.s < VIEW_AHEAD_M]
    lamp_heads = np.array([[*world.route.point(lamp.s, lamp.lateral * 0.85), lamp.height] for lamp in near_lamps]).reshape(-1, 3)
    painter = Painter(cam, light, lamp_heads, canvas, glow)
    eye = cam.centre[:2]

    for tower in sorted(world.towers, key=lambda t: -np.hypot(t.x - eye[0], t.y - eye[1])):
        draw_tower(painter, tower)  # first: the skyline is always behind the street
    draw_ground(painter, world, shot.s)

    lo, hi = shot.s - 25.0, shot.s + VIEW_AHEAD_M
    buildings = [b for b in world.buildings if b.s1 > lo and b.s0 < hi]
    boxes = building_boxes(world, buildings)
    order = np.argsort(-np.linalg.norm(boxes[:, :2, :2].mean(axis=1) - eye, axis=1), kind="stable")
    for i in order:
        if cam.sees(boxes[i]):
            draw_building(painter, world, buildings[i], shot.key)

    def distance(s, lateral):
        return float(np.linalg.norm(world.route.point(s, lateral) - eye))

    street: list[tuple[float, Callable[[], None]]] = []
    street += [(distance(t.s, t.lateral), lambda t=t: draw_tree(painter, world, t)) for t in world.trees if lo < t.s < hi]
    street += [(distance(x.s, x.lateral), lambda x=x: draw_lamp(painter, world, x)) for x in near_lamps if lo < x.s < hi]
    street += [(distance(x.s, x.lateral), lambda x=x: draw_sign(painter, world, x)) for x in world.signs if lo < x.s < hi]
    street += [(distance(v.s, v.lateral), lambda v=v: draw_vehicle(painter, world, v)) for v in shot.vehicles]
    street += [(distance(x.s, x.lateral), lambda x=x: draw_pedestrian(painter, world, x)) for x in shot.pedestrians]
    for _, draw in sorted(street, key=lambda item: -item[0]):
        draw()

    image = canvas.resize(size, Image.Resampling.BOX)
    if glow is not None:  # bloom: the lights, blurred, added on top
        bloom = glow.resize(size, Image.Resampling.BOX).filter(ImageFilter.GaussianBlur(6))
        image = Image.fromarray(np.clip(np.asarray(image, np.float32) + np.asarray(bloom, np.float32) * light.glow * 1.5,
                                        0, 255).astype(np.uint8))
    return finish_photo(image, light, np.random.default_rng([*shot.key, shot.place, 808]))


def _vignette(width: int, height: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    r2 = ((xx + 0.5 - width / 2) / (width / 2)) ** 2 + ((yy + 0.5 - height / 2) / (height / 2)) ** 2
    return (1 - 0.18 * r2)[..., None]


def finish_photo(image: Image.Image, light: Lighting, rng: np.random.Generator) -> Image.Image:
    """Camera effects: blur, vignetting, sensor noise (stronger and coloured at night)."""
    if light.blur > 0:
        image = image.filter(ImageFilter.GaussianBlur(light.blur))
    x = np.asarray(image, np.float32) * _vignette(*image.size)
    h, w = x.shape[:2]
    x += rng.standard_normal((h, w, 1), dtype=np.float32) * light.noise
    x += rng.standard_normal((h, w, 3), dtype=np.float32) * (light.noise * 0.4)
    return Image.fromarray(np.clip(x + 0.5, 0, 255).astype(np.uint8))


# =============================================================================================
# 5. Writing the data set: CSVs, images, manifest; idempotent and deterministic
# =============================================================================================
@dataclass
class DemoDataset:
    """Where a generated demo data set lives and what it holds."""

    root: Path
    train_csv: Path
    val_csv: Path
    test_csv: Path
    num_places: int
    counts: dict[str, int]  # images per split
    conditions: dict[str, list[str]]  # conditions per split
    params: dict = field(default_factory=dict)
    generated: bool = False  # False when an existing complete data set was reused

    @property
    def csvs(self) -> dict[str, Path]:
        return {"train": self.train_csv, "val": self.val_csv, "test": self.test_csv}

    @property
    def num_images(self) -> int:
        return sum(self.counts.values())


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _jpeg_bytes(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, optimize=False, progressive=False)
    return buffer.getvalue()


def _csv_text(rows: Iterable[tuple[str, float, float, str, str]]) -> str:
    lines = [",".join(CSV_COLUMNS)]
    lines += [f"{path},{lat:.7f},{lon:.7f},{camera},{condition}" for path, lat, lon, camera, condition in rows]
    return "\n".join(lines) + "\n"


def _dataset_from_manifest(root: Path, manifest: dict, generated: bool) -> DemoDataset:
    return DemoDataset(
        root=root, train_csv=root / "train.csv", val_csv=root / "val.csv", test_csv=root / "test.csv",
        num_places=manifest["params"]["num_places"], counts=dict(manifest["counts"]),
        conditions={k: list(v) for k, v in manifest["conditions"].items()}, params=dict(manifest["params"]),
        generated=generated,
    )


def _existing_complete(root: Path, params: dict) -> dict | None:
    """The manifest of a complete data set with these parameters in root, else None."""
    try:
        manifest = json.loads((root / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("version") != GENERATOR_VERSION or manifest.get("params") != params:
        return None
    files = [root / f"{split}.csv" for split in SPLITS] + [root / f for f in manifest.get("images", [])]
    if len(manifest.get("images", [])) != sum(manifest.get("counts", {}).values()) or not all(f.is_file() for f in files):
        return None
    return manifest


def generate_demo_dataset(
    out_dir: str | Path,
    seed: int = 0,
    num_places: int = 64,
    spacing_m: float = 18.0,
    image_size: tuple[int, int] = (256, 192),
    jpeg_quality: int = 88,
    alias_fraction: float = 0.15,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> DemoDataset:
    """Write the synthetic demo data set into out_dir (see the module docstring) and describe it.

    Returns at once, without writing, when out_dir already holds a complete data set made with
    the same parameters and generator version (unless force). Same parameters -> byte-identical
    files. `progress`, if given, receives one line per traversal.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if num_places < 2:
        raise ValueError(f"num_places must be at least 2, got {num_places}")
    if spacing_m <= 0:
        raise ValueError(f"spacing_m must be positive, got {spacing_m}")
    root = Path(out_dir)
    params = {"seed": int(seed), "num_places": int(num_places), "spacing_m": float(spacing_m),
              "image_size": [int(image_size[0]), int(image_size[1])], "jpeg_quality": int(jpeg_quality),
              "alias_fraction": float(alias_fraction)}
    if not force:
        manifest = _existing_complete(root, params)
        if manifest is not None:
            return _dataset_from_manifest(root, manifest, generated=False)

    start = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST_NAME).unlink(missing_ok=True)  # incomplete until the manifest is back
    world = describe_world(seed, num_places, spacing_m, alias_fraction)
    rows: dict[str, list] = {split: [] for split in SPLITS}
    images: list[str] = []
    for t_index, traversal in enumerate(TRAVERSALS):
        for place in range(num_places):
            shot = describe_shot(world, traversal, t_index, place, spacing_m, seed)
            relative = f"images/{traversal.name}/{place:03d}.jpg"
            _atomic_write_bytes(root / relative, _jpeg_bytes(render_shot(world, shot, image_size), jpeg_quality))
            rows[traversal.split].append((relative, shot.lat, shot.lon, traversal.camera_id, traversal.condition))
            images.append(relative)
        if progress:
            progress(f"demo data: {traversal.name} ({traversal.split}, {traversal.condition}): {num_places} images")
    _remove_stale_images(root, set(images))  # e.g. places beyond a smaller num_places
    for split in SPLITS:
        _atomic_write_bytes(root / f"{split}.csv", _csv_text(rows[split]).encode())
    manifest = {
        "version": GENERATOR_VERSION,
        "params": params,
        "counts": {split: len(rows[split]) for split in SPLITS},
        "conditions": {split: sorted({r[4] for r in rows[split]}) for split in SPLITS},
        "traversals": [asdict(t) for t in TRAVERSALS],
        "twin_blocks": {str(k): v for k, v in world.twins.items()},
        "images": images,
    }
    _atomic_write_bytes(root / MANIFEST_NAME, (json.dumps(manifest, indent=1) + "\n").encode())
    if progress:
        progress(f"demo data: {len(images)} images in {root} ({time.perf_counter() - start:.1f} s)")
    return _dataset_from_manifest(root, manifest, generated=True)


def _remove_stale_images(root: Path, keep: set[str]) -> None:
    """Delete demo JPEGs and temp files left in the traversal folders by an earlier run with
    other parameters or an interrupted one. Nothing else is touched."""
    for traversal in TRAVERSALS:
        folder = root / "images" / traversal.name
        for path in sorted(folder.glob("*.jpg")) + sorted(folder.glob(".*.tmp")):
            if path.relative_to(root).as_posix() not in keep:
                path.unlink()


def place_of(image_path: str) -> int:
    """The place index encoded in a demo image path (images/<traversal>/<place>.jpg)."""
    return int(Path(image_path).stem)


# =============================================================================================
# 6. Command line: python demo_data.py OUT_DIR
# =============================================================================================
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("out_dir", nargs="?", default="demo_data", help="folder to write into")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the world and the drives")
    parser.add_argument("--num_places", type=int, default=64, help="places along the route")
    parser.add_argument("--spacing_m", type=float, default=18.0, help="metres between consecutive places")
    parser.add_argument("--force", action="store_true", help="regenerate even if a complete data set is there")
    args = parser.parse_args(argv)
    data = generate_demo_dataset(args.out_dir, seed=args.seed, num_places=args.num_places,
                                 spacing_m=args.spacing_m, force=args.force, progress=print)
    state = "generated" if data.generated else "already there"
    print(f"{data.root}: {state}; " + ", ".join(f"{split} {n} images" for split, n in data.counts.items()))


if __name__ == "__main__":
    main()
