"""Small synthetic routes: two drives (summer, winter) past the same places in order, as images
for the tiny model or as an embeddings parquet, with frame_index and traversal columns."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from helpers import write_smooth_image

SPACING_M = 30.0  # between consecutive places: one place = the two drives' frames there


def route_rows(first_place: int, n_places: int, drives: tuple[str, ...]) -> list[dict]:
    """One row per (drive, place) in drive order: positions along a line, frame_index, traversal."""
    return [{"easting": 600_000.0 + SPACING_M * p, "northing": 3_500_000.0, "frame_index": i, "traversal": drive,
             "place": p} for drive in drives for i, p in enumerate(range(first_place, first_place + n_places))]


def write_route_images(root: Path, name: str, first_place: int, n_places: int,
                       drives: tuple[str, ...] = ("summer", "winter")) -> Path:
    """root/name.csv: the drives' frames as PNGs; winter is the summer scene darker, with noise."""
    from PIL import Image

    rows = route_rows(first_place, n_places, drives)
    for row in rows:
        rel = f"img/{row['traversal']}_{row['place']}.png"
        path = write_smooth_image(root / rel, seed=1000 + row["place"], size=(40, 32))
        if row["traversal"] != "summer":
            rng = np.random.default_rng(row["place"])
            pixels = np.asarray(Image.open(path), dtype=np.float32) * 0.5 + rng.normal(0, 70, (32, 40, 3))
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path)
        row["image_path"] = rel
    table = root / f"{name}.csv"
    pd.DataFrame(rows).drop(columns="place").to_csv(table, index=False)
    return table


def write_route_parquet(path: Path, first_place: int, n_places: int, drives: tuple[str, ...] = ("summer", "winter"),
                        dim: int = 16, seed: int = 0) -> Path:
    """An embeddings parquet of the drives: each place a random centre (shared by every file),
    each drive's frame a noisy copy of it plus that drive's offset."""
    rows = route_rows(first_place, n_places, drives)
    centres = np.random.default_rng(123).normal(size=(first_place + n_places, dim))
    offsets = {drive: np.random.default_rng(7 + d).normal(scale=0.5, size=dim) for d, drive in enumerate(drives)}
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rows)
    frame["image_id"] = [f"{r['traversal']}_{r['place']}" for r in rows]
    frame["embedding"] = [(centres[r["place"]] + offsets[r["traversal"]] + 0.8 * rng.normal(size=dim))
                          .astype(np.float32) for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.drop(columns="place").to_parquet(path, index=False)
    return path
