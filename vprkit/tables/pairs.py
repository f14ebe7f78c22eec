"""Which images show the same place: THE pair rule and the neighbour queries built on it.

pair_relations is the one rule shared by training batches, hard-negative mining and evaluation
(docs/DESIGN.md, "The pair rule"). Neighbour queries use spatial indexes (scikit-learn KD-trees),
never an N x N matrix over the data set. The split checks say before any work when a table or a
query split cannot give a meaningful result.
"""
from __future__ import annotations

import math
import os
import sys

import numpy as np
import pandas as pd

from vprkit.tables.benchmarks import utm_zone_keys
from vprkit.cli import VPRError
from vprkit.tables.places import LABEL_COLUMNS, PlaceTable


def check_same_coord_kind(database: PlaceTable, queries: PlaceTable) -> None:
    if (database.embeddings is None) != (queries.embeddings is None):
        raise VPRError(f"{queries.source} and {database.source}: one is an embeddings parquet, the other a poses CSV; "
                       "give both as parquet embeddings or both as images")
    if database.coord_kind != queries.coord_kind:
        raise VPRError(
            f"{queries.source} has {queries.coord_kind} positions but the database {database.source} has "
            f"{database.coord_kind} positions; give both CSVs the same kind (lat/lon or easting/northing)"
        )
    zones = utm_zone_keys(database), utm_zone_keys(queries)
    if all(zones) and zones[0] != zones[1]:
        raise VPRError(f"{queries.source} is in UTM zone {', '.join(sorted(zones[1]))} but {database.source} in "
                       f"{', '.join(sorted(zones[0]))}; UTM metres of different zones are not comparable: give both "
                       "tables one zone's images")


def check_query_split(database: PlaceTable, queries: PlaceTable, pos_threshold_m: float,
                      by_label: bool = False) -> None:
    """Queries comparable with the database, some of them with a positive in the database (by
    position, or label with by_label): otherwise recall is 0 whatever the descriptors (wrong
    CSV, area or columns)."""
    check_same_coord_kind(database, queries)
    labels = (database.labels, queries.labels) if by_label else (None, None)
    if not queries_with_positive(database.xyz, queries.xyz, pos_threshold_m, *labels).any():
        if by_label:
            raise VPRError(f"{queries.source}: no query has a positive (same place label) in {database.source}, so "
                           "recall would be 0 whatever the descriptors; check that both files label the same places")
        raise VPRError(
            f"{queries.source}: no query lies within --pos_threshold_m {pos_threshold_m:g} m of any image of "
            f"{database.source}, so recall would be 0 whatever the descriptors; check that both CSVs cover the "
            f"same area, or raise the threshold"
        )


def check_trainable(table: PlaceTable, pos_threshold_m: float, labels: np.ndarray | None = None,
                    neg_threshold_m: float | None = None) -> None:
    """Training batches are built from places (group_places: GPS cells, labels, or both) of two
    images or more, and contrasted with negatives: without a positive pair, or (given
    neg_threshold_m) without a negative pair by pair_relations, there is nothing to learn from
    (the loss is 0 every epoch). Cheap (linear, or a KD-tree: never N x N), so it runs before
    any extraction."""
    if len(table) < 2 or np.bincount(group_places(table.xyz, labels, pos_threshold_m)).max() < 2:
        if labels is not None:
            raise VPRError(f"{table.source}: no place label has two images"
                           f"{' within --pos_threshold_m' if table.xyz is not None else ''}, "
                           "so there are no positives to learn from; check the label column")
        raise VPRError(
            f"{table.source}: no place has two images within --pos_threshold_m {pos_threshold_m:g} m of each other, "
            f"so there are no positives to learn from; raise the threshold or check the positions"
        )
    if labels is not None:
        if len(np.unique(np.asarray(labels))) < 2:
            raise VPRError(f"{table.source}: every image has the place label '{np.asarray(labels)[0]}', "
                           f"so there are no negatives (images of another place) to learn from; "
                           f"label more than one place")
        # two labels: some pair is a negative (with positions too, unless every label is photographed from one spot)
        return
    if neg_threshold_m is not None and not has_pair_beyond(table.xyz, neg_threshold_m):
        raise VPRError(
            f"{table.source}: no two images lie more than --neg_threshold_m {neg_threshold_m:g} m apart, so there are "
            f"no negatives to learn from (the loss would be 0); check the positions (are all rows at one place, "
            f"e.g. x=0, y=0?) or lower --neg_threshold_m; for labelled images without positions "
            f"give only the label column"
        )


def has_pair_beyond(xyz: np.ndarray, radius_m: float) -> bool:
    """Whether some two points lie more than radius_m apart, in O(N log N) time and O(N) memory
    (never N x N): a point beyond radius_m of the first point answers at once; otherwise every
    point lies in one ball, and a KD-tree counts each point's neighbours within radius_m (whole
    nodes at a time): a pair beyond exists iff some point has fewer than N."""
    from sklearn.neighbors import KDTree

    if np.any(np.linalg.norm(xyz - xyz[0], axis=1) > radius_m):
        return True
    counts = KDTree(xyz).query_radius(xyz, r=radius_m, count_only=True)
    return bool(np.any(counts < len(xyz)))


def shared_images(first: PlaceTable, second: PlaceTable) -> list[str]:
    """The images (files, or a parquet's image ids) listed in both tables, in the second's order."""
    def key(path: str) -> str:
        return os.path.normpath(os.path.abspath(path)) if first.embeddings is None else path

    seen = {key(p) for p in first.paths}
    return [p for p in second.paths if key(p) in seen]


def warn_shared_images(first: PlaceTable, second: PlaceTable, what: str) -> int:
    """One warning line when `second` (validation or test queries) repeats images of `first`
    (the training set or the database): their recall is that of seeing the image again.
    Returns the count."""
    shared = shared_images(first, second)
    if shared:
        print(f"warning: {len(shared)} of the {len(second)} {what} images of {second.source} "
              f"are also in {first.source} (e.g. {shared[0]}): "
              f"their recall overstates how well new images of a place are found; use disjoint files",
              file=sys.stderr, flush=True)
    return len(shared)


def pair_relations(xyz_a: np.ndarray | None, xyz_b: np.ndarray | None, labels_a: np.ndarray | None,
                   labels_b: np.ndarray | None, pos_threshold_m: float,
                   neg_threshold_m: float) -> tuple[np.ndarray, np.ndarray]:
    """(positive, negative) for every pair (a, b) of two broadcastable sets: THE rule of which
    images show the same place, shared by batches, hard-negative mining and evaluation.

    Positions only: positive within pos_threshold_m, negative beyond neg_threshold_m, in
    between ignored (DESIGN.md §5). Place labels only: positive = same label, negative =
    different label. Both: positive = same label and within pos_threshold_m; negative =
    different label and beyond pos_threshold_m (a label is a place, so neighbouring buildings
    are negatives; two labels photographed from the same spot are ignored).
    """
    if labels_a is not None and labels_b is not None:
        same = np.asarray(labels_a) == np.asarray(labels_b)
        if xyz_a is None or xyz_b is None:
            return same, ~same
        dist = np.linalg.norm(np.asarray(xyz_a) - np.asarray(xyz_b), axis=-1)
        return same & (dist <= pos_threshold_m), ~same & (dist > pos_threshold_m)
    dist = np.linalg.norm(np.asarray(xyz_a) - np.asarray(xyz_b), axis=-1)
    return dist <= pos_threshold_m, dist > neg_threshold_m


def neighbours_within(ref_xyz: np.ndarray, query_xyz: np.ndarray, radius_m: float) -> list[np.ndarray]:
    """For each query, the reference indices within radius_m, nearest first (KD-tree)."""
    from sklearn.neighbors import NearestNeighbors

    index = NearestNeighbors(algorithm="kd_tree").fit(ref_xyz)
    _, found = index.radius_neighbors(query_xyz, radius=radius_m, sort_results=True)
    return list(found)


def nearest_distance_m(ref_xyz: np.ndarray, query_xyz: np.ndarray) -> np.ndarray:
    """Distance in metres from each query to its nearest reference point (KD-tree)."""
    return nearest_reference(ref_xyz, query_xyz)[0]


def nearest_reference(ref_xyz: np.ndarray, query_xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distance in metres, row) of each query's nearest reference point (KD-tree)."""
    from sklearn.neighbors import NearestNeighbors

    dist, index = NearestNeighbors(n_neighbors=1, algorithm="kd_tree").fit(ref_xyz).kneighbors(query_xyz)
    return dist[:, 0], index[:, 0]


def cluster_places(xyz: np.ndarray, radius_m: float) -> np.ndarray:
    """Group images into places: cubic cells of side radius_m / sqrt(3), so any two images of
    a place lie within radius_m of each other (all mutual positives). Linear time; labels are
    0..P-1 in order of first appearance."""
    side = radius_m / math.sqrt(3.0)
    best, best_grouped = None, -1
    # A grid can split a close pair along a cell edge; of two grids offset by half a cell, keep
    # the one that leaves more images in places of two or more.
    for offset in (0.0, 0.5):
        cell = np.floor(xyz / side + offset).astype(np.int64)
        _, first, inverse = np.unique(cell, axis=0, return_index=True, return_inverse=True)
        labels = np.argsort(np.argsort(first))[inverse.reshape(-1)]  # relabel by first appearance
        counts = np.bincount(labels)
        grouped = int(counts[counts >= 2].sum())
        if grouped > best_grouped:
            best, best_grouped = labels, grouped
    return best


def group_places(xyz: np.ndarray | None, labels: np.ndarray | None, radius_m: float) -> np.ndarray:
    """Place of each image for batching: its GPS cell (cluster_places), its label, or with both
    the (label, cell) pair, so that a place's images are mutual positives by pair_relations.
    Labels 0..P-1 in order of first appearance."""
    if labels is None:
        return cluster_places(xyz, radius_m)
    if xyz is None:
        return pd.factorize(np.asarray(labels))[0]
    return pd.MultiIndex.from_arrays([np.asarray(labels), cluster_places(xyz, radius_m)]).factorize()[0]


def queries_with_positive(db_xyz: np.ndarray | None, q_xyz: np.ndarray | None, pos_threshold_m: float,
                          db_labels: np.ndarray | None = None, q_labels: np.ndarray | None = None) -> np.ndarray:
    """Per query, whether the database holds a positive of it by pair_relations: an image
    within pos_threshold_m, of its label, or both (spatial index, no Q x N matrix)."""
    by_label = db_labels is not None and q_labels is not None
    if by_label and db_xyz is not None and q_xyz is not None:
        return np.array([np.any(np.asarray(db_labels)[near] == label)
                         for near, label in zip(neighbours_within(db_xyz, q_xyz, pos_threshold_m), q_labels)],
                        dtype=bool)
    if by_label:
        return np.isin(q_labels, db_labels)
    return nearest_distance_m(db_xyz, q_xyz) <= pos_threshold_m


def uses_labels(supervision: str, *tables: PlaceTable) -> bool:
    """Whether place labels decide positives (--supervision; auto: when every table has labels)."""
    have = all(t.labels is not None for t in tables)
    if supervision == "labels" and not have:
        missing = next(t.source for t in tables if t.labels is None)
        raise VPRError(f"--supervision labels: {missing} has no label column ({', '.join(LABEL_COLUMNS)})")
    if supervision == "gps" or not have:
        if any(t.xyz is None for t in tables):
            missing = next(t.source for t in tables if t.xyz is None)
            raise VPRError(f"{missing}: no positions, so GPS supervision is impossible; "
                           f"use --supervision auto or labels")
        return False
    return True


def positive_pairs(xyz: np.ndarray | None, labels: np.ndarray | None, pos_threshold_m: float,
                   max_pairs: int = 200_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Index arrays (i, j), i < j, of the positive pairs of one table by pair_relations
    (learned whitening's supervision). Memory stays bounded: candidates come from a KD-tree in
    chunks of rows (with positions) or from label groups (labels only), never an N x N matrix;
    when there are more than max_pairs, a seeded uniform sample of about max_pairs of them (labels
    only: exactly max_pairs; with positions each candidate within pos_threshold_m is kept with
    probability max_pairs / candidates, so with labels too somewhat fewer)."""
    rng = np.random.default_rng(seed)
    if xyz is not None and len(xyz) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if xyz is None:
        if labels is None:
            raise VPRError("positive pairs need positions or place labels")
        groups = pd.factorize(np.asarray(labels))[0]
        order = np.argsort(groups, kind="stable")
        members = np.split(order, np.cumsum(np.bincount(groups))[:-1]) if len(groups) else []
        sizes = np.array([len(m) * (len(m) - 1) // 2 for m in members], dtype=np.int64)
        if sizes.sum() <= max_pairs:
            pairs = [m[np.array(np.triu_indices(len(m), 1))] for m in members if len(m) > 1]
            if not pairs:
                return np.zeros(0, np.int64), np.zeros(0, np.int64)
            first, second = np.concatenate(pairs, axis=1).astype(np.int64)
            return first, second
        group = rng.choice(len(members), max_pairs, p=sizes / sizes.sum())  # a pair uniformly among all pairs
        first, second = np.empty(max_pairs, np.int64), np.empty(max_pairs, np.int64)
        for g in np.unique(group):
            rows = np.flatnonzero(group == g)
            picks = np.array([rng.choice(members[g], 2, replace=False) for _ in rows])
            first[rows], second[rows] = picks.min(axis=1), picks.max(axis=1)
        return first, second
    from sklearn.neighbors import KDTree

    tree = KDTree(xyz)
    total = int((tree.query_radius(xyz, r=pos_threshold_m, count_only=True) - 1).sum()) // 2  # candidate pairs i < j
    keep = min(1.0, max_pairs / max(total, 1))
    firsts, seconds = [], []
    for start in range(0, len(xyz), 4096):
        found = tree.query_radius(xyz[start:start + 4096], r=pos_threshold_m)
        first = np.concatenate([np.full(len(f), start + n, np.int64) for n, f in enumerate(found)])
        second = np.concatenate(found).astype(np.int64)
        mask = second > first
        if keep < 1.0:
            mask &= rng.random(len(first)) < keep
        first, second = first[mask], second[mask]
        lab = None if labels is None else np.asarray(labels)
        positive, _ = pair_relations(xyz[first], xyz[second], None if lab is None else lab[first],
                                     None if lab is None else lab[second], pos_threshold_m, pos_threshold_m)
        firsts.append(first[positive])
        seconds.append(second[positive])
    return np.concatenate(firsts)[:max_pairs], np.concatenate(seconds)[:max_pairs]
