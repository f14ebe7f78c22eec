"""Every bad input of README.md's "Errors" table, through the scripts' entry points: one line
on stderr naming the file, row or flag and what to do, exit code 2, no traceback, and nothing
written (no log, no checkpoint) when a run stops on bad input.

The cases run in-process (run_cli(main, argv), what `python script.py argv` does); a few run as
real processes, all started at once, for the true exit code and stderr."""
from __future__ import annotations

import os
import types
from pathlib import Path

import pytest
import torch

from helpers import (TINY, TINY_MODEL, TINY_OPTIONS, assert_one_line_error, place_positions, run_main,
                      run_processes_at_once, write_csv, write_poses)
import eval_trained
import run_experiment
import train_vpr
from trainable_vpr.checkpoints import FORMAT_VERSION


def _edit_line(csv: Path, line: int, column: int, value: str) -> Path:
    """Set one cell (file line `line`, header = 1) of a simple comma-separated file."""
    lines = csv.read_text().splitlines()
    cells = lines[line - 1].split(",")
    cells[column] = value
    lines[line - 1] = ",".join(cells)
    csv.write_text("\n".join(lines) + "\n")
    return csv


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> types.SimpleNamespace:
    """A good train/val pair, and one bad file per case (written once for the module)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    f = types.SimpleNamespace(root=root)
    f.train = write_poses(root, place_positions(6, 3, seed=1), name="train.csv", seed=1)
    f.val = write_poses(root, place_positions(6, 1, seed=2), name="val.csv", seed=2)
    good = f.train.read_text()

    def variant(name: str, text: str) -> Path:
        path = root / name  # same folder: the image paths still resolve
        path.write_text(text)
        return path

    f.semicolon = variant("semicolon.csv", good.replace(",", ";"))
    f.tab = variant("tab.csv", good.replace(",", "\t"))
    f.empty = variant("empty.csv", "")
    f.header_only = variant("header_only.csv", "image_path,easting,northing\n")
    f.typo_image = variant("typo_image.csv", good.replace("image_path,", "imge_path,", 1))
    f.typo_position = variant("typo_position.csv", good.replace("easting,northing", "eastng,northing", 1))
    f.text_coordinate = _edit_line(variant("text_coordinate.csv", good), 3, 2, "12 m")
    f.blank_image = _edit_line(variant("blank_image.csv", good), 7, 0, "")
    f.nan_coordinate = _edit_line(variant("nan_coordinate.csv", good), 4, 1, "nan")
    f.inf_coordinate = _edit_line(variant("inf_coordinate.csv", good), 5, 1, "inf")
    rel = [line.split(",")[0] for line in good.splitlines()[1:4]]
    f.latitude = write_csv(root / "latitude.csv", ["image_path", "lat", "lon"],
                           [[rel[0], 31.0, 34.0], [rel[1], 91.0, 34.0], [rel[2], 31.0, 34.0]])
    f.longitude = write_csv(root / "longitude.csv", ["image_path", "lat", "lon"],
                            [[rel[0], 31.0, 34.0], [rel[1], 31.0, 34.0], [rel[2], 31.0, -181.0]])
    f.duplicate = variant("duplicate.csv", good + good.splitlines()[2] + "\n")
    f.missing_image = write_poses(root / "missing", place_positions(4, 3), name="train.csv")
    (root / "missing" / "images" / "train_004.jpg").unlink()
    f.not_image = write_poses(root / "not_image", place_positions(4, 3), name="train.csv")
    (root / "not_image" / "images" / "train_002.jpg").write_text("this is not a picture\n")
    f.truncated_image = write_poses(root / "truncated_image", place_positions(4, 3), name="train.csv")
    jpeg = root / "truncated_image" / "images" / "train_007.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:200])
    f.cameras = write_poses(root / "cams", place_positions(4, 3), name="train.csv", cameras=["phoneA", "phoneB"] * 6)
    f.no_positive = write_poses(root / "far", [(i * 40.0, 0.0) for i in range(12)], name="train.csv")
    # pairs 24 m apart: positives by distance, but no clustering cell (side 25/sqrt(3) m) holds two of them
    f.split_pairs = write_poses(root / "split", [(i * 300.0 + d, 0.0) for i in range(6) for d in (0.0, 24.0)],
                                name="train.csv")
    f.val_far = write_poses(root / "val_far", [(100_000.0 + i * 300.0, 0.0) for i in range(4)], name="val.csv")
    f.val_latlon = write_poses(root / "val_latlon", [(31.0, 34.0 + i * 0.01) for i in range(4)], name="val.csv",
                               columns=("image_path", "lat", "lon"))
    f.regular_file = variant("regular_file.txt", "a file, not a folder\n")
    return f


# --------------------------------------------------------------------------------------------
# poses CSVs and flags, through train_vpr.py
# --------------------------------------------------------------------------------------------
# case -> (what replaces the good files/flags, words the error line must contain)
TRAIN_CASES = {
    # CSVs
    "missing file": (lambda f: {"train": f.root / "nope.csv"}, ["nope.csv", "file not found"]),
    "empty file": (lambda f: {"train": f.empty}, ["empty.csv", "empty"]),
    "header only": (lambda f: {"train": f.header_only}, ["header_only.csv", "no rows"]),
    "semicolons": (lambda f: {"train": f.semicolon}, ["semicolon.csv", "looks like ';'-separated", "use commas"]),
    "tabs": (lambda f: {"train": f.tab}, ["tab.csv", "looks like tab-separated", "use commas"]),
    "misspelled image column": (lambda f: {"train": f.typo_image}, ["typo_image.csv", "'imge_path' -> 'image_path'"]),
    "misspelled position column": (lambda f: {"train": f.typo_position},
                                   ["typo_position.csv", "'eastng' -> 'easting'"]),
    "text coordinate": (lambda f: {"train": f.text_coordinate},
                        ["text_coordinate.csv", "row 3, column 'northing'", "'12 m'", "fix or remove"]),
    "empty image cell": (lambda f: {"train": f.blank_image}, ["blank_image.csv", "row 7", "no image file in column "
                                                              "'image_path'"]),
    "NaN coordinate": (lambda f: {"train": f.nan_coordinate}, ["nan_coordinate.csv", "row 4, column 'easting'",
                                                               "'nan'"]),
    "infinite coordinate": (lambda f: {"train": f.inf_coordinate}, ["inf_coordinate.csv", "row 5", "'inf'"]),
    "latitude beyond 90": (lambda f: {"train": f.latitude}, ["latitude.csv", "row 3", "latitude 91", "±90"]),
    "longitude beyond 180": (lambda f: {"train": f.longitude}, ["longitude.csv", "row 4", "longitude -181", "±180"]),
    "duplicate row": (lambda f: {"train": f.duplicate}, ["duplicate.csv", "row 20", "listed twice"]),
    "missing image": (lambda f: {"train": f.missing_image}, ["row 6", "train_004.jpg", "not found",
                                                             "--on_bad_image skip"]),
    "not an image": (lambda f: {"train": f.not_image}, ["train_002.jpg", "cannot be read as an image",
                                                         "--on_bad_image skip"]),
    "truncated image": (lambda f: {"train": f.truncated_image}, ["train_007.jpg", "cannot be read as an image"]),
    "unknown camera": (lambda f: {"train": f.cameras, "flags": ["--camera_id", "phoneZ"]},
                       ["--camera_id phoneZ", "phoneA, phoneB"]),
    "camera filter without camera column": (lambda f: {"flags": ["--camera_id", "phoneA"]},
                                            ["train.csv", "no camera_id/camera column"]),
    "no positive in train": (lambda f: {"train": f.no_positive}, ["far/train.csv", "no place has two images",
                                                                    "--pos_threshold_m 25"]),
    "positives split by the place grid": (lambda f: {"train": f.split_pairs}, ["split/train.csv",
                                                                                 "no place has two images"]),
    "no val query near train": (lambda f: {"val": f.val_far}, ["val_far/val.csv", "no query lies within",
                                                                "--pos_threshold_m 25"]),
    "val in other coordinates": (lambda f: {"val": f.val_latlon}, ["val_latlon/val.csv", "latlon positions"]),
    # flags
    "epochs 0": (lambda f: {"flags": ["--epochs", "0"]}, ["--epochs 0", "at least 1"]),
    "epochs negative": (lambda f: {"flags": ["--epochs", "-3"]}, ["--epochs -3", "at least 1"]),
    "epochs not a number": (lambda f: {"flags": ["--epochs", "ten"]}, ["--epochs", "invalid int value: 'ten'"]),
    "batch too small": (lambda f: {"flags": ["--batch_size", "3"]}, ["--batch_size 3", "at least 4"]),
    "images per place above half the batch": (lambda f: {"flags": ["--images_per_place", "5"]},
                                              ["--images_per_place 5", "batch_size / 2"]),
    "pos threshold at neg threshold": (lambda f: {"flags": ["--pos_threshold_m", "100"]},
                                       ["--pos_threshold_m 100", "--neg_threshold_m 100"]),
    "unknown model": (lambda f: {"flags": ["--model", "dinov9"]}, ["--model dinov9", "unknown backbone",
                                                                   "effnet_lite0"]),
    "missing weights file": (lambda f: {"flags": ["--weights", str(f.root / "w.pth")]},
                             ["--weights", "w.pth: file not found"]),
    "device without CUDA": (lambda f: {"flags": ["--device", "cuda"]}, ["--device cuda", "CUDA is not available"]),
    "unknown head": (lambda f: {"flags": ["--head", "nosuchhead"]},
                     ["--head", "'nosuchhead'", "projection", "see --help"]),
    "unknown on_bad_image": (lambda f: {"flags": ["--on_bad_image", "ignore"]}, ["--on_bad_image", "'ignore'"]),
    "output folder under a file": (lambda f: {"flags": ["--checkpoint_dir", str(f.regular_file / "models")]},
                                   ["--checkpoint_dir", "regular_file.txt", "cannot write there"]),
    "log folder under a file": (lambda f: {"flags": ["--log_dir", str(f.regular_file / "logs")]},
                                ["--log_dir", "regular_file.txt", "cannot write there"]),
}


def train_argv(f, out: Path, train: Path | None = None, val: Path | None = None, flags: list[str] = ()) -> list[str]:
    return ["--train_csv", str(train or f.train), "--val_csv", str(val or f.val), *TINY, "--epochs", "1",
            "--batch_size", "8", "--cache_dir", str(out / "cache"), "--log_dir", str(out / "logs"),
            "--checkpoint_dir", str(out / "models"), *flags]


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_train_bad_input_is_one_line_and_writes_nothing(files, capsys, tmp_path, case):
    if case == "device without CUDA" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    change, words = TRAIN_CASES[case]
    code, err = run_main(capsys, train_vpr.main, train_argv(files, tmp_path, **change(files)))
    assert_one_line_error(code, err, *words)
    written = [p for p in tmp_path.rglob("*") if p.is_file() and "cache" not in p.parts]
    assert written == [], f"a run stopped on bad input wrote {written}"


def test_the_good_files_do_train(files, tmp_path):
    """The cases above differ from a run that works only in what they name."""
    result = train_vpr.main(train_argv(files, tmp_path))
    assert result.checkpoint.is_file() and result.skipped_images == 0


def test_debug_shows_the_traceback(files, capsys, tmp_path):
    code, err = run_main(capsys, train_vpr.main, [*train_argv(files, tmp_path, train=files.semicolon), "--debug"])
    assert code == 2 and "Traceback" in err and err.rstrip().splitlines()[-1].startswith("error: ")


def test_bad_input_keeps_the_previous_checkpoint_and_logs(files, capsys, tmp_path):
    """A later run with bad input (found at any stage) leaves what earlier runs wrote as it was."""
    first = train_vpr.main(train_argv(files, tmp_path))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and "cache" not in p.parts}
    for train in (files.semicolon, files.not_image, files.split_pairs):
        code, err = run_main(capsys, train_vpr.main, train_argv(files, tmp_path, train=train))
        assert code == 2, err
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and "cache" not in p.parts}
    assert after == before and first.checkpoint in after


# --------------------------------------------------------------------------------------------
# checkpoints and outputs, through eval_trained.py
# --------------------------------------------------------------------------------------------
class _RunsCode:
    """Unpickling this object would run a command (what weights_only=True must refuse)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def checkpoints(files, tmp_path_factory) -> types.SimpleNamespace:
    """A real checkpoint (residual head, 1 epoch) and broken variants of it."""
    out = tmp_path_factory.mktemp("ckpt")
    good = train_vpr.main(train_argv(files, out)).checkpoint
    c = types.SimpleNamespace(good=good, marker=out / "code_ran")
    blob = good.read_bytes()
    c.truncated = out / "truncated.pth"
    c.truncated.write_bytes(blob[: len(blob) // 2])
    c.text = out / "notes.pth"
    c.text.write_text("not a checkpoint\n")
    c.other = out / "other.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, c.other)
    payload = torch.load(good, map_location="cpu", weights_only=True)
    c.code = out / "code.pth"
    torch.save({**payload, "extra": _RunsCode(c.marker)}, c.code)
    c.newer = out / "newer.pth"
    torch.save({**payload, "format_version": FORMAT_VERSION + 1, "model_state_dict": {}}, c.newer)
    return c


EVAL_CASES = {
    "checkpoint of another backbone": (lambda f, c: ["--model_path", str(c.good), "--model", "effnet_lite0"],
                                       ["--model effnet_lite0", TINY_MODEL, "drop --model"]),
    "checkpoint with another head": (lambda f, c: ["--model_path", str(c.good), "--head", "projection"],
                                     ["--head projection", "residual head", "drop --head"]),
    "missing checkpoint": (lambda f, c: ["--model_path", str(f.root / "none.pth")], ["none.pth", "not found"]),
    "truncated checkpoint": (lambda f, c: ["--model_path", str(c.truncated)], ["truncated.pth", "truncated"]),
    "text file as checkpoint": (lambda f, c: ["--model_path", str(c.text)],
                                ["notes.pth", "not a PyTorch checkpoint (Unsupported operand"]),
    "other PyTorch file": (lambda f, c: ["--model_path", str(c.other)], ["other.pth",
                                                                         "not a checkpoint of this suite"]),
    "pickle that runs code": (lambda f, c: ["--model_path", str(c.code)], ["code.pth", "refused", "could run code"]),
    "newer format version": (lambda f, c: ["--model_path", str(c.newer)], ["newer.pth", "newer", "update the suite"]),
    "neither checkpoint nor baseline": (lambda f, c: [], ["--model_path", "--baseline", "see --help"]),
    "threshold 0": (lambda f, c: ["--model_path", str(c.good), "--pos_threshold_m", "0"],
                    ["--pos_threshold_m 0: must be positive"]),
    "batch size 0": (lambda f, c: ["--model_path", str(c.good), "--extract_batch_size", "0"],
                     ["--extract_batch_size 0"]),
    "negative workers": (lambda f, c: ["--model_path", str(c.good), "--num_workers", "-1"], ["--num_workers -1"]),
    "queries far from the database": (lambda f, c: ["--baseline", "--model", TINY_MODEL, "--test_csv", str(f.val_far)],
                                      ["val_far/val.csv", "no query lies within"]),
    "JSON under a file": (lambda f, c: ["--model_path", str(c.good), "--output_json", str(f.regular_file / "r.json")],
                          ["--output_json", "r.json", "cannot write its folder"]),
    "predictions under a file": (lambda f, c: ["--model_path", str(c.good), "--save_predictions",
                                               str(f.regular_file / "p.csv")],
                                 ["--save_predictions", "p.csv", "cannot write its folder"]),
    "plots under a file": (lambda f, c: ["--model_path", str(c.good), "--visualize", "2", "--plot_dir",
                                         str(f.regular_file / "plots")], ["--plot_dir", "cannot write there"]),
    "unreadable query image": (lambda f, c: ["--model_path", str(c.good), "--test_csv", str(f.not_image)],
                               ["train_002.jpg", "cannot be read as an image"]),
}


@pytest.mark.parametrize("case", EVAL_CASES)
def test_eval_bad_input_is_one_line(files, checkpoints, capsys, tmp_path, case):
    make, words = EVAL_CASES[case]
    argv = ["--db_csv", str(files.train), "--test_csv", str(files.val), "--num_workers", "0", "--device", "cpu",
            "--cache_dir", str(files.root / "cache"), *make(files, checkpoints)]  # a flag given again wins
    code, err = run_main(capsys, eval_trained.main, argv)
    assert_one_line_error(code, err, *words)
    assert not checkpoints.marker.exists(), "the pickle's code ran"


def test_run_experiment_checks_every_model_before_the_first_runs(files, capsys, tmp_path):
    argv = ["--train_csv", str(files.train), "--val_csv", str(files.val), "--test_csv", str(files.val),
            "--models", TINY_MODEL, "dinov9", *TINY_OPTIONS, "--log_dir", str(tmp_path / "logs")]
    code, err = run_main(capsys, run_experiment.main, argv)
    assert_one_line_error(code, err, "--model dinov9", "unknown backbone")
    assert not (tmp_path / "logs").exists()


# --------------------------------------------------------------------------------------------
# real processes: exit code 2, one line, no traceback
# --------------------------------------------------------------------------------------------
# Each process pays torch's import (~5 s of CPU): two here, the command-line parser's error and
# run_experiment.py; test_train_vpr.py, test_eval_cli.py and test_analyze_metrics.py run the others.
SUBPROCESS_CASES = {
    "train_vpr.py unknown head": ("train_vpr.py", lambda f, out: train_argv(f, out, flags=["--head", "nosuchhead"]),
                                  ["--head", "'nosuchhead'"]),
    "run_experiment.py output under a file": ("run_experiment.py", lambda f, out: [
        "--train_csv", str(f.train), "--val_csv", str(f.val), "--test_csv", str(f.val), "--models", TINY_MODEL,
        "--checkpoint_dir", str(f.regular_file / "models"), "--log_dir", str(out / "logs")],
        ["--checkpoint_dir", "cannot write there"]),
}


@pytest.fixture(scope="module")
def subprocess_runs(files, tmp_path_factory) -> dict[str, tuple[int, str, str]]:
    out = tmp_path_factory.mktemp("processes")
    runs = run_processes_at_once({name: [script, *make(files, out / name.replace(" ", "_"))]
                                  for name, (script, make, _) in SUBPROCESS_CASES.items()})
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_real_process_exit_code_2_one_line_no_traceback(subprocess_runs, case):
    code, out, err = subprocess_runs[case]
    assert "Traceback" not in out
    assert_one_line_error(code, err, *SUBPROCESS_CASES[case][2])


# --------------------------------------------------------------------------------------------
# every script: a bad flag is one line and exit code 2 (CliParser), never argparse's usage text
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", ["train_vpr", "eval_trained", "run_experiment", "analyze_metrics", "tune_vpr",
                                    "demo_data", "make_poses", "localize"])
def test_every_script_answers_an_unknown_flag_in_one_line(capsys, script):
    import importlib

    module = importlib.import_module(script)
    # the flags each script requires, so that the unknown one is what argparse reports
    required = {"train_vpr": ["--train_csv", "t.csv", "--val_csv", "v.csv"],
                "eval_trained": ["--db_csv", "d.csv", "--test_csv", "q.csv", "--baseline"],
                "tune_vpr": ["--train_csv", "t.csv", "--val_csv", "v.csv"],
                "make_poses": ["photos", "--output", "p.csv"],
                "localize": ["--db_csv", "d.csv", "--query", "q", "--output", "m.csv"]}.get(script, [])
    code, err = run_main(capsys, module.main, [*required, "--no_such_flag"])
    assert_one_line_error(code, err, "--no_such_flag")
