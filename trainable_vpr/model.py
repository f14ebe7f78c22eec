"""The whole place descriptor as one nn.Module: preprocessing, the frozen backbone, its pooling
(with the VLAD vocabulary), the optional trained head, L2-normalised out.

`PlaceDescriptor.forward(images)` takes float RGB [B, 3, H, W] in [0, 1] of any size: it resizes
to the backbone's square input (bicubic, antialiased, the whole view, no crop) and normalises with
the backbone's mean and std (buffers) through vprkit.extraction.preprocessing.backbone_input, the function
extraction calls too, then describes and L2-normalises. Pure tensor code, so torch.export can
trace it.

The scripts keep the feature cache: the frozen part (`model.frozen`, whose BackboneInfo keys the
cache) is run over a table through vprkit.extraction.features, then the head (`model.describe_features`).
`describe_table` does both for one table; forward() on the same images gives the same descriptors
(the same preprocessing; cosine >= 0.9999 on real photos of several sizes, tests/unit/trainable_vpr/
test_model.py and tests/unit/scripts/test_export_model.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from vprkit.cli import VPRError
from vprkit.retrieval.evaluation import Descriptors, l2_normalise
from vprkit.extraction.cache import Backbone
from vprkit.cli.extraction_settings import ExtractionSettings, pooling_config
from vprkit.extraction.features import extract_table
from vprkit.tables.places import PlaceTable
from vprkit.extraction.pooling import PoolingConfig
from vprkit.extraction.preprocessing import backbone_input

from trainable_vpr.backbones import create_pooled_backbone
from trainable_vpr.checkpoints import (
    EMBEDDINGS_ARCH,
    check_checkpoint_matches,
    checkpoint_backbone,
    head_from_checkpoint,
    load_checkpoint,
)
from trainable_vpr.heads import check_input_dim, embed


BACKBONE_POOLING = PoolingConfig()  # the backbone's own pooled vector (--pooling backbone)


class PlaceDescriptor(nn.Module):
    """images [B, 3, H, W] (float RGB in [0, 1]) -> L2-normalised descriptors [B, D].

    frozen: the frozen backbone with its pooling (None for a head trained on embeddings parquets:
    it describes embeddings, not images); head: the trained head (None: the frozen descriptor)."""

    def __init__(self, frozen: Backbone | None, head: nn.Module | None = None, source: str = ""):
        super().__init__()
        self.frozen = frozen  # a plain attribute; its modules are registered below
        self.source = source  # the checkpoint path, or "" for a baseline
        self.backbone = frozen.model if frozen is not None else None
        self.pooling = frozen.pooling if frozen is not None else None
        self.head = head.eval() if head is not None else None
        info = frozen.info if frozen is not None else None
        self.image_size = info.image_size if info is not None else 0
        self.register_buffer("mean", torch.tensor(info.mean if info else (0.0, 0.0, 0.0)).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(info.std if info else (1.0, 1.0, 1.0)).view(1, 3, 1, 1))
        self.eval()

    # -- building ---------------------------------------------------------------------------
    @classmethod
    def baseline(cls, name: str, weights: str | None = None, image_size: int = 0,
                 pooling: PoolingConfig = BACKBONE_POOLING, fit_on: Sequence[str] = (),
                 options: ExtractionSettings | None = None) -> "PlaceDescriptor":
        """The raw frozen backbone `name` (--baseline --model NAME), pooled as asked; a VLAD
        vocabulary is fitted on the images `fit_on` (the database) through the cache."""
        return cls(create_pooled_backbone(name, weights, image_size, pooling, fit_on, options))

    @classmethod
    def from_checkpoint(cls, path: str | Path, checkpoint: dict[str, Any] | None = None, weights: str | None = None,
                        image_size: int = 0, pooling: PoolingConfig | None = None,
                        with_backbone: bool = True) -> "PlaceDescriptor":
        """The descriptor a checkpoint was trained as: its backbone (same weights, checked), pooling,
        VLAD vocabulary and head. `checkpoint`: the file already loaded; `pooling`: what the user
        asked (may only repeat the checkpoint's); with_backbone=False: the head alone (embeddings)."""
        checkpoint = checkpoint if checkpoint is not None else load_checkpoint(path)
        frozen = checkpoint_backbone(checkpoint, path, weights, image_size, pooling) if with_backbone else None
        return cls(frozen, head_from_checkpoint(checkpoint), str(path))

    # -- describing -------------------------------------------------------------------------
    @property
    def output_dim(self) -> int:
        if self.head is not None and hasattr(self.head, "output_dim"):
            return int(self.head.output_dim)
        if self.head is not None:
            return int(next(p for p in reversed(list(self.head.parameters())) if p.ndim == 2).shape[0])
        return self.frozen.info.feature_dim

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's input: extraction's resize and normalisation (backbone_input)."""
        return backbone_input(images, self.image_size, self.mean, self.std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.frozen is None:
            raise VPRError(f"checkpoint {self.source}: trained on precomputed embeddings; it has no backbone to "
                           f"describe images")
        features = self.frozen.descriptor(self.preprocess(images)).float()
        if self.head is not None:
            features = self.head(features)
        return F.normalize(features, dim=-1)

    def describe_features(self, features: np.ndarray) -> np.ndarray:
        """The descriptors of frozen features (the cache's, or an embeddings parquet's): the head's
        output (heads L2-normalise) or the features L2-normalised, N x D float32."""
        if self.head is not None:
            return embed(self.head, features)
        return l2_normalise(features)

    def describe(self, frozen: Descriptors) -> Descriptors:
        """describe_features of a database and its queries."""
        return Descriptors(self.describe_features(frozen.database), self.describe_features(frozen.queries))


def describe_table(model: PlaceDescriptor, table: PlaceTable, settings: ExtractionSettings, label: str = "",
                   on_bad_image: str = "error") -> tuple[PlaceTable, np.ndarray]:
    """The model's descriptors of every image of a table: the frozen features through the feature
    cache (each image through the backbone once per configuration), then the head. With
    on_bad_image "skip", unreadable images leave the table (returned) and the descriptors."""
    if model.frozen is None:
        raise VPRError(f"checkpoint {model.source}: trained on precomputed embeddings; it has no backbone to "
                       f"describe the images of {table.source}")
    table, features = extract_table(model.frozen, table, settings, label, on_bad_image)
    return table, model.describe_features(features)


def load_model(model_path: str | None, baseline_model: str | None, settings: ExtractionSettings,
               fit_on: Sequence[str] = (), checkpoint: dict[str, Any] | None = None, head: str | None = None,
               embeddings_dim: int | None = None, embeddings_source: str = "") -> PlaceDescriptor:
    """The descriptor a script asked for: a checkpoint (`model_path`; checked against --model
    `baseline_model` and --head `head` when given) or the raw backbone --model (a VLAD vocabulary
    fitted on `fit_on`, the database). The backbone, its weights, input size and pooling flags come
    from `settings`. For an embeddings parquet (`embeddings_dim` given) only the checkpoint's head,
    checked against that width; a checkpoint trained on embeddings describes no images."""
    pooling = pooling_config(settings)
    if not model_path:
        if embeddings_dim is not None:
            raise VPRError("a baseline on embeddings parquets has no model: the parquet's embeddings are the "
                           "descriptors")
        return PlaceDescriptor.baseline(baseline_model, settings.weights, settings.image_size, pooling, fit_on,
                                        settings)
    checkpoint = checkpoint if checkpoint is not None else load_checkpoint(model_path)
    check_checkpoint_matches(checkpoint, model_path, baseline_model, head)
    if embeddings_dim is not None:
        check_input_dim(checkpoint["head_config"], embeddings_dim, embeddings_source)
        return PlaceDescriptor.from_checkpoint(model_path, checkpoint, with_backbone=False)
    saved = checkpoint["backbone"]
    if saved.get("arch") == EMBEDDINGS_ARCH:
        raise VPRError(f"checkpoint {model_path} was trained on precomputed embeddings ({saved['weights']}); it has "
                       f"no backbone to turn images into features: use it on embeddings parquets (--db_parquet, "
                       f"--test_parquet)")
    return PlaceDescriptor.from_checkpoint(model_path, checkpoint, settings.weights, settings.image_size, pooling)
