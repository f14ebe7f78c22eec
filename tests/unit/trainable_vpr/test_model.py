"""The one model object (trainable_vpr/model.py): forward() on image tensors gives the descriptors
the cached-extraction path gives (backbone and VLAD pooling, with and without a head); a checkpoint
rebuilds the same module; a damaged cached vocabulary is warned about and refitted; the miners
share one protocol."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import SHARED, TINY_MODEL, TINY_SIZE, requires_shared, write_smooth_image
import trainable_vpr as vpr
from trainable_vpr.checkpoints import checkpoint_payload, save_checkpoint
from trainable_vpr.model import PlaceDescriptor, describe_table, load_model
from vprkit.cli import VPRError
from vprkit.cli.extraction_settings import ExtractionSettings
from vprkit.tables.images import open_rgb
from trainable_vpr.miners import BatchMiner, UCBMiner
from vprkit.tables.places import load_poses
from vprkit.extraction.pooling import PoolingConfig
from trainable_vpr.vocabulary import vlad_vocabulary



@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    rows = []
    for i in range(8):
        write_smooth_image(root / f"img/{i}.png", seed=i)
        rows.append({"image_path": f"img/{i}.png", "easting": 600_000.0 + 40 * i, "northing": 3_500_000.0})
    pd.DataFrame(rows).to_csv(root / "poses.csv", index=False)
    return root


def _options(root: Path, **kwargs) -> ExtractionSettings:
    return ExtractionSettings(**{"extract_batch_size": 4, "num_workers": 0, "device": "cpu",
                                 "cache_dir": str(root / "cache"), **kwargs})


def _tensors(paths) -> torch.Tensor:
    """Decoded images as float RGB [B, 3, H, W] in [0, 1] at their own size (all the same here)."""
    arrays = [np.asarray(open_rgb(p), dtype=np.float32) / 255.0 for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _residual_head(in_dim: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    head = vpr.build_head(vpr.HeadConfig("residual", in_dim, 8, 16, 0.0))
    for p in head.parameters():  # a head that is not the identity: random weights everywhere
        torch.nn.init.normal_(p, std=0.3)
    return head.eval()


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


# VLAD at a stride-8 layer of a 64-px input: 64 tokens per image (the last layer of the tiny model
# at 32 px is one token, where hard assignment makes VLAD a one-hot of the cluster: no test of anything)
@pytest.mark.parametrize("pooling", [PoolingConfig(), PoolingConfig("vlad", 2, 4)], ids=["backbone", "vlad"])
@pytest.mark.parametrize("with_head", [False, True], ids=["no_head", "head"])
def test_forward_equals_the_cached_extraction_path(scene, pooling, with_head):
    table = load_poses(scene / "poses.csv")
    options = _options(scene)
    frozen = PlaceDescriptor.baseline(TINY_MODEL, "random", 64, pooling, table.paths, options).frozen
    model = PlaceDescriptor(frozen, _residual_head(frozen.info.feature_dim) if with_head else None)
    _, cached = describe_table(model, table, options)
    with torch.no_grad():
        direct = model(_tensors(table.paths)).numpy()
    assert direct.shape == cached.shape == (len(table), model.output_dim)
    np.testing.assert_allclose(np.linalg.norm(direct, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(cached, axis=1), 1.0, atol=1e-5)
    cosines = _cosines(direct, cached)
    assert cosines.min() >= 0.9999, cosines
    # and the descriptors tell the images apart: the check is not passed by a constant output
    assert _cosines(direct, np.roll(direct, 1, axis=0)).max() < 0.999


def test_forward_takes_any_input_size(scene):
    model = PlaceDescriptor.baseline(TINY_MODEL, "random", TINY_SIZE)
    images = _tensors([scene / "img/0.png"])
    with torch.no_grad():
        small, large = model(images), model(torch.nn.functional.interpolate(images, size=(140, 180), mode="bilinear"))
    assert small.shape == large.shape == (1, model.output_dim)
    assert float((small * large).sum()) > 0.99


@requires_shared
def test_forward_equals_the_cached_path_on_real_photos(tmp_path):
    """effnet_lite0 (pretrained, from its PyPI package) on four bgu_campus photos at full size."""
    table = load_poses(SHARED / "bgu_campus" / "val.csv").subset(np.arange(4))
    options = _options(tmp_path)
    model = PlaceDescriptor.baseline("effnet_lite0")
    _, cached = describe_table(model, table, options)
    with torch.no_grad():
        direct = np.concatenate([model(_tensors([p])).numpy() for p in table.paths])
    assert _cosines(direct, cached).min() >= 0.9999


def test_from_checkpoint_round_trip(scene, tmp_path):
    table = load_poses(scene / "poses.csv")
    options = _options(scene)
    pooling = PoolingConfig("vlad", -1, 4)
    # the vocabulary fitted on images 3-7, checked on 0-2: the last layer at 32 px is one token per
    # image, and a token that is its own centroid (k-means on 5 tokens) has a zero residual: noise
    frozen = PlaceDescriptor.baseline(TINY_MODEL, "random", TINY_SIZE, pooling, table.paths[3:], options).frozen
    head_config = vpr.HeadConfig("residual", frozen.info.feature_dim, 8, 16, 0.0)
    head = _residual_head(frozen.info.feature_dim)
    config = vpr.TrainConfig(train_csv="t.csv", val_csv="v.csv", model=TINY_MODEL, weights="random",
                             image_size=TINY_SIZE, pooling="vlad", vlad_clusters=4)
    path = tmp_path / "run.pth"
    save_checkpoint(path, checkpoint_payload(head, head_config, frozen.info.as_dict(), config, {"epoch": 1}, "run",
                                             "run.csv", frozen.vocabulary))
    original = PlaceDescriptor(frozen, head)
    rebuilt = PlaceDescriptor.from_checkpoint(path)
    assert rebuilt.frozen.info == frozen.info  # same backbone, weights, pooling and vocabulary
    images = _tensors(table.paths[:3])
    # (extraction left the original's weights channels-last: other conv kernels, float32 rounding apart)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images), original(images), rtol=1e-4, atol=1e-4)
    # the scripts' builder gives the same module; a checkpoint of another backbone is refused
    with torch.no_grad():
        torch.testing.assert_close(load_model(str(path), None, ExtractionSettings())(images), original(images),
                                   rtol=1e-4, atol=1e-4)
    with pytest.raises(VPRError, match="not --model resnet50"):
        load_model(str(path), "resnet50", ExtractionSettings())


def test_truncated_vocabulary_warns_in_one_line_and_refits(scene, tmp_path, capsys):
    """A truncated vocabulary file in the cache was a traceback (ValueError: EOF: reading array
    header); it is a damaged cache entry: one warning line, refitted, the same vocabulary."""
    table = load_poses(scene / "poses.csv")
    options = _options(tmp_path)
    backbone = vpr.create_backbone(TINY_MODEL, "random", TINY_SIZE)
    config = PoolingConfig("vlad", -1, 4)
    first = vlad_vocabulary(backbone, config, table.paths, options)
    (path,) = (tmp_path / "cache" / "vocabularies").glob("*.npy")
    data = path.read_bytes()
    path.write_bytes(data[:40])
    capsys.readouterr()
    second = vlad_vocabulary(backbone, config, table.paths, options)
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if "damaged cache entry" in line]
    assert len(warnings) == 1 and str(path) in warnings[0] and "fitting it again" in warnings[0]
    assert "Traceback" not in captured.err
    assert "fitted on" in captured.out
    np.testing.assert_array_equal(second, first)
    np.testing.assert_array_equal(np.load(path), first)  # the cache entry is whole again
    capsys.readouterr()
    vlad_vocabulary(backbone, config, table.paths, options)
    assert "reused" in capsys.readouterr().out


def test_truncated_feature_shard_warns_in_one_line(scene, tmp_path, capsys):
    table = load_poses(scene / "poses.csv")
    backbone = vpr.create_backbone(TINY_MODEL, "random", TINY_SIZE)
    model = PlaceDescriptor(backbone)
    _, first = describe_table(model, table, _options(tmp_path))
    (shard,) = (tmp_path / "cache").glob("*/shard-*.npy")
    shard.write_bytes(shard.read_bytes()[:100])
    capsys.readouterr()
    _, second = describe_table(model, table, _options(tmp_path))
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "damaged cache entry" in line and shard.name in line]
    np.testing.assert_allclose(second, first, atol=1e-6)


def test_miners_share_one_protocol():
    """The training loop asks every miner the same things: stats for the log, state for resume."""
    batch = BatchMiner(0.5)
    assert batch.stats() is None and batch.state_dict() is None
    batch.load_state_dict(None)
    ucb = UCBMiner(bands=3, warmup=2)
    ucb.bandit.update(1, 0.5)
    ucb.bandit.draws = 7
    copy = UCBMiner(bands=3, warmup=2)
    copy.load_state_dict(ucb.state_dict())
    assert copy.stats() == ucb.stats() and "pulls=[0, 1, 0]" in copy.stats()
    assert copy.bandit.draws == 7
