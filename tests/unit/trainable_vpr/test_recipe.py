"""The training recipe's pieces (issue 5): feature-verified positives, the residual head that
starts as PCA-whitening, epoch-0 validation, early stopping, the cosine schedule and the
seed / default recipes."""
from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import pytest
import torch

import train_vpr
from trainable_vpr.runs import lr_scheduler
from trainable_vpr.training import TrainResult
import trainable_vpr as vpr
from vprkit.retrieval.evaluation import fit_pca_whitening
from vprkit.cli.extraction_settings import ExtractionSettings
from vprkit.extraction.features import extract_features
from vprkit.tables.places import load_poses
from vprkit.cli.settings import add_config_args, add_config_file_flag, config_from_args, parse_layered
from helpers import REPO, TINY_MODEL, TINY_SIZE, write_train_val

SEED_RECIPE = REPO / "bench" / "seed_recipe.toml"


# ---------------------------------------------------------------------------------------------
# positive selection by frozen-feature similarity
# ---------------------------------------------------------------------------------------------
def test_select_positives_keeps_the_most_similar_gps_positives():
    # anchor 0 has GPS positives 1, 2, 3; in frozen features 3 is closest, then 1, then 2;
    # item 4 is the most similar of all but not a GPS positive: it must never become one.
    frozen = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [0.95, 0.31], [1.0, 0.01]])
    pos = torch.zeros(5, 5, dtype=torch.bool)
    pos[0, [1, 2, 3]] = True
    pos[1, 0] = True
    kept = vpr.select_positives_by_feature(pos, frozen, top_k=2)
    assert kept[0].nonzero().flatten().tolist() == [1, 3]
    assert kept[1].nonzero().flatten().tolist() == [0]      # fewer than k: all kept
    assert not kept[2:].any()                               # rows without positives stay empty
    assert not (kept & ~pos).any()                          # only GPS positives survive
    assert vpr.select_positives_by_feature(pos, frozen, top_k=1)[0].nonzero().flatten().tolist() == [3]


# ---------------------------------------------------------------------------------------------
# residual head
# ---------------------------------------------------------------------------------------------
def test_residual_head_starts_as_pca_whitening():
    rng = np.random.default_rng(0)
    feats = (rng.normal(size=(300, 48)) * np.linspace(3, 0.1, 48)).astype(np.float32)
    head = vpr.ResidualHead(48, projection_dim=16, hidden_dim=32, dropout=0.0)
    head.init_pca_whitening(feats)
    expected = fit_pca_whitening(feats, 16)(feats)
    np.testing.assert_allclose(vpr.embed(head, feats), expected, atol=1e-5)
    # whitened: the pre-normalisation outputs have identity covariance on the fitting data
    base = head.base(torch.nn.functional.normalize(torch.from_numpy(feats), dim=-1)).detach().numpy()
    np.testing.assert_allclose(np.cov(base, rowvar=False), np.eye(16), atol=1e-2)


def test_residual_head_learns_a_correction():
    head = vpr.ResidualHead(8, projection_dim=4, hidden_dim=16, dropout=0.0)
    head.init_pca_whitening(np.random.default_rng(1).normal(size=(50, 8)).astype(np.float32))
    x = torch.randn(6, 8)
    loss = head(x)[:, 0].sum()
    loss.backward()
    # the zero-initialised last layer gets a gradient, so training moves away from PCA
    assert head.residual[-1].weight.grad.abs().sum() > 0
    rebuilt = vpr.build_head({"type": "residual", "in_dim": 8, "projection_dim": 4, "hidden_dim": 16, "dropout": 0.0})
    rebuilt.load_state_dict(head.state_dict())
    assert torch.allclose(rebuilt.eval()(x), head.eval()(x))


# ---------------------------------------------------------------------------------------------
# recipes and flags
# ---------------------------------------------------------------------------------------------
def _parse(*argv: str) -> vpr.TrainConfig:
    parser = argparse.ArgumentParser()
    add_config_file_flag(parser)
    add_config_args(parser, vpr.TrainConfig)
    return config_from_args(parse_layered(parser, ["--train_csv", "t.csv", "--val_csv", "v.csv", *argv]),
                            vpr.TrainConfig)


def test_default_recipe_is_the_residual_head_and_the_seed_recipe_file_restores_the_seed_flags():
    assert _parse().head == "residual"
    seed = _parse("--config", str(SEED_RECIPE))
    assert (seed.head, seed.positive_selection, seed.lr_schedule) == ("projection", "gps", "constant")
    assert seed.epochs == 15 and seed.lr == 1e-4  # the seed's numbers are the shared defaults
    # an explicit flag wins over the file
    assert _parse("--config", str(SEED_RECIPE), "--head", "residual").head == "residual"


def test_cosine_schedule_decays_to_zero():
    config = _parse("--lr_schedule", "cosine", "--epochs", "2", "--lr", "0.01")
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=config.lr)
    scheduler = lr_scheduler(optimizer, config, batches_per_epoch=5)
    rates = []
    for _ in range(10):
        optimizer.step()
        scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates[4] == pytest.approx(0.005, rel=1e-6)   # half-way: half the rate
    assert rates[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(rates, rates[1:]))


# ---------------------------------------------------------------------------------------------
# epoch 0 and early stopping, end to end on tiny data
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_train_val(tmp_path_factory.mktemp("recipe"), seed=3)


def _train(tiny, out, *extra: str) -> TrainResult:
    return train_vpr.main([
        "--train_csv", str(tiny.train), "--val_csv", str(tiny.val), "--model", TINY_MODEL, "--weights", "random",
        "--image_size", str(TINY_SIZE), "--batch_size", "8", "--num_workers", "0", "--device", "cpu",
        "--cache_dir", str(tiny.root / "cache"), "--log_dir", str(out / "logs"),
        "--checkpoint_dir", str(out / "models"), *extra,
    ])


def test_early_stopping_stops_when_validation_stalls(tiny, tmp_path):
    # a learning rate this small cannot change the ranking: R@1 never beats epoch 0
    result = _train(tiny, tmp_path, "--epochs", "6", "--lr", "1e-12", "--early_stopping_patience", "2")
    log = pd.read_csv(result.log_file)
    assert sorted(log.loc[log.event == "validation", "epoch"].tolist()) == [0, 1, 2]
    assert result.epochs_run == 2 and result.best_epoch == 0
    checkpoint = vpr.load_checkpoint(result.checkpoint)
    assert checkpoint["epoch"] == 0  # the untrained head (PCA-whitening) is what was kept
    summary = pd.read_csv(tmp_path / "logs" / "training_summary.csv")
    assert summary["epochs_run"].tolist() == [2]


def test_epoch0_checkpoint_is_the_pca_whitening_baseline(tiny, tmp_path):
    result = _train(tiny, tmp_path, "--epochs", "1", "--lr", "1e-12", "--projection_dim", "8",
                    "--head_start", "pca_whitened")
    checkpoint = vpr.load_checkpoint(result.checkpoint)
    head = vpr.head_from_checkpoint(checkpoint)
    train = load_poses(tiny.train)
    backbone = vpr.create_backbone(TINY_MODEL, "random", TINY_SIZE)
    feats = extract_features(backbone, train, ExtractionSettings(cache_dir=str(tiny.root / "cache"), num_workers=0))
    np.testing.assert_allclose(vpr.embed(head, feats), fit_pca_whitening(feats, 8)(feats), atol=1e-4)
