"""tune_vpr.py: the search space from the config file, exact trial shares, and two worker
processes on one SQLite study that run every trial once (none lost, none duplicated)."""
from __future__ import annotations

import json

import pytest

from helpers import write_embeddings_parquet
from vprkit.cli import VPRError
import tune_vpr

optuna = pytest.importorskip("optuna")


def _config_file(tmp_path, space: str):
    path = tmp_path / "config.toml"
    path.write_text(f"[training]\nepochs = 2\nbatch_size = 8\n\n[tune.space]\n{space}")
    return path


def test_search_space_from_the_config_file(tmp_path):
    path = _config_file(tmp_path,
                        'lr = { low = 1e-4, high = 1e-2, log = true }\nhead = { choices = ["mlp", "projection"] }\n'
                                  "hidden_dim = { low = 16, high = 64, step = 16 }\n")
    space = {d.name: d for d in tune_vpr.search_space(str(path))}
    assert space["lr"] == tune_vpr.Dimension("lr", 1e-4, 1e-2, True)
    assert space["head"].choices == ("mlp", "projection")
    trial = optuna.trial.FixedTrial({"lr": 1e-3, "head": "mlp", "hidden_dim": 32})
    values = tune_vpr.suggest(trial, list(space.values()))
    assert values == {"lr": 1e-3, "head": "mlp", "hidden_dim": 32} and isinstance(values["hidden_dim"], int)
    assert [d.name for d in tune_vpr.search_space(None)] == list(tune_vpr.DEFAULT_SPACE)


@pytest.mark.parametrize("space, message", [
    ("learning_rate = { low = 1, high = 2 }\n", "learning_rate: not a training flag"),
    ("lr = { low = 2, high = 1 }\n", "lr: low must be below high"),
    ("lr = { min = 1, max = 2 }\n", r"lr: give \{ low"),
])
def test_bad_search_space_is_one_line(tmp_path, space, message):
    with pytest.raises(VPRError, match=message):
        tune_vpr.search_space(str(_config_file(tmp_path, space)))


def test_worker_shares_are_exact():
    assert tune_vpr.worker_shares(5, 2) == [3, 2]
    assert tune_vpr.worker_shares(1, 3) == [1]
    assert sum(tune_vpr.worker_shares(17, 4)) == 17


@pytest.mark.slow
def test_two_workers_share_one_sqlite_study(tmp_path):
    train = write_embeddings_parquet(tmp_path / "train.parquet", n_places=6, per_place=4, seed=1)
    val = write_embeddings_parquet(tmp_path / "val.parquet", n_places=6, per_place=2, seed=2)
    config = _config_file(tmp_path,
                          'lr = { low = 1e-4, high = 1e-2, log = true }\nhead = { choices = ["mlp", "projection"] }\n')
    logs = tmp_path / "logs"
    summary = tune_vpr.main(["--config", str(config), "--train_parquet", str(train), "--val_parquet", str(val),
                             "--model", "emb", "--log_dir", str(logs), "--study_name", "tiny", "--n_trials", "4",
                             "--n_jobs", "2"])
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{logs / 'tiny.db'}")
    trials = study.get_trials()
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]  # none lost, none duplicated
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    assert summary["trials"] == 4 and sum(summary["states"].values()) == 4
    # each trial trained once, logging under logs/: one run log per trial directory
    for t in trials:
        run_logs = [p for p in (logs / f"tiny_trial{t.number:04d}").glob("*.csv") if p.name != "training_summary.csv"]
        assert len(run_logs) == 1, t.number
    saved = json.loads((logs / "tiny_best.json").read_text())
    assert saved["best_params"] == study.best_params and saved["best_value"] == study.best_value


def test_missing_optuna_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "optuna", None)  # import optuna -> ImportError
    with pytest.raises(VPRError, match=r"tune_vpr.py needs Optuna: pip install optuna"):
        tune_vpr.require_optuna()


def _tune(tmp_path, space: str, *extra: str) -> dict:
    train = write_embeddings_parquet(tmp_path / "train.parquet", n_places=8, per_place=4, dim=16, seed=1)
    val = write_embeddings_parquet(tmp_path / "val.parquet", n_places=8, per_place=2, dim=16, seed=2)
    return tune_vpr.main(["--config", str(_config_file(tmp_path, space)), "--train_parquet", str(train),
                          "--val_parquet", str(val), "--model", "emb", "--log_dir", str(tmp_path / "logs"),
                          "--study_name", "s", "--n_trials", "2", "--head", "residual", "--projection_dim", "8",
                          "--hidden_dim", "16", *extra])


def test_trials_that_never_beat_the_untrained_head_are_scored_and_said_so(tmp_path, capsys):
    """lr ~1e-12: no trial can change the head, so every trial's value is the untrained R@1 and
    the summary says that no trial improved on it (epoch 0 does not count as a tuning result)."""
    summary = _tune(tmp_path, "lr = { low = 1e-12, high = 2e-12 }\n")
    assert summary["states"] == {"COMPLETE": 2}
    assert summary["best_value"] == pytest.approx(summary["best_untrained_r1"])
    assert summary["improved_on_untrained_head"] is False and summary["trials_improved_on_untrained_head"] == 0
    assert summary["verdict"].startswith("no trial improved on the untrained head")
    saved = json.loads((tmp_path / "logs" / "s_best.json").read_text())
    assert saved["improved_on_untrained_head"] is False and "no trial improved" in saved["verdict"]
    out = capsys.readouterr().out
    assert "no trial improved on the untrained head" in out
    assert out.count("no epoch beat the untrained head") == 2  # train_vpr's line, once per trial
    assert "val: 16 queries, 0 without a positive" in out


def test_trial_score_counts_trained_epochs_only():
    assert tune_vpr.trial_score([0.5, 0.625], 0.75) == 0.625  # epoch 0's 0.75 is not the trial's value
    assert tune_vpr.trial_score([0.5, 0.875], 0.75) == 0.875
    assert tune_vpr.trial_score([], 0.75) == 0.75
    trial = optuna.trial.FixedTrial({})
    tune_vpr.trial_score([0.75], 0.75, trial)
    assert trial.user_attrs["improved_on_untrained_head"] is False
    tune_vpr.trial_score([0.8], 0.75, trial)
    assert trial.user_attrs["improved_on_untrained_head"] is True
