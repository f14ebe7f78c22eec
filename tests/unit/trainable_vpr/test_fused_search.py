"""trainable_vpr.fusion.fused_search on a synthetic route: the descriptor alone is an exact search,
matching alone re-ranks the descriptor's shortlist by the exact sequence score, a weight in between
ranks by the fused score computed by hand, and the shortlist is never shorter than k."""
from __future__ import annotations

import numpy as np
import pytest

from trainable_vpr.fusion import fuse_scores, fused_search
from vprkit.retrieval.evaluation import exact_search, l2_normalise
from vprkit.routes.matching import SeqMatchConfig, exact_sequence_scores
from vprkit.routes.order import Route


def route(n: int) -> Route:
    return Route(drive=np.zeros(n, np.int64), key=np.arange(n, dtype=float), unit="frame", drive_names=("d",))


@pytest.fixture(scope="module")
def data():
    """30 database frames; queries: noisy copies of frames 10..19 in order; window descriptors:
    the frames' own descriptors with more noise (a weaker, different signal than the matching's)."""
    rng = np.random.default_rng(0)
    db_frames = l2_normalise(rng.normal(size=(30, 16)).astype(np.float32))
    q_frames = l2_normalise(db_frames[10:20] + 0.6 * rng.normal(size=(10, 16)).astype(np.float32))
    db_windows = l2_normalise(db_frames + 0.5 * rng.normal(size=db_frames.shape).astype(np.float32))
    q_windows = l2_normalise(q_frames + 0.9 * rng.normal(size=q_frames.shape).astype(np.float32))
    return q_windows, db_windows, q_frames, route(10), db_frames, route(30)


def test_the_descriptor_alone_is_an_exact_search(data):
    q_windows, db_windows, *_ = data
    top, scores = fused_search(*data, SeqMatchConfig(3, shortlist=8), None, k=5)
    expected_top, expected_scores = exact_search(db_windows, q_windows, 5)
    np.testing.assert_array_equal(top, expected_top)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-6)


@pytest.mark.parametrize("weight", [0.5, float("inf")])
def test_a_weight_ranks_the_shortlist_by_the_fused_score(data, weight):
    q_windows, db_windows, q_frames, q_route, db_frames, db_route = data
    config = SeqMatchConfig(3, shortlist=8)
    top, scores = fused_search(*data, config, weight, k=4)
    candidates, descriptor = exact_search(db_windows, q_windows, 8)
    exact = exact_sequence_scores(q_frames, q_route, db_frames, db_route, config)     # the full-matrix reference
    fused = fuse_scores(descriptor, np.take_along_axis(exact, candidates, axis=1), weight)
    order = np.argsort(-fused, axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(top, np.take_along_axis(candidates, order, axis=1))
    np.testing.assert_allclose(scores, np.take_along_axis(fused, order, axis=1), atol=1e-4)
    assert set(top.ravel()) <= set(candidates.ravel())                                  # only the shortlist
    if np.isinf(weight):  # matching alone: the shortlist's best sequence score first
        best = np.take_along_axis(candidates, np.argmax(np.take_along_axis(exact, candidates, axis=1), axis=1)[:, None],
                                  axis=1)
        np.testing.assert_array_equal(top[:, :1], best)


def test_matching_fixes_what_the_noisy_descriptor_gets_wrong(data):
    alone, _ = fused_search(*data, SeqMatchConfig(3, shortlist=30), None, k=1)
    fused, _ = fused_search(*data, SeqMatchConfig(3, shortlist=30), 1.0, k=1)
    truth = np.arange(10, 20)
    assert (fused[:, 0] == truth).mean() > (alone[:, 0] == truth).mean()


def test_the_shortlist_is_at_least_k(data):
    top, scores = fused_search(*data, SeqMatchConfig(3, shortlist=2), 1.0, k=6)
    assert top.shape == (10, 6) and np.isfinite(scores).all()
    assert all(len(set(row)) == 6 for row in top)
