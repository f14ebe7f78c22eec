"""Where the residual head starts: exactly one frozen descriptor, chosen on validation.

Each start is a ResidualHead whose zero-initialised residual adds nothing, so the untrained head
IS that frozen descriptor (its epoch-0 validation R@1 is the descriptor's):

- raw: the identity (HeadConfig.identity_base), the raw descriptor at its own dimension, never
  cut to --projection_dim: the untrained head scores exactly the raw row (a 256-d projection of
  the raw feature scored below it on the cross-season railway set, issue 18).
- pca_whitened: PCA-whitening fitted on the training features, --projection_dim dimensions
  (vprkit.retrieval.evaluation.pca_whitening_matrix, exact).
- learned_whitened: whitening learned from the training set's positive pairs
  (vprkit.retrieval.whitening, Radenović et al. 2018), --projection_dim dimensions, its shrinkage chosen
  on validation R@1.

`choose_start` fits the candidates --head_start asks for (auto: all three) on the training
features, scores each head on validation (`score`: val queries against the validation database)
and keeps the best; a tie goes to the earlier of START_PREFERENCE. The candidates are the run's
own features: with --pooling gem / vlad those are the pooled descriptor (raw = raw VLAD).

`choose_pooling` (--pooling auto, training only) goes one level up: each of POOLING_CANDIDATES is
extracted (its own cache entry; vlad's vocabulary fitted on the training images) and given its
best start as above; the pooling whose start scores best on validation is the run's (a tie goes to
the earlier of POOLING_CANDIDATES), and the run then is exactly a run with that --pooling.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch.nn as nn
from vprkit.cli import VPRError
from vprkit.tables.pairs import positive_pairs
from vprkit.retrieval.whitening import choose_shrinkage

from trainable_vpr.heads import HeadConfig, ResidualHead, build_head

START_NAMES = ("raw", "pca_whitened", "learned_whitened")
START_PREFERENCE = ("pca_whitened", "learned_whitened", "raw")  # ties on val R@1 (one query = one point on bgu)


@dataclass
class FitData:
    """What the starts are fitted and chosen on: training features with their positions / labels
    (the pairs of learned whitening), the validation database and the validation queries."""

    train_features: np.ndarray
    train_xyz: np.ndarray | None
    train_labels: np.ndarray | None
    db_features: np.ndarray
    db_xyz: np.ndarray | None
    db_labels: np.ndarray | None
    val_features: np.ndarray
    val_xyz: np.ndarray | None
    val_labels: np.ndarray | None
    pos_threshold_m: float


@dataclass
class HeadStart:
    """One candidate start: its name, the head (untrained) and its config, the printed label
    (dimension, shrinkage) and its validation R@1 (NaN until scored)."""

    name: str
    head: nn.Module
    head_config: HeadConfig
    label: str
    val_r1: float = float("nan")
    shrinkage: float | None = None


@dataclass
class StartChoice:
    """The chosen start and every candidate compared (the log, summary and checkpoint record it)."""

    chosen: HeadStart
    candidates: dict[str, HeadStart]

    def record(self) -> dict[str, Any]:
        """The checkpoint's `head_start` entry (plain types: weights_only loading reads it)."""
        return {"chosen": self.chosen.name, "label": self.chosen.label, "shrinkage": self.chosen.shrinkage,
                "val_r1": {name: float(c.val_r1) for name, c in self.candidates.items()},
                "labels": {name: c.label for name, c in self.candidates.items()}}

    def text(self) -> str:
        """e.g. "learned_whitened (256-d, shrinkage 0.3); val R@1 raw (1280-d) 0.505, ..."."""
        return (f"{self.chosen.label}; val R@1 "
                + ", ".join(f"{c.label} {c.val_r1:.3f}" for c in self.candidates.values()))


def start_head(name: str, head_config: HeadConfig, data: FitData, seed: int = 0) -> HeadStart:
    """The untrained residual head that is exactly the frozen descriptor `name`."""
    if name == "raw":
        config = dataclasses.replace(head_config, type="residual", identity_base=True,
                                     projection_dim=head_config.in_dim)
        return HeadStart(name, build_head(config), config, f"raw ({config.in_dim}-d, the descriptor itself)")
    config = dataclasses.replace(head_config, type="residual", identity_base=False)
    head = build_head(config)
    assert isinstance(head, ResidualHead)
    if name == "pca_whitened":
        head.init_pca_whitening(data.train_features)
        return HeadStart(name, head, config, f"pca_whitened ({_out_dim(head)}-d, fitted on train)")
    if name == "learned_whitened":
        pairs = positive_pairs(data.train_xyz, data.train_labels, data.pos_threshold_m, seed=seed)
        choice = choose_shrinkage(data.train_features, pairs, data.db_xyz, data.val_features, data.val_xyz,
                                  data.pos_threshold_m, config.projection_dim, db_labels=data.db_labels,
                                  val_labels=data.val_labels, database=data.db_features)
        whitening = choice.whitening
        head.init_linear(whitening.projection, -(whitening.mean @ whitening.projection.T))
        return HeadStart(name, head, config, f"learned_whitened ({whitening.dim}-d, shrinkage "
                                             f"{choice.shrinkage:g}, fitted on train)", shrinkage=choice.shrinkage)
    raise ValueError(f"unknown head start {name}")


def _out_dim(head: ResidualHead) -> int:
    """The start's dimensions that carry information (PCA keeps at most min(P, N - 1, D))."""
    return int((head.base.weight.abs().sum(dim=1) > 0).sum())


def choose_start(asked: str, head_config: HeadConfig, data: FitData, score: Callable[[nn.Module], float],
                 seed: int = 0) -> StartChoice:
    """The start --head_start asks for (auto: the best of START_NAMES on validation), each
    candidate scored by `score` (its validation R@1) on the very head that would train, so the
    chosen one's score IS the run's epoch-0 validation R@1."""
    names = START_NAMES if asked == "auto" else (asked,)
    candidates = {name: start_head(name, head_config, data, seed) for name in names}
    for candidate in candidates.values():
        candidate.val_r1 = float(score(candidate.head))
    best = max(candidates.values(), key=lambda c: (c.val_r1, -START_PREFERENCE.index(c.name)))
    return StartChoice(best, candidates)


POOLING_CANDIDATES = ("backbone", "gem", "vlad")  # --pooling auto, in this order (a tie goes to the earlier)


def pooling_candidate(config: Any, pooling: str) -> Any:
    """The training config of one --pooling auto candidate: gem and vlad at the run's
    --feature_layer and --vlad_clusters, the backbone's own descriptor at its last layer."""
    return dataclasses.replace(config, pooling=pooling, feature_layer=-1 if pooling == "backbone"
                               else config.feature_layer)


@dataclass
class PoolingChoice:
    """--pooling auto: the chosen pooling and each candidate's start (StartChoice; None: the
    candidate could not be computed, `failed` says why)."""

    chosen: str
    starts: dict[str, StartChoice | None]
    labels: dict[str, str]  # "backbone", "gem L-1", "vlad L-1 K32"
    failed: dict[str, str] = dataclasses.field(default_factory=dict)
    # the winner's (training data, StartChoice, torch RNG state) as the comparison left them: train_vpr
    # goes on from them instead of extracting and fitting the start again (not part of record())
    prepared: Any = None

    def record(self) -> dict[str, Any]:
        """The checkpoint's `head_start["pooling"]` entry (plain types)."""
        done = {name: start for name, start in self.starts.items() if start is not None}
        return {"chosen": self.chosen, "val_r1": {name: float(s.chosen.val_r1) for name, s in done.items()},
                "starts": {name: s.chosen.name for name, s in done.items()}, "labels": dict(self.labels),
                "failed": dict(self.failed)}

    def text(self) -> str:
        """e.g. "pooling auto: backbone 0.663 (learned_whitened), gem L-1 0.540 (raw), ... -> backbone"."""
        parts = [f"{self.labels[name]} {start.chosen.val_r1:.3f} ({start.chosen.name})" if start is not None
                 else f"{self.labels[name]} skipped ({self.failed[name]})" for name, start in self.starts.items()]
        return f"pooling auto: {', '.join(parts)} -> {self.chosen}"


def choose_pooling(config: Any, start_of: Callable[[Any], StartChoice]) -> PoolingChoice:
    """The pooling of POOLING_CANDIDATES whose best start (`start_of(candidate config)`: extraction
    and choose_start) scores best on validation. A candidate that cannot be computed (VPRError, e.g.
    fewer local features than --vlad_clusters) is skipped and named; when none can, the first error
    stands."""
    starts: dict[str, StartChoice | None] = {}
    labels, failed, errors = {}, {}, []
    for pooling in POOLING_CANDIDATES:
        candidate = pooling_candidate(config, pooling)
        labels[pooling] = pooling if pooling == "backbone" else (
            f"{pooling} L{candidate.feature_layer}" + (f" K{candidate.vlad_clusters}" if pooling == "vlad" else ""))
        try:
            starts[pooling] = start_of(candidate)
        except VPRError as exc:
            starts[pooling], failed[pooling] = None, str(exc)
            errors.append(exc)
    done = [name for name in POOLING_CANDIDATES if starts[name] is not None]
    if not done:
        raise errors[0]
    best = max(done, key=lambda name: (starts[name].chosen.val_r1, -POOLING_CANDIDATES.index(name)))
    return PoolingChoice(best, starts, labels, failed)
