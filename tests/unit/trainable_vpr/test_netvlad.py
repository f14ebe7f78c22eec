"""--head netvlad: a learnable VLAD (NetVLADHead) over the cached local features of --feature_layer,
started at the VLAD vocabulary so that epoch 0 is the training-free --pooling vlad descriptor; the
local features cached in float16, at most --local_features_per_image per image, streamed from the
shards; the model object applies it (forward on images = the cached path)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import TINY_MODEL, assert_one_line_error, run_main, write_train_val
import eval_trained
import run_experiment  # noqa: F401 - the scripts that apply the head import cleanly
import train_vpr
import trainable_vpr as vpr
from trainable_vpr.model import PlaceDescriptor, describe_table
from vprkit.retrieval.evaluation import evaluate_retrieval
from vprkit.extraction.cache import CachedRows
from vprkit.cli.extraction_settings import ExtractionSettings
from vprkit.extraction.features import extract_features
from vprkit.tables.images import open_rgb
from vprkit.tables.places import load_poses
from vprkit.extraction.pooling import PoolingConfig, kept_positions, local_features, vlad

SIZE = 64  # the tiny CNN at 64 px: its layer 2 is an 8 x 8 map (64 positions), enough for VLAD to mean something
LAYER, K = 2, 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_train_val(tmp_path_factory.mktemp("netvlad"), seed=3)


def _options(cache) -> ExtractionSettings:
    return ExtractionSettings(cache_dir=str(cache), num_workers=0, device="cpu", extract_batch_size=8)


def _flags(cache, *extra: str) -> list[str]:
    return ["--model", TINY_MODEL, "--weights", "random", "--image_size", str(SIZE), "--device", "cpu",
            "--num_workers", "0", "--batch_size", "8", "--cache_dir", str(cache), "--pooling", "vlad",
            "--feature_layer", str(LAYER), "--vlad_clusters", str(K), *extra]


def _tensors(paths) -> torch.Tensor:
    arrays = [np.asarray(open_rgb(p), dtype=np.float32) / 255.0 for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def test_untrained_head_is_hard_vlad_on_random_tokens():
    """Soft assignment at the start scale: the largest deviation from hard VLAD on tokens whose two
    nearest centroids differ by at least 0.02 in cosine (exp(-20) of weight on the runner-up)."""
    torch.manual_seed(0)
    centroids = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    tokens = 3.0 * centroids[torch.randint(0, 8, (5, 40))] + 0.3 * torch.randn(5, 40, 16)  # tokens near centroids
    sims = torch.nn.functional.normalize(tokens, dim=-1) @ centroids.T
    top2 = sims.topk(2, dim=-1).values
    assert float((top2[..., 0] - top2[..., 1]).min()) >= 0.02  # no near ties
    head = vpr.NetVLADHead(16, 8)
    head.init_vocabulary(centroids.numpy())
    with torch.no_grad():
        soft, hard = head(tokens), vlad(tokens, centroids)
    assert soft.shape == hard.shape == (len(tokens), 8 * 16)
    assert float((soft - hard).abs().max()) < 1e-5
    # a random (untrained, not started) head is far from it: the start is what makes them equal
    with torch.no_grad():
        assert float((vpr.NetVLADHead(16, 8)(tokens) - hard).abs().max()) > 0.05


@pytest.mark.slow
def test_epoch_zero_equals_the_training_free_vlad(data, tmp_path, capsys):
    """The run's epoch-0 val R@1 is the --pooling vlad features' val R@1 (the vlad row's
    computation); on the images none of whose tokens sits near a tie of two centroids, the untrained
    head's descriptors from the float16 cache are within 1e-3 of them and exactly them on the float32
    local features (at a near tie the head's softmax, alpha 1e4, still mixes the two clusters)."""
    cache = tmp_path / "cache"
    result = train_vpr.main(["--train_csv", str(data.train), "--val_csv", str(data.val),
                             *_flags(cache, "--head", "netvlad", "--epochs", "1", "--images_per_place", "2",
                                     "--log_dir", str(tmp_path / "logs"),
                                     "--checkpoint_dir", str(tmp_path / "models"))])
    out = capsys.readouterr().out
    assert "netvlad head start: the VLAD vocabulary" in out
    assert "local features: layer 2, " in out and "64 positions per image at 64 px, all cached in float16" in out
    options = _options(cache)
    train, val = load_poses(data.train), load_poses(data.val)
    vlad_model = PlaceDescriptor.baseline(TINY_MODEL, "random", SIZE, PoolingConfig("vlad", LAYER, K), train.paths,
                                          options)
    _, db_vlad = describe_table(vlad_model, train, options)
    _, q_vlad = describe_table(vlad_model, val, options)
    frozen_r1 = evaluate_retrieval(db_vlad, train.xyz, q_vlad, val.xyz, 25.0).recalls[1]
    assert result.untrained_r1 == frozen_r1
    # the untrained head through the model object: the same descriptors as the vlad row
    saved = vpr.load_checkpoint(result.checkpoint)
    untrained = PlaceDescriptor.from_checkpoint(result.checkpoint, saved)
    head = vpr.build_head(saved["head_config"])
    head.init_vocabulary(saved["vlad_vocabulary"].numpy())
    untrained.head = head.eval()
    _, db_net = describe_table(untrained, train, options)
    with torch.no_grad():  # float32 local features
        local = torch.from_numpy(np.asarray(untrained.frozen.descriptor(untrained.preprocess(_tensors(train.paths)))))
    centres = torch.nn.functional.normalize(saved["vlad_vocabulary"].float(), dim=-1)
    top2 = (torch.nn.functional.normalize(local, dim=-1) @ centres.T).topk(2, dim=-1).values
    clear = ((top2[..., 0] - top2[..., 1]).amin(dim=1) >= 2e-3).numpy()  # exp(-20) of weight on the runner-up
    assert clear.sum() >= len(train) // 2, clear
    deviation = float(np.abs(db_net - db_vlad)[clear].max())
    print(f"largest |netvlad(epoch 0) - vlad| on the tiny set ({clear.sum()} images without a near tie): "
          f"{deviation:.2e}; over all: {np.abs(db_net - db_vlad).max():.2e}")
    assert deviation < 1e-3
    with torch.no_grad():  # float32 local features: exactly hard VLAD
        np.testing.assert_array_equal(head(local[clear]).numpy(), vlad(local[clear], saved["vlad_vocabulary"]).numpy())
    assert saved["head_config"]["clusters"] == K


@pytest.mark.slow
def test_forward_equals_the_cached_path_and_cache_is_float16_and_bounded(data, tmp_path):
    cache = tmp_path / "cache"
    result = train_vpr.main(["--train_csv", str(data.train), "--val_csv", str(data.val),
                             *_flags(cache, "--head", "netvlad", "--epochs", "1", "--images_per_place", "2",
                                     "--local_features_per_image", "20", "--lr", "0.01",
                                     "--log_dir", str(tmp_path / "logs"),
                                     "--checkpoint_dir", str(tmp_path / "models"))])
    model = PlaceDescriptor.from_checkpoint(result.checkpoint)
    for p in model.head.parameters():  # not the start: a head whose output depends on every parameter
        p.data.add_(torch.randn_like(p) * 0.05)
    # and a soft assignment (alpha 10): at the near-hard start a token on a tie may flip cluster between
    # the float16 cached local features and forward's float32 ones, a jump no tolerance bounds (hard
    # VLAD is discontinuous)
    model.head.assign.weight.data.mul_(1e-3)
    table = load_poses(data.val)
    options = _options(cache)
    features = extract_features(model.frozen, table, options)
    assert isinstance(features, CachedRows) and features.shape == (len(table), 20, model.frozen.info.feature_dim)
    shards = list(cache.glob(f"{model.frozen.info.file_stem}-*/shard-*.npy"))
    assert shards and {np.load(s, mmap_mode="r").dtype for s in shards} == {np.dtype(np.float16)}
    _, cached = describe_table(model, table, options)
    with torch.no_grad():
        direct = model(_tensors(table.paths)).numpy()
    dim = K * model.frozen.info.feature_dim
    assert direct.shape == cached.shape == (len(table), dim) and model.output_dim == dim
    cosines = (direct * cached).sum(axis=1)
    assert cosines.min() >= 0.9999, cosines
    assert (direct @ direct.T)[~np.eye(len(direct), dtype=bool)].max() < 0.999  # not a constant output
    # the kept positions are the same seeded subset for every image, and of the right layer
    keep = kept_positions(64, 20)
    with torch.no_grad():
        local = local_features(model.frozen.model, model.preprocess(_tensors(table.paths[:1])), LAYER)
    np.testing.assert_allclose(features[0], local[0, keep].numpy(), atol=2e-2, rtol=2e-2)  # float16 cache
    # eval_trained applies the head (through the same model object) and gets the run's val R@1
    report = eval_trained.main(["--model_path", str(result.checkpoint), "--train_csv", str(data.train),
                                "--test_csv", str(data.val), "--device", "cpu", "--num_workers", "0",
                                "--cache_dir", str(cache)])
    assert report.result.recalls[1] == pytest.approx(result.best_recall[1])


def test_cached_rows_stream_only_what_is_asked(data, tmp_path, tiny_backbone):
    table = load_poses(data.train)
    backbone = vpr.local_backbone(vpr.create_backbone(TINY_MODEL, "random", SIZE), LAYER, 1024)
    rows = extract_features(backbone, table, _options(tmp_path / "cache"))
    whole = np.asarray(rows)
    assert whole.dtype == np.float32 and whole.shape[0] == len(table)
    index = np.array([5, 0, 5, 17])
    np.testing.assert_array_equal(rows[index], whole[index])
    np.testing.assert_array_equal(rows[2:4], whole[2:4])
    np.testing.assert_array_equal(rows.take(index)[1:3], whole[index[1:3]])
    calls = []
    original = rows.cache.get
    rows.cache.get = lambda keys: calls.append(len(keys)) or original(keys)
    vpr.embed(vpr.build_head(vpr.HeadConfig("netvlad", whole.shape[-1], clusters=K)), rows, batch_size=7)
    assert calls and max(calls) <= 7 and sum(calls) == len(table)


def test_netvlad_flag_errors(data, tmp_path, capsys):
    base = ["--train_csv", str(data.train), "--val_csv", str(data.val), "--model", TINY_MODEL, "--weights", "random",
            "--device", "cpu", "--cache_dir", str(tmp_path / "cache"), "--log_dir", str(tmp_path / "logs"),
            "--checkpoint_dir", str(tmp_path / "models"), "--head", "netvlad"]
    code, err = run_main(capsys, train_vpr.main, base)
    assert_one_line_error(code, err, "--head netvlad", "--pooling vlad")
    code, err = run_main(capsys, train_vpr.main, [*base, "--pooling", "vlad", "--local_features_per_image", "0"])
    assert_one_line_error(code, err, "--local_features_per_image 0")
    assert not (tmp_path / "logs").exists() or not list((tmp_path / "logs").glob("*.csv"))
