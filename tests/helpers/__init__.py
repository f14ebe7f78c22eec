"""What the tests share that is not a fixture: where the repository and the real data are, the
tiny model's flags (defined once), writers of small synthetic data sets (poses CSVs with JPEGs,
embeddings parquets) and the checks of the scripts' one-line errors.

Importable as `helpers` from every test (pyproject.toml puts tests/ on the path); fixtures live
in tests/conftest.py."""
from __future__ import annotations

import csv
import os
import sys
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]

# Real data (DESIGN.md / ../shared/data/README.md): referenced, never copied.
SHARED = REPO.parent / "shared" / "data"


def requires_shared(test):
    """Mark a test that reads the real data: slow, and skipped cleanly when ../shared is absent."""
    skip = pytest.mark.skipif(not SHARED.is_dir(), reason=f"real test data not available: {SHARED}")
    return pytest.mark.slow(skip(test))


# A tiny timm architecture with random weights: builds in milliseconds, no download.
TINY_MODEL = "timm:test_efficientnet"
TINY_SIZE = 32
# The flags that make a script extract cheaply with that model (random weights, 32 px, CPU, no
# workers), without naming the model: for scripts that take it as --models or with --baseline.
TINY_OPTIONS = ["--weights", "random", "--image_size", str(TINY_SIZE), "--num_workers", "0", "--device", "cpu"]
# The same with the model: what train_vpr / eval_trained runs on the tiny model take.
TINY = ["--model", TINY_MODEL, *TINY_OPTIONS]


def haversine_m(lat1, lon1, lat2, lon2):
    """Great-circle distance in metres (numpy-broadcasting): the independent reference the
    geometry tests check latlon_to_xyz distances against."""
    import numpy as np

    p1, p2 = np.radians(lat1), np.radians(lat2)
    dp, dl = p2 - p1, np.radians(np.asarray(lon2) - np.asarray(lon1))
    a = np.sin(dp / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    return 2 * 6_371_008.8 * np.arcsin(np.minimum(1.0, np.sqrt(a)))


def write_jpeg(path: Path, seed: int, size: int = 24) -> Path:
    """A small JPEG of a random colour with some noise (distinct per seed)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=3)
    pixels = np.clip(base + rng.normal(0, 25, size=(size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)
    return path


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> Path:
    """A CSV with exactly these cells (for malformed inputs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_poses(
    folder: Path,
    positions: Sequence[Sequence[float]] | np.ndarray,
    *,
    name: str = "poses.csv",
    columns: Sequence[str] = ("image_path", "easting", "northing"),
    cameras: Sequence[str] | None = None,
    image_dir: str = "images",
    prefix: str | None = None,
    seed: int = 0,
    images: bool = True,
) -> Path:
    """Write folder/name, one row per position, with image paths relative to `folder`
    (image_dir/{prefix}{i:03d}.jpg) and, unless images=False, the JPEGs themselves.

    columns: (image column, first coordinate, second coordinate[, camera column]); the
    camera column is used only when `cameras` is given.
    """
    folder = Path(folder)
    prefix = prefix if prefix is not None else Path(name).stem + "_"
    header = list(columns[:3]) + ([columns[3] if len(columns) > 3 else "camera_id"] if cameras is not None else [])
    rows = []
    for i, pos in enumerate(positions):
        rel = f"{image_dir}/{prefix}{i:03d}.jpg"
        if images:
            write_jpeg(folder / rel, seed=seed * 100_003 + i)
        row = [rel, repr(float(pos[0])), repr(float(pos[1]))]
        if cameras is not None:
            row.append(cameras[i])
        rows.append(row)
    return write_csv(folder / name, header, rows)


def write_train_val(root: Path, seed: int = 1):
    """A small training split (6 places x 4 images) and its validation split (the same 6 places,
    2 images each) as poses CSVs with real JPEGs: (root, train, val)."""
    import types

    train = write_poses(root, place_positions(6, 4, seed=seed), name="train.csv", seed=seed)
    val = write_poses(root, place_positions(6, 2, seed=seed + 1), name="val.csv", seed=seed + 1)
    return types.SimpleNamespace(root=root, train=train, val=val)


def place_positions(n_places: int, per_place: int, spacing_m: float = 300.0, jitter_m: float = 2.0,
                    seed: int = 0) -> np.ndarray:
    """Metric positions of n_places places on a line, at least spacing_m apart, per_place
    images each within jitter_m (< 7 m) of the place centre, all inside one cluster_places
    cell for pos_threshold_m 25.
    Row order: place by place."""
    rng = np.random.default_rng(seed)
    cell = 25.0 / np.sqrt(3.0)  # cluster_places' cell side for pos_threshold_m 25
    step = int(np.ceil(spacing_m / cell))
    # centres in the middle of cells, so that the jitter never crosses a cell boundary
    centres = np.stack([(70 + np.arange(n_places) * step + 0.5) * cell, np.full(n_places, 140.5 * cell)], axis=1)
    offsets = rng.uniform(-jitter_m, jitter_m, size=(n_places, per_place, 2))
    return (centres[:, None, :] + offsets).reshape(-1, 2)


def write_embeddings_parquet(path: Path, n_places: int = 6, per_place: int = 4, dim: int = 16, *, seed: int = 0,
                             labels: bool = True, positions: bool = False, noise: float = 0.6,
                             centres_seed: int = 123) -> Path:
    """An embeddings parquet: per_place rows of each of n_places places, each row a noisy copy
    of its place's random centre (the same centres for the same centres_seed, so a train and a
    val file share places), with building_id labels and/or easting/northing 300 m apart."""
    import pandas as pd

    centres = np.random.default_rng(centres_seed).normal(size=(n_places, dim))
    rng = np.random.default_rng(seed)
    place = np.repeat(np.arange(n_places), per_place)
    frame = pd.DataFrame({"image_id": [f"img_{seed}_{i:04d}" for i in range(len(place))]})
    frame["embedding"] = list((centres[place] + noise * rng.normal(size=(len(place), dim))).astype(np.float32))
    if labels:
        frame["building_id"] = [f"b{p}" for p in place]
    if positions:
        xy = place_positions(n_places, per_place, seed=seed)
        frame["easting"], frame["northing"] = xy[:, 0], xy[:, 1]
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=False)
    return path


def run_main(capsys, main, argv: list[str]) -> tuple[int, str]:
    """What `python script.py argv` does (run_cli is the scripts' __main__): (exit code, stderr)."""
    from vprkit.cli import run_cli

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_cli(main, argv)
    return exc.value.code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *words: str) -> None:
    """Exit code 2, no traceback, one `error: ...` line holding every word."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"


def run_processes_at_once(commands: dict[str, list[str]], timeout: float = 300) -> dict[str, tuple[int, str, str]]:
    """Start every `python ARGS...` command at once in the repository (one intra-op thread each,
    offline), wait for all: name -> (exit code, stdout, stderr)."""
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    procs = {name: subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name, args in commands.items()}
    runs = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=timeout)
        runs[name] = (proc.returncode, out, err)
    return runs


def write_smooth_image(path: Path, seed: int, size: tuple[int, int] = (72, 56)) -> Path:
    """A photo-like PNG: smooth colour gradients, little pixel noise (a resize barely changes it)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    channels = [np.sin(rng.uniform(2, 9) * x + rng.uniform(0, 6)) * np.cos(rng.uniform(2, 9) * y + rng.uniform(0, 6))
                for _ in range(3)]
    pixels = (np.stack(channels, -1) * 0.45 + 0.5 + rng.normal(0, 0.01, (h, w, 3))).clip(0, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((pixels * 255).astype(np.uint8)).save(path)
    return path
