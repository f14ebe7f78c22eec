"""The whole sequence descriptor as one nn.Module (issue 24): windows of frames in, one vector out.

`SequenceDescriptor` = the frame part (a PlaceDescriptor: frozen backbone, pooling, VLAD
vocabulary, and the per-frame map of the matching's frame descriptor chosen on val: None = raw,
or a ResidualHead at a learned whitening, see `frame_map`) + the sequence head (a SeqNetHead over
the window's frozen frame descriptors; None: training-free) + the matching settings
(SeqMatchConfig, the gap that cuts drives) + the fusion weight chosen on val (None: the
descriptor alone; trainable_vpr.fusion).

`forward(frames [B, L, 3, H, W] float RGB in [0, 1]) -> [B, out]`: every frame through the
frozen backbone (PlaceDescriptor's preprocessing), then the sequence head over the window; without
a head the window's frame descriptors concatenated and L2-normalised (their cosine is the mean
cosine of the aligned frames: matching along the diagonal at velocity 1). Pure tensor code, so
torch.export traces it. The scripts keep the feature cache: `describe_windows(table, route)`
extracts each frame once (vprkit.extraction) and gathers the causal windows (vprkit.routes);
`describe_frames` gives the matching's frame descriptors. Both give what forward() gives on the
same frames (cosine >= 0.9999, tests/unit/trainable_vpr/test_sequence_model.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from vprkit.cli import VPRError
from vprkit.cli.extraction_settings import ExtractionSettings
from vprkit.extraction.features import extract_table
from vprkit.extraction.pooling import PoolingConfig
from vprkit.retrieval.whitening import Whitening
from vprkit.routes.matching import SeqMatchConfig, SeqMatches, sequence_match
from vprkit.routes.order import Route, route_of
from vprkit.routes.windows import causal_windows
from vprkit.tables.places import PlaceTable

from trainable_vpr.checkpoints import (
    EMBEDDINGS_ARCH,
    FRAME,
    SEQUENCE,
    SEQUENCE_SETTINGS,
    checkpoint_kind,
    check_checkpoint_matches,
    checkpoint_backbone,
    load_checkpoint,
    sequence_heads_from_checkpoint,
)
from trainable_vpr.fusion import fused_search
from trainable_vpr.heads import HeadConfig, ResidualHead, build_head
from trainable_vpr.model import PlaceDescriptor, load_model
from trainable_vpr.seqnet import SeqNetHead
from trainable_vpr.sequence_training import describe_windows as head_windows


def frame_map(whitening: Whitening | None, hidden_dim: int = 16) -> tuple[ResidualHead | None, HeadConfig | None]:
    """The per-frame map that gives `whitening.apply` as a head (a ResidualHead whose linear map is
    the whitening, residual zero); None for the raw frame descriptor."""
    if whitening is None:
        return None, None
    config = HeadConfig("residual", int(whitening.projection.shape[1]), int(whitening.projection.shape[0]),
                        hidden_dim, 0.0)
    head = build_head(config)
    assert isinstance(head, ResidualHead)
    head.init_linear(whitening.projection, -(whitening.mean @ whitening.projection.T))
    return head.eval(), config


class SequenceDescriptor(nn.Module):
    """frames [B, L, 3, H, W] (float RGB in [0, 1], last = the frame localised) -> [B, out], L2-normalised."""

    def __init__(self, frame: PlaceDescriptor, head: SeqNetHead | None, match: SeqMatchConfig,
                 max_gap: float | None = None, fusion_weight: float | None = None, source: str = "",
                 chosen: dict[str, Any] | None = None):
        super().__init__()
        if head is not None and head.config.seq_len != match.seq_len:
            raise ValueError(f"the head takes windows of {head.config.seq_len} frames, the matching {match.seq_len}")
        self.frame = frame
        self.head = head.eval() if head is not None else None
        self.match = match
        self.max_gap = max_gap
        self.fusion_weight = fusion_weight
        self.source = source
        self.chosen = dict(chosen or {})
        self.eval()

    # -- building ---------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str | Path, checkpoint: dict[str, Any] | None = None, weights: str | None = None,
                        image_size: int = 0, pooling: PoolingConfig | None = None,
                        with_backbone: bool = True) -> "SequenceDescriptor":
        """The sequence descriptor a sequence checkpoint holds (a single-frame one: one VPRError line).
        with_backbone=False: no backbone (it describes frozen features: embeddings parquets)."""
        checkpoint = checkpoint if checkpoint is not None else load_checkpoint(path, SEQUENCE)
        if with_backbone and checkpoint["backbone"].get("arch") == EMBEDDINGS_ARCH:
            raise VPRError(f"checkpoint {path} was trained on precomputed embeddings "
                           f"({checkpoint['backbone']['weights']}); it has no backbone to describe images: use it "
                           "on embeddings parquets")
        frozen = checkpoint_backbone(checkpoint, path, weights, image_size, pooling) if with_backbone else None
        frame_head, seq_head = sequence_heads_from_checkpoint(checkpoint)
        saved = checkpoint["sequence"]
        match = SeqMatchConfig(int(saved["seq_len"]), float(saved["v_min"]), float(saved["v_max"]),
                               int(saved["n_velocities"]), int(saved["shortlist"]))
        return cls(PlaceDescriptor(frozen, frame_head, str(path)), seq_head, match, saved["max_gap"],
                   saved["fusion_weight"], str(path), checkpoint.get("chosen"))

    def sequence_settings(self) -> dict[str, Any]:
        """The checkpoint's `sequence` entry (SEQUENCE_SETTINGS)."""
        values = {"seq_len": self.seq_len, "v_min": self.match.v_min, "v_max": self.match.v_max,
                  "n_velocities": self.match.n_velocities, "shortlist": self.match.shortlist,
                  "max_gap": self.max_gap, "fusion_weight": self.fusion_weight}
        assert tuple(values) == SEQUENCE_SETTINGS
        return values

    # -- describing -------------------------------------------------------------------------
    @property
    def seq_len(self) -> int:
        return self.match.seq_len

    @property
    def output_dim(self) -> int:
        return self.head.output_dim if self.head is not None else self.seq_len * self.frame.output_dim

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        batch, length = frames.shape[0], frames.shape[1]
        if length != self.seq_len:
            raise VPRError(f"sequence model: windows of {length} frames given, it takes {self.seq_len}")
        if self.frame.frozen is None:
            raise VPRError(f"sequence model {self.source}: no backbone to describe images")
        features = self.frame.frozen.descriptor(self.frame.preprocess(frames.flatten(0, 1))).float()
        if self.head is not None:
            return self.head(features.reshape(batch, length, -1))
        described = self.frame.head(features) if self.frame.head is not None else features
        return F.normalize(F.normalize(described, dim=-1).reshape(batch, -1), dim=-1)

    def route(self, table: PlaceTable) -> Route:
        """The table's route order, cut at this model's gap (one VPRError line for a bad order)."""
        return route_of(table, self.max_gap)

    def frame_features(self, table: PlaceTable, settings: ExtractionSettings, label: str = "") -> np.ndarray:
        """The frozen frame descriptors of every row, through the feature cache (each image once)."""
        if self.frame.frozen is None:
            raise VPRError(f"sequence model {self.source}: no backbone to describe the images of {table.source}")
        return extract_table(self.frame.frozen, table, settings, label, "error")[1]

    def frames_from_features(self, features: np.ndarray) -> np.ndarray:
        """The matching's frame descriptors [N, d] of frozen features (L2-normalised)."""
        return self.frame.describe_features(features)

    def windows_from_features(self, features: np.ndarray, route: Route) -> np.ndarray:
        """The window descriptors [N, out] of a route's frozen frame features: row i's causal window."""
        windows = causal_windows(route, self.seq_len)
        if self.head is not None:
            return head_windows(self.head, features, windows)
        frames = self.frames_from_features(features)
        stacked = frames[windows].reshape(len(windows), -1)
        return stacked / np.maximum(np.linalg.norm(stacked, axis=1, keepdims=True), 1e-12)

    def describe_frames(self, table: PlaceTable, settings: ExtractionSettings, label: str = "") -> np.ndarray:
        """The matching's frame descriptors of every row of a table (through the cache)."""
        return self.frames_from_features(self.frame_features(table, settings, label))

    def describe_windows(self, table: PlaceTable, route: Route | None = None,
                         settings: ExtractionSettings | None = None, label: str = "") -> np.ndarray:
        """Every row's window descriptor [N, out] (route: default `self.route(table)`), frames
        extracted once through the feature cache."""
        settings = settings or ExtractionSettings()
        route = route if route is not None else self.route(table)
        if len(route) != len(table):
            raise ValueError(f"the route has {len(route)} rows, the table {len(table)}")
        return self.windows_from_features(self.frame_features(table, settings, label), route)

    # -- searching ---------------------------------------------------------------------------
    def search(self, q_features: np.ndarray, q_route: Route, db_features: np.ndarray, db_route: Route,
               k: int = 10) -> SeqMatches:
        """Each query window's top-k database END rows, from the frozen frame features of both routes
        (`frame_features`). No head: sequence matching over the frame descriptors (sequence_match).
        A head: its window descriptors shortlist max(k, shortlist) database windows (exact search);
        with a fusion weight (not None, not 0) matching scores the same candidates and the fused
        score re-ranks them (trainable_vpr.fusion); `score` is the ranking's score."""
        q_frames, db_frames = self.frames_from_features(q_features), self.frames_from_features(db_features)
        if self.head is None:
            return sequence_match(q_frames, q_route, db_frames, db_route, self.match, k=k)
        top, scores = fused_search(self.windows_from_features(q_features, q_route),
                                   self.windows_from_features(db_features, db_route), q_frames, q_route, db_frames,
                                   db_route, self.match, self.fusion_weight or None, k)
        return SeqMatches(index=top, score=scores)


def load_sequence_model(model_path: str, settings: ExtractionSettings, model: str | None = None,
                        checkpoint: dict[str, Any] | None = None) -> SequenceDescriptor:
    """The one loader the scripts use for a sequence checkpoint (eval_trained, localize, export_model,
    hubconf): kind checked (a single-frame one is one VPRError line), --model checked against it,
    the backbone rebuilt with `settings`' weights, input size and pooling flags (which may only
    repeat the checkpoint's)."""
    from vprkit.cli.extraction_settings import pooling_config

    checkpoint = checkpoint if checkpoint is not None else load_checkpoint(model_path, SEQUENCE)
    check_checkpoint_matches(checkpoint, model_path, model)
    return SequenceDescriptor.from_checkpoint(model_path, checkpoint, settings.weights, settings.image_size,
                                              pooling_config(settings))


def load_route_model(model_path: str | None, model: str | None, settings: ExtractionSettings, seq_len: int | None,
                     fit_on: Sequence[str] = ()) -> tuple[nn.Module, dict[str, Any] | None]:
    """(the model, its checkpoint or None) of a script that applies a model to routes (localize,
    export_model, hubconf), by what `seq_len` (--seq_len) asks:
    1: a single-frame checkpoint or the --baseline (a PlaceDescriptor; a sequence checkpoint is one
    VPRError line); L > 1: a sequence checkpoint of windows of L (a SequenceDescriptor; another L is
    one line), or a single-frame checkpoint / baseline whose frames sequence matching compares;
    None: whatever the checkpoint holds. A baseline's VLAD vocabulary is fitted on `fit_on`."""
    if not model_path:
        return load_model(None, model, settings, fit_on), None
    checkpoint = load_checkpoint(model_path, FRAME if seq_len == 1 else None)
    if checkpoint_kind(checkpoint) != SEQUENCE:
        return load_model(model_path, model, settings, fit_on, checkpoint), checkpoint
    sequence = load_sequence_model(model_path, settings, model, checkpoint)
    if seq_len is not None and seq_len != sequence.seq_len:
        raise VPRError(f"--seq_len {seq_len}: checkpoint {model_path} takes windows of {sequence.seq_len} frames; "
                       f"give --seq_len {sequence.seq_len}")
    return sequence, checkpoint
