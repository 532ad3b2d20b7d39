"""DivPrune (Alvar et al., CVPR 2025; vbdi/divprune) as a pure tensor function.

A max-min diversity greedy over the projected visual features (the LLM's input space): with
D = 1 - cosine similarity, the first token is the one farthest from its nearest neighbour; each next
token maximises its distance to the nearest token already chosen.

Deviations from the official code, on purpose:
- The diagonal is excluded explicitly when finding nearest neighbours (official: the second
  smallest distance, which assumes the self-distance is the minimum, untrue in fp16), and chosen
  tokens are excluded from later picks (official can pick a duplicate twice when features repeat).
- float32 distances (official: the model dtype); ties go to the lowest index (torch.argmax).
- Logical positions; the official code renumbers (`HYBRID_POSITIONS=renumbered`).
- On LLaVA-NeXT the candidates are an image's patch tokens (`adapters`): the official code selects
  over the whole packed span, its newline tokens included.
"""

from __future__ import annotations

import torch

from .selection import Selection, sorted_slots, working_dtype


def cosine_distances(features: torch.Tensor) -> torch.Tensor:
    """[N, P, C] -> [N, P, P] float32, 1 - cosine similarity."""
    normed = torch.nn.functional.normalize(features.to(working_dtype(features)), dim=-1)
    return 1.0 - normed @ normed.transpose(1, 2)


def divprune_select(features: torch.Tensor, budget: int) -> Selection:  # features: [N, P, C]
    """`budget` tokens by the max-min greedy, kept [N, budget] in slot order (static loop, no host sync)."""
    images, patches, _ = features.shape
    distance = cosine_distances(features)
    eye = torch.eye(patches, dtype=torch.bool, device=features.device)
    nearest = distance.masked_fill(eye, float("inf")).amin(dim=1)  # [N, P] each token's nearest other token
    pick = nearest.argmax(dim=1)  # [N]
    chosen = torch.zeros(images, patches, dtype=torch.bool, device=features.device)
    picks = []
    to_chosen = torch.full((images, patches), float("inf"), dtype=distance.dtype, device=features.device)
    for _ in range(budget):
        picks.append(pick)
        chosen = chosen.scatter(1, pick[:, None], True)
        to_chosen = torch.minimum(to_chosen, distance.gather(1, pick[:, None, None].expand(-1, 1, patches))[:, 0])
        pick = to_chosen.masked_fill(chosen, float("-inf")).argmax(dim=1)
    return Selection(kept=sorted_slots(torch.stack(picks, dim=1)))
