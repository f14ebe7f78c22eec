"""A tiny synthetic VPR data set on disk (5 places 300 m apart on a line, metric positions, day
and night test images): what the eval_trained / run_experiment / localize tests run on."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def write_image(path: Path, colour: np.ndarray, rng: np.random.Generator, brightness: float = 1.0) -> None:
    from PIL import Image

    pixels = np.clip(colour * brightness + rng.normal(0, 20, size=(40, 40, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)


def write_tiny_dataset(root: Path) -> dict[str, Path]:
    """train.csv (4 images per place), val.csv (2 per place), test.csv (a day and a night
    image per place, plus one query 3 km from every place: no positive), with a `condition`
    column; test_latlon.csv (queries with lat/lon) and empty.csv (a header only)."""
    rng = np.random.default_rng(0)
    n_places = 5
    colours = rng.uniform(40, 215, size=(n_places, 3))
    centres = np.c_[500_000 + 300.0 * np.arange(n_places), np.full(n_places, 4_000_000.0)]

    def rows(split: str, per_place: int, conditions=("day",)):
        out = []
        for p in range(n_places):
            for i in range(per_place):
                condition = conditions[i % len(conditions)]
                rel = f"images/{split}_{p}_{i}.jpg"
                write_image(root / rel, colours[p], rng, 0.5 if condition == "night" else 1.0)
                x, y = centres[p] + rng.uniform(-2, 2, size=2)
                out.append({"image_path": rel, "easting": x, "northing": y, "camera_id": "cam", "condition": condition})
        return out

    train, val = rows("train", 4), rows("val", 2)
    test = rows("test", 2, ("day", "night"))
    write_image(root / "images/test_far.jpg", colours[0], rng)
    test.append({"image_path": "images/test_far.jpg", "easting": centres[0, 0] + 3000.0, "northing": centres[0, 1],
                 "camera_id": "cam", "condition": "day"})
    paths = {"train": root / "train.csv", "val": root / "val.csv", "test": root / "test.csv",
             "test_latlon": root / "test_latlon.csv", "empty": root / "empty.csv"}
    for name, table in (("train", train), ("val", val), ("test", test)):
        pd.DataFrame(table).to_csv(paths[name], index=False)
    latlon = pd.DataFrame(test).drop(columns=["easting", "northing"])
    latlon.insert(1, "lat", 31.26 + np.arange(len(latlon)) * 1e-4)
    latlon.insert(2, "lon", 34.80)
    latlon.to_csv(paths["test_latlon"], index=False)
    paths["empty"].write_text("image_path,easting,northing,condition\n")
    return paths

