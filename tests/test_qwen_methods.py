"""The registry's methods on Qwen2.5-VL: DivPrune and pooling before the LLM on each image's merged
2x2 units (the PatchMerger's output), random selection at FastV's layer, FastV after either, and
PyramidDrop and DART inside the LLM on each sample's own span. Checked against independent
references: NumPy re-implementations fed by stock transformers' image features, a brute-force
enumeration of the pooling windows, the masked-attention reference at the stock 3-D ids of the kept
units, the compacted-sequence forward of each prompt alone (stage_reference), each prompt alone,
cache-free recomputation, no host syncs. The batches mix image sizes (54, 54 and 36 units), so
every sample has its own count."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from hybrid_vlm import HybridConfig, apply_hybrid
from hybrid_vlm.baselines import grid_pool_shape, pool_shape
from hybrid_vlm.syncs import check_no_host_syncs

from conftest import QUESTIONS, qwen_inputs, qwen_two_image_inputs
from method_reference import divprune_reference
from qwen_reference import qwen_masked_reference
from reference import greedy_without_cache, numpy_adaptive_pool, numpy_random_scores
from stage_reference import compacted_reference, pdrop_schedule_by_hand
from test_llava_next import assert_matches_reference, engine_prefill

NEW_TOKENS = 4
UNITS = [54, 54, 36]  # per prompt of qwen_inputs(processor, QUESTIONS)


def qwen_copy(model, **settings):
    return apply_hybrid(copy.deepcopy(model), HybridConfig(**settings))


def generate(model, inputs, steps=NEW_TOKENS):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)


def enumerated_pool_shape(budget: int, grid_rows: int, grid_cols: int) -> tuple[int, int]:
    """The pooling rule by enumeration of every rows x cols window grid inside the unit grid with at
    most `budget` windows: the most windows among those whose aspect is within a factor of 2 of the
    image's, then the closest aspect, then more rows; with none within a factor of 2, the closest
    aspect, then the most windows, then more rows."""
    aspect = math.log(grid_rows / grid_cols)
    shapes = [(r, c) for r in range(1, grid_rows + 1) for c in range(1, grid_cols + 1) if r * c <= budget]
    skew = {shape: abs(math.log(shape[0] / shape[1]) - aspect) for shape in shapes}
    banded = [shape for shape in shapes if skew[shape] <= math.log(2) + 1e-12]
    if banded:
        return max(banded, key=lambda s: (s[0] * s[1], -round(skew[s], 9), s[0]))
    return min(shapes, key=lambda s: (round(skew[s], 9), -s[0] * s[1], -s[0]))


def per_image_count(budget, units: int) -> int:
    """A count is kept per image, capped at its units; a fraction is that share, at least one."""
    return min(budget, units) if isinstance(budget, int) else max(1, round(units * budget))


def reference_unit_tokens(model, inputs, method: str, budget):
    """Per prompt: ([V_b, hidden] features with each image's chosen tokens at their units' slots,
    its images in order, [V_b] valid), from stock `get_image_features` and the NumPy references."""
    with torch.no_grad():
        images = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    features, valid = [], []
    for image, (t, h, w) in zip(images, inputs["image_grid_thw"].tolist()):
        units = image.shape[0]
        count = per_image_count(budget, units)
        values = image.double().numpy()
        if method == "divprune":
            kept = divprune_reference(values, count)
            tokens = values[kept]
        else:
            grid = (t * h // 2, w // 2)
            kept, tokens = numpy_adaptive_pool(values, *enumerated_pool_shape(count, *grid), grid=grid)
        placed = torch.zeros_like(image)
        placed[kept] = torch.from_numpy(tokens).to(image.dtype)
        mask = torch.zeros(units, dtype=torch.bool)
        mask[kept] = True
        features.append(placed)
        valid.append(mask)
    per_prompt = len(features) // inputs["input_ids"].shape[0]

    def by_prompt(rows):
        return [torch.cat(rows[i : i + per_prompt]) for i in range(0, len(rows), per_prompt)]

    return by_prompt(features), by_prompt(valid)


def reference_random_scores(model, inputs, seed: int) -> np.ndarray:
    """[B, L] the random draw at each prompt's image placeholders, keyed on its image's pixel rows."""
    is_image = (inputs["input_ids"] == model.config.image_token_id).numpy()
    rows = torch.split(inputs["pixel_values"], [t * h * w for t, h, w in inputs["image_grid_thw"].tolist()])
    scores = np.zeros(is_image.shape)
    for b, pixels in enumerate(rows):
        slots = np.flatnonzero(is_image[b])
        scores[b, slots] = numpy_random_scores(pixels[None], seed, len(slots))[0]
    return scores


@pytest.fixture(scope="module")
def qwen64(tiny_qwen):
    """A float64 copy of the tiny Qwen2.5-VL and its batch: float32 leaves the SDPA engine and the
    eager reference about 5e-5 apart relative (the reference tolerance) on this model."""
    model, processor = tiny_qwen
    inputs = qwen_inputs(processor, QUESTIONS)
    inputs["pixel_values"] = inputs["pixel_values"].double()
    return copy.deepcopy(model).double(), inputs


@pytest.fixture(scope="module")
def qwen64_two_images(qwen64, tiny_qwen):
    model, _ = qwen64
    inputs = qwen_two_image_inputs(tiny_qwen[1])
    inputs["pixel_values"] = inputs["pixel_values"].double()
    return model, inputs


# --- the pooling windows: enumeration ---------------------------------------------------------------


def test_pool_shape_is_the_enumerated_best_window_grid():
    cases = [(budget, rows, cols) for rows in range(1, 13) for cols in range(1, 13) for budget in range(1, rows * cols + 1)]
    cases += [(budget, rows, cols) for rows, cols in [(20, 16), (6, 9), (9, 4), (1, 50), (36, 22)] for budget in (1, 7, 16, 61, 64, 200)]
    for budget, rows, cols in cases:
        assert grid_pool_shape(budget, rows, cols) == enumerated_pool_shape(budget, rows, cols), (budget, rows, cols)


def test_pool_shape_on_a_square_grid_is_llavas():
    for budget in (192, 144, 128, 64, 36, 16):
        assert grid_pool_shape(budget, 24, 24) == pool_shape(budget)


# --- the kept set and the logits: the masked reference at the stock 3-D ids --------------------------


@pytest.mark.parametrize("fastv_k", [None, 8])
@pytest.mark.parametrize("method,budget", [("divprune", 20), ("divprune", 0.5), ("pool", 16), ("pool", 0.25), ("pool", 40)])
def test_pre_llm_kept_set_and_logits_match_the_references(qwen64, method, budget, fastv_k):
    model, inputs = qwen64
    features, valid = reference_unit_tokens(model, inputs, method, budget)
    reference_logits, reference_kept = qwen_masked_reference(model, inputs, fastv_k, 2, image_features=(features, valid))
    out, real = engine_prefill(qwen_copy(model, visual_method=method, visual_budget=budget, fastv_k=fastv_k), inputs)
    assert_matches_reference(out, real, reference_logits, reference_kept)
    visual = ((inputs["input_ids"] == model.config.image_token_id) & reference_kept).sum(dim=1).tolist()
    entered = [int(mask.sum()) for mask in valid]
    assert visual == (entered if fastv_k is None else [min(fastv_k, n) for n in entered])


@pytest.mark.parametrize("fastv_k,fastv_layer", [(16, 2), (0.5, 1), (40, 3)])
def test_random_selection_matches_the_reference(qwen64, fastv_k, fastv_layer):
    model, inputs = qwen64
    scores = reference_random_scores(model, inputs, seed=3)
    reference_logits, reference_kept = qwen_masked_reference(model, inputs, fastv_k, fastv_layer, slot_scores=scores)
    hybrid = qwen_copy(model, fastv_k=fastv_k, fastv_layer=fastv_layer, fastv_select="random", select_seed=3)
    out, real = engine_prefill(hybrid, inputs)
    assert_matches_reference(out, real, reference_logits, reference_kept)


def test_counts_per_sample_are_capped_and_fractions_are_shares(tiny_qwen):
    model, processor = tiny_qwen
    inputs = qwen_inputs(processor, QUESTIONS)
    text = (inputs["attention_mask"].bool() & (inputs["input_ids"] != model.config.image_token_id)).sum(dim=1)
    for budget, entered in [(40, [40, 40, 36]), (0.5, [27, 27, 18]), (1000, UNITS)]:
        with torch.no_grad():
            out = qwen_copy(model, visual_method="divprune", visual_budget=budget, fastv_k=30)(**inputs, use_cache=True)
        state = out.past_key_values.hybrid_state
        assert state.visual_counts().entered == entered
        assert state.prompt_tokens.tolist() == (text + torch.tensor(entered)).tolist()
        assert state.prompt_tokens_kept.tolist() == (text + torch.tensor([min(30, n) for n in entered])).tolist()


@pytest.mark.parametrize("method,budget,fastv_k", [("divprune", 40, None), ("divprune", 20, 0.5), ("pool", 0.25, None)])
def test_two_images_per_prompt_each_get_their_budget(qwen64_two_images, method, budget, fastv_k):
    """Two prompts of two images each (54 and 36 units): each image gets its own budget, and the
    kept set and logits equal the masked reference (FastV's fraction over what entered)."""
    model, inputs = qwen64_two_images
    features, valid = reference_unit_tokens(model, inputs, method, budget)
    reference_logits, reference_kept = qwen_masked_reference(model, inputs, fastv_k, 2, image_features=(features, valid))
    out, real = engine_prefill(qwen_copy(model, visual_method=method, visual_budget=budget, fastv_k=fastv_k), inputs)
    assert_matches_reference(out, real, reference_logits, reference_kept)
    if method == "divprune" and fastv_k is None:
        assert out.past_key_values.hybrid_state.visual_counts().entered == [40 + 36] * 2


# --- inside the LLM: PyramidDrop and DART on each sample's own span ---------------------------------

DEEP_LAYERS = 8
DEEP_STAGE_LAYERS = (1, 2, 4)  # PyramidDrop's (2, 8, 16) of 32 layers, scaled to 8: round(0.5) = 0, raised to 1
STAGE_CASES = {
    "pdrop-20": (dict(visual_method="pdrop", visual_budget=20), "pdrop"),
    "pdrop-40": (dict(visual_method="pdrop", visual_budget=40), "pdrop"),  # at or above the 36-unit image: all kept
    "pdrop-0.3": (dict(visual_method="pdrop", visual_budget=0.3), "pdrop"),  # a layer average of 0.3 V_b per sample
    "dart-20": (dict(visual_method="dart", visual_budget=20), "dart"),
    "dart-40-matched-official-pivots": (dict(visual_method="dart", visual_budget=40, dart_quota="matched", dart_pivots="official"), "dart"),
    # a fraction: the official Qwen2.5-VL rule, int(L * (1 - reduction_ratio) / 8) picks per pivot, per sample
    "dart-0.3": (dict(visual_method="dart", visual_budget=0.3), "dart"),
    "dart-0.3-matched": (dict(visual_method="dart", visual_budget=0.3, dart_quota="matched"), "dart"),
}


@pytest.fixture(scope="module")
def deep_qwen64():
    """A tiny Qwen2.5-VL with an 8-layer LLM (three PyramidDrop stages), in float64, and its batch."""
    from hybrid_vlm.tiny_qwen import build_tiny_qwen

    from conftest import QWEN_PIXELS

    model, processor = build_tiny_qwen(text_layers=DEEP_LAYERS, **QWEN_PIXELS)
    inputs = qwen_inputs(processor, QUESTIONS)
    inputs["pixel_values"] = inputs["pixel_values"].double()
    return model.double(), processor, inputs


def unpadded_sample(batch, b: int) -> dict:
    """Prompt b of a left-padded batch of one image each, as it would be alone."""
    pad = int((batch["attention_mask"][b] == 0).sum())
    rows = [t * h * w for t, h, w in batch["image_grid_thw"].tolist()]
    start = sum(rows[:b])
    sample = {key: batch[key][b : b + 1, pad:] for key in ("input_ids", "attention_mask", "mm_token_type_ids")}
    return sample | dict(pixel_values=batch["pixel_values"][start : start + rows[b]], image_grid_thw=batch["image_grid_thw"][b : b + 1])


def reference_stages(settings: dict, units: int) -> tuple[dict, list[int] | None]:
    budget = settings["visual_budget"]
    if settings["visual_method"] == "pdrop":
        if isinstance(budget, float):
            return pdrop_schedule_by_hand(budget * units, units, DEEP_STAGE_LAYERS, DEEP_LAYERS), None
        if budget >= units:
            return dict.fromkeys(DEEP_STAGE_LAYERS, units), None
        return pdrop_schedule_by_hand(budget, units, DEEP_STAGE_LAYERS, DEEP_LAYERS), None
    if settings.get("dart_quota", "official") == "official":
        return {2: None}, [int(units * budget / 8) if isinstance(budget, float) else budget // 8] * 8
    picks = (round(units * budget) if isinstance(budget, float) else budget) - 4
    return {2: None}, [picks // 8 + (1 if i < picks % 8 else 0) for i in range(8)]


@pytest.mark.parametrize("case", STAGE_CASES)
def test_stages_equal_the_compacted_reference_per_sample(deep_qwen64, case):
    """A left-padded batch of three image sizes; each sample against the compacted-sequence forward
    of its unpadded prompt alone, at the stock 3-D ids, with the schedule of its own visual count."""
    model, _, inputs = deep_qwen64
    settings, method = STAGE_CASES[case]
    out, real = engine_prefill(qwen_copy(model, **settings), inputs)
    for b, units in enumerate(UNITS):
        sample = unpadded_sample(inputs, b)
        pad = inputs["input_ids"].shape[1] - sample["input_ids"].shape[1]
        stages, quotas = reference_stages(settings, units)
        logits, kept = compacted_reference(model, sample, method, stages, "logical", quotas, settings.get("dart_pivots", "sorted"))
        assert np.array_equal(np.sort(out.kept_positions[b][real[b]].numpy() - pad), kept)
        torch.testing.assert_close(out.logits[b, -1], logits, rtol=1e-9, atol=1e-9)


def test_a_pdrop_budget_below_a_samples_floor_is_refused_naming_the_range(deep_qwen64):
    model, _, inputs = deep_qwen64
    with torch.no_grad(), pytest.raises(ValueError, match=r"VISUAL_BUDGET=5 is not reachable by pdrop .* 54 visual tokens"):
        qwen_copy(model, visual_method="pdrop", visual_budget=5)(**inputs)


TWO_IMAGE_UNITS = (54, 36)  # each prompt of qwen_two_image_inputs


@pytest.mark.parametrize("budget", [40, 20])
def test_pdrop_and_dart_spend_on_two_images_what_divprune_lets_in(deep_qwen64, tiny_qwen, budget):
    """A count is per image and caps each image at what it holds: at 40, the 36-unit image brings all
    36 and the 54-unit one 40, so DivPrune lets in 76, and pdrop and dart, which rank the prompt's
    90 units as one pool, spend 76 (40 + 40 = 80 would give the small image's unused share to the
    large one); at 20, both images hold more, and the prompt gets 2 x 20."""
    model, _, _ = deep_qwen64
    inputs = qwen_two_image_inputs(tiny_qwen[1])
    inputs["pixel_values"] = inputs["pixel_values"].double()
    spent = sum(min(budget, units) for units in TWO_IMAGE_UNITS)
    counts = {}
    for settings in (dict(visual_method="divprune"), dict(visual_method="pdrop"), dict(visual_method="dart", dart_quota="matched")):
        with torch.no_grad():
            out = qwen_copy(model, visual_budget=budget, **settings)(**inputs, use_cache=True)
        counts[settings["visual_method"]] = out.past_key_values.hybrid_state.visual_counts()
    assert counts["divprune"].entered == [spent] * 2
    schedule = pdrop_schedule_by_hand(spent, sum(TWO_IMAGE_UNITS), DEEP_STAGE_LAYERS, DEEP_LAYERS)
    assert counts["pdrop"].kept == [schedule[DEEP_STAGE_LAYERS[-1]]] * 2
    assert counts["dart"].kept == [spent] * 2  # matched quotas: 4 pivots + 8 x (spent - 4) / 8 picks


def test_a_pdrop_count_on_two_images_is_refused_naming_the_setting_as_given(deep_qwen64, tiny_qwen):
    model, _, _ = deep_qwen64
    inputs = qwen_two_image_inputs(tiny_qwen[1])
    inputs["pixel_values"] = inputs["pixel_values"].double()
    with torch.no_grad(), pytest.raises(ValueError, match=r"VISUAL_BUDGET=5 per image \(10 for this prompt's images of \[54, 36\] tokens\)"):
        qwen_copy(model, visual_method="pdrop", visual_budget=5)(**inputs)


# --- the batch, the cache, the host ------------------------------------------------------------------


SETTINGS = [
    dict(visual_method="divprune", visual_budget=20),
    dict(visual_method="pool", visual_budget=0.25, fastv_k=6),
    dict(fastv_k=16, fastv_select="random"),
    dict(visual_method="pdrop", visual_budget=20),
    dict(visual_method="dart", visual_budget=20),
    dict(visual_method="dart", visual_budget=0.3),
]


@pytest.mark.parametrize("settings", SETTINGS)
def test_batch_of_image_sizes_equals_each_alone(tiny_qwen, settings):
    model, processor = tiny_qwen
    hybrid = qwen_copy(model, **settings)
    batched = generate(hybrid, qwen_inputs(processor, QUESTIONS))
    for i in range(len(QUESTIONS)):
        alone = generate(hybrid, qwen_inputs(processor, QUESTIONS[i : i + 1], indices=[i]))
        assert torch.equal(batched[i, -NEW_TOKENS:], alone[0, -NEW_TOKENS:])


@pytest.mark.parametrize("settings", SETTINGS)
def test_cached_generation_equals_recomputation(tiny_qwen, settings):
    model, processor = tiny_qwen
    inputs = qwen_inputs(processor, QUESTIONS)
    hybrid = qwen_copy(model, **settings)
    assert torch.equal(generate(hybrid, inputs), greedy_without_cache(hybrid, inputs, NEW_TOKENS))


@pytest.mark.parametrize("settings", SETTINGS)
def test_no_host_syncs_on_meta(tiny_qwen, settings):
    model, processor = tiny_qwen
    assert check_no_host_syncs(qwen_copy(model, **settings), qwen_inputs(processor, QUESTIONS), decode_steps=2) == "pass"


RAW_SHORT_PROMPTS = [
    "<|vision_start|><|image_pad|><|vision_end|>a",  # 2 real tokens after the image
    "<|vision_start|><|image_pad|><|vision_end|>",  # 1
    "<|vision_start|><|image_pad|><|vision_end|>Describe this picture briefly, which shape is in the center?",
]


def raw_inputs(processor, prompts, indices):
    from hybrid_vlm.tiny import synthetic_image

    from conftest import QWEN_SIZES

    images = [synthetic_image(i).resize(QWEN_SIZES[i]) for i in indices]
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)


@pytest.mark.parametrize("budget", [20, 0.3])
def test_dart_with_fewer_than_four_text_tokens_after_the_image_keeps_batch_equal_to_alone(tiny_qwen, budget):
    """Raw prompts with 2 and 1 real tokens after the image: their text pivots were top-k picks among
    masked slots (left padding in a batch), so a batch kept other tokens than each prompt alone."""
    model, processor = tiny_qwen
    hybrid = qwen_copy(model, visual_method="dart", visual_budget=budget)
    batch = raw_inputs(processor, RAW_SHORT_PROMPTS, [0, 1, 2])
    out, real = engine_prefill(hybrid, batch)
    for i, prompt in enumerate(RAW_SHORT_PROMPTS):
        alone = raw_inputs(processor, [prompt], [i])
        alone_out, alone_real = engine_prefill(hybrid, alone)
        pad = batch["input_ids"].shape[1] - alone["input_ids"].shape[1]
        assert torch.equal(out.kept_positions[i][real[i]] - pad, alone_out.kept_positions[0][alone_real[0]]), prompt
        torch.testing.assert_close(out.logits[i, -1], alone_out.logits[0, -1], rtol=1e-4, atol=1e-5)
    official = qwen_copy(model, visual_method="dart", visual_budget=budget, dart_pivots="official")
    with torch.no_grad(), pytest.raises(ValueError, match="DART_PIVOTS=official needs 4 real tokens after each image"):
        official(**raw_inputs(processor, RAW_SHORT_PROMPTS[:1], [0]))


def test_a_dart_count_above_every_image_keeps_them_all_and_gives_stock_logits(tiny_qwen):
    """VISUAL_BUDGET=16384 asks each of DART's 8 pivots for 2,047 picks, more than the padded
    prompt's length: topk raised. Every image holds fewer tokens than the count, so each keeps them
    all and the batch's last logits are stock transformers'."""
    model, processor = tiny_qwen
    inputs = qwen_inputs(processor, QUESTIONS)
    assert 16384 // 8 > inputs["input_ids"].shape[1]
    with torch.no_grad():
        stock = model(**inputs).logits[:, -1]
        out = qwen_copy(model, visual_method="dart", visual_budget=16384)(**inputs, use_cache=True)
    assert out.past_key_values.hybrid_state.visual_counts().entered == UNITS
    assert out.past_key_values.hybrid_state.prompt_tokens_kept.tolist() == out.past_key_values.hybrid_state.prompt_tokens.tolist()
    torch.testing.assert_close(out.logits[:, -1], stock, rtol=1e-4, atol=1e-5)


# --- refused settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize("settings,error,needle", [
    (dict(visual_method="visionzip", visual_budget=64), ValueError, r"no \[CLS\] token"),
    (dict(visual_method="vispruner", visual_budget=64), ValueError, r"no \[CLS\] token"),
    (dict(visual_method="sparsevlm", visual_budget=64), NotImplementedError, "not implemented for Qwen2.5-VL yet"),
    (dict(visual_method="sparsevlm", visual_budget=0.5), ValueError, "it takes one of its schedules"),
    (dict(visual_method="pdrop", visual_budget=0.2), ValueError, r"VISUAL_BUDGET=0.2 is not reachable by pdrop on this 4-layer LLM"),
    (dict(visual_method="dart", visual_budget=2, dart_quota="matched"), ValueError, "needs at least its 4 image pivots"),
    (dict(visual_pool=2), ValueError, "use VISUAL_METHOD=pool with VISUAL_BUDGET"),
])
def test_unavailable_methods_are_refused_with_the_reason(tiny_qwen, settings, error, needle):
    model, _ = tiny_qwen
    with pytest.raises(error, match=needle):
        qwen_copy(model, **settings)


@pytest.mark.parametrize("budget", [0, 1.0, 1.5, -0.25, True])
def test_bad_budgets_name_the_setting_and_the_accepted_forms(budget):
    with pytest.raises(ValueError, match=r"VISUAL_BUDGET=.* is not valid for divprune: use an integer n >= 1 .*fraction"):
        HybridConfig(visual_method="divprune", visual_budget=budget)


# --- theoretical MACs: FlopCounterMode -----------------------------------------------------------------


@pytest.mark.parametrize("settings", [
    {}, dict(fastv_k=16), dict(fastv_k=0.5, fastv_select="random"), dict(visual_method="divprune", visual_budget=20),
    dict(visual_method="pool", visual_budget=0.25), dict(visual_method="divprune", visual_budget=20, fastv_k=8, fastv_layer=1),
])
def test_prefill_macs_equal_the_flop_counter(tiny_qwen, settings):
    """The whole prefill of one unpadded prompt (windowed tower, merger, the method's scoring, the LLM
    at the counts it kept) equals FlopCounterMode's count under SDPA's MATH backend (every
    query-key pair: attention="dense"), per-row counts as the plugin records them."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from hybrid_vlm.qwen_flops import qwen_method_prefill_macs, qwen_shape_from_config

    model, processor = tiny_qwen
    hybrid = qwen_copy(model, **settings)
    inputs = qwen_inputs(processor, QUESTIONS[:1])
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = hybrid(**inputs, use_cache=True, logits_to_keep=1)
    counts = out.past_key_values.hybrid_state.visual_counts()
    text = int((inputs["input_ids"] != model.config.image_token_id).sum())
    grids = [tuple(grid) for grid in inputs["image_grid_thw"].tolist()]
    expected = qwen_method_prefill_macs(qwen_shape_from_config(model.config), hybrid.hybrid_config, grids, text,
                                        counts.entered[0], counts.kept[0], attention="dense")
    assert counter.get_total_flops() == 2 * expected.total
    assert (expected.selection > 0) == ("divprune" in str(settings))
