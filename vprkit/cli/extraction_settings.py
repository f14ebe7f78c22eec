"""The image and extraction flags every script shares (ExtractionSettings), declared once, with
their checks; each script's config extends them (trainable_vpr/config.py)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vprkit.cli import VPRError
from vprkit.cli.settings import flag as _flag
from vprkit.extraction.cache import CACHE_DTYPES, DEFAULT_CACHE_DIR
from vprkit.extraction.device import PRECISIONS, default_num_workers, resolve_device
from vprkit.extraction.pooling import POOLINGS, PoolingConfig
from vprkit.tables.places import ON_BAD_IMAGE, check_on_bad_image

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
                                    deprecated=("--batch_size",), resumable=True)
    device: str = _flag("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps", "system", resumable=True)
    num_workers: int = _flag(None, "image-decoding worker processes (default: a quarter of the CPU cores, at most 4)",
                             "system", resumable=True)
    cache_dir: str = _flag(DEFAULT_CACHE_DIR, "feature cache folder (shared by every script)", "system", resumable=True)
    no_cache: bool = _flag(False, "bypass the feature cache (extract every image every time)", "system", resumable=True)
    precision: str = _flag("fp32", "extraction precision: fp32, bf16 (CUDA, recent CPUs), fp16 (CUDA) or auto "
                           "(the fastest safe one)", "system", choices=PRECISIONS, resumable=True)
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
