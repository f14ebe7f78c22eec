"""The on-disk feature cache: what identifies a frozen backbone's output (BackboneInfo, the cache
key), the cache of one backbone configuration (FeatureCache: shards of rows per image file, each
with its key list), and streamed cached rows (CachedRows) for the local features and block inputs
a trained part reads batch by batch."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch

from vprkit.cli import VPRError, atomic_write
from vprkit.tables.images import DECODE_TAG

DEFAULT_CACHE_DIR = ".cache/features"


# Part of every cache key (features and VLAD vocabularies): bump when what the cache stores changes.
# 2: images resized by vprkit.extraction.preprocessing.backbone_input, the model's own (1: PIL's 8-bit resize).
CACHE_FORMAT = 2


@dataclass(frozen=True)
class BackboneInfo:
    """Everything that identifies a frozen backbone's output: cache key and checkpoint field."""

    name: str
    arch: str
    weights: str         # identity of the weights: package, file hash, hub id or random seed
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    feature_dim: int
    pooling: str = "backbone"  # PoolingConfig.cache_tag: how the descriptor is pooled, at which layer
    vocabulary: str = ""       # fingerprint of the VLAD vocabulary (vlad only)

    def as_dict(self) -> dict[str, Any]:
        """The cache key and checkpoint field; the backbone's own pooling adds no keys, so the
        caches and checkpoints written before --pooling existed keep their keys."""
        out = {**dataclasses.asdict(self), "mean": list(self.mean), "std": list(self.std)}
        if self.pooling == "backbone":
            del out["pooling"], out["vocabulary"]
        return out

    @property
    def file_stem(self) -> str:
        """The backbone's name as a file-name part (timm:ARCH and hub ids hold ':' and '/')."""
        return self.name.replace(":", "_").replace("/", "_")


@dataclass
class Backbone:
    """A frozen backbone: its module, the info that identifies its output (cache key and
    checkpoint field), and the global descriptor of a batch of images: the backbone's own pooled
    vector, or with `pooling` (--pooling gem/vlad: vprkit.extraction.pooling.LocalPooling) its local features
    pooled as they are extracted. Built by trainable_vpr.create_backbone / pool_backbone."""

    model: torch.nn.Module
    info: BackboneInfo
    pooling: torch.nn.Module | None = None
    vocabulary: np.ndarray | None = None  # --pooling vlad: the centroids as fitted (checkpoints store them)

    def descriptor(self, images: torch.Tensor) -> torch.Tensor:
        if self.pooling is not None:
            return self.pooling(images)
        return backbone_descriptor(self.model, images)


def backbone_descriptor(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The global descriptor: the backbone's pooled pre-logits feature."""
    return model.forward_head(model.forward_features(images), pre_logits=True)


def image_fingerprint(path: str) -> str:
    """Identity of one image file: absolute path, size and modification time."""
    stat = os.stat(path)
    return hashlib.sha1(f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()


class FeatureCache:
    """Features of one backbone configuration, keyed per image file, streamed to disk.

    Layout: cache_dir/{model}-{config hash}/config.json and shards shard-*.npy, each with a
    shard-*.keys.json listing its image fingerprints row by row. A shard is written in full
    and renamed into place before its key list, so an interrupted extraction leaves only
    whole shards (it resumes from them), and a truncated shard is detected, deleted and
    rebuilt, never read as features. Arrays are opened memory-mapped: memory stays flat as
    the data set grows, and the per-image shape is free (a vector today, a map tomorrow).
    """

    def __init__(self, cache_dir: str | Path, info: BackboneInfo, dtype: str = "float32", precision: str = "fp32"):
        if dtype not in CACHE_DTYPES:
            raise VPRError(f"--cache_dtype {dtype}: choose float32 or float16")
        # DECODE_TAG: how files become pixels (EXIF orientation applied); features decoded otherwise are never served.
        config = {"backbone": info.as_dict(), "dtype": dtype, "precision": precision, "format": CACHE_FORMAT,
                  "decode": DECODE_TAG}
        digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
        self.dir = Path(cache_dir) / f"{info.file_stem}-{digest}"
        self.dtype = dtype
        self.dir.mkdir(parents=True, exist_ok=True)
        config_path = self.dir / "config.json"
        if not config_path.exists():
            atomic_write(config_path, lambda p: p.write_text(json.dumps(config, indent=2)))
        self._index: dict[str, tuple[Path, int]] = {}
        self._arrays: dict[Path, np.ndarray] = {}
        self._load_index(None if is_local(info) else (info.feature_dim,))

    def _load_index(self, row_shape: tuple[int, ...] | None) -> None:
        """Index the whole shards; `row_shape`: every row's (local features: the first shard's).
        Descriptor shards are read once to check they are finite (local ones are too big to)."""
        for keys_path in sorted(self.dir.glob("shard-*.keys.json")):
            shard = keys_path.with_name(keys_path.name.replace(".keys.json", ".npy"))
            try:
                keys = json.loads(keys_path.read_text())
                array = np.load(shard, mmap_mode="r")
                if array.shape[0] != len(keys):
                    raise ValueError("row count differs from key count")
                if array.shape[1:] != (row_shape or array.shape[1:]):
                    raise ValueError(f"rows of shape {array.shape[1:]}, expected {row_shape}")
                if len(array.shape) == 2 and not np.isfinite(array).all():
                    raise ValueError("NaN or infinite values")
                row_shape = array.shape[1:]
            except (OSError, ValueError, EOFError) as exc:
                # A shard or its key list cut short (disk full, kill -9 mid-write): drop it, it is rebuilt.
                warn_damaged_cache_entry(shard, exc, "its images are extracted again")
                keys_path.unlink(missing_ok=True)
                shard.unlink(missing_ok=True)
                continue
            self._arrays[shard] = array
            for row, key in enumerate(keys):
                self._index[key] = (shard, row)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def add(self, keys: Sequence[str], features: np.ndarray) -> None:
        """Store one shard: features[i] belongs to keys[i]."""
        shard = self.dir / f"shard-{uuid.uuid4().hex}.npy"
        atomic_write(shard, lambda p: save_npy(p, np.ascontiguousarray(features, dtype=self.dtype)))
        atomic_write(shard.with_name(shard.name.replace(".npy", ".keys.json")),
                     lambda p: p.write_text(json.dumps(list(keys))))
        self._arrays[shard] = np.load(shard, mmap_mode="r")
        for row, key in enumerate(keys):
            self._index[key] = (shard, row)

    def row_shape(self, key: str) -> tuple[int, ...]:
        """The shape of one cached image's features (D, or T x C for local features)."""
        shard, _ = self._index[key]
        return tuple(self._arrays[shard].shape[1:])

    def get(self, keys: Sequence[str]) -> np.ndarray:
        """Features of the given images (all must be cached), as float32, in order."""
        first_shard, _ = self._index[keys[0]]
        out = np.empty((len(keys), *self._arrays[first_shard].shape[1:]), dtype=np.float32)
        by_shard: dict[Path, tuple[list[int], list[int]]] = {}
        for pos, key in enumerate(keys):
            shard, row = self._index[key]
            by_shard.setdefault(shard, ([], []))
            by_shard[shard][0].append(pos)
            by_shard[shard][1].append(row)
        for shard, (positions, rows) in by_shard.items():
            out[positions] = self._arrays[shard][rows]
        return out


def is_local(info: BackboneInfo) -> bool:
    """Whether the cache holds local features per image (T, C) rather than one descriptor:
    LocalTokens (--head netvlad) and block inputs (--train_blocks). Stored in float16, streamed."""
    return info.pooling.startswith(("local-", "blocks-"))


class CachedRows:
    """Rows of a FeatureCache read on demand: an array-like of shape (N, *row) whose indexing
    (an int, a slice, an index or boolean array) reads only those rows from the memory-mapped
    shards, as float32. Local features (T x C per image) stay on disk: a training batch or an
    embedding chunk is all that is in memory at once, however many images the table has."""

    def __init__(self, cache: "FeatureCache", keys: Sequence[str], row_shape: tuple[int, ...]):
        self.cache, self.keys, self.row_shape = cache, list(keys), tuple(row_shape)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.keys), *self.row_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self.row_shape)

    dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return len(self.keys)

    def take(self, rows: np.ndarray | Sequence[int]) -> "CachedRows":
        """A view of these rows (no reading)."""
        return CachedRows(self.cache, [self.keys[int(i)] for i in np.asarray(rows).reshape(-1)], self.row_shape)

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, (int, np.integer)):
            return self.cache.get([self.keys[int(index)]])[0]
        if isinstance(index, slice):
            keys = self.keys[index]
        else:
            array = np.asarray(index)
            array = np.flatnonzero(array) if array.dtype == bool else array.reshape(-1)
            keys = [self.keys[int(i)] for i in array]
        if not keys:
            return np.zeros((0, *self.row_shape), np.float32)
        return self.cache.get(keys)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """The whole table in memory (what streaming avoids; for small tables and tests)."""
        out = self[:]
        return out if dtype is None else out.astype(dtype)


def take_rows(features: Any, rows: np.ndarray) -> Any:
    """features[rows] of an array, or a CachedRows view of them (not read)."""
    return features.take(rows) if isinstance(features, CachedRows) else features[rows]


def save_npy(path: Path, array: np.ndarray) -> None:
    """np.save to an open file (np.save given a path would add .npy to atomic_write's temporary name)."""
    with open(path, "wb") as handle:
        np.save(handle, array)


def warn_damaged_cache_entry(path: Path, exc: BaseException, action: str) -> None:
    """One line on stderr: a cached file could not be read; what happens instead (refit, re-extract)."""
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
    print(f"warning: damaged cache entry {path} ({type(exc).__name__}: {reason}); {action}", file=sys.stderr,
          flush=True)


def load_cached_npy(path: Path, action: str) -> np.ndarray | None:
    """A cached array, or None when it is missing, or unreadable (truncated, not .npy): then it is
    warned about in one line and removed, and the caller rebuilds it (`action` says how)."""
    if not path.is_file():
        return None
    try:
        return np.load(path)
    except (OSError, ValueError, EOFError) as exc:
        warn_damaged_cache_entry(path, exc, action)
        path.unlink(missing_ok=True)
        return None


class ImageView(Protocol):
    """A view of each image (vprkit.extraction.augment.AugmentedView): applied after decoding, and cached under
    the image's fingerprint plus `key`, so a view never shares a cache entry with the original."""

    key: str

    def __call__(self, image: Any, path: str) -> Any: ...


def cache_keys(paths: Sequence[str], view: ImageView | None = None) -> list[str]:
    """The feature cache keys of images (of one view of them)."""
    suffix = "" if view is None else f"|{view.key}"
    return [image_fingerprint(p) + suffix for p in paths]


CACHE_DTYPES = ("float32", "float16")  # float16 halves the cache on disk
