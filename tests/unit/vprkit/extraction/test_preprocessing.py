"""One preprocessing path (vprkit/extraction/preprocessing.py, issue 25): uint8 pixels and their float copy in
[0, 1] give the same backbone input; an image resized alone equals it resized in a batch; extraction
of a batch of images of different sizes gives what the backbone gives on backbone_input of each."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from helpers import write_poses
import trainable_vpr as vpr
from vprkit.cli.extraction_settings import ExtractionSettings
from vprkit.extraction.features import extract_features
from vprkit.tables.images import open_rgb
from vprkit.tables.places import load_poses
from vprkit.extraction.preprocessing import backbone_input, image_tensor

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _pixels(seed: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_image_tensor_is_channels_first_uint8_with_the_pixels():
    pixels = _pixels(0, 5, 7)
    tensor = image_tensor(Image.fromarray(pixels))
    assert tensor.dtype == torch.uint8 and tensor.shape == (3, 5, 7)
    np.testing.assert_array_equal(tensor.permute(1, 2, 0).numpy(), pixels)


def test_uint8_and_float_pixels_give_the_same_input():
    """Extraction passes uint8, a caller of the model float RGB in [0, 1] (uint8 / 255): bit for bit."""
    pixels = torch.from_numpy(_pixels(1, 37, 53)).permute(2, 0, 1)[None]
    from_uint8 = backbone_input(pixels, 32, MEAN, STD)
    from_float = backbone_input(pixels.float() / 255.0, 32, MEAN, STD)
    assert from_uint8.shape == (1, 3, 32, 32) and from_uint8.dtype == torch.float32
    torch.testing.assert_close(from_uint8, from_float, rtol=0, atol=0)
    # normalised with the mean and std given: a grey image of value m is 0 where m is the mean
    grey = backbone_input(MEAN.expand(1, 3, 9, 9).clone(), 4, MEAN, STD)
    torch.testing.assert_close(grey, torch.zeros(1, 3, 4, 4), rtol=0, atol=1e-6)


def test_one_image_alone_equals_it_in_a_batch():
    batch = torch.from_numpy(np.stack([_pixels(s, 40, 30) for s in range(3)])).permute(0, 3, 1, 2).float() / 255
    together = backbone_input(batch, 24, MEAN, STD)
    alone = torch.cat([backbone_input(image[None], 24, MEAN, STD) for image in batch])
    torch.testing.assert_close(alone, together, rtol=0, atol=1e-6)
    assert not torch.allclose(together[0], together[1])  # the images differ, so the check could fail


def test_a_batch_of_images_of_different_sizes_is_extracted_as_each_alone(tmp_path, tiny_backbone):
    """Extraction resizes each image before a batch is stacked (sizes 24 to 97 px in one batch),
    with the model's function: the cached features are the backbone's on backbone_input."""
    csv = write_poses(tmp_path / "data", [(i * 30.0, 0.0) for i in range(4)])
    table = load_poses(csv)
    for path, (w, h) in zip(table.paths, [(24, 24), (97, 61), (40, 120), (33, 18)]):
        Image.fromarray(_pixels(w, h, w)).save(path)
    options = ExtractionSettings(extract_batch_size=4, num_workers=0, device="cpu", cache_dir=str(tmp_path / "c"))
    cached = extract_features(tiny_backbone, table, options)
    info = tiny_backbone.info
    mean, std = torch.tensor(info.mean).view(1, 3, 1, 1), torch.tensor(info.std).view(1, 3, 1, 1)
    with torch.no_grad():
        direct = np.concatenate([vpr.backbone_descriptor(tiny_backbone.model, backbone_input(
            image_tensor(open_rgb(p))[None], info.image_size, mean, std)).numpy() for p in table.paths])
    np.testing.assert_allclose(cached, direct, rtol=1e-4, atol=1e-5)
    assert np.abs(cached[0] - cached[1]).max() > 1e-3  # distinct images, distinct features
