"""Backbone registry code paths that need no download: random init of the named timm
architectures, local --weights files, and the fast, clear offline failure."""
from __future__ import annotations

import socket
import time

import pytest
import timm
import torch

import trainable_vpr as vpr
import trainable_vpr.weights
from vprkit.cli import VPRError


@pytest.mark.parametrize("name, dim", [("dinov2_s", 384), ("resnet50", 2048)])
def test_named_backbones_build_with_random_weights(name, dim):
    backbone = vpr.create_backbone(name, weights="random")
    assert backbone.info.arch == vpr.BACKBONES[name].arch
    assert backbone.info.feature_dim == dim and backbone.info.image_size == 224
    assert not any(p.requires_grad for p in backbone.model.parameters())
    assert not backbone.model.training
    with torch.inference_mode():
        out = vpr.backbone_descriptor(backbone.model, torch.zeros(1, 3, 224, 224))
    assert out.shape == (1, dim)
    # fixed-seed random init: the same weights, hence the same cache identity, every time
    again = vpr.create_backbone(name, weights="random")
    first = next(iter(backbone.model.state_dict().values()))
    assert torch.equal(first, next(iter(again.model.state_dict().values())))


def test_weights_file_is_loaded_and_identified_by_content(tmp_path):
    source = timm.create_model("test_vit", pretrained=False, num_classes=0)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    backbone = vpr.create_backbone("timm:test_vit", weights=str(path), image_size=160)
    for key, value in source.state_dict().items():
        assert torch.equal(backbone.model.state_dict()[key], value)
    assert backbone.info.weights.startswith("file:weights.pth:sha256:")
    # another content, another identity (so another cache folder)
    torch.save({k: v + 1 for k, v in source.state_dict().items()}, path)
    assert vpr.create_backbone("timm:test_vit", weights=str(path), image_size=160).info.weights != backbone.info.weights


def test_bad_weights_file_is_one_clear_error(tmp_path):
    with pytest.raises(VPRError, match="--weights .*not found"):
        vpr.create_backbone("resnet50", weights=str(tmp_path / "missing.pth"))
    other = tmp_path / "other.pth"
    torch.save(timm.create_model("test_vit", pretrained=False).state_dict(), other)
    with pytest.raises(VPRError, match="--weights"):
        vpr.create_backbone("resnet50", weights=str(other))


def test_unknown_backbone_lists_the_choices():
    with pytest.raises(VPRError, match="dinov2_b.*effnet_lite0"):
        vpr.create_backbone("vgg16")


@pytest.mark.parametrize("offline_env", [True, False])
def test_offline_download_fails_fast_naming_the_offline_choices(monkeypatch, offline_env):
    monkeypatch.setattr(trainable_vpr.weights, "hub_weights_cached", lambda arch: False)
    from huggingface_hub import constants

    if offline_env:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        expected = "HF_HUB_OFFLINE is set"
    else:  # a local endpoint that refuses connections: the probe goes where HF_ENDPOINT says
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                     "http_proxy", "https_proxy", "all_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        expected = f"cannot reach {endpoint}: connection refused"
    # the real download must never be attempted (it retries for ~50 s)
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("download attempted"))
    start = time.perf_counter()
    with pytest.raises(VPRError) as error:
        vpr.create_backbone("dinov2_b")
    assert time.perf_counter() - start < 5
    message = str(error.value)
    assert "effnet_lite0" in message and "--weights" in message and "\n" not in message
    assert expected in message, message
