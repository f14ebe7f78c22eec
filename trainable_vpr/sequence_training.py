"""Training the sequence head over a route's cached frame descriptors (issue 24, item 3).

The data are three RouteFrames bundles (frame descriptors [N, D] extracted once through the
feature cache, the Route, positions [N, 3]): train (both drives / conditions), val (queries) and
val_db (its database). A window is an index array into the frames (vprkit.routes.windows); a batch
gathers its frames, so no [N, L, D] copy is made. A window is where its END frame is (the frame it
localises): positives are windows whose end frames lie within pos_threshold_m (across drives),
negatives beyond neg_threshold_m, by THE pair rule (trainable_vpr.losses.batch_pair_masks).

`choose_sequence_start` picks the frame start on val windows (raw, PCA-whitened, learned-whitened at
each shrinkage); `train_sequence_head` trains from it with the suite's hybrid loss, batch miner and
hard-negative places mined over window descriptors, validates every epoch (val windows against
val_db windows, R@1 at pos_threshold_m) and keeps the best state only when it beats the start
(epoch 0). No image is decoded: an epoch is a few seconds on a CPU.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from vprkit.retrieval.evaluation import RecallResult, evaluate_retrieval
from trainable_vpr.miners import BatchMiner
from vprkit.tables.pairs import cluster_places
from vprkit.routes.order import Route
from vprkit.routes.windows import causal_windows
from vprkit.retrieval.whitening import SHRINKAGE_GRID, Whitening

from trainable_vpr.losses import HybridLoss, batch_pair_masks
from trainable_vpr.mining import hard_negative_places, make_place_batches, mine_hard_negatives
from trainable_vpr.seqnet import (FRAME_STARTS, SeqHeadConfig, SeqNetHead, fit_frame_whitenings,
                                  start_sequence_head)


@dataclass
class RouteFrames:
    """One split of a route: cached frame descriptors [N, D], its order, positions [N, 3]."""

    features: np.ndarray
    route: Route
    xyz: np.ndarray


@dataclass(frozen=True)
class SeqTrainConfig:
    """The training flags of the sequence head (the loss and miner ones mean what train_vpr's do).

    steps: the frame steps training windows are drawn with, one per window at random (1: the
    route's own speed; (1, 2): also windows of a drive twice as fast, velocity robustness).
    train_projection: also train the per-frame linear map (D x d weights); False keeps the start's
    whitening and projects the route's frames once (an epoch then costs a fraction).
    """

    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 64
    images_per_place: int = 2
    pos_threshold_m: float = 25.0
    neg_threshold_m: float = 100.0
    hard_neg_ratio: float = 0.5
    triplet_margin: float = 0.5
    temperature: float = 0.07
    triplet_weight: float = 0.3
    steps: tuple[int, ...] = (1,)
    train_projection: bool = False


@dataclass
class SequenceResult:
    """What a training run hands over: the head in its best state (the start when nothing beat it),
    its config (checkpoints store `config.as_dict()`), epoch 0's and every epoch's val R@1 and mean
    training loss, the kept epoch (0: the start), mean seconds per epoch, and the start choice's val
    R@1 per candidate."""

    head: SeqNetHead
    config: SeqHeadConfig
    start_val_r1: float
    val_r1: list[float]
    best_epoch: int
    epoch_seconds: float
    train_loss: list[float] = field(default_factory=list)
    start_scores: dict[str, float] = field(default_factory=dict)
    fusion_weight: float | None = None

    @property
    def best_val_r1(self) -> float:
        return max([self.start_val_r1, *self.val_r1])

    def record(self) -> dict[str, Any]:
        """Plain types for a checkpoint or a JSON."""
        return {"head": self.config.as_dict(), "start_val_r1": self.start_val_r1, "val_r1": list(self.val_r1),
                "train_loss": list(self.train_loss), "best_epoch": self.best_epoch, "epoch_seconds": self.epoch_seconds,
                "start_scores": dict(self.start_scores), "fusion_weight": self.fusion_weight}


@torch.no_grad()
def project_frames(head: SeqNetHead, features: np.ndarray, batch_size: int = 4096) -> torch.Tensor:
    """Every frame through the head's per-frame linear map, once: [N, d]."""
    parts = [head.project(torch.from_numpy(np.asarray(features[i:i + batch_size], dtype=np.float32)))
             for i in range(0, len(features), batch_size)]
    return torch.cat(parts) if parts else torch.zeros(0, head.config.proj_dim)


@torch.no_grad()
def describe_windows(head: SeqNetHead, features: np.ndarray, windows: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """The head's descriptors [W, out] of windows (int [W, L] rows of `features`): each frame is
    projected once, windows gather the projections per batch."""
    head.eval()
    projected = project_frames(head, features)
    parts = [head.from_projected(projected[torch.from_numpy(windows[i:i + batch_size])])
             for i in range(0, len(windows), batch_size)]
    return torch.cat(parts).numpy() if parts else np.zeros((0, head.output_dim), np.float32)


def window_recall(head: SeqNetHead, queries: RouteFrames, database: RouteFrames, pos_threshold_m: float,
                  recall_at: Sequence[int] = (1, 5, 10)) -> RecallResult:
    """Every query row's window against every database row's window (causal, the head's seq_len),
    correct by the end frames' positions (vprkit.retrieval.evaluation.evaluate_retrieval)."""
    seq_len = head.config.seq_len
    q = describe_windows(head, queries.features, causal_windows(queries.route, seq_len))
    db = describe_windows(head, database.features, causal_windows(database.route, seq_len))
    return evaluate_retrieval(db, database.xyz, q, queries.xyz, pos_threshold_m, recall_at)


def choose_sequence_start(config: SeqHeadConfig, train: RouteFrames, val: RouteFrames, val_db: RouteFrames,
                          pos_threshold_m: float, starts: Sequence[str] = FRAME_STARTS,
                          shrinkages: Sequence[float] = SHRINKAGE_GRID, seed: int = 0,
                          whitenings: dict[float, Whitening] | None = None
                          ) -> tuple[SeqNetHead, SeqHeadConfig, dict[str, float]]:
    """The untrained head with the best val window R@1 among the frame starts (learned whitening: at
    each shrinkage; `whitenings` if given, fitted at config.proj_dim, else fitted here): (head, its
    config, every candidate's val R@1). Ties go to the earlier candidate. Chosen on the sequence
    score itself: the single-frame R@1 of a cross-season route is too small (about 0.03) to choose by."""
    if whitenings is None and "learned_whitened" in starts:
        whitenings = fit_frame_whitenings(train.features, train.xyz, pos_threshold_m, config.proj_dim, shrinkages,
                                          seed)
    candidates: list[SeqHeadConfig] = []
    for start in starts:
        grid = sorted(whitenings) if start == "learned_whitened" else [None]
        candidates += [dataclasses.replace(config, frame_start=start, shrinkage=s) for s in grid]
    scores: dict[str, float] = {}
    best: tuple[float, SeqNetHead, SeqHeadConfig] | None = None
    for candidate in candidates:
        whitening = None if candidate.shrinkage is None else whitenings[candidate.shrinkage]
        head = start_sequence_head(candidate, train.features, train.xyz, pos_threshold_m, seed, whitening)
        r1 = window_recall(head, val, val_db, pos_threshold_m, (1,)).recalls[1]
        scores[start_label(candidate)] = r1
        if best is None or r1 > best[0]:
            best = (r1, head, candidate)
    assert best is not None, "no frame start to choose from"
    return best[1], best[2], scores


def start_label(config: SeqHeadConfig) -> str:
    """e.g. "learned_whitened s=0.3", "raw"."""
    return config.frame_start + ("" if config.shrinkage is None else f" s={config.shrinkage:g}")


def training_windows(route: Route, seq_len: int, steps: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """int [N, L]: each row's causal window at a step drawn from `steps` (this epoch's windows)."""
    by_step = np.stack([causal_windows(route, seq_len, step) for step in steps])
    return by_step[rng.integers(len(steps), size=len(route)), np.arange(len(route))]


@dataclass
class EpochRecord:
    """What `train_sequence_head` reports after each validation (epoch 0: the untrained start):
    the val windows' recall, the mean training loss and seconds (NaN, 0 at epoch 0), whether this
    state is now the kept (best) one."""

    epoch: int
    val: RecallResult
    loss: float = math.nan
    seconds: float = 0.0
    kept: bool = False


def train_sequence_head(train: RouteFrames, val: RouteFrames, val_db: RouteFrames, head: SeqNetHead,
                        config: SeqTrainConfig, seed: int = 0,
                        log: Callable[[str], None] = lambda line: None,
                        on_epoch: Callable[[EpochRecord], None] | None = None,
                        recall_at: Sequence[int] = (1,)) -> SequenceResult:
    """Train `head` (its untrained state is epoch 0, scored and logged) for config.epochs epochs;
    the result holds the state with the best val R@1, the start unless an epoch beats it.
    `on_epoch` gets every validation (R@N at `recall_at`), epoch 0 included; it may raise to stop."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    seq_len = head.config.seq_len
    places = cluster_places(train.xyz, config.pos_threshold_m)
    loss_fn = HybridLoss(config.triplet_margin, config.temperature, config.triplet_weight)
    miner = BatchMiner(config.hard_neg_ratio)
    if not config.train_projection and head.config.arch == "shared":
        head.frame.base.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=config.lr,
                                  weight_decay=config.weight_decay)
    on_epoch = on_epoch or (lambda record: None)
    recall_at = tuple(sorted({1, *recall_at}))
    start = window_recall(head, val, val_db, config.pos_threshold_m, recall_at)
    start_r1 = start.recalls[1]
    log(f"epoch 0 (start): val R@1 {start_r1:.3f}")
    on_epoch(EpochRecord(0, start, kept=True))
    best_r1, best_epoch, best_state = start_r1, 0, copy.deepcopy(head.state_dict())
    history, losses, seconds = [], [], []
    for epoch in range(1, config.epochs + 1):
        tick = time.perf_counter()
        loss = train_one_epoch(head, train, places, training_windows(train.route, seq_len, config.steps, rng),
                               loss_fn, miner, optimizer, config, rng, generator)
        seconds.append(time.perf_counter() - tick)
        result = window_recall(head, val, val_db, config.pos_threshold_m, recall_at)
        r1 = result.recalls[1]
        history.append(r1)
        losses.append(loss)
        kept = r1 > best_r1
        if kept:
            best_r1, best_epoch, best_state = r1, epoch, copy.deepcopy(head.state_dict())
        log(f"epoch {epoch}: loss {loss:.4f}, val R@1 {r1:.3f}{' (best)' if kept else ''}, {seconds[-1]:.1f} s")
        on_epoch(EpochRecord(epoch, result, loss, seconds[-1], kept))
    head.load_state_dict(best_state)
    head.eval()
    return SequenceResult(head, head.config, start_r1, history, best_epoch,
                          float(np.mean(seconds)) if seconds else 0.0, losses)


def train_one_epoch(head: SeqNetHead, train: RouteFrames, places: np.ndarray, windows: np.ndarray,
                    loss_fn: HybridLoss, miner: BatchMiner, optimizer: torch.optim.Optimizer,
                    config: SeqTrainConfig, rng: np.random.Generator, generator: torch.Generator) -> float:
    """One pass: place batches (with hard-negative places mined over this epoch's window descriptors),
    the hybrid loss on each; returns the mean loss."""
    hard_places = None
    if config.hard_neg_ratio > 0:
        hard = mine_hard_negatives(describe_windows(head, train.features, windows), train.xyz,
                                   config.neg_threshold_m, pos_threshold_m=config.pos_threshold_m)
        hard_places = hard_negative_places(places, hard)
    batches = make_place_batches(places, config.batch_size, config.images_per_place,
                                 math.ceil(len(windows) / config.batch_size), rng, hard_places, config.hard_neg_ratio)
    projected = None if config.train_projection else project_frames(head, train.features)
    head.train()
    losses = []
    for batch in batches:
        if projected is None:
            embeddings = head(torch.from_numpy(np.ascontiguousarray(train.features[windows[batch]], np.float32)))
        else:
            embeddings = head.from_projected(projected[torch.from_numpy(windows[batch])])
        pos_mask, neg_mask = batch_pair_masks(train.xyz[batch], config.pos_threshold_m, config.neg_threshold_m)
        triplets = miner.mine(embeddings.detach(), pos_mask, neg_mask, generator)
        parts = loss_fn(embeddings, pos_mask, neg_mask, triplets)
        optimizer.zero_grad(set_to_none=True)
        parts.total.backward()
        optimizer.step()
        losses.append(parts.total.item())
    return float(np.mean(losses)) if losses else float("nan")
