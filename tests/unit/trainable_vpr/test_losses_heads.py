"""Heads and the hybrid loss (DESIGN.md §4) against values computed by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import trainable_vpr as vpr
from vprkit.cli import VPRError
from vprkit.tables.places import metric_to_xyz
from trainable_vpr.miners import BatchMiner


# --------------------------------------------------------------------------------------------
# hand-written references (plain Python loops, independent of the library)
# --------------------------------------------------------------------------------------------
def ref_triplet(emb: np.ndarray, triplets, margin: float) -> float:
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    terms = [max(0.0, np.linalg.norm(e[a] - e[p]) - np.linalg.norm(e[a] - e[n]) + margin) for a, p, n in triplets]
    return float(np.mean(terms))


def ref_contrastive(emb: np.ndarray, pos: np.ndarray, neg: np.ndarray, tau: float) -> float:
    """For each anchor with positives: mean over its positives of
    -log(exp(s_ap/tau) / sum_{k in pos u neg} exp(s_ak/tau)); averaged over those anchors."""
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    s = e @ e.T
    per_anchor = []
    for a in range(len(e)):
        positives = np.flatnonzero(pos[a])
        if positives.size == 0:
            continue
        keep = np.flatnonzero(pos[a] | neg[a])
        denom = sum(math.exp(s[a, k] / tau) for k in keep)
        per_anchor.append(np.mean([-math.log(math.exp(s[a, p] / tau) / denom) for p in positives]))
    return float(np.mean(per_anchor))


def _masks(pos_pairs, neg_pairs, n):
    pos = np.zeros((n, n), bool)
    neg = np.zeros((n, n), bool)
    for i, j in pos_pairs:
        pos[i, j] = pos[j, i] = True
    for i, j in neg_pairs:
        neg[i, j] = neg[j, i] = True
    return pos, neg


def _loss(emb, pos, neg, hard_neg_ratio: float = 0.5, **kwargs) -> vpr.LossParts:
    """The hybrid loss on the triplets a BatchMiner mines, as training computes it."""
    emb = emb if isinstance(emb, torch.Tensor) else torch.tensor(emb, dtype=torch.float32)
    pos, neg = torch.as_tensor(pos), torch.as_tensor(neg)
    triplets = BatchMiner(hard_neg_ratio).mine(emb.detach(), pos, neg, torch.Generator().manual_seed(0))
    return vpr.HybridLoss(**kwargs)(emb, pos, neg, triplets)


# Four 2-D embeddings (not normalised: the loss normalises): 0 and 1 are positives, 2 is a
# negative of both, 3 is a negative of 1 but in the ignore zone of 0 and of 2.
EMB = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 2.0], [3.0, 0.3]])
POS, NEG = _masks([(0, 1)], [(0, 2), (1, 2), (1, 3)], 4)


def test_reference_case_is_sensitive_to_the_ignore_zone():
    """Guard on the test data itself: counting (0, 3) as a negative changes the value."""
    with_ignore_as_neg = NEG.copy()
    with_ignore_as_neg[0, 3] = with_ignore_as_neg[3, 0] = True
    a = ref_contrastive(EMB, POS, NEG, 0.07)
    b = ref_contrastive(EMB, POS, with_ignore_as_neg, 0.07)
    assert abs(a - b) > 0.1


@pytest.mark.parametrize("tau", [0.07, 0.5, 1.0])
def test_contrastive_part_matches_hand_computed(tau):
    parts = _loss(EMB, POS, NEG, temperature=tau)
    assert parts.contrastive.item() == pytest.approx(ref_contrastive(EMB, POS, NEG, tau), rel=1e-4, abs=1e-5)


def test_contrastive_hand_value_tau_one():
    """Fully by hand for tau = 1. Normalised: e0 = (1, 0), e1 = (.8, .6), e2 = (0, 1),
    e3 = (3, .3)/|.|. Anchor 0: positives {1}, negatives {2} (3 ignored);
    anchor 1: positives {0}, negatives {2, 3}. Anchors 2 and 3 have no positive."""
    s03 = 3.0 / math.hypot(3.0, 0.3)
    s13 = (0.8 * 3.0 + 0.6 * 0.3) / math.hypot(3.0, 0.3)
    l0 = -math.log(math.exp(0.8) / (math.exp(0.8) + math.exp(0.0)))
    l1 = -math.log(math.exp(0.8) / (math.exp(0.8) + math.exp(0.6) + math.exp(s13)))
    expected = (l0 + l1) / 2
    parts = _loss(EMB, POS, NEG, temperature=1.0)
    assert parts.contrastive.item() == pytest.approx(expected, rel=1e-5)
    # and the value it would have with the ignore pair counted as a negative is different
    wrong = (-math.log(math.exp(0.8) / (math.exp(0.8) + 1.0 + math.exp(s03))) + l1) / 2
    assert abs(parts.contrastive.item() - wrong) > 0.05


def test_contrastive_several_positives_per_anchor():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(9, 5))
    # places {0,1,2}, {3,4,5}, {6,7,8}; places A and B in each other's ignore zone
    groups = [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    pos_pairs = [(i, j) for g in groups for i in g for j in g if i < j]
    neg_pairs = [(i, j) for i in groups[0] + groups[1] for j in groups[2]]
    pos, neg = _masks(pos_pairs, neg_pairs, 9)
    parts = _loss(emb, pos, neg, temperature=0.1)
    assert parts.contrastive.item() == pytest.approx(ref_contrastive(emb, pos, neg, 0.1), rel=1e-4)


def test_contrastive_anchor_with_one_positive_and_no_negative_counts_as_zero():
    """DESIGN.md §4: averaged over the anchors that have positives. An anchor whose only other
    pairs are one positive and ignore-zone images has the term -log(1) = 0, and that zero is
    part of the mean (a 'mean over non-zero losses' would drop it and inflate the loss)."""
    emb = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.2], [0.3, -1.0]])
    # 0-1 positives; 2 is a negative of 0 and 1; 3-4 positives of each other, in the ignore
    # zone of 0, 1 and 2  -> anchors 3 and 4 have one positive and no negative.
    pos, neg = _masks([(0, 1), (3, 4)], [(0, 2), (1, 2)], 5)
    expected = ref_contrastive(emb, pos, neg, 0.5)
    parts = _loss(emb, pos, neg, temperature=0.5)
    assert parts.contrastive.item() == pytest.approx(expected, rel=1e-4)


def test_triplet_part_matches_hand_computed():
    # hard_neg_ratio 1: the triplets are (0,1,2) and (1,0,argmax_{2,3} s_1k)
    parts = _loss(EMB, POS, NEG, triplet_margin=0.5, hard_neg_ratio=1.0)
    e = EMB / np.linalg.norm(EMB, axis=1, keepdims=True)
    hardest_for_1 = 2 if e[1] @ e[2] > e[1] @ e[3] else 3
    assert hardest_for_1 == 3
    expected = ref_triplet(EMB, [(0, 1, 2), (1, 0, 3)], 0.5)
    # by hand: d01 = |(1,0)-(.8,.6)| = sqrt(.04+.36); d02 = sqrt(2); d13 from e3
    d01 = math.sqrt(0.4)
    e3 = np.array([3.0, 0.3]) / math.hypot(3.0, 0.3)
    d13 = float(np.linalg.norm(np.array([0.8, 0.6]) - e3))
    by_hand = (max(0.0, d01 - math.sqrt(2) + 0.5) + max(0.0, d01 - d13 + 0.5)) / 2
    assert expected == pytest.approx(by_hand)
    assert parts.triplet.item() == pytest.approx(by_hand, rel=1e-5)


def test_triplet_mean_includes_zero_terms():
    """Mean over all triplets, zeros included (not an average over the violating ones only)."""
    emb = np.array([[1.0, 0.0], [0.99, 0.14], [-1.0, 0.0], [0.0, 1.0]])
    pos, neg = _masks([(0, 1)], [(0, 2), (1, 2), (0, 3), (1, 3)], 4)
    parts = _loss(emb, pos, neg, triplet_margin=1.0, hard_neg_ratio=1.0)
    # triplets (0,1,3) and (1,0,3): hardest negative of 0 and 1 is 3 (similarity 0 vs -1)
    expected = ref_triplet(emb, [(0, 1, 3), (1, 0, 3)], 1.0)
    assert parts.triplet.item() == pytest.approx(expected, rel=1e-5)
    parts = _loss(emb, pos, neg, triplet_margin=0.3, hard_neg_ratio=1.0)
    assert parts.triplet.item() == pytest.approx(0.0, abs=1e-7)
    emb2 = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.9, 0.1]])
    pos2, neg2 = _masks([(0, 1)], [(0, 2), (1, 3)], 4)
    # (0,1,2): d01 = 1.414, d02 = 2 -> 0.414 - 2 + 0.8 < 0: zero; (1,0,3): positive term
    parts = _loss(emb2, pos2, neg2, triplet_margin=0.8, hard_neg_ratio=1.0)
    expected = ref_triplet(emb2, [(0, 1, 2), (1, 0, 3)], 0.8)
    assert expected > 0 and parts.triplet.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("tw, cw", [(0.3, 1.0), (2.0, 0.5), (0.0, 1.0), (1.0, 0.0)])
def test_total_is_weighted_sum(tw, cw):
    parts = _loss(EMB, POS, NEG, triplet_weight=tw, contrastive_weight=cw, hard_neg_ratio=1.0, temperature=0.2)
    t = ref_triplet(EMB, [(0, 1, 2), (1, 0, 3)], 0.5)
    c = ref_contrastive(EMB, POS, NEG, 0.2)
    assert parts.total.item() == pytest.approx(tw * t + cw * c, rel=1e-5)
    assert parts.triplet.item() == pytest.approx(t, rel=1e-5)
    assert parts.contrastive.item() == pytest.approx(c, rel=1e-4)


def test_loss_returns_per_item_losses_that_its_means_reduce():
    """pytorch-metric-learning style: one loss per triplet and one per anchor with a positive;
    the parts are their means (the UCB reward and the total come from one computation)."""
    parts = _loss(EMB, POS, NEG, triplet_margin=0.5, hard_neg_ratio=1.0)
    expected = [ref_triplet(EMB, [t], 0.5) for t in [(0, 1, 2), (1, 0, 3)]]
    np.testing.assert_allclose(parts.triplet_items.detach().numpy(), expected, rtol=1e-5)
    assert parts.triplet.item() == pytest.approx(np.mean(expected), rel=1e-6)
    assert len(parts.contrastive_items) == 2  # anchors 0 and 1 have a positive; 2 and 3 none
    assert parts.contrastive.item() == pytest.approx(parts.contrastive_items.mean().item(), rel=1e-6)


def test_defaults_match_design():
    loss_fn = vpr.HybridLoss()
    assert (loss_fn.triplet_weight, loss_fn.contrastive_weight) == (0.3, 1.0)
    assert vpr.TrainConfig().hard_neg_ratio == 0.5
    assert loss_fn.triplet.margin == 0.5 and loss_fn.contrastive.temperature == 0.07


def test_loss_has_gradients_and_zero_when_nothing_to_learn():
    emb = torch.tensor(EMB, dtype=torch.float32, requires_grad=True)
    parts = _loss(emb, POS, NEG)
    parts.total.backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    # no negatives anywhere (two places in each other's ignore zone): both parts are 0, no crash
    emb = torch.tensor(EMB, dtype=torch.float32, requires_grad=True)
    pos, neg = _masks([(0, 1), (2, 3)], [], 4)
    parts = _loss(emb, pos, neg)
    assert parts.total.item() == 0.0 and parts.triplet.item() == 0.0 and parts.contrastive.item() == 0.0
    parts.total.backward()  # still a graph


def test_loss_on_real_masks_from_positions():
    """The loss as training uses it: masks from positions, embeddings from a head."""
    torch.manual_seed(0)
    xyz = torch.from_numpy(metric_to_xyz(np.r_[0, 1, 2, 60, 61, 500, 501, 502.0], np.zeros(8)))
    pos, neg = vpr.batch_pair_masks(xyz, 25.0, 100.0)
    emb = F.normalize(torch.randn(8, 6), dim=1)
    parts = _loss(emb, pos, neg, temperature=0.3)
    assert parts.contrastive.item() == pytest.approx(ref_contrastive(emb.numpy(), pos.numpy(), neg.numpy(), 0.3),
                                                     rel=1e-4)


# --------------------------------------------------------------------------------------------
# heads
# --------------------------------------------------------------------------------------------
def test_projection_head_structure_shape_and_unit_norm():
    torch.manual_seed(0)
    head = vpr.ProjectionHead(64, projection_dim=16, dropout=0.1)
    layers = list(head.net)
    assert [type(m) for m in layers] == [torch.nn.Linear, torch.nn.BatchNorm1d, torch.nn.ReLU, torch.nn.Dropout,
                                         torch.nn.Linear]
    assert (layers[0].in_features, layers[0].out_features) == (64, 32)
    assert (layers[4].in_features, layers[4].out_features) == (32, 16)
    assert layers[3].p == 0.1
    x = torch.randn(10, 64) * 5 + 3
    for mode in (head.train, head.eval):
        mode()
        out = head(x)
        assert out.shape == (10, 16)
        np.testing.assert_allclose(out.norm(dim=1).detach().numpy(), 1.0, atol=1e-5)


def test_build_head_from_config():
    torch.manual_seed(0)
    head = vpr.build_head({"type": "projection", "in_dim": 40, "projection_dim": 8, "dropout": 0.25})
    assert isinstance(head, vpr.ProjectionHead)
    assert head.net[0].in_features == 40 and head.net[4].out_features == 8 and head.net[3].p == 0.25
    with pytest.raises(VPRError, match="nosuchhead"):
        vpr.build_head({"type": "nosuchhead", "in_dim": 40, "projection_dim": 8, "dropout": 0.1})
    # a state dict moves between two heads built from the same config
    twin = vpr.build_head({"type": "projection", "in_dim": 40, "projection_dim": 8, "dropout": 0.25})
    twin.load_state_dict(head.state_dict())
    x = torch.randn(5, 40)
    assert torch.equal(head.eval()(x), twin.eval()(x))


def test_embed_matches_eval_forward_in_any_batch_size():
    torch.manual_seed(0)
    head = vpr.ProjectionHead(32, projection_dim=8, dropout=0.5)
    head.train()
    head(torch.randn(16, 32))  # update BatchNorm running statistics
    features = np.random.default_rng(0).normal(size=(23, 32)).astype(np.float32)
    out = vpr.embed(head, features)
    assert out.shape == (23, 8) and out.dtype == np.float32
    assert not head.training  # embed uses eval mode: no dropout, running BatchNorm statistics
    with torch.no_grad():
        np.testing.assert_allclose(out, head(torch.from_numpy(features)).numpy(), atol=1e-6)
    np.testing.assert_allclose(vpr.embed(head, features, batch_size=5), out, atol=1e-6)
    np.testing.assert_array_equal(vpr.embed(head, features), out)  # deterministic
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
