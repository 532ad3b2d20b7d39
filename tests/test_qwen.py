"""Qwen2.5-VL through the engine, against independent references: stock transformers (its
`get_rope_index` ids, its forward and generate), the masked-attention reference over stock eager
layers at the stock 3-D ids (`qwen_reference`), cache-free recomputation, and each prompt alone.
The batches mix image sizes, so samples hold different visual counts and different grids."""

from __future__ import annotations

import copy

import pytest
import torch

from hybrid_vlm import HybridConfig, apply_hybrid, inputs_for
from hybrid_vlm.qwen import qwen_image_slots, qwen_prompt_positions
from hybrid_vlm.syncs import check_no_host_syncs

from conftest import QUESTIONS, QWEN_SIZES, qwen_inputs, qwen_two_image_inputs, synthetic_image
from qwen_reference import qwen_masked_reference, stock_positions
from reference import greedy_without_cache
from test_engine import NEW_TOKENS
from test_llava_next import assert_matches_reference, engine_prefill


def qwen_copy(model, **settings):
    return apply_hybrid(copy.deepcopy(model), HybridConfig(**settings))


def generate(model, inputs, steps=NEW_TOKENS):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)


# --- placement and positions: stock transformers ---------------------------------------------------


def test_positions_equal_stock_and_transposed_grids_differ(tiny_qwen):
    model, processor = tiny_qwen
    inputs = qwen_inputs(processor, QUESTIONS)
    grids = inputs["image_grid_thw"].tolist()
    assert grids[0] == [1, 12, 18] and grids[1] == [1, 18, 12]  # the same 54 tokens, transposed
    assert (inputs["attention_mask"] == 0).any()
    mine = qwen_prompt_positions(model, inputs["input_ids"], inputs["attention_mask"].bool(), inputs["image_grid_thw"])
    stock = stock_positions(model, inputs).permute(1, 2, 0)
    real = inputs["attention_mask"].bool()
    assert torch.equal(mine[real], stock[real])
    is_image = inputs["input_ids"] == model.config.image_token_id
    first, second = (mine[b][is_image[b]] - mine[b][is_image[b]][0] for b in (0, 1))
    assert not torch.equal(first, second)  # (row, column) swapped
    assert torch.equal(first[:, [0, 2, 1]].sort(dim=0).values, second.sort(dim=0).values)


def test_image_slots_equal_stock_features(tiny_qwen):
    model, processor = tiny_qwen
    inputs = qwen_inputs(processor, QUESTIONS)
    with torch.no_grad():
        stock = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        slots = qwen_image_slots(qwen_copy(model), inputs["pixel_values"], inputs["image_grid_thw"], len(QUESTIONS))
    counts = [f.shape[0] for f in stock]
    assert counts == [54, 54, 36] == slots.placeholders
    for b, features in enumerate(stock):
        assert torch.equal(slots.features[b, max(counts) - counts[b]:], features)


@pytest.mark.parametrize("settings", [{}, {"fastv_k": 10_000}, {"fastv_k": 0.0}])
def test_keep_all_matches_stock(tiny_qwen, settings):
    model, processor = tiny_qwen
    hybrid = qwen_copy(model, **settings)
    with torch.no_grad():
        for i in range(len(QUESTIONS)):
            alone = qwen_inputs(processor, QUESTIONS[i : i + 1], indices=[i])
            assert torch.equal(hybrid(**alone).logits, model(**alone).logits)
        batch = qwen_inputs(processor, QUESTIONS)
        expected, actual = model(**batch).logits, hybrid(**batch).logits
    real = batch["attention_mask"].bool()
    assert (actual - expected)[real].abs().max() <= 1e-5 * expected.abs().max()


def test_vanilla_generate_equals_stock_generate(tiny_qwen):
    model, processor = tiny_qwen
    inputs = qwen_inputs(processor, QUESTIONS)
    assert torch.equal(generate(qwen_copy(model), inputs), generate(model, inputs))


# --- pruning: the masked reference, the cache, the batch --------------------------------------------


@pytest.mark.parametrize("fastv_k,fastv_layer", [(16, 2), (0.5, 1), (0.9, 3), (40, 2)])
def test_pruned_forward_matches_masked_reference(tiny_qwen, fastv_k, fastv_layer):
    model, processor = tiny_qwen
    inputs = qwen_inputs(processor, QUESTIONS)
    reference_logits, reference_kept = qwen_masked_reference(model, inputs, fastv_k, fastv_layer)
    out, real = engine_prefill(qwen_copy(model, fastv_k=fastv_k, fastv_layer=fastv_layer), inputs)
    assert_matches_reference(out, real, reference_logits, reference_kept)


def test_kept_counts_are_the_per_sample_quotas(tiny_qwen):
    model, processor = tiny_qwen
    inputs = qwen_inputs(processor, QUESTIONS)
    _, real = engine_prefill(qwen_copy(model, fastv_k=40, fastv_layer=2), inputs)
    text = inputs["attention_mask"].sum(dim=1) - torch.tensor([54, 54, 36])
    assert torch.equal(real.sum(dim=1), text + torch.tensor([40, 40, 36]))  # capped at what a sample holds


@pytest.mark.parametrize("fastv_k", [16, 0.7, None])
def test_cached_generation_equals_recomputation(tiny_qwen, fastv_k):
    model, processor = tiny_qwen
    inputs = qwen_inputs(processor, QUESTIONS)
    hybrid = qwen_copy(model, fastv_k=fastv_k)
    assert torch.equal(generate(hybrid, inputs), greedy_without_cache(hybrid, inputs, NEW_TOKENS))


@pytest.mark.parametrize("fastv_k", [16, 0.5, None])
def test_batch_of_image_sizes_equals_each_alone(tiny_qwen, fastv_k):
    model, processor = tiny_qwen
    hybrid = qwen_copy(model, fastv_k=fastv_k)
    batched = generate(hybrid, qwen_inputs(processor, QUESTIONS))
    for i in range(len(QUESTIONS)):
        alone = generate(hybrid, qwen_inputs(processor, QUESTIONS[i : i + 1], indices=[i]))
        assert torch.equal(batched[i, -NEW_TOKENS:], alone[0, -NEW_TOKENS:])


def test_transposed_images_each_give_their_own_stock_result(tiny_qwen):
    """The same picture at 300x200 and 200x300: equal token counts, transposed ids; each prompt's
    vanilla logits equal stock's for that prompt alone, and the two differ."""
    model, processor = tiny_qwen
    hybrid = qwen_copy(model)
    same_picture = [(300, 200), (200, 300)]
    logits = []
    with torch.no_grad():
        for size in same_picture:
            inputs = qwen_inputs(processor, QUESTIONS[:1], indices=[0], sizes=[size])
            logits.append(hybrid(**inputs).logits)
            assert torch.equal(logits[-1], model(**inputs).logits)
    assert logits[0].shape == logits[1].shape and not torch.allclose(logits[0], logits[1])


def test_calls_in_a_row_equal_each_call_alone(tiny_qwen):
    """No state leaks from one call to the next (stock keeps `rope_deltas` on the module)."""
    model, processor = tiny_qwen
    first, second = qwen_inputs(processor, QUESTIONS), qwen_inputs(processor, QUESTIONS[2:], indices=[2])
    fresh = qwen_copy(model, fastv_k=16)
    fresh.model.rope_deltas = None
    expected = generate(fresh, second)
    hybrid = qwen_copy(model, fastv_k=16)
    stale = hybrid.model.rope_deltas = torch.tensor([[1000], [-1000], [7]])  # what a stock call could have left
    generate(hybrid, first)
    assert torch.equal(generate(hybrid, second), expected)
    assert hybrid.model.rope_deltas is stale  # neither read nor written


@pytest.mark.parametrize("settings", [{"fastv_k": 16}, {"fastv_k": 0.5}, {}])
def test_no_host_syncs_on_meta(tiny_qwen, settings):
    model, processor = tiny_qwen
    assert check_no_host_syncs(qwen_copy(model, **settings), qwen_inputs(processor, QUESTIONS), decode_steps=2) == "pass"


def test_stock_path_does_sync(tiny_qwen):
    """The check can fail: stock Qwen2.5-VL reads the grid and the ids back to the host."""
    model, processor = tiny_qwen
    result = check_no_host_syncs(model, qwen_inputs(processor, QUESTIONS))
    assert result.startswith("fail") and "meta tensor" in result, result  # a value read back, not a device mismatch


def test_inputs_for_places_the_grid_where_each_forward_reads_it(tiny_qwen):
    """Stock Qwen2.5-VL's vision tower multiplies ids derived from the grid by its rotary table, so a
    CPU grid beside a model elsewhere fails there: the bench and the plugin passed stock the
    engine's host grid. The meta device stands in for a GPU."""
    model, processor = tiny_qwen
    host = qwen_inputs(processor, QUESTIONS)
    stock = copy.deepcopy(model).to(device="meta", dtype=torch.bfloat16)
    placed = inputs_for(stock, host)
    assert {value.device.type for value in placed.values()} == {"meta"}
    assert placed["pixel_values"].dtype == torch.bfloat16 and placed["input_ids"].dtype == host["input_ids"].dtype
    with torch.no_grad(), pytest.raises(RuntimeError, match="not on the expected device cpu"):
        stock(**{**placed, "image_grid_thw": host["image_grid_thw"]})  # what the bench passed stock before

    engine = apply_hybrid(stock, HybridConfig(fastv_k=16))
    placed = inputs_for(engine, host)
    assert placed["image_grid_thw"].device.type == "cpu" and placed["pixel_values"].device.type == "meta"


# --- refused settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize("settings,needle", [
    ({"position_mode": "renumbered", "fastv_k": 16}, "HYBRID_POSITIONS=renumbered"),
    ({"dymu": "thresholds.json"}, "DYMU"),
])  # the methods Qwen2.5-VL cannot run: test_qwen_methods
def test_unsupported_settings_are_refused(tiny_qwen, settings, needle):
    model, _ = tiny_qwen
    with pytest.raises((ValueError, NotImplementedError), match=needle):
        qwen_copy(model, **settings)


def test_videos_and_position_ids_are_refused(tiny_qwen):
    model, processor = tiny_qwen
    hybrid = qwen_copy(model)
    inputs = qwen_inputs(processor)
    with pytest.raises(NotImplementedError, match="videos"):
        hybrid(**inputs, pixel_values_videos=inputs["pixel_values"])
    with pytest.raises(ValueError, match="position_ids"):
        hybrid(**inputs, position_ids=torch.zeros_like(inputs["input_ids"]))


def test_pixel_rows_that_do_not_match_the_grid_are_refused_naming_both(tiny_qwen):
    """Fewer patch rows than the grid asks for ended in an IndexError deep in the vision tower."""
    model, processor = tiny_qwen
    inputs = qwen_inputs(processor)
    t, h, w = inputs["image_grid_thw"][0].tolist()
    assert inputs["pixel_values"].shape[0] == t * h * w  # the processor's own pair is the reference
    with torch.no_grad(), pytest.raises(ValueError, match=f"pixel_values holds {t * h * w - 4} patch rows but image_grid_thw"):
        qwen_copy(model)(**{**inputs, "pixel_values": inputs["pixel_values"][:-4]})


def test_a_batch_of_an_image_prompt_and_a_text_only_one_is_refused_naming_the_rule(tiny_qwen):
    """Stock runs a two-image prompt beside a text-only one; the engine splits the images evenly over
    the prompts. The refusal said only 'each prompt must hold the image placeholders of its images',
    which reads as a malformed prompt."""
    model, processor = tiny_qwen
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": QUESTIONS[0]}]
    two_images = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    images = [synthetic_image(i).resize(QWEN_SIZES[i]) for i in range(2)]  # two images for two prompts: one each, evenly
    inputs = processor(images=images, text=[two_images, "a question without an image"], return_tensors="pt", padding=True)
    with torch.no_grad(), pytest.raises(ValueError, match="every prompt of a batch must hold the same number of images"):
        qwen_copy(model)(**inputs)

# --- theoretical MACs ------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [112, 70, 42])  # 70 and 42 px: an odd number of patches a side, not a whole number of merge units
def test_window_lengths_equal_stock_window_segments(tiny_qwen, window):
    import dataclasses

    from transformers.vision_utils import get_vision_window_index

    from hybrid_vlm.qwen_flops import qwen_shape_from_config, window_lengths

    model, _ = tiny_qwen
    shape = dataclasses.replace(qwen_shape_from_config(model.config).vit, window=window)
    for grid in [(1, 22, 36), (1, 16, 16), (1, 18, 12), (2, 10, 26)]:
        _, bounds = get_vision_window_index(torch.tensor([grid]), spatial_merge_size=2, window_size=window, patch_size=14)
        lengths = (bounds[1:] - bounds[:-1]).tolist()
        assert window_lengths(grid, shape) == [n for n in lengths if n]  # stock repeats a bound for an empty window


def test_vision_macs_equal_the_flop_counter_on_the_stock_tower(tiny_qwen):
    """Every matrix product of the stock eager tower (patch embedding, windowed and full attention,
    gated MLP, merger), counted by torch's FlopCounterMode, equals the model's count."""
    from torch.utils.flop_counter import FlopCounterMode

    from hybrid_vlm.qwen_flops import merger_macs, qwen_shape_from_config, qwen_vit_macs

    from reference import eager_copy

    model, processor = tiny_qwen
    eager = eager_copy(model)
    shape = qwen_shape_from_config(model.config).vit
    inputs = qwen_inputs(processor, QUESTIONS[:1], sizes=[(500, 300)])
    grid = tuple(inputs["image_grid_thw"][0].tolist())
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        eager.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    assert counter.get_total_flops() == 2 * (qwen_vit_macs(grid, shape) + merger_macs(grid, shape))


def test_positions_and_logits_with_two_images_per_prompt(tiny_qwen):
    """Two images per prompt (four grids over a left-padded batch of two): stock's ids and, with
    nothing pruned, stock's logits; FastV keeps its quota of both images' tokens together."""
    model, processor = tiny_qwen
    inputs = qwen_two_image_inputs(processor)
    real = inputs["attention_mask"].bool()
    assert (~real).any()
    mine = qwen_prompt_positions(model, inputs["input_ids"], real, inputs["image_grid_thw"])
    assert torch.equal(mine[real], stock_positions(model, inputs).permute(1, 2, 0)[real])
    with torch.no_grad():
        expected, actual = model(**inputs).logits, qwen_copy(model)(**inputs).logits
    assert (actual - expected)[real].abs().max() <= 1e-5 * expected.abs().max()
    reference_logits, reference_kept = qwen_masked_reference(model, inputs, 0.5, 2)
    out, kept = engine_prefill(qwen_copy(model, fastv_k=0.5), inputs)
    assert_matches_reference(out, kept, reference_logits, reference_kept)


def test_mask_read_once_runs_an_unpadded_batch_without_a_mask_as_each_alone(tiny_qwen, monkeypatch):
    """Two prompts of one length with images of one size: MASK_READ=once reads the all-ones mask
    once, no layer gets a mask, and each prompt's greedy tokens are the ones it gets alone."""
    from test_conditional_sdpa import SdpaSpy

    model, processor = tiny_qwen
    sizes = [QWEN_SIZES[0]] * 2
    inputs = qwen_inputs(processor, [QUESTIONS[0]] * 2, sizes=sizes)
    assert bool(inputs["attention_mask"].all())
    hybrid = qwen_copy(model, fastv_k=16, mask_read="once")
    assert check_no_host_syncs(hybrid, inputs, decode_steps=2) == "pass: 1 sync(s) in the prefill (1 allowed), 0 in 2 decode steps (none allowed)"
    spy = SdpaSpy(monkeypatch)
    batched = generate(hybrid, inputs)
    assert spy.unmasked == NEW_TOKENS * model.config.text_config.num_hidden_layers and spy.masked == 0
    for i in range(2):
        alone = generate(hybrid, qwen_inputs(processor, [QUESTIONS[0]], indices=[i], sizes=sizes))
        assert torch.equal(batched[i, -NEW_TOKENS:], alone[0, -NEW_TOKENS:])
