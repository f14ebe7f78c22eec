"""The feature cache (DESIGN.md §1): each image through the backbone once per configuration,
invalidated per image, other configurations in other folders, broken shards rebuilt."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import TINY_MODEL, TINY_SIZE, write_jpeg, write_poses
import vprkit.extraction.features
import trainable_vpr as vpr
from vprkit.cli import VPRError
from vprkit.cli.extraction_settings import ExtractionSettings, extraction_settings
from vprkit.extraction.cache import FeatureCache
from vprkit.extraction.features import _ImageDataset, extract_features, iterate_descriptors
from vprkit.tables.places import load_poses

N = 10


@pytest.fixture
def table(tmp_path):
    csv = write_poses(tmp_path / "data", [(i * 30.0, 0.0) for i in range(N)])
    return load_poses(csv)


def _options(tmp_path, **kwargs):
    values = dict(extract_batch_size=4, num_workers=0, device="cpu", cache_dir=str(tmp_path / "cache"))
    values.update(kwargs)
    return ExtractionSettings(**values)


@pytest.fixture
def spy(monkeypatch):
    """Records the image paths that go through the backbone."""
    seen: list[str] = []
    original = iterate_descriptors

    def wrapper(backbone, paths, options, desc, *rest):
        seen.extend(paths)
        yield from original(backbone, paths, options, desc, *rest)

    monkeypatch.setattr(vprkit.extraction.features, "iterate_descriptors", wrapper)
    return seen


def _counts(out: str) -> tuple[int, int, int]:
    match = re.search(r"(\d+)/(\d+) from cache, extracting (\d+)", out)
    assert match, out
    return tuple(int(g) for g in match.groups())


def test_second_call_reads_everything_from_cache(tmp_path, table, tiny_backbone, spy, capsys):
    first = extract_features(tiny_backbone, table, _options(tmp_path), "train")
    assert _counts(capsys.readouterr().out) == (0, N, N)
    assert first.shape == (N, tiny_backbone.info.feature_dim) and first.dtype == np.float32
    assert np.isfinite(first).all() and len({row.tobytes() for row in first}) == N
    assert len(spy) == N
    spy.clear()
    second = extract_features(tiny_backbone, table, _options(tmp_path), "train")
    assert f"{N}/{N} from cache" in capsys.readouterr().out
    assert spy == []  # nothing went through the backbone
    np.testing.assert_array_equal(first, second)


def test_cached_features_equal_direct_backbone_output(tmp_path, table, tiny_backbone):
    feats = extract_features(tiny_backbone, table, _options(tmp_path))
    dataset = _ImageDataset(table.paths[:3], tiny_backbone.info)
    images = torch.stack([dataset[i][0] for i in range(3)])
    with torch.no_grad():
        direct = vpr.backbone_descriptor(tiny_backbone.model, images).numpy()
    np.testing.assert_allclose(feats[:3], direct, rtol=1e-4, atol=1e-5)


def test_touching_an_image_re_extracts_only_that_image(tmp_path, table, tiny_backbone, spy, capsys):
    first = extract_features(tiny_backbone, table, _options(tmp_path))
    capsys.readouterr()
    spy.clear()
    touched = table.paths[3]
    stat = os.stat(touched)
    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    second = extract_features(tiny_backbone, table, _options(tmp_path))
    assert _counts(capsys.readouterr().out) == (N - 1, N, 1)
    assert spy == [touched]
    np.testing.assert_allclose(second, first, rtol=1e-5, atol=1e-6)


def test_changed_content_gives_new_features(tmp_path, table, tiny_backbone, spy, capsys):
    first = extract_features(tiny_backbone, table, _options(tmp_path))
    capsys.readouterr()
    spy.clear()
    write_jpeg(Path(table.paths[7]), seed=12345, size=40)  # another picture
    second = extract_features(tiny_backbone, table, _options(tmp_path))
    assert _counts(capsys.readouterr().out) == (N - 1, N, 1)
    assert spy == [table.paths[7]]
    others = [i for i in range(N) if i != 7]
    np.testing.assert_array_equal(second[others], first[others])
    assert not np.allclose(second[7], first[7], atol=1e-4)


def test_other_image_size_or_weights_use_another_folder(tmp_path, table, tiny_backbone, capsys):
    cache_dir = tmp_path / "cache"
    base = FeatureCache(cache_dir, tiny_backbone.info).dir
    assert FeatureCache(cache_dir, tiny_backbone.info).dir == base  # stable key
    bigger = vpr.create_backbone(TINY_MODEL, weights="random", image_size=TINY_SIZE + 16)
    assert FeatureCache(cache_dir, bigger.info).dir != base
    weights_file = tmp_path / "w.pth"
    torch.save(tiny_backbone.model.state_dict(), weights_file)
    from_file = vpr.create_backbone(TINY_MODEL, weights=str(weights_file), image_size=TINY_SIZE)
    assert from_file.info.weights != tiny_backbone.info.weights
    assert FeatureCache(cache_dir, from_file.info).dir != base

    a = extract_features(tiny_backbone, table, _options(tmp_path))
    capsys.readouterr()
    b = extract_features(bigger, table, _options(tmp_path))
    assert _counts(capsys.readouterr().out) == (0, N, N)
    assert not np.allclose(a, b)
    c = extract_features(from_file, table, _options(tmp_path))
    assert _counts(capsys.readouterr().out) == (0, N, N)
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)  # same tensors, separate entries
    assert len([d for d in cache_dir.iterdir() if d.is_dir()]) == 3


def _shards(tmp_path):
    return sorted((tmp_path / "cache").glob("*/shard-*.npy"))


def test_truncated_shard_is_detected_and_rebuilt(tmp_path, table, tiny_backbone, spy, capsys):
    first = extract_features(tiny_backbone, table, _options(tmp_path))
    (shard,) = _shards(tmp_path)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    spy.clear()
    second = extract_features(tiny_backbone, table, _options(tmp_path))
    assert _counts(capsys.readouterr().out) == (0, N, N)
    assert sorted(spy) == sorted(table.paths)
    np.testing.assert_allclose(second, first, rtol=1e-5, atol=1e-6)
    assert not shard.exists()  # the broken shard is gone, a whole one replaces it
    (new_shard,) = _shards(tmp_path)
    assert np.load(new_shard).shape == (N, first.shape[1])


def test_only_the_broken_shard_is_rebuilt(tmp_path, table, tiny_backbone, spy, capsys):
    options = _options(tmp_path, chunk_size=4)
    first = extract_features(tiny_backbone, table, options)
    shards = _shards(tmp_path)
    assert len(shards) == 3  # 4 + 4 + 2 images
    victim = shards[0]
    victim_keys = json.loads(victim.with_name(victim.name.replace(".npy", ".keys.json")).read_text())
    data = victim.read_bytes()
    victim.write_bytes(data[:-8])
    capsys.readouterr()
    spy.clear()
    second = extract_features(tiny_backbone, table, options)
    assert _counts(capsys.readouterr().out) == (N - len(victim_keys), N, len(victim_keys))
    assert len(spy) == len(victim_keys)
    np.testing.assert_allclose(second, first, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("damage", ["empty_shard", "empty_keys", "header_only", "truncated_keys", "missing_shard",
                                    "garbage_shard", "wrong_shape", "nan_values"])
def test_other_broken_shards_are_rebuilt(tmp_path, table, tiny_backbone, capsys, damage):
    """A zero-length file is what a power cut leaves after a rename whose data never reached
    the disk (no fsync); it must be rebuilt like a truncated one, not crash."""
    first = extract_features(tiny_backbone, table, _options(tmp_path))
    (shard,) = _shards(tmp_path)
    if damage == "empty_shard":
        shard.write_bytes(b"")
    elif damage == "empty_keys":
        shard.with_name(shard.name.replace(".npy", ".keys.json")).write_text("")
    elif damage == "header_only":
        shard.write_bytes(shard.read_bytes()[:60])
    elif damage == "truncated_keys":
        keys = shard.with_name(shard.name.replace(".npy", ".keys.json"))
        keys.write_text(keys.read_text()[:-20])
    elif damage == "missing_shard":
        shard.unlink()
    elif damage in ("wrong_shape", "nan_values"):  # the right row count: only the rows' shape or values are off
        rows = np.load(shard)
        np.save(shard, rows[:, :-1] if damage == "wrong_shape" else np.where(rows > 0, np.nan, rows))
    else:
        shard.write_bytes(b"\x00" * len(shard.read_bytes()))
    capsys.readouterr()
    second = extract_features(tiny_backbone, table, _options(tmp_path))
    out, err = capsys.readouterr()
    assert _counts(out) == (0, N, N)
    assert damage == "missing_shard" or "damaged cache entry" in err
    np.testing.assert_allclose(second, first, rtol=1e-5, atol=1e-6)


def test_no_cache_gives_the_same_features(tmp_path, table, tiny_backbone, capsys):
    cached = extract_features(tiny_backbone, table, _options(tmp_path))
    capsys.readouterr()
    direct = extract_features(tiny_backbone, table, _options(tmp_path, cache_dir=None))
    out = capsys.readouterr().out
    assert f"{N} extracted (cache disabled)" in out and "from cache" not in out
    assert direct.shape == cached.shape and direct.dtype == np.float32
    np.testing.assert_allclose(direct, cached, rtol=1e-5, atol=1e-6)


def test_extraction_options_follow_no_cache_flag():
    config = vpr.TrainConfig(train_csv="a", val_csv="b", cache_dir="somewhere", no_cache=True, batch_size=16,
                             extract_batch_size=8, num_workers=0)
    assert extraction_settings(config).cache_folder is None
    config.no_cache = False
    options = extraction_settings(config)
    # not the training batch
    assert (options.cache_dir, options.extract_batch_size, options.num_workers) == ("somewhere", 8, 0)


def test_unreadable_image_names_the_file(tmp_path, table, tiny_backbone):
    bad = table.paths[5]
    with open(bad, "wb") as handle:
        handle.write(b"not a jpeg at all")
    with pytest.raises(VPRError, match=re.escape(bad)):
        extract_features(tiny_backbone, table, _options(tmp_path))


@pytest.mark.parametrize("arch", ["test_efficientnet", "test_vit", "test_mambaout"])
def test_backbone_info_feature_dim_is_the_descriptor_length(arch):
    """BackboneInfo.feature_dim (cache key, checkpoint 'backbone' field) must be the length of
    the global descriptor that backbone_descriptor() returns."""
    backbone = vpr.create_backbone(f"timm:{arch}", weights="random", image_size=TINY_SIZE)
    with torch.no_grad():
        out = vpr.backbone_descriptor(backbone.model, torch.zeros(1, 3, TINY_SIZE, TINY_SIZE))
    assert out.shape == (1, backbone.info.feature_dim)
    assert all(not p.requires_grad for p in backbone.model.parameters()) and not backbone.model.training


def test_an_interrupted_extraction_resumes_where_it_stopped(tmp_path, table, tiny_backbone, monkeypatch, capsys):
    """Shards of chunk_size images are stored as they fill: a Ctrl-C after two of them loses
    only the images after, and the next call extracts just those."""
    options = _options(tmp_path, chunk_size=4, extract_batch_size=2)
    reference = extract_features(tiny_backbone, table, _options(tmp_path / "reference"))
    original = iterate_descriptors

    def stopped_after_four_batches(*args, **kwargs):
        for number, item in enumerate(original(*args, **kwargs)):
            if number == 4:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(vprkit.extraction.features, "iterate_descriptors", stopped_after_four_batches)
    with pytest.raises(KeyboardInterrupt):
        extract_features(tiny_backbone, table, options)
    assert len(_shards(tmp_path)) == 2  # 2 shards of 4 images written before the interruption
    monkeypatch.setattr(vprkit.extraction.features, "iterate_descriptors", original)
    capsys.readouterr()
    resumed = extract_features(tiny_backbone, table, options)
    assert _counts(capsys.readouterr().out) == (8, N, N - 8)
    np.testing.assert_allclose(resumed, reference, rtol=1e-5, atol=1e-6)


def test_float16_cache_is_memory_mapped_half_size_and_close(tmp_path, table, tiny_backbone):
    full = extract_features(tiny_backbone, table, _options(tmp_path, cache_dtype="float32"))
    half = extract_features(tiny_backbone, table, _options(tmp_path, cache_dtype="float16"))
    assert half.dtype == np.float32  # callers always get float32
    np.testing.assert_allclose(half, full, rtol=2e-3, atol=2e-3)
    info = tiny_backbone.info
    stores = {dtype: FeatureCache(tmp_path / "cache", info, dtype) for dtype in ("float32", "float16")}
    for dtype, cache in stores.items():
        arrays = list(cache._arrays.values())
        assert arrays and all(isinstance(a, np.memmap) and a.dtype == np.dtype(dtype) for a in arrays)
    size = {d: sum(p.stat().st_size for p in c.dir.glob("shard-*.npy")) for d, c in stores.items()}
    assert size["float16"] < 0.6 * size["float32"]


class _AtTheBarrier(Exception):
    """Rank 0 of the simulated torchrun stops here while rank 1 catches up."""


def test_a_rank_indexing_after_the_other_wrote_its_shards_still_extracts_its_share(tmp_path, table, tiny_backbone,
                                                                                   monkeypatch, spy):
    """The two-rank race, forced: rank 0 indexes, extracts its half and writes its shards before
    rank 1 even indexes. Rank 1 then already sees those shards; split its own (shorter) list and
    images 1, 5, 9 went to no rank ("missing from the cache after extraction"). Both split rank
    0's list: rank 1 extracts exactly the odd images and the table comes back whole."""
    import torch.distributed as dist

    rank = {"now": 0}
    sent: list[list[int]] = []

    def broadcast_object_list(box, src=0, device=None):
        if rank["now"] == src:
            sent.append(list(box[0]))
        else:
            box[0] = sent[-1]

    def barrier():
        if rank["now"] == 0:
            raise _AtTheBarrier

    monkeypatch.setattr(vprkit.extraction.features, "distributed_rank_and_world", lambda: (rank["now"], 2))
    monkeypatch.setattr(dist, "broadcast_object_list", broadcast_object_list)
    monkeypatch.setattr(dist, "barrier", barrier)
    options = _options(tmp_path, chunk_size=2, extract_batch_size=2)
    with pytest.raises(_AtTheBarrier):
        extract_features(tiny_backbone, table, options)
    assert spy == table.paths[0::2] and len(_shards(tmp_path)) == 3  # rank 0's half is on disk
    spy.clear()
    rank["now"] = 1
    features = extract_features(tiny_backbone, table, options)
    assert spy == table.paths[1::2]
    monkeypatch.undo()
    reference = extract_features(tiny_backbone, table, _options(tmp_path / "one_process"))
    np.testing.assert_allclose(features, reference, rtol=1e-5, atol=1e-6)


def test_a_model_giving_nan_is_one_line_naming_the_images(tmp_path, table, tiny_backbone, monkeypatch):
    """NaN from the model (fp16 overflow, broken weights) never reaches the cache as features."""
    def nan_for_odd_rows(images):
        out = vpr.backbone_descriptor(tiny_backbone.model, images)
        out[1::2] = float("nan")
        return out

    monkeypatch.setattr(tiny_backbone, "descriptor", nan_for_odd_rows)
    with pytest.raises(VPRError, match=re.escape(f"NaN or infinite descriptors for 2 image(s) ({table.paths[1]}, ")):
        extract_features(tiny_backbone, table, _options(tmp_path))
    assert _shards(tmp_path) == []
