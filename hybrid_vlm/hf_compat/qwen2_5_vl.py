"""transformers internals used for Qwen2.5-VL: module names, the M-RoPE rotary, the vision tower's
precomputed grid inputs.

The decoder layers are driven by `llava.llama_layer_forward` unchanged: Qwen2_5_VLDecoderLayer has
Llama's attribute names (q/k/v/o projections, with biases, norms, mlp) and applies RoPE with Llama's
formula to cos/sin [B, L, head_dim] in which Qwen2_5_VLRotaryEmbedding has already folded the
t/h/w sections. Read from 5.23, 5.24 and 5.25: 5.24 renames the cache, and no other change between
them touches what the engine uses (`tests/test_hf_compat.py` pins the sources it mirrors).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.utils.generic import is_flash_attention_requested
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

from ..runtime import host_to_device
from .llava import LlavaParts

__all__ = [
    "Qwen2_5_VLForConditionalGeneration", "AxesLastRotary", "host_grid", "qwen_image_features", "qwen_parts",
    "stock_decode_positions", "reset_stock_rope_deltas", "NoGenerationPositionIds",
]


class NoGenerationPositionIds:
    """A mixin before Qwen2_5_VLForConditionalGeneration: generate's private hook
    `_prepare_position_ids_for_generation` (same signature in 5.23-5.25) gives no ids. Stock's
    override runs `get_rope_index`, which reads the grid on the device (a host sync) and sets the
    module's `rope_deltas`; the engine's forward computes the (t, h, w) ids itself, from the host grid."""

    def _prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs):
        return None


class AxesLastRotary(nn.Module):
    """Qwen2_5_VLRotaryEmbedding for position ids with the (t, h, w) axes last, [B, L, 3], which the
    engine gathers along the sequence like 1-D ids; [B, L] ids (text) are the same on all three axes,
    as stock broadcasts them."""

    def __init__(self, rotary: nn.Module):
        super().__init__()
        self.rotary = rotary

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        if position_ids.dim() == 3:
            position_ids = position_ids.permute(2, 0, 1)  # stock's [3, B, L]
        return self.rotary(x, position_ids)


def qwen_parts(model: Qwen2_5_VLForConditionalGeneration) -> LlavaParts:
    language_model = model.model.language_model
    text_config = model.config.text_config
    return LlavaParts(
        embed_tokens=language_model.embed_tokens,
        layers=language_model.layers,
        norm=language_model.norm,
        rotary_emb=AxesLastRotary(language_model.rotary_emb),
        lm_head=model.lm_head,
        image_token_id=model.config.image_token_id,
        num_heads=text_config.num_attention_heads,
        num_kv_heads=text_config.num_key_value_heads,
        head_dim=language_model.layers[0].self_attn.head_dim,
    )


def host_grid(image_grid_thw) -> list[tuple[int, int, int]]:
    """(t, h, w) patches per image, read on the host. The processor returns `image_grid_thw` on the
    CPU: keep it there (a copy on an accelerator would cost a host sync here)."""
    grid = torch.as_tensor(image_grid_thw)
    if grid.dim() != 2 or grid.shape[1] != 3:
        raise ValueError(f"image_grid_thw must be [images, 3] (t, h, w patches per image), got shape {tuple(grid.shape)}")
    return [tuple(int(v) for v in row) for row in grid.cpu().tolist()]


def vision_inputs(model: Qwen2_5_VLForConditionalGeneration, grid: torch.Tensor, device: torch.device) -> dict:
    """Everything the stock vision tower derives from `grid_thw` [images, 3] (a CPU tensor), computed
    here on the host with transformers' own helpers and handed to it precomputed, so the tower reads
    no grid value from the device. The segment boundaries stay on the host for the SDPA and eager
    paths (they only size `torch.split` there); flash attention needs them on the device, with
    their maximum lengths as ints."""
    visual = model.model.visual
    vision_config = visual.config
    position_ids = get_vision_position_ids(grid, visual.spatial_merge_size)
    cu_seqlens = get_vision_cu_seqlens(grid)
    window_index, cu_window_seqlens = get_vision_window_index(
        grid, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size, patch_size=visual.patch_size
    )
    inputs = dict(position_ids=host_to_device(position_ids, device), window_index=host_to_device(window_index, device),
                  cu_seqlens=cu_seqlens, cu_window_seqlens=cu_window_seqlens)
    if is_flash_attention_requested(vision_config):
        inputs["max_seqlen"] = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        inputs["max_window_seqlen"] = int((cu_window_seqlens[1:] - cu_window_seqlens[:-1]).max())
        inputs["cu_seqlens"], inputs["cu_window_seqlens"] = (host_to_device(t, device) for t in (cu_seqlens, cu_window_seqlens))
    return inputs


def qwen_image_features(model: Qwen2_5_VLForConditionalGeneration, pixel_values: torch.Tensor, grid: list[tuple[int, int, int]]) -> torch.Tensor:
    """[sum of t*h*w/4, hidden]: the PatchMerger's output for every image, in placeholder order, as
    stock `get_image_features` computes it (the same tower call, its grid inputs precomputed)."""
    visual = model.model.visual
    grid_tensor = torch.tensor(grid, dtype=torch.long)
    inputs = vision_inputs(model, grid_tensor, pixel_values.device)
    return visual(pixel_values.type(visual.dtype), grid_thw=grid_tensor, **inputs).pooler_output


def reset_stock_rope_deltas(model, inputs: dict) -> None:
    """Before a stock model's prefill run by hand. A stock Qwen2.5-VL forward keeps the last image
    prompt's `rope_deltas` through a text-only prompt (only generate resets them, to zeros), and
    `stock_decode_positions` adds them: zeros for a prompt without images, as generate sets; None
    for one with images, which its forward then computes. Other models keep no such state."""
    if model.config.model_type != "qwen2_5_vl":
        return
    images = inputs.get("image_grid_thw") is not None
    model.model.rope_deltas = None if images else torch.zeros(inputs["input_ids"].shape[0], 1, dtype=torch.long, device=inputs["input_ids"].device)


def stock_decode_positions(model, attention_mask: torch.Tensor) -> dict:
    """Keywords a stock (unpatched) model needs for a decode step run by hand: for Qwen2.5-VL the new
    token's ids, as generate passes them (real tokens so far - 1 + the prompt's `rope_deltas`, on all
    three axes); without them its forward pairs the whole attention mask with the one new token.
    Other models need none."""
    if model.config.model_type != "qwen2_5_vl":
        return {}
    text_position = attention_mask.long().sum(dim=1, keepdim=True) - 1 + model.model.rope_deltas  # [B, 1]
    return {"position_ids": text_position[None].expand(3, -1, -1)}
