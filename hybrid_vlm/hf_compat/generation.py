"""generate's input handling where the engine's inputs differ from stock's: the expansion for beams
and `num_return_sequences`, and the slicing of a call over a filled cache.

`GenerationMixin._expand_inputs_for_generation` repeats every tensor along dim 0, which is right
for a per-prompt tensor and wrong for per-image ones once a prompt has several images, or when
an image spans several rows (Qwen2.5-VL's patches, one [patches, dim] block for the batch). Stock
models never meet this: their forwards take `mm_encoder_outputs`, so generate encodes the images
first and repeats features per placeholder. The engine's forwards take pixels, so the patched
classes repeat a prompt's images whole, in order, as its prompt row is repeated.

A call over a filled cache (a second turn passing the whole conversation) is sliced by generate to
its last `input length - cache.get_seq_length()` tokens, the cache's length being layer 0's slots.
The engine's layer 0 may hold more slots than the caller's tokens (fillers) or fewer (compacted
DyMU slots); the state's `written_offset` turns one count into the other. Read from 5.23, 5.24 and
5.25, which agree on both.
"""

from __future__ import annotations

import functools

import torch
from transformers.generation.utils import GenerationMixin

from .llava import CACHE_NAME

IMAGE_LAYOUTS = ("image_sizes", "image_grid_thw")  # LLaVA-NeXT's and Qwen2.5-VL's per-image layouts
IMAGE_INPUTS = ("pixel_values", *IMAGE_LAYOUTS)  # per image (pixel_values: `pixel_rows` rows each)


class GenerationHooks:
    """The private GenerationMixin hooks a patched class overrides (same signatures in 5.23-5.25), as a
    mixin placed before the stock class, whose own hooks `super()` then reaches:
    - `_expand_inputs_for_generation` repeats a prompt's images whole, in order;
    - each subclass's `prepare_inputs_for_generation` is its stock class's, sliced by the caller's
      tokens over a filled cache (`sliced_by_written_tokens`)."""

    def _expand_inputs_for_generation(self, expand_size: int = 1, is_encoder_decoder: bool = False, input_ids=None, **model_kwargs):
        """The hook's contract: (input_ids, model_kwargs) repeated `expand_size` times per prompt.
        `self.image_layout(input_ids, images)` gives (images per prompt, pixel_values rows per image)."""
        images = {key: model_kwargs.pop(key) for key in IMAGE_INPUTS if model_kwargs.get(key) is not None}
        expanded_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs)
        if images and expand_size > 1:
            images = repeat_images_per_prompt(images, *self.image_layout(input_ids, images), expand_size)
        return expanded_ids, {**model_kwargs, **images}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        after = cls.__mro__[cls.__mro__.index(GenerationHooks) + 1 :]
        stock = next((base for base in after if issubclass(base, GenerationMixin)), None)
        if stock is not None:  # a mixin deriving from this one has no stock class yet
            cls.prepare_inputs_for_generation = sliced_by_written_tokens(stock.prepare_inputs_for_generation)


def repeat_images_per_prompt(images: dict, per_prompt: int, pixel_rows: list[int], times: int) -> dict:
    """Each per-image input with each prompt's images (`per_prompt` of them, in order) repeated
    `times` times before the next prompt's; image i spans `pixel_rows[i]` rows of pixel_values and
    one row of every other input."""
    starts = range(0, len(pixel_rows), per_prompt)
    order = [start + i for start in starts for _ in range(times) for i in range(per_prompt)]
    repeated = {key: torch.as_tensor(value)[order] for key, value in images.items() if key != "pixel_values"}
    blocks = images["pixel_values"].split(pixel_rows)
    return {**repeated, "pixel_values": torch.cat([blocks[image] for image in order])}


def continuation_length(input_ids: torch.Tensor, next_sequence_length: int | None, cache, options: dict) -> int | None:
    """The tokens a generate call over a filled `cache` must feed its first forward: those after
    the caller's tokens the cache holds (layer 0's slots + the state's `written_offset`). Only that
    first forward (`is_first_iteration`) is counted in slots, and only when the caller passed the
    whole conversation (generate then gives a count; passing just the new tokens gives None). The
    decode steps' 1 is left alone; over an unchanged layout (offset 0) the count is generate's own."""
    state = getattr(cache, "hybrid_state", None)
    if next_sequence_length is None or state is None or not options.get("is_first_iteration"):
        return next_sequence_length
    embeds = options.get("inputs_embeds")
    given = (embeds if embeds is not None else input_ids).shape[1]
    return given - state.written_tokens(cache.get_seq_length())


def sliced_by_written_tokens(stock_prepare):
    """A stock class's `prepare_inputs_for_generation`, given `continuation_length`'s count. It keeps
    the stock signature (`functools.wraps`), which generate reads to validate its keyword arguments."""

    @functools.wraps(stock_prepare)
    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, **kwargs):
        next_sequence_length = continuation_length(input_ids, next_sequence_length, kwargs.get(CACHE_NAME), kwargs)
        return stock_prepare(self, input_ids, next_sequence_length=next_sequence_length, **kwargs)

    return prepare_inputs_for_generation


ASSISTED_OPTIONS = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")


def check_generate_options(model, args: tuple, kwargs: dict) -> None:
    """Refuses assisted generation (a draft model, prompt lookup, early exit) by name: it crops the
    cache to one length after rejected candidates, which pruned layer groups do not share. The
    generation config may come by keyword or second positionally, as stock `generate` takes it."""
    positional = args[1] if len(args) > 1 else None
    config = kwargs.get("generation_config") or positional or model.generation_config
    # a keyword overrides the generation config, as in stock generate: None there turns the option off
    given = [name for name in ASSISTED_OPTIONS if (kwargs[name] if name in kwargs else getattr(config, name, None)) is not None]
    if given:
        raise NotImplementedError(
            f"hybrid_vlm does not support assisted generation ({', '.join(given)}): it crops the KV cache to one length, "
            "which pruned layers do not share. Generate without it (greedy, sampling and beam search are supported)."
        )
    check_chunked_continuation(kwargs, config)


def check_chunked_continuation(kwargs: dict, config) -> None:
    """generate's chunked prefill slices a second turn by layer 0's slots, not through
    `prepare_inputs_for_generation`: over a cache whose slots are not the caller's tokens (filler
    slots, DyMU's or a method's compaction: `written_offset`), it would re-feed or skip that many
    tokens. A padded batch's mask length catches it (`model.check_chunk_mask`); an unpadded prompt's
    mask, which generate drops, does not, so the offset (a host int) is checked here."""
    chunk = kwargs.get("prefill_chunk_size", getattr(config, "prefill_chunk_size", None))
    cache = next((kwargs[name] for name in ("cache", "past_key_values") if kwargs.get(name) is not None), None)
    state = getattr(cache, "hybrid_state", None)
    if chunk is not None and state is not None and state.written_offset != 0:
        raise ValueError(
            f"prefill_chunk_size={chunk} over this cache would misplace the new tokens: the caller's tokens it holds and its "
            f"layer-0 slots differ by {state.written_offset} (filler or compacted slots), and generate's chunked prefill "
            "counts slots. Generate the turn without prefill_chunk_size."
        )
