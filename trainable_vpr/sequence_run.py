"""A `--head seqnet` training run (train_vpr, run_experiment, tune_vpr), beside training.py's loop for
single-frame heads; `train_head(config)` runs the one the config asks for.

Steps of `train_sequence(config)`: the splits loaded and checked (positives by positions), their
frames extracted once through the feature cache, each split's route order (one line when a table
is not a route); the learned whitenings of the frames fitted once; the head's start chosen on val
windows against the validation database's windows (--val_db_csv, else the training images', as
single-frame validation does): frame start x shrinkage (`choose_sequence_start`), logged as epoch
0's real `validation` row; the epochs (`train_sequence_head`, a `validation` row each); the
matching's frame descriptor chosen on val (raw or learned-whitened, by sequence matching's val
R@1 at --seq_velocity), and the fusion weight of the trained head with that matching chosen on
val; the best checkpoint (a sequence checkpoint: the start unless an epoch beat it on val), the
summary row and the printed lines. No image is decoded after the first extraction.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any


import trainable_vpr as vpr
from trainable_vpr.checkpoints import (checkpoint_path, latest_alias_path, refresh_latest_alias, save_checkpoint,
                                       sequence_checkpoint_payload)
from trainable_vpr.data import TrainingData, extract_training_data, load_splits
from trainable_vpr.fusion import choose_fusion_weight, shortlist_scores
from trainable_vpr.heads import HeadConfig
from trainable_vpr.model import PlaceDescriptor
from trainable_vpr.runs import start_text
from trainable_vpr.seqnet import FRAME_STARTS, SEQ_HEAD, SeqHeadConfig, fit_frame_whitenings
from trainable_vpr.sequence_model import SequenceDescriptor, frame_map
from trainable_vpr.sequence_training import (EpochRecord, RouteFrames, SeqTrainConfig, SequenceResult,
                                             choose_sequence_start, start_label, train_sequence_head,
                                             window_recall)
from trainable_vpr.training import TrainResult, ValidationCallback, check_outputs, print_config, summary_row, train
from vprkit.logs.runlog import (CsvLogger, LOG_COLUMNS, LOG_EXTRA_COLUMNS, TRAINING_SUMMARY_NAME, append_summary_row,
                                new_run_id)
from vprkit.retrieval.evaluation import l2_normalise
from vprkit.retrieval.whitening import SHRINKAGE_GRID, Whitening
from vprkit.routes.matching import SeqMatchConfig, matches_recall, sequence_match
from vprkit.routes.order import route_of

RECALL_AT = (1, 5, 10)


def train_head(config: vpr.TrainConfig, on_validation: ValidationCallback | None = None) -> TrainResult:
    """The training run the config asks for: the sequence head's (--head seqnet) or a single-frame head's."""
    if config.head == SEQ_HEAD:
        return train_sequence(config, on_validation)
    return train(config, on_validation)


def route_frames(config: vpr.TrainConfig, data: TrainingData) -> dict[str, RouteFrames]:
    """train, val and the validation database (--val_db_csv, else the training images) as routes."""
    splits = {"train": data.train, "val": data.val, "val_db": data.val_database}
    return {name: RouteFrames(split.features, route_of(split.table, config.seq_max_gap), split.xyz)
            for name, split in splits.items()}


def head_config_of(config: vpr.TrainConfig, frame_dim: int) -> SeqHeadConfig:
    return SeqHeadConfig(seq_len=config.seq_len, frame_dim=frame_dim, proj_dim=config.seq_proj_dim,
                         hidden_dim=config.hidden_dim, dropout=config.dropout, kernel=config.seq_kernel,
                         frame_dropout=config.seq_frame_dropout, arch=config.seq_arch,
                         out_dim=config.projection_dim)


def train_config_of(config: vpr.TrainConfig) -> SeqTrainConfig:
    return SeqTrainConfig(epochs=config.epochs, lr=config.lr, weight_decay=config.weight_decay,
                          batch_size=config.batch_size, images_per_place=config.images_per_place,
                          pos_threshold_m=config.pos_threshold_m, neg_threshold_m=config.neg_threshold_m,
                          hard_neg_ratio=vpr.effective_hard_neg_ratio(config), triplet_margin=config.triplet_margin,
                          temperature=config.contrastive_temperature, triplet_weight=config.triplet_weight,
                          steps=tuple(config.seq_steps), train_projection=config.seq_train_projection)


def frame_candidates(whitenings: dict[float, Whitening]) -> dict[str, Whitening | None]:
    """The matching's frame descriptor candidates, in tie order: raw (None), then learned whitening
    at each shrinkage."""
    return {"raw": None, **{f"learned_whitened s={s:g}": w for s, w in sorted(whitenings.items())}}


def choose_matching(val: RouteFrames, val_db: RouteFrames, candidates: dict[str, Whitening | None],
                    configs: dict[str, SeqMatchConfig], pos_threshold_m: float
                    ) -> tuple[str, str, dict[tuple[str, str], float]]:
    """The frame descriptor (of `candidates`) and matching config (of `configs`, e.g. velocity
    ranges) with the best sequence-matching R@1 of val against val_db; a tie goes to the earlier
    candidate, then the earlier config. (candidate name, config name, every (candidate, config) R@1)."""
    scores = {}
    for name, whitening in candidates.items():
        describe = l2_normalise if whitening is None else whitening.apply
        queries, database = describe(val.features), describe(val_db.features)
        for label, config in configs.items():
            found = sequence_match(queries, val.route, database, val_db.route, config, k=1)
            scores[(name, label)] = matches_recall(found, val_db.xyz, val.xyz, pos_threshold_m, (1,))[1]
    name, label = max(scores, key=lambda key: scores[key])  # the first of the best
    return name, label, scores


def match_frames(frames: dict[str, RouteFrames], whitenings: dict[float, Whitening],
                 match: SeqMatchConfig, pos_threshold_m: float) -> tuple[str, Whitening | None, dict[str, float]]:
    """The matching's frame descriptor best on val at the run's --seq_velocity (choose_matching):
    (label, whitening or None for raw, each candidate's val R@1)."""
    candidates = frame_candidates(whitenings)
    best, _, scores = choose_matching(frames["val"], frames["val_db"], candidates, {"": match}, pos_threshold_m)
    return best, candidates[best], {name: r1 for (name, _), r1 in scores.items()}


def fusion_on_val(model: SequenceDescriptor, frames: dict[str, RouteFrames], pos_threshold_m: float,
                  ) -> tuple[float, dict[float, float]]:
    """The fusion weight of the head with the matching, chosen on val: the head shortlists
    --seq_shortlist val_db windows per val window, matching scores them (trainable_vpr.fusion)."""
    val, val_db = frames["val"], frames["val_db"]
    shortlist = shortlist_scores(model.head, val, val_db, model.frames_from_features(val.features),
                                 model.frames_from_features(val_db.features), model.match, pos_threshold_m,
                                 model.match.shortlist)
    choice = choose_fusion_weight(*shortlist.choice_inputs())
    return choice.weight, choice.val_r1


def log_validation(logger: CsvLogger, record: EpochRecord) -> None:
    """The run log's rows of one validation (and of its epoch): the columns single-frame runs write."""
    if record.epoch > 0:
        logger.log("epoch", epoch=record.epoch, avg_train_loss=record.loss, epoch_time=record.seconds)
    recalls = record.val.recalls
    logger.log("validation", epoch=record.epoch, val_r1=recalls[1], val_r5=recalls.get(5), val_r10=recalls.get(10))
    line = ("epoch 0 (untrained sequence head)" if record.epoch == 0 else
            f"epoch {record.epoch}  loss {record.loss:.4f}  {record.seconds:.1f} s")
    print(f"{line}  val R@1 {recalls[1]:.3f} R@5 {recalls[5]:.3f} R@10 {recalls[10]:.3f}"
          f"{'  * best' if record.kept and record.epoch else ''}", flush=True)


def train_sequence(config: vpr.TrainConfig, on_validation: ValidationCallback | None = None) -> TrainResult:
    """The whole --head seqnet job (module docstring); returns where its results are."""
    started = time.perf_counter()
    vpr.set_determinism(config.seed)
    print_config(config)
    config = dataclasses.replace(config, supervision="gps")  # windows are positives by their end frames' positions
    train_table, val_table, by_label, val_db_table = load_splits(config)
    for table in (train_table, val_table, val_db_table):
        if table is not None:
            route_of(table, config.seq_max_gap)  # a table that is not a route: one line before any work
    log_dir = check_outputs(config)
    data = extract_training_data(config, train_table, val_table, by_label, None, val_db_table)
    frames = route_frames(config, data)
    train = frames["train"]
    whitenings = fit_frame_whitenings(train.features, train.xyz, config.pos_threshold_m, config.seq_proj_dim,
                                      SHRINKAGE_GRID, config.seed)
    starts = FRAME_STARTS if config.head_start == "auto" else (config.head_start,)
    head, head_config, start_scores = choose_sequence_start(
        head_config_of(config, train.features.shape[1]), train, frames["val"], frames["val_db"],
        config.pos_threshold_m, starts, seed=config.seed, whitenings=whitenings)
    start = {"chosen": start_label(head_config), "val_r1": start_scores}
    run_id = new_run_id(config.model, config.seed, log_dir, config.checkpoint_dir)
    logger = CsvLogger(log_dir / f"{run_id}.csv", LOG_COLUMNS + LOG_EXTRA_COLUMNS)
    logger.log("data", epoch=0, skipped_images=data.skipped_images,
               val_database=config.val_db_csv or config.train_csv, head_start=start_text(start))
    print(f"run {run_id}: {len(train.features)} train / {len(frames['val'].features)} val windows of "
          f"{config.seq_len} frames against {len(frames['val_db'].features)} val database windows; start "
          f"{start['chosen']}; log {logger.path}", flush=True)

    def on_epoch(record: EpochRecord) -> None:
        log_validation(logger, record)
        if record.epoch and on_validation is not None:
            on_validation(record.epoch, record.val)

    try:
        result = train_sequence_head(train, frames["val"], frames["val_db"], head, train_config_of(config),
                                     config.seed, on_epoch=on_epoch, recall_at=RECALL_AT)
    finally:
        logger.close()
    model, frame_config, chosen = sequence_model(config, frames, whitenings, result, start)
    checkpoint = save_sequence_checkpoint(config, data, model, frame_config, result, chosen, run_id, logger.path)
    alias = latest_alias_path(config.checkpoint_dir, config.model, config.seed)
    refresh_latest_alias(checkpoint, alias)
    best = window_recall(result.head, frames["val"], frames["val_db"], config.pos_threshold_m, RECALL_AT).recalls
    outcome = TrainResult(run_id, best, result.best_epoch, config.epochs, time.perf_counter() - started, checkpoint,
                          logger.path, None, False, data.skipped_images, result.start_val_r1, start,
                          latest_alias=alias)
    append_summary_row(log_dir / TRAINING_SUMMARY_NAME, summary_row(config, outcome))
    return outcome


def sequence_model(config: vpr.TrainConfig, frames: dict[str, RouteFrames], whitenings: dict[float, Whitening],
                   result: SequenceResult, start: dict[str, Any]
                   ) -> tuple[SequenceDescriptor, HeadConfig | None, dict[str, Any]]:
    """The sequence model the run hands over (its frame part without a backbone: the run has the
    features), its per-frame map's config, and what val chose: the matching's frame descriptor,
    the fusion weight."""
    match = config.seq_match_config()
    frame_name, whitening, frame_scores = match_frames(frames, whitenings, match, config.pos_threshold_m)
    frame_head, frame_config = frame_map(whitening)
    model = SequenceDescriptor(PlaceDescriptor(None, frame_head), result.head, match, config.seq_max_gap)
    weight, fusion_scores = fusion_on_val(model, frames, config.pos_threshold_m)
    model.fusion_weight = weight
    print(f"matching frames chosen on val: {frame_name}; fusion weight chosen on val: {weight:g} (val R@1 "
          + ", ".join(f"w={w:g} {r:.3f}" for w, r in fusion_scores.items()) + ")", flush=True)
    chosen = {"head_start": start, "match_frames": frame_name, "match_frames_val_r1": frame_scores,
              "velocity": [match.v_min, match.v_max], "fusion_weight": weight,
              "fusion_val_r1": {str(w): r for w, r in fusion_scores.items()}, "best_epoch": result.best_epoch,
              "start_val_r1": result.start_val_r1, "val_r1": list(result.val_r1)}
    return model, frame_config, chosen


def save_sequence_checkpoint(config: vpr.TrainConfig, data: TrainingData, model: SequenceDescriptor,
                             frame_config: HeadConfig | None, result: SequenceResult, chosen: dict[str, Any],
                             run_id: str, log_file: Path) -> Path:
    """{run_id}.pth: the kept state (the start unless an epoch beat it on val) as a sequence checkpoint."""
    path = checkpoint_path(config.checkpoint_dir, run_id)
    progress = {"best_val_recall": {1: result.best_val_r1}, "epoch": result.best_epoch,
                "epochs_completed": config.epochs}
    save_checkpoint(path, sequence_checkpoint_payload(
        model.frame.head, frame_config, result.head, data.backbone, config, model.sequence_settings(), chosen, run_id,
        log_file, progress, data.vocabulary))
    return path
