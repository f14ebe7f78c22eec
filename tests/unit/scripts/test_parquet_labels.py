"""Embeddings parquet input (no backbone), place-label supervision (one pair rule for batches,
mining and evaluation), the mlp head and the exported parquet round trip."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import place_positions, write_embeddings_parquet
import eval_trained
import train_vpr
import vprkit.extraction.features
import trainable_vpr as vpr
from trainable_vpr.checkpoints import EMBEDDINGS_ARCH
from vprkit.cli import VPRError
from vprkit.retrieval.evaluation import evaluate_retrieval, l2_normalise
from vprkit.tables.pairs import group_places
from vprkit.tables.places import PlaceTable, export_embeddings_parquet, load_poses
from vprkit.tables.load import load_table


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------
def test_parquet_loads_into_a_place_table(tmp_path):
    path = write_embeddings_parquet(tmp_path / "e.parquet", n_places=3, per_place=2, dim=5, positions=True)
    table = load_table(path)
    assert isinstance(table, PlaceTable)
    assert table.embeddings.shape == (6, 5) and table.embeddings.dtype == np.float32
    assert table.labels.tolist() == ["b0", "b0", "b1", "b1", "b2", "b2"]
    assert table.paths[0] == "img_0_0000" and table.coord_kind == "metric"
    np.testing.assert_allclose(table.xyz[:, :2], place_positions(3, 2, seed=0))
    sub = table.subset(np.array([5, 0]))
    np.testing.assert_array_equal(sub.embeddings, table.embeddings[[5, 0]])


def test_labels_only_parquet_has_no_positions(tmp_path):
    table = load_table(write_embeddings_parquet(tmp_path / "e.parquet"))
    assert table.xyz is None and table.coord_kind == "none" and table.labels is not None


@pytest.mark.parametrize("frame, message", [
    (pd.DataFrame({"vector": [[1.0, 2.0]], "label": ["a"]}), "no 'embedding' column"),
    (pd.DataFrame({"embedding": [[1.0, 2.0], [1.0]], "label": ["a", "b"]}), "row 2: embedding of length 1, expected 2"),
    (pd.DataFrame({"embedding": [[1.0, 2.0], [np.nan, 1.0]], "label": ["a", "b"]}), "row 2: the embedding holds NaN"),
    (pd.DataFrame({"embedding": [[1.0, 2.0]], "colour": ["red"]}), "neither a label column"),
    (pd.DataFrame({"embedding": [[1.0, 2.0], [3.0, 4.0]], "place_id": ["a", None]}),
     "row 2: column 'place_id' is empty"),
])
def test_bad_parquet_is_one_line_naming_the_row(tmp_path, frame, message):
    path = tmp_path / "bad.parquet"
    frame.to_parquet(path)
    with pytest.raises(VPRError, match=message) as info:
        load_table(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_export_round_trip_keeps_rows_positions_and_features(tmp_path, poses_csv):
    csv = poses_csv(place_positions(2, 3), images=False)
    table = load_poses(csv, check_images=False)
    features = np.random.default_rng(0).normal(size=(len(table), 7)).astype(np.float32)
    back = load_table(export_embeddings_parquet(table, features, tmp_path / "out" / "poses.parquet"))
    np.testing.assert_array_equal(back.embeddings, features)
    np.testing.assert_allclose(back.xyz, table.xyz)
    assert back.paths == table.paths


# --------------------------------------------------------------------------------------------
# the pair rule
# --------------------------------------------------------------------------------------------
def test_pair_rule_labels_only_and_labels_with_positions():
    labels = np.array(["a", "a", "b", "a"])
    pos, neg = vpr.batch_pair_masks(None, 25.0, 100.0, labels)
    assert pos.tolist() == [[False, True, False, True], [True, False, False, True],
                            [False, False, False, False], [True, True, False, False]]
    assert neg[2].tolist() == [True, True, False, True] and not neg[0, 1]
    # with positions: a same-label image 40 m away is ignored, another label 10 m away too,
    # another label 50 m away (inside the GPS ignore zone) is a negative
    xyz = np.array([[0, 0, 0], [40, 0, 0], [10, 0, 0], [50, 0, 0]], float)
    pos, neg = vpr.batch_pair_masks(xyz, 25.0, 100.0, np.array(["a", "a", "b", "c"]))
    assert not pos[0, 1] and not neg[0, 1]
    assert not pos[0, 2] and not neg[0, 2]
    assert neg[0, 3] and not pos.any()


def test_hard_negatives_with_labels_are_other_labels():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.array(["a", "b", "c"]), 4)
    emb = l2_normalise(rng.normal(size=(12, 8)))
    hard = vpr.mine_hard_negatives(emb, None, 100.0, k=3, labels=labels)
    for i, row in enumerate(hard):
        assert (row >= 0).all() and (labels[row] != labels[i]).all()
        others = np.flatnonzero(labels != labels[i])
        expected = others[np.argsort(-(emb[others] @ emb[i]), kind="stable")][:3]
        assert set(row) == set(expected)


def test_evaluation_by_label_not_by_distance():
    db = np.eye(3, dtype=np.float32)
    queries = np.array([[1, 0.1, 0], [0, 0, 1]], np.float32)  # nearest: db 0, db 2
    # labels say query 0 belongs with db 1: its top-1 (db 0) is wrong
    result = evaluate_retrieval(db, None, queries, None, 25.0, (1, 2), np.array(["x", "y", "z"]), np.array(["y", "z"]))
    assert result.by_label and result.correct[:, 0].tolist() == [False, True]
    assert result.recalls == {1: 0.5, 2: 1.0} and np.isnan(result.top_distances_m).all()
    missing = evaluate_retrieval(db, None, queries, None, 25.0, (1,), np.array(["x", "y", "z"]), np.array(["q", "z"]))
    assert missing.num_queries_without_positive == 1
    with pytest.raises(VPRError, match="positions or place labels"):
        evaluate_retrieval(db, None, queries, None, 25.0, (1,))


# --------------------------------------------------------------------------------------------
# training and evaluation from parquet, without the backbone
# --------------------------------------------------------------------------------------------
@pytest.fixture
def no_images(monkeypatch):
    """Fail if anything reaches for a backbone or an image."""
    def refuse(*args, **kwargs):
        raise AssertionError("the backbone was used")
    monkeypatch.setattr(vpr, "create_backbone", refuse)
    monkeypatch.setattr(vprkit.extraction.features, "extract_features", refuse)


def _parquets(tmp_path, **options):
    train = write_embeddings_parquet(tmp_path / "train.parquet", n_places=6, per_place=5, seed=1, **options)
    val = write_embeddings_parquet(tmp_path / "val.parquet", n_places=6, per_place=2, seed=2, **options)
    return train, val


def _train_argv(tmp_path, train, val, *extra):
    return ["--train_parquet", str(train), "--val_parquet", str(val), "--model", "campus_emb", "--epochs", "2",
            "--batch_size", "8", "--seed", "3", "--device", "cpu", "--log_dir", str(tmp_path / "logs"),
            "--checkpoint_dir", str(tmp_path / "models"), *extra]


def test_train_and_evaluate_from_parquet_labels_only(tmp_path, no_images):
    train, val = _parquets(tmp_path)
    result = train_vpr.main(_train_argv(tmp_path, train, val, "--head", "mlp", "--output_dim", "8",
                                        "--hidden_dim", "32"))
    checkpoint = vpr.load_checkpoint(result.checkpoint)
    assert checkpoint["backbone"]["arch"] == EMBEDDINGS_ARCH and checkpoint["backbone"]["feature_dim"] == 16
    assert checkpoint["head_config"]["type"] == "mlp" and checkpoint["head_config"]["projection_dim"] == 8
    log = pd.read_csv(result.log_file)
    assert log[log.event == "batch"].train_loss.notna().all()
    # the checkpoint, evaluated by eval_trained on the parquets, gives the recall it was saved for
    report = eval_trained.main(["--model_path", str(result.checkpoint), "--db_parquet", str(train),
                                "--test_parquet", str(val), "--output_json", str(tmp_path / "r.json")])
    assert report.result.by_label
    for n in (1, 5, 10):
        assert report.result.recalls[n] == pytest.approx(checkpoint["best_val_recall"][f"recall@{n}"], abs=1e-9)
    assert json.loads((tmp_path / "r.json").read_text())["correct_by"] == "label"


def test_parquet_with_positions_trains_by_gps_when_asked(tmp_path, no_images):
    train, val = _parquets(tmp_path, labels=False, positions=True)
    result = train_vpr.main(_train_argv(tmp_path, train, val, "--epochs", "1"))
    assert vpr.load_checkpoint(result.checkpoint)["config"]["supervision"] == "auto"
    assert 0.0 <= result.best_recall[1] <= 1.0


def test_embedding_dimension_is_checked_against_the_head(tmp_path, no_images):
    train, val = _parquets(tmp_path)
    result = train_vpr.main(_train_argv(tmp_path, train, val, "--epochs", "1"))
    wide = write_embeddings_parquet(tmp_path / "wide.parquet", dim=24)
    with pytest.raises(VPRError, match="24-dim features, but the head takes 16-dim input"):
        eval_trained.main(["--model_path", str(result.checkpoint), "--db_parquet", str(wide), "--test_parquet",
                           str(wide)])
    with pytest.raises(VPRError, match="16-dim embeddings, but .* has 24"):
        train_vpr.main(_train_argv(tmp_path, wide, val))


def test_labels_supervision_needs_labels(tmp_path, no_images):
    train, val = _parquets(tmp_path, labels=False, positions=True)
    with pytest.raises(VPRError, match="--supervision labels: .* has no label column"):
        train_vpr.main(_train_argv(tmp_path, train, val, "--supervision", "labels"))


def test_mlp_head_options():
    x = torch.randn(5, 12)
    plain = vpr.build_head({"type": "mlp", "in_dim": 12, "projection_dim": 12, "hidden_dim": 8, "dropout": 0.0,
                            "use_residual": False, "use_layer_norm": False})
    assert plain.skip is None and isinstance(plain.mlp[1], torch.nn.Identity)
    residual = vpr.build_head({"type": "mlp", "in_dim": 12, "projection_dim": 12, "hidden_dim": 8, "dropout": 0.0})
    torch.nn.init.zeros_(residual.mlp[-1].weight)
    torch.nn.init.zeros_(residual.mlp[-1].bias)
    # with the MLP silenced, the identity skip passes the (normalised) input through
    torch.testing.assert_close(residual.eval()(x), torch.nn.functional.normalize(x, dim=-1))
    assert isinstance(residual.mlp[1], torch.nn.LayerNorm) and isinstance(residual.mlp[2], torch.nn.GELU)
    projected = vpr.build_head({"type": "mlp", "in_dim": 12, "projection_dim": 4, "hidden_dim": 8, "dropout": 0.0})
    assert projected(x).shape == (5, 4)


def test_per_triplet_losses_for_both_distances():
    """max(0, d(a,p) - d(a,n) + margin) on normalised embeddings, d Euclidean or 1 - cosine."""
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(6, 4), dim=-1)
    a, p, n = triplets = (torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5]), torch.tensor([4, 5, 3]))
    no_pairs = torch.zeros(6, 6, dtype=torch.bool)
    by_hand = {"euclidean": (emb[a] - emb[p]).norm(dim=-1) - (emb[a] - emb[n]).norm(dim=-1),
               "cosine": (emb[a] * emb[n]).sum(-1) - (emb[a] * emb[p]).sum(-1)}
    for distance in vpr.LOSS_DISTANCES:
        parts = vpr.HybridLoss(triplet_margin=0.5, distance=distance)(emb, no_pairs, no_pairs, triplets)
        torch.testing.assert_close(parts.triplet_items, (by_hand[distance] + 0.5).clamp(min=0), atol=1e-5, rtol=1e-5)


def test_places_for_batches_follow_labels_and_cells():
    labels = np.array(["b", "a", "b", "a", "b"])
    assert group_places(None, labels, 25.0).tolist() == [0, 1, 0, 1, 0]
    xyz = np.array([[0, 0, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0], [500, 0, 0]], float)
    # the third "b" is 500 m away: another place, although the same label
    assert group_places(xyz, labels, 25.0).tolist() == [0, 1, 0, 1, 2]


def test_run_experiment_on_parquets(tmp_path, no_images, capsys):
    import run_experiment

    train, val = _parquets(tmp_path)
    test = write_embeddings_parquet(tmp_path / "test.parquet", n_places=6, per_place=2, seed=3)
    table = run_experiment.main(["--train_parquet", str(train), "--val_parquet", str(val), "--test_parquet", str(test),
                                 "--models", "emb", "--epochs", "1", "--batch_size", "8",
                                 "--log_dir", str(tmp_path / "logs"), "--checkpoint_dir", str(tmp_path / "models")])
    assert table.variant.tolist() == ["raw", "pca_whitened", "learned_whitened", "start", "trained", "trained_whitened"]
    raw = evaluate_retrieval(load_table(train).embeddings, None, load_table(test).embeddings, None, 25.0,
                                 (1, 5, 10), load_table(train).labels, load_table(test).labels)
    assert table.loc[0, "recall@1"] == pytest.approx(raw.recalls[1], abs=1e-4)
    assert "correct by place label" in capsys.readouterr().out


def test_a_parquet_run_names_its_latest_copy_after_the_parquet_backbone(tmp_path, no_images, capsys):
    """Without --model, a run on parquets is named after their `backbone` column, and so is the
    latest-run copy it prints (it printed the default model's name, trained_dinov2_b_...)."""
    train, val = _parquets(tmp_path)
    for path in (train, val):
        frame = pd.read_parquet(path)
        frame["backbone"] = "campus_net"
        frame.to_parquet(path, index=False)
    argv = _train_argv(tmp_path, train, val, "--epochs", "1")
    argv = argv[:argv.index("--model")] + argv[argv.index("--model") + 2:]
    result = train_vpr.main(argv)
    alias = tmp_path / "models" / "trained_campus_net_seed3.pth"
    assert result.latest_alias == alias and alias.is_file()
    assert f"(copied to {alias})" in capsys.readouterr().out
