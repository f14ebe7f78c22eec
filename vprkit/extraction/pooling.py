"""Descriptors pooled from a frozen backbone's local features: GeM and AnyLoc-style VLAD at any layer.

What a *layer* is (the `--feature_layer` index; negative counts from the end, -1 is the default):
  * the layers are the entries of timm's `model.feature_info`, in order, so layer 0 is the first:
    a ViT has one per transformer block (layer 0 = block 0), a CNN one per feature stage
    (EfficientNet-Lite0: 16 ch at stride 2, 24/4, 40/8, 112/16, then the last);
  * the LAST layer is always the backbone's own final feature map, exactly what
    `model.forward_features` returns (its patch tokens for a ViT). For a ViT that is the last block
    passed through the final norm. For EfficientNet it is the 1x1 head conv (1280 ch at stride 32)
    that follows the last stage, so that stage's own 320-ch output is not a layer;
  * an intermediate ViT layer is its block's tokens passed through the model's final norm
    (timm's `forward_intermediates(norm=True)`, as DINOv2's `get_intermediate_layers` does by
    default), so every layer is normalised the same way and the last one is no special case;
  * CLS, distillation and register tokens (timm's `num_prefix_tokens`) are not patch tokens and
    are dropped; local features are returned as (B, N, C) tokens for CNNs and ViTs alike;
  * there is no "all layers" value: a layer is one index, checked against the range
    (SALAD and BoQ slice `blocks[-n:]`, which with n = 0 is every block).
Intermediate layers run the model only up to that layer (timm's `stop_early=True`).

Pooling: `gem` (generalised mean over tokens, not normalised, like the backbone's own pooled
vector: whatever consumes the cache normalises) and `vlad` (hard assignment to a k-means
vocabulary by cosine, residuals summed per cluster, intra- and L2-normalised; AnyLoc, Keetha et
al. 2023). The vocabulary is fitted with faiss k-means on a bounded sample of local features.
"""
from __future__ import annotations

import hashlib
import inspect
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from vprkit.retrieval.evaluation import l2_normalise

from vprkit.cli import VPRError

POOLINGS = ("backbone", "gem", "vlad")
DEFAULT_VOCABULARY_SAMPLE = 50_000  # local features kept overall to fit a vocabulary
KMEANS_ITERATIONS = 30


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PoolingConfig:
    """How the cached descriptor is pooled (`--pooling`, `--feature_layer`, `--vlad_clusters`)."""

    pooling: str = "backbone"
    feature_layer: int = -1
    vlad_clusters: int = 32
    gem_p: float = 3.0

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise VPRError(f"--pooling {self.pooling}: unknown pooling; choose one of {', '.join(POOLINGS)}")
        if isinstance(self.feature_layer, bool) or not isinstance(self.feature_layer, (int, np.integer)):
            raise VPRError(f"--feature_layer {self.feature_layer!r}: give one layer index (an integer; -1 is the last)")
        if self.pooling == "backbone" and self.feature_layer != -1:
            raise VPRError(f"--feature_layer {self.feature_layer}: the backbone's own descriptor uses its last layer; "
                           f"add --pooling gem or --pooling vlad to pool another layer")
        if isinstance(self.vlad_clusters, bool) or not isinstance(self.vlad_clusters, (int, np.integer)) \
                or self.vlad_clusters < 1:
            raise VPRError(f"--vlad_clusters {self.vlad_clusters}: give a positive number of clusters (e.g. 32 or 64)")
        if not (math.isfinite(self.gem_p) and self.gem_p > 0):
            raise VPRError(f"GeM p {self.gem_p}: give a positive finite exponent (3 is the usual)")

    def cache_tag(self, num_layers: int) -> str:
        """A short stable string for the feature-cache key (the caller adds the vocabulary's
        fingerprint for vlad). The layer is resolved against the backbone's `num_layers`, so -1 and
        its absolute index share one cache."""
        if self.pooling == "backbone":
            return "backbone"
        layer = resolve_layer(num_layers, self.feature_layer)
        if self.pooling == "gem":
            return f"gem-p{self.gem_p:g}-L{layer}"
        return f"vlad-k{self.vlad_clusters}-L{layer}"


def resolve_layer(num_layers: int, layer: int) -> int:
    """The absolute index of `layer` among `num_layers` (negative counts from the end)."""
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise VPRError(f"--feature_layer {layer!r}: give one layer index (an integer; -1 is the last)")
    if not -num_layers <= layer < num_layers:
        raise VPRError(f"--feature_layer {layer}: out of range for this backbone's {num_layers} layers; "
                       f"use 0..{num_layers - 1} or -{num_layers}..-1 (-1, the default, is the last)")
    return int(layer) % num_layers


# ----------------------------------------------------------------------------------------------
# Local features
# ----------------------------------------------------------------------------------------------
def _has_intermediates(model: nn.Module) -> bool:
    return bool(getattr(model, "feature_info", None)) and hasattr(model, "forward_intermediates")


def num_feature_layers(model: nn.Module) -> int:
    """How many layers `local_features` can read: timm's feature_info entries, or 1 (the last
    only) for an architecture without timm's intermediate-feature API."""
    return len(model.feature_info) if _has_intermediates(model) else 1


def layer_channels(model: nn.Module, layer: int) -> int:
    """Channels C of the local features at `layer` (the last: the model's num_features)."""
    index = resolve_layer(num_feature_layers(model), layer)
    if index == num_feature_layers(model) - 1:
        return int(model.num_features)
    return int(model.feature_info[index]["num_chs"])


def _map_to_tokens(features: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """(B, C, H, W), or (B, H, W, C) when channels_last, as (B, H*W, C). Through permute: free
    for a channels_last-strided NCHW tensor (what extraction feeds), one copy otherwise."""
    if not channels_last:
        features = features.permute(0, 2, 3, 1)
    return features.reshape(features.shape[0], -1, features.shape[-1])


def local_features(model: nn.Module, images: torch.Tensor, layer: int = -1) -> torch.Tensor:
    """Local features (B, N, C) of `images` at `layer` (see the module docstring): a CNN's map
    positions or a ViT's patch tokens, prefix tokens dropped."""
    num_layers = num_feature_layers(model)
    index = resolve_layer(num_layers, layer)
    if index == num_layers - 1:
        features = model.forward_features(images)
        if features.ndim == 3:  # tokens: drop CLS / distillation / register tokens
            return features[:, int(getattr(model, "num_prefix_tokens", 0)):]
        if features.ndim == 4:
            return _map_to_tokens(features, getattr(model, "output_fmt", "NCHW") == "NHWC")
        raise VPRError(f"--pooling: this backbone's last layer has no local features (shape "
                       f"{tuple(features.shape)}); use --pooling backbone")
    kwargs = {"indices": [index], "stop_early": True, "intermediates_only": True}
    if "norm" in inspect.signature(model.forward_intermediates).parameters:
        kwargs["norm"] = True
    # timm's intermediates are NCHW for CNNs and ViTs alike (patch tokens reshaped, prefix dropped)
    (features,) = model.forward_intermediates(images, **kwargs)
    return _map_to_tokens(features, channels_last=False)


# ----------------------------------------------------------------------------------------------
# Pooling
# ----------------------------------------------------------------------------------------------
def gem(local: torch.Tensor, p: float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """Generalised mean over the tokens of (B, N, C): (mean clamp(x, eps)^p)^(1/p), in float32.
    Not normalised: like the backbone's own pooled descriptor, what reads the cache normalises."""
    return local.float().clamp(min=eps).pow(p).mean(dim=1).pow(1.0 / p)


def vlad(local: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """AnyLoc-style hard-assignment VLAD of (B, N, C) tokens over (K, C) centroids -> (B, K*C).

    Tokens and centroids are L2-normalised; each token goes to its most cosine-similar centroid;
    per cluster the residuals (token - centroid) are summed, each cluster's vector is
    L2-normalised (intra-normalisation), then the flattened vector is. An empty cluster
    contributes zeros. Memory O(B*N*C + B*K*C + B*N*K); no loop over tokens (scatter_add).
    """
    tokens = F.normalize(local.float(), dim=-1)
    centres = F.normalize(centroids.to(tokens.device, torch.float32), dim=-1)
    batch, num_tokens, channels = tokens.shape
    clusters = centres.shape[0]
    if centres.shape[1] != channels:
        raise VPRError(f"--pooling vlad: the vocabulary has {centres.shape[1]}-d centroids but the local features "
                       f"are {channels}-d; refit it for this --model and --feature_layer")
    assign = (tokens @ centres.T).argmax(dim=-1)                                    # (B, N)
    sums = tokens.new_zeros(batch, clusters, channels).scatter_add_(
        1, assign.unsqueeze(-1).expand(batch, num_tokens, channels), tokens)        # (B, K, C)
    counts = tokens.new_zeros(batch, clusters).scatter_add_(1, assign, tokens.new_ones(batch, num_tokens))
    residuals = sums - counts.unsqueeze(-1) * centres                              # sum of (x - c)
    residuals = F.normalize(residuals, dim=-1)  # zero stays zero (normalize divides by max(norm, eps))
    return F.normalize(residuals.flatten(1), dim=-1)


# ----------------------------------------------------------------------------------------------
# Vocabulary
# ----------------------------------------------------------------------------------------------
def tokens_per_image(num_images: int, budget: int = DEFAULT_VOCABULARY_SAMPLE) -> int:
    """How many local features to keep from each image so that all images keep about `budget`."""
    return max(1, math.ceil(budget / max(1, num_images)))


def sample_tokens(local: torch.Tensor, per_image: int, generator: torch.Generator) -> torch.Tensor:
    """A random subset of each image's tokens, (B * min(per_image, N), C) float32 on the CPU.
    `generator` (a CPU torch.Generator) makes the sample reproducible."""
    batch, num_tokens, _ = local.shape
    keep = min(per_image, num_tokens)
    order = torch.rand(batch, num_tokens, generator=generator).argsort(dim=1)[:, :keep].to(local.device)
    # gather on the device, then copy only the kept tokens (not every token of the batch) to the CPU
    picked = torch.gather(local.detach(), 1, order.unsqueeze(-1).expand(-1, -1, local.shape[-1])).float().cpu()
    return picked.reshape(-1, local.shape[-1])


def fit_vlad_vocabulary(samples: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """(K, C) float32 unit centroids: spherical faiss k-means on the L2-normalised samples (M, C).
    Deterministic for a given seed; all samples are used (no faiss subsampling)."""
    import faiss

    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim != 2:
        raise ValueError(f"vocabulary samples must be (M, C), got shape {samples.shape}")
    if samples.shape[0] < k:
        raise VPRError(f"--vlad_clusters {k}: only {samples.shape[0]} local features to fit the vocabulary on; "
                       f"lower --vlad_clusters or give more images")
    if not np.isfinite(samples).all():
        raise VPRError("--pooling vlad: the sampled local features contain NaN or inf; check the backbone "
                       "weights and --precision")
    samples = np.ascontiguousarray(l2_normalise(samples))
    kmeans = faiss.Kmeans(samples.shape[1], k, niter=KMEANS_ITERATIONS, seed=seed, spherical=True, verbose=False,
                          min_points_per_centroid=1, max_points_per_centroid=math.ceil(samples.shape[0] / k) + 1)
    kmeans.train(samples)
    return np.ascontiguousarray(kmeans.centroids, dtype=np.float32)


def vocabulary_fingerprint(centroids: np.ndarray | torch.Tensor) -> str:
    """16 hex characters identifying a vocabulary (shape and float32 values), for cache keys."""
    array = np.ascontiguousarray(torch.as_tensor(centroids).detach().cpu().numpy(), dtype=np.float32)
    digest = hashlib.sha256(repr(array.shape).encode())
    digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def check_vocabulary(centroids: np.ndarray, clusters: int, channels: int, source: str) -> None:
    """A stored vocabulary (`source`: its file or checkpoint) must match --vlad_clusters and the layer."""
    shape = tuple(np.shape(centroids))
    if shape != (clusters, channels):
        raise VPRError(f"{source}: VLAD vocabulary of shape {shape}, expected ({clusters}, {channels}) for "
                       f"--vlad_clusters {clusters} at this --feature_layer; refit it or match the flags")
    if not np.isfinite(centroids).all():
        raise VPRError(f"{source}: VLAD vocabulary holds NaN or infinite values; refit it")


# ----------------------------------------------------------------------------------------------
# The pooled descriptor as a module
# ----------------------------------------------------------------------------------------------
class LocalPooling(nn.Module):
    """images (B, 3, H, W) -> the pooled descriptor (B, D) of `config` (gem or vlad) at its layer,
    so extraction pools as it extracts. pooling="backbone" is the backbone's own descriptor,
    which the caller computes as before."""

    def __init__(self, model: nn.Module, config: PoolingConfig, centroids: np.ndarray | torch.Tensor | None = None):
        super().__init__()
        if config.pooling == "backbone":
            raise ValueError("LocalPooling pools local features: pooling='backbone' is the backbone's own descriptor")
        self.model = model
        self.config = config
        self.layer = resolve_layer(num_feature_layers(model), config.feature_layer)
        self.channels = layer_channels(model, self.layer)
        if config.pooling == "vlad":
            if centroids is None:
                raise ValueError("pooling='vlad' needs the vocabulary's centroids (fit_vlad_vocabulary)")
            centres = torch.as_tensor(np.asarray(centroids, dtype=np.float32))
            check_vocabulary(centres.numpy(), config.vlad_clusters, self.channels, "the VLAD vocabulary")
            self.register_buffer("centroids", F.normalize(centres, dim=-1))
        else:
            self.centroids = None

    def output_dim(self) -> int:
        return self.channels * (self.config.vlad_clusters if self.config.pooling == "vlad" else 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        local = local_features(self.model, images, self.layer)
        if self.config.pooling == "gem":
            return gem(local, self.config.gem_p)
        return vlad(local, self.centroids)


# ----------------------------------------------------------------------------------------------
# Local features as the cached output (--head netvlad; --train_blocks caches block inputs)
# ----------------------------------------------------------------------------------------------
LOCAL_SAMPLE_SEED = 0  # the positions kept when an image has more than the bound (part of the cache key)


def kept_positions(num_positions: int, bound: int, seed: int = LOCAL_SAMPLE_SEED) -> torch.Tensor | None:
    """The positions kept of `num_positions` local features, at most `bound`: None (all) when they
    fit, else a seeded random subset in ascending order. The same subset for every image of one
    input size, whatever the batch or its order: the cached path and forward() keep the same tokens."""
    if num_positions <= bound:
        return None
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_positions, generator=generator)[:bound].sort().values


class LocalTokens(nn.Module):
    """images (B, 3, H, W) -> the local features (B, T, C) of `layer` (local_features), T at most
    `bound` positions (kept_positions). As a Backbone's pooling it makes the cache hold local
    features (float16, extract_features), the input of a learnable aggregator (NetVLADHead)."""

    def __init__(self, model: nn.Module, layer: int, bound: int):
        super().__init__()
        self.model = model
        self.layer = resolve_layer(num_feature_layers(model), layer)
        self.channels = layer_channels(model, self.layer)
        self.bound = int(bound)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        local = local_features(self.model, images, self.layer)
        keep = kept_positions(local.shape[1], self.bound)
        return local if keep is None else local[:, keep.to(local.device)]


def local_cache_tag(num_layers: int, layer: int, bound: int) -> str:
    """The cache-key tag of LocalTokens: layer, bound and sampling seed."""
    return f"local-L{resolve_layer(num_layers, layer)}-n{bound}-s{LOCAL_SAMPLE_SEED}"
