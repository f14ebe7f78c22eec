"""torch.hub entry points: a trained checkpoint as the whole descriptor module.

    model = torch.hub.load(REPO_DIR, "get_trained_model", checkpoint_path="trained_models/RUN.pth",
                           source="local")
    descriptors = model(images)  # float32 RGB [B, 3, H, W] in [0, 1], any size -> [B, D] L2-normalised

The module is trainable_vpr.model.PlaceDescriptor in eval mode (DESIGN.md §6), built as the
scripts build it (trainable_vpr.model.load_model): the checkpoint is read with
torch.load(weights_only=True), so a file that would run code is refused.
"""
from __future__ import annotations

# torch.hub checks these are importable before loading (module names, not pip names)
dependencies = ["torch", "torchvision", "timm", "numpy", "pandas", "PIL", "filelock", "tqdm"]


def get_trained_model(checkpoint_path: str, weights: str | None = None, image_size: int = 0):
    """The PlaceDescriptor of a train_vpr.py checkpoint: its backbone (pretrained weights from the
    same source as in training, or the state-dict FILE `weights`), pooling with its VLAD
    vocabulary, and head. image_size: 0 keeps the checkpoint's input size."""
    from trainable_vpr.model import load_model
    from vprkit.cli.extraction_settings import ExtractionSettings

    return load_model(str(checkpoint_path), None, ExtractionSettings(weights=weights, image_size=image_size)).eval()
