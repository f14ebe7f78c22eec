"""--pooling gem/vlad wired through the scripts: cache keys (pooling, layer, K and vocabulary), the
VLAD vocabulary stored with the cache and reused, in checkpoints and never refitted on evaluation,
end-to-end runs (VLAD on a random-weight ViT, GeM on the tiny CNN), the PCA that stays cheap on
VLAD's dimension and the residual head's start (the better of raw and PCA-whitened on val)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import TINY_MODEL, TINY_SIZE, assert_one_line_error, run_main, write_train_val
import eval_trained
import train_vpr
import trainable_vpr as vpr
from trainable_vpr import vocabulary as vocab
from vprkit.retrieval.evaluation import pca_by_eigh, pca_whitening_matrix
from vprkit.cli.extraction_settings import ExtractionSettings
from vprkit.extraction.cache import FeatureCache
from vprkit.tables.places import load_poses
from vprkit.extraction.pooling import LocalPooling, PoolingConfig, layer_channels, num_feature_layers

VIT = "timm:test_vit"  # timm's tiny ViT (random weights): 4 patch tokens at 32 px


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_train_val(tmp_path_factory.mktemp("pooling"), seed=1)


def _options(cache) -> ExtractionSettings:
    return ExtractionSettings(cache_dir=str(cache), num_workers=0, device="cpu", extract_batch_size=8)


# ---------------------------------------------------------------------------------------------
# cache keys and the vocabulary
# ---------------------------------------------------------------------------------------------
def test_backbone_pooling_adds_no_cache_key_fields(tiny_backbone):
    """Caches and checkpoints written before --pooling keep their keys."""
    assert "pooling" not in tiny_backbone.info.as_dict() and "vocabulary" not in tiny_backbone.info.as_dict()
    gem = vpr.pool_backbone(tiny_backbone, PoolingConfig("gem", -2))
    assert gem.info.as_dict()["pooling"] == f"gem-p3-L{num_feature_layers(tiny_backbone.model) - 2}"


def test_different_pooling_settings_never_share_a_cache(tiny_backbone, tmp_path):
    model = tiny_backbone.model
    channels = layer_channels(model, -1)
    rng = np.random.default_rng(0)
    vocabulary_a, vocabulary_b = rng.normal(size=(2, 4, channels)).astype(np.float32)
    configs = {
        "backbone": (PoolingConfig(), None), "gem last": (PoolingConfig("gem"), None),
        "gem -2": (PoolingConfig("gem", -2), None), "vlad K4 a": (PoolingConfig("vlad", -1, 4), vocabulary_a),
        "vlad K4 b": (PoolingConfig("vlad", -1, 4), vocabulary_b),
        "vlad K8": (PoolingConfig("vlad", -1, 8), np.concatenate([vocabulary_a, vocabulary_b])),
    }
    folders = {name: FeatureCache(tmp_path, vpr.pool_backbone(tiny_backbone, c, v).info).dir
               for name, (c, v) in configs.items()}
    assert len(set(folders.values())) == len(configs), folders
    # -1 and its absolute index are one layer: one cache
    last = num_feature_layers(model) - 1
    same = vpr.pool_backbone(tiny_backbone, PoolingConfig("gem", last)).info
    assert FeatureCache(tmp_path, same).dir == folders["gem last"]
    # and the pooled dimension is what the cache and the heads see
    assert vpr.pool_backbone(tiny_backbone, *configs["vlad K8"]).info.feature_dim == 8 * channels


def test_vocabulary_is_stored_with_the_cache_and_reused(tiny_backbone, data, tmp_path, monkeypatch):
    config = PoolingConfig("vlad", -2, 4)
    paths = load_poses(data.train).paths
    fits = []
    fit = vocab.fit_vocabulary_on_images
    monkeypatch.setattr(vocab, "fit_vocabulary_on_images", lambda *a, **k: fits.append(1) or fit(*a, **k))
    first = vocab.vlad_vocabulary(tiny_backbone, config, paths, _options(tmp_path))
    tag = config.cache_tag(num_feature_layers(tiny_backbone.model))
    stored = vocab.vocabulary_path(tmp_path, tiny_backbone.info, tag, paths)
    assert stored.is_file() and stored.parent == tmp_path / "vocabularies" and f"-{tag}-" in stored.name
    np.testing.assert_array_equal(np.load(stored), first)
    assert first.shape == (4, layer_channels(tiny_backbone.model, -2)) and len(fits) == 1
    second = vocab.vlad_vocabulary(tiny_backbone, config, paths, _options(tmp_path))
    np.testing.assert_array_equal(second, first)
    assert len(fits) == 1  # read back, not refitted
    # other images, or another K, another file
    assert vocab.vocabulary_path(tmp_path, tiny_backbone.info, tag, paths[:-1]) != stored
    assert vocab.vocabulary_path(tmp_path, tiny_backbone.info, PoolingConfig("vlad", -2, 8).cache_tag(
        num_feature_layers(tiny_backbone.model)), paths) != stored
    # --no_cache: fitted, nothing stored
    vocab.vlad_vocabulary(tiny_backbone, config, paths, ExtractionSettings(cache_dir=str(tmp_path / "none"),
                                                                         no_cache=True, num_workers=0, device="cpu"))
    assert len(fits) == 2 and not (tmp_path / "none").exists()


def test_a_nan_vocabulary_of_the_right_shape_is_refitted_with_a_warning(tiny_backbone, data, tmp_path, capsys):
    config = PoolingConfig("vlad", -2, 4)
    paths = load_poses(data.train).paths
    first = vocab.vlad_vocabulary(tiny_backbone, config, paths, _options(tmp_path))
    stored = vocab.vocabulary_path(tmp_path, tiny_backbone.info, config.cache_tag(num_feature_layers(
        tiny_backbone.model)), paths)
    np.save(stored, np.full_like(first, np.nan))
    capsys.readouterr()
    again = vocab.vlad_vocabulary(tiny_backbone, config, paths, _options(tmp_path))
    assert "damaged cache entry" in capsys.readouterr().err
    np.testing.assert_array_equal(again, first)
    np.testing.assert_array_equal(np.load(stored), first)


def test_vocabulary_sample_is_bounded():
    paths = [f"img{i}.jpg" for i in range(5000)]
    chosen = vocab.vocabulary_images(paths, limit=1000)
    assert len(chosen) == 1000 and chosen[0] == "img0.jpg" and chosen[-1] == "img4999.jpg"
    assert vocab.vocabulary_images(paths[:10], limit=1000) == paths[:10]


def test_pooled_descriptor_is_local_pooling(tiny_backbone):
    centroids = np.random.default_rng(1).normal(size=(3, layer_channels(tiny_backbone.model, -1))).astype(np.float32)
    pooled = vpr.pool_backbone(tiny_backbone, PoolingConfig("vlad", -1, 3), centroids)
    images = torch.randn(2, 3, TINY_SIZE, TINY_SIZE)
    reference = LocalPooling(tiny_backbone.model, PoolingConfig("vlad", -1, 3), centroids)(images)
    torch.testing.assert_close(pooled.descriptor(images), reference)
    np.testing.assert_array_equal(pooled.vocabulary, centroids)


# ---------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------
def _common(model: str, cache) -> list[str]:
    return ["--model", model, "--weights", "random", "--image_size", str(TINY_SIZE), "--extract_batch_size", "8",
            "--num_workers", "0",
            "--device", "cpu", "--cache_dir", str(cache)]


def test_vlad_on_a_vit_end_to_end(data, tmp_path, capsys):
    cache = tmp_path / "cache"
    result = train_vpr.main(["--train_csv", str(data.train), "--val_csv", str(data.val), *_common(VIT, cache),
                             "--batch_size", "8", "--epochs", "1", "--images_per_place", "2", "--pooling", "vlad",
                             "--vlad_clusters", "4", "--feature_layer", "-2", "--log_dir", str(tmp_path / "logs"),
                             "--checkpoint_dir", str(tmp_path / "models")])
    checkpoint = vpr.load_checkpoint(result.checkpoint)
    stored = list((cache / "vocabularies").glob("*.npy"))
    assert len(stored) == 1
    np.testing.assert_array_equal(checkpoint["vlad_vocabulary"].numpy(), np.load(stored[0]))
    backbone = checkpoint["backbone"]
    model = vpr.create_backbone(VIT, "random", 32).model
    channels = layer_channels(model, -2)
    assert backbone["pooling"] == f"vlad-k4-L{num_feature_layers(model) - 2}"
    assert backbone["feature_dim"] == checkpoint["head_config"]["in_dim"] == 4 * channels
    # evaluation uses the checkpoint's vocabulary (the stored file is gone: it cannot refit
    # silently) and reads the features training cached
    stored[0].unlink()
    capsys.readouterr()
    report = eval_trained.main(["--model_path", str(result.checkpoint), "--db_csv", str(data.train),
                                "--test_csv", str(data.val), "--device", "cpu", "--num_workers", "0",
                                "--cache_dir", str(cache)])
    out = capsys.readouterr().out
    assert "vlad vocabulary" not in out and "24/24 from cache" in out and "12/12 from cache" in out
    assert report.result.recalls[1] == pytest.approx(result.best_recall[1])
    # other pooling flags than the checkpoint's: refused in one line
    code, err = run_main(capsys, eval_trained.main, [
        "--model_path", str(result.checkpoint), "--db_csv", str(data.train), "--test_csv", str(data.val),
        "--device", "cpu", "--num_workers", "0", "--cache_dir", str(cache), "--pooling", "gem"])
    assert_one_line_error(code, err, "--pooling vlad", "drop the pooling flags")


def test_gem_on_the_tiny_cnn_end_to_end(data, tmp_path):
    cache = tmp_path / "cache"
    result = train_vpr.main(["--train_csv", str(data.train), "--val_csv", str(data.val),
                             *_common(TINY_MODEL, cache), "--batch_size", "8", "--epochs", "1",
                             "--images_per_place", "2", "--pooling", "gem", "--feature_layer", "-2",
                             "--head", "projection", "--log_dir", str(tmp_path / "logs"),
                             "--checkpoint_dir", str(tmp_path / "models")])
    checkpoint = vpr.load_checkpoint(result.checkpoint)
    model = vpr.create_backbone(TINY_MODEL, "random", TINY_SIZE).model
    assert checkpoint["head_config"]["in_dim"] == layer_channels(model, -2)
    assert "vlad_vocabulary" not in checkpoint
    report = eval_trained.main(["--model_path", str(result.checkpoint), "--db_csv", str(data.train),
                                "--test_csv", str(data.val), "--device", "cpu", "--num_workers", "0",
                                "--cache_dir", str(cache)])
    assert report.result.recalls[1] == pytest.approx(result.best_recall[1])


def test_pooling_flag_errors(data, tmp_path, capsys):
    base = ["--db_csv", str(data.train), "--test_csv", str(data.val), "--baseline",
            *_common(TINY_MODEL, tmp_path / "cache")]
    code, err = run_main(capsys, eval_trained.main, [*base, "--feature_layer", "-2"])
    assert_one_line_error(code, err, "--feature_layer -2", "--pooling gem")
    code, err = run_main(capsys, eval_trained.main, [*base, "--pooling", "gem", "--feature_layer", "99"])
    assert_one_line_error(code, err, "--feature_layer 99", "out of range")
    code, err = run_main(capsys, eval_trained.main, [*base, "--pooling", "vlad", "--vlad_clusters", "0"])
    assert_one_line_error(code, err, "--vlad_clusters 0")


# ---------------------------------------------------------------------------------------------
# PCA on VLAD's dimension and the residual head's start
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows, dim", [(60, 20), (30, 80)])
def test_pca_by_eigh_matches_sklearn(rows, dim):
    from sklearn.decomposition import PCA

    x = (np.random.default_rng(0).normal(size=(rows, dim)) * np.linspace(3, 0.1, dim)).astype(np.float32)
    mean, components, variances = pca_by_eigh(x, 8)
    pca = PCA(8).fit(x)
    np.testing.assert_allclose(mean, pca.mean_, atol=1e-6)
    np.testing.assert_allclose(components, pca.components_, atol=1e-4)  # signs fixed alike
    np.testing.assert_allclose(variances, pca.explained_variance_, rtol=1e-4)


def test_pca_whitening_on_vlad_sized_features_whitens():
    x = np.random.default_rng(0).normal(size=(80, 5000)).astype(np.float32)
    weight, bias = pca_whitening_matrix(x, 16)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(np.cov(unit @ weight.T + bias, rowvar=False), np.eye(16), atol=1e-3)


