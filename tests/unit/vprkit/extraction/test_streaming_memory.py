"""Streamed caches keep memory flat (issue 18 §3b/§3c): local features and block inputs are read
from the memory-mapped shards through CachedRows, so a training batch or an embedding chunk is
what is in memory, never the table. Measured with tracemalloc (numpy's buffers are traced; the
memory maps are not allocations) at N and 16 N images: the peak must not grow with N."""
from __future__ import annotations

import tracemalloc

import numpy as np
import torch

from trainable_vpr.heads import embed
from vprkit.extraction.cache import BackboneInfo, CachedRows, FeatureCache

ROW = (64, 32)                        # T x C local features per image: 8 KB a row as float32
ROW_BYTES = int(np.prod(ROW)) * 4


def _streamed_table(tmp_path, n: int) -> tuple[CachedRows, np.ndarray]:
    """A float16 local-feature cache of n images in shards of 128 rows (as extraction writes them)."""
    info = BackboneInfo("fake", "fake", "random:0", 64, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "bilinear", ROW[1],
                        pooling="local-L2-n64")
    cache = FeatureCache(tmp_path / f"n{n}", info, dtype="float16")
    data = np.random.default_rng(n).standard_normal((n, *ROW)).astype(np.float16)
    keys = [f"image-{i}" for i in range(n)]
    for start in range(0, n, 128):
        cache.add(keys[start:start + 128], data[start:start + 128])
    return CachedRows(cache, keys, ROW), data


def _peak_bytes(job) -> int:
    tracemalloc.start()
    try:
        job()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


class _MeanHead(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


def test_training_batches_read_only_their_rows(tmp_path):
    def read_batches(rows: CachedRows) -> None:
        order = np.random.default_rng(0).permutation(len(rows))
        for start in range(0, len(rows), 32):  # one epoch of 32-image batches, as trainable_vpr.data does
            batch = rows[order[start:start + 32]]
            assert batch.shape == (len(order[start:start + 32]), *ROW)

    small, _ = _streamed_table(tmp_path, 64)
    large, data = _streamed_table(tmp_path, 1024)
    assert np.array_equal(large[np.array([5, 700, 3])], data[[5, 700, 3]].astype(np.float32))
    peak_small, peak_large = _peak_bytes(lambda: read_batches(small)), _peak_bytes(lambda: read_batches(large))
    assert peak_large < 8 * 32 * ROW_BYTES                      # a few batches, not the 8 MB table
    assert peak_large < 2 * peak_small + 64 * 1024              # flat in N (16x the images)


def test_embedding_streams_chunks(tmp_path):
    small, _ = _streamed_table(tmp_path, 64)
    large, data = _streamed_table(tmp_path, 1024)
    out = {}
    peak_small = _peak_bytes(lambda: embed(_MeanHead(), small, batch_size=16))
    peak_large = _peak_bytes(lambda: out.setdefault("large", embed(_MeanHead(), large, batch_size=16)))
    np.testing.assert_allclose(out["large"], data.astype(np.float32).mean(axis=1), rtol=1e-5, atol=1e-6)
    assert peak_large < 1024 * ROW_BYTES / 8                     # a chunk (16 rows), not the table
    assert peak_large < 2 * peak_small + 1024 * ROW[1] * 4 + 64 * 1024  # flat in N but for the N x C output
