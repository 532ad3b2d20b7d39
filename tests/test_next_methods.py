"""The methods before the LLM on LLaVA-NeXT, unchanged: the model maps each crop's CLIP reads to
its packed patch tokens (newlines carry no CLIP signal and are dropped) and one selection of
VISUAL_BUDGET tokens per image runs over them. Checked against the same references as on LLaVA-1.5:
NumPy re-implementations fed by each crop's CLIP reads and stock packing, the masked-attention
reference, each prompt alone, cache-free recomputation, no host syncs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from hybrid_vlm import HybridConfig, apply_hybrid
from hybrid_vlm.hf_compat.clip import vision_reads
from hybrid_vlm.methods.visionzip import visionzip_split
from hybrid_vlm.methods.vispruner import vispruner_split
from hybrid_vlm.syncs import check_no_host_syncs

from conftest import QUESTIONS, next_inputs
from method_reference import divprune_reference, visionzip_reference, vispruner_reference
from reference import greedy_without_cache, masked_reference, next_packed_sources, stock_vision_reads
from test_llava_next import assert_batch_equals_each_alone, assert_matches_reference, engine_prefill, next_copy

METHODS = ("visionzip", "vispruner", "divprune")
NEW_TOKENS = 4


@pytest.fixture(scope="module")
def next64(tiny_next):
    """A float64 copy of the tiny LLaVA-NeXT (VisPruner's decisions hinge on every score gap; see
    test_methods.reads) and its batch of three aspect ratios."""
    model, processor = tiny_next
    model = copy.deepcopy(model).double()
    inputs = next_inputs(processor, QUESTIONS)
    inputs["pixel_values"] = inputs["pixel_values"].double()
    return model, processor, inputs


def reference_image_tokens(model, inputs, method: str, budget: int, per_crop: bool = False):
    """Per prompt: ([V_b, hidden] features with the chosen tokens at their packed slots, [V_b] valid).
    Per crop: one selection of min(budget, the crop's packed patches) in each crop."""
    projector = model.model.multi_modal_projector
    features, valid = [], []
    for b, source in enumerate(next_packed_sources(model, inputs)):
        crops = int(source.max()) // 576 + 1
        # the engine's CLIP reads (compared with stock eager CLIP in test_methods; VisPruner's order
        # needs them exactly, and stock eager takes its softmax in float32), stock's projection
        crop_pixels = inputs["pixel_values"][b, :crops]
        vision = vision_reads(model, crop_pixels, attention=True)
        reads = dict(cls_attention=vision.cls_attention, keys=vision.keys, hidden=vision.features)
        reads = {k: v.double().numpy() for k, v in reads.items()} | {"projected": stock_vision_reads(model, crop_pixels)["projected"]}
        image = torch.zeros(len(source), model.config.text_config.hidden_size, dtype=torch.float64)
        mask = torch.zeros(len(source), dtype=torch.bool)
        all_patches = np.flatnonzero(source >= 0)
        groups = [all_patches[source[all_patches] // 576 == crop] for crop in range(crops)] if per_crop else [all_patches]
        for patch_slots in (group for group in groups if len(group)):
            kept, tokens = reference_selection(reads, source[patch_slots], method, min(budget, len(patch_slots)), projector)
            image[patch_slots[kept]] = tokens
            mask[patch_slots[kept]] = True
        features.append(image)
        valid.append(mask)
    return features, valid


def reference_selection(reads: dict, at: np.ndarray, method: str, budget: int, projector):
    """(kept indices into `at`, their projected tokens) of one selection over the crop patches `at`."""
    flat = {k: v.reshape(-1, *v.shape[2:])[at] for k, v in reads.items()}
    if method == "visionzip":
        kept, tokens = visionzip_reference(flat["cls_attention"], flat["keys"], flat["hidden"], *visionzip_split(budget))
        return kept, projector(torch.from_numpy(tokens))
    if method == "vispruner":
        kept = vispruner_reference(flat["cls_attention"], flat["hidden"], budget, vispruner_split(budget))
        return kept, projector(torch.from_numpy(flat["hidden"][kept]))
    kept = divprune_reference(flat["projected"], budget)
    return kept, torch.from_numpy(flat["projected"][kept])


@pytest.mark.parametrize("fastv_k", [None, 16])
@pytest.mark.parametrize("method", METHODS)
def test_kept_set_and_logits_match_the_references(next64, method, fastv_k):
    model, _, inputs = next64
    budget = 128
    with torch.no_grad():
        features, valid = reference_image_tokens(model, inputs, method, budget)
    reference_logits, reference_kept = masked_reference(model, inputs, fastv_k, 2, image_features=(features, valid))
    out, real = engine_prefill(next_copy(model, visual_method=method, visual_budget=budget, fastv_k=fastv_k), inputs)
    assert_matches_reference(out, real, reference_logits, reference_kept)
    visual = (inputs["input_ids"] == model.config.image_token_id) & reference_kept
    assert visual.sum(dim=1).tolist() == [budget if fastv_k is None else fastv_k] * 3


@pytest.mark.parametrize("method,budget", [("visionzip", 40), ("vispruner", 40), ("visionzip", 300), ("vispruner", 300)])
def test_per_crop_budgets_match_the_references(next64, method, budget):
    """VISUAL_BUDGET_SCOPE=crop: one selection in every crop, over the patches unpadding keeps, as
    the official NeXT code counts it (a crop left with fewer keeps them all: the test's crops hold
    576, 480 and 288 patches)."""
    model, _, inputs = next64
    with torch.no_grad():
        features, valid = reference_image_tokens(model, inputs, method, budget, per_crop=True)
    reference_logits, reference_kept = masked_reference(model, inputs, None, 2, image_features=(features, valid))
    out, real = engine_prefill(next_copy(model, visual_method=method, visual_budget=budget, budget_scope="crop"), inputs)
    assert_matches_reference(out, real, reference_logits, reference_kept)
    per_crop = [np.bincount(source[source >= 0] // 576) for source in next_packed_sources(model, inputs)]
    visual = (inputs["input_ids"] == model.config.image_token_id) & reference_kept
    assert visual.sum(dim=1).tolist() == [int(np.minimum(counts, budget).sum()) for counts in per_crop]
    assert all(len(counts) == 3 for counts in per_crop)


@pytest.mark.parametrize("method,scope", [(method, "image") for method in METHODS] + [("vispruner", "crop")])
def test_batch_of_aspect_ratios_equals_each_alone(tiny_next, method, scope):
    model, processor = tiny_next
    assert_batch_equals_each_alone(next_copy(model, visual_method=method, visual_budget=96, budget_scope=scope), processor)


def test_cached_generation_equals_recomputation(tiny_next):
    model, processor = tiny_next
    inputs = next_inputs(processor, QUESTIONS)
    hybrid = next_copy(model, visual_method="visionzip", visual_budget=96, fastv_k=32)
    with torch.no_grad():
        cached = hybrid.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(cached, greedy_without_cache(hybrid, inputs, NEW_TOKENS))


@pytest.mark.parametrize("method,scope", [(method, "image") for method in METHODS] + [("visionzip", "crop")])
def test_forward_has_no_host_syncs(tiny_next, method, scope):
    model, processor = tiny_next
    hybrid = next_copy(model, visual_method=method, visual_budget=64, fastv_k=16, budget_scope=scope)
    assert check_no_host_syncs(hybrid, dict(next_inputs(processor, QUESTIONS)), decode_steps=2) == "pass"


def test_token_counts_are_text_plus_budget(tiny_next):
    model, processor = tiny_next
    inputs = next_inputs(processor, QUESTIONS)
    text = (inputs["attention_mask"].bool() & (inputs["input_ids"] != model.config.image_token_id)).sum(dim=1)
    with torch.no_grad():
        out = next_copy(model, visual_method="divprune", visual_budget=200, fastv_k=50)(**inputs, use_cache=True)
    state = out.past_key_values.hybrid_state
    assert state.prompt_tokens.tolist() == (text + 200).tolist()
    assert state.prompt_tokens_kept.tolist() == (text + 50).tolist()
    assert state.visual_counts().entered == [200] * 3


@pytest.mark.parametrize(
    "settings,error,message",
    [
        (dict(visual_method="pool", visual_budget=64), ValueError, "VISUAL_METHOD=pool is not implemented for LLaVA-NeXT"),
        (dict(visual_method="visionzip", visual_budget=64, fastv_k=16, fastv_newlines="keep"), ValueError, "FASTV_NEWLINES=keep cannot follow"),
        (dict(visual_method="vispruner", visual_budget=577, budget_scope="crop"), ValueError, "more than a crop's 576 patches"),
    ],
)
def test_unsupported_combinations_are_refused(tiny_next, settings, error, message):
    model, _ = tiny_next
    with pytest.raises(error, match=message):
        apply_hybrid(copy.deepcopy(model), HybridConfig(**settings))


def test_a_budget_above_an_image_is_refused(tiny_next):
    model, processor = tiny_next
    inputs = next_inputs(processor, QUESTIONS[:1])
    available = int((inputs["input_ids"] == model.config.image_token_id).sum())
    with torch.no_grad(), pytest.raises(ValueError, match="is not reachable by divprune for the batch's image 0 "):
        next_copy(model, visual_method="divprune", visual_budget=available)(**inputs)


def test_a_per_crop_budget_is_refused_where_images_have_one_grid(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="VISUAL_BUDGET_SCOPE=crop counts VISUAL_BUDGET in each LLaVA-NeXT anyres crop"):
        apply_hybrid(copy.deepcopy(model), HybridConfig(visual_method="visionzip", visual_budget=64, budget_scope="crop"))


def test_a_per_crop_budget_is_only_for_the_methods_that_count_per_crop():
    with pytest.raises(ValueError, match="budget rule of visionzip and vispruner only"):
        HybridConfig(visual_method="divprune", visual_budget=64, budget_scope="crop")
    with pytest.raises(ValueError, match="VISUAL_BUDGET_SCOPE='crops' is not valid: use image"):
        HybridConfig.from_env(dict(VISUAL_METHOD="visionzip", VISUAL_BUDGET="64", VISUAL_BUDGET_SCOPE="crops"))
    assert HybridConfig.from_env(dict(VISUAL_METHOD="visionzip", VISUAL_BUDGET="64", VISUAL_BUDGET_SCOPE="crop")).describe() == "visionzip-b64-per-crop"
