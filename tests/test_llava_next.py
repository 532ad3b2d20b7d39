"""LLaVA-NeXT (anyres) through the engine, against the same independent references as LLaVA-1.5:
stock transformers, the masked-attention reference (stock eager layers, nothing removed, dropped
keys masked), cache-free recomputation, and each prompt alone. The batches mix aspect ratios, so
every sample has a different number of visual tokens even without DyMU."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from hybrid_tools.report.targets import bench_targets
from hybrid_vlm import HybridConfig, apply_hybrid
from hybrid_vlm.adapters import llava_next_image_slots
from hybrid_vlm.calibrate import calibrate_thresholds, write_threshold_file
from hybrid_vlm.dymu import place_on_cropped_grid
from hybrid_vlm.hf_compat import cache_kwarg, dymu_image_features, new_cache, output_cache
from hybrid_vlm.hf_compat.llava_next import anyres_layouts, crop_pixels, stock_next_image_features
from hybrid_vlm.hf_compat.loading import NO_HUB_KERNELS
from hybrid_vlm.syncs import check_no_host_syncs

from conftest import QUESTIONS, chat_prompt, generation_positions, next_inputs
from reference import greedy_without_cache, masked_reference
from test_engine import NEW_TOKENS, REFERENCE_RTOL


def next_copy(model, **settings):
    return apply_hybrid(copy.deepcopy(model), HybridConfig(**settings))


@torch.no_grad()
def engine_prefill(model, inputs):
    """(output, real [B, L_kept]): which output rows are real tokens."""
    cache = new_cache(model)
    out = model(**inputs, past_key_values=cache, use_cache=True)
    return out, cache.hybrid_state.pruned_key_valid


def assert_matches_reference(out, real, reference_logits, reference_kept):
    """The engine's real rows sit at the prompt positions the reference keeps, with its logits."""
    batch, length = reference_kept.shape
    positions = torch.where(real, out.kept_positions, length)  # fillers and empty slots to a spare column
    engine_kept = torch.zeros(batch, length + 1, dtype=torch.bool).scatter(1, positions, True)[:, :length]
    assert torch.equal(engine_kept, reference_kept)
    expected = reference_logits.gather(1, out.kept_positions.clamp_min(0)[..., None].expand(-1, -1, reference_logits.shape[-1]))
    assert (out.logits - expected)[real].abs().max() <= REFERENCE_RTOL * expected.abs().max()


@pytest.fixture(scope="module")
def next_thresholds(tiny_next, tmp_path_factory):
    """DyMU thresholds calibrated on the tiny NeXT tower's crops (200 tokens per crop)."""
    model, processor = tiny_next
    inputs = next_inputs(processor, QUESTIONS)
    crops = crop_pixels(inputs["pixel_values"], anyres_layouts(model, inputs["image_sizes"]))
    path = tmp_path_factory.mktemp("dymu-next") / "tiny-next-200.json"
    write_threshold_file(path, calibrate_thresholds(model, [crops], target=200, progress=False))
    return path


# --- packing and no pruning: stock transformers ----------------------------------------------------


def test_packing_equals_stock_and_counts_differ(tiny_next):
    model, processor = tiny_next
    inputs = next_inputs(processor, QUESTIONS)
    with torch.no_grad():
        stock = stock_next_image_features(model, inputs["pixel_values"], inputs["image_sizes"])
        slots = llava_next_image_slots(next_copy(model), inputs["pixel_values"], inputs["image_sizes"], len(QUESTIONS))
    counts = [f.shape[0] for f in stock]
    assert len(set(counts)) == len(counts), counts
    assert counts == (inputs["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()
    assert slots.placeholders == counts
    for b, features in enumerate(stock):
        fillers = max(counts) - counts[b]
        assert torch.equal(slots.features[b, fillers:], features)
        assert torch.equal(slots.valid[b], torch.arange(max(counts)) >= fillers)


def test_five_crop_layout_equals_stock(tiny_next):
    model, processor = tiny_next
    from hybrid_vlm.tiny import synthetic_image

    image = synthetic_image(7).resize((700, 690))
    inputs = processor(images=[image], text=["USER: <image>\nWhat is it? ASSISTANT:"], return_tensors="pt")
    layout = anyres_layouts(model, inputs["image_sizes"])[0]
    assert layout.num_crops == 5
    with torch.no_grad():
        stock = stock_next_image_features(model, inputs["pixel_values"], inputs["image_sizes"])[0]
        slots = llava_next_image_slots(next_copy(model), inputs["pixel_values"], inputs["image_sizes"], 1)
    assert torch.equal(slots.features[0], stock)


@pytest.mark.parametrize("settings", [{}, {"fastv_k": 10_000}, {"fastv_k": 0.0}])
def test_keep_all_matches_vanilla(tiny_next, settings):
    model, processor = tiny_next
    hybrid = next_copy(model, **settings)
    with torch.no_grad():
        alone = next_inputs(processor, QUESTIONS[1:2], indices=[1])
        assert torch.equal(hybrid(**alone).logits, model(**alone).logits)
        batch = next_inputs(processor, QUESTIONS)
        expected = model(**batch, position_ids=generation_positions(batch["attention_mask"])).logits
        actual = hybrid(**batch).logits
    real = batch["attention_mask"].bool()
    assert actual.shape == expected.shape
    assert (actual - expected)[real].abs().max() <= 1e-5 * expected.abs().max()


# --- pruning: the masked reference ------------------------------------------------------------------


@pytest.mark.parametrize("fastv_k,fastv_layer", [(64, 2), (0.5, 1), (0.9, 3), (1, 2)])
def test_pruned_forward_matches_masked_reference(tiny_next, fastv_k, fastv_layer):
    model, processor = tiny_next
    inputs = next_inputs(processor, QUESTIONS)
    reference_logits, reference_kept = masked_reference(model, inputs, fastv_k, fastv_layer)
    out, real = engine_prefill(next_copy(model, fastv_k=fastv_k, fastv_layer=fastv_layer), inputs)
    assert_matches_reference(out, real, reference_logits, reference_kept)


@pytest.mark.parametrize("fastv_k", [64, 0.7, None])
def test_cached_generation_equals_recomputation(tiny_next, fastv_k):
    model, processor = tiny_next
    inputs = next_inputs(processor, QUESTIONS)
    hybrid = next_copy(model, fastv_k=fastv_k)
    with torch.no_grad():
        cached = hybrid.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(cached, greedy_without_cache(hybrid, inputs, NEW_TOKENS))


def assert_batch_equals_each_alone(hybrid, processor):
    with torch.no_grad():
        batched = hybrid.generate(**next_inputs(processor, QUESTIONS), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        for i, question in enumerate(QUESTIONS):
            alone = hybrid.generate(**next_inputs(processor, [question], indices=[i]), max_new_tokens=NEW_TOKENS,
                                    min_new_tokens=NEW_TOKENS, do_sample=False)
            assert torch.equal(batched[i, -NEW_TOKENS:], alone[0, -NEW_TOKENS:])


@pytest.mark.parametrize("fastv_k", [64, 0.5, None])
def test_batch_of_aspect_ratios_equals_each_alone(tiny_next, fastv_k):
    model, processor = tiny_next
    assert_batch_equals_each_alone(next_copy(model, fastv_k=fastv_k), processor)


def test_ratio_quota_is_per_sample(tiny_next):
    """FASTV_K=0.5 keeps half of each image's own count (newlines included), not of the batch's largest."""
    model, processor = tiny_next
    inputs = next_inputs(processor, QUESTIONS)
    _, real = engine_prefill(next_copy(model, fastv_k=0.5), inputs)
    visual = (inputs["input_ids"] == model.config.image_token_id).sum(dim=1)
    text = inputs["attention_mask"].sum(dim=1) - visual
    assert torch.equal(real.sum(dim=1), text + torch.round(visual.double() * 0.5).long())


def test_mask_read_is_skipped_and_not_allowed_where_fillers_pad_the_batch(tiny_next, monkeypatch):
    """Images of different sizes leave filler slots, so MASK_READ=once makes no read and the check
    allows none: one value read planted in the prefill fails it."""
    model, processor = tiny_next
    hybrid, inputs = next_copy(model, fastv_k=64, mask_read="once"), dict(next_inputs(processor, QUESTIONS))
    verdict = check_no_host_syncs(hybrid, inputs, decode_steps=2)
    assert verdict == "pass: 0 sync(s) in the prefill (0 allowed), 0 in 2 decode steps (none allowed)"
    # the report's target shows the allowance the checker applied, not one guessed from the row's settings
    row = dict(config="fastv-k64-l2_mask-read-once", method="fastv", fastv_k=64, mask_read="once", batch_size=len(QUESTIONS),
               status="ok", sync_debug=verdict)
    assert bench_targets([row])[-1][3:] == ("0", "met")
    mlp_class = type(model.model.language_model.layers[0].mlp)
    forward = mlp_class.forward
    planted = []

    def reading_once(self, hidden_states):
        if not planted:
            planted.append(bool(hidden_states.sum() != 0))
        return forward(self, hidden_states)

    monkeypatch.setattr(mlp_class, "forward", reading_once)
    assert check_no_host_syncs(hybrid, inputs, decode_steps=2) == (
        "fail: 1 sync(s) in the prefill (0 allowed), 0 in 2 decode steps (none allowed)")


@pytest.mark.parametrize("settings", [dict(fastv_k=64), dict(), dict(fastv_k=64, fastv_select="random"), dict(fastv_k=0.5, fastv_newlines="keep")])
def test_forward_has_no_host_syncs(tiny_next, settings):
    model, processor = tiny_next
    assert check_no_host_syncs(next_copy(model, **settings), dict(next_inputs(processor, QUESTIONS)), decode_steps=2) == "pass"


def test_a_stray_placeholder_in_a_batch_of_unequal_counts_is_named_with_the_prompts_counts(tiny_next):
    """The count check ran after the filler slots were added: it counted them as placeholders and
    told every prompt it needed the batch's largest count."""
    model, processor = tiny_next
    inputs = next_inputs(processor, QUESTIONS[:2], indices=[0, 2])
    image_id = model.config.image_token_id
    written = (inputs["input_ids"] == image_id).sum(dim=1).tolist()
    assert written[0] != written[1]
    ids = inputs["input_ids"].clone()
    after_image = int((ids[1] == image_id).nonzero().max()) + 1
    ids[1, after_image] = image_id  # one text token of prompt 1 turned into a stray placeholder
    hybrid = apply_hybrid(copy.deepcopy(model), HybridConfig(fastv_k=64))
    expected = rf"must contain \[{written[0]}, {written[1]}\] \(in order\) .* found \[{written[0]}, {written[1] + 1}\]"
    with pytest.raises(ValueError, match=expected), torch.no_grad():
        hybrid(**{**inputs, "input_ids": ids})


@pytest.mark.parametrize("fixture", ["tiny", "tiny_next"])
def test_a_listed_vision_feature_layer_is_refused_by_name(request, fixture):
    """Stock concatenates the hidden states of a listed vision_feature_layer; the NeXT engine indexed
    the tuple with the list (a bare TypeError at the first forward) and the MACs model reads one layer."""
    model, _ = request.getfixturevalue(fixture)
    listed = copy.deepcopy(model)
    listed.config.vision_feature_layer = [-2, -3]
    with pytest.raises(NotImplementedError, match=r"reads one CLIP layer .* lists \[-2, -3\]"):
        apply_hybrid(listed, HybridConfig(fastv_k=0.5))


def test_pooling_is_refused(tiny_next):
    model, _ = tiny_next
    with pytest.raises(ValueError, match="VISUAL_POOL is not implemented for LLaVA-NeXT"):
        next_copy(model, visual_pool=2)


@pytest.mark.parametrize("fastv_k,seed", [(64, 0), (0.5, 3)])
def test_random_selection_matches_the_reference(tiny_next, fastv_k, seed):
    model, processor = tiny_next
    inputs = next_inputs(processor, QUESTIONS)
    reference_logits, reference_kept = masked_reference(model, inputs, fastv_k, 2, select="random", select_seed=seed)
    out, real = engine_prefill(next_copy(model, fastv_k=fastv_k, fastv_select="random", select_seed=seed), inputs)
    assert_matches_reference(out, real, reference_logits, reference_kept)
    attention_kept = masked_reference(model, inputs, fastv_k, 2)[1]
    assert not torch.equal(reference_kept, attention_kept)  # the draw is not FastV's choice


def test_random_selection_keys_each_draw_on_its_own_base_crop_when_crop_counts_differ(tiny_next):
    """The random draw hashes each image's base crop. Every NEXT_SIZES image tiles into three crops,
    so a draw keyed on the wrong pixel_values row went unseen; here 5 and 3 crops."""
    from hybrid_vlm.tiny import synthetic_image

    model, processor = tiny_next
    images = [synthetic_image(0).resize((700, 700)), synthetic_image(1).resize((336, 200))]
    prompts = [chat_prompt(processor, q) for q in QUESTIONS[:2]]
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    crops = [layout.num_crops for layout in anyres_layouts(model, inputs["image_sizes"])]
    assert len(set(crops)) == 2, crops
    reference_logits, reference_kept = masked_reference(model, inputs, 64, 2, select="random", select_seed=0)
    out, real = engine_prefill(next_copy(model, fastv_k=64, fastv_select="random"), inputs)
    assert_matches_reference(out, real, reference_logits, reference_kept)


def test_random_selection_batched_equals_alone(tiny_next):
    model, processor = tiny_next
    assert_batch_equals_each_alone(next_copy(model, fastv_k=64, fastv_select="random"), processor)


def test_missing_image_sizes_is_a_clear_error(tiny_next):
    model, processor = tiny_next
    inputs = dict(next_inputs(processor))
    del inputs["image_sizes"]
    with pytest.raises(ValueError, match="LLaVA-NeXT needs image_sizes"):
        next_copy(model, fastv_k=64)(**inputs)


def test_image_sizes_as_a_list_run_as_stock_and_a_mismatch_is_named(tiny_next):
    """Stock takes image_sizes as nested lists (the engine raised AttributeError on .tolist()); an
    image_sizes row without its pixel_values image ended in an index_select error."""
    model, processor = tiny_next
    inputs = dict(next_inputs(processor, QUESTIONS[:2]))
    hybrid = next_copy(model, fastv_k=64)
    with torch.no_grad():
        as_tensor = hybrid(**inputs).logits[:, -1]
        as_list = hybrid(**{**inputs, "image_sizes": inputs["image_sizes"].tolist()}).logits[:, -1]
        torch.testing.assert_close(as_list, as_tensor, rtol=0, atol=0)
        with pytest.raises(ValueError, match="pixel_values holds 1 images .* but image_sizes 2 images"):
            hybrid(**{**inputs, "pixel_values": inputs["pixel_values"][:1]})


# --- DyMU per crop ------------------------------------------------------------------------------------


def test_infinite_thresholds_are_bit_exact(tiny_next, next_thresholds):
    model, processor = tiny_next
    hybrid = next_copy(model, dymu=str(next_thresholds))
    hybrid.hybrid_thresholds = torch.full_like(hybrid.hybrid_thresholds, float("inf"))
    alone = next_inputs(processor, QUESTIONS[:1])
    with torch.no_grad():
        assert torch.equal(hybrid(**alone).logits, model(**alone).logits)


def test_every_real_patch_is_covered_once(tiny_next, next_thresholds):
    """After unpadding, each grid patch's token enters the LLM exactly once, at a patch it covers."""
    model, processor = tiny_next
    hybrid = next_copy(model, dymu=str(next_thresholds))
    inputs = next_inputs(processor, QUESTIONS)
    layouts = anyres_layouts(model, inputs["image_sizes"])
    merged = dymu_image_features(hybrid, crop_pixels(inputs["pixel_values"], layouts), hybrid.hybrid_thresholds)
    start, moved = 0, 0
    for layout in layouts:
        coverage = merged.coverage[start : start + layout.num_crops]
        grid = layout.source[576:][layout.source[576:] >= 0]
        owner, valid = place_on_cropped_grid(coverage, grid, layout.grid_width)
        for token in owner.unique():
            assert valid[owner == token].sum() == 1  # one placement per token, at a patch of its own
        old_rep = owner  # a token's slot is its representative before unpadding
        moved += int((~torch.isin(old_rep[valid], grid)).sum())
        start += layout.num_crops
    assert moved > 0, "no token lost its representative to unpadding: the test exercises nothing"


@pytest.mark.parametrize("fastv_k,fastv_layer", [(None, 2), (64, 2), (0.5, 1)])
def test_dymu_prefill_matches_masked_reference(tiny_next, next_thresholds, fastv_k, fastv_layer):
    model, processor = tiny_next
    inputs = next_inputs(processor, QUESTIONS)
    hybrid = next_copy(model, dymu=str(next_thresholds), fastv_k=fastv_k, fastv_layer=fastv_layer)
    reference_logits, reference_kept = masked_reference(model, inputs, fastv_k, fastv_layer, hybrid.hybrid_thresholds)
    out, real = engine_prefill(hybrid, inputs)
    merged_real = real.sum(dim=1)
    assert (merged_real < inputs["attention_mask"].sum(dim=1)).all()
    assert_matches_reference(out, real, reference_logits, reference_kept)


@pytest.mark.parametrize("fastv_k", [None, 0.5])
def test_dymu_cache_and_batch(tiny_next, next_thresholds, fastv_k):
    model, processor = tiny_next
    hybrid = next_copy(model, dymu=str(next_thresholds), fastv_k=fastv_k)
    inputs = next_inputs(processor, QUESTIONS)
    with torch.no_grad():
        cached = hybrid.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(cached, greedy_without_cache(hybrid, inputs, NEW_TOKENS))
    assert_batch_equals_each_alone(hybrid, processor)


def test_from_pretrained_roundtrip(tiny_next, tmp_path):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    from hybrid_vlm.tiny import ensure_tiny_llava_next

    path = ensure_tiny_llava_next(tmp_path / "tiny-next")
    loaded = LlavaNextForConditionalGeneration.from_pretrained(path, **NO_HUB_KERNELS).eval()
    processor = AutoProcessor.from_pretrained(path)
    inputs = next_inputs(processor, QUESTIONS[:2])
    fresh, _ = tiny_next
    with torch.no_grad():
        a = next_copy(loaded, fastv_k=64).generate(**inputs, max_new_tokens=4, do_sample=False)
        b = next_copy(fresh, fastv_k=64).generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(a, b)


# --- llava-v1.6-mistral's layout: Mistral decoder layers ---------------------------------------------


def test_mistral_llm_matches_stock_and_reference():
    from hybrid_vlm.tiny import build_tiny_llava_next

    model, processor = build_tiny_llava_next(seed=2, text_model="mistral", kv_heads=2)
    assert type(model.model.language_model).__name__ == "MistralModel"
    alone = next_inputs(processor, QUESTIONS[:1])
    with torch.no_grad():
        assert torch.equal(next_copy(model)(**alone).logits, model(**alone).logits)
    inputs = next_inputs(processor, QUESTIONS)
    reference_logits, reference_kept = masked_reference(model, inputs, 64, 2)
    out, real = engine_prefill(next_copy(model, fastv_k=64), inputs)
    assert_matches_reference(out, real, reference_logits, reference_kept)


def test_sliding_window_shorter_than_the_sequence_is_refused():
    from hybrid_vlm.tiny import build_tiny_llava_next

    model, processor = build_tiny_llava_next(seed=2, text_model="mistral", sliding_window=512)
    with pytest.raises(NotImplementedError, match="sliding window of 512 tokens"):
        next_copy(model, fastv_k=64)(**next_inputs(processor, QUESTIONS[:1]))


def test_the_window_counts_the_tokens_as_written_over_a_compacted_cache_without_a_mask():
    """VisionZip keeps 0.11 of the packed span, so the cache holds far fewer slots than the caller's
    tokens; without a mask (generate drops an unpadded prompt's) the window check counted slots, and
    decoding past the window ran on silently with attention to every earlier key."""
    from hybrid_vlm.tiny import build_tiny_llava_next

    model, processor = build_tiny_llava_next(seed=2, text_model="mistral")
    inputs = next_inputs(processor, QUESTIONS[:1])
    prompt = inputs["input_ids"].shape[1]
    model.config.text_config.sliding_window = prompt + 1  # the prompt and one decode step fit
    hybrid = next_copy(model, visual_method="visionzip", visual_budget=0.11)
    with torch.no_grad():
        out = hybrid(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"], use_cache=True)
        cache = output_cache(out)
        assert cache.get_seq_length() < prompt - 1000  # compacted
        token = out.logits[:, -1:].argmax(-1)
        out = hybrid(input_ids=token, use_cache=True, **cache_kwarg(cache))
        with pytest.raises(NotImplementedError, match=f"sliding window of {prompt + 1} tokens and the sequence is {prompt + 2} tokens"):
            hybrid(input_ids=token, use_cache=True, **cache_kwarg(output_cache(out)))


def test_a_batch_whose_filler_slots_outgrow_the_window_decodes_as_stock():
    """Two prompts of 1,795 tokens fit a window of 1,900, but their images pack to 1,776 and 1,176
    tokens, so the smaller one gets 600 filler slots (2,396 in all). generate's default cache keeps
    only the last window - 1 slots of each layer: the first decode step raised a shape error."""
    from hybrid_vlm.tiny import build_tiny_llava_next

    model, processor = build_tiny_llava_next(seed=2, text_model="mistral", sliding_window=1900)
    inputs = next_inputs(processor, QUESTIONS[:2], indices=[1, 2])
    assert inputs["input_ids"].shape[1] <= 1900 < inputs["input_ids"].shape[1] + 600
    greedy = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)
    with torch.no_grad():
        assert torch.equal(next_copy(model).generate(**inputs, **greedy), model.generate(**inputs, **greedy))


def test_calibrate_cli_splits_images_into_crops(tmp_path):
    from transformers import LlavaNextForConditionalGeneration

    from hybrid_vlm.calibrate import load_thresholds
    from hybrid_vlm.calibrate import main as calibrate_main
    from hybrid_vlm.tiny import build_tiny_llava, ensure_tiny_llava_next, synthetic_image

    model_dir = ensure_tiny_llava_next(tmp_path / "tiny-next")
    images = tmp_path / "images"
    images.mkdir()
    sizes = [(336, 200), (250, 500), (400, 400), (500, 300)]  # (width, height)
    for seed, size in enumerate(sizes):
        synthetic_image(300 + seed).resize(size).save(images / f"{seed}.png")
    out = tmp_path / "next.json"
    calibrate_main(["--model", str(model_dir), "--images", str(images), "--target", "200", "--out", str(out), "--batch-size", "2", "--no-progress"])
    saved = json.loads(out.read_text())
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    from hybrid_vlm.tiny import TINY_NEXT_PINPOINTS

    crops = [image_size_to_num_patches((h, w), TINY_NEXT_PINPOINTS, 336) for w, h in sizes]
    assert crops == [3, 3, 5, 3] and saved["achieved"]["images"] == sum(crops)  # every crop the tower sees
    model = LlavaNextForConditionalGeneration.from_pretrained(model_dir, **NO_HUB_KERNELS).eval()
    torch.testing.assert_close(load_thresholds(out, model), torch.tensor(saved["thresholds"]))
    other, _ = build_tiny_llava(seed=1)
    with pytest.raises(ValueError, match="calibrated for model"):
        load_thresholds(out, other)


# --- the budget rule's ablation: newline tokens always kept ---------------------------------------------


@pytest.mark.parametrize("fastv_k", [0.04, 0.5])
def test_kept_newlines_after_dymu_batch_equals_each_alone(tiny_next, next_thresholds, fastv_k):
    """After DyMU the batch's merged counts live on the device only, so the engine decides from a
    bound whether the stage prunes. At a small ratio that bound plus the kept newlines reaches the
    batch's width, yet samples still lose tokens: each keeps what it keeps alone, where its counts
    are known on the host."""
    model, processor = tiny_next
    hybrid = next_copy(model, dymu=str(next_thresholds), fastv_k=fastv_k, fastv_newlines="keep")
    unpruned = next_copy(model, dymu=str(next_thresholds))
    batched = engine_prefill(hybrid, next_inputs(processor, QUESTIONS))[1].sum(dim=1)
    for i, question in enumerate(QUESTIONS):
        alone = next_inputs(processor, [question], indices=[i])
        kept_alone = engine_prefill(hybrid, alone)[1].sum(dim=1)
        assert batched[i] == kept_alone, (i, batched.tolist(), kept_alone.tolist())
        assert kept_alone < engine_prefill(unpruned, alone)[1].sum(dim=1)  # it prunes


@pytest.mark.parametrize("batch", [3, 1])
@pytest.mark.parametrize("fastv_k", [64, 0.5, 0.01])
def test_kept_newlines_match_the_reference(tiny_next, fastv_k, batch):
    """Batched (masked) and alone (SDPA's mask-free path): with quotas from host counts, the kept
    slots are exactly the reference's, also where a bound would keep more (a ratio) or prune nothing (0.01)."""
    model, processor = tiny_next
    inputs = next_inputs(processor, QUESTIONS[:batch])
    reference_logits, reference_kept = masked_reference(model, inputs, fastv_k, 2, newlines="keep")
    out, real = engine_prefill(next_copy(model, fastv_k=fastv_k, fastv_newlines="keep"), inputs)
    assert_matches_reference(out, real, reference_logits, reference_kept)
    default_kept = masked_reference(model, inputs, fastv_k, 2)[1]
    assert (reference_kept.sum(dim=1) >= default_kept.sum(dim=1)).all() and (reference_kept.sum(dim=1) > default_kept.sum(dim=1)).any()
    assert (real.sum(dim=1) < inputs["attention_mask"].sum(dim=1)).all()  # and it still prunes


def test_newline_rule_setting():
    assert HybridConfig(fastv_k=64, fastv_newlines="keep").describe() == "fastv-k64-l2_newlines-keep"
    assert HybridConfig.from_env({"FASTV_K": "64", "FASTV_NEWLINES": "keep"}).fastv_newlines == "keep"
    with pytest.raises(ValueError, match="FASTV_NEWLINES='drop' is not valid: use prune"):
        HybridConfig.from_env({"FASTV_NEWLINES": "drop"})


@pytest.mark.parametrize("fastv_k", [None, 320])
def test_unpadded_prompt_runs_sdpa_without_a_mask(tiny_next, monkeypatch, fastv_k):
    """One NeXT prompt: every layer causal and mask-free in the prefill, as stock runs it; the
    padded batch of aspect ratios keeps its mask."""
    from test_conditional_sdpa import SdpaSpy, prefill_then_decode

    model, processor = tiny_next
    layers = model.config.text_config.num_hidden_layers
    spy = SdpaSpy(monkeypatch)
    prefill_then_decode(next_copy(model, fastv_k=fastv_k), next_inputs(processor, QUESTIONS[:1]), steps=2)
    assert (spy.masked, spy.causal, spy.unmasked) == (0, layers, 3 * layers)
    spy = SdpaSpy(monkeypatch)
    prefill_then_decode(next_copy(model, fastv_k=fastv_k), next_inputs(processor, QUESTIONS), steps=1)
    assert spy.unmasked == 0 and spy.masked == 2 * layers


def test_a_checkpoint_of_the_other_family_is_refused(tmp_path):
    from hybrid_vlm.tiny import ensure_tiny_llava, ensure_tiny_llava_next
    from vlmeval_plugin import settings

    llava, next_dir = ensure_tiny_llava(tmp_path / "llava"), ensure_tiny_llava_next(tmp_path / "next")
    with pytest.raises(settings.PluginError, match="llava_next_vicuna_7b_fastv needs a llava_next checkpoint"):
        settings.check_checkpoint_family(llava, settings.VARIANTS["llava_next_vicuna_7b_fastv"])
    with pytest.raises(settings.PluginError, match="llava_v1.5_7b needs a llava checkpoint"):
        settings.check_checkpoint_family(next_dir, settings.VARIANTS["llava_v1.5_7b"])
    settings.check_checkpoint_family(next_dir, settings.VARIANTS["llava_next_mistral_7b"])  # the right family passes


def test_stock_positional_order_and_unsupported_inputs(tiny_next):
    model, processor = tiny_next
    inputs = next_inputs(processor, QUESTIONS[:1])
    hybrid = next_copy(model, fastv_k=64)
    with torch.no_grad():
        by_position = hybrid(inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"], inputs["attention_mask"]).logits
        assert torch.equal(by_position, hybrid(**inputs).logits)
    with pytest.raises(NotImplementedError, match="does not support mm_encoder_outputs"):
        hybrid(**inputs, mm_encoder_outputs={"image": None})


@pytest.mark.parametrize("size", [(300, 5), (5, 300)])
def test_dymu_on_an_image_whose_crop_grid_unpads_to_nothing(tiny_next, next_thresholds, size):
    """A thin image (about 50:1; real llava-v1.6 pinpoints do this too) leaves its unpadded crop
    grid without a patch (only newlines, or nothing): DyMU merges the base image alone, as the
    masked reference (stock layers, merged slots masked) does; it divided by a zero grid width."""
    from hybrid_vlm.tiny import synthetic_image

    model, processor = tiny_next
    prompt = chat_prompt(processor, QUESTIONS[0])
    inputs = processor(images=[synthetic_image(0).resize(size)], text=[prompt], return_tensors="pt")
    grid = anyres_layouts(model, inputs["image_sizes"])[0].source[576:]
    assert not (grid >= 0).any()  # the case: no grid patch survives unpadding
    hybrid = next_copy(model, dymu=str(next_thresholds))
    reference_logits, reference_kept = masked_reference(model, inputs, None, 2, hybrid.hybrid_thresholds)
    out, real = engine_prefill(hybrid, inputs)
    assert real.sum() < inputs["attention_mask"].sum()
    assert_matches_reference(out, real, reference_logits, reference_kept)


def test_a_prompt_ending_with_its_image_runs_only_where_its_last_slot_cannot_be_pruned(tiny_next):
    """A LLaVA-NeXT span ends with a newline token. FastV may prune it by default, so a raw prompt
    ending with its image is refused (its last token scores and predicts the next); under
    FASTV_NEWLINES=keep that newline is never pruned, and the prompt runs."""
    from hybrid_vlm.tiny import synthetic_image

    from conftest import NEXT_SIZES

    model, processor = tiny_next
    ending = processor(images=[synthetic_image(0).resize(NEXT_SIZES[0])], text=["USER: describe <image>"], return_tensors="pt")
    assert ending["input_ids"][0, -1] == model.config.image_token_id
    with torch.no_grad():
        with pytest.raises(ValueError, match="the prompt ends with an image token"):
            next_copy(model, fastv_k=64)(**ending)
        out, real = engine_prefill(next_copy(model, fastv_k=64, fastv_newlines="keep"), ending)
    assert out.kept_positions[0][real[0]][-1] == ending["input_ids"].shape[1] - 1  # the last token was kept
