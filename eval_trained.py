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
--output_json (recall_at_threshold_m, top1_error_m), with pr_auc, the average precision of the
top-1 similarity as a "known place" detector. --localization (or --visualize) draws them as
PLOT_DIR/{variant}_{model}[_{checkpoint}]_{queries}_localization.png. Labels-only evaluations
have no distances: recall_at_threshold_m and top1_error_m are null there, pr_auc is by label.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

import trainable_vpr as vpr
from vprkit.checkpoints import EMBEDDINGS_ARCH, check_checkpoint_matches
from vprkit.cli import CliParser, VPRError, atomic_write, run_cli, write_png
from vprkit.evaluation import Descriptors, EvalReport, evaluate_variant, format_report, load_eval_tables, pca_whitened
from vprkit.features import Backbone, extraction_settings, frozen_descriptors, pooling_config, release_other_ranks
from vprkit.images import open_rgb
from vprkit.configs import DEFAULT_POS_THRESHOLD_M
from vprkit.localization import (LocalizationResult, draw_localization_figure, localization_json, localization_lines,
                                 localization_of_result)
from vprkit.places import PlaceTable, export_embeddings_parquet
from vprkit.runlog import safe_name
from vprkit.settings import config_parser, parse_config


def build_parser() -> CliParser:
    return config_parser(vpr.EvalConfig, __doc__.split("\n\n")[0])


def parse_args(argv: Sequence[str] | None) -> vpr.EvalConfig:
    return parse_config(build_parser(), vpr.EvalConfig, argv)


def predictions_frame(report: EvalReport, database: PlaceTable, queries: PlaceTable) -> pd.DataFrame:
    """One row per (query, rank): the retrieved database image, its distance (empty without
    positions), its place labels when both tables have them, correct or not."""
    res = report.result
    q_count, k = res.top_indices.shape
    q_index = np.repeat(np.arange(q_count), k)
    db_index = res.top_indices.ravel()
    frame = pd.DataFrame({
        "query_index": q_index,
        "query_image": np.asarray(queries.paths)[q_index],
        "rank": np.tile(np.arange(1, k + 1), q_count),
        "db_index": db_index,
        "db_image": np.asarray(database.paths)[db_index],
        "distance_m": res.top_distances_m.ravel(),  # unrounded: `correct` is decided on this value; NaN (empty) without positions
        "similarity": res.top_scores.ravel().round(5),
        "correct": res.correct.ravel(),
        "query_has_positive": np.repeat(res.has_positive, k),
    })
    if queries.labels is not None and database.labels is not None:
        frame.insert(2, "query_label", queries.labels[q_index])
        frame.insert(frame.columns.get_loc("db_image") + 1, "db_label", database.labels[db_index])
    if queries.conditions is not None:
        frame.insert(2, "condition", queries.conditions[q_index])
    return frame


def figure_stem(args: vpr.EvalConfig, report: EvalReport) -> str:
    """What a picture shows, as a file-name stem: variant and model (report.name), the
    checkpoint's file stem for a trained head, and the query CSV's stem."""
    parts = [report.name, *([Path(args.model_path).stem] if args.model_path else []), Path(args.test_csv).stem]
    return safe_name("_".join(parts))


def write_outputs(args: vpr.EvalConfig, report: EvalReport, database: PlaceTable, queries: PlaceTable,
                  settings: dict[str, Any], localization: LocalizationResult | None = None) -> None:
    """JSON, predictions CSV, retrieval and localization pictures, each only when asked for,
    each atomically."""
    if args.output_json:
        payload = {**report.as_dict(), **localization_json(report.result, localization), "settings": settings}
        atomic_write(args.output_json, lambda p: p.write_text(json.dumps(payload, indent=2)))
        print(f"wrote {args.output_json}")
    if args.save_predictions:
        frame = predictions_frame(report, database, queries)
        atomic_write(args.save_predictions, lambda p: frame.to_csv(p, index=False))
        print(f"wrote {args.save_predictions}")
    if args.visualize > 0 and database.embeddings is not None:
        raise VPRError("--visualize needs images; embeddings parquets have none")
    if args.visualize > 0:
        path = Path(args.plot_dir) / f"{picture_stem(report.name, settings)}_retrievals.png"
        draw_retrievals(report, database, queries, args.visualize, path)
        print(f"wrote {path}")
    if (args.visualize > 0 or args.localization) and localization is not None:
        path = Path(args.plot_dir) / f"{figure_stem(args, report)}_localization.png"
        draw_localization_figure({report.name: localization}, path, f"{report.name}: localization of "
                                 f"{Path(args.test_csv).name} against {Path(args.db_csv).name}")
        print(f"wrote {path}")
    elif args.localization:
        print("no localization picture: the database or the queries have no positions (labels only)")


def retrieval_captions(report: EvalReport, database: PlaceTable, queries: PlaceTable, q: int,
                       top: int) -> tuple[str, list[str], str]:
    """(query caption, one caption per retrieval, legend) of one picture row, in the rule's own
    terms: place labels for a labelled run (metres too only where there are positions), metres
    for a GPS run."""
    res = report.result
    positions = database.xyz is not None and queries.xyz is not None
    retrieved = res.top_indices[q, :top]
    condition = f" ({queries.conditions[q]})" if queries.conditions is not None else ""
    if res.by_label:
        metres = [f"  {res.top_distances_m[q, r]:.0f} m" if positions else "" for r in range(top)]
        captions = [f"#{r + 1}  {database.labels[i]}{metres[r]}" for r, i in enumerate(retrieved)]
        legend = "green: same place label" + (f" within {res.pos_threshold_m:g} m" if positions else "")
        return f"query {queries.labels[q]}{condition}", captions, legend
    captions = [f"#{r + 1}  {res.top_distances_m[q, r]:.0f} m" for r in range(top)]
    return f"query{condition}", captions, f"green: within {res.pos_threshold_m:g} m"


def picture_stem(variant: str, settings: dict[str, Any]) -> str:
    """What a picture shows, as its name: the checkpoint's run id (or, for a baseline, the
    variant, e.g. raw_effnet_lite0) and the query file, e.g. effnet_lite0_seed42_20250101_120000_on_test.
    Another checkpoint or query file never replaces it."""
    what = settings.get("run_id") or (Path(settings["checkpoint"]).stem if settings.get("checkpoint") else variant)
    return safe_name(f"{what}_on_{Path(settings['test_csv']).stem}")


def draw_retrievals(report: EvalReport, database: PlaceTable, queries: PlaceTable, count: int,
                    path: Path, top: int = 5) -> None:
    """A grid: each row a query and its top retrievals framed green (correct by the run's rule)
    or red, captioned with place labels (labelled runs) or distances (GPS runs); images upright."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = report.result
    rows = np.linspace(0, res.num_queries - 1, num=min(count, res.num_queries)).round().astype(int)
    top = min(top, res.top_indices.shape[1])
    fig, axes = plt.subplots(len(rows), top + 1, figsize=(2.2 * (top + 1), 2.6 * len(rows) + 0.6), squeeze=False,
                             layout="constrained")
    legend = ""
    for r, q in enumerate(rows):
        query_caption, captions, legend = retrieval_captions(report, database, queries, q, top)
        cells = [(queries.paths[q], query_caption, "black")]
        for rank in range(top):
            cells.append((database.paths[res.top_indices[q, rank]], captions[rank],
                          "tab:green" if res.correct[q, rank] else "tab:red"))
        for c, (image_path, title, colour) in enumerate(cells):
            ax = axes[r, c]
            image = open_rgb(image_path)
            image.thumbnail((320, 320))  # phone photos are 12 MP; the cells are 2 inches wide
            ax.imshow(image)
            ax.set_title(title, fontsize=9, color=colour)
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(4 if c else 1)
        if not res.has_positive[q]:  # no database image could be right: the red frames are no fault of the model
            rule = "of its place label" if res.by_label else f"within {res.pos_threshold_m:g} m"
            axes[r, 0].set_xlabel(f"no match {rule}\nin the database", fontsize=8, color="0.45")
    fig.suptitle(f"{report.name}: queries and top-{top} retrievals ({legend})", fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(fig, path, dpi=80)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# This script's own steps
# ---------------------------------------------------------------------------------------------
def backbone_for(args: vpr.EvalConfig, checkpoint: dict | None, database: PlaceTable) -> Backbone | None:
    """The backbone to evaluate: the checkpoint's (checked against --model and --head) or
    --model's; None for embeddings parquets (checked against the checkpoint's head)."""
    if checkpoint is not None:
        check_checkpoint_matches(checkpoint, args.model_path, args.model, args.head)
    trained_on_embeddings = checkpoint is not None and checkpoint["backbone"].get("arch") == EMBEDDINGS_ARCH
    if database.embeddings is not None:
        if checkpoint is not None:
            vpr.check_input_dim(checkpoint["head_config"], database.embeddings.shape[1], args.db_csv)
        return None
    if trained_on_embeddings:
        raise VPRError(f"checkpoint {args.model_path} was trained on precomputed embeddings "
                           f"({checkpoint['backbone']['weights']}); evaluate it on embeddings parquets (--db_parquet, --test_parquet)")
    if checkpoint is None:  # a baseline: a VLAD vocabulary is fitted on the database
        return vpr.create_pooled_backbone(args.model, args.weights, args.image_size, pooling_config(args),
                                          database.paths, extraction_settings(args))
    return vpr.checkpoint_backbone(checkpoint, args.model_path, args.weights, args.image_size, pooling_config(args))


def descriptors_for(args: vpr.EvalConfig, checkpoint: dict | None, name: str, raw: Descriptors) -> tuple[str, Descriptors]:
    """The variant asked for: the checkpoint's head (with --pca_whiten, its output PCA-whitened on
    this database at indexing time), PCA-whitened or raw features."""
    if checkpoint is not None:
        head = vpr.head_from_checkpoint(checkpoint)
        trained = Descriptors(vpr.embed(head, raw.database), vpr.embed(head, raw.queries))
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


def export_parquets(folder: str, raw: Descriptors, database: PlaceTable, queries: PlaceTable, backbone: str) -> None:
    """Raw features of both tables as embeddings parquets, named after their CSVs, with a
    `backbone` column naming the backbone (train_vpr names its run and checkpoint after it)."""
    for table, features in ((database, raw.database), (queries, raw.queries)):
        path = export_embeddings_parquet(table, features, Path(folder) / f"{Path(table.source).stem}.parquet", backbone)
        print(f"wrote {path} ({features.shape[0]} x {features.shape[1]})")


def main(argv: Sequence[str] | None = None) -> EvalReport:
    args = parse_args(argv)
    checkpoint = vpr.load_checkpoint(args.model_path) if args.model_path else None
    threshold = args.pos_threshold_m or (checkpoint["config"]["pos_threshold_m"] if checkpoint else DEFAULT_POS_THRESHOLD_M)
    supervision = args.supervision or (checkpoint["config"].get("supervision", "gps") if checkpoint else "auto")
    database, queries = load_eval_tables(args.db_csv, args.test_csv, threshold, supervision, args.image_root,
                                         args.camera_id, args.on_bad_image)
    backbone = backbone_for(args, checkpoint, database)
    database, queries, raw = frozen_descriptors(extraction_settings(args), backbone, database, queries, threshold,
                                                supervision)
    if release_other_ranks() != 0:
        sys.exit(0)  # torchrun: the other ranks only shared the extraction; rank 0 evaluates on the cache
    model, weights = source_identity(args, backbone, checkpoint, database.backbone)
    if args.export_parquet:
        export_parquets(args.export_parquet, raw, database, queries, model)
    name, descriptors = descriptors_for(args, checkpoint, model, raw)
    report = evaluate_variant(name, descriptors, database, queries, threshold, args.recall_at, supervision)
    print(format_report(report, args.recall_at))
    localization = localization_of_result(report.result, database.xyz, queries.xyz)
    print(localization_lines(localization))
    skipped = {"database": len(database.skipped), "queries": len(queries.skipped)}
    if any(skipped.values()):
        print(f"skipped bad images (--on_bad_image skip): {skipped['database']} database, {skipped['queries']} queries")
    settings = {"variant": name, "model": model, "weights": weights,
                "pooling": backbone.info.pooling if backbone is not None else "backbone",
                "correct_by": "label" if report.result.by_label else "distance",
                "checkpoint": args.model_path, "run_id": checkpoint.get("run_id") if checkpoint else None,
                "db_csv": args.db_csv, "test_csv": args.test_csv,
                "camera_id": args.camera_id, "pos_threshold_m": threshold, "recall_at": args.recall_at,
                "on_bad_image": args.on_bad_image, "skipped_images": skipped}
    write_outputs(args, report, database, queries, settings, localization)
    return report


if __name__ == "__main__":
    run_cli(main)
