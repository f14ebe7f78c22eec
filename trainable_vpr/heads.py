"""Heads: a registry by name, rebuilt from the HeadConfig a checkpoint stores."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from vprkit.cli import VPRError
from vprkit.retrieval.evaluation import pca_whitening_matrix

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
    so training starts from the strongest frozen-feature baseline instead of destroying it.
    identity_base: the linear map is the identity (no weights) and the output keeps the input's
    dimension: the raw start, whose untrained head IS the raw descriptor (trainable_vpr.starts)."""

    def __init__(self, in_dim: int, projection_dim: int = 256, hidden_dim: int = 512, dropout: float = 0.1,
                 identity_base: bool = False):
        super().__init__()
        projection_dim = in_dim if identity_base else projection_dim
        self.base = nn.Identity() if identity_base else nn.Linear(in_dim, projection_dim)
        self.residual = nn.Sequential(
            nn.LayerNorm(projection_dim), nn.Linear(projection_dim, hidden_dim), nn.GELU(),
            nn.Dropout(dropout), nn.Linear(hidden_dim, projection_dim),
        )
        nn.init.zeros_(self.residual[-1].weight)
        nn.init.zeros_(self.residual[-1].bias)

    @torch.no_grad()
    def init_linear(self, weight: np.ndarray, bias: np.ndarray) -> None:
        """Set the linear map to x -> weight @ x + bias on L2-normalised x (rows beyond
        len(weight) zero: they add nothing to any cosine)."""
        self.base.weight.zero_()
        self.base.bias.zero_()
        self.base.weight[: len(weight)] = torch.from_numpy(np.asarray(weight, dtype=np.float32))
        self.base.bias[: len(weight)] = torch.from_numpy(np.asarray(bias, dtype=np.float32))

    @torch.no_grad()
    def init_pca_whitening(self, features: np.ndarray) -> None:
        """Set the linear map to PCA-whitening fitted on these (training) features."""
        self.init_linear(*pca_whitening_matrix(features, self.base.out_features))

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
        self.skip = (None if not use_residual else nn.Identity() if in_dim == output_dim
                     else nn.Linear(in_dim, output_dim, bias=False))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.mlp(features)
        return F.normalize(out if self.skip is None else out + self.skip(features), dim=-1)


NETVLAD_ASSIGNMENT_SCALE = 1e4  # alpha of the untrained soft assignment: hard to float32 precision (see NetVLADHead)


class NetVLADHead(nn.Module):
    """NetVLAD (Arandjelovic et al., CVPR 2016) over local features (B, T, C) -> (B, K*C).

    Tokens are L2-normalised; the soft assignment of token x to cluster k is softmax_k(w_k . x + b_k);
    the residuals (x - c_k), weighted by it, are summed per cluster, intra-normalised, flattened and
    L2-normalised. Assignment (w, b) and centres c are separate parameters, as in the paper.
    `init_vocabulary` starts it from the VLAD vocabulary: c = the unit centroids, w = alpha * c,
    b = 0, so the assignment is softmax(alpha * cosine), which for alpha -> inf is the hard
    cosine assignment of vprkit.extraction.pooling.vlad (the training-free `vlad` row). At alpha = 1e4 a token
    whose two nearest centroids differ by more than 0.002 in cosine gets exp(-20) of weight on the
    runner-up: on float32 tokens the start IS hard VLAD (deviation 0.0 in tests/unit/trainable_vpr/test_netvlad.py);
    from the float16 cache a near tie can flip, a deviation below 1e-3 there, with the same R@1.
    The price of an exact start: the softmax is saturated, so at first the gradients reach mostly
    the centres (the residuals), little the assignment. No projection after it: the output is the
    VLAD dimension (K x C), so epoch 0 is that row."""

    def __init__(self, in_dim: int, clusters: int):
        super().__init__()
        self.clusters = clusters
        self.assign = nn.Linear(in_dim, clusters)
        self.centres = nn.Parameter(torch.zeros(clusters, in_dim))
        nn.init.normal_(self.centres, std=in_dim ** -0.5)

    @torch.no_grad()
    def init_vocabulary(self, centroids: np.ndarray, scale: float = NETVLAD_ASSIGNMENT_SCALE) -> None:
        centres = F.normalize(torch.as_tensor(np.asarray(centroids, np.float32)), dim=-1)
        if tuple(centres.shape) != tuple(self.centres.shape):
            raise VPRError(f"--head netvlad: vocabulary of shape {tuple(centres.shape)}, the head takes "
                           f"{tuple(self.centres.shape)}; match --vlad_clusters and --feature_layer")
        self.centres.copy_(centres)
        self.assign.weight.copy_(scale * centres)
        self.assign.bias.zero_()

    def forward(self, local: torch.Tensor) -> torch.Tensor:
        tokens = F.normalize(local.float(), dim=-1)                             # (B, T, C)
        soft = torch.softmax(self.assign(tokens), dim=-1)                       # (B, T, K)
        # sum_t a_tk (x_t - c_k) = (a^T x)_k - (sum_t a_tk) c_k
        residuals = soft.transpose(1, 2) @ tokens - soft.sum(dim=1).unsqueeze(-1) * self.centres
        residuals = F.normalize(residuals, dim=-1)
        return F.normalize(residuals.flatten(1), dim=-1)

    @property
    def output_dim(self) -> int:
        return self.centres.numel()


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
    identity_base: bool = False  # residual head only: the raw start, output dimension = in_dim
    clusters: int = 0            # netvlad head only: K (its input is C-dim local features)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "HeadConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


# Head registry by name, like BACKBONES: each builds its module from a HeadConfig.
HEADS: dict[str, Callable[[HeadConfig], nn.Module]] = {
    "projection": lambda c: ProjectionHead(c.in_dim, c.projection_dim, c.dropout),
    "residual": lambda c: ResidualHead(c.in_dim, c.projection_dim, c.hidden_dim, c.dropout, c.identity_base),
    "mlp": lambda c: MLPHead(c.in_dim, c.projection_dim, c.hidden_dim, c.dropout, c.use_residual, c.use_layer_norm),
    "netvlad": lambda c: NetVLADHead(c.in_dim, c.clusters),
}

LOCAL_HEADS = ("netvlad",)  # heads over local features (T x C per image), not one descriptor


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
def embed(head: nn.Module, features: np.ndarray, batch_size: int = 4096,
          device: str | torch.device = "cpu") -> np.ndarray:
    """Head outputs for cached features (eval mode), N x P float32."""
    head.eval()
    # local features (T x C per image, possibly streamed from the cache): about 64 MB of input per chunk
    batch_size = max(1, min(batch_size, (1 << 24) // max(1, int(np.prod(features.shape[1:])))))
    outs = [head(torch.from_numpy(features[i:i + batch_size]).to(device)).cpu()
            for i in range(0, len(features), batch_size)]
    return torch.cat(outs).numpy() if outs else np.zeros((0, 0), np.float32)
