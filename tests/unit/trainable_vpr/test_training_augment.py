"""--augment_views K (vprkit/extraction/augment.py, train_vpr.py): augmented views of the training images,
extracted once and cached per view, sampled one per batch row per step; never for validation;
K=0 leaves training exactly as it was."""
from __future__ import annotations

import dataclasses
import math
import types

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import TINY_MODEL, TINY_SIZE, place_positions, write_embeddings_parquet, write_poses
from PIL import Image

from trainable_vpr import training
from trainable_vpr.data import Split, extract_training_data, load_splits
from trainable_vpr.runs import initial_head
from trainable_vpr.training import epoch_batches
import trainable_vpr as vpr
import vprkit.extraction.augment
import vprkit.extraction.features
from vprkit.extraction.augment import AugmentedView, AugmentRecipe, augment_image, extract_views, view_picks
from vprkit.cli import VPRError
from vprkit.cli.extraction_settings import ExtractionSettings
from vprkit.extraction.features import extract_features, iterate_descriptors
from vprkit.tables.places import load_poses

N_PLACES, PER_PLACE, BATCH = 6, 4, 8


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("augment_data")
    train = write_poses(root, place_positions(N_PLACES, PER_PLACE, seed=3), name="train.csv", seed=3)
    val = write_poses(root, place_positions(N_PLACES, 2, seed=4), name="val.csv", seed=4)
    return types.SimpleNamespace(root=root, train=train, val=val)


@pytest.fixture
def photo(tmp_path):
    """A 64 x 48 image with structure (a gradient and a square), so crops and colours show."""
    y, x = np.mgrid[0:48, 0:64]
    pixels = np.stack([x * 4, y * 5, (x + y) * 2], axis=-1).clip(0, 255).astype(np.uint8)
    pixels[10:30, 20:40] = (250, 240, 30)
    path = tmp_path / "photo.png"
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def spy(monkeypatch):
    """Records (paths, view) of every call that runs the backbone."""
    calls: list[tuple[list[str], object]] = []

    def wrapper(backbone, paths, options, desc, precision, failed=None, view=None):
        calls.append((list(paths), view))
        yield from iterate_descriptors(backbone, paths, options, desc, precision, failed, view)

    monkeypatch.setattr(vprkit.extraction.features, "iterate_descriptors", wrapper)
    return calls


def _options(tmp_path) -> ExtractionSettings:
    return ExtractionSettings(extract_batch_size=4, num_workers=0, device="cpu", cache_dir=str(tmp_path / "cache"))


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


# --------------------------------------------------------------------------------------------
# the views
# --------------------------------------------------------------------------------------------
def test_views_differ_from_the_original_and_from_each_other(photo):
    original = Image.open(photo).convert("RGB")
    views = [AugmentedView(k)(original, str(photo)) for k in (1, 2, 3)]
    sized = [_pixels(v.resize(original.size)) for v in views]
    for view in sized:
        assert np.abs(view - _pixels(original)).mean() > 5
    assert np.abs(sized[0] - sized[1]).mean() > 5 and np.abs(sized[0] - sized[2]).mean() > 5
    # view 2 is night-like (every second view): darker than the original and than its day neighbours
    assert _pixels(views[1]).mean() < 0.7 * _pixels(original).mean()
    assert _pixels(views[1]).mean() < min(_pixels(views[0]).mean(), _pixels(views[2]).mean())
    # a crop: never larger than the image, the area within the recipe's scale
    for view in views:
        w, h = view.size
        assert w <= 64 and h <= 48 and 0.45 * 64 * 48 <= w * h <= 64 * 48


def test_views_are_reproducible_and_independent_of_global_random_state(photo):
    original = Image.open(photo).convert("RGB")
    torch.manual_seed(0)
    first = _pixels(AugmentedView(1)(original, str(photo)))
    state = torch.random.get_rng_state()
    torch.manual_seed(12345)
    np.random.seed(7)
    second = _pixels(AugmentedView(1)(original, "/elsewhere/photo.png"))  # same file name, other folder
    assert np.array_equal(first, second)
    torch.manual_seed(0)
    AugmentedView(2)(original, str(photo))
    assert torch.equal(torch.random.get_rng_state(), state)  # drawing a view leaves the global RNG alone
    other_recipe = AugmentRecipe(seed=1)
    assert not np.array_equal(first, _pixels(AugmentedView(1, other_recipe)(original, str(photo))))
    assert not np.array_equal(first, _pixels(augment_image(original, AugmentRecipe(), 1, seed=99)))


def test_view_keys_name_index_recipe_and_seed():
    keys = {AugmentedView(1).key, AugmentedView(2).key, AugmentedView(1, AugmentRecipe(seed=1)).key,
            AugmentedView(1, AugmentRecipe(brightness=0.5)).key}
    assert len(keys) == 4
    assert AugmentedView(1).key == AugmentedView(1, AugmentRecipe()).key
    with pytest.raises(ValueError):
        AugmentedView(0)


# --------------------------------------------------------------------------------------------
# the cache
# --------------------------------------------------------------------------------------------
def test_views_are_cached_per_view_and_recipe(dataset, tmp_path, tiny_backbone, spy):
    table = load_poses(dataset.train)
    original = extract_features(tiny_backbone, table, _options(tmp_path), "train")
    spy.clear()
    views = extract_views(tiny_backbone, table, _options(tmp_path), 2)
    assert views.shape == (2, len(table), tiny_backbone.info.feature_dim)
    assert [len(paths) for paths, _ in spy] == [len(table), len(table)]
    assert [view.index for _, view in spy] == [1, 2]
    assert not np.allclose(views[0], original) and not np.allclose(views[1], original)
    assert not np.allclose(views[0], views[1])
    spy.clear()
    again = extract_views(tiny_backbone, table, _options(tmp_path), 2)
    assert spy == []  # nothing extracted: every view came from the cache
    np.testing.assert_array_equal(again, views)
    assert np.array_equal(extract_features(tiny_backbone, table, _options(tmp_path)), original)  # originals intact
    spy.clear()
    three = extract_views(tiny_backbone, table, _options(tmp_path), 3)  # views 1, 2 reused: same pixels
    assert [view.index for _, view in spy] == [3]
    np.testing.assert_array_equal(three[:2], views)
    spy.clear()
    other = extract_views(tiny_backbone, table, _options(tmp_path), 2, AugmentRecipe(seed=5))
    assert len(spy) == 2 and not np.allclose(other, views)  # another recipe never shares an entry


def test_views_without_cache_equal_the_cached_ones(dataset, tmp_path, tiny_backbone):
    table = load_poses(dataset.train)
    cached = extract_views(tiny_backbone, table, _options(tmp_path), 1)
    uncached = extract_views(tiny_backbone, table, dataclasses.replace(_options(tmp_path), no_cache=True), 1)
    np.testing.assert_allclose(uncached, cached, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------
def test_view_picks_are_deterministic_cover_the_views_and_vary_by_step():
    picks = view_picks(42, 1, 1, 1000, 3)
    assert picks.shape == (1000,) and set(np.unique(picks)) == {0, 1, 2, 3}
    counts = np.bincount(picks, minlength=4)
    assert counts.min() > 200  # uniform over {original, 3 views}: 250 each expected
    np.testing.assert_array_equal(picks, view_picks(42, 1, 1, 1000, 3))
    assert not np.array_equal(picks, view_picks(42, 1, 2, 1000, 3))
    assert not np.array_equal(picks, view_picks(42, 2, 1, 1000, 3))
    assert not np.array_equal(picks, view_picks(7, 1, 1, 1000, 3))
    np.testing.assert_array_equal(view_picks(42, 1, 1, 16, 0), np.zeros(16, dtype=np.int64))


def test_batch_features_read_one_view_per_row():
    features = np.arange(5 * 2, dtype=np.float32).reshape(5, 2)
    views = np.stack([features + 100, features + 200])
    split = Split(None, features, None, np.zeros(5, dtype=np.int64), views)
    batch = np.array([4, 0, 2, 2])
    rows = split.batch_features(batch, np.array([0, 1, 2, 0]))
    np.testing.assert_array_equal(rows, [features[4], features[0] + 100, features[2] + 200, features[2]])
    np.testing.assert_array_equal(split.batch_features(batch), features[batch])
    np.testing.assert_array_equal(features, np.arange(10, dtype=np.float32).reshape(5, 2))  # never written to


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
def _config(dataset, out, **changes) -> vpr.TrainConfig:
    values = dict(train_csv=str(dataset.train), val_csv=str(dataset.val), model=TINY_MODEL, weights="random",
                  image_size=TINY_SIZE, epochs=2, batch_size=BATCH, num_workers=0, device="cpu", seed=42,
                  cache_dir=str(dataset.root / "cache"), log_dir=str(out / "logs"), checkpoint_dir=str(out / "models"))
    return vpr.TrainConfig(**{**values, **changes})


def _log(result) -> pd.DataFrame:
    log = pd.read_csv(result.log_file)
    cols = ["event", "epoch", "batch", "train_loss", "triplet_loss", "contrastive_loss", "val_loss", "val_r1"]
    return log.loc[log.event.isin(["batch", "validation"]), cols].reset_index(drop=True)


@pytest.fixture(scope="module")
def plain_run(dataset, tmp_path_factory):
    return _log(training.train(_config(dataset, tmp_path_factory.mktemp("plain"))))


def test_k0_logs_exactly_what_training_without_the_flag_logs(dataset, tmp_path, plain_run, monkeypatch):
    """Views extracted but never picked (picks forced to the originals): bit-identical losses and
    recalls, so extracting views touches neither the random streams, mining nor the head start."""
    monkeypatch.setattr(training, "view_picks", lambda seed, epoch, batch, rows, views: np.zeros(rows, np.int64))
    unpicked = training.train(_config(dataset, tmp_path / "a", augment_views=2))
    pd.testing.assert_frame_equal(_log(unpicked), plain_run, check_exact=True)
    k0 = training.train(_config(dataset, tmp_path / "b", augment_views=0))
    pd.testing.assert_frame_equal(_log(k0), plain_run, check_exact=True)


def test_views_change_training_only_and_are_never_validated(dataset, tmp_path, plain_run, spy):
    cache = str(tmp_path / "cache")  # empty: this run extracts everything it reads
    first = training.train(_config(dataset, tmp_path / "a", augment_views=2, cache_dir=cache))
    val_paths = set(load_poses(dataset.val).paths)
    viewed = [paths for paths, view in spy if view is not None]
    assert viewed and all(not (set(paths) & val_paths) for paths in viewed)
    log = _log(first)
    batches = log.event == "batch"
    assert not np.allclose(log.loc[batches, "train_loss"], plain_run.loc[batches, "train_loss"])
    # epoch 0 validates the untrained head, started on the originals: exactly the run without views
    pd.testing.assert_frame_equal(log[(log.event == "validation") & (log.epoch == 0)],
                                  plain_run[(plain_run.event == "validation") & (plain_run.epoch == 0)],
                                  check_exact=True)
    spy.clear()
    second = training.train(_config(dataset, tmp_path / "b", augment_views=2, cache_dir=cache))
    assert spy == []  # a second run extracts nothing: originals and views come from the cache
    pd.testing.assert_frame_equal(_log(second), log, check_exact=True)  # same seed: same losses
    saved = vpr.load_checkpoint(str(first.final_checkpoint))
    assert saved["config"]["augment_views"] == 2


def test_mining_and_head_start_read_the_originals(dataset, tmp_path):
    """With views that are all NaN, the head start and the mined batches are those of no views."""
    config = _config(dataset, tmp_path, augment_views=2)
    train_table, val_table, by_label, _ = load_splits(config)
    data = extract_training_data(config, train_table, val_table, by_label)
    assert data.train.views.shape == (2, *data.train.features.shape) and data.val.views is None
    nan_views = np.full_like(data.train.views, np.nan)
    poisoned = dataclasses.replace(data, train=dataclasses.replace(data.train, views=nan_views))
    clean = dataclasses.replace(data, train=dataclasses.replace(data.train, views=None))
    heads = [initial_head(config, d)[0] for d in (poisoned, clean)]
    for a, b in zip(heads[0].state_dict().values(), heads[1].state_dict().values()):
        assert torch.equal(a, b) and torch.isfinite(a).all()
    batches = [epoch_batches(config, heads[0], d.train, np.random.default_rng(0)) for d in (poisoned, clean)]
    assert len(batches[0]) == math.ceil(len(data.train) / BATCH)
    for a, b in zip(*batches):
        np.testing.assert_array_equal(a, b)


def test_bad_augment_views_values(dataset, tmp_path):
    with pytest.raises(VPRError, match="--augment_views -1"):
        vpr.validate_train_config(_config(dataset, tmp_path, augment_views=-1))
    parquet = write_embeddings_parquet(tmp_path / "train.parquet")
    with pytest.raises(VPRError, match="no images to augment"):
        vpr.validate_train_config(_config(dataset, tmp_path, augment_views=2, train_csv=str(parquet),
                                          val_csv=str(parquet)))
