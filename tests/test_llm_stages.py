"""PyramidDrop and DART inside the LLM, and the position axis, against independent references:
the schedule against the table solved from the maintainer's recipe, DART's rule on hand-worked cases a mutated rule
fails, kept sets and logits against a compacted-sequence forward of the stock layers
(`stage_reference`), a left-padded batch against each sample alone, cached generation against
recomputation, the cache's own shapes, and no host syncs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from hybrid_vlm import HybridConfig, apply_hybrid
from hybrid_vlm.methods import pdrop
from hybrid_vlm.methods.dart import dart_keep_mask, image_quotas, kept_count, matched_quotas, official_quotas
from hybrid_vlm.syncs import check_no_host_syncs
from hybrid_vlm.tiny import synthetic_image

from conftest import DEEP_LAYERS as LAYERS
from conftest import QUESTIONS, assert_batched_generation_equals_each_alone, image_inputs
from reference import greedy_without_cache
from stage_reference import compacted_reference, pdrop_schedule_by_hand

STAGE_LAYERS = (1, 4, 8)  # by hand: round(2 * 16 / 32), round(8 * 16 / 32), round(16 * 16 / 32)
NEW_TOKENS = 4


def patched(model, **settings):
    return apply_hybrid(copy.deepcopy(model), HybridConfig(**settings))


# ------------------------------------------------------------------------------- the schedule


def test_pdrop_schedule_reproduces_the_table_solved_from_the_maintainers_recipe():
    """methods.md (PyramidDrop issue #29: layers [2, 8, 16], one lambda): 128 -> 242/102/42 and 64 ->
    111/21/4, the lambdas nearest each budget (the maintainer's own 0.19 gives 109/20/3); the counts
    truncate (lambda 0.561: 576 * 0.561**3 = 101.7 -> 101, not 102)."""
    assert pdrop.stage_layers(32) == (2, 8, 16)
    assert pdrop.keep_counts(576, 0.561, 3) == (323, 181, 101)
    assert tuple(pdrop.schedule(128, 576, 32).values()) == (242, 102, 42)
    assert tuple(pdrop.schedule(64, 576, 32).values()) == (111, 21, 4)
    assert pdrop.keep_counts(576, 0.19, 3) == (109, 20, 3)  # the maintainer's quoted lambda, as the README says
    # the official default layers [8, 16, 24] reach 192 exactly at lambda 0.254 (the README's 146 / 37 / 9)
    assert pdrop.keep_counts(576, 0.254, 3) == (146, 37, 9) and pdrop.layer_mean(576, (146, 37, 9), (8, 16, 24), 32) == 192
    assert pdrop.layer_mean(576, (109, 20, 3), (2, 8, 16), 32) == pytest.approx(62.9, abs=0.05)
    # 192: lambda 0.56 (322/180/101, layer-average 191.875) is nearer than the table's 0.561 (192.3)
    assert pdrop.schedule(192, 576, 32) == pdrop_schedule_by_hand(192, 576, (2, 8, 16), 32) == {2: 322, 8: 180, 16: 101}


def test_pdrop_stage_layers_scale_to_shallow_llms_and_budgets_below_the_floor_are_refused():
    assert pdrop.stage_layers(LAYERS) == STAGE_LAYERS
    assert pdrop.stage_layers(4) == (1, 2, 3)
    # on LLaVA-1.5-13B's 40 layers the official scripts pass the 7B layer_list ([8, 16, 24] in all
    # of Cooperx521/PyramidDrop's scripts/v1_5/pdrop_eval/*.sh, which run llava-v1.5-13b): not scaled
    assert pdrop.stage_layers(40) == pdrop.stage_layers(32) == (2, 8, 16)
    with pytest.raises(ValueError, match="at least 4 layers"):
        pdrop.stage_layers(3)
    with pytest.raises(ValueError, match=r"not reachable by pdrop .* \(36, 576\)"):
        pdrop.schedule(32, 576, 32)  # two full layers of 576 already average 36


def test_dart_quotas_official_and_matched():
    assert official_quotas(64) == (8,) * 8 and kept_count(official_quotas(64)) == 68
    assert kept_count(official_quotas(192)) == 196 and kept_count(official_quotas(128)) == 132
    # a fraction as the official Qwen2.5-VL code sizes it from its reduction_ratio (default 0.778)
    for tokens in (1000, 3999, 4000, 8000):
        assert image_quotas(0.222, "official", tokens) == (int(tokens * (1 - 0.778) / 8),) * 8
    assert matched_quotas(64) == (8, 8, 8, 8, 7, 7, 7, 7) and kept_count(matched_quotas(64)) == 64
    assert kept_count(matched_quotas(130)) == 130


# ------------------------------------------------------------------ DART by hand, with mutants


def hand_case():
    """12 tokens: image at 0..7, text at 8..11. The key norms make 0, 1, 2, 3 the image pivots and
    8..11 the text pivots. Hidden states (3-D): pivot 0 = e1, pivot 1 = e2, the rest e3; pool
    tokens 4 = -(e1 + e2)/sqrt(2), 5 = -0.6 e1 + 0.8 e3, 6 = -0.6 e2 + 0.8 e3, 7 = e3."""
    key_norms = torch.tensor([[9.0, 8, 7, 6, 1, 1, 1, 1, 5, 4, 3, 2]])
    e1, e2, e3 = torch.eye(3)
    rows = [e1, e2, e3, e3, -(e1 + e2) / 2**0.5, -0.6 * e1 + 0.8 * e3, -0.6 * e2 + 0.8 * e3, e3, e3, e3, e3, e3]
    normed = torch.stack(rows)[None]
    is_image = torch.zeros(1, 12, dtype=torch.bool)
    is_image[0, :8] = True
    return key_norms, normed, is_image, ~is_image


def kept_list(mask: torch.Tensor) -> list[int]:
    return torch.nonzero(mask[0]).flatten().tolist()


def test_dart_keeps_the_image_pivots_and_the_least_similar_pool_token_by_hand():
    """Quota 1 for the first pivot (token 0, e1): cosines 4: -0.71, 5: -0.6, 6: 0, 7: 0, so it
    takes 4. Keeping the most similar (a mutant) would take 6; ranking pivots by the L2 norm of
    the keys changes nothing here, but the pivots themselves are always kept."""
    key_norms, normed, is_image, is_text = hand_case()
    assert kept_list(dart_keep_mask(key_norms, normed, is_image, is_text, (1, 0, 0, 0, 0, 0, 0, 0))) == [0, 1, 2, 3, 4]


def test_dart_takes_each_pool_token_once_in_visiting_order_by_hand():
    """Pivots 0 (e1) and 1 (e2) both want token 4 most. Visited by position, 0 takes 4 and then 1
    takes 6 (-0.6 to e2). A mutant visiting 1 first would keep 5; one that does not remove taken
    tokens from the pool would take 4 twice and keep five tokens."""
    key_norms, normed, is_image, is_text = hand_case()
    assert kept_list(dart_keep_mask(key_norms, normed, is_image, is_text, (1, 1, 0, 0, 0, 0, 0, 0))) == [0, 1, 2, 3, 4, 6]


def test_dart_official_pivot_order_is_cpython_set_order():
    """methods.md checked on CPython: set([429, 465, 76, 300, 643, 642, 636, 630]) iterates as
    [642, 643, 76, 429, 300, 465, 630, 636]; here, with 8 tokens of padding before the prompt,
    the positions the set sees are the unpadded ones."""
    from hybrid_vlm.methods.dart import official_pivot_order

    pivots = torch.tensor([[429, 465, 76, 300, 643, 642, 636, 630]]) + 8
    order = official_pivot_order(pivots, torch.tensor([8]))
    assert order[0].tolist() == [p + 8 for p in (642, 643, 76, 429, 300, 465, 630, 636)]


# ------------------------------------------------------ the engine against the compacted forward


CASES = {
    "pdrop": (dict(visual_method="pdrop", visual_budget=64), "pdrop"),
    "pdrop-renumbered": (dict(visual_method="pdrop", visual_budget=64, position_mode="renumbered"), "pdrop"),
    "dart": (dict(visual_method="dart", visual_budget=64), "dart"),
    "dart-matched-official-pivots": (dict(visual_method="dart", visual_budget=64, dart_quota="matched", dart_pivots="official"), "dart"),
    "fastv-renumbered": (dict(fastv_k=64, position_mode="renumbered"), "fastv"),
}


def reference_stages(settings: dict) -> tuple[dict[int, int], list[int] | None]:
    if settings.get("visual_method") == "pdrop":
        return pdrop_schedule_by_hand(64, 576, STAGE_LAYERS, LAYERS), None
    if settings.get("visual_method") == "dart":
        quotas = [8] * 8 if settings.get("dart_quota", "official") == "official" else [8, 8, 8, 8, 7, 7, 7, 7]
        return {2: None}, quotas
    return {2: 64}, None


@pytest.mark.parametrize("case", CASES)
def test_kept_sets_and_logits_equal_the_compacted_reference(deep64, case):
    """Float64 so near-ties cannot flip a kept set; a left-padded batch, each sample checked alone
    against the reference (its unpadded prompt)."""
    model, processor = deep64
    settings, method = CASES[case]
    batch = image_inputs(processor, QUESTIONS[:2])
    batch["pixel_values"] = batch["pixel_values"].double()
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        out = patched(model, **settings)(**batch)
    stages, quotas = reference_stages(settings)
    for b in range(2):
        pad = int((batch["attention_mask"][b] == 0).sum())
        sample = {key: value[b : b + 1, pad:] if key != "pixel_values" else value[b : b + 1] for key, value in batch.items()}
        logits, kept = compacted_reference(model, sample, method, stages, settings.get("position_mode", "logical"),
                                           quotas, settings.get("dart_pivots", "sorted"))
        engine_kept = out.kept_positions[b].numpy() - pad
        assert np.array_equal(np.sort(engine_kept[engine_kept >= 0]), kept)
        torch.testing.assert_close(out.logits[b, -1], logits, rtol=1e-9, atol=1e-9)


def test_a_mutated_pdrop_score_fails_the_reference(deep64):
    """Scoring PyramidDrop with the previous layer's attention row (FastV's rule) keeps another set."""
    model, processor = deep64
    batch = image_inputs(processor, QUESTIONS[:1])
    batch["pixel_values"] = batch["pixel_values"].double()
    stages = pdrop_schedule_by_hand(64, 576, STAGE_LAYERS, LAYERS)
    with torch.no_grad():
        out = patched(model, visual_method="pdrop", visual_budget=64)(**batch)
    _, mutant = compacted_reference(model, batch, "fastv", stages)
    assert not np.array_equal(np.sort(out.kept_positions[0].numpy()), mutant)


def test_renumbered_positions_change_the_output(deep64):
    model, processor = deep64
    batch = image_inputs(processor, QUESTIONS[:1])
    batch["pixel_values"] = batch["pixel_values"].double()
    with torch.no_grad():
        logical = patched(model, visual_method="pdrop", visual_budget=64)(**batch).logits[0, -1]
        renumbered = patched(model, visual_method="pdrop", visual_budget=64, position_mode="renumbered")(**batch).logits[0, -1]
    assert (logical - renumbered).abs().max() > 1e-3 * logical.abs().max()


# ------------------------------------------------------------------------ decode and batching


DECODE_CASES = ("pdrop", "pdrop-renumbered", "dart", "fastv-renumbered")


@pytest.mark.parametrize("case", DECODE_CASES)
def test_cached_generation_equals_recomputation(deep, case):
    """Each step recomputed from scratch on the whole sequence, scored by the last prompt token:
    under renumbered positions each stage's tokens (the generated ones too) are numbered from 0,
    which the cache must reproduce with one next position per group."""
    model, processor = deep
    hybrid = patched(model, **CASES[case][0])
    inputs = image_inputs(processor, QUESTIONS[:2])
    with torch.no_grad():
        cached = hybrid.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        recomputed = greedy_without_cache(hybrid, inputs, NEW_TOKENS)
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("case", ("pdrop", "pdrop-renumbered", "dart-matched-official-pivots"))
def test_batched_generation_equals_each_sample_alone(deep, case):
    model, processor = deep
    assert_batched_generation_equals_each_alone(patched(model, **CASES[case][0]), processor, NEW_TOKENS)


def test_pdrop_cache_holds_one_group_per_stage(deep):
    model, processor = deep
    inputs = image_inputs(processor, QUESTIONS[:2])
    with torch.no_grad():
        out = patched(model, visual_method="pdrop", visual_budget=64)(**inputs)
    cache, state = out.past_key_values, out.past_key_values.hybrid_state
    held = [layer.keys.shape[2] for layer in cache.layers]
    length = inputs["input_ids"].shape[1]
    text = length - 576
    counts = pdrop_schedule_by_hand(64, 576, STAGE_LAYERS, LAYERS)
    expected = [length] + [text + counts[1]] * 3 + [text + counts[4]] * 4 + [text + counts[8]] * 8
    assert state.kv_lengths() == held == expected
    assert [group.first_layer for group in state.groups] == [0, *STAGE_LAYERS]
    layer_mean = (576 + 3 * counts[1] + 4 * counts[4] + 8 * counts[8]) / 16
    assert state.visual_counts().layer_mean == [layer_mean, layer_mean]


@pytest.mark.parametrize("settings", [dict(visual_method="pdrop", visual_budget=64), dict(visual_method="dart", visual_budget=64),
                                      dict(visual_method="pdrop", visual_budget=64, position_mode="renumbered")])
def test_no_host_syncs(deep, settings):
    model, processor = deep
    assert check_no_host_syncs(patched(model, **settings), image_inputs(processor, QUESTIONS[:2])) == "pass"


def test_dart_official_pivot_order_reads_the_host(deep):
    """The documented cost of the official order: one host read per prefill."""
    model, processor = deep
    hybrid = patched(model, visual_method="dart", visual_budget=64, dart_pivots="official")
    assert check_no_host_syncs(hybrid, image_inputs(processor, QUESTIONS[:2])).startswith("fail")


def two_image_prompt(processor) -> dict:
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": QUESTIONS[0]}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return processor(images=[synthetic_image(0), synthetic_image(1)], text=[prompt], return_tensors="pt")


def test_a_prompt_of_two_images_gets_the_budget_of_each(deep):
    """VISUAL_BUDGET counts visual tokens per image for every method: a prompt of two images lets
    in 2 x 64 under DivPrune, so pdrop averages 2 x 64 over the layers and dart keeps its 4 + 8 x 16
    (both rank the two images' 1152 tokens together, as one pool)."""
    model, processor = deep
    inputs = two_image_prompt(processor)
    counts = {}
    for method in ("divprune", "pdrop", "dart"):
        with torch.no_grad():
            out = patched(model, visual_method=method, visual_budget=64)(**inputs, use_cache=True)
        counts[method] = out.past_key_values.hybrid_state.visual_counts()
    assert counts["divprune"].entered == [128]
    schedule = pdrop_schedule_by_hand(128, 1152, STAGE_LAYERS, LAYERS)
    held = [1152, *schedule.values()]
    bounds = [0, *STAGE_LAYERS, LAYERS]
    assert counts["pdrop"].kept == [held[-1]]
    assert counts["pdrop"].layer_mean == [pytest.approx(sum((b - a) * n for a, b, n in zip(bounds, bounds[1:], held)) / LAYERS)]
    assert abs(counts["pdrop"].layer_mean[0] - 128) < 1
    assert counts["dart"].kept == [4 + 8 * 16]


# ------------------------------------------------------------------------------- bad settings


def test_settings_that_cannot_run_are_refused(deep, tiny_next):
    model, _ = deep
    with pytest.raises(ValueError, match="cannot be combined with FASTV_K"):
        HybridConfig(visual_method="pdrop", visual_budget=64, fastv_k=32)
    with pytest.raises(ValueError, match=r"not reachable by pdrop .* \(36, 576\)"):
        patched(model, visual_method="pdrop", visual_budget=32)
    with pytest.raises(ValueError, match="DART_QUOTA='even' is not valid"):
        HybridConfig(visual_method="dart", visual_budget=64, dart_quota="even")
    with pytest.raises(ValueError, match="is not reachable by dart"):
        patched(model, visual_method="dart", visual_budget=600)
    # official quotas keep 4 + 8 * (budget // 8): 576 keeps 580, and 575 (572) is the largest that fits
    with pytest.raises(ValueError, match=r"keeps 580 of 576 visual tokens; use 4\.\.575$"):
        patched(model, visual_method="dart", visual_budget=576)
    patched(model, visual_method="dart", visual_budget=575)
    with pytest.raises(ValueError, match=r"use 4\.\.576$"):
        patched(model, visual_method="dart", visual_budget=600, dart_quota="matched")
    with pytest.raises(ValueError, match="FASTV_NEWLINES=keep is FastV's"):  # dart runs on NeXT: tests/test_next_stages.py
        patched(tiny_next[0], visual_method="dart", visual_budget=64, fastv_newlines="keep")
    environment = dict(VISUAL_METHOD="dart", VISUAL_BUDGET="64", DART_QUOTA="matched", DART_PIVOTS="official")
    assert HybridConfig.from_env(environment).describe() == "dart-matched-b64-l2-pivots-official"


def test_a_fastv_layer_beyond_the_llm_refuses_only_methods_that_read_it(deep):
    """pdrop and sparsevlm prune at their own stage layers: a FASTV_LAYER left over from another run
    (16 of a 16-layer LLM) refused them, though they never read it (15 gives the default's logits)."""
    model, processor = deep
    inputs = image_inputs(processor, QUESTIONS[:1])
    for method in ("pdrop", "sparsevlm"):
        with torch.no_grad():
            default = patched(model, visual_method=method, visual_budget=64)(**inputs).logits
            beyond = patched(model, visual_method=method, visual_budget=64, fastv_layer=LAYERS)(**inputs).logits
        assert torch.equal(beyond, default), method
    for settings in (dict(fastv_k=8), dict(visual_method="dart", visual_budget=64)):
        with pytest.raises(ValueError, match=f"FASTV_LAYER={LAYERS} is not valid: use 1..{LAYERS - 1}"):
            patched(model, fastv_layer=LAYERS, **settings)


@pytest.mark.parametrize("settings", [dict(fastv_k=8), dict(fastv_k=8, fastv_select="random"), dict(visual_method="pdrop", visual_budget=64),
                                      dict(visual_method="dart", visual_budget=64)])
def test_a_prompt_ending_with_its_image_is_refused_by_pruning_inside_the_llm(deep, settings):
    """The last prompt token scores and predicts the first new token; a raw prompt ending with
    its image made it a visual slot that a stage could prune (the stock reference's last row then
    differed by 10 in the logits, and PyramidDrop's later stages scored with BOS). The same prompt
    with text after the image runs, and so does the method before the LLM, which prunes nothing there."""
    from hybrid_vlm.tiny import synthetic_image

    model, processor = deep
    ending = processor(images=[synthetic_image(0)], text=["USER: describe <image>"], return_tensors="pt")
    with_text = processor(images=[synthetic_image(0)], text=["USER: describe <image> ASSISTANT:"], return_tensors="pt")
    assert ending["input_ids"][0, -1] == model.config.image_token_id
    hybrid = patched(model, **settings)
    with torch.no_grad(), pytest.raises(ValueError, match="the prompt ends with an image token"):
        hybrid(**ending)
    with torch.no_grad():
        hybrid(**with_text)
        patched(model, visual_method="visionzip", visual_budget=64)(**ending)
