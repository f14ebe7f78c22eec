"""The route flags (vprkit.cli.configs.RouteSettings): one group in every script that describes
images, parsed from every layer, each bad value a one-line error."""
from __future__ import annotations

import pytest

import eval_trained
import export_model
import localize
import run_experiment
import train_vpr
import tune_vpr
from helpers import assert_one_line_error, run_main
from vprkit.cli.configs import RouteSettings

TRAIN = ["--train_csv", "t.csv", "--val_csv", "v.csv"]
EVAL = ["--db_csv", "d.csv", "--test_csv", "q.csv", "--baseline", "--model", "effnet_lite0"]


@pytest.mark.parametrize("script", [train_vpr, eval_trained, run_experiment, localize, tune_vpr, export_model])
def test_every_script_that_describes_images_takes_the_route_flags(script):
    names = {action.dest for action in script.build_parser()._actions}
    assert {"seq_len", "seq_velocity", "seq_max_gap", "seq_shortlist"} <= names


def test_route_flags_parse_into_the_matching_settings(monkeypatch):
    monkeypatch.setenv("VPR_SEQ_SHORTLIST", "20")
    config = eval_trained.parse_args([*EVAL, "--seq_len", "10", "--seq_velocity", "0.5", "2", "--seq_max_gap", "3"])
    assert (config.seq_len, config.seq_velocity, config.seq_max_gap, config.seq_shortlist) == (10, [0.5, 2.0], 3.0, 20)
    match = config.seq_match_config()
    assert (match.seq_len, match.v_min, match.v_max, match.shortlist) == (10, 0.5, 2.0, 20)
    assert config.sequences
    defaults = RouteSettings()
    assert (defaults.seq_len, defaults.seq_velocity, defaults.seq_max_gap, defaults.seq_shortlist) == \
        (1, [0.8, 1.25], None, 50)
    assert not defaults.sequences


@pytest.mark.parametrize("argv, words", [
    (["--seq_len", "0"], ("--seq_len 0", "at least 1")),
    (["--seq_velocity", "1.2", "0.9"], ("--seq_velocity 1.2 0.9", "MIN <= MAX")),
    (["--seq_velocity", "0", "1"], ("--seq_velocity 0 1",)),
    (["--seq_velocity", "1"], ("--seq_velocity", "2 arguments")),
    (["--seq_max_gap", "0"], ("--seq_max_gap 0", "positive")),
    (["--seq_shortlist", "0"], ("--seq_shortlist 0", "at least 1")),
])
def test_bad_route_flags_are_one_line_errors(capsys, argv, words):
    code, err = run_main(capsys, eval_trained.main, [*EVAL, *argv])
    assert_one_line_error(code, err, *words)
    code, err = run_main(capsys, train_vpr.main, [*TRAIN, *argv])
    assert_one_line_error(code, err, *words)


def test_a_toml_velocity_of_three_numbers_is_one_line(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text("[routes]\nseq_velocity = [0.8, 1.0, 1.25]\n")
    code, err = run_main(capsys, eval_trained.main, [*EVAL, "--config", str(config)])
    assert_one_line_error(code, err, "--seq_velocity 0.8 1 1.25", "two numbers")
