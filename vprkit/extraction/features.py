"""Frozen-backbone features: each image goes through the backbone once per configuration
(vprkit.extraction.cache.BackboneInfo is the cache key); epochs, validation, evaluation and later
runs read the cache. Under torchrun every rank extracts its share into the shared cache
(vprkit.extraction.device)."""
from __future__ import annotations

import sys
from typing import Iterable, Sequence

import numpy as np
import torch

from vprkit.cli import VPRError
from vprkit.cli.extraction_settings import ExtractionSettings, extraction_settings
from vprkit.extraction.cache import (
    Backbone,
    BackboneInfo,
    CachedRows,
    FeatureCache,
    ImageView,
    cache_keys,
    is_local,
    take_rows,
)
from vprkit.extraction.device import (
    distributed_rank_and_world,
    keep_freed_memory_for_reuse,
    rank_zero_list,
    resolve_device,
    resolve_precision,
)
from vprkit.extraction.preprocessing import backbone_input, image_tensor
from vprkit.retrieval.evaluation import Descriptors, check_queries
from vprkit.tables.images import open_rgb
from vprkit.tables.places import PlaceTable, check_on_bad_image


class _ImageDataset(torch.utils.data.Dataset):
    """Decode upright (EXIF orientation applied: open_rgb) to a uint8 tensor, then resize (the whole
    view, no crop) and normalise as the model's forward does (vprkit.extraction.preprocessing.backbone_input),
    each image on its own, so images of any size share a batch; errors are returned, not raised,
    so the main process can name the bad file."""

    def __init__(self, paths: Sequence[str], info: BackboneInfo, view: ImageView | None = None):
        self.paths = list(paths)
        self.view = view  # an augmented view (vprkit.extraction.augment), applied to the decoded image
        self.size = info.image_size
        self.mean = torch.tensor(info.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(info.std).view(1, 3, 1, 1)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        try:
            image = open_rgb(self.paths[index])
            if self.view is not None:
                image = self.view(image, self.paths[index])
            return backbone_input(image_tensor(image)[None], self.size, self.mean, self.std)[0], index, ""
        except Exception as exc:  # noqa: BLE001 - reported with the file name by the caller
            return torch.zeros(3, self.size, self.size), index, f"{type(exc).__name__}: {exc}"


def iterate_descriptors(backbone: Backbone, paths: Sequence[str], options: ExtractionSettings, desc: str,
                         precision: str, failed: list[tuple[str, str]] | None = None,
                         view: ImageView | None = None) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """Yield (row indices, descriptors) batch by batch, with a progress bar. An image that
    cannot be decoded is an error naming it, or, given a `failed` list, appended to it as
    (path, reason) and left out of the batch."""
    from tqdm import tqdm

    device = resolve_device(options.device)
    if device.type == "cpu":
        keep_freed_memory_for_reuse()
    model = backbone.model.to(device)
    # channels-last: the layout oneDNN and cuDNN convolutions run fastest in (1.38x for
    # effnet_lite0 on this project's CPU, bench/bench_extraction.py); a no-op for ViTs.
    memory_format = torch.channels_last
    model = model.to(memory_format=memory_format)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    loader = torch.utils.data.DataLoader(
        _ImageDataset(paths, backbone.info, view), batch_size=options.extract_batch_size, shuffle=False,
        num_workers=options.num_workers, persistent_workers=False, pin_memory=device.type == "cuda",
    )
    with torch.inference_mode(), torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        for images, index, errors in tqdm(loader, desc=desc, unit="batch", file=sys.stderr, dynamic_ncols=True,
                                          disable=None):
            bad = [(int(i), e) for i, e in zip(index, errors) if e]
            if bad and failed is None:
                row, err = bad[0]
                if len(bad) == len(errors) and int(index[0]) == 0 and len(bad) > 1:
                    # not one bad file: a wrong folder or file type, which skipping would not mend
                    raise VPRError(f"image {paths[row]}: cannot be read as an image ({err}), nor can any of the first "
                                   f"{len(bad)}; check --image_root (or the CSV's folder) and that the files are "
                                   "images")
                raise VPRError(f"image {paths[row]}: cannot be read as an image ({err}); fix or remove its row, "
                               f"or --on_bad_image skip to leave such images out")
            if bad:
                failed.extend((paths[row], err) for row, err in bad)
                keep = torch.tensor([not e for e in errors])
                images, index = images[keep], index[keep]
                if not len(index):
                    continue
            images = images.to(device, non_blocking=True, memory_format=memory_format)
            feats = backbone.descriptor(images).float().cpu().numpy()
            check_finite(feats, [paths[int(i)] for i in index], backbone.info.name)
            yield index.numpy(), feats


def check_finite(features: np.ndarray, paths: Sequence[str], model: str) -> None:
    """Features of a model are finite, or one line naming the images (never cached as features)."""
    bad = [path for path, ok in zip(paths, np.isfinite(features.reshape(len(features), -1)).all(axis=1)) if not ok]
    if bad:
        raise VPRError(f"features [{model}]: NaN or infinite descriptors for {len(bad)} image(s) ({', '.join(bad[:3])}"
                       f"{', ...' if len(bad) > 3 else ''}); with --precision fp16/bf16 try fp32, else check the "
                       "weights")


def _extract_into_cache(backbone: Backbone, table: PlaceTable, keys: list[str], missing: list[int], cache: FeatureCache,
                        options: ExtractionSettings, precision: str, desc: str,
                        failed: list[tuple[str, str]] | None, view: ImageView | None = None) -> None:
    """Extract the missing images and store them shard by shard (chunk_size images each)."""
    pending_rows: list[int] = []
    pending_feats: list[np.ndarray] = []
    for rows, feats in iterate_descriptors(backbone, [table.paths[i] for i in missing], options, desc, precision,
                                            failed, view):
        pending_rows.extend(missing[r] for r in rows)
        pending_feats.append(feats)
        if len(pending_rows) >= options.chunk_size:
            cache.add([keys[i] for i in pending_rows], np.concatenate(pending_feats))
            pending_rows, pending_feats = [], []
    if pending_rows:
        cache.add([keys[i] for i in pending_rows], np.concatenate(pending_feats))


def extract_features(backbone: Backbone, table: PlaceTable, options: ExtractionSettings, label: str = "",
                     failed: list[tuple[str, str]] | None = None, view: ImageView | None = None) -> np.ndarray:
    """Backbone descriptors of every image in the table (N x D float32), through the cache.

    Each image goes through the backbone once per configuration: later calls (epochs,
    validation, evaluation, later runs) read the cache. Prints how many came from it.
    Under torchrun (`torchrun --nproc_per_node K train_vpr.py ...`), each rank extracts its
    share of the missing images (rank 0's list of them: rank_zero_list) into the shared cache:
    shards are separate files, so ranks never write the same file, and the cache index is the
    union of every rank's shards (the merge).
    After the barrier every rank reads the whole table from the cache.
    An unreadable image is an error naming it; given a `failed` list, it is appended there as
    (path, reason) instead and its row of the result is NaN (extract_table drops such rows).
    `view`: the features of that view of each image (vprkit.extraction.augment), cached under their own keys.
    """
    name = f"{backbone.info.name} {label}".strip()
    rank, world = distributed_rank_and_world()
    precision = resolve_precision(options.precision, resolve_device(options.device))
    if options.cache_folder is None:
        if world > 1:
            raise VPRError("--no_cache cannot be combined with torchrun: the ranks share their work through the cache")
        out: np.ndarray | None = None
        for rows, feats in iterate_descriptors(backbone, table.paths, options, f"extract {name}", precision, failed,
                                               view):
            out = np.full((len(table), *feats.shape[1:]), np.nan, np.float32) if out is None else out
            out[rows] = feats
        print(f"features [{name}]: {len(table)} extracted (cache disabled)", flush=True)
        return np.full((len(table), backbone.info.feature_dim), np.nan, np.float32) if out is None else out
    local = is_local(backbone.info)
    cache_dtype = "float16" if local else options.cache_dtype  # local features: float16 (half the disk, streamed)
    cache = FeatureCache(options.cache_folder, backbone.info, cache_dtype, precision)
    keys = cache_keys(table.paths, view)
    # Under torchrun every rank splits rank 0's list: a rank indexing later would already see the
    # shards the others wrote, and two different lists split in turns leave images to no rank.
    missing = rank_zero_list([i for i, k in enumerate(keys) if k not in cache], rank, world)
    if rank == 0:
        print(f"features [{name}]: {len(keys) - len(missing)}/{len(keys)} from cache, extracting {len(missing)}"
              + (f" over {world} processes" if world > 1 and missing else ""), flush=True)
    if missing:
        _extract_into_cache(backbone, table, keys, missing[rank::world], cache, options, precision,
                            f"extract {name}" + (f" [rank {rank}]" if world > 1 else ""), failed, view)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        cache = FeatureCache(options.cache_folder, backbone.info, cache_dtype, precision)  # every rank's shards
    if local:  # streamed from the shards, never read whole (CachedRows); unreadable images: no row
        readable = [k for k in keys if k in cache]
        if failed is not None:
            reported = {image for image, _ in failed}
            failed.extend((table.paths[i], "unreadable (reported by another process)") for i in range(len(keys))
                          if keys[i] not in cache and table.paths[i] not in reported)
        elif len(readable) < len(keys):
            raise VPRError(f"features [{name}]: {len(keys) - len(readable)} images missing from the cache after "
                           "extraction")
        row_shape = cache.row_shape(readable[0]) if readable else (0, backbone.info.feature_dim)
        return CachedRows(cache, [k if k in cache else readable[0] for k in keys], row_shape)
    if failed is None:
        return cache.get(keys)
    readable = np.array([i for i, key in enumerate(keys) if key in cache], dtype=np.int64)
    reported = {image for image, _ in failed}
    failed.extend((table.paths[i], "unreadable (reported by another process)") for i in range(len(keys))
                  if keys[i] not in cache and table.paths[i] not in reported)
    good = (cache.get([keys[i] for i in readable]) if len(readable)
            else np.zeros((0, backbone.info.feature_dim), np.float32))
    out = np.full((len(keys), *good.shape[1:]), np.nan, np.float32)
    out[readable] = good
    return out


def extract_table(backbone: Backbone, table: PlaceTable, options: ExtractionSettings, label: str = "",
                  on_bad_image: str = "error") -> tuple[PlaceTable, np.ndarray]:
    """extract_features honouring --on_bad_image: with "skip", images that cannot be decoded
    are left out of both the table and the features (and counted in the table's `skipped`)."""
    check_on_bad_image(on_bad_image)
    if on_bad_image == "error":
        return table, extract_features(backbone, table, options, label)
    failed: list[tuple[str, str]] = []
    features = extract_features(backbone, table, options, label, failed)
    return table.skip(failed), take_rows(features, table.rows_without(image for image, _ in failed))


def extract_both(backbone: Backbone, first: PlaceTable, second: PlaceTable, options: ExtractionSettings,
                 labels: tuple[str, str],
                 on_bad_image: str = "error") -> tuple[PlaceTable, np.ndarray, PlaceTable, np.ndarray]:
    """A script's two tables (train and val, database and queries) through extract_table (under
    torchrun, each rank extracts its share into the shared cache and reads both tables back)."""
    first, first_features = extract_table(backbone, first, options, labels[0], on_bad_image)
    second, second_features = extract_table(backbone, second, options, labels[1], on_bad_image)
    return first, first_features, second, second_features


def frozen_descriptors(options: ExtractionSettings, backbone: Backbone | None, database: PlaceTable,
                       queries: PlaceTable, pos_threshold_m: float,
                       supervision: str = "auto") -> tuple[PlaceTable, PlaceTable, Descriptors]:
    """The frozen descriptors: the parquets' embeddings, or the backbone's features (cache);
    with --on_bad_image skip, images that cannot be decoded are left out of tables and features."""
    if backbone is None:
        return database, queries, Descriptors(database.embeddings, queries.embeddings)
    database, db_features, queries, q_features = extract_both(
        backbone, database, queries, extraction_settings(options), ("database", "queries"), options.on_bad_image)
    if database.skipped or queries.skipped:
        check_queries(database, queries, pos_threshold_m, supervision)
    return database, queries, Descriptors(db_features, q_features)
