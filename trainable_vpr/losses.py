"""In-batch pairs and the hybrid loss (per-item losses; the miners: trainable_vpr/miners.py)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from vprkit.cli import VPRError
from trainable_vpr.miners import Triplets
from vprkit.tables.pairs import pair_relations


def batch_pair_masks(xyz: torch.Tensor | np.ndarray | None, pos_threshold_m: float, neg_threshold_m: float,
                     labels: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """In-batch relations (B x B, B is a batch, not the data set) by pair_relations: the
    ignore zone in neither mask; no self pairs."""
    xyz = None if xyz is None else np.asarray(xyz, dtype=np.float64)
    count = len(xyz) if xyz is not None else len(labels)
    column = lambda a: None if a is None else a[:, None]  # noqa: E731
    row = lambda a: None if a is None else a[None, :]  # noqa: E731
    pos, neg = pair_relations(column(xyz), row(xyz), column(labels), row(labels), pos_threshold_m, neg_threshold_m)
    eye = np.eye(count, dtype=bool)
    return torch.from_numpy(pos & ~eye), torch.from_numpy(neg & ~eye)


def select_positives_by_feature(pos_mask: torch.Tensor, frozen: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep, per anchor, only its top_k GPS positives most similar in frozen-feature space.

    GPS is a weak label (a phone within 25 m may face another way); as in NetVLAD training,
    the frozen features pick which GPS neighbours really show the same place."""
    frozen = F.normalize(frozen, dim=-1)
    sim = (frozen @ frozen.T).masked_fill(~pos_mask, float("-inf"))
    k = min(top_k, sim.shape[1])
    top = sim.topk(k, dim=1).indices
    keep = torch.zeros_like(pos_mask).scatter_(1, top, True)
    return keep & pos_mask


@dataclass
class LossParts:
    """A batch's loss and its two parts (means), with the per-item losses they are reduced from:
    one per mined triplet (the UCB miner's reward) and one per anchor that has a positive."""

    total: torch.Tensor
    triplet: torch.Tensor
    contrastive: torch.Tensor
    triplet_items: torch.Tensor
    contrastive_items: torch.Tensor


LOSS_DISTANCES = ("euclidean", "cosine")


class HybridLoss(nn.Module):
    """triplet_weight * triplet + contrastive_weight * multi-positive InfoNCE, GPS-supervised.

    pytorch-metric-learning computes both from index tuples, per item (DoNothingReducer):
    TripletMarginLoss on the mined triplets, SupConLoss on the positive/negative pairs, so pairs
    in the ignore zone are in neither sum. Both means are taken here: over triplets, and over the
    anchors that have positives (pml's default reducer would also drop anchors whose loss is 0).
    """

    def __init__(self, triplet_margin: float = 0.5, temperature: float = 0.07, triplet_weight: float = 0.3,
                 contrastive_weight: float = 1.0, distance: str = "euclidean"):
        super().__init__()
        from pytorch_metric_learning import distances, losses, reducers

        if distance not in LOSS_DISTANCES:
            raise VPRError(f"--loss_distance {distance}: choose one of {', '.join(LOSS_DISTANCES)}")
        metric = (distances.LpDistance(normalize_embeddings=True) if distance == "euclidean"
                  else distances.CosineSimilarity())
        self.triplet = losses.TripletMarginLoss(margin=triplet_margin, distance=metric,
                                                reducer=reducers.DoNothingReducer())
        self.contrastive = losses.SupConLoss(temperature=temperature, reducer=reducers.DoNothingReducer())
        self.margin, self.distance = triplet_margin, distance
        self.triplet_weight, self.contrastive_weight = triplet_weight, contrastive_weight

    def forward(self, embeddings: torch.Tensor, pos_mask: torch.Tensor, neg_mask: torch.Tensor,
                triplets: Triplets) -> LossParts:
        """triplets: a miner's (anchors, positives, negatives) for the triplet part; the InfoNCE
        part uses every positive and negative pair of the masks."""
        a1, p = torch.nonzero(pos_mask, as_tuple=True)
        a2, n = torch.nonzero(neg_mask, as_tuple=True)
        zero = embeddings.sum() * 0.0  # keeps the graph when a part has nothing to learn from
        no_items = embeddings.new_zeros(0)
        if triplets[0].numel():
            triplet_items = self.triplet(embeddings, indices_tuple=triplets)["loss"]["losses"]
            triplet = torch.mean(triplet_items)
        else:
            triplet_items, triplet = no_items, zero
        if a1.numel() and a2.numel():
            per_anchor = self.contrastive(embeddings, indices_tuple=(a1, p, a2, n))["loss"]["losses"]
            contrastive_items = per_anchor[pos_mask.any(dim=1)]
            contrastive = contrastive_items.mean()
        else:
            contrastive_items, contrastive = no_items, zero
        total = self.triplet_weight * triplet + self.contrastive_weight * contrastive
        return LossParts(total, triplet, contrastive, triplet_items, contrastive_items)
