"""SparseVLM v1.5 inside the LLM against independent references: its schedule against the numbers
the official code prints, DPC-kNN and the rater choice on hand-worked cases, the kept sequence and
logits against a compacted-sequence forward of the stock layers (`sparsevlm_reference`), a
left-padded batch against each sample alone, cached generation against recomputation, the cache's
own shapes, and no host syncs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from hybrid_vlm import HybridConfig, apply_hybrid
from hybrid_vlm.methods import sparsevlm
from hybrid_vlm.syncs import check_no_host_syncs
from hybrid_vlm.tiny import synthetic_image

from conftest import DEEP_LAYERS as LAYERS
from conftest import QUESTIONS, assert_batched_generation_equals_each_alone, image_inputs
from reference import greedy_without_cache
from sparsevlm_reference import dpc_knn_reference, raters_reference, recycled_by_hand, sparsevlm_reference

STAGE_LAYERS = (2, 4, 8)  # by hand: the official boundaries 3, 7, 16 of 32, times 16 / 32, rounded (1.5 -> 2, 3.5 -> 4)
SCORING_LAYERS = (1, 3, 7)  # the layer before each stage: its attention scores, its output is pruned
NEW_TOKENS = 4


def patched(model, **settings):
    return apply_hybrid(copy.deepcopy(model), HybridConfig(visual_method="sparsevlm", **settings))


# ------------------------------------------------------------------------------- the schedule


def test_schedule_reproduces_the_official_counts():
    """methods.md section 7: kept + recycled per stage; the official "equal token num" at 192 is
    the printed 192.03125 (SparseVLMs issue #24): layers 0-1 at 576, then (L_i+1 - L_i) per stage."""
    assert sparsevlm.stage_counts(192, 576) == ((300, 9), (200, 4), (110, 3))
    assert sparsevlm.stage_counts(128, 576) == ((303, 9), (110, 7), (36, 3))
    assert sparsevlm.stage_counts(64, 576) == ((66, 16), (30, 2), (17, 1))
    held = [kept + clusters for kept, clusters in sparsevlm.stage_counts(192, 576)]
    assert (2 * 576 + 4 * held[0] + 9 * held[1] + 17 * held[2]) / 32 == 192.03125
    assert sparsevlm.stage_layers(32) == (3, 7, 16)
    assert sparsevlm.stage_layers(40) == (3, 7, 16)  # official pruning_loc=[2, 6, 15] whatever the depth (13B: 40 layers)
    assert sparsevlm.stage_layers(LAYERS) == STAGE_LAYERS
    assert sparsevlm.stage_layers(4) == (1, 2, 3)
    assert all(sparsevlm.recycled_counts(p) == recycled_by_hand(p) for p in range(1, 600))
    with pytest.raises(ValueError, match="VISUAL_BUDGET=96 is not one of SparseVLM's schedules: use 192, 128, 64"):
        sparsevlm.stage_counts(96, 576)
    with pytest.raises(ValueError, match="SparseVLM needs an LLM of at least 4 layers"):
        sparsevlm.stage_layers(3)


# ---------------------------------------------------------------------------- hand-worked cases


HAND_POINTS = [[0.0], [0.1], [0.3], [10.0], [10.2], [10.6]]


def test_dpc_knn_on_a_hand_worked_case():
    """k = 3 neighbours: densities exp(-mean d^2) peak at 0.1 (0.0167); 10.2 is the densest of its
    group, 9.9 from anything denser; 10.6 is next by distance x density (0.4 x 0.84). Clusters:
    {0, 0.1, 0.3} -> 0.1333, {10, 10.2} -> 10.1, {10.6}."""
    points = torch.tensor([HAND_POINTS], dtype=torch.float64)
    merged, centers = sparsevlm.dpc_knn_merge(points, 3)
    assert centers[0].tolist() == [1, 4, 5]
    # the official mean divides by (members + 1e-6): a relative 1e-6 below the plain mean
    torch.testing.assert_close(merged[0, :, 0], torch.tensor([0.4 / 3, 10.1, 10.6], dtype=torch.float64), rtol=2e-6, atol=0)
    # a mutated rule (centers = the densest tokens) picks 0.1, 0.0 and 0.3 instead
    density = torch.tensor([np.exp(-np.mean(np.sort(np.abs(np.array(HAND_POINTS)[:, 0] - x))[:3] ** 2)) for x in np.array(HAND_POINTS)[:, 0]])
    assert density.argsort(descending=True)[:3].tolist() != [1, 4, 5]


def test_dpc_knn_equals_the_reference_on_random_clouds():
    generator = torch.Generator().manual_seed(0)
    for count, clusters in ((154, 16), (16, 2), (5, 1), (83, 9)):
        tokens = torch.randn(2, count, 24, generator=generator, dtype=torch.float64)
        merged, centers = sparsevlm.dpc_knn_merge(tokens, clusters)
        for b in range(2):
            expected_merged, expected_centers = dpc_knn_reference(tokens[b].numpy(), clusters)
            assert centers[b].tolist() == expected_centers.tolist()
            np.testing.assert_allclose(merged[b].numpy(), expected_merged, rtol=1e-5, atol=1e-9)


def test_dpc_knn_gives_an_exactly_tied_pair_one_peak():
    """With k = 2 (stage 2 of the 64 schedule) each token's density is exp(-d²/2), d its nearest
    neighbour's distance, so mutually nearest tokens tie exactly. The official noise makes one of a
    tied pair the denser; without it both of the closest pair were "denser than none" and became
    the two centers, and the far group got none. Points 5.0, 0.0, 5.5, 0.1, 6.2: the pair (0.0,
    0.1) ties, and so does (5.0, 5.5). With the lower index denser, 0.0 is the peak (delta 6.2, the
    farthest distance) and 5.0 the next (delta 4.9, to 0.1; 5.5 and 6.2 have a denser token 0.5 and
    0.7 away)."""
    points = torch.tensor([[[5.0], [0.0], [5.5], [0.1], [6.2]]], dtype=torch.float64)
    merged, centers = sparsevlm.dpc_knn_merge(points, 2)
    assert centers[0].tolist() == [1, 0]  # a strict ">" with no tie order gave [1, 3]: 0.0 and 0.1
    expected_merged, expected_centers = dpc_knn_reference(points[0].numpy(), 2)
    assert centers[0].tolist() == expected_centers.tolist()
    np.testing.assert_allclose(merged[0].numpy(), expected_merged, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(merged[0, :, 0].numpy(), [0.05, (5.0 + 5.5 + 6.2) / 3], rtol=2e-6)
    # the other draw of the noise (the higher index denser) picks the mirror image: 0.1, then 5.5
    assert dpc_knn_reference(points[0].numpy(), 2, noise=1e-12 * np.arange(5))[1].tolist() == [3, 2]


def test_raters_by_hand_and_against_the_reference():
    """One visual token [1, 0] against text [2, 0], [0, 0], [0, 0]: softmax (0.787, 0.107, 0.107),
    mean 1/3: only the first text token rates. The slot before the image is never text."""
    embeds = torch.tensor([[[0.0, 5.0], [1.0, 0.0], [2.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    is_text = torch.tensor([[False, False, True, True, True]])
    raters = sparsevlm.rater_mask(embeds, torch.tensor([[1]]), torch.tensor([[0, 2, 3, 4]]), is_text)
    assert raters[0].tolist() == [False, False, True, False, False]
    generator = torch.Generator().manual_seed(1)
    embeds = torch.randn(1, 40, 16, generator=generator, dtype=torch.float64)
    image, text = np.arange(5, 29), np.arange(29, 40)
    is_text = torch.zeros(1, 40, dtype=torch.bool)
    is_text[0, 29:] = True
    non_visual = torch.tensor([[*range(5), *range(29, 40)]])
    raters = sparsevlm.rater_mask(embeds, torch.from_numpy(image)[None], non_visual, is_text)
    assert np.flatnonzero(raters[0].numpy()).tolist() == raters_reference(embeds[0].numpy(), image, text).tolist()


# ------------------------------------------------------ the engine against the compacted forward


@pytest.mark.parametrize("budget", (64, 192))
@pytest.mark.parametrize("position_mode", ("renumbered", "logical"))
def test_kept_sequence_and_logits_equal_the_compacted_reference(deep64, position_mode, budget):
    """Float64; a left-padded batch of 2, each sample against its unpadded prompt alone: the same
    tokens in the same order (clusters at their centers' positions, after the kept visual block)
    and the same last-token logits."""
    model, processor = deep64
    batch = image_inputs(processor, QUESTIONS[:2])
    batch["pixel_values"] = batch["pixel_values"].double()
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        out = patched(model, visual_budget=budget, position_mode=position_mode)(**batch)
    for b in range(2):
        pad = int((batch["attention_mask"][b] == 0).sum())
        sample = {key: value[b : b + 1, pad:] if key != "pixel_values" else value[b : b + 1] for key, value in batch.items()}
        logits, kept = sparsevlm_reference(model, sample, SCORING_LAYERS, sparsevlm.SCHEDULES[budget], position_mode)
        engine_kept = out.kept_positions[b].numpy() - pad
        assert engine_kept[engine_kept >= 0].tolist() == kept.tolist()
        torch.testing.assert_close(out.logits[b, -1], logits, rtol=1e-9, atol=1e-9)


def test_a_mutated_rater_choice_fails_the_reference(deep64):
    """Scoring with every text token's row instead of the chosen raters keeps another sequence."""
    model, processor = deep64
    batch = image_inputs(processor, QUESTIONS[:1])
    batch["pixel_values"] = batch["pixel_values"].double()
    with torch.no_grad():
        out = patched(model, visual_budget=64, position_mode="renumbered")(**batch)
    _, mutant = sparsevlm_reference(model, batch, SCORING_LAYERS, sparsevlm.SCHEDULES[64], "renumbered", every_text_token_rates=True)
    assert out.kept_positions[0].tolist() != mutant.tolist()


# ------------------------------------------------------------------------ decode and batching


@pytest.mark.parametrize("position_mode", ("renumbered", "logical"))
def test_cached_generation_equals_recomputation(deep, position_mode):
    model, processor = deep
    hybrid = patched(model, visual_budget=64, position_mode=position_mode)
    inputs = image_inputs(processor, QUESTIONS[:2])
    with torch.no_grad():
        cached = hybrid.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        recomputed = greedy_without_cache(hybrid, inputs, NEW_TOKENS)
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("position_mode", ("renumbered", "logical"))
def test_batched_generation_equals_each_sample_alone(deep, position_mode):
    model, processor = deep
    assert_batched_generation_equals_each_alone(patched(model, visual_budget=64, position_mode=position_mode), processor, NEW_TOKENS)


def test_cache_holds_one_group_per_stage(deep):
    model, processor = deep
    inputs = image_inputs(processor, QUESTIONS[:2])
    with torch.no_grad():
        out = patched(model, visual_budget=64)(**inputs)
    cache, state = out.past_key_values, out.past_key_values.hybrid_state
    length = inputs["input_ids"].shape[1]
    text = length - 576
    expected = [length] * 2 + [text + 66 + 16] * 2 + [text + 30 + 2] * 4 + [text + 17 + 1] * 8
    assert state.kv_lengths() == [layer.keys.shape[2] for layer in cache.layers] == expected
    assert [group.first_layer for group in state.groups] == [0, *STAGE_LAYERS]
    assert state.visual_counts().layer_mean == [(2 * 576 + 2 * 82 + 4 * 32 + 8 * 18) / 16] * 2


@pytest.mark.parametrize("position_mode", ("renumbered", "logical"))
def test_no_host_syncs(deep, position_mode):
    model, processor = deep
    assert check_no_host_syncs(patched(model, visual_budget=64, position_mode=position_mode), image_inputs(processor, QUESTIONS[:2])) == "pass"


# ------------------------------------------------------------------------------- bad settings


def test_two_images_in_a_prompt_are_refused(deep):
    """The clusters go right after the kept visual block: with two images that put the second
    image's tokens before the text between the images (causal order broken, silently)."""
    model, processor = deep
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}, {"type": "text", "text": QUESTIONS[0]}]}],
        add_generation_prompt=True, tokenize=False,
    )
    inputs = processor(images=[synthetic_image(0), synthetic_image(1)], text=[prompt], return_tensors="pt")
    with pytest.raises(NotImplementedError, match="one image per prompt, as the official code does, not 2"):
        patched(model, visual_budget=64)(**inputs)


def test_settings_that_cannot_run_are_refused(deep, tiny_next):
    model, _ = deep
    with pytest.raises(ValueError, match="cannot be combined with FASTV_K"):
        HybridConfig(visual_method="sparsevlm", visual_budget=64, fastv_k=32)
    with pytest.raises(ValueError, match="VISUAL_BUDGET=32 is not one of SparseVLM's schedules: use 192, 128, 64"):
        patched(model, visual_budget=32)
    with pytest.raises(NotImplementedError, match="sparsevlm is not implemented for LLaVA-NeXT: the official code runs"):
        patched(tiny_next[0], visual_budget=64)
    config = HybridConfig.from_env(dict(VISUAL_METHOD="sparsevlm", VISUAL_BUDGET="64", HYBRID_POSITIONS="renumbered"))
    assert config.describe() == "sparsevlm-b64_renumbered"
    assert config.describe(num_layers=32) == "sparsevlm-b64-l3.7.16_renumbered"
