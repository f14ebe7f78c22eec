"""The sequence head: its start is the training-free diagonal match, training keeps only what beats
it on val, and the fusion weight comes from val (synthetic routes, no images)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from trainable_vpr.fusion import choose_fusion_weight, fuse_scores, rerank, shortlist_scores
from trainable_vpr.seqnet import SeqHeadConfig, SeqNetHead, start_sequence_head
from trainable_vpr.sequence_training import (RouteFrames, SeqTrainConfig, choose_sequence_start, describe_windows,
                                             train_sequence_head, window_recall)
from vprkit.cli import VPRError
from vprkit.retrieval.evaluation import evaluate_retrieval, l2_normalise, pca_whitening_matrix
from vprkit.routes.matching import SeqMatchConfig, exact_sequence_scores
from vprkit.routes.order import Route
from vprkit.routes.windows import causal_windows

SPACING_M = 24.0


def route_frames(places: np.ndarray, drives: list[str], place_vectors: np.ndarray, noise: float,
                 rng: np.random.Generator) -> RouteFrames:
    """Each drive passes `places` in order; a frame is its place's vector plus this drive's noise."""
    feats, xyz, drive, key = [], [], [], []
    for d, _ in enumerate(drives):
        feats.append(place_vectors[places] + noise * rng.standard_normal((len(places), place_vectors.shape[1])))
        xyz.append(np.stack([np.zeros(len(places)), SPACING_M * places, np.zeros(len(places))], axis=1))
        drive.append(np.full(len(places), d))
        key.append(places.astype(float))
    route = Route(drive=np.concatenate(drive), key=np.concatenate(key), unit="frame", drive_names=tuple(drives))
    return RouteFrames(np.concatenate(feats).astype(np.float32), route, np.concatenate(xyz))


def toy_route(noise: float = 1.0, dim: int = 24, seed: int = 0) -> tuple[RouteFrames, RouteFrames, RouteFrames]:
    """train: places 0-119 in two drives; val: places 120-159 (one drive) against val_db (the other)."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((160, dim))
    train = route_frames(np.arange(120), ["summer", "winter"], vectors, noise, rng)
    val = route_frames(np.arange(120, 160), ["winter"], vectors, noise, rng)
    val_db = route_frames(np.arange(120, 160), ["summer"], vectors, noise, rng)
    return train, val, val_db


def test_stepped_windows_take_every_step_th_frame_padded_at_the_start():
    route = Route(drive=np.zeros(6, np.int64), key=np.arange(6.0), unit="frame", drive_names=("a",))
    assert causal_windows(route, 3, step=2).tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 3], [0, 2, 4],
                                                         [1, 3, 5]]


def test_the_untrained_head_is_the_mean_of_whitened_frame_cosines_along_the_diagonal():
    train, val, val_db = toy_route()
    config = SeqHeadConfig(seq_len=4, frame_dim=24, proj_dim=8, kernel=3, frame_start="pca_whitened")
    head = start_sequence_head(config, train.features, train.xyz, 25.0)
    weight, bias = pca_whitening_matrix(train.features, 8)
    whitened = lambda f: l2_normalise(l2_normalise(f) @ weight.T + bias)  # noqa: E731
    qw, dw = causal_windows(val.route, 4), causal_windows(val_db.route, 4)
    q, d = whitened(val.features)[qw], whitened(val_db.features)[dw]      # [W, L, d]
    expected = np.einsum("ild,jld->ij", q, d) / 4                          # mean frame cosine on the diagonal
    got = describe_windows(head, val.features, qw) @ describe_windows(head, val_db.features, dw).T
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # and so epoch 0's val R@1 is that training-free match's R@1
    result = train_sequence_head(train, val, val_db, head, SeqTrainConfig(epochs=0))
    independent = evaluate_retrieval(d.reshape(len(d), -1), val_db.xyz, q.reshape(len(q), -1), val.xyz, 25.0, (1,))
    assert result.start_val_r1 == pytest.approx(independent.recalls[1])
    assert result.best_epoch == 0 and result.val_r1 == []


def test_a_window_of_the_wrong_length_is_one_line_naming_the_head_s_length():
    head = SeqNetHead(SeqHeadConfig(seq_len=5, frame_dim=24, frame_start="raw"))
    with pytest.raises(VPRError, match="windows of 3 frames x 24 dims given, it takes 5 x 24"):
        head(torch.zeros(2, 3, 24))


@pytest.mark.parametrize("train_projection", [False, True])
def test_training_lowers_the_loss_and_lifts_val_recall_on_a_separable_route(train_projection):
    train, val, val_db = toy_route(noise=1.5)
    config = SeqHeadConfig(seq_len=3, frame_dim=24, proj_dim=16, hidden_dim=32, kernel=3, frame_start="raw")
    head = start_sequence_head(config, train.features, train.xyz, 25.0)
    result = train_sequence_head(train, val, val_db, head,
                                 SeqTrainConfig(epochs=6, batch_size=32, train_projection=train_projection), seed=1)
    assert result.train_loss[-1] < 0.8 * result.train_loss[0]
    assert result.best_val_r1 > result.start_val_r1
    # the head handed over is the best epoch's: its val R@1 recomputed is the best
    assert window_recall(result.head, val, val_db, 25.0, (1,)).recalls[1] == pytest.approx(result.best_val_r1)


def test_the_kept_head_never_scores_below_its_start_on_val():
    train, val, val_db = toy_route(noise=0.8)
    config = SeqHeadConfig(seq_len=3, frame_dim=24, proj_dim=8, kernel=3, frame_start="pca_whitened")
    head = start_sequence_head(config, train.features, train.xyz, 25.0)
    start_state = {k: v.clone() for k, v in head.state_dict().items()}
    # a learning rate that wrecks the head: no epoch beats the start, so the start is handed over
    result = train_sequence_head(train, val, val_db, head, SeqTrainConfig(epochs=2, lr=50.0, batch_size=32))
    assert max(result.val_r1) < result.start_val_r1
    assert result.best_epoch == 0
    assert all(torch.equal(result.head.state_dict()[k], v) for k, v in start_state.items())
    assert window_recall(result.head, val, val_db, 25.0, (1,)).recalls[1] == pytest.approx(result.start_val_r1)


def test_the_frame_start_is_chosen_on_val_windows():
    train, val, val_db = toy_route(noise=0.8)
    config = SeqHeadConfig(seq_len=3, frame_dim=24, proj_dim=8, kernel=0)
    head, chosen, scores = choose_sequence_start(config, train, val, val_db, 25.0, shrinkages=(0.0, 1.0))
    assert set(scores) == {"raw", "pca_whitened", "learned_whitened s=0", "learned_whitened s=1"}
    assert scores[f"{chosen.frame_start}{'' if chosen.shrinkage is None else f' s={chosen.shrinkage:g}'}"] \
        == max(scores.values())
    assert window_recall(head, val, val_db, 25.0, (1,)).recalls[1] == pytest.approx(max(scores.values()))


def test_full_conv_arch_has_kernel_L_weights_and_the_shared_arch_does_not_grow_with_L():
    count = lambda c: sum(p.numel() for p in SeqNetHead(c).parameters())  # noqa: E731
    full = SeqHeadConfig(seq_len=10, frame_dim=24, arch="full", out_dim=16)
    assert count(full) == 10 * 24 * 16 + 16
    shared = SeqHeadConfig(seq_len=10, frame_dim=24, proj_dim=8, hidden_dim=16)
    assert count(shared) == count(dataclasses.replace(shared, seq_len=20))


def test_fusion_weight_is_chosen_on_val_and_a_tie_goes_to_the_descriptor():
    # 3 queries x 3 candidates; the descriptor ranks candidate 0 first, matching candidate 2
    descriptor = np.array([[0.9, 0.5, 0.1]] * 3)
    matching = np.array([[0.0, 0.1, 1.0]] * 3)
    matching_right = np.array([[False, False, True]] * 3)
    descriptor_right = np.array([[True, False, False]] * 3)
    assert choose_fusion_weight(descriptor, matching, descriptor_right).weight == 0.0
    chosen = choose_fusion_weight(descriptor, matching, matching_right)
    assert chosen.weight == 2.0  # the smallest weight at which matching's candidate wins
    assert chosen.val_r1[0.0] == 0.0 and chosen.val_r1[2.0] == 1.0 and chosen.val_r1[float("inf")] == 1.0
    # both right (every candidate correct): a tie, the descriptor alone
    assert choose_fusion_weight(descriptor, matching, np.ones((3, 3), bool)).weight == 0.0


def test_fused_rerank_at_weight_zero_keeps_the_descriptor_order():
    candidates = np.array([[7, 3, 5]])
    descriptor, matching = np.array([[0.9, 0.5, 0.1]]), np.array([[0.0, 0.1, 1.0]])
    assert rerank(candidates, fuse_scores(descriptor, matching, 0.0))[0].tolist() == [[7, 3, 5]]
    assert rerank(candidates, fuse_scores(descriptor, matching, float("inf")))[0].tolist() == [[5, 3, 7]]


def test_a_head_s_shortlist_carries_its_own_ranking_at_weight_0_and_matching_s_at_inf():
    train, val, val_db = toy_route(noise=1.2)
    head = start_sequence_head(SeqHeadConfig(seq_len=3, frame_dim=24, frame_start="raw"), train.features,
                               train.xyz, 25.0)
    q, db = l2_normalise(val.features), l2_normalise(val_db.features)
    config = SeqMatchConfig(3, 1.0, 1.0)
    found = shortlist_scores(head, val, val_db, q, db, config, 25.0, shortlist=40)  # 40 = the whole database
    assert found.recalls(0.0, (1,))[1] == pytest.approx(window_recall(head, val, val_db, 25.0, (1,)).recalls[1])
    # weight inf ranks by the matching score alone: the full-matrix reference's argmax
    best = exact_sequence_scores(q, val.route, db, val_db.route, config).argmax(axis=1)
    top = rerank(found.candidates, fuse_scores(found.descriptor, found.matching, float("inf")))[0][:, 0]
    np.testing.assert_array_equal(top, best)
