"""The VLAD vocabulary of a backbone layer: fitted once with faiss k-means on a bounded sample of
images' local features (the training images; the database's for a baseline), stored beside the
feature cache and reused by every later run on the same images, backbone, layer and K.

File: {cache_dir}/vocabularies/{backbone}-{pooling tag}-{digest}.npy, the digest covering the
backbone's identity, the feature cache's format (how images become input), the sampled images'
fingerprints (path, size, mtime) and the sample's size and seed. A checkpoint stores its
vocabulary too: evaluating it never refits.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from vprkit.cli import VPRError, atomic_write
from vprkit.extraction.cache import (CACHE_FORMAT, Backbone, BackboneInfo, image_fingerprint, load_cached_npy,
                                     save_npy, warn_damaged_cache_entry)
from vprkit.cli.extraction_settings import ExtractionSettings
from vprkit.extraction.device import distributed_rank_and_world, resolve_device, resolve_precision
from vprkit.extraction.features import iterate_descriptors
from vprkit.extraction.pooling import (DEFAULT_VOCABULARY_SAMPLE, PoolingConfig, check_vocabulary, fit_vlad_vocabulary,
                                       layer_channels, local_features, num_feature_layers, resolve_layer,
                                       sample_tokens, tokens_per_image)

MAX_VOCABULARY_IMAGES = 1000  # images whose local features are sampled: bounds the extra forward passes
VOCABULARY_SEED = 0


class _TokenSample(torch.nn.Module):
    """Pooling that keeps a random sample of each image's local features (B, per_image, C): as a
    Backbone's pooling it lets the extraction loop (device, precision, bad images) stream them."""

    def __init__(self, model: torch.nn.Module, layer: int, per_image: int, generator: torch.Generator):
        super().__init__()
        self.model, self.layer, self.per_image, self.generator = model, layer, per_image, generator

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        local = local_features(self.model, images, self.layer)
        return sample_tokens(local, self.per_image, self.generator).reshape(len(images), -1, local.shape[-1])


def vocabulary_images(paths: Sequence[str], limit: int = MAX_VOCABULARY_IMAGES) -> list[str]:
    """At most `limit` of the images, evenly spread over the table (deterministic)."""
    if len(paths) <= limit:
        return list(paths)
    return [paths[i] for i in np.linspace(0, len(paths) - 1, num=limit).round().astype(int)]


def vocabulary_path(cache_dir: str | Path, info: BackboneInfo, tag: str, paths: Sequence[str],
                    budget: int = DEFAULT_VOCABULARY_SAMPLE) -> Path:
    """Where the vocabulary fitted on these images is stored (see the module docstring)."""
    digest = hashlib.sha256(json.dumps({"backbone": info.as_dict(), "tag": tag, "budget": budget,
                                        "seed": VOCABULARY_SEED, "format": CACHE_FORMAT}, sort_keys=True).encode())
    for path in paths:
        digest.update(image_fingerprint(path).encode())
    return Path(cache_dir) / "vocabularies" / f"{info.file_stem}-{tag}-{digest.hexdigest()[:16]}.npy"


def fit_vocabulary_on_images(backbone: Backbone, config: PoolingConfig, paths: Sequence[str],
                             options: ExtractionSettings, budget: int = DEFAULT_VOCABULARY_SAMPLE) -> np.ndarray:
    """(K, C) centroids fitted on about `budget` local features sampled from `paths` as they
    stream through the backbone (only the sample is kept)."""
    layer = resolve_layer(num_feature_layers(backbone.model), config.feature_layer)
    sampler = Backbone(backbone.model, backbone.info,
                       _TokenSample(backbone.model, layer, tokens_per_image(len(paths), budget),
                                    torch.Generator().manual_seed(VOCABULARY_SEED)))
    precision = resolve_precision(options.precision, resolve_device(options.device))
    failed: list[tuple[str, str]] | None = [] if options.on_bad_image == "skip" else None
    parts = [tokens.reshape(-1, tokens.shape[-1]) for _, tokens in
             iterate_descriptors(sampler, paths, options, f"vlad vocabulary {backbone.info.name}", precision, failed)]
    samples = np.concatenate(parts) if parts else np.zeros((0, layer_channels(backbone.model, layer)), np.float32)
    return fit_vlad_vocabulary(samples, config.vlad_clusters, VOCABULARY_SEED)


def vlad_vocabulary(backbone: Backbone, config: PoolingConfig, paths: Sequence[str],
                    options: ExtractionSettings) -> np.ndarray:
    """The vocabulary of `config` for these images: read from the cache folder, or fitted on
    a bounded sample of them and stored there (with --no_cache: fitted, not stored). Under
    torchrun rank 0 fits it and the other ranks read it, so every rank pools alike."""
    sample = vocabulary_images(paths)
    channels = layer_channels(backbone.model, config.feature_layer)
    if options.cache_folder is None:
        return fit_vocabulary_on_images(backbone, config, sample, options)
    tag = config.cache_tag(num_feature_layers(backbone.model))
    path = vocabulary_path(options.cache_folder, backbone.info, tag, sample)
    rank, world = distributed_rank_and_world()
    centroids = None
    if rank == 0:
        centroids = load_cached_npy(path, "fitting it again")
        if centroids is not None:
            try:
                check_vocabulary(centroids, config.vlad_clusters, channels, str(path))
                print(f"vlad vocabulary: reused {path}", flush=True)
            except VPRError as exc:  # a file of another shape under this key: damaged too
                warn_damaged_cache_entry(path, exc, "fitting it again")
                centroids = None
        if centroids is None:
            centroids = fit_vocabulary_on_images(backbone, config, sample, options)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda p: save_npy(p, centroids))
            print(f"vlad vocabulary: K={config.vlad_clusters} fitted on {len(sample)} images, stored in {path}",
                  flush=True)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        if rank != 0:  # rank 0 has fitted or checked it
            centroids = np.load(path)
    check_vocabulary(centroids, config.vlad_clusters, channels, str(path))
    return centroids
