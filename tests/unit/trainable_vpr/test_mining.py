"""Geometry (metric positions from lat/lon) and GPS mining (DESIGN.md §2, §5), each checked
against a brute-force reference on random data."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import trainable_vpr as vpr
from helpers import haversine_m
from vprkit.cli import VPRError
from vprkit.tables.pairs import cluster_places, nearest_distance_m, neighbours_within
from vprkit.tables.places import EARTH_RADIUS_M, latlon_to_xyz, metric_to_xyz
from trainable_vpr.miners import batch_triplets


def _chord(lat1, lon1, lat2, lon2) -> float:
    a, b = latlon_to_xyz(np.array([lat1, lat2]), np.array([lon1, lon2]))
    return float(np.linalg.norm(a - b))


def _brute_dist(xyz: np.ndarray) -> np.ndarray:
    return np.linalg.norm(xyz[:, None, :] - xyz[None, :, :], axis=2)


# --------------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------------
def test_haversine_one_degree_of_latitude():
    assert haversine_m(0.0, 0.0, 1.0, 0.0) == pytest.approx(111_195.0, abs=5.0)
    assert haversine_m(45.0, 7.0, 46.0, 7.0) == pytest.approx(111_195.0, abs=5.0)
    # one degree of longitude shrinks with cos(latitude)
    assert haversine_m(60.0, 0.0, 60.0, 1.0) == pytest.approx(111_195.0 * 0.5, rel=2e-3)


def test_chord_equals_great_circle_at_one_degree():
    # the chord is shorter than the arc by R*theta^3/24, about 1.4 m for one degree
    chord = _chord(0.0, 0.0, 1.0, 0.0)
    assert chord == pytest.approx(haversine_m(0.0, 0.0, 1.0, 0.0) - 1.41, abs=0.05)


@pytest.mark.parametrize("lat, lon", [(31.2619, 34.8011), (-33.87, 151.21), (64.1, -21.9), (0.0, 0.0), (89.9, 45.0)])
def test_chord_matches_haversine_at_vpr_scale(lat, lon):
    rng = np.random.default_rng(int(abs(lat * 1000)))
    for _ in range(20):
        dlat, dlon = rng.uniform(-0.01, 0.01, size=2)  # up to ~1.5 km
        ref = haversine_m(lat, lon, lat + dlat, lon + dlon)
        assert _chord(lat, lon, lat + dlat, lon + dlon) == pytest.approx(ref, abs=1e-3)


def test_two_points_25_m_apart():
    lat, lon = 31.26196648, 34.80118454
    dlat = math.degrees(25.0 / EARTH_RADIUS_M)  # 25 m due north
    assert haversine_m(lat, lon, lat + dlat, lon) == pytest.approx(25.0, abs=1e-6)
    assert _chord(lat, lon, lat + dlat, lon) == pytest.approx(25.0, abs=1e-3)
    dlon = dlat / math.cos(math.radians(lat))  # about 25 m due east
    assert _chord(lat, lon, lat, lon + dlon) == pytest.approx(25.0, abs=0.01)


def test_antimeridian_is_close_not_across_the_planet():
    d = _chord(0.0, 179.9999, 0.0, -179.9999)
    assert d == pytest.approx(22.24, abs=0.05)
    assert d == pytest.approx(haversine_m(0.0, 179.9999, 0.0, -179.9999), abs=1e-3)
    # also away from the equator, and lon 180 is lon -180
    assert _chord(-16.5, 179.99995, -16.5, -179.99995) == pytest.approx(
        haversine_m(-16.5, 179.99995, -16.5, -179.99995), abs=1e-3)
    assert _chord(10.0, 180.0, 10.0, -180.0) == pytest.approx(0.0, abs=1e-6)


def test_latlon_to_xyz_shape_and_radius():
    xyz = latlon_to_xyz(np.array([0.0, 90.0, -45.0]), np.array([0.0, 0.0, 90.0]))
    assert xyz.shape == (3, 3) and xyz.dtype == np.float64
    np.testing.assert_allclose(np.linalg.norm(xyz, axis=1), EARTH_RADIUS_M)
    np.testing.assert_allclose(xyz[0], [EARTH_RADIUS_M, 0, 0], atol=1e-6)
    np.testing.assert_allclose(xyz[1], [0, 0, EARTH_RADIUS_M], atol=1e-6)


def test_metric_to_xyz():
    xyz = metric_to_xyz(np.array([500000.0, 500003.0]), np.array([5000000.0, 5000004.0]))
    assert xyz.shape == (2, 3) and xyz.dtype == np.float64
    np.testing.assert_array_equal(xyz[:, 2], 0.0)
    assert np.linalg.norm(xyz[1] - xyz[0]) == pytest.approx(5.0)
    # integer input is not truncated or overflowed
    np.testing.assert_array_equal(metric_to_xyz(np.array([1, 2]), np.array([3, 4]))[:, :2], [[1, 3], [2, 4]])


# --------------------------------------------------------------------------------------------
# neighbours and pair masks
# --------------------------------------------------------------------------------------------
def test_neighbours_within_matches_brute_force():
    rng = np.random.default_rng(0)
    ref = metric_to_xyz(*rng.uniform(0, 300, size=(2, 400)))
    query = metric_to_xyz(*rng.uniform(-20, 320, size=(2, 60)))
    found = neighbours_within(ref, query, 25.0)
    assert len(found) == 60
    dist = np.linalg.norm(query[:, None, :] - ref[None, :, :], axis=2)
    total = 0
    for q, idx in enumerate(found):
        expected = np.flatnonzero(dist[q] <= 25.0)
        assert sorted(idx.tolist()) == sorted(expected.tolist())
        assert np.all(np.diff(dist[q, idx]) >= 0), "not sorted nearest first"
        total += len(idx)
    assert total > 100  # the test really exercises neighbours


def test_neighbours_within_latlon_city_scale():
    rng = np.random.default_rng(1)
    lat = 31.2619 + rng.uniform(-0.002, 0.002, 200)
    lon = 34.8011 + rng.uniform(-0.002, 0.002, 200)
    xyz = latlon_to_xyz(lat, lon)
    found = neighbours_within(xyz, xyz[:10], 25.0)
    for q in range(10):
        expected = {j for j in range(200) if haversine_m(lat[q], lon[q], lat[j], lon[j]) <= 25.0}
        assert set(found[q].tolist()) == expected
        assert found[q][0] == q  # itself, at 0 m, first


def test_nearest_distance_m():
    rng = np.random.default_rng(2)
    ref = metric_to_xyz(*rng.uniform(0, 100, size=(2, 50)))
    query = metric_to_xyz(*rng.uniform(0, 100, size=(2, 20)))
    expected = np.linalg.norm(query[:, None] - ref[None], axis=2).min(1)
    np.testing.assert_allclose(nearest_distance_m(ref, query), expected, rtol=1e-9)


@pytest.mark.parametrize("kind", ["metric", "latlon"])
def test_batch_pair_masks_match_brute_force(kind):
    rng = np.random.default_rng(3)
    n = 48  # above torch.cdist's threshold for its matrix-product path
    if kind == "metric":
        xyz = metric_to_xyz(*rng.uniform(0, 200, size=(2, n)))
    else:
        xyz = latlon_to_xyz(31.26 + rng.uniform(0, 0.002, n), 34.80 + rng.uniform(0, 0.002, n))
    dist = _brute_dist(xyz)
    pos, neg = vpr.batch_pair_masks(torch.from_numpy(xyz), 25.0, 100.0)
    pos, neg = pos.numpy(), neg.numpy()
    eye = np.eye(n, dtype=bool)
    np.testing.assert_array_equal(pos, (dist <= 25.0) & ~eye)
    np.testing.assert_array_equal(neg, dist > 100.0)
    assert not (pos & neg).any()
    assert not pos[eye].any() and not neg[eye].any()
    ignore = (dist > 25.0) & (dist <= 100.0)
    assert ignore.any() and pos.any() and neg.any()
    assert not (pos | neg)[ignore].any()
    np.testing.assert_array_equal(pos, pos.T)
    np.testing.assert_array_equal(neg, neg.T)


def test_batch_pair_masks_boundaries_and_same_position():
    xyz = torch.tensor([[0.0, 0, 0], [0.0, 0, 0], [25.0, 0, 0], [100.0, 0, 0], [100.5, 0, 0]], dtype=torch.float64)
    pos, neg = vpr.batch_pair_masks(xyz, 25.0, 100.0)
    assert pos[0, 1] and pos[1, 0]          # two images at the same spot are positives
    assert pos[0, 2]                         # exactly at pos_threshold_m: positive
    assert not pos[0, 3] and not neg[0, 3]   # exactly at neg_threshold_m: ignored
    assert neg[0, 4] and neg[4, 1]           # beyond: negative
    assert not pos[0, 0]


# --------------------------------------------------------------------------------------------
# places
# --------------------------------------------------------------------------------------------
def test_cluster_places_members_are_mutual_positives():
    rng = np.random.default_rng(4)
    xyz = metric_to_xyz(*rng.uniform(0, 150, size=(2, 600)))
    labels = cluster_places(xyz, 25.0)
    assert labels.shape == (600,)
    assert labels.min() == 0 and set(labels.tolist()) == set(range(labels.max() + 1))
    dist = _brute_dist(xyz)
    same = labels[:, None] == labels[None, :]
    assert dist[same].max() <= 25.0
    assert np.bincount(labels).max() >= 3  # real groups, not all singletons


def test_cluster_places_members_within_radius_in_3d():
    """Positions are 3-D (Earth-centred for lat/lon): the bound must hold in three dimensions."""
    rng = np.random.default_rng(12)
    xyz = rng.uniform(0, 60, size=(1500, 3))
    labels = cluster_places(xyz, 25.0)
    dist = _brute_dist(xyz)
    assert dist[labels[:, None] == labels[None, :]].max() <= 25.0


def test_cluster_places_latlon_members_within_radius():
    rng = np.random.default_rng(5)
    lat, lon = 31.26 + rng.uniform(0, 0.001, 300), 34.80 + rng.uniform(0, 0.001, 300)
    labels = cluster_places(latlon_to_xyz(lat, lon), 25.0)
    for p in np.unique(labels):
        m = np.flatnonzero(labels == p)
        for i in m:
            for j in m:
                assert haversine_m(lat[i], lon[i], lat[j], lon[j]) <= 25.0 + 1e-6


def test_cluster_places_labels_deterministic_first_appearance():
    rng = np.random.default_rng(6)
    xyz = metric_to_xyz(*rng.uniform(0, 500, size=(2, 200)))
    a = cluster_places(xyz, 25.0)
    b = cluster_places(xyz.copy(), 25.0)
    np.testing.assert_array_equal(a, b)
    firsts = [int(np.flatnonzero(a == p)[0]) for p in range(a.max() + 1)]
    assert firsts == sorted(firsts)  # labels numbered in order of first appearance
    assert a[0] == 0


def test_cluster_places_groups_identical_positions():
    xyz = metric_to_xyz(np.array([5.0, 500.0, 5.0, 500.0, 5.0]), np.array([5.0, 5.0, 5.0, 5.0, 5.0]))
    np.testing.assert_array_equal(cluster_places(xyz, 25.0), [0, 1, 0, 1, 0])


# --------------------------------------------------------------------------------------------
# hard negatives
# --------------------------------------------------------------------------------------------
def _normalised(rng, n, d):
    e = rng.normal(size=(n, d)).astype(np.float32)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


@pytest.mark.parametrize("n, d, k", [(300, 16, 10), (120, 4, 5)])
def test_mine_hard_negatives_matches_brute_force(n, d, k):
    rng = np.random.default_rng(n)
    emb = _normalised(rng, n, d)
    xyz = metric_to_xyz(*rng.uniform(0, 400, size=(2, n)))
    hard = vpr.mine_hard_negatives(emb, xyz, 100.0, k=k)
    assert hard.shape == (n, k) and hard.dtype.kind == "i"
    dist = _brute_dist(xyz)
    sim = emb @ emb.T
    for i in range(n):
        far = np.flatnonzero(dist[i] > 100.0)
        expected = far[np.argsort(-sim[i, far], kind="stable")][:k]
        got = hard[i][hard[i] >= 0]
        assert np.all(dist[i, got] > 100.0)
        assert got.tolist() == expected.tolist(), f"row {i}"


@pytest.mark.parametrize("chunk, max_search_k", [(7, 8), (64, 32), (1000, 1)])
def test_mine_hard_negatives_block_fallback_matches_brute_force(chunk, max_search_k):
    """Small candidate lists force the block scan for most anchors: same answer, ties by index."""
    rng = np.random.default_rng(11)
    n, k = 200, 6
    emb = _normalised(rng, n, 4)
    emb[50] = emb[60]  # an exact tie: the lower index comes first
    xyz = metric_to_xyz(*rng.uniform(0, 250, size=(2, n)))
    hard = vpr.mine_hard_negatives(emb, xyz, 100.0, k=k, chunk=chunk, max_search_k=max_search_k)
    dist, sim = _brute_dist(xyz), emb @ emb.T
    for i in range(n):
        far = np.flatnonzero(dist[i] > 100.0)
        expected = far[np.lexsort((far, -sim[i, far]))][:k]
        assert hard[i][hard[i] >= 0].tolist() == expected.tolist(), f"row {i}"
        assert (hard[i][len(expected):] == -1).all()


def test_mine_hard_negatives_far_candidates_are_not_the_most_similar_overall():
    """The most similar images are all near: the miner must look past them."""
    rng = np.random.default_rng(7)
    n_near, n_far = 60, 5
    base = _normalised(rng, 1, 8)[0]
    near = base + 0.01 * rng.normal(size=(n_near, 8))
    far = rng.normal(size=(n_far, 8))
    emb = np.concatenate([near, far]).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    xyz = metric_to_xyz(np.r_[np.zeros(n_near), np.full(n_far, 1000.0)], np.zeros(n_near + n_far))
    hard = vpr.mine_hard_negatives(emb, xyz, 100.0, k=3)
    sim = emb[0] @ emb[n_near:].T
    assert hard[0].tolist() == (n_near + np.argsort(-sim)[:3]).tolist()


def test_mine_hard_negatives_pads_with_minus_one():
    rng = np.random.default_rng(8)
    emb = _normalised(rng, 6, 4)
    # images 0-3 together, 4 and 5 far away (from the group and from each other)
    xyz = metric_to_xyz(np.array([0.0, 1, 2, 3, 500, 1000]), np.zeros(6))
    hard = vpr.mine_hard_negatives(emb, xyz, 100.0, k=4)
    for i in range(4):
        assert sorted(hard[i][:2].tolist()) == [4, 5] and hard[i][2:].tolist() == [-1, -1]
    assert set(hard[4].tolist()) < {0, 1, 2, 3, 5} and len(set(hard[4].tolist())) == 4  # 5 far, k = 4
    # no far image at all: every slot is -1
    assert (vpr.mine_hard_negatives(emb[:4], xyz[:4], 100.0, k=3) == -1).all()


def test_hard_negative_places_most_frequent_first():
    place_of = np.array([0, 0, 1, 1, 2, 2])
    hard = np.array([[2, 4, -1], [4, 5, 2], [0, 0, 0], [4, -1, -1], [-1, -1, -1], [-1, -1, -1]])
    result = vpr.hard_negative_places(place_of, hard)
    assert result[0].tolist() == [2, 1]  # place 2 (images 4, 4, 5) three times, place 1 twice
    assert result[1].tolist() == [0, 2]
    assert result[2].tolist() == []


# --------------------------------------------------------------------------------------------
# batches of places
# --------------------------------------------------------------------------------------------
def _places(n_places=12, rng_seed=9):
    rng = np.random.default_rng(rng_seed)
    sizes = rng.integers(1, 7, size=n_places)
    sizes[:3] = [1, 2, 6]
    place_of = np.repeat(np.arange(n_places), sizes)
    return place_of[rng.permutation(len(place_of))]


def _chosen_places(place_of, batch):
    """Places of a batch in the order they were added (parts are concatenated place by place)."""
    seen = []
    for p in place_of[batch]:
        if not seen or seen[-1] != p:
            seen.append(int(p))
    return seen


def test_make_place_batches_structure():
    place_of = _places()
    counts = np.bincount(place_of)
    batches = vpr.make_place_batches(place_of, 8, 4, 50, np.random.default_rng(0))
    assert len(batches) == 50
    for batch in batches:
        assert 2 <= len(batch) <= 8
        assert len(set(batch.tolist())) == len(batch), "duplicate image in a batch"
        chosen = _chosen_places(place_of, batch)
        assert len(chosen) == len(set(chosen)), "a place is split in a batch"
        first = chosen[0]
        assert counts[first] >= 2
        assert (place_of[batch] == first).sum() == min(4, counts[first]) >= 2
        assert len(chosen) == 2
    # places with a single image never start a batch; every eligible place does at some point
    starters = {_chosen_places(place_of, b)[0] for b in batches}
    assert starters == set(np.flatnonzero(counts >= 2).tolist())


def test_make_place_batches_deterministic_with_seed():
    place_of = _places()
    a = vpr.make_place_batches(place_of, 12, 3, 20, np.random.default_rng(5))
    b = vpr.make_place_batches(place_of, 12, 3, 20, np.random.default_rng(5))
    c = vpr.make_place_batches(place_of, 12, 3, 20, np.random.default_rng(6))
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_make_place_batches_hard_ratio_one_draws_hard_places():
    place_of = _places(n_places=20, rng_seed=10)
    n_places = place_of.max() + 1
    # each place's hard negatives: a fixed, unusual pattern (p+7, p+11, p+13 mod P)
    hard_places = [np.array([(p + 7) % n_places, (p + 11) % n_places, (p + 13) % n_places, (p + 1) % n_places])
                   for p in range(n_places)]
    batches = vpr.make_place_batches(place_of, 16, 4, 40, np.random.default_rng(1), hard_places, hard_neg_ratio=1.0)
    for batch in batches:
        chosen = _chosen_places(place_of, batch)
        assert len(chosen) == 4
        for i, p in enumerate(chosen[1:], start=1):
            allowed = {int(q) for c in chosen[:i] for q in hard_places[c][:3]}
            assert p in allowed, f"place {p} is not a hard place of {chosen[:i]}"


def test_make_place_batches_hard_ratio_zero_ignores_hard_places():
    place_of = _places(n_places=20, rng_seed=10)
    n_places = place_of.max() + 1
    hard_places = [np.array([(p + 7) % n_places]) for p in range(n_places)]
    batches = vpr.make_place_batches(place_of, 16, 4, 40, np.random.default_rng(1), hard_places, hard_neg_ratio=0.0)
    followers = [(c[0], c[1]) for c in (_chosen_places(place_of, b) for b in batches)]
    assert sum(q == (p + 7) % n_places for p, q in followers) < len(followers) / 2


def test_make_place_batches_no_eligible_place():
    with pytest.raises(VPRError, match="pos_threshold_m"):
        vpr.make_place_batches(np.arange(10), 8, 4, 3, np.random.default_rng(0))


# --------------------------------------------------------------------------------------------
# in-batch triplets
# --------------------------------------------------------------------------------------------
def _triplet_case(seed=11):
    rng = np.random.default_rng(seed)
    # 4 places x 3 images; places 0/1 are 60 m apart (ignore zone), the rest far
    centres = np.array([[0.0, 0], [60, 0], [500, 0], [1000, 0]])
    xyz = np.repeat(centres, 3, axis=0) + rng.uniform(-2, 2, size=(12, 2))
    xyz = torch.from_numpy(metric_to_xyz(xyz[:, 0], xyz[:, 1]))
    pos, neg = vpr.batch_pair_masks(xyz, 25.0, 100.0)
    emb = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(12, 8))).float(), dim=1)
    return emb @ emb.T, pos, neg


def test_batch_triplets_one_per_positive_pair():
    sim, pos, neg = _triplet_case()
    a, p, n = batch_triplets(sim, pos, neg, 0.5, torch.Generator().manual_seed(0))
    assert sorted(zip(a.tolist(), p.tolist())) == sorted(map(tuple, torch.nonzero(pos).tolist()))
    assert pos[a, p].all() and neg[a, n].all()


def test_batch_triplets_hard_ratio_one_picks_most_similar_negative():
    sim, pos, neg = _triplet_case()
    a, p, n = batch_triplets(sim, pos, neg, 1.0, torch.Generator().manual_seed(0))
    for ai, ni in zip(a.tolist(), n.tolist()):
        candidates = torch.nonzero(neg[ai]).flatten()
        assert ni == int(candidates[sim[ai, candidates].argmax()])


def test_batch_triplets_hard_ratio_zero_random_valid_negatives():
    sim, pos, neg = _triplet_case()
    hardest = sim.masked_fill(~neg, float("-inf")).argmax(1)
    chosen: dict[int, set[int]] = {}
    generator = torch.Generator().manual_seed(0)
    for _ in range(30):
        a, p, n = batch_triplets(sim, pos, neg, 0.0, generator)
        assert neg[a, n].all(), "a random negative is a positive or in the ignore zone"
        assert not pos[a, n].any()
        for ai, ni in zip(a.tolist(), n.tolist()):
            chosen.setdefault(ai, set()).add(ni)
    # anchors of places 0/1 have 6 valid negatives: random picks spread over them
    assert all(len(v) >= 3 for v in chosen.values())
    assert any(any(x != int(hardest[ai]) for x in v) for ai, v in chosen.items())


def test_batch_triplets_skips_anchors_without_negatives():
    xyz = torch.tensor([[0.0, 0, 0], [1.0, 0, 0], [50.0, 0, 0], [51.0, 0, 0]], dtype=torch.float64)
    pos, neg = vpr.batch_pair_masks(xyz, 25.0, 100.0)  # two places in each other's ignore zone
    a, p, n = batch_triplets(torch.eye(4), pos, neg, 0.5, torch.Generator().manual_seed(0))
    assert a.numel() == p.numel() == n.numel() == 0
