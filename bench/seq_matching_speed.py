#!/usr/bin/env python3
"""The time and memory of sequence matching against single-frame faiss search (issue 24 item 8).

    .venv/bin/python bench/seq_matching_speed.py                      # 10k queries x 100k database, 256-d
    .venv/bin/python bench/seq_matching_speed.py --n_queries 1000 --n_db 10000

Synthetic route (`synthetic_route`): the database is `n_db` random unit frames in drives of 10,000;
the queries are 4 drives that follow 4 database drives at 0.9, 1.0, 1.1 and 1.2 database frames
per query frame, each frame its database frame plus Gaussian noise (so one frame alone is often
wrong). In ONE run: the suite's single-frame search (vprkit.retrieval.evaluation.exact_search, faiss flat
inner product, top-1) and sequence_match (shortlist, votes, top-1), each timed; then each again
under tracemalloc for its peak of Python-visible memory (numpy arrays, faiss results; faiss's own
blocks are bounded by its query blocks) and the process's peak resident memory. Prints the ratio
and both peaks next to the size a full query x database float32 matrix would need.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vprkit.retrieval.evaluation import exact_search, l2_normalise  # noqa: E402
from vprkit.routes.matching import SeqMatchConfig, sequence_match  # noqa: E402
from vprkit.routes.order import Route  # noqa: E402

DB_DRIVE = 10_000
QUERY_VELOCITIES = (0.9, 1.0, 1.1, 1.2)


@dataclass
class SpeedResult:
    single_s: float
    sequence_s: float
    single_peak_mb: float
    sequence_peak_mb: float
    max_rss_mb: float
    full_matrix_mb: float
    single_r1: float
    sequence_r1: float

    @property
    def ratio(self) -> float:
        return self.sequence_s / self.single_s


def _route(drive: np.ndarray) -> Route:
    return Route(drive=drive, key=np.arange(len(drive), dtype=float), unit="frame",
                 drive_names=tuple(str(d) for d in np.unique(drive)))


def synthetic_route(n_queries: int, n_db: int, dim: int, noise: float = 5.0,
                    seed: int = 0) -> tuple[np.ndarray, Route, np.ndarray, Route, np.ndarray]:
    """(queries, query route, database, database route, each query's true database row)."""
    rng = np.random.default_rng(seed)
    db = l2_normalise(rng.standard_normal((n_db, dim), dtype=np.float32))
    db_drive = np.arange(n_db) // DB_DRIVE
    per_drive = -(-n_queries // len(QUERY_VELOCITIES))
    truth, q_drive = [], []
    for d, velocity in enumerate(QUERY_VELOCITIES):
        count = min(per_drive, n_queries - d * per_drive)
        start = (d % max(1, n_db // DB_DRIVE)) * DB_DRIVE
        rows = start + np.floor(velocity * np.arange(count) + 0.5).astype(np.int64)
        truth.append(np.minimum(rows, min(n_db, start + DB_DRIVE) - 1))
        q_drive.append(np.full(count, d))
    truth_rows = np.concatenate(truth)
    q = db[truth_rows] + noise * rng.standard_normal((n_queries, dim), dtype=np.float32) / np.sqrt(dim)
    return l2_normalise(q), _route(np.concatenate(q_drive)), db, _route(db_drive), truth_rows


def _timed(run: Callable[[], np.ndarray]) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    top = run()
    return time.perf_counter() - start, top


def _peak_mb(run: Callable[[], np.ndarray]) -> float:
    tracemalloc.start()
    run()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 2**20


def time_matching(n_queries: int = 10_000, n_db: int = 100_000, dim: int = 256, seq_len: int = 10,
                  config: SeqMatchConfig | None = None, seed: int = 0) -> SpeedResult:
    """Single-frame search and sequence matching on one synthetic route, timed in one process."""
    config = config or SeqMatchConfig(seq_len)
    q, q_route, db, db_route, truth = synthetic_route(n_queries, n_db, dim, seed=seed)

    def single() -> np.ndarray:
        return exact_search(db, q, 1)[0][:, 0]

    def sequence() -> np.ndarray:
        return sequence_match(q, q_route, db, db_route, config, k=1).index[:, 0]

    single(), sequence()  # warm-up: faiss threads, first-touch of the arrays
    single_s, single_top = _timed(single)
    sequence_s, sequence_top = _timed(sequence)
    return SpeedResult(single_s=single_s, sequence_s=sequence_s, single_peak_mb=_peak_mb(single),
                       sequence_peak_mb=_peak_mb(sequence),
                       max_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                       full_matrix_mb=n_queries * n_db * 4 / 2**20,
                       single_r1=float((np.abs(single_top - truth) <= 1).mean()),
                       sequence_r1=float((np.abs(sequence_top - truth) <= 1).mean()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n_queries", type=int, default=10_000)
    parser.add_argument("--n_db", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--seq_len", type=int, default=10)
    parser.add_argument("--shortlist", type=int, default=50)
    args = parser.parse_args()
    config = SeqMatchConfig(args.seq_len, shortlist=args.shortlist)
    print(speed_report(args.n_queries, args.n_db, args.dim, config))


def speed_report(n_queries: int, n_db: int, dim: int, config: SeqMatchConfig) -> str:
    """time_matching at these sizes, as the lines this bench (and bench/recall_route.py --speed) prints."""
    r = time_matching(n_queries, n_db, dim, config.seq_len, config)
    return "\n".join([
        f"{n_queries:,} queries x {n_db:,} database frames, {dim}-d synthetic route; "
        f"seq_len {config.seq_len}, {config.n_velocities} velocities {config.v_min}-{config.v_max}, "
        f"shortlist {config.shortlist}, query chunk {config.query_chunk}",
        f"  single-frame faiss search (top-1): {r.single_s:.2f} s, peak {r.single_peak_mb:.0f} MB traced, "
        f"R@1 (within one frame) {r.single_r1:.3f}",
        f"  sequence matching (top-1):         {r.sequence_s:.2f} s, peak {r.sequence_peak_mb:.0f} MB traced, "
        f"R@1 (within one frame) {r.sequence_r1:.3f}",
        f"  ratio {r.ratio:.2f}x (goal <= 3x); process peak RSS {r.max_rss_mb:.0f} MB; a full query x database "
        f"float32 matrix would be {r.full_matrix_mb:,.0f} MB"])

if __name__ == "__main__":
    main()
