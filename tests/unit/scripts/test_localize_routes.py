"""localize.py on routes (--seq_len L > 1): a folder of frames ordered by file name or by EXIF
capture time, or a CSV with an order column, localised frame by frame from each frame's causal
window against a database route, by sequence matching over a single-frame model or by a sequence
checkpoint (its descriptor fused with matching); the window of each frame in the output; bad
orders and the wrong checkpoint kind are one-line errors."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import SHARED, TINY_MODEL, assert_one_line_error, requires_shared, run_main
from helpers import TINY_OPTIONS as TINY
from helpers.exif_photos import photo_exif, save_photo
from PIL import Image

import localize  # noqa: E402

N_DB = 12
EAST = 600_000.0 + 30.0 * np.arange(N_DB)  # 30 m apart: beyond the 25 m estimate radius


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """route.csv: 12 database frames (distinct random images, frame_index 0..11, 30 m apart, each
    photo with an EXIF capture time 1 s apart); frames/: copies of database frames 4..9 named
    f8.jpg .. f13.jpg (name order = route order only with numbers read as numbers);
    timed/: copies of frames 4..9 whose names run against their capture order."""
    root = tmp_path_factory.mktemp("routes")
    rng = np.random.default_rng(3)
    for i in range(N_DB):
        pixels = np.clip(rng.integers(0, 256, 3) + rng.normal(0, 30, (40, 40, 3)), 0, 255).astype(np.uint8)
        save_photo(root / f"db/{i}.jpg", Image.fromarray(pixels), photo_exif(taken=f"2024:05:01 10:00:{i:02d}"))
    pd.DataFrame({"image_path": [f"db/{i}.jpg" for i in range(N_DB)], "frame_index": np.arange(N_DB),
                  "easting": EAST, "northing": 3_500_000.0}).to_csv(root / "route.csv", index=False)
    (root / "frames").mkdir()
    (root / "timed").mkdir()
    for k, i in enumerate(range(4, 10)):
        shutil.copy(root / f"db/{i}.jpg", root / "frames" / f"f{8 + k}.jpg")
        shutil.copy(root / f"db/{i}.jpg", root / "timed" / f"{chr(ord('z') - k)}.jpg")  # z.jpg first in time
    return root


def argv(scene: Path, out: Path, query: str, *extra: str) -> list[str]:
    return ["--baseline", "--model", TINY_MODEL, "--db_csv", str(scene / "route.csv"), "--query", str(scene / query),
            "--output", str(out), "--cache_dir", str(scene / "cache"), "--seq_len", "3", *TINY, *extra]


def top1(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["rank"] == 1].reset_index(drop=True)


def names(column: pd.Series) -> list[str]:
    return [Path(p).name for p in column]


def test_a_folder_by_name_every_frame_from_its_window(scene, tmp_path, capsys):
    out = tmp_path / "m.csv"
    frame = localize.main(argv(scene, out, "frames", "--top_k", "3"))
    assert "each by its window of 3 frames (sequence matching)" in capsys.readouterr().out
    first = top1(pd.read_csv(out))
    assert len(pd.read_csv(out)) == 6 * 3 and len(frame) == 18
    assert names(first["query_image"]) == [f"f{i}.jpg" for i in range(8, 14)]  # f10 after f9: numbers as numbers
    assert names(first["db_image"]) == [f"{i}.jpg" for i in range(4, 10)]     # every frame its own original
    # the window: the frame and the two before it in the folder's order; the first frames have fewer
    assert names(first["window_last"]) == names(first["query_image"])
    assert names(first["window_first"]) == ["f8.jpg", "f8.jpg", "f8.jpg", "f9.jpg", "f10.jpg", "f11.jpg"]
    assert first["window_frames"].tolist() == [1, 2, 3, 3, 3, 3]
    np.testing.assert_allclose(first["est_easting"], EAST[4:10], atol=1e-6)  # neighbours 30 m off: top-1 alone
    assert (first["est_support"] == 1).all()


def test_a_folder_by_exif_time(scene, tmp_path):
    out = tmp_path / "m.csv"
    first = top1(localize.main(argv(scene, out, "timed", "--order", "exif_time", "--top_k", "2")))
    assert names(first["query_image"]) == ["z.jpg", "y.jpg", "x.jpg", "w.jpg", "v.jpg", "u.jpg"]  # by time
    assert names(first["db_image"]) == [f"{i}.jpg" for i in range(4, 10)]
    assert names(first["window_first"]) == ["z.jpg", "z.jpg", "z.jpg", "y.jpg", "x.jpg", "w.jpg"]
    # by name the same photos make other windows (u.jpg first): its window is not x, w, ... in time
    by_name = top1(localize.main(argv(scene, tmp_path / "n.csv", "timed", "--top_k", "2")))
    assert names(by_name["query_image"]) == ["u.jpg", "v.jpg", "w.jpg", "x.jpg", "y.jpg", "z.jpg"]
    assert names(by_name["window_first"])[-1] == "x.jpg"


def test_a_csv_with_an_order_column_and_the_single_frame_output_unchanged(scene, tmp_path):
    pd.DataFrame({"image_path": [f"frames/f{i}.jpg" for i in range(8, 14)],
                  "frame_index": np.arange(6) * 2}).to_csv(scene / "q_route.csv", index=False)
    first = top1(localize.main(argv(scene, tmp_path / "m.csv", "q_route.csv", "--top_k", "2")))
    assert names(first["db_image"]) == [f"{i}.jpg" for i in range(4, 10)]
    assert first["window_frames"].tolist() == [1, 2, 3, 3, 3, 3]
    single = localize.main([a for a in argv(scene, tmp_path / "s.csv", "q_route.csv", "--top_k", "2")
                            if a not in ("--seq_len", "3")])
    assert not any(c.startswith("window_") for c in single.columns)
    assert names(top1(single)["db_image"]) == [f"{i}.jpg" for i in range(4, 10)]


def _sequence_checkpoint(folder: Path, seq_len: int, fusion_weight: float | None, with_head: bool = True) -> Path:
    """A sequence checkpoint of the tiny backbone: a raw-frame SeqNetHead (its untrained start:
    the window's frames concatenated, plus a random temporal kernel; or no head: training-free,
    sequence matching alone, with a shortlist shorter than --top_k) and the matching settings."""
    from trainable_vpr.checkpoints import save_checkpoint, sequence_checkpoint_payload
    from trainable_vpr.model import PlaceDescriptor
    from trainable_vpr.seqnet import SeqHeadConfig, SeqNetHead

    frozen = PlaceDescriptor.baseline(TINY_MODEL, "random", 32).frozen
    torch.manual_seed(0)
    head = SeqNetHead(SeqHeadConfig(seq_len=seq_len, frame_dim=frozen.info.feature_dim, frame_start="raw",
                                    kernel=3))
    torch.nn.init.normal_(head.temporal.weight, std=0.01)
    sequence = {"seq_len": seq_len, "v_min": 0.8, "v_max": 1.25, "n_velocities": 5,
                "shortlist": 50 if with_head else 2, "max_gap": None, "fusion_weight": fusion_weight}
    config = {"model": TINY_MODEL, "weights": "random", "image_size": 32, "pos_threshold_m": 25.0}
    path = folder / f"seq_{fusion_weight}_{with_head}.pth"
    save_checkpoint(path, sequence_checkpoint_payload(None, None, head if with_head else None, frozen.info.as_dict(),
                                                      config, sequence, {"fusion_weight": fusion_weight}, "seq_run"))
    return path


@pytest.mark.parametrize("fusion_weight, with_head, how", [
    (None, True, "(the learned sequence descriptor)"),
    (0.5, True, "(the learned sequence descriptor fused with sequence matching, weight 0.5)"),
    (None, False, "(sequence matching)"),
])
def test_a_sequence_checkpoint_localises_with_its_descriptor_and_fusion(scene, tmp_path, capsys, fusion_weight,
                                                                        with_head, how):
    checkpoint = _sequence_checkpoint(tmp_path, 3, fusion_weight, with_head)
    out = tmp_path / "m.csv"
    flags = ["--model_path", str(checkpoint), *argv(scene, out, "frames", "--top_k", "3")[3:]]
    frame = localize.main(flags)
    first = top1(frame)
    assert how in capsys.readouterr().out
    assert len(frame) == 6 * 3 and frame["db_index"].between(0, N_DB - 1).all()  # top 3 each, a shortlist of 2 or not
    assert names(first["db_image"]) == [f"{i}.jpg" for i in range(4, 10)]
    assert names(first["window_first"]) == ["f8.jpg", "f8.jpg", "f8.jpg", "f9.jpg", "f10.jpg", "f11.jpg"]


@pytest.mark.parametrize("case, words", [
    ("database not a route", ["--db_csv", "not a route: no order column"]),
    ("query csv duplicate", ["--query", "row 3", "repeats row 2"]),
    ("no exif time", ["--query", "has no EXIF capture time", "--order name"]),
    ("sequence checkpoint, single frames", ["is a sequence checkpoint", "--seq_len 3"]),
    ("other window length", ["--seq_len 4", "windows of 3 frames"]),
])
def test_bad_orders_and_kinds_are_one_line_errors(scene, tmp_path, capsys, case, words):
    out = tmp_path / "m.csv"
    flags = argv(scene, out, "frames")
    if case == "database not a route":
        pd.read_csv(scene / "route.csv").drop(columns="frame_index").to_csv(tmp_path / "db.csv", index=False)
        (tmp_path / "db").symlink_to(scene / "db")
        flags[flags.index("--db_csv") + 1] = str(tmp_path / "db.csv")
    elif case == "query csv duplicate":
        pd.DataFrame({"image_path": [str(scene / "frames/f8.jpg"), str(scene / "frames/f9.jpg")],
                      "frame_index": [1, 1]}).to_csv(tmp_path / "q.csv", index=False)
        flags[flags.index("--query") + 1] = str(tmp_path / "q.csv")
    elif case == "no exif time":
        (tmp_path / "plain").mkdir()
        shutil.copy(scene / "frames/f8.jpg", tmp_path / "plain/a.jpg")
        Image.new("RGB", (20, 20)).save(tmp_path / "plain/b.jpg")
        flags[flags.index("--query") + 1] = str(tmp_path / "plain")
        flags += ["--order", "exif_time"]
    else:
        flags = ["--model_path", str(_sequence_checkpoint(tmp_path, 3, 0.5)), *flags[3:]]
        at = flags.index("--seq_len") + 1
        flags[at] = "1" if case.endswith("single frames") else "4"
    code, err = run_main(capsys, localize.main, flags)
    assert_one_line_error(code, err, *words)
    assert not out.exists()


@requires_shared
def test_nordland_winter_frames_against_the_summer_route(tmp_path, capsys):
    """The shared route's development test (winter queries, summer database; effnet_lite0 frozen):
    the winter frames as a folder ordered by name localise far better by their 10-frame windows
    (sequence matching) than one frame at a time; the CSV with its frame_index gives the same."""
    route = SHARED / "nordland_route"
    queries = pd.read_csv(route / "queries.csv")
    (tmp_path / "winter").mkdir()
    for path in queries["image_path"]:
        (tmp_path / "winter" / Path(path).name).symlink_to(route / path)
    common = ["--baseline", "--model", "effnet_lite0", "--db_csv", str(route / "database.csv"), "--top_k", "1",
              "--cache_dir", str(tmp_path / "cache"), "--num_workers", "0", "--device", "cpu"]
    truth = queries["northing"].to_numpy()

    def recall(frame: pd.DataFrame) -> float:
        return float((np.abs(top1(frame)["db_northing"].to_numpy() - truth) <= 25.0).mean())

    single = localize.main([*common, "--query", str(tmp_path / "winter"), "--output", str(tmp_path / "one.csv")])
    folder = localize.main([*common, "--query", str(tmp_path / "winter"), "--output", str(tmp_path / "seq.csv"),
                            "--seq_len", "10"])
    csv = localize.main([*common, "--query", str(route / "queries.csv"), "--output", str(tmp_path / "csv.csv"),
                         "--seq_len", "10"])
    print(f"nordland dev test R@1 at 25 m: one frame {recall(single):.3f}, 10-frame windows {recall(folder):.3f}")
    assert names(top1(folder)["query_image"]) == names(queries["image_path"])  # the folder's name order = the route's
    assert recall(folder) >= recall(single) + 0.1
    assert names(top1(csv)["db_image"]) == names(top1(folder)["db_image"])


def test_a_train_vpr_sequence_checkpoint_localizes_a_route_and_exports(tmp_path, capsys):
    """The whole path: train_vpr --head seqnet on a small synthetic route, then localize.py with its
    checkpoint (winter frames of places it never saw, against their summer route), and
    export_model.py of the same checkpoint checked on read-back."""
    import export_model
    import train_vpr
    from helpers.routes import write_route_images

    root = tmp_path / "route"
    tables = {"train": write_route_images(root, "train", 0, 16),
              "val": write_route_images(root, "val", 16, 8, ("winter",)),
              "val_db": write_route_images(root, "val_db", 16, 8, ("summer",))}
    result = train_vpr.main(["--train_csv", str(tables["train"]), "--val_csv", str(tables["val"]), "--val_db_csv",
                             str(tables["val_db"]), "--model", TINY_MODEL, *TINY, "--head", "seqnet", "--seq_len", "3",
                             "--epochs", "1", "--batch_size", "8", "--cache_dir", str(root / "cache"),
                             "--log_dir", str(tmp_path / "logs"), "--checkpoint_dir", str(tmp_path / "models")])
    out = tmp_path / "m.csv"
    frame = localize.main(["--model_path", str(result.checkpoint), "--db_csv", str(tables["val_db"]), "--query",
                           str(tables["val"]), "--output", str(out), "--seq_len", "3", "--top_k", "2",
                           "--cache_dir", str(root / "cache"), *TINY])
    assert "each by its window of 3 frames (the learned sequence descriptor" in capsys.readouterr().out
    assert len(frame) == 8 * 2 and {"window_first", "window_last", "est_easting"} <= set(frame.columns)
    assert names(top1(frame)["window_last"]) == names(top1(frame)["query_image"])
    output = tmp_path / "route.pt2"
    export_model.main(["--model_path", str(result.checkpoint), "--output", str(output)])
    assert "[B, 3, 3, H, W]" in capsys.readouterr().out and output.is_file()
