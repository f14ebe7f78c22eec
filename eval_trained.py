#!/usr/bin/env python3
"""Recall@N of a trained checkpoint, or of the raw frozen backbone, on a database and queries.

    python eval_trained.py --model_path trained_models/trained_effnet_lite0_seed42.pth \\
        --db_csv data/train.csv --test_csv data/test.csv
    python eval_trained.py --baseline --model effnet_lite0 --db_csv data/train.csv --test_csv data/test.csv
    python eval_trained.py --model_path CKPT --db_parquet emb/train.parquet --test_parquet emb/test.parquet

Protocol (DESIGN.md §7): the --db_csv images are the database (the training images, say), the
--test_csv images the queries; a query is correct at N if one of its top-N database images
(exact search on normalised descriptors) lies within --pos_threshold_m, or with place labels
has the query's label. Embeddings parquets skip the backbone. Prints a table, and optionally
writes JSON, per-query predictions, a picture of retrievals and (--export_parquet) the raw
backbone features as embeddings parquets.

Localization view (positions on both sides): R@1 within 5, 10, 25, 50 and 100 m and the median
/ p75 / p90 distance from each query to its top-1 database image are printed and written to
--output_json (recall_at_threshold_m, top1_error_m). --localization (or --visualize) draws them as
PLOT_DIR/{variant}_{model}[_{checkpoint}]_{queries}_localization.png. Labels-only evaluations
have no distances: recall_at_threshold_m and top1_error_m are null there.

Routes (--seq_len L > 1; docs/evaluation.md "Routes"): both tables must be routes; each query is
its window of L frames, matched by sequence matching over the evaluated frame descriptors
(--seq_velocity, --seq_shortlist) or, with a sequence checkpoint, by its window descriptors fused
with its matching; every output above works on that ranking; --route_figure draws the similarity
matrix with the matched path.

Top-1 precision-recall (VPR-Bench's, vprkit.retrieval.pr_curve; positions or labels): AUC-PR (trapezoid)
and recall at 100 % precision are printed and written to --output_json (auc_pr,
recall_at_100_precision); --pr_curve (or --visualize) writes the curve as
PLOT_DIR/{variant}_{model}[_{checkpoint}]_{queries}_pr.csv (precision, recall, threshold) and _pr.png.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Sequence


import trainable_vpr as vpr
from trainable_vpr.checkpoints import FRAME, SEQUENCE, checkpoint_kind, pos_threshold_of
from trainable_vpr.route_evaluation import RouteSplit, evaluate_sequence_model
from trainable_vpr.model import PlaceDescriptor, load_model
from trainable_vpr.sequence_model import SequenceDescriptor, load_sequence_model
from vprkit.cli import CliParser, VPRError, atomic_write, run_cli
from vprkit.retrieval.evaluation import (Descriptors, EvalReport, evaluate_variant, format_report, l2_normalise,
                                         load_eval_tables, pca_whitened)
from vprkit.retrieval.exports import save_descriptors
from vprkit.extraction.cache import Backbone
from vprkit.cli.extraction_settings import extraction_settings
from vprkit.extraction.features import frozen_descriptors
from vprkit.extraction.device import release_other_ranks
from vprkit.retrieval.localization import (LocalizationResult, draw_localization_figure, localization_json,
                                           localization_lines, localization_of_result)
from vprkit.tables.places import PlaceTable, export_embeddings_parquet
from vprkit.retrieval.pr_curve import Top1PR, draw_pr_figure, pr_line, top1_pr_of_result
from vprkit.retrieval.predictions import draw_retrievals, evaluation_rows, predictions_frame
from vprkit.logs.runlog import safe_name
from vprkit.routes.evaluation import RouteEvaluation, evaluate_sequence
from vprkit.routes.order import route_of
from vprkit.cli.settings import config_parser, parse_config


def build_parser() -> CliParser:
    return config_parser(vpr.EvalConfig, __doc__.split("\n\n")[0])


def parse_args(argv: Sequence[str] | None) -> vpr.EvalConfig:
    return parse_config(build_parser(), vpr.EvalConfig, argv)


def figure_stem(args: vpr.EvalConfig, report: EvalReport) -> str:
    """What a picture shows, as a file-name stem: variant and model (report.name), the
    checkpoint's file stem for a trained head, and the query CSV's stem."""
    parts = [report.name, *([Path(args.model_path).stem] if args.model_path else []), Path(args.test_csv).stem]
    return safe_name("_".join(parts))


def write_outputs(args: vpr.EvalConfig, report: EvalReport, database: PlaceTable, queries: PlaceTable,
                  settings: dict[str, Any], localization: LocalizationResult | None = None,
                  pr: Top1PR | None = None) -> None:
    """JSON, predictions CSV, retrieval and localization pictures, the top-1 PR curve, each only
    when asked for, each atomically."""
    pr = top1_pr_of_result(report.result) if pr is None else pr
    if args.output_json:
        payload = {**report.as_dict(), **localization_json(localization), **pr.summary(), "settings": settings}
        atomic_write(args.output_json, lambda p: p.write_text(json.dumps(payload, indent=2)))
        print(f"wrote {args.output_json}")
    if args.save_predictions:
        res = report.result
        frame = predictions_frame(database, queries, res.top_indices, res.top_scores, res)
        atomic_write(args.save_predictions, lambda p: frame.to_csv(p, index=False))
        print(f"wrote {args.save_predictions}")
    if args.visualize > 0 and database.embeddings is not None:
        raise VPRError("--visualize needs images; embeddings parquets have none")
    if args.visualize > 0:
        path = Path(args.plot_dir) / f"{picture_stem(report.name, settings)}_retrievals.png"
        rows, legend = evaluation_rows(report.result, database, queries, args.visualize)
        top = len(rows[0].matches) if rows else 0
        draw_retrievals(rows, path, f"{report.name}: queries and top-{top} retrievals ({legend})")
        print(f"wrote {path}")
    if (args.visualize > 0 or args.localization) and localization is not None:
        path = Path(args.plot_dir) / f"{figure_stem(args, report)}_localization.png"
        draw_localization_figure({report.name: localization}, path, f"{report.name}: localization of "
                                 f"{Path(args.test_csv).name} against {Path(args.db_csv).name}")
        print(f"wrote {path}")
    elif args.localization:
        print("no localization picture: the database or the queries have no positions (labels only)")
    if args.visualize > 0 or args.pr_curve:
        csv_path, png_path = (Path(args.plot_dir) / f"{figure_stem(args, report)}_pr.{ext}" for ext in ("csv", "png"))
        atomic_write(csv_path, lambda p: pr.frame().to_csv(p, index=False))
        draw_pr_figure({report.name: pr}, png_path, f"{report.name}: top-1 precision-recall of "
                       f"{Path(args.test_csv).name} against {Path(args.db_csv).name}")
        print(f"wrote {csv_path} and {png_path}")


def picture_stem(variant: str, settings: dict[str, Any]) -> str:
    """What a picture shows, as its name: the checkpoint's run id (or, for a baseline, the
    variant, e.g. raw_effnet_lite0) and the query file, e.g. effnet_lite0_seed42_20250101_120000_on_test.
    Another checkpoint or query file never replaces it."""
    what = settings.get("run_id") or (Path(settings["checkpoint"]).stem if settings.get("checkpoint") else variant)
    return safe_name(f"{what}_on_{Path(settings['test_csv']).stem}")


# ---------------------------------------------------------------------------------------------
# This script's own steps
# ---------------------------------------------------------------------------------------------
def model_for(args: vpr.EvalConfig, checkpoint: dict | None, database: PlaceTable) -> PlaceDescriptor | None:
    """The descriptor to evaluate (trainable_vpr.model.load_model): the checkpoint's (checked
    against --model and --head) or --model's; for embeddings parquets the checkpoint's head alone
    (checked against their width), None for a baseline on them (the embeddings are the descriptors)."""
    if database.embeddings is not None and checkpoint is None:
        return None
    embeddings_dim = database.embeddings.shape[1] if database.embeddings is not None else None
    return load_model(args.model_path, args.model, extraction_settings(args), database.paths, checkpoint, args.head,
                      embeddings_dim, args.db_csv)


def descriptors_for(args: vpr.EvalConfig, model: PlaceDescriptor | None, name: str,
                    raw: Descriptors) -> tuple[str, Descriptors]:
    """The variant asked for: the checkpoint's head (with --pca_whiten, its output PCA-whitened on
    this database at indexing time), PCA-whitened or raw features."""
    if model is not None and model.head is not None:
        trained = model.describe(raw)
        if args.pca_whiten:
            return f"trained_whitened_{name}", pca_whitened(trained, args.pca_whiten)
        return f"trained_{name}", trained
    if args.pooling != "backbone":
        name = f"{args.pooling}_{name}"
    if args.pca_whiten:
        return f"pca_whitened_{name}", pca_whitened(raw, args.pca_whiten)
    return f"raw_{name}", raw


def source_identity(args: vpr.EvalConfig, backbone: Backbone | None, checkpoint: dict | None,
                    database_backbone: str | None = None) -> tuple[str, str]:
    """(model name, weights identity) of the descriptors, for names and the JSON settings
    (database_backbone: the embeddings parquet's `backbone` column)."""
    if backbone is not None:
        return backbone.info.name, backbone.info.weights
    if checkpoint is not None:
        return checkpoint["backbone"]["name"], checkpoint["backbone"]["weights"]
    return args.model or database_backbone or "embeddings", f"embeddings:{Path(args.db_csv).name}"


def sequence_model_for(args: vpr.EvalConfig, checkpoint: dict | None) -> SequenceDescriptor | None:
    """A sequence checkpoint's model (trainable_vpr.sequence_model), checked against --seq_len and
    --model; None for a single-frame checkpoint or a baseline."""
    if checkpoint is None or checkpoint_kind(checkpoint) != SEQUENCE:
        return None
    seq_len = checkpoint["sequence"]["seq_len"]
    if args.seq_len != seq_len:
        raise VPRError(f"--seq_len {args.seq_len}: checkpoint {args.model_path} describes windows of {seq_len} "
                       f"frames; give --seq_len {seq_len}")
    return load_sequence_model(args.model_path, extraction_settings(args), args.model, checkpoint)


def route_evaluation(args: vpr.EvalConfig, sequence: SequenceDescriptor | None, name: str, frames: Descriptors,
                     raw: Descriptors, database: PlaceTable, queries: PlaceTable, threshold: float,
                     supervision: str) -> RouteEvaluation:
    """--seq_len L > 1: each query's window against the database route. Without a sequence
    checkpoint, sequence matching (--seq_velocity, --seq_shortlist) over the frame descriptors
    evaluated (raw, PCA-whitened, pooled, a trained frame head); with one, its window descriptors
    shortlist and its matching settings re-rank by its fusion weight (trainable_vpr.fusion)."""
    max_gap = args.seq_max_gap if args.seq_max_gap is not None or sequence is None else sequence.max_gap
    split = RouteSplit.of(database, queries, max_gap)
    if sequence is None:
        config = args.seq_match_config()
        report, matches = evaluate_sequence(f"seq_match_L{args.seq_len}_{name}", frames, database, queries,
                                            split.db_route, split.q_route, config, threshold, args.recall_at,
                                            supervision)
        return RouteEvaluation(report, matches, frames, database, queries, config, max_gap)
    kind = "seq_trained" if sequence.head is not None else "seq_match"
    return evaluate_sequence_model(f"{kind}_L{args.seq_len}_{name}", sequence, raw, split, threshold, args.recall_at,
                                   supervision)


def export_parquets(folder: str, raw: Descriptors, database: PlaceTable, queries: PlaceTable, backbone: str) -> None:
    """Raw features of both tables as embeddings parquets, named after their CSVs, with a
    `backbone` column naming the backbone (train_vpr names its run and checkpoint after it)."""
    for table, features in ((database, raw.database), (queries, raw.queries)):
        path = export_embeddings_parquet(table, features, Path(folder) / f"{Path(table.source).stem}.parquet", backbone)
        print(f"wrote {path} ({features.shape[0]} x {features.shape[1]})")


def main(argv: Sequence[str] | None = None) -> EvalReport:
    args = parse_args(argv)
    # a sequence checkpoint only with --seq_len (else one line saying so)
    checkpoint = vpr.load_checkpoint(args.model_path, None if args.sequences else FRAME) if args.model_path else None
    threshold = pos_threshold_of(args.pos_threshold_m, checkpoint)
    supervision = args.supervision or (checkpoint["config"].get("supervision", "gps") if checkpoint else "auto")
    database, queries = load_eval_tables(args.db_csv, args.test_csv, threshold, supervision, args.image_root,
                                         args.camera_id, args.on_bad_image)
    if args.sequences:  # both must be routes: checked before any extraction
        route_of(database, args.seq_max_gap), route_of(queries, args.seq_max_gap)
    sequence = sequence_model_for(args, checkpoint)
    model = sequence.frame if sequence is not None else model_for(args, checkpoint, database)
    backbone = model.frozen if model is not None else None  # the frozen part: its features come through the cache
    database, queries, raw = frozen_descriptors(extraction_settings(args), backbone, database, queries, threshold,
                                                supervision)
    if release_other_ranks() != 0:
        sys.exit(0)  # torchrun: the other ranks only shared the extraction; rank 0 evaluates on the cache
    model_name, weights = source_identity(args, backbone, checkpoint, database.backbone)
    if args.export_parquet:
        export_parquets(args.export_parquet, raw, database, queries, model_name)
    name, descriptors = descriptors_for(args, model, model_name, raw)
    routes = route_evaluation(args, sequence, name, descriptors, raw, database, queries, threshold, supervision) \
        if args.sequences else None
    report = routes.report if routes is not None else \
        evaluate_variant(name, descriptors, database, queries, threshold, args.recall_at, supervision)
    print(format_report(report, args.recall_at))
    localization = localization_of_result(report.result, database.xyz, queries.xyz)
    print(localization_lines(localization))
    pr = top1_pr_of_result(report.result)
    print(pr_line(pr))
    if args.save_descriptors:
        # as searched: L2-normalised
        image_dir, files = save_descriptors(args.save_descriptors, database.paths, queries.paths,
                                            l2_normalise(descriptors.database), l2_normalise(descriptors.queries))
        print(f"wrote {name} descriptors: {', '.join(str(f) for f in files)} (hloc names relative to {image_dir})")
    skipped = {"database": len(database.skipped), "queries": len(queries.skipped)}
    if any(skipped.values()):
        print(f"skipped bad images (--on_bad_image skip): {skipped['database']} database, {skipped['queries']} queries")
    settings = {"variant": name, "model": model_name, "weights": weights,
                "pooling": backbone.info.pooling if backbone is not None else "backbone",
                "correct_by": "label" if report.result.by_label else "distance",
                "checkpoint": args.model_path, "run_id": checkpoint.get("run_id") if checkpoint else None,
                "db_csv": args.db_csv, "test_csv": args.test_csv,
                "camera_id": args.camera_id, "pos_threshold_m": threshold, "recall_at": args.recall_at,
                "on_bad_image": args.on_bad_image, "skipped_images": skipped,
                **(routes.settings() if routes is not None else {})}
    write_outputs(args, report, database, queries, settings, localization, pr)
    if routes is not None and (args.visualize > 0 or args.route_figure):
        path = Path(args.plot_dir) / f"{figure_stem(args, report)}_similarity_path.png"
        routes.draw(path, f"{report.name}: {Path(args.test_csv).name} x {Path(args.db_csv).name}")
        print(f"wrote {path}")
    return report


if __name__ == "__main__":
    run_cli(main)
