"""VisPruner (Zhang et al., ICCV 2025; Theia-4869/VisPruner) as a pure tensor function.

Important tokens: the patches with the highest [CLS] attention in the CLIP layer LLaVA reads
(head mean). Diverse tokens: from the rest, in descending attention order, rounds of
de-duplication drop up to 8 tokens at a time: the residual list is split alternately into a (even
positions) and b (odd), each a token is scored by its highest cosine similarity to any b token
(CLIP features of that layer), the highest-scoring a tokens are dropped, and the new residual is the
surviving a tokens in descending score order followed by b. Rounds stop when the residual holds
the diverse budget.

Deviations from the official code, on purpose:
- An odd residual length works (a takes the extra token); the official indexing fails there.
- Scores and similarities in float32 (official: the model dtype); ties go to the lower index, or
  the earlier list position (stable sorts; official `argsort` is not stable).
- Logical positions (each kept patch keeps its placeholder's position id); the official code
  renumbers, which `HYBRID_POSITIONS=renumbered` reproduces.
"""

from __future__ import annotations

import torch

from .selection import Selection, descending_order, sorted_slots, working_dtype

ROUND_DROP = 8  # tokens dropped per de-duplication round (official)


def vispruner_split(budget: int) -> int:
    """Important tokens for a budget: the README's operating points, 0.75 at 64 tokens or fewer
    (64 -> 48 + 16), else the code's default 0.5 (128 -> 64 + 64, 192 -> 96 + 96); int() as official."""
    return int(budget * (0.75 if budget <= 64 else 0.5))


def deduplicate(residual: torch.Tensor, normed: torch.Tensor, keep: int) -> torch.Tensor:
    """Rounds of bipartite de-duplication of `residual` [N, R] slot indices down to `keep` tokens."""
    while keep > 0:
        drop = min(ROUND_DROP, residual.shape[1] - keep)
        if drop <= 0:
            break
        a, b = residual[:, 0::2], residual[:, 1::2]
        a_features = normed.gather(1, a[..., None].expand(-1, -1, normed.shape[-1]))
        b_features = normed.gather(1, b[..., None].expand(-1, -1, normed.shape[-1]))
        score = (a_features @ b_features.transpose(1, 2)).amax(dim=-1)  # [N, |a|]
        a_by_score = a.gather(1, descending_order(score))
        residual = torch.cat([a_by_score[:, drop:], b], dim=1)
    return residual


def vispruner_select(
    cls_attention: torch.Tensor,  # [N, P] [CLS] attention over the patches
    features: torch.Tensor,  # [N, P, C] CLIP features of the same layer, at the patches
    budget: int,
    important: int,
) -> Selection:
    """`important` tokens by attention + `budget - important` diverse ones, kept [N, budget] in slot order."""
    order = descending_order(cls_attention)
    work = working_dtype(features)
    normed = torch.nn.functional.normalize(features.to(work), dim=-1)
    diverse = deduplicate(order[:, important:], normed, budget - important) if budget > important else order[:, :0]
    return Selection(kept=sorted_slots(torch.cat([order[:, :important], diverse], dim=1)))
