"""Retrieval evaluation, one implementation for validation, eval_trained and run_experiment:
exact search (faiss), Recall@N by the pair rule, per-group recall, PCA-whitening."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from vprkit.cli import VPRError
from vprkit.tables.pairs import (check_query_split, pair_relations, queries_with_positive, uses_labels,
                                 warn_shared_images)
from vprkit.tables.places import PlaceTable
from vprkit.tables.load import load_table


@dataclass
class RecallResult:
    recalls: dict[int, float]              # N -> Recall@N
    num_queries: int
    num_queries_without_positive: int
    pos_threshold_m: float
    top_indices: np.ndarray                # Q x K database indices, best first
    top_distances_m: np.ndarray            # Q x K metres from the query
    top_scores: np.ndarray                 # Q x K descriptor similarities
    correct: np.ndarray                    # Q x K: retrieved image within the threshold (or of the query's label)
    has_positive: np.ndarray               # Q: some database image within the threshold (or of the query's label)
    by_label: bool = False                 # correctness decided by place labels

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {f"recall@{n}": r for n, r in self.recalls.items()}
        out.update(num_queries=self.num_queries, num_queries_without_positive=self.num_queries_without_positive,
                   pos_threshold_m=self.pos_threshold_m, correct_by="label" if self.by_label else "distance")
        return out


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def recall_at_n(correct: np.ndarray, recall_at: Sequence[int]) -> dict[int, float]:
    """Recall@N from a Q x K correctness table (N beyond K means all K retrieved)."""
    if len(correct) == 0:
        return {n: float("nan") for n in recall_at}
    hits = np.logical_or.accumulate(correct, axis=1) if correct.shape[1] else np.zeros((len(correct), 1), bool)
    return {n: float(hits[:, min(n, max(hits.shape[1], 1)) - 1].mean()) for n in recall_at}


def exact_search(db_desc: np.ndarray, q_desc: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(Q x k database indices best first, their cosine similarities): exact inner-product search
    on L2-normalised descriptors (faiss). faiss keeps the right set under exact ties but may list
    tied items in any order; the order is made deterministic (lower database index first), so
    R@1 cannot depend on k."""
    import faiss

    db = l2_normalise(db_desc)
    index = faiss.IndexFlatIP(db.shape[1])
    index.add(db)
    scores, top = index.search(l2_normalise(q_desc), min(k, len(db)))
    order = np.lexsort((top, -scores), axis=1)
    return np.take_along_axis(top, order, axis=1), np.take_along_axis(scores, order, axis=1)


def evaluate_retrieval(
    db_desc: np.ndarray, db_xyz: np.ndarray | None, q_desc: np.ndarray, q_xyz: np.ndarray | None,
    pos_threshold_m: float = 25.0, recall_at: Sequence[int] = (1, 5, 10),
    db_labels: np.ndarray | None = None, q_labels: np.ndarray | None = None,
) -> RecallResult:
    """Exact search (faiss, inner product of L2-normalised descriptors), scored by
    score_retrieval (the pair rule training uses)."""
    if len(q_desc) == 0:
        raise VPRError("no queries to evaluate")
    if len(db_desc) == 0:
        raise VPRError("the database is empty")
    top, scores = exact_search(db_desc, q_desc, max(recall_at))
    return score_retrieval(top, scores, db_xyz, q_xyz, pos_threshold_m, recall_at, db_labels, q_labels)


def score_retrieval(
    top: np.ndarray, scores: np.ndarray, db_xyz: np.ndarray | None, q_xyz: np.ndarray | None,
    pos_threshold_m: float = 25.0, recall_at: Sequence[int] = (1, 5, 10),
    db_labels: np.ndarray | None = None, q_labels: np.ndarray | None = None,
) -> RecallResult:
    """Recall of a ranking (Q x K database indices best first, their scores; any search: exact,
    sequence matching, a fused re-ranking): a query is correct at N if any of its top-N database
    images is a positive of the query by pair_relations, the rule training uses: within
    pos_threshold_m or, when both sides have place labels, of the query's label (and within
    pos_threshold_m when there are positions too). Queries without any positive in the database
    count as misses and are counted. Distances are NaN without positions; an index -1 (no
    candidate) is never correct and has a NaN distance."""
    top = np.asarray(top, dtype=np.int64)
    found = top >= 0
    at = np.where(found, top, 0)
    by_label = db_labels is not None and q_labels is not None
    if not by_label and (db_xyz is None or q_xyz is None):
        raise VPRError("evaluation needs positions or place labels on both the database and the queries")
    positions = db_xyz is not None and q_xyz is not None
    dist = np.linalg.norm(db_xyz[at] - q_xyz[:, None, :], axis=2) if positions else np.full(top.shape, np.nan)
    dist = np.where(found, dist, np.nan)
    if not by_label:
        db_labels = q_labels = None
    take = lambda a, idx: None if a is None else np.asarray(a)[idx]  # noqa: E731
    correct, _ = pair_relations(take(q_xyz, np.s_[:, None]), take(db_xyz, at), take(q_labels, np.s_[:, None]),
                                take(db_labels, at), pos_threshold_m, pos_threshold_m)
    correct = correct & found
    has_positive = queries_with_positive(db_xyz, q_xyz, pos_threshold_m, db_labels, q_labels)
    return RecallResult(
        recalls=recall_at_n(correct, recall_at), num_queries=len(top),
        num_queries_without_positive=int((~has_positive).sum()), pos_threshold_m=pos_threshold_m,
        top_indices=top, top_distances_m=dist, top_scores=np.asarray(scores), correct=correct,
        has_positive=has_positive, by_label=by_label,
    )


def recall_by_group(result: RecallResult, groups: np.ndarray | None,
                    recall_at: Sequence[int]) -> dict[str, dict[int, float]]:
    """Recall@N per value of a query column (e.g. condition day / night)."""
    if groups is None:
        return {}
    return {str(g): recall_at_n(result.correct[groups == g], recall_at) for g in sorted(set(groups.tolist()))}


SKLEARN_PCA_MAX_DIM = 4096  # above: VLAD-sized descriptors, fitted on a row sample (Gram route)
PCA_GRAM_MAX_ROWS = 2048    # pca_by_eigh with N <= D fits on at most this many rows (a random subsample)


def pca_whitening_matrix(features: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) such that l2_normalise(features) @ W.T + b is PCA-whitened (fitted on the
    L2-normalised features); at most min(dim, N, D) rows. Exact (pca_by_eigh), so the residual
    head's PCA start and the pca_whitened rows agree to the digit: sklearn's automatic solver is
    randomized at these sizes (bgu val R@1 0.547 against 0.568 exact). Backbone-sized features
    (D <= 4096) are fitted on every row; VLAD-sized ones (K*C = 40,960 for effnet_lite0) through
    the Gram matrix of at most PCA_GRAM_MAX_ROWS rows (sklearn's randomized solver took 27-62 s on
    300-3,000 x 40,960 on 2 cores, pca_by_eigh about a second)."""
    # N centred points span at most N - 1 dimensions; whitening a (near) zero-variance axis
    # would blow it up and collapse every descriptor onto it, so such axes are dropped.
    dim = max(1, min(dim, features.shape[0] - 1, features.shape[1]))
    normalised = l2_normalise(features)
    max_rows = SKLEARN_PCA_MAX_DIM if features.shape[1] <= SKLEARN_PCA_MAX_DIM else PCA_GRAM_MAX_ROWS
    mean, components, variances = pca_by_eigh(normalised, dim, max_rows=max_rows)
    keep = variances > 1e-6 * variances[0]
    weight = (components[keep] / np.sqrt(variances[keep])[:, None]).astype(np.float32)
    return weight, (-mean @ weight.T).astype(np.float32)


def pca_by_eigh(x: np.ndarray, dim: int, max_rows: int = PCA_GRAM_MAX_ROWS, seed: int = 0,
                centre: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, components (dim, D), variances (dim,)) of (N, D) rows (centre=False: uncentred,
    mean zero: the top singular directions of the rows themselves), exact, from the smaller of
    the two symmetric eigenproblems: the D x D covariance when N > D, else the N x N Gram matrix
    of the centred rows (cost N^2 D; N capped at max_rows by a seeded random subsample).
    Hand-written because no sklearn solver takes the Gram route; signs fixed as sklearn does."""
    if x.shape[0] <= x.shape[1] and x.shape[0] > max_rows:
        x = x[np.sort(np.random.default_rng(seed).choice(x.shape[0], max_rows, replace=False))]
    mean = x.mean(axis=0, dtype=np.float64) if centre else np.zeros(x.shape[1])
    centred = (x - mean).astype(np.float32)
    scale = max(1, x.shape[0] - 1)
    if x.shape[0] > x.shape[1]:
        values, vectors = np.linalg.eigh((centred.T @ centred).astype(np.float64) / scale)
        order = np.argsort(values)[::-1][:dim]
        values, components = values[order], vectors[:, order].T
    else:  # the Gram matrix's eigenvectors u give the components X^T u / sqrt(eigenvalue * scale)
        values, vectors = np.linalg.eigh((centred @ centred.T).astype(np.float64) / scale)
        order = np.argsort(values)[::-1][:dim]
        values, vectors = values[order], vectors[:, order]
        components = (vectors.T @ centred) / np.sqrt(np.maximum(values, 1e-30) * scale)[:, None]
    variances = np.maximum(values, 0.0)
    signs = np.sign(components[np.arange(len(components)), np.abs(components).argmax(axis=1)])
    return mean, components * np.where(signs == 0, 1.0, signs)[:, None], variances


def fit_pca_whitening(db_features: np.ndarray, dim: int) -> Callable[[np.ndarray], np.ndarray]:
    """The classic frozen-feature baseline: PCA fitted on the database, whitened, L2-normalised.
    Returns the projection to apply to database and queries alike."""
    weight, bias = pca_whitening_matrix(db_features, dim)
    return lambda feats: l2_normalise(l2_normalise(feats) @ weight.T + bias)


# Reports: what eval_trained.py and run_experiment.py print and write for each variant.
@dataclass
class EvalReport:
    """One evaluated variant: the recall result plus its per-condition breakdown."""

    name: str
    result: RecallResult
    by_condition: dict[str, dict[int, float]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out = self.result.as_dict()
        if self.by_condition:
            out["by_condition"] = {c: {f"recall@{n}": r for n, r in rec.items()}
                                   for c, rec in self.by_condition.items()}
        return out


@dataclass
class Descriptors:
    """Database and query descriptors of one variant (raw, PCA-whitened or trained)."""

    database: np.ndarray
    queries: np.ndarray


def load_eval_tables(db_csv: str, test_csv: str, pos_threshold_m: float, supervision: str = "auto",
                     image_root: str | None = None, camera_id: str | None = None,
                     on_bad_image: str = "error") -> tuple[PlaceTable, PlaceTable]:
    """Database and queries (poses CSVs or embeddings parquets), checked: comparable
    positions, some query with a positive by the rule of `supervision`; queries that repeat
    database images are one warning line."""
    database = load_table(db_csv, image_root, camera_id, on_bad_image)
    queries = load_table(test_csv, image_root, camera_id, on_bad_image)
    check_queries(database, queries, pos_threshold_m, supervision)
    warn_shared_images(database, queries, "query")
    return database, queries


def check_queries(database: PlaceTable, queries: PlaceTable, pos_threshold_m: float, supervision: str) -> None:
    """Comparable tables, and some query with a positive by the rule of `supervision`."""
    check_query_split(database, queries, pos_threshold_m, uses_labels(supervision, database, queries))


def evaluate_variant(name: str, descriptors: Descriptors, database: PlaceTable, queries: PlaceTable,
                     pos_threshold_m: float, recall_at: Sequence[int], supervision: str = "auto") -> EvalReport:
    """Recall of one variant's exact search by the rule training used: labels when supervision says so."""
    if len(descriptors.queries) == 0:
        raise VPRError("no queries to evaluate")
    if len(descriptors.database) == 0:
        raise VPRError("the database is empty")
    top, scores = exact_search(descriptors.database, descriptors.queries, max(recall_at))
    return ranking_report(name, top, scores, database, queries, pos_threshold_m, recall_at, supervision)


def ranking_report(name: str, top: np.ndarray, scores: np.ndarray, database: PlaceTable, queries: PlaceTable,
                   pos_threshold_m: float, recall_at: Sequence[int], supervision: str = "auto") -> EvalReport:
    """The report of any ranking (exact search, sequence matching, a fused re-ranking: Q x K
    database rows best first and their scores), scored by score_retrieval with the rule of
    `supervision`, with its per-condition breakdown."""
    by_label = uses_labels(supervision, database, queries)
    result = score_retrieval(top, scores, database.xyz, queries.xyz, pos_threshold_m, recall_at,
                             database.labels if by_label else None, queries.labels if by_label else None)
    return EvalReport(name, result, recall_by_group(result, queries.conditions, recall_at))


def pca_whitened(raw: Descriptors, dim: int) -> Descriptors:
    project = fit_pca_whitening(raw.database, dim)
    return Descriptors(project(raw.database), project(raw.queries))


def format_report(report: EvalReport, recall_at: Sequence[int]) -> str:
    res = report.result
    has_distances = not np.isnan(res.top_distances_m).all()
    rule = ("of the query's place label" + (f" within {res.pos_threshold_m:g} m" if has_distances else "")
            if res.by_label else f"within {res.pos_threshold_m:g} m")
    lines = [f"{report.name}: {res.num_queries} queries, {res.num_queries_without_positive} without a database image "
             f"{rule} (counted as misses)"]
    header = f"  {'queries':<12}" + "".join(f"{'R@' + str(n):>8}" for n in recall_at)
    lines.append(header)
    lines.append(f"  {'all':<12}" + "".join(f"{res.recalls[n]:>8.3f}" for n in recall_at))
    for condition, rec in report.by_condition.items():
        lines.append(f"  {condition:<12}" + "".join(f"{rec[n]:>8.3f}" for n in recall_at))
    return "\n".join(lines)
