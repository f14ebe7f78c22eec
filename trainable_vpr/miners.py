"""Miners: which triplets a training batch learns from. One contract, pytorch-metric-learning
style: mine(embeddings, pos_mask, neg_mask, generator, ids, labels) -> (anchors, positives,
negatives), then reward(triplet_items, margin) with the per-triplet losses those triplets gave;
stats() is the miner's line in the run log (None: it logs nothing), state_dict() / load_state_dict()
what a resumable checkpoint keeps of it (None: nothing). The training loop knows only this `Miner`.

BatchMiner (--neg_sampler hard / random) mixes the hardest and random in-batch negatives;
UCBMiner (--neg_sampler ucb) lets a UCB1 bandit choose each negative's difficulty band (similarity
rank, or an external DifficultyTable) and learns from the reward which band teaches most now.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import pandas as pd
import torch

from vprkit.cli import VPRError
from vprkit.tables.places import IMAGE_ID_COLUMNS, find_column

Triplets = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (anchors, positives, negatives) batch indices


def batch_triplets(
    similarity: torch.Tensor, pos_mask: torch.Tensor, neg_mask: torch.Tensor,
    hard_neg_ratio: float, generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One triplet per (anchor, positive) pair whose anchor has a negative in the batch.

    A share hard_neg_ratio of them take the anchor's hardest negative (most similar), the
    rest a uniformly random negative.
    """
    anchors, positives = torch.nonzero(pos_mask & neg_mask.any(1, keepdim=True), as_tuple=True)
    if anchors.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long, device=similarity.device)
        return empty, empty, empty
    neg_sim = similarity.detach().masked_fill(~neg_mask, float("-inf"))
    hardest = neg_sim.argmax(dim=1)
    # Random negative: argmax of uniform noise over the allowed entries.
    noise = torch.rand(neg_mask.shape, generator=generator).to(similarity.device).masked_fill(~neg_mask, -1.0)
    random_neg = noise.argmax(dim=1)
    use_hard = torch.rand(anchors.numel(), generator=generator).to(similarity.device) < hard_neg_ratio
    negatives = torch.where(use_hard, hardest[anchors], random_neg[anchors])
    return anchors, positives, negatives


class Miner(Protocol):
    """What the training loop asks of a miner (see the module docstring)."""

    def mine(self, embeddings: torch.Tensor, pos_mask: torch.Tensor, neg_mask: torch.Tensor,
             generator: torch.Generator, ids: Sequence[str] = (), labels: np.ndarray | None = None) -> Triplets: ...

    def reward(self, triplet_items: torch.Tensor, margin: float) -> None: ...

    def stats(self) -> str | None: ...

    def state_dict(self) -> dict[str, Any] | None: ...

    def load_state_dict(self, state: dict[str, Any] | None) -> None: ...


class BatchMiner:
    """--neg_sampler hard / random: one triplet per (anchor, positive) pair; a share
    hard_neg_ratio take the anchor's hardest in-batch negative, the rest a random one."""

    def __init__(self, hard_neg_ratio: float):
        self.hard_neg_ratio = hard_neg_ratio

    def mine(self, embeddings: torch.Tensor, pos_mask: torch.Tensor, neg_mask: torch.Tensor,
             generator: torch.Generator, ids: Sequence[str] = (), labels: np.ndarray | None = None) -> Triplets:
        return batch_triplets(embeddings @ embeddings.T, pos_mask, neg_mask, self.hard_neg_ratio, generator)

    def reward(self, triplet_items: torch.Tensor, margin: float) -> None:
        """Nothing to learn: the mix of hard and random negatives is fixed."""

    def stats(self) -> str | None:
        return None  # nothing to log

    def state_dict(self) -> dict[str, Any] | None:
        return None  # stateless

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        pass


class UCB1Bandit:
    """UCB1 over `arms` arms. The first `warmup` draws go round-robin (every arm gets data);
    after that each draw takes argmax_i mean_i + sqrt(exploration * ln(total pulls) / pulls_i),
    an arm never rewarded first. Pure and deterministic: its state is a few numbers
    (state_dict / load_state_dict, for checkpoints)."""

    def __init__(self, arms: int, exploration: float = 2.0, warmup: int = 1000):
        if arms < 1:
            raise ValueError("a bandit needs at least one arm")
        self.exploration, self.warmup = exploration, warmup
        self.pulls = np.zeros(arms, dtype=np.int64)
        self.reward_sums = np.zeros(arms, dtype=np.float64)
        self.draws = 0

    @property
    def arms(self) -> int:
        return len(self.pulls)

    def mean_rewards(self) -> np.ndarray:
        return np.divide(self.reward_sums, self.pulls, out=np.zeros(self.arms), where=self.pulls > 0)

    def select(self) -> int:
        if self.draws < self.warmup:
            arm = self.draws % self.arms
        elif (self.pulls == 0).any():
            arm = int(np.flatnonzero(self.pulls == 0)[0])
        else:
            bonus = np.sqrt(self.exploration * math.log(self.pulls.sum()) / self.pulls)
            arm = int(np.argmax(self.mean_rewards() + bonus))
        self.draws += 1
        return arm

    def update(self, arm: int, reward: float) -> None:
        self.pulls[arm] += 1
        self.reward_sums[arm] += reward

    def state_dict(self) -> dict[str, Any]:
        return {"pulls": self.pulls.tolist(), "reward_sums": self.reward_sums.tolist(), "draws": self.draws}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pulls = np.asarray(state["pulls"], dtype=np.int64)
        self.reward_sums = np.asarray(state["reward_sums"], dtype=np.float64)
        self.draws = int(state["draws"])


def similarity_rank_bands(similarity: torch.Tensor, neg_mask: torch.Tensor, bands: int) -> torch.Tensor:
    """Band of each (anchor, negative) pair: the anchor's negatives ranked by similarity
    (most similar = hardest first) and cut into `bands` equal rank ranges, 0 = hardest.
    -1 where the pair is not a negative."""
    neg_sim = similarity.detach().masked_fill(~neg_mask, float("-inf"))
    rank = neg_sim.argsort(dim=1, descending=True, stable=True).argsort(dim=1, stable=True)
    count = neg_mask.sum(dim=1, keepdim=True).clamp(min=1)
    return torch.where(neg_mask, rank * bands // count, torch.full_like(rank, -1))


@dataclass
class DifficultyTable:
    """External difficulty bands (--difficulty_parquet): for an image id, the band of each
    neighbouring place label; labels not listed fall in the easiest band."""

    bands: dict[str, dict[str, int]]
    count: int

    def pair_bands(self, ids: Sequence[str], labels: np.ndarray, neg_mask: torch.Tensor) -> torch.Tensor:
        easiest = self.count - 1
        table = [[self.bands.get(a, {}).get(str(lab), easiest) for lab in labels] for a in ids]
        return torch.where(neg_mask, torch.tensor(table, dtype=torch.long), torch.full(neg_mask.shape, -1))


def load_difficulty_parquet(path: str | Path) -> DifficultyTable:
    """A parquet keyed by image id (image_id or an image column) with list columns
    neighbor_building_ids and neighbor_bands (band 0 = hardest) of equal length per row."""
    path = Path(path)
    if not path.is_file():
        raise VPRError(f"--difficulty_parquet {path}: file not found")
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001
        raise VPRError(f"--difficulty_parquet {path}: not a readable parquet file "
                       f"({str(exc).splitlines()[0][:160]})") from None
    id_col = find_column(frame.columns, IMAGE_ID_COLUMNS)
    missing = [c for c in ("neighbor_building_ids", "neighbor_bands") if c not in frame.columns]
    if id_col is None or missing:
        raise VPRError(f"--difficulty_parquet {path}: needs an image_id column and list columns neighbor_building_ids, "
                       f"neighbor_bands (missing: {', '.join(missing or ['image_id'])})")
    bands: dict[str, dict[str, int]] = {}
    for row, (key, ids, levels) in enumerate(zip(frame[id_col].astype(str), frame.neighbor_building_ids,
                                                 frame.neighbor_bands), 1):
        if ids is None or levels is None or len(ids) != len(levels) or any(int(b) < 0 for b in levels):
            raise VPRError(f"--difficulty_parquet {path}: row {row}: neighbor_building_ids and neighbor_bands must be "
                           "lists of equal length with bands >= 0")
        bands[key] = {str(i): int(b) for i, b in zip(ids, levels)}
    count = 1 + max((b for row in bands.values() for b in row.values()), default=0)
    return DifficultyTable(bands, count + 1)  # + the band of places not listed


class UCBMiner:
    """Triplets whose negative band a UCB1 bandit chooses per draw, rewarded by the triplet
    loss the draw produced (scaled to [0, 1]): the bandit learns which difficulty teaches
    most now. Bands: similarity rank in the current embedding space (default), or an
    external DifficultyTable."""

    def __init__(self, bands: int = 3, exploration: float = 2.0, warmup: int = 1000,
                 difficulty: DifficultyTable | None = None):
        self.difficulty = difficulty
        self.bandit = UCB1Bandit(difficulty.count if difficulty else bands, exploration, warmup)
        self.last_arms = torch.zeros(0, dtype=torch.long)

    def mine(self, embeddings: torch.Tensor, pos_mask: torch.Tensor, neg_mask: torch.Tensor,
             generator: torch.Generator, ids: Sequence[str] = (), labels: np.ndarray | None = None) -> Triplets:
        """One triplet per (anchor, positive) pair, its negative from the band the bandit draws
        (remembered for reward). A draw whose band is empty for its anchor takes the nearest band
        that has a negative (and is credited to that band)."""
        if self.difficulty is not None:
            bands = self.difficulty.pair_bands(ids, labels, neg_mask)
        else:
            bands = similarity_rank_bands(embeddings @ embeddings.T, neg_mask, self.bandit.arms)
        anchors, positives = torch.nonzero(pos_mask & neg_mask.any(1, keepdim=True), as_tuple=True)
        # per anchor, once: the bands it has negatives in (an anchor has several positives)
        present_bands = {a: torch.unique(bands[a][bands[a] >= 0]) for a in set(anchors.tolist())}
        negatives, arms = [], []
        for anchor in anchors.tolist():
            wanted = self.bandit.select()
            present = present_bands[anchor]
            arm = int(present[(present - wanted).abs().argmin()])
            choices = torch.nonzero(bands[anchor] == arm).flatten()
            negatives.append(int(choices[torch.randint(len(choices), (1,), generator=generator)]))
            arms.append(arm)
        self.last_arms = torch.tensor(arms, dtype=torch.long)
        return anchors, positives, torch.tensor(negatives, dtype=torch.long)

    def reward(self, triplet_items: torch.Tensor, margin: float) -> None:
        """Credit each arm drawn by the last mine() with its triplet's loss, scaled to [0, 1]
        (a triplet loss on normalised embeddings lies in [0, 2 + margin])."""
        for arm, loss in zip(self.last_arms.tolist(), (triplet_items.detach() / (2.0 + margin)).tolist()):
            self.bandit.update(arm, loss)

    def stats(self) -> str:
        """Per-band pulls and mean rewards, for the run log (the ucb_stats column)."""
        means = ", ".join(f"{m:.4f}" for m in self.bandit.mean_rewards())
        return f"pulls=[{', '.join(str(int(p)) for p in self.bandit.pulls)}]; mean_reward=[{means}]"

    def state_dict(self) -> dict[str, Any] | None:
        return self.bandit.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self.bandit.load_state_dict(state)
