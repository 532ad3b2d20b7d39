"""generate's input expansion for beams and `num_return_sequences`, for the patched classes.

`GenerationMixin._expand_inputs_for_generation` repeats every tensor along dim 0, which is right
for a per-prompt tensor and wrong for per-image ones once a prompt has several images, or when
an image spans several rows (Qwen2.5-VL's patches, one [patches, dim] block for the batch). Stock
models never meet this: their forwards take `mm_encoder_outputs`, so generate encodes the images
first and repeats features per placeholder. The engine's forwards take pixels, so the patched
classes repeat a prompt's images whole, in order, as its prompt row is repeated. Read from 5.23
and 5.24, which agree.
"""

from __future__ import annotations

import torch
from transformers.generation.utils import GenerationMixin

IMAGE_INPUTS = ("pixel_values", "image_sizes", "image_grid_thw")  # per image (pixel_values: `pixel_rows` rows each)


def expand_inputs_for_generation(model, expand_size: int = 1, is_encoder_decoder: bool = False, input_ids=None, **model_kwargs):
    """The hook's contract: (input_ids, model_kwargs) repeated `expand_size` times per prompt.
    `model.image_layout(input_ids, images)` gives (images per prompt, pixel_values rows per image)."""
    images = {key: model_kwargs.pop(key) for key in IMAGE_INPUTS if model_kwargs.get(key) is not None}
    expanded_ids, model_kwargs = GenerationMixin._expand_inputs_for_generation(
        model, expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs)
    if images and expand_size > 1:
        images = repeat_images_per_prompt(images, *model.image_layout(input_ids, images), expand_size)
    return expanded_ids, {**model_kwargs, **images}


def repeat_images_per_prompt(images: dict, counts: list[int], pixel_rows: list[int], times: int) -> dict:
    """Each per-image input with each prompt's images (`counts[b]` of them, in order) repeated
    `times` times before the next prompt's; image i spans `pixel_rows[i]` rows of pixel_values and
    one row of every other input."""
    if sum(counts) != len(pixel_rows):
        raise ValueError(f"the prompts hold {sum(counts)} images but the image inputs have {len(pixel_rows)}")
    ends = torch.tensor(counts).cumsum(dim=0).tolist()
    order = [image for count, end in zip(counts, ends) for _ in range(times) for image in range(end - count, end)]
    repeated = {key: torch.as_tensor(value)[order] for key, value in images.items() if key != "pixel_values"}
    blocks = images["pixel_values"].split(pixel_rows)
    return {**repeated, "pixel_values": torch.cat([blocks[image] for image in order])}
