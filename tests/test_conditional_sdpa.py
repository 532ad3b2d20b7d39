"""Conditional SDPA: no mask where every key is real, the same numbers as the masked path."""

from __future__ import annotations

import pytest
import torch

import hybrid_vlm.hf_compat.llava as llava_compat
import hybrid_vlm.model as engine
from hybrid_vlm.hf_compat import cache_kwarg, new_cache
from hybrid_vlm.hf_compat.llava import grouped_query_sdpa, repeat_kv
from hybrid_vlm.syncs import check_no_host_syncs
from hybrid_vlm.tiny import ensure_tiny_thresholds

from conftest import QUESTIONS, assert_batched_generation_equals_each_alone, hybrid_copy, image_inputs

NEW_TOKENS = 5
SETTINGS = [dict(), dict(fastv_k=64), dict(fastv_k=0.5, fastv_layer=1), dict(visual_pool=3, fastv_k=16), dict(fastv_k=32, fastv_select="random")]


class SdpaSpy:
    """Counts the LLM layers' SDPA calls by whether they carried a mask, passing every call through
    (DyMU's ViT calls SDPA with its size bias elsewhere)."""

    def __init__(self, monkeypatch):
        self.masked = self.unmasked = self.causal = 0
        original = llava_compat.scaled_dot_product_attention

        def spy(*args, attn_mask=None, is_causal=False, **kwargs):
            if attn_mask is None:
                self.unmasked += 1
                self.causal += bool(is_causal)
            else:
                self.masked += 1
            return original(*args, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

        monkeypatch.setattr(llava_compat, "scaled_dot_product_attention", spy)


def prefill_then_decode(model, inputs, steps: int = 2) -> list[torch.Tensor]:
    cache = new_cache(model)
    with torch.no_grad():
        out = model(**inputs, **cache_kwarg(cache), use_cache=True)
        logits = [out.logits[:, -1]]
        mask = inputs["attention_mask"]
        for _ in range(steps):
            token = logits[-1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            logits.append(model(input_ids=token, attention_mask=mask, **cache_kwarg(cache), use_cache=True).logits[:, -1])
    return logits


@pytest.mark.parametrize("settings", SETTINGS, ids=str)
def test_unmasked_path_equals_masked_path(tiny, monkeypatch, settings):
    """Batch 1 takes the fast path; forcing the explicit mask must give the same logits and tokens."""
    model, processor = tiny
    hybrid = hybrid_copy(model, **settings)
    inputs = image_inputs(processor, QUESTIONS[1:2])
    fast = prefill_then_decode(hybrid, inputs)
    fast_tokens = hybrid.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    monkeypatch.setattr(engine, "prompt_is_dense", lambda *args: False)
    masked = prefill_then_decode(hybrid, inputs)
    masked_tokens = hybrid.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    for a, b in zip(fast, masked):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    assert torch.equal(fast_tokens, masked_tokens)


def test_dymu_batch_of_one_takes_the_fast_path_exactly(tiny, monkeypatch):
    model, processor = tiny
    hybrid = hybrid_copy(model, fastv_k=0.5, dymu=str(ensure_tiny_thresholds()))
    inputs = image_inputs(processor, QUESTIONS[:1])
    spy = SdpaSpy(monkeypatch)
    fast = prefill_then_decode(hybrid, inputs)
    assert spy.masked == 0 and spy.unmasked > 0
    monkeypatch.setattr(engine, "prompt_is_dense", lambda *args: False)
    masked = prefill_then_decode(hybrid, inputs)
    for a, b in zip(fast, masked):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


@pytest.mark.parametrize("fastv_k", [None, 64])
def test_unpadded_batch_of_one_runs_sdpa_without_a_mask(tiny, monkeypatch, fastv_k):
    """Prefill: every layer causal, no mask; each decode step: every layer without a mask."""
    model, processor = tiny
    hybrid = hybrid_copy(model, fastv_k=fastv_k)
    layers = model.config.text_config.num_hidden_layers
    spy = SdpaSpy(monkeypatch)
    prefill_then_decode(hybrid, image_inputs(processor, QUESTIONS[:1]), steps=2)
    assert spy.masked == 0
    assert spy.causal == layers  # the prefill
    assert spy.unmasked == 3 * layers  # prefill + 2 decode steps


def test_padded_batch_keeps_the_mask(tiny, monkeypatch):
    model, processor = tiny
    inputs = image_inputs(processor, QUESTIONS)
    assert (inputs["attention_mask"] == 0).any()
    spy = SdpaSpy(monkeypatch)
    prefill_then_decode(hybrid_copy(model, fastv_k=64), inputs, steps=1)
    assert spy.unmasked == 0 and spy.masked == 2 * model.config.text_config.num_hidden_layers


def test_no_mask_passed_is_dense_for_a_batch(tiny, monkeypatch):
    model, processor = tiny
    inputs = image_inputs(processor, [QUESTIONS[0], QUESTIONS[0]], seeds=[0, 1])  # same length: no padding
    assert bool(inputs["attention_mask"].all())
    del inputs["attention_mask"]
    spy = SdpaSpy(monkeypatch)
    with torch.no_grad():
        hybrid_copy(model, fastv_k=64)(**inputs)
    assert spy.masked == 0 and spy.causal == model.config.text_config.num_hidden_layers


def unpadded_pair(processor):
    inputs = image_inputs(processor, [QUESTIONS[0], QUESTIONS[0]], seeds=[0, 1])  # same length: no padding
    assert bool(inputs["attention_mask"].all())
    return inputs


def test_mask_read_once_runs_an_unpadded_batch_without_a_mask_and_as_stock(tiny, monkeypatch):
    """MASK_READ=once: a batch of two with the processor's all-ones mask runs every layer without a
    mask, and its logits are stock transformers' (which reads and drops that mask)."""
    model, processor = tiny
    inputs = unpadded_pair(processor)
    layers = model.config.text_config.num_hidden_layers
    reference = prefill_then_decode(model, inputs)  # stock, before the spy
    spy = SdpaSpy(monkeypatch)
    once = prefill_then_decode(hybrid_copy(model, mask_read="once"), inputs)
    assert spy.masked == 0 and spy.causal == layers and spy.unmasked == 3 * layers
    for a, b in zip(once, reference):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


@pytest.mark.parametrize("settings", [dict(fastv_k=64), dict(fastv_k=0.5, fastv_layer=1), dict(visual_pool=3, fastv_k=16)], ids=str)
def test_mask_read_once_generates_an_unpadded_batch_as_each_prompt_alone(tiny, monkeypatch, settings):
    """Through generate with the processor's all-ones mask: no layer masked, and each prompt's greedy
    tokens are the ones it gets alone (batch 1, the mask-free path of its own)."""
    model, processor = tiny
    hybrid = hybrid_copy(model, mask_read="once", **settings)
    inputs = unpadded_pair(processor)
    spy = SdpaSpy(monkeypatch)
    with torch.no_grad():
        batched = hybrid.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    assert spy.masked == 0 and spy.unmasked == NEW_TOKENS * model.config.text_config.num_hidden_layers
    with torch.no_grad():
        for i in range(2):
            alone = hybrid.generate(**image_inputs(processor, [QUESTIONS[0]], seeds=[i]), max_new_tokens=NEW_TOKENS,
                                    min_new_tokens=NEW_TOKENS, do_sample=False)
            assert torch.equal(batched[i, -NEW_TOKENS:], alone[0, -NEW_TOKENS:])


@pytest.mark.parametrize("mask_passed", [True, False], ids=["mask-read-once", "no-mask"])
def test_dymu_alone_keeps_the_mask_where_merged_counts_differ_and_equals_each_prompt_alone(tiny, monkeypatch, mask_passed):
    """An unpadded pair whose images merge to different counts: the shorter one's empty slots are
    padding, so neither MASK_READ=once nor a call without a mask may take the mask-free path (no
    FastV here, whose quotas would rule it out anyway). Each prompt's logits, prefill and decode, are
    its own alone."""
    from hybrid_vlm.hf_compat import dymu_image_features

    model, processor = tiny
    hybrid = hybrid_copy(model, dymu=str(ensure_tiny_thresholds()), mask_read="once")
    inputs = unpadded_pair(processor)
    with torch.no_grad():
        counts = dymu_image_features(hybrid, inputs["pixel_values"], hybrid.hybrid_thresholds).valid.sum(dim=1).tolist()
    assert counts[0] != counts[1], counts
    spy = SdpaSpy(monkeypatch)
    if mask_passed:
        batched = prefill_then_decode(hybrid, inputs)
    else:
        with torch.no_grad():
            batched = [hybrid(**{k: v for k, v in inputs.items() if k != "attention_mask"}).logits[:, -1]]
    assert spy.masked > 0
    for i in range(2):
        alone = prefill_then_decode(hybrid, image_inputs(processor, [QUESTIONS[0]], seeds=[i]))
        for a, b in zip(batched, alone):
            assert (a[i] - b[0]).abs().max() <= 1e-4 * b[0].abs().max()


def test_mask_read_once_keeps_the_mask_of_a_padded_batch(tiny, monkeypatch):
    model, processor = tiny
    inputs = image_inputs(processor, QUESTIONS)
    assert (inputs["attention_mask"] == 0).any()
    spy = SdpaSpy(monkeypatch)
    prefill_then_decode(hybrid_copy(model, fastv_k=64, mask_read="once"), inputs, steps=1)
    assert spy.unmasked == 0 and spy.masked == 2 * model.config.text_config.num_hidden_layers


def test_mask_read_never_keeps_the_mask_of_an_unpadded_batch(tiny, monkeypatch):
    """The default makes no host read, so a batch passed with a mask keeps it."""
    model, processor = tiny
    spy = SdpaSpy(monkeypatch)
    prefill_then_decode(hybrid_copy(model, fastv_k=64), unpadded_pair(processor), steps=1)
    assert spy.unmasked == 0 and spy.masked == 2 * model.config.text_config.num_hidden_layers


@pytest.mark.parametrize("fastv_k", [None, 64])
def test_mask_read_once_reads_once_per_prompt_and_never_per_step(tiny, fastv_k):
    model, processor = tiny
    inputs = unpadded_pair(processor)
    assert check_no_host_syncs(hybrid_copy(model, fastv_k=fastv_k, mask_read="once"), inputs, decode_steps=2) == (
        "pass: 1 sync(s) in the prefill (1 allowed), 0 in 2 decode steps (none allowed)")
    assert check_no_host_syncs(hybrid_copy(model, fastv_k=fastv_k), inputs, decode_steps=2) == "pass"


def test_the_counted_check_fails_on_a_read_beyond_the_mask(tiny, monkeypatch):
    """A layer that also reads a value on the host (here `bool`, which the count answers) fails it."""
    model, processor = tiny
    mlp_class = type(model.model.language_model.layers[0].mlp)  # the engine drives each layer's parts
    forward = mlp_class.forward

    def reading_forward(self, hidden_states):
        bool(hidden_states.sum() != 0)
        return forward(self, hidden_states)

    monkeypatch.setattr(mlp_class, "forward", reading_forward)
    verdict = check_no_host_syncs(hybrid_copy(model, mask_read="once"), unpadded_pair(processor), decode_steps=2)
    layers = model.config.text_config.num_hidden_layers
    assert verdict == f"fail: {1 + layers} sync(s) in the prefill (1 allowed), {2 * layers} in 2 decode steps (none allowed)"


@pytest.mark.parametrize("mask_read", ["never", "once"])
def test_a_chunk_that_brings_padding_keeps_the_mask_in_later_steps(tiny, mask_read):
    """Text only, batch 2, positions given: an unpadded first chunk, a second chunk in which sample 1
    is padded, then a one-token step. The step's logits equal stock transformers' single cache-free
    forward over all eleven tokens, whichever MASK_READ made the first chunk dense."""
    model, processor = tiny
    vocab = model.config.text_config.vocab_size
    ids = torch.randint(10, vocab, (2, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 7:10] = 0
    positions = torch.arange(11).expand(2, 11)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        hybrid, cache = hybrid_copy(model, mask_read=mask_read), new_cache(model)
        for start, stop in [(0, 5), (5, 10), (10, 11)]:
            out = hybrid(input_ids=ids[:, start:stop], attention_mask=mask[:, :stop], position_ids=positions[:, start:stop],
                         **cache_kwarg(cache), use_cache=True)
    assert (out.logits[:, -1] - expected).abs().max() <= 1e-4 * expected.abs().max()  # chunked vs one forward: fp32 sums


@pytest.mark.parametrize("mask_read", ["never", "once"])
def test_a_one_token_chunk_of_padding_after_a_read_prompt_is_refused(tiny, mask_read):
    """Right padding split into chunks: the prompt's first chunk reads as unpadded under MASK_READ=once,
    and a one-token chunk that is a pad is refused rather than cached as a real key; with the default
    the batch keeps its mask and the last step equals stock's cache-free forward."""
    model, _ = tiny
    ids = torch.randint(10, model.config.text_config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5] = 0
    positions = torch.arange(7).expand(2, 7)
    hybrid, cache = hybrid_copy(model, mask_read=mask_read), new_cache(model)

    def chunk(start, stop):
        return hybrid(input_ids=ids[:, start:stop], attention_mask=mask[:, :stop], position_ids=positions[:, start:stop],
                      **cache_kwarg(cache), use_cache=True)

    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        chunk(0, 5)
        if mask_read == "once":
            with pytest.raises(ValueError, match="cannot take padding in a later one-token chunk"):
                chunk(5, 6)
            return
        chunk(5, 6)
        out = chunk(6, 7)
    assert (out.logits[:, -1] - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_a_chunk_with_padding_in_a_batch_of_one_is_refused(tiny):
    model, _ = tiny
    ids = torch.randint(10, model.config.text_config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(1, 8, dtype=torch.long)
    mask[0, 6] = 0
    hybrid, cache = hybrid_copy(model), new_cache(model)
    with torch.no_grad():
        hybrid(input_ids=ids[:, :4], attention_mask=mask[:, :4], **cache_kwarg(cache), use_cache=True)
        with pytest.raises(ValueError, match="all-ones attention_mask"):
            hybrid(input_ids=ids[:, 4:], attention_mask=mask, **cache_kwarg(cache), use_cache=True)


def test_a_batch_of_one_with_padding_is_refused(tiny):
    model, processor = tiny
    inputs = image_inputs(processor, QUESTIONS[:1])
    inputs["attention_mask"][0, 0] = 0
    with pytest.raises(ValueError, match="taken as unpadded .* set MASK_READ=once"), torch.no_grad():
        hybrid_copy(model, fastv_k=64)(**inputs)


@pytest.mark.parametrize("fastv_k", [64, None])
def test_batch_of_one_has_no_host_syncs(tiny, fastv_k):
    model, processor = tiny
    assert check_no_host_syncs(hybrid_copy(model, fastv_k=fastv_k), image_inputs(processor, QUESTIONS[:1]), decode_steps=2) == "pass"


def test_grouped_query_dense_path_keeps_keys_grouped_and_equals_the_masked_path(tiny_gqa, monkeypatch):
    """With grouped-query attention and no mask, SDPA gets the cached keys as they are (one per KV
    head, `enable_gqa`), as stock passes them, except where FastV scores (its row needs every head's
    keys); the logits equal the masked path's, whose prefill repeats the keys to every query head."""
    model, processor = tiny_gqa
    hybrid = hybrid_copy(model, fastv_k=64)
    inputs = image_inputs(processor, QUESTIONS[1:2])
    calls = []  # (KV heads of the keys passed, enable_gqa, no mask)
    original = llava_compat.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, enable_gqa=False, **kwargs):
        calls.append((key.shape[1], enable_gqa, attn_mask is None))
        return original(query, key, value, attn_mask=attn_mask, enable_gqa=enable_gqa, **kwargs)

    monkeypatch.setattr(llava_compat, "scaled_dot_product_attention", spy)
    steps = 2
    fast = prefill_then_decode(hybrid, inputs, steps)
    text = model.config.text_config
    assert text.num_key_value_heads < text.num_attention_heads
    assert len(calls) == text.num_hidden_layers * (1 + steps)
    grouped = [call for call in calls if call[1]]
    assert len(grouped) == len(calls) - 1  # only the prefill's scoring layer repeats the keys
    assert all(heads == text.num_key_value_heads and no_mask for heads, _, no_mask in grouped)
    monkeypatch.setattr(engine, "prompt_is_dense", lambda *args: False)
    calls.clear()
    masked = prefill_then_decode(hybrid, inputs, steps)
    prefill = calls[: text.num_hidden_layers]  # a masked prefill repeats the keys to every query head
    assert not any(gqa for _, gqa, _ in prefill) and all(heads == text.num_attention_heads for heads, _, _ in prefill)
    for a, b in zip(fast, masked):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_grouped_query_masked_decode_keeps_keys_grouped_and_equals_each_prompt_alone(tiny_gqa, monkeypatch):
    """A left-padded batch takes the masked path: its decode steps still pass the cached keys as they
    are, folding each KV head's query heads into rows (stock's pack_gqa); the prefill repeats them.
    The batch's greedy tokens equal each prompt generated alone (the mask-free path)."""
    model, processor = tiny_gqa
    hybrid = hybrid_copy(model, fastv_k=64)
    text = model.config.text_config
    calls = []  # (query rows, KV heads of the keys passed, masked)
    original = llava_compat.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, **kwargs):
        calls.append((query.shape[2], key.shape[1], attn_mask is not None))
        return original(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(llava_compat, "scaled_dot_product_attention", spy)
    prefill_then_decode(hybrid, image_inputs(processor, QUESTIONS), steps=2)
    prefill, steps = calls[: text.num_hidden_layers], calls[text.num_hidden_layers :]
    assert all(masked and heads == text.num_attention_heads for _, heads, masked in prefill)
    groups = text.num_attention_heads // text.num_key_value_heads
    assert steps and all(masked and heads == text.num_key_value_heads and rows == groups for rows, heads, masked in steps)
    monkeypatch.undo()
    assert_batched_generation_equals_each_alone(hybrid, processor, NEW_TOKENS)


@pytest.mark.parametrize("batch, heads, kv_heads, keys", [(3, 8, 2, 37), (2, 4, 1, 5), (1, 6, 3, 1)])
def test_grouped_query_sdpa_equals_sdpa_over_repeated_keys(batch, heads, kv_heads, keys):
    """The reference repeats the keys to every query head (transformers' repeat_kv) and calls SDPA:
    a causal prefill without a mask, and a one-token step with and without a padding mask."""
    generator = torch.Generator().manual_seed(batch * 100 + keys)
    key, value = (torch.randn(batch, kv_heads, keys, 16, generator=generator) for _ in range(2))
    groups = heads // kv_heads
    wide_key, wide_value = repeat_kv(key, groups), repeat_kv(value, groups)
    step = torch.randn(batch, heads, 1, 16, generator=generator)
    valid = torch.rand(batch, keys, generator=generator) > 0.3
    valid[:, -1] = True  # the new token itself
    mask = valid[:, None, None, :]
    cases = [(step, None), (step, mask), (torch.randn(batch, heads, keys, 16, generator=generator), None)]
    for query, attention_mask in cases:
        causal = attention_mask is None and query.shape[2] > 1
        expected = torch.nn.functional.scaled_dot_product_attention(query, wide_key, wide_value, attn_mask=attention_mask, is_causal=causal, scale=0.25)
        got = grouped_query_sdpa(query, key, value, attention_mask, 0.25)
        assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-6, rtol=1e-5)
