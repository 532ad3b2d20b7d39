"""apply_hybrid(model, config): turn a loaded llava-hf LLaVA-1.5 or LLaVA-NeXT into the FastV one, in place.

The forward below is one straight decoder loop over the stock modules, the same for both models
(a model's adapter, `hybrid_vlm.adapters`, only supplies the image features per placeholder):

    embed -> place image features (`hybrid_vlm.placement`) -> layers, where each stage
          (`hybrid_vlm.stages`: FastV or random at FASTV_LAYER, DART there, PyramidDrop and
          SparseVLM at their three stage layers) keeps all text and the top visual slots before
          its layer runs (SparseVLM adds its recycled clusters after them)
          -> norm -> lm_head

With DyMU on, the CLIP tower merges patches first; each merged token takes the placeholder of its
representative patch (and so that patch's position id) and the other placeholders are dropped
before layer 0. A method before the LLM drops its placeholders the same way.

Dropped tokens never reach the KV cache of later layers, so the cache holds one group of layers
per reduction stage, of different lengths (`CacheGroup`: what entered layer 0, then one per stage
inside the LLM). Their key-validity masks (padding, kept tokens) and next positions travel on the
cache object as `PruneState`, which is what makes decoding after pruning, left padding, batching
and renumbered positions exact. The loop takes its stages as a map from layer to plan, so a
method pruning at several layers adds entries, not code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from .adapters import (
    BATCH_ALIKE,
    EVEN_IMAGES,
    check_sliding_window,
    check_supported,
    grid_patches,
    llava_image_layout,
    llava_image_slots,
    llava_next_image_slots,
)
from .config import HybridConfig
from .hf_compat import (
    Cache,
    LlavaCausalLMOutputWithPast,
    LlavaForConditionalGeneration,
    cache_argument,
    cache_kwarg,
    llama_layer_forward,
    llava_parts,
    new_cache,
    without_window_layers,
)
from .hf_compat.generation import IMAGE_LAYOUTS, GenerationHooks, check_generate_options
from .hf_compat.llava_next import LlavaNextForConditionalGeneration
from .hf_compat.loading import NO_HUB_KERNELS, check_not_kernelized, check_on_one_device
from .hf_compat.mirrored import warn_if_changed
from .hf_compat.qwen2_5_vl import NoGenerationPositionIds, Qwen2_5_VLForConditionalGeneration, qwen_parts
from .mrope import next_position_ids
from .placement import PlacedPrompt, place_images
from .qwen import check_qwen_supported, qwen_image_layout, qwen_image_slots, qwen_prompt_positions
from .runtime import host_to_device, read_on_host, require
from .stages import (
    after_stage,
    check_per_image_budget,
    check_stage_plan,
    check_whole_image_budget,
    first_inputs,
    prune,
    rater_rows,
    renumber,
    stage_at,
    stage_plans,
    stage_scores,
)


@dataclass
class CacheGroup:
    """Layers from `first_layer` up to the next group's first layer cache the same tokens."""

    first_layer: int
    key_valid: torch.Tensor  # [B, K] bool: which of those cached keys are real tokens (not padding, fillers, dropped)


@dataclass
class PruneState:
    """What a cache must remember between forward calls about the tokens it holds: one group per
    reduction stage (the first holds what entered layer 0; each stage inside the LLM adds one from
    its layer on), each with its own key-validity mask."""

    groups: list[CacheGroup]  # first_layer ascending; groups[0].first_layer == 0
    num_layers: int
    next_positions: list[torch.Tensor]  # per group, [B] long: position id of its next token, when none is passed
    group_prompt_tokens: list[torch.Tensor]  # per group, [B] long: real prompt tokens its layers saw in the first forward
    dense: bool = False  # every cached key of every group is a real token (decided once, in Python)
    visual_tokens: torch.Tensor | None = None  # [B] long: of the prompt tokens entering layer 0, the visual ones (None: no image)
    # the caller's tokens minus layer 0's cached slots (a shape): placement's fillers make it negative,
    # compaction of DyMU's empty slots positive; generate slices a call over this cache by it
    written_offset: int = 0

    def written_tokens(self, cached_slots: int) -> int:
        """The caller's tokens a cache holding `cached_slots` layer-0 slots has seen."""
        return cached_slots + self.written_offset

    @property
    def next_position(self) -> torch.Tensor:  # [B] the first group's (every group's, with logical positions)
        return self.next_positions[0]

    @property
    def prompt_tokens(self) -> torch.Tensor:  # [B] real tokens entering LLM layer 0 (after any reduction before it)
        return self.group_prompt_tokens[0]

    @property
    def prompt_tokens_kept(self) -> torch.Tensor:  # [B] of those, the ones the last layer saw
        return self.group_prompt_tokens[-1]

    @property
    def pruned_key_valid(self) -> torch.Tensor:  # [B, K] the last layer's group
        return self.groups[-1].key_valid

    def group_layers(self) -> list[int]:
        """How many layers each group spans."""
        starts = [group.first_layer for group in self.groups] + [self.num_layers]
        return [end - start for start, end in zip(starts, starts[1:])]

    def kv_lengths(self) -> list[int]:
        """Keys each layer caches (padding included: a shape, no host sync)."""
        return [group.key_valid.shape[1] for group, span in zip(self.groups, self.group_layers()) for _ in range(span)]

    def visual_counts(self) -> VisualCounts:
        """Per sample, the three visual-token counts every budget rule is one of, from what the
        cache holds (not from the settings)."""
        entered = self.visual_tokens if self.visual_tokens is not None else torch.zeros_like(self.prompt_tokens)
        per_group = [entered - (self.prompt_tokens - tokens) for tokens in self.group_prompt_tokens]  # only visual tokens are dropped
        layer_mean = sum(span * visual.double() for span, visual in zip(self.group_layers(), per_group)) / self.num_layers
        return VisualCounts(entered.tolist(), per_group[-1].tolist(), layer_mean.tolist())


@dataclass
class VisualCounts:
    """Visual tokens per sample under the three budget rules (host lists, read once after generation).

    entered: entering LLM layer 0 (rule A); kept: after the last reduction, what the last layer
    sees (rule B); layer_mean: averaged over the LLM's layers (rule C)."""

    entered: list[int]
    kept: list[int]
    layer_mean: list[float]


@dataclass
class HybridLlavaOutput(LlavaCausalLMOutputWithPast):
    """LLaVA's output plus where the visual tokens were and which prompt positions survived FastV.

    logits: [B, L_kept, vocab] when this forward merged or pruned (one row per surviving prompt
        position, in order), else [B, L, vocab] as in stock transformers.
    kept_positions: [B, L_kept] prompt positions whose tokens reach the last layer (a position of a
        merged DyMU token is its representative patch's placeholder). Rows of a sample with fewer
        merged tokens than the batch's largest count end in slots that are padding; the filler slots
        of a LLaVA-NeXT batch with unequal visual counts show as -1 (`placement.FILLER`).
    visual_positions: [B, V] prompt positions of the image tokens, where every image token entered
        the LLM at its own position; None where slots no longer map one to one onto prompt positions
        (DyMU's merged tokens, a method before the LLM, a LLaVA-NeXT batch with filler slots).
    """

    kept_positions: torch.Tensor | None = None
    visual_positions: torch.Tensor | None = None


def opened_groups(state: PruneState | None, new_valid, position_ids, next_position, position_mode: str):
    """(cache groups, each group's next position, each group's positions for this forward) as a
    forward starts: one group for a prompt; for a later step the cache's groups, each extended by
    the new tokens, under renumbered positions each at its own positions."""
    if state is None:
        return [CacheGroup(0, new_valid)], [next_position], [position_ids]
    groups = [CacheGroup(group.first_layer, torch.cat([group.key_valid, new_valid], dim=1)) for group in state.groups]
    group_positions = decode_positions(state, new_valid, position_ids, position_mode)
    return groups, [positions[:, -1] + 1 for positions in group_positions], group_positions


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


def prompt_is_dense(attention_mask: torch.Tensor | None, batch: int, slot_padding: bool, read_mask: bool = False) -> bool:
    """Whether every key of this prompt, before and after pruning, is a real token. Decided from what
    Python knows (no host sync): no mask was passed, or the batch is one prompt (which the processor
    never pads), and no slot can be empty (`slot_padding`: DyMU's merged-away slots, fillers for
    prompts with fewer image placeholders, or unequal quotas). A batch-1 mask with a zero is refused
    (`require`). With `read_mask` (MASK_READ=once) a batch's mask is read on the host instead of
    assumed padded, and a batch of one's instead of assumed unpadded (a slice of a padded batch, or
    `padding="max_length"`): the one host sync of the prompt, made only where the answer can change the path."""
    if attention_mask is None:
        return not (slot_padding and batch > 1)
    if batch == 1 and not read_mask:
        require(attention_mask.bool().all(), lambda: "a batch of one prompt is taken as unpadded (no host read), but its attention_mask "
                "has zeros: strip the padding (input_ids[:, mask[0].bool()]) or set MASK_READ=once (HybridConfig(mask_read='once')), "
                "which reads the mask once per prompt")
        return True
    return read_mask and not (slot_padding and batch > 1) and read_on_host(attention_mask.bool().all())


def chunk_is_dense(prompt_dense: bool, attention_mask: torch.Tensor | None, batch: int, length: int) -> bool:
    """Whether a forward over a filled cache keeps the prompt's mask-free path. A chunk passed
    without a mask does. A longer chunk of a batch may bring padding: it is not read, and it and
    every later step keep the mask. Otherwise (a one-token step, or a batch of one) the new tokens
    must be real (`require`): generate's are, and a pad here (a right-padded prompt split into
    chunks) would enter the cache as a real key."""
    if not prompt_dense or attention_mask is None:
        return prompt_dense
    if batch > 1 and length > 1:
        return False
    require(
        attention_mask[:, -length:].bool().all(),
        lambda: "a prompt read as unpadded (batch of one, or MASK_READ=once) cannot take padding in a later one-token "
        "chunk: pass an all-ones attention_mask there, left-pad batches (as the processors do) or use MASK_READ=never",
    )
    return True


def check_visual_counts(is_visual: torch.Tensor, expected: int | list[int]) -> None:
    """Every sample must hold `expected` image placeholders, or its own count of a list (`require`)."""
    counts = is_visual.sum(dim=1)
    wanted = expected if isinstance(expected, int) else host_to_device(torch.tensor(expected), is_visual.device)
    each = f"each prompt must contain {expected}" if isinstance(expected, int) else f"the prompts must contain {expected} (in order)"
    require(
        (counts == wanted).all(),
        lambda: f"{each} image placeholder tokens for the images passed "
        f"({EVEN_IMAGES}); found {counts.tolist()}. Build prompts with the model's processor and one '<image>' per "
        f"image, and {BATCH_ALIKE}.",
    )


# stock keywords with no meaning here: refused rather than silently ignored
UNSUPPORTED_INPUTS = ("mm_encoder_outputs", "vision_feature_layer", "vision_feature_select_strategy")
UNSUPPORTED_OUTPUTS = ("output_attentions", "output_hidden_states")


def check_no_dropout(model) -> None:
    """The engine's layers call SDPA without dropout: in train mode with attention dropout stock would
    drop, and the two would differ without a word."""
    dropout = getattr(model.config.text_config, "attention_dropout", 0.0)
    if model.training and dropout:
        raise NotImplementedError(f"hybrid_vlm is inference-only and applies no attention dropout; this model is in train mode "
                                  f"with attention_dropout={dropout}: call model.eval()")


def check_forward_inputs(input_ids, inputs_embeds, pixel_values, attention_mask, labels, extra: dict) -> None:
    given = [name for name in UNSUPPORTED_INPUTS if extra.get(name) not in (None, False)]
    if given:
        raise NotImplementedError(f"hybrid_vlm's forward does not support {', '.join(given)}: pass pixel_values (and image_sizes) instead")
    given = [name for name in UNSUPPORTED_OUTPUTS if extra.get(name)]
    if given:
        wanted = " or ".join(name.removeprefix("output_").replace("_", " ") for name in given)
        raise NotImplementedError(f"hybrid_vlm's forward does not return {wanted}: its layer loop keeps only what pruning "
                                  "reads; run the stock model for them")
    if extra.get("return_dict") is False:
        raise NotImplementedError("return_dict=False: hybrid_vlm always returns its output dataclass (logits, cache, "
                                  "kept_positions); read its fields, or call .to_tuple() on it")
    if labels is not None:
        raise NotImplementedError("hybrid_vlm is inference-only: labels/loss are not supported.")
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids or inputs_embeds")
    if pixel_values is not None and input_ids is None:
        raise ValueError("pixel_values need input_ids, not inputs_embeds: image placeholders are located by token id "
                         "(generate passes only inputs_embeds to the first forward when both are given): pass input_ids alone")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError("hybrid_vlm takes a 2-D attention_mask [batch, tokens] (1 = real token, 0 = padding)")


def check_chunk_mask(attention_mask: torch.Tensor | None, state: PruneState | None, cached_slots: int, length: int) -> None:
    """Over a filled cache, a mask covers the caller's tokens the cache holds and then this chunk's:
    layer 0's slots plus the state's `written_offset`, plus `length` (shapes only). A mask of any other
    length means the chunk was cut by a count in slots (e.g. generate's `prefill_chunk_size` over a
    cache with filler or compacted slots): refused, since the keys would be misread."""
    if state is None or attention_mask is None:
        return
    expected = state.written_tokens(cached_slots) + length
    if attention_mask.shape[1] != expected:
        raise ValueError(
            f"over this cache the attention_mask must cover {expected} tokens (the {expected - length} the cache holds, "
            f"then this chunk's {length}), got {attention_mask.shape[1]}. Pass the conversation so far with its whole mask and no "
            "prefill_chunk_size, or only the new tokens with the whole mask."
        )


def chunk_positions(attention_mask, position_ids, state, config, batch, length, device):
    """(new_valid [B, L]: real tokens of this chunk, position_ids [B, L], next_position [B]).

    Logical positions: counted over the prompt as written, every image placeholder included."""
    new_valid = (
        attention_mask[:, -length:].to(device=device, dtype=torch.bool)
        if attention_mask is not None
        else torch.ones(batch, length, dtype=torch.bool, device=device)
    )
    if position_ids is None or (config.position_mode == "renumbered" and state is not None):
        start = state.next_position if state is not None else torch.zeros(batch, dtype=torch.long, device=device)
        position_ids = (start[:, None] + new_valid.long().cumsum(dim=1) - 1).clamp_min(0)
    position_ids = position_ids.to(device=device, dtype=torch.long).expand(batch, length)
    return new_valid, position_ids, position_ids[:, -1] + 1


@dataclass
class LoopResult:
    hidden_states: torch.Tensor  # [B, L_kept, hidden] the last layer's outputs
    kept_positions: torch.Tensor | None  # [B, L_kept] indices into the placed sequence (None: nothing pruned)
    groups: list[CacheGroup]
    next_positions: list[torch.Tensor]  # per group, [B]


def decode_positions(state: PruneState, new_valid: torch.Tensor, position_ids: torch.Tensor, position_mode: str) -> list[torch.Tensor]:
    """Per cache group, the position ids of a chunk over a filled cache: the chunk's own (logical:
    every group continues after the original length), or, renumbered, each group's from its own
    next position (its cache length in real tokens)."""
    if position_mode != "renumbered":
        return [position_ids] * len(state.groups)
    steps = new_valid.long().cumsum(dim=1) - 1
    return [position_ids] + [(start[:, None] + steps).clamp_min(0) for start in state.next_positions[1:]]


def chunk_rows(loop: LoopResult, placed: PlacedPrompt | None, slots, length: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden_states, kept_positions): the last layer's rows, with kept_positions as indices into
    the prompt the caller passed. Fillers alone (nothing pruned) drop their rows, which leaves
    stock's; compacted or pruned rows are mapped back through the positions that entered."""
    hidden_states, kept_positions = loop.hidden_states, loop.kept_positions
    entered = placed.entered_positions if placed is not None else None
    if entered is None:
        return hidden_states, kept_positions
    if kept_positions is None and not slots.compact:
        return hidden_states[:, hidden_states.shape[1] - length :], None
    return hidden_states, entered if kept_positions is None else entered.gather(1, kept_positions)


def layer_for_next_stage(layer, hidden_states, cos_sin, mask, cache, layer_idx: int, upcoming, inputs, eager_scoring: bool):
    """(the layer's output [B, L, hidden], what the stage before the next layer reads from it): the
    attention row of its query token ("previous_row"), the rows of its raters ("raters"), its keys
    ("dart"), or None when no stage comes next."""
    reads = upcoming.score if upcoming is not None else None
    keys_out = [] if reads == "dart" else None
    hidden_states, row = llama_layer_forward(
        layer, hidden_states, cos_sin, mask, cache, layer_idx,
        score_query_index=upcoming.query_index if reads == "previous_row" else None,
        eager_scoring=eager_scoring, keys_out=keys_out, score_rows=rater_rows(inputs) if reads == "raters" else None,
    )
    return hidden_states, keys_out[0] if keys_out else row


class HybridDecoder(GenerationHooks):
    """The forward shared by every patched model class (a mixin placed before the stock class).

    Changes from stock: image features come from the model's adapter (`image_slots`) and are placed
    by index (no host syncs); every layer runs SDPA, under an explicit mask only where a key may be
    padding (`prompt_is_dense`: otherwise causal for a prefill and unmasked for a decode step, as
    stock runs an unpadded prompt); with FastV on, layer `fastv_layer - 1` also returns the last
    prompt token's attention row and layers from `fastv_layer` on see only the kept tokens, at their
    original position ids. Weights, config, generate() and the processor stay stock.
    """

    hybrid_config: HybridConfig
    image_slots: Callable  # (model, pixel_values, image_layout, batch) -> ImageSlots
    parts_of = staticmethod(llava_parts)  # (model) -> LlavaParts: the modules the loop drives
    check_model = staticmethod(check_supported)  # (model, config) -> None: refuses what the engine does not implement

    # (model) -> visual tokens per image where the model fixes them (LLaVA's CLIP grid), None where they
    # follow the image (Qwen2.5-VL: a stage's budget is then checked per sample, at the forward)
    fixed_visual_count = staticmethod(grid_patches)
    # (input_ids, image inputs) -> (images per prompt, pixel_values rows per image): how generate's
    # expansion for beams and num_return_sequences repeats a prompt's images whole (`hf_compat.generation`)
    image_layout = staticmethod(llava_image_layout)

    def generate(self, *args, **kwargs):
        """Stock generate; assisted generation is refused by name (`check_generate_options`)."""
        check_generate_options(self, args, kwargs)
        return super().generate(*args, **kwargs)

    def save_pretrained(self, *args, **kwargs):
        """Stock save_pretrained, as the stock class: the weights are stock's, and a config.json naming
        a patched class (which transformers does not have) would not load. The hybrid settings are
        not saved: load the stock class and call apply_hybrid again."""
        patched = type(self)
        self.__class__ = stock_class(self)
        try:
            return self.save_pretrained(*args, **kwargs)
        finally:
            self.__class__ = patched

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        stock = STOCK_CLASSES[cls].__name__
        raise TypeError(f"{cls.__name__} is the class apply_hybrid swaps in, not one to load: load with "
                        f"{stock}.from_pretrained(...) and call apply_hybrid(model, HybridConfig(...))")

    def prompt_positions(self, input_ids, new_valid, position_ids, image_layout) -> torch.Tensor:
        """The position rule for a prompt with images: LLaVA's are the 1-D logical ones, [B, L]."""
        return position_ids

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
        image_sizes: torch.Tensor | None = None,
        **kwargs,
    ) -> HybridLlavaOutput:
        """As stock. `fastv_query_index` ([B] or int) picks the token whose attention scores the
        visual tokens; default: each sample's last real token (the last prompt token). The cache is
        accepted as `past_key_values` or `cache` on every supported transformers release.
        `image_sizes` (LLaVA-NeXT) is read on the host: pass it on the CPU, as the processor makes it."""
        cache = cache_argument(past_key_values, cache)  # first: a static cache also makes generate pass a 4-D mask
        check_forward_inputs(input_ids, inputs_embeds, pixel_values, attention_mask, labels, kwargs)
        check_no_dropout(self)
        config, parts = self.hybrid_config, self.parts_of(self)
        if inputs_embeds is None:
            inputs_embeds = parts.embed_tokens(input_ids)
        batch, length, _ = inputs_embeds.shape
        use_cache = self.config.text_config.use_cache if use_cache is None else use_cache
        cache, state = self._open_cache(cache, use_cache)
        cached = cache.get_seq_length() if cache is not None else 0  # a shape: no host sync
        check_chunk_mask(attention_mask, state, cached, length)
        written = state.written_tokens(cached) if state is not None else cached  # the caller's tokens: positions, not slots
        check_sliding_window(self, attention_mask.shape[1] if attention_mask is not None else written + length)
        new_valid, position_ids, next_position = chunk_positions(attention_mask, position_ids, state, config, batch, length, inputs_embeds.device)
        slots = placed = None
        if pixel_values is not None:
            if state is not None:
                raise NotImplementedError("images are only supported in the first forward over a cache: the cache already "
                                          "holds the prompt's images, so pass no pixel_values in later turns (a new image needs a new cache)")
            slots, placed, next_position = self._placed_images(parts, input_ids, pixel_values, image_sizes, inputs_embeds, new_valid, position_ids)
            inputs_embeds, new_valid, position_ids = placed.inputs_embeds, placed.new_valid, placed.position_ids
        stages = stage_plans(config, placed, fastv_query_index, len(parts.layers))
        if not isinstance(logits_to_keep, int) and (stages or (slots is not None and slots.compact)):  # rows != stock's
            raise NotImplementedError("a tensor logits_to_keep indexes prompt positions, but this forward's rows are the tokens "
                                      "it kept (out.kept_positions): pass an int (the last rows), or gather from the full output")
        dense = self._is_dense(state, attention_mask, batch, length, slots, stages)
        loop = self._decoder_layers(parts, inputs_embeds, position_ids, next_position, new_valid, state, cache, stages, placed, dense)
        if cache is not None:
            visual_tokens = placed.new_valid.gather(1, placed.visual_positions).sum(dim=1) if placed is not None else None
            cache.hybrid_state = self._next_state(state, loop.groups, loop.next_positions, dense, visual_tokens, length - inputs_embeds.shape[1])
        hidden_states, kept_positions = chunk_rows(loop, placed, slots, length)
        return self._output(parts, hidden_states, logits_to_keep, cache if use_cache else None, kept_positions, placed)

    def _open_cache(self, cache: Cache | None, use_cache: bool) -> tuple[Cache | None, PruneState | None]:
        """(the cache, its engine state): a new cache where generation starts without one; None for
        the state of an empty cache, which only this engine may have filled."""
        if use_cache and cache is None:
            cache = new_cache(self)
        state: PruneState | None = getattr(cache, "hybrid_state", None) if cache is not None else None
        if state is None and cache is not None and cache.get_seq_length() > 0:
            raise ValueError("this cache was filled outside hybrid_vlm; start generation with an empty cache")
        if state is None and cache is not None:
            without_window_layers(cache)
        if state is not None and state.groups[0].key_valid.shape[1] != cache.get_seq_length():  # shapes: no host sync
            raise ValueError(
                f"this cache holds {cache.get_seq_length()} tokens but its hybrid_vlm state {state.groups[0].key_valid.shape[1]}: "
                "it was changed outside the engine (cache.crop, reorder, reset), which its pruned groups and positions cannot "
                "follow. Continue from the cache a forward returned, or start from a new cache with the whole prompt."
            )
        return cache, state

    def _placed_images(self, parts, input_ids, pixel_values, image_layout, inputs_embeds, new_valid, position_ids):
        """(slots, placed, next_position [B]): the adapter's image features placed at the prompt's
        placeholders under the model's position rule. The next position follows the prompt as
        written, except under renumbered positions, which count only the tokens that entered."""
        slots = self.image_slots(self, pixel_values, image_layout, inputs_embeds.shape[0])
        position_ids = self.prompt_positions(input_ids, new_valid, position_ids, image_layout)
        next_position = next_position_ids(position_ids)
        placed = place_images(slots, input_ids == parts.image_token_id, inputs_embeds, new_valid, position_ids, check_visual_counts)
        if self.hybrid_config.position_mode == "renumbered" and placed.entered_positions is not None:
            placed = replace(placed, position_ids=renumber(placed.new_valid))
            next_position = placed.position_ids[:, -1] + 1
        return slots, placed, next_position

    def _is_dense(self, state, attention_mask, batch: int, length: int, slots, stages) -> bool:
        """Whether no layer needs a mask: `prompt_is_dense` for a prompt, then `chunk_is_dense` over
        a filled cache. Slots that may be empty (fillers, DyMU's unequal merged counts) and unequal
        quotas (they keep slots that are not real) rule it out."""
        slot_padding = slots is not None and (slots.fillers or (slots.compact and not slots.equal_counts))
        unequal_quotas = not all(plan.uniform for plan in stages.values())
        if state is None:
            dense = prompt_is_dense(attention_mask, batch, slot_padding or unequal_quotas, self.hybrid_config.mask_read == "once")
        else:
            dense = chunk_is_dense(state.dense, attention_mask, batch, length)
        return dense and not unequal_quotas

    def _decoder_layers(self, parts, hidden_states, position_ids, next_position, new_valid, state, cache, stages, placed, dense) -> LoopResult:
        """Run every layer; each stage in `stages` ({layer: PrunePlan}) prunes before its layer runs.
        A decode step gives each cache group its own positions under renumbered positions."""
        config, length = self.hybrid_config, hidden_states.shape[1]
        unmasked = dense and (state is None or length == 1)  # causal prefill, or a one-token step

        def layer_mask(key_valid: torch.Tensor, query_length: int) -> torch.Tensor | None:
            return None if unmasked else attention_mask_4d(key_valid, query_length)

        groups, next_positions, group_positions = opened_groups(state, new_valid, position_ids, next_position, config.position_mode)
        group_at = {group.first_layer: index for index, group in enumerate(groups)}
        cos_sin = parts.rotary_emb(hidden_states, position_ids)
        inputs = first_inputs(stages[min(stages)], placed) if stages else None
        valid, previous, mask, kept_positions = new_valid, None, None, None
        for layer_idx, layer in enumerate(parts.layers):
            if layer_idx in stages:
                plan = stage_at(stages[layer_idx], inputs)
                scores = stage_scores(plan, layer, hidden_states, cos_sin, mask, previous, valid, inputs.is_visual, parts.norm)
                pruned = prune(plan, scores, hidden_states, cos_sin, valid, config.position_mode, parts.rotary_emb)
                inputs = after_stage(inputs, plan, pruned.kept_positions)
                kept_positions = pruned.kept_positions if kept_positions is None else kept_positions.gather(1, pruned.kept_positions)
                hidden_states, cos_sin, valid = pruned.hidden_states, pruned.cos_sin, pruned.key_valid
                groups.append(CacheGroup(layer_idx, valid))
                next_positions.append(next_positions[0] if pruned.next_position is None else pruned.next_position)
                mask = layer_mask(valid, hidden_states.shape[1])
            elif layer_idx in group_at:
                group = group_at[layer_idx]
                mask = layer_mask(groups[group].key_valid, length)
                if group > 0 and group_positions[group] is not position_ids:
                    cos_sin = parts.rotary_emb(hidden_states, group_positions[group])
            hidden_states, previous = layer_for_next_stage(
                layer, hidden_states, cos_sin, mask, cache, layer_idx, stages.get(layer_idx + 1), inputs, config.scoring == "eager")
        return LoopResult(hidden_states, kept_positions, groups, next_positions)

    def _next_state(self, state, groups, next_positions, dense, visual_tokens, written_offset: int) -> PruneState:
        """The cache's state after this forward; `written_offset` (the caller's tokens minus the slots
        that entered layer 0) is a prompt's, and carried unchanged by every later forward."""
        if state is not None:
            return PruneState(groups, state.num_layers, next_positions, state.group_prompt_tokens, dense, state.visual_tokens, state.written_offset)
        prompt_tokens = [group.key_valid.sum(dim=1) for group in groups]
        return PruneState(groups, len(self.parts_of(self).layers), next_positions, prompt_tokens, dense, visual_tokens, written_offset)

    def _output(self, parts, hidden_states, logits_to_keep, cache, kept_positions, placed) -> HybridLlavaOutput:
        hidden_states = parts.norm(hidden_states)
        if isinstance(logits_to_keep, int):
            if logits_to_keep > 0:
                hidden_states = hidden_states[:, -logits_to_keep:]
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        visual_positions = placed.visual_positions if placed is not None and placed.entered_positions is None else None
        return HybridLlavaOutput(
            logits=parts.lm_head(hidden_states), **cache_kwarg(cache), kept_positions=kept_positions, visual_positions=visual_positions
        )


class HybridLlavaForConditionalGeneration(HybridDecoder, LlavaForConditionalGeneration):
    """LlavaForConditionalGeneration (LLaVA-1.5) whose forward runs hybrid_vlm's decoder loop."""

    image_slots = staticmethod(llava_image_slots)


class HybridLlavaNextForConditionalGeneration(HybridDecoder, LlavaNextForConditionalGeneration):
    """LlavaNextForConditionalGeneration (LLaVA-NeXT, anyres) whose forward runs hybrid_vlm's decoder loop."""

    image_slots = staticmethod(llava_next_image_slots)
    fixed_visual_count = staticmethod(lambda model: None)  # the packed span follows the aspect ratio

    def forward(self, input_ids=None, pixel_values=None, image_sizes=None, attention_mask=None, *, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, logits_to_keep=0, labels=None, **kwargs) -> HybridLlavaOutput:
        """Stock LLaVA-NeXT's positional order (image_sizes third), then the shared loop. The keywords
        are named because generate reads the signature: without `logits_to_keep` in it, it asked for
        the logits of every prompt row (a 2,000-token span x 32k vocabulary per prompt). They are
        keyword-only: stock's later positions differ across releases (`cache` or `past_key_values`,
        `vision_feature_layer`), and a value bound to the wrong name would pass silently."""
        return HybridDecoder.forward(self, input_ids, pixel_values, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                                     logits_to_keep, labels, image_sizes=image_sizes, **kwargs)


class HybridQwen2_5_VLForConditionalGeneration(NoGenerationPositionIds, HybridDecoder, Qwen2_5_VLForConditionalGeneration):
    """Qwen2_5_VLForConditionalGeneration (images) whose forward runs hybrid_vlm's decoder loop.

    Changes from stock, beyond the loop's: position ids are (t, h, w) M-RoPE ids computed from
    `image_grid_thw` on the host (`hybrid_vlm.qwen`), kept per token through pruning, and decoding
    continues at each sample's largest id + 1; `generate` passes no position ids (the stock override
    would run `get_rope_index`, which syncs and sets the module-level `rope_deltas`)."""

    image_slots = staticmethod(qwen_image_slots)
    parts_of = staticmethod(qwen_parts)
    check_model = staticmethod(check_qwen_supported)
    fixed_visual_count = staticmethod(lambda model: None)
    image_layout = staticmethod(qwen_image_layout)

    def prompt_positions(self, input_ids, new_valid, position_ids, image_layout) -> torch.Tensor:
        return qwen_prompt_positions(self, input_ids, new_valid, image_layout)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None,
                labels=None, use_cache=None, pixel_values=None, pixel_values_videos=None, image_grid_thw=None,
                video_grid_thw=None, mm_token_type_ids=None, second_per_grid_ts=None, logits_to_keep=0, **kwargs) -> HybridLlavaOutput:
        """Stock Qwen2.5-VL's keywords, then the shared loop. `mm_token_type_ids` is redundant with the
        image token id and is not read; videos are refused; `image_grid_thw` is read on the host."""
        if pixel_values_videos is not None or video_grid_thw is not None or second_per_grid_ts is not None:
            raise NotImplementedError("hybrid_vlm runs Qwen2.5-VL on images only: videos (pixel_values_videos) are not supported yet")
        if position_ids is not None:
            raise ValueError("hybrid_vlm computes Qwen2.5-VL's (t, h, w) position ids itself from input_ids and image_grid_thw: "
                             "pass no position_ids")
        return HybridDecoder.forward(
            self, input_ids, pixel_values, attention_mask, None, past_key_values, inputs_embeds, use_cache, logits_to_keep,
            labels, image_sizes=image_grid_thw, **kwargs,
        )


# stock class -> its patched class
HYBRID_CLASSES = {
    LlavaForConditionalGeneration: HybridLlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration: HybridLlavaNextForConditionalGeneration,
    Qwen2_5_VLForConditionalGeneration: HybridQwen2_5_VLForConditionalGeneration,
}
STOCK_CLASSES = {hybrid: stock for stock, hybrid in HYBRID_CLASSES.items()}


def stock_class(model) -> type:
    """The transformers class a (patched or stock) model is an instance of."""
    return STOCK_CLASSES.get(type(model), type(model))


def inputs_for(model, inputs) -> dict:
    """The processor's batch as `model` takes it: tensors on the model's device, floating ones in
    its dtype. The image layouts go where each forward reads them. The engine reads them on the
    host, so for it they stay on (or come back to) the CPU. A stock model gets them on its device,
    as users pass them: stock Qwen2.5-VL's vision tower fails with a CPU grid on another device."""
    device, dtype, engine = model.device, model.dtype, isinstance(model, HybridDecoder)

    def placed(key: str, value):
        if not isinstance(value, torch.Tensor):
            return value
        if key in IMAGE_LAYOUTS:
            return value.cpu() if engine else value.to(device)
        return value.to(device, dtype if value.is_floating_point() else value.dtype)

    return {key: placed(key, value) for key, value in inputs.items()}


def load_supported_model(path: str, **kwargs):
    """`from_pretrained` of a checkpoint the engine patches (LLaVA-1.5 or LLaVA-NeXT), for the
    command-line tools: anything else exits with the class it found."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path, **{**NO_HUB_KERNELS, **kwargs})
    if stock_class(model) not in HYBRID_CLASSES:
        raise SystemExit(f"--model {path}: a llava-hf LLaVA-1.5 or LLaVA-NeXT or a Qwen2.5-VL checkpoint is needed, got {type(model).__name__}")
    return model


def apply_hybrid(model, config: HybridConfig | None = None):
    """Patch a loaded llava-hf LlavaForConditionalGeneration or LlavaNextForConditionalGeneration in
    place (ToMe style) and return it.

    `config` defaults to HybridConfig.from_env() (FASTV_K, FASTV_LAYER). Calling it again replaces
    the settings.
    """
    base = stock_class(model)
    if base not in HYBRID_CLASSES:
        names = " or ".join(cls.__name__ for cls in HYBRID_CLASSES)
        if isinstance(model, tuple(HYBRID_CLASSES)):
            raise TypeError(f"apply_hybrid patches {names} itself, not the subclass {type(model).__name__}")
        raise TypeError(f"apply_hybrid expects a transformers {names}, got {type(model).__name__}")
    check_not_kernelized(model)
    check_on_one_device(model)
    warn_if_changed()
    config = HybridConfig.from_env() if config is None else config
    hybrid = HYBRID_CLASSES[base]
    hybrid.check_model(model, config)
    thresholds = None
    if config.dymu is not None:
        from .calibrate import load_thresholds

        thresholds = load_thresholds(config.dymu, model, config.dymu_split)  # [merging layers], validated for this model
    num_layers = len(hybrid.parts_of(model).layers)
    config.check_depth(num_layers)
    check_stage_plan(config)
    if config.staged_method is not None:
        visual_count = hybrid.fixed_visual_count(model)
        if visual_count is not None:
            check_whole_image_budget(config, visual_count, num_layers)
        else:
            check_per_image_budget(config, num_layers)
    # Only now, every check passed: a refused call leaves the model as it was (settings, thresholds).
    model.__class__ = hybrid
    model.hybrid_config = config
    if thresholds is not None:
        model.hybrid_thresholds = thresholds
    elif "hybrid_thresholds" in vars(model):  # a re-apply without DyMU
        del model.hybrid_thresholds
    return model


def remove_hybrid(model):
    """Undo `apply_hybrid` in place: the stock forward, no hybrid settings left on the model. A cache
    the patched model filled keeps its pruned groups: start the stock model from a new cache."""
    model.__class__ = stock_class(model)
    for attribute in ("hybrid_config", "hybrid_thresholds"):
        if attribute in model.__dict__:
            delattr(model, attribute)
    return model
