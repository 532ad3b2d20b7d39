"""PyramidDrop and DART inside the LLM on LLaVA-NeXT, as both official codes run them there: over
each sample's whole packed span (base image, unpadded crop grid and the newline tokens among the
candidates), with that sample's own length (the aspect ratios in a batch give three). PyramidDrop's
count or fraction is solved per sample; DART keeps 4 + 8 * (budget // 8), so the official NeXT
default of 320 keeps 324. Checked against the compacted-sequence forward of each prompt alone
(stock packing, stock eager weights, NumPy ranking: tests/stage_reference.py), each prompt alone,
cache-free recomputation and no host syncs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from hybrid_vlm import HybridConfig, apply_hybrid
from hybrid_vlm.syncs import check_no_host_syncs

from conftest import QUESTIONS, next_inputs
from reference import greedy_without_cache
from stage_reference import compacted_reference, pdrop_schedule_by_hand
from test_llava_next import assert_batch_equals_each_alone, engine_prefill

DEEP_LAYERS = 8
DEEP_STAGE_LAYERS = (1, 2, 4)  # PyramidDrop's (8, 16, 24) of 32 layers, scaled to 8 (as on Qwen2.5-VL)
CASES = {
    "pdrop-400": dict(visual_method="pdrop", visual_budget=400),
    "pdrop-0.47": dict(visual_method="pdrop", visual_budget=0.47),  # lambda 0.5 over 4 stages averages 0.469
    "dart-64": dict(visual_method="dart", visual_budget=64),
    "dart-320": dict(visual_method="dart", visual_budget=320),  # the official NeXT default: 324 kept
    "dart-600": dict(visual_method="dart", visual_budget=600),  # above LLaVA-1.5's 576, within every span here
}


def next_copy(model, **settings):
    return apply_hybrid(copy.deepcopy(model), HybridConfig(**settings))


@pytest.fixture(scope="module")
def deep_next64():
    """A tiny LLaVA-NeXT with an 8-layer LLM (three PyramidDrop stages), in float64, and its batch."""
    from hybrid_vlm.tiny import build_tiny_llava_next

    model, processor = build_tiny_llava_next(text_layers=DEEP_LAYERS)
    inputs = next_inputs(processor, QUESTIONS)
    inputs["pixel_values"] = inputs["pixel_values"].double()
    return model.double(), processor, inputs


def unpadded_sample(batch, b: int) -> dict:
    """Prompt b of a left-padded batch of one image each, as it would be alone."""
    pad = int((batch["attention_mask"][b] == 0).sum())
    sample = {key: batch[key][b : b + 1, pad:] for key in ("input_ids", "attention_mask")}
    return sample | dict(pixel_values=batch["pixel_values"][b : b + 1], image_sizes=batch["image_sizes"][b : b + 1])


def reference_stages(settings: dict, span: int) -> tuple[dict, list[int] | None]:
    """{layer: kept} and DART's picks per pivot for one sample whose packed span holds `span` tokens."""
    budget = settings["visual_budget"]
    if settings["visual_method"] == "pdrop":
        target = budget * span if isinstance(budget, float) else budget
        return pdrop_schedule_by_hand(target, span, DEEP_STAGE_LAYERS, DEEP_LAYERS), None
    return {2: None}, [budget // 8] * 8


@pytest.mark.parametrize("case", CASES)
def test_stages_equal_the_compacted_reference_per_sample(deep_next64, case):
    """Each sample of a batch of three aspect ratios against the compacted forward of its unpadded
    prompt alone, newlines ranked with the image tokens, at the original position ids."""
    model, _, inputs = deep_next64
    settings = CASES[case]
    out, real = engine_prefill(next_copy(model, **settings), inputs)
    spans = (inputs["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()
    assert len(set(spans)) == 3  # three spans: the per-sample rules are exercised
    for b, span in enumerate(spans):
        sample = unpadded_sample(inputs, b)
        pad = inputs["input_ids"].shape[1] - sample["input_ids"].shape[1]
        stages, quotas = reference_stages(settings, span)
        logits, kept = compacted_reference(model, sample, settings["visual_method"], stages, "logical", quotas)
        assert np.array_equal(np.sort(out.kept_positions[b][real[b]].numpy() - pad), kept)
        torch.testing.assert_close(out.logits[b, -1], logits, rtol=1e-9, atol=1e-9)
        if case == "dart-320":
            text = len(kept) - 324
            assert text == int((sample["input_ids"] != model.config.image_token_id).sum())  # 324 image tokens kept


SETTINGS = [dict(visual_method="pdrop", visual_budget=0.5), dict(visual_method="dart", visual_budget=64)]


@pytest.mark.parametrize("settings", SETTINGS)
def test_batch_of_aspect_ratios_equals_each_alone(tiny_next, settings):
    model, processor = tiny_next
    assert_batch_equals_each_alone(next_copy(model, **settings), processor)


@pytest.mark.parametrize("settings", SETTINGS)
def test_cached_generation_equals_recomputation(tiny_next, settings):
    model, processor = tiny_next
    hybrid, inputs = next_copy(model, **settings), next_inputs(processor, QUESTIONS)
    with torch.no_grad():
        cached = hybrid.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert torch.equal(cached, greedy_without_cache(hybrid, inputs, 4))


@pytest.mark.parametrize("settings", SETTINGS)
def test_no_host_syncs_on_meta(tiny_next, settings):
    model, processor = tiny_next
    assert check_no_host_syncs(next_copy(model, **settings), next_inputs(processor, QUESTIONS), decode_steps=2) == "pass"


@pytest.mark.parametrize(
    "settings,error,message",
    [
        (dict(visual_method="sparsevlm", visual_budget=64), NotImplementedError, "sparsevlm is not implemented for LLaVA-NeXT"),
        (dict(visual_method="dart", visual_budget=64, fastv_newlines="keep"), ValueError, "FASTV_NEWLINES=keep is FastV's"),
    ],
)
def test_what_the_official_codes_do_not_run_is_refused(tiny_next, settings, error, message):
    model, _ = tiny_next
    with pytest.raises(error, match=message):
        next_copy(model, **settings)
