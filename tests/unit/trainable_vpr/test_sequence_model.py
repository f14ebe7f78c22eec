"""SequenceDescriptor: forward() on frames equals the cached path (describe_windows), and a
sequence checkpoint round-trips; the two checkpoint kinds refuse each other in one line."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import TINY_MODEL, TINY_SIZE, write_smooth_image
import trainable_vpr as vpr
from trainable_vpr.checkpoints import (checkpoint_payload, load_checkpoint, save_checkpoint,
                                       sequence_checkpoint_payload)
from trainable_vpr.model import PlaceDescriptor, load_model
from trainable_vpr.seqnet import SeqHeadConfig, SeqNetHead
from trainable_vpr.sequence_model import SequenceDescriptor, frame_map, load_sequence_model
from vprkit.cli import VPRError
from vprkit.cli.extraction_settings import ExtractionSettings
from vprkit.retrieval.whitening import Whitening
from vprkit.routes.matching import SeqMatchConfig
from vprkit.routes.windows import causal_windows
from vprkit.tables.images import open_rgb
from vprkit.tables.places import load_poses

SEQ_LEN = 3


@pytest.fixture(scope="module")
def route(tmp_path_factory):
    """Two drives of 5 frames (frame_index, traversal), images of distinct smooth scenes."""
    root = tmp_path_factory.mktemp("seqmodel")
    rows = []
    for drive in range(2):
        for i in range(5):
            write_smooth_image(root / f"img/{drive}_{i}.png", seed=10 * drive + i)
            rows.append({"image_path": f"img/{drive}_{i}.png", "easting": 600_000.0 + 30 * i,
                         "northing": 3_500_000.0, "frame_index": i, "traversal": f"d{drive}"})
    pd.DataFrame(rows).to_csv(root / "route.csv", index=False)
    return root


def _settings(root) -> ExtractionSettings:
    return ExtractionSettings(extract_batch_size=4, num_workers=0, device="cpu", cache_dir=str(root / "cache"))


def _frames(table, windows: np.ndarray) -> torch.Tensor:
    """[W, L, 3, H, W] float RGB in [0, 1] of each window's images."""
    images = np.stack([np.asarray(open_rgb(p), dtype=np.float32) / 255.0 for p in table.paths])
    return torch.from_numpy(images[windows]).permute(0, 1, 4, 2, 3).contiguous()


def _random_head(frame_dim: int) -> SeqNetHead:
    torch.manual_seed(0)
    head = SeqNetHead(SeqHeadConfig(seq_len=SEQ_LEN, frame_dim=frame_dim, proj_dim=8, hidden_dim=16, dropout=0.0,
                                    kernel=3))
    for p in head.parameters():  # not the identity anywhere: the temporal conv and residual matter
        torch.nn.init.normal_(p, std=0.3)
    return head.eval()


def _whitening(dim: int, out: int = 6) -> Whitening:
    rng = np.random.default_rng(1)
    projection = rng.normal(size=(out, dim)).astype(np.float32)
    return Whitening(mean=rng.normal(scale=0.05, size=dim).astype(np.float32), projection=projection,
                     correction=projection, shrinkage=0.5, num_pairs=1)


def _model(root, with_head: bool, with_map: bool) -> SequenceDescriptor:
    frozen = PlaceDescriptor.baseline(TINY_MODEL, "random", TINY_SIZE).frozen
    dim = frozen.info.feature_dim
    frame_head, _ = frame_map(_whitening(dim) if with_map else None)
    return SequenceDescriptor(PlaceDescriptor(frozen, frame_head), _random_head(dim) if with_head else None,
                              SeqMatchConfig(SEQ_LEN, 0.9, 1.1, shortlist=7), max_gap=2.0, fusion_weight=0.5)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


@pytest.mark.parametrize("with_head, with_map", [(True, False), (False, False), (False, True)],
                         ids=["seqnet", "raw_frames", "whitened_frames"])
def test_forward_on_frames_equals_the_cached_windows(route, with_head, with_map):
    table = load_poses(route / "route.csv")
    model = _model(route, with_head, with_map)
    cached = model.describe_windows(table, settings=_settings(route))
    windows = causal_windows(model.route(table), SEQ_LEN)
    assert windows[5].tolist() == [5, 5, 5] and windows[7].tolist() == [5, 6, 7]  # drive 2 starts at row 5
    with torch.no_grad():
        direct = model(_frames(table, windows)).numpy()
    assert direct.shape == cached.shape == (len(table), model.output_dim)
    np.testing.assert_allclose(np.linalg.norm(cached, axis=1), 1.0, atol=1e-5)
    assert _cosines(direct, cached).min() >= 0.9999
    assert _cosines(direct, np.roll(direct, 1, axis=0)).max() < 0.9999  # not a constant output


def test_training_free_windows_are_the_mean_cosine_of_aligned_frames(route):
    table = load_poses(route / "route.csv")
    model = _model(route, with_head=False, with_map=True)
    frames = model.describe_frames(table, _settings(route))
    windows = model.describe_windows(table, settings=_settings(route))
    rows = causal_windows(model.route(table), SEQ_LEN)
    expected = (frames[rows[3]] * frames[rows[8]]).sum(axis=1).mean()
    assert float(windows[3] @ windows[8]) == pytest.approx(expected, abs=1e-5)
    whitening = _whitening(model.frame.frozen.info.feature_dim)
    np.testing.assert_allclose(frames, whitening.apply(model.frame_features(table, _settings(route))), atol=1e-5)


def _save_sequence(model: SequenceDescriptor, path, frame_config=None) -> None:
    config = vpr.TrainConfig(train_csv="t.csv", val_csv="v.csv", model=TINY_MODEL, weights="random",
                             image_size=TINY_SIZE, seq_len=SEQ_LEN)
    save_checkpoint(path, sequence_checkpoint_payload(
        model.frame.head, frame_config, model.head, model.frame.frozen.info.as_dict(), config,
        model.sequence_settings(), {"frame_start": "raw", "fusion_weight": 0.5, "val_r1": 0.4}, "run", "run.csv"))


@pytest.mark.parametrize("with_head", [True, False], ids=["seqnet", "training_free"])
def test_sequence_checkpoint_round_trip(route, tmp_path, with_head):
    table = load_poses(route / "route.csv")
    model = _model(route, with_head, with_map=not with_head)
    frame_config = frame_map(_whitening(model.frame.frozen.info.feature_dim))[1] if not with_head else None
    path = tmp_path / "seq.pth"
    _save_sequence(model, path, frame_config)
    rebuilt = SequenceDescriptor.from_checkpoint(path)
    assert (rebuilt.match, rebuilt.max_gap, rebuilt.fusion_weight) == (model.match, 2.0, 0.5)
    assert rebuilt.chosen["val_r1"] == 0.4
    settings = _settings(route)
    np.testing.assert_allclose(rebuilt.describe_windows(table, settings=settings),
                               model.describe_windows(table, settings=settings), atol=1e-5)
    loaded = load_sequence_model(str(path), ExtractionSettings())
    np.testing.assert_allclose(loaded.describe_frames(table, settings), model.describe_frames(table, settings),
                               atol=1e-5)
    # a sequence checkpoint where a single-frame one is needed: one line naming both
    with pytest.raises(VPRError, match="is a sequence checkpoint .windows of 3 frames.*--seq_len 3"):
        load_model(str(path), None, ExtractionSettings())
    assert load_checkpoint(path, kind=None)["kind"] == "sequence"


def test_a_single_frame_checkpoint_is_not_a_sequence_one(route, tmp_path):
    frozen = PlaceDescriptor.baseline(TINY_MODEL, "random", TINY_SIZE).frozen
    head_config = vpr.HeadConfig("residual", frozen.info.feature_dim, 8, 16, 0.0)
    config = vpr.TrainConfig(train_csv="t.csv", val_csv="v.csv", model=TINY_MODEL, weights="random",
                             image_size=TINY_SIZE)
    path = tmp_path / "frame.pth"
    save_checkpoint(path, checkpoint_payload(vpr.build_head(head_config), head_config, frozen.info.as_dict(), config,
                                             {"epoch": 1}, "run", "run.csv"))
    with pytest.raises(VPRError, match="single-frame checkpoint .--head residual.*--head seqnet") as error:
        load_sequence_model(str(path), ExtractionSettings())
    assert "\n" not in str(error.value)
    assert load_checkpoint(path)["head_config"]["type"] == "residual"  # the single-frame path is unchanged


def test_forward_refuses_windows_of_another_length(route):
    model = _model(route, with_head=True, with_map=False)
    with pytest.raises(VPRError, match="windows of 2 frames given, it takes 3"):
        model(torch.zeros(1, 2, 3, TINY_SIZE, TINY_SIZE))
