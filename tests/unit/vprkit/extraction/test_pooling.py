"""vprkit.extraction.pooling: GeM and VLAD against hand-computed numbers, the VLAD vocabulary (sampling,
determinism, fingerprint), the pooling flags and cache tags, and exact layer indexing on a CNN and
ViTs (with and without register tokens)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch

from vprkit.cli import VPRError
from vprkit.extraction.pooling import (LocalPooling, PoolingConfig, check_vocabulary, fit_vlad_vocabulary, gem,
                                       layer_channels, local_features, num_feature_layers, resolve_layer,
                                       sample_tokens, tokens_per_image, vlad, vocabulary_fingerprint)


def _frozen(arch: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs).eval()
    return model.requires_grad_(False)


@pytest.fixture(scope="module")
def effnet():
    return _frozen("tf_efficientnet_lite0")


@pytest.fixture(scope="module")
def dinov2():
    return _frozen("vit_small_patch14_dinov2", img_size=224)


@pytest.fixture(scope="module")
def dinov2_registers():
    return _frozen("vit_small_patch14_reg4_dinov2", img_size=224)


def _images(size: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _vit_layer_by_hand(model, images: torch.Tensor, block: int) -> torch.Tensor:
    """Patch tokens after `block`, through the final norm, prefix tokens dropped."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    for blk in model.blocks[:block + 1]:
        x = blk(x)
    return model.norm(x)[:, model.num_prefix_tokens:]


def _map_as_tokens(feature_map: torch.Tensor) -> torch.Tensor:
    return feature_map.flatten(2).transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# GeM and VLAD, by hand
# ---------------------------------------------------------------------------------------------
def test_gem_is_the_generalised_mean_with_negatives_clamped():
    local = torch.tensor([[[1.0, 2.0], [3.0, -1.0]]])
    out = gem(local, p=3.0)
    # channel 0: ((1 + 27) / 2)^(1/3); channel 1: -1 clamps to eps, ((8 + 1e-18) / 2)^(1/3)
    assert out.shape == (1, 2)
    assert torch.allclose(out, torch.tensor([[14 ** (1 / 3), 4 ** (1 / 3)]]), atol=1e-5)
    # p = 1 is the plain mean of non-negative tokens; not normalised
    assert torch.allclose(gem(torch.tensor([[[1.0, 4.0], [3.0, 0.0]]]), p=1.0), torch.tensor([[2.0, 2.0]]), atol=1e-5)


def test_vlad_by_hand_two_centroids_three_tokens():
    centroids = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # normalised: (1, 0) -> c0, residual 0; (0.6, 0.8) -> c1, residual (0.6, -0.2);
    # (0.8, 0.6) -> c0, residual (-0.2, 0.6). Clusters: c0 (-0.2, 0.6), c1 (0.6, -0.2);
    # intra-normalised (-1, 3)/sqrt10 and (3, -1)/sqrt10; flattened norm sqrt2.
    local = torch.tensor([[[2.0, 0.0], [3.0, 4.0], [4.0, 3.0]]])
    out = vlad(local, centroids)
    assert torch.allclose(out, torch.tensor([[-1.0, 3.0, 3.0, -1.0]]) / math.sqrt(20), atol=1e-6)


def test_vlad_empty_cluster_gives_zeros_not_nan_and_unit_norm():
    centroids = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    local = torch.tensor([[[2.0, 0.0], [3.0, 4.0], [4.0, 3.0]]])
    out = vlad(local, centroids)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0, 4:], torch.zeros(2))
    assert torch.allclose(out[0, :4], torch.tensor([-1.0, 3.0, 3.0, -1.0]) / math.sqrt(20), atol=1e-6)
    assert torch.allclose(out.norm(dim=1), torch.ones(1))


def test_vlad_pools_each_image_of_a_batch_on_its_own():
    generator = torch.Generator().manual_seed(1)
    local = torch.randn(3, 20, 8, generator=generator)
    centroids = torch.randn(5, 8, generator=generator)
    together = vlad(local, centroids)
    alone = torch.cat([vlad(local[i:i + 1], centroids) for i in range(3)])
    assert together.shape == (3, 40)
    assert torch.allclose(together, alone, atol=1e-6)
    assert torch.allclose(together.norm(dim=1), torch.ones(3), atol=1e-6)
    # intra-normalisation: each non-empty cluster's block has the same length, 1/sqrt(non-empty)
    block_norms = together.reshape(3, 5, 8).norm(dim=-1)
    for norms in block_norms:
        filled = norms[norms > 0]
        assert torch.allclose(filled, torch.full_like(filled, 1 / math.sqrt(len(filled))), atol=1e-6)


def test_vlad_rejects_a_vocabulary_of_another_dimension():
    with pytest.raises(VPRError, match="--feature_layer"):
        vlad(torch.randn(1, 4, 8), torch.randn(3, 6))


# ---------------------------------------------------------------------------------------------
# Configuration and cache tags
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, flag", [
    ({"pooling": "netvlad"}, "--pooling"),
    ({"pooling": "backbone", "feature_layer": 5}, "--feature_layer"),
    ({"pooling": "gem", "feature_layer": None}, "--feature_layer"),
    ({"pooling": "gem", "feature_layer": True}, "--feature_layer"),
    ({"pooling": "vlad", "vlad_clusters": 0}, "--vlad_clusters"),
    ({"pooling": "gem", "gem_p": 0.0}, "GeM p"),
])
def test_bad_pooling_flags_are_one_line_errors_naming_the_flag(kwargs, flag):
    with pytest.raises(VPRError, match=flag):
        PoolingConfig(**kwargs)


def test_cache_tag_resolves_the_layer_and_tells_configurations_apart():
    assert PoolingConfig().cache_tag(12) == "backbone"
    assert PoolingConfig("vlad", -1, 32).cache_tag(12) == PoolingConfig("vlad", 11, 32).cache_tag(12) == "vlad-k32-L11"
    tags = {PoolingConfig("vlad", -2, 32).cache_tag(12), PoolingConfig("vlad", -1, 64).cache_tag(12),
            PoolingConfig("gem", -1).cache_tag(12), PoolingConfig("gem", -1, gem_p=4.0).cache_tag(12),
            PoolingConfig("vlad", -1, 32).cache_tag(12)}
    assert len(tags) == 5
    with pytest.raises(VPRError, match="--feature_layer 12"):
        PoolingConfig("gem", 12).cache_tag(12)


def test_resolve_layer_counts_from_the_end_and_never_means_all():
    assert resolve_layer(12, -1) == 11
    assert resolve_layer(12, 0) == 0 and resolve_layer(12, -0) == 0
    assert resolve_layer(12, -12) == 0
    for bad in (12, -13, 100):
        with pytest.raises(VPRError, match=r"--feature_layer .*0\.\.11 or -12\.\.-1"):
            resolve_layer(12, bad)
    with pytest.raises(VPRError, match="--feature_layer"):
        resolve_layer(12, None)


# ---------------------------------------------------------------------------------------------
# Layer indexing: the last layer is the backbone's own final map / tokens; layer 0 the first
# ---------------------------------------------------------------------------------------------
def test_cnn_layers_are_feature_stages_and_the_last_is_forward_features(effnet):
    images = _images(224)
    assert num_feature_layers(effnet) == 5
    with torch.inference_mode():
        final = effnet.forward_features(images)
        assert final.shape == (2, 1280, 7, 7)
        assert torch.equal(local_features(effnet, images, -1), _map_as_tokens(final))
        assert torch.equal(local_features(effnet, images, 4), _map_as_tokens(final))
        # layer 0 (= -5): the first stage, blocks[0] after the stem
        stem = effnet.bn1(effnet.conv_stem(images))
        first = _map_as_tokens(effnet.blocks[0](stem))
        assert first.shape == (2, 112 * 112, 16)
        assert torch.allclose(local_features(effnet, images, 0), first, atol=1e-5)
        assert torch.allclose(local_features(effnet, images, -5), first, atol=1e-5)
        # layer -2: the 112-channel stride-16 stage (blocks 0..4)
        stage = _map_as_tokens(effnet.blocks[:5](stem))
        assert stage.shape == (2, 14 * 14, 112)
        assert torch.allclose(local_features(effnet, images, -2), stage, atol=1e-4)
        # a channels_last input (what extraction feeds) gives the same tokens
        assert torch.allclose(local_features(effnet.to(memory_format=torch.channels_last),
                                             images.to(memory_format=torch.channels_last), -1),
                              _map_as_tokens(final), atol=1e-5)
    assert [layer_channels(effnet, i) for i in range(-5, 0)] == [16, 24, 40, 112, 1280]
    for bad in (5, -6):
        with pytest.raises(VPRError, match=r"--feature_layer .*0\.\.4"):
            local_features(effnet, images, bad)


@pytest.mark.parametrize("fixture, prefix", [("dinov2", 1), ("dinov2_registers", 5)])
def test_vit_layers_are_blocks_without_prefix_tokens(request, fixture, prefix):
    model = request.getfixturevalue(fixture)
    assert model.num_prefix_tokens == prefix and num_feature_layers(model) == len(model.blocks) == 12
    images = _images(224, batch=1)
    with torch.inference_mode():
        final = model.forward_features(images)
        assert final.shape == (1, prefix + 256, 384)
        last = local_features(model, images, -1)
        assert torch.equal(last, final[:, prefix:])
        # the intermediate path at the last block agrees: every layer is normalised alike
        assert torch.allclose(last, _vit_layer_by_hand(model, images, 11), atol=1e-5)
        first = local_features(model, images, 0)
        assert first.shape == (1, 256, 384)
        assert torch.allclose(first, _vit_layer_by_hand(model, images, 0), atol=1e-5)
        assert torch.equal(local_features(model, images, -12), first)
        assert torch.allclose(local_features(model, images, 9), _vit_layer_by_hand(model, images, 9), atol=1e-5)
    with pytest.raises(VPRError, match=r"--feature_layer 12: .*0\.\.11"):
        local_features(model, images, 12)


def test_an_early_layer_runs_only_the_blocks_it_needs(dinov2):
    calls = []
    handle = dinov2.blocks[5].register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.inference_mode():
            local_features(dinov2, _images(224, batch=1), 4)
            assert calls == []
            local_features(dinov2, _images(224, batch=1), 5)
            assert calls == [1]
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------
def _clustered_samples(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(4, 16))
    return (centres[rng.integers(0, 4, 600)] + 0.05 * rng.normal(size=(600, 16))).astype(np.float32)


def test_vocabulary_is_deterministic_unit_and_fingerprinted():
    samples = _clustered_samples()
    first = fit_vlad_vocabulary(samples, k=4, seed=3)
    again = fit_vlad_vocabulary(samples, k=4, seed=3)
    assert first.shape == (4, 16) and first.dtype == np.float32
    np.testing.assert_array_equal(first, again)
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    # it finds the four clusters: every sample's nearest centroid is its own cluster's centre
    unit = samples / np.linalg.norm(samples, axis=1, keepdims=True)
    assert (unit @ first.T).max(axis=1).min() > 0.98
    assert vocabulary_fingerprint(first) == vocabulary_fingerprint(again.copy())
    changed = first.copy()
    changed[2, 5] += 1e-4
    assert vocabulary_fingerprint(changed) != vocabulary_fingerprint(first)
    assert vocabulary_fingerprint(first[:3]) != vocabulary_fingerprint(first)
    assert len(vocabulary_fingerprint(first)) == 16


def test_vocabulary_needs_at_least_k_samples():
    with pytest.raises(VPRError, match="--vlad_clusters 64: only 10 local features"):
        fit_vlad_vocabulary(np.ones((10, 4), np.float32), k=64)


def test_stored_vocabulary_must_match_the_flags():
    check_vocabulary(np.zeros((8, 16)), 8, 16, "ckpt.pt")
    with pytest.raises(VPRError, match=r"ckpt.pt: VLAD vocabulary of shape \(8, 16\), expected \(32, 16\)"):
        check_vocabulary(np.zeros((8, 16)), 32, 16, "ckpt.pt")


def test_sample_tokens_keeps_real_tokens_per_image_reproducibly():
    local = torch.arange(2 * 10 * 3, dtype=torch.float32).reshape(2, 10, 3)
    sample = sample_tokens(local, 4, torch.Generator().manual_seed(0))
    assert sample.shape == (8, 3)
    assert torch.equal(sample, sample_tokens(local, 4, torch.Generator().manual_seed(0)))
    rows = {tuple(r.tolist()) for r in local.reshape(-1, 3)}
    assert all(tuple(r.tolist()) in rows for r in sample)
    assert (sample[:4, 0] < 30).all() and (sample[4:, 0] >= 30).all()  # four from each image
    assert len({tuple(r.tolist()) for r in sample}) == 8                # without repeats
    assert sample_tokens(local, 50, torch.Generator()).shape == (20, 3)
    assert tokens_per_image(1000, 50_000) == 50 and tokens_per_image(3, 10) == 4


# ---------------------------------------------------------------------------------------------
# LocalPooling end to end
# ---------------------------------------------------------------------------------------------
def test_local_pooling_vlad_on_a_vit_end_to_end():
    model = _frozen("test_vit")
    batches = [_images(160, batch=2, seed=s) for s in range(3)]
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        samples = torch.cat([sample_tokens(local_features(model, b, -2), 20, generator) for b in batches]).numpy()
    assert samples.shape == (6 * 20, 64)
    centroids = fit_vlad_vocabulary(samples, k=8, seed=0)
    pooling = LocalPooling(model, PoolingConfig("vlad", -2, 8), centroids)
    assert pooling.output_dim() == 8 * 64
    with torch.inference_mode():
        out = pooling(batches[0])
        assert out.shape == (2, 512)
        assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)
        assert torch.allclose(out, vlad(local_features(model, batches[0], 4), torch.from_numpy(centroids)), atol=1e-6)


@pytest.mark.parametrize("config, dim", [(PoolingConfig("gem", 2), 32), (PoolingConfig("gem", -1), 256),
                                         (PoolingConfig("vlad", -1, 4), 4 * 256), (PoolingConfig("vlad", 0, 3),
                                                                                   3 * 16)])
def test_local_pooling_output_dim_matches_the_output(config, dim):
    model = _frozen("test_efficientnet")
    centroids = np.random.default_rng(0).normal(size=(config.vlad_clusters, dim // config.vlad_clusters)) \
        if config.pooling == "vlad" else None
    pooling = LocalPooling(model, config, centroids)
    assert pooling.output_dim() == dim
    with torch.inference_mode():
        assert pooling(_images(64)).shape == (2, dim)


def test_local_pooling_checks_the_vocabulary_and_refuses_backbone():
    model = _frozen("test_efficientnet")
    with pytest.raises(VPRError, match=r"expected \(4, 256\)"):
        LocalPooling(model, PoolingConfig("vlad", -1, 4), np.zeros((4, 64), np.float32))
    with pytest.raises(ValueError):
        LocalPooling(model, PoolingConfig("vlad", -1, 4))
    with pytest.raises(ValueError):
        LocalPooling(model, PoolingConfig())
