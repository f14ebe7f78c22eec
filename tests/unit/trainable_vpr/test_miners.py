"""UCB negative sampling: the bandit alone (concentration on the informative band), the
difficulty bands, the sampler's triplets, and a training run that logs per-band statistics."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import write_embeddings_parquet
from vprkit.logs.run_summary import read_run_log, summarize_run
import train_vpr
import trainable_vpr as vpr
from vprkit.cli import VPRError
from vprkit.logs.runlog import LOG_COLUMNS, LOG_EXTRA_COLUMNS
from trainable_vpr.miners import UCB1Bandit, UCBMiner, load_difficulty_parquet, similarity_rank_bands


def test_bandit_concentrates_on_the_informative_band():
    rng = np.random.default_rng(0)
    means = np.array([0.15, 0.7, 0.2, 0.1])  # band 1 teaches most (high triplet loss)
    bandit = UCB1Bandit(4, exploration=2.0, warmup=100)
    for _ in range(3000):
        arm = bandit.select()
        bandit.update(arm, float(np.clip(rng.normal(means[arm], 0.1), 0, 1)))
    assert bandit.draws == 3000 and bandit.pulls.sum() == 3000
    assert bandit.pulls[1] > 0.8 * 3000, bandit.pulls
    np.testing.assert_allclose(bandit.mean_rewards(), means, atol=0.05)


def test_bandit_warmup_is_round_robin_and_state_round_trips():
    bandit = UCB1Bandit(3, warmup=7)
    arms = []
    for _ in range(7):
        arms.append(bandit.select())
        bandit.update(arms[-1], 1.0 if arms[-1] == 2 else 0.0)
    assert arms == [0, 1, 2, 0, 1, 2, 0]
    twin = UCB1Bandit(3, warmup=7)
    twin.load_state_dict(bandit.state_dict())
    assert [twin.select() for _ in range(5)] == [bandit.select() for _ in range(5)]


def test_similarity_rank_bands():
    similarity = torch.tensor([[1.0, 0.9, 0.1, 0.5, 0.7, 0.3, 0.2]])
    neg = torch.tensor([[False, False, True, True, True, True, True]])
    bands = similarity_rank_bands(similarity, neg, 3)
    # negatives by similarity: 4 (0.7), 3 (0.5), 5 (0.3), 6 (0.2), 2 (0.1) -> ranks 0..4 -> bands 0,0,1,1,2
    assert bands.tolist() == [[-1, -1, 2, 0, 0, 1, 1]]


def test_sampler_takes_negatives_of_the_chosen_band_and_rewards_it():
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(12, 6), dim=-1)
    labels = np.repeat(np.array(["a", "b", "c", "d"]), 3)
    pos, neg = vpr.batch_pair_masks(None, 25.0, 100.0, labels)
    sampler = UCBMiner(bands=3, warmup=10_000)
    similarity = emb @ emb.T
    anchors, positives, negatives = sampler.mine(emb, pos, neg, torch.Generator().manual_seed(0))
    arms = sampler.last_arms
    assert len(anchors) == int(pos.sum()) and arms.tolist() == [i % 3 for i in range(len(anchors))]
    bands = similarity_rank_bands(similarity, neg, 3)
    assert (bands[anchors, negatives] == arms).all()
    assert (labels[anchors] == labels[positives]).all() and (labels[anchors] != labels[negatives.numpy()]).all()
    losses = vpr.HybridLoss(triplet_margin=0.5)(emb, pos, neg, (anchors, positives, negatives)).triplet_items
    sampler.reward(losses, 0.5)
    expected = [float(losses[arms == b].sum() / 2.5) for b in range(3)]
    np.testing.assert_allclose(sampler.bandit.reward_sums, expected, rtol=1e-6)
    assert sampler.stats().startswith("pulls=[")


def test_external_difficulty_bands(tmp_path):
    path = tmp_path / "difficulty.parquet"
    pd.DataFrame({"image_id": ["i0", "i1"], "neighbor_building_ids": [["b", "c"], ["a"]],
                  "neighbor_bands": [[0, 1], [1]]}).to_parquet(path)
    table = load_difficulty_parquet(path)
    assert table.count == 3  # bands 0, 1 and the band of unlisted places
    neg = torch.tensor([[False, True, True, True], [True, False, True, True]])
    bands = table.pair_bands(["i0", "i1"], np.array(["a", "b", "c", "d"]), neg)
    assert bands.tolist() == [[-1, 0, 1, 2], [1, -1, 2, 2]]
    pd.DataFrame({"image_id": ["i0"], "neighbor_building_ids": [["b", "c"]], "neighbor_bands": [[0]]}).to_parquet(path)
    with pytest.raises(VPRError, match="row 1: .* equal length"):
        load_difficulty_parquet(path)


def test_ucb_training_logs_band_statistics_readable_by_analyze_metrics(tmp_path):
    train = write_embeddings_parquet(tmp_path / "train.parquet", n_places=6, per_place=5, seed=1)
    val = write_embeddings_parquet(tmp_path / "val.parquet", n_places=6, per_place=2, seed=2)
    result = train_vpr.main(["--train_parquet", str(train), "--val_parquet", str(val), "--epochs", "2",
                             "--batch_size", "8", "--neg_sampler", "ucb", "--ucb_warmup_samples", "20",
                             "--log_dir", str(tmp_path / "logs"), "--checkpoint_dir", str(tmp_path / "models")])
    log = pd.read_csv(result.log_file)
    assert list(log.columns) == LOG_COLUMNS + LOG_EXTRA_COLUMNS + ["ucb_stats"]
    stats = log.loc[log.event == "epoch", "ucb_stats"].tolist()
    assert len(stats) == 2 and all(s.startswith("pulls=[") and "mean_reward=[" in s for s in stats)
    pulls = [sum(int(p) for p in s.split("]")[0].split("[")[1].split(",")) for s in stats]
    assert 0 < pulls[0] < pulls[1]  # cumulative over the run
    assert log.loc[log.event != "epoch", "ucb_stats"].isna().all()
    summary = summarize_run(read_run_log(result.log_file))
    assert summary.epochs_run == 2 and summary.best_val_r1 == pytest.approx(result.best_recall[1], abs=1e-6)
