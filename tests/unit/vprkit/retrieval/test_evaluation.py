"""Evaluation (DESIGN.md §7): evaluate_retrieval against a brute-force reference, Recall@N
tables, the per-condition breakdown and the PCA-whitening baseline. Pure numpy: no backbone."""
from __future__ import annotations


import numpy as np
import pytest


from vprkit.cli import VPRError  # noqa: E402
from vprkit.retrieval.evaluation import (RecallResult, evaluate_retrieval, fit_pca_whitening, l2_normalise,
                                         recall_at_n, recall_by_group)  # noqa: E402

RECALL_AT = (1, 2, 3, 5, 10, 25)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def brute_force(db_desc, db_xyz, q_desc, q_xyz, threshold_m, recall_at):
    """The protocol written out in numpy, float64: cosine similarity, stable ranking (ties go
    to the lower database index), a query is correct at N if one of its top N is within the
    threshold; queries without any database image within the threshold are misses."""
    db = db_desc / np.linalg.norm(db_desc, axis=1, keepdims=True)
    q = q_desc / np.linalg.norm(q_desc, axis=1, keepdims=True)
    sims = q.astype(np.float64) @ db.astype(np.float64).T
    order = np.argsort(-sims, axis=1, kind="stable")
    correct = np.linalg.norm(db_xyz[order] - q_xyz[:, None, :], axis=2) <= threshold_m
    all_dist = np.linalg.norm(db_xyz[None, :, :] - q_xyz[:, None, :], axis=2)
    has_positive = (all_dist <= threshold_m).any(axis=1)
    recalls = {n: float(correct[:, :n].any(axis=1).mean()) for n in recall_at}
    return recalls, order, np.take_along_axis(sims, order, axis=1), has_positive


def random_problem(seed=0, n_db=300, n_q=80, dim=32, extent_m=200.0):
    rng = np.random.default_rng(seed)
    db = rng.normal(size=(n_db, dim)).astype(np.float32)
    q = rng.normal(size=(n_q, dim)).astype(np.float32)
    db_xyz = np.c_[rng.uniform(0, extent_m, size=(n_db, 2)), np.zeros(n_db)]
    # queries also around the database's area: some have no database image within 25 m
    q_xyz = np.c_[rng.uniform(-0.4 * extent_m, 1.4 * extent_m, size=(n_q, 2)), np.zeros(n_q)]
    return db, db_xyz, q, q_xyz


def on_a_line(xs):
    """Metric xyz of points on the x axis."""
    xs = np.asarray(xs, dtype=np.float64)
    return np.c_[xs, np.zeros_like(xs), np.zeros_like(xs)]


def unit(rng, n, dim=16):
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# --------------------------------------------------------------------------------------------
# evaluate_retrieval against brute force
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_recall_matches_brute_force_on_random_data(seed):
    db, db_xyz, q, q_xyz = random_problem(seed)
    result = evaluate_retrieval(db, db_xyz, q, q_xyz, 25.0, RECALL_AT)
    recalls, order, sims, has_positive = brute_force(db, db_xyz, q, q_xyz, 25.0, RECALL_AT)

    assert set(result.recalls) == set(RECALL_AT)
    for n in RECALL_AT:
        assert result.recalls[n] == pytest.approx(recalls[n], abs=1e-12), f"Recall@{n}"
    # the problem is not degenerate: recall grows with N and some queries lack positives
    assert recalls[1] < recalls[25] < 1.0
    assert 0 < (~has_positive).sum() < len(q)

    k = max(RECALL_AT)
    assert result.top_indices.shape == (len(q), k)
    np.testing.assert_array_equal(result.top_indices, order[:, :k])
    np.testing.assert_allclose(result.top_scores, sims[:, :k], atol=1e-5)
    expected_dist = np.linalg.norm(db_xyz[order[:, :k]] - q_xyz[:, None, :], axis=2)
    np.testing.assert_allclose(result.top_distances_m, expected_dist, atol=1e-9)
    np.testing.assert_array_equal(result.correct, expected_dist <= 25.0)
    np.testing.assert_array_equal(result.has_positive, has_positive)
    assert result.num_queries == len(q)
    assert result.num_queries_without_positive == int((~has_positive).sum())
    assert result.pos_threshold_m == 25.0


def test_threshold_changes_the_answer_like_brute_force():
    db, db_xyz, q, q_xyz = random_problem(3)
    for threshold in (5.0, 25.0, 60.0):
        result = evaluate_retrieval(db, db_xyz, q, q_xyz, threshold, (1, 5, 10))
        recalls, *_ , has_positive = brute_force(db, db_xyz, q, q_xyz, threshold, (1, 5, 10))
        assert result.recalls == pytest.approx(recalls)
        assert result.num_queries_without_positive == int((~has_positive).sum())


def test_descriptors_are_compared_by_cosine_not_by_length():
    """Exact search on L2-normalised descriptors: rescaling a descriptor changes nothing."""
    db, db_xyz, q, q_xyz = random_problem(4, n_db=120, n_q=30)
    rng = np.random.default_rng(4)
    base = evaluate_retrieval(db, db_xyz, q, q_xyz, 25.0, (1, 5, 10))
    scaled = evaluate_retrieval(db * rng.uniform(0.01, 100, size=(len(db), 1)).astype(np.float32), db_xyz,
                                    q * rng.uniform(0.01, 100, size=(len(q), 1)).astype(np.float32), q_xyz,
                                    25.0, (1, 5, 10))
    assert scaled.recalls == base.recalls
    np.testing.assert_array_equal(scaled.top_indices, base.top_indices)
    assert np.all(base.top_scores <= 1.0 + 1e-5)


def test_a_query_with_several_positives_is_counted_once():
    rng = np.random.default_rng(5)
    db = unit(rng, 6)
    db_xyz = on_a_line([0, 3, 6, 500, 1000, 1500])  # three positives of a query at 0 m
    q = db[[0]] + 0.01 * unit(rng, 1)
    result = evaluate_retrieval(db, db_xyz, q, on_a_line([0]), 25.0, (1, 3, 5))
    assert result.recalls == {1: 1.0, 3: 1.0, 5: 1.0}


# --------------------------------------------------------------------------------------------
# ties (duplicate database descriptors)
# --------------------------------------------------------------------------------------------
def test_duplicate_descriptors_at_the_same_position_match_brute_force():
    """Copies of an image (same descriptor, same position): which copy is ranked first cannot
    change correctness, so the result must equal the brute force's, whatever the tie order."""
    db, db_xyz, q, q_xyz = random_problem(6, n_db=120, n_q=40, extent_m=150.0)
    rng = np.random.default_rng(6)
    sources = rng.choice(len(db), 20, replace=False)
    for s in sources:  # 3 extra copies of each of 20 images, scattered over the database
        db = np.concatenate([db, np.repeat(db[[s]], 3, axis=0)])
        db_xyz = np.concatenate([db_xyz, np.repeat(db_xyz[[s]], 3, axis=0)])
    perm = rng.permutation(len(db))
    db, db_xyz = db[perm], db_xyz[perm]
    # half the queries are exact copies of a duplicated image: every one of them meets a tie
    q[:20] = db[np.flatnonzero(np.isin(perm, sources))[:20]]

    result = evaluate_retrieval(db, db_xyz, q, q_xyz, 25.0, RECALL_AT)
    recalls, order, sims, _ = brute_force(db, db_xyz, q, q_xyz, 25.0, RECALL_AT)
    for n in RECALL_AT:
        assert result.recalls[n] == pytest.approx(recalls[n]), f"Recall@{n}"
    # a valid ranking: scores non-increasing, the same scores as the brute force at every rank
    assert np.all(np.diff(result.top_scores, axis=1) <= 1e-6)
    np.testing.assert_allclose(result.top_scores, sims[:, :max(RECALL_AT)], atol=1e-5)
    # and the same correctness at every rank (the copies share their position)
    np.testing.assert_array_equal(result.correct, np.linalg.norm(
        db_xyz[order[:, :max(RECALL_AT)]] - q_xyz[:, None, :], axis=2) <= 25.0)


def test_exact_ties_keep_the_lowest_indices_like_brute_force():
    """What faiss (IndexFlatIP) does with exact ties, pinned where it matters: of more tied
    images than fit in the top k, it keeps the lowest indices, the same set as a brute force
    that breaks ties by lower index (faiss 1.15 lists them in *descending* index order inside
    the tie, the brute force ascending: the order inside a tie is not asserted here)."""
    rng = np.random.default_rng(7)
    db = unit(rng, 40)
    tied = np.array([3, 8, 11, 17, 25, 31, 38])
    db[tied] = db[tied[0]]
    db_xyz = on_a_line(np.arange(40) * 100.0)
    q = db[[3]]
    result = evaluate_retrieval(db, db_xyz, q, db_xyz[[3]], 25.0, (5,))
    assert sorted(result.top_indices[0].tolist()) == tied[:5].tolist()
    assert np.ptp(result.top_scores[0]) == 0.0  # exactly tied scores
    assert result.recalls[5] == 1.0  # index 3 (the only one within 25 m) is among the kept ties


def test_recall_at_1_does_not_depend_on_which_other_n_are_asked_for():
    """Exact ties in the top 1: the image ranked first must not change when --recall_at also
    asks for R@5. Today it does: faiss returns the lowest tied index for k = 1 but the highest
    kept one first for k = 5, so R@1 of identical data is 1.0 or 0.0 depending on recall_at.
    Fix: in evaluate_retrieval, after index.search, order each row by (score desc, index asc),
    e.g. order = np.lexsort((top, -scores), axis=1) and take_along_axis on top and scores."""
    rng = np.random.default_rng(8)
    db = unit(rng, 8)
    db[1:4] = db[0]                                   # 4 identical descriptors ...
    db_xyz = on_a_line(np.arange(8) * 1000.0)         # ... only index 0 within 25 m of the query
    q, q_xyz = db[[0]], db_xyz[[0]]
    only_1 = evaluate_retrieval(db, db_xyz, q, q_xyz, 25.0, (1,))
    with_5 = evaluate_retrieval(db, db_xyz, q, q_xyz, 25.0, (1, 5))
    assert with_5.top_indices[0, 0] == only_1.top_indices[0, 0]
    assert with_5.recalls[1] == only_1.recalls[1]


# --------------------------------------------------------------------------------------------
# misses, small databases, empty inputs
# --------------------------------------------------------------------------------------------
def test_queries_without_positive_are_misses_and_counted():
    rng = np.random.default_rng(9)
    db = unit(rng, 5)
    db_xyz = on_a_line([0, 300, 600, 900, 1200])
    # queries 0-2 retrieve their own place first; query 3 looks like place 0 but stands 5 km away
    q = db[[0, 1, 2, 0]] + 0.01 * unit(rng, 4)
    q_xyz = on_a_line([2, 301, 598, 5000])
    result = evaluate_retrieval(db, db_xyz, q, q_xyz, 25.0, (1, 5))
    assert result.num_queries == 4
    assert result.num_queries_without_positive == 1
    assert result.has_positive.tolist() == [True, True, True, False]
    assert not result.correct[3].any()
    assert result.recalls == {1: 0.75, 5: 0.75}  # denominator: all queries, not 3
    assert result.as_dict()["num_queries_without_positive"] == 1


def test_n_larger_than_the_database_is_recall_over_the_whole_database():
    rng = np.random.default_rng(10)
    db = unit(rng, 3)
    db_xyz = on_a_line([0, 500, 1000])
    # query 0: its only positive (index 2) is ranked last; query 1: no positive at all
    q = np.stack([db[0] * 0.8 + db[1] * 0.6 + db[2] * 0.05, db[1]])
    q_xyz = on_a_line([1000, 3000])
    result = evaluate_retrieval(db, db_xyz, q, q_xyz, 25.0, (1, 2, 10, 100))
    assert result.top_indices.shape == (2, 3)  # k is capped at the database size
    assert result.top_indices[0].tolist() == [0, 1, 2]
    assert result.recalls == {1: 0.0, 2: 0.0, 10: 0.5, 100: 0.5}
    everything = brute_force(db, db_xyz, q, q_xyz, 25.0, (3,))[0][3]
    assert result.recalls[10] == everything == result.recalls[100]


def test_empty_queries_raise_vpr_error():
    rng = np.random.default_rng(11)
    db = unit(rng, 4)
    with pytest.raises(VPRError, match="no queries"):
        evaluate_retrieval(db, on_a_line(range(4)), np.zeros((0, 16), np.float32), np.zeros((0, 3)))


def test_empty_database_raises_vpr_error():
    rng = np.random.default_rng(12)
    with pytest.raises(VPRError, match="database"):
        evaluate_retrieval(np.zeros((0, 16), np.float32), np.zeros((0, 3)), unit(rng, 2), on_a_line([0, 1]))


# --------------------------------------------------------------------------------------------
# recall_at_n and recall_by_group on hand-made tables
# --------------------------------------------------------------------------------------------
TABLE = np.array([
    [False, True, False],   # first hit at rank 2
    [True, False, False],   # rank 1
    [False, False, False],  # never
    [False, False, True],   # rank 3
    [True, True, True],     # rank 1
])


def test_recall_at_n_on_a_hand_made_table():
    assert recall_at_n(TABLE, (1, 2, 3)) == {1: 0.4, 2: 0.6, 3: 0.8}


def test_recall_at_n_beyond_the_table_width_uses_every_column():
    assert recall_at_n(TABLE, (5, 100)) == {5: 0.8, 100: 0.8}


def test_recall_at_n_counts_a_query_once_even_with_several_hits():
    table = np.array([[True, True], [False, False]])
    assert recall_at_n(table, (1, 2)) == {1: 0.5, 2: 0.5}


def test_recall_at_n_of_no_queries_is_nan():
    recalls = recall_at_n(np.zeros((0, 3), bool), (1, 5))
    assert set(recalls) == {1, 5} and all(np.isnan(v) for v in recalls.values())


def _result_from_table(correct: np.ndarray) -> RecallResult:
    q, k = correct.shape
    return RecallResult(
        recalls=recall_at_n(correct, (1, 2, 3)), num_queries=q, num_queries_without_positive=0,
        pos_threshold_m=25.0, top_indices=np.zeros((q, k), np.int64), top_distances_m=np.zeros((q, k)),
        top_scores=np.zeros((q, k), np.float32), correct=correct, has_positive=np.ones(q, bool),
    )


def test_recall_by_group_splits_the_queries_by_condition():
    groups = np.array(["day", "night", "night", "day", "dusk"])
    breakdown = recall_by_group(_result_from_table(TABLE), groups, (1, 2, 3))
    assert list(breakdown) == ["day", "dusk", "night"]
    assert breakdown["day"] == {1: 0.0, 2: 0.5, 3: 1.0}     # rows 0 and 3
    assert breakdown["night"] == {1: 0.5, 2: 0.5, 3: 0.5}   # rows 1 and 2
    assert breakdown["dusk"] == {1: 1.0, 2: 1.0, 3: 1.0}    # row 4
    # the groups are a partition: their recalls, weighted by size, give the overall recall
    overall = recall_at_n(TABLE, (1, 2, 3))
    for n in (1, 2, 3):
        weighted = sum(breakdown[g][n] * (groups == g).sum() for g in breakdown) / len(groups)
        assert weighted == pytest.approx(overall[n])


def test_recall_by_group_without_groups_is_empty():
    assert recall_by_group(_result_from_table(TABLE), None, (1, 5)) == {}


def test_recall_by_group_on_evaluate_retrieval_output():
    db, db_xyz, q, q_xyz = random_problem(13, n_db=150, n_q=60)
    groups = np.where(np.arange(60) % 3 == 0, "night", "day")
    result = evaluate_retrieval(db, db_xyz, q, q_xyz, 25.0, (1, 5, 10))
    breakdown = recall_by_group(result, groups, (1, 5, 10))
    for g in ("day", "night"):
        mask = groups == g
        expected = brute_force(db, db_xyz[:], q[mask], q_xyz[mask], 25.0, (1, 5, 10))[0]
        assert breakdown[g] == pytest.approx(expected)


# --------------------------------------------------------------------------------------------
# fit_pca_whitening
# --------------------------------------------------------------------------------------------
def correlated_features(seed: int, n: int, dim: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Strongly anisotropic, correlated features (like a CNN's pooled output), and a mixing
    matrix to draw more (queries) from the same distribution."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(dim, dim)) * np.geomspace(10.0, 0.1, dim)[:, None]
    return (rng.normal(size=(n, dim)) @ mixing + 3.0).astype(np.float32), mixing


def reference_whitening(db: np.ndarray, dim: int):
    """PCA whitening written out with an SVD: centre the L2-normalised database, project on
    the top `dim` principal axes, divide by their standard deviations."""
    x = l2_normalise(db).astype(np.float64)
    mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    scale = s[:dim] / np.sqrt(len(x) - 1)
    return lambda feats: (l2_normalise(feats).astype(np.float64) - mean) @ vt[:dim].T / scale


def test_pca_whitening_dims_and_unit_norm():
    db, mixing = correlated_features(0, 300)
    project = fit_pca_whitening(db, 16)
    out_db = project(db)
    out_q = project((np.random.default_rng(1).normal(size=(7, 64)) @ mixing).astype(np.float32))
    assert out_db.shape == (300, 16) and out_q.shape == (7, 16)
    assert out_db.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out_db, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out_q, axis=1), 1.0, atol=1e-5)


def test_pca_whitening_dim_is_capped_by_the_feature_dimension():
    db, _ = correlated_features(2, 300, dim=24)
    assert fit_pca_whitening(db, 256)(db).shape == (300, 24)


def test_pca_whitening_is_whitened_pca_on_the_database_and_the_same_map_for_queries():
    db, mixing = correlated_features(3, 400)
    queries = (np.random.default_rng(4).normal(size=(50, 64)) @ mixing + 3.0).astype(np.float32)
    project = fit_pca_whitening(db, 12)
    reference = reference_whitening(db, 12)

    white_db = reference(db)
    # the reference is what "whitened" means: identity covariance on the database
    np.testing.assert_allclose(np.cov(white_db, rowvar=False), np.eye(12), atol=1e-6)
    # the function is the reference followed by L2 normalisation, up to the sign of each axis,
    # for the database and for queries alike (one map fitted on the database only)
    out_db, out_q = project(db), project(queries)
    signs = np.sign((out_db * l2_normalise(white_db)).sum(axis=0))
    np.testing.assert_allclose(out_db, l2_normalise(white_db) * signs, atol=1e-4)
    np.testing.assert_allclose(out_q, l2_normalise(reference(queries)) * signs, atol=1e-4)
    # one query's output does not depend on the other queries
    np.testing.assert_allclose(project(queries[:1]), out_q[:1], atol=1e-6)


def test_pca_whitening_decorrelates_the_database():
    db, _ = correlated_features(5, 500)
    raw = l2_normalise(db)
    out = fit_pca_whitening(db, 16)(db)
    raw_corr = np.abs(np.corrcoef(raw[:, :16], rowvar=False) - np.eye(16)).max()
    out_corr = np.abs(np.corrcoef(out, rowvar=False) - np.eye(16)).max()
    assert raw_corr > 0.5           # the input is strongly correlated ...
    assert out_corr < 0.2           # ... the output is not
    variances = out.var(axis=0)     # and no axis dominates (equalised variance)
    assert variances.max() / variances.min() < 2.0


def test_pca_whitening_with_fewer_database_images_than_dims_keeps_queries_apart():
    """A database smaller than --pca_whiten DIM (or --projection_dim in run_experiment, 256 by
    default; e.g. gardens_point_mini has 10 database images). Centred, N images span N - 1
    dimensions, but fit_pca_whitening keeps min(dim, N, D) = N components: the last has zero
    variance (~1e-31) and whitening divides by its square root, so any query component off
    the database's span is blown up and every query collapses onto that one axis (cosine
    +-1 with every other query). Fix: keep at most N - 1 components and drop components whose
    explained variance is negligible (e.g. < 1e-6 of the largest)."""
    rng = np.random.default_rng(14)
    db = rng.normal(size=(20, 64)).astype(np.float32)
    queries = db + 0.05 * rng.normal(size=db.shape).astype(np.float32)  # slightly moved copies
    project = fit_pca_whitening(db, 256)
    out_db, out_q = project(db), project(queries)
    assert np.isfinite(out_db).all() and np.isfinite(out_q).all()
    # each moved copy still retrieves its own database image
    nearest = (out_q @ out_db.T).argmax(axis=1)
    assert (nearest == np.arange(20)).mean() >= 0.9
