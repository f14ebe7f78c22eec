"""--pooling auto (training only): every pooling (backbone, gem, vlad at --feature_layer) is
extracted and given its best frozen start on validation, as --head_start would; the run then is
a run of the chosen, concrete pooling. The tiny random CNN on synthetic photos: seconds per run."""
from __future__ import annotations

import dataclasses
import json
import math

import pandas as pd
import pytest
import torch

import eval_trained
import export_model
import localize
import run_experiment
import train_vpr
from trainable_vpr import training
from trainable_vpr.runs import resolved_pooling
import trainable_vpr as vpr
from trainable_vpr.data import extract_training_data, load_splits
from vprkit.cli import VPRError
from vprkit.retrieval.evaluation import evaluate_retrieval
from helpers import TINY, TINY_MODEL, TINY_OPTIONS, assert_one_line_error, run_main, write_train_val

LAYER = "-2"  # the tiny CNN's second-to-last stage: on this data vlad's start beats the backbone's (0.333 vs 0.167)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_train_val(tmp_path_factory.mktemp("pooling_auto"), seed=1)  # a namespace: root, train, val


def flags(data, *extra: str) -> list[str]:
    return ["--train_csv", str(data.train), "--val_csv", str(data.val), *TINY, "--cache_dir", str(data.root / "cache"),
            "--batch_size", "8", "--projection_dim", "8", "--hidden_dim", "16", "--vlad_clusters", "4",
            "--feature_layer", LAYER, "--log_dir", str(data.root / "logs"),
            "--checkpoint_dir", str(data.root / "models"), *extra]


@pytest.fixture(scope="module")
def run(data):
    """One --pooling auto run of two epochs (shared by the tests below)."""
    return train_vpr.main(flags(data, "--pooling", "auto", "--epochs", "2"))


def frozen_start_r1(data, pooling: str) -> tuple[float, str]:
    """The best frozen start of one pooling on val R@1, computed here: the pooling's features,
    choose_start over raw / PCA / learned whitening, each head scored with evaluate_retrieval
    (val queries against the training images)."""
    config = train_vpr.parse_args(flags(data, "--pooling", pooling,
                                        *(["--feature_layer", "-1"] if pooling == "backbone" else [])))
    train, val, by_label, val_db = load_splits(config)
    split = extract_training_data(config, train, val, by_label, None, val_db)
    fit = vpr.FitData(split.train.features, split.train.xyz, None, split.train.features, split.train.xyz, None,
                      split.val.features, split.val.xyz, None, config.pos_threshold_m)

    def score(head: torch.nn.Module) -> float:
        db, q = vpr.embed(head, split.train.features), vpr.embed(head, split.val.features)
        return evaluate_retrieval(db, split.train.xyz, q, split.val.xyz, config.pos_threshold_m).recalls[1]

    torch.manual_seed(config.seed)
    head_config = vpr.HeadConfig("residual", split.train.features.shape[1], 8, 16, 0.1, True, True)
    choice = vpr.choose_start("auto", head_config, fit, score, config.seed)
    return choice.chosen.val_r1, choice.chosen.name


def test_auto_chooses_the_pooling_with_the_best_frozen_start_and_records_it_concretely(data, run):
    scores = {pooling: frozen_start_r1(data, pooling) for pooling in vpr.POOLING_CANDIDATES}
    best = max(vpr.POOLING_CANDIDATES, key=lambda p: (scores[p][0], -vpr.POOLING_CANDIDATES.index(p)))
    assert best == "vlad" and scores["vlad"][0] > scores["backbone"][0]  # the data was chosen so: not the default
    record = run.head_start["pooling"]
    assert record["chosen"] == best
    for pooling, (r1, start) in scores.items():
        assert record["val_r1"][pooling] == pytest.approx(r1)
        assert record["starts"][pooling] == start
    # the checkpoint, its backbone identity, the log's data row and the summary: the concrete pooling
    saved = vpr.load_checkpoint(run.checkpoint)
    assert saved["config"]["pooling"] == "vlad" and saved["config"]["feature_layer"] == int(LAYER)
    assert saved["backbone"]["pooling"].startswith("vlad-k4-")
    assert saved["vlad_vocabulary"].shape[0] == 4  # --vlad_clusters: the vocabulary the run pooled with
    assert saved["head_start"]["pooling"]["chosen"] == "vlad"
    log = pd.read_csv(run.log_file)
    cell = log.loc[log["event"] == "data", "head_start"].iloc[0]
    assert "; pooling vlad; " in cell and f"vlad={scores['vlad'][0]:.4f}" in cell
    summary = pd.read_csv(data.root / "logs" / "training_summary.csv")
    row = summary[summary["run_id"] == run.run_id].iloc[0]
    assert row["pooling"] == "vlad" and "pooling vlad" in row["head_start"]


def test_epoch_zero_is_the_chosen_candidates_score(run):
    chosen = run.head_start["pooling"]["chosen"]
    assert run.untrained_r1 == pytest.approx(run.head_start["pooling"]["val_r1"][chosen])
    assert run.untrained_r1 == pytest.approx(run.head_start["val_r1"][run.head_start["chosen"]])


def test_the_auto_run_trains_and_eval_trained_applies_its_checkpoint(data, run):
    assert run.epochs_run == 2 and not math.isnan(run.best_recall[1])
    report = eval_trained.main(["--model_path", str(run.checkpoint), "--db_csv", str(data.train),
                                "--test_csv", str(data.val), "--device", "cpu", "--num_workers", "0",
                                "--cache_dir", str(data.root / "cache")])
    assert report.result.recalls[1] == pytest.approx(run.best_recall[1])


def test_the_second_extraction_of_the_chosen_pooling_is_read_from_the_cache(data, run, capsys):
    capsys.readouterr()
    config, choice = resolved_pooling(train_vpr.parse_args(flags(data, "--pooling", "auto")))
    out = capsys.readouterr().out
    assert config.pooling == "vlad" and config.feature_layer == int(LAYER) and choice.chosen == "vlad"
    assert "extracting 0" in out and "from cache, extracting" in out
    assert all(line.endswith("extracting 0") for line in out.splitlines() if line.startswith("features ["))
    line = [line for line in out.splitlines() if line.startswith("pooling auto: backbone ")]
    assert line and line[0].endswith("-> vlad") and f"gem L{LAYER} " in line[0] and f"vlad L{LAYER} K4 " in line[0]
    concrete, none = resolved_pooling(config)  # any other --pooling: as is
    assert concrete is config and none is None


def _start(name: str, r1: float) -> vpr.StartChoice:
    head = vpr.HeadStart(name, torch.nn.Identity(), vpr.HeadConfig("residual", 4, 4, 4, 0.0, True, True), name, r1)
    return vpr.StartChoice(head, {name: head})


def test_choose_pooling_ties_go_to_the_earlier_and_a_failing_candidate_is_skipped(data):
    config = train_vpr.parse_args(flags(data, "--pooling", "auto"))
    scores = {"backbone": 0.5, "gem": 0.5, "vlad": 0.4}
    assert vpr.choose_pooling(config, lambda c: _start("raw", scores[c.pooling])).chosen == "backbone"
    seen = []

    def start_of(candidate):
        seen.append((candidate.pooling, candidate.feature_layer))
        if candidate.pooling == "backbone":
            raise VPRError("no backbone today")
        return _start("raw", {"gem": 0.3, "vlad": 0.6}[candidate.pooling])

    choice = vpr.choose_pooling(config, start_of)
    assert seen == [("backbone", -1), ("gem", int(LAYER)), ("vlad", int(LAYER))]
    assert choice.chosen == "vlad" and choice.record()["failed"] == {"backbone": "no backbone today"}
    assert "backbone skipped (no backbone today)" in choice.text()
    with pytest.raises(VPRError, match="first"):
        vpr.choose_pooling(config, lambda c: (_ for _ in ()).throw(VPRError("first" if c.pooling == "backbone"
                                                                            else "later")))


@pytest.mark.parametrize("extra, word", [(["--head", "netvlad"], "--head netvlad"),
                                          (["--head", "mlp"], "--head mlp"),
                                          (["--train_blocks", "1"], "--train_blocks 1")])
def test_auto_with_what_it_cannot_compare_is_a_one_line_error(data, capsys, extra, word):
    code, err = run_main(capsys, train_vpr.main, flags(data, "--pooling", "auto", *extra))
    assert_one_line_error(code, err, "--pooling auto", word, "--pooling backbone, gem or vlad")


def test_auto_with_parquets_or_resume_is_refused_by_validate(data):
    base = vpr.TrainConfig(train_csv=str(data.train), val_csv=str(data.val), pooling="auto", weights="random")
    base.validate()  # images, residual head: fine
    for changes, word in (({"train_csv": "t.parquet", "val_csv": "v.parquet"}, "embeddings parquets"),
                          ({"resume": "run_last.pth"}, "--resume")):
        with pytest.raises(VPRError, match=word):
            dataclasses.replace(base, **changes).validate()
    with pytest.raises(VPRError, match="--vlad_clusters"):  # the candidates' flags are checked as vlad's
        dataclasses.replace(base, vlad_clusters=0).validate()


def test_auto_is_for_training_only(data, capsys):
    """run_experiment and tune take it (a TrainConfig); the scripts that apply a model need a concrete one."""
    args = run_experiment.parse_args(["--train_csv", str(data.train), "--val_csv", str(data.val), "--test_csv",
                                      str(data.val), "--pooling", "auto", "--weights", "random"])
    assert args.train_config("effnet_lite0").pooling == "auto"
    for main, argv in ((eval_trained.main, ["--test_csv", str(data.val), "--baseline", *TINY]),
                       (localize.main, ["--query", str(data.val), "--db_csv", str(data.train), "--output", "m.csv",
                                        "--baseline", *TINY]),
                       (export_model.main, ["--output", "m.pt2", "--baseline", *TINY])):
        code, err = run_main(capsys, main, [*argv, "--pooling", "auto"])
        assert_one_line_error(code, err, "--pooling", "auto")


def test_run_experiment_resolves_auto_before_its_rows(data, tmp_path):
    """run_experiment's frozen rows (raw, pca_whitened, vlad) describe the chosen pooling; its JSON
    keeps every candidate's score."""
    table = run_experiment.main(["--train_csv", str(data.train), "--val_csv", str(data.val), "--test_csv",
                                 str(data.val), "--models", TINY_MODEL, *TINY_OPTIONS, "--cache_dir",
                                 str(data.root / "cache"), "--log_dir", str(tmp_path / "logs"), "--checkpoint_dir",
                                 str(tmp_path / "models"), "--epochs", "1", "--batch_size", "8", "--projection_dim",
                                 "8", "--hidden_dim", "16", "--vlad_clusters", "4", "--feature_layer", LAYER,
                                 "--pooling", "auto"])
    rows = table.set_index("variant")["recall@1"]
    assert rows["vlad"] == rows["raw"]  # the run's raw descriptor is the chosen vlad
    [record] = (tmp_path / "logs").glob("experiment_*.json")
    start = json.loads(record.read_text())["models"][TINY_MODEL]["head_start"]
    assert start["pooling"]["chosen"] == "vlad" and set(start["pooling"]["val_r1"]) == set(vpr.POOLING_CANDIDATES)
    assert rows["start"] == pytest.approx(start["pooling"]["val_r1"]["vlad"], abs=1e-4)  # test = val, db = train
    assert pd.read_csv(tmp_path / "logs" / "training_summary.csv")["pooling"].tolist() == ["vlad"]


def test_an_auto_run_trains_exactly_the_explicit_run_of_its_pooling(data, tmp_path):
    """train() goes on from the comparison's data, start and RNG state: the same epochs as --pooling vlad."""
    runs = [training.train(train_vpr.parse_args(flags(data, "--pooling", pooling, "--epochs", "3",
                                                       "--checkpoint_dir", str(tmp_path / pooling))))
            for pooling in ("auto", "vlad")]
    losses = [tuple(pd.read_csv(r.log_file).query("event == 'epoch'").avg_train_loss) for r in runs]
    assert losses[0] == losses[1] and runs[0].best_recall == runs[1].best_recall
    heads = [vpr.load_checkpoint(r.checkpoint)["model_state_dict"] for r in runs]
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[1])
