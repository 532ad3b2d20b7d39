"""transformers internals used by the LLaVA / Llama side: module names, RoPE, cache, outputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.functional import scaled_dot_product_attention
from transformers import DynamicCache, LlavaForConditionalGeneration
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast as StockLlavaOutput

from .versions import TRANSFORMERS_RELEASE

__all__ = [
    "CACHE_NAME",
    "Cache",
    "DynamicCache",
    "LlavaCausalLMOutputWithPast",
    "LlavaForConditionalGeneration",
    "LlavaParts",
    "PackedStates",
    "apply_rotary_pos_emb",
    "cache_argument",
    "cache_kwarg",
    "cache_tensor_bytes",
    "first_llm_module",
    "layer_attention_row",
    "layer_entry_modules",
    "llama_layer_forward",
    "llava_parts",
    "new_cache",
    "without_window_layers",
    "packed_decoder_states",
    "packed_head_attention",
    "output_cache",
    "repeat_kv",
    "rope_reads_positions_on_host",
    "stock_image_features",
]


@dataclass(frozen=True)
class LlavaParts:
    """The submodules of a llava-hf LlavaForConditionalGeneration that the hybrid forward drives."""

    embed_tokens: nn.Embedding
    layers: nn.ModuleList  # LlamaDecoderLayer: input_layernorm, self_attn, post_attention_layernorm, mlp
    norm: nn.Module
    rotary_emb: nn.Module  # (x, position_ids [B, L]) -> (cos, sin) each [B, L, head_dim]
    lm_head: nn.Linear
    image_token_id: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


def rope_reads_positions_on_host(model) -> bool:
    """transformers' dynamic RoPE (`dynamic_rope_update`) compares the largest position with its
    cached length in Python at every rotary call: a host read per call on a GPU (longrope's choice
    is a torch.where, no read)."""
    return "dynamic" in str(getattr(model.model.language_model.rotary_emb, "rope_type", "default"))


def llava_parts(model: LlavaForConditionalGeneration) -> LlavaParts:
    language_model = model.model.language_model
    text_config = model.config.text_config
    attention = language_model.layers[0].self_attn
    return LlavaParts(
        embed_tokens=language_model.embed_tokens,
        layers=language_model.layers,
        norm=language_model.norm,
        rotary_emb=language_model.rotary_emb,
        lm_head=model.lm_head,
        image_token_id=model.config.image_token_id,
        num_heads=text_config.num_attention_heads,
        num_kv_heads=text_config.num_key_value_heads,
        head_dim=attention.head_dim,
    )


def vision_tower(model: LlavaForConditionalGeneration) -> torch.nn.Module:
    """The CLIP tower before the projector (the testbed's trainer freezes it for its language phase)."""
    return model.model.vision_tower


def stock_image_features(model: LlavaForConditionalGeneration, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected image features exactly as stock LLaVA computes them: [num_images, tokens_per_image, hidden]."""
    outputs = model.model.get_image_features(
        pixel_values=pixel_values,
        vision_feature_layer=model.config.vision_feature_layer,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        return_dict=True,
    )
    return torch.stack(list(outputs.pooler_output))


# 5.24 renamed the cache everywhere from `past_key_values` to `cache`: generate() passes `cache=` to
# forward and reads `outputs.cache`, and output classes declare `cache` (the old name survives only as
# a deprecated alias). A forward that takes only `past_key_values` silently gets no cache from 5.24's
# generate() and starts a fresh one at every step.
CACHE_NAME = "cache" if TRANSFORMERS_RELEASE >= (5, 24) else "past_key_values"


if TRANSFORMERS_RELEASE >= (5, 24):

    class LlavaCausalLMOutputWithPast(StockLlavaOutput):
        """LLaVA's output as the engine returns it: 5.24 turned `image_hidden_states` from a field
        into a deprecated property reading `image_outputs.pooler_output`, which the engine does not
        fill, so reading it raised AttributeError; it is None, as 5.23's field is here."""

        @property
        def image_hidden_states(self):
            return None

else:
    LlavaCausalLMOutputWithPast = StockLlavaOutput


def cache_argument(past_key_values: Cache | None, cache: Cache | None) -> Cache | None:
    """The cache a forward was given under either name (generate() uses CACHE_NAME; callers may use
    either). Only a dynamic cache is accepted (`check_dynamic_cache`)."""
    if past_key_values is not None and cache is not None and past_key_values is not cache:
        raise ValueError("two different caches given: pass one, as cache= or as past_key_values=")
    cache = cache if cache is not None else past_key_values
    check_dynamic_cache(cache)
    return cache


DYNAMIC_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer)  # what DynamicCache(config=...) builds


def check_dynamic_cache(cache: Cache | None) -> None:
    """After pruning, a layer group caches fewer keys than the layers before it, so every layer must
    grow on its own: a DynamicCache's layers (generate's default; offloading is fine). Preallocated
    layers (`cache_implementation="static"` and its variants, whose generate also builds a 4-D mask)
    and quantized ones are refused by name, with what is accepted."""
    if not isinstance(cache, Cache):
        return
    other = sorted({type(layer).__name__ for layer in getattr(cache, "layers", []) if type(layer) not in DYNAMIC_LAYERS})
    if other:
        raise ValueError(
            f"hybrid_vlm needs a dynamic KV cache (DynamicCache, generate's default); got {type(cache).__name__} with "
            f"{', '.join(other)} layers. Pruned layers cache fewer keys than earlier ones, which preallocated or quantized "
            "layers do not support: drop cache_implementation (e.g. 'static') from generate, or pass a DynamicCache."
        )


def cache_kwarg(cache: Cache | None) -> dict[str, Cache | None]:
    """The cache as the keyword this release's stock forwards take and its output classes declare."""
    return {CACHE_NAME: cache}


def output_cache(output) -> Cache | None:
    """The cache of a forward's output or of generate(..., return_dict_in_generate=True)."""
    return getattr(output, CACHE_NAME, None)


def new_cache(model: LlavaForConditionalGeneration) -> DynamicCache:
    return DynamicCache(config=model.config)


def without_window_layers(cache: Cache) -> Cache:
    """An empty cache with its sliding-window layers (Mistral's, in generate's default cache) made
    plain dynamic ones. A window layer keeps only the last window - 1 slots, but the engine's caches
    hold filler and pruned slots beside the real tokens: a sequence that fits the window can need
    more slots than that. Keeping every slot changes nothing within the window, and the engine
    refuses sequences longer than it (`check_sliding_window`)."""
    if any(isinstance(layer, DynamicSlidingWindowLayer) for layer in cache.layers):
        cache.layers = [DynamicLayer() if isinstance(layer, DynamicSlidingWindowLayer) else layer for layer in cache.layers]
    return cache


def llama_layer_forward(
    layer: nn.Module,  # LlamaDecoderLayer
    hidden_states: torch.Tensor,  # [B, Q, hidden]
    cos_sin: tuple[torch.Tensor, torch.Tensor],  # each [B, Q, head_dim]
    attention_mask: torch.Tensor | None,  # [B, 1, Q, K] bool, True = may attend (K = cached + Q); None: see below
    cache: Cache | None,
    layer_idx: int,
    score_query_index: torch.Tensor | None = None,  # [B]: also return this query's attention row
    eager_scoring: bool = False,
    keys_out: list | None = None,  # when given, this chunk's rotated keys [B, Hkv, Q, D] are appended
    score_rows: tuple[torch.Tensor, torch.Tensor] | None = None,  # ([B, R] query rows, [B, R] weights)
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One LlamaDecoderLayer, as transformers runs it, with SDPA under an explicit boolean mask, or
    with none where the caller knows every key is a real token and the queries are either the whole
    sequence (a prefill from an empty cache: `is_causal=True`, what stock passes without padding)
    or one new token (a decode step: no mask at all). Those are the calls that keep SDPA's fastest
    kernels available; flash attention refuses an explicit mask. A grouped-query model's keys and
    values go to SDPA as cached, not repeated to every query head, on that mask-free path and in a
    masked one-token step (`grouped_query_sdpa`); only a masked prefill and the scoring layers repeat them.

    When `score_query_index` is given the layer also returns the head-averaged attention row
    [B, K] of that query (FastV's score), computed from the same rotated queries and keys; with
    `eager_scoring` the full attention matrix is materialised instead (an ablation). With
    `score_rows` it returns instead the weighted mean of those rows' head-averaged attention
    (SparseVLM's raters), computed the same way.
    """
    from ..fastv import last_query_attention
    from ..methods.sparsevlm import rater_attention

    attention = layer.self_attn
    length = hidden_states.shape[1]
    query_states, key_states, value_states = _rotated_qkv(attention, layer.input_layernorm(hidden_states), cos_sin)
    if keys_out is not None:
        keys_out.append(key_states)
    if cache is not None:
        key_states, value_states = cache.update(key_states, value_states, layer_idx)  # [B, Hkv, K, D]
    groups = attention.num_key_value_groups
    if groups > 1 and score_query_index is None and score_rows is None and (attention_mask is None or length == 1):
        attn_output = grouped_query_sdpa(query_states, key_states, value_states, attention_mask, attention.scaling)
        return _attention_output_and_mlp(layer, hidden_states, attn_output), None
    key_states = repeat_kv(key_states, groups)  # [B, H, K, D]
    value_states = repeat_kv(value_states, groups)

    scores = None
    if score_query_index is not None and eager_scoring:
        attn_output, scores = _eager_attention_and_row(query_states, key_states, value_states, attention_mask, score_query_index, attention.scaling)
    else:
        attn_output = scaled_dot_product_attention(
            query_states, key_states, value_states, attn_mask=attention_mask, scale=attention.scaling,
            is_causal=attention_mask is None and length > 1,
        )
        if score_query_index is not None:
            scores = last_query_attention(
                query_states, key_states, attention_mask, score_query_index, attention.scaling
            )
        elif score_rows is not None:
            scores = rater_attention(query_states, key_states, attention_mask, *score_rows, attention.scaling)
    return _attention_output_and_mlp(layer, hidden_states, attn_output), scores


def _rotated_qkv(attention: nn.Module, normed: torch.Tensor, cos_sin) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(queries [B, H, Q, D], keys [B, Hkv, Q, D], values [B, Hkv, Q, D]) of a LlamaAttention, with
    the rotary embedding applied to queries and keys, as stock computes them."""
    head_shape = (*normed.shape[:2], -1, attention.head_dim)
    query_states = attention.q_proj(normed).view(head_shape).transpose(1, 2)
    key_states = attention.k_proj(normed).view(head_shape).transpose(1, 2)
    value_states = attention.v_proj(normed).view(head_shape).transpose(1, 2)
    return (*apply_rotary_pos_emb(query_states, key_states, *cos_sin), value_states)


def _eager_attention_and_row(query, key, value, attention_mask, query_index, scaling) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention output [B, H, Q, D], the head-averaged attention row [B, K] of query `query_index`
    [B]) from the full attention matrix, materialised: the eager-scoring ablation. A missing mask
    is the causal one over all-real keys."""
    batch, length, keys = query.shape[0], query.shape[2], key.shape[2]
    if attention_mask is None:
        attention_mask = torch.ones(length, keys, dtype=torch.bool, device=query.device).tril(keys - length)[None, None]
    logits = torch.matmul(query, key.transpose(-1, -2)) * scaling
    probs = logits.masked_fill(~attention_mask, float("-inf")).softmax(dim=-1, dtype=torch.float32)  # [B, H, Q, K]
    index = query_index.view(batch, 1, 1, 1).expand(batch, probs.shape[1], 1, keys)
    return torch.matmul(probs.to(value.dtype), value), probs.gather(2, index).mean(dim=1)[:, 0]


def grouped_query_sdpa(
    query: torch.Tensor,  # [B, H, Q, D]
    key: torch.Tensor,  # [B, Hkv, K, D] as cached
    value: torch.Tensor,  # [B, Hkv, K, D]
    attention_mask: torch.Tensor | None,  # None (every key real), or [B, 1, 1, K] for a one-token step
    scale: float,
) -> torch.Tensor:
    """[B, H, Q, D]: grouped-query attention without repeating the cached keys and values to every
    query head, which would copy the whole cache in every layer at every step. Without a mask SDPA
    groups the heads itself (`enable_gqa`, as stock passes it then); a one-token step under a mask
    folds each KV head's g query heads into g query rows that share its keys and the step's one
    mask row (stock's `pack_gqa`). The caller guarantees the two cases: no mask only for a prefill
    from an empty cache (Q == K) or a one-token step, a mask only with Q == 1."""
    batch, heads, length, dim = query.shape
    if attention_mask is None:
        return scaled_dot_product_attention(query, key, value, scale=scale, is_causal=length > 1, enable_gqa=True)
    kv_heads = key.shape[1]
    packed = query.reshape(batch, kv_heads, heads // kv_heads, dim)  # query heads of one KV head are adjacent
    output = scaled_dot_product_attention(packed, key, value, attn_mask=attention_mask, scale=scale)
    return output.reshape(batch, heads, 1, dim)


def _attention_output_and_mlp(layer: nn.Module, residual: torch.Tensor, attn_output: torch.Tensor) -> torch.Tensor:
    """The rest of a LlamaDecoderLayer after SDPA: heads [B, H, Q, D] joined, o_proj, the residuals and
    the MLP; the layer's output [B, Q, hidden]."""
    batch, _, length, _ = attn_output.shape
    hidden_states = residual + layer.self_attn.o_proj(attn_output.transpose(1, 2).reshape(batch, length, -1))
    return hidden_states + layer.mlp(layer.post_attention_layernorm(hidden_states))


def layer_attention_row(
    layer: nn.Module,  # LlamaDecoderLayer whose own attention scores, before it runs
    hidden_states: torch.Tensor,  # [B, L, hidden] its input
    cos_sin: tuple[torch.Tensor, torch.Tensor],  # each [B, L, head_dim], the input's positions
    attention_mask: torch.Tensor | None,  # [B, 1, L, L] bool, or None: causal, every key real
    query_index: torch.Tensor,  # [B] long
) -> torch.Tensor:
    """[B, L] float32: head-averaged attention of one query per sample, from this layer's own
    input norm, q and k projections and RoPE (PyramidDrop's score), without running the layer.
    Only the query row is projected by q_proj; every token by k_proj."""
    from ..fastv import last_query_attention

    attention = layer.self_attn
    batch, length, _ = hidden_states.shape
    normed = layer.input_layernorm(hidden_states)
    query_normed = normed.gather(1, query_index.view(batch, 1, 1).expand(batch, 1, normed.shape[-1]))
    query_cos_sin = tuple(t.gather(1, query_index.view(batch, 1, 1).expand(batch, 1, t.shape[-1])) for t in cos_sin)
    query_states, key_states = _rotated_query_and_keys(attention, query_normed, query_cos_sin, normed, cos_sin)
    if attention_mask is None:
        key_at = torch.arange(length, device=hidden_states.device)
        attention_mask = (key_at[None, :] <= query_index[:, None]).view(batch, 1, 1, length)
    else:
        attention_mask = attention_mask.gather(2, query_index.view(batch, 1, 1, 1).expand(batch, 1, 1, length))
    zero = torch.zeros(batch, dtype=torch.long, device=hidden_states.device)
    return last_query_attention(query_states, key_states, attention_mask, zero, attention.scaling)


def _rotated_query_and_keys(
    attention: nn.Module,  # LlamaAttention
    query_normed: torch.Tensor,  # [N, 1, hidden] the queries' normed inputs
    query_cos_sin: tuple[torch.Tensor, torch.Tensor],  # each [N, 1, head_dim]
    normed: torch.Tensor,  # [B, L, hidden] every token's normed input
    cos_sin: tuple[torch.Tensor, torch.Tensor],  # each [B, L, head_dim]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(queries [N, H, 1, D], keys [B, H, L, D] repeated to every query head), both after RoPE, as the
    layer's own attention computes them: q_proj on the query rows only, k_proj on every token."""
    batch, length, _ = normed.shape
    query_states = attention.q_proj(query_normed).view(query_normed.shape[0], 1, -1, attention.head_dim).transpose(1, 2)
    key_states = attention.k_proj(normed).view(batch, length, -1, attention.head_dim).transpose(1, 2)
    query_states, _ = apply_rotary_pos_emb(query_states, query_states, *query_cos_sin)
    _, key_states = apply_rotary_pos_emb(key_states, key_states, *cos_sin)
    return query_states, repeat_kv(key_states, attention.num_key_value_groups)


def first_llm_module(model: LlavaForConditionalGeneration) -> nn.Module:
    """The first module the LLM runs on the prompt, in the stock forward and in the hybrid loop alike
    (which calls the layers' submodules, not the layers): a pre-hook here marks where vision ends."""
    return layer_entry_modules(model)[0]


def layer_entry_modules(model: LlavaForConditionalGeneration) -> list[nn.Module]:
    """The first module each LLM layer runs (its input norm), in the stock forward and in the hybrid
    loop alike: a pre-hook on entry i fires when layer i starts, whichever forward runs it."""
    return [layer.input_layernorm for layer in llava_parts(model).layers]


def cache_tensor_bytes(cache: Cache) -> int:
    """Bytes the cache's key and value tensors hold now (every layer, the whole batch). DynamicCache
    grows by concatenation, so this is what a pruned group really keeps, not a reserved size."""
    return sum(
        tensor.numel() * tensor.element_size()
        for layer in cache.layers
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None))
        if tensor is not None
    )


def packed_decoder_states(
    model: LlavaForConditionalGeneration,
    inputs_embeds: torch.Tensor,  # [B, T, D]
    attention_mask: torch.Tensor,  # [B, 1, T, T] bool, True = may attend
    position_ids: torch.Tensor,  # [B, T]
) -> torch.Tensor:
    """The LLM's final hidden states [B, T, D] under a custom 4-D mask (testbed training packs several
    questions after one image). masking_utils in 5.23, 5.24 and 5.25 passes a 4-D mask through as-is."""
    implementation = model.config.text_config._attn_implementation
    if implementation != "sdpa":  # eager and flex add a 4-D mask to the scores: a bool one would mask nothing
        raise ValueError(f"packed_decoder_states needs the LLM loaded with attn_implementation='sdpa', which reads the bool "
                         f"mask as a mask; this one uses {implementation!r}")
    return model.model.language_model(
        inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state


class PackedStates(NamedTuple):
    final: torch.Tensor  # [B, T, D] the LLM's final (normed) hidden states
    attentions: list[torch.Tensor]  # per watch, float32 [N, T]
    layer_inputs: dict[int, torch.Tensor]  # layer index -> that layer's input [B, T, D]


def packed_head_attention(
    model: LlavaForConditionalGeneration,
    inputs_embeds: torch.Tensor,  # [B, T, D]
    attention_mask: torch.Tensor,  # [B, 1, T, T] bool, True = may attend
    position_ids: torch.Tensor,  # [B, T]
    watches: list[tuple[int, int, torch.Tensor, torch.Tensor]],  # (layer, head, rows [N] long, columns [N] long)
    read_inputs: tuple[int, ...] = (),  # layers whose input to return as well
) -> PackedStates:
    """The LLM's final hidden states under a custom 4-D mask; for each watch, float32 [N, T]: the
    softmax attention of that head of that layer from each query (rows[n], columns[n]) over its row;
    and the inputs of the `read_inputs` layers.

    Each watched or read layer's input is caught by a forward pre-hook during the one forward; a
    head's scores are recomputed from it as the layer computes them (input norm, q/k projections,
    RoPE at the given positions, scaling, the mask), with gradients, for the testbed's auxiliary losses."""
    layers = model.model.language_model.layers
    caught: dict[int, torch.Tensor] = {}

    def catcher(index: int):
        def catch(_module, args, kwargs):
            caught[index] = args[0] if args else kwargs["hidden_states"]
        return catch

    wanted = {w[0] for w in watches} | set(read_inputs)
    handles = [layers[index].register_forward_pre_hook(catcher(index), with_kwargs=True) for index in wanted]
    try:
        final = packed_decoder_states(model, inputs_embeds, attention_mask, position_ids)
    finally:
        for handle in handles:
            handle.remove()
    cos_sin = model.model.language_model.rotary_emb(inputs_embeds, position_ids)  # each [B, T, head_dim]
    attentions = [_head_attention(layers[layer], caught[layer], cos_sin, attention_mask, head, rows, columns) for layer, head, rows, columns in watches]
    return PackedStates(final, attentions, {index: caught[index] for index in read_inputs})


def _head_attention(layer: nn.Module, hidden: torch.Tensor, cos_sin, attention_mask: torch.Tensor, head: int, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """[N, T] float32: one head's attention from the queries (rows, columns), from the layer's input [B, T, D]."""
    attention = layer.self_attn
    normed = layer.input_layernorm(hidden)
    query_cos_sin = tuple(t[rows, columns][:, None] for t in cos_sin)
    queries, keys = _rotated_query_and_keys(attention, normed[rows, columns][:, None], query_cos_sin, normed, cos_sin)  # [N, H, 1, D], [B, H, T, D]
    scores = (queries[:, head] @ keys[rows, head].transpose(1, 2))[:, 0].float() * attention.scaling  # [N, T]
    visible = attention_mask[rows, 0, columns]  # [N, T]
    return scores.masked_fill(~visible, float("-inf")).softmax(-1)
