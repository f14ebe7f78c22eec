"""Training-free sequence matching over any frame descriptors: SeqSLAM (M. Milford and G. Wyeth,
"SeqSLAM: Visual route-based navigation for sunny summer days and stormy winter nights", ICRA 2012).

Descriptors are numpy float32 [N, D], L2-normalised (raw, whitened, VLAD, a trained head: any).
1. Similarity = cosine of a query frame and a database frame.
2. Local contrast normalisation: each query frame's similarities are z-scored over the WHOLE
   database (row z-score). The row mean and std are exact without the query x database matrix:
   mean_j(q.d_j) = q.mean(D) and mean_j((q.d_j)^2) = q^T (D^T D / N) q (a D x D matrix).
3. Accumulation along lines: query i's window is its causal window (windows.py: the frames k =
   0..L-1 steps back in i's segment; a window at a drive start has fewer frames and is the mean
   over those it has). A candidate is a database END row j; at velocity v (database frames per
   query frame) the line's frame k steps back is row j - round(v k), clamped at the first row of
   j's segment (as windows are). Score(i, j) = max over velocities of the mean over the window of
   the z-scored similarity. Velocities: `n_velocities` geometrically spaced in [v_min, v_max].

Scale (`sequence_match`): the full query x database matrix is never built. Each query frame's
top-`shortlist` database frames are searched ONCE (faiss, exact inner product) and shared by every
window that holds the frame; each shortlisted hit (query frame i - k, database frame s) votes for
the end rows whose line passes through s at step k (s + round(v k), or the rows clamped onto s
when s starts a segment). Votes are summed per (query, end row, velocity), in chunks of queries
(bounded memory). A pair outside the shortlist counts as min(0, z of the query frame's last
shortlisted frame): no more than any frame it could be. When the shortlist covers the database the
scores are exactly `exact_sequence_scores` (the full-matrix reference, for small data and tests).
`match_scores` scores given (query, candidate end row) pairs exactly, e.g. a learned sequence
descriptor's shortlist, so fusion can combine both scores on one shortlist.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vprkit.retrieval.evaluation import exact_search, score_retrieval
from vprkit.routes.order import Route
from vprkit.routes.windows import segment_span

PAIRS_PER_CHUNK = 2_000_000  # (query, candidate, velocity, step) entries held at once by match_scores


@dataclass(frozen=True)
class SeqMatchConfig:
    """seq_len: frames per window; [v_min, v_max]: database frames per query frame, n_velocities of
    them (geometric); shortlist: database frames kept per query frame; query_chunk: queries
    accumulated at once (memory ~ query_chunk x seq_len x shortlist x n_velocities entries)."""

    seq_len: int
    v_min: float = 0.8
    v_max: float = 1.25
    n_velocities: int = 5
    shortlist: int = 50
    query_chunk: int = 256

    def __post_init__(self) -> None:
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {self.seq_len}")
        if not 0 < self.v_min <= self.v_max:
            raise ValueError(f"velocities must satisfy 0 < v_min <= v_max, got {self.v_min}, {self.v_max}")
        if self.n_velocities < 1 or self.shortlist < 1 or self.query_chunk < 1:
            raise ValueError("n_velocities, shortlist and query_chunk must be >= 1")

    def velocities(self) -> np.ndarray:
        count = 1 if self.v_min == self.v_max else self.n_velocities
        return np.geomspace(self.v_min, self.v_max, count)

    def offsets(self) -> np.ndarray:
        """int64 [V, L]: the database rows a line steps back at velocity v after k query frames
        (round half up of v k)."""
        k = np.arange(self.seq_len, dtype=np.float64)
        return np.floor(self.velocities()[:, None] * k[None, :] + 0.5).astype(np.int64)


@dataclass
class SeqMatches:
    """Top-k database END rows per query by sequence score, best first (ties: lower row first);
    index -1 / score -inf where a query has fewer than k candidates."""

    index: np.ndarray  # int64 [Nq, k]
    score: np.ndarray  # float32 [Nq, k]


SECOND_MOMENT_MAX_DIM = 4096  # above (VLAD-sized descriptors): the database rows stand for D^T D / N


@dataclass(frozen=True)
class RowContrast:
    """The exact mean and std of every query frame's similarities over the whole database.

    The second moment mean_j((q.d_j)^2) = q^T (D^T D / N) q comes from the D x D matrix `second`
    when D <= SECOND_MOMENT_MAX_DIM and D <= N; otherwise (e.g. 10,240-d VLAD, whose D x D matrix
    took 0.8 GB and crashed OpenBLAS) from the database rows themselves (`rows`, no copy:
    ||D q||^2 / N in blocks of queries, O(Nq x N x D) time, no Nq x N matrix kept)."""

    mean: np.ndarray                 # float64 [D]: the database's mean descriptor
    second: np.ndarray | None = None  # float64 [D, D]: D^T D / N
    rows: np.ndarray | None = None    # [N, D]: the database, when `second` would be larger

    @classmethod
    def of(cls, db_desc: np.ndarray, rows_per_block: int = 16384) -> "RowContrast":
        """From the database in blocks of rows (float32 products summed in float64, no float64 copy)."""
        db = np.asarray(db_desc)
        mean = db.mean(axis=0, dtype=np.float64)
        if db.shape[1] > min(SECOND_MOMENT_MAX_DIM, len(db)):
            return cls(mean=mean, rows=db)
        second = np.zeros((db.shape[1], db.shape[1]))
        for start in range(0, len(db), rows_per_block):
            block = db[start:start + rows_per_block]
            block = block if block.dtype == np.float64 else block.astype(np.float32, copy=False)
            second += block.T @ block
        return cls(mean=mean, second=second / len(db))

    def stats(self, q_desc: np.ndarray, queries_per_block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) float64 [Nq] of each query frame's similarities to the database."""
        q = np.asarray(q_desc, dtype=np.float64)
        mean = q @ self.mean
        if self.second is not None:
            moment = np.einsum("nd,nd->n", q @ self.second, q)
        else:
            assert self.rows is not None
            rows = self.rows.astype(np.float32, copy=False)
            moment = np.concatenate([np.square(q[i:i + queries_per_block].astype(np.float32) @ rows.T,
                                               dtype=np.float64).mean(axis=1)
                                     for i in range(0, len(q), queries_per_block)]) if len(q) else np.zeros(0)
        var = moment - mean ** 2
        return mean, np.sqrt(np.maximum(var, 1e-12))


def _check(q_desc: np.ndarray, q_route: Route, db_desc: np.ndarray, db_route: Route) -> None:
    if len(q_desc) != len(q_route) or len(db_desc) != len(db_route):
        raise ValueError(f"descriptors and routes differ in length: queries {len(q_desc)} vs {len(q_route)}, "
                         f"database {len(db_desc)} vs {len(db_route)}")
    if q_desc.ndim != 2 or db_desc.ndim != 2 or q_desc.shape[1] != db_desc.shape[1]:
        raise ValueError(f"query and database descriptors must be [N, D] of one D: {q_desc.shape}, {db_desc.shape}")
    if len(db_desc) == 0:
        raise ValueError("the database is empty")


def window_lengths(q_route: Route, seq_len: int) -> np.ndarray:
    """int64 [Nq]: the frames each query's window really has (fewer at a segment start)."""
    first, _ = segment_span(q_route)
    return np.minimum(seq_len, np.arange(len(q_route)) - first + 1)


def exact_sequence_scores(q_desc: np.ndarray, q_route: Route, db_desc: np.ndarray, db_route: Route,
                          config: SeqMatchConfig) -> np.ndarray:
    """float64 [Nq, Ndb]: the sequence score of every (query, database end row) from the full
    z-scored similarity matrix. The reference for tests and small data only (O(Nq x Ndb) memory)."""
    _check(q_desc, q_route, db_desc, db_route)
    mean, std = RowContrast.of(db_desc).stats(q_desc)
    z = (np.asarray(q_desc, np.float64) @ np.asarray(db_desc, np.float64).T - mean[:, None]) / std[:, None]
    n = window_lengths(q_route, config.seq_len)
    db_first, _ = segment_span(db_route)
    end = np.arange(len(db_desc))
    best = np.full(z.shape, -np.inf)
    for offsets in config.offsets():
        total = np.zeros(z.shape)
        for k, offset in enumerate(offsets):
            queries = np.flatnonzero(n > k)
            total[queries] += z[queries - k][:, np.maximum(end - offset, db_first)]
        best = np.maximum(best, total / n[:, None])
    return best


def match_scores(q_desc: np.ndarray, q_route: Route, db_desc: np.ndarray, db_route: Route,
                 candidates: np.ndarray, config: SeqMatchConfig) -> np.ndarray:
    """float32 [Nq, C]: the exact sequence score of each query's candidate database end rows
    (int [Nq, C]; -1 = none, scored -inf). Each distinct (query frame, database frame) pair of a
    chunk of queries is computed once."""
    _check(q_desc, q_route, db_desc, db_route)
    candidates = np.asarray(candidates, dtype=np.int64)
    n_q, n_c = candidates.shape
    mean, std = RowContrast.of(db_desc).stats(q_desc)
    n = window_lengths(q_route, config.seq_len)
    db_first, _ = segment_span(db_route)
    offsets = config.offsets()
    steps = np.arange(config.seq_len)
    out = np.full((n_q, n_c), -np.inf, dtype=np.float32)
    chunk = max(1, PAIRS_PER_CHUNK // max(1, n_c * offsets.size))
    for start in range(0, n_q, chunk):
        rows = np.arange(start, min(start + chunk, n_q))
        cand = np.maximum(candidates[rows], 0)
        lines = np.maximum(cand[:, :, None, None] - offsets[None, None], db_first[cand][:, :, None, None])
        valid = steps[None, :] < n[rows][:, None]                                  # [m, L]
        q_rows = np.where(valid, rows[:, None] - steps[None, :], rows[:, None])    # [m, L]
        keys = q_rows[:, None, None, :] * len(db_desc) + lines                     # [m, C, V, L]
        unique, inverse = np.unique(keys, return_inverse=True)
        qa, da = unique // len(db_desc), unique % len(db_desc)
        sims = np.einsum("nd,nd->n", q_desc[qa].astype(np.float64), db_desc[da].astype(np.float64))
        z = ((sims - mean[qa]) / std[qa])[inverse.reshape(keys.shape)]
        score = (z * valid[:, None, None, :]).sum(axis=3) / n[rows][:, None, None]
        out[rows] = np.where(candidates[rows] >= 0, score.max(axis=2), -np.inf)
    return out


def _top_k_sorted(rows: np.ndarray, ends: np.ndarray, scores: np.ndarray, n_rows: int,
                  k: int) -> SeqMatches:
    """Per row (0..n_rows-1) the k best (end, score) entries: score descending, lower end first.
    Entries come sorted by (row, end); one stable sort of row - score scaled into [0, 1)."""
    if len(rows):
        low, high = float(scores.min()), float(scores.max())
        order = np.argsort(rows - 0.5 * (scores - low) / (high - low + 1e-12), kind="stable")
        rows, ends, scores = rows[order], ends[order], scores[order]
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]]) if len(rows) else np.zeros(0, np.int64)
    rank = np.arange(len(rows)) - np.repeat(starts, np.diff(np.r_[starts, len(rows)]))
    keep = rank < k
    index = np.full((n_rows, k), -1, dtype=np.int64)
    score = np.full((n_rows, k), -np.inf, dtype=np.float32)
    index[rows[keep], rank[keep]] = ends[keep]
    score[rows[keep], rank[keep]] = scores[keep]
    return SeqMatches(index=index, score=score)


def _votes(rows: np.ndarray, n: np.ndarray, hits: np.ndarray, gain: np.ndarray, offsets: np.ndarray,
           db_first: np.ndarray, db_last: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(local query, velocity, end row, vote) of every shortlisted hit of every window frame of
    the queries `rows`: hit s of frame i - k votes `gain` for the end rows whose line passes
    through s at step k."""
    out: list[tuple[np.ndarray, ...]] = []
    for k in range(offsets.shape[1]):
        local = np.flatnonzero(n[rows] > k)
        s, g = hits[rows[local] - k], gain[rows[local] - k]                       # [m, K]
        who = np.broadcast_to(local[:, None], s.shape)
        starts = db_first[s] == s
        for v, offset in enumerate(offsets[:, k]):
            end = s + offset
            ok = end <= db_last[s]
            out.append((who[ok], np.full(ok.sum(), v), end[ok], g[ok]))
            if offset > 0 and starts.any():  # the lines of end rows s .. s+offset-1 clamp onto a segment start s
                for extra in range(offset):
                    end = s + extra
                    ok = starts & (end <= db_last[s])
                    out.append((who[ok], np.full(ok.sum(), v), end[ok], g[ok]))
    return tuple(np.concatenate(part) for part in zip(*out))  # type: ignore[return-value]


def sequence_match(q_desc: np.ndarray, q_route: Route, db_desc: np.ndarray, db_route: Route,
                   config: SeqMatchConfig, k: int = 10, candidates: np.ndarray | None = None) -> SeqMatches:
    """The top-k database end rows of every query by sequence score. Without `candidates`, the
    shortlist of each query frame (faiss) votes along the lines (see the module doc); with
    `candidates` (int [Nq, C], e.g. a sequence descriptor's top-C) those are scored exactly. The
    shortlist is at least k frames, so every query gets k end rows (its own frame's shortlist alone
    votes for that many at step 0)."""
    _check(q_desc, q_route, db_desc, db_route)
    if candidates is not None:
        scores = match_scores(q_desc, q_route, db_desc, db_route, candidates, config)
        rows, ends = np.repeat(np.arange(len(candidates)), candidates.shape[1]), candidates.ravel()
        order = np.lexsort((ends, rows))
        order = order[ends[order] >= 0]
        return _top_k_sorted(rows[order], ends[order], scores.ravel()[order], len(candidates), k)
    n_db, n_vel = len(db_desc), config.offsets().shape[0]
    hits, sims = exact_search(db_desc, q_desc, min(max(config.shortlist, k), n_db))
    mean, std = RowContrast.of(db_desc).stats(q_desc)
    z = (sims - mean[:, None]) / std[:, None]
    fill = np.minimum(0.0, z[:, -1])             # a frame outside the shortlist: at most the last hit
    gain = (z - fill[:, None]).astype(np.float32)
    n = window_lengths(q_route, config.seq_len)
    cumulative = np.r_[0.0, np.cumsum(fill)]
    base = cumulative[np.arange(1, len(n) + 1)] - cumulative[np.arange(1, len(n) + 1) - n]  # the window's fills
    db_first, db_last = segment_span(db_route)
    parts: list[SeqMatches] = []
    for start in range(0, len(q_desc), config.query_chunk):
        rows = np.arange(start, min(start + config.query_chunk, len(q_desc)))
        local, vel, end, vote = _votes(rows, n, hits, gain, config.offsets(), db_first, db_last)
        key = (local * n_db + end) * n_vel + vel
        order = np.argsort(key)
        key, vote = key[order], vote[order]
        first = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
        total = np.add.reduceat(vote.astype(np.float64), first) if len(first) else np.zeros(0)
        pair = key[first] // n_vel                                                # (local, end)
        pair_first = np.flatnonzero(np.r_[True, pair[1:] != pair[:-1]])
        best = np.maximum.reduceat(total, pair_first) if len(pair_first) else np.zeros(0)
        local_q, ends = pair[pair_first] // n_db, pair[pair_first] % n_db
        score = (base[rows][local_q] + best) / n[rows][local_q]
        parts.append(_top_k_sorted(local_q, ends, score, len(rows), k))
    return SeqMatches(index=np.concatenate([p.index for p in parts]) if parts else np.zeros((0, k), np.int64),
                      score=np.concatenate([p.score for p in parts]) if parts else np.zeros((0, k), np.float32))


def matches_recall(matches: SeqMatches, db_xyz: np.ndarray, q_xyz: np.ndarray, pos_threshold_m: float,
                   recall_at: tuple[int, ...] = (1, 5, 10)) -> dict[int, float]:
    """Recall@N of sequence matches by the suite's pair rule (positions within pos_threshold_m),
    scored by vprkit.retrieval.evaluation.score_retrieval as every ranking is."""
    return score_retrieval(matches.index, matches.score, db_xyz, q_xyz, pos_threshold_m, recall_at).recalls
