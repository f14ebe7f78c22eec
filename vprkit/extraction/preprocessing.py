"""How a decoded image becomes the backbone's input, in one place.

Extraction (vprkit.extraction.features, the feature cache every script reads) and the model's own forward
(trainable_vpr.model.PlaceDescriptor, hence export_model.py's file and hubconf) both call
`backbone_input`, so a map built with one and queries described with the other hold the same
descriptors. Issue 25: extraction once resized with PIL on 8-bit pixels and the model with
F.interpolate on floats (another bicubic kernel): cosine 0.9978 between the two on bgu photos,
0.97 on 40-px images.

Extraction decodes upright (vprkit.tables.images.open_rgb), turns the picture into a uint8 tensor
(`image_tensor`) and resizes each image on its own before a batch is stacked, so images of any
size share a batch; the model takes float RGB in [0, 1], what `uint8 / 255` gives. Pure tensor
code (no PIL), so torch.export traces it.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def image_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as a uint8 tensor [3, H, W] (its own copy of the pixels)."""
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)


def backbone_input(images: torch.Tensor, size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """images [B, 3, H, W] of any H and W, uint8 or float RGB in [0, 1] -> [B, 3, size, size] float:
    resized to the backbone's square input (the whole view, no crop; bicubic, antialiased, on
    floats), clamped to [0, 1] as pixels are, and normalised with the backbone's mean and std
    (shaped [1, 3, 1, 1])."""
    if images.dtype == torch.uint8:
        images = images.float() / 255.0  # what a caller of the model does: the same float32 pixels
    resized = F.interpolate(images.contiguous(), size=(size, size), mode="bicubic", align_corners=False,
                            antialias=True)
    return (resized.clamp(0.0, 1.0) - mean) / std
