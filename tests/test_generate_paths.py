"""generate beyond one greedy call, over the pruned, grouped KV cache, against a cache-free
recomputation of the same pruned model (which scores with the last prompt token, as the cached
path does):

- beam search and `num_return_sequences`: generate repeats the inputs per beam and reorders the
  cache's layers between steps, while the engine's state (each group's key validity and next
  positions) rides along. Each returned beam's score must be its recomputed log-probability.
- a second turn: generate continues over the cache the first call returned, with new text.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from hybrid_vlm.hf_compat import cache_kwarg, output_cache
from hybrid_vlm.tiny import ensure_tiny_thresholds, synthetic_image

from conftest import QUESTIONS, hybrid_copy, image_inputs, next_inputs, qwen_inputs, qwen_two_image_inputs

NEW_TOKENS = 6
BEAMS = 3


def beam_search(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequences [B * BEAMS, L + NEW_TOKENS], sequences_scores [B * BEAMS]): every beam of every
    prompt, each scored by its summed log-probabilities (length_penalty 0), no early end-of-sequence."""
    with torch.no_grad():
        output = model.generate(
            **inputs, num_beams=BEAMS, num_return_sequences=BEAMS, do_sample=False, length_penalty=0.0,
            max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, return_dict_in_generate=True, output_scores=True,
        )
    return output.sequences, output.sequences_scores


def recomputed_log_probs(model, inputs, sequences: torch.Tensor, images_per_prompt: int = 1) -> torch.Tensor:
    """[B * BEAMS]: each sequence's generated tokens' summed log-probabilities, recomputed without a cache."""
    prompt_length = inputs["input_ids"].shape[1]
    logits = cache_free_logits(model, inputs, sequences, torch.arange(sequences.shape[0]) // BEAMS, images_per_prompt)
    return logits.float().log_softmax(dim=-1).gather(2, sequences[:, prompt_length:, None])[..., 0].sum(dim=1)


def cache_free_logits(model, inputs, sequences: torch.Tensor, rows: torch.Tensor, images_per_prompt: int = 1) -> torch.Tensor:
    """[R, T, vocab]: the logits that predict the T tokens after the prompt in each sequence (row r
    continues prompt `rows[r]`; every appended token is real text), from one forward over the whole
    sequence without a cache, scoring with the last prompt token as the cached path does."""
    prompt_length = inputs["input_ids"].shape[1]
    appended = sequences.shape[1] - prompt_length
    attention_mask = torch.cat([inputs["attention_mask"][rows], torch.ones(len(rows), appended, dtype=torch.long)], dim=1)
    images = images_per_row(inputs, rows, images_per_prompt)
    if "mm_token_type_ids" in inputs:  # Qwen2.5-VL's token kinds (1 = image): the appended tokens are text
        images["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"][rows], torch.zeros(len(rows), appended, dtype=torch.long)], dim=1)
    with torch.no_grad():
        output = model(
            input_ids=sequences, attention_mask=attention_mask, **images, use_cache=False, fastv_query_index=prompt_length - 1,
        )
    # pruning drops visual rows only: the last prompt token and the appended ones are the last rows
    tail = torch.arange(prompt_length - 1, sequences.shape[1]).expand(len(rows), -1)
    if output.kept_positions is not None:  # None: every row is the prompt's own
        assert torch.equal(output.kept_positions[:, -(appended + 1) :], tail)
    return output.logits[:, -(appended + 1) : -1]


def two_image_inputs(processor, resize=None):
    """A left-padded batch of two prompts with two images each (four different images), the second
    prompt longer by one word; `resize` ((width, height) per image) gives LLaVA-NeXT its sizes."""
    content = [{"type": "image"}, {"type": "text", "text": "left"}, {"type": "image"}, {"type": "text", "text": "which color?"}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    images = [synthetic_image(i) for i in range(4)]
    images = images if resize is None else [image.resize(size) for image, size in zip(images, resize)]
    return processor(images=images, text=[prompt, prompt.replace("left", "left one")], return_tensors="pt", padding=True)


def images_per_row(inputs, rows: torch.Tensor, images_per_prompt: int) -> dict:
    """The prompts' image inputs for the given rows (prompt indices): LLaVA-1.5's and LLaVA-NeXT's
    are per prompt; Qwen2.5-VL's patches are concatenated image after image, so each prompt's
    images (`images_per_prompt` each, in order) are taken whole."""
    images = [row * images_per_prompt + i for row in rows.tolist() for i in range(images_per_prompt)]
    if "image_grid_thw" not in inputs:
        return {key: inputs[key][images] for key in ("pixel_values", "image_sizes") if key in inputs}
    grids = inputs["image_grid_thw"]
    patches = inputs["pixel_values"].split(grids.prod(dim=1).tolist())
    return dict(pixel_values=torch.cat([patches[image] for image in images]), image_grid_thw=grids[images])


NEXT_TWO_IMAGE_SIZES = [(336, 200), (250, 500), (336, 336), (200, 336)]
# (model fixture, inputs from its processor, settings, images per prompt): filler slots where the
# images differ in size (next, qwen), DyMU's compacted slots (hybrid), two images per prompt
BEAM_CASES = {
    "llava-k64": ("tiny", lambda processor: image_inputs(processor, QUESTIONS[:2]), dict(fastv_k=64), 1),
    "llava-r0.5-renumbered": ("tiny", lambda processor: image_inputs(processor, QUESTIONS[:2]), dict(fastv_k=0.5, position_mode="renumbered"), 1),
    "hybrid": ("tiny", lambda processor: image_inputs(processor, QUESTIONS[:2]), dict(fastv_k=32, dymu="tiny-mid"), 1),
    "next-k64": ("tiny_next", lambda processor: next_inputs(processor, QUESTIONS[:2]), dict(fastv_k=64), 1),
    "next-r0.5-renumbered": ("tiny_next", lambda processor: next_inputs(processor, QUESTIONS[:2]), dict(fastv_k=0.5, position_mode="renumbered"), 1),
    "qwen-k16": ("tiny_qwen", lambda processor: qwen_inputs(processor, QUESTIONS[:2]), dict(fastv_k=16), 1),
    "qwen-r0.5-l1": ("tiny_qwen", lambda processor: qwen_inputs(processor, QUESTIONS[:2]), dict(fastv_k=0.5, fastv_layer=1), 1),
    "llava-two-images": ("tiny", two_image_inputs, dict(fastv_k=64), 2),
    "next-two-images": ("tiny_next", lambda processor: two_image_inputs(processor, resize=NEXT_TWO_IMAGE_SIZES), dict(fastv_k=0.5), 2),
    "qwen-two-images": ("tiny_qwen", qwen_two_image_inputs, dict(fastv_k=16), 2),
}


def with_thresholds(settings: dict) -> dict:
    """The tiny model's calibrated DyMU thresholds where a case names them."""
    return {**settings, "dymu": str(ensure_tiny_thresholds())} if settings.get("dymu") == "tiny-mid" else settings


@pytest.mark.parametrize("case", list(BEAM_CASES))
def test_each_beam_scores_what_the_cache_free_model_gives_its_tokens(request, case):
    """Each beam of a left-padded batch sees its own prompt's images, cache and positions."""
    fixture, make_inputs, settings, images_per_prompt = BEAM_CASES[case]
    model, processor = request.getfixturevalue(fixture)
    hybrid = hybrid_copy(model, **with_thresholds(settings))
    inputs = make_inputs(processor)
    assert (inputs["attention_mask"] == 0).any(), "the batch must exercise left padding"
    sequences, scores = beam_search(hybrid, inputs)
    assert len(set(map(tuple, sequences.tolist()))) == sequences.shape[0], "the beams must differ"
    expected = recomputed_log_probs(hybrid, inputs, sequences, images_per_prompt)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["llava-two-images", "next-two-images", "qwen-two-images", "hybrid"])
def test_sampled_return_sequences_at_top_k_1_repeat_each_prompts_greedy_answer(request, case):
    """Sampling from the top token only is greedy: each of a prompt's returned sequences must be
    that prompt's greedy answer, which holds only if every repeated row sees its own images."""
    fixture, make_inputs, settings, _ = BEAM_CASES[case]
    model, processor = request.getfixturevalue(fixture)
    hybrid = hybrid_copy(model, **with_thresholds(settings))
    inputs = make_inputs(processor)
    with torch.no_grad():
        greedy = hybrid.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        sampled = hybrid.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=True, top_k=1,
                                  num_return_sequences=BEAMS)
    assert torch.equal(sampled, greedy.repeat_interleave(BEAMS, dim=0))


# the layer-0 cache holds as many slots as the prompt has tokens (llava, qwen: equal grids), more
# (next: filler slots for the smaller image) or fewer (hybrid: DyMU's merged-away slots compacted)
SECOND_TURNS = {
    "llava": ("tiny", lambda processor: image_inputs(processor, QUESTIONS[:2]), dict(fastv_k=64)),
    "hybrid": ("tiny", lambda processor: image_inputs(processor, QUESTIONS[:2]), dict(fastv_k=32, dymu="tiny-mid")),
    "next": ("tiny_next", lambda processor: next_inputs(processor, QUESTIONS[:2]), dict(fastv_k=0.5)),
    "qwen": ("tiny_qwen", lambda processor: qwen_inputs(processor, QUESTIONS[:2]), dict(fastv_k=16)),
    "qwen-fillers": ("tiny_qwen", lambda processor: qwen_inputs(processor, QUESTIONS[:2], indices=[0, 2]), dict(fastv_k=16)),
}


GREEDY = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True)


def second_turn(hybrid, processor, inputs, new_tokens_only: bool = False, **options):
    """generate's output for the follow-up text over the cache the first turn returned, given the
    whole mask and either the whole conversation (as chat code passes it) or only the tokens the
    cache lacks (the other form generate accepts): the first turn's last token, which generate
    returns but never feeds back, and the follow-up. Its sequences are the whole conversation."""
    with torch.no_grad():
        first = hybrid.generate(**inputs, **GREEDY)
        follow_up = processor.tokenizer([" and which shape is it?"] * 2, return_tensors="pt", add_special_tokens=False)["input_ids"]
        turn_two = torch.cat([first.sequences, follow_up], dim=1)
        mask = torch.cat([inputs["attention_mask"], torch.ones(2, turn_two.shape[1] - inputs["input_ids"].shape[1], dtype=torch.long)], dim=1)
        lacking = follow_up.shape[1] + 1
        given = turn_two[:, -lacking:] if new_tokens_only else turn_two
        second = hybrid.generate(input_ids=given, attention_mask=mask, **cache_kwarg(output_cache(first)), **GREEDY, **options)
    if new_tokens_only:
        second.sequences = torch.cat([turn_two[:, :-lacking], second.sequences], dim=1)
    return second


@pytest.mark.parametrize("passed", ["conversation", "new tokens"])
@pytest.mark.parametrize("mask_read", ["never", "once"])
@pytest.mark.parametrize("case", list(SECOND_TURNS))
def test_a_second_turn_over_the_returned_cache_predicts_what_recomputation_does(request, case, mask_read, passed):
    """Turn 1 prunes; turn 2 passes the whole conversation, as chat code does, and generate feeds
    the engine only what the cache lacks: the new text (a multi-token chunk), then steps."""
    fixture, make_inputs, settings = SECOND_TURNS[case]
    model, processor = request.getfixturevalue(fixture)
    hybrid = hybrid_copy(model, **with_thresholds(settings), mask_read=mask_read)
    inputs = make_inputs(processor)
    second = second_turn(hybrid, processor, inputs, new_tokens_only=passed == "new tokens")
    expected = cache_free_logits(hybrid, inputs, second.sequences, torch.arange(2))[:, -4:]
    torch.testing.assert_close(torch.stack(second.logits, dim=1), expected, rtol=1e-4, atol=1e-4)


def test_a_chunked_second_turn_is_exact_without_fillers_and_refused_with_them(tiny, tiny_next):
    """generate(prefill_chunk_size=...) cuts a second turn's masks by layer 0's slots: right where
    they are the caller's tokens, refused (not misread) where filler slots make them differ."""
    model, processor = tiny
    hybrid = hybrid_copy(model, fastv_k=64)
    inputs = image_inputs(processor, QUESTIONS[:2])
    second = second_turn(hybrid, processor, inputs, prefill_chunk_size=4)
    expected = cache_free_logits(hybrid, inputs, second.sequences, torch.arange(2))[:, -4:]
    torch.testing.assert_close(torch.stack(second.logits, dim=1), expected, rtol=1e-4, atol=1e-4)
    model, processor = tiny_next
    with pytest.raises(ValueError, match="prefill_chunk_size=4 over this cache would misplace"):
        second_turn(hybrid_copy(model, fastv_k=0.5), processor, next_inputs(processor, QUESTIONS[:2]), prefill_chunk_size=4)


@pytest.mark.parametrize("passed", ["conversation", "new tokens"])
def test_a_chunked_second_turn_over_a_compacted_unpadded_cache_is_refused(tiny, passed):
    """One unpadded prompt under DyMU: its cache holds the caller's tokens in fewer slots, and generate
    drops the all-ones mask, so the mask check cannot see a chunked prefill cut by slots (the turn
    re-fed 248 cached tokens, or shifted positions by as many, and its logits were off by 11). It is
    refused by name; the same turn without chunks equals cache-free recomputation."""
    model, processor = tiny
    hybrid = hybrid_copy(model, **with_thresholds(dict(dymu="tiny-mid")))
    inputs = image_inputs(processor, QUESTIONS[:1])
    with torch.no_grad():
        first = hybrid.generate(**inputs, **GREEDY)
    assert output_cache(first).hybrid_state.written_offset > 0  # DyMU compacted the cache
    follow_up = processor.tokenizer([" and which shape is it?"], return_tensors="pt", add_special_tokens=False)["input_ids"]
    conversation = torch.cat([first.sequences, follow_up], dim=1)
    given = conversation[:, -(follow_up.shape[1] + 1):] if passed == "new tokens" else conversation
    turn = dict(input_ids=given, attention_mask=torch.ones_like(conversation), **cache_kwarg(output_cache(first)), **GREEDY)
    with pytest.raises(ValueError, match="prefill_chunk_size=4 over this cache"):
        hybrid.generate(**turn, prefill_chunk_size=4)
    with torch.no_grad():
        second = hybrid.generate(**turn)
    sequences = torch.cat([conversation[:, : conversation.shape[1] - given.shape[1]], second.sequences], dim=1)
    expected = cache_free_logits(hybrid, inputs, sequences, torch.arange(1))[:, -4:]
    torch.testing.assert_close(torch.stack(second.logits, dim=1), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("option", [dict(prompt_lookup_num_tokens=3), dict(assistant_early_exit=1)])
def test_assisted_generation_is_refused_by_name(tiny, option):
    """Assisted generation crops the cache to one length after rejected candidates: refused by
    name before generate starts, rather than failing later on a placeholder count."""
    model, processor = tiny
    inputs = image_inputs(processor)
    with torch.no_grad():
        with pytest.raises(NotImplementedError, match=f"assisted generation \\({next(iter(option))}\\)"):
            hybrid_copy(model, fastv_k=64).generate(**inputs, max_new_tokens=2, do_sample=False, **option)
        with pytest.raises(NotImplementedError, match=f"assisted generation \\({next(iter(option))}\\)"):  # stock's second positional
            hybrid_copy(model, fastv_k=64).generate(inputs.pop("input_ids"), GenerationConfig(max_new_tokens=2, **option), **inputs)


def test_a_keyword_that_turns_assisted_generation_off_is_not_refused(tiny):
    """A generation config asking for prompt lookup, overridden by `prompt_lookup_num_tokens=None`, as
    stock generate lets a keyword do: it was refused for the config's value. It generates greedily."""
    model, processor = tiny
    inputs = image_inputs(processor)
    hybrid = hybrid_copy(model, fastv_k=64)
    config = GenerationConfig(max_new_tokens=3, do_sample=False, prompt_lookup_num_tokens=3)
    with torch.no_grad():
        switched_off = hybrid.generate(**inputs, generation_config=config, prompt_lookup_num_tokens=None)
        greedy = hybrid.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(switched_off, greedy)


@pytest.mark.parametrize("settings", [{}, dict(fastv_k=64)], ids=["nothing-cut", "fastv-k64"])
def test_a_cache_cropped_outside_the_engine_is_refused(tiny, settings):
    """`cache.crop` (rewinding an answer, as users do on stock models) left the engine's state at
    the old length: a one-token step then ran at a stale position and, even with nothing cut,
    predicted other logits than the prompt recomputed. Stock's crop is the reference that it is a
    use worth naming."""
    model, processor = tiny
    inputs = image_inputs(processor)
    length, token = inputs["input_ids"].shape[1], torch.tensor([[5]])
    with torch.no_grad():
        for patched in (model, hybrid_copy(model, **settings)):
            cache = output_cache(patched.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, return_dict_in_generate=True))
            cache.crop(length - cache.get_seq_length())
            if patched is model:  # stock continues from the cropped cache as from the prompt
                step = model(input_ids=token, past_key_values=cache, use_cache=True).logits[0, -1]
                whole = model(**{**inputs, "input_ids": torch.cat([inputs["input_ids"], token], 1),
                                 "attention_mask": torch.ones(1, length + 1, dtype=torch.long)}).logits[0, -1]
                torch.testing.assert_close(step, whole, rtol=1e-4, atol=1e-4)
                continue
            with pytest.raises(ValueError, match="changed outside the engine"):
                patched(input_ids=token, past_key_values=cache, use_cache=True)


def test_outputs_it_cannot_give_are_refused_not_silently_changed(tiny, tiny_next):
    """Stock returns a tuple for return_dict=False and attentions/hidden states on request, and
    indexes prompt positions with a tensor logits_to_keep; the engine's rows after pruning are the
    kept tokens, so each is refused by name. Without pruning a tensor still indexes stock's rows."""
    model, processor = tiny
    inputs = image_inputs(processor, QUESTIONS[:2])
    hybrid = hybrid_copy(model, fastv_k=16)
    last_two = torch.tensor([inputs["input_ids"].shape[1] - 2, inputs["input_ids"].shape[1] - 1])
    with torch.no_grad():
        for request, needle in ((dict(return_dict=False), "return_dict=False"), (dict(output_attentions=True), "does not return attentions"),
                                (dict(output_hidden_states=True), "does not return hidden states"),
                                (dict(logits_to_keep=last_two), "a tensor logits_to_keep indexes prompt positions")):
            with pytest.raises(NotImplementedError, match=needle):
                hybrid(**inputs, **request)
        unpruned = hybrid_copy(model)(**inputs, logits_to_keep=last_two).logits
        stock = model(**inputs, logits_to_keep=last_two).logits
        next_model, next_processor = tiny_next  # filler slots pad the batch, and are dropped: the prompt's rows
        batch = next_inputs(next_processor, QUESTIONS)
        next_last_two = torch.tensor([batch["input_ids"].shape[1] - 2, batch["input_ids"].shape[1] - 1])
        next_hybrid = hybrid_copy(next_model)
        next_picked = next_hybrid(**batch, logits_to_keep=next_last_two).logits
        next_all = next_hybrid(**batch).logits
    torch.testing.assert_close(unpruned, stock, rtol=1e-4, atol=1e-4)
    assert next_all.shape[1] == batch["input_ids"].shape[1]
    torch.testing.assert_close(next_picked, next_all[:, next_last_two], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["llava", "next", "qwen"])
def test_generate_asks_the_prefill_for_the_logits_stock_asks_for(request, case):
    """generate passes `logits_to_keep=1` to a forward whose signature names it: the patched NeXT
    forward hid it in **kwargs, so the lm_head ran over every kept prompt row. The rows the lm_head
    sees at the prefill equal stock's."""
    fixture, make_inputs, settings = SECOND_TURNS[case]
    model, processor = request.getfixturevalue(fixture)
    inputs = make_inputs(processor)

    def prefill_rows(candidate) -> int:
        rows = []
        hook = candidate.lm_head.register_forward_hook(lambda module, args, output: rows.append(args[0].shape[1]))
        try:
            with torch.no_grad():
                candidate.generate(**inputs, max_new_tokens=2, do_sample=False)
        finally:
            hook.remove()
        return rows[0]

    assert prefill_rows(hybrid_copy(model, **settings)) == prefill_rows(model) == 1
