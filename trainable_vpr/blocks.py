"""--train_blocks N: the last N backbone blocks trained at cache speed.

The frozen part of the backbone runs once per image: the INPUT of its last N blocks is cached
(float16, streamed from the shards like local features: vprkit.extraction.cache.CachedRows). Training
runs only the tail (`BlockTail`: those blocks, the modules after them, the backbone's own pooling)
and the head on the cached inputs, the tail at --backbone_lr. The checkpoint stores only the
tail's state dict (`trained_blocks`); `load_trained_blocks` puts it back into a freshly built
backbone, whose cache key then names the trained weights, so eval_trained, run_experiment and
localize describe images with the trained backbone through the model object.

Blocks per architecture (`block_list`): a ViT's transformer blocks; EfficientNet's and ResNet's
individual blocks (MBConv / bottleneck blocks, flattened over the stages); ConvNeXt's stages.
What follows the blocks (a ViT's final norm, EfficientNet's 1x1 head conv and its BatchNorm,
ConvNeXt's norm_pre) is trained with them. The tail runs in eval mode always: BatchNorm keeps its
pretrained statistics (a training batch of 32 would replace them) and there is no dropout or
drop-path, so one step is a deterministic function of the batch (what DDP equality needs).
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import torch
import torch.nn as nn
from vprkit.cli import VPRError
from vprkit.extraction.cache import Backbone

from trainable_vpr.heads import embed  # noqa: F401 - embed streams CachedRows through a BlocksAndHead


def block_list(model: nn.Module) -> list[nn.Module]:
    """The backbone's blocks in forward order (see the module docstring)."""
    if hasattr(model, "conv_head") and hasattr(model, "blocks"):        # timm EfficientNet / MobileNet
        return [block for stage in model.blocks for block in stage]
    if all(hasattr(model, f"layer{i}") for i in range(1, 5)):            # timm ResNet
        return [block for i in range(1, 5) for block in getattr(model, f"layer{i}")]
    if hasattr(model, "stages") and hasattr(model, "norm_pre"):         # timm ConvNeXt
        return list(model.stages)
    if hasattr(model, "blocks") and hasattr(model, "norm"):             # timm VisionTransformer
        return list(model.blocks)
    raise VPRError(f"--train_blocks: no block list known for {type(model).__name__}; use a ViT, EfficientNet, "
                   f"ResNet or ConvNeXt backbone, or leave --train_blocks at 0")


def _after_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules forward_features applies after the last block."""
    if hasattr(model, "conv_head"):
        return [model.conv_head, model.bn2]
    if hasattr(model, "layer4"):
        return []
    if hasattr(model, "stages"):  # ConvNeXt (a ViT has a norm_pre too, before its blocks)
        return [model.norm_pre]
    return [model.norm]


def check_train_blocks(model: nn.Module, count: int) -> None:
    total = len(block_list(model))
    if not 1 <= count <= total:
        raise VPRError(f"--train_blocks {count}: this backbone has {total} blocks; give 1..{total} (0: frozen)")


class _Captured(Exception):
    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value


class BlockInput(nn.Module):
    """images -> the input of the backbone's block -count (the frozen part only: the forward stops
    there). As a Backbone's pooling it makes the cache hold those inputs."""

    def __init__(self, model: nn.Module, count: int):
        super().__init__()
        check_train_blocks(model, count)
        self.model, self.count = model, count

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        def capture(_module, inputs):
            raise _Captured(inputs[0])

        handle = block_list(self.model)[-self.count].register_forward_pre_hook(capture)
        try:
            self.model.forward_features(images)
        except _Captured as caught:
            return caught.value
        finally:
            handle.remove()
        raise RuntimeError("the block's input was not reached")


class BlockTail(nn.Module):
    """The cached block input -> the backbone's own descriptor: the last `count` blocks, the modules
    after them and the backbone's pooling (forward_head, pre-logits). Its modules are the
    backbone's own (shared, not copies): loading its state dict changes the backbone."""

    def __init__(self, model: nn.Module, count: int):
        super().__init__()
        check_train_blocks(model, count)
        self.count = count
        self.blocks = nn.ModuleList(block_list(model)[-count:])
        self.after = nn.ModuleList(_after_blocks(model))
        self._model = [model]  # not a submodule: the state dict holds only the trained modules

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in (*self.blocks, *self.after):
            x = module(x)
        return self._model[0].forward_head(x, pre_logits=True)

    def train(self, mode: bool = True) -> "BlockTail":
        return super().train(False)  # always eval: BatchNorm statistics kept, no dropout (module docstring)


class BlocksAndHead(nn.Module):
    """The trained part of a --train_blocks run: the tail, then the head, on cached block inputs."""

    def __init__(self, tail: BlockTail, head: nn.Module):
        super().__init__()
        self.tail, self.head = tail, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.tail(x))


def blocks_tag(model: nn.Module, count: int) -> str:
    return f"blocks-{count}-of-{len(block_list(model))}"


def block_input_backbone(backbone: Backbone, count: int) -> Backbone:
    """The frozen part of the backbone up to its last `count` blocks: the cache holds their input."""
    if backbone.pooling is not None:
        raise VPRError("--train_blocks: only with --pooling backbone (the backbone's own pooled vector) for now")
    inputs = BlockInput(backbone.model, count)
    info = dataclasses.replace(backbone.info, pooling=blocks_tag(backbone.model, count))
    return Backbone(backbone.model, info, inputs)


def trained_blocks_payload(tail: BlockTail) -> dict[str, Any]:
    """The checkpoint's `trained_blocks`: how many, and the state dict of those modules only."""
    return {"count": tail.count, "state_dict": {k: v.detach().clone() for k, v in tail.state_dict().items()}}


def load_trained_blocks(backbone: Backbone, saved: dict[str, Any]) -> Backbone:
    """The backbone with a checkpoint's trained blocks loaded (in place) and a cache key naming them."""
    tail = BlockTail(backbone.model, int(saved["count"]))
    tail.load_state_dict(saved["state_dict"])
    for param in backbone.model.parameters():
        param.requires_grad_(False)
    digest = hashlib.sha256()
    for key, value in sorted(saved["state_dict"].items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    weights = f"{backbone.info.weights}+blocks{tail.count}:{digest.hexdigest()[:16]}"
    info = dataclasses.replace(backbone.info, weights=weights)
    return Backbone(backbone.model, info, backbone.pooling, backbone.vocabulary)


def distributed_batch_embeddings(model: nn.Module, inputs: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """The embeddings of a whole batch, each of `world` processes computing a contiguous share
    (rank `rank`'s with autograd, the others' gathered without): the loss on the result is the
    single-process loss, and backward gives this rank the gradient of its share. Summing the
    gradients over ranks (all_reduce_gradients) is then exactly the single-process gradient,
    up to float summation order: the batch's mining and loss see the whole batch, in its order."""
    if world == 1:
        return model(inputs)
    import torch.distributed as dist

    bounds = [len(inputs) * r // world for r in range(world + 1)]
    local = model(inputs[bounds[rank]:bounds[rank + 1]])
    width = max(bounds[r + 1] - bounds[r] for r in range(world))
    padded = local.new_zeros(width, *local.shape[1:])
    padded[:len(local)] = local.detach()
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    parts = [local if r == rank else gathered[r][:bounds[r + 1] - bounds[r]] for r in range(world)]
    return torch.cat(parts)


def all_reduce_gradients(module: nn.Module, world: int) -> None:
    """Sum every parameter's gradient over the ranks (see distributed_batch_embeddings)."""
    if world == 1:
        return
    import torch.distributed as dist

    for param in module.parameters():
        if param.requires_grad:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad)
