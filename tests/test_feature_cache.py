"""Cached encoder features (vlm.encoders.cache, stage.<name>.cache_features): each image is encoded once, reused in
later calls and by a new cache on the same folder (another run); other weights or preprocessing are never served
stale features; a pretrain stage trains to the same losses with and without the cache."""
from __future__ import annotations

import pytest
import torch

import vlm
from vlm.encoders.cache import FeatureCache
from vlm.train import ConfigError, compose, run

from conftest import tiny_cfg


def counting(encoder):
    calls = []
    encoder.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    return calls


def frozen_model(seed: int = 0):
    torch.manual_seed(seed)
    model = vlm.build(tiny_cfg())
    model.encoder.requires_grad_(False)
    return model.train()


def test_images_are_encoded_once_and_reused_across_caches(tmp_path):
    model = frozen_model()
    calls = counting(model.encoder)
    px = torch.randn(3, 3, 32, 32)
    expected = model.image_features(px)
    model.feature_cache = FeatureCache(tmp_path, model.encoder, shard_size=2)
    first = model.image_features(px)
    assert calls == [3, 3] and model.feature_cache.misses == 3
    more = torch.cat([px[1:], torch.randn(1, 3, 32, 32)])   # two known images and a new one
    model.image_features(more)
    assert calls[-1] == 1 and model.feature_cache.hits == 2
    torch.testing.assert_close(first, expected, atol=0, rtol=0)
    model.feature_cache.flush()
    assert len(list(model.feature_cache.dir.glob("shard-*.safetensors"))) == 2  # one full shard + the flushed rest
    # another run: a new cache on the same folder encodes nothing it has seen
    model.feature_cache = FeatureCache(tmp_path, model.encoder)
    again = model.image_features(px)
    assert len(calls) == 3 and model.feature_cache.hits == 3
    assert torch.equal(again, first)


def test_other_weights_or_preprocessing_are_not_served_stale_features(tmp_path):
    model = frozen_model()
    px = torch.randn(2, 3, 32, 32)
    model.feature_cache = FeatureCache(tmp_path, model.encoder)
    model.image_features(px)
    model.feature_cache.flush()
    other = frozen_model(seed=1)                       # other encoder weights: another folder
    other.feature_cache = FeatureCache(tmp_path, other.encoder)
    assert other.feature_cache.dir != model.feature_cache.dir and len(other.feature_cache) == 0
    calls = counting(model.encoder)
    model.feature_cache = FeatureCache(tmp_path, model.encoder)
    model.image_features(px * 0.5 + 0.1)               # other preprocessing: other pixels, other keys
    assert calls == [2]
    with pytest.raises(ValueError, match="shard_size"):
        FeatureCache(tmp_path, model.encoder, shard_size=0)


def test_a_trainable_encoder_never_uses_the_cache(tmp_path):
    model = frozen_model()
    model.encoder.requires_grad_(True)
    model.feature_cache = FeatureCache(tmp_path, model.encoder)
    model.image_features(torch.randn(1, 3, 32, 32))
    assert len(model.feature_cache) == 0


PRETRAIN = ["stages=[pretrain]", "stage.pretrain.policy.encoder=frozen", "stage.pretrain.max_steps=6",
            "eval.enabled=false"]


def test_pretrain_losses_are_the_same_with_and_without_the_cache(tmp_path):
    """6 steps of 4 samples over the micro data: images repeat across epochs, so the cache serves hits."""
    plain = run(compose("micro", PRETRAIN + [f"output_dir={tmp_path / 'plain'}"]))
    cached_cfg = PRETRAIN + ["stage.pretrain.cache_features=true", f"trainer.feature_cache_dir={tmp_path / 'fc'}"]
    cached = run(compose("micro", cached_cfg + [f"output_dir={tmp_path / 'cached'}"]))
    assert cached.losses["pretrain"] == pytest.approx(plain.losses["pretrain"], abs=1e-6)
    shards = list((tmp_path / "fc").glob("*/shard-*.safetensors"))
    assert shards
    again = run(compose("micro", cached_cfg + [f"output_dir={tmp_path / 'again'}"]))   # a second run reuses them
    assert again.losses["pretrain"] == pytest.approx(plain.losses["pretrain"], abs=1e-6)
    assert list((tmp_path / "fc").glob("*/shard-*.safetensors")) == shards  # nothing new to store


def test_cache_features_needs_a_frozen_encoder():
    with pytest.raises(ConfigError, match="cache_features=true .* frozen"):
        compose("micro", ["stage.pretrain.cache_features=true", "stage.pretrain.policy.encoder=full"])
