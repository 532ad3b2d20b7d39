"""Independent references for Qwen2.5-VL: stock transformers' own pieces, nothing from the engine.

`qwen_masked_reference` runs the stock eager decoder layers over every prompt token with the stock
3-D ids (`get_rope_index`) and stock image features (`get_image_features`). Nothing is removed:
padding and, from `fastv_layer` on, the visual tokens FastV drops are masked as keys. The kept
set is chosen with NumPy from the stock eager attention weights of layer fastv_layer - 1 (last
prompt token, head-averaged), or from `slot_scores` [B, L] (random selection), its size by the
official rule. `image_features`: per-sample ([V_b, hidden] features, [V_b] valid) that a method
before the LLM chose, computed by the caller; the placeholders without a token are masked.
"""

from __future__ import annotations

import numpy as np
import torch

from reference import eager_copy, masked_fastv_layers


def stock_positions(model, inputs) -> torch.Tensor:
    """[3, B, L] stock M-RoPE ids (padding at 0), from stock `get_rope_index`."""
    positions, _ = model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"], attention_mask=inputs["attention_mask"]
    )
    return positions


@torch.no_grad()
def qwen_masked_reference(model, inputs, fastv_k, fastv_layer: int, image_features=None, slot_scores: np.ndarray | None = None):
    """(logits [B, L, V], kept [B, L] bool: real tokens the last layer attends to)."""
    reference = eager_copy(model)
    language_model = reference.model.language_model
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    is_visual = (input_ids == reference.config.image_token_id).numpy()

    embeds = language_model.embed_tokens(input_ids)
    real = attention_mask.bool().clone()
    if image_features is None:
        features = torch.cat(reference.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output)
        embeds = embeds.masked_scatter(torch.from_numpy(is_visual)[..., None].expand_as(embeds), features)
    else:
        for b, (features, valid) in enumerate(zip(*image_features)):
            slots = np.flatnonzero(is_visual[b])
            embeds[b, slots] = features.to(embeds.dtype)
            real[b, slots] &= valid
    positions = stock_positions(reference, inputs)
    cos_sin = language_model.rotary_emb(embeds, positions)
    hidden, kept = masked_fastv_layers(language_model, embeds, cos_sin, real, is_visual, fastv_k, fastv_layer, slot_scores)
    return reference.lm_head(language_model.norm(hidden)), kept
