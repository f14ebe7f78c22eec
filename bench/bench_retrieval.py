#!/usr/bin/env python3
"""Exact retrieval at scale: evaluate_retrieval (faiss) against a plain numpy baseline.

    .venv/bin/python bench/bench_retrieval.py                          # 10k queries vs 100k and 1M
    .venv/bin/python bench/bench_retrieval.py --db_sizes 100000 --repeats 5

Synthetic data: database descriptors are 256-d Gaussian vectors; each query is a database
descriptor plus 2.5 times as much Gaussian noise (cosine to its source about 0.37, so near ties
occur and the top-1 check is not trivial); positions come from the synthetic city of
bench_mining.py, each query placed at its source image's position plus GPS noise.

Methods, all giving the exact top-10 by inner product of L2-normalised descriptors:
  evaluate_retrieval  the module's evaluation: normalise, faiss IndexFlatIP add + search, tie
                      ordering, distances, Recall@N and the queries-without-positive count
  faiss_search        only its core: normalise + IndexFlatIP add + search (for the breakdown)
  numpy_blocked       normalise, then per block of queries a matrix product with the whole
                      database (block sized so scores + argpartition indices <= --block_mb) and
                      np.argpartition, then the top 10 sorted (score descending, index ascending)

Each database size runs in its own subprocess; the methods alternate within each repeat, so a
burst of load from other jobs hits them alike; times are medians over the repeats and the ratio
is taken between medians of the same run. Memory per call: rss_delta_mb = peak resident memory
during the call minus resident memory before it (peak reset through /proc/self/clear_refs; faiss
allocates outside Python, so tracemalloc alone would miss it) and traced_peak_mb (tracemalloc;
numpy's allocations). Top-1 agreement between numpy and evaluate_retrieval is checked on every
query; a disagreement that is a tie within 1e-5 in score is counted separately.

Writes bench/results/retrieval.csv.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))


from bench_mining import GPS_NOISE_M, proc_status_mb, reset_peak_rss, synthetic_city  # noqa: E402
from vprkit.cli import atomic_write  # noqa: E402
from vprkit.retrieval.evaluation import evaluate_retrieval, l2_normalise  # noqa: E402
from vprkit.tables.places import latlon_to_xyz  # noqa: E402

OUT_DIR = REPO / "bench" / "results"
DIM, K = 256, 10
QUERY_NOISE = 2.5  # cosine to the source about 0.37: at 1M the source is not always the top-1
METHODS = ("evaluate_retrieval", "faiss_search", "numpy_blocked")


def make_data(n_db: int, n_q: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    db = rng.standard_normal((n_db, DIM), dtype=np.float32)
    src = rng.integers(0, n_db, n_q)
    queries = db[src] + QUERY_NOISE * rng.standard_normal((n_q, DIM), dtype=np.float32)
    lat, lon = synthetic_city(n_db, seed=seed)
    db_xyz = latlon_to_xyz(lat, lon)
    q_xyz = db_xyz[src] + rng.normal(0.0, GPS_NOISE_M, (n_q, 3))
    return db, db_xyz, queries, q_xyz


def numpy_topk(db: np.ndarray, queries: np.ndarray, k: int, block_mb: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product of L2-normalised vectors: blocked matmul + argpartition."""
    db = l2_normalise(db)
    queries = l2_normalise(queries)
    n = len(db)
    k = min(k, n)
    # per score: 4 bytes (float32 score) + 8 (argpartition's int64 index)
    block = int(np.clip(block_mb * 2**20 // (12 * n), 1, len(queries)))
    top = np.empty((len(queries), k), np.int64)
    scores = np.empty((len(queries), k), np.float32)
    for start in range(0, len(queries), block):
        sim = queries[start:start + block] @ db.T                       # block x N float32
        part = np.argpartition(sim, n - k, axis=1)[:, n - k:]           # the k largest, unordered
        part_scores = np.take_along_axis(sim, part, axis=1)
        order = np.lexsort((part, -part_scores), axis=1)                # score desc, index asc
        top[start:start + block] = np.take_along_axis(part, order, axis=1)
        scores[start:start + block] = np.take_along_axis(part_scores, order, axis=1)
    return top, scores


def faiss_search(db: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    xb = l2_normalise(db)
    index = faiss.IndexFlatIP(xb.shape[1])
    index.add(xb)
    scores, top = index.search(l2_normalise(queries), k)
    return top, scores


def measure(fn):
    """(result, seconds, rss_delta_mb, traced_peak_mb) of one call."""
    gc.collect()
    reset_peak_rss()
    rss_before = proc_status_mb("VmRSS")
    tracemalloc.start()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    _, traced = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return result, seconds, proc_status_mb("VmHWM") - rss_before, traced / 2**20


def worker(n_db: int, n_q: int, repeats: int, block_mb: float) -> list[dict]:
    import faiss  # noqa: F401 - imported lazily by the module; a one-off cost, not the search's
    import sklearn.neighbors  # noqa: F401

    db, db_xyz, queries, q_xyz = make_data(n_db, n_q)
    calls = {
        "evaluate_retrieval": lambda: evaluate_retrieval(db, db_xyz, queries, q_xyz, 25.0, (1, 5, 10)),
        "faiss_search": lambda: faiss_search(db, queries, K),
        "numpy_blocked": lambda: numpy_topk(db, queries, K, block_mb),
    }
    stats: dict[str, dict[str, list]] = {m: {"t": [], "rss": [], "traced": []} for m in METHODS}
    results: dict[str, object] = {}
    for _ in range(repeats):
        for method in METHODS:
            results[method] = None
            result, seconds, rss, traced = measure(calls[method])
            results[method] = result
            stats[method]["t"].append(seconds)
            stats[method]["rss"].append(rss)
            stats[method]["traced"].append(traced)
    ev = results["evaluate_retrieval"]
    np_top, np_scores = results["numpy_blocked"]
    differ = ev.top_indices[:, 0] != np_top[:, 0]
    ties = differ & (np.abs(ev.top_scores[:, 0] - np_scores[:, 0]) <= 1e-5)
    same_top10 = float(np.mean(np.sort(ev.top_indices, 1) == np.sort(np_top, 1)))
    check = (f"top-1 equal on {n_q - differ.sum()}/{n_q} queries ({ties.sum()} others are ties within 1e-5); "
             f"top-10 sets {same_top10:.4%} equal; R@1 {ev.recalls[1]:.3f}")
    rows = []
    for method in METHODS:
        s = stats[method]
        rows.append({
            "method": method, "n_db": n_db, "n_queries": n_q, "dim": DIM, "k": K, "repeats": repeats,
            "median_s": statistics.median(s["t"]), "min_s": min(s["t"]), "max_s": max(s["t"]),
            "queries_per_s": n_q / statistics.median(s["t"]),
            "rss_delta_mb": max(s["rss"]), "traced_peak_mb": max(s["traced"]),
            "peak_rss_mb_process": proc_status_mb("VmHWM"),
            "top1_mismatches": int(differ.sum()), "top1_mismatches_not_ties": int((differ & ~ties).sum()),
            "check": check,
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--db_sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--block_mb", type=float, default=256.0, help="numpy baseline: score block size")
    parser.add_argument("--timeout_s", type=float, default=3600.0)
    parser.add_argument("--out_dir", type=Path, default=OUT_DIR)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(worker(args.worker, args.queries, args.repeats, args.block_mb)), flush=True)
        return

    import pandas as pd

    pd.set_option("display.width", 250)
    pd.set_option("display.max_colwidth", 120)
    rows = []
    for n_db in args.db_sizes:
        cmd = [sys.executable, __file__, "--worker", str(n_db), "--queries", str(args.queries),
               "--repeats", str(args.repeats), "--block_mb", str(args.block_mb)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
        lines = [line for line in proc.stdout.splitlines() if line.startswith("[")]
        if proc.returncode != 0 or not lines:
            print(f"n_db={n_db}: FAILED rc={proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
            continue
        part = json.loads(lines[-1])
        rows += part
        times = {r["method"]: r["median_s"] for r in part}
        print(f"n_db={n_db}: " + ", ".join(f"{m} {t:.2f} s" for m, t in times.items())
              + f"; {part[0]['check']}", flush=True)
    if not rows:
        sys.exit(1)
    frame = pd.DataFrame(rows)
    ratio = []
    for n_db, part in frame.groupby("n_db"):
        t = part.set_index("method")["median_s"]
        ratio.append({"n_db": n_db,
                      "faiss_over_numpy (evaluate_retrieval)": t["evaluate_retrieval"] / t["numpy_blocked"],
                      "faiss_over_numpy (search only)": t["faiss_search"] / t["numpy_blocked"]})
    ratios = pd.DataFrame(ratio)
    frame = frame.merge(ratios, on="n_db")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out_dir / "retrieval.csv", lambda p: frame.to_csv(p, index=False))
    cols = ["method", "n_db", "n_queries", "median_s", "min_s", "max_s", "queries_per_s", "rss_delta_mb",
            "traced_peak_mb", "top1_mismatches", "top1_mismatches_not_ties"]
    print("\n" + frame[cols].round(3).to_string(index=False))
    print("\ntime ratio faiss / numpy (below 1: faiss faster)")
    print(ratios.round(3).to_string(index=False))
    print("\nchecks: " + " | ".join(f"n_db={n}: {c}" for n, c in frame.groupby("n_db")["check"].first().items()))
    print(f"table: {args.out_dir / 'retrieval.csv'}")


if __name__ == "__main__":
    main()
