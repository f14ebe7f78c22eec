"""Sequence matching on hand-made similarity matrices: the path it finds, the row z-score, drive
starts, database segments, and the shortlisted matcher against the full-matrix reference."""
from __future__ import annotations

import numpy as np
import pytest

from vprkit.routes.matching import (RowContrast, SeqMatchConfig, SeqMatches, exact_sequence_scores, match_scores,
                                    matches_recall, sequence_match)
from vprkit.routes.order import Route


def route(*segment_lengths: int) -> Route:
    drive = np.repeat(np.arange(len(segment_lengths)), segment_lengths)
    return Route(drive=drive, key=np.arange(len(drive), dtype=float), unit="frame",
                 drive_names=tuple(f"d{i}" for i in range(len(segment_lengths))))


def from_similarity(sim: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(queries, database) unit descriptors whose cosine matrix is exactly `sim` (rows of norm <= 1):
    database frames are one-hot, each query carries the rest of its norm on a spare axis."""
    n_q, n_db = sim.shape
    rest = np.sqrt(np.maximum(0.0, 1.0 - (sim ** 2).sum(axis=1, keepdims=True)))
    return (np.hstack([sim, rest]).astype(np.float32),
            np.hstack([np.eye(n_db), np.zeros((n_db, 1))]).astype(np.float32))


def path_with_distractors(n_q: int, n_db: int, true_row, seed: int = 0) -> np.ndarray:
    """Each query frame is 0.3 like its true database frame and 0.5 like a random other one (so a
    single frame is always fooled), small noise elsewhere."""
    rng = np.random.default_rng(seed)
    sim = rng.uniform(0.0, 0.05, (n_q, n_db))
    for i in range(n_q):
        sim[i, true_row(i)] = 0.3
        sim[i, rng.choice([j for j in range(n_db) if abs(j - true_row(i)) > 3])] = 0.5
    return sim / np.sqrt(2.0)


def test_a_diagonal_path_is_found_at_velocity_one_where_single_frames_fail():
    sim = path_with_distractors(30, 60, lambda i: i + 10)
    q, db = from_similarity(sim)
    single = sequence_match(q, route(30), db, route(60), SeqMatchConfig(seq_len=1), k=1)
    assert (single.index[:, 0] == np.arange(30) + 10).mean() == 0.0
    found = sequence_match(q, route(30), db, route(60), SeqMatchConfig(seq_len=5, shortlist=5), k=1)
    assert np.array_equal(found.index[4:, 0], np.arange(4, 30) + 10)  # every query with a full window


def test_a_path_at_velocity_two_needs_that_velocity():
    sim = path_with_distractors(25, 60, lambda i: 2 * i + 5, seed=1)
    q, db = from_similarity(sim)
    truth = 2 * np.arange(25) + 5
    fast = sequence_match(q, route(25), db, route(60), SeqMatchConfig(6, v_min=1.0, v_max=2.0, n_velocities=3), k=1)
    slow = sequence_match(q, route(25), db, route(60), SeqMatchConfig(6, v_min=0.8, v_max=1.25), k=1)
    assert np.array_equal(fast.index[5:, 0], truth[5:])
    assert (slow.index[5:, 0] == truth[5:]).mean() < 0.5


def test_the_row_z_score_keeps_one_high_contrast_frame_from_outvoting_the_window():
    # Window of 2: frame 0 has flat similarities (std small) and prefers the true line's row 10 by
    # 0.05; frame 1 has a wide spread and prefers the wrong end row 31 over the true 11 by 0.2.
    # Raw cosine sums pick 31; z-scored sums pick 11.
    rng = np.random.default_rng(3)
    sim = np.zeros((2, 40))
    sim[0] = 0.20 + rng.normal(0, 0.005, 40)
    sim[0, 10], sim[0, 30] = 0.25, 0.20
    sim[1] = rng.uniform(0.0, 0.6, 40)
    sim[1, 11], sim[1, 31] = 0.45, 0.65
    q, db = from_similarity(sim)
    config = SeqMatchConfig(seq_len=2, v_min=1.0, v_max=1.0)
    assert sim[0, 30] + sim[1, 31] > sim[0, 10] + sim[1, 11]
    scores = exact_sequence_scores(q, route(2), db, route(40), config)
    assert scores[1, 11] > scores[1, 31]
    assert sequence_match(q, route(2), db, route(40), config, k=1).index[1, 0] == 11


def test_a_query_at_a_drive_start_scores_its_own_frame_only():
    rng = np.random.default_rng(4)
    q, db = (rng.normal(size=(n, 8)).astype(np.float32) for n in (6, 20))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    scores = exact_sequence_scores(q, route(3, 3), db, route(20), SeqMatchConfig(seq_len=4))
    sims = q.astype(np.float64) @ db.T.astype(np.float64)
    z = (sims - sims.mean(axis=1, keepdims=True)) / sims.std(axis=1, keepdims=True)
    for start in (0, 3):  # each query drive's first frame: a window of one frame
        assert scores[start] == pytest.approx(z[start], abs=1e-5)
    # The second frame of a drive: the mean over the two frames it has, at the best velocity.
    assert scores[4, 7] == pytest.approx((z[3, 6] + z[4, 7]) / 2, abs=1e-5)  # every velocity steps back 1 row


def test_lines_never_cross_database_segments():
    # Database segments rows 0-9 and 10-19. Query frames match rows 8, 9 then 10, 11: the line
    # ending at 11 may not step back into rows 8, 9 (another segment); it clamps at row 10.
    sim = np.full((4, 20), 0.01)
    for i, j in enumerate((8, 9, 10, 11)):
        sim[i, j] = 0.9
    q, db = from_similarity(sim / 1.5)
    config = SeqMatchConfig(seq_len=4, v_min=1.0, v_max=1.0)
    one = exact_sequence_scores(q, route(4), db, route(20), config)
    two = exact_sequence_scores(q, route(4), db, route(10, 10), config)
    z = exact_sequence_scores(q, route(4), db, route(10, 10), SeqMatchConfig(seq_len=1))
    assert two[3, 11] == pytest.approx((z[0, 10] + z[1, 10] + z[2, 10] + z[3, 11]) / 4)
    assert two[3, 11] < one[3, 11]


@pytest.mark.parametrize("seq_len, v_min, v_max", [(1, 1.0, 1.0), (4, 0.8, 1.25), (5, 0.5, 2.0)])
def test_the_shortlisted_matcher_equals_the_reference_when_the_shortlist_is_everything(seq_len, v_min, v_max):
    rng = np.random.default_rng(seq_len)
    q, db = (rng.normal(size=(n, 16)).astype(np.float32) for n in (23, 31))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q_route, db_route = route(9, 14), route(5, 20, 6)
    config = SeqMatchConfig(seq_len, v_min, v_max, n_velocities=4, shortlist=31, query_chunk=7)
    reference = exact_sequence_scores(q, q_route, db, db_route, config)
    matches = sequence_match(q, q_route, db, db_route, config, k=5)
    expected = np.sort(reference, axis=1)[:, ::-1][:, :5]
    np.testing.assert_allclose(matches.score, expected, atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(reference, matches.index, axis=1), matches.score, atol=1e-5)
    candidates = np.tile(np.arange(31), (23, 1))
    np.testing.assert_allclose(match_scores(q, q_route, db, db_route, candidates, config), reference, atol=1e-5)


def test_given_candidates_are_ranked_by_their_exact_score_and_padding_stays_last():
    rng = np.random.default_rng(7)
    q, db = (rng.normal(size=(n, 8)).astype(np.float32) for n in (5, 12))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    config = SeqMatchConfig(seq_len=3)
    reference = exact_sequence_scores(q, route(5), db, route(12), config)
    candidates = np.array([[3, 7, -1]] * 5)
    matches = sequence_match(q, route(5), db, route(12), config, k=3, candidates=candidates)
    for i in range(5):
        best = 3 if reference[i, 3] >= reference[i, 7] else 7
        assert matches.index[i].tolist() == [best, 10 - best, -1]
        assert matches.score[i, 0] == pytest.approx(reference[i, best], abs=1e-5)
    assert np.isneginf(matches.score[:, 2]).all()


def test_the_row_statistics_are_exact_without_the_matrix():
    rng = np.random.default_rng(8)
    q, db = rng.normal(size=(7, 5)), rng.normal(size=(50, 5))
    mean, std = RowContrast.of(db).stats(q)
    sims = q @ db.T
    np.testing.assert_allclose(mean, sims.mean(axis=1))
    np.testing.assert_allclose(std, sims.std(axis=1))


def test_the_row_statistics_of_descriptors_wider_than_the_database_come_from_its_rows():
    """D > N (VLAD-sized): no D x D matrix, the same numbers (float32 products)."""
    rng = np.random.default_rng(9)
    q, db = rng.normal(size=(7, 300)), rng.normal(size=(40, 300))
    contrast = RowContrast.of(db)
    assert contrast.second is None and contrast.rows is not None
    mean, std = contrast.stats(q, queries_per_block=3)
    sims = q @ db.T
    np.testing.assert_allclose(mean, sims.mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(std, sims.std(axis=1), rtol=1e-4)


def test_matches_recall_counts_a_hit_within_the_threshold_and_padding_as_a_miss():
    db_xyz = np.array([[0.0, 0, 0], [100.0, 0, 0], [200.0, 0, 0]])
    q_xyz = np.array([[5.0, 0, 0], [190.0, 0, 0], [100.0, 0, 0]])
    matches = SeqMatches(index=np.array([[0, 1], [1, 2], [-1, -1]]), score=np.zeros((3, 2), np.float32))
    assert matches_recall(matches, db_xyz, q_xyz, 25.0, (1, 2)) == pytest.approx({1: 1 / 3, 2: 2 / 3})


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="v_min <= v_max"):
        SeqMatchConfig(seq_len=3, v_min=2.0, v_max=1.0)
    with pytest.raises(ValueError, match="seq_len"):
        SeqMatchConfig(seq_len=0)
