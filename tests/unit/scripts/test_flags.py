"""One parser home: every script's flags come from config dataclasses, each flag declared once
with one meaning; renamed flags keep their old forms with a one-line deprecation warning; the
flag reference (docs/flags.md) is generated and must not drift."""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import subprocess
import sys

import pytest

import analyze_metrics
import eval_trained
import localize
import run_experiment
import train_vpr
import trainable_vpr as vpr
import tune_vpr
from vprkit.cli import configs
from vprkit.cli import VPRError
from vprkit.cli.extraction_settings import ExtractionSettings, extraction_settings

from helpers import REPO
SCRIPTS = ("train_vpr", "eval_trained", "run_experiment", "tune_vpr", "localize", "analyze_metrics", "make_poses",
           "demo_data")
TRAIN = ["--train_csv", "t.csv", "--val_csv", "v.csv"]
EVAL = ["--test_csv", "q.csv", "--baseline", "--model", "effnet_lite0"]


def _warnings(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------
# one flag, one meaning
# --------------------------------------------------------------------------------------------
def _declaring_class(cls: type, name: str) -> type:
    """The class whose body declares field `name` (the most basic one along the MRO)."""
    return next(base for base in reversed(cls.__mro__) if name in inspect.get_annotations(base))


# Two scripts' own files, named alike but not one setting: make_poses writes a poses CSV, localize
# its matches; demo_data's seed draws the synthetic street, training's the batches.
SAME_NAME_OTHER_FILE = {"output", "seed"}


def test_every_flag_is_declared_once_across_the_script_configs():
    classes = [vpr.TrainConfig, vpr.EvalConfig, vpr.LocalizeConfig, vpr.ExperimentConfig, vpr.TuneConfig,
               configs.AnalyzeConfig, configs.MakePosesConfig, configs.DemoDataConfig]
    homes: dict[str, set[type]] = {}
    for cls in classes:
        for f in dataclasses.fields(cls):
            if "help" in f.metadata:
                homes.setdefault(f.name, set()).add(_declaring_class(cls, f.name))
    twice = {name: sorted(c.__name__ for c in where) for name, where in homes.items()
             if len(where) > 1 and name not in SAME_NAME_OTHER_FILE}
    assert not twice, twice
    for name in ("model_path", "baseline", "model", "pos_threshold_m", "recall_at", "test_csv", "db_csv",
                 "study_name", "plot_dir", "supervision"):
        assert len(homes[name]) == 1, name


def test_an_option_string_means_one_setting_in_every_script():
    """The same option string never names two different settings across the scripts (deprecated
    forms aside, which name their new flag)."""
    from vprkit.cli.settings import DeprecatedFlag

    seen: dict[str, str] = {}
    for name in SCRIPTS:
        for action in importlib.import_module(name).build_parser()._actions:
            if isinstance(action, DeprecatedFlag):
                continue
            for option in action.option_strings:
                if option in ("--output", "--seed"):  # SAME_NAME_OTHER_FILE
                    continue
                # run_experiment: --model NAME = --models NAME
                dest = "model" if action.dest == "models" else action.dest
                assert seen.setdefault(option, dest) == dest, (name, option)


def test_the_25_m_default_is_one_constant():
    assert configs.DEFAULT_POS_THRESHOLD_M == 25.0
    assert vpr.TrainConfig(train_csv="a", val_csv="b").pos_threshold_m == configs.DEFAULT_POS_THRESHOLD_M
    for path in [*REPO.glob("*.py"), *REPO.glob("vprkit/*.py"), *REPO.glob("trainable_vpr/*.py")]:
        text = path.read_text()
        assert "pos_threshold_m or 25" not in text and '"pos_threshold_m", 25' not in text, path


def test_training_batch_and_extraction_batch_are_separate_flags():
    config = train_vpr.parse_args([*TRAIN, "--batch_size", "16", "--extract_batch_size", "4"])
    assert (config.batch_size, extraction_settings(config).extract_batch_size) == (16, 4)
    config = train_vpr.parse_args([*TRAIN, "--batch_size", "64"])
    assert extraction_settings(config).extract_batch_size == ExtractionSettings().extract_batch_size  # not tied
    args = eval_trained.parse_args(["--db_csv", "d.csv", *EVAL, "--extract_batch_size", "7"])
    assert args.extract_batch_size == 7 and not hasattr(args, "batch_size")


def test_db_csv_is_the_searched_database_in_every_script():
    assert eval_trained.parse_args(["--db_csv", "d.csv", *EVAL]).db_csv == "d.csv"
    assert localize.parse_args(["--baseline", "--model", "effnet_lite0", "--db_csv", "d.csv", "--query", "q",
                                "--output", "m.csv"]).db_csv == "d.csv"
    experiment = run_experiment.parse_args([*TRAIN, "--test_csv", "q.csv", "--db_csv", "d.csv", "--models",
                                            "effnet_lite0"])
    assert (experiment.db_csv, experiment.train_csv) == ("d.csv", "t.csv")


def test_scripts_hand_typed_configs_to_the_library():
    assert isinstance(eval_trained.parse_args(["--db_csv", "d.csv", *EVAL]), vpr.EvalConfig)
    assert isinstance(run_experiment.parse_args([*TRAIN, "--test_csv", "q.csv", "--models", "effnet_lite0"]),
                      vpr.ExperimentConfig)
    assert isinstance(analyze_metrics.parse_args(["logs"]), configs.AnalyzeConfig)
    config, options = tune_vpr.parse_args(TRAIN)
    assert isinstance(config, vpr.TrainConfig) and options.study_name == "vpr_tune"


def test_each_config_checks_itself():
    with pytest.raises(VPRError, match="--recall_at"):
        vpr.EvalConfig(db_csv="d.csv", test_csv="q.csv", baseline=True, model="effnet_lite0", recall_at=[0]).validate()
    with pytest.raises(VPRError, match="--top_k 0"):
        vpr.LocalizeConfig(db_csv="d.csv", query="q", output="m.csv", baseline=True, model="m", top_k=0).validate()
    with pytest.raises(VPRError, match="--smooth 0"):
        configs.AnalyzeConfig(path="logs", smooth=0).validate()
    with pytest.raises(VPRError, match="either --model_path"):
        vpr.EvalConfig(db_csv="d.csv", test_csv="q.csv").validate()


# --------------------------------------------------------------------------------------------
# old forms keep working, with one warning line naming the new flag
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script, argv, attribute, value, new", [
    ("train_vpr", [*TRAIN, "--output_dir", "ckpts"], "checkpoint_dir", "ckpts", "--checkpoint_dir"),
    ("eval_trained", ["--train_csv", "d.csv", *EVAL], "db_csv", "d.csv", "--db_csv"),
    ("eval_trained", ["--db_csv", "d.csv", *EVAL, "--batch_size", "8"], "extract_batch_size", 8,
     "--extract_batch_size"),
    ("eval_trained", ["--db_csv", "d.csv", *EVAL, "--plots_dir", "pics"], "plot_dir", "pics", "--plot_dir"),
    ("localize", ["--baseline", "--model", "m", "--train_csv", "d.csv", "--query", "q", "--output", "m.csv"],
     "db_csv", "d.csv", "--db_csv"),
    ("analyze_metrics", ["logs", "--output_dir", "figs"], "plot_dir", "figs", "--plot_dir"),
])
def test_an_old_flag_still_works_with_one_warning_line(capsys, script, argv, attribute, value, new):
    args = importlib.import_module(script).parse_args(argv)
    assert getattr(args, attribute) == value
    lines = _warnings(capsys)
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "deprecated" in lines[0] and new in lines[0], lines


def test_the_new_flags_print_no_warning(capsys):
    train_vpr.parse_args([*TRAIN, "--checkpoint_dir", "c", "--extract_batch_size", "8"])
    eval_trained.parse_args(["--db_csv", "d.csv", *EVAL, "--plot_dir", "p"])
    assert _warnings(capsys) == []


def _toml(tmp_path, text: str) -> str:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return str(path)


def test_old_toml_keys_keep_working_with_a_warning(tmp_path, capsys):
    path = _toml(tmp_path, '[system]\noutput_dir = "old_models"\n')
    assert train_vpr.parse_args(["--config", path, *TRAIN]).checkpoint_dir == "old_models"
    lines = _warnings(capsys)
    assert len(lines) == 1 and "output_dir is deprecated" in lines[0] and "checkpoint_dir" in lines[0], lines

    # an evaluation's old extraction batch ([system] batch_size); training's [training] batch_size is skipped
    path = _toml(tmp_path, '[system]\nbatch_size = 8\n[training]\nbatch_size = 64\nepochs = 2\n')
    assert eval_trained.parse_args(["--config", path, "--db_csv", "d.csv", *EVAL]).extract_batch_size == 8
    lines = _warnings(capsys)
    assert len(lines) == 1 and "extract_batch_size" in lines[0], lines
    path = _toml(tmp_path, '[training]\nbatch_size = 64\n')
    config = train_vpr.parse_args(["--config", path, *TRAIN])
    assert (config.batch_size, config.extract_batch_size) == (64, 32) and _warnings(capsys) == []

    # a key in the section it used to sit in: read, with a warning naming the new section
    path = _toml(tmp_path, '[experiment]\nrecall_at = [1, 3]\ntest_csv = "q.csv"\n')
    assert run_experiment.parse_args(["--config", path, *TRAIN, "--models", "effnet_lite0"]).recall_at == [1, 3]
    lines = _warnings(capsys)
    assert len(lines) == 2 and all("deprecated" in line for line in lines), lines


def test_the_example_config_toml_is_read_by_training_and_evaluation(capsys):
    """config.toml (train_vpr's keys, aliases such as output_dim included) is readable by eval_trained,
    which skips the training keys and reads its old train_csv as the database, with one warning."""
    config = train_vpr.parse_args(["--config", str(REPO / "config.toml")])
    assert config.checkpoint_dir == "trained_models" and config.projection_dim == 256
    assert _warnings(capsys) == []
    args = eval_trained.parse_args(["--config", str(REPO / "config.toml"), "--test_csv", "q.csv", "--baseline"])
    assert args.db_csv.endswith("train.csv") and args.model == "effnet_lite0"
    assert len(_warnings(capsys)) == 1


def test_a_new_key_in_a_wrong_section_is_still_an_error(tmp_path):
    path = _toml(tmp_path, '[training]\ncheckpoint_dir = "x"\n')
    with pytest.raises(VPRError, match=r"\[system\]"):
        train_vpr.parse_args(["--config", path, *TRAIN])


def test_old_environment_variable_keeps_working_with_a_warning(monkeypatch, capsys):
    monkeypatch.setenv("VPR_OUTPUT_DIR", "env_models")
    assert train_vpr.parse_args(TRAIN).checkpoint_dir == "env_models"
    lines = _warnings(capsys)
    assert len(lines) == 1 and "VPR_OUTPUT_DIR is deprecated" in lines[0] and "VPR_CHECKPOINT_DIR" in lines[0]
    monkeypatch.setenv("VPR_CHECKPOINT_DIR", "new_models")  # the new name wins
    assert train_vpr.parse_args(TRAIN).checkpoint_dir == "new_models"


def test_a_required_flag_is_satisfied_by_its_old_form_and_missing_without_either():
    assert eval_trained.parse_args(["--train_parquet", "d.parquet", "--test_csv", "q.csv", "--baseline"]).db_csv \
        == "d.parquet"
    with pytest.raises(VPRError, match="required: --db_csv"):
        eval_trained.parse_args(EVAL)


def test_resume_reads_a_checkpoint_config_written_before_the_rename():
    saved = dataclasses.asdict(vpr.TrainConfig(train_csv="a", val_csv="b"))
    saved["output_dir"] = saved.pop("checkpoint_dir").replace("trained_models", "old_folder")
    saved.pop("extract_batch_size")
    config = vpr.TrainConfig.from_saved(saved)
    assert config.checkpoint_dir == "old_folder" and config.extract_batch_size == 32


# --------------------------------------------------------------------------------------------
# the generated flag reference
# --------------------------------------------------------------------------------------------
def test_docs_flags_md_is_what_the_generator_writes():
    sys.path.insert(0, str(REPO / "scripts"))
    import flag_reference

    committed = (REPO / "docs" / "flags.md").read_text()
    assert committed == flag_reference.render(), "docs/flags.md is out of date: run python scripts/flag_reference.py"
    for name in SCRIPTS:
        assert f"## {name}.py" in committed
    assert "`--extract_batch_size`" in committed and "`--checkpoint_dir`" in committed


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_works_for_every_script(script):
    done = subprocess.run([sys.executable, f"{script}.py", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr
    assert "--debug" in done.stdout
