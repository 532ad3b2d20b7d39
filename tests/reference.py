"""Independent references the engine is tested against, built from stock transformers modules."""

from __future__ import annotations

import copy

import numpy as np
import torch

from hybrid_vlm.config import visual_keep_count

from conftest import generation_positions


def eager_copy(model):
    reference = copy.deepcopy(model)
    for config in (reference.config, reference.config.text_config, reference.config.vision_config):
        config._attn_implementation = "eager"
    return reference


@torch.no_grad()
def masked_reference(model, inputs, fastv_k, fastv_layer: int, thresholds: torch.Tensor | None = None):
    """Stock eager decoder layers over every prompt token, at the original position ids.

    Nothing is ever removed: padding, DyMU's merged-away placeholder slots (when `thresholds` is
    given; merged tokens sit at their representative placeholders) and, from `fastv_layer` on, the
    visual tokens FastV drops are masked as keys. The kept set is chosen here, with NumPy, from the
    stock eager attention weights of layer fastv_layer - 1 (last prompt token, head-averaged).
    Returns (logits [B, L, V], kept [B, L] bool: real tokens that the last layer attends to).
    """
    reference = eager_copy(model)
    language_model = reference.model.language_model
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    batch, length = input_ids.shape
    is_visual = (input_ids == reference.config.image_token_id).numpy()

    embeds = language_model.embed_tokens(input_ids)
    real = attention_mask.bool().clone()
    if thresholds is None:
        features = reference.model.get_image_features(inputs["pixel_values"], return_dict=True).pooler_output
        slot_valid = torch.ones(batch, is_visual.sum(axis=1).max(), dtype=torch.bool)
    else:
        from hybrid_vlm.hf_compat import dymu_image_features

        merged = dymu_image_features(reference, inputs["pixel_values"], thresholds)
        features, slot_valid = merged.features, merged.valid
    for b in range(batch):
        slots = np.flatnonzero(is_visual[b])
        embeds[b, slots] = features[b]
        real[b, slots] &= slot_valid[b]
    positions = generation_positions(attention_mask)
    cos_sin = language_model.rotary_emb(embeds, positions)
    allowed = torch.ones(length, length, dtype=torch.bool).tril()[None] & real[:, None, :]

    kept = real.clone()
    captured = {}
    hook = language_model.layers[fastv_layer - 1].self_attn.register_forward_hook(
        lambda module, args, output: captured.update(weights=output[1])
    )
    hidden = embeds
    for layer_idx, layer in enumerate(language_model.layers):
        if fastv_k is not None and layer_idx == fastv_layer:
            row = captured["weights"][:, :, -1, :].mean(dim=1).numpy()  # [B, L]
            for b in range(batch):
                visual_real = np.flatnonzero(is_visual[b] & real[b].numpy())
                keep = visual_keep_count(len(visual_real), fastv_k)
                order = np.argsort(-row[b, visual_real], kind="stable")
                kept[b, visual_real[order[keep:]]] = False
        pruned = fastv_k is not None and layer_idx >= fastv_layer
        layer_allowed = allowed & kept[:, None, :] if pruned else allowed
        additive = torch.zeros(batch, 1, length, length).masked_fill(~layer_allowed[:, None], torch.finfo(torch.float32).min)
        hidden = layer(hidden, attention_mask=additive, position_embeddings=cos_sin, position_ids=positions)
    hook.remove()
    return reference.lm_head(language_model.norm(hidden)), kept


@torch.no_grad()
def greedy_without_cache(model, inputs, steps: int) -> torch.Tensor:
    """Recompute the whole pruned model at every step, scoring with the last prompt token.

    End-of-sequence is suppressed, as generate(min_new_tokens=steps) does on the cached side.
    """
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    last_prompt_token = input_ids.shape[1] - 1
    for _ in range(steps):
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values=inputs["pixel_values"],
            use_cache=False, fastv_query_index=last_prompt_token,
        ).logits[:, -1]
        logits[:, model.generation_config.eos_token_id] = float("-inf")
        next_token = logits.argmax(dim=-1, keepdim=True)
        input_ids = torch.cat([input_ids, next_token], dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(next_token)], dim=1)
    return input_ids
