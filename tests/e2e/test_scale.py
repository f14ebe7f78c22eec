"""Scale: no code path allocates an N x N array over the data set (DESIGN.md §5).

Each check runs on a size where an N x N matrix could not fit in memory (200k positions: 320 GB
as float64; 200k database x 32k queries: 26 GB as float32, 51 GB as float64) and bounds what is
allocated: mining in
this process under tracemalloc (numpy's allocations, those of sklearn's KD-tree included, are
traced), evaluation in a subprocess whose peak resident memory is read from /proc (faiss
allocates in C++, outside tracemalloc). The budgets are generous for a linear algorithm and
hundreds of times below N x N.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
import pytest
import sklearn.neighbors  # noqa: F401 - the module imports it lazily; importing it under
                          # tracemalloc would be slow and counted

import trainable_vpr as vpr
from vprkit.retrieval.evaluation import l2_normalise
from vprkit.tables.pairs import cluster_places, neighbours_within
from vprkit.tables.places import metric_to_xyz

from helpers import REPO

N_POSITIONS = 200_000
N_DATABASE, N_QUERIES, DIM = 200_000, 32_000, 8
MiB = 2**20
# Linear budget for mining: 1 KiB per position (200 MB at 200k; an N x N float64 is 320 GB).
MINING_BUDGET = 1024 * N_POSITIONS


def city_positions(n: int, seed: int = 0) -> np.ndarray:
    """Metric positions of n images: places on a street grid (100 m apart), about 4 noisy images
    each, the area growing with n so the density is that of 1M images over 10 km x 10 km."""
    rng = np.random.default_rng(seed)
    side = 10_000.0 * math.sqrt(n / 1_000_000)
    places = max(1, n // 4)
    along = rng.uniform(0, side, places)
    across = rng.integers(0, int(side // 100) + 1, places) * 100.0
    vertical = rng.random(places) < 0.5
    centres = np.stack([np.where(vertical, across, along), np.where(vertical, along, across)], axis=1)
    xy = centres[rng.integers(0, places, n)] + rng.normal(0, 3.0, (n, 2))
    return metric_to_xyz(xy[:, 0], xy[:, 1])


def traced_peak(fn):
    """(result, peak bytes allocated during fn, as traced by tracemalloc)."""
    tracemalloc.start()
    try:
        result = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak


@pytest.fixture(scope="module")
def xyz():
    return city_positions(N_POSITIONS)


@pytest.fixture(scope="module")
def place_of(xyz):
    return cluster_places(xyz, 25.0)


def test_cluster_places_memory_is_linear(xyz):
    labels, peak = traced_peak(lambda: cluster_places(xyz, 25.0))
    assert len(labels) == N_POSITIONS
    assert peak < MINING_BUDGET, f"cluster_places allocated {peak / MiB:.0f} MiB for {N_POSITIONS} positions"


def test_neighbours_within_memory_is_linear(xyz):
    # small radius: the answer itself stays small, so the peak is the algorithm's
    found, peak = traced_peak(lambda: neighbours_within(xyz, xyz, 2.0))
    assert len(found) == N_POSITIONS
    assert all(i in f for i, f in zip(range(0, N_POSITIONS, 997), found[::997]))  # each point finds itself
    assert peak < MINING_BUDGET, f"neighbours_within allocated {peak / MiB:.0f} MiB for {N_POSITIONS} positions"


def test_place_batches_memory_is_linear(place_of):
    # a fifth of an epoch: every per-place structure is built in full, the batches are the
    # part that is plainly linear (and slow to trace)
    num_batches = math.ceil(N_POSITIONS / 32 / 5)
    rng = np.random.default_rng(0)
    # a hard-negative place list per place, as trainable_vpr.training.epoch_batches passes it
    hard_places = list(rng.integers(0, place_of.max() + 1, (place_of.max() + 1, 8)))
    batches, peak = traced_peak(lambda: vpr.make_place_batches(place_of, 32, 4, num_batches, rng, hard_places, 0.5))
    assert len(batches) == num_batches
    assert peak < MINING_BUDGET, f"make_place_batches allocated {peak / MiB:.0f} MiB for {N_POSITIONS} positions"


def test_hard_negative_mining_memory_is_bounded_when_everything_is_near():
    # Quadratic work is unavoidable here (every pair must be looked at), so N stays small; the
    # check is that the memory stays below a single N x N float64 matrix.
    n = 3000  # all within 40 m: nobody is a negative of anybody at neg_threshold_m 100
    rng = np.random.default_rng(0)
    xyz = metric_to_xyz(rng.uniform(0, 40, n), rng.uniform(0, 40, n))
    emb = l2_normalise(rng.standard_normal((n, 8)).astype(np.float32))
    result, peak = traced_peak(lambda: vpr.mine_hard_negatives(emb, xyz, 100.0))
    assert (result == -1).all()
    square = n * n * 8  # one N x N float64: 69 MiB here
    assert peak < square, (f"mine_hard_negatives allocated {peak / MiB:.0f} MiB for {n} images, more than "
                           f"one N x N float64 matrix ({square / MiB:.0f} MiB)")


EVALUATION_SCRIPT = textwrap.dedent("""
    import json, re, sys, tracemalloc
    from pathlib import Path
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    import faiss, sklearn.neighbors  # imported lazily by the module; not part of the measure
    from vprkit.retrieval.evaluation import evaluate_retrieval
    from vprkit.tables.places import metric_to_xyz

    def status(field):
        return int(re.search(rf"^{field}:\\s+(\\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) * 1024

    n_db, n_q, dim = (int(a) for a in sys.argv[2:5])
    rng = np.random.default_rng(0)
    db = rng.standard_normal((n_db, dim), dtype=np.float32)
    src = rng.integers(0, n_db, n_q)
    q = db[src] + 0.1 * rng.standard_normal((n_q, dim), dtype=np.float32)
    side = 10_000.0 * (n_db / 1e6) ** 0.5
    db_xyz = metric_to_xyz(rng.uniform(0, side, n_db), rng.uniform(0, side, n_db))
    q_xyz = db_xyz[src] + rng.normal(0, 3.0, (n_q, 3))
    try:
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
        reset = True
    except OSError:
        reset = False
    before = status("VmRSS") if reset else status("VmHWM")
    tracemalloc.start()
    result = evaluate_retrieval(db, db_xyz, q, q_xyz, 25.0, (1, 5, 10))
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(json.dumps({"rss_peak_delta": status("VmHWM") - before, "traced_peak": traced,
                      "recall1": result.recalls[1], "shape": list(result.top_indices.shape), "reset": reset}))
""")


def test_evaluate_retrieval_memory_is_bounded():
    proc = subprocess.run(
        [sys.executable, "-c", EVALUATION_SCRIPT, str(REPO), str(N_DATABASE), str(N_QUERIES), str(DIM)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["shape"] == [N_QUERIES, 10]
    assert out["recall1"] > 0.9  # queries are near copies of database items: the search works
    square = N_DATABASE * N_QUERIES * 4  # the Q x N float32 score matrix: 26 GB
    budget = 512 * MiB
    assert out["traced_peak"] < budget, f"evaluate_retrieval allocated {out['traced_peak'] / MiB:.0f} MiB (numpy)"
    assert out["rss_peak_delta"] < budget, (
        f"evaluate_retrieval raised peak RSS by {out['rss_peak_delta'] / MiB:.0f} MiB "
        f"(Q x N float32 would be {square / 2**30:.0f} GiB)")
