"""--train_blocks N: the last N backbone blocks trained on their cached input. The split is exact
(the tail on the cached input is the backbone's own descriptor), epoch 0 is the frozen model, the
checkpoint stores only the trained blocks and the model object puts them back (eval_trained), and
under torchrun 2 CPU ranks (gloo) train exactly as 1 does."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import REPO, TINY_MODEL, assert_one_line_error, run_main, write_train_val
import eval_trained
import train_vpr
import trainable_vpr as vpr
from trainable_vpr import blocks as tb
from trainable_vpr.model import PlaceDescriptor, describe_table
from vprkit.extraction.cache import CachedRows
from vprkit.cli.extraction_settings import ExtractionSettings
from vprkit.extraction.features import extract_features
from vprkit.tables.images import open_rgb
from vprkit.tables.places import load_poses


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_train_val(tmp_path_factory.mktemp("blocks"), seed=5)


def _flags(tmp_path, *extra: str, model: str = TINY_MODEL) -> list[str]:
    return ["--model", model, "--weights", "random", "--image_size", "32", "--device", "cpu", "--num_workers", "0",
            "--batch_size", "8", "--images_per_place", "2", "--projection_dim", "16", "--hidden_dim", "16",
            "--cache_dir", str(tmp_path / "cache"), "--log_dir", str(tmp_path / "logs"),
            "--checkpoint_dir", str(tmp_path / "models"), *extra]


@pytest.mark.parametrize("model", ["timm:test_vit", "timm:test_efficientnet", "timm:test_resnet", "timm:test_convnext"])
@pytest.mark.parametrize("count", [1, 2])
def test_the_tail_on_the_block_input_is_the_backbone_descriptor(model, count):
    backbone = vpr.create_backbone(model, "random", 32)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        inputs = tb.BlockInput(backbone.model, count)(images)
        out = tb.BlockTail(backbone.model, count)(inputs)
        reference = vpr.backbone_descriptor(backbone.model, images)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    assert float(reference.std()) > 0  # not a trivial output


@pytest.mark.slow
def test_epoch_zero_is_the_frozen_model_and_the_checkpoint_holds_only_the_blocks(data, tmp_path, capsys):
    frozen = train_vpr.main(["--train_csv", str(data.train), "--val_csv", str(data.val),
                             *_flags(tmp_path / "frozen", "--epochs", "1")])
    result = train_vpr.main(["--train_csv", str(data.train), "--val_csv", str(data.val),
                             *_flags(tmp_path, "--epochs", "2", "--train_blocks", "1", "--backbone_lr", "1e-3",
                                     "--lr", "1e-3")])
    out = capsys.readouterr().out
    assert "train_blocks: the last 1 of 5 blocks train at --backbone_lr 0.001" in out
    # epoch 0: the frozen model (same head start on the same descriptors, float16-cached block input)
    assert result.untrained_r1 == frozen.untrained_r1
    final = vpr.load_checkpoint(result.final_checkpoint)
    saved = final["trained_blocks"]
    assert saved["count"] == 1
    model = vpr.create_backbone(TINY_MODEL, "random", 32).model
    last_block = tb.block_list(model)[-1]
    expected = {f"blocks.0.{k}" for k in last_block.state_dict()} | \
        {f"after.{i}.{k}" for i, m in enumerate(tb._after_blocks(model)) for k in m.state_dict()}
    assert set(saved["state_dict"]) == expected  # only the trained modules
    changed = [k for k, v in saved["state_dict"].items() if v.is_floating_point()
               and not torch.equal(v, ({**{f"blocks.0.{k}": t for k, t in last_block.state_dict().items()},
                                       **{f"after.{i}.{k}": t for i, m in enumerate(tb._after_blocks(model))
                                          for k, t in m.state_dict().items()}})[k])]
    assert changed  # the blocks did train
    # the model object rebuilds the backbone with the trained blocks: another cache key, and
    # forward on images equals the cached path; eval_trained gives the last epoch's val R@1
    described = PlaceDescriptor.from_checkpoint(result.final_checkpoint)
    assert "+blocks1:" in described.frozen.info.weights
    table = load_poses(data.val)
    options = ExtractionSettings(cache_dir=str(tmp_path / "cache"), num_workers=0, device="cpu")
    _, cached = describe_table(described, table, options)
    arrays = [np.asarray(open_rgb(p), np.float32) / 255 for p in table.paths]
    with torch.no_grad():
        direct = described(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)).numpy()
    assert (direct * cached).sum(axis=1).min() >= 0.9999
    log = pd.read_csv(result.log_file)
    last_val = log[(log.event == "validation") & (log.epoch == 2)].val_r1.item()
    report = eval_trained.main(["--model_path", str(result.final_checkpoint), "--train_csv", str(data.train),
                                "--test_csv", str(data.val), "--device", "cpu", "--num_workers", "0",
                                "--cache_dir", str(tmp_path / "cache")])
    assert report.result.recalls[1] == pytest.approx(last_val, abs=1e-6)  # the log keeps 6 decimals


def test_block_inputs_are_cached_in_float16_and_streamed(data, tmp_path):
    backbone = tb.block_input_backbone(vpr.create_backbone(TINY_MODEL, "random", 32), 2)
    rows = extract_features(backbone, load_poses(data.train), ExtractionSettings(cache_dir=str(tmp_path), num_workers=0,
                                                                                  device="cpu"))
    assert isinstance(rows, CachedRows) and rows.shape[1:] == (32, 4, 4)
    (shard,) = tmp_path.glob("*/shard-*.npy")
    assert np.load(shard, mmap_mode="r").dtype == np.float16


def test_train_blocks_flag_errors(data, tmp_path, capsys):
    base = ["--train_csv", str(data.train), "--val_csv", str(data.val), *_flags(tmp_path)]
    code, err = run_main(capsys, train_vpr.main, [*base, "--train_blocks", "9"])
    assert_one_line_error(code, err, "--train_blocks 9", "5 blocks")
    code, err = run_main(capsys, train_vpr.main, [*base, "--train_blocks", "1", "--pooling", "gem"])
    assert_one_line_error(code, err, "--train_blocks 1", "--pooling backbone")


def _torchrun(tmp_path, ranks: int, data) -> pd.DataFrame:
    tmp_path.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               str(REPO / "train_vpr.py"), "--train_csv", str(data.train), "--val_csv", str(data.val),
               *_flags(tmp_path, "--epochs", "2", "--train_blocks", "2", "--backbone_lr", "1e-3", "--lr", "1e-3",
                       "--neg_sampler", "random")]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (log,) = (tmp_path / "logs").glob("*seed42_*.csv")
    return pd.read_csv(log)


@pytest.mark.slow
def test_two_cpu_ranks_train_as_one(data, tmp_path):
    """Each rank runs the blocks on its half of every batch; the batch's loss sees the whole batch
    (gathered), and the gradients are summed over the ranks: the same losses and weights as 1 rank."""
    one, two = _torchrun(tmp_path / "one", 1, data), _torchrun(tmp_path / "two", 2, data)
    batches = lambda log: log[log.event == "batch"].train_loss.to_numpy()  # noqa: E731
    assert len(batches(one)) == len(batches(two)) > 2
    # float rounding differs (a conv over 4 images vs 8; Adam amplifies tiny gradient differences): 1e-3
    np.testing.assert_allclose(batches(two), batches(one), rtol=1e-3, atol=1e-4)
    assert batches(two)[0] == pytest.approx(batches(one)[0], rel=1e-6)  # the first step: the same numbers
    val = lambda log: log[log.event == "validation"].val_r1.to_numpy()  # noqa: E731
    np.testing.assert_array_equal(val(two), val(one))
    (first,) = (tmp_path / "one" / "models").glob("*_final.pth")
    (second,) = (tmp_path / "two" / "models").glob("*_final.pth")
    a, b = vpr.load_checkpoint(first), vpr.load_checkpoint(second)
    for key, value in a["trained_blocks"]["state_dict"].items():
        torch.testing.assert_close(b["trained_blocks"]["state_dict"][key], value, rtol=1e-3, atol=1e-4)
