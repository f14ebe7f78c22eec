"""Augmented views of training images, extracted once and cached (--augment_views K).

View 0 of an image is the original; views 1..K are augmented copies: a random resized crop,
brightness / contrast / saturation / hue jitter, and on every second view (2, 4, ...) a
night-like darkening (gamma and brightness down, a slight blue shift, sensor noise). Each view's
pixels are a pure function of (recipe, view index, image file name): the random draws come from
a generator seeded with their hash, so a view is the same in every run and on every machine, and
the training seed does not change it (every seed reads the same cached views).

A view is cached like any feature: same cache folder as the original (the backbone's), one
entry per image and view, keyed by the image's fingerprint plus `AugmentedView.key` (view index,
recipe identity, seed). A different recipe never shares an entry; view k is the same whatever
K, so --augment_views 5 reuses the three views --augment_views 3 extracted.

Training (train_vpr.py) samples, for each batch row at each step, one of {original, view 1..K}
uniformly (`view_picks`: a function of the training seed, epoch and batch number, so a resumed
run draws the same). Validation, databases and queries never see a view; hard-negative mining
and the head start use the originals.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from vprkit.extraction.cache import Backbone
from vprkit.cli.extraction_settings import ExtractionSettings
from vprkit.extraction.features import extract_features
from vprkit.tables.places import PlaceTable


@dataclass(frozen=True)
class AugmentRecipe:
    """The augmentation's parameters; `identity` (a hash of them all) is part of every view's cache key."""

    crop_scale: tuple[float, float] = (0.5, 1.0)      # share of the image area kept (RandomResizedCrop's scale)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio of the crop
    brightness: float = 0.3                           # factor in [1 - b, 1 + b]
    contrast: float = 0.3
    saturation: float = 0.3
    hue: float = 0.05                                 # shift in [-h, h] turns
    night_every: int = 2                              # views night_every, 2 * night_every, ... are night-like
    night_gamma: tuple[float, float] = (1.5, 2.5)     # gamma > 1 darkens the mid-tones
    night_brightness: tuple[float, float] = (0.35, 0.6)
    night_tint: tuple[float, float, float] = (0.85, 0.92, 1.08)  # RGB gains: a slight blue shift
    night_noise: tuple[float, float] = (0.01, 0.04)   # sensor noise: Gaussian sigma on [0, 1] pixels
    seed: int = 0                                     # of the views (not the training seed)
    version: int = 1                                  # bump when the code drawing a view changes its pixels

    @property
    def identity(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:12]


DEFAULT_RECIPE = AugmentRecipe()


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def crop_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
             generator: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random resized crop: torchvision's RandomResizedCrop.get_params
    drawn from `generator` (torchvision draws from the process's global RNG, which would make a view
    depend on what ran before it)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(generator, *scale)
        aspect = math.exp(_uniform(generator, *log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    in_ratio = width / height  # fallback: the central crop, as torchvision's
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def augment_image(image: Image.Image, recipe: AugmentRecipe, view: int, seed: int) -> Image.Image:
    """One augmented view of an RGB image (its crop at its own size; extraction resizes it as it
    resizes originals). The operations are torchvision.transforms.v2.functional's, on the PIL image
    (its PIL kernels: single-threaded C; the tensor kernels on one small image wait on torch's thread
    pool, 100x slower on a busy machine); the tint and noise are numpy. Only the random draws are
    ours (a per-view generator, see crop_box)."""
    from torchvision.transforms.v2 import functional as TF

    generator = torch.Generator().manual_seed(seed)
    top, left, h, w = crop_box(image.width, image.height, recipe.crop_scale, recipe.crop_ratio, generator)
    image = TF.crop(image, top, left, h, w)
    image = TF.adjust_brightness(image, _uniform(generator, 1 - recipe.brightness, 1 + recipe.brightness))
    image = TF.adjust_contrast(image, _uniform(generator, 1 - recipe.contrast, 1 + recipe.contrast))
    image = TF.adjust_saturation(image, _uniform(generator, 1 - recipe.saturation, 1 + recipe.saturation))
    image = TF.adjust_hue(image, _uniform(generator, -recipe.hue, recipe.hue))
    if recipe.night_every and view % recipe.night_every == 0:
        image = TF.adjust_gamma(image, _uniform(generator, *recipe.night_gamma))
        image = TF.adjust_brightness(image, _uniform(generator, *recipe.night_brightness))
        sigma = _uniform(generator, *recipe.night_noise)
        noise = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
        pixels = np.asarray(image, dtype=np.float32) / 255.0 * np.asarray(recipe.night_tint, np.float32)
        pixels += sigma * noise.standard_normal(pixels.shape, dtype=np.float32)
        image = Image.fromarray((pixels.clip(0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))
    return image


@dataclass(frozen=True)
class AugmentedView:
    """View `index` (1..K) of every image: what vprkit.extraction.features applies after decoding (`__call__`)
    and the suffix of its cache keys (`key`)."""

    index: int
    recipe: AugmentRecipe = DEFAULT_RECIPE

    def __post_init__(self) -> None:
        if self.index < 1:
            raise ValueError(f"augmented view index {self.index}: views are numbered from 1 (0 is the original)")

    @property
    def key(self) -> str:
        return f"view{self.index}-{self.recipe.identity}-seed{self.recipe.seed}"

    def image_seed(self, path: str) -> int:
        """The seed of this view of one image: its file name (not the folder, so a moved data set keeps
        its views), the view index and the recipe."""
        text = f"{self.key}|{os.path.basename(path)}"
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")

    def __call__(self, image: Image.Image, path: str) -> Image.Image:
        return augment_image(image, self.recipe, self.index, self.image_seed(path))


def extract_views(backbone: Backbone, table: PlaceTable, options: ExtractionSettings, views: int,
                  recipe: AugmentRecipe = DEFAULT_RECIPE, label: str = "train") -> np.ndarray:
    """The frozen features of views 1..`views` of every image of `table`, through the feature cache:
    views x N x D float32 (row i of each view is table row i). The table's images are known to
    decode (its originals were extracted first), so any failure here is an error."""
    if views < 1:
        return np.zeros((0, len(table), backbone.info.feature_dim), np.float32)
    return np.stack([extract_features(backbone, table, options, f"{label} view {k}/{views}",
                                      view=AugmentedView(k, recipe)) for k in range(1, views + 1)])


def view_picks(seed: int, epoch: int, batch: int, rows: int, views: int) -> np.ndarray:
    """Which view each of a batch's `rows` rows reads at this step: 0 (the original) .. `views`,
    uniformly, from a generator seeded by (seed, epoch, batch): deterministic, and stateless, so a
    resumed run draws what the uninterrupted one did, and the training RNG is untouched."""
    if views < 1:
        return np.zeros(rows, dtype=np.int64)
    return np.random.default_rng([seed, epoch, batch, 0x5A17]).integers(0, views + 1, size=rows)
