"""trainable_vpr.route_evaluation on synthetic routes (numpy frame descriptors, no images): the
rebuilt start of a trained sequence model is the run's epoch 0; a sequence model's fused search
with weight 0 is its descriptor's ranking; seq_match's choice on val is the best candidate."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from trainable_vpr.model import PlaceDescriptor
from trainable_vpr.route_evaluation import RouteSplit, choose_seq_match, evaluate_sequence_model, untrained
from trainable_vpr.seqnet import SeqHeadConfig, start_sequence_head
from trainable_vpr.sequence_model import SequenceDescriptor
from trainable_vpr.sequence_training import RouteFrames, SeqTrainConfig, train_sequence_head, window_recall
from vprkit.retrieval.evaluation import Descriptors, evaluate_retrieval
from vprkit.routes.matching import SeqMatchConfig
from vprkit.routes.order import Route
from vprkit.tables.places import PlaceTable

N_PLACES, DIM, THRESHOLD = 24, 16, 25.0
CENTRES = np.random.default_rng(0).normal(size=(N_PLACES, DIM))


def route_frames(drives: tuple[str, ...], seed: int) -> RouteFrames:
    rng = np.random.default_rng(seed)
    features = np.concatenate([CENTRES + 1.2 * rng.normal(size=CENTRES.shape) for _ in drives]).astype(np.float32)
    xyz = np.tile(np.c_[100.0 * np.arange(N_PLACES), np.zeros(N_PLACES), np.zeros(N_PLACES)], (len(drives), 1))
    route = Route(drive=np.repeat(np.arange(len(drives)), N_PLACES), key=np.tile(np.arange(N_PLACES, dtype=float),
                  len(drives)), unit="frame", drive_names=drives)
    return RouteFrames(features, route, xyz)


def table(frames: RouteFrames, name: str) -> PlaceTable:
    frame = pd.DataFrame({"image_id": [f"{name}_{i}" for i in range(len(frames.xyz))]})
    return PlaceTable(source=f"{name}.csv", paths=list(frame["image_id"]), xyz=frames.xyz, coord_kind="metric",
                      frame=frame)


@pytest.fixture(scope="module")
def data() -> dict[str, RouteFrames]:
    return {"train": route_frames(("summer", "winter"), 1), "val": route_frames(("winter",), 2),
            "val_db": route_frames(("summer",), 3)}


def test_the_rebuilt_start_is_the_runs_epoch_0(data):
    config = SeqHeadConfig(seq_len=3, frame_dim=DIM, proj_dim=8, hidden_dim=16, frame_start="learned_whitened",
                           shrinkage=0.5)
    head = start_sequence_head(config, data["train"].features, data["train"].xyz, THRESHOLD, seed=3)
    start_state = {k: v.clone() for k, v in head.state_dict().items()}
    result = train_sequence_head(data["train"], data["val"], data["val_db"], head,
                                 SeqTrainConfig(epochs=2, lr=1e-2, pos_threshold_m=THRESHOLD), seed=3)
    model = SequenceDescriptor(PlaceDescriptor(None, None), result.head, SeqMatchConfig(3), fusion_weight=0.5)
    start = untrained(model, data["train"].features, data["train"].xyz, THRESHOLD, seed=3)
    assert start.fusion_weight is None and start.match == model.match and start.frame is model.frame
    for key, value in start.head.state_dict().items():
        torch.testing.assert_close(value, start_state[key])
    assert window_recall(start.head, data["val"], data["val_db"], THRESHOLD, (1,)).recalls[1] == result.start_val_r1


def test_weight_none_is_the_descriptors_ranking_and_choice_is_the_best_on_val(data):
    config = SeqHeadConfig(seq_len=3, frame_dim=DIM, proj_dim=8, hidden_dim=16, frame_start="raw")
    head = start_sequence_head(config, data["train"].features, data["train"].xyz, THRESHOLD, seed=0)
    model = SequenceDescriptor(PlaceDescriptor(None, None), head, SeqMatchConfig(3, shortlist=5))
    val, val_db = data["val"], data["val_db"]
    split = RouteSplit(table(val_db, "val_db"), table(val, "val"), val_db.route, val.route)
    evaluation = evaluate_sequence_model("seq", model, Descriptors(val_db.features, val.features), split, THRESHOLD,
                                         (1, 5))
    reference = window_recall(head, val, val_db, THRESHOLD, (1, 5))
    assert evaluation.report.result.top_indices.tolist() == reference.top_indices.tolist()
    assert evaluation.report.result.recalls == reference.recalls

    raw = Descriptors(val_db.features, val.features)
    rng = np.random.default_rng(9)
    noise = Descriptors(*(rng.normal(size=f.shape).astype(np.float32) for f in (val_db.features, val.features)))
    choice = choose_seq_match({"noise": noise, "raw": raw}, split, SeqMatchConfig(3, 0.8, 1.25), THRESHOLD)
    assert set(choice.val_r1) == {"noise, v 1-1", "noise, v 0.8-1.25", "raw, v 1-1", "raw, v 0.8-1.25"}
    assert choice.frames == "raw" and choice.val_r1[f"raw, v {choice.config.v_min:g}-{choice.config.v_max:g}"] == \
        max(choice.val_r1.values())
    single = evaluate_retrieval(val_db.features, val_db.xyz, val.features, val.xyz, THRESHOLD, (1,)).recalls[1]
    assert max(choice.val_r1.values()) > single  # windows of 3 beat single frames on this noisy route
