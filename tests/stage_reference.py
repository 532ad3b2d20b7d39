"""Independent references for the methods that prune inside the LLM (PyramidDrop, DART, FastV),
written from ../shared/notes/methods.md and the official code paths it cites, not from the engine.

`compacted_reference` runs one unpadded prompt (batch 1) through the stock decoder layers and,
at each stage, removes the dropped tokens from the sequence itself (a compacted-sequence forward,
not the masked one), with the original position ids or, renumbered, 0..n-1 per stage, as the
official PyramidDrop code does (`position_ids[i, :len] = arange(len)`). The scores come from the
stock eager attention weights (PyramidDrop: the stage layer's own self-attention run on its input
before the drop; FastV: the previous layer's) and, for DART, from keys rebuilt with
transformers' `apply_rotary_pos_emb` and NumPy cosines. Ranking is a NumPy stable argsort.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from reference import eager_copy


def pdrop_schedule_by_hand(budget: int, num_visual: int, stage_layers: tuple[int, ...], num_layers: int) -> dict[int, int]:
    """The nearest layer-average on a 0.001 grid of lambda, truncating int(V * lambda**s) as the
    official code does; the larger lambda on a tie."""
    best = None
    for step in range(1, 1000):
        ratio = step / 1000
        counts = [int(num_visual * ratio**s) for s in range(1, len(stage_layers) + 1)]
        bounds = [0, *stage_layers, num_layers]
        held = [num_visual, *counts]
        mean = sum((bounds[i + 1] - bounds[i]) * held[i] for i in range(len(held))) / num_layers
        key = (abs(mean - budget), -step)
        if best is None or key < best[0]:
            best = (key, counts)
    return dict(zip(stage_layers, best[1]))


def causal_additive(length: int, dtype) -> torch.Tensor:
    allowed = torch.ones(length, length, dtype=torch.bool).tril()
    return torch.zeros(1, 1, length, length, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def top_of(scores: np.ndarray, candidates: np.ndarray, count: int) -> np.ndarray:
    """The `count` candidates of highest score (lowest index first on a tie), as an array."""
    order = np.argsort(-scores[candidates], kind="stable")
    return candidates[order[:count]]


def dart_reference(key_norms: np.ndarray, normed: np.ndarray, image: np.ndarray, text: np.ndarray,
                   quotas: list[int], order: str) -> np.ndarray:
    """DART's kept image positions (sorted), `get_retained_image_token` for one unpadded prompt."""
    image_pivots = top_of(key_norms, image, 4)
    text_pivots = top_of(key_norms, text, 4)
    pivots = list(set(image_pivots.tolist() + text_pivots.tolist())) if order == "official" else sorted(image_pivots.tolist() + text_pivots.tolist())
    pool = [int(p) for p in image if p not in set(image_pivots.tolist())]
    kept = set(image_pivots.tolist())
    unit = normed / np.maximum(np.linalg.norm(normed, axis=-1, keepdims=True), 1e-8)
    for pivot, quota in zip(pivots, quotas):
        similarity = unit[pool] @ unit[pivot]
        picked = [pool[i] for i in np.argsort(similarity, kind="stable")[:quota]]
        kept.update(picked)
        pool = [p for p in pool if p not in set(picked)]
    return np.asarray(sorted(kept))


@torch.no_grad()
def compacted_reference(model, sample: dict, method: str, stages: dict[int, int], position_mode: str = "logical",
                        dart_quotas: list[int] | None = None, dart_order: str = "sorted"):
    """(logits of the last prompt token [vocab], kept prompt positions after the last stage).

    sample: one unpadded prompt (batch 1; LLaVA-1.5, LLaVA-NeXT with its `image_sizes`, or Qwen2.5-VL with its `image_grid_thw`). method: "pdrop" (score with the stage layer's own
    attention), "fastv" (the previous layer's) or "dart". stages: {layer: visual tokens kept from it on}."""
    reference = copy.deepcopy(model)  # its layers run as stock runs them (SDPA: float64 stays float64)
    language_model = reference.model.language_model
    eager_layers = eager_copy(model).model.language_model.layers  # eager attention only for the scores' weights
    input_ids = sample["input_ids"][0]
    is_visual = (input_ids == reference.config.image_token_id).numpy()
    hidden = language_model.embed_tokens(input_ids[None])
    if "image_grid_thw" in sample:  # Qwen2.5-VL: stock features per grid, stock 3-D ids [3, 1, L]
        from qwen_reference import stock_positions

        features = reference.model.get_image_features(sample["pixel_values"], sample["image_grid_thw"]).pooler_output
        positions = stock_positions(reference, sample)
    elif "image_sizes" in sample:  # LLaVA-NeXT: stock packing (base, unpadded grid, a newline per row)
        features = reference.model.get_image_features(pixel_values=sample["pixel_values"], image_sizes=sample["image_sizes"],
                                                      return_dict=True).pooler_output
        positions = torch.arange(len(input_ids))[None]
    else:
        features = reference.model.get_image_features(sample["pixel_values"], return_dict=True).pooler_output
        positions = torch.arange(len(input_ids))[None]
    hidden[0, torch.from_numpy(is_visual)] = torch.cat(list(features)).to(hidden.dtype)
    alive = np.arange(len(input_ids))  # prompt positions of the current sequence
    cos_sin = language_model.rotary_emb(hidden, positions)
    previous_input = None
    for layer_idx, layer in enumerate(language_model.layers):
        if layer_idx in stages:
            scores = stage_scores_reference(method, layer_idx, eager_layers, language_model, hidden, previous_input, cos_sin)
            image = np.flatnonzero(is_visual[alive])
            if method == "dart":
                text = np.arange(image[-1] + 1, len(alive))
                keep_image = dart_reference(scores["key_norms"], scores["normed"], image, text, dart_quotas, dart_order)
            else:
                keep_image = np.sort(top_of(scores, image, stages[layer_idx]))
            survivors = np.sort(np.concatenate([np.flatnonzero(~is_visual[alive]), keep_image]))
            hidden, alive = hidden[:, survivors], alive[survivors]
            positions = torch.arange(len(alive))[None] if position_mode == "renumbered" else positions[..., survivors]
            cos_sin = language_model.rotary_emb(hidden, positions)
        previous_input = hidden
        hidden = layer(hidden, attention_mask=causal_additive(hidden.shape[1], hidden.dtype), position_embeddings=cos_sin, position_ids=positions)
    return reference.lm_head(language_model.norm(hidden))[0, -1], alive


def eager_row(layer, hidden, cos_sin) -> np.ndarray:
    """The last token's head-averaged attention weights of a stock eager layer on its input."""
    normed = layer.input_layernorm(hidden)
    _, weights = layer.self_attn(hidden_states=normed, position_embeddings=cos_sin, attention_mask=causal_additive(hidden.shape[1], hidden.dtype))
    return weights[0, :, -1, :].mean(dim=0).double().numpy()


def stage_scores_reference(method, layer_idx, eager_layers, language_model, hidden, previous_input, cos_sin):
    """The stage's scores over the current sequence, from stock modules."""
    if method == "fastv":
        return eager_row(eager_layers[layer_idx - 1], previous_input, cos_sin)
    if method == "pdrop":
        return eager_row(eager_layers[layer_idx], hidden, cos_sin)
    attention = language_model.layers[layer_idx - 1].self_attn
    length = hidden.shape[1]
    x = language_model.layers[layer_idx - 1].input_layernorm(previous_input)
    keys = attention.k_proj(x).view(1, length, -1, attention.head_dim).transpose(1, 2)
    _, keys = apply_rotary_pos_emb(keys, keys, *cos_sin)
    key_norms = keys[0].double().abs().sum(dim=(0, 2)).numpy()  # L1 over heads and dims, per token
    return dict(key_norms=key_norms, normed=language_model.norm(hidden)[0].double().numpy())
