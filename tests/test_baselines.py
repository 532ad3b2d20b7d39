"""Random selection and spatial pooling against the same masked-attention reference as FastV and DyMU."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from hybrid_vlm import HybridConfig, apply_hybrid
from hybrid_vlm.baselines import random_slot_scores
from hybrid_vlm.syncs import check_no_host_syncs

from conftest import QUESTIONS, assert_batched_generation_equals_each_alone, hybrid_copy, image_inputs
from reference import masked_reference, numpy_random_scores

REFERENCE_RTOL = 1e-4
NEW_TOKENS = 6


def kept_mask(out, inputs) -> torch.Tensor:
    batch, length = inputs["input_ids"].shape
    return torch.zeros(batch, length, dtype=torch.bool).scatter(1, out.kept_positions, True) & inputs["attention_mask"].bool()


def assert_matches_reference(out, inputs, reference_logits, reference_kept):
    assert torch.equal(kept_mask(out, inputs), reference_kept)
    expected = reference_logits.gather(1, out.kept_positions[..., None].expand(-1, -1, reference_logits.shape[-1]))
    real = inputs["attention_mask"].bool().gather(1, out.kept_positions)
    assert (out.logits - expected)[real].abs().max() <= REFERENCE_RTOL * expected.abs().max()


@pytest.mark.parametrize("fastv_k,fastv_layer,seed", [(64, 2, 0), (16, 1, 3), (0.5, 3, 0)])
def test_random_selection_matches_masked_reference(tiny, fastv_k, fastv_layer, seed):
    model, processor = tiny
    inputs = image_inputs(processor, QUESTIONS)  # left-padded batch of 3, three images
    reference_logits, reference_kept = masked_reference(model, inputs, fastv_k, fastv_layer, select="random", select_seed=seed)
    with torch.no_grad():
        out = hybrid_copy(model, fastv_k=fastv_k, fastv_layer=fastv_layer, fastv_select="random", select_seed=seed)(**inputs)
    assert_matches_reference(out, inputs, reference_logits, reference_kept)


def test_random_selection_is_not_attention_selection(tiny):
    """Else the reference test above could not tell the two apart."""
    model, processor = tiny
    inputs = image_inputs(processor, QUESTIONS[:1])
    with torch.no_grad():
        attention = hybrid_copy(model, fastv_k=64)(**inputs).kept_positions
        random = hybrid_copy(model, fastv_k=64, fastv_select="random")(**inputs).kept_positions
    assert len(set(attention[0].tolist()) & set(random[0].tolist())) < 0.5 * attention.shape[1]


def test_random_draw_is_uniform_and_differs_per_image_and_seed():
    """Over many images each slot is kept about K/V of the time (a binomial bound at ~5 sigma), and
    two images or two seeds share about K^2/V of their kept slots, as independent draws would."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(400, 3, 8, 8, generator=generator)
    scores = random_slot_scores(pixels, 1, 576, seed=0)
    kept = torch.zeros(400, 576).scatter(1, scores.topk(64, dim=1).indices, 1.0)
    frequency = kept.mean(dim=0)
    p = 64 / 576
    assert (frequency - p).abs().max() < 5.5 * (p * (1 - p) / 400) ** 0.5
    overlap = (kept[0::2] * kept[1::2]).sum(dim=1).mean()
    assert abs(overlap - 64 * p) < 2.0
    other_seed = torch.zeros(400, 576).scatter(1, random_slot_scores(pixels, 1, 576, seed=1).topk(64, dim=1).indices, 1.0)
    assert abs((kept * other_seed).sum(dim=1).mean() - 64 * p) < 2.0


def test_random_draw_matches_the_numpy_spec():
    pixels = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    assert np.array_equal(random_slot_scores(pixels, 1, 576, seed=5).numpy(), numpy_random_scores(pixels, 5))


@pytest.mark.parametrize("side,tokens", [(2, 144), (3, 64), (4, 36)])
def test_pooling_matches_masked_reference(tiny, side, tokens):
    model, processor = tiny
    inputs = image_inputs(processor, QUESTIONS)
    reference_logits, reference_kept = masked_reference(model, inputs, None, 2, pool=side)
    with torch.no_grad():
        out = hybrid_copy(model, visual_pool=side)(**inputs)
    batch, length = inputs["input_ids"].shape
    assert out.kept_positions.shape == (batch, length - 576 + tokens)
    assert_matches_reference(out, inputs, reference_logits, reference_kept)


def test_pooling_then_fastv_matches_masked_reference(tiny):
    model, processor = tiny
    inputs = image_inputs(processor, QUESTIONS)
    reference_logits, reference_kept = masked_reference(model, inputs, 16, 2, pool=3)
    with torch.no_grad():
        out = hybrid_copy(model, visual_pool=3, fastv_k=16)(**inputs)
    assert_matches_reference(out, inputs, reference_logits, reference_kept)


@pytest.mark.parametrize("settings", [dict(fastv_k=64, fastv_select="random"), dict(visual_pool=2), dict(visual_pool=4, fastv_k=8)])
def test_baselines_batched_generation_equals_each_sample_alone(tiny, settings):
    model, processor = tiny
    assert_batched_generation_equals_each_alone(hybrid_copy(model, **settings), processor, NEW_TOKENS)


@pytest.mark.parametrize("settings", [dict(fastv_k=64, fastv_select="random"), dict(visual_pool=2, fastv_k=32)])
def test_baselines_have_no_host_syncs(tiny, settings):
    model, processor = tiny
    assert check_no_host_syncs(hybrid_copy(model, **settings), image_inputs(processor, QUESTIONS[:2])) == "pass"


@pytest.mark.parametrize(
    "environ,message",
    [
        ({"FASTV_SELECT": "uniform", "FASTV_K": "64"}, "FASTV_SELECT='uniform' is not valid"),
        ({"FASTV_SELECT": "random"}, "FASTV_SELECT=random needs FASTV_K"),
        ({"VISUAL_POOL": "5"}, "VISUAL_POOL='5' is not valid"),
        ({"VISUAL_POOL": "2x3"}, "VISUAL_POOL='2x3' is not valid"),
        ({"VISUAL_POOL": "2", "DYMU_THRESHOLDS": "mid.json"}, "cannot be combined"),
        ({"SELECT_SEED": "-1", "FASTV_SELECT": "random", "FASTV_K": "8"}, "SELECT_SEED='-1' is not valid"),
        # the hash works modulo 2^31: 2^31 drew as seed 0 under another tag, and 2^60 overflowed in the forward
        ({"SELECT_SEED": "2147483648", "FASTV_SELECT": "random", "FASTV_K": "8"}, r"SELECT_SEED=2147483648 is not valid: use an integer in 0..2147483647"),
    ],
)
def test_bad_baseline_settings_are_clear_errors(environ, message):
    with pytest.raises(ValueError, match=message):
        HybridConfig.from_env(environ)


def test_the_largest_seed_draws_without_overflow():
    from hybrid_vlm.baselines import slot_hash

    seed = HybridConfig.from_env({"SELECT_SEED": "2147483647", "FASTV_SELECT": "random", "FASTV_K": "8"}).select_seed
    scores = slot_hash(torch.tensor([2**31 - 1]), 576, seed)
    assert ((scores >= 0) & (scores < 1)).all() and scores.unique().numel() == 576


def test_baseline_tags():
    assert HybridConfig.from_env({"FASTV_SELECT": "random", "FASTV_K": "64"}).describe() == "random-k64-l2"
    assert HybridConfig.from_env({"FASTV_SELECT": "random", "FASTV_K": "64", "SELECT_SEED": "2"}).describe() == "random-k64-l2-s2"
    assert HybridConfig.from_env({"VISUAL_POOL": "3x3"}).describe() == "pool-3x3"
    assert HybridConfig.from_env({"VISUAL_POOL": "2", "FASTV_K": "32"}).describe() == "pool-2x2_fastv-k32-l2"


@pytest.mark.parametrize("settings", [dict(visual_pool=2), dict(visual_method="pool", visual_budget=64)])
def test_pooling_names_a_tower_that_keeps_its_cls_token(tiny, settings):
    """vision_feature_select_strategy='full' brings 577 features: pooling said '2 does not tile a 24 x 24
    grid' (VISUAL_POOL) or raised a bare reshape error (VISUAL_METHOD=pool)."""
    model, processor = tiny
    full = copy.deepcopy(model)
    full.config.vision_feature_select_strategy = "full"
    with pytest.raises(ValueError, match="square patch grid, and an image brings 577 features"), torch.no_grad():
        apply_hybrid(full, HybridConfig(**settings))(**image_inputs(processor))
