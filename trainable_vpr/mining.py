"""GPS and label mining over the data set: spatial indexes only, never an N x N matrix."""
from __future__ import annotations

import collections
from typing import Callable

import numpy as np
from vprkit.cli import VPRError
from vprkit.tables.pairs import pair_relations


def mine_hard_negatives(embeddings: np.ndarray, xyz: np.ndarray | None, neg_threshold_m: float, k: int = 10,
                        labels: np.ndarray | None = None, pos_threshold_m: float = 25.0,
                        chunk: int = 512, max_search_k: int = 512) -> np.ndarray:
    """Per image, the k most similar images (inner product of normalised embeddings) that are
    its negatives by pair_relations (beyond neg_threshold_m, or of another label): far in
    metres or place, near in embedding space. N x k, most similar first (ties: lower index),
    -1 where fewer exist.

    faiss searches a growing candidate list for anchors in chunks of `chunk`; only candidates'
    relations are computed. Anchors still short of k negatives at `max_search_k` candidates
    (most images near them: a campus, a courtyard) are scored against the whole data set in
    blocks instead. Memory stays O(chunk x max_search_k + 2^18), never N x N.
    """
    import faiss

    n = len(embeddings)
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    if xyz is not None and n:
        xyz = np.asarray(xyz, dtype=np.float64)
        xyz = xyz - xyz.mean(axis=0)  # centred: metre-exact differences
    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(emb)

    def negatives(anchors: np.ndarray, others: np.ndarray) -> np.ndarray:
        take = lambda a, idx: None if a is None else a[idx]  # noqa: E731
        return pair_relations(take(xyz, anchors[:, None]), take(xyz, others), take(labels, anchors[:, None]),
                              take(labels, others), pos_threshold_m, neg_threshold_m)[1]

    result = np.full((n, k), -1, dtype=np.int64)
    for start in range(0, n, chunk):
        todo = np.arange(start, min(n, start + chunk))
        search_k = min(n, 4 * k + 16, max_search_k)
        while todo.size:
            scores, cand = index.search(emb[todo], search_k)
            cand = np.take_along_axis(cand, np.lexsort((cand, -scores), axis=1), axis=1)  # ties: lower index first
            far = negatives(todo, cand.clip(0)) & (cand >= 0)
            done = (far.sum(1) >= k) | (search_k >= n)
            for row in np.flatnonzero(done):
                picks = cand[row][far[row]][:k]
                result[todo[row], : len(picks)] = picks
            todo = todo[~done]
            if search_k >= min(n, max_search_k):
                break
            search_k = min(n, search_k * 4, max_search_k)
        if todo.size:
            result[todo] = _hard_negatives_by_blocks(emb, todo, negatives, k)
    return result


def _hard_negatives_by_blocks(emb: np.ndarray, anchors: np.ndarray,
                              negatives: Callable[[np.ndarray, np.ndarray], np.ndarray], k: int,
                              cells: int = 1 << 18) -> np.ndarray:
    """Exact top-k negatives of `anchors`, scanning the data set in blocks of about `cells`
    (anchor, image) pairs at a time and keeping a running top-k; ties go to the lower index."""
    block = max(64, cells // max(len(anchors), 1))
    best_sim = np.full((len(anchors), k), -np.inf, dtype=np.float32)
    best_idx = np.full((len(anchors), k), -1, dtype=np.int64)
    for b0 in range(0, len(emb), block):
        ids = np.arange(b0, min(len(emb), b0 + block))
        sim = emb[anchors] @ emb[ids].T
        sim[~negatives(anchors, np.broadcast_to(ids, sim.shape))] = -np.inf
        all_sim = np.concatenate([best_sim, sim], axis=1)
        all_idx = np.concatenate([best_idx, np.broadcast_to(ids, sim.shape)], axis=1)
        # sort by similarity descending, then index ascending (-1 placeholders sort as -inf)
        order = np.lexsort((np.where(all_idx < 0, np.iinfo(np.int64).max, all_idx), -all_sim), axis=1)[:, :k]
        best_sim = np.take_along_axis(all_sim, order, axis=1)
        best_idx = np.take_along_axis(all_idx, order, axis=1)
    best_idx[~np.isfinite(best_sim)] = -1
    return best_idx


def hard_negative_places(place_of: np.ndarray, hard_negatives: np.ndarray, top: int = 8) -> list[np.ndarray]:
    """For each place, the places its images' hard negatives belong to, most frequent first."""
    result = []
    members_of = _members_by_place(place_of)
    for members in members_of:
        negs = hard_negatives[members].ravel()
        negs = negs[negs >= 0]
        if negs.size == 0:
            result.append(np.zeros(0, dtype=np.int64))
            continue
        places, counts = np.unique(place_of[negs], return_counts=True)
        result.append(places[np.argsort(-counts, kind="stable")][:top])
    return result


def _members_by_place(place_of: np.ndarray) -> list[np.ndarray]:
    order = np.argsort(place_of, kind="stable")
    bounds = np.flatnonzero(np.diff(place_of[order])) + 1
    return np.split(order, bounds)


def make_place_batches(
    place_of: np.ndarray, batch_size: int, images_per_place: int, num_batches: int, rng: np.random.Generator,
    hard_places: list[np.ndarray] | None = None, hard_neg_ratio: float = 0.0,
) -> list[np.ndarray]:
    """Batches of several images from each of several places, so every anchor has in-batch
    positives. Each batch starts from the next place of a shuffled queue of places with >= 2
    images; further places are, with probability hard_neg_ratio, a hard-negative place of one
    already in the batch (from hard_places), else the next place of the queue."""
    members_of = _members_by_place(place_of)
    eligible = np.array([p for p, m in enumerate(members_of) if len(m) >= 2])
    if eligible.size == 0:
        raise VPRError("no place has two images within --pos_threshold_m: nothing to learn from; raise the threshold "
                       "or check the positions")
    places_per_batch = max(2, batch_size // images_per_place)
    queue: collections.deque[int] = collections.deque()  # popped at the front: O(1), unlike a list

    def next_place(exclude: set[int]) -> int | None:
        for _ in range(2):
            if not queue:
                queue.extend(rng.permutation(eligible).tolist())
            for i, p in enumerate(queue):
                if p not in exclude:
                    del queue[i]  # i is almost always 0
                    return p
            queue.clear()
        return None

    batches = []
    for _ in range(num_batches):
        chosen: list[int] = []
        while len(chosen) < places_per_batch:
            candidate = None
            if chosen and hard_places is not None and rng.random() < hard_neg_ratio:
                pool = [q for c in chosen for q in hard_places[c][:3] if q not in chosen]
                candidate = int(pool[rng.integers(len(pool))]) if pool else None
            if candidate is None:
                candidate = next_place(set(chosen))
            if candidate is None:
                break
            chosen.append(candidate)
        parts = [rng.choice(members_of[c], size=min(images_per_place, len(members_of[c])), replace=False)
                 for c in chosen]
        batch = np.concatenate(parts)
        if len(batch) >= 2:
            batches.append(batch)
    return batches
