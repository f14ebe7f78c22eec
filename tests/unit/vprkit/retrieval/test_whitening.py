"""Learned whitening (vprkit.retrieval.whitening) and the positive pairs it learns from
(vprkit.tables.pairs.positive_pairs):
synthetic data only."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from vprkit.retrieval import whitening
from vprkit.cli import VPRError
from vprkit.retrieval.evaluation import evaluate_retrieval, fit_pca_whitening, l2_normalise
from vprkit.tables.pairs import pair_relations, positive_pairs
from vprkit.retrieval.whitening import choose_shrinkage, fit_learned_whitening


def nuisance_set(seed: int, places: int = 40, per_place: int = 5, dim: int = 12, centres: np.ndarray | None = None):
    """Places in 4 signal dimensions; one nuisance dimension (like light or the phone) varies
    strongly between any two photos, of one place or not; small noise elsewhere; a constant
    offset keeps the L2 normalisation mild. Returns (features, labels, centres)."""
    rng = np.random.default_rng(seed)
    if centres is None:
        centres = rng.normal(0.0, 1.0, (places, 4))
    labels = np.repeat(np.arange(len(centres)), per_place)
    x = rng.normal(0.0, 0.15, (len(labels), dim))
    x[:, :4] += centres[labels]
    x[:, 4] += rng.normal(0.0, 4.0, len(labels))
    x[:, dim - 1] += 12.0
    return x.astype(np.float32), labels, centres


def label_pairs(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return positive_pairs(None, labels, 25.0)


def r1(db: np.ndarray, db_labels: np.ndarray, q: np.ndarray, q_labels: np.ndarray) -> float:
    return evaluate_retrieval(db, None, q, None, 25.0, (1,), db_labels, q_labels).recalls[1]


def similarities(project, db: np.ndarray, q: np.ndarray) -> np.ndarray:
    return project(q) @ project(db).T


def test_learned_whitening_beats_pca_whitening_when_a_nuisance_dominates_positive_differences():
    train, train_labels, centres = nuisance_set(0)
    queries, q_labels, _ = nuisance_set(1, per_place=2, centres=centres)  # new photos of the same places
    learned = fit_learned_whitening(train, label_pairs(train_labels), dim=4, shrinkage=0.1)
    pca = fit_pca_whitening(train, 4)
    learned_r1 = r1(learned.apply(train), train_labels, learned.apply(queries), q_labels)
    pca_r1 = r1(pca(train), train_labels, pca(queries), q_labels)
    assert learned_r1 >= pca_r1 + 0.2, (learned_r1, pca_r1)
    assert learned.apply(queries).shape == (len(queries), 4)
    np.testing.assert_allclose(np.linalg.norm(learned.apply(queries), axis=1), 1.0, atol=1e-5)
    assert learned.num_pairs == 40 * 10  # 5 images a place: 10 pairs each


def test_shrinkage_one_with_whitened_rotation_is_pca_whitening():
    train, labels, centres = nuisance_set(2)
    queries, _, _ = nuisance_set(3, per_place=1, centres=centres)
    learned = fit_learned_whitening(train, label_pairs(labels), dim=6, shrinkage=1.0, whiten_rotation=True)
    pca = fit_pca_whitening(train, 6)
    np.testing.assert_allclose(similarities(learned.apply, train, queries), similarities(pca, train, queries),
                               atol=2e-4)


def test_shrinkage_one_alone_is_plain_pca_rotation():
    from sklearn.decomposition import PCA

    train, labels, centres = nuisance_set(4)
    queries, _, _ = nuisance_set(5, per_place=1, centres=centres)
    learned = fit_learned_whitening(train, label_pairs(labels), dim=6, shrinkage=1.0)
    pca = PCA(6, svd_solver="full").fit(l2_normalise(train))
    plain = lambda x: l2_normalise(pca.transform(l2_normalise(x)))  # noqa: E731
    np.testing.assert_allclose(similarities(learned.apply, train, queries), similarities(plain, train, queries),
                               atol=2e-4)
    # and the learned correction (s < 1) changes the descriptors
    other = fit_learned_whitening(train, label_pairs(labels), dim=6, shrinkage=0.3)
    assert np.abs(similarities(other.apply, train, queries) - similarities(plain, train, queries)).max() > 0.05


def test_refit_rotation_on_the_training_features_changes_nothing_and_on_another_database_recentres():
    train, labels, centres = nuisance_set(6)
    fitted = fit_learned_whitening(train, label_pairs(labels), dim=5, shrinkage=0.3)
    same = fitted.refit_rotation(train)
    np.testing.assert_allclose(similarities(same.apply, train, train), similarities(fitted.apply, train, train),
                               atol=1e-4)
    shifted = train + np.float32(3.0) * np.eye(train.shape[1], dtype=np.float32)[5]
    moved = fitted.refit_rotation(shifted)
    np.testing.assert_allclose(moved.mean, l2_normalise(shifted).mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(moved.correction, fitted.correction)
    np.testing.assert_allclose(moved.apply(shifted).mean(axis=0), 0.0, atol=0.15)  # centred on the new database


def test_fewer_images_than_dimensions_gives_at_most_n_minus_one_finite_dimensions():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(30, 64)).astype(np.float32)
    labels = np.repeat(np.arange(10), 3)
    for s in (0.0, 0.5):
        out = fit_learned_whitening(x, label_pairs(labels), dim=256, shrinkage=s).apply(x)
        assert out.shape[0] == 30 and out.shape[1] <= 29
        assert np.isfinite(out).all()


def test_descriptors_wider_than_max_dim_fit_on_a_sample(monkeypatch):
    monkeypatch.setattr(whitening, "MAX_DIM", 8)
    train, labels, _ = nuisance_set(8, places=10, dim=16)
    fitted = fit_learned_whitening(train, label_pairs(labels), dim=12, shrinkage=0.5)
    assert fitted.dim <= 7 and np.isfinite(fitted.apply(train)).all()


def test_choose_shrinkage_takes_the_best_validation_r1_and_the_larger_on_ties():
    train, labels, centres = nuisance_set(9)
    val, val_labels, _ = nuisance_set(10, per_place=1, centres=centres)
    choice = choose_shrinkage(train, label_pairs(labels), None, val, None, dim=4, grid=(0.1, 1.0, 0.5),
                              db_labels=labels, val_labels=val_labels)
    assert set(choice.val_r1) == {0.1, 0.5, 1.0}
    assert choice.val_r1[choice.shrinkage] == max(choice.val_r1.values())
    assert choice.shrinkage < 1.0  # the nuisance: shrinking all the way to the identity loses
    assert choice.whitening.shrinkage == choice.shrinkage
    assert choice.val_r1[choice.shrinkage] == r1(choice.whitening.apply(train), labels,
                                                 choice.whitening.apply(val), val_labels)
    tie = choose_shrinkage(train, label_pairs(labels), None, train[:40], None, dim=4, grid=(0.5, 0.7),
                           db_labels=labels, val_labels=labels[:40])  # queries in the database: R@1 1.0 for both
    assert tie.val_r1 == {0.5: 1.0, 0.7: 1.0} and tie.shrinkage == 0.7


@pytest.mark.parametrize("call, message", [
    (lambda x, p: fit_learned_whitening(x, p, shrinkage=1.5), "shrinkage 1.5 must lie in"),
    (lambda x, p: fit_learned_whitening(x, p, dim=0), "dim 0 must be at least 1"),
    (lambda x, p: fit_learned_whitening(x, (np.zeros(0), np.zeros(0))), "no positive pairs"),
    (lambda x, p: fit_learned_whitening(x, (np.array([0]), np.array([len(x)]))), "outside the"),
    (lambda x, p: fit_learned_whitening(x, (np.array([0, 1]), np.array([1]))), "equal length"),
    (lambda x, p: fit_learned_whitening(x, (np.array([3]), np.array([3]))), "with itself"),
    (lambda x, p: fit_learned_whitening(x[:1], p), "two or more rows"),
    (lambda x, p: fit_learned_whitening(np.where(np.arange(len(x))[:, None] == 2, np.nan, x), p), "NaN"),
    (lambda x, p: fit_learned_whitening(x, p).apply(x[:, :5]), "fitted on 12-d"),
    (lambda x, p: fit_learned_whitening(np.repeat(x[:1], len(x), axis=0), p), "identical descriptors"),
    (lambda x, p: choose_shrinkage(x, p, None, x, None, grid=()), "grid is empty"),
])
def test_bad_inputs_are_one_line_errors(call, message):
    x, labels, _ = nuisance_set(11, places=5)
    with pytest.raises(VPRError, match=message) as error:
        call(x, label_pairs(labels))
    assert "\n" not in str(error.value)


def brute_force_pairs(xyz, labels, threshold):
    n = len(xyz if xyz is not None else labels)
    out = set()
    for i, j in itertools.combinations(range(n), 2):
        pos, _ = pair_relations(None if xyz is None else xyz[i], None if xyz is None else xyz[j],
                                None if labels is None else labels[i], None if labels is None else labels[j],
                                threshold, threshold)
        if pos:
            out.add((i, j))
    return out


@pytest.mark.parametrize("with_xyz, with_labels", [(True, False), (False, True), (True, True)])
def test_positive_pairs_are_exactly_the_pair_rules_positives(with_xyz, with_labels):
    rng = np.random.default_rng(12)
    xyz = rng.uniform(0, 100, (60, 3)) * [1, 1, 0] if with_xyz else None
    labels = rng.integers(0, 6, 60) if with_labels else None
    first, second = positive_pairs(xyz, labels, 20.0)
    found = set(zip(first.tolist(), second.tolist()))
    assert len(found) == len(first)  # no pair twice
    assert found == brute_force_pairs(xyz, labels, 20.0) and found


@pytest.mark.parametrize("with_xyz", [True, False])
def test_positive_pairs_sample_when_there_are_too_many(with_xyz):
    rng = np.random.default_rng(13)
    xyz = rng.uniform(0, 30, (200, 3)) * [1, 1, 0] if with_xyz else None
    labels = None if with_xyz else rng.integers(0, 3, 200)
    everything = brute_force_pairs(xyz, labels, 20.0)
    assert len(everything) > 2000
    first, second = positive_pairs(xyz, labels, 20.0, max_pairs=500)
    assert 300 <= len(first) <= 500
    assert set(zip(first.tolist(), second.tolist())) <= everything
    again = positive_pairs(xyz, labels, 20.0, max_pairs=500)
    np.testing.assert_array_equal(first, again[0])  # seeded


def test_choose_shrinkage_can_search_another_database_with_the_rotation_refitted_on_it():
    train, labels, centres = nuisance_set(14)
    val, val_labels, _ = nuisance_set(15, per_place=1, centres=centres)
    db, db_labels, _ = nuisance_set(16, per_place=2, centres=centres)
    plain = choose_shrinkage(train, label_pairs(labels), None, val, None, dim=4, grid=(0.1, 0.5),
                             db_labels=labels, val_labels=val_labels)
    same = choose_shrinkage(train, label_pairs(labels), None, val, None, dim=4, grid=(0.1, 0.5), db_labels=labels,
                            val_labels=val_labels, database=train, refit_on_database=True)
    assert same.val_r1 == plain.val_r1  # refitting on the training features changes nothing
    other = choose_shrinkage(train, label_pairs(labels), None, val, None, dim=4, grid=(0.1, 0.5), db_labels=db_labels,
                             val_labels=val_labels, database=db, refit_on_database=True)
    np.testing.assert_allclose(other.whitening.mean, l2_normalise(db).mean(axis=0), atol=1e-5)
    assert other.val_r1[other.shrinkage] == r1(other.whitening.apply(db), db_labels, other.whitening.apply(val),
                                               val_labels)
