"""Frozen-backbone features: device, precision, the on-disk feature cache and extraction.

Each image goes through the backbone once per configuration (BackboneInfo is the cache key);
epochs, validation, evaluation and later runs read the cache. Under torchrun every rank extracts
its share into the shared cache; release_other_ranks returns the rank and the script decides to exit.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

import numpy as np
import torch

from vprkit.cli import VPRError, atomic_write
from vprkit.evaluation import Descriptors, check_queries
from vprkit.images import DECODE_TAG, open_rgb
from vprkit.places import ON_BAD_IMAGE, PlaceTable, check_on_bad_image
from vprkit.pooling import POOLINGS, PoolingConfig
from vprkit.preprocessing import backbone_input, image_tensor
from vprkit.settings import flag as _flag

DEFAULT_CACHE_DIR = ".cache/features"
# Part of every cache key (features and VLAD vocabularies): bump when what the cache stores changes.
# 2: images resized by vprkit.preprocessing.backbone_input, the model's own (1: PIL's 8-bit resize).
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
    vector, or with `pooling` (--pooling gem/vlad: vprkit.pooling.LocalPooling) its local features
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


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise VPRError(f"--device {device}: not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise VPRError(f"--device {device}: CUDA is not available on this machine; use --device cpu or auto")
    return resolved


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
    """A view of each image (vprkit.augment.AugmentedView): applied after decoding, and cached under
    the image's fingerprint plus `key`, so a view never shares a cache entry with the original."""

    key: str

    def __call__(self, image: Any, path: str) -> Any: ...


def cache_keys(paths: Sequence[str], view: ImageView | None = None) -> list[str]:
    """The feature cache keys of images (of one view of them)."""
    suffix = "" if view is None else f"|{view.key}"
    return [image_fingerprint(p) + suffix for p in paths]


class _ImageDataset(torch.utils.data.Dataset):
    """Decode upright (EXIF orientation applied: open_rgb) to a uint8 tensor, then resize (the whole
    view, no crop) and normalise as the model's forward does (vprkit.preprocessing.backbone_input),
    each image on its own, so images of any size share a batch; errors are returned, not raised,
    so the main process can name the bad file."""

    def __init__(self, paths: Sequence[str], info: BackboneInfo, view: ImageView | None = None):
        self.paths = list(paths)
        self.view = view  # an augmented view (vprkit.augment), applied to the decoded image
        self.size = info.image_size
        self.mean = torch.tensor(info.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(info.std).view(1, 3, 1, 1)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        try:
            image = open_rgb(self.paths[index])
            if self.view is not None:
                image = self.view(image, self.paths[index])
            return backbone_input(image_tensor(image)[None], self.size, self.mean, self.std)[0], index, ""
        except Exception as exc:  # noqa: BLE001 - reported with the file name by the caller
            return torch.zeros(3, self.size, self.size), index, f"{type(exc).__name__}: {exc}"


PRECISIONS = ("fp32", "bf16", "fp16", "auto")


CACHE_DTYPES = ("float32", "float16")  # float16 halves the cache on disk


ON_BAD_IMAGE_HELP = ("a missing or unreadable image: error (stop, naming it) or skip (leave it out, count it in the "
                     "log and summary)")


# --pooling's help (TrainConfig re-declares the field with one more choice, auto, and adds to this)
POOLING_HELP = ("global descriptor: backbone (its own pooled vector), gem (GeM p=3 over the local features of "
                "--feature_layer) or vlad (AnyLoc-style VLAD over them, vocabulary fitted on the training images, the "
                "database's for a baseline)")


@dataclass
class ExtractionSettings:
    """The image and extraction flags every script shares, declared once: each script's parser
    gets them from here (settings.add_config_args), train_vpr's TrainConfig extends them."""

    camera_id: str | None = _flag(None, "keep only this camera's rows", "data")
    image_root: str | None = _flag(None, "folder that relative image paths resolve against (default: the CSV's folder)",
                                   "data")
    on_bad_image: str = _flag("error", ON_BAD_IMAGE_HELP, "data", choices=ON_BAD_IMAGE)
    weights: str | None = _flag(None, "backbone weights: a local state-dict FILE, or 'random' (default: pretrained)",
                                "model")
    image_size: int = _flag(0, "square input side in pixels (0: the backbone's default, or the checkpoint's)", "model")
    pooling: str = _flag("backbone", POOLING_HELP, "model", choices=POOLINGS)
    feature_layer: int = _flag(-1, "with --pooling gem/vlad: the layer whose local features are pooled (a ViT block, "
                               "a CNN stage; -1 the last, negative counts from the end)", "model")
    vlad_clusters: int = _flag(32, "with --pooling vlad: vocabulary size K (descriptor K x channels)", "model")
    extract_batch_size: int = _flag(32, "images per extraction batch (the backbone's forward pass)", "system",
                                    deprecated=("--batch_size",))
    device: str = _flag("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps", "system")
    num_workers: int = _flag(None, "image-decoding worker processes (default: a quarter of the CPU cores, at most 4)",
                             "system")
    cache_dir: str = _flag(DEFAULT_CACHE_DIR, "feature cache folder (shared by every script)", "system")
    no_cache: bool = _flag(False, "bypass the feature cache (extract every image every time)", "system")
    precision: str = _flag("fp32", "extraction precision: fp32, bf16 (CUDA, recent CPUs), fp16 (CUDA) or auto "
                           "(the fastest safe one)", "system", choices=PRECISIONS)
    cache_dtype: str = _flag("float32", "feature cache storage: float32 or float16 (half the disk)", "system",
                             choices=CACHE_DTYPES)
    chunk_size: int = 1024  # images per cache shard: the most an interruption can lose (not a flag)

    def __post_init__(self) -> None:
        if self.num_workers is None:
            self.num_workers = default_num_workers()

    @property
    def cache_folder(self) -> str | None:
        """The cache folder, or None with --no_cache."""
        return None if self.no_cache else self.cache_dir


def extraction_settings(config: ExtractionSettings) -> ExtractionSettings:
    """The extraction settings alone, of a config that extends them (TrainConfig, EvalConfig...)."""
    names = [f.name for f in dataclasses.fields(ExtractionSettings)]
    return ExtractionSettings(**{n: getattr(config, n) for n in names if hasattr(config, n)})




def pooling_config(config: Any) -> PoolingConfig:
    """The pooling of any config, namespace or saved config dict (absent: the backbone's own)."""
    get = config.get if isinstance(config, dict) else lambda name, default: getattr(config, name, default)
    return PoolingConfig(get("pooling", "backbone"), get("feature_layer", -1), get("vlad_clusters", 32))


def validate_extraction_flags(config: ExtractionSettings) -> None:
    """The values of the shared flags that cannot work, caught before any output."""
    pooling_config(config)  # raises on an unknown pooling, a layer without gem/vlad, K < 1
    if config.extract_batch_size < 1:
        raise VPRError(f"--extract_batch_size {config.extract_batch_size}: must be at least 1")
    if config.num_workers is not None and config.num_workers < 0:
        raise VPRError(f"--num_workers {config.num_workers}: must be 0 (decode in this process) or more")
    if config.image_size < 0:
        raise VPRError(f"--image_size {config.image_size}: must be 0 (the backbone's) or a positive number of pixels")
    check_on_bad_image(config.on_bad_image)
    check_weights_flag(config.weights)
    resolve_device(config.device)


def check_weights_flag(weights: str | None) -> None:
    if weights and weights != "random" and not Path(weights).is_file():
        raise VPRError(f"--weights {weights}: file not found; give a local state-dict file, 'random', or leave it out "
                       f"for the pretrained weights")


def _cpu_supports_bf16() -> bool:
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_precision(precision: str, device: torch.device) -> str:
    """The autocast precision actually used: auto picks the fastest safe one (bf16 on CUDA
    with bf16 or on CPUs with AMX / AVX512-BF16, fp16 on older CUDA GPUs, else fp32)."""
    if precision not in PRECISIONS:
        raise VPRError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
    cuda = device.type == "cuda"
    bf16_ok = torch.cuda.is_bf16_supported() if cuda else device.type == "cpu" and _cpu_supports_bf16()
    if precision == "auto":
        return "bf16" if bf16_ok else ("fp16" if cuda else "fp32")
    if precision == "bf16" and not bf16_ok:
        raise VPRError(f"--precision bf16: not supported on {device.type} here; use fp32 or auto")
    if precision == "fp16" and not cuda:
        raise VPRError("--precision fp16: only on CUDA GPUs; use bf16 (recent CPUs), fp32 or auto")
    return precision


_ranks_released = False  # set once the other torchrun ranks have left (see release_other_ranks)


def distributed_rank_and_world() -> tuple[int, int]:
    """(rank, world size); under torchrun, joins the process group (nccl on GPUs, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or _ranks_released:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def rank_zero_list(items: list[int], rank: int, world: int) -> list[int]:
    """Rank 0's `items` on every torchrun rank (broadcast); `items` itself in a single process."""
    if world <= 1:
        return items
    import torch.distributed as dist

    # nccl sends through a GPU: the one its barrier uses for this rank (no rank sets a device)
    device = torch.device("cuda", rank % torch.cuda.device_count()) if torch.cuda.is_available() else None
    box = [items]
    dist.broadcast_object_list(box, src=0, device=device)
    return box[0]


def release_other_ranks() -> int:
    """Under torchrun, once every table's features are in the cache: leave the process group
    and return this process's rank. The script decides: ranks other than 0 exit, rank 0 goes
    on alone (training and evaluation on cached features are cheap). 0 in a single process.
    Call it after the last extract_features of a script."""
    global _ranks_released
    rank, world = distributed_rank_and_world()
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    _ranks_released = True
    return rank


_allocator_tuned = False


def keep_freed_memory_for_reuse() -> bool:
    """glibc only: keep large freed blocks in the heap for reuse (mallopt M_MMAP_THRESHOLD and
    M_TRIM_THRESHOLD = 1 GiB). Why: CPU inference allocates and frees its large activation
    buffers on every forward; by default glibc maps each one fresh from the kernel and gives it
    back, and the page faults cost as much as the convolutions (bench/bench_extraction.py:
    about 19,500 faults per image; effnet_lite0 at batch 32 on 2 cores ran 34 images/s without
    and 73 with). PyTorch's CPU tuning guide swaps in jemalloc or tcmalloc for the same reason;
    this needs no install. Process-wide, applied once; returns whether it is in effect."""
    global _allocator_tuned
    if not _allocator_tuned and sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL("libc.so.6")
        except OSError:
            return False
        m_trim_threshold, m_mmap_threshold = -1, -3
        _allocator_tuned = (bool(libc.mallopt(m_mmap_threshold, 1 << 30))
                            and bool(libc.mallopt(m_trim_threshold, 1 << 30)))
    return _allocator_tuned


def default_num_workers() -> int:
    """Image-decoding worker processes: a quarter of the CPU cores, at most 4. On 2 cores none:
    decoding a batch in the main process costs less than workers taking cores from the forward
    pass (bench/bench_extraction.py: 0.88 of the bare forward speed with 0 workers, 0.60 with 2)."""
    return max(0, min(4, (os.cpu_count() or 1) // 4))


def iterate_descriptors(backbone: Backbone, paths: Sequence[str], options: ExtractionSettings, desc: str,
                         precision: str, failed: list[tuple[str, str]] | None = None,
                         view: ImageView | None = None) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """Yield (row indices, descriptors) batch by batch, with a progress bar. An image that
    cannot be decoded is an error naming it, or, given a `failed` list, appended to it as
    (path, reason) and left out of the batch."""
    from tqdm import tqdm

    device = resolve_device(options.device)
    if device.type == "cpu":
        keep_freed_memory_for_reuse()
    model = backbone.model.to(device)
    # channels-last: the layout oneDNN and cuDNN convolutions run fastest in (1.38x for
    # effnet_lite0 on this project's CPU, bench/bench_extraction.py); a no-op for ViTs.
    memory_format = torch.channels_last
    model = model.to(memory_format=memory_format)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    loader = torch.utils.data.DataLoader(
        _ImageDataset(paths, backbone.info, view), batch_size=options.extract_batch_size, shuffle=False,
        num_workers=options.num_workers, persistent_workers=False, pin_memory=device.type == "cuda",
    )
    with torch.inference_mode(), torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        for images, index, errors in tqdm(loader, desc=desc, unit="batch", file=sys.stderr, dynamic_ncols=True,
                                          disable=None):
            bad = [(int(i), e) for i, e in zip(index, errors) if e]
            if bad and failed is None:
                row, err = bad[0]
                if len(bad) == len(errors) and int(index[0]) == 0 and len(bad) > 1:
                    # not one bad file: a wrong folder or file type, which skipping would not mend
                    raise VPRError(f"image {paths[row]}: cannot be read as an image ({err}), nor can any of the first "
                                   f"{len(bad)}; check --image_root (or the CSV's folder) and that the files are "
                                   "images")
                raise VPRError(f"image {paths[row]}: cannot be read as an image ({err}); fix or remove its row, "
                               f"or --on_bad_image skip to leave such images out")
            if bad:
                failed.extend((paths[row], err) for row, err in bad)
                keep = torch.tensor([not e for e in errors])
                images, index = images[keep], index[keep]
                if not len(index):
                    continue
            images = images.to(device, non_blocking=True, memory_format=memory_format)
            feats = backbone.descriptor(images).float().cpu().numpy()
            check_finite(feats, [paths[int(i)] for i in index], backbone.info.name)
            yield index.numpy(), feats


def check_finite(features: np.ndarray, paths: Sequence[str], model: str) -> None:
    """Features of a model are finite, or one line naming the images (never cached as features)."""
    bad = [path for path, ok in zip(paths, np.isfinite(features.reshape(len(features), -1)).all(axis=1)) if not ok]
    if bad:
        raise VPRError(f"features [{model}]: NaN or infinite descriptors for {len(bad)} image(s) ({', '.join(bad[:3])}"
                       f"{', ...' if len(bad) > 3 else ''}); with --precision fp16/bf16 try fp32, else check the "
                       "weights")


def _extract_into_cache(backbone: Backbone, table: PlaceTable, keys: list[str], missing: list[int], cache: FeatureCache,
                        options: ExtractionSettings, precision: str, desc: str,
                        failed: list[tuple[str, str]] | None, view: ImageView | None = None) -> None:
    """Extract the missing images and store them shard by shard (chunk_size images each)."""
    pending_rows: list[int] = []
    pending_feats: list[np.ndarray] = []
    for rows, feats in iterate_descriptors(backbone, [table.paths[i] for i in missing], options, desc, precision,
                                            failed, view):
        pending_rows.extend(missing[r] for r in rows)
        pending_feats.append(feats)
        if len(pending_rows) >= options.chunk_size:
            cache.add([keys[i] for i in pending_rows], np.concatenate(pending_feats))
            pending_rows, pending_feats = [], []
    if pending_rows:
        cache.add([keys[i] for i in pending_rows], np.concatenate(pending_feats))


def extract_features(backbone: Backbone, table: PlaceTable, options: ExtractionSettings, label: str = "",
                     failed: list[tuple[str, str]] | None = None, view: ImageView | None = None) -> np.ndarray:
    """Backbone descriptors of every image in the table (N x D float32), through the cache.

    Each image goes through the backbone once per configuration: later calls (epochs,
    validation, evaluation, later runs) read the cache. Prints how many came from it.
    Under torchrun (`torchrun --nproc_per_node K train_vpr.py ...`), each rank extracts its
    share of the missing images (rank 0's list of them: rank_zero_list) into the shared cache:
    shards are separate files, so ranks never write the same file, and the cache index is the
    union of every rank's shards (the merge).
    After the barrier every rank reads the whole table from the cache.
    An unreadable image is an error naming it; given a `failed` list, it is appended there as
    (path, reason) instead and its row of the result is NaN (extract_table drops such rows).
    `view`: the features of that view of each image (vprkit.augment), cached under their own keys.
    """
    name = f"{backbone.info.name} {label}".strip()
    rank, world = distributed_rank_and_world()
    precision = resolve_precision(options.precision, resolve_device(options.device))
    if options.cache_folder is None:
        if world > 1:
            raise VPRError("--no_cache cannot be combined with torchrun: the ranks share their work through the cache")
        out: np.ndarray | None = None
        for rows, feats in iterate_descriptors(backbone, table.paths, options, f"extract {name}", precision, failed,
                                               view):
            out = np.full((len(table), *feats.shape[1:]), np.nan, np.float32) if out is None else out
            out[rows] = feats
        print(f"features [{name}]: {len(table)} extracted (cache disabled)", flush=True)
        return np.full((len(table), backbone.info.feature_dim), np.nan, np.float32) if out is None else out
    local = is_local(backbone.info)
    cache_dtype = "float16" if local else options.cache_dtype  # local features: float16 (half the disk, streamed)
    cache = FeatureCache(options.cache_folder, backbone.info, cache_dtype, precision)
    keys = cache_keys(table.paths, view)
    # Under torchrun every rank splits rank 0's list: a rank indexing later would already see the
    # shards the others wrote, and two different lists split in turns leave images to no rank.
    missing = rank_zero_list([i for i, k in enumerate(keys) if k not in cache], rank, world)
    if rank == 0:
        print(f"features [{name}]: {len(keys) - len(missing)}/{len(keys)} from cache, extracting {len(missing)}"
              + (f" over {world} processes" if world > 1 and missing else ""), flush=True)
    if missing:
        _extract_into_cache(backbone, table, keys, missing[rank::world], cache, options, precision,
                            f"extract {name}" + (f" [rank {rank}]" if world > 1 else ""), failed, view)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        cache = FeatureCache(options.cache_folder, backbone.info, cache_dtype, precision)  # every rank's shards
    if local:  # streamed from the shards, never read whole (CachedRows); unreadable images: no row
        readable = [k for k in keys if k in cache]
        if failed is not None:
            reported = {image for image, _ in failed}
            failed.extend((table.paths[i], "unreadable (reported by another process)") for i in range(len(keys))
                          if keys[i] not in cache and table.paths[i] not in reported)
        elif len(readable) < len(keys):
            raise VPRError(f"features [{name}]: {len(keys) - len(readable)} images missing from the cache after "
                           "extraction")
        row_shape = cache.row_shape(readable[0]) if readable else (0, backbone.info.feature_dim)
        return CachedRows(cache, [k if k in cache else readable[0] for k in keys], row_shape)
    if failed is None:
        return cache.get(keys)
    readable = np.array([i for i, key in enumerate(keys) if key in cache], dtype=np.int64)
    reported = {image for image, _ in failed}
    failed.extend((table.paths[i], "unreadable (reported by another process)") for i in range(len(keys))
                  if keys[i] not in cache and table.paths[i] not in reported)
    good = (cache.get([keys[i] for i in readable]) if len(readable)
            else np.zeros((0, backbone.info.feature_dim), np.float32))
    out = np.full((len(keys), *good.shape[1:]), np.nan, np.float32)
    out[readable] = good
    return out


def extract_table(backbone: Backbone, table: PlaceTable, options: ExtractionSettings, label: str = "",
                  on_bad_image: str = "error") -> tuple[PlaceTable, np.ndarray]:
    """extract_features honouring --on_bad_image: with "skip", images that cannot be decoded
    are left out of both the table and the features (and counted in the table's `skipped`)."""
    check_on_bad_image(on_bad_image)
    if on_bad_image == "error":
        return table, extract_features(backbone, table, options, label)
    failed: list[tuple[str, str]] = []
    features = extract_features(backbone, table, options, label, failed)
    return table.skip(failed), take_rows(features, table.rows_without(image for image, _ in failed))


def extract_both(backbone: Backbone, first: PlaceTable, second: PlaceTable, options: ExtractionSettings,
                 labels: tuple[str, str],
                 on_bad_image: str = "error") -> tuple[PlaceTable, np.ndarray, PlaceTable, np.ndarray]:
    """A script's two tables (train and val, database and queries) through extract_table (under
    torchrun, each rank extracts its share into the shared cache and reads both tables back)."""
    first, first_features = extract_table(backbone, first, options, labels[0], on_bad_image)
    second, second_features = extract_table(backbone, second, options, labels[1], on_bad_image)
    return first, first_features, second, second_features


def frozen_descriptors(options: ExtractionSettings, backbone: Backbone | None, database: PlaceTable,
                       queries: PlaceTable, pos_threshold_m: float,
                       supervision: str = "auto") -> tuple[PlaceTable, PlaceTable, Descriptors]:
    """The frozen descriptors: the parquets' embeddings, or the backbone's features (cache);
    with --on_bad_image skip, images that cannot be decoded are left out of tables and features."""
    if backbone is None:
        return database, queries, Descriptors(database.embeddings, queries.embeddings)
    database, db_features, queries, q_features = extract_both(
        backbone, database, queries, extraction_settings(options), ("database", "queries"), options.on_bad_image)
    if database.skipped or queries.skipped:
        check_queries(database, queries, pos_threshold_m, supervision)
    return database, queries, Descriptors(db_features, q_features)
