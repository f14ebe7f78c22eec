"""Fixtures and hooks of the test suite (shared non-fixture code lives in tests/helpers/):
one intra-op thread, the `slow` marker on the end-to-end layer, tiny synthetic data sets bound to
tmp_path and the tiny random-weight backbone."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# One intra-op thread: the tensors here are tiny, and on a busy 2-core machine torch's thread
# pool turns a 2 ms forward pass into a 1 s one. Subprocesses inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

from helpers import TINY_MODEL, TINY_SIZE, write_poses  # noqa: E402

torch.set_num_threads(1)

E2E = Path(__file__).resolve().parent / "e2e"


def pytest_collection_modifyitems(config, items):
    """Every test of tests/e2e (real processes, real data, whole runs) is `slow`."""
    for item in items:
        if E2E in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def poses_csv(tmp_path):
    """write_poses bound to this test's tmp_path: poses_csv(positions, **options) -> CSV path."""
    return lambda positions, **options: write_poses(tmp_path, positions, **options)


@pytest.fixture(scope="session")
def tiny_backbone():
    """The tiny random-weight backbone shared by cache and training tests."""
    import trainable_vpr as vpr

    return vpr.create_backbone(TINY_MODEL, weights="random", image_size=TINY_SIZE)
