#!/usr/bin/env python3
"""Hyperparameter search over train_vpr.py's flags with Optuna (optional dependency).

    python tune_vpr.py --config config.toml --n_trials 20 --n_jobs 2
    python tune_vpr.py --train_parquet emb/train.parquet --val_parquet emb/val.parquet \\
        --storage postgresql://user@dbhost/vpr --study_name campus --n_trials 5   # one of many workers

Every training flag (and --config, VPR_* variables) sets the base configuration; the search
space is the [tune.space] section of the config file, one entry per flag:
`lr = { low = 1e-5, high = 1e-3, log = true }`, `hidden_dim = { choices = [256, 512] }`.
Trials maximise what training added: the best validation Recall@1 over the trained epochs
(1 and later; epoch 0, the untrained head, is the same for every trial and does not count), and
are pruned on the per-epoch validation R@1 (median pruner). A trial that never beats its
untrained head is marked so, and when no trial did, the summary says so plainly. The study lives
in --storage (a SQLite file by default; any database Optuna supports lets workers on many
machines share it, see scripts/tune_slurm.sh). --n_jobs local worker processes share --n_trials
exactly. Each trial logs under {log_dir}/{study}_trial{N}/;
the best parameters are printed and written to {log_dir}/{study}_best.json.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from trainable_vpr.sequence_run import train_head
import trainable_vpr as vpr
from vprkit.cli import CliParser, VPRError, atomic_write, check_writable_dir, run_cli
from vprkit.retrieval.evaluation import RecallResult
from vprkit.logs.runlog import safe_name
from vprkit.cli.settings import config_parser, parse_config

# Used when the config file has no [tune.space]: the settings that matter most on small routes.
DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    "lr": {"low": 1e-5, "high": 1e-3, "log": True},
    "triplet_margin": {"low": 0.1, "high": 1.0},
    "hard_neg_ratio": {"low": 0.0, "high": 1.0},
    "dropout": {"low": 0.0, "high": 0.3},
}


@dataclass(frozen=True)
class Dimension:
    """One searched flag: a range (low, high, log, step) or a list of choices."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple | None = None


@dataclass(frozen=True)
class TuneOptions:
    storage: str
    study_name: str
    n_trials: int
    n_jobs: int
    config_file: str | None
    sampler_seed: int


def build_parser() -> CliParser:
    return config_parser(vpr.TuneConfig, __doc__.split("\n\n")[0])


def parse_args(argv: Sequence[str] | None) -> tuple[vpr.TrainConfig, TuneOptions]:
    tune = parse_config(build_parser(), vpr.TuneConfig, argv)
    config = tune.train_config()
    storage = tune.storage or f"sqlite:///{Path(config.log_dir).resolve() / safe_name(tune.study_name)}.db"
    sampler_seed = config.seed if tune.sampler_seed is None else tune.sampler_seed
    return config, TuneOptions(storage, tune.study_name, tune.n_trials, tune.n_jobs, tune.config, sampler_seed)


def require_optuna():
    try:
        import optuna
    except ImportError:
        raise VPRError("tune_vpr.py needs Optuna: pip install optuna (it is in requirements-dev.txt)") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def search_space(config_file: str | None) -> list[Dimension]:
    """The [tune.space] of the config file (default: DEFAULT_SPACE), checked against the flags."""
    import tomllib

    table = tomllib.loads(Path(config_file).read_text()).get("tune", {}).get("space") if config_file else None
    fields = {f.name: f for f in dataclasses.fields(vpr.TrainConfig)}
    dimensions = []
    for name, spec in (table or DEFAULT_SPACE).items():
        where = f"{config_file} [tune.space] {name}"
        if name not in fields:
            raise VPRError(f"{where}: not a training flag; see train_vpr.py --help")
        if not isinstance(spec, dict) or not ({"choices"} <= set(spec) or {"low", "high"} <= set(spec)):
            raise VPRError(f"{where}: give {{ low = .., high = .. }} (optional log, step) or {{ choices = [..] }}")
        unknown = set(spec) - {"low", "high", "log", "step", "choices"}
        if unknown:
            raise VPRError(f"{where}: unknown key {sorted(unknown)[0]}; use low, high, log, step or choices")
        if "choices" not in spec and not spec["low"] < spec["high"]:
            raise VPRError(f"{where}: low must be below high")
        dimensions.append(Dimension(name, spec.get("low"), spec.get("high"), bool(spec.get("log", False)),
                                    spec.get("step"), tuple(spec["choices"]) if "choices" in spec else None))
    return dimensions


def suggest(trial, dimensions: list[Dimension]) -> dict[str, Any]:
    """The trial's values: categorical for choices, integer for int flags, float otherwise."""
    values = {}
    for d in dimensions:
        if d.choices is not None:
            values[d.name] = trial.suggest_categorical(d.name, list(d.choices))
        elif str(vpr.TrainConfig.__dataclass_fields__[d.name].type) == "int":
            values[d.name] = trial.suggest_int(d.name, int(d.low), int(d.high), step=int(d.step or 1), log=d.log)
        else:
            values[d.name] = trial.suggest_float(d.name, float(d.low), float(d.high), step=d.step, log=d.log)
    return values


def open_study(options: TuneOptions, seed: int, create: bool = False):
    """The shared study; SQLite waits for its lock instead of failing under parallel workers."""
    optuna = require_optuna()
    storage: Any = options.storage
    if storage.startswith("sqlite:"):
        storage = optuna.storages.RDBStorage(storage, engine_kwargs={"connect_args": {"timeout": 120}})
    sampler = optuna.samplers.TPESampler(seed=seed)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    if create:
        return optuna.create_study(storage=storage, study_name=options.study_name, direction="maximize",
                                   sampler=sampler, pruner=pruner, load_if_exists=True)
    return optuna.load_study(study_name=options.study_name, storage=storage, sampler=sampler, pruner=pruner)


def objective(trial, base: vpr.TrainConfig, dimensions: list[Dimension], study_name: str) -> float:
    """One training run with the trial's values; reports validation R@1 every validation."""
    optuna = require_optuna()
    trial_dir = Path(base.log_dir) / f"{safe_name(study_name)}_trial{trial.number:04d}"
    config = dataclasses.replace(base, **suggest(trial, dimensions), log_dir=str(trial_dir),
                                 checkpoint_dir=str(trial_dir / "models"), resume=None)
    vpr.validate_train_config(config)  # a combination the space allows but training does not: the trial fails

    trained_r1: list[float] = []  # validation R@1 of each validated epoch >= 1

    def report(epoch: int, result: RecallResult) -> None:
        trained_r1.append(result.recalls[1])
        trial.report(result.recalls[1], epoch)
        if trial.should_prune():
            raise optuna.TrialPruned()

    result = train_head(config, on_validation=report)
    trial.set_user_attr("log_file", str(result.log_file))
    trial.set_user_attr("checkpoint", str(result.checkpoint))
    trial.set_user_attr("untrained_r1", result.untrained_r1)
    return trial_score(trained_r1, result.untrained_r1, trial)


def trial_score(trained_r1: list[float], untrained_r1: float, trial=None) -> float:
    """A trial's value: its best validation R@1 over the trained epochs (>= 1), not epoch 0's
    untrained head; with no trained epoch validated, the untrained R@1 (it added nothing).
    Records on the trial whether it beat its untrained head."""
    score = max(trained_r1) if trained_r1 else untrained_r1
    if trial is not None:
        trial.set_user_attr("improved_on_untrained_head", bool(score > untrained_r1))
    return score


def run_worker(base: vpr.TrainConfig, options: TuneOptions, dimensions: list[Dimension], n_trials: int,
               worker: int) -> int:
    """One worker process: n_trials trials of the shared study. Returns how many it ran."""
    study = open_study(options, options.sampler_seed + worker)
    before = len(study.get_trials(deepcopy=False))
    study.optimize(lambda trial: objective(trial, base, dimensions, options.study_name), n_trials=n_trials,
                   catch=(VPRError,))
    return len(study.get_trials(deepcopy=False)) - before


def worker_shares(n_trials: int, n_jobs: int) -> list[int]:
    """n_trials split over n_jobs workers exactly (no trial lost, none extra)."""
    shares = [n_trials // n_jobs + (1 if i < n_trials % n_jobs else 0) for i in range(n_jobs)]
    return [share for share in shares if share]


def run_workers(base: vpr.TrainConfig, options: TuneOptions, dimensions: list[Dimension]) -> None:
    shares = worker_shares(options.n_trials, options.n_jobs)
    if len(shares) == 1:
        run_worker(base, options, dimensions, shares[0], 0)
        return
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch state
    with concurrent.futures.ProcessPoolExecutor(len(shares), mp_context=context) as pool:
        jobs = [pool.submit(run_worker, base, options, dimensions, share, i) for i, share in enumerate(shares)]
        for job in jobs:
            job.result()


def best_summary(study) -> dict[str, Any]:
    """The best trial and the count of trials by state (what a finished search reports)."""
    trials = study.get_trials(deepcopy=False)
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    summary: dict[str, Any] = {"study": study.study_name, "trials": len(trials), "states": states}
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    if complete:
        best = study.best_trial
        improved = [t.number for t in complete if t.user_attrs.get("improved_on_untrained_head")]
        summary.update(best_value=best.value, best_trial=best.number, best_params=best.params,
                       best_log_file=best.user_attrs.get("log_file"),
                       best_untrained_r1=best.user_attrs.get("untrained_r1"),
                       trials_improved_on_untrained_head=len(improved),
                       improved_on_untrained_head=bool(best.user_attrs.get("improved_on_untrained_head")))
        if not improved:
            summary["verdict"] = (f"no trial improved on the untrained head (val R@1 "
                                  f"{best.user_attrs.get('untrained_r1', float('nan')):.3f} at epoch 0): these "
                                  f"parameters are not a tuning result; widen the search (lr, epochs) or keep the "
                                  f"untrained head")
        elif not summary["improved_on_untrained_head"]:
            summary["verdict"] = (f"the best trial ({best.number}) did not improve on its untrained head; trials "
                                  f"{', '.join(map(str, improved))} did")
    return summary


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    base, options = parse_args(argv)
    require_optuna()
    dimensions = search_space(options.config_file)
    log_dir = check_writable_dir(base.log_dir, "--log_dir")
    study = open_study(options, options.sampler_seed, create=True)
    print(f"study {options.study_name} in {options.storage}: {options.n_trials} trials on {options.n_jobs} worker(s), "
          f"searching {', '.join(d.name for d in dimensions)}", flush=True)
    run_workers(base, options, dimensions)
    summary = best_summary(study)
    path = log_dir / f"{safe_name(options.study_name)}_best.json"
    atomic_write(path, lambda p: p.write_text(json.dumps(summary, indent=2)))
    if "best_params" in summary:
        print(f"best val R@1 {summary['best_value']:.3f} over trained epochs (trial {summary['best_trial']}, untrained "
              f"head {summary['best_untrained_r1']:.3f}; {summary['trials_improved_on_untrained_head']} of "
              f"{summary['states'].get('COMPLETE', 0)} complete trials improved on it): "
              + " ".join(f"--{k} {v}" for k, v in summary["best_params"].items()))
        if "verdict" in summary:
            print(summary["verdict"])
    else:
        print(f"no trial completed ({summary['states']})")
    print(f"wrote {path}")
    return summary


if __name__ == "__main__":
    run_cli(main)
