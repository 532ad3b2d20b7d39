"""Placing image features into the prompt before LLM layer 0: the same for every model.

A model adapter (`hybrid_vlm.adapters`) turns pixels into `ImageSlots`: one feature per image
placeholder of each prompt, in prompt order, and which of them hold a token. `place_images` then

1. equalises the visual slot count across the batch when prompts hold different numbers of
   placeholders (LLaVA-NeXT's anyres: the count depends on the aspect ratio): a sample with fewer
   placeholders gets filler slots prepended on the left, invisible to attention like padding, so
   every sample has S visual slots and FastV's per-sample quotas work as they do for DyMU;
2. scatters the features onto the placeholders, by index (no host sync);
3. with DyMU or pooling, drops the slots that hold no token (a merged token sits at the placeholder
   of its representative patch), down to the batch's largest token count.

Real tokens keep the position ids they had in the prompt as written (logical positions).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .fastv import gather_tokens, select_kept_positions, true_positions
from .runtime import host_to_device, require

FILLER = -1  # entered position of a slot that is not in the prompt (a filler)


@dataclass
class ImageSlots:
    """A model adapter's image features, sample by sample.

    features: [B, S, hidden], S = the largest number of image placeholders of a prompt; a sample
        with V_b < S placeholders has its V_b features last (the first S - V_b go to its fillers).
    valid: [B, S] bool, slot holds a token (None: all do): False for DyMU's merged-away and
        pooling's empty slots and for fillers.
    placeholders: per-sample placeholder counts (host ints) when they differ across the batch, else None.
    compact: drop invalid slots before layer 0 (DyMU, pooling).
    valid_counts: tokens per sample (host ints) when Python knows them (pooling, the methods before
        the LLM); None: the largest is read once from `valid` (DyMU).
    scores: [B, S] per-slot scores for a selection that does not read attention (random), or None.
    protected: [B, S] bool, slots FastV always keeps when asked to (LLaVA-NeXT's newlines), or None;
        protected_counts: how many per sample (host ints).
    images_per_sample: images in each prompt (every prompt holds the same number).
    image_tokens: per sample, the tokens each of its images brings to layer 0 (host ints), where
        Python knows them (None after DyMU merging): the budget rule of the methods that rank a
        prompt's images together caps each image at what it holds.
    """

    features: torch.Tensor
    valid: torch.Tensor | None = None
    placeholders: list[int] | None = None
    compact: bool = False
    valid_counts: list[int] | None = None
    scores: torch.Tensor | None = None
    protected: torch.Tensor | None = None
    protected_counts: list[int] | None = None
    images_per_sample: int = 1
    image_tokens: list[list[int]] | None = None

    @property
    def fillers(self) -> bool:
        return self.placeholders is not None and min(self.placeholders) != max(self.placeholders)

    @property
    def equal_counts(self) -> bool:
        """Every sample holds the same number of tokens, known in Python (no empty slot survives compaction)."""
        return self.valid_counts is not None and len(set(self.valid_counts)) == 1


@dataclass
class PlacedPrompt:
    """The first forward's tokens as layer 0 sees them (length L0; L0 != L with fillers or DyMU).

    entered_positions: [B, L0] prompt position of every slot (FILLER for fillers), or None when the
        slots are the prompt's tokens one to one.
    visual_positions: [B, V] where the V visual slots of each sample sit in the L0 sequence.
    slot_scores: [B, L0] the adapter's per-slot scores (random selection), else None.
    protected: [B, L0] bool, the adapter's protected slots (see ImageSlots), else None.
    visual_counts: real visual tokens per sample where Python knows them (host ints), else None
        (DyMU batches: their merged counts live on the device).
    images_per_sample: images in each prompt, whose visual slots are that many blocks apart.
    image_tokens: per sample, each image's tokens at layer 0 where Python knows them (see ImageSlots).
    """

    inputs_embeds: torch.Tensor
    new_valid: torch.Tensor
    position_ids: torch.Tensor
    visual_positions: torch.Tensor
    entered_positions: torch.Tensor | None
    slot_scores: torch.Tensor | None
    protected: torch.Tensor | None = None
    protected_counts: list[int] | None = None
    visual_counts: list[int] | None = None
    images_per_sample: int = 1
    image_tokens: list[list[int]] | None = None


def prepend_fillers(placeholders: list[int], length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(entered [B, L + E], is_filler [B, L + E]) with E = max - min placeholders: sample b gets
    max - V_b fillers just before its prompt, and V_b - min plain padding slots before those."""
    most, extra = max(placeholders), max(placeholders) - min(placeholders)
    prompt = torch.arange(length)
    rows, fillers = [], []
    for count in placeholders:
        lead = torch.full((extra,), FILLER)
        is_filler = torch.zeros(extra + length, dtype=torch.bool)
        is_filler[extra - (most - count) : extra] = True
        rows.append(torch.cat([lead, prompt]))
        fillers.append(is_filler)
    return host_to_device(torch.stack(rows), device), host_to_device(torch.stack(fillers), device)


def gather_or_zero(tensor: torch.Tensor, entered: torch.Tensor) -> torch.Tensor:
    """`tensor` [B, L, ...] at `entered` [B, L0] positions, zeros at FILLER slots."""
    gathered = gather_tokens(tensor, entered.clamp_min(0))
    keep = (entered != FILLER).view(*entered.shape, *([1] * (tensor.dim() - 2)))
    return torch.where(keep, gathered, torch.zeros((), dtype=tensor.dtype, device=tensor.device))


def place_images(
    slots: ImageSlots,
    is_visual: torch.Tensor,  # [B, L] bool: image placeholders
    inputs_embeds: torch.Tensor,  # [B, L, hidden]
    new_valid: torch.Tensor,  # [B, L] bool: real tokens (not padding)
    position_ids: torch.Tensor,  # [B, L] long: logical positions
    check_counts,  # (is_visual [B, L], count or per-sample counts) -> None: refuses prompts whose placeholders do not match
) -> PlacedPrompt:
    batch, num_slots, hidden = slots.features.shape
    check_counts(is_visual, slots.placeholders or num_slots)  # the prompts as written, before fillers
    entered = None
    if slots.fillers:
        entered, is_filler = prepend_fillers(slots.placeholders, is_visual.shape[1], is_visual.device)
        is_visual = gather_or_zero(is_visual, entered) | is_filler
        inputs_embeds, new_valid, position_ids = (gather_or_zero(t, entered) for t in (inputs_embeds, new_valid, position_ids))
    visual_positions = true_positions(is_visual, num_slots)  # [B, S]
    inputs_embeds = inputs_embeds.scatter(
        1, visual_positions[..., None].expand(batch, num_slots, hidden), slots.features.to(inputs_embeds.dtype)
    )
    if slots.valid is not None:
        new_valid = new_valid.scatter(1, visual_positions, slots.valid & new_valid.gather(1, visual_positions))
    length = inputs_embeds.shape[1]
    placed = PlacedPrompt(
        inputs_embeds, new_valid, position_ids, visual_positions, entered,
        on_slots(slots.scores, visual_positions, length), on_slots(slots.protected, visual_positions, length), slots.protected_counts,
        slots.placeholders or [num_slots] * batch, slots.images_per_sample, slots.image_tokens,
    )
    return compacted(placed, is_visual, slots.valid_counts) if slots.compact else placed


def on_slots(values: torch.Tensor | None, visual_positions: torch.Tensor, length: int) -> torch.Tensor | None:
    """[B, S] per-slot values laid on the [B, length] sequence at the slots' positions (zeros elsewhere)."""
    if values is None:
        return None
    return torch.zeros(values.shape[0], length, dtype=values.dtype, device=values.device).scatter(1, visual_positions, values)


def compacted(placed: PlacedPrompt, is_visual: torch.Tensor, valid_counts: list[int] | None) -> PlacedPrompt:
    """`placed` without its empty slots (DyMU's merged-away ones, pooling's, a method's unkept ones),
    each sample's tokens gathered to the front of its largest count, in order."""
    slot_valid = placed.new_valid.gather(1, placed.visual_positions)  # [B, S]
    batch, length = is_visual.shape
    # Sizing the compacted sequence needs the batch's largest token count: the engine's one host
    # read, with DyMU only (its count is data-dependent by design; the others' are host-known).
    count = max(valid_counts) if valid_counts is not None else int(slot_valid.sum(dim=1).max())
    slots = slot_valid.shape[1]
    earliest_first = 1 - torch.arange(slots, device=is_visual.device) / slots  # (0, 1]: a sample short of `count` keeps its first empty slots
    slot_scores = torch.where(slot_valid, 2.0, earliest_first)  # every token above every empty slot
    valid_scores = torch.zeros(batch, length, device=is_visual.device).scatter(1, placed.visual_positions, slot_scores)
    kept, _ = select_kept_positions(valid_scores, placed.visual_positions, count)  # [B, L0]
    inputs_embeds, new_valid, position_ids, is_visual = (
        gather_tokens(t, kept) for t in (placed.inputs_embeds, placed.new_valid, placed.position_ids, is_visual))
    occupied = new_valid | is_visual  # not padding: a real token or an image slot, merged away or not
    last = (occupied.long() * torch.arange(occupied.shape[1], device=occupied.device)).amax(dim=1)
    require(new_valid.gather(1, last[:, None]).all(), lambda: (
        "a prompt of this batch ends with an image token, and its image keeps fewer tokens than another image of the "
        "batch (DyMU merging, or a per-image budget on LLaVA-NeXT): the slots that pad it would be its last token, from "
        "which the next token is predicted. Put text after the image (chat templates do), or run such prompts one at a time"))
    return replace(
        placed, inputs_embeds=inputs_embeds, new_valid=new_valid, position_ids=position_ids,
        visual_positions=true_positions(is_visual, count),
        entered_positions=kept if placed.entered_positions is None else placed.entered_positions.gather(1, kept),
        slot_scores=None if placed.slot_scores is None else gather_tokens(placed.slot_scores, kept),
        protected=None if placed.protected is None else gather_tokens(placed.protected, kept),
        visual_counts=valid_counts if valid_counts is not None else [count] if batch == 1 else None,
    )
