#!/usr/bin/env python3
"""Baseline -> training -> evaluation for one or many backbones, side by side.

    python run_experiment.py --train_csv data/train.csv --val_csv data/val.csv \\
        --test_csv data/test.csv --models effnet_lite0 effnet_lite2 --epochs 15
    python run_experiment.py --demo        # the built-in synthetic route, no download

For each backbone: the raw frozen features, PCA-whitened frozen features (fitted on the
database), learned whitening (fitted on the training images' positive pairs, shrinkage chosen on
val), training-free VLAD over the local features of --feature_layer (vocabulary fitted on the
training images), the start (the untrained head validation chose, fitted on the training images:
when no epoch beats it, the trained row equals it), a trained head, and the trained head's output
PCA-whitened on the database (trained_whitened) are evaluated on the same cached features (each
image goes through each backbone once), with the protocol of eval_trained.py. Every model's weights and
every input are checked before the first model trains. Prints a comparison table and writes
logs/experiment_{timestamp}.csv and, beside it, experiment_{timestamp}.json: its inputs,
threshold, supervision, recall_at, models, and each model's checkpoint, run id and log (or why
it failed); where the data has positions also experiment_{timestamp}_localization.png: every
variant of every model on one localization figure (R@1 against distance threshold, cumulative
top-1 error), with the median top-1 error per variant printed. The CSV also holds each
variant's top-1 precision-recall summary (auc_pr, recall_at_100_precision; VPR-Bench's, see
vprkit.retrieval.pr_curve), and experiment_{timestamp}_pr.png draws every variant's curve.
A model that fails after others were measured does not lose their rows.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from trainable_vpr import training
from trainable_vpr.data import extract_training_data, load_splits
from trainable_vpr.runs import head_config_for, resolved_pooling, start_fit_data
from trainable_vpr.training import TrainResult
import trainable_vpr as vpr
from trainable_vpr.model import PlaceDescriptor
from trainable_vpr.checkpoints import SEQUENCE
from trainable_vpr.route_evaluation import RouteSplit, choose_seq_match, evaluate_sequence_model, untrained
from trainable_vpr.seqnet import SEQ_HEAD
from trainable_vpr.sequence_model import load_sequence_model
from trainable_vpr.sequence_run import train_sequence
from vprkit.cli.configs import SEQ_TRAINING_DEFAULTS
from vprkit.cli import CliParser, VPRError, atomic_write, check_writable_dir, run_cli
from vprkit.logs.runlog import EXPERIMENT_VARIANTS, SEQUENCE_VARIANTS
from vprkit.cli.settings import config_parser, given_settings, parse_config
from vprkit.retrieval.evaluation import (Descriptors, EvalReport, evaluate_variant, format_report, load_eval_tables,
                                         pca_whitened)
from vprkit.cli.extraction_settings import extraction_settings, pooling_config
from vprkit.extraction.features import frozen_descriptors
from vprkit.retrieval.localization import LocalizationResult, draw_localization_figure, localization_of_result
from vprkit.tables.demo_route import generate_demo_dataset
from vprkit.tables.load import load_table
from vprkit.extraction.pooling import PoolingConfig
from vprkit.retrieval.pr_curve import draw_pr_figure, top1_pr_of_result
from vprkit.routes.evaluation import evaluate_sequence
from vprkit.routes.order import route_of

DEMO_DIR = Path("demo_data")
# Demo settings where the user left the defaults: ~120 training images give few steps per epoch,
# so a larger, decaying learning rate (how it was chosen: docs/benchmarks.md, "The demo").
DEMO_SETTINGS = {"models": ["effnet_lite0"], "epochs": 15, "lr": 1e-3, "lr_schedule": "cosine"}


def build_parser() -> CliParser:
    return config_parser(vpr.ExperimentConfig, __doc__.split("\n\n")[0], skip=("model",),
                         optional=("train_csv", "val_csv", "test_csv", "db_csv"))  # --demo gives them


def parse_args(argv: Sequence[str] | None) -> vpr.ExperimentConfig:
    parser = build_parser()
    return parse_config(parser, vpr.ExperimentConfig, argv,
                        then=lambda args, config: demo_config(config, given_settings(parser, argv))
                        if config.demo else config)


def demo_config(config: vpr.ExperimentConfig, given: set[str]) -> vpr.ExperimentConfig:
    """Point the experiment at the generated demo route (generated once, then reused); the demo's
    settings apply where no layer (flag, VPR_* variable, --config key) gives one (`given`)."""
    dataset = generate_demo_dataset(DEMO_DIR)
    changes: dict[str, Any] = {"train_csv": str(dataset.train_csv), "val_csv": str(dataset.val_csv),
                               "test_csv": str(dataset.test_csv),
                               "db_csv": config.db_csv or str(dataset.db_csv)}  # the day drive of the whole route
    applied = []
    for name, value in DEMO_SETTINGS.items():
        if name not in given:
            changes[name] = value
            applied.append(f"--{name} {' '.join(map(str, value)) if isinstance(value, list) else value}")
    if applied:  # the demo's recipe differs from the documented defaults: say so, in one line
        print(f"demo settings (flags you give win): {' '.join(applied)}", flush=True)
    print(f"demo seed: {config.seed} (--seed N for another; the README says how much the result varies)", flush=True)
    return dataclasses.replace(config, **changes)


def final_tables(config: vpr.ExperimentConfig, train: vpr.TrainConfig):
    """The final evaluation's database (--db_csv, else the training images) and queries, checked."""
    return load_eval_tables(config.db_csv or config.train_csv, config.test_csv, train.pos_threshold_m,
                            train.supervision, config.image_root, config.camera_id, config.on_bad_image)


def check_before_training(args: vpr.ExperimentConfig) -> None:
    """Every input and every model's weights, before the first model trains (nothing written
    yet): the test and database tables, each model's training splits, and its backbone built
    once (an unavailable download stops here with the hub's one-line reason)."""
    if args.head == SEQ_HEAD:
        raise VPRError(f"--head {SEQ_HEAD}: run_experiment's --head is the single-frame head of its rows; with "
                       f"--seq_len L > 1 it trains the sequence head beside it (the seq_start, seq_trained rows)")
    database, queries = final_tables(args, args.train_config(args.models[0]))
    for model in args.models:
        config = args.train_config(model)
        splits = load_splits(config)  # per model: a parquet's backbone must agree with --model
        if args.sequences:  # every table a route (one line naming the file or row)
            for table in (database, queries, splits[0], splits[1], splits[3]):
                if table is not None:
                    route_of(table, args.seq_max_gap)
        if database.embeddings is None:
            vpr.create_backbone(model, config.weights, config.image_size)  # freed at once; built again to train


@dataclass
class ModelRun:
    """What one backbone gave: its reports by variant, their localization views (None without
    positions) and the training run behind the trained one."""

    reports: dict[str, EvalReport]
    localizations: dict[str, LocalizationResult | None]
    trained: TrainResult
    sequence: dict[str, Any] = field(default_factory=dict)  # routes: what val chose for the sequence rows


def training_free_vlad(base: vpr.Backbone, config: vpr.TrainConfig, train_paths: Sequence[str], database,
                       queries) -> Descriptors:
    """VLAD (--vlad_clusters, --feature_layer) over the backbone's local features, its vocabulary
    fitted on the training images: what a user gets without training (AnyLoc)."""
    vlad = PoolingConfig("vlad", config.feature_layer, config.vlad_clusters)
    backbone = vpr.with_pooling(base, vlad, train_paths, extraction_settings(config))
    return frozen_descriptors(config, backbone, database, queries, config.pos_threshold_m, config.supervision)[2]


def learned_whitened(config: vpr.TrainConfig, trained: TrainResult) -> tuple[PlaceDescriptor, str]:
    """The learned-whitening row (trainable_vpr.starts): fitted on the training images' pairs,
    shrinkage chosen on val queries against the validation database, as the head's start is.
    The run's own candidate when --head_start auto compared it; else fitted here, the features
    coming from the cache training filled. Returns the descriptor (over the frozen features) and its label."""
    if "learned_whitened" in trained.start_candidates:
        label = trained.head_start["labels"]["learned_whitened"]
        return PlaceDescriptor(None, trained.start_candidates["learned_whitened"]), f"({label.split('(', 1)[1]}"
    train_table, val_table, by_label, val_db = load_splits(config)
    data = extract_training_data(config, train_table, val_table, by_label, None, val_db)
    start = vpr.start_head("learned_whitened", head_config_for(config, data.train.features.shape[1]),
                           start_fit_data(config, data), config.seed)
    return PlaceDescriptor(None, start.head), f"({start.label.split('(', 1)[1]}"


def compare_backbone(model: str, args: vpr.ExperimentConfig) -> ModelRun:
    """Raw, PCA-whitened, training-free VLAD and trained descriptors of one backbone on the final
    queries, each with its localization view (no VLAD row for embeddings parquets: no images)."""
    config, pooling = resolved_pooling(args.train_config(model))  # --pooling auto: chosen first
    database, queries = final_tables(args, config)
    base = backbone = None
    train_paths: Sequence[str] = ()
    if database.embeddings is None:  # one backbone, pooled as asked and, for the vlad row, with VLAD
        train_paths = load_table(config.train_csv, config.image_root, config.camera_id, config.on_bad_image).paths
        base = vpr.create_backbone(model, config.weights, config.image_size)
        backbone = vpr.with_pooling(base, pooling_config(config), train_paths, extraction_settings(config))
    database, queries, raw = frozen_descriptors(config, backbone, database, queries, config.pos_threshold_m,
                                                          config.supervision)
    variants = {"raw": raw, "pca_whitened": pca_whitened(raw, config.projection_dim)}
    labels = {"pca_whitened": f"({variants['pca_whitened'].database.shape[1]}-d, fitted on the database)"}
    if backbone is not None and config.pooling == "vlad":
        variants["vlad"] = raw
    elif backbone is not None:
        try:
            variants["vlad"] = training_free_vlad(base, config, train_paths, database, queries)
        except VPRError as exc:  # e.g. fewer local features than --vlad_clusters: the other rows still stand
            print(f"no vlad row for {model}: {exc}", flush=True)

    print(f"\n=== {model}: training ({config.epochs} epochs)", flush=True)
    trained = training.train(config, pooling=pooling)
    # the trained descriptor: the frozen backbone built above (None for embeddings) and the checkpoint's head
    frozen, frozen_raw = backbone, raw
    if config.head in vpr.LOCAL_HEADS:  # the head aggregates the local features: the cache's, streamed
        frozen = vpr.local_backbone(backbone, config.feature_layer, config.local_features_per_image)
        frozen_raw = frozen_descriptors(config, frozen, database, queries, config.pos_threshold_m,
                                        config.supervision)[2]
    if config.train_blocks:  # the backbone with its trained blocks, from the checkpoint (another cache entry)
        frozen = PlaceDescriptor.from_checkpoint(trained.checkpoint, weights=config.weights,
                                                 image_size=config.image_size).frozen
        frozen_raw = frozen_descriptors(config, frozen, database, queries, config.pos_threshold_m,
                                        config.supervision)[2]
    descriptor = PlaceDescriptor(frozen, vpr.head_from_checkpoint(vpr.load_checkpoint(trained.checkpoint)),
                                 str(trained.checkpoint))
    variants["trained"] = descriptor.describe(frozen_raw)
    # The head's output PCA-whitened at indexing time on the database the user searches: whitening
    # fitted on the target database adapts to it without training there (issue "local features").
    variants["trained_whitened"] = pca_whitened(variants["trained"], config.projection_dim)
    whitening, labels["learned_whitened"] = learned_whitened(config, trained)
    variants["learned_whitened"] = whitening.describe(raw)
    if trained.start_head is not None:  # the untrained head validation chose: what training must beat
        variants["start"] = PlaceDescriptor(None, trained.start_head).describe(raw)
        labels["start"] = f"= {trained.head_start['label']}"

    reports = {}
    for variant, descriptors in variants.items():
        name = f"{model} {variant}" + (f" {labels[variant]}" if variant in labels else "")
        report = evaluate_variant(name, descriptors, database, queries,
                                               config.pos_threshold_m, args.recall_at, config.supervision)
        print(format_report(report, args.recall_at), flush=True)
        reports[variant] = report
    sequence: dict[str, Any] = {}
    if config.sequences:  # routes: the sequence rows beside the single-frame ones
        val_split, val_rows = val_frozen_rows(config, base, backbone, train_paths, whitening,
                                              "vlad" in variants)
        seq_reports, sequence = sequence_rows(model, config, args, variants, RouteSplit.of(database, queries,
                                              config.seq_max_gap), val_split, val_rows)
        reports.update(seq_reports)
    localizations = {v: localization_of_result(r.result, database.xyz, queries.xyz) for v, r in reports.items()}
    return ModelRun(reports, localizations, trained, sequence)


def val_frozen_rows(config: vpr.TrainConfig, base: vpr.Backbone | None, backbone: vpr.Backbone | None,
                    train_paths: Sequence[str], whitening: PlaceDescriptor,
                    with_vlad: bool) -> tuple[RouteSplit, dict[str, Descriptors]]:
    """The frozen rows' descriptors on the validation search (--val_csv against --val_db_csv, else
    the training images), what seq_match's frame descriptor is chosen on, in FROZEN_ROWS order."""
    train_table, val_table, _, val_db = load_splits(config)
    val_db, val, raw = frozen_descriptors(config, backbone, val_db or train_table, val_table, config.pos_threshold_m,
                                          config.supervision)
    rows = {"raw": raw, "pca_whitened": pca_whitened(raw, config.projection_dim),
            "learned_whitened": whitening.describe(raw)}
    if with_vlad:
        rows["vlad"] = raw if config.pooling == "vlad" else training_free_vlad(base, config, train_paths, val_db, val)
    return RouteSplit.of(val_db, val, config.seq_max_gap), {v: rows[v] for v in FROZEN_ROWS if v in rows}


def sequence_rows(model: str, config: vpr.TrainConfig, args: vpr.ExperimentConfig, variants: dict[str, Descriptors],
                  split: RouteSplit, val_split: RouteSplit,
                  val_rows: dict[str, Descriptors]) -> tuple[dict[str, EvalReport], dict[str, Any]]:
    """seq_match (sequence matching over the frozen frame descriptor and velocity range best on
    val), seq_start and seq_trained on the final route; and what val chose, for the JSON."""
    choice = choose_seq_match(val_rows, val_split, config.seq_match_config(), config.pos_threshold_m,
                              config.supervision)
    name = (f"{model} seq_match (L {config.seq_len}, {choice.frames}, v {choice.config.v_min:g}-"
            f"{choice.config.v_max:g}, chosen on val)")
    reports = {"seq_match": evaluate_sequence(name, variants[choice.frames], split.database, split.queries,
                                              split.db_route, split.q_route, choice.config, config.pos_threshold_m,
                                              args.recall_at, config.supervision)[0]}
    seq_config = dataclasses.replace(config, head=SEQ_HEAD, **dict.fromkeys(SEQ_TRAINING_DEFAULTS))
    print(f"\n=== {model}: the sequence head (--head {SEQ_HEAD}, windows of {config.seq_len} frames, "
          f"{seq_config.epochs} epochs)", flush=True)
    run = train_sequence(seq_config)
    checkpoint = vpr.load_checkpoint(run.checkpoint, SEQUENCE)
    trained = load_sequence_model(str(run.checkpoint), extraction_settings(seq_config), checkpoint=checkpoint)
    chosen = checkpoint.get("chosen", {})
    train_table, val_table, by_label, val_db = load_splits(seq_config)
    data = extract_training_data(seq_config, train_table, val_table, by_label, None, val_db)  # from the cache
    start = untrained(trained, data.train.features, data.train.xyz, seq_config.pos_threshold_m, seq_config.seed)
    weight = "none" if trained.fusion_weight is None else f"{trained.fusion_weight:g}"
    for variant, sequence, label in (("seq_start", start, f"= {chosen.get('head_start', {}).get('chosen', '')}"),
                                     ("seq_trained", trained, f"(fusion weight {weight}, chosen on val)")):
        reports[variant] = evaluate_sequence_model(f"{model} {variant} {label}", sequence, variants["raw"], split,
                                                   config.pos_threshold_m, args.recall_at, config.supervision).report
    for report in reports.values():
        print(format_report(report, args.recall_at), flush=True)
    record = {"seq_len": config.seq_len, "seq_velocity": list(config.seq_velocity), "seq_shortlist":
              config.seq_shortlist, "seq_max_gap": config.seq_max_gap, "seq_match": choice.record(),
              "seq_trained": {"run_id": run.run_id, "checkpoint": str(run.checkpoint), "log_file": str(run.log_file),
                              "best_epoch": run.best_epoch, "chosen": chosen}}
    return reports, record


def draw_experiment_localization(runs: dict[str, ModelRun], path: Path, title: str) -> Path | None:
    """Every variant of every model on one localization figure; prints each variant's median
    top-1 error. None (nothing drawn) when the data has no positions."""
    curves = {run.reports[v].name: loc for run in runs.values() for v, loc in run.localizations.items()
              if loc is not None}
    if not curves:
        return None
    print("\nmedian top-1 error (distance from each query to its top-1 database image)")
    width = max(len(name) for name in curves)
    for name, loc in curves.items():
        error = loc.top1_error_m
        print(f"  {name:<{width}} median {error['median']:8.1f} m   p90 {error['p90']:8.1f} m")
    return draw_localization_figure(curves, path, title)


def comparison_table(reports_by_model: dict[str, dict[str, EvalReport]], recall_at: Sequence[int]) -> pd.DataFrame:
    """model x variant x Recall@N (variants in EXPERIMENT_VARIANTS order), plus the change in R@1
    against the raw backbone and the top-1 precision-recall summary (empty where undefined)."""
    rows = []
    for model, reports in reports_by_model.items():
        raw_r1 = reports["raw"].result.recalls[1]
        for variant, report in sorted(reports.items(), key=lambda item: VARIANTS.index(item[0])):
            row = {"model": model, "variant": variant}
            row.update({f"recall@{n}": round(report.result.recalls[n], 4) for n in recall_at})
            row["delta_r1_vs_raw"] = round(report.result.recalls[1] - raw_r1, 4)
            pr_summary = top1_pr_of_result(report.result).summary()
            row.update({k: v if v is None else round(v, 4) for k, v in pr_summary.items()})
            rows.append(row)
    return pd.DataFrame(rows)


VARIANTS = EXPERIMENT_VARIANTS + SEQUENCE_VARIANTS  # the table's row order
FROZEN_ROWS = ("raw", "pca_whitened", "learned_whitened", "vlad")  # descriptors with no epochs (start is one of them)


def training_gain(reports: dict[str, EvalReport], trained: TrainResult) -> dict[str, Any]:
    """What training bought, in R@1 on the final queries: the start (chosen on val) over raw, the
    epochs over that start, and the trained row against the best frozen row of this table (a
    report on the test queries, never a choice). Empty without a trained row."""
    r1 = {variant: report.result.recalls[1] for variant, report in reports.items()}
    if "trained" not in r1:
        return {}
    frozen = {v: r1[v] for v in FROZEN_ROWS if v in r1}
    best = max(frozen, key=lambda v: (frozen[v], -FROZEN_ROWS.index(v)))
    gain: dict[str, Any] = {"best_frozen": best, "best_frozen_r1": round(frozen[best], 4),
                            "trained_minus_best_frozen": round(r1["trained"] - frozen[best], 4),
                            "best_epoch": trained.best_epoch}
    if "start" in r1:
        gain.update(start=(trained.head_start or {}).get("chosen", "start"),
                    start_minus_raw=round(r1["start"] - r1["raw"], 4),
                    epochs_minus_start=round(r1["trained"] - r1["start"], 4))
    return {**gain, **sequence_gain(r1)}


def sequence_gain(r1: dict[str, float]) -> dict[str, Any]:
    """What training bought on routes (R@1): the untrained sequence head over sequence matching,
    the trained sequence model over that start, and the trained one against the best training-free
    sequence row (seq_match or seq_start). Only the rows there are."""
    gain: dict[str, Any] = {}
    if "seq_start" in r1 and "seq_match" in r1:
        gain["seq_start_minus_seq_match"] = round(r1["seq_start"] - r1["seq_match"], 4)
    if "seq_trained" in r1 and "seq_start" in r1:
        gain["seq_trained_minus_seq_start"] = round(r1["seq_trained"] - r1["seq_start"], 4)
    free = {v: r1[v] for v in ("seq_match", "seq_start") if v in r1}
    if "seq_trained" in r1 and free:
        best = max(free, key=lambda v: free[v])
        gain.update(best_free_sequence=best, seq_trained_minus_best_free=round(r1["seq_trained"] - free[best], 4))
    return gain


def training_gain_lines(model: str, gain: dict[str, Any]) -> list[str]:
    """training_gain in words, a few lines per model."""
    if not gain:
        return []
    lines = [f"what training bought ({model}, R@1 on these queries):"]
    if "start" in gain:
        epochs = ("no epoch beat the start on val, so trained = start" if gain["best_epoch"] == 0
                  else f"best epoch {gain['best_epoch']} on val")
        lines += [f"  the start validation chose ({gain['start']}) over raw: {gain['start_minus_raw']:+.4f}",
                  f"  the epochs over that start: {gain['epochs_minus_start']:+.4f} ({epochs})"]
    lines.append(f"  trained against the best frozen row of this table ({gain['best_frozen']} "
                 f"{gain['best_frozen_r1']:.4f}): {gain['trained_minus_best_frozen']:+.4f}")
    words = {"seq_start_minus_seq_match": "routes: the untrained sequence head over sequence matching",
             "seq_trained_minus_seq_start": "routes: the trained sequence model over that start",
             "seq_trained_minus_best_free": "routes: seq_trained against the best training-free sequence row "
                                            f"({gain.get('best_free_sequence')})"}
    lines += [f"  {text}: {gain[key]:+.4f}" for key, text in words.items() if key in gain]
    return lines


def experiment_record(args: vpr.ExperimentConfig, runs: dict[str, ModelRun], failed: dict[str, str]) -> dict:
    """The experiment's inputs and what each model gave: the JSON beside the experiment CSV."""
    models = {}
    for model in args.models:
        if model in runs:
            trained = runs[model].trained
            models[model] = {"run_id": trained.run_id, "checkpoint": str(trained.checkpoint),
                             "log_file": str(trained.log_file), "best_epoch": trained.best_epoch,
                             "head_start": trained.head_start,
                             "training_gain": training_gain(runs[model].reports, trained),
                             **({"sequence": runs[model].sequence} if runs[model].sequence else {})}
        elif model in failed:
            models[model] = {"failed": failed[model]}
    return {"train_csv": args.train_csv, "val_csv": args.val_csv, "val_db_csv": args.val_db_csv or args.train_csv,
            "test_csv": args.test_csv,
            "db_csv": args.db_csv or args.train_csv, "pos_threshold_m": args.pos_threshold_m,
            "supervision": args.supervision, "recall_at": list(args.recall_at), "models": models}


def experiment_paths(log_dir: Path) -> tuple[Path, Path]:
    """experiment_{time}.csv and .json, with a suffix when that name is taken (never replaced)."""
    stem, n = f"experiment_{time.strftime('%Y%m%d_%H%M%S')}", 1
    while (log_dir / f"{stem}.csv").exists() or (log_dir / f"{stem}.json").exists():
        n += 1
        stem = f"experiment_{time.strftime('%Y%m%d_%H%M%S')}_{n}"
    return log_dir / f"{stem}.csv", log_dir / f"{stem}.json"


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    args = parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise VPRError("run_experiment.py does not run under torchrun; fill the cache with "
                           "`torchrun ... train_vpr.py` or `torchrun ... eval_trained.py`, then run it in one process")
    log_dir = check_writable_dir(args.log_dir, "--log_dir")  # (made if missing, left empty)
    check_writable_dir(args.checkpoint_dir, "--checkpoint_dir")
    check_before_training(args)
    runs: dict[str, ModelRun] = {}
    failed: dict[str, str] = {}
    for model in args.models:
        try:
            runs[model] = compare_backbone(model, args)
        except Exception as exc:  # noqa: BLE001 - a later failure (download, memory): keep what was measured, go on
            failed[model] = (str(exc).strip().splitlines() or [""])[0] if isinstance(exc, VPRError) \
                else f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
            print(f"{model} failed: {failed[model]}", file=sys.stderr, flush=True)
    table = comparison_table({m: r.reports for m, r in runs.items()}, args.recall_at)
    csv_path, json_path = experiment_paths(log_dir)
    if runs:
        atomic_write(csv_path, lambda p: table.to_csv(p, index=False))
    atomic_write(json_path, lambda p: p.write_text(json.dumps(experiment_record(args, runs, failed), indent=2)))
    if runs:
        first = next(iter(runs.values())).reports["raw"].result
        rule = "by place label" if first.by_label else f"within {args.pos_threshold_m:g} m"
        print(f"\nqueries {args.test_csv} against database {args.db_csv or args.train_csv}, correct {rule}")
        print(table.to_string(index=False))
        for model, run in runs.items():
            print("\n".join(training_gain_lines(model, training_gain(run.reports, run.trained))))
        print(f"wrote {csv_path}")
        database = args.db_csv or args.train_csv
        figure = draw_experiment_localization(runs, csv_path.with_name(f"{csv_path.stem}_localization.png"),
                                              f"{csv_path.stem}: localization of {Path(args.test_csv).name} against "
                                              f"{Path(database).name}")
        if figure is not None:
            print(f"wrote {figure}")
        curves = {report.name: top1_pr_of_result(report.result)
                  for run in runs.values() for report in run.reports.values()}
        pr_figure = draw_pr_figure(curves, csv_path.with_name(f"{csv_path.stem}_pr.png"), f"{csv_path.stem}: top-1 "
                                   f"precision-recall of {Path(args.test_csv).name} against {Path(database).name}")
        print(f"wrote {pr_figure}")
    print(f"wrote {json_path}")
    if failed:
        measured = f"the rows of {', '.join(runs)} are in {csv_path}" if runs else "no model was measured"
        raise VPRError(f"--models: {', '.join(failed)} failed ({next(iter(failed.values()))}); {measured}, "
                       f"each model's outcome in {json_path}")
    return table


if __name__ == "__main__":
    run_cli(main)
