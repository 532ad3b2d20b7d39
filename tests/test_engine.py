"""The FastV engine against independent references.

- unpatched transformers (no pruning must change nothing);
- a masked-attention reference built from the stock decoder layers in eager mode: every token
  stays, dropped keys are masked in layers >= fastv_layer, RoPE positions are the original ones,
  and the kept set is chosen here from the stock eager attention weights;
- a cache-free recomputation of greedy decoding;
- each sample alone vs the left-padded batch.
"""

from __future__ import annotations

import pytest
import torch

from hybrid_vlm import HybridConfig, apply_hybrid
from hybrid_vlm.hf_compat import layer_entry_modules, llama_layer_forward, new_cache, output_cache
from hybrid_vlm.hf_compat.loading import NO_HUB_KERNELS
from hybrid_vlm.model import attention_mask_4d
from hybrid_vlm.syncs import check_no_host_syncs, count_cuda_syncs
from hybrid_vlm.tiny import ensure_tiny_thresholds

from conftest import QUESTIONS, assert_batched_generation_equals_each_alone, chat_prompt, generation_positions, hybrid_copy, image_inputs
from reference import eager_copy, greedy_without_cache, masked_reference

NEW_TOKENS = 8
# Eager attention (the reference) and SDPA differ by ~1.7e-5 x the logit scale on this tiny model
# with NOTHING pruned (measured: 2.4e-4 on a scale of 14.4), so the reference comparison allows 3x
# that; the renumbered-positions variant must miss the reference by at least 1e-2 x the scale.
REFERENCE_RTOL = 5e-5


@torch.no_grad()
def vanilla_logits(model, inputs):
    return model(**inputs, position_ids=generation_positions(inputs["attention_mask"])).logits


# --- no pruning: identical to unpatched transformers ---------------------------------------------


@pytest.mark.parametrize("settings", [{}, {"fastv_k": 576}, {"fastv_k": 10_000}, {"fastv_k": 0.0}])
@pytest.mark.parametrize("batched", [False, True])
def test_keep_all_matches_vanilla(tiny, settings, batched):
    model, processor = tiny
    inputs = image_inputs(processor, QUESTIONS if batched else QUESTIONS[:1])
    expected = vanilla_logits(model, inputs)
    with torch.no_grad():
        actual = hybrid_copy(model, **settings)(**inputs).logits
    real = inputs["attention_mask"].bool()
    assert actual.shape == expected.shape
    assert (actual - expected)[real].abs().max() <= 1e-5 * expected.abs().max()
    if not batched:
        assert torch.equal(actual, expected)


def test_text_only_prompt_runs_as_vanilla(tiny):
    model, processor = tiny
    prompts = [chat_prompt(processor, q, with_image=False) for q in QUESTIONS[:2]]
    inputs = processor.tokenizer(prompts, return_tensors="pt", padding=True)
    hybrid = hybrid_copy(model, fastv_k=8)
    expected = vanilla_logits(model, inputs)
    with torch.no_grad():
        actual = hybrid(**inputs).logits
        real = inputs["attention_mask"].bool()
        assert (actual - expected)[real].abs().max() <= 1e-5 * expected.abs().max()
        assert torch.equal(
            hybrid.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False),
            model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False),
        )


# --- pruning: equal to the masked reference --------------------------------------------------------


@pytest.mark.parametrize("fastv_k,keep", [(64, 64), (1, 1), (0.75, 144), (0.5, 288)])
@pytest.mark.parametrize("fastv_layer", [1, 2, 3])
@pytest.mark.parametrize("model_name", ["tiny", "tiny_gqa"])
def test_pruned_forward_matches_masked_reference(request, model_name, fastv_k, keep, fastv_layer):
    model, processor = request.getfixturevalue(model_name)
    inputs = image_inputs(processor, QUESTIONS)  # left-padded batch of 3
    reference_logits, reference_kept = masked_reference(model, inputs, fastv_k, fastv_layer)
    with torch.no_grad():
        out = hybrid_copy(model, fastv_k=fastv_k, fastv_layer=fastv_layer)(**inputs)

    batch, length = inputs["input_ids"].shape
    assert out.kept_positions.shape == (batch, length - 576 + keep)
    engine_kept = torch.zeros(batch, length, dtype=torch.bool).scatter(1, out.kept_positions, True) & inputs["attention_mask"].bool()
    assert torch.equal(engine_kept, reference_kept)
    expected = reference_logits.gather(1, out.kept_positions[..., None].expand(-1, -1, reference_logits.shape[-1]))
    real = inputs["attention_mask"].bool().gather(1, out.kept_positions)
    assert (out.logits - expected)[real].abs().max() <= REFERENCE_RTOL * expected.abs().max()


def test_renumbered_positions_differ_from_logical(tiny):
    """The ablation must really change something, or the logical-RoPE test proves nothing."""
    model, processor = tiny
    inputs = image_inputs(processor, QUESTIONS[:1])
    reference_logits, _ = masked_reference(model, inputs, fastv_k=64, fastv_layer=2)
    with torch.no_grad():
        logical = hybrid_copy(model, fastv_k=64)(**inputs).logits[:, -1]
        renumbered = hybrid_copy(model, fastv_k=64, position_mode="renumbered")(**inputs).logits[:, -1]
    scale = reference_logits[:, -1].abs().max()
    assert (logical - reference_logits[:, -1]).abs().max() <= REFERENCE_RTOL * scale
    assert (renumbered - reference_logits[:, -1]).abs().max() >= 1e-2 * scale


def test_scoring_row_equals_eager_attention_weights(tiny_gqa):
    """The one attention row computed beside SDPA is the stock eager layer's attention row."""
    model, processor = tiny_gqa
    inputs = image_inputs(processor, QUESTIONS)
    reference = eager_copy(model)
    with torch.no_grad():
        out = reference(**inputs, position_ids=generation_positions(inputs["attention_mask"]),
                        output_attentions=True, output_hidden_states=True)
        for layer_idx in (0, 1, 2):
            layer = model.model.language_model.layers[layer_idx]
            hidden_in = out.hidden_states[layer_idx]
            cos_sin = model.model.language_model.rotary_emb(hidden_in, generation_positions(inputs["attention_mask"]))
            mask = attention_mask_4d(inputs["attention_mask"].bool(), hidden_in.shape[1])
            last = torch.full((hidden_in.shape[0],), hidden_in.shape[1] - 1)
            _, row = llama_layer_forward(layer, hidden_in, cos_sin, mask, None, layer_idx, score_query_index=last)
            expected = out.attentions[layer_idx][:, :, -1, :].mean(dim=1)
            torch.testing.assert_close(row, expected, rtol=1e-5, atol=1e-6)


def test_eager_scoring_ablation_gives_same_result(tiny):
    model, processor = tiny
    inputs = image_inputs(processor, QUESTIONS)
    with torch.no_grad():
        row = hybrid_copy(model, fastv_k=64)(**inputs)
        eager = hybrid_copy(model, fastv_k=64, scoring="eager")(**inputs)
    assert torch.equal(row.kept_positions, eager.kept_positions)
    torch.testing.assert_close(row.logits, eager.logits, rtol=1e-4, atol=1e-4)


# --- generation: KV cache == recomputation, batch == per sample ------------------------------------


@pytest.mark.parametrize("fastv_k", [0, 1, 64, 0.7, None])
@pytest.mark.parametrize("model_name", ["tiny", "tiny_gqa"])
def test_cached_generation_equals_recomputation(request, model_name, fastv_k):
    model, processor = request.getfixturevalue(model_name)
    inputs = image_inputs(processor, QUESTIONS)
    hybrid = hybrid_copy(model, fastv_k=fastv_k)
    with torch.no_grad():
        cached = hybrid.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
    assert torch.equal(cached, greedy_without_cache(hybrid, inputs, NEW_TOKENS))


def test_pruning_changes_generation(tiny):
    """Guards the generation tests: the tiny model's output must depend on what is pruned."""
    model, processor = tiny
    inputs = image_inputs(processor, QUESTIONS)
    with torch.no_grad():
        outputs = {k: hybrid_copy(model, fastv_k=k).generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
                   for k in (None, 64, 1)}
    assert not torch.equal(outputs[None], outputs[64])
    assert not torch.equal(outputs[64], outputs[1])
    assert len(set(outputs[64][0, -NEW_TOKENS:].tolist())) > 2


@pytest.mark.parametrize("fastv_k", [64, 0.5])
def test_batched_generation_equals_each_sample_alone(tiny, fastv_k):
    model, processor = tiny
    assert_batched_generation_equals_each_alone(hybrid_copy(model, fastv_k=fastv_k), processor, NEW_TOKENS)


def test_generation_without_pruning_equals_vanilla(tiny):
    model, processor = tiny
    inputs = image_inputs(processor, QUESTIONS)
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        actual = hybrid_copy(model).generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(actual, expected)


def test_generate_feeds_every_step_the_same_growing_cache(tiny):
    """generate() must hand the forward its cache, and the forward must use it: with a cache
    argument the forward does not recognise (5.24 renamed past_key_values to cache), each step
    starts a fresh cache and tokens drift only a few steps later. This fails at the cause."""
    model, processor = tiny
    inputs = image_inputs(processor, QUESTIONS)
    hybrid = hybrid_copy(model, fastv_k=64)
    caches = []
    hybrid.register_forward_hook(lambda module, args, output: caches.append(output_cache(output)))
    with torch.no_grad():
        hybrid.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
    assert len(caches) == NEW_TOKENS and caches[0] is not None
    assert all(cache is caches[0] for cache in caches), "generate() passed the forward a cache it did not use"
    assert caches[0].get_seq_length() == inputs["input_ids"].shape[1] + NEW_TOKENS - 1


def test_output_holds_the_cache_where_stock_llava_does(tiny):
    """Same output field as stock LLaVA on this release, so generate() and callers find the cache."""
    from transformers.cache_utils import Cache

    model, processor = tiny
    inputs = image_inputs(processor, QUESTIONS[:1])
    with torch.no_grad():
        stock = model(**inputs, use_cache=True)
        hybrid = hybrid_copy(model, fastv_k=64)(**inputs, use_cache=True)
    stock_fields = [name for name, value in stock.items() if isinstance(value, Cache)]
    assert [name for name, value in hybrid.items() if isinstance(value, Cache)] == stock_fields
    assert output_cache(stock) is stock[stock_fields[0]]


def test_cache_is_accepted_under_both_names(tiny):
    model, processor = tiny
    inputs = image_inputs(processor, QUESTIONS[:1])
    hybrid = hybrid_copy(model, fastv_k=64)
    with torch.no_grad():
        for name in ("past_key_values", "cache"):
            cache = new_cache(hybrid)
            assert output_cache(hybrid(**inputs, use_cache=True, **{name: cache})) is cache
            assert cache.get_seq_length() == inputs["input_ids"].shape[1]
        with pytest.raises(ValueError, match="two different caches"):
            hybrid(**inputs, past_key_values=new_cache(hybrid), cache=new_cache(hybrid))


def test_cache_records_token_counts(tiny):
    model, processor = tiny
    inputs = image_inputs(processor, QUESTIONS)
    with torch.no_grad():
        out = hybrid_copy(model, fastv_k=72).generate(**inputs, max_new_tokens=2, do_sample=False,
                                                     return_dict_in_generate=True)
    state = output_cache(out).hybrid_state
    real_tokens = inputs["attention_mask"].sum(dim=1)
    assert torch.equal(state.prompt_tokens, real_tokens)
    assert torch.equal(state.prompt_tokens_kept, real_tokens - 576 + 72)
    layer_lengths = [layer.keys.shape[-2] for layer in output_cache(out).layers]
    length = inputs["input_ids"].shape[1] + 1  # the last generated token is not cached yet
    assert layer_lengths == [length] * 2 + [length - 576 + 72] * 2


# --- loading and bad input -------------------------------------------------------------------------


def test_from_pretrained_roundtrip(tiny, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from hybrid_vlm.tiny import ensure_tiny_llava

    path = ensure_tiny_llava(tmp_path / "tiny-llava")
    loaded = LlavaForConditionalGeneration.from_pretrained(path, **NO_HUB_KERNELS).eval()
    processor = AutoProcessor.from_pretrained(path)
    model, _ = tiny
    inputs = image_inputs(processor, QUESTIONS)
    apply_hybrid(loaded, HybridConfig(fastv_k=64))
    with torch.no_grad():
        assert torch.equal(
            loaded.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False),
            hybrid_copy(model, fastv_k=64).generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False),
        )


@pytest.mark.parametrize("value", ["abc", "-3", "1.5", "nan", "1.0", "0.5.1", "inf", "3e2"])
def test_bad_fastv_k_is_a_clear_error(value):
    with pytest.raises(ValueError, match=r"FASTV_K=.*integer n >= 0.*decimal in \[0, 1\)"):
        HybridConfig.from_env({"FASTV_K": value})


@pytest.mark.parametrize("value,expected", [("72", 72), ("0", 0), ("0.7", 0.7), (".5", 0.5), ("", None)])
def test_fastv_k_forms(value, expected):
    assert HybridConfig.from_env({"FASTV_K": value}).fastv_k == expected


@pytest.mark.parametrize("settings", [{"fastv_k": -1}, {"fastv_k": 1.5}, {"fastv_k": True}, {"fastv_layer": 0}])
def test_bad_config_values_are_rejected(settings):
    with pytest.raises(ValueError, match="FASTV_"):
        HybridConfig(**settings)


def test_fastv_layer_beyond_the_model_is_rejected(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="FASTV_LAYER=4 .* 1..3"):
        hybrid_copy(model, fastv_k=8, fastv_layer=4)
    with pytest.raises(ValueError, match="FASTV_LAYER"):
        HybridConfig.from_env({"FASTV_LAYER": "two"})


def test_image_without_placeholder_is_a_clear_error(tiny):
    model, processor = tiny
    image = image_inputs(processor)
    text = processor.tokenizer([chat_prompt(processor, "hi", with_image=False)], return_tensors="pt")
    with pytest.raises(ValueError, match="image placeholder"), torch.no_grad():
        hybrid_copy(model, fastv_k=8)(**text, pixel_values=image["pixel_values"])


def test_a_preallocated_cache_is_refused_by_name(tiny):
    """generate(cache_implementation="static") preallocates every layer to one length, which pruned
    layers cannot use: the error names the cache and what is accepted, not the 4-D mask it brings."""
    model, processor = tiny
    with pytest.raises(ValueError, match="needs a dynamic KV cache .* got StaticCache with StaticLayer layers.*cache_implementation"):
        with torch.no_grad():
            hybrid_copy(model, fastv_k=8).generate(**image_inputs(processor), max_new_tokens=2, cache_implementation="static")


# --- zero host syncs -------------------------------------------------------------------------------


def test_meta_device_rejects_host_syncs():
    """The mechanism the CPU sync check relies on: tensors without data cannot be read by the host."""
    with pytest.raises(RuntimeError):
        torch.ones(3, device="meta").sum().item()
    with pytest.raises(RuntimeError):
        bool((torch.ones(3, device="meta") > 0).all())
    with pytest.raises(NotImplementedError):
        torch.ones(3, device="meta").nonzero()


def test_sync_check_fails_on_a_forward_that_reads_a_value(tiny, monkeypatch):
    """check_no_host_syncs can fail: a decoder layer that calls .item() is caught."""
    import hybrid_vlm.model as engine

    stock_layer = engine.llama_layer_forward

    def reading_layer(*args, **kwargs):
        output = stock_layer(*args, **kwargs)
        (output[0] if isinstance(output, tuple) else output).sum().item()
        return output

    monkeypatch.setattr(engine, "llama_layer_forward", reading_layer)
    model, processor = tiny
    assert check_no_host_syncs(hybrid_copy(model, fastv_k=64), image_inputs(processor)).startswith("fail: ")


def test_the_count_after_a_cuda_sync_failure_runs_on_stock_and_engine_models(tiny, monkeypatch):
    """On CUDA a failed check is followed by a counting pass. The bench runs the check on stock
    transformers too, which has no hybrid_config: the pass must count there, not raise (an
    AttributeError here would end the bench before it writes anything). The CUDA calls it makes are
    stood in for on the CPU, where a forward has no syncs to count."""
    from hybrid_vlm import syncs

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: None)
    model, processor = tiny
    for candidate in (model, hybrid_copy(model, fastv_k=64)):
        counted = syncs.counted_after_failure(candidate, image_inputs(processor), decode_steps=2)
        assert counted == " (counted: 0 sync(s) in the prefill, 0 in 2 decode steps)", type(candidate).__name__


@pytest.mark.parametrize("fastv_k", [64, 0.5, None])
def test_forward_has_no_host_syncs(tiny, fastv_k):
    """Prefill with pruning and two decode steps: on CPU on the meta device, on CUDA under sync-debug."""
    model, processor = tiny
    device = "cuda" if torch.cuda.is_available() else "cpu"
    patched = hybrid_copy(model, fastv_k=fastv_k).to(device)
    assert check_no_host_syncs(patched, image_inputs(processor, QUESTIONS), decode_steps=2) == "pass"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts syncs with CUDA sync-debug mode")
def test_dymu_syncs_once_per_prompt_and_never_per_step_on_cuda(tiny):
    """The counter sees a sync that is planted in the decode step, and DyMU's own count is at most
    one read in the prefill and none while decoding."""
    model, processor = tiny
    inputs = image_inputs(processor, QUESTIONS)
    hybrid = hybrid_copy(model, fastv_k=0.5, dymu=str(ensure_tiny_thresholds())).to("cuda")
    counts = count_cuda_syncs(hybrid, inputs, decode_steps=3)
    assert counts.prefill <= 1 and counts.decode == 0
    assert check_no_host_syncs(hybrid, inputs, decode_steps=3).startswith("pass: ")

    def read_in_decode(module, args):
        if args[0].shape[1] == 1:
            args[0].sum().item()

    handle = layer_entry_modules(hybrid)[-1].register_forward_pre_hook(read_in_decode)
    try:
        assert count_cuda_syncs(hybrid, inputs, decode_steps=3).decode >= 3
    finally:
        handle.remove()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts syncs with CUDA sync-debug mode")
def test_mask_read_syncs_once_per_prompt_and_never_per_step_on_cuda(tiny):
    """MASK_READ=once on an unpadded batch: the one sync of the prefill is the engine's counted read."""
    model, processor = tiny
    inputs = image_inputs(processor, [QUESTIONS[0], QUESTIONS[0]], seeds=[0, 1])
    assert bool(inputs["attention_mask"].all())
    hybrid = hybrid_copy(model, fastv_k=64, mask_read="once").to("cuda")
    counts = count_cuda_syncs(hybrid, inputs, decode_steps=3)
    assert (counts.prefill, counts.allowed_in_prefill, counts.decode, counts.designed_in_decode) == (1, 1, 0, 0)
    assert check_no_host_syncs(hybrid, inputs, decode_steps=3) == "pass: 1 sync(s) in the prefill (1 allowed), 0 in 3 decode steps (none allowed)"


def test_dymu_thresholds_follow_the_model_once(tiny):
    """A model moved after apply_hybrid gets its thresholds copied to the new device once, not per prompt."""
    from hybrid_vlm.adapters import thresholds_on

    model, _ = tiny
    hybrid = hybrid_copy(model, fastv_k=0.5, dymu=str(ensure_tiny_thresholds()))
    first = thresholds_on(hybrid, torch.device("meta"))
    assert first.device.type == "meta" and thresholds_on(hybrid, torch.device("meta")) is first
    assert hybrid.hybrid_thresholds is first


def test_a_patched_model_saves_as_the_stock_class_and_its_class_is_not_loaded(tiny, tmp_path):
    """save_pretrained wrote architectures ["HybridLlavaForConditionalGeneration"], a class
    transformers does not have; loading through it gave a fresh lm_head and then an AttributeError."""
    import json

    from transformers import AutoModelForImageTextToText

    from hybrid_vlm.model import HybridLlavaForConditionalGeneration

    model, _ = tiny
    patched = hybrid_copy(model, fastv_k=64)
    patched.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LlavaForConditionalGeneration"]
    assert type(patched) is HybridLlavaForConditionalGeneration and patched.hybrid_config.fastv_k == 64  # still patched
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path, **NO_HUB_KERNELS)
    assert type(loaded).__name__ == "LlavaForConditionalGeneration"
    stock_weights = model.state_dict()
    assert all(torch.equal(value, stock_weights[name]) for name, value in loaded.state_dict().items())
    with pytest.raises(TypeError, match="load with LlavaForConditionalGeneration.from_pretrained"):
        HybridLlavaForConditionalGeneration.from_pretrained(tmp_path, **NO_HUB_KERNELS)


@pytest.mark.parametrize("settings", [dict(fastv_k=64), dict(fastv_k=0.5, dymu=ensure_tiny_thresholds())], ids=["fastv", "hybrid"])
def test_a_padded_batch_of_one_runs_under_mask_read_once_as_the_prompt_alone(tiny, settings):
    """One row of a left-padded batch (or padding="max_length") is a batch of one with zeros in
    its mask, which stock runs. It was refused whatever MASK_READ said; with MASK_READ=once the
    mask is now read and the padded row generates what the unpadded prompt does."""
    model, processor = tiny
    padded = {key: value[:1] for key, value in image_inputs(processor, QUESTIONS).items()}
    assert (padded["attention_mask"] == 0).any(), "row 0 of the batch must be padded"
    real = padded["attention_mask"][0].bool()
    alone = {**padded, "input_ids": padded["input_ids"][:, real], "attention_mask": padded["attention_mask"][:, real]}
    once = hybrid_copy(model, mask_read="once", **settings)
    with torch.no_grad():
        expected = once.generate(**alone, max_new_tokens=4, min_new_tokens=4, do_sample=False)[0, -4:]
        assert torch.equal(once.generate(**padded, max_new_tokens=4, min_new_tokens=4, do_sample=False)[0, -4:], expected)
        with pytest.raises(ValueError, match="MASK_READ=once"):
            hybrid_copy(model, **settings)(**padded)
