"""DART as pure batched tensor functions: pivots by the L1 norm of rotated keys, then, per pivot,
the pool tokens least similar to it.

Official code (xqy1111111/DART@5a19452, `DART.get_retained_image_token`) runs at batch size 1: 4
image and 4 text pivots by key L1 norm at layer K-1 (text: every token after the image), then for
each pivot in CPython `set` iteration order the `M // 8` pool tokens (image tokens minus the image
pivots) of lowest cosine similarity to it, on layer K-1's outputs through the final norm, each
removed from the pool once taken. Kept visual tokens: 4 + 8 * (M // 8).

The official Qwen2.5-VL code (xqy1111111/DART@d6a5af6, batch 1, transformers 4.55) sizes the picks by
a ratio of the image's token count instead: `int(L * (1 - reduction_ratio) / 8)` per pivot (default
reduction_ratio 0.778), at layer 2, kept tokens at their original 3-D ids; `image_quotas` takes that
rule per sample for a fractional VISUAL_BUDGET (the kept share).

Here the pivots are visited in ascending position (`order="sorted"`, no host sync) or in the
official set order (`order="official"`, which needs the pivot positions on the host: one sync per
prefill). `quotas` gives each pivot its own count: `official_quotas` or `matched_quotas`. A prompt
with fewer than 4 real tokens after its image (a raw prompt; chat templates always have more) has its
text pivots repeated in turn (none: the image pivots again), where the official code raises.
"""

from __future__ import annotations

import torch

IMAGE_PIVOTS = 4
TEXT_PIVOTS = 4
PIVOT_ORDERS = ("sorted", "official")


def official_quotas(budget: int | float) -> tuple[int, ...]:
    """`max_num_trunction // 8` per pivot: 4 + 8 * (budget // 8) kept (192 -> 196, 64 -> 68). A
    fraction is the official Qwen2.5-VL rule's share already applied: `int(L * (1 - r) / 8)`."""
    return (int(budget // (IMAGE_PIVOTS + TEXT_PIVOTS)),) * (IMAGE_PIVOTS + TEXT_PIVOTS)


def matched_quotas(budget: int) -> tuple[int, ...]:
    """Exactly `budget` kept: the budget minus the image pivots, spread over the 8 pivots, the
    first ones in visiting order taking one more."""
    pivots = IMAGE_PIVOTS + TEXT_PIVOTS
    picks = budget - IMAGE_PIVOTS
    return tuple(picks // pivots + (1 if index < picks % pivots else 0) for index in range(pivots))


def quotas_for(budget: int, rule: str) -> tuple[int, ...]:
    """Picks per pivot under DART_QUOTA `rule` ("official" or "matched")."""
    return (official_quotas if rule == "official" else matched_quotas)(budget)


def image_quotas(budget: int | float, rule: str, num_visual: int) -> tuple[int, ...]:
    """Picks per pivot for an image of `num_visual` tokens: a count as `quotas_for`; a fraction f
    (the kept share, 1 - reduction_ratio) as the official Qwen2.5-VL code sizes it,
    `int(num_visual * f / 8)` per pivot ("official"), or exactly round(num_visual * f) ("matched")."""
    if not isinstance(budget, float):
        return quotas_for(budget, rule)
    if rule == "official":
        # the official code is given r = 1 - f and computes 1 - r, which in floats can fall just below
        # f (1 - (1 - 0.222) = 0.22199999999999998): 4000 tokens then get 110 picks per pivot, not 111.
        # (For a few two-decimal f, such as 0.33, float(1 - f) is not the r a user would type: 0.67.)
        return official_quotas(num_visual * (1 - (1 - budget)))
    return matched_quotas(max(IMAGE_PIVOTS, round(num_visual * budget)))


def kept_count(quotas: tuple[int, ...]) -> int:
    return IMAGE_PIVOTS + sum(quotas)


def key_l1_norms(rotated_keys: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, L, D] rotated keys -> [B, L] float32 L1 norm over every head (fp16 would overflow)."""
    return rotated_keys.float().abs().sum(dim=(1, 3))


def top_positions(scores: torch.Tensor, allowed: torch.Tensor, count: int) -> torch.Tensor:
    """[B, count] positions of the highest `scores` [B, L] among `allowed` [B, L] (best first)."""
    return scores.float().masked_fill(~allowed, float("-inf")).topk(count, dim=1).indices


def cycled_pivots(pivots: torch.Tensor, candidates: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """`pivots` [B, k] (best first, from top_positions over `candidates` [B, L]) where a row with
    n < k candidates repeats its n best in turn, and a row with none takes `fallback` [B, k]: top-k
    over fewer than k finite scores returned masked slots (padding in a batch), so the kept set
    depended on the batch. The official code raises there (topk(4) over too few text tokens)."""
    count = candidates.sum(dim=1, keepdim=True)  # [B, 1]
    slot = torch.arange(pivots.shape[1], device=pivots.device)[None, :] % count.clamp_min(1)  # [B, k]
    return torch.where(count > 0, pivots.gather(1, slot), fallback)


def official_pivot_order(pivots: torch.Tensor, first_real: torch.Tensor) -> torch.Tensor:
    """The order CPython iterates `set(image_pivots + text_pivots)` per sample, the positions
    counted from the sample's first real token as the unpadded official prompt counts them (a
    host sync)."""
    offsets = first_real.tolist()
    rows = [[position + offset for position in set(p - offset for p in row)] for row, offset in zip(pivots.tolist(), offsets)]
    if any(len(row) < pivots.shape[1] for row in rows):
        raise ValueError(f"DART_PIVOTS=official needs {TEXT_PIVOTS} real tokens after each image to pick its text pivots from, "
                         "as the official code does (its topk raises); a prompt here has fewer. Use the default pivot order.")
    return torch.tensor(rows, device=pivots.device)


def dart_keep_mask(
    key_norms: torch.Tensor,  # [B, L] float32, layer K-1's rotated keys, L1 over heads
    normed: torch.Tensor,  # [B, L, hidden] layer K-1's outputs through the final norm
    is_image: torch.Tensor,  # [B, L] bool: real image tokens
    is_text: torch.Tensor,  # [B, L] bool: real tokens after the image (the text pivot candidates)
    quotas: tuple[int, ...],  # picks per pivot, in visiting order
    order: str = "sorted",
    first_real: torch.Tensor | None = None,  # [B] long, index of each sample's first real token (official order only)
    sample_quotas: torch.Tensor | None = None,  # [B, 8] long <= quotas: each sample's own picks per pivot
) -> torch.Tensor:
    """[B, L] bool: the image tokens DART keeps (its image pivots and every pivot's picks). With
    `sample_quotas`, `quotas` is the batch's largest per pivot and sample b takes its best
    sample_quotas[b, step] of them."""
    image_pivots = top_positions(key_norms, is_image, IMAGE_PIVOTS)
    text_pivots = cycled_pivots(top_positions(key_norms, is_text, TEXT_PIVOTS), is_text, image_pivots)
    pivots = torch.cat([image_pivots, text_pivots], dim=1)  # [B, 8] in official insertion order
    pivots = official_pivot_order(pivots, first_real) if order == "official" else pivots.sort(dim=1).values
    unit = torch.nn.functional.normalize(normed.float(), dim=-1, eps=1e-8)
    kept = torch.zeros_like(is_image).scatter(1, image_pivots, True)
    pool = is_image & ~kept
    for step, quota in enumerate(quotas):
        if quota == 0:
            continue
        pivot = unit.gather(1, pivots[:, step, None, None].expand(-1, 1, unit.shape[-1]))  # [B, 1, hidden]
        similarity = (unit * pivot).sum(dim=-1)  # [B, L]
        # a count's quota can pass the sequence's length (VISUAL_BUDGET=16384 on a short prompt):
        # its image is smaller than the count, keeps every token, and topk must not ask for more slots
        picks = min(quota, pool.shape[1])
        picked = top_positions(-similarity, pool, picks)  # [B, picks] best first, distinct
        if sample_quotas is None:
            kept, pool = kept.scatter(1, picked, True), pool.scatter(1, picked, False)
            continue
        taken = torch.arange(picks, device=picked.device)[None, :] < sample_quotas[:, step, None]  # [B, picks]
        chosen = torch.zeros_like(kept).scatter(1, picked, taken)
        kept, pool = kept | chosen, pool & ~chosen
    return kept
