#!/usr/bin/env python3
"""GPS mining at city scale: time and peak memory of the mining functions on 10k, 100k and 1M
synthetic lat/lon positions.

    .venv/bin/python bench/bench_mining.py                      # 10k, 100k, 1M; 3 repeats
    .venv/bin/python bench/bench_mining.py --sizes 10000 100000 --repeats 5
    .venv/bin/python bench/bench_mining.py --fixed_area         # same 10 km city at every size

Synthetic city: a grid of streets every 100 m; places (camera stops) lie on the streets, each
with on average 4 images (Poisson) scattered by 3 m of GPS noise, given as lat/lon around Paris.
By default the area grows with N so that the density (and so the number of positives per image)
is the same at every size and 1M images cover 10 km x 10 km; growth ratios then show the
algorithm, not a denser city. --fixed_area puts every size in the 10 km x 10 km city.

Each (size, function) runs in a fresh subprocess: inputs are built first, the kernel's peak-RSS
counter is reset (/proc/self/clear_refs), the function runs `--repeats` times (median time), then
once more under tracemalloc (numpy's allocations are traced; C++ allocations of sklearn/faiss
are not, hence the RSS figure too). Memory columns: peak_rss_mb = the process's peak resident
memory (imports and inputs included), rss_delta_mb = that peak minus the resident memory just
before the call, traced_peak_mb = tracemalloc's peak during one call.

Targets (issue "speed and scale"): at 1M every function, and the whole mining pipeline, well
under a minute and 4 GB; growth close to linear: t(1M)/t(100k) and t(100k)/t(10k) near 10.

mine_hard_negatives (embedding search, called once per training epoch) is measured on the
smaller --hard_negative_sizes only: it is an all-vs-all search, quadratic in N by design.

Writes bench/results/mining.csv (one row per size and function) and mining_growth.csv.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import trainable_vpr as vpr  # noqa: E402
from vprkit.cli import atomic_write  # noqa: E402
from vprkit.retrieval.evaluation import l2_normalise  # noqa: E402
from vprkit.tables.pairs import cluster_places, nearest_distance_m, neighbours_within  # noqa: E402
from vprkit.tables.places import EARTH_RADIUS_M, latlon_to_xyz  # noqa: E402

OUT_DIR = REPO / "bench" / "results"
LAT0, LON0 = 48.8566, 2.3522       # city centre (Paris)
STREET_SPACING_M = 100.0
IMAGES_PER_PLACE = 4                # mean (Poisson)
GPS_NOISE_M = 3.0
POS_M, NEG_M = 25.0, 100.0          # DESIGN.md §4 defaults
BATCH_SIZE = 32
FUNCTIONS = (
    "latlon_to_xyz", "cluster_places", "neighbours_within", "nearest_distance_m",
    "make_place_batches", "make_place_batches_hard", "hard_negative_places",
)
PIPELINE = FUNCTIONS  # what one run of GPS mining costs, summed for the 1M target
HARD_NEGATIVE_FUNCTION = "mine_hard_negatives"


# --------------------------------------------------------------------------------------------
# synthetic data
# --------------------------------------------------------------------------------------------
def city_side_m(n: int, fixed_area: bool) -> float:
    """10 km at 1M images; constant density (side grows with sqrt(N)) unless fixed_area."""
    return 10_000.0 if fixed_area else 10_000.0 * math.sqrt(n / 1_000_000)


def street_points(rng: np.random.Generator, count: int, side_m: float) -> np.ndarray:
    """count points uniformly on a grid of streets (both directions) inside side_m x side_m."""
    streets = max(1, int(side_m // STREET_SPACING_M) + 1)
    along = rng.uniform(0.0, side_m, count)
    across = rng.integers(0, streets, count) * STREET_SPACING_M
    vertical = rng.random(count) < 0.5
    return np.stack([np.where(vertical, across, along), np.where(vertical, along, across)], axis=1)


def metres_to_latlon(xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Local east/north metres around (LAT0, LON0) to degrees (equirectangular; exact enough)."""
    lat = LAT0 + np.degrees(xy[:, 1] / EARTH_RADIUS_M)
    lon = LON0 + np.degrees(xy[:, 0] / (EARTH_RADIUS_M * math.cos(math.radians(LAT0))))
    return lat, lon


def synthetic_city(n: int, seed: int = 0, fixed_area: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """lat, lon of n images: places on streets, several noisy images per place."""
    rng = np.random.default_rng(seed)
    side = city_side_m(n, fixed_area)
    centres = street_points(rng, max(1, n // IMAGES_PER_PLACE), side)
    place = rng.integers(0, len(centres), n)
    xy = centres[place] + rng.normal(0.0, GPS_NOISE_M, (n, 2))
    return metres_to_latlon(xy)


# --------------------------------------------------------------------------------------------
# memory probes (Linux /proc; no psutil needed)
# --------------------------------------------------------------------------------------------
def proc_status_mb(field: str) -> float:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) / 1024 if match else float("nan")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# worker: one function at one size, in its own process
# --------------------------------------------------------------------------------------------
def prepare(function: str, n: int, fixed_area: bool):
    """(callable, description of the result) with every input built beforehand."""
    lat, lon = synthetic_city(n, seed=0, fixed_area=fixed_area)
    xyz = latlon_to_xyz(lat, lon)
    rng = np.random.default_rng(1)
    if function == "latlon_to_xyz":
        return lambda: latlon_to_xyz(lat, lon), lambda r: ""
    if function == "cluster_places":
        def describe(labels):
            counts = np.bincount(labels)
            return f"{len(counts)} places, {(counts >= 2).sum()} with >=2 images, mean {counts.mean():.2f} images/place"
        return lambda: cluster_places(xyz, POS_M), describe
    if function == "neighbours_within":
        def describe(found):
            sizes = np.fromiter((len(f) for f in found), np.int64, len(found))
            return f"positives per image (self excluded): mean {sizes.mean() - 1:.1f}, max {sizes.max() - 1}"
        return lambda: neighbours_within(xyz, xyz, POS_M), describe
    if function == "nearest_distance_m":
        q_lat, q_lon = synthetic_city(max(1, n // 10), seed=7, fixed_area=fixed_area)
        q_xyz = latlon_to_xyz(q_lat, q_lon)
        return (lambda: nearest_distance_m(xyz, q_xyz),
                lambda d: f"{len(q_xyz)} queries vs {n} references; {np.mean(d <= POS_M):.1%} within {POS_M:g} m")
    place_of = cluster_places(xyz, POS_M)
    places = int(place_of.max()) + 1
    num_batches = math.ceil(n / BATCH_SIZE)
    describe_batches = lambda b: f"{len(b)} batches of mean {np.mean([len(x) for x in b]):.1f} images"  # noqa: E731
    if function == "make_place_batches":
        return (lambda: vpr.make_place_batches(place_of, BATCH_SIZE, 4, num_batches, np.random.default_rng(0)),
                describe_batches)
    # what trainable_vpr.training.epoch_batches feeds it: for each image its 10 hard negatives (here random
    # images; mining them is mine_hard_negatives, measured separately), grouped per place
    hard_negatives = rng.integers(0, n, (n, 10))
    if function == "hard_negative_places":
        return (lambda: vpr.hard_negative_places(place_of, hard_negatives),
                lambda r: f"{len(r)} places")
    if function == "make_place_batches_hard":
        hard_places = vpr.hard_negative_places(place_of, hard_negatives)
        return (lambda: vpr.make_place_batches(place_of, BATCH_SIZE, 4, num_batches, np.random.default_rng(0),
                                               hard_places, 0.5),
                lambda b: describe_batches(b) + f", hard_neg_ratio 0.5, {places} places")
    if function == HARD_NEGATIVE_FUNCTION:
        emb = l2_normalise(rng.normal(size=(n, 256)).astype(np.float32))
        return (lambda: vpr.mine_hard_negatives(emb, xyz, NEG_M),
                lambda r: f"256-d embeddings, k=10, {np.mean(r >= 0):.1%} of slots filled")
    raise SystemExit(f"unknown function {function}")


def worker(function: str, n: int, repeats: int, fixed_area: bool) -> dict:
    import faiss  # noqa: F401 - the functions import these lazily: a one-off cost (about 1 s
    import sklearn.neighbors  # noqa: F401 - for sklearn) that is not the algorithm's
    run, describe = prepare(function, n, fixed_area)
    gc.collect()
    reset_ok = reset_peak_rss()
    rss_before = proc_status_mb("VmRSS")
    hwm_before = proc_status_mb("VmHWM")
    times = []
    result = None
    for _ in range(repeats):
        result = None
        gc.collect()
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    peak_rss = proc_status_mb("VmHWM")
    note = describe(result)
    result = None
    gc.collect()
    tracemalloc.start()
    result = run()
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "function": function, "n": n, "repeats": repeats, "median_s": statistics.median(times),
        "min_s": min(times), "max_s": max(times), "peak_rss_mb": peak_rss,
        # without clear_refs the peak may predate the call: the delta is then an upper bound
        "rss_delta_mb": peak_rss - (rss_before if reset_ok else min(rss_before, hwm_before)),
        "traced_peak_mb": traced_peak / 2**20, "note": note,
    }


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------
def run_in_subprocess(function: str, n: int, repeats: int, fixed_area: bool, timeout_s: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", function, "--n", str(n), "--repeats", str(repeats)]
    if fixed_area:
        cmd.append("--fixed_area")
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
    except subprocess.TimeoutExpired:
        return {"function": function, "n": n, "repeats": repeats, "note": f"TIMEOUT after {timeout_s:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"function": function, "n": n, "repeats": repeats, "note": f"FAILED rc={proc.returncode}: {tail}"}
    row = json.loads(lines[-1])
    row["subprocess_wall_s"] = time.perf_counter() - started
    return row


def growth_rows(frame, functions) -> list[dict]:
    """Time and memory ratios between consecutive sizes of each function."""
    rows = []
    for function in functions:
        part = frame[(frame["function"] == function) & frame["median_s"].notna()].set_index("n")
        sizes = sorted(part.index)
        for small, large in zip(sizes, sizes[1:]):
            rows.append({
                "function": function, "from_n": small, "to_n": large, "size_ratio": large / small,
                "time_ratio": round(part.at[large, "median_s"] / max(part.at[small, "median_s"], 1e-9), 2),
                "rss_delta_ratio": round(part.at[large, "rss_delta_mb"] / max(part.at[small, "rss_delta_mb"], 1e-3), 2),
                "traced_ratio": round(part.at[large, "traced_peak_mb"]
                                      / max(part.at[small, "traced_peak_mb"], 1e-3), 2),
            })
    return rows


def report(frame, sizes: list[int], out_dir: Path) -> None:
    import pandas as pd

    pd.set_option("display.width", 250)
    pd.set_option("display.max_colwidth", 90)
    cols = ["function", "n", "median_s", "min_s", "max_s", "peak_rss_mb", "rss_delta_mb", "traced_peak_mb", "note"]
    print("\n" + frame[cols].round(3).to_string(index=False))
    functions = list(dict.fromkeys(frame["function"]))
    growth = pd.DataFrame(growth_rows(frame, functions))
    atomic_write(out_dir / "mining_growth.csv", lambda p: growth.to_csv(p, index=False))
    if not growth.empty:
        print("\ngrowth (linear: time_ratio == size_ratio; N log N a little above)")
        print(growth.to_string(index=False))

    largest = max(sizes)
    top = frame[(frame["n"] == largest) & frame["function"].isin(PIPELINE)]
    total = top["median_s"].sum()
    peak = top["peak_rss_mb"].max()
    print(f"\nat N={largest}: mining pipeline ({len(top)} functions) {total:.1f} s in all "
          f"(target < 60 s: {'met' if total < 60 else 'NOT met'}); largest peak RSS {peak:.0f} MB "
          f"(target < 4096 MB: {'met' if peak < 4096 else 'NOT met'})")
    slowest = top.sort_values("median_s", ascending=False).head(3)
    print("slowest at that size: "
          + ", ".join(f"{f} {t:.1f} s" for f, t in zip(slowest["function"], slowest["median_s"])))
    print(f"tables: {out_dir / 'mining.csv'}, {out_dir / 'mining_growth.csv'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per size and function (median)")
    parser.add_argument("--functions", nargs="+", default=list(FUNCTIONS),
                        choices=list(FUNCTIONS) + [HARD_NEGATIVE_FUNCTION])
    parser.add_argument("--hard_negative_sizes", type=int, nargs="*", default=[10_000, 30_000],
                        help="sizes for mine_hard_negatives (quadratic: keep small; none to skip)")
    parser.add_argument("--fixed_area", action="store_true", help="every size in the same 10 km x 10 km city")
    parser.add_argument("--timeout_s", type=float, default=900.0, help="per size and function")
    parser.add_argument("--out_dir", type=Path, default=OUT_DIR)
    parser.add_argument("--report_only", action="store_true", help="print the tables of the last run's mining.csv")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(worker(args.worker, args.n, args.repeats, args.fixed_area)), flush=True)
        return
    import pandas as pd

    if args.report_only:
        frame = pd.read_csv(args.out_dir / "mining.csv")
        report(frame, sorted(set(frame["n"]) & set(args.sizes)) or list(frame["n"]), args.out_dir)
        return
    jobs = [(f, n) for n in sorted(args.sizes) for f in args.functions]
    jobs += [(HARD_NEGATIVE_FUNCTION, n) for n in sorted(args.hard_negative_sizes or [])]
    rows = []
    for function, n in jobs:
        repeats = args.repeats if n < 1_000_000 or function != HARD_NEGATIVE_FUNCTION else 1
        row = run_in_subprocess(function, n, repeats, args.fixed_area, args.timeout_s)
        rows.append(row)
        print(f"{function:>24} n={n:>8}: {row.get('median_s', float('nan')):8.3f} s  "
              f"peak RSS {row.get('peak_rss_mb', float('nan')):7.0f} MB "
              f"(+{row.get('rss_delta_mb', float('nan')):.0f})  "
              f"traced {row.get('traced_peak_mb', float('nan')):7.1f} MB  {row.get('note', '')}", flush=True)
    frame = pd.DataFrame(rows)
    for col in ("median_s", "min_s", "max_s", "peak_rss_mb", "rss_delta_mb", "traced_peak_mb"):
        if col not in frame:
            frame[col] = float("nan")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out_dir / "mining.csv", lambda p: frame.to_csv(p, index=False))
    report(frame, args.sizes, args.out_dir)

if __name__ == "__main__":
    main()
