"""Route figures are written as valid PNGs (small synthetic route)."""
from __future__ import annotations

import numpy as np
from PIL import Image

from vprkit.routes.figures import draw_recall_by_seq_len, draw_similarity_path


def test_the_similarity_path_is_a_png_even_when_subsampled(tmp_path):
    rng = np.random.default_rng(0)
    q, db = rng.normal(size=(90, 8)).astype(np.float32), rng.normal(size=(120, 8)).astype(np.float32)
    truth = np.arange(90) + 10
    matched = np.where(np.arange(90) % 3 == 0, truth, -1)
    out = draw_similarity_path(q, db, matched, truth, tmp_path / "path.png", queries=slice(20, 80), max_pixels=16)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as image:
        assert image.size[0] > 300 and image.size[1] > 300


def test_recall_by_seq_len_is_a_png(tmp_path):
    out = draw_recall_by_seq_len({"one frame": {1: 0.04, 5: 0.04}, "matching": {1: 0.04, 5: 0.2, 20: 0.7}},
                                 tmp_path / "recall.png")
    with Image.open(out) as image:
        image.verify()
    assert out.stat().st_size > 5000
