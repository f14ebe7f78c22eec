"""Hand-written run logs of train_vpr's format and the checks on the figures analyze_metrics.py
draws from them (tests of analyze_metrics)."""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from vprkit.logs.runlog import LOG_COLUMNS

HEADER = ",".join(LOG_COLUMNS)
T = "2025-01-01T12:00:00"

# 3 epochs x 2 batches. Epochs 2 and 3 tie on R@1 (0.55): the best epoch is the earlier one, and
# its R@5 / R@10 (0.75 / 0.80) are not the highest of the run (epoch 3 has R@10 0.85).
# train time = 2.5 + 2.0 + 3.0 = 7.5 s, validation time = 0.5 + 0.5 + 1.0 = 2.0 s.
LOG = f"""{HEADER}
{T},batch,1,1,3.0,0.4,2.88,1.0,,,,,,,,,
{T},batch,1,2,2.6,0.3,2.51,1.5,,,,,,,,,
{T},epoch,1,,,,,,2.8,0.35,2.695,2.5,,,,,
{T},validation,1,,,,,,,,,,2.9,0.40,0.60,0.70,0.5
{T},batch,2,1,2.3,0.3,2.21,1.0,,,,,,,,,
{T},batch,2,2,2.1,0.2,2.04,1.0,,,,,,,,,
{T},epoch,2,,,,,,2.2,0.25,2.125,2.0,,,,,
{T},validation,2,,,,,,,,,,2.5,0.55,0.75,0.80,0.5
{T},batch,3,1,2.0,0.2,1.94,1.5,,,,,,,,,
{T},batch,3,2,1.8,0.2,1.74,1.5,,,,,,,,,
{T},epoch,3,,,,,,1.9,0.2,1.84,3.0,,,,,
{T},validation,3,,,,,,,,,,2.6,0.55,0.70,0.85,1.0
"""


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def assert_png(path: Path, min_kb: int = 20, min_width: int = 800) -> None:
    assert path.is_file(), f"{path} was not written"
    assert path.stat().st_size > min_kb * 1024, f"{path} is suspiciously small"
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert width >= min_width and height >= 400, (width, height)


def with_recalls(log: str, old: str, new: str) -> str:
    assert old in log
    return log.replace(old, new)
