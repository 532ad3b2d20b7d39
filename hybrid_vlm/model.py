"""apply_hybrid(model, config): turn a loaded llava-hf LLaVA-1.5 into the FastV one, in place.

The forward below is one straight decoder loop over the stock modules:

    embed -> scatter image features -> layers [0, fastv_layer) on every token
          -> (layer fastv_layer - 1 also returns the last prompt token's attention row)
          -> keep all text + top-k visual tokens, gathered with their original position ids
          -> layers [fastv_layer, N) on the kept tokens only -> norm -> lm_head

With DyMU on, the CLIP tower merges patches first; each merged token takes the placeholder of its
representative patch (and so that patch's position id) and the other placeholders are dropped
before layer 0.

Dropped tokens never reach the KV cache of layers >= fastv_layer, so the cache holds two groups of
different lengths. Their key-validity masks (padding, kept tokens) travel on the cache object as
`PruneState`, which is what makes decoding after pruning, left padding and batching exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .baselines import pool_grid, pooled_token_count, random_slot_scores
from .config import HybridConfig, visual_keep_count
from .fastv import gather_tokens, select_kept_positions, true_positions, visual_keep_counts
from .hf_compat import (
    Cache,
    LlavaCausalLMOutputWithPast,
    LlavaForConditionalGeneration,
    cache_argument,
    cache_kwarg,
    dymu_image_features,
    llama_layer_forward,
    llava_parts,
    new_cache,
    stock_image_features,
)


@dataclass
class PruneState:
    """What a cache must remember between forward calls about the tokens it holds."""

    full_key_valid: torch.Tensor  # [B, K_full] bool: cached keys of layers < prune_layer that are real tokens
    pruned_key_valid: torch.Tensor  # [B, K_pruned] bool: the same for layers >= prune_layer
    prune_layer: int  # first layer whose cache holds only kept tokens; num_layers if nothing was pruned
    next_position: torch.Tensor  # [B] long: position id of the next token, when none is passed
    prompt_tokens: torch.Tensor  # [B] long: real tokens entering LLM layer 0 in the first forward (after DyMU)
    prompt_tokens_kept: torch.Tensor  # [B] long: of those, the ones the last layer saw (after FastV)
    dense: bool = False  # every cached key of both groups is a real token (decided once, in Python)


@dataclass
class HybridLlavaOutput(LlavaCausalLMOutputWithPast):
    """LLaVA's output plus where the visual tokens were and which prompt positions survived FastV.

    logits: [B, L_kept, vocab] when this forward merged or pruned (one row per surviving prompt
        position, in order), else [B, L, vocab] as in stock transformers.
    kept_positions: [B, L_kept] prompt positions whose tokens reach the last layer (a position of a
        merged DyMU token is its representative patch's placeholder). Rows of a sample with fewer
        merged tokens than the batch's largest count end in slots that are padding.
    visual_positions: [B, V] prompt positions of the image tokens (without DyMU).
    """

    kept_positions: torch.Tensor | None = None
    visual_positions: torch.Tensor | None = None


def attention_mask_4d(key_valid: torch.Tensor, query_length: int) -> torch.Tensor:
    """Causal boolean mask [B, 1, Q, K] for the last Q of K keys, hiding invalid keys.

    Each query may always attend to itself, so padding rows are never fully masked (their outputs
    are discarded, but a fully masked row could turn into NaNs that reach real tokens via values).
    """
    key_length = key_valid.shape[1]
    query_at = torch.arange(query_length, device=key_valid.device)[:, None] + (key_length - query_length)
    key_at = torch.arange(key_length, device=key_valid.device)[None, :]
    allowed = (key_at <= query_at) & key_valid[:, None, None, :]
    return allowed | (key_at == query_at)


def require(condition: torch.Tensor, message: Callable[[], str]) -> None:
    """A 0-d bool tensor that must be true: a ValueError with `message()` on CPU (reading it is
    free), a device assert elsewhere (no host sync)."""
    if condition.device.type == "cpu":
        if not bool(condition):
            raise ValueError(message())
    else:
        torch._assert_async(condition)


def prompt_is_dense(attention_mask: torch.Tensor | None, batch: int, dymu: bool) -> bool:
    """Whether every key of this prompt, before and after pruning, is a real token, decided from
    what Python knows (no host sync): no mask was passed, or the batch is one prompt (which the
    processor never pads) without DyMU padding slots, which only batches of DyMU have. A batch-1
    mask with a zero is refused (`require`)."""
    if attention_mask is None:
        return not (dymu and batch > 1)
    if batch != 1:
        return False
    require(attention_mask.bool().all(), lambda: "a batch of one prompt must have an all-ones attention_mask (padding needs a second prompt)")
    return True


def check_visual_counts(is_visual: torch.Tensor, expected: int) -> None:
    """Every sample must hold `expected` image placeholders (`require`)."""
    counts = is_visual.sum(dim=1)
    require(
        (counts == expected).all(),
        lambda: f"each prompt must contain {expected} image placeholder tokens for the images passed "
        f"(pixel_values has one image per sample x tokens per image); found {counts.tolist()}. "
        "Build prompts with the LlavaProcessor and one '<image>' per image, and do not mix "
        "text-only and image prompts in one batch.",
    )


class HybridLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """LlavaForConditionalGeneration whose forward runs hybrid_vlm's decoder loop.

    Changes from stock: image features are scattered by index (no host syncs); every layer runs
    SDPA, under an explicit mask only where a key may be padding (`prompt_is_dense`: otherwise
    causal for a prefill and unmasked for a decode step, as stock runs an unpadded prompt); with FastV on, layer `fastv_layer - 1` also returns the last
    prompt token's attention row and layers from `fastv_layer` on see only the kept tokens, at
    their original position ids. Weights, config, generate() and the processor stay stock.
    """

    hybrid_config: HybridConfig

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        labels: torch.LongTensor | None = None,
        fastv_query_index: int | torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> HybridLlavaOutput:
        """As stock LLaVA. `fastv_query_index` ([B] or int) picks the token whose attention scores
        the visual tokens; default: each sample's last real token (the last prompt token). The cache
        is accepted as `past_key_values` or `cache` on every supported transformers release."""
        if labels is not None:
            raise NotImplementedError("hybrid_vlm is inference-only: labels/loss are not supported.")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if pixel_values is not None and input_ids is None:
            raise ValueError("pixel_values need input_ids: image placeholders are located by token id")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("hybrid_vlm takes a 2-D attention_mask [batch, tokens] (1 = real token, 0 = padding)")

        config = self.hybrid_config
        parts = llava_parts(self)
        num_layers = len(parts.layers)
        if inputs_embeds is None:
            inputs_embeds = parts.embed_tokens(input_ids)
        batch, length, hidden_size = inputs_embeds.shape
        device = inputs_embeds.device
        if use_cache is None:
            use_cache = self.config.text_config.use_cache
        cache = cache_argument(past_key_values, cache)
        if use_cache and cache is None:
            cache = new_cache(self)
        state: PruneState | None = getattr(cache, "hybrid_state", None) if cache is not None else None
        if state is None and cache is not None and cache.get_seq_length() > 0:
            raise ValueError("this cache was filled outside hybrid_vlm; start generation with an empty cache")

        # Which of this chunk's tokens are real (not padding); DyMU later also unmarks merged-away slots.
        new_valid = (
            attention_mask[:, -length:].to(device=device, dtype=torch.bool)
            if attention_mask is not None
            else torch.ones(batch, length, dtype=torch.bool, device=device)
        )
        # Logical positions: counted over the prompt as written, all 576 placeholders per image.
        renumber_decode = config.position_mode == "renumbered" and state is not None
        if position_ids is None or renumber_decode:
            start = state.next_position if state is not None else torch.zeros(batch, dtype=torch.long, device=device)
            position_ids = (start[:, None] + new_valid.long().cumsum(dim=1) - 1).clamp_min(0)
        position_ids = position_ids.to(device=device, dtype=torch.long).expand(batch, length)
        next_position = position_ids[:, -1] + 1

        visual_positions = None  # [B, V]: where the visual tokens sit in the (possibly compacted) sequence
        entered_positions = None  # [B, L0]: prompt positions entering layer 0, when DyMU compacted them
        if pixel_values is not None:
            if state is not None:
                raise NotImplementedError("images are only supported in the first forward over a cache")
            features, slot_valid, pooled_slots = self._image_features(pixel_values)  # [images, 576, hidden], [images, 576]
            num_images, tokens_per_image = features.shape[:2]
            if num_images % batch:
                raise ValueError(f"{num_images} images for {batch} prompts: every prompt needs the same number of images")
            num_visual = num_images // batch * tokens_per_image
            is_visual = input_ids == parts.image_token_id
            check_visual_counts(is_visual, num_visual)
            visual_positions = true_positions(is_visual, num_visual)  # [B, V]
            if config.fastv_select == "random":
                slot_scores = random_slot_scores(pixel_values, num_images // batch, tokens_per_image, config.select_seed)
                random_scores = torch.zeros(batch, length, dtype=slot_scores.dtype, device=device).scatter(1, visual_positions, slot_scores)
            inputs_embeds = inputs_embeds.scatter(
                1,
                visual_positions[..., None].expand(batch, num_visual, hidden_size),
                features.reshape(batch, num_visual, hidden_size).to(inputs_embeds.dtype),
            )
            if slot_valid is not None:
                # DyMU: a merged token sits at the placeholder of its representative patch, so it carries
                # that patch's position id; the placeholders of patches merged into it are dropped here,
                # before layer 0. Sizing the compacted sequence needs the batch's largest merged count:
                # the engine's one host read, and only with DyMU (the count is data-dependent by design;
                # pooling's count is static).
                slot_valid = slot_valid.reshape(batch, num_visual) & new_valid.gather(1, visual_positions)
                merged_slots = pooled_slots * (num_images // batch) if pooled_slots else int(slot_valid.sum(dim=1).max())
                slot_scores = torch.zeros(batch, length, device=device).scatter(1, visual_positions, slot_valid.float())
                entered_positions, _ = select_kept_positions(slot_scores, visual_positions, merged_slots)
                new_valid = new_valid.scatter(1, visual_positions, slot_valid)
                inputs_embeds = gather_tokens(inputs_embeds, entered_positions)
                new_valid = gather_tokens(new_valid, entered_positions)
                position_ids = gather_tokens(position_ids, entered_positions)
                if config.fastv_select == "random":
                    random_scores = gather_tokens(random_scores, entered_positions)
                if config.position_mode == "renumbered":
                    position_ids = (new_valid.long().cumsum(dim=1) - 1).clamp_min(0)
                    next_position = position_ids[:, -1] + 1
                is_visual = gather_tokens(is_visual, entered_positions)
                visual_positions = true_positions(is_visual, merged_slots)
                length, num_visual = inputs_embeds.shape[1], merged_slots
        keep = visual_keep_count(num_visual, config.fastv_k) if visual_positions is not None else 0
        prune_now = visual_positions is not None and keep < num_visual

        # Dense: no layer needs a mask (see prompt_is_dense); SDPA then runs causal for a prefill from an
        # empty cache and unmasked for a one-token step. A chunk over a filled cache keeps its mask.
        dense = prompt_is_dense(attention_mask, batch, config.dymu is not None) if state is None else state.dense
        unmasked = dense and (state is None or length == 1)

        def layer_mask(key_valid: torch.Tensor, query_length: int) -> torch.Tensor | None:
            return None if unmasked else attention_mask_4d(key_valid, query_length)

        if state is None:
            full_key_valid, pruned_key_valid = new_valid, new_valid
            prune_layer = 0 if entered_positions is not None else num_layers
        else:
            full_key_valid = torch.cat([state.full_key_valid, new_valid], dim=1)
            pruned_key_valid = torch.cat([state.pruned_key_valid, new_valid], dim=1)
            prune_layer = state.prune_layer

        score_query_index = keep_per_sample = None
        if prune_now:
            if fastv_query_index is None:
                steps = torch.arange(length, device=device)
                score_query_index = (new_valid.long() * steps).amax(dim=1)
            else:
                score_query_index = torch.as_tensor(fastv_query_index, device=device).long().expand(batch)
                if entered_positions is not None:  # a prompt position -> its index after DyMU compaction
                    score_query_index = (entered_positions == score_query_index[:, None]).long().argmax(dim=1)
            if entered_positions is not None:
                keep_per_sample = visual_keep_counts(new_valid.gather(1, visual_positions).sum(dim=1), config.fastv_k)

        hidden_states = inputs_embeds
        cos, sin = parts.rotary_emb(hidden_states, position_ids)
        mask = layer_mask(full_key_valid, length)
        kept_positions = scores = None
        for layer_idx, layer in enumerate(parts.layers):
            if prune_now and layer_idx == config.fastv_layer:
                if config.fastv_select == "random":
                    scores = random_scores
                scores = scores.masked_fill(~new_valid, -1.0)  # merged-away slots rank after every real token
                kept_positions, kept_real = select_kept_positions(scores, visual_positions, keep, keep_per_sample)
                hidden_states = gather_tokens(hidden_states, kept_positions)
                pruned_key_valid = gather_tokens(new_valid, kept_positions)
                if kept_real is not None:
                    pruned_key_valid = pruned_key_valid & kept_real
                if config.position_mode == "renumbered":
                    kept_position_ids = (pruned_key_valid.long().cumsum(dim=1) - 1).clamp_min(0)
                    cos, sin = parts.rotary_emb(hidden_states, kept_position_ids)
                    next_position = kept_position_ids[:, -1] + 1
                else:
                    cos, sin = gather_tokens(cos, kept_positions), gather_tokens(sin, kept_positions)
                mask = layer_mask(pruned_key_valid, kept_positions.shape[1])
                prune_layer = layer_idx
            elif layer_idx == prune_layer:
                mask = layer_mask(pruned_key_valid, length)
            scoring_here = prune_now and layer_idx == config.fastv_layer - 1 and config.fastv_select == "attention"
            hidden_states, row = llama_layer_forward(
                layer,
                hidden_states,
                (cos, sin),
                mask,
                cache,
                layer_idx,
                score_query_index=score_query_index if scoring_here else None,
                eager_scoring=config.scoring == "eager",
            )
            if scoring_here:
                scores = row

        if cache is not None:
            if state is None:
                prompt_tokens = new_valid.sum(dim=1)
                prompt_tokens_kept = pruned_key_valid.sum(dim=1) if prune_layer < num_layers else prompt_tokens
            else:
                prompt_tokens, prompt_tokens_kept = state.prompt_tokens, state.prompt_tokens_kept
            cache.hybrid_state = PruneState(
                full_key_valid, pruned_key_valid, prune_layer, next_position, prompt_tokens, prompt_tokens_kept, dense
            )

        if entered_positions is not None:
            kept_positions = entered_positions if kept_positions is None else entered_positions.gather(1, kept_positions)
        hidden_states = parts.norm(hidden_states)
        if isinstance(logits_to_keep, int):
            if logits_to_keep > 0:
                hidden_states = hidden_states[:, -logits_to_keep:]
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        return HybridLlavaOutput(
            logits=parts.lm_head(hidden_states),
            **cache_kwarg(cache if use_cache else None),
            kept_positions=kept_positions,
            visual_positions=visual_positions if entered_positions is None else None,
        )

    def _image_features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, int | None]:
        """(features [images, 576, hidden], which slots hold a token [images, 576] or None, and the
        static count of such slots per image when it does not depend on the data)."""
        config = self.hybrid_config
        pixel_values = pixel_values.to(self.dtype)
        if config.dymu is not None:
            merged = dymu_image_features(self, pixel_values, self.hybrid_thresholds.to(pixel_values.device), split=config.dymu_split)
            return merged.features, merged.valid, None
        features = stock_image_features(self, pixel_values)
        if config.visual_pool is not None:
            pooled, valid = pool_grid(features, config.visual_pool)
            return pooled, valid, pooled_token_count(features.shape[1], config.visual_pool)
        return features, None, None


def apply_hybrid(model: LlavaForConditionalGeneration, config: HybridConfig | None = None):
    """Patch a loaded llava-hf LlavaForConditionalGeneration in place (ToMe style) and return it.

    `config` defaults to HybridConfig.from_env() (FASTV_K, FASTV_LAYER). Calling it again replaces
    the settings.
    """
    if not isinstance(model, LlavaForConditionalGeneration):
        raise TypeError(f"apply_hybrid expects a transformers LlavaForConditionalGeneration, got {type(model).__name__}")
    if type(model) not in (LlavaForConditionalGeneration, HybridLlavaForConditionalGeneration):
        raise TypeError(f"apply_hybrid patches LlavaForConditionalGeneration itself, not the subclass {type(model).__name__}")
    config = HybridConfig.from_env() if config is None else config
    if config.dymu is not None:
        from .calibrate import load_thresholds

        model.hybrid_thresholds = load_thresholds(config.dymu, model, config.dymu_split)  # [merging layers], validated for this model
    num_layers = len(llava_parts(model).layers)
    if config.prunes and config.fastv_layer >= num_layers:
        raise ValueError(f"FASTV_LAYER={config.fastv_layer} is not valid for a {num_layers}-layer LLM: use 1..{num_layers - 1}")
    model.__class__ = HybridLlavaForConditionalGeneration
    model.hybrid_config = config
    return model


def remove_hybrid(model: LlavaForConditionalGeneration) -> LlavaForConditionalGeneration:
    """Undo `apply_hybrid` in place: the stock forward, no hybrid settings left on the model."""
    if type(model) is HybridLlavaForConditionalGeneration:
        model.__class__ = LlavaForConditionalGeneration
    for attribute in ("hybrid_config", "hybrid_thresholds"):
        if attribute in model.__dict__:
            delattr(model, attribute)
    return model
