"""--weights FILE for ViTs saved at another input size or in the official DINOv2 layout: adapted
the way timm adapts its own pretrained weights (trainable_vpr.weights.adapt_state_dict). Tiny random
ViTs only; no download, no real weights."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed

import trainable_vpr as vpr
from vprkit.cli import VPRError
from trainable_vpr.weights import adapt_state_dict


def _save(state: dict[str, torch.Tensor], path: Path) -> str:
    torch.save(state, path)
    return str(path)


def _tiny_dinov2(arch: str, img_size: int) -> torch.nn.Module:
    # the DINOv2 architecture (patch 14, layer scale), shrunk so a test builds it in milliseconds
    return timm.create_model(arch, pretrained=False, num_classes=0, img_size=img_size, depth=2, embed_dim=48,
                             num_heads=2)


def test_vit_file_saved_at_another_size_loads_with_timms_resampled_position_grid(tmp_path):
    with torch.random.fork_rng():
        torch.manual_seed(1)
        source = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=160)  # 10 x 10 patches
    state = source.state_dict()
    path = _save(state, tmp_path / "vit160.pth")

    backbone = vpr.create_backbone("timm:test_vit", weights=path, image_size=96)  # 6 x 6 patches
    loaded = backbone.model.state_dict()
    assert loaded["pos_embed"].shape == (1, 1 + 36, 64)
    expected = resample_abs_pos_embed(state["pos_embed"], new_size=[6, 6], num_prefix_tokens=1)
    torch.testing.assert_close(loaded["pos_embed"], expected, rtol=0, atol=0)
    assert torch.equal(loaded["pos_embed"][:, 0], state["pos_embed"][:, 0])  # the class token's is kept as is
    for key, value in state.items():
        if key != "pos_embed":
            assert torch.equal(loaded[key], value), key
    with torch.no_grad():
        out = vpr.backbone_descriptor(backbone.model, torch.rand(2, 3, 96, 96))
    assert out.shape == (2, 64) and torch.isfinite(out).all()

    # at the file's own size nothing is resampled
    same = vpr.create_backbone("timm:test_vit", weights=path, image_size=160).model.state_dict()
    assert torch.equal(same["pos_embed"], state["pos_embed"])


def test_official_dinov2_layout_is_converted_and_resampled():
    # facebookresearch/dinov2 keys: timm's names plus mask_token, the grid at the training size
    source = _tiny_dinov2("vit_small_patch14_dinov2", img_size=70).state_dict()  # 5 x 5 patches
    official = {**source, "mask_token": torch.randn(1, 48)}
    target = _tiny_dinov2("vit_small_patch14_dinov2", img_size=42)  # 3 x 3 patches
    adapted = adapt_state_dict(official, target)
    assert "mask_token" not in adapted
    missing, unexpected = target.load_state_dict(adapted, strict=True)
    assert not missing and not unexpected
    expected = resample_abs_pos_embed(source["pos_embed"], [3, 3])
    torch.testing.assert_close(target.pos_embed.data, expected, rtol=0, atol=0)
    assert torch.equal(target.blocks[1].ls2.gamma, source["blocks.1.ls2.gamma"])
    with torch.no_grad():
        assert torch.isfinite(target(torch.rand(1, 3, 42, 42))).all()


def test_official_dinov2_with_registers_layout_is_converted():
    # official layout with registers: the position grid includes the class token's position;
    # timm's reg4 model has no position for prefix tokens, so the class token absorbs it
    target = _tiny_dinov2("vit_small_patch14_reg4_dinov2", img_size=42)
    blocks = {k: v for k, v in _tiny_dinov2("vit_small_patch14_reg4_dinov2", img_size=70).state_dict().items()
              if k.startswith(("blocks.", "patch_embed.", "norm."))}
    cls_token, pos_embed, registers = torch.randn(1, 1, 48), torch.randn(1, 1 + 25, 48), torch.randn(1, 4, 48)
    official = {**blocks, "cls_token": cls_token, "pos_embed": pos_embed, "register_tokens": registers,
                "mask_token": torch.randn(1, 48)}
    target.load_state_dict(adapt_state_dict(official, target), strict=True)
    assert torch.equal(target.reg_token.data, registers)
    torch.testing.assert_close(target.cls_token.data, cls_token + pos_embed[:, :1], rtol=0, atol=0)
    expected = resample_abs_pos_embed(pos_embed[:, 1:], [3, 3], num_prefix_tokens=0)
    torch.testing.assert_close(target.pos_embed.data, expected, rtol=0, atol=0)


def test_official_layout_file_loads_through_weights_flag(tmp_path):
    source = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=160).state_dict()
    path = _save({**source, "mask_token": torch.randn(1, 64)}, tmp_path / "official.pth")
    loaded = vpr.create_backbone("timm:test_vit", weights=path, image_size=128).model.state_dict()
    assert loaded["pos_embed"].shape == (1, 1 + 64, 64)
    assert torch.equal(loaded["blocks.5.mlp.fc2.weight"], source["blocks.5.mlp.fc2.weight"])


@pytest.mark.parametrize("content", ["other width", "other network", "not a dict", "odd grid"])
def test_a_wrong_weights_file_stays_one_line(tmp_path, content):
    vit = timm.create_model("test_vit", pretrained=False, num_classes=0).state_dict()
    state = {
        "other width": lambda: timm.create_model("test_vit", pretrained=False, num_classes=0,
                                                 embed_dim=32).state_dict(),
        "other network": lambda: timm.create_model("resnet18", pretrained=False).state_dict(),
        "not a dict": lambda: torch.zeros(3),
        "odd grid": lambda: {**vit, "pos_embed": torch.randn(1, 1 + 15, 64)},  # 15 positions: no square grid
    }[content]()
    path = _save(state, tmp_path / "wrong.pth")
    with pytest.raises(VPRError) as err:
        vpr.create_backbone("timm:test_vit", weights=path, image_size=96)
    message = str(err.value)
    assert message.startswith(f"--weights {path}:") and "\n" not in message
