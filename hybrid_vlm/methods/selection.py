"""What a method before the LLM returns, and the one step that lays it onto the image's slots.

A `Selection` is typed data, not a blackboard: kept slot indices per image, ascending, and,
for methods that merge, the token each kept slot now holds and how many patches it covers.
`place_selection` scatters it onto the image's placeholder slots; `placement.place_images` then
drops the empty slots with the same gather that FastV's pruning uses, so text is never dropped
and every kept token keeps its slot's position id.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..runtime import require


@dataclass
class Selection:
    """kept: [N, K] long, slot indices (0 <= i < P) in ascending order, unique per image.
    features: [N, K, C] the token at each kept slot (merged methods), or None: the input's own.
    sizes: [N, K] long, patches each kept token stands for (merged methods), or None: 1 each."""

    kept: torch.Tensor
    features: torch.Tensor | None = None
    sizes: torch.Tensor | None = None


def working_dtype(tensor: torch.Tensor) -> torch.dtype:
    """Scores and similarities run in float32, or float64 for float64 inputs (never in half)."""
    return torch.promote_types(tensor.dtype, torch.float32)


def sorted_slots(slots: torch.Tensor) -> torch.Tensor:
    """[N, K] slot indices in any order -> ascending."""
    return slots.sort(dim=1).values


def descending_order(scores: torch.Tensor) -> torch.Tensor:
    """[N, P] -> [N, P] indices by score, highest first, the lower index first among equals (a
    stable sort: the tie rule every method here and its test reference share)."""
    return scores.sort(dim=1, descending=True, stable=True).indices


def check_selection(selection: Selection, num_slots: int, budget: int) -> None:
    """Shapes are static (Python ints): K == budget, every index a slot. Uniqueness is data: it is
    checked by `place_selection` from the placed count, without a host read on CUDA."""
    kept = selection.kept
    if kept.dim() != 2 or kept.shape[1] != budget:
        raise ValueError(f"a selection must keep [images, {budget}] slots, got {tuple(kept.shape)}")
    if budget > num_slots:
        raise ValueError(f"a selection of {budget} tokens cannot come from {num_slots} slots")


def place_selection(
    selection: Selection, num_slots: int, budget: int, features: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [N, P, C] with the kept tokens at their slots and zeros elsewhere, valid [N, P]).

    `features` [N, P, C] supplies the tokens of a selection without its own. Repeated indices are
    refused (`runtime.require`: a host check on CPU, a device assert elsewhere)."""
    kept = selection.kept
    check_selection(selection, num_slots, budget)
    if selection.features is None:
        tokens = features.gather(1, kept[..., None].expand(-1, -1, features.shape[-1]))
    else:
        tokens = selection.features
    images, _, hidden = tokens.shape
    valid = torch.zeros(images, num_slots, dtype=torch.bool, device=kept.device).scatter(1, kept, True)
    require((valid.sum(dim=1) == kept.shape[1]).all(), lambda: "a selection kept the same slot twice")
    placed = tokens.new_zeros(images, num_slots, hidden).scatter(1, kept[..., None].expand(-1, -1, hidden), tokens)
    return placed, valid
