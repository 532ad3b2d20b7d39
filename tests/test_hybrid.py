"""DyMU and DyMU + FastV (the hybrid) through the LLM, against independent references.

The vision side (merging maths, thresholds, calibration) is tested in test_dymu.py. Here the
merged tokens produced by `dymu_image_features` are the given input, and the question is whether
the engine's LLM treats them right: a masked-attention reference built from the stock decoder
layers in eager mode keeps every placeholder slot (merged-away slots and FastV-dropped tokens are
masked as keys; every token keeps the position id of its placeholder), and the engine, which
physically drops those slots, must match it. Plus cache == recomputation and batch == per image.
"""

from __future__ import annotations

import copy

import pytest
import torch

from hybrid_vlm import HybridConfig, apply_hybrid
from hybrid_vlm.calibrate import calibrate_thresholds, write_threshold_file
from hybrid_vlm.config import visual_keep_count
from hybrid_vlm.dymu import SPLITS
from hybrid_vlm.fastv import visual_keep_counts
from hybrid_vlm.hf_compat import dymu_image_features, new_cache, output_cache
from hybrid_vlm.tiny import synthetic_image

from conftest import QUESTIONS, generation_positions, image_inputs
from reference import greedy_without_cache, masked_reference, official_keep_count
from test_engine import NEW_TOKENS, REFERENCE_RTOL


@pytest.fixture(scope="module")
def split_thresholds(tiny, tmp_path_factory):
    """Threshold files for the tiny model, one per DyMU split, calibrated on synthetic images with
    that split (200 tokens after the 3-block tower: 325 nominal at the read layer)."""
    model, processor = tiny
    images = [image_inputs(processor, QUESTIONS[:1], seeds=[seed])["pixel_values"] for seed in range(100, 108)]
    folder = tmp_path_factory.mktemp("dymu")
    paths = {}
    for split in SPLITS:
        payload = calibrate_thresholds(model, [torch.cat(images)], target=200, split=split, progress=False)
        paths[split] = folder / f"tiny-200-{split}.json"
        write_threshold_file(paths[split], payload)
    return paths


@pytest.fixture(scope="module")
def tiny_thresholds(split_thresholds):
    return split_thresholds["official"]


def dymu_copy(model, thresholds, **settings):
    return apply_hybrid(copy.deepcopy(model), HybridConfig(dymu=str(thresholds), **settings))


@torch.no_grad()
def engine_prefill(model, inputs):
    """(output, real [B, L_kept]): which of the engine's output rows are real tokens."""
    cache = new_cache(model)
    out = model(**inputs, past_key_values=cache, use_cache=True)
    return out, cache.hybrid_state.pruned_key_valid


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("fastv_k,fastv_layer", [(None, 2), (64, 2), (0.5, 1), (0.75, 3), (300, 2)])
def test_hybrid_prefill_matches_masked_reference(tiny, split_thresholds, fastv_k, fastv_layer, split):
    model, processor = tiny
    inputs = image_inputs(processor, QUESTIONS)
    hybrid = dymu_copy(model, split_thresholds[split], fastv_k=fastv_k, fastv_layer=fastv_layer, dymu_split=split)
    reference_logits, reference_kept = masked_reference(model, inputs, fastv_k, fastv_layer, hybrid.hybrid_thresholds, split)
    out, real = engine_prefill(hybrid, inputs)

    engine_kept = torch.zeros_like(reference_kept).scatter(1, out.kept_positions, real)
    assert torch.equal(engine_kept, reference_kept)
    expected = reference_logits.gather(1, out.kept_positions[..., None].expand(-1, -1, reference_logits.shape[-1]))
    assert (out.logits - expected)[real].abs().max() <= REFERENCE_RTOL * expected.abs().max()


def test_merged_counts_differ_per_image(tiny, tiny_thresholds):
    """Guards the batch tests below: the images must merge to different counts."""
    model, processor = tiny
    hybrid = dymu_copy(model, tiny_thresholds)
    merged = dymu_image_features(hybrid, image_inputs(processor, QUESTIONS)["pixel_values"], hybrid.hybrid_thresholds)
    counts = merged.valid.sum(dim=1).tolist()
    assert len(set(counts)) == len(counts), counts
    assert all(100 < c < 400 for c in counts), counts


def test_no_merging_thresholds_give_vanilla_logits(tiny, tiny_thresholds):
    model, processor = tiny
    inputs = image_inputs(processor, QUESTIONS)
    hybrid = dymu_copy(model, tiny_thresholds)
    hybrid.hybrid_thresholds = torch.full_like(hybrid.hybrid_thresholds, float("inf"))
    with torch.no_grad():
        expected = model(**inputs, position_ids=generation_positions(inputs["attention_mask"])).logits
        actual = hybrid(**inputs).logits
    real = inputs["attention_mask"].bool()
    assert actual.shape == expected.shape
    assert (actual - expected)[real].abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("fastv_k", [None, 64, 0.5])
def test_hybrid_cached_generation_equals_recomputation(tiny, tiny_thresholds, fastv_k):
    model, processor = tiny
    inputs = image_inputs(processor, QUESTIONS)
    hybrid = dymu_copy(model, tiny_thresholds, fastv_k=fastv_k)
    with torch.no_grad():
        cached = hybrid.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(cached, greedy_without_cache(hybrid, inputs, NEW_TOKENS))


@pytest.mark.parametrize("fastv_k", [None, 64, 0.5])
def test_hybrid_batched_generation_equals_each_image_alone(tiny, tiny_thresholds, fastv_k):
    model, processor = tiny
    hybrid = dymu_copy(model, tiny_thresholds, fastv_k=fastv_k)
    with torch.no_grad():
        batched = hybrid.generate(**image_inputs(processor, QUESTIONS), max_new_tokens=NEW_TOKENS,
                                  min_new_tokens=NEW_TOKENS, do_sample=False)
        for i, question in enumerate(QUESTIONS):
            alone = hybrid.generate(**image_inputs(processor, [question], seeds=[i]), max_new_tokens=NEW_TOKENS,
                                    min_new_tokens=NEW_TOKENS, do_sample=False)
            assert torch.equal(batched[i, -NEW_TOKENS:], alone[0, -NEW_TOKENS:])


def test_hybrid_token_counts_on_the_cache(tiny, tiny_thresholds):
    model, processor = tiny
    inputs = image_inputs(processor, QUESTIONS)
    hybrid = dymu_copy(model, tiny_thresholds, fastv_k=64)
    merged = dymu_image_features(hybrid, inputs["pixel_values"], hybrid.hybrid_thresholds)
    _, real = engine_prefill(hybrid, inputs)
    with torch.no_grad():
        out = hybrid.generate(**inputs, max_new_tokens=1, do_sample=False, return_dict_in_generate=True)
    state = output_cache(out).hybrid_state
    text_tokens = inputs["attention_mask"].sum(dim=1) - 576
    assert torch.equal(state.prompt_tokens, text_tokens + merged.valid.sum(dim=1))
    assert torch.equal(state.prompt_tokens_kept, text_tokens + 64)


def test_logical_positions_matter_for_merged_tokens(tiny, tiny_thresholds):
    model, processor = tiny
    inputs = image_inputs(processor, QUESTIONS[:1])
    with torch.no_grad():
        logical = dymu_copy(model, tiny_thresholds)(**inputs).logits[:, -1]
        renumbered = dymu_copy(model, tiny_thresholds, position_mode="renumbered")(**inputs).logits[:, -1]
    assert (logical - renumbered).abs().max() >= 1e-2 * logical.abs().max()


def test_threshold_file_for_another_model_is_rejected(tiny_thresholds):
    from hybrid_vlm.tiny import build_tiny_llava

    other, _ = build_tiny_llava(seed=5)
    with pytest.raises(ValueError, match="threshold"):
        apply_hybrid(other, HybridConfig(dymu=str(tiny_thresholds)))


# --- FastV's ratio on DyMU's odd counts: the official llava-hf rounding -------------------------


@pytest.mark.parametrize("ratio", [0.5, 0.25, 0.75, 0.3, 0.7, 0.9])
def test_fastv_ratio_keep_count_is_round_half_to_even(ratio):
    """Both engine paths (the Python count and the per-sample device count) against the official
    `round(V * (1 - R))`, for every odd V up to 576."""
    odd = list(range(1, 577, 2))
    on_device = visual_keep_counts(torch.tensor(odd), ratio).tolist()
    assert on_device == [visual_keep_count(v, ratio) for v in odd] == [official_keep_count(v, ratio) for v in odd]


def test_fastv_keeps_100_of_201_at_half():
    assert [visual_keep_count(v, 0.5) for v in (201, 203, 1, 3)] == [100, 102, 0, 2]  # not 101, 102, 1, 2
    assert visual_keep_counts(torch.tensor([201, 203, 1, 3]), 0.5).tolist() == [100, 102, 0, 2]


def test_fastv_ratio_on_merged_counts_rounds_half_to_even(tiny, tiny_thresholds):
    """DyMU leaves odd visual counts; FastV's ratio then keeps round(V*(1-R)) half to even per
    sample (the engine's on-device keep_per_sample path), as the official llava-hf FastV."""
    model, processor = tiny
    inputs = image_inputs(processor, QUESTIONS)
    hybrid = dymu_copy(model, tiny_thresholds, fastv_k=0.5)
    merged = dymu_image_features(hybrid, inputs["pixel_values"], hybrid.hybrid_thresholds).valid.sum(dim=1).tolist()
    assert any(v % 4 == 1 for v in merged), merged  # V/2 = even + 0.5: half-to-even and half-up disagree here
    with torch.no_grad():
        state = output_cache(hybrid.generate(**inputs, max_new_tokens=1, do_sample=False, return_dict_in_generate=True)).hybrid_state
    text_tokens = inputs["attention_mask"].sum(dim=1) - 576
    assert (state.prompt_tokens_kept - text_tokens).tolist() == [official_keep_count(v, 0.5) for v in merged]


def test_a_batch_whose_prompts_end_with_an_image_of_unequal_merged_counts_equals_each_alone(tiny, tiny_thresholds):
    """Raw prompts ending with <image>, merged to unequal counts: a shorter image keeps its earliest
    empty slots, so its prompt still ends with a token of its image. Which empty slots it kept was
    topk's order among ties, and the batch was refused when that order took the last one."""
    model, processor = tiny
    hybrid = dymu_copy(model, tiny_thresholds)
    prompts = ["USER: <image>", "USER: what is it? <image>", "USER: describe <image>"]
    images = [image_inputs(processor, QUESTIONS[:1], seeds=[seed])["pixel_values"] for seed in range(3)]
    batch = processor(images=[synthetic_image(seed) for seed in range(3)], text=prompts, return_tensors="pt", padding=True)
    counts = dymu_image_features(hybrid, torch.cat(images), hybrid.hybrid_thresholds).num_tokens.tolist()
    assert len(set(counts)) > 1
    with torch.no_grad():
        batched = hybrid(**batch).logits[:, -1]
        for seed, prompt in enumerate(prompts):
            alone = hybrid(**processor(images=[synthetic_image(seed)], text=[prompt], return_tensors="pt")).logits[:, -1]
            torch.testing.assert_close(batched[seed : seed + 1], alone, rtol=1e-4, atol=1e-4)


def test_compaction_refuses_a_prompt_whose_last_token_would_be_an_empty_slot():
    """Sample 1's image keeps 1 token; padding it to the batch's 4 takes its 3 earliest empty slots.
    With its token last ([F, F, F, T]) the prompt ends with it; with the token first, only empty slots
    can fill the tail, and the batch is refused by name."""
    from hybrid_vlm.placement import PlacedPrompt, compacted

    is_visual = torch.tensor([[False, True, True, True, True]] * 2)

    def compact(sample_1_valid):
        new_valid = torch.tensor([[True, True, True, True, True], [True, *sample_1_valid]])
        placed = PlacedPrompt(inputs_embeds=torch.arange(10.0).view(2, 5, 1), new_valid=new_valid,
                              position_ids=torch.arange(5).expand(2, 5), visual_positions=torch.tensor([[1, 2, 3, 4]] * 2),
                              entered_positions=None, slot_scores=None)
        return compacted(placed, is_visual, [4, 1])

    last_kept = compact([False, False, False, True])
    assert last_kept.new_valid[1].tolist() == [True, False, False, False, True]
    assert last_kept.inputs_embeds[1, -1].item() == 9.0  # the image's token, last
    for valid in ([True, False, False, False], [False, True, False, False]):
        with pytest.raises(ValueError, match="ends with an image token, and its image keeps fewer tokens than another"):
            compact(valid)
