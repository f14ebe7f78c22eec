"""Learned whitening from positive pairs, in closed form (no epochs).

Radenović, Tolias & Chum, "Fine-tuning CNN image retrieval with no human annotation" (TPAMI
2018, sec. 3.4 "learned whitening"), after Mikolajczyk & Matas (ICCV 2007): the descriptors are
whitened by the covariance of positive-pair differences, so that what varies between two
photos of one place (light, phone, viewpoint) is scaled down, then rotated by the PCA of the
whitened training features and cut to `dim` dimensions.

The exact form fitted by `fit_learned_whitening` (x: an L2-normalised descriptor):

1. m = mean of the L2-normalised training features; B = orthonormal basis of their span (the
   principal directions with non-zero variance; every pair difference lies in it, so nothing
   is lost; for D > MAX_DIM a seeded sample of MAX_DIM rows fixes it, so memory stays at most
   MAX_DIM x MAX_DIM beside the N x D features).
2. C_pos = mean over the positive pairs (i, j) of (x_i - x_j)(x_i - x_j)^T, in that basis.
3. Shrinkage s in [0, 1]: C_s = (1 - s) C_pos + s (trace(C_pos) / D) I, with D the descriptor's
   dimension. s = 0 is Radenović's pure pair whitening; s = 1 whitens nothing.
4. Y = C_s^(-1/2) B (x - m) for the training features; its PCA (eigenvectors V, variances l)
   gives the rotation, cut to the top `dim` components. The output is l2_normalise(V^T Y)
   (`whiten_rotation=False`, the default: Radenović's form, positive-pair differences stay
   isotropic and directions are ranked by how far apart places lie), or
   l2_normalise(diag(l)^(-1/2) V^T Y) (`whiten_rotation=True`: with s = 1 exactly the suite's
   PCA-whitening, vprkit.retrieval.evaluation.pca_whitening_matrix). On bgu_campus effnet_lite0 val.csv
   (25 m) the default scores R@1 0.663 at s = 0.3, the whitened rotation at most 0.568
   (bench/learned_whitening.py).

`Whitening.refit_rotation(db_features)` is the database-side adaptation: keep the learned
pair-covariance correction (step 3), refit the centring and rotation (steps 1's mean and 4) on
the searched database's own features. `choose_shrinkage` picks s on validation R@1 (validation
queries against the training database, the protocol of validation during training).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from vprkit.cli import VPRError
from vprkit.retrieval.evaluation import evaluate_retrieval, l2_normalise, pca_by_eigh

MAX_DIM = 4096  # above: the training span is fixed on a seeded sample of this many rows (bounded memory)
SHRINKAGE_GRID = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
_RELATIVE_FLOOR = 1e-6  # eigenvalues below this share of the largest are dropped (zero-variance axes)


@dataclass
class Whitening:
    """A fitted learned whitening: apply(x) = l2_normalise((l2_normalise(x) - mean) @ projection.T)."""

    mean: np.ndarray          # (D,) centring of the L2-normalised features
    projection: np.ndarray    # (dim, D) the whole linear map
    correction: np.ndarray    # (k, D) the pair-covariance correction alone: C_s^(-1/2) B (refit_rotation keeps it)
    shrinkage: float
    num_pairs: int
    whiten_rotation: bool = False

    @property
    def dim(self) -> int:
        return int(self.projection.shape[0])

    def apply(self, features: np.ndarray) -> np.ndarray:
        """L2-normalised (N, dim) descriptors of (N, D) features."""
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[1] != self.projection.shape[1]:
            raise VPRError(f"learned whitening: features of shape {features.shape} given, fitted on "
                           f"{self.projection.shape[1]}-d descriptors; use the same backbone and pooling")
        return l2_normalise((l2_normalise(features) - self.mean) @ self.projection.T)

    def refit_rotation(self, db_features: np.ndarray) -> "Whitening":
        """Database-side adaptation: the same pair-covariance correction, the centring and the
        rotation refitted on the searched database (unsupervised: no positions needed)."""
        db = l2_normalise(_check_features(db_features, "database features"))
        mean = db.mean(axis=0, dtype=np.float64)
        projection = _rotation(((db - mean) @ self.correction.T), self.dim, self.whiten_rotation) @ self.correction
        return replace(self, mean=mean.astype(np.float32), projection=projection.astype(np.float32))


def _check_features(features: np.ndarray, what: str) -> np.ndarray:
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2 or len(features) < 2:
        raise VPRError(f"learned whitening: {what} must be an (N, D) array of two or more rows, "
                       f"got shape {features.shape}")
    if not np.isfinite(features).all():
        raise VPRError(f"learned whitening: {what} contain NaN or infinite values; check the extraction")
    return features


def _rotation(whitened: np.ndarray, dim: int, whiten: bool) -> np.ndarray:
    """(d, k) PCA rotation of centred (N, k) rows: top `dim` components with non-zero variance,
    each divided by its standard deviation when `whiten`."""
    _, components, variances = pca_by_eigh(whitened, min(dim, whitened.shape[1]), max_rows=MAX_DIM, centre=False)
    keep = variances > _RELATIVE_FLOOR * max(variances[0], 1e-30)
    components = components[keep]
    return components / np.sqrt(variances[keep])[:, None] if whiten else components


@dataclass
class _PairStatistics:
    """What every shrinkage shares (steps 1-2): the L2-normalised training features, their mean,
    the basis of their span and the eigen-decomposition of the positive-pair covariance in it."""

    x: np.ndarray
    mean: np.ndarray
    basis: np.ndarray
    cov_values: np.ndarray
    cov_vectors: np.ndarray
    scale: float
    pairs: int


def _pair_statistics(features: np.ndarray, pos_pairs: tuple[np.ndarray, np.ndarray], seed: int) -> _PairStatistics:
    x = l2_normalise(_check_features(features, "training features"))
    first, second = (np.asarray(p, dtype=np.int64).reshape(-1) for p in pos_pairs)
    if len(first) != len(second):
        raise VPRError(f"learned whitening: {len(first)} first and {len(second)} second pair indices; give two arrays "
                       f"of equal length")
    if len(first) == 0:
        raise VPRError("learned whitening: no positive pairs; the training set needs two images of one place "
                       "(raise --pos_threshold_m or check the positions or labels)")
    if min(first.min(), second.min()) < 0 or max(first.max(), second.max()) >= len(x):
        raise VPRError(f"learned whitening: a pair index lies outside the {len(x)} training features")
    if np.all(first == second):
        raise VPRError("learned whitening: every positive pair joins an image with itself; give pairs of two images")

    mean = x.mean(axis=0, dtype=np.float64)
    sample = x if len(x) <= MAX_DIM else x[np.sort(np.random.default_rng(seed).choice(len(x), MAX_DIM, replace=False))]
    if len(sample) <= x.shape[1]:  # the span of the training rows: at most N - 1 directions (Gram route, exact)
        _, basis, variances = pca_by_eigh(sample, sample.shape[1], max_rows=MAX_DIM)
        basis = basis[variances > _RELATIVE_FLOOR * variances[0]]
    else:
        basis = np.eye(x.shape[1])
    basis = basis.astype(np.float64)
    # C_pos = (1/P) sum over pairs of (x_i - x_j)(x_i - x_j)^T = X^T L X / P, with L = degrees - A the Laplacian of
    # the pair graph (A sparse: 2P entries): k x k memory and N k^2 work, never an N x N matrix or a P x D one.
    from scipy.sparse import coo_matrix

    xb = x.astype(np.float64) @ basis.T
    adjacency = coo_matrix((np.ones(2 * len(first)),
                            (np.concatenate([first, second]), np.concatenate([second, first]))),
                           shape=(len(x), len(x))).tocsr()
    degrees = np.asarray(adjacency.sum(axis=1)).reshape(-1)
    cov = (xb.T @ (degrees[:, None] * xb) - xb.T @ (adjacency @ xb)) / len(first)
    scale = float(np.trace(cov) / x.shape[1])
    if scale <= 0:
        raise VPRError("learned whitening: every positive pair has identical descriptors, so there is nothing to "
                       "whiten; check that the pairs join different images")
    values, vectors = np.linalg.eigh(cov)
    return _PairStatistics(x, mean, basis, values, vectors, scale, len(first))


def _whitening_of(stats: _PairStatistics, dim: int, shrinkage: float, whiten_rotation: bool) -> Whitening:
    """Steps 3-4 for one shrinkage: C_s = (1 - s) C_pos + s (trace / D) I has C_pos's eigenvectors
    and eigenvalues (1 - s) lambda + s trace / D, so no shrinkage needs its own decomposition."""
    values = (1.0 - shrinkage) * stats.cov_values + shrinkage * stats.scale
    # C_s^(-1/2); a direction where every pair agrees exactly (s = 0 and N < D) is floored, not inverted to infinity.
    values = np.maximum(values, _RELATIVE_FLOOR * values.max())
    correction = (stats.cov_vectors / np.sqrt(values)) @ stats.cov_vectors.T @ stats.basis
    whitened = (stats.x - stats.mean) @ correction.T
    projection = _rotation(whitened, dim, whiten_rotation) @ correction
    return Whitening(stats.mean.astype(np.float32), projection.astype(np.float32), correction.astype(np.float32),
                     float(shrinkage), stats.pairs, whiten_rotation)


def _check_fit_arguments(shrinkages: Sequence[float], dim: int) -> None:
    for shrinkage in shrinkages:
        if not 0.0 <= shrinkage <= 1.0:
            raise VPRError(f"learned whitening: shrinkage {shrinkage:g} must lie in [0, 1] (0: pair whitening alone, "
                           f"1: PCA-whitening)")
    if dim < 1:
        raise VPRError(f"learned whitening: dim {dim} must be at least 1")


def fit_learned_whitening(features: np.ndarray, pos_pairs: tuple[np.ndarray, np.ndarray], dim: int = 256,
                          shrinkage: float = 0.3, whiten_rotation: bool = False, seed: int = 0) -> Whitening:
    """Fit the learned whitening (module docstring, steps 1-4) on (N, D) training features and
    their positive pairs (i, j) (e.g. vprkit.tables.pairs.positive_pairs). Output dimension at most
    min(dim, N - 1, D): a set of N images spans at most N - 1 directions."""
    _check_fit_arguments([shrinkage], dim)
    return _whitening_of(_pair_statistics(features, pos_pairs, seed), dim, shrinkage, whiten_rotation)


@dataclass
class ShrinkageChoice:
    """The chosen shrinkage, every grid point's validation R@1, and the whitening fitted with it."""

    shrinkage: float
    val_r1: dict[float, float]
    whitening: Whitening


def choose_shrinkage(features: np.ndarray, pos_pairs: tuple[np.ndarray, np.ndarray], db_xyz: np.ndarray | None,
                     val_features: np.ndarray, val_xyz: np.ndarray | None, pos_threshold_m: float = 25.0,
                     dim: int = 256, grid: Sequence[float] = SHRINKAGE_GRID, whiten_rotation: bool = False,
                     db_labels: np.ndarray | None = None, val_labels: np.ndarray | None = None,
                     database: np.ndarray | None = None, refit_on_database: bool = False) -> ShrinkageChoice:
    """The shrinkage of `grid` with the best validation R@1: validation queries searched
    (vprkit.retrieval.evaluation.evaluate_retrieval) in `database` (default: the training features, the
    protocol of validation during training; db_xyz / db_labels describe the database), with the
    rotation refitted on that database when `refit_on_database`. A tie goes to the larger
    shrinkage (the more regularised): with 95 validation queries one query is a point, and no
    gain below that is real."""
    if not len(grid):
        raise VPRError("learned whitening: the shrinkage grid is empty")
    database = features if database is None else database
    shrinkages = sorted(set(float(g) for g in grid))
    _check_fit_arguments(shrinkages, dim)
    stats = _pair_statistics(features, pos_pairs, seed=0)  # shared by every shrinkage
    scores: dict[float, float] = {}
    fitted: dict[float, Whitening] = {}
    for s in shrinkages:
        fitted[s] = _whitening_of(stats, dim, s, whiten_rotation)
        if refit_on_database:
            fitted[s] = fitted[s].refit_rotation(database)
        result = evaluate_retrieval(fitted[s].apply(database), db_xyz, fitted[s].apply(val_features), val_xyz,
                                    pos_threshold_m, (1,), db_labels, val_labels)
        scores[s] = result.recalls[1]
    best = max(scores, key=lambda s: (scores[s], s))
    return ShrinkageChoice(best, scores, fitted[best])
