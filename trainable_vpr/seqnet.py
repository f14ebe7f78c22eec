"""The learned sequence descriptor (`--head seqnet`): a window of L cached frame descriptors -> one vector.

SeqNetHead (arch "shared", the default) is built so that its untrained form is a real
training-free sequence method:

1. every frame goes through ONE shared per-frame head, a ResidualHead (trainable_vpr.heads): a
   linear map started as a whitening of the frame descriptors (raw, PCA- or learned whitening,
   the single-frame starts of trainable_vpr.starts) plus a zero-initialised residual MLP; its
   output is L2-normalised per frame;
2. optionally (`kernel` > 0) a temporal convolution over the window ('same' padding) added as a
   residual, zero-initialised: at the start it adds nothing. Default none: on the railway route's
   val windows (L=10, 3 seeds) kernel 3 scored R@1 0.866, no temporal conv 0.899
   (docs/benchmarks.md, Routes);
3. the window's L frames are concatenated and L2-normalised (divided by sqrt(L)).

So the untrained head's cosine between two windows is the mean over the L aligned frame pairs of
their whitened cosines: sequence matching along the diagonal at velocity 1 (SeqSLAM without the
contrast normalisation). Training moves it from there. Weights: D x d + d x hidden x 2 (the frame
head) + d x d x kernel, independent of L.

arch "full" is SeqNet as published (Garg & Milford, RA-L 2021) and as measured in issue 24: one
Conv1d over the whole window (kernel = L, D -> out_dim), randomly initialised (no training-free
start; its epoch 0 is a random projection): L x D x out weights (26 M at L=20, D=1280, 1024).

`start_sequence_head` builds the untrained head from a frame start fitted on the training frames.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from vprkit.cli import VPRError
from vprkit.cli.configs import SEQ_ARCHS
from vprkit.retrieval.evaluation import pca_whitening_matrix
from vprkit.tables.pairs import positive_pairs
from vprkit.retrieval.whitening import Whitening, fit_learned_whitening

from trainable_vpr.heads import HeadConfig, ResidualHead, build_head

SEQ_HEAD = "seqnet"  # --head seqnet; a sequence checkpoint's head_config type
FRAME_STARTS = ("raw", "pca_whitened", "learned_whitened")


@dataclass(frozen=True)
class SeqHeadConfig:
    """Everything that rebuilds a sequence head; a checkpoint stores it as a dict (as_dict / from_dict).

    seq_len: frames per window (L); frame_dim: the frame descriptor's dimension (D);
    proj_dim: the per-frame head's output (d; ignored with frame_start raw: d = D);
    hidden_dim / dropout: the per-frame residual MLP; kernel: the temporal convolution's width
    (0: none, frames stay independent); frame_dropout: during training, the share of a window's
    frames (never its last) left out; frame_start: the per-frame linear map's start (its
    learned-whitening shrinkage in `shrinkage`); arch: "shared" or "full" (module docstring);
    out_dim: arch full's output dimension.
    """

    seq_len: int
    frame_dim: int
    proj_dim: int = 128
    hidden_dim: int = 256
    dropout: float = 0.1
    kernel: int = 0
    frame_dropout: float = 0.0
    frame_start: str = "learned_whitened"
    shrinkage: float | None = None
    arch: str = "shared"
    out_dim: int = 1024

    def __post_init__(self) -> None:
        if self.seq_len < 1:
            raise VPRError(f"--seq_len {self.seq_len}: must be at least 1")
        if self.arch not in SEQ_ARCHS:
            raise VPRError(f"--seq_arch {self.arch}: choose one of {', '.join(SEQ_ARCHS)}")
        if self.frame_start not in FRAME_STARTS:
            raise VPRError(f"--seq_frame_start {self.frame_start}: choose one of {', '.join(FRAME_STARTS)}")
        if self.kernel < 0 or not 0.0 <= self.frame_dropout < 1.0:
            raise VPRError(f"--seq_kernel {self.kernel} / --seq_frame_dropout {self.frame_dropout:g}: the kernel "
                           f"must be 0 or more, the frame dropout in [0, 1)")

    def frame_head_config(self) -> HeadConfig:
        """The shared per-frame head (a ResidualHead; raw: the identity map at D dimensions)."""
        return HeadConfig("residual", self.frame_dim, self.proj_dim, self.hidden_dim, self.dropout,
                          identity_base=self.frame_start == "raw")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "SeqHeadConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def keep_frames(shape: tuple[int, int], rate: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """bool [B, L]: the frames a training window keeps under frame dropout (the last frame always)."""
    keep = torch.rand(shape, generator=generator) >= rate
    keep[:, -1] = True
    return keep


class SeqNetHead(nn.Module):
    """frames [B, L, D] (cached frame descriptors of windows, last = the localised frame) -> [B, out],
    L2-normalised. See the module docstring for the two architectures."""

    def __init__(self, config: SeqHeadConfig):
        super().__init__()
        self.config = config
        if config.arch == "full":
            self.full = nn.Conv1d(config.frame_dim, config.out_dim, kernel_size=config.seq_len)
            return
        self.frame = build_head(config.frame_head_config())
        dim = config.frame_dim if config.frame_start == "raw" else config.proj_dim
        self.temporal = None
        if config.kernel > 0 and config.seq_len > 1:
            self.temporal = nn.Conv1d(dim, dim, kernel_size=config.kernel, padding="same", bias=False)
            nn.init.zeros_(self.temporal.weight)

    @property
    def output_dim(self) -> int:
        if self.config.arch == "full":
            return self.config.out_dim
        config = self.config
        return config.seq_len * (config.frame_dim if config.frame_start == "raw" else config.proj_dim)

    def project(self, frames: torch.Tensor) -> torch.Tensor:
        """The per-frame linear map of L2-normalised frames [..., D] -> [..., d] (arch full: the
        normalised frames). With the map frozen (SeqTrainConfig.train_projection False) a route's
        frames are projected once and windows gather the projections (`from_projected`)."""
        frames = F.normalize(frames.float(), dim=-1)
        return frames if self.config.arch == "full" else self.frame.base(frames)

    def from_projected(self, x: torch.Tensor) -> torch.Tensor:
        """Windows of projected frames [B, L, d] -> [B, out], L2-normalised."""
        batch, length = x.shape[:2]
        if self.config.arch == "full":
            return F.normalize(self.full(x.transpose(1, 2)).flatten(1), dim=-1)
        x = F.normalize(x + self.frame.residual(x), dim=-1)  # the ResidualHead's correction, per frame
        if self.temporal is not None:
            x = F.normalize(x + self.temporal(x.transpose(1, 2)).transpose(1, 2), dim=-1)
        if self.training and self.config.frame_dropout > 0:
            x = x * keep_frames((batch, length), self.config.frame_dropout).unsqueeze(-1).to(x)
        return F.normalize(x.flatten(1), dim=-1)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        _, length, dim = frames.shape
        if length != self.config.seq_len or dim != self.config.frame_dim:
            raise VPRError(f"sequence head: windows of {length} frames x {dim} dims given, it takes "
                           f"{self.config.seq_len} x {self.config.frame_dim}; use its --seq_len and frame descriptor")
        return self.from_projected(self.project(frames))


def fit_frame_whitenings(train_frames: np.ndarray, train_xyz: np.ndarray, pos_threshold_m: float, dim: int,
                         shrinkages: Sequence[float], seed: int = 0) -> dict[float, Whitening]:
    """Learned whitenings of the frames (vprkit.retrieval.whitening), one per shrinkage, from the training
    frames' positive pairs (which cross drives: the same place in another season)."""
    pairs = positive_pairs(train_xyz, None, pos_threshold_m, seed=seed)
    return {float(s): fit_learned_whitening(train_frames, pairs, dim, float(s), seed=seed) for s in shrinkages}


@torch.no_grad()
def start_sequence_head(config: SeqHeadConfig, train_frames: np.ndarray, train_xyz: np.ndarray,
                        pos_threshold_m: float, seed: int = 0, whitening: Whitening | None = None) -> SeqNetHead:
    """The untrained head: arch shared's per-frame linear map set to `config.frame_start` fitted on
    the training frames (raw: identity; pca_whitened: vprkit.retrieval.evaluation.pca_whitening_matrix;
    learned_whitened: `whitening` if given, else fitted at `config.shrinkage`); arch full: a seeded
    random init."""
    torch.manual_seed(seed)
    head = SeqNetHead(config)
    if config.arch == "full" or config.frame_start == "raw":
        return head
    frame = head.frame
    assert isinstance(frame, ResidualHead)
    if config.frame_start == "pca_whitened":
        frame.init_linear(*pca_whitening_matrix(train_frames, config.proj_dim))
        return head
    if whitening is None:
        if config.shrinkage is None:
            raise VPRError("sequence head: a learned_whitened frame start needs its shrinkage (choose it on val)")
        whitening = fit_frame_whitenings(train_frames, train_xyz, pos_threshold_m, config.proj_dim,
                                         [config.shrinkage], seed)[float(config.shrinkage)]
    frame.init_linear(whitening.projection, -(whitening.mean @ whitening.projection.T))
    return head
