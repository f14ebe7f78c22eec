"""The data a training run learns from: both splits (and the validation database) loaded and
checked, then their frozen features (the cache, or the embeddings parquets) with the places their
batches are drawn from. train_vpr.py calls it; run_experiment and the benches use it through it."""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

import trainable_vpr as vpr
from trainable_vpr import blocks as trained_blocks
from trainable_vpr.checkpoints import checkpoint_vocabulary, embeddings_backbone
from vprkit.extraction.augment import extract_views
from vprkit.cli import VPRError
from vprkit.extraction.features import extract_both, extract_table
from vprkit.cli.extraction_settings import extraction_settings, pooling_config
from vprkit.extraction.device import release_other_ranks
from vprkit.tables.pairs import check_query_split, check_trainable, group_places, uses_labels, warn_shared_images
from vprkit.tables.places import PlaceTable
from vprkit.tables.load import load_table


@dataclass
class Split:
    """One side of training: its table, its frozen features, the place labels that supervise
    it (None: GPS positions do) and the places its batches are drawn from."""

    table: PlaceTable
    features: np.ndarray
    labels: np.ndarray | None
    places: np.ndarray  # place of each image, for batches (group_places)
    views: np.ndarray | None = None  # --augment_views K: K x N x D features of the augmented views (training only)

    @classmethod
    def of(cls, table: PlaceTable, features: np.ndarray, by_label: bool, pos_threshold_m: float) -> "Split":
        labels = table.labels if by_label else None
        return cls(table, features, labels, group_places(table.xyz, labels, pos_threshold_m))

    @property
    def xyz(self) -> np.ndarray | None:
        return self.table.xyz

    def __len__(self) -> int:
        return len(self.table)

    def take(self, batch: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(positions, labels) of a batch, either None when not used."""
        return (None if self.xyz is None else self.xyz[batch]), (None if self.labels is None else self.labels[batch])

    def batch_features(self, batch: np.ndarray, picks: np.ndarray | None = None) -> np.ndarray:
        """The frozen features of a batch's rows: row j reads view picks[j] of its image (0: the
        original; vprkit.extraction.augment.view_picks), or the originals when no picks are given."""
        rows = self.features[batch]
        if picks is None or self.views is None or not picks.any():
            return rows
        augmented = picks > 0
        rows[augmented] = self.views[picks[augmented] - 1, batch[augmented]]
        return rows


@dataclass
class TrainingData:
    """What training needs after loading: the backbone's identity (the checkpoint's
    `backbone` field) and both splits with their features."""

    backbone: dict[str, Any]
    train: Split
    val: Split
    vocabulary: np.ndarray | None = None  # --pooling vlad: the centroids, stored in every checkpoint
    val_db: Split | None = None  # --val_db_csv: the validation database (None: the training images)
    tail: trained_blocks.BlockTail | None = None  # --train_blocks: the trained blocks (features: their cached input)

    @property
    def val_database(self) -> Split:
        """The database validation searches: --val_db_csv, else the training images."""
        return self.train if self.val_db is None else self.val_db

    @property
    def skipped_images(self) -> int:
        return sum(len(s.table.skipped) for s in (self.train, self.val, self.val_db) if s is not None)


def load_splits(config: vpr.TrainConfig) -> tuple[PlaceTable, PlaceTable, bool, PlaceTable | None]:
    """Both splits (poses CSVs or embeddings parquets), whether place labels supervise them and
    the validation database (--val_db_csv; None: the training images), checked: every input
    problem is found here, before any output is written."""
    train = load_table(config.train_csv, config.image_root, config.camera_id, config.on_bad_image)
    val = load_table(config.val_csv, config.image_root, config.camera_id, config.on_bad_image)
    val_db = None if not config.val_db_csv else load_table(config.val_db_csv, config.image_root, config.camera_id,
                                                           config.on_bad_image)
    by_label = uses_labels(config.supervision, train, val, *([val_db] if val_db is not None else []))
    check_splits(config, train, val, by_label, val_db)
    warn_shared_images(train if val_db is None else val_db, val, "validation")
    return train, val, by_label, val_db


def check_splits(config: vpr.TrainConfig, train: PlaceTable, val: PlaceTable, by_label: bool,
                 val_db: PlaceTable | None = None) -> None:
    """Places with positives to learn from, and validation queries with a positive in the
    validation database (--val_db_csv, else the training images)."""
    check_trainable(train, config.pos_threshold_m, train.labels if by_label else None, config.neg_threshold_m)
    check_query_split(train if val_db is None else val_db, val, config.pos_threshold_m, by_label)


EMBEDDINGS_MODEL = "embeddings"  # a run on embeddings whose backbone neither the parquet nor --model names


def named_after_embeddings(config: vpr.TrainConfig, train: PlaceTable, val: PlaceTable) -> vpr.TrainConfig:
    """The config of a run on embeddings parquets with --model set to the backbone that made
    them (the parquets' `backbone` column), so that the run id, checkpoint names and the
    checkpoint's backbone say what was used: never the default --model, which was not. The
    default counts as not given; any other --model must agree with the parquets. Images: as is."""
    if train.embeddings is None:
        return config
    if train.backbone and val.backbone and train.backbone != val.backbone:
        raise VPRError(f"{config.val_csv}: embeddings of backbone {val.backbone}, but {config.train_csv} holds "
                       f"{train.backbone}'s; both must come from the same backbone")
    saved = train.backbone or val.backbone
    given = config.model if config.model != DEFAULT_MODEL else None
    if given and saved and given != saved:
        raise VPRError(f"--model {given}: {config.train_csv} holds embeddings of backbone {saved}; "
                       f"drop --model or give embeddings of {given}")
    return dataclasses.replace(config, model=given or saved or EMBEDDINGS_MODEL)


DEFAULT_MODEL = vpr.DEFAULT_MODEL


def extract_training_data(config: vpr.TrainConfig, train: PlaceTable, val: PlaceTable, by_label: bool,
                          resumed: dict | None = None, val_db: PlaceTable | None = None) -> TrainingData:
    """Both splits with their features: embeddings parquets as they are, poses CSVs through
    the frozen backbone (and the cache); with --on_bad_image skip, images that cannot be
    decoded are left out, and the splits checked again. A resumed --pooling vlad run pools with
    its checkpoint's vocabulary, never a refitted one. The validation database (--val_db_csv)
    goes through the same frozen model and cache."""
    split = lambda table, features: Split.of(table, features, by_label, config.pos_threshold_m)  # noqa: E731
    if train.embeddings is not None:
        for other, source in ((val, config.val_csv), (val_db, config.val_db_csv)):
            if other is not None and train.embeddings.shape[1] != other.embeddings.shape[1]:
                raise VPRError(f"{source}: {other.embeddings.shape[1]}-dim embeddings, but {config.train_csv} has "
                               f"{train.embeddings.shape[1]}; both must come from the same backbone")
        backbone = embeddings_backbone(config.model, config.train_csv, train.embeddings.shape[1])
        return TrainingData(backbone, split(train, train.embeddings), split(val, val.embeddings),
                            val_db=None if val_db is None else split(val_db, val_db.embeddings))
    backbone = vpr.create_pooled_backbone(config.model, config.weights, config.image_size, pooling_config(config),
                                          train.paths, extraction_settings(config),
                                          checkpoint_vocabulary(resumed) if resumed else None)
    if config.head in vpr.LOCAL_HEADS:  # the head aggregates: the cache holds the local features (float16)
        backbone = vpr.local_backbone(backbone, config.feature_layer, config.local_features_per_image)
        print(vpr.local_features_line(backbone), flush=True)
    tail = None
    if config.train_blocks:  # the cache holds the input of the last N blocks (float16); they train on it
        tail = trained_blocks.BlockTail(backbone.model, config.train_blocks)
        backbone = trained_blocks.block_input_backbone(backbone, config.train_blocks)
        print(f"train_blocks: the last {config.train_blocks} of {len(trained_blocks.block_list(backbone.model))} "
              f"blocks train at --backbone_lr {config.backbone_lr:g}; their input is cached", flush=True)
    train, train_features, val, val_features = extract_both(
        backbone, train, val, extraction_settings(config), ("train", "val"), config.on_bad_image)
    val_db_features = None
    if val_db is not None:
        val_db, val_db_features = extract_table(backbone, val_db, extraction_settings(config), "val_db",
                                                config.on_bad_image)
    # views of the training images only, after --on_bad_image skip left out the ones that do not decode
    views = extract_views(backbone, train, extraction_settings(config), config.augment_views) \
        if config.augment_views else None
    if tail is None and release_other_ranks() != 0:
        sys.exit(0)  # torchrun: the other ranks only shared the extraction; rank 0 trains on the cache
    if train.skipped or val.skipped or (val_db is not None and val_db.skipped):
        check_splits(config, train, val, by_label, val_db)
    train_split = split(train, train_features)
    train_split.views = views
    # a --train_blocks checkpoint names the frozen backbone (its trained blocks are stored apart)
    info = backbone.info if tail is None else dataclasses.replace(backbone.info, pooling="backbone")
    return TrainingData(info.as_dict(), train_split, split(val, val_features), backbone.vocabulary,
                        None if val_db is None else split(val_db, val_db_features), tail)
