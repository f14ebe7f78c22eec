"""TensorBoard beside the CSV run log (--tensorboard): the CSV log stays the contract; this
mirrors its `epoch` and `validation` rows as scalars, adds the learning rate per epoch and, at
the end, the run's flags with its best validation R@1 (add_hparams).

Written under {log_dir}/tensorboard/{run_id} with torch.utils.tensorboard.SummaryWriter. The
`tensorboard` package is optional: `require_tensorboard()` says so in one line, before a run
writes anything.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vprkit.cli import VPRError

TENSORBOARD_FOLDER = "tensorboard"  # in --log_dir, one folder per run id

# CSV log column -> scalar tag (one home for the mapping; the step is the row's epoch)
EPOCH_SCALARS = {"avg_train_loss": "train/avg_train_loss", "avg_triplet_loss": "train/avg_triplet_loss",
                 "avg_contrastive_loss": "train/avg_contrastive_loss"}
VALIDATION_SCALARS = {"val_r1": "val/recall@1", "val_r5": "val/recall@5", "val_r10": "val/recall@10",
                      "val_loss": "val/loss"}
LEARNING_RATE_TAG = "train/learning_rate"
BEST_R1_TAG = "hparam/best_val_r1"


def require_tensorboard() -> None:
    """One line when --tensorboard cannot work: the tensorboard package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (needs the tensorboard package)
    except ImportError:
        raise VPRError("--tensorboard needs the tensorboard package: pip install tensorboard "
                       "(or drop --tensorboard; the CSV logs are written either way)") from None


def tensorboard_dir(log_dir: str | Path, run_id: str) -> Path:
    return Path(log_dir) / TENSORBOARD_FOLDER / run_id


def hparam_values(settings: Mapping[str, Any]) -> dict[str, int | float | str | bool]:
    """The run's settings as add_hparams takes them: numbers, strings and booleans as they are,
    anything else (None, lists) as its text, so every run has the same keys."""
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in settings.items()}


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


class TensorBoardLog:
    """The scalars of one run. Call it with each CSV log row (CsvLogger's on_row hook)."""

    def __init__(self, folder: str | Path, purge_step: int | None = None):
        """purge_step: a resumed run's first new epoch; the events the interrupted run wrote from
        there on are dropped (SummaryWriter's purge_step), as the CSV log drops its rows."""
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.folder = Path(folder)
        self._writer = SummaryWriter(log_dir=str(self.folder), purge_step=purge_step)

    def __call__(self, event: str, values: Mapping[str, Any]) -> None:
        """A CSV log row: `epoch` rows give the loss parts, `validation` rows R@N and the
        validation loss, at step = the row's epoch (epoch 0: the untrained head)."""
        tags = {"epoch": EPOCH_SCALARS, "validation": VALIDATION_SCALARS}.get(event)
        if tags is None or values.get("epoch") is None:
            return
        for column, tag in tags.items():
            number = _number(values.get(column))
            if number is not None:
                self._writer.add_scalar(tag, number, int(values["epoch"]))
        self._writer.flush()

    def learning_rate(self, epoch: int, lr: float) -> None:
        self._writer.add_scalar(LEARNING_RATE_TAG, float(lr), epoch)

    def hparams(self, settings: Mapping[str, Any], best_val_r1: float) -> None:
        """The run's flags and its best validation R@1, in this run's folder (run_name ".")."""
        self._writer.add_hparams(hparam_values(settings), {BEST_R1_TAG: float(best_val_r1)}, run_name=".")

    def close(self) -> None:
        self._writer.close()
