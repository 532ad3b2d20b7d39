"""VisionZip (Yang et al., CVPR 2025; dvlab-research/VisionZip) as a pure tensor function.

Dominant tokens: the patches with the highest [CLS] attention in the CLIP layer LLaVA reads.
Contextual tokens: the other patches, in patch order, are split into `contextual` groups around
evenly spaced targets (every `step`-th remaining patch, `step = max(1, R // contextual)`); each other
patch joins the target whose head-averaged key it is most similar to (cosine), and the target's
token becomes its own hidden state plus the mean of its members' (the official rule: the target is
added to the members' mean, not averaged with them).

Deviations from the official code, on purpose:
- [CLS] is not kept. Official VisionZip counts [CLS] among the dominant tokens and feeds it to the
  projector; llava-hf LLaVA (like LLaVA-1.5 itself) drops [CLS] before the projector, which never
  saw it in training, and the prompt has no placeholder for it. Here all `dominant` tokens are
  patches, and the budget (rule A, tokens entering the LLM) is dominant + contextual.
- Positions and order: each dominant token keeps its patch's placeholder and position id, each
  contextual token its target's (logical positions), so the tokens enter the LLM in patch order. The
  official code orders them [dominant tokens ascending, then contextual tokens in target order] at
  contiguous positions. `HYBRID_POSITIONS=renumbered` gives contiguous positions, still in patch order.
- Scores, similarities and the merge run in float32 (official: the model dtype, fp16); ties go to
  the lower index (stable sorts; official `topk` leaves them unspecified).
"""

from __future__ import annotations

import torch

from .selection import Selection, descending_order, sorted_slots, working_dtype

OFFICIAL_SPLIT = (54, 10)  # the only split the authors give: 64 = 54 dominant + 10 contextual


def visionzip_split(budget: int) -> tuple[int, int]:
    """(dominant, contextual) for a budget: the official 54 : 10 ratio, contextual = round(budget *
    10 / 64) (192 -> 162 + 30, 128 -> 108 + 20, 64 -> 54 + 10), at least one dominant token."""
    contextual = min(budget - 1, round(budget * OFFICIAL_SPLIT[1] / sum(OFFICIAL_SPLIT)))
    return budget - contextual, contextual


def contextual_targets(remaining: int, contextual: int, device=None) -> torch.Tensor:
    """Indices into the remaining patches of the contextual targets: 0, step, 2 step, ... (built on
    `device`: a host-built index copied to CUDA would wait for the stream)."""
    step = max(1, remaining // contextual)
    return torch.arange(contextual, device=device) * step


def visionzip_select(
    cls_attention: torch.Tensor,  # [N, P] [CLS] attention over the patches
    keys: torch.Tensor,  # [N, P, d] head-averaged keys of the same layer
    hidden: torch.Tensor,  # [N, P, C] that layer's output at the patches
    dominant: int,
    contextual: int,
) -> Selection:
    """The dominant + contextual tokens at their slots, in slot order: kept [N, D + C],
    features [N, D + C, C] (CLIP space, before the projector), sizes [N, D + C]."""
    images, patches, width = hidden.shape
    work = working_dtype(hidden)
    dominant_slots = descending_order(cls_attention)[:, :dominant]  # [N, D]
    tokens = hidden.to(work)  # a dominant token is its own patch's hidden state
    sizes = torch.ones(images, patches, dtype=torch.long, device=hidden.device)
    is_kept = torch.zeros(images, patches, dtype=torch.bool, device=hidden.device).scatter(1, dominant_slots, True)
    if contextual:
        remaining = sorted_slots(descending_order(cls_attention)[:, dominant:])  # [N, R] patch order
        targets_at = contextual_targets(patches - dominant, contextual, hidden.device)  # [C]
        rest_keys = torch.nn.functional.normalize(keys.to(work).gather(1, remaining[..., None].expand(-1, -1, keys.shape[-1])), dim=-1)
        rest_hidden = hidden.to(work).gather(1, remaining[..., None].expand(-1, -1, width))  # [N, R, C]
        similarity = rest_keys @ rest_keys[:, targets_at].transpose(1, 2)  # [N, R, C_targets]
        is_member = torch.ones(remaining.shape[1], dtype=torch.bool, device=hidden.device).index_fill(0, targets_at, False)
        members = torch.nn.functional.one_hot(similarity.argmax(dim=-1), contextual).to(work) * is_member[None, :, None]
        count = members.sum(dim=1)  # [N, C_targets]
        merged = rest_hidden[:, targets_at] + (members.transpose(1, 2) @ rest_hidden) / count.clamp_min(1)[..., None]
        target_slots = remaining[:, targets_at]  # [N, C_targets]
        tokens = tokens.scatter(1, target_slots[..., None].expand(-1, -1, width), merged)
        sizes = sizes.scatter(1, target_slots, count.long() + 1)
        is_kept = is_kept.scatter(1, target_slots, True)
    kept = sorted_slots(torch.where(is_kept, torch.arange(patches, device=hidden.device), patches))[:, : dominant + contextual]
    return Selection(
        kept=kept,
        features=tokens.gather(1, kept[..., None].expand(-1, -1, width)).to(hidden.dtype),
        sizes=sizes.gather(1, kept),
    )
