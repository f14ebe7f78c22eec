"""Checkpoints, in one place: where they are written, what they hold (checkpoint_payload), how they
are saved (atomically), read back safely (weights_only loading, format version, required keys, the
head rebuilt) and rebuilt (head_from_checkpoint, checkpoint_backbone; the whole descriptor:
trainable_vpr.model.PlaceDescriptor.from_checkpoint). The file format is DESIGN.md §6's.

Two kinds (the `kind` key; absent: "frame"): a single-frame checkpoint (a head over one image's
frozen descriptor) and a sequence checkpoint (sequence_checkpoint_payload: the per-frame map of
the matching's frame descriptor, the sequence head over windows of frozen descriptors or none, the
matching settings and the fusion weight; trainable_vpr.sequence_model.SequenceDescriptor).
load_checkpoint(path, kind) refuses the other kind in one line."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from vprkit.cli import VPRError, atomic_write
from vprkit.cli.configs import DEFAULT_POS_THRESHOLD_M
from vprkit.extraction.cache import Backbone
from vprkit.cli.extraction_settings import pooling_config
from vprkit.extraction.pooling import PoolingConfig
from vprkit.logs.runlog import safe_name

from trainable_vpr.backbones import DEFAULT_LOCAL_FEATURES_PER_IMAGE, create_pooled_backbone, local_backbone
from trainable_vpr.heads import LOCAL_HEADS, HeadConfig, build_head
from trainable_vpr.seqnet import SEQ_HEAD, SeqHeadConfig, SeqNetHead

FORMAT_VERSION = 1
FRAME, SEQUENCE = "frame", "sequence"  # the checkpoint kinds


def checkpoint_path(output_dir: str | Path, run_id: str, kind: str = "") -> Path:
    """{run_id}.pth (the best checkpoint), or with kind "last" (resumable, written every
    --save_every_n_epochs) or "final" (the end of the run) a _{kind} suffix. Named by the run
    id, so no run ever replaces another run's weights (DESIGN.md §6)."""
    return Path(output_dir) / f"{safe_name(run_id)}{f'_{kind}' if kind else ''}.pth"


def latest_alias_path(output_dir: str | Path, model: str, seed: int) -> Path:
    """trained_{model}_seed{seed}.pth: a copy of the best checkpoint of the latest finished run
    of that model and seed (the documented short path). The run-id file is the real one; the
    copy says which run it is (its run_id key), and replacing it loses nothing."""
    return Path(output_dir) / f"trained_{safe_name(model)}_seed{seed}.pth"


def refresh_latest_alias(best: str | Path, alias: str | Path) -> None:
    """Replace the alias by a copy of `best`, atomically (a copy, not a symlink: it works on
    every file system and survives moving the folder)."""
    atomic_write(alias, lambda p: shutil.copyfile(best, p))


def random_states(rng: np.random.Generator, generator: torch.Generator) -> dict[str, Any]:
    """Every random state a run draws from, in types torch.load(weights_only=True) reads
    (numpy's PCG64 state is a dict of Python ints, some beyond 2**64: pickled as plain ints)."""
    return {"numpy": rng.bit_generator.state, "torch_generator": generator.get_state(),
            "torch_global": torch.get_rng_state()}


def embeddings_backbone(name: str, source: str | Path, dim: int) -> dict[str, Any]:
    """The checkpoint's `backbone` field of a head trained on an embeddings parquet."""
    return {"name": name, "arch": EMBEDDINGS_ARCH, "weights": f"embeddings:{Path(source).name}", "feature_dim": dim}


EMBEDDINGS_ARCH = "precomputed"


def restore_random_states(states: dict[str, Any], rng: np.random.Generator, generator: torch.Generator) -> None:
    rng.bit_generator.state = states["numpy"]
    generator.set_state(states["torch_generator"])
    torch.set_rng_state(states["torch_global"])


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """torch.save to a temporary file, then rename: never a half-written checkpoint."""
    atomic_write(path, lambda p: torch.save({"format_version": FORMAT_VERSION, **payload}, p))


CHECKPOINT_KEYS = ("model_state_dict", "head_config", "backbone", "config")
SEQUENCE_KEYS = ("model_state_dict", "head_config", "frame_state_dict", "frame_head_config", "sequence", "backbone",
                 "config")
# the `sequence` entry of a sequence checkpoint: matching settings, the gap that cuts drives, the fusion weight
SEQUENCE_SETTINGS = ("seq_len", "v_min", "v_max", "n_velocities", "shortlist", "max_gap", "fusion_weight")


def checkpoint_payload(head: nn.Module, head_config: HeadConfig, backbone: dict[str, Any], config: Any,
                       progress: dict[str, Any], run_id: str, log_file: str | Path,
                       vocabulary: np.ndarray | None = None, resume: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a checkpoint holds (DESIGN.md §6): the head's weights (a copy) and config, the backbone's
    info dict, the whole training config, the run's `progress` (best metrics, epochs), its run id and
    log, the VLAD vocabulary (vlad pooling) and, for a resumable checkpoint, the `resume` states."""
    payload = {
        "model_state_dict": {k: v.detach().clone() for k, v in head.state_dict().items()},
        "head_config": head_config.as_dict(),
        "backbone": backbone,
        "config": dataclasses.asdict(config),
        **progress,
        "run_id": run_id,
        "log_file": str(log_file),
    }
    if vocabulary is not None:
        payload["vlad_vocabulary"] = torch.from_numpy(vocabulary)
    if resume is not None:
        payload["resume"] = resume
    return payload


def sequence_checkpoint_payload(frame_head: nn.Module | None, frame_head_config: HeadConfig | None,
                                seq_head: SeqNetHead | None, backbone: dict[str, Any], config: Any,
                                sequence: dict[str, Any], chosen: dict[str, Any], run_id: str,
                                log_file: str | Path = "", progress: dict[str, Any] | None = None,
                                vocabulary: np.ndarray | None = None) -> dict[str, Any]:
    """What a sequence checkpoint holds (DESIGN.md §6): kind "sequence"; the per-frame map of the
    matching's frame descriptor (frame_head_config + frame_state_dict; None: the raw descriptor);
    the sequence head (head_config = its SeqHeadConfig dict with type "seqnet", model_state_dict;
    None: training-free, matching alone); `sequence` (SEQUENCE_SETTINGS: seq_len, the velocity
    range, n_velocities, shortlist, max_gap, fusion_weight: None = the descriptor alone, inf =
    matching alone); what val chose (`chosen`: frame start, velocity, fusion weight, scores); the
    backbone's info, the config, the run's `progress`, run id and log, the VLAD vocabulary."""
    missing = [k for k in SEQUENCE_SETTINGS if k not in sequence]
    if missing:
        raise ValueError(f"sequence settings lack {', '.join(missing)}")
    if seq_head is not None and seq_head.config.seq_len != sequence["seq_len"]:
        raise ValueError(f"the head's seq_len {seq_head.config.seq_len} is not the matching's {sequence['seq_len']}")

    def state(module: nn.Module | None) -> dict[str, torch.Tensor] | None:
        return None if module is None else {k: v.detach().clone() for k, v in module.state_dict().items()}

    payload = {
        "kind": SEQUENCE,
        "model_state_dict": state(seq_head),
        "head_config": None if seq_head is None else {"type": SEQ_HEAD, **seq_head.config.as_dict()},
        "frame_state_dict": state(frame_head),
        "frame_head_config": None if frame_head_config is None else frame_head_config.as_dict(),
        "sequence": dict(sequence),
        "chosen": dict(chosen),
        "backbone": backbone,
        "config": config if isinstance(config, dict) else dataclasses.asdict(config),
        **(progress or {}),
        "run_id": run_id,
        "log_file": str(log_file),
    }
    if vocabulary is not None:
        payload["vlad_vocabulary"] = torch.from_numpy(vocabulary)
    return payload


def checkpoint_kind(checkpoint: dict[str, Any]) -> str:
    """"frame" (a single-frame head) or "sequence"."""
    return checkpoint.get("kind", FRAME)


def head_from_checkpoint(checkpoint: dict[str, Any]) -> nn.Module:
    """The trained head of a single-frame checkpoint, in eval mode."""
    head = build_head(checkpoint["head_config"])
    head.load_state_dict(checkpoint["model_state_dict"])
    return head.eval()


def sequence_heads_from_checkpoint(checkpoint: dict[str, Any]) -> tuple[nn.Module | None, SeqNetHead | None]:
    """(the per-frame map of the matching's frame descriptor, the sequence head) of a sequence
    checkpoint, in eval mode; None where it holds none (raw frames; training-free)."""
    frame_head = None
    if checkpoint["frame_head_config"] is not None:
        frame_head = build_head(checkpoint["frame_head_config"])
        frame_head.load_state_dict(checkpoint["frame_state_dict"])
        frame_head.eval()
    seq_head = None
    if checkpoint["head_config"] is not None:
        seq_head = SeqNetHead(SeqHeadConfig.from_dict(checkpoint["head_config"]))
        seq_head.load_state_dict(checkpoint["model_state_dict"])
        seq_head.eval()
    return frame_head, seq_head


def _wrong_kind(path: Path, checkpoint: dict[str, Any], kind: str) -> str:
    """The one line for a checkpoint of the other kind."""
    if kind == SEQUENCE:
        head = checkpoint["head_config"].get("type")
        return (f"checkpoint {path} is a single-frame checkpoint (--head {head}), not a sequence one; give a "
                f"checkpoint of train_vpr.py --head {SEQ_HEAD} --seq_len L (or use this one with sequence matching)")
    seq_len = checkpoint["sequence"].get("seq_len")
    return (f"checkpoint {path} is a sequence checkpoint (windows of {seq_len} frames); it describes windows of a "
            f"route, not single images: give --seq_len {seq_len} where a script takes it, or a single-frame checkpoint")


def load_checkpoint(path: str | Path, kind: str | None = FRAME) -> dict[str, Any]:
    """Load a checkpoint with weights_only=True (a pickle that would run code is refused) and
    check it is one of ours, complete, of a format this version reads, of `kind` ("frame",
    "sequence"; None: either, see checkpoint_kind) and that its heads are rebuilt from it."""
    path = Path(path)
    if not path.is_file():
        raise VPRError(f"checkpoint {path}: file not found; check the path")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - which exception depends on how the file is broken
        text = str(exc) or type(exc).__name__
        if "GLOBAL" in text or "Unsupported global" in text:  # a pickle naming code to import and call
            raise VPRError(f"checkpoint {path}: refused, it holds Python objects that could run code (not a checkpoint "
                           f"of this suite); load only .pth files written by train_vpr.py") from None
        reason = text.split("WeightsUnpickler error:")[-1].strip() if "WeightsUnpickler error:" in text else text
        raise VPRError(f"checkpoint {path}: truncated or not a PyTorch checkpoint ({reason.splitlines()[0][:100]}); "
                       f"retrain or restore the file") from None
    version = checkpoint.get("format_version", 0) if isinstance(checkpoint, dict) else 0
    if not isinstance(version, int) or version > FORMAT_VERSION:  # first: a newer format may have other keys
        raise VPRError(f"checkpoint {path}: format version {version} is newer than this code reads ({FORMAT_VERSION}); "
                       f"update the suite")
    found = checkpoint_kind(checkpoint) if isinstance(checkpoint, dict) else FRAME
    keys = SEQUENCE_KEYS if found == SEQUENCE else CHECKPOINT_KEYS
    if not isinstance(checkpoint, dict) or found not in (FRAME, SEQUENCE) or any(k not in checkpoint for k in keys) \
            or not isinstance(checkpoint["backbone"], dict) or "name" not in checkpoint["backbone"]:
        raise VPRError(f"checkpoint {path}: not a checkpoint of this suite "
                       f"(expected keys {', '.join(keys)}); "
                       f"give a .pth written by train_vpr.py")
    if kind is not None and found != kind:
        raise VPRError(_wrong_kind(path, checkpoint, kind))
    try:
        if found == SEQUENCE:
            sequence_heads_from_checkpoint(checkpoint)
        else:
            head_from_checkpoint(checkpoint)
    except (KeyError, TypeError, ValueError, RuntimeError, VPRError) as exc:
        reason = " ".join(str(exc).split())[:240] or type(exc).__name__
        raise VPRError(f"checkpoint {path}: its head weights do not fit its head_config ({reason}); "
                       f"retrain or restore the file") from None
    return checkpoint


def pos_threshold_of(given: float | None, checkpoint: dict[str, Any] | None) -> float:
    """The positive threshold a script applying a model uses: --pos_threshold_m when given, else the
    one the checkpoint's head was trained with, else the default (25 m)."""
    if given:
        return given
    if checkpoint is None:
        return DEFAULT_POS_THRESHOLD_M
    return checkpoint["config"].get("pos_threshold_m", DEFAULT_POS_THRESHOLD_M)


def checkpoint_vocabulary(checkpoint: dict[str, Any]) -> np.ndarray | None:
    """The VLAD vocabulary a --pooling vlad checkpoint was trained with (None for other poolings)."""
    saved = checkpoint.get("vlad_vocabulary")
    return None if saved is None else saved.numpy()


def check_checkpoint_matches(checkpoint: dict[str, Any], path: str | Path, model: str | None = None,
                             head: str | None = None) -> None:
    """A checkpoint of the backbone and head the user asked for (None: not asked)."""
    trained_on, trained_head = checkpoint["backbone"]["name"], (checkpoint["head_config"] or {}).get("type")
    if model and model != trained_on:
        raise VPRError(f"checkpoint {path} was trained on backbone {trained_on}, not --model {model}; "
                       f"drop --model or give a checkpoint of {model}")
    if head and head != trained_head:
        raise VPRError(f"checkpoint {path} holds a {trained_head} head, not --head {head}; "
                       f"drop --head or give a checkpoint with a {head} head")


def checkpoint_backbone(checkpoint: dict[str, Any], path: str | Path, weights: str | None = None, image_size: int = 0,
                        asked: PoolingConfig | None = None) -> Backbone:
    """The frozen backbone a checkpoint's head was trained on: its name, input size, pooling and
    VLAD vocabulary, and the same weights (checked; `weights` may point at the file again). The
    pooling flags the user gave (`asked`) may only repeat the checkpoint's."""
    saved = checkpoint["backbone"]
    trained = pooling_config(checkpoint["config"])
    if asked is not None and asked != PoolingConfig() and asked != trained:
        raise VPRError(f"checkpoint {path} was trained on --pooling {trained.pooling} --feature_layer "
                       f"{trained.feature_layer} --vlad_clusters {trained.vlad_clusters}; drop the pooling flags "
                       f"(the checkpoint's are used)")
    if trained.pooling == "vlad" and "vlad_vocabulary" not in checkpoint:
        raise VPRError(f"checkpoint {path}: --pooling vlad but no VLAD vocabulary stored; retrain it")
    backbone = create_pooled_backbone(saved["name"], weights or checkpoint["config"].get("weights"),
                                      image_size or saved.get("image_size", 0), trained,
                                      vocabulary=checkpoint_vocabulary(checkpoint))
    if (checkpoint["head_config"] or {}).get("type") in LOCAL_HEADS:  # the head aggregates the local features itself
        per_image = checkpoint["config"].get("local_features_per_image", DEFAULT_LOCAL_FEATURES_PER_IMAGE)
        backbone = local_backbone(backbone, trained.feature_layer, per_image)
    if backbone.info.weights != saved.get("weights"):
        raise VPRError(f"checkpoint {path} was trained on {saved['name']} weights {saved.get('weights')}, "
                       f"but the weights found now are {backbone.info.weights}; pass the same --weights")
    in_dim = head_input_dim(checkpoint)
    if in_dim is not None and backbone.info.feature_dim != in_dim:
        raise VPRError(f"checkpoint {path}: its head takes {in_dim}-dim features, "
                       f"the backbone gives {backbone.info.feature_dim}")
    if "trained_blocks" in checkpoint:  # --train_blocks: the trained blocks go back into the backbone
        from trainable_vpr.blocks import load_trained_blocks

        backbone = load_trained_blocks(backbone, checkpoint["trained_blocks"])
    return backbone


def head_input_dim(checkpoint: dict[str, Any]) -> int | None:
    """The frozen descriptor's width a checkpoint's heads take (None: a sequence checkpoint of raw
    frames and no head: any)."""
    if checkpoint_kind(checkpoint) == FRAME:
        return checkpoint["head_config"]["in_dim"]
    if checkpoint["head_config"] is not None:
        return checkpoint["head_config"]["frame_dim"]
    return None if checkpoint["frame_head_config"] is None else checkpoint["frame_head_config"]["in_dim"]
