"""Shared module of the VPR training suite.

Every script (train_vpr.py, eval_trained.py, run_experiment.py, analyze_metrics.py) takes its
pieces from here, so that each idea has one home:

1. errors and the CLI wrapper      (VPRError, run_cli)
2. geometry and poses CSVs         (to_metric_xyz, load_poses -> PlaceTable)
3. backbones                       (BACKBONES, create_backbone)
4. the feature cache               (FeatureCache, extract_features)
5. heads and losses                (ProjectionHead, HybridLoss)
6. GPS mining                      (neighbours_within, cluster_places, mine_hard_negatives, ...)
7. evaluation                      (evaluate_retrieval -> RecallResult)
8. configuration, logs, checkpoints (TrainConfig, CsvLogger, save_checkpoint, load_checkpoint)

See ../shared/DESIGN.md (the contracts) and README.md (the user's view).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import json
import math
import os
import socket
import sys
import tempfile
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd

# torch and friends are imported at module level: every script needs them except
# analyze_metrics.py, which only uses the error helpers and pays the import once.
import torch
import torch.nn as nn
import torch.nn.functional as F

FORMAT_VERSION = 1
EARTH_RADIUS_M = 6_371_008.8  # mean Earth radius (IUGG), metres


# ============================================================================================
# 1. Errors and the CLI wrapper
# ============================================================================================
class VPRError(Exception):
    """A problem with the user's input: printed as one line, exit code 2, no traceback."""


def run_cli(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> None:
    """Run a script's main(); turn VPRError (and Ctrl-C) into one line on stderr and exit code.

    `--debug` anywhere on the command line shows the full traceback instead.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        main(args)
    except VPRError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


def check_writable_dir(path: str | Path, flag: str) -> Path:
    """Create `path` if needed and make sure files can be written there."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_probe_{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise VPRError(f"{flag} {path}: cannot write there ({exc.strerror}); choose another folder") from exc
    return path


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp_path), then rename tmp_path onto path: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# Column contracts (DESIGN.md §6). analyze_metrics.py reads what train_vpr.py writes.
LOG_COLUMNS = [
    "timestamp", "event", "epoch", "batch", "train_loss", "triplet_loss", "contrastive_loss",
    "batch_time", "avg_train_loss", "avg_triplet_loss", "avg_contrastive_loss", "epoch_time",
    "val_loss", "val_r1", "val_r5", "val_r10", "val_time",
]
LOG_EVENTS = ("batch", "epoch", "validation")
SUMMARY_RESULT_COLUMNS = [
    "best_val_r1", "best_val_r5", "best_val_r10", "best_epoch", "epochs_run", "wall_time_s",
    "checkpoint", "log_file",
]
EXPERIMENT_COLUMNS = ["model", "variant", "recall@1", "recall@5", "recall@10", "delta_r1_vs_raw"]
EXPERIMENT_VARIANTS = ("raw", "pca_whitened", "trained")
