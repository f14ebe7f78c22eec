"""torch.hub entry points: a trained checkpoint as the whole descriptor module.

    model = torch.hub.load(REPO_DIR, "get_trained_model", checkpoint_path="trained_models/RUN.pth",
                           source="local")
    descriptors = model(images)  # float32 RGB [B, 3, H, W] in [0, 1], any size -> [B, D] L2-normalised

The module is trainable_vpr.model.PlaceDescriptor in eval mode (DESIGN.md §6), built as the
scripts build it (trainable_vpr.model.load_model): the checkpoint is read with
torch.load(weights_only=True), so a file that would run code is refused. A sequence checkpoint
(train_vpr.py --head seqnet --seq_len L) gives its trainable_vpr.sequence_model.SequenceDescriptor:
windows [B, L, 3, H, W] -> [B, D] (both through trainable_vpr.sequence_model.load_route_model).
"""
from __future__ import annotations

# torch.hub checks these are importable before loading (module names, not pip names)
dependencies = ["torch", "torchvision", "timm", "numpy", "pandas", "PIL", "filelock", "tqdm"]


def get_trained_model(checkpoint_path: str, weights: str | None = None, image_size: int = 0):
    """The descriptor module of a train_vpr.py checkpoint: its backbone (pretrained weights from
    the same source as in training, or the state-dict FILE `weights`), pooling with its VLAD
    vocabulary, and head (a PlaceDescriptor), or for a sequence checkpoint the whole sequence
    model (a SequenceDescriptor). image_size: 0 keeps the checkpoint's input size."""
    from trainable_vpr.sequence_model import load_route_model
    from vprkit.cli.extraction_settings import ExtractionSettings

    settings = ExtractionSettings(weights=weights, image_size=image_size)
    return load_route_model(str(checkpoint_path), None, settings, None)[0].eval()
