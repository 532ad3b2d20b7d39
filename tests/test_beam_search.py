"""Beam search over the pruned, grouped KV cache: generate reorders the cache's layers between
steps, and the engine's state (each group's key validity and next positions) rides along. Each
returned beam's score must be its log-probability under a cache-free recomputation of the same
pruned model, which scores with the last prompt token as the cached path does."""

from __future__ import annotations

import pytest
import torch

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
    """[B * BEAMS]: each sequence's generated tokens' summed log-probabilities from one forward over
    the whole sequence without a cache, scoring with the last prompt token."""
    prompt_length = inputs["input_ids"].shape[1]
    rows = torch.arange(sequences.shape[0]) // BEAMS
    attention_mask = torch.cat([inputs["attention_mask"][rows], torch.ones(len(rows), NEW_TOKENS, dtype=torch.long)], dim=1)
    images = images_per_row(inputs, rows, images_per_prompt)
    if "mm_token_type_ids" in inputs:  # Qwen2.5-VL's token kinds (1 = image): the generated tokens are text
        images["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"][rows], torch.zeros(len(rows), NEW_TOKENS, dtype=torch.long)], dim=1)
    with torch.no_grad():
        output = model(
            input_ids=sequences, attention_mask=attention_mask, **images, use_cache=False, fastv_query_index=prompt_length - 1,
        )
    # pruning drops visual rows only: the last prompt token and the generated ones are the last rows
    tail = torch.arange(prompt_length - 1, sequences.shape[1]).expand(len(rows), -1)
    if output.kept_positions is not None:  # None: every row is the prompt's own
        assert torch.equal(output.kept_positions[:, -(NEW_TOKENS + 1) :], tail)
    log_probs = output.logits[:, -(NEW_TOKENS + 1) : -1].float().log_softmax(dim=-1)
    return log_probs.gather(2, sequences[:, prompt_length:, None])[..., 0].sum(dim=1)


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


@pytest.mark.parametrize(
    "settings",
    [dict(fastv_k=64), dict(fastv_k=0.5, position_mode="renumbered"), dict(fastv_k=32, dymu="tiny-mid")],
    ids=["fastv-k64", "fastv-r0.5-renumbered", "hybrid"],
)
def test_each_beam_scores_what_the_cache_free_model_gives_its_tokens(tiny, settings):
    model, processor = tiny
    if settings.get("dymu") == "tiny-mid":
        settings = {**settings, "dymu": str(ensure_tiny_thresholds())}
    hybrid = hybrid_copy(model, **settings)
    inputs = image_inputs(processor, QUESTIONS[:2])
    assert (inputs["attention_mask"] == 0).any(), "the batch must exercise left padding"
    sequences, scores = beam_search(hybrid, inputs)
    assert len(set(map(tuple, sequences.tolist()))) == sequences.shape[0], "the beams must differ"
    torch.testing.assert_close(scores, recomputed_log_probs(hybrid, inputs, sequences), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("settings", [dict(fastv_k=64), dict(fastv_k=0.5, position_mode="renumbered")], ids=["fastv-k64", "fastv-r0.5-renumbered"])
def test_llava_next_beams_with_filler_slots_score_as_recomputed(tiny_next, settings):
    """Images of different sizes: the batch carries filler slots, and each beam keeps its prompt's."""
    model, processor = tiny_next
    hybrid = hybrid_copy(model, **settings)
    inputs = next_inputs(processor, QUESTIONS[:2])
    sequences, scores = beam_search(hybrid, inputs)
    torch.testing.assert_close(scores, recomputed_log_probs(hybrid, inputs, sequences), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("settings", [dict(fastv_k=16), dict(fastv_k=0.5, fastv_layer=1)], ids=["fastv-k16", "fastv-r0.5-l1"])
def test_qwen_beams_keep_their_m_rope_positions(tiny_qwen, settings):
    """Qwen2.5-VL: decode positions continue from each prompt's M-RoPE positions, per beam."""
    model, processor = tiny_qwen
    hybrid = hybrid_copy(model, **settings)
    inputs = qwen_inputs(processor, QUESTIONS[:2])
    sequences, scores = beam_search(hybrid, inputs)
    torch.testing.assert_close(scores, recomputed_log_probs(hybrid, inputs, sequences), rtol=1e-4, atol=1e-4)


def test_qwen_beams_of_two_image_prompts_keep_each_prompts_images_in_order(tiny_qwen):
    """Two prompts with two images each (four grids): each beam sees its own prompt's two images."""
    model, processor = tiny_qwen
    hybrid = hybrid_copy(model, fastv_k=16)
    inputs = qwen_two_image_inputs(processor)
    sequences, scores = beam_search(hybrid, inputs)
    torch.testing.assert_close(scores, recomputed_log_probs(hybrid, inputs, sequences, images_per_prompt=2), rtol=1e-4, atol=1e-4)


def test_llava_beams_of_two_image_prompts_keep_each_prompts_images_in_order(tiny):
    model, processor = tiny
    hybrid = hybrid_copy(model, fastv_k=64)
    inputs = two_image_inputs(processor)
    sequences, scores = beam_search(hybrid, inputs)
    torch.testing.assert_close(scores, recomputed_log_probs(hybrid, inputs, sequences, images_per_prompt=2), rtol=1e-4, atol=1e-4)


def test_llava_next_beams_of_two_image_prompts_keep_each_prompts_images_in_order(tiny_next):
    model, processor = tiny_next
    hybrid = hybrid_copy(model, fastv_k=0.5)
    inputs = two_image_inputs(processor, resize=[(336, 200), (250, 500), (336, 336), (200, 336)])
    sequences, scores = beam_search(hybrid, inputs)
    torch.testing.assert_close(scores, recomputed_log_probs(hybrid, inputs, sequences, images_per_prompt=2), rtol=1e-4, atol=1e-4)
